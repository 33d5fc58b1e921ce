//! End to end on a real etcd: a control plane, routers for regions `a` and `b`, and node-sims in
//! both; calls go to the local region, fail over to the other when every local node is gone,
//! and come back when the local nodes return.

use std::net::SocketAddr;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{GetNodeRequest, HealthState};
use fulcrum_proto::inference::{
    ModelInferRequest, ModelMetadataRequest, ModelReadyRequest, RepositoryIndexRequest,
    ServerLiveRequest, ServerMetadataRequest, ServerReadyRequest,
};
use fulcrum_sim::node::{NodeSimConfig, RunningNodeSim, spawn};
use fulcrum_tests::etcd::Etcd;
use fulcrum_tests::eventually;
use fulcrum_tests::infer::{assert_echoed, echo_request, served_by};
use fulcrum_tests::stack::{self, admin, oip, register, spec, wait_ready};
use tokio_stream::StreamExt;

async fn node(name: &str, addr: SocketAddr) -> RunningNodeSim {
    let config = NodeSimConfig {
        name: name.into(),
        ..Default::default()
    };
    spawn(config, addr).await.expect("start node-sim")
}

async fn nodes(region: &str, n: usize) -> Vec<RunningNodeSim> {
    let mut v = Vec::new();
    for i in 1..=n {
        v.push(node(&format!("{region}-{i}"), "127.0.0.1:0".parse().unwrap()).await);
    }
    v
}

/// Sends `req` through `client`; returns the serving region or the status code.
async fn call(
    client: &mut fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<tonic::transport::Channel>,
    req: &ModelInferRequest,
) -> Result<(String, String), tonic::Code> {
    match client.model_infer(req.clone()).await {
        Ok(resp) => {
            assert_echoed(req, resp.get_ref());
            Ok(served_by(resp.metadata()))
        }
        Err(s) => Err(s.code()),
    }
}

