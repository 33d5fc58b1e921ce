//! Call priorities end to end (real etcd, real gRPC, a node-sim): once every node is full,
//! critical calls overtake a backlog of sheddable ones, a model's default priority applies to
//! the calls that name none, what is shed is counted by priority, and a priority that is not
//! one is refused before anything is forwarded.

use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{ModelPolicy, Priority};
use fulcrum_sim::node::NodeSimConfig;
use fulcrum_tests::eventually;
use fulcrum_tests::infer::echo_request;
use fulcrum_tests::scrape::metric;
use fulcrum_tests::stack::{self, oip, wait_ready};
use tonic::Code;

/// A request for the echo model naming `priority` in the header, or none.
fn request(priority: Option<&str>) -> tonic::Request<fulcrum_proto::inference::ModelInferRequest> {
    let mut r = tonic::Request::new(echo_request("echo", &[1.0]));
    if let Some(p) = priority {
        r.metadata_mut()
            .insert("fulcrum-priority", p.parse().unwrap());
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_calls_overtake_a_backlog_of_sheddable_ones() {
    let _serial = fulcrum_tests::exclusive().await;
    // Capacity 2: the router lets 3 calls at a time reach the node, and queues the rest.
    let stack::OneNode {
        node: _node,
        mut admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(
        NodeSimConfig {
            service_time: "const:100ms".parse().unwrap(),
            slots: 2,
            ..Default::default()
        },
        2,
    )
    .await;
    // Calls that name no priority are sheddable for this model.
    let policy = ModelPolicy {
        model: "echo".into(),
        default_priority: Priority::Sheddable as i32,
        ..Default::default()
    };
    admin.set_model_policy(policy.clone()).await.unwrap();
    let (router, metrics) = stack::router_with_metrics("a", cp.addr).await;
    wait_ready(router.addr).await;
    stack::wait_policies_applied(&admin, &[policy]).await;
    let c = oip(router.addr).await;

    // A backlog: 30 calls naming no priority, 3 at the node and the rest waiting.
    let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
    let call = |kind: &'static str, priority: Option<&'static str>| {
        let (mut c, done) = (c.clone(), done.clone());
        tokio::spawn(async move {
            let result = c.model_infer(request(priority)).await;
            done.send((kind, result)).unwrap();
        })
    };
    let mut tasks: Vec<_> = (0..30).map(|_| call("default", None)).collect();
    let backlog = eventually(
        "a backlog in the router's queue",
        Duration::from_secs(10),
        || async {
            metric(metrics, "fulcrum_router_queue_waiting ")
                .await
                .filter(|&n| n >= 20.0)
        },
    )
    .await;
    // Six critical calls join it.
    tasks.extend((0..6).map(|_| call("critical", Some("critical"))));
    drop(done);
    let mut order = Vec::new();
    while let Some((kind, result)) = finished.recv().await {
        order.push((kind, result));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // Every critical call was served, and before the backlog queued ahead of it: the only
    // calls of the backlog answered first are those the node already held when the critical
    // calls came (at most 3), and any a slot freed for in the moment before they queued.
    let critical: Vec<_> = order.iter().filter(|(k, _)| *k == "critical").collect();
    assert_eq!(critical.len(), 6);
    for (_, r) in &critical {
        assert!(r.is_ok(), "a critical call failed: {r:?}");
    }
    let last_critical = order.iter().rposition(|(k, _)| *k == "critical").unwrap();
    let backlog_first = order[..last_critical]
        .iter()
        .filter(|(k, r)| *k == "default" && r.is_ok())
        .count();
    assert!(
        backlog_first <= 5,
        "{backlog_first} calls of the backlog ({backlog} queued) were answered before the last critical call"
    );
    // The backlog's calls were served or shed, RESOURCE_EXHAUSTED, as sheddable ones: the
    // model's default.
    let mut shed = 0.0;
    for (kind, r) in &order {
        if let Err(e) = r {
            assert_eq!(*kind, "default", "{e:?}");
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            assert!(e.message().contains("concurrency limit"), "{}", e.message());
            shed += 1.0;
        }
    }
    let shed_metric = |p: &'static str| {
        let prefix = format!("fulcrum_router_shed_total{{model=\"echo\",priority=\"{p}\"}}");
        async move { metric(metrics, &prefix).await }
    };
    let errors: Vec<_> = order
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().map(|e| e.message().to_owned()))
        .collect();
    assert_eq!(shed_metric("sheddable").await, Some(shed), "{errors:?}");
    assert_eq!(shed_metric("critical").await, Some(0.0));
    assert_eq!(shed_metric("normal").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_that_is_not_one_is_refused_and_never_forwarded() {
    let stack::OneNode {
        node,
        mut admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(NodeSimConfig::default(), 4).await;
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    let mut c = oip(router.addr).await;
    let before = node.controls().calls();

    let err = c.model_infer(request(Some("urgent"))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("\"urgent\""), "{}", err.message());
    assert!(
        err.message().contains("critical, normal or sheddable"),
        "{}",
        err.message()
    );
    // Twice is refused too (which one would count?).
    let mut twice = request(Some("critical"));
    twice
        .metadata_mut()
        .append("fulcrum-priority", "sheddable".parse().unwrap());
    let err = c.model_infer(twice).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("more than once"),
        "{}",
        err.message()
    );
    // A stream is refused whole.
    let mut stream = tonic::Request::new(tokio_stream::iter(vec![echo_request("echo", &[1.0])]));
    stream
        .metadata_mut()
        .insert("fulcrum-priority", "high".parse().unwrap());
    let err = c.model_stream_infer(stream).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        node.controls().calls(),
        before,
        "a refused call reached the node"
    );

    // `fulcrum load --header` carries it on every call: every one refused, at once.
    let report = fulcrum_sim::load::run(fulcrum_sim::load::LoadConfig {
        target: router.addr.to_string(),
        rps: 50.0,
        duration: Duration::from_millis(200),
        headers: vec![("fulcrum-priority".into(), "urgent".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(report.sent > 0);
    assert_eq!(
        report.errors.get("INVALID_ARGUMENT"),
        Some(&report.sent),
        "{report:?}"
    );
    assert!(report.error_latency.max_us > 0, "{report:?}");
    assert_eq!(
        node.controls().calls(),
        before,
        "a refused call reached the node"
    );

    // Each priority, in any case, is accepted.
    for p in ["critical", "Normal", "SHEDDABLE"] {
        c.model_infer(request(Some(p))).await.expect(p);
    }
    assert_eq!(node.controls().calls(), before + 3);

    // A policy naming a priority that does not exist is refused, and changes nothing.
    let err = admin
        .set_model_policy(ModelPolicy {
            model: "echo".into(),
            default_priority: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("default_priority 9"),
        "{}",
        err.message()
    );
    let policies = admin
        .list_model_policies(fulcrum_proto::fulcrum::v1::ListModelPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(policies.policies.is_empty(), "{policies:?}");
}
