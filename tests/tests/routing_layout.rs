//! The routing table's layout in etcd: one key per node, written by the leader in fenced
//! batches of bounded transactions closed by a commit marker. A fleet of hundreds of nodes: a
//! change to one node is a delta of that node; a change to all of them spans several
//! transactions yet reaches a router as one version; a deposed leader's batches are refused.

use std::time::Duration;

use fulcrum_control_plane::store::etcd::EtcdStore;
use fulcrum_control_plane::store::{MAX_TXN_OPS, Op, Store, StoreError};
use fulcrum_control_plane::table::WEIGHT_HYSTERESIS;
use fulcrum_control_plane::{AdminAuth, keys, registry};
use fulcrum_proto::fulcrum::v1::routing_client::RoutingClient;
use fulcrum_proto::fulcrum::v1::{
    Ack, HealthState, ListNodesRequest, RegionStateRequest, RouterHello, RouterMessage,
    RoutingUpdate, WeightOverrideRequest, router_message,
};
use fulcrum_sim::node::{NodeSimConfig, spawn};
use fulcrum_tests::etcd::Etcd;
use fulcrum_tests::stack::{self, admin, spec};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Nodes in the fleet: more than two transactions' worth, so a change to all of them must span
/// several.
const FLEET: usize = 300;

/// How long the large fleet may take to settle, and a weight change to reach the router: far
/// beyond the seconds it takes, so only a stall fails (the suite runs on shared machines).
const SETTLE_DEADLINE: Duration = Duration::from_secs(300);

fn msg(m: router_message::Message) -> RouterMessage {
    RouterMessage { message: Some(m) }
}

fn id(i: usize) -> String {
    format!("f-{i:03}")
}

/// A hand-made router: reads updates, merges them into its table, ACKs each.
struct Router {
    updates: tonic::Streaming<RoutingUpdate>,
    acks: mpsc::Sender<RouterMessage>,
    table: Option<RoutingUpdate>,
}

