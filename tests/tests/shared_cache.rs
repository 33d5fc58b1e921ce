//! The response cache's shared level end to end (real etcd, real Redis, real gRPC, a
//! node-sim): what one router's node answered, another router sharing the Redis and the secret
//! answers from it; a flush reaches it; a Redis that is down or comes back never fails a call.

use std::time::Duration;

use fulcrum_data_plane::shared_cache::SharedCacheSetup;
use fulcrum_proto::fulcrum::v1::{GetModelPolicyRequest, ModelPolicy};
use fulcrum_proto::inference::ModelInferRequest;
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_sim::node::NodeSimConfig;
use fulcrum_tests::eventually;
use fulcrum_tests::infer::{assert_echoed, echo_request};
use fulcrum_tests::redis::Redis;
use fulcrum_tests::stack::{self, oip, wait_ready};
use tonic::transport::Channel;

const SECRET: &[u8] = b"the shared cache secret of these tests\n";

/// Calls `model` through `c` with `values`; the answer's `x-fulcrum-cache` ("" when absent).
async fn call(c: &GrpcInferenceServiceClient<Channel>, values: &[f32]) -> String {
    let req: ModelInferRequest = echo_request("echo", values);
    let resp = c.clone().model_infer(req.clone()).await.unwrap();
    assert_echoed(&req, resp.get_ref());
    resp.metadata()
        .get("x-fulcrum-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// One node, a control plane with model `echo` caching answers for a minute, and two routers
/// with a shared level at `redis`: router a with [`SECRET`], router b with `b_secret`.
struct Fleet {
    stack: stack::OneNode,
    _routers: [stack::Running; 2],
    ca: GrpcInferenceServiceClient<Channel>,
    cb: GrpcInferenceServiceClient<Channel>,
}

async fn fleet(redis: &Redis, b_secret: &[u8]) -> Fleet {
    let mut stack = stack::one_node(NodeSimConfig::default(), 4).await;
    let policy = stack
        .admin
        .set_model_policy(ModelPolicy {
            model: "echo".into(),
            cache_ttl_ms: 60_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let sa = SharedCacheSetup::new(&redis.url(), SECRET).unwrap();
    let sb = SharedCacheSetup::new(&redis.url(), b_secret).unwrap();
    let control = [stack.cp.addr];
    let a = stack::router_configured("a", &control, move |c| c.shared_cache = Some(sa)).await;
    let b = stack::router_configured("a", &control, move |c| c.shared_cache = Some(sb)).await;
    wait_ready(a.addr).await;
    wait_ready(b.addr).await;
    stack::wait_policies_applied(&stack.admin, std::slice::from_ref(&policy)).await;
    let (ca, cb) = (oip(a.addr).await, oip(b.addr).await);
    Fleet {
        stack,
        _routers: [a, b],
        ca,
        cb,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_sharing_a_redis_answer_from_it() {
    let mut redis = Redis::start().await;
    let Fleet {
        stack:
            stack::OneNode {
                node,
                mut admin,
                etcd: _etcd,
                cp: _cp,
            },
        _routers,
        ca,
        cb,
    } = fleet(&redis, SECRET).await;
    let calls = || node.controls().calls();

    // Router a's node answer is kept in Redis too (written in the background)...
    assert_eq!(call(&ca, &[1.0]).await, "miss");
    eventually("the answer reaches redis", Duration::from_secs(10), || {
        let keys = redis.keys();
        async move { (keys == Some(1)).then_some(()) }
    })
    .await;
    // ... so router b, which never saw the request, answers it from there, then from its own
    // memory.
    assert_eq!(call(&cb, &[1.0]).await, "hit-shared");
    assert_eq!(call(&cb, &[1.0]).await, "hit");
    assert_eq!(calls(), 1);

    // A flush reaches the shared level: the old answer is no one's any more.
    let flushed = admin
        .flush_model_cache(GetModelPolicyRequest {
            model: "echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    stack::wait_policies_applied(&admin, std::slice::from_ref(&flushed)).await;
    assert_eq!(call(&cb, &[1.0]).await, "miss");
    assert_eq!(calls(), 2);
    eventually(
        "the new answer reaches redis",
        Duration::from_secs(10),
        || {
            let keys = redis.keys();
            async move { (keys == Some(2)).then_some(()) }
        },
    )
    .await;
    assert_eq!(call(&ca, &[1.0]).await, "hit-shared");

    // Redis down: calls go to the node, none fails.
    redis.stop();
    for v in 10..20 {
        assert_eq!(call(&ca, &[v as f32]).await, "miss");
    }
    assert_eq!(calls(), 12);
    // Redis back (empty): within a pause, writes land again.
    redis.resume().await;
    let mut v = 100.0;
    eventually("writes reach redis again", Duration::from_secs(20), || {
        v += 1.0;
        let (ca, redis) = (&ca, &redis);
        async move {
            call(ca, &[v]).await;
            redis.keys().filter(|&k| k > 0)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_with_other_secrets_share_nothing() {
    let redis = Redis::start().await;
    let Fleet {
        stack,
        _routers,
        ca,
        cb,
    } = fleet(&redis, b"another secret, another fleet").await;
    let node = &stack.node;
    assert_eq!(call(&ca, &[1.0]).await, "miss");
    eventually("the answer reaches redis", Duration::from_secs(10), || {
        let keys = redis.keys();
        async move { (keys == Some(1)).then_some(()) }
    })
    .await;
    assert_eq!(call(&cb, &[1.0]).await, "miss");
    assert_eq!(node.controls().calls(), 2);
}

#[tokio::test]
async fn a_short_secret_or_a_bad_url_is_refused() {
    let short = SharedCacheSetup::new("redis://127.0.0.1:6379", b"  too short \n").unwrap_err();
    assert!(short.to_string().contains("9 bytes"), "{short}");
    let url = SharedCacheSetup::new("redis://:hunter2@[::1", SECRET).unwrap_err();
    let msg = url.to_string();
    assert!(msg.contains("cannot use Redis URL"), "{msg}");
    assert!(!msg.contains("hunter2"), "the password leaked: {msg}");
}
