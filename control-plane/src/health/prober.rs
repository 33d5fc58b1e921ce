//! Active health probing: one task per registered node, asking on every interval
//! `grpc.health.v1.Health/Check` (overall server health), the Open Inference Protocol's
//! `ServerReady`, and `ModelReady` for each model the node declares.
//!
//! A node registered without models has them listed by its server on every probe, with the
//! model repository extension's `RepositoryIndex` (Triton and MLServer both answer it), so
//! models loaded or unloaded on the server show up at the routers without a registration.
//!
//! A server that does not implement grpc.health.v1 (UNIMPLEMENTED) is judged by the OIP calls
//! alone, since Triton and MLServer differ in what they expose.
//!
//! When many probe tasks start at once (a new leader, a bulk registration), their first probes
//! are spread over one interval instead of all firing together: 10,000 nodes would otherwise
//! be 30,000 calls in the same instant, every interval. A new leader loses nothing meanwhile:
//! nodes not probed yet keep the health the stored table gives them.
//!
//! A probe that times out while the prober itself is late (it started long after it was due,
//! or its deadline fired long after it passed: the control plane's own CPU starvation) is
//! [`Observation::Inconclusive`]: neither a pass nor a failure. A failure reads whether the
//! node answered ([`Observation::Fail`]: not ready, refused) or not ([`Observation::NoAnswer`]:
//! a timeout, a connection that hangs or breaks), for the mass-failure guard
//! ([`super::guard`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::NodeSpec;
use fulcrum_proto::inference::{
    ModelReadyRequest, ModelReadyResponse, RepositoryIndexRequest, RepositoryIndexResponse,
    ServerReadyRequest, ServerReadyResponse,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::probe_conn::ProbeConn;
use super::{HealthStats, NodeHealth, Observation, Thresholds};
use tokio::time::Instant;

/// Most models taken from one server's `RepositoryIndex`: far more than a server loads at once,
/// and a bound on what a misbehaving server can make the control plane store and publish.
const MAX_DISCOVERED_MODELS: usize = 1024;

/// How and how often nodes are probed.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    /// Time between two probes of one node.
    pub interval: Duration,
    /// Deadline of one probe (all its calls together).
    pub timeout: Duration,
    /// Streaks that change a node's state.
    pub thresholds: Thresholds,
    /// The mass-failure guard's threshold: the share of a region's routable nodes that may
    /// fail their probes at once before the guard holds them ([`super::guard`]); 0 or 1 turn
    /// the guard off.
    pub mass_failure_threshold: f64,
}

impl Default for ProbeConfig {
    /// One probe a second with a one-second deadline: with the default thresholds a dead node is
    /// out of the routing table within about two seconds, while probe traffic stays negligible
    /// (three small calls a second per node). Routers' own failure handling covers the gap.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            thresholds: Thresholds::default(),
            mass_failure_threshold: super::guard::DEFAULT_THRESHOLD,
        }
    }
}

type HealthMap = Arc<Mutex<HashMap<String, NodeHealth>>>;

/// Probe tasks that may start probing at once. Beyond this many in one go, first probes are
/// spread evenly over the interval. A hundred nodes are three hundred small calls; a handful
/// of nodes registered together (every test, `fulcrum up`) is probed at once.
const FIRST_PROBE_BURST: usize = 100;

/// Nodes whose routable state changed since the control loop last asked.
type Changed = Arc<Mutex<HashSet<String>>>;

/// How an unhealthy node fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failing {
    /// Its last failing probe got no answer ([`NodeHealth::unanswered`]).
    pub unanswered: bool,
    /// Its last probe passed: it is on its way back.
    pub recovering: bool,
    /// When its failing streak began ([`NodeHealth::failing_since_unix_ms`]).
    pub since_unix_ms: u64,
}

/// Runs the probe tasks and holds their results.
#[derive(Debug)]
pub struct Prober {
    config: ProbeConfig,
    health: HealthMap,
    tasks: Mutex<HashMap<String, (NodeSpec, JoinHandle<()>)>>,
    changed: Arc<Notify>,
    changed_ids: Changed,
    stats: Arc<HealthStats>,
}

