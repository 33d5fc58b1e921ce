//! Per-model rate limits end to end (real etcd, real gRPC, a node-sim): a caller over its
//! bucket is refused RESOURCE_EXHAUSTED saying when to retry, and never reaches a node; other
//! callers keep their own buckets; stream requests count too; a bad limit is refused by the
//! control plane and changes nothing.

use fulcrum_proto::fulcrum::v1::{GetModelPolicyRequest, ModelPolicy};
use fulcrum_sim::node::NodeSimConfig;
use fulcrum_tests::infer::echo_request;
use fulcrum_tests::scrape::metric;
use fulcrum_tests::stack::{self, oip, wait_ready};
use tonic::Code;

fn request(key: &str) -> tonic::Request<fulcrum_proto::inference::ModelInferRequest> {
    let mut r = tonic::Request::new(echo_request("echo", &[1.0]));
    r.metadata_mut().insert("x-api-key", key.parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_over_their_bucket_are_refused_and_others_are_not() {
    let stack::OneNode {
        node,
        mut admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(NodeSimConfig::default(), 8).await;
    // One call a second per API key, bursts of three.
    let limit = ModelPolicy {
        model: "echo".into(),
        rate_limit_rps: 1.0,
        rate_limit_burst: 3,
        rate_limit_key_header: "x-api-key".into(),
        ..Default::default()
    };
    admin.set_model_policy(limit.clone()).await.unwrap();
    let (router, metrics) = stack::router_with_metrics("a", cp.addr).await;
    wait_ready(router.addr).await;
    stack::wait_policies_applied(&admin, std::slice::from_ref(&limit)).await;
    let mut c = oip(router.addr).await;
    let calls_before = node.controls().calls();

    // Caller a: its burst of three, then refusals (a token comes back only after a second;
    // should this machine be slow enough for one to come back meanwhile, a fourth passes).
    let mut ok = 0;
    let mut refused = 0;
    for _ in 0..8 {
        match c.model_infer(request("a")).await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                let m = e.message();
                assert!(m.contains("x-api-key \"a\""), "{m}");
                assert!(m.contains("rate limit of 1 calls/s"), "{m}");
                assert!(m.contains("retry in"), "{m}");
                refused += 1;
            }
        }
    }
    assert!((3..=4).contains(&ok), "caller a got {ok} calls through");
    // Caller b has a bucket of its own.
    for _ in 0..3 {
        c.model_infer(request("b"))
            .await
            .expect("caller b within its burst");
    }
    // A stream's requests count: caller a's is refused in-band, the stream stays usable.
    let mut stream = tonic::Request::new(tokio_stream::iter(vec![echo_request("echo", &[1.0])]));
    stream
        .metadata_mut()
        .insert("x-api-key", "a".parse().unwrap());
    let mut answers = c.model_stream_infer(stream).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    assert!(
        answer.error_message.contains("rate limit"),
        "{:?}",
        answer.error_message
    );
    refused += 1;
    // Refused calls never reached the node.
    assert_eq!(node.controls().calls(), calls_before + ok + 3);
    assert_eq!(
        metric(metrics, "fulcrum_router_rate_limited_total{model=\"echo\"}").await,
        Some(refused as f64)
    );

    // A bad limit is refused, and the stored one stays.
    let err = admin
        .set_model_policy(ModelPolicy {
            rate_limit_rps: 0.0,
            ..limit.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("need rate_limit_rps"),
        "{}",
        err.message()
    );
    let stored = admin
        .get_model_policy(GetModelPolicyRequest {
            model: "echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored, limit);
}
