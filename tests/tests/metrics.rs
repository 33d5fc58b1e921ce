//! Prometheus metrics over real HTTP: after calls through a router, its scrape shows them per
//! model and per node; the control plane's shows the leader, the table and its routers.

use std::time::Duration;

use fulcrum_control_plane::{AdminAuth, ControlPlaneConfig};
use fulcrum_sim::node::{NodeSimConfig, spawn};
use fulcrum_tests::eventually;
use fulcrum_tests::infer::echo_request;
use fulcrum_tests::scrape::{get, sample};
use fulcrum_tests::stack::{self, Running, admin, oip, register, spec, wait_ready};
use tokio::net::TcpListener;

/// The metric families a scrape declares (`# TYPE name kind`), counters with their `_total`.
fn families(body: &str) -> std::collections::BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            })
        })
        .collect()
}

/// Every `fulcrum_*` metric name in a file of `deploy/`, without histogram suffixes.
fn referenced(path: &str) -> std::collections::BTreeSet<String> {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    let text = std::fs::read_to_string(&file).expect("read a deploy file");
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("fulcrum_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

/// A control plane on the in-memory store serving metrics on `metrics`.
async fn control_plane(metrics: TcpListener) -> Running {
    let store = fulcrum_control_plane::store::open("memory:").await.unwrap();
    Running::spawn(move |listener, stopped| async move {
        let mut config = ControlPlaneConfig::new("cp-metrics", AdminAuth::Loopback(None));
        config.probe = stack::fast_probes();
        let shutdown = async move {
            let _ = stopped.await;
        };
        fulcrum_control_plane::serve_with_metrics(config, store, listener, Some(metrics), shutdown)
            .await
            .expect("control plane");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_calls_per_model_and_per_node() {
    let cp_metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_metrics_addr = cp_metrics.local_addr().unwrap();
    let cp = control_plane(cp_metrics).await;
    let mut admin = admin(cp.addr).await;
    let node = spawn(
        NodeSimConfig {
            name: "a-1".into(),
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    register(&mut admin, spec("a-1", node.addr, "a", &["echo"], 4)).await;
    let (router, metrics_addr) = stack::router_with_metrics("a", cp.addr).await;
    wait_ready(router.addr).await;
    let mut c = oip(router.addr).await;
    for _ in 0..5 {
        c.model_infer(echo_request("echo", &[1.0]))
            .await
            .expect("call");
    }
    let unknown = c.model_infer(echo_request("nope", &[1.0])).await;
    assert!(unknown.is_err());

    let (status, body) = get(metrics_addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    // Unknown models are refused before any model's counters: five OK calls of echo.
    let ok = sample(
        &body,
        r#"fulcrum_router_requests_total{model="echo",code="OK"}"#,
    );
    assert_eq!(ok, Some(5.0), "{body}");
    let attempts = sample(
        &body,
        r#"fulcrum_router_node_attempts_total{node="a-1",region="a"}"#,
    );
    assert!(attempts.is_some_and(|n| n >= 5.0), "{body}");
    let count = sample(
        &body,
        r#"fulcrum_router_request_duration_seconds_count{model="echo"}"#,
    );
    assert_eq!(count, Some(5.0), "{body}");
    let inf = sample(
        &body,
        r#"fulcrum_router_request_duration_seconds_bucket{le="+Inf",model="echo"}"#,
    )
    .or_else(|| {
        sample(
            &body,
            r#"fulcrum_router_request_duration_seconds_bucket{model="echo",le="+Inf"}"#,
        )
    });
    assert_eq!(inf, Some(5.0), "{body}");
    let version = sample(&body, "fulcrum_router_routing_version ");
    assert!(version.is_some_and(|v| v > 0.0), "{body}");
    assert_eq!(sample(&body, "fulcrum_router_queue_waiting "), Some(0.0));

    // The control plane: the one replica leads, serves the router, and counts the node healthy.
    let (status, cp_body) = get(cp_metrics_addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(
        sample(&cp_body, "fulcrum_control_leader "),
        Some(1.0),
        "{cp_body}"
    );
    assert_eq!(
        sample(&cp_body, "fulcrum_control_routers "),
        Some(1.0),
        "{cp_body}"
    );
    assert_eq!(
        sample(&cp_body, r#"fulcrum_control_nodes{health="healthy"}"#),
        Some(1.0),
        "{cp_body}"
    );
    let weight = sample(
        &cp_body,
        r#"fulcrum_control_node_weight{node="a-1",region="a"}"#,
    );
    assert!(weight.is_some_and(|w| w > 0.0), "{cp_body}");
    assert!(
        sample(&cp_body, "fulcrum_control_routing_version ")
            .is_some_and(|v| v >= version.unwrap_or(0.0)),
        "{cp_body}"
    );

    // The alerting rules and the dashboard in deploy/ name only metrics that exist (those of
    // a router checking tokens too, which only such a router exports).
    let check = stack::token_check("a secret for the metrics test, long enough");
    let mut with_tokens = fulcrum_data_plane::router::RouterState::new("a".into(), 1 << 20);
    with_tokens.auth = Some(check.auth.clone());
    // And those of a router with a shared cache level, which only such a router exports.
    with_tokens.shared_cache = Some(
        fulcrum_data_plane::shared_cache::SharedCacheSetup::new(
            "redis://127.0.0.1:1",
            b"a secret for the metrics test, long enough",
        )
        .unwrap()
        .cache,
    );
    let auth_body = fulcrum_data_plane::metrics::render(&std::sync::Arc::new(with_tokens));
    let exported = &(&families(&body) | &families(&cp_body)) | &families(&auth_body);
    for file in [
        "deploy/prometheus/fulcrum-rules.yml",
        "deploy/grafana/fulcrum-dashboard.json",
    ] {
        let names = referenced(file);
        assert!(names.len() > 5, "{file}: {names:?}");
        let missing: Vec<_> = names.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics nobody exports: {missing:?}"
        );
    }

    // Anything else is not found; a node that fails shows in its failure counter.
    let (status, _) = get(metrics_addr, "/nope").await;
    assert!(status.contains("404"), "{status}");
    node.stop().await;
    eventually("a failure counted", Duration::from_secs(20), || async {
        let mut c = c.clone();
        let _ = c.model_infer(echo_request("echo", &[1.0])).await;
        let (_, body) = get(metrics_addr, "/metrics").await;
        sample(
            &body,
            r#"fulcrum_router_node_failures_total{node="a-1",region="a"}"#,
        )
        .filter(|&n| n >= 1.0)
    })
    .await;
}
