//! Fallback models end to end (real etcd, real gRPC, node-sims): a call its model cannot serve
//! (its nodes failing, none declared, every one full) goes once to the model's fallback, and the
//! answer says so; calls refused for what they are never do; a model with side effects falls
//! back only when no node got the call; a stream's requests fall back too; when the fallback
//! fails as well the caller gets the primary's status naming both; bad fallback policies are
//! refused and change nothing.

use std::net::SocketAddr;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::admin_client::AdminClient;
use fulcrum_proto::fulcrum::v1::{GetModelPolicyRequest, HealthState, ModelPolicy};
use fulcrum_proto::inference::ModelInferRequest;
use fulcrum_sim::node::{NodeSimConfig, RunningNodeSim, spawn};
use fulcrum_tests::etcd::Etcd;
use fulcrum_tests::infer::{assert_echoed, echo_request, served_by};
use fulcrum_tests::scrape::metric;
use fulcrum_tests::stack::{self, Running, admin, oip, register, spec, wait_ready};
use tonic::Code;
use tonic::transport::Channel;

/// Model `big` on node `a-1`, model `small` on node `a-2`, and a router (with its metrics
/// address) that holds `policies`.
struct Stack {
    big: RunningNodeSim,
    small: RunningNodeSim,
    router: Running,
    metrics: SocketAddr,
    admin: AdminClient<Channel>,
    _cp: Running,
    _etcd: Etcd,
}

