//! The routing stream as a router sees it, spoken by hand against a control plane on real etcd:
//! a snapshot first, then deltas of only the nodes that changed, with versions that only grow;
//! a NACK brings a snapshot; a stream that does not start with a hello is refused.

use std::time::Duration;

use fulcrum_proto::fulcrum::v1::routing_client::RoutingClient;
use fulcrum_proto::fulcrum::v1::{
    Ack, DrainNodeRequest, HealthState, Nack, RouterHello, RouterMessage, RoutingUpdate,
    router_message,
};
use fulcrum_sim::node::{NodeSimConfig, spawn};
use fulcrum_tests::etcd::Etcd;
use fulcrum_tests::stack::{self, admin, register, spec};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn msg(m: router_message::Message) -> RouterMessage {
    RouterMessage { message: Some(m) }
}

/// Reads updates until the table satisfies `pred`, checking on the way that versions only grow,
/// that the first update is a snapshot, and that every later one is a delta on the version held
/// (or a heartbeat). Returns the table (as merged) and the number of deltas seen.
async fn until(
    updates: &mut tonic::Streaming<RoutingUpdate>,
    held: &mut Option<RoutingUpdate>,
    what: &str,
    pred: impl Fn(&RoutingUpdate) -> bool,
) -> RoutingUpdate {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let next = tokio::time::timeout_at(deadline, updates.message())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
            .expect("stream error")
            .expect("stream ended");
        if next.heartbeat {
            assert_eq!(next.version, held.as_ref().map_or(0, |h| h.version));
            continue;
        }
        let table = match held.take() {
            None => {
                assert!(next.snapshot, "the first update must be a snapshot");
                next
            }
            Some(h) => {
                assert!(
                    next.version > h.version,
                    "version went from {} to {}",
                    h.version,
                    next.version
                );
                assert!(
                    !next.snapshot,
                    "a router holding the previous version gets a delta"
                );
                assert!(
                    next.endpoints.len() <= 1,
                    "the delta carries more than the changed node"
                );
                fulcrum_data_plane::table::merge(&h, &next)
                    .expect("delta applies to the held version")
            }
        };
        *held = Some(table.clone());
        if pred(&table) {
            return table;
        }
    }
}

