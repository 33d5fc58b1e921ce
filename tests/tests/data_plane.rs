//! The data plane under load, end to end on a real etcd with node-sims: failover without failed
//! calls, the spill-over rule, slow and hanging nodes, deadlines, concurrency limits, streams
//! and pass-through.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::admin_client::AdminClient;
use fulcrum_proto::fulcrum::v1::node_sim_control_client::NodeSimControlClient;
use fulcrum_proto::fulcrum::v1::{HealthState, ModelPolicy, SimConfig};
use fulcrum_sim::load::{self, LoadConfig, LoadReport};
use fulcrum_sim::node::{NodeSimConfig, RunningNodeSim, ServiceTime, spawn};
use fulcrum_tests::etcd::Etcd;
use fulcrum_tests::eventually;
use fulcrum_tests::infer::{echo_request, served_by};
use fulcrum_tests::stack::{self, Running, admin, oip, register, spec, wait_ready};
use tonic::Code;
use tonic::transport::Channel;

struct Stack {
    _etcd: Etcd,
    _cp: Running,
    admin: AdminClient<Channel>,
    router: Running,
}

async fn node(name: &str, service_time: &str, slots: usize) -> RunningNodeSim {
    let config = NodeSimConfig {
        name: name.into(),
        service_time: service_time.parse::<ServiceTime>().unwrap(),
        slots,
        ..Default::default()
    };
    spawn(config, "127.0.0.1:0".parse().unwrap()).await.unwrap()
}

/// etcd, a control plane, the given nodes registered as (id, region, capacity), and a router
/// for region `a`, ready.
async fn stack(nodes: &[(&str, &RunningNodeSim, &str, i64)]) -> Stack {
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut admin = admin(cp.addr).await;
    for (id, n, region, cap) in nodes {
        register(&mut admin, spec(id, n.addr, region, &["echo"], *cap)).await;
    }
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    Stack {
        _etcd: etcd,
        _cp: cp,
        admin,
        router,
    }
}

async fn run_load(target: SocketAddr, rps: f64, secs: f64) -> LoadReport {
    load::run(LoadConfig {
        target: target.to_string(),
        rps,
        duration: Duration::from_secs_f64(secs),
        ..Default::default()
    })
    .await
    .expect("load run")
}

