//! `fulcrum-bench-cp`: the driver of the control-plane scale benchmark (`bench/cp_scale.py`).
//!
//! Against one running control-plane replica and its etcd, it:
//! 1. serves every node's health probes from a few minimal servers in this process
//!    ([`probe_target`]), and
//!    registers `--nodes` nodes spread over them straight into etcd (as `ctl register` stores
//!    them, without a call per node to the admin API);
//! 2. follows the routing table on one observer stream until every node is routed;
//! 3. opens `--routers` `Subscribe` streams, each on its own connection, in waves; each one ACKs
//!    every version it receives and reports load on a fixed set of nodes every 500 ms, as a
//!    router does, but keeps no table (a thousand 10,000-node tables would not fit here);
//! 4. measures a steady-state window: etcd revisions per second (each write or transaction is
//!    one revision), the control plane's CPU (from `/proc/PID/stat`) and memory
//!    (`/proc/PID/status`);
//! 5. changes one node's weight `--changes` times through the admin API (what `ctl weight`
//!    does) and measures, for each change, the time from the call to each router's ACK of the
//!    first version carrying the new weight.
//!
//! Results are printed as JSON on stdout (and written to `--out`). Every loop is bounded in
//! count and time.

#![warn(missing_docs)]

mod probe_target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use fulcrum_control_plane::registry;
use fulcrum_control_plane::store::Store;
use fulcrum_control_plane::store::etcd::EtcdStore;
use fulcrum_proto::fulcrum::v1::admin_client::AdminClient;
use fulcrum_proto::fulcrum::v1::routing_client::RoutingClient;
use fulcrum_proto::fulcrum::v1::{
    Ack, LoadReport, Model, NodeLoad, NodeSpec, RouterHello, RouterMessage, RoutingUpdate,
    WeightOverrideRequest, router_message,
};
use futures::StreamExt;
use hdrhistogram::Histogram;
use prost::Message;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Flags.
#[derive(Debug, Parser)]
#[command(about = "Control-plane scale benchmark driver (see bench/cp_scale.py)")]
struct Args {
    /// The control plane's address.
    #[arg(long)]
    control: SocketAddr,
    /// etcd's client address (host:port).
    #[arg(long)]
    etcd: String,
    /// The control plane's process id (its CPU and memory are read from /proc).
    #[arg(long)]
    control_pid: u32,
    /// etcd's process id, if known: its CPU is reported too (it shares the machine).
    #[arg(long)]
    etcd_pid: Option<u32>,
    /// Registered nodes.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Subscribed routers.
    #[arg(long, default_value_t = 1_000)]
    routers: usize,
    /// Simulated servers answering the probes (the nodes are spread over them).
    #[arg(long, default_value_t = 16)]
    sims: usize,
    /// Routers connecting at once; the next wave waits until these hold their first table.
    #[arg(long, default_value_t = 50)]
    wave: usize,
    /// Nodes each router reports load for.
    #[arg(long, default_value_t = 10)]
    load_nodes: usize,
    /// Seconds the system settles before the steady-state window.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// Length of the steady-state window, in seconds.
    #[arg(long, default_value_t = 30)]
    steady_secs: u64,
    /// Weight changes measured.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Pause between two weight changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pause_ms: u64,
    /// Deadline for every router to ACK one change, in seconds.
    #[arg(long, default_value_t = 10)]
    change_timeout_secs: u64,
    /// Deadline for the whole fleet to be routed after registration, in seconds.
    #[arg(long, default_value_t = 600)]
    setup_timeout_secs: u64,
    /// Where to write the JSON result.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The change the routers are looking for.
#[derive(Debug, Clone)]
struct Target {
    round: usize,
    node: String,
    old_weight: f64,
    started: Instant,
}

/// What the router tasks share with the driver.
#[derive(Debug, Default)]
struct Shared {
    target: Mutex<Option<Target>>,
    /// (round, time from the admin call to the router's ACK).
    samples: Mutex<Vec<(usize, Duration)>>,
    /// Versions received by all routers (not heartbeats).
    updates: AtomicU64,
    /// Of those, snapshots.
    snapshots: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn node_id(i: usize) -> String {
    format!("bench-n{i:05}")
}

fn msg(m: router_message::Message) -> RouterMessage {
    RouterMessage { message: Some(m) }
}

/// Largest routing update accepted: a 10,000-node snapshot is a few megabytes.
const MAX_MESSAGE: usize = 256 << 20;

async fn connect(control: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{control}"))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?)
}

/// The observer: one stream that keeps the whole table (node id → weight).
type Table = Arc<Mutex<std::collections::HashMap<String, f64>>>;

async fn observe(control: SocketAddr, table: Table, version: Arc<AtomicU64>) -> anyhow::Result<()> {
    let mut client =
        RoutingClient::new(connect(control).await?).max_decoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::channel(16);
    tx.send(msg(router_message::Message::Hello(RouterHello {
        router_id: "bench-observer".into(),
        region: "a".into(),
        known_version: 0,
        ..Default::default()
    })))
    .await?;
    let mut updates = client
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(u) = updates.message().await? {
        if u.heartbeat {
            continue;
        }
        {
            let mut t = lock(&table);
            if u.snapshot {
                t.clear();
            }
            for id in &u.removed {
                t.remove(id);
            }
            for e in &u.endpoints {
                if let Some(s) = &e.spec {
                    t.insert(s.id.clone(), e.weight);
                }
            }
        }
        version.store(u.version, Ordering::Relaxed);
        tx.send(msg(router_message::Message::Ack(Ack {
            version: u.version,
        })))
        .await?;
    }
    bail!("the observer's stream ended")
}

/// Whether `u` carries the change `t` is looking for.
fn carries(u: &RoutingUpdate, t: &Target) -> bool {
    u.endpoints
        .iter()
        .any(|e| e.spec.as_ref().is_some_and(|s| s.id == t.node) && e.weight != t.old_weight)
}

/// A gRPC message as sent on a stream: the five-byte prefix (not compressed, length), then the
/// message.
fn grpc_frame(m: &RouterMessage) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + m.encoded_len());
    b.put_u8(0);
    b.put_u32(u32::try_from(m.encoded_len()).unwrap_or(u32::MAX));
    // Infallible: the buffer has room for the whole message.
    let _ = m.encode(&mut b);
    b.freeze()
}

