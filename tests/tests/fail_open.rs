//! The control plane fails open when its own probing breaks down, on a real etcd: when the
//! prober's network path to the nodes breaks (each node's probe address is a relay this test
//! cuts: connections accepted and never answered, as a broken path or a starved prober looks),
//! the nodes stay routable; when one region's nodes go dark while the other region is fine,
//! they are published unhealthy (a data-center failure), unless they show life on their own;
//! and a single dead node among healthy ones is published unhealthy as ever.

use std::net::SocketAddr;
use std::time::Duration;

use fulcrum_control_plane::{AdminAuth, ControlPlaneConfig};
use fulcrum_proto::fulcrum::v1::{GetRoutingRequest, HealthState, ListNodesRequest};
use fulcrum_sim::node::{NodeSimConfig, RunningNodeSim, spawn};
use fulcrum_sim::register::{RegisterConfig, Registrar, RegistrationState};
use fulcrum_tests::etcd::Etcd;
use fulcrum_tests::eventually;
use fulcrum_tests::stack::{self, Running, admin, register, spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP relay standing for the network path from the prober to one node: it forwards, or,
/// cut, answers nothing: open connections go silent and new ones are accepted and never
/// answered, until it is restored (then they are closed).
struct Relay {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    _task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn to(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = cut_rx.clone();
                tokio::spawn(async move {
                    if !*cut.borrow() {
                        let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                            _ = cut.wait_for(|c| *c) => {}
                        }
                    }
                    // Cut: hold the connection, silent, until the path is restored.
                    let _ = cut.wait_for(|c| !*c).await;
                });
            }
        });
        Self {
            addr,
            cut,
            _task: task,
        }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }

    fn restore(&self) {
        self.cut.send_replace(false);
    }
}

/// A control plane on etcd serving metrics on its own listener; returns it and the metrics'
/// address.
async fn control_plane(etcd: &Etcd) -> (Running, SocketAddr) {
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    let store = fulcrum_control_plane::store::open(&etcd.url())
        .await
        .unwrap();
    let cp = Running::spawn(move |listener, stopped| async move {
        let mut config = ControlPlaneConfig::new("cp-fail-open", AdminAuth::Loopback(None));
        config.probe = stack::fast_probes();
        let shutdown = async move {
            let _ = stopped.await;
        };
        fulcrum_control_plane::serve_with_metrics(config, store, listener, Some(metrics), shutdown)
            .await
            .expect("control plane");
    })
    .await;
    (cp, metrics_addr)
}

/// The value of an unlabelled sample in a scrape of the metrics at `addr`.
async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.ok()?;
    raw.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// A node-sim, and the relay its probes go through.
struct Node {
    id: String,
    sim: RunningNodeSim,
    relay: Relay,
}