fn share(counts: &BTreeMap<String, u64>, key: &str) -> f64 {
    let total: u64 = counts.values().sum();
    counts.get(key).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

/// Waits until the control plane says `id` is in state `want` and every router has applied
/// that table.
async fn wait_health(admin: &AdminClient<Channel>, id: &str, want: HealthState) {
    stack::wait_applied(admin, id, |n| {
        n.endpoint.as_ref().is_some_and(|e| e.health() == want)
    })
    .await;
}

/// Waits until every node in the table is routable at the router (all answered a call).
async fn warm(router: SocketAddr, nodes: usize) {
    let c = oip(router).await;
    eventually("every node serves", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..(nodes * 20) {
                let r = c.model_infer(echo_request("echo", &[1.0])).await.ok()?;
                seen.insert(served_by(r.metadata()).0);
            }
            (seen.len() == nodes).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_every_local_node_mid_load_fails_no_call() {
    let _serial = fulcrum_tests::exclusive().await;
    // Capacity far above what 200 calls/s need even when this debug-built process is starved
    // of CPU on a busy machine (calls then take tens of milliseconds): this test is about
    // failing over, not about concurrency limits (`full_nodes_shed_with_resource_exhausted`).
    let (a1, a2) = (
        node("a-1", "const:2ms", 64).await,
        node("a-2", "const:2ms", 64).await,
    );
    let (b1, b2) = (
        node("b-1", "const:2ms", 64).await,
        node("b-2", "const:2ms", 64).await,
    );
    let s = stack(&[
        ("a-1", &a1, "a", 64),
        ("a-2", &a2, "a", 64),
        ("b-1", &b1, "b", 64),
        ("b-2", &b2, "b", 64),
    ])
    .await;
    let target = s.router.addr;
    let load = tokio::spawn(async move { run_load(target, 200.0, 4.0).await });
    // Once region a is visibly serving the load, kill it.
    let (c1, c2) = (a1.controls(), a2.controls());
    eventually("region a serves the load", Duration::from_secs(10), || {
        let served = c1.calls() + c2.calls();
        async move { (served > 100).then_some(()) }
    })
    .await;
    a1.stop().await;
    a2.stop().await;
    let report = load.await.unwrap();
    assert_eq!(report.sent, report.ok, "failed calls: {report}");
    assert_eq!(report.error_count(), 0);
    assert!(
        share(&report.regions, "a") > 0.0 && share(&report.regions, "b") > 0.0,
        "{:?}",
        report.regions
    );
    drop((b1, b2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_half_the_local_capacity_spills_by_the_overprovisioning_rule() {
    let _serial = fulcrum_tests::exclusive().await;
    // Capacity well above what the load needs: this test is about shares, not limits.
    let mut nodes = Vec::new();
    for id in ["a-1", "a-2", "b-1", "b-2"] {
        nodes.push(node(id, "const:1ms", 64).await);
    }
    let s = stack(&[
        ("a-1", &nodes[0], "a", 64),
        ("a-2", &nodes[1], "a", 64),
        ("b-1", &nodes[2], "b", 64),
        ("b-2", &nodes[3], "b", 64),
    ])
    .await;
    warm(s.router.addr, 2).await;
    // A router that saw region a come up ramps its share up over two seconds; then all of it
    // stays local while region a is whole.
    let all_local = || async {
        eventually(
            "all calls local while region a is whole",
            Duration::from_secs(20),
            || {
                let target = s.router.addr;
                async move {
                    let r = run_load(target, 100.0, 0.5).await;
                    (share(&r.regions, "a") == 1.0).then_some(())
                }
            },
        )
        .await
    };
    all_local().await;

    nodes[0].controls().set_healthy(false).await;
    wait_health(&s.admin, "a-1", HealthState::Unhealthy).await;
    // Half of region a's capacity is left: 1.4 × 0.5 = 70 % stays local, 30 % spills to b.
    let r = run_load(s.router.addr, 150.0, 6.0).await;
    assert_eq!(r.sent, r.ok, "{:?}", r.errors);
    let spilled = share(&r.regions, "b");
    // 900 calls: four standard deviations of a 30 % binomial share is ±6.1 points.
    assert!(
        (spilled - 0.30).abs() < 0.065,
        "spilled {spilled:.3}, expected 0.30"
    );
    assert_eq!(share(&r.nodes, "a-1"), 0.0, "the unhealthy node got calls");

    // It comes back: the local share climbs back to everything.
    nodes[0].controls().set_healthy(true).await;
    wait_health(&s.admin, "a-1", HealthState::Healthy).await;
    all_local().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_node_loses_its_share() {
    let _serial = fulcrum_tests::exclusive().await;
    // Service times long next to the router's own overhead (tests run unoptimised), and a rate
    // that keeps the fast node far from its limit.
    let slow = node("a-1", "const:60ms", 16).await;
    let fast = node("a-2", "const:20ms", 16).await;
    let s = stack(&[("a-1", &slow, "a", 16), ("a-2", &fast, "a", 16)]).await;
    warm(s.router.addr, 2).await;
    let r = run_load(s.router.addr, 60.0, 4.0).await;
    assert_eq!(r.sent, r.ok, "{:?}", r.errors);
    // Three times slower: from half the calls (what round robin would give it) to far fewer.
    let slow_share = share(&r.nodes, "a-1");
    assert!(
        slow_share < 0.25,
        "the slow node still got {slow_share:.3} of the calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_node_is_ejected_and_calls_still_succeed() {
    let _serial = fulcrum_tests::exclusive().await;
    let hang = node("a-1", "const:1ms", 8).await;
    let good = node("a-2", "const:1ms", 8).await;
    let mut s = stack(&[("a-1", &hang, "a", 8), ("a-2", &good, "a", 8)]).await;
    s.admin
        .set_model_policy(ModelPolicy {
            model: "echo".into(),
            per_try_timeout_ms: 200,
            ..Default::default()
        })
        .await
        .unwrap();
    warm(s.router.addr, 2).await;
    // Let the router receive the policy (a new table version) before the node hangs.
    let mut c = oip(s.router.addr).await;
    eventually("policy applied", Duration::from_secs(10), || {
        let mut a = s.admin.clone();
        async move {
            let nodes = a
                .list_nodes(fulcrum_proto::fulcrum::v1::ListNodesRequest::default())
                .await
                .ok()?
                .into_inner();
            (nodes.routing_version > 0).then_some(())
        }
    })
    .await;
    hang.controls().set_hang_ratio(1.0).await.unwrap();
    let before = hang.controls().calls();
    let r = run_load(s.router.addr, 50.0, 4.0).await;
    assert_eq!(r.sent, r.ok, "calls failed: {:?}", r.errors);
    let reached = hang.controls().calls() - before;
    // Ejection after 5 consecutive timeouts: a handful of calls reach the hung node, then none.
    assert!(reached <= 20, "{reached} calls reached the hung node");
    // Every call that reached the hung node was answered by a second attempt, and the router
    // says so (`x-fulcrum-attempts`).
    assert!(reached > 0, "no call reached the hung node");
    assert_eq!(r.retried, reached, "{r}");
    let after = c.model_infer(echo_request("echo", &[1.0])).await.unwrap();
    assert_eq!(served_by(after.metadata()).0, "a-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_propagate_and_cancel_the_node_call() {
    let _serial = fulcrum_tests::exclusive().await;
    let slow = node("a-1", "const:2s", 8).await;
    let mut s = stack(&[("a-1", &slow, "a", 8)]).await;
    let mut c = oip(s.router.addr).await;
    let controls = slow.controls();
    let cancelled = || {
        let controls = controls.clone();
        async move {
            eventually(
                "the node's call is cancelled",
                Duration::from_secs(1),
                || {
                    let n = controls.in_flight();
                    async move { (n == 0).then_some(()) }
                },
            )
            .await
        }
    };

    // The caller's deadline: the call ends at it (tonic's client enforces it too, and may
    // answer CANCELLED first), and the node's call is cancelled with it.
    let mut req = tonic::Request::new(echo_request("echo", &[1.0]));
    req.set_timeout(Duration::from_millis(300));
    let started = tokio::time::Instant::now();
    let err = c.model_infer(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the call waited for the node"
    );
    cancelled().await;

    // The model's default deadline, for callers that send none: the router answers
    // DEADLINE_EXCEEDED itself.
    s.admin
        .set_model_policy(ModelPolicy {
            model: "echo".into(),
            timeout_ms: 300,
            max_attempts: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = eventually(
        "the policy's deadline applies",
        Duration::from_secs(10),
        || {
            let mut c = c.clone();
            async move {
                let started = tokio::time::Instant::now();
                let err = c.model_infer(echo_request("echo", &[1.0])).await.err()?;
                (started.elapsed() < Duration::from_secs(1)).then_some(err)
            }
        },
    )
    .await;
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("a-1"),
        "names the node: {}",
        err.message()
    );
    cancelled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_nodes_shed_with_resource_exhausted() {
    let _serial = fulcrum_tests::exclusive().await;
    // Capacity 2, so a limit of 3 at the router; the node itself has 2 slots and room for one
    // more call in its queue: if the router let a fourth call through, the node would answer
    // "overloaded".
    let n = spawn(
        NodeSimConfig {
            name: "a-1".into(),
            service_time: "const:300ms".parse().unwrap(),
            slots: 2,
            queue: 1,
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let s = stack(&[("a-1", &n, "a", 2)]).await;
    let c = oip(s.router.addr).await;
    let calls = (0..400).map(|_| {
        let mut c = c.clone();
        tokio::spawn(async move { c.model_infer(echo_request("echo", &[1.0])).await })
    });
    let results = futures::future::join_all(calls).await;
    let mut ok = 0;
    let mut shed = 0;
    for r in results {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(
                    e.message().contains("concurrency limit"),
                    "the node, not the router, refused: {}",
                    e.message()
                );
                shed += 1;
            }
        }
    }
    assert!(ok >= 2 && shed > 0, "ok {ok}, shed {shed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_pass_through_fail_over_for_new_calls() {
    let _serial = fulcrum_tests::exclusive().await;
    let a1 = node("a-1", "const:1ms", 8).await;
    let b1 = node("b-1", "const:1ms", 8).await;
    let s = stack(&[("a-1", &a1, "a", 8), ("b-1", &b1, "b", 8)]).await;
    let c = oip(s.router.addr).await;

    let stream_region = |mut c: fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<Channel>| async move {
        let resp = c
            .model_stream_infer(tokio_stream::iter(vec![echo_request("echo", &[1.0])]))
            .await
            .ok()?;
        let region = served_by(resp.metadata()).1;
        let mut inner = resp.into_inner();
        let first = inner.message().await.ok()??;
        first.error_message.is_empty().then_some(region)
    };
    // Pass-through: the node-sim's own control API, which the router does not serve, reached
    // through the router by naming the model.
    let passthrough = |addr: SocketAddr| async move {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = NodeSimControlClient::new(channel);
        let mut req = tonic::Request::new(SimConfig::default());
        req.metadata_mut()
            .insert("x-fulcrum-model", "echo".parse().ok()?);
        let resp = client.configure(req).await.ok()?;
        Some(served_by(resp.metadata()).1)
    };
    assert_eq!(stream_region(c.clone()).await.as_deref(), Some("a"));
    assert_eq!(passthrough(s.router.addr).await.as_deref(), Some("a"));

    // Without the header, a service the router does not serve is UNIMPLEMENTED, and says how.
    let channel = Channel::from_shared(format!("http://{}", s.router.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = NodeSimControlClient::new(channel)
        .configure(SimConfig::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(
        err.message().contains("x-fulcrum-model"),
        "{}",
        err.message()
    );

    a1.stop().await;
    eventually(
        "new streams go to region b",
        Duration::from_secs(20),
        || {
            let c = c.clone();
            async move { (stream_region(c).await? == "b").then_some(()) }
        },
    )
    .await;
    eventually(
        "pass-through goes to region b",
        Duration::from_secs(20),
        || async { (passthrough(s.router.addr).await? == "b").then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_calls_are_answered_by_the_fast_node() {
    let _serial = fulcrum_tests::exclusive().await;
    let slow = node("a-1", "const:2s", 8).await;
    let fast = node("a-2", "const:1ms", 8).await;
    let mut s = stack(&[("a-1", &slow, "a", 8), ("a-2", &fast, "a", 8)]).await;
    warm(s.router.addr, 2).await;
    // Round robin sends every other first attempt to the slow node; the hedge after 50 ms goes
    // to the other one and wins.
    s.admin
        .set_model_policy(ModelPolicy {
            model: "echo".into(),
            balancer: fulcrum_proto::fulcrum::v1::Balancer::RoundRobin as i32,
            hedge_after_ms: 50,
            ..Default::default()
        })
        .await
        .unwrap();
    let c = oip(s.router.addr).await;
    let slow_calls = slow.controls();
    let before = slow_calls.calls();
    eventually(
        "hedged calls answered by a-2",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            let slow_calls = slow_calls.clone();
            async move {
                for _ in 0..10 {
                    let r = c.model_infer(echo_request("echo", &[1.0])).await.ok()?;
                    if served_by(r.metadata()).0 != "a-2" {
                        return None;
                    }
                }
                // The slow node was asked too (first attempts), and lost every race.
                (slow_calls.calls() > before).then_some(())
            }
        },
    )
    .await;
    // The losing attempts were cancelled, not left running on the slow node.
    let controls = slow.controls();
    eventually("losing attempts cancelled", Duration::from_secs(1), || {
        let n = controls.in_flight();
        async move { (n == 0).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hashing_keeps_a_key_on_one_node() {
    let _serial = fulcrum_tests::exclusive().await;
    let mut nodes = Vec::new();
    for id in ["a-1", "a-2", "a-3"] {
        nodes.push(node(id, "const:1ms", 8).await);
    }
    let mut s = stack(&[
        ("a-1", &nodes[0], "a", 8),
        ("a-2", &nodes[1], "a", 8),
        ("a-3", &nodes[2], "a", 8),
    ])
    .await;
    warm(s.router.addr, 3).await;
    s.admin
        .set_model_policy(ModelPolicy {
            model: "echo".into(),
            balancer: fulcrum_proto::fulcrum::v1::Balancer::ConsistentHash as i32,
            hash_header: "x-session".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let c = oip(s.router.addr).await;
    let node_for = |key: String| {
        let mut c = c.clone();
        async move {
            let mut req = tonic::Request::new(echo_request("echo", &[1.0]));
            req.metadata_mut().insert("x-session", key.parse().unwrap());
            let r = c.model_infer(req).await.ok()?;
            Some(served_by(r.metadata()).0)
        }
    };
    // Once the policy is applied, each key sticks to one node, and keys spread over nodes.
    eventually("keys stick to nodes", Duration::from_secs(20), || async {
        let mut owners = std::collections::HashSet::new();
        for k in 0..12 {
            let key = format!("session-{k}");
            let first = node_for(key.clone()).await?;
            for _ in 0..4 {
                if node_for(key.clone()).await? != first {
                    return None;
                }
            }
            owners.insert(first);
        }
        (owners.len() >= 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_router_finishes_the_calls_in_flight() {
    let _serial = fulcrum_tests::exclusive().await;
    let n = node("a-1", "const:500ms", 8).await;
    let s = stack(&[("a-1", &n, "a", 8)]).await;
    let addr = s.router.addr;
    let mut c = oip(addr).await;
    let call = tokio::spawn(async move { c.model_infer(echo_request("echo", &[3.0])).await });
    let controls = n.controls();
    eventually("the call reached the node", Duration::from_secs(5), || {
        let k = controls.in_flight();
        async move { (k == 1).then_some(()) }
    })
    .await;
    let Stack { router, .. } = s;
    let stopping = tokio::spawn(router.stop());
    let answer = call.await.unwrap();
    assert!(answer.is_ok(), "the call in flight was cut: {answer:?}");
    stopping.await.unwrap();
    // And it no longer accepts calls.
    assert!(
        fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::connect(format!("http://{addr}"))
            .await
            .is_err(),
        "the stopped router still accepts connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_polling_router_serves_calls_and_stops() {
    let _serial = fulcrum_tests::exclusive().await;
    let (n1, n2) = (
        node("a-1", "const:0ms", 64).await,
        node("a-2", "const:0ms", 64).await,
    );
    let etcd = Etcd::start().await;
    let cp = stack::control_plane(&etcd.url()).await;
    let mut admin = admin(cp.addr).await;
    register(&mut admin, spec("a-1", n1.addr, "a", &["echo"], 64)).await;
    register(&mut admin, spec("a-2", n2.addr, "a", &["echo"], 64)).await;
    let router = stack::router_configured("a", &[cp.addr], |c| {
        c.busy_poll = Duration::from_micros(200);
        c.threads = 2;
    })
    .await;
    wait_ready(router.addr).await;
    warm(router.addr, 2).await;
    // Calls on several connections, so both serving threads poll; every one answered right.
    let report = run_load(router.addr, 300.0, 2.0).await;
    assert_eq!(report.ok, report.sent, "failed calls: {:?}", report.errors);
    assert!(report.sent >= 500, "only {} calls sent", report.sent);
    assert_eq!(report.nodes.len(), 2, "served by {:?}", report.nodes);
    // The pollers must not keep the router from stopping (a deadline, not a timing goal).
    tokio::time::timeout(Duration::from_secs(20), router.stop())
        .await
        .expect("the busy-polling router did not stop");
}