async fn node(name: &str, model: &str, config: NodeSimConfig) -> RunningNodeSim {
    spawn(
        NodeSimConfig {
            name: name.into(),
            models: vec![model.into()],
            ..config
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

async fn start(big: NodeSimConfig, big_capacity: i64, policies: &[ModelPolicy]) -> Stack {
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut admin = admin(cp.addr).await;
    let big = node("a-1", "big", big).await;
    let small = node("a-2", "small", NodeSimConfig::default()).await;
    register(
        &mut admin,
        spec("a-1", big.addr, "a", &["big"], big_capacity),
    )
    .await;
    register(&mut admin, spec("a-2", small.addr, "a", &["small"], 8)).await;
    for p in policies {
        admin.set_model_policy(p.clone()).await.unwrap();
    }
    let (router, metrics) = stack::router_with_metrics("a", cp.addr).await;
    wait_ready(router.addr).await;
    stack::wait_policies_applied(&admin, policies).await;
    for (id, model) in [("a-1", "big"), ("a-2", "small")] {
        stack::wait_serving(&admin, id, model).await;
    }
    Stack {
        big,
        small,
        router,
        metrics,
        admin,
        _cp: cp,
        _etcd: etcd,
    }
}

/// `model`'s policy: fall back to `small`.
fn falls_back(model: &str) -> ModelPolicy {
    ModelPolicy {
        model: model.into(),
        fallback_model: "small".into(),
        ..Default::default()
    }
}

fn header(md: &tonic::metadata::MetadataMap, name: &str) -> Option<String> {
    md.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn fallbacks(metrics: SocketAddr, model: &str, reason: &str, result: &str) -> f64 {
    let prefix = format!(
        "fulcrum_router_fallbacks_total{{model=\"{model}\",fallback=\"small\",reason=\"{reason}\",result=\"{result}\"}}"
    );
    metric(metrics, &prefix).await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_cannot_serve_falls_back_once_and_says_so() {
    let s = start(NodeSimConfig::default(), 4, &[falls_back("big")]).await;
    let mut c = oip(s.router.addr).await;

    // Served by its own node, the answer names no fallback.
    let req = echo_request("big", &[1.0, 2.0]);
    let resp = c.model_infer(req.clone()).await.unwrap();
    assert_eq!(served_by(resp.metadata()).0, "a-1");
    assert_eq!(header(resp.metadata(), "x-fulcrum-fallback"), None);
    assert_eq!(resp.get_ref().model_name, "big");
    assert_eq!(s.small.controls().calls(), 0);

    // Big's node fails every call: the call goes to small, and says why.
    s.big.controls().set_error_ratio(1.0).await.unwrap();
    for i in 1..=3 {
        let resp = c.model_infer(req.clone()).await.unwrap();
        let md = resp.metadata();
        assert_eq!(served_by(md).0, "a-2");
        assert_eq!(header(md, "x-fulcrum-fallback").as_deref(), Some("small"));
        assert_eq!(
            header(md, "x-fulcrum-fallback-reason").as_deref(),
            Some("unavailable")
        );
        assert_eq!(resp.get_ref().model_name, "small");
        assert_echoed(&req, resp.get_ref());
        assert_eq!(s.small.controls().served("small"), i);
    }
    assert_eq!(
        fallbacks(s.metrics, "big", "unavailable", "served").await,
        3.0
    );

    // A call refused for what it is does not fall back: nothing reaches small.
    let mut bad = echo_request("big", &[1.0, 2.0]);
    bad.inputs[0].shape = vec![1, 3];
    let err = c.model_infer(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(header(err.metadata(), "x-fulcrum-fallback"), None);
    assert_eq!(s.small.controls().calls(), 3);

    // The fallback failing too: the primary's code, both failures named.
    s.small.controls().set_error_ratio(1.0).await.unwrap();
    let err = c.model_infer(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("\"big\"") && err.message().contains("fallback, model \"small\""),
        "{}",
        err.message()
    );
    assert_eq!(
        header(err.metadata(), "x-fulcrum-fallback").as_deref(),
        Some("small")
    );
    assert_eq!(
        fallbacks(s.metrics, "big", "unavailable", "failed").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_nodes_or_room_falls_back() {
    // Big: one slot of 300 ms, a router limit of a couple of calls.
    let slow = NodeSimConfig {
        service_time: "const:300ms".parse().unwrap(),
        slots: 1,
        ..Default::default()
    };
    let s = start(slow, 1, &[falls_back("big"), falls_back("ghost")]).await;
    let c = oip(s.router.addr).await;

    // No node declares ghost: its calls go to small rather than NOT_FOUND.
    let req = echo_request("ghost", &[3.0]);
    let resp = c.clone().model_infer(req.clone()).await.unwrap();
    assert_eq!(served_by(resp.metadata()).0, "a-2");
    assert_eq!(
        header(resp.metadata(), "x-fulcrum-fallback-reason").as_deref(),
        Some("unavailable")
    );
    assert_echoed(&req, resp.get_ref());
    // A model with no policy still is unknown.
    let err = c
        .clone()
        .model_infer(echo_request("nobody", &[3.0]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Twelve calls at once for big, which serves about three a second: those it has no room
    // for (shed at once, or after half a second in the queue) go to small.
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { c.model_infer(echo_request("big", &[4.0])).await })
        })
        .collect();
    let mut by_big = 0;
    let mut overloaded = 0;
    for call in calls {
        let resp = call.await.unwrap().expect("every call is answered");
        let md = resp.metadata();
        match served_by(md).0.as_str() {
            "a-1" => {
                by_big += 1;
                assert_eq!(header(md, "x-fulcrum-fallback"), None);
            }
            "a-2" => {
                assert_eq!(
                    header(md, "x-fulcrum-fallback-reason").as_deref(),
                    Some("overloaded")
                );
                overloaded += 1;
            }
            other => panic!("answered by {other:?}"),
        }
    }
    assert!(
        by_big >= 1 && overloaded >= 1,
        "{by_big} by big, {overloaded} fell back"
    );
    assert_eq!(
        fallbacks(s.metrics, "big", "overloaded", "served").await,
        f64::from(overloaded)
    );
    assert_eq!(
        fallbacks(s.metrics, "ghost", "unavailable", "served").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_effects_and_quotas_are_not_dodged() {
    let big = ModelPolicy {
        not_idempotent: true,
        rate_limit_rps: 1.0,
        rate_limit_burst: 2,
        ..falls_back("big")
    };
    let s = start(NodeSimConfig::default(), 4, &[big]).await;
    let mut c = oip(s.router.addr).await;
    let req = || echo_request("big", &[5.0]);

    // Big's node takes the call and fails it: it may have run, so it does not run again on
    // small.
    s.big.controls().set_error_ratio(1.0).await.unwrap();
    let err = c.model_infer(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(header(err.metadata(), "x-fulcrum-fallback"), None);
    assert_eq!(s.small.controls().calls(), 0);

    // Once the control plane takes the node out, no node gets big's calls: they fall back.
    s.big.controls().set_healthy(false).await;
    stack::wait_applied(&s.admin, "a-1", |n| {
        n.endpoint
            .as_ref()
            .is_some_and(|e| e.health() == HealthState::Unhealthy)
    })
    .await;
    let resp = c.model_infer(req()).await.unwrap();
    assert_eq!(served_by(resp.metadata()).0, "a-2");
    assert_eq!(s.small.controls().calls(), 1);

    // Over big's rate limit (a burst of two, both spent): refused, not sent to small.
    let err = c.model_infer(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("rate limit"), "{}", err.message());
    assert_eq!(s.small.controls().calls(), 1);
}

/// The first answer of a stream carrying `requests`.
async fn first_answer(
    c: &mut fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        Channel,
    >,
    requests: Vec<ModelInferRequest>,
) -> fulcrum_proto::inference::ModelStreamInferResponse {
    let mut answers = c
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_requests_fall_back_too() {
    let s = start(NodeSimConfig::default(), 4, &[falls_back("ghost")]).await;
    let mut c = oip(s.router.addr).await;
    let req = echo_request("ghost", &[6.0]);
    let answer = first_answer(&mut c, vec![req.clone()]).await;
    assert_eq!(answer.error_message, "");
    let resp = answer.infer_response.unwrap();
    assert_eq!(resp.model_name, "small");
    assert_echoed(&req, &resp);
    assert_eq!(s.small.controls().served("small"), 1);
    assert_eq!(
        fallbacks(s.metrics, "ghost", "unavailable", "served").await,
        1.0
    );

    // Small out too: the request's in-band error names both models.
    s.small.controls().set_healthy(false).await;
    stack::wait_applied(&s.admin, "a-2", |n| {
        n.endpoint
            .as_ref()
            .is_some_and(|e| e.health() == HealthState::Unhealthy)
    })
    .await;
    let answer = first_answer(&mut c, vec![req.clone()]).await;
    assert!(
        answer.error_message.contains("\"ghost\"")
            && answer.error_message.contains("fallback, model \"small\""),
        "{}",
        answer.error_message
    );
    assert_eq!(answer.infer_response.unwrap().model_name, "ghost");
    assert_eq!(
        fallbacks(s.metrics, "ghost", "unavailable", "failed").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fallback_policies_are_refused_and_change_nothing() {
    let s = start(NodeSimConfig::default(), 4, &[falls_back("big")]).await;
    let mut admin = s.admin.clone();
    for (fallback, says) in [("big", "names the model itself"), ("a/b", "fallback_model")] {
        let err = admin
            .set_model_policy(ModelPolicy {
                fallback_model: fallback.into(),
                ..falls_back("big")
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
    }
    let kept = admin
        .get_model_policy(GetModelPolicyRequest {
            model: "big".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.fallback_model, "small");
}
