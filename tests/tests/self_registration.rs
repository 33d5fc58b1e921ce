//! Self-registration on a real etcd: a node-sim registers itself with a lease, reports its load,
//! becomes routable and serves calls through a router; a node that crashes leaves at once; a
//! replica that dies holding a registration lets its lease expire (or hands the node over to
//! another replica); bad registrations are refused and change nothing.

use std::time::Duration;

use fulcrum_control_plane::AdminAuth;
use fulcrum_control_plane::keys;
use fulcrum_control_plane::store::WatchEvent;
use fulcrum_control_plane::store::{SharedStore, open};
use fulcrum_proto::fulcrum::v1::registration_client::RegistrationClient;
use fulcrum_proto::fulcrum::v1::{
    CordonNodeRequest, ListNodesRequest, NodeMessage, NodeReport, NodeSpec, NodeStatus,
    RegistrationEvent, WeightOverrideRequest, node_message,
};
use fulcrum_sim::node::{NodeSimConfig, RunningNodeSim, spawn};
use fulcrum_sim::register::{RegisterConfig, Registrar, RegistrationState};
use fulcrum_tests::etcd::Etcd;
use fulcrum_tests::eventually;
use fulcrum_tests::infer::{assert_echoed, echo_request, served_by};
use fulcrum_tests::stack::{self, Running, admin, oip, register, spec, wait_ready};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::Streaming;

/// Whether a call failed because no node serves the model any more: the model left the
/// routing table with its last node (NOT_FOUND), or none of its nodes is routable (UNAVAILABLE).
fn no_node(err: &tonic::Status) -> bool {
    matches!(err.code(), Code::NotFound | Code::Unavailable)
}

/// Starts a replica whose self-registrations have leases of `ttl`.
async fn control_plane(etcd: &Etcd, ttl: Duration) -> Running {
    let any_port = "127.0.0.1:0".parse().unwrap();
    stack::control_plane_configured(any_port, &etcd.url(), AdminAuth::Loopback(None), move |c| {
        c.registration_ttl = ttl;
    })
    .await
}

async fn node_sim(name: &str) -> RunningNodeSim {
    let config = NodeSimConfig {
        name: name.into(),
        ..NodeSimConfig::default()
    };
    spawn(config, "127.0.0.1:0".parse().unwrap()).await.unwrap()
}

/// A node-sim registering itself as `id` in region `a` through `control`.
fn registrar(node: &RunningNodeSim, id: &str, control: &[&Running]) -> Registrar {
    let control = control.iter().map(|c| c.addr.to_string()).collect();
    let spec = spec(id, node.addr, "a", &["echo"], 4);
    Registrar::spawn(RegisterConfig::new(control, spec), node.controls())
}

async fn registered(r: &Registrar) -> String {
    let mut states = r.watch();
    let state = tokio::time::timeout(
        Duration::from_secs(20),
        states.wait_for(|s| matches!(s, RegistrationState::Registered { .. })),
    )
    .await
    .expect("not registered within 20 s")
    .expect("registrar gone")
    .clone();
    match state {
        RegistrationState::Registered { control, .. } => control,
        _ => unreachable!(),
    }
}

async fn list(control: &Running) -> Vec<NodeStatus> {
    admin(control.addr)
        .await
        .list_nodes(ListNodesRequest::default())
        .await
        .expect("list nodes")
        .into_inner()
        .nodes
}

fn id_of(n: &NodeStatus) -> &str {
    n.endpoint
        .as_ref()
        .and_then(|e| e.spec.as_ref())
        .map_or("", |s| s.id.as_str())
}

async fn status_of(control: &Running, id: &str) -> Option<NodeStatus> {
    list(control).await.into_iter().find(|n| id_of(n) == id)
}

async fn store(etcd: &Etcd) -> SharedStore {
    open(&etcd.url()).await.expect("open etcd")
}

/// The lease of node `id`'s entry in the store (0: none), or `None` when it is not there.
async fn lease_of(store: &SharedStore, id: &str) -> Option<i64> {
    store
        .get(&keys::node(id))
        .await
        .expect("read etcd")
        .map(|kv| kv.lease)
}

fn spec_message(spec: NodeSpec) -> NodeMessage {
    NodeMessage {
        message: Some(node_message::Message::Spec(spec)),
    }
}

