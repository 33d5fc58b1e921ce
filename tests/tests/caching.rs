//! Response caching end to end (real etcd, real gRPC, a node-sim): a model whose policy caches
//! answers is answered from the router's memory for a request it has answered before, whatever
//! the request's id; identical calls in flight reach the node once; a key header keeps callers
//! apart; sequences, errors and fallback answers are never kept; entries expire; bad caching
//! policies are refused and change nothing.

use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{GetModelPolicyRequest, ModelPolicy};
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_proto::inference::infer_parameter::ParameterChoice;
use fulcrum_proto::inference::{InferParameter, ModelInferRequest, ModelInferResponse};
use fulcrum_sim::node::{NodeSimConfig, ServiceTime};
use fulcrum_tests::eventually;
use fulcrum_tests::infer::{assert_echoed, echo_request, served_by};
use fulcrum_tests::scrape::metric;
use fulcrum_tests::stack::{self, oip, wait_ready};
use tonic::Code;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

fn cache_header(md: &MetadataMap) -> Option<String> {
    md.get("x-fulcrum-cache")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn with_id(id: &str, values: &[f32]) -> ModelInferRequest {
    ModelInferRequest {
        id: id.into(),
        ..echo_request("echo", values)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_requests_are_answered_from_the_cache() {
    let stack::OneNode {
        node,
        mut admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(NodeSimConfig::default(), 4).await;
    let policies = [
        ModelPolicy {
            model: "echo".into(),
            cache_ttl_ms: 60_000,
            ..Default::default()
        },
        // No node serves ghost: its calls go to echo, and those answers are not ghost's.
        ModelPolicy {
            model: "ghost".into(),
            fallback_model: "echo".into(),
            cache_ttl_ms: 60_000,
            ..Default::default()
        },
    ];
    for p in &policies {
        admin.set_model_policy(p.clone()).await.unwrap();
    }
    let (router, metrics) = stack::router_with_metrics("a", cp.addr).await;
    wait_ready(router.addr).await;
    stack::wait_policies_applied(&admin, &policies).await;
    let mut c = oip(router.addr).await;
    let calls = || node.controls().calls();

    // First call: to the node, and kept.
    let first = c.model_infer(with_id("call-1", &[1.0, 2.0])).await.unwrap();
    assert_eq!(cache_header(first.metadata()).as_deref(), Some("miss"));
    assert_eq!(served_by(first.metadata()).0, "a-1");
    assert_eq!(calls(), 1);
    // The same tensors under another id: from the cache, carrying the new id.
    let req = with_id("call-2", &[1.0, 2.0]);
    let hit = c.model_infer(req.clone()).await.unwrap();
    assert_eq!(cache_header(hit.metadata()).as_deref(), Some("hit"));
    assert_eq!(served_by(hit.metadata()).0, "", "no node served a hit");
    assert_eq!(hit.get_ref().id, "call-2");
    assert_echoed(&req, hit.get_ref());
    assert_eq!(calls(), 1);
    // Other tensors, or other parameters: another request.
    let other = c.model_infer(with_id("call-3", &[1.0, 3.0])).await.unwrap();
    assert_eq!(cache_header(other.metadata()).as_deref(), Some("miss"));
    let mut with_param = with_id("call-4", &[1.0, 2.0]);
    with_param.parameters.insert(
        "temperature".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::DoubleParam(0.5)),
        },
    );
    let r = c.model_infer(with_param).await.unwrap();
    assert_eq!(cache_header(r.metadata()).as_deref(), Some("miss"));
    assert_eq!(calls(), 3);

    // A hit is still a call: a priority that is not one is refused.
    let mut bad = tonic::Request::new(with_id("call-5", &[1.0, 2.0]));
    bad.metadata_mut()
        .insert("fulcrum-priority", "urgent".parse().unwrap());
    let err = c.model_infer(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Requests of a sequence are never kept: each reaches the node.
    for _ in 0..2 {
        let mut step = with_id("seq", &[9.0]);
        step.parameters.insert(
            "sequence_id".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(77)),
            },
        );
        step.parameters.insert(
            "sequence_start".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::BoolParam(true)),
            },
        );
        let r = c.model_infer(step).await.unwrap();
        assert_eq!(cache_header(r.metadata()), None);
    }
    assert_eq!(calls(), 5);

    // Errors are not kept: once the node answers again, the call reaches it.
    node.controls().set_error_ratio(1.0).await.unwrap();
    let err = c.model_infer(with_id("e", &[5.0])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    node.controls().set_error_ratio(0.0).await.unwrap();
    let r = c.model_infer(with_id("e", &[5.0])).await.unwrap();
    assert_eq!(cache_header(r.metadata()).as_deref(), Some("miss"));

    // Ghost's answers come from its fallback: never kept as ghost's.
    for _ in 0..2 {
        let r = c.model_infer(echo_request("ghost", &[4.0])).await.unwrap();
        assert_eq!(
            r.metadata().get("x-fulcrum-fallback").unwrap(),
            "echo",
            "{:?}",
            r.metadata()
        );
        assert_eq!(cache_header(r.metadata()), None);
    }

    let sample = |name: &'static str| metric(metrics, name);
    assert_eq!(
        sample("fulcrum_router_cache_hits_total{model=\"echo\"}").await,
        Some(1.0)
    );
    // Misses: call-1, call-3, call-4, the error, its retry; and ghost's two.
    assert_eq!(
        sample("fulcrum_router_cache_misses_total{model=\"echo\"}").await,
        Some(5.0)
    );
    assert_eq!(
        sample("fulcrum_router_cache_misses_total{model=\"ghost\"}").await,
        Some(2.0)
    );
    assert_eq!(sample("fulcrum_router_cache_entries ").await, Some(4.0));
}