impl Prober {
    /// A prober that signals `changed` whenever a node's routable state changes.
    pub fn new(config: ProbeConfig, changed: Arc<Notify>) -> Self {
        Self {
            config,
            health: Arc::default(),
            tasks: Mutex::default(),
            changed,
            changed_ids: Changed::default(),
            stats: Arc::default(),
        }
    }

    /// How nodes are probed.
    pub fn config(&self) -> &ProbeConfig {
        &self.config
    }

    /// The probing's and the mass-failure guard's counters.
    pub fn stats(&self) -> &Arc<HealthStats> {
        &self.stats
    }

    /// Probes exactly the nodes in `specs`: starts tasks for new (or changed) nodes and stops
    /// those of nodes that are gone.
    pub fn sync(&self, specs: &[NodeSpec]) {
        let wanted: HashSet<&str> = specs.iter().map(|s| s.id.as_str()).collect();
        let gone: Vec<String> = self
            .lock_tasks()
            .keys()
            .filter(|id| !wanted.contains(id.as_str()))
            .cloned()
            .collect();
        self.remove(&gone);
        self.upsert(specs);
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, (NodeSpec, JoinHandle<()>)>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops probing the nodes `ids` and forgets their health.
    pub fn remove(&self, ids: &[String]) {
        let mut tasks = self.lock_tasks();
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            if let Some((_, handle)) = tasks.remove(id) {
                handle.abort();
            }
            health.remove(id);
        }
    }