/// Opens a raw registration stream (no reconnects) with `first` as its first message; returns
/// the sender of later messages and the answers.
async fn raw_register(
    control: &Running,
    first: NodeMessage,
) -> Result<(mpsc::Sender<NodeMessage>, Streaming<RegistrationEvent>), tonic::Status> {
    let mut client = RegistrationClient::connect(format!("http://{}", control.addr))
        .await
        .expect("connect registration");
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let events = client.register(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_registered_node_is_leased_reports_and_serves_through_a_router() {
    let _serial = fulcrum_tests::exclusive().await;
    let etcd = Etcd::start().await;
    let store = store(&etcd).await;
    let cp = control_plane(&etcd, Duration::from_secs(3)).await;
    let node = node_sim("self-1").await;
    let operator_node = node_sim("op-1").await;
    register(
        &mut admin(cp.addr).await,
        spec("op-1", operator_node.addr, "a", &["other"], 4),
    )
    .await;

    let registrar = registrar(&node, "self-1", &[&cp]);
    assert_eq!(registered(&registrar).await, cp.addr.to_string());
    assert_ne!(lease_of(&store, "self-1").await, Some(0));
    assert_eq!(
        lease_of(&store, "op-1").await,
        Some(0),
        "an operator's registration got a lease"
    );

    // Listed as leased, with its reports; the operator's node is not leased.
    let listed = eventually(
        "the node's report is listed",
        Duration::from_secs(10),
        || async {
            status_of(&cp, "self-1")
                .await
                .filter(|n| n.self_report.is_some())
        },
    )
    .await;
    assert!(listed.leased);
    let report = listed.self_report.unwrap();
    assert_eq!(report.utilization, 0.0);
    assert!(report.metrics.contains_key("busy_slots"), "{report:?}");
    let op = status_of(&cp, "op-1").await.unwrap();
    assert!(!op.leased && op.self_report.is_none(), "{op:?}");

    // Routable: a router serves calls with it.
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    let mut c = oip(router.addr).await;
    for i in 0..10 {
        let req = echo_request("echo", &[i as f32]);
        let resp = c
            .model_infer(req.clone())
            .await
            .expect("call through the router");
        assert_eq!(served_by(resp.metadata()), ("self-1".into(), "a".into()));
        assert_echoed(&req, resp.get_ref());
    }
    assert!(node.controls().served("echo") >= 10);

    // Its reports follow its load: a call held in service shows as in flight, one slot of four.
    node.controls().set_hang_ratio(1.0).await.unwrap();
    let mut direct = oip(node.addr).await;
    let held = tokio::spawn(async move {
        let mut req = tonic::Request::new(echo_request("echo", &[1.0]));
        req.set_timeout(Duration::from_secs(30));
        let _ = direct.model_infer(req).await;
    });
    eventually(
        "the report shows the held call",
        Duration::from_secs(10),
        || async {
            let r = status_of(&cp, "self-1").await?.self_report?;
            (r.in_flight == 1 && r.queue_depth == 0 && r.utilization == 0.25).then_some(())
        },
    )
    .await;
    held.abort();
    node.controls().set_hang_ratio(0.0).await.unwrap();

    // Goodbye: once confirmed, the node is gone from the store, and routing follows.
    registrar.stop().await.unwrap();
    assert_eq!(lease_of(&store, "self-1").await, None);
    eventually(
        "the router stops routing to it",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move {
                let err = c.model_infer(echo_request("echo", &[1.0])).await.err()?;
                no_node(&err).then_some(())
            }
        },
    )
    .await;
    assert!(status_of(&cp, "self-1").await.is_none());
    assert!(status_of(&cp, "op-1").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_crashes_leaves_at_once() {
    let _serial = fulcrum_tests::exclusive().await;
    let etcd = Etcd::start().await;
    let store = store(&etcd).await;
    // A long TTL: leaving well within it shows the control plane revoked the lease.
    let cp = control_plane(&etcd, Duration::from_secs(30)).await;
    let node = node_sim("crash-1").await;
    let registrar = registrar(&node, "crash-1", &[&cp]);
    registered(&registrar).await;
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;

    // The node's side crashes: no goodbye, its connection just breaks.
    drop(registrar);
    eventually(
        "the crashed node's entry is removed",
        Duration::from_secs(10),
        || async { lease_of(&store, "crash-1").await.is_none().then_some(()) },
    )
    .await;
    let c = oip(router.addr).await;
    eventually(
        "the router stops routing to it",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move {
                let err = c.model_infer(echo_request("echo", &[1.0])).await.err()?;
                no_node(&err).then_some(())
            }
        },
    )
    .await;
    assert!(status_of(&cp, "crash-1").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_lets_the_lease_expire() {
    let _serial = fulcrum_tests::exclusive().await;
    let etcd = Etcd::start().await;
    let store = store(&etcd).await;
    let ttl = Duration::from_secs(3);
    let cp = control_plane(&etcd, ttl).await;
    let node = node_sim("orphan-1").await;
    let (reports, mut events) = raw_register(
        &cp,
        spec_message(spec("orphan-1", node.addr, "a", &["echo"], 4)),
    )
    .await
    .expect("registered");
    let accepted = events.message().await.unwrap().unwrap();
    assert!(accepted.accepted);
    assert_eq!(accepted.lease_ttl_seconds, 3);
    assert!(lease_of(&store, "orphan-1").await.is_some());

    // The node keeps talking; the replica holding its lease dies (no revoke can happen).
    let talking = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let report = NodeMessage {
                message: Some(node_message::Message::Report(NodeReport::default())),
            };
            if reports.send(report).await.is_err() {
                return;
            }
        }
    });
    let died = tokio::time::Instant::now();
    drop(cp);
    eventually(
        "the orphaned lease expires",
        ttl + Duration::from_secs(5),
        || async { lease_of(&store, "orphan-1").await.is_none().then_some(()) },
    )
    .await;
    // It expired: the last renewal was at most a third of the TTL before the replica died.
    let waited = died.elapsed();
    assert!(
        waited >= ttl / 3,
        "gone after {waited:?}: revoked rather than expired"
    );
    talking.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_moves_to_another_replica_without_leaving() {
    let _serial = fulcrum_tests::exclusive().await;
    let etcd = Etcd::start().await;
    let store = store(&etcd).await;
    let ttl = Duration::from_secs(3);
    let cp1 = control_plane(&etcd, ttl).await;
    let cp2 = control_plane(&etcd, ttl).await;
    let node = node_sim("mover-1").await;
    let registrar = registrar(&node, "mover-1", &[&cp1, &cp2]);
    assert_eq!(registered(&registrar).await, cp1.addr.to_string());
    let first = store.get(&keys::node("mover-1")).await.unwrap().unwrap();

    let mut watch = store.watch(keys::NODES, first.mod_revision).await.unwrap();
    let mut states = registrar.watch();
    drop(cp1);
    tokio::time::timeout(
        Duration::from_secs(20),
        states.wait_for(|s| {
            matches!(s, RegistrationState::Registered { control, .. } if *control == cp2.addr.to_string())
        }),
    )
    .await
    .expect("the node did not move to the other replica")
    .unwrap();

    // The new replica took the entry over with its own lease, the entry never having gone.
    let event = watch.next().await.unwrap().unwrap();
    let WatchEvent::Put(kv) = event else {
        panic!("the entry was deleted before the node moved: {event:?}");
    };
    assert_eq!(kv.key, keys::node("mover-1"));
    assert_ne!(kv.lease, first.lease);
    assert_ne!(kv.lease, 0);
    // The old lease expires and takes nothing with it.
    let etcd_client = etcd_client::Client::connect([etcd.client_addr.as_str()], None)
        .await
        .unwrap();
    eventually("the old lease expires", ttl * 3, || {
        let mut leases = etcd_client.lease_client();
        async move {
            let left = leases.time_to_live(first.lease, None).await.ok()?;
            (left.ttl() < 0).then_some(())
        }
    })
    .await;
    assert_eq!(lease_of(&store, "mover-1").await, Some(kv.lease));
    assert!(status_of(&cp2, "mover-1").await.unwrap().leased);
    registrar.stop().await.unwrap();
    assert_eq!(lease_of(&store, "mover-1").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_change_nothing() {
    let etcd = Etcd::start().await;
    let store = store(&etcd).await;
    let cp = control_plane(&etcd, Duration::from_secs(3)).await;
    let node = node_sim("bad-1").await;
    let addr = node.addr;
    let other: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    register(
        &mut admin(cp.addr).await,
        spec("op-1", addr, "a", &["echo"], 4),
    )
    .await;
    let (_live, mut live_events) =
        raw_register(&cp, spec_message(spec("live-1", addr, "a", &["echo"], 4)))
            .await
            .expect("registered");
    live_events.message().await.unwrap().unwrap();

    let before = store.list(keys::NODES).await.unwrap();
    let mut bad_spec = spec("bad-1", addr, "a", &["echo"], 4);
    bad_spec.capacity = 0;
    let mut bad_address = spec("bad-1", addr, "a", &["echo"], 4);
    bad_address.address = "no-port".into();
    let report_first = NodeMessage {
        message: Some(node_message::Message::Report(NodeReport::default())),
    };
    let cases = [
        ("capacity 0", spec_message(bad_spec), Code::InvalidArgument),
        ("no port", spec_message(bad_address), Code::InvalidArgument),
        ("a report first", report_first, Code::InvalidArgument),
        (
            "an empty message first",
            NodeMessage { message: None },
            Code::InvalidArgument,
        ),
        (
            "an operator's id, another address",
            spec_message(spec("op-1", other, "a", &["echo"], 4)),
            Code::AlreadyExists,
        ),
        (
            "an operator's id, its address",
            spec_message(spec("op-1", addr, "a", &["echo"], 4)),
            Code::AlreadyExists,
        ),
        (
            "a live node's id, another address",
            spec_message(spec("live-1", other, "a", &["echo"], 4)),
            Code::AlreadyExists,
        ),
    ];
    for (what, first, code) in cases {
        let err = raw_register(&cp, first)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(err.code(), code, "{what}: {err:?}");
    }
    assert_eq!(
        store.list(keys::NODES).await.unwrap().0,
        before.0,
        "a refused registration changed the registry"
    );
    assert_eq!(lease_of(&store, "op-1").await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reporting_itself_busy_gets_a_lower_weight() {
    let etcd = Etcd::start().await;
    let cp = control_plane(&etcd, Duration::from_secs(3)).await;
    let mut senders = Vec::new();
    let mut sims = Vec::new();
    for id in ["busy-1", "idle-1"] {
        let node = node_sim(id).await;
        let (tx, mut events) =
            raw_register(&cp, spec_message(spec(id, node.addr, "a", &["echo"], 4)))
                .await
                .expect("registered");
        assert!(events.message().await.unwrap().unwrap().accepted);
        senders.push((id, tx, events));
        sims.push(node);
    }
    // Both keep reporting (their reports are their heartbeat): busy-1 says it is at 95 %, with
    // no call from any router. Bounded: at most 100 rounds of 300 ms.
    let reporter = tokio::spawn(async move {
        for _ in 0..100 {
            for (id, tx, _) in &senders {
                let report = NodeReport {
                    in_flight: 0,
                    queue_depth: 0,
                    utilization: if *id == "busy-1" { 0.95 } else { 0.0 },
                    metrics: Default::default(),
                };
                let msg = NodeMessage {
                    message: Some(node_message::Message::Report(report)),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let weight = |nodes: &[NodeStatus], id: &str| {
        nodes
            .iter()
            .find(|n| id_of(n) == id)
            .and_then(|n| n.endpoint.as_ref())
            .map_or(0.0, |e| e.weight)
    };
    // Weights start at their targets once the nodes are probed (they were unprobed, weight 0,
    // at first) and then move with the load, damped: wait until the idle node has its whole
    // capacity (4); the busy one must settle near the headroom floor's share
    // (4 × (0.2 + 0.8 × 0.05) ≈ 0.96).
    eventually(
        "the idle node at full weight, the busy one at a quarter of it",
        Duration::from_secs(30),
        || async {
            let nodes = list(&cp).await;
            let (busy, idle) = (weight(&nodes, "busy-1"), weight(&nodes, "idle-1"));
            (busy > 0.0 && busy < 1.5 && idle > 3.5).then_some(())
        },
    )
    .await;
    reporter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_takes_its_overrides_along() {
    let etcd = Etcd::start().await;
    let store = store(&etcd).await;
    let cp = control_plane(&etcd, Duration::from_secs(3)).await;
    let node = node_sim("ov-1").await;
    let (tx, mut events) = raw_register(
        &cp,
        spec_message(spec("ov-1", node.addr, "a", &["echo"], 4)),
    )
    .await
    .expect("registered");
    assert!(events.message().await.unwrap().unwrap().accepted);
    let mut a = admin(cp.addr).await;
    a.cordon_node(CordonNodeRequest {
        id: "ov-1".into(),
        cordon: true,
    })
    .await
    .unwrap();
    a.set_weight_override(WeightOverrideRequest {
        id: "ov-1".into(),
        weight: Some(2.0),
    })
    .await
    .unwrap();
    let overrides = |store: SharedStore| async move {
        let (kvs, _) = store.list(keys::OVERRIDES).await.unwrap();
        kvs.into_iter()
            .filter(|kv| kv.key.ends_with("/ov-1"))
            .count()
    };
    assert_eq!(overrides(store.clone()).await, 2);
    // The node says goodbye: its lease is revoked, its entry goes, and its overrides with it.
    drop(tx);
    eventually(
        "the node's overrides are gone",
        Duration::from_secs(20),
        || {
            let store = store.clone();
            async move { (overrides(store).await == 0).then_some(()) }
        },
    )
    .await;
    assert!(store.get(&keys::node("ov-1")).await.unwrap().is_none());
    // Registering again starts clean: not cordoned, no weight override.
    let (_tx, mut events) = raw_register(
        &cp,
        spec_message(spec("ov-1", node.addr, "a", &["echo"], 4)),
    )
    .await
    .expect("registered again");
    assert!(events.message().await.unwrap().unwrap().accepted);
    let status = status_of(&cp, "ov-1").await.expect("listed");
    assert!(!status.cordoned && status.weight_override.is_none());
}
