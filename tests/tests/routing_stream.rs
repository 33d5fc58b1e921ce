//! The routing stream as a router sees it, spoken by hand against a control plane on real etcd:
//! a snapshot first, then a new snapshot on every change, with versions that only grow; a
//! stream that does not start with a hello is refused.

use std::time::Duration;

use fulcrum_proto::fulcrum::v1::routing_client::RoutingClient;
use fulcrum_proto::fulcrum::v1::{
    Ack, DrainNodeRequest, HealthState, RouterHello, RouterMessage, RoutingUpdate, router_message,
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

/// Reads updates until one satisfies `pred`, checking on the way that versions only grow.
async fn until(
    updates: &mut tonic::Streaming<RoutingUpdate>,
    last_version: &mut u64,
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
        assert!(
            next.version > *last_version,
            "version went from {last_version} to {}",
            next.version
        );
        assert!(next.snapshot, "the control plane sends snapshots");
        *last_version = next.version;
        if pred(&next) {
            return next;
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
    let mut version = 0;
    let first = until(&mut updates, &mut version, "n-1 healthy", |u| {
        health_of(u, "n-1") == Some(HealthState::Healthy)
    })
    .await;
    assert!(first.endpoints[0].weight > 0.0);
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
    let drained = until(&mut updates, &mut version, "n-1 draining", |u| {
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
    until(&mut updates, &mut version, "n-1 unhealthy", |u| {
        health_of(u, "n-1") == Some(HealthState::Unhealthy)
    })
    .await;
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