    /// Probes the nodes in `specs`: starts a task for each new node, and restarts that of a
    /// node whose address or models changed (forgetting its health). First probes of more than
    /// [`FIRST_PROBE_BURST`] new tasks are spread over one interval.
    pub fn upsert(&self, specs: &[NodeSpec]) {
        let mut tasks = self.lock_tasks();
        let mut start: Vec<&NodeSpec> = Vec::new();
        for spec in specs {
            match tasks.get(&spec.id) {
                Some((s, _)) if s.address == spec.address && s.models == spec.models => {}
                Some(_) => {
                    if let Some((_, handle)) = tasks.remove(&spec.id) {
                        handle.abort();
                    }
                    self.health
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&spec.id);
                    start.push(spec);
                }
                None => start.push(spec),
            }
        }
        let n = start.len();
        for (i, spec) in start.into_iter().enumerate() {
            let first_in = first_probe_delay(i, n, self.config.interval);
            let handle = tokio::spawn(probe_loop(
                spec.clone(),
                self.config,
                first_in,
                Probed {
                    health: self.health.clone(),
                    changed: self.changed.clone(),
                    changed_ids: self.changed_ids.clone(),
                    stats: self.stats.clone(),
                },
            ));
            tasks.insert(spec.id.clone(), (spec.clone(), handle));
        }
    }

    /// The nodes whose routable state (health, ready models) changed since the last call.
    pub fn take_changed(&self) -> HashSet<String> {
        std::mem::take(
            &mut *self
                .changed_ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// What is known of one node.
    pub fn get(&self, id: &str) -> Option<NodeHealth> {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// What is known of every probed node.
    pub fn snapshot(&self) -> HashMap<String, NodeHealth> {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The nodes the probes say are unhealthy, and how. Cheap: nothing else is copied.
    pub fn unhealthy(&self) -> HashMap<String, Failing> {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, h)| h.state == fulcrum_proto::fulcrum::v1::HealthState::Unhealthy)
            .map(|(id, h)| {
                let failing = Failing {
                    unanswered: h.unanswered,
                    recovering: h.streak > 0,
                    since_unix_ms: h.failing_since_unix_ms,
                };
                (id.clone(), failing)
            })
            .collect()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (_, (_, handle)) in tasks.drain() {
            handle.abort();
        }
    }
}

/// When the `i`-th of `n` probe tasks started together probes first: at once for a burst of
/// at most [`FIRST_PROBE_BURST`], otherwise evenly spread over one `interval`.
fn first_probe_delay(i: usize, n: usize, interval: Duration) -> Duration {
    if n > FIRST_PROBE_BURST {
        interval.mul_f64(i as f64 / n as f64)
    } else {
        Duration::ZERO
    }
}

/// Where a probe task reports.
struct Probed {
    health: HealthMap,
    changed: Arc<Notify>,
    changed_ids: Changed,
    stats: Arc<HealthStats>,
}

/// A probe is the prober's own lateness, not the node's failure, when its task started this
/// share of the timeout after it was due, or its deadline fired this share of the timeout after
/// it passed. A working runtime, even on a busy machine, wakes a task within milliseconds; a
/// quarter of the timeout (250 ms with the default second) means the prober did not run for
/// that long, in which the node's answer may have arrived and waited unread.
const LATE_SHARE: f64 = 0.25;

/// Least lateness that counts, for short timeouts (tests probe with a few hundred
/// milliseconds): below it, a delay is a loaded scheduler's ordinary jitter.
const LATE_FLOOR: Duration = Duration::from_millis(20);

/// Whether a probe that timed out was late on the prober's side: it was `due` (its tick, or the
/// end of the previous probe if that ran past it), `started`, and its deadline of `timeout`
/// fired at `ended`. Returns the lateness when it is past [`LATE_SHARE`] of the timeout.
fn prober_lateness(
    due: Instant,
    started: Instant,
    ended: Instant,
    timeout: Duration,
) -> Option<Duration> {
    let late_start = started.saturating_duration_since(due);
    let late_end = ended.saturating_duration_since(started + timeout);
    let late = late_start.max(late_end);
    (late > timeout.mul_f64(LATE_SHARE).max(LATE_FLOOR)).then_some(late)
}

/// Probes one node every interval until aborted.
///
/// Each node's probes share one HTTP/2 connection, kept open between them and replaced when it
/// fails. Measured at 2,000 nodes probed every 10 s (scenario 4, quick): against a connection
/// per probe, a kept one costs the control plane ~37 KB of memory per node (h2's buffers and
/// header tables, the socket) and saves a TCP and HTTP/2 handshake and teardown per probe:
/// 0.018 of a core per 1,000 nodes here, and as much again on the nodes, which also answer
/// every new connection. At 10,000 nodes that is ~370 MB against ~0.3 of a core on a 2-core
/// machine, where the CPU was what delayed the pushes of routing versions. Envoy's active
/// health checks keep their connections too.
async fn probe_loop(spec: NodeSpec, config: ProbeConfig, first_in: Duration, to: Probed) {
    let mut kept: Option<ProbeConn> = None;
    tokio::time::sleep(first_in).await;
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous_end: Option<Instant> = None;
    loop {
        let tick = ticker.tick().await;
        // A tick missed because the previous probe ran long was not due before that probe
        // ended.
        let due = previous_end.map_or(tick, |end| tick.max(end));
        let started = Instant::now();
        let started_unix_ms = crate::load::now_unix_ms();
        // The connection is put back only after a probe that ended in time; a probe that timed
        // out drops it (it may be stuck), and the next one connects afresh.
        let attempt = async {
            if let Some(conn) = kept.take()
                && conn.usable().await
            {
                let verdict = probe(&conn, &spec).await;
                if !verdict.0.is_failure() {
                    kept = Some(conn);
                    return verdict;
                }
                // A failure on a connection opened before the node restarted (or one a proxy
                // dropped) says nothing of the node: ask again on a new connection.
            }
            let conn = match ProbeConn::connect(&spec.address).await {
                Ok(conn) => conn,
                Err(e) if e.refused => return (Observation::Fail(e.why), None),
                Err(e) => return (Observation::NoAnswer(e.why), None),
            };
            let verdict = probe(&conn, &spec).await;
            kept = Some(conn);
            verdict
        };
        let outcome = tokio::time::timeout(config.timeout, attempt).await;
        let ended = Instant::now();
        previous_end = Some(ended);
        let (obs, discovered) = outcome.unwrap_or_else(|_| {
            let why = format!("probe timed out after {:?}", config.timeout);
            match prober_lateness(due, started, ended, config.timeout) {
                Some(late) => {
                    to.stats
                        .inconclusive_probes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(node = %spec.id, late_ms = late.as_millis() as u64,
                        "probe timed out while the prober was late: inconclusive");
                    (Observation::Inconclusive(why), None)
                }
                None => (Observation::NoAnswer(why), None),
            }
        });
        let did_change = {
            let mut map = to.health.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = map.entry(spec.id.clone()).or_default();
            let before = entry.state;
            let mut did_change = false;
            if let Some(models) = discovered
                && models != entry.discovered
            {
                tracing::info!(node = %spec.id, ?models, "models listed by the server");
                entry.discovered = models;
                did_change = true;
            }
            let failed = obs.is_failure();
            did_change |= entry.observe(obs, config.thresholds);
            if failed && entry.streak == -1 {
                entry.failing_since_unix_ms = started_unix_ms;
            }
            if entry.state != before {
                tracing::info!(node = %spec.id, from = ?before, to = ?entry.state,
                    error = %entry.last_error, "node health changed");
            }
            did_change
        };
        if did_change {
            to.changed_ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(spec.id.clone());
            to.changed.notify_one();
        }
    }
}

/// One probe of one node: its verdict, and the models its server listed when it was registered
/// without any (`None` when it was not, or when they could not be listed).
async fn probe(conn: &ProbeConn, spec: &NodeSpec) -> (Observation, Option<Vec<String>>) {
    let discovered = if spec.models.is_empty() {
        match list_models(conn).await {
            Ok(models) => Some(models),
            Err(failed) => return (failed, None),
        }
    } else {
        None
    };
    let models: Vec<String> = match &discovered {
        Some(models) => models.clone(),
        None => spec.models.iter().map(|m| m.name.clone()).collect(),
    };
    let obs = check(conn, &models).await;
    (obs, discovered)
}

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const REPOSITORY_INDEX: &str = "/inference.GRPCInferenceService/RepositoryIndex";
const SERVER_READY: &str = "/inference.GRPCInferenceService/ServerReady";
const MODEL_READY: &str = "/inference.GRPCInferenceService/ModelReady";

/// The models a server lists (`RepositoryIndex`), whatever their state, sorted; names that
/// could not be registered are skipped. The failure otherwise.
async fn list_models(conn: &ProbeConn) -> Result<Vec<String>, Observation> {
    let request = RepositoryIndexRequest {
        repository_name: String::new(),
        ready: false,
    };
    let index: RepositoryIndexResponse = match conn.unary(REPOSITORY_INDEX, &request).await {
        Ok(r) => r,
        Err(s) if s.code() == Code::Unimplemented => {
            return Err(Observation::Fail(
                "registered without models, and the server cannot list them \
                 (RepositoryIndex is unimplemented): register the node with its models"
                    .into(),
            ));
        }
        Err(s) => {
            return Err(Observation::NoAnswer(format!(
                "RepositoryIndex: {}",
                s.message()
            )));
        }
    };
    let mut models: Vec<String> = index
        .models
        .into_iter()
        .map(|m| m.name)
        .filter(|name| crate::registry::check_name("model name", name, true).is_ok())
        .collect();
    models.sort();
    models.dedup();
    models.truncate(MAX_DISCOVERED_MODELS);
    if models.is_empty() {
        return Err(Observation::Fail(
            "registered without models, and the server lists none".into(),
        ));
    }
    Ok(models)
}

/// Model readiness calls in flight at once within one probe. The calls of a probe go out
/// together (one round trip instead of one per call, and HTTP/2 puts them in the same
/// writes), but a server listing hundreds of models should not get hundreds of streams at
/// once from every probe: servers cap concurrent streams per connection (often at 100).
const MODEL_CHECKS_AT_ONCE: usize = 16;

/// Checks a server's health and the readiness of `models` on it. The calls are made
/// concurrently on the probe's connection; the verdict reads them in a fixed order (health,
/// then `ServerReady`, then the models), so it is what asking one after the other would give.
async fn check(conn: &ProbeConn, models: &[String]) -> Observation {
    use futures::StreamExt as _;

    let overall = HealthCheckRequest {
        service: String::new(),
    };
    let health = conn.unary::<_, HealthCheckResponse>(HEALTH_CHECK, &overall);
    let server_ready = conn.unary::<_, ServerReadyResponse>(SERVER_READY, &ServerReadyRequest {});
    // Owned names and connection handles: a stream of futures borrowing them is not `Send` for
    // every lifetime (the probe task is spawned), a known limit of the compiler's reasoning
    // about closures.
    let shared = conn.clone();
    let models_ready = futures::stream::iter(models.iter().cloned().map(move |name| {
        let conn = shared.clone();
        async move {
            let req = ModelReadyRequest {
                name,
                version: String::new(),
            };
            match conn.unary::<_, ModelReadyResponse>(MODEL_READY, &req).await {
                Ok(r) if r.ready => Some(req.name),
                _ => None,
            }
        }
    }))
    .buffered(MODEL_CHECKS_AT_ONCE)
    .filter_map(std::future::ready)
    .collect::<Vec<String>>();
    let (health, server_ready, ready_models) = futures::join!(health, server_ready, models_ready);

    match health {
        Ok(r) if r.status() == ServingStatus::Serving => {}
        Ok(r) => {
            return Observation::Fail(format!("grpc.health.v1 says {:?}", r.status()));
        }
        Err(s) if s.code() == Code::Unimplemented => {}
        // An error status, not an answer to the question: most often the connection's (reset,
        // closed), which the observer's trouble can cause as well as the node's.
        Err(s) => return Observation::NoAnswer(format!("health check: {}", s.message())),
    }
    match server_ready {
        Ok(r) if r.ready => {}
        Ok(_) => return Observation::Fail("ServerReady says not ready".into()),
        Err(s) => return Observation::NoAnswer(format!("ServerReady: {}", s.message())),
    }
    if ready_models.is_empty() {
        Observation::Fail("no model of the node is ready".into())
    } else if ready_models.len() < models.len() {
        Observation::Degraded { ready_models }
    } else {
        Observation::Pass { ready_models }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::HealthState;

    fn spec(address: &str, models: &[&str]) -> NodeSpec {
        NodeSpec {
            id: "n1".into(),
            address: address.into(),
            models: models
                .iter()
                .map(|m| fulcrum_proto::fulcrum::v1::Model {
                    name: (*m).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    async fn probe_once(spec: &NodeSpec) -> (Observation, Option<Vec<String>>) {
        match ProbeConn::connect(&spec.address).await {
            Ok(conn) => probe(&conn, spec).await,
            Err(e) if e.refused => (Observation::Fail(e.why), None),
            Err(e) => (Observation::NoAnswer(e.why), None),
        }
    }

    /// A probe against a real gRPC server (the node simulator: tonic, grpc.health.v1, OIP).
    #[tokio::test]
    async fn probes_read_health_readiness_and_models_from_a_real_server() {
        let config = fulcrum_sim::node::NodeSimConfig {
            models: vec!["echo".into(), "other".into()],
            ..Default::default()
        };
        let sim = fulcrum_sim::node::spawn(config, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let address = sim.url().trim_start_matches("http://").to_string();

        let all = probe_once(&spec(&address, &["echo", "other"])).await;
        assert!(
            matches!(&all, (Observation::Pass { ready_models }, None) if ready_models == &["echo", "other"]),
            "{all:?}"
        );
        // A declared model the server does not have: degraded, serving the others.
        let some = probe_once(&spec(&address, &["echo", "missing"])).await;
        assert!(
            matches!(&some, (Observation::Degraded { ready_models }, None) if ready_models == &["echo"]),
            "{some:?}"
        );
        let none = probe_once(&spec(&address, &["missing"])).await;
        assert!(matches!(none, (Observation::Fail(_), None)), "{none:?}");
        // No models declared: the server lists them.
        let listed = probe_once(&spec(&address, &[])).await;
        assert!(
            matches!(&listed, (Observation::Pass { .. }, Some(m)) if m == &["echo", "other"]),
            "{listed:?}"
        );
        // Many models at once: more than are asked concurrently.
        let many: Vec<String> = (0..MODEL_CHECKS_AT_ONCE * 3)
            .map(|i| format!("m{i}"))
            .collect();
        let mut names: Vec<&str> = many.iter().map(String::as_str).collect();
        names.push("echo");
        let one_of_many = probe_once(&spec(&address, &names)).await;
        assert!(
            matches!(&one_of_many, (Observation::Degraded { ready_models }, None) if ready_models == &["echo"]),
            "{one_of_many:?}"
        );

        sim.controls().set_healthy(false).await;
        let sick = probe_once(&spec(&address, &["echo"])).await;
        assert!(
            matches!(&sick, (Observation::Fail(why), None) if why.contains("grpc.health.v1 says")),
            "{sick:?}"
        );
        sim.stop().await;
        let gone = probe_once(&spec(&address, &["echo"])).await;
        assert!(
            matches!(&gone, (Observation::Fail(why), None) if why.starts_with("cannot connect")),
            "{gone:?}"
        );
    }

    #[test]
    fn only_the_probers_own_lateness_makes_a_timeout_inconclusive() {
        let due = Instant::now();
        let ms = Duration::from_millis;
        let second = Duration::from_secs(1);
        let late = |start: u64, end_past_deadline: u64, timeout: Duration| {
            let started = due + ms(start);
            prober_lateness(
                due,
                started,
                started + timeout + ms(end_past_deadline),
                timeout,
            )
        };
        // On time, or late by a loaded scheduler's jitter: the node's failure.
        assert_eq!(late(0, 0, second), None);
        assert_eq!(late(5, 3, second), None);
        assert_eq!(late(200, 0, second), None, "under a quarter of the timeout");
        // Started, or woken at the deadline, a quarter of the timeout late: the prober's.
        assert_eq!(late(300, 0, second), Some(ms(300)));
        assert_eq!(late(0, 400, second), Some(ms(400)));
        // Short timeouts: the floor keeps ordinary jitter a failure.
        assert_eq!(late(15, 0, ms(40)), None);
        assert_eq!(late(0, 25, ms(40)), Some(ms(25)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_while_the_prober_was_late_is_inconclusive_and_counted() {
        // A node that accepts connections and never answers: every probe times out.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let _hold = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let config = ProbeConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            ..ProbeConfig::default()
        };
        let prober = Prober::new(config, Arc::new(Notify::new()));
        prober.upsert(&[spec(&address, &["echo"])]);
        // Probes on time: failures, without an answer.
        let mut waited = 0;
        while prober
            .get("n1")
            .is_none_or(|h| h.state != HealthState::Unhealthy)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            waited += 1;
            assert!(waited < 100, "never unhealthy");
        }
        assert!(prober.get("n1").unwrap().unanswered);
        assert_eq!(prober.stats().read().0, 0, "no probe was late");
        // Now the clock jumps past a probe's deadline before the prober runs again, as when
        // the prober is starved: that timeout is the prober's, and does not count.
        tokio::time::advance(Duration::from_millis(1600)).await;
        let mut waited = 0;
        while prober.stats().read().0 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
            assert!(waited < 1000, "no inconclusive probe");
        }
    }

    #[test]
    fn many_first_probes_are_spread_over_the_interval() {
        let interval = Duration::from_secs(10);
        assert!(
            (0..FIRST_PROBE_BURST)
                .all(|i| first_probe_delay(i, FIRST_PROBE_BURST, interval) == Duration::ZERO),
            "a small batch is probed at once"
        );
        let n = 10_000;
        let delays: Vec<Duration> = (0..n).map(|i| first_probe_delay(i, n, interval)).collect();
        assert!(delays.iter().all(|d| *d < interval));
        // At most two first probes in any millisecond (10,000 over 10 s is one per millisecond).
        let mut per_ms = HashMap::new();
        for d in &delays {
            *per_ms.entry(d.as_millis()).or_insert(0) += 1;
        }
        assert!(per_ms.values().all(|c| *c <= 2), "a burst of first probes");
        assert!(
            delays[n - 1] > interval.mul_f64(0.99),
            "not spread over the interval"
        );
    }
}
