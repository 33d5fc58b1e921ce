//! Every bad input gets a precise status and changes nothing (real etcd, real gRPC).

use std::time::Duration;

use fulcrum_control_plane::keys;
use fulcrum_proto::fulcrum::v1::{
    DeregisterNodeRequest, DrainNodeRequest, GetNodeRequest, RegisterNodeRequest,
};
use fulcrum_proto::inference::{ModelConfigRequest, ModelMetadataRequest};
use fulcrum_sim::node::NodeSimConfig;
use fulcrum_tests::etcd::Etcd;
use fulcrum_tests::eventually;
use fulcrum_tests::infer::echo_request;
use fulcrum_tests::stack::{self, admin, oip, register, spec, wait_ready};
use tonic::Code;
use tonic::codec::CompressionEncoding;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_refuses_bad_calls_precisely() {
    let stack::OneNode {
        node,
        cp,
        etcd: _etcd,
        ..
    } = stack::one_node(NodeSimConfig::default(), 4).await;
    // A 1 MiB message limit, so the oversized case is cheap.
    let router = stack::router("a", cp.addr, Some(1 << 20)).await;
    wait_ready(router.addr).await;
    let mut c = oip(router.addr).await;
    let calls_before = node.controls().calls();

    // Unknown model.
    let err = c
        .model_infer(echo_request("no-such-model", &[1.0]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("no-such-model"), "{}", err.message());

    // Contents that do not match shape and datatype: refused at the router, never forwarded.
    let mut bad = echo_request("echo", &[1.0, 2.0]);
    bad.inputs[0].shape = vec![1, 3];
    let err = c.model_infer(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("needs 12 bytes"),
        "{}",
        err.message()
    );
    let mut bad = echo_request("echo", &[1.0]);
    bad.inputs[0].datatype = "FLOAT32".into();
    let err = c.model_infer(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("unknown datatype"),
        "{}",
        err.message()
    );
    assert_eq!(
        node.controls().calls(),
        calls_before,
        "a bad request reached the node"
    );

    // ModelMetadata and Triton's ModelConfig: a model name is required, and must be one the
    // router routes.
    let err = c
        .model_metadata(ModelMetadataRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("model name"), "{}", err.message());
    let err = c
        .model_config(ModelConfigRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("model name"), "{}", err.message());
    let err = c
        .model_config(ModelConfigRequest {
            name: "no-such-model".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("no-such-model"), "{}", err.message());

    // Over the size limit.
    let big = echo_request("echo", &vec![0.5; (2 << 20) / 4]);
    let err = c.model_infer(big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limit"), "{}", err.message());
    assert_eq!(
        node.controls().calls(),
        calls_before,
        "an oversized request reached the node"
    );
    // Compressed, the same message is small on the wire; it is still refused once it
    // decompresses past the limit (no decompression bomb gets through), and never forwarded.
    let err = c
        .clone()
        .send_compressed(CompressionEncoding::Gzip)
        .model_infer(echo_request("echo", &vec![0.5; (2 << 20) / 4]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limit"), "{}", err.message());
    assert_eq!(
        node.controls().calls(),
        calls_before,
        "an oversized compressed request reached the node"
    );

    // The router still serves after all that.
    c.model_infer(echo_request("echo", &[1.0]))
        .await
        .expect("good call");

    // No healthy node for the model.
    node.controls().set_healthy(false).await;
    let err = eventually(
        "the router sees no healthy node",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move {
                let err = c.model_infer(echo_request("echo", &[1.0])).await.err()?;
                err.message().contains("no healthy node").then_some(err)
            }
        },
    )
    .await;
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("\"echo\""), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_registrations_are_refused_and_store_nothing() {
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut admin = admin(cp.addr).await;
    let store = fulcrum_control_plane::store::open(&etcd.url())
        .await
        .unwrap();
    let addr = "127.0.0.1:9".parse().unwrap();
    register(&mut admin, spec("n-1", addr, "a", &["echo"], 4)).await;
    let (before, _) = store.list(keys::NODES).await.unwrap();

    let mut bad_address = spec("n-2", addr, "a", &["echo"], 4);
    bad_address.address = "not an address".into();
    let mut no_port = spec("n-2", addr, "a", &["echo"], 4);
    no_port.address = "127.0.0.1".into();
    let mut no_region = spec("n-2", addr, "", &["echo"], 4);
    no_region.region.clear();
    let cases = [
        (bad_address, Code::InvalidArgument, "address"),
        (no_port, Code::InvalidArgument, "address"),
        (
            spec("n-2", addr, "a", &["echo"], 0),
            Code::InvalidArgument,
            "capacity",
        ),
        (
            spec("n-2", addr, "a", &["echo"], -5),
            Code::InvalidArgument,
            "capacity",
        ),
        // No models is valid (the server lists them); a malformed one is not.
        (
            spec("n-2", addr, "a", &["bad model"], 4),
            Code::InvalidArgument,
            "model name",
        ),
        (
            spec("n-2", addr, "a", &["echo", "echo"], 4),
            Code::InvalidArgument,
            "listed twice",
        ),
        (no_region, Code::InvalidArgument, "region"),
        (
            spec("bad/id", addr, "a", &["echo"], 4),
            Code::InvalidArgument,
            "id",
        ),
        (
            spec("n-1", "127.0.0.1:10".parse().unwrap(), "a", &["echo"], 4),
            Code::AlreadyExists,
            "already registered",
        ),
    ];
    for (s, code, needle) in cases {
        let err = admin
            .register_node(RegisterNodeRequest {
                spec: Some(s.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{s:?}: {err:?}");
        assert!(err.message().contains(needle), "{s:?}: {}", err.message());
    }
    let err = admin
        .register_node(RegisterNodeRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let (after, _) = store.list(keys::NODES).await.unwrap();
    assert_eq!(before, after, "a refused registration changed the store");

    // Unknown nodes.
    for err in [
        admin
            .deregister_node(DeregisterNodeRequest { id: "ghost".into() })
            .await
            .unwrap_err(),
        admin
            .drain_node(DrainNodeRequest {
                id: "ghost".into(),
                drain: true,
            })
            .await
            .unwrap_err(),
        admin
            .get_node(GetNodeRequest { id: "ghost".into() })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(err.message().contains("ghost"));
    }
    let (after, _) = store.list(keys::ROOT).await.unwrap();
    assert!(
        after.iter().all(|kv| !kv.key.contains("ghost")),
        "an unknown node left a trace"
    );
}