impl Router {
    async fn subscribe(addr: std::net::SocketAddr) -> Self {
        let (acks, rx) = mpsc::channel(8);
        acks.send(msg(router_message::Message::Hello(RouterHello {
            router_id: "layout-test".into(),
            region: "a".into(),
            known_version: 0,
            ..Default::default()
        })))
        .await
        .unwrap();
        let mut client = RoutingClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let updates = client
            .subscribe(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self {
            updates,
            acks,
            table: None,
        }
    }

    /// The next update that is not a heartbeat, merged; returns the update as received.
    async fn next(&mut self) -> RoutingUpdate {
        loop {
            let u = tokio::time::timeout(Duration::from_secs(30), self.updates.message())
                .await
                .expect("no routing update within 30 s")
                .expect("stream error")
                .expect("stream ended");
            if u.heartbeat {
                continue;
            }
            if let Some(held) = &self.table {
                assert!(u.version > held.version, "version went backwards");
            }
            let merged = match &self.table {
                Some(held) if !u.snapshot => fulcrum_data_plane::table::merge(held, &u)
                    .expect("a delta applies to the version held"),
                _ => u.clone(),
            };
            self.table = Some(merged);
            self.acks
                .send(msg(router_message::Message::Ack(Ack {
                    version: u.version,
                })))
                .await
                .unwrap();
            return u;
        }
    }

    fn weight(&self, node: &str) -> Option<f64> {
        self.table
            .as_ref()?
            .endpoints
            .iter()
            .find_map(|e| (e.spec.as_ref().is_some_and(|s| s.id == node)).then_some(e.weight))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_fleet_is_stored_per_node_and_its_changes_arrive_as_whole_deltas() {
    let _serial = fulcrum_tests::exclusive().await;
    let etcd = Etcd::start().await;
    // Probes once a second: the test is about the table, and 300 nodes probed ten times a
    // second would keep a debug build busy.
    let cp = stack::control_plane_configured(
        "127.0.0.1:0".parse().unwrap(),
        &etcd.url(),
        AdminAuth::Loopback(None),
        |c| c.probe.interval = Duration::from_secs(1),
    )
    .await;
    let mut a = admin(cp.addr).await;
    // One simulated server answers the probes of every node of the fleet.
    let node = spawn(NodeSimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // Registered straight into the store (the control loop's resync picks them up): 300 admin
    // calls would each wake the control loop, which is not what this test is about.
    let store = EtcdStore::connect(&[format!("http://{}", etcd.client_addr)])
        .await
        .unwrap();
    for i in 0..FLEET {
        registry::register(&store, &spec(&id(i), node.addr, "a", &["echo"], 4))
            .await
            .unwrap();
    }
    let mut router = Router::subscribe(cp.addr).await;
    let first = router.next().await;
    assert!(first.snapshot, "the first update is a snapshot");
    // Wait until the whole fleet is healthy, routed and settled: each node's first weight after
    // zero (unprobed) is its target, the capacity, 4, at once (see `weights::damp`); a weight
    // that load moved since stops being republished once within the hysteresis (5 %) of its
    // target, so anything from 4 / 1.05 = 3.81 up is settled.
    // A deadline, not a timing goal: a fleet that never settles fails here, with a message,
    // instead of hanging the suite (it settles in seconds; minutes only on a starved machine).
    const SETTLED: f64 = 4.0 / (1.0 + WEIGHT_HYSTERESIS) - 1e-9;
    let settled = tokio::time::timeout(SETTLE_DEADLINE, async {
        loop {
            let t = router.table.as_ref().unwrap();
            if t.endpoints.len() == FLEET
                && t.endpoints
                    .iter()
                    .all(|e| e.health() == HealthState::Healthy && e.weight >= SETTLED)
            {
                break;
            }
            router.next().await;
        }
    })
    .await;
    if settled.is_err() {
        let t = router.table.as_ref().unwrap();
        let healthy = t
            .endpoints
            .iter()
            .filter(|e| e.health() == HealthState::Healthy)
            .count();
        let settled = t.endpoints.iter().filter(|e| e.weight >= SETTLED).count();
        let min = t
            .endpoints
            .iter()
            .map(|e| e.weight)
            .fold(f64::MAX, f64::min);
        panic!(
            "the fleet was not healthy and settled within {SETTLE_DEADLINE:?}: the router holds \
             {} of {FLEET} nodes, {healthy} healthy, {settled} at weight ≥ {SETTLED:.3}, lowest \
             weight {min}, version {}",
            t.endpoints.len(),
            t.version
        );
    }

    // The layout: one key per node, a commit marker, no pending marker, no single-key table.
    let (entries, _) = store.list(keys::ROUTING_NODES).await.unwrap();
    assert_eq!(entries.len(), FLEET);
    assert!(store.get(keys::ROUTING_COMMIT).await.unwrap().is_some());
    assert!(store.get(keys::ROUTING_PENDING).await.unwrap().is_none());
    assert!(store.get(keys::LEGACY_ROUTING).await.unwrap().is_none());

    // One node's weight changes: every version until it settles is a delta of that node only.
    a.set_weight_override(WeightOverrideRequest {
        id: id(7),
        weight: Some(1.0),
    })
    .await
    .unwrap();
    let changed = tokio::time::timeout(SETTLE_DEADLINE, async {
        while router.weight(&id(7)).unwrap() > 1.0 * 1.06 {
            let u = router.next().await;
            assert!(!u.snapshot, "a current router got a snapshot");
            let ids: Vec<&str> = u
                .endpoints
                .iter()
                .map(|e| e.spec.as_ref().unwrap().id.as_str())
                .collect();
            assert_eq!(ids, [id(7)], "a delta carried more than the changed node");
        }
    })
    .await;
    assert!(
        changed.is_ok(),
        "the weight override did not reach the router within {SETTLE_DEADLINE:?}"
    );

    // The whole region evacuated: every weight drops to zero in one batch of several
    // transactions, which the router receives as one delta.
    a.set_region_state(RegionStateRequest {
        region: "a".into(),
        evacuated: true,
    })
    .await
    .unwrap();
    let (before, u) = loop {
        let before = router.table.as_ref().unwrap().version;
        let u = router.next().await;
        if u.endpoints.iter().any(|e| e.weight == 0.0) {
            break (before, u);
        }
    };
    assert!(!u.snapshot);
    assert_eq!(u.base_version, before);
    assert_eq!(
        u.endpoints.len(),
        FLEET,
        "the router saw part of a batch as a version"
    );
    assert!(u.endpoints.iter().all(|e| e.weight == 0.0));
    let txns = FLEET.div_ceil(MAX_TXN_OPS) as u64;
    assert!(
        u.version >= before + txns,
        "{FLEET} changes cannot fit in fewer than {txns} transactions ({before} → {})",
        u.version
    );

    // `ctl nodes` tells, per node, how many routers hold its newest entry: this router ACKed
    // the evacuation; a second one that never ACKs does not count.
    let (lag_tx, lag_rx) = mpsc::channel(1);
    lag_tx
        .send(msg(router_message::Message::Hello(RouterHello {
            router_id: "never-acks".into(),
            region: "a".into(),
            known_version: 0,
            ..Default::default()
        })))
        .await
        .unwrap();
    let _lagging = RoutingClient::connect(format!("http://{}", cp.addr))
        .await
        .unwrap()
        .subscribe(ReceiverStream::new(lag_rx))
        .await
        .unwrap();
    // The test router keeps reading (and ACKing) meanwhile: on a loaded machine a probe that
    // times out changes a node's entry after the evacuation, and a router that stopped reading
    // would rightly not count as holding it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let nodes = loop {
        let nodes = a
            .list_nodes(ListNodesRequest::default())
            .await
            .map(|r| r.into_inner().nodes)
            .unwrap_or_default();
        if !nodes.is_empty()
            && nodes
                .iter()
                .all(|n| n.routers_total == 2 && n.routers_current == 1)
        {
            break nodes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ACK is not counted for every node within 60 s"
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), router.next()).await;
    };
    assert_eq!(nodes.len(), FLEET);
    let held = router.table.as_ref().unwrap().version;
    assert!(
        nodes
            .iter()
            .all(|n| n.entry_version > before && n.entry_version <= held),
        "an entry's version is not the batch that changed it (or a later one the router holds)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_write_a_batch() {
    let etcd = Etcd::start().await;
    let endpoints = vec![format!("http://{}", etcd.client_addr)];
    let a = EtcdStore::connect(&endpoints).await.unwrap();
    let b = EtcdStore::connect(&endpoints).await.unwrap();
    let ttl = Duration::from_secs(2);
    let put = |k: &str, v: &str| Op::Put {
        key: k.into(),
        value: v.as_bytes().to_vec(),
    };
    let first = a.campaign("/test/election", "a", ttl).await.unwrap();
    let rev = a
        .txn_fenced(&first.fence, vec![put("/t/1", "a"), put("/t/2", "a")])
        .await
        .unwrap()
        .expect("the leader's batch was refused");
    assert_eq!(a.get("/t/2").await.unwrap().unwrap().mod_revision, rev);
    // More operations than one transaction may hold: refused, nothing written.
    let too_many: Vec<Op> = (0..=MAX_TXN_OPS)
        .map(|i| put(&format!("/t/many/{i}"), "x"))
        .collect();
    assert!(matches!(
        a.txn_fenced(&first.fence, too_many).await,
        Err(StoreError::TooManyOps(n)) if n == MAX_TXN_OPS + 1
    ));
    assert!(a.list("/t/many/").await.unwrap().0.is_empty());

    let stale = first.fence.clone();
    drop(first);
    let second = tokio::time::timeout(
        Duration::from_secs(20),
        b.campaign("/test/election", "b", ttl),
    )
    .await
    .expect("B was not elected after A's lease expired")
    .unwrap();
    // A, deposed, writes a batch with its old fence: refused as a whole.
    let (_, at) = a.list("/t/").await.unwrap();
    assert_eq!(
        a.txn_fenced(
            &stale,
            vec![
                put("/t/1", "stale"),
                Op::Delete { key: "/t/2".into() },
                put("/t/3", "stale")
            ]
        )
        .await
        .unwrap(),
        None
    );
    let (kvs, _) = a.list("/t/").await.unwrap();
    assert_eq!(kvs.len(), 2);
    assert!(
        kvs.iter()
            .all(|kv| kv.value == b"a" && kv.mod_revision <= at)
    );
    assert!(
        b.txn_fenced(&second.fence, vec![Op::Delete { key: "/t/2".into() }])
            .await
            .unwrap()
            .is_some()
    );
    assert!(b.get("/t/2").await.unwrap().is_none());
}
