//! Canary releases end to end (real etcd, real gRPC, node-sims): a model's canary takes its
//! share of the calls, the same callers every time when a header decides, more of them (and
//! none back) when the share grows, whole sequences, nothing while it has no routable node;
//! the answers name it; bad canary policies are refused and change nothing.

use std::collections::HashSet;
use std::net::SocketAddr;

use fulcrum_proto::fulcrum::v1::admin_client::AdminClient;
use fulcrum_proto::fulcrum::v1::{HealthState, ModelPolicy};
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_proto::inference::infer_parameter::ParameterChoice;
use fulcrum_proto::inference::{InferParameter, ModelInferRequest};
use fulcrum_sim::node::{NodeSimConfig, RunningNodeSim, spawn};
use fulcrum_tests::etcd::Etcd;
use fulcrum_tests::infer::{assert_echoed, echo_request};
use fulcrum_tests::scrape::metric;
use fulcrum_tests::stack::{self, Running, admin, oip, register, spec, wait_ready};
use tonic::transport::Channel;

/// Model `llm` on node `a-1`, its next version `llm-next` on `a-2`, and a router.
struct Stack {
    next: RunningNodeSim,
    router: Running,
    metrics: SocketAddr,
    admin: AdminClient<Channel>,
    _stable: RunningNodeSim,
    _cp: Running,
    _etcd: Etcd,
}

async fn node(name: &str, model: &str) -> RunningNodeSim {
    let config = NodeSimConfig {
        name: name.into(),
        models: vec![model.into()],
        ..Default::default()
    };
    spawn(config, "127.0.0.1:0".parse().unwrap()).await.unwrap()
}

async fn start() -> Stack {
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut admin = admin(cp.addr).await;
    let stable = node("a-1", "llm").await;
    let next = node("a-2", "llm-next").await;
    register(&mut admin, spec("a-1", stable.addr, "a", &["llm"], 8)).await;
    register(&mut admin, spec("a-2", next.addr, "a", &["llm-next"], 8)).await;
    let (router, metrics) = stack::router_with_metrics("a", cp.addr).await;
    wait_ready(router.addr).await;
    for (id, model) in [("a-1", "llm"), ("a-2", "llm-next")] {
        stack::wait_serving(&admin, id, model).await;
    }
    Stack {
        next,
        router,
        metrics,
        admin,
        _stable: stable,
        _cp: cp,
        _etcd: etcd,
    }
}

fn canary(percent: f64, key_header: &str) -> ModelPolicy {
    ModelPolicy {
        model: "llm".into(),
        canary_model: "llm-next".into(),
        canary_percent: percent,
        canary_key_header: key_header.into(),
        ..Default::default()
    }
}

async fn set(admin: &mut AdminClient<Channel>, policy: ModelPolicy) {
    admin.set_model_policy(policy.clone()).await.unwrap();
    stack::wait_policies_applied(admin, &[policy]).await;
}

/// Calls `llm` as `user` (or as nobody) with `req`; returns the model that answered, checking
/// that the answer names it the same way in the body and the headers.
async fn call(
    c: &mut GrpcInferenceServiceClient<Channel>,
    user: Option<&str>,
    req: ModelInferRequest,
) -> String {
    let mut r = tonic::Request::new(req.clone());
    if let Some(u) = user {
        r.metadata_mut().insert("x-user", u.parse().unwrap());
    }
    let resp = c.model_infer(r).await.unwrap();
    let header = resp
        .metadata()
        .get("x-fulcrum-canary")
        .map(|v| v.to_str().unwrap().to_owned());
    let answer = resp.into_inner();
    assert_echoed(&req, &answer);
    match answer.model_name.as_str() {
        "llm" => assert_eq!(header, None),
        "llm-next" => assert_eq!(header.as_deref(), Some("llm-next")),
        other => panic!("answered by {other:?}"),
    }
    answer.model_name
}