/// The streams' and the connection's receive windows: hyper's client defaults, as tonic's
/// `Channel` (which the routers use) has them.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// One simulated router: one connection and one `Subscribe` stream, driven from this one task
/// with the `h2` crate. Why not tonic's client, as the real router uses: a thousand of them
/// share this process and two cores with the control plane, and through a `Channel` each
/// version cost four task wake-ups per router here (connection, decoder, outbound channel,
/// request-body pipe) where a real router, on a machine of its own, spends them in parallel
/// with the others. This keeps a router's work per version to what it must do — read the
/// frame, decode the update, write the ACK — so the figure is mostly the control plane's.
async fn router(
    i: usize,
    control: SocketAddr,
    shared: Arc<Shared>,
    load_ids: Vec<String>,
    first: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(control))
        .await
        .context("connect timed out")??;
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(tcp)
        .await?;
    let mut connection = std::pin::pin!(connection);
    let request = http::Request::post(format!("http://{control}/fulcrum.v1.Routing/Subscribe"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())?;
    let mut send = send.ready().await?;
    let (response, mut out) = send.send_request(request, false)?;
    out.send_data(
        grpc_frame(&msg(router_message::Message::Hello(RouterHello {
            router_id: format!("bench-r{i:04}"),
            region: "a".into(),
            known_version: 0,
            ..Default::default()
        }))),
        false,
    )?;
    let response = tokio::select! {
        r = response => r?,
        r = &mut connection => bail!("router {i}: connection ended before the answer: {r:?}"),
    };
    if let Some(status) = response.headers().get("grpc-status") {
        bail!("router {i}: Subscribe refused (grpc-status {status:?})");
    }
    let mut body = response.into_body();
    let mut pending = BytesMut::new();
    let mut first = Some(first);
    let mut seen_round = usize::MAX;
    // Routers report every 500 ms.
    let mut report = tokio::time::interval(Duration::from_millis(500));
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A steady load: one call in flight and ten calls a second on each of its nodes, 10 ms each.
    let load = grpc_frame(&msg(router_message::Message::Load(LoadReport {
        nodes: load_ids
            .iter()
            .map(|id| NodeLoad {
                node_id: id.clone(),
                in_flight: 1,
                calls: 5,
                errors: 0,
                latency_ewma_ms: 10.0,
                ejected: false,
                mean_in_flight: Some(1.0),
            })
            .collect(),
        at_unix_ms: 0,
        self_reports: vec![],
    })));
    // Made once: a new `changed()` each turn registered and unregistered this task with the
    // channel shared by all the routers, under its lock, for every version.
    let stopping = stop.changed();
    tokio::pin!(stopping);
    loop {
        let chunk = tokio::select! {
            _ = &mut stopping => return Ok(()),
            r = &mut connection => bail!("router {i}: connection ended: {r:?}"),
            _ = report.tick() => {
                // Queued in h2's send buffer: the control plane reads reports as they come.
                out.send_data(load.clone(), false)?;
                continue;
            }
            chunk = body.data() => chunk,
        };
        let Some(chunk) = chunk else {
            bail!("router {i}: stream ended")
        };
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        pending.extend_from_slice(&chunk);
        while pending.len() >= 5 {
            let len = u32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]) as usize;
            if len > MAX_MESSAGE {
                bail!("router {i}: a {len} byte update");
            }
            if pending.len() < 5 + len {
                break;
            }
            let frame = pending.split_to(5 + len);
            let u = RoutingUpdate::decode(&frame[5..])?;
            if u.heartbeat {
                continue;
            }
            shared.updates.fetch_add(1, Ordering::Relaxed);
            if u.snapshot {
                shared.snapshots.fetch_add(1, Ordering::Relaxed);
            }
            let target = lock(&shared.target).clone();
            out.send_data(
                grpc_frame(&msg(router_message::Message::Ack(Ack {
                    version: u.version,
                }))),
                false,
            )?;
            if let Some(t) = target
                && t.round != seen_round
                && carries(&u, &t)
            {
                seen_round = t.round;
                lock(&shared.samples).push((t.round, t.started.elapsed()));
            }
            if let Some(f) = first.take() {
                let _ = f.send(());
            }
        }
    }
}