/// Sends `req` with a `grpc-timeout` header (not tonic's own timer, so the router's answer is
/// what the caller sees) and says how it ended: the cache header, or the error.
async fn call_with_deadline(
    mut c: GrpcInferenceServiceClient<Channel>,
    req: ModelInferRequest,
    timeout: &'static str,
) -> Result<(String, ModelInferRequest, ModelInferResponse), tonic::Status> {
    let mut r = tonic::Request::new(req.clone());
    r.metadata_mut()
        .insert("grpc-timeout", timeout.parse().unwrap());
    let resp = c.model_infer(r).await?;
    let how = cache_header(resp.metadata()).unwrap_or_default();
    Ok((how, req, resp.into_inner()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_calls_in_flight_reach_the_node_once() {
    // Every call takes 2 s at the node: identical calls sent meanwhile find the first in flight.
    let stack::OneNode {
        node,
        mut admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(
        NodeSimConfig {
            service_time: ServiceTime::Constant(Duration::from_secs(2)),
            slots: 16,
            ..Default::default()
        },
        16,
    )
    .await;
    let policy = ModelPolicy {
        model: "echo".into(),
        cache_ttl_ms: 60_000,
        ..Default::default()
    };
    admin.set_model_policy(policy.clone()).await.unwrap();
    let (router, metrics) = stack::router_with_metrics("a", cp.addr).await;
    wait_ready(router.addr).await;
    stack::wait_policies_applied(&admin, &[policy]).await;
    let c = oip(router.addr).await;
    let controls = node.controls();
    let node_has = |n: u64| {
        let controls = controls.clone();
        async move { (controls.in_flight() == n).then_some(()) }
    };
    let before = controls.calls();

    // The first call goes to the node; seven identical ones (other ids) sent while it is there
    // wait for its answer and get it with their own ids; one whose deadline is shorter than
    // the wait is told so.
    let first = tokio::spawn(call_with_deadline(
        c.clone(),
        with_id("first", &[1.0, 2.0]),
        "10S",
    ));
    eventually(
        "the first call reaches the node",
        Duration::from_secs(10),
        || node_has(1),
    )
    .await;
    let others: Vec<_> = (0..7)
        .map(|i| {
            let req = with_id(&format!("other-{i}"), &[1.0, 2.0]);
            tokio::spawn(call_with_deadline(c.clone(), req, "10S"))
        })
        .collect();
    let short = call_with_deadline(c.clone(), with_id("short", &[1.0, 2.0]), "300m")
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::DeadlineExceeded, "{short:?}");
    assert!(
        short.message().contains("identical call"),
        "{}",
        short.message()
    );
    let (how, req, resp) = first.await.unwrap().unwrap();
    assert_eq!(how, "miss");
    assert_echoed(&req, &resp);
    for o in others {
        let (how, req, resp) = o.await.unwrap().unwrap();
        assert_eq!(how, "coalesced");
        assert_eq!(resp.id, req.id);
        assert_echoed(&req, &resp);
    }
    assert_eq!(
        controls.calls() - before,
        1,
        "identical calls reached the node"
    );

    // A first call that gives up (its own deadline, shorter than the node's 2 s) hands over:
    // one of the calls waiting goes to the node for the others.
    let quitter = tokio::spawn(call_with_deadline(
        c.clone(),
        with_id("quitter", &[3.0]),
        "1S",
    ));
    eventually(
        "the quitter reaches the node",
        Duration::from_secs(10),
        || node_has(1),
    )
    .await;
    let waiting: Vec<_> = (0..4)
        .map(|i| {
            let req = with_id(&format!("waiting-{i}"), &[3.0]);
            tokio::spawn(call_with_deadline(c.clone(), req, "20S"))
        })
        .collect();
    let err = quitter.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let mut hows = Vec::new();
    for w in waiting {
        let (how, req, resp) = w.await.unwrap().unwrap();
        assert_echoed(&req, &resp);
        hows.push(how);
    }
    hows.sort();
    assert_eq!(hows, ["coalesced", "coalesced", "coalesced", "miss"]);
    assert_eq!(controls.calls() - before, 3);

    let sample = |name: &'static str| metric(metrics, name);
    assert_eq!(
        sample("fulcrum_router_cache_coalesced_total{model=\"echo\"}").await,
        Some(10.0)
    );
    assert_eq!(sample("fulcrum_router_cache_in_flight ").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_header_keeps_callers_apart_and_entries_expire() {
    let stack::OneNode {
        node,
        mut admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(NodeSimConfig::default(), 4).await;
    let policy = |ttl_ms| ModelPolicy {
        model: "echo".into(),
        cache_ttl_ms: ttl_ms,
        cache_key_header: "x-tenant".into(),
        ..Default::default()
    };
    admin.set_model_policy(policy(60_000)).await.unwrap();
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    stack::wait_policies_applied(&admin, &[policy(60_000)]).await;
    let c = oip(router.addr).await;
    let call = |tenant: &'static str, value: f32| {
        let mut c = c.clone();
        async move {
            let mut r = tonic::Request::new(echo_request("echo", &[value]));
            r.metadata_mut().insert("x-tenant", tenant.parse().unwrap());
            let resp = c.model_infer(r).await.unwrap();
            cache_header(resp.metadata()).unwrap_or_default()
        }
    };
    assert_eq!(call("a", 8.0).await, "miss");
    // Tenant b does not get tenant a's answer, but its own next time.
    assert_eq!(call("b", 8.0).await, "miss");
    assert_eq!(call("a", 8.0).await, "hit");
    assert_eq!(call("b", 8.0).await, "hit");
    assert_eq!(node.controls().calls(), 2);

    // Answers kept for 200 ms: once that has passed, the call reaches the node again.
    admin.set_model_policy(policy(200)).await.unwrap();
    stack::wait_policies_applied(&admin, &[policy(200)]).await;
    assert_eq!(call("a", 9.0).await, "miss");
    eventually(
        "tenant a's answer expires",
        Duration::from_secs(10),
        || async { (call("a", 9.0).await == "miss").then_some(()) },
    )
    .await;
    assert!(node.controls().calls() >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushing_a_models_cache_makes_its_answers_stale() {
    let stack::OneNode {
        node,
        mut admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(NodeSimConfig::default(), 4).await;
    let policy = ModelPolicy {
        model: "echo".into(),
        cache_ttl_ms: 60_000,
        // Not the caller's to set: ignored.
        cache_epoch: 3,
        ..Default::default()
    };
    let stored = admin
        .set_model_policy(policy.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(stored.cache_epoch > 3, "{stored:?}");
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    stack::wait_policies_applied(&admin, std::slice::from_ref(&stored)).await;
    let c = oip(router.addr).await;
    let call = |value: f32| {
        let mut c = c.clone();
        async move {
            let resp = c.model_infer(echo_request("echo", &[value])).await.unwrap();
            cache_header(resp.metadata()).unwrap_or_default()
        }
    };
    assert_eq!(call(1.0).await, "miss");
    assert_eq!(call(1.0).await, "hit");

    // Setting the policy again (another TTL) keeps its epoch, and the answers kept.
    let again = admin
        .set_model_policy(ModelPolicy {
            cache_ttl_ms: 120_000,
            ..policy.clone()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.cache_epoch, stored.cache_epoch);
    stack::wait_policies_applied(&admin, std::slice::from_ref(&again)).await;
    assert_eq!(call(1.0).await, "hit");
    assert_eq!(node.controls().calls(), 1);

    // A flush: a newer epoch, nothing else changed; the next call reaches the node.
    let flushed = admin
        .flush_model_cache(GetModelPolicyRequest {
            model: "echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(flushed.cache_epoch > again.cache_epoch, "{flushed:?}");
    assert_eq!(
        ModelPolicy {
            cache_epoch: again.cache_epoch,
            ..flushed.clone()
        },
        again
    );
    stack::wait_policies_applied(&admin, std::slice::from_ref(&flushed)).await;
    assert_eq!(call(1.0).await, "miss");
    assert_eq!(call(1.0).await, "hit");
    assert_eq!(node.controls().calls(), 2);

    // Deleted and set again: an epoch newer still, never one it had before.
    admin
        .delete_model_policy(GetModelPolicyRequest {
            model: "echo".into(),
        })
        .await
        .unwrap();
    let recreated = admin
        .set_model_policy(policy.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(recreated.cache_epoch > flushed.cache_epoch, "{recreated:?}");
    stack::wait_policies_applied(&admin, std::slice::from_ref(&recreated)).await;
    assert_eq!(call(1.0).await, "miss");

    // Bad flushes are refused, saying why, and change nothing.
    let plain = admin
        .set_model_policy(ModelPolicy {
            model: "plain".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain.cache_epoch, 0);
    for (model, code, says) in [
        ("plain", Code::FailedPrecondition, "caches no answers"),
        (
            "ghost",
            Code::NotFound,
            "no policy is set for model \"ghost\"",
        ),
        ("", Code::InvalidArgument, "name the model"),
    ] {
        let err = admin
            .flush_model_cache(GetModelPolicyRequest {
                model: model.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
    }
    for (model, want) in [("plain", &plain), ("echo", &recreated)] {
        let kept = admin
            .get_model_policy(GetModelPolicyRequest {
                model: model.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&kept, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_caching_policies_are_refused_and_change_nothing() {
    let stack::OneNode {
        mut admin,
        etcd: _etcd,
        cp: _cp,
        ..
    } = stack::one_node(NodeSimConfig::default(), 4).await;
    let good = ModelPolicy {
        model: "echo".into(),
        cache_ttl_ms: 1_000,
        ..Default::default()
    };
    let good = admin.set_model_policy(good).await.unwrap().into_inner();
    stack::assert_policies_refused(
        &admin,
        &good,
        vec![
            (
                ModelPolicy {
                    cache_ttl_ms: 7_200_000,
                    ..good.clone()
                },
                "cache_ttl_ms 7200000",
            ),
            (
                ModelPolicy {
                    not_idempotent: true,
                    ..good.clone()
                },
                "cannot be cached",
            ),
            (
                ModelPolicy {
                    cache_key_header: "no spaces".into(),
                    ..good.clone()
                },
                "cache_key_header",
            ),
        ],
    )
    .await;
}