/// The users among `users` whose calls the canary takes.
async fn on_canary(
    c: &mut GrpcInferenceServiceClient<Channel>,
    users: &[String],
) -> HashSet<String> {
    let mut on = HashSet::new();
    for u in users {
        if call(c, Some(u), echo_request("llm", &[1.0])).await == "llm-next" {
            on.insert(u.clone());
        }
    }
    on
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_takes_its_share_of_callers_and_keeps_them() {
    let mut s = start().await;
    let mut c = oip(s.router.addr).await;
    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();

    set(&mut s.admin, canary(20.0, "x-user")).await;
    let at_20 = on_canary(&mut c, &users).await;
    // Which users is decided by a hash of their id: a fixed set, about a fifth of them.
    assert!((20..=60).contains(&at_20.len()), "{} of 200", at_20.len());
    // The same users, every time.
    assert_eq!(on_canary(&mut c, &users).await, at_20);
    assert_eq!(
        metric(
            s.metrics,
            "fulcrum_router_canary_total{model=\"llm\",canary=\"llm-next\"}"
        )
        .await,
        Some(2.0 * at_20.len() as f64)
    );

    // Half: more users, and every one that was on the canary still is.
    set(&mut s.admin, canary(50.0, "x-user")).await;
    let at_50 = on_canary(&mut c, &users).await;
    assert!(
        at_50.len() > at_20.len() && at_50.len() <= 140,
        "{}",
        at_50.len()
    );
    assert!(at_20.is_subset(&at_50));

    // Staged at 0 %: nobody.
    set(&mut s.admin, canary(0.0, "x-user")).await;
    assert!(on_canary(&mut c, &users).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_calls_are_drawn_and_sequences_stay_whole() {
    let mut s = start().await;
    let mut c = oip(s.router.addr).await;
    set(&mut s.admin, canary(50.0, "")).await;

    let mut to_next = 0;
    for _ in 0..200 {
        if call(&mut c, None, echo_request("llm", &[2.0])).await == "llm-next" {
            to_next += 1;
        }
    }
    // A fair coin over 200 calls: 50 to 150 is more than seven standard deviations.
    assert!((50..=150).contains(&to_next), "{to_next} of 200");

    // Each sequence's steps all go to one model (the node-sims refuse a step of a sequence
    // they did not see start).
    let mut models = HashSet::new();
    for id in 1..=16 {
        let mut seen = HashSet::new();
        for step in 0..3 {
            let mut req = echo_request("llm", &[3.0]);
            let p = |v| InferParameter {
                parameter_choice: Some(v),
            };
            req.parameters
                .insert("sequence_id".into(), p(ParameterChoice::Int64Param(id)));
            req.parameters.insert(
                "sequence_start".into(),
                p(ParameterChoice::BoolParam(step == 0)),
            );
            req.parameters.insert(
                "sequence_end".into(),
                p(ParameterChoice::BoolParam(step == 2)),
            );
            seen.insert(call(&mut c, None, req).await);
        }
        assert_eq!(seen.len(), 1, "sequence {id} split over {seen:?}");
        models.extend(seen);
    }
    assert_eq!(models.len(), 2, "16 sequences all on {models:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_without_a_routable_node_takes_nothing() {
    let mut s = start().await;
    let mut c = oip(s.router.addr).await;
    set(&mut s.admin, canary(100.0, "")).await;
    assert_eq!(
        call(&mut c, None, echo_request("llm", &[4.0])).await,
        "llm-next"
    );

    s.next.controls().set_healthy(false).await;
    stack::wait_applied(&s.admin, "a-2", |n| {
        n.endpoint
            .as_ref()
            .is_some_and(|e| e.health() == HealthState::Unhealthy)
    })
    .await;
    for _ in 0..10 {
        assert_eq!(call(&mut c, None, echo_request("llm", &[4.0])).await, "llm");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_canary_policies_are_refused_and_change_nothing() {
    let mut s = start().await;
    let good = canary(10.0, "x-user");
    set(&mut s.admin, good.clone()).await;
    stack::assert_policies_refused(
        &s.admin,
        &good,
        vec![
            (
                ModelPolicy {
                    canary_model: "llm".into(),
                    ..good.clone()
                },
                "names the model itself",
            ),
            (
                ModelPolicy {
                    canary_percent: 101.0,
                    ..good.clone()
                },
                "canary_percent 101",
            ),
            (
                ModelPolicy {
                    canary_model: String::new(),
                    ..good.clone()
                },
                "need canary_model",
            ),
            (
                ModelPolicy {
                    canary_key_header: "x user".into(),
                    ..good.clone()
                },
                "canary_key_header",
            ),
        ],
    )
    .await;
}