/// Waits until 20 calls in a row through `client` all succeed and are served in `region`.
async fn all_served_in(
    client: &fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >,
    req: &ModelInferRequest,
    region: &str,
) {
    let what = format!("every call served in region {region}");
    eventually(&what, Duration::from_secs(20), || {
        let mut c = client.clone();
        let req = req.clone();
        async move {
            for _ in 0..20 {
                if call(&mut c, &req).await.ok()?.1 != region {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_first_failover_to_the_other_region_and_back() {
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut admin = admin(cp.addr).await;
    let a_nodes = nodes("a", 2).await;
    let b_nodes = nodes("b", 2).await;
    let a_addrs: Vec<SocketAddr> = a_nodes.iter().map(|n| n.addr).collect();
    for (i, n) in a_nodes.iter().enumerate() {
        register(
            &mut admin,
            spec(&format!("a-{}", i + 1), n.addr, "a", &["echo"], 4),
        )
        .await;
    }
    for (i, n) in b_nodes.iter().enumerate() {
        register(
            &mut admin,
            spec(&format!("b-{}", i + 1), n.addr, "b", &["echo"], 4),
        )
        .await;
    }
    let router_a = stack::router("a", cp.addr, None).await;
    let router_b = stack::router("b", cp.addr, None).await;
    wait_ready(router_a.addr).await;
    wait_ready(router_b.addr).await;
    let mut via_a = oip(router_a.addr).await;
    let mut via_b = oip(router_b.addr).await;
    let req = echo_request("echo", &[1.0, 2.5, -3.0, 4.25]);

    // Wait until every node is in the table, then every call stays in its own region.
    eventually("both a nodes serve", Duration::from_secs(20), || {
        let mut c = via_a.clone();
        let req = req.clone();
        async move {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..40 {
                seen.insert(call(&mut c, &req).await.ok()?.0);
            }
            (seen.len() == 2).then_some(())
        }
    })
    .await;
    for _ in 0..20 {
        let (node, region) = call(&mut via_a, &req).await.expect("call via a");
        assert_eq!(region, "a", "router a sent a call to {node}");
        let (node, region) = call(&mut via_b, &req).await.expect("call via b");
        assert_eq!(region, "b", "router b sent a call to {node}");
    }

    // Region a dies: router a's calls are served by region b.
    for n in a_nodes {
        n.stop().await;
    }
    eventually("router a fails over to b", Duration::from_secs(20), || {
        let mut c = via_a.clone();
        let req = req.clone();
        async move {
            let r = call(&mut c, &req).await.ok()?;
            (r.1 == "b").then_some(())
        }
    })
    .await;
    // Once the control plane has seen it, no call fails and all are served by b.
    all_served_in(&via_a, &req, "b").await;
    let ready = via_a.server_ready(ServerReadyRequest {}).await.unwrap();
    assert!(
        ready.get_ref().ready,
        "router a is ready while region b serves"
    );

    // Region a comes back on the same addresses: traffic returns to a.
    let mut back = Vec::new();
    for (i, addr) in a_addrs.iter().enumerate() {
        back.push(node(&format!("a-{}", i + 1), *addr).await);
    }
    all_served_in(&via_a, &req, "a").await;
    drop(back);
    drop(b_nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_answers_the_whole_protocol() {
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut admin = admin(cp.addr).await;
    let n = node("a-1", "127.0.0.1:0".parse().unwrap()).await;
    register(&mut admin, spec("a-1", n.addr, "a", &["echo"], 4)).await;
    let router = stack::router("a", cp.addr, None).await;
    let mut c = oip(router.addr).await;
    // Before any node is healthy the router is live but not ready.
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .get_ref()
            .live
    );
    wait_ready(router.addr).await;

    let meta = c.server_metadata(ServerMetadataRequest {}).await.unwrap();
    assert_eq!(meta.get_ref().name, "fulcrum");
    let ready = c
        .model_ready(ModelReadyRequest {
            name: "echo".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(ready.get_ref().ready);
    assert_eq!(
        served_by(ready.metadata()).0,
        "a-1",
        "ModelReady is asked of the node"
    );
    let unknown = c
        .model_ready(ModelReadyRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(!unknown.get_ref().ready);
    let md = c
        .model_metadata(ModelMetadataRequest {
            name: "echo".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(md.get_ref().name, "echo");

    // Triton's bidirectional stream: three requests, three echoed answers, in-band errors for a
    // bad request without ending the stream.
    let good = echo_request("echo", &[7.0, 8.0]);
    let mut bad = echo_request("echo", &[1.0]);
    bad.inputs[0].shape = vec![1, 5];
    let reqs = vec![good.clone(), bad, good.clone()];
    let resp = c
        .model_stream_infer(tokio_stream::iter(reqs))
        .await
        .expect("open stream");
    assert_eq!(served_by(resp.metadata()).0, "a-1");
    let answers: Vec<_> = resp.into_inner().collect().await;
    assert_eq!(answers.len(), 3);
    let mut ok = 0;
    let mut errors = 0;
    for a in answers {
        let a = a.expect("stream item");
        if a.error_message.is_empty() {
            assert_echoed(&good, a.infer_response.as_ref().unwrap());
            ok += 1;
        } else {
            assert!(a.error_message.contains("INPUT0"), "{}", a.error_message);
            errors += 1;
        }
    }
    assert_eq!((ok, errors), (2, 1));
}

/// A node registered without models has them listed by its server (`RepositoryIndex`): the
/// router routes every model the server has, lists them in its own `RepositoryIndex`, and a
/// server that cannot list its models is unhealthy with a reason that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_of_a_node_registered_without_any_are_listed_from_the_server() {
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut admin = admin(cp.addr).await;
    let n = spawn(
        NodeSimConfig {
            name: "a-1".into(),
            models: vec!["echo".into(), "resnet".into()],
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .expect("start node-sim");
    register(&mut admin, spec("a-1", n.addr, "a", &[], 4)).await;
    // The control plane's own address serves gRPC but no inference: it cannot list models.
    register(&mut admin, spec("a-2", cp.addr, "a", &[], 4)).await;
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    let mut c = oip(router.addr).await;
    for model in ["echo", "resnet"] {
        let req = echo_request(model, &[3.0]);
        let resp = c.model_infer(req.clone()).await.expect(model);
        assert_echoed(&req, resp.get_ref());
        assert_eq!(served_by(resp.metadata()).0, "a-1");
    }
    let index = c
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: true,
        })
        .await
        .expect("router's RepositoryIndex")
        .into_inner();
    let listed: Vec<(&str, &str)> = index
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.state.as_str()))
        .collect();
    assert_eq!(listed, [("echo", "READY"), ("resnet", "READY")]);
    let unknown_repo = c
        .repository_index(RepositoryIndexRequest {
            repository_name: "models".into(),
            ready: false,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown_repo.code(), tonic::Code::NotFound);
    assert!(
        unknown_repo.message().contains("repository_name"),
        "{}",
        unknown_repo.message()
    );
    let bad = eventually("a-2 probed", Duration::from_secs(20), || {
        let mut a = admin.clone();
        async move {
            let n = a
                .get_node(GetNodeRequest { id: "a-2".into() })
                .await
                .ok()?
                .into_inner();
            (n.endpoint.as_ref()?.health() == HealthState::Unhealthy).then_some(n)
        }
    })
    .await;
    assert!(
        bad.last_error.contains("RepositoryIndex"),
        "the reason names what is missing: {:?}",
        bad.last_error
    );
}

/// `grpc.health.v1` as a load balancer's probes see it: the router is live at once (`""`), and
/// ready (`inference.GRPCInferenceService`) only once it holds a routing table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_health_is_live_at_once_and_ready_once_it_holds_a_table() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    // The control plane the router follows is not up yet: its address is free.
    let control = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let router = stack::router("a", control, None).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", router.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = |service: &str| {
        let mut h = health.clone();
        let service = service.to_owned();
        async move {
            h.check(HealthCheckRequest { service })
                .await
                .map(|r| r.into_inner().status())
        }
    };
    assert_eq!(status("").await.unwrap(), ServingStatus::Serving);
    let oip = "inference.GRPCInferenceService";
    assert_eq!(status(oip).await.unwrap(), ServingStatus::NotServing);

    // The control plane comes up at that address (no node registered: an empty table is a
    // table); the router subscribes and becomes ready.
    let _cp = stack::control_plane_at(
        control,
        "memory:",
        fulcrum_control_plane::AdminAuth::Loopback(None),
    )
    .await;
    eventually("the router is ready", Duration::from_secs(20), || {
        let check = status(oip);
        async move { (check.await.ok()? == ServingStatus::Serving).then_some(()) }
    })
    .await;
    assert_eq!(status("").await.unwrap(), ServingStatus::Serving);
    // An unknown service is not found, as grpc.health.v1 says.
    let err = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}