fn health_of(u: &RoutingUpdate, id: &str) -> Option<HealthState> {
    u.endpoints
        .iter()
        .find(|e| e.spec.as_ref().is_some_and(|s| s.id == id))
        .map(|e| e.health())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_with_growing_versions() {
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut admin = admin(cp.addr).await;
    let node = spawn(NodeSimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    register(&mut admin, spec("n-1", node.addr, "a", &["echo"], 4)).await;

    let (tx, rx) = mpsc::channel(8);
    tx.send(msg(router_message::Message::Hello(RouterHello {
        router_id: "test-router".into(),
        region: "a".into(),
        // A version from the future gets a snapshot, not an error.
        known_version: u64::MAX,
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut client = RoutingClient::connect(format!("http://{}", cp.addr))
        .await
        .unwrap();
    let mut updates = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut held = None;
    let first = until(&mut updates, &mut held, "n-1 healthy", |u| {
        health_of(u, "n-1") == Some(HealthState::Healthy)
    })
    .await;
    assert!(first.endpoints[0].weight > 0.0);
    let version = first.version;
    tx.send(msg(router_message::Message::Ack(Ack { version })))
        .await
        .unwrap();

    admin
        .drain_node(DrainNodeRequest {
            id: "n-1".into(),
            drain: true,
        })
        .await
        .unwrap();
    let drained = until(&mut updates, &mut held, "n-1 draining", |u| {
        health_of(u, "n-1") == Some(HealthState::Draining)
    })
    .await;
    assert_eq!(drained.endpoints[0].weight, 0.0);

    node.controls().set_healthy(false).await;
    admin
        .drain_node(DrainNodeRequest {
            id: "n-1".into(),
            drain: false,
        })
        .await
        .unwrap();
    let unhealthy = until(&mut updates, &mut held, "n-1 unhealthy", |u| {
        health_of(u, "n-1") == Some(HealthState::Unhealthy)
    })
    .await;

    // A router that rejects an update keeps its table and gets a snapshot of the newest.
    tx.send(msg(router_message::Message::Nack(Nack {
        version: unhealthy.version,
        reason: "test".into(),
    })))
    .await
    .unwrap();
    let snapshot = loop {
        let next = tokio::time::timeout(Duration::from_secs(10), updates.message())
            .await
            .expect("no snapshot after a NACK")
            .unwrap()
            .unwrap();
        if !next.heartbeat {
            break next;
        }
    };
    assert!(snapshot.snapshot, "after a NACK the router gets a snapshot");
    assert!(snapshot.version >= unhealthy.version);
    assert_eq!(health_of(&snapshot, "n-1"), Some(HealthState::Unhealthy));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_hello_is_refused() {
    let cp = stack::control_plane("memory:").await;
    let mut client = RoutingClient::connect(format!("http://{}", cp.addr))
        .await
        .unwrap();
    let first = msg(router_message::Message::Ack(Ack { version: 1 }));
    let err = client
        .subscribe(tokio_stream::iter(vec![first]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("RouterHello"), "{}", err.message());
    let no_id = msg(router_message::Message::Hello(RouterHello::default()));
    let err = client
        .subscribe(tokio_stream::iter(vec![no_id]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_routing_method_is_unimplemented() {
    let cp = stack::control_plane("memory:").await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/fulcrum.v1.Routing/Nope");
    let err = grpc
        .unary::<_, Ack, _>(
            tonic::Request::new(Ack { version: 1 }),
            path,
            tonic_prost::ProstCodec::<Ack, Ack>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(err.message().contains("Nope"), "{}", err.message());
}

/// A router that gives an address (by default, the one it listens on) is listed in the router
/// directory while its stream lasts, and unlisted when it stops; any replica's FindRouter
/// answers from the store. Bad and unknown ids are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_are_listed_in_the_directory_while_their_streams_last() {
    use fulcrum_proto::fulcrum::v1::FindRouterRequest;
    use fulcrum_proto::fulcrum::v1::router_directory_client::RouterDirectoryClient;

    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    // A second replica on the same store, which the router does not follow.
    let other = stack::control_plane(&etcd.url()).await;
    let router = stack::router_configured("a", &[cp.addr], |c| {
        c.router_id = "listed-router".into();
    })
    .await;
    let mut directory = RouterDirectoryClient::connect(format!("http://{}", other.addr))
        .await
        .unwrap();
    let find = |id: &str| FindRouterRequest {
        router_id: id.into(),
    };
    let entry = fulcrum_tests::eventually("the router listed", Duration::from_secs(20), || {
        let mut d = directory.clone();
        async move { d.find_router(find("listed-router")).await.ok() }
    })
    .await
    .into_inner();
    assert_eq!(entry.router_id, "listed-router");
    assert_eq!(entry.region, "a");
    assert_eq!(entry.address, router.addr.to_string());
    // Its replica's status (`fulcrum ctl routers`) shows the address too.
    let status = admin(cp.addr)
        .await
        .get_status(fulcrum_proto::fulcrum::v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let listed = status
        .routers
        .iter()
        .find(|r| r.router_id == "listed-router")
        .expect("the router in its replica's status");
    assert_eq!(listed.address, router.addr.to_string());

    let e = directory.find_router(find("")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = directory.find_router(find("nobody")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("\"nobody\""), "{}", e.message());

    // Stopped, it is unlisted (its replica revokes the entry when the stream ends).
    router.stop().await;
    fulcrum_tests::eventually("the router unlisted", Duration::from_secs(20), || {
        let mut d = directory.clone();
        async move {
            let r = d.find_router(find("listed-router")).await;
            matches!(r, Err(e) if e.code() == Code::NotFound).then_some(())
        }
    })
    .await;
}
