//! Control-plane replicas on a real etcd: one leader elected through etcd, its writes fenced;
//! leadership moves when the leader dies and routers keep receiving versions; an etcd outage
//! leaves routing untouched; the admin API wants its credential.

use std::time::Duration;

use fulcrum_control_plane::AdminAuth;
use fulcrum_control_plane::store::etcd::EtcdStore;
use fulcrum_control_plane::store::{Store, open};
use fulcrum_proto::fulcrum::v1::admin_client::AdminClient;
use fulcrum_proto::fulcrum::v1::{
    ControlStatus, DrainNodeRequest, GetStatusRequest, ListNodesRequest, RegisterNodeRequest,
};
use fulcrum_sim::node::{NodeSimConfig, spawn};
use fulcrum_tests::etcd::Etcd;
use fulcrum_tests::eventually;
use fulcrum_tests::infer::echo_request;
use fulcrum_tests::stack::{self, admin, oip, register, spec, wait_ready};
use tonic::Code;
use tonic::transport::Channel;

async fn status(admin: &AdminClient<Channel>) -> Option<ControlStatus> {
    Some(
        admin
            .clone()
            .get_status(GetStatusRequest {})
            .await
            .ok()?
            .into_inner(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_when_the_leader_dies_and_routers_follow() {
    let _serial = fulcrum_tests::exclusive().await;
    let etcd = Etcd::start().await;
    let cp1 = stack::control_plane(&etcd.url()).await;
    let cp2 = stack::control_plane(&etcd.url()).await;
    let (mut a1, a2) = (admin(cp1.addr).await, admin(cp2.addr).await);
    let node = spawn(NodeSimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    register(&mut a1, spec("n-1", node.addr, "a", &["echo"], 4)).await;
    let router = stack::router_following("a", &[cp1.addr, cp2.addr], None).await;
    wait_ready(router.addr).await;

    // Exactly one leader, and both replicas know who.
    let (s1, s2) = eventually("a leader is elected", Duration::from_secs(20), || async {
        let (s1, s2) = (status(&a1).await?, status(&a2).await?);
        (s1.leader != s2.leader && !s1.leader_id.is_empty() && s1.leader_id == s2.leader_id)
            .then_some((s1, s2))
    })
    .await;
    let leader_id = if s1.leader {
        s1.replica_id.clone()
    } else {
        s2.replica_id.clone()
    };
    assert_eq!(s1.leader_id, leader_id);

    // The leader dies (its task is dropped: no resignation, its lease must expire).
    let (survivor, survivor_addr, dead) = if s1.leader {
        (a2, cp2.addr, cp1)
    } else {
        (a1, cp1.addr, cp2)
    };
    drop(dead);
    let version_before = status(&survivor).await.unwrap().routing_version;
    eventually(
        "the survivor takes over",
        Duration::from_secs(20),
        || async {
            let s = status(&survivor).await?;
            (s.leader && s.leader_id == s.replica_id).then_some(())
        },
    )
    .await;

    // The new leader writes, and the router (moved to the survivor) applies it: draining the
    // only node makes the model unavailable at the router; undraining brings it back.
    let mut survivor_admin = admin(survivor_addr).await;
    survivor_admin
        .drain_node(DrainNodeRequest {
            id: "n-1".into(),
            drain: true,
        })
        .await
        .unwrap();
    let c = oip(router.addr).await;
    eventually(
        "the router applies the new leader's table",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move {
                let err = c.model_infer(echo_request("echo", &[1.0])).await.err()?;
                (err.code() == Code::Unavailable).then_some(())
            }
        },
    )
    .await;
    let s = status(&survivor).await.unwrap();
    assert!(
        s.routing_version > version_before,
        "no new version after the failover"
    );
    assert!(
        s.routers
            .iter()
            .any(|r| r.acked_version == s.routing_version),
        "the router did not acknowledge the new version: {s:?}"
    );
    survivor_admin
        .drain_node(DrainNodeRequest {
            id: "n-1".into(),
            drain: false,
        })
        .await
        .unwrap();
    eventually("calls succeed again", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            c.model_infer(echo_request("echo", &[1.0]))
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_write() {
    let etcd = Etcd::start().await;
    let endpoints = vec![format!("http://{}", etcd.client_addr)];
    let a = EtcdStore::connect(&endpoints).await.unwrap();
    let b = EtcdStore::connect(&endpoints).await.unwrap();
    let ttl = Duration::from_secs(2);
    let first = a.campaign("/test/election", "a", ttl).await.unwrap();
    assert!(
        a.put_fenced(&first.fence, "/test/k", b"a".to_vec())
            .await
            .unwrap()
            .is_some()
    );
    let stale_fence = first.fence.clone();
    // A stops keeping its lease alive (cut off, paused); once it expires, B is elected.
    drop(first);
    let second = tokio::time::timeout(
        Duration::from_secs(20),
        b.campaign("/test/election", "b", ttl),
    )
    .await
    .expect("B was not elected after A's lease expired")
    .unwrap();
    assert_eq!(
        b.leader("/test/election").await.unwrap().as_deref(),
        Some("b")
    );
    // A, deposed, tries to write with its old fence: refused, nothing changes.
    assert_eq!(
        a.put_fenced(&stale_fence, "/test/k", b"stale".to_vec())
            .await
            .unwrap(),
        None
    );
    assert_eq!(a.get("/test/k").await.unwrap().unwrap().value, b"a");
    assert!(
        b.put_fenced(&second.fence, "/test/k", b"b".to_vec())
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_leaves_routing_untouched() {
    let _serial = fulcrum_tests::exclusive().await;
    let mut etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut a = admin(cp.addr).await;
    let node = spawn(NodeSimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    register(&mut a, spec("n-1", node.addr, "a", &["echo"], 4)).await;
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    let mut c = oip(router.addr).await;
    let version = status(&a).await.unwrap().routing_version;

    etcd.stop();
    // The replica notices and says so; routing goes on.
    eventually(
        "the replica reports its table stale",
        Duration::from_secs(20),
        || async { status(&a).await?.stale.then_some(()) },
    )
    .await;
    for _ in 0..20 {
        c.model_infer(echo_request("echo", &[1.0]))
            .await
            .expect("a call failed during the etcd outage");
    }
    // Admin writes fail cleanly (UNAVAILABLE), nothing crashes.
    let err = a
        .register_node(RegisterNodeRequest {
            spec: Some(spec("n-2", node.addr, "a", &["echo"], 4)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    etcd.resume().await;
    eventually("the replica recovers", Duration::from_secs(30), || async {
        let s = status(&a).await?;
        (!s.stale && s.routing_version >= version).then_some(())
    })
    .await;
    // No operator state was lost, and the loop runs again: a drain takes effect.
    let nodes = a
        .list_nodes(ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nodes.nodes.len(), 1);
    a.drain_node(DrainNodeRequest {
        id: "n-1".into(),
        drain: true,
    })
    .await
    .unwrap();
    eventually(
        "the drain reaches the router",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move {
                let err = c.model_infer(echo_request("echo", &[1.0])).await.err()?;
                (err.code() == Code::Unavailable).then_some(())
            }
        },
    )
    .await;
    for _ in 0..5 {
        assert!(c.model_infer(echo_request("echo", &[1.0])).await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_credential() {
    let etcd = Etcd::start().await;
    let cp = stack::control_plane_with(&etcd.url(), AdminAuth::Token("s3cret".into())).await;
    let store = open(&etcd.url()).await.unwrap();
    let (before, _) = store.list("/fulcrum/v1/nodes/").await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", cp.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let register = |token: Option<&'static str>| {
        let channel = channel.clone();
        async move {
            let mut req = tonic::Request::new(RegisterNodeRequest {
                spec: Some(spec(
                    "n-1",
                    "127.0.0.1:9".parse().unwrap(),
                    "a",
                    &["echo"],
                    4,
                )),
            });
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            AdminClient::new(channel).register_node(req).await
        }
    };
    for token in [None, Some("wrong")] {
        let err = register(token).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
    }
    let (after, _) = store.list("/fulcrum/v1/nodes/").await.unwrap();
    assert_eq!(before, after, "an unauthenticated call changed the store");
    register(Some("s3cret"))
        .await
        .expect("the right token is accepted");
    let (after, _) = store.list("/fulcrum/v1/nodes/").await.unwrap();
    assert_eq!(after.len(), before.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_overrides_steer_routing_and_bad_ones_change_nothing() {
    let _serial = fulcrum_tests::exclusive().await;
    use fulcrum_proto::fulcrum::v1::{
        CordonNodeRequest, RegionStateRequest, WeightOverrideRequest,
    };
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut a = admin(cp.addr).await;
    let mut nodes = Vec::new();
    for (id, region) in [("a-1", "a"), ("a-2", "a"), ("b-1", "b")] {
        let n = spawn(
            NodeSimConfig {
                name: id.into(),
                ..Default::default()
            },
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        register(&mut a, spec(id, n.addr, region, &["echo"], 8)).await;
        nodes.push(n);
    }
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    let c = oip(router.addr).await;
    // Which nodes serve 30 calls in a row (None while any call fails).
    let served = || {
        let c = c.clone();
        async move {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..30 {
                let mut c = c.clone();
                let r = c.model_infer(echo_request("echo", &[1.0])).await.ok()?;
                seen.insert(fulcrum_tests::infer::served_by(r.metadata()).0);
            }
            Some(seen.into_iter().collect::<Vec<_>>())
        }
    };
    let until = |want: Vec<&'static str>, what: &'static str| {
        let served = &served;
        async move {
            eventually(what, Duration::from_secs(20), || async {
                (served().await? == want).then_some(())
            })
            .await
        }
    };
    until(vec!["a-1", "a-2"], "both local nodes serve").await;

    // Cordon: no new calls to a-1.
    a.cordon_node(CordonNodeRequest {
        id: "a-1".into(),
        cordon: true,
    })
    .await
    .unwrap();
    // Half of region a's capacity is left, so 30 % spills to region b (the overprovisioning rule).
    until(vec!["a-2", "b-1"], "cordoned a-1 gets nothing").await;
    a.cordon_node(CordonNodeRequest {
        id: "a-1".into(),
        cordon: false,
    })
    .await
    .unwrap();
    until(vec!["a-1", "a-2"], "uncordoned a-1 serves again").await;

    // Weight override zero: same effect; cleared: back.
    a.set_weight_override(WeightOverrideRequest {
        id: "a-2".into(),
        weight: Some(0.0),
    })
    .await
    .unwrap();
    until(vec!["a-1", "b-1"], "weight 0 keeps a-2 out").await;
    a.set_weight_override(WeightOverrideRequest {
        id: "a-2".into(),
        weight: None,
    })
    .await
    .unwrap();
    until(vec!["a-1", "a-2"], "cleared override").await;

    // Manual failover: evacuate region a, router a serves from b; restore.
    a.set_region_state(RegionStateRequest {
        region: "a".into(),
        evacuated: true,
    })
    .await
    .unwrap();
    until(vec!["b-1"], "region a evacuated").await;
    a.set_region_state(RegionStateRequest {
        region: "a".into(),
        evacuated: false,
    })
    .await
    .unwrap();
    until(vec!["a-1", "a-2"], "region a restored").await;

    // The routers' load reports reach the control plane.
    eventually("load reported", Duration::from_secs(20), || async {
        let mut a = admin(cp.addr).await;
        let _ = served().await;
        let n = a
            .list_nodes(ListNodesRequest::default())
            .await
            .ok()?
            .into_inner();
        n.nodes.iter().any(|n| n.calls_per_sec > 0.0).then_some(())
    })
    .await;

    // Bad overrides: precise statuses, nothing stored.
    let store = open(&etcd.url()).await.unwrap();
    let (before, _) = store.list("/fulcrum/v1/overrides/").await.unwrap();
    for (w, code) in [
        (-1.0, Code::InvalidArgument),
        (f64::NAN, Code::InvalidArgument),
        (2e6, Code::InvalidArgument),
    ] {
        let err = a
            .set_weight_override(WeightOverrideRequest {
                id: "a-1".into(),
                weight: Some(w),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "weight {w}: {err:?}");
    }
    let err = a
        .set_weight_override(WeightOverrideRequest {
            id: "ghost".into(),
            weight: Some(1.0),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = a
        .cordon_node(CordonNodeRequest {
            id: "ghost".into(),
            cordon: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = a
        .set_region_state(RegionStateRequest {
            region: "nowhere".into(),
            evacuated: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("nowhere"));
    let (after, _) = store.list("/fulcrum/v1/overrides/").await.unwrap();
    assert_eq!(before, after, "a refused override changed the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_under_load_fails_no_call() {
    let _serial = fulcrum_tests::exclusive().await;
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut a = admin(cp.addr).await;
    let mut nodes = Vec::new();
    for id in ["a-1", "a-2"] {
        let n = spawn(
            NodeSimConfig {
                name: id.into(),
                service_time: "const:20ms".parse().unwrap(),
                // Far more than the load needs even when this debug-built process is starved
                // of CPU: the test is about draining, not about concurrency limits.
                slots: 64,
                ..Default::default()
            },
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        register(&mut a, spec(id, n.addr, "a", &["echo"], 64)).await;
        nodes.push(n);
    }
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    let target = router.addr.to_string();
    let load = tokio::spawn(async move {
        fulcrum_sim::load::run(fulcrum_sim::load::LoadConfig {
            target,
            rps: 100.0,
            duration: Duration::from_secs(4),
            ..Default::default()
        })
        .await
        .unwrap()
    });
    let drained = nodes[0].controls();
    eventually("a-1 serves the load", Duration::from_secs(10), || {
        let n = drained.calls();
        async move { (n > 20).then_some(()) }
    })
    .await;
    a.drain_node(DrainNodeRequest {
        id: "a-1".into(),
        drain: true,
    })
    .await
    .unwrap();
    // Once the router has applied the drain, a-1 gets no new call; those in flight finish.
    eventually(
        "the router applied the drain",
        Duration::from_secs(20),
        || async {
            let s = status(&a).await?;
            let drained_version = s.routing_version;
            let node = a
                .clone()
                .get_node(fulcrum_proto::fulcrum::v1::GetNodeRequest { id: "a-1".into() })
                .await
                .ok()?
                .into_inner();
            (node.drained
                && node.endpoint?.weight == 0.0
                && s.routers.iter().all(|r| r.acked_version >= drained_version))
            .then_some(())
        },
    )
    .await;
    eventually(
        "a-1's calls in flight finish",
        Duration::from_secs(10),
        || {
            let n = drained.in_flight();
            async move { (n == 0).then_some(()) }
        },
    )
    .await;
    let after_drain = drained.calls();
    let report = load.await.unwrap();
    assert_eq!(
        report.sent, report.ok,
        "calls failed during the drain: {:?}",
        report.errors
    );
    assert!(report.nodes.get("a-2").copied().unwrap_or(0) > 0);
    assert_eq!(
        drained.calls(),
        after_drain,
        "the drained node got new calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routers_mean_in_flight_reaches_the_control_plane() {
    let _serial = fulcrum_tests::exclusive().await;
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut a = admin(cp.addr).await;
    // A node that answers its probes but holds every call far longer than the test.
    let node = spawn(
        NodeSimConfig {
            name: "slow".into(),
            service_time: "const:600s".parse().unwrap(),
            slots: 16,
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    register(&mut a, spec("slow", node.addr, "a", &["echo"], 16)).await;
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    let held: u32 = 3;
    let mut calls = Vec::new();
    for _ in 0..held {
        let mut client = oip(router.addr).await;
        calls.push(tokio::spawn(async move {
            client.model_infer(echo_request("echo", &[1.0])).await
        }));
    }
    let controls = node.controls();
    eventually("the calls are held", Duration::from_secs(10), || {
        let n = controls.in_flight();
        async move { (n == u64::from(held)).then_some(()) }
    })
    .await;
    // Held for whole report intervals, the mean is the count exactly.
    eventually(
        "the control plane sees 3 calls in flight on average",
        Duration::from_secs(20),
        || {
            let mut a = a.clone();
            async move {
                let n = a
                    .get_node(fulcrum_proto::fulcrum::v1::GetNodeRequest { id: "slow".into() })
                    .await
                    .ok()?
                    .into_inner();
                (n.mean_in_flight == f64::from(held) && n.in_flight == held).then_some(())
            }
        },
    )
    .await;
    for c in calls {
        c.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_repeated_leader_kills_router_versions_only_grow() {
    use fulcrum_data_plane::router::RouterState;
    use fulcrum_data_plane::subscriber::apply;
    use fulcrum_proto::fulcrum::v1::routing_client::RoutingClient;
    use fulcrum_proto::fulcrum::v1::{RouterHello, RouterMessage, router_message};
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    let _serial = fulcrum_tests::exclusive().await;
    let etcd = Etcd::start().await;
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|_| {
            format!("127.0.0.1:{}", fulcrum_tests::free_port())
                .parse()
                .unwrap()
        })
        .collect();
    let start = |addr: SocketAddr| {
        let url = etcd.url();
        async move { stack::control_plane_at(addr, &url, AdminAuth::Loopback(None)).await }
    };
    let mut replicas = Vec::new();
    for a in &addrs {
        replicas.push(Some(start(*a).await));
    }
    let node = spawn(NodeSimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut a0 = admin(addrs[0]).await;
    register(&mut a0, spec("n-1", node.addr, "a", &["echo"], 4)).await;

    // A checker that subscribes as a router would, moving between replicas, and applies every
    // update with the router's own rule; it records the version held after each one.
    let held: Arc<Mutex<Vec<u64>>> = Arc::default();
    let checker = {
        let held = held.clone();
        let addrs = addrs.clone();
        tokio::spawn(async move {
            let state = RouterState::new("a".into(), 1 << 20);
            for addr in addrs.iter().cycle() {
                let Ok(mut client) = RoutingClient::connect(format!("http://{addr}")).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let hello = RouterMessage {
                    message: Some(router_message::Message::Hello(RouterHello {
                        router_id: "checker".into(),
                        region: "a".into(),
                        known_version: state.table.load().version,
                        ..Default::default()
                    })),
                };
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tx.send(hello).await.unwrap();
                let Ok(resp) = client
                    .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                else {
                    continue;
                };
                let mut updates = resp.into_inner();
                while let Ok(Some(u)) = updates.message().await {
                    if u.heartbeat {
                        continue;
                    }
                    if let Ok(v) = apply(&u, &state) {
                        held.lock().unwrap().push(v);
                    }
                }
            }
        })
    };

    // Kill the leader three times (no resignation: its lease must expire), restarting it each
    // time, and change the table after each failover.
    for round in 0..3 {
        let leader = eventually("a leader", Duration::from_secs(20), || async {
            for (i, a) in addrs.iter().enumerate() {
                if replicas[i].is_none() {
                    continue;
                }
                let c = admin(*a).await;
                if status(&c).await?.leader {
                    return Some(i);
                }
            }
            None
        })
        .await;
        replicas[leader] = None;
        let survivor = (leader + 1) % addrs.len();
        let c = admin(addrs[survivor]).await;
        eventually("a new leader", Duration::from_secs(20), || async {
            let s = status(&c).await?;
            (!s.leader_id.is_empty() && s.leader_id != format!("control-{}", addrs[leader]))
                .then_some(())
        })
        .await;
        let mut c = admin(addrs[survivor]).await;
        let before = status(&c).await.unwrap().routing_version;
        c.drain_node(DrainNodeRequest {
            id: "n-1".into(),
            drain: round % 2 == 0,
        })
        .await
        .unwrap();
        // The drain reaches the table when the new leader's next pass writes it: wait for that
        // version, so that every round gives the checker a new one to follow.
        let want = eventually("the drain is in the table", Duration::from_secs(20), || {
            let c = c.clone();
            async move {
                let v = status(&c).await?.routing_version;
                (v > before).then_some(v)
            }
        })
        .await;
        eventually(
            "the checker follows the new leader",
            Duration::from_secs(20),
            || {
                let held = held.clone();
                async move {
                    let last = held.lock().unwrap().last().copied()?;
                    (last >= want).then_some(())
                }
            },
        )
        .await;
        replicas[leader] = Some(start(addrs[leader]).await);
    }
    checker.abort();
    let held = held.lock().unwrap().clone();
    assert!(held.len() >= 4, "the checker saw too little: {held:?}");
    assert!(
        held.windows(2).all(|w| w[0] <= w[1]),
        "a router's version went backwards: {held:?}"
    );
    let distinct: std::collections::BTreeSet<_> = held.iter().collect();
    assert!(
        distinct.len() >= 4,
        "versions did not advance across failovers: {held:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_routing_changes() {
    use fulcrum_proto::fulcrum::v1::{CordonNodeRequest, HealthState, WatchRequest};
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut a = admin(cp.addr).await;
    let node = spawn(NodeSimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    register(&mut a, spec("n-1", node.addr, "a", &["echo"], 4)).await;
    let mut events = a.watch(WatchRequest {}).await.unwrap().into_inner();
    async fn next_about(
        events: &mut tonic::Streaming<fulcrum_proto::fulcrum::v1::WatchEvent>,
        want: HealthState,
    ) -> fulcrum_proto::fulcrum::v1::WatchEvent {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let e = events.message().await.unwrap().expect("watch ended");
                if e.node_id == "n-1" && e.health() == want {
                    return e;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no event for n-1 becoming {want:?}"))
    }
    next_about(&mut events, HealthState::Healthy).await;
    a.cordon_node(CordonNodeRequest {
        id: "n-1".into(),
        cordon: true,
    })
    .await
    .unwrap();
    let e = next_about(&mut events, HealthState::Cordoned).await;
    assert!(
        e.description.contains("n-1") && e.description.contains("cordoned"),
        "{}",
        e.description
    );
    assert_eq!(e.weight, 0.0);
}