/// CPU time (user + system) of a process, from /proc (clock ticks of 10 ms).
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

/// A memory figure of a process in bytes (`VmRSS`, `VmHWM`) from /proc.
fn memory(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed memory line")?
        .parse()?;
    Ok(kib * 1024)
}

/// The store's current revision. Tried three times: a read that times out on a busy machine
/// must not lose a run's measurements.
async fn revision(store: &EtcdStore) -> anyhow::Result<i64> {
    let mut tries = 0;
    loop {
        match store.list("/fulcrum-bench/none/").await {
            Ok((_, rev)) => return Ok(rev),
            Err(e) if tries < 2 => {
                tries += 1;
                eprintln!("reading etcd's revision: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// CPU time of the whole machine (/proc/stat's first line: user, nice, system, irq, softirq,
/// steal; not idle nor iowait), for the share the other processes took.
fn machine_busy() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Ok(Duration::from_millis(busy * 10))
}

/// CPU share, RSS and etcd revisions over a window; the driver's own CPU, etcd's and the
/// whole machine's beside the control plane's, to tell whose cores the control plane shared.
struct Window {
    cpu: Duration,
    driver_cpu: Duration,
    etcd_cpu: Option<Duration>,
    machine: Duration,
    rev: i64,
    at: Instant,
}

impl Window {
    async fn start(pid: u32, etcd_pid: Option<u32>, store: &EtcdStore) -> anyhow::Result<Self> {
        Ok(Self {
            cpu: cpu_time(pid)?,
            driver_cpu: cpu_time(std::process::id())?,
            etcd_cpu: etcd_pid.map(cpu_time).transpose()?,
            machine: machine_busy()?,
            rev: revision(store).await?,
            at: Instant::now(),
        })
    }

    async fn end(
        self,
        pid: u32,
        etcd_pid: Option<u32>,
        store: &EtcdStore,
    ) -> anyhow::Result<serde_json::Value> {
        let secs = self.at.elapsed().as_secs_f64();
        let cpu = (cpu_time(pid)? - self.cpu).as_secs_f64();
        let driver = (cpu_time(std::process::id())? - self.driver_cpu).as_secs_f64();
        let etcd = match (etcd_pid, self.etcd_cpu) {
            (Some(p), Some(before)) => Some((cpu_time(p)? - before).as_secs_f64() / secs),
            _ => None,
        };
        let machine = (machine_busy()? - self.machine).as_secs_f64();
        let revs = revision(store).await? - self.rev;
        Ok(json!({
            "seconds": secs,
            "cpu_cores": cpu / secs,
            "driver_cpu_cores": driver / secs,
            "etcd_cpu_cores": etcd,
            "others_cpu_cores": ((machine - cpu - driver) / secs - etcd.unwrap_or(0.0)).max(0.0),
            "etcd_writes_per_sec": revs as f64 / secs,
            "etcd_revisions": revs,
            "rss_bytes": memory(pid, "VmRSS:")?,
        }))
    }
}

fn quantiles(h: &Histogram<u64>) -> serde_json::Value {
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": q(0.5),
        "p90_ms": q(0.9),
        "p99_ms": q(0.99),
        "max_ms": h.max() as f64 / 1000.0,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // 1. Probe targets, on a runtime and thread of their own: on the routers' runtime, the
    // probes' answers waited behind a thousand router tasks (a wave of snapshots to decode),
    // the control plane's probes timed out and healthy nodes flapped, which is the driver
    // failing, not the control plane. The kernel shares the cores between this thread and the
    // routers' workers instead.
    let sims_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-sims")
        .enable_all()
        .build()?;
    let addrs: Vec<String> = sims_runtime.block_on(async {
        let mut addrs = Vec::new();
        for _ in 0..args.sims.max(1) {
            addrs.push(probe_target::spawn().await?.to_string());
        }
        anyhow::Ok(addrs)
    })?;
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args, addrs));
    drop(sims_runtime);
    result
}

async fn run(args: Args, addrs: Vec<String>) -> anyhow::Result<()> {
    let started = Instant::now();
    let store = EtcdStore::connect(&[format!("http://{}", args.etcd)])
        .await
        .context("connecting to etcd")?;

    let specs: Vec<NodeSpec> = (0..args.nodes)
        .map(|i| NodeSpec {
            id: node_id(i),
            address: addrs[i % addrs.len()].clone(),
            region: "a".into(),
            zone: format!("a{}", i % 3),
            models: vec![Model {
                name: "echo".into(),
                versions: vec![],
            }],
            capacity: 8,
            labels: Default::default(),
        })
        .collect();
    let registered = futures::stream::iter(specs.iter())
        .map(|spec| registry::register(&store, spec))
        .buffer_unordered(64)
        .filter(|r| std::future::ready(r.is_err()))
        .count()
        .await;
    if registered > 0 {
        bail!("{registered} registrations failed");
    }
    eprintln!(
        "registered {} nodes in {:.1} s",
        args.nodes,
        started.elapsed().as_secs_f64()
    );

    // 2. Wait until every node is routed.
    let table: Table = Arc::default();
    let observed = Arc::new(AtomicU64::new(0));
    let observer = tokio::spawn(observe(args.control, table.clone(), observed.clone()));
    let deadline = Instant::now() + Duration::from_secs(args.setup_timeout_secs);
    // Progress every 15 s: what a setup that does not finish got to.
    let mut progress_at = Instant::now();
    loop {
        let (n, routed) = {
            let t = lock(&table);
            (t.len(), t.values().filter(|w| **w > 0.0).count())
        };
        if n == args.nodes && routed == args.nodes {
            break;
        }
        if progress_at.elapsed() >= Duration::from_secs(15) {
            progress_at = Instant::now();
            eprintln!(
                "{:.0} s: {routed} of {n} nodes in the table routed (version {})",
                started.elapsed().as_secs_f64(),
                observed.load(Ordering::Relaxed)
            );
        }
        if observer.is_finished() || Instant::now() > deadline {
            bail!(
                "only {routed} of {n} nodes routed ({} registered)",
                args.nodes
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let routed_after = started.elapsed();
    // Memory before any router: the registry, the table, the prober and its connections.
    let rss_before_routers = memory(args.control_pid, "VmRSS:")?;
    eprintln!(
        "all {} nodes routed after {:.1} s",
        args.nodes,
        routed_after.as_secs_f64()
    );

    // 3. The routers, in waves.
    let shared = Arc::new(Shared::default());
    let (stop_tx, stop) = watch::channel(false);
    let mut routers = Vec::with_capacity(args.routers);
    let connect_started = Instant::now();
    for wave in (0..args.routers)
        .collect::<Vec<_>>()
        .chunks(args.wave.max(1))
    {
        let mut firsts = Vec::new();
        for &i in wave {
            let (first_tx, first_rx) = oneshot::channel();
            let load_ids = (0..args.load_nodes)
                .map(|k| node_id((i * args.load_nodes + k) % args.nodes))
                .collect();
            routers.push(tokio::spawn(router(
                i,
                args.control,
                shared.clone(),
                load_ids,
                first_tx,
                stop.clone(),
            )));
            firsts.push(first_rx);
        }
        for f in firsts {
            tokio::time::timeout(Duration::from_secs(60), f)
                .await
                .context("a router got no table within 60 s")?
                .context("a router failed before its first table")?;
        }
    }
    let connect_time = connect_started.elapsed();
    let peak_after_connect = memory(args.control_pid, "VmHWM:")?;
    eprintln!(
        "{} routers subscribed in {:.1} s",
        args.routers,
        connect_time.as_secs_f64()
    );

    // 4. Steady state.
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let versions_before = observed.load(Ordering::Relaxed);
    let window = Window::start(args.control_pid, args.etcd_pid, &store).await?;
    tokio::time::sleep(Duration::from_secs(args.steady_secs)).await;
    let mut steady = window.end(args.control_pid, args.etcd_pid, &store).await?;
    steady["observer_version_moved"] = json!(observed.load(Ordering::Relaxed) != versions_before);
    eprintln!("steady state: {steady}");

    // 5. Weight changes.
    let mut admin = AdminClient::new(connect(args.control).await?);
    let mut per_change = Histogram::<u64>::new(3)?;
    let mut per_router = Histogram::<u64>::new(3)?;
    // Per change, the first router's ACK (the pipeline: admin call, etcd, control loop, etcd,
    // publisher, one stream) and the spread from the first to the last (the fan-out to every
    // stream, and the driver reading them all).
    let mut first_router = Histogram::<u64>::new(3)?;
    let mut spread = Histogram::<u64>::new(3)?;
    let mut incomplete = 0usize;
    // Per change: when it started (Unix ms, to line up with the control plane's log) and its
    // first and last router's ACK (ms).
    let mut rounds = Vec::with_capacity(args.changes);
    let window = Window::start(args.control_pid, args.etcd_pid, &store).await?;
    for round in 0..args.changes {
        // A routable node (a change to an unroutable one's override publishes nothing).
        let (node, old_weight) = {
            let t = lock(&table);
            (0..args.nodes)
                .map(|k| node_id((round * 7919 + 13 + k) % args.nodes))
                .find_map(|id| t.get(&id).copied().filter(|w| *w > 0.0).map(|w| (id, w)))
                .context("no routable node to change")?
        };
        // Half of it, and never the weight it has (a change must change something).
        let weight = (old_weight / 2.0).max(0.5);
        let target = Target {
            round,
            node: node.clone(),
            old_weight,
            started: Instant::now(),
        };
        let round_start = lock(&shared.samples).len();
        let started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        *lock(&shared.target) = Some(target);
        // A refused change (the control plane lost its store) is counted, not fatal: the run
        // still reports what it measured.
        if let Err(e) = admin
            .set_weight_override(WeightOverrideRequest {
                id: node.clone(),
                weight: Some(weight),
            })
            .await
        {
            eprintln!("change {round}: weight override of {node} refused: {e}");
            incomplete += 1;
            tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(args.change_timeout_secs);
        let samples = loop {
            // Cheap while waiting (samples added since the round began: a late one of an
            // earlier round would count too), exact once that reaches every router; the
            // driver's CPU is taken from the same cores as the control plane's.
            let n = {
                let s = lock(&shared.samples);
                if s.len() - round_start >= args.routers || Instant::now() > deadline {
                    s[round_start..].iter().filter(|(r, _)| *r == round).count()
                } else {
                    0
                }
            };
            if n >= args.routers || Instant::now() > deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let mut worst = Duration::ZERO;
        let mut best = Duration::MAX;
        for (_, d) in lock(&shared.samples).iter().filter(|(r, _)| *r == round) {
            per_router.record(d.as_micros() as u64)?;
            worst = worst.max(*d);
            best = best.min(*d);
        }
        if samples < args.routers {
            incomplete += 1;
            eprintln!(
                "change {round}: only {samples} of {} routers ACKed",
                args.routers
            );
        } else {
            per_change.record(worst.as_micros() as u64)?;
            first_router.record(best.as_micros() as u64)?;
            spread.record((worst - best).as_micros() as u64)?;
            rounds.push(json!({
                "round": round,
                "node": node,
                "started_unix_ms": started_unix_ms,
                "first_ms": best.as_secs_f64() * 1e3,
                "last_ms": worst.as_secs_f64() * 1e3,
            }));
        }
        tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
    }
    let changing = window.end(args.control_pid, args.etcd_pid, &store).await?;

    let result = json!({
        "nodes": args.nodes,
        "routers": args.routers,
        "sims": args.sims,
        "setup": {
            "routed_after_s": routed_after.as_secs_f64(),
            "routers_connected_in_s": connect_time.as_secs_f64(),
            "wave": args.wave,
        },
        "steady": steady,
        "changes": {
            "count": args.changes,
            "incomplete": incomplete,
            "change_to_ack_at_every_router": quantiles(&per_change),
            "change_to_ack_per_router": quantiles(&per_router),
            "change_to_ack_at_first_router": quantiles(&first_router),
            "first_to_last_router": quantiles(&spread),
            "window": changing,
            "rounds": rounds,
        },
        "routers_updates": shared.updates.load(Ordering::Relaxed),
        "routers_snapshots": shared.snapshots.load(Ordering::Relaxed),
        "control_plane": {
            "rss_bytes": memory(args.control_pid, "VmRSS:")?,
            "peak_rss_bytes": memory(args.control_pid, "VmHWM:")?,
            "peak_rss_after_connect_bytes": peak_after_connect,
            "rss_before_routers_bytes": rss_before_routers,
        },
        "total_s": started.elapsed().as_secs_f64(),
    });
    let _ = stop_tx.send(true);
    for r in routers {
        r.abort();
    }
    observer.abort();
    let text = serde_json::to_string_pretty(&result)?;
    if let Some(out) = &args.out {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    println!("{text}");
    Ok(())
}