async fn node(id: &str) -> Node {
    let sim = spawn(
        NodeSimConfig {
            name: id.into(),
            ..NodeSimConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let relay = Relay::to(sim.addr).await;
    Node {
        id: id.into(),
        sim,
        relay,
    }
}

/// Each node's health in the routing table the control plane serves.
async fn table(cp: &Running) -> std::collections::BTreeMap<String, HealthState> {
    let t = admin(cp.addr)
        .await
        .get_routing(GetRoutingRequest {})
        .await
        .map(|r| r.into_inner())
        .unwrap_or_default();
    t.endpoints
        .iter()
        .filter_map(|e| Some((e.spec.as_ref()?.id.clone(), e.health())))
        .collect()
}

/// Waits until every node of `nodes` has health `want` in the table.
async fn wait_health(cp: &Running, nodes: &[&Node], want: HealthState, what: &str) {
    eventually(what, Duration::from_secs(20), || async {
        let t = table(cp).await;
        nodes
            .iter()
            .all(|n| t.get(&n.id) == Some(&want))
            .then_some(())
    })
    .await;
}

/// Waits until the leader's probes have failed every node of `nodes` (a failing streak of at
/// least the threshold: its probes say unhealthy, whatever the table says).
async fn wait_probes_failing(cp: &Running, nodes: &[&Node]) {
    eventually("the probes fail", Duration::from_secs(20), || async {
        let listed = admin(cp.addr)
            .await
            .list_nodes(ListNodesRequest::default())
            .await
            .ok()?
            .into_inner()
            .nodes;
        nodes
            .iter()
            .all(|n| {
                listed.iter().any(|s| {
                    s.endpoint
                        .as_ref()
                        .and_then(|e| e.spec.as_ref())
                        .map(|s| &s.id)
                        == Some(&n.id)
                        && s.probe_streak <= -2
                })
            })
            .then_some(())
    })
    .await;
}

async fn wait_held(metrics: SocketAddr, n: f64) {
    eventually(
        &format!("the guard holds {n} nodes"),
        Duration::from_secs(20),
        || async {
            (metric(metrics, "fulcrum_control_guard_held_nodes").await == Some(n)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_fails_open_when_its_probes_break_not_when_a_region_or_node_does() {
    let _serial = fulcrum_tests::exclusive().await;
    let etcd = Etcd::start().await;
    let (cp, metrics) = control_plane(&etcd).await;
    let mut admin_client = admin(cp.addr).await;

    // Region a: three nodes that register themselves and report their load (their own sign
    // of life). Region b: three nodes registered by an operator, which say nothing of
    // themselves (and no router calls them).
    let a = [node("a-0").await, node("a-1").await, node("a-2").await];
    let b = [node("b-0").await, node("b-1").await, node("b-2").await];
    let mut registrars = Vec::new();
    for n in &a {
        let config = RegisterConfig::new(
            vec![cp.addr.to_string()],
            spec(&n.id, n.relay.addr, "a", &["echo"], 4),
        );
        registrars.push(Registrar::spawn(config, n.sim.controls()));
    }
    for r in &registrars {
        let mut states = r.watch();
        tokio::time::timeout(
            Duration::from_secs(20),
            states.wait_for(|s| matches!(s, RegistrationState::Registered { .. })),
        )
        .await
        .expect("registered within 20 s")
        .expect("registrar alive");
    }
    for n in &b {
        register(
            &mut admin_client,
            spec(&n.id, n.relay.addr, "b", &["echo"], 4),
        )
        .await;
    }
    let all: Vec<&Node> = a.iter().chain(&b).collect();
    let region_a: Vec<&Node> = a.iter().collect();
    let region_b: Vec<&Node> = b.iter().collect();
    wait_health(&cp, &all, HealthState::Healthy, "every node healthy").await;
    assert_eq!(
        metric(metrics, "fulcrum_control_guard_held_nodes").await,
        Some(0.0)
    );

    // 1. The prober's path to every node breaks at once: the observer, not the fleet. The
    //    probes fail, the guard holds, and the table keeps every node routable.
    for n in &all {
        n.relay.cut();
    }
    wait_probes_failing(&cp, &all).await;
    wait_held(metrics, 6.0).await;
    wait_health(&cp, &all, HealthState::Healthy, "every node held healthy").await;
    assert_eq!(
        metric(metrics, "fulcrum_control_guard_trips_total").await,
        Some(1.0)
    );

    // The path comes back: nothing held, nothing changed.
    for n in &all {
        n.relay.restore();
    }
    wait_held(metrics, 0.0).await;
    wait_health(&cp, &all, HealthState::Healthy, "every node healthy again").await;

    // 2. Region b goes dark while region a is fine, and b's nodes show no life of their own:
    //    a data-center failure, published.
    for n in &b {
        n.relay.cut();
    }
    wait_health(&cp, &region_b, HealthState::Unhealthy, "region b unhealthy").await;
    wait_health(&cp, &region_a, HealthState::Healthy, "region a untouched").await;
    assert_eq!(
        metric(metrics, "fulcrum_control_guard_held_nodes").await,
        Some(0.0)
    );
    for n in &b {
        n.relay.restore();
    }
    wait_health(&cp, &all, HealthState::Healthy, "region b back").await;

    // 3. The prober's path to region a breaks while a's nodes keep their registrations and
    //    report their load: the observer's path, not the nodes; held.
    for n in &a {
        n.relay.cut();
    }
    wait_probes_failing(&cp, &region_a).await;
    wait_held(metrics, 3.0).await;
    wait_health(&cp, &all, HealthState::Healthy, "region a held healthy").await;
    for n in &a {
        n.relay.restore();
    }
    wait_held(metrics, 0.0).await;

    // 4. One node among healthy ones stops answering: unhealthy, as ever.
    b[1].relay.cut();
    wait_health(
        &cp,
        &[&b[1]],
        HealthState::Unhealthy,
        "the one dead node unhealthy",
    )
    .await;
    let others: Vec<&Node> = all.iter().copied().filter(|n| n.id != "b-1").collect();
    wait_health(&cp, &others, HealthState::Healthy, "the others healthy").await;
    assert_eq!(
        metric(metrics, "fulcrum_control_guard_held_nodes").await,
        Some(0.0)
    );
    // Both held episodes (1 and 3) counted.
    assert_eq!(
        metric(metrics, "fulcrum_control_guard_trips_total").await,
        Some(2.0)
    );

    for r in registrars {
        let _ = r.stop().await;
    }
    cp.stop().await;
}
