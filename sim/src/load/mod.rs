//! An open-loop load generator for the Open Inference Protocol.
//!
//! Calls are scheduled by the clock, not by answers: the i-th call is due at `start + i / rps`,
//! whatever happened to the previous ones. A call whose time has come is sent at once even if
//! the generator is behind, and its latency is measured from the time it was due, so queueing
//! anywhere (in the target, in the network, or in the generator itself) shows up as latency
//! instead of being hidden (no "coordinated omission"). How late the generator sends is reported
//! separately as `send_lag`: sends are released by a dedicated thread sleeping on the operating
//! system's high-resolution timer (not tokio's, whose resolution of one millisecond would put up
//! to a millisecond of generator delay into every latency), so it is typically tens of
//! microseconds, and calls go out evenly spaced even at thousands per second.
//!
//! Arrivals are evenly spaced by default; `Arrivals::Poisson` draws exponential gaps from a
//! seeded generator instead (a Poisson process, the usual model of many independent clients),
//! reproducible for a seed, so that contenders compared in one run see the same arrivals.
//!
//! Each call carries one FP32 tensor `INPUT0` of shape `[1, payload_elems]` as
//! `raw_input_contents` and must come back echoed (the simulated node's echo model); an answer
//! with other bytes or another id counts as a `DATA_MISMATCH` error.

mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_proto::inference::model_infer_request::InferInputTensor;
use fulcrum_proto::inference::{ModelInferRequest, ModelInferResponse};
use hdrhistogram::Histogram;
use prost::bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tonic::Request;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};

pub use report::{LatencySummary, LoadReport, TimelineBucket};

use crate::node::{MAX_MESSAGE_SIZE, NODE_HEADER as SIM_NODE_HEADER};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Exp};
use report::{MAX_LATENCY_US, Outcome, ReportHead, SIGNIFICANT_DIGITS, Tally, code_name};

/// Response header in which a Fulcrum router names the node that served a call.
pub const ROUTER_NODE_HEADER: &str = "x-fulcrum-node";

/// Response header in which a Fulcrum router names the region that served a call.
pub const REGION_HEADER: &str = "x-fulcrum-region";

/// Node name counted when no header names one: the target answered directly.
pub const DIRECT_NODE: &str = "direct";

/// Response header in which a Fulcrum router says how many attempts a call took (retries and
/// hedges included).
pub const ATTEMPTS_HEADER: &str = "x-fulcrum-attempts";

/// Envoy's response header with the attempts it made (with `include_attempt_count_in_response`),
/// read when a Fulcrum router's is absent, so that benchmarks see Envoy's retries too.
pub const ENVOY_ATTEMPTS_HEADER: &str = "x-envoy-attempt-count";

/// Longest timeline a run may ask for, in buckets: a timeline is for looking at seconds around
/// an event (a failover, a stall) at a resolution of milliseconds, and this bound keeps its
/// memory small whatever the duration and bucket width.
const MAX_TIMELINE_BUCKETS: f64 = 100_000.0;

/// How calls are spaced in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Arrivals {
    /// The i-th call is due at `i / rps`.
    #[default]
    Uniform,
    /// Exponentially distributed gaps of mean `1 / rps` (a Poisson process), drawn from a
    /// generator seeded with this value.
    Poisson {
        /// Seed of the gaps.
        seed: u64,
    },
}

/// Region counted when no header names one.
pub const UNKNOWN_REGION: &str = "unknown";

/// Most calls one run may schedule. Outcomes are tallied as they arrive, so memory does not
/// grow with the count; the bound is there because a larger product of rate and duration is
/// far more likely a mistake (swapped arguments, a rate in calls per minute) than an intended
/// run of more than a few hours at a thousand calls a second.
const MAX_CALLS: f64 = 10_000_000.0;

/// Room left in a message for everything but the tensor data (names, shape, id). The payload
/// must fit in [`MAX_MESSAGE_SIZE`] with this to spare, or the target would reject every call.
const MESSAGE_OVERHEAD: usize = 64 * 1024;

/// What load to apply, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadConfig {
    /// `host:port` (or a URL with a scheme) of the target: a node or a router.
    pub target: String,
    /// The model to call; it must echo its inputs.
    pub model: String,
    /// Calls per second.
    pub rps: f64,
    /// How long calls are scheduled for.
    pub duration: Duration,
    /// Deadline of each call.
    pub timeout: Duration,
    /// Most calls outstanding at once; a call due beyond it is not sent but counted as dropped
    /// (the generator, not the target, is overloaded).
    pub max_in_flight: usize,
    /// FP32 elements in the input tensor.
    pub payload_elems: usize,
    /// HTTP/2 connections to spread calls over, round-robin.
    pub connections: usize,
    /// How calls are spaced in time.
    pub arrivals: Arrivals,
    /// Width of the buckets of a timeline of outcomes by the time calls were due (none when
    /// `None`).
    pub timeline: Option<Duration>,
    /// A closed loop instead of a schedule: this many callers, each sending its next call as
    /// soon as its previous one has ended, for `duration` (`rps`, `arrivals` and
    /// `max_in_flight` are then unused). A call's latency is then its own, from the moment it
    /// is sent: the measure of one call's path through an otherwise idle system ("sequential
    /// calls" with one caller). A closed loop hides queueing (a slow answer delays the next
    /// call instead of showing up in its latency), which is why rates are measured open loop.
    pub closed_loop: Option<usize>,
    /// Request headers (gRPC metadata) every call carries, as (name, value): a router's
    /// `fulcrum-priority`, an affinity key, a credential.
    pub headers: Vec<(String, String)>,
}

impl Default for LoadConfig {
    /// 100 calls a second for 10 seconds to the `echo` model on a local Triton-style port.
    /// - `timeout` 5 s: far above any healthy latency, so only a stuck call reaches it.
    /// - `max_in_flight` 10 000: at the default timeout this allows 2000 calls/s to all hang
    ///   before the generator sheds load, while bounding its memory and tasks.
    /// - `payload_elems` 16: a 64-byte tensor, so the run measures call handling, not
    ///   bandwidth.
    /// - `connections` 4: one HTTP/2 connection serializes frames on one socket; a few spread
    ///   the work over the target's and a router's threads, as several clients would.
    fn default() -> Self {
        Self {
            target: "127.0.0.1:8001".to_string(),
            model: "echo".to_string(),
            rps: 100.0,
            duration: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            max_in_flight: 10_000,
            payload_elems: 16,
            connections: 4,
            arrivals: Arrivals::Uniform,
            timeline: None,
            closed_loop: None,
            headers: Vec::new(),
        }
    }
}

impl LoadConfig {
    /// Checks that the run is well defined and bounded.
    pub fn validate(&self) -> Result<(), LoadError> {
        let invalid = |m: String| Err(LoadError::InvalidConfig(m));
        if !(self.rps.is_finite() && self.rps > 0.0) {
            return invalid(format!("rps must be a positive number, got {}", self.rps));
        }
        if self.duration.is_zero() {
            return invalid("duration must be positive".into());
        }
        if self.closed_loop == Some(0) {
            return invalid("a closed loop needs at least 1 caller".into());
        }
        let calls = self.rps * self.duration.as_secs_f64();
        if calls > MAX_CALLS {
            return invalid(format!(
                "rps × duration is {calls:.0} calls, more than the limit of {MAX_CALLS:.0}"
            ));
        }
        if self.timeout.is_zero() {
            return invalid("timeout must be positive".into());
        }
        if self.max_in_flight == 0 {
            return invalid("max_in_flight must be at least 1".into());
        }
        if self.connections == 0 {
            return invalid("connections must be at least 1".into());
        }
        if self.model.is_empty() {
            return invalid("model is empty".into());
        }
        if let Some(width) = self.timeline {
            if width.is_zero() {
                return invalid("the timeline's bucket width must be positive".into());
            }
            let buckets = (self.duration + self.timeout).as_secs_f64() / width.as_secs_f64();
            if buckets > MAX_TIMELINE_BUCKETS {
                return invalid(format!(
                    "a timeline of {buckets:.0} buckets is more than the limit of \
                     {MAX_TIMELINE_BUCKETS:.0}: use wider buckets"
                ));
            }
        }
        metadata(&self.headers).map_err(LoadError::InvalidConfig)?;
        let limit = (MAX_MESSAGE_SIZE - MESSAGE_OVERHEAD) / 4;
        if self.payload_elems > limit {
            return invalid(format!(
                "payload_elems must be at most {limit} (a message is at most {MAX_MESSAGE_SIZE} bytes)"
            ));
        }
        Ok(())
    }
}

/// Why a load run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The configuration is invalid or unbounded; the message says why.
    #[error("invalid load configuration: {0}")]
    InvalidConfig(String),
    /// The target is not a valid address.
    #[error("invalid target {target:?}: {source}")]
    InvalidTarget {
        /// The target as given.
        target: String,
        /// The parser's complaint.
        source: tonic::transport::Error,
    },
    /// A connection to the target could not be made.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// The target as given.
        target: String,
        /// The transport's complaint.
        source: tonic::transport::Error,
    },
    /// The latency histogram could not be created.
    #[error("cannot create a latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    /// The thread that schedules calls could not be started, or failed.
    #[error("load scheduler: {0}")]
    Scheduler(String),
}

/// The gRPC metadata of `headers`, or what is wrong with one of them.
fn metadata(headers: &[(String, String)]) -> Result<MetadataMap, String> {
    let mut map = MetadataMap::new();
    for (name, value) in headers {
        let key = tonic::metadata::AsciiMetadataKey::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name {name:?} is not a valid gRPC metadata key"))?;
        if name.ends_with("-bin") {
            return Err(format!("header {name:?}: binary metadata is not supported"));
        }
        let value = value
            .parse()
            .map_err(|_| format!("header {name:?}: value {value:?} is not printable ASCII"))?;
        map.append(key, value);
    }
    Ok(map)
}

/// The request every call sends (with its own id), and what must come back.
struct Template {
    request: ModelInferRequest,
    payload: Bytes,
    /// The metadata every call carries ([`LoadConfig::headers`]).
    metadata: MetadataMap,
}

impl Template {
    fn new(model: &str, payload_elems: usize) -> Self {
        let payload: Vec<u8> = (0..payload_elems)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        let payload = Bytes::from(payload);
        let request = ModelInferRequest {
            model_name: model.to_string(),
            inputs: vec![InferInputTensor {
                name: "INPUT0".to_string(),
                datatype: "FP32".to_string(),
                shape: vec![1, i64::try_from(payload_elems).unwrap_or(i64::MAX)],
                ..InferInputTensor::default()
            }],
            raw_input_contents: vec![payload.clone()],
            ..ModelInferRequest::default()
        };
        Self {
            request,
            payload,
            metadata: MetadataMap::new(),
        }
    }
}

type Client = GrpcInferenceServiceClient<Channel>;

/// Opens `config.connections` connections to the target.
async fn connect(config: &LoadConfig) -> Result<Vec<Client>, LoadError> {
    let uri = if config.target.contains("://") {
        config.target.clone()
    } else {
        format!("http://{}", config.target)
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|source| LoadError::InvalidTarget {
            target: config.target.clone(),
            source,
        })?
        .connect_timeout(config.timeout)
        // See the node: Nagle's algorithm would add delay to small frames.
        .tcp_nodelay(true);
    let mut clients = Vec::with_capacity(config.connections);
    for _ in 0..config.connections {
        // Connected up front, so that connection setup is not part of any call's latency.
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| LoadError::Connect {
                target: config.target.clone(),
                source,
            })?;
        clients.push(
            GrpcInferenceServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        );
    }
    Ok(clients)
}

/// Longest single sleep of the scheduling thread, so that it notices within this time that the
/// run was abandoned even when calls are far apart.
const MAX_NAP: Duration = Duration::from_millis(50);

/// What the scheduling thread needs.
struct Plan {
    config: LoadConfig,
    clients: Vec<Client>,
    template: Template,
    lag: Histogram<u64>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    stopped: watch::Receiver<()>,
    runtime: tokio::runtime::Handle,
}

/// What the scheduling thread did.
struct Schedule {
    /// Wall-clock time of the start of the schedule (the due time of a call at offset 0).
    started: std::time::SystemTime,
    sent: u64,
    dropped: u64,
    lag: Histogram<u64>,
    send_time: Duration,
}

/// Applies the load described by `config` and reports what happened. The run takes
/// `config.duration` to schedule calls, then waits at most `config.timeout` for the outstanding
/// ones; any still unanswered then are counted as `DEADLINE_EXCEEDED`.
///
/// Calls are released by a dedicated thread that sleeps with the operating system's
/// high-resolution timer (tokio's timer has a resolution of one millisecond, which would put up
/// to a millisecond of generator delay into every measured latency); they run on the caller's
/// tokio runtime. How late the thread wakes depends on the thread's timer slack (50 µs by
/// default on Linux; a thread inherits its creator's).
pub async fn run(config: LoadConfig) -> Result<LoadReport, LoadError> {
    config.validate()?;
    let clients = connect(&config).await?;
    let mut template = Template::new(&config.model, config.payload_elems);
    template.metadata = metadata(&config.headers).map_err(LoadError::InvalidConfig)?;
    let tally = Tally::new(config.timeline)?;
    let lag = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)?;
    let (tx, rx) = mpsc::unbounded_channel::<Outcome>();
    // Dropping `stop` ends the calls still running when the run is over (or abandoned), and
    // the scheduling thread if the run is abandoned while it still schedules.
    let (stop, stopped) = watch::channel(());
    let (done_tx, done_rx) = oneshot::channel::<Schedule>();
    let head_target = config.target.clone();
    let head_model = config.model.clone();
    let (duration, timeout, closed_loop) = (config.duration, config.timeout, config.closed_loop);
    let target_rps = if closed_loop.is_some() {
        0.0
    } else {
        config.rps
    };
    let plan = Plan {
        config,
        clients,
        template,
        lag,
        outcomes: tx,
        stopped,
        runtime: tokio::runtime::Handle::current(),
    };
    match closed_loop {
        // Callers send as answers come: no schedule, so no thread keeping one.
        Some(callers) => {
            tokio::spawn(async move {
                let _ = done_tx.send(run_closed_loop(plan, callers).await);
            });
        }
        None => {
            std::thread::Builder::new()
                .name("fulcrum-load-schedule".into())
                .spawn(move || {
                    let _ = done_tx.send(schedule(plan));
                })
                .map_err(|e| LoadError::Scheduler(e.to_string()))?;
        }
    }

    // Outcomes are tallied in a task on the runtime, next to the calls, rather than in this
    // future, which may run on a thread of its own (`block_on`): that would cost a thread
    // wake-up per call. The guard aborts the task if this future is dropped.
    let mut collector = AbortOnDrop(tokio::spawn(collect(tally, rx, done_rx, timeout)));
    let joined = (&mut collector.0).await;
    drop(stop);
    let (mut tally, schedule, mut rx) = match joined {
        Ok(result) => result?,
        Err(e) => return Err(LoadError::Scheduler(format!("the tally task failed: {e}"))),
    };
    let Schedule {
        started,
        sent,
        dropped,
        lag,
        send_time,
    } = schedule;
    while let Ok(outcome) = rx.try_recv() {
        tally.record(outcome);
    }
    let unanswered = sent.saturating_sub(tally.received);
    tally.fail("DEADLINE_EXCEEDED", unanswered);

    let mut report = tally.into_report(ReportHead {
        target: head_target,
        model: head_model,
        target_rps,
        duration,
        closed_loop,
        sent,
        dropped,
        send_time,
    });
    report.send_lag = report::summarize(&lag);
    report.started_unix_us = started
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, micros);
    Ok(report)
}

/// Tallies outcomes until the scheduling thread is done and every call sent has an outcome, or
/// `timeout` after the thread is done, whichever comes first.
async fn collect(
    mut tally: Tally,
    mut rx: mpsc::UnboundedReceiver<Outcome>,
    mut done_rx: oneshot::Receiver<Schedule>,
    timeout: Duration,
) -> Result<(Tally, Schedule, mpsc::UnboundedReceiver<Outcome>), LoadError> {
    let schedule = loop {
        tokio::select! {
            biased;
            done = &mut done_rx => match done {
                Ok(schedule) => break schedule,
                Err(_) => return Err(LoadError::Scheduler("the scheduling thread panicked".into())),
            },
            Some(outcome) = rx.recv() => tally.record(outcome),
        }
    };
    let cutoff = Instant::now() + timeout;
    while tally.received < schedule.sent {
        tokio::select! {
            outcome = rx.recv() => match outcome {
                Some(outcome) => tally.record(outcome),
                None => break,
            },
            () = sleep_until(cutoff) => break,
        }
    }
    Ok((tally, schedule, rx))
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The scheduling loop, on its own thread: the i-th call is due at `start + i / rps`; each is
/// spawned on the runtime when due (or at once when the thread is late), unless
/// `max_in_flight` calls are outstanding, in which case it is counted as dropped.
fn schedule(plan: Plan) -> Schedule {
    let Plan {
        config,
        clients,
        template,
        mut lag,
        outcomes,
        stopped,
        runtime,
    } = plan;
    let max_in_flight = u64::try_from(config.max_in_flight).unwrap_or(u64::MAX);
    let outstanding = Arc::new(AtomicU64::new(0));
    let start = std::time::Instant::now();
    let started = std::time::SystemTime::now();
    let mut sent = 0u64;
    let mut dropped = 0u64;
    let mut index = 0u64;
    let mut gaps = match config.arrivals {
        Arrivals::Uniform => None,
        // `validate` checked that rps is positive and finite, so the rate is valid.
        Arrivals::Poisson { seed } => Exp::new(config.rps)
            .ok()
            .map(|exp| (exp, SmallRng::seed_from_u64(seed))),
    };
    let mut poisson_offset = 0.0f64;
    loop {
        let offset = match &mut gaps {
            None => Duration::from_secs_f64(index as f64 / config.rps),
            Some((exp, rng)) => {
                poisson_offset += exp.sample(rng);
                Duration::try_from_secs_f64(poisson_offset).unwrap_or(Duration::MAX)
            }
        };
        if offset >= config.duration {
            break;
        }
        let due = start + offset;
        let call_index = index;
        index += 1;
        if !sleep_until_std(due, &stopped) {
            break;
        }
        if outstanding.load(Ordering::Acquire) >= max_in_flight {
            dropped += 1;
            continue;
        }
        let client = clients[(call_index % clients.len() as u64) as usize].clone();
        let id = call_index.to_string();
        let mut request = Request::new(ModelInferRequest {
            id: id.clone(),
            ..template.request.clone()
        });
        *request.metadata_mut() = template.metadata.clone();
        request.set_timeout(config.timeout);
        lag.saturating_record(micros(
            std::time::Instant::now().saturating_duration_since(due),
        ));
        outstanding.fetch_add(1, Ordering::AcqRel);
        runtime.spawn(call(
            client,
            request,
            Expected {
                due: Instant::from_std(due),
                at_us: micros(offset),
                id,
                payload: template.payload.clone(),
            },
            config.timeout,
            Some(Outstanding(outstanding.clone())),
            outcomes.clone(),
            stopped.clone(),
        ));
        sent += 1;
    }
    Schedule {
        started,
        sent,
        dropped,
        lag,
        send_time: start.elapsed(),
    }
}

/// The closed loop: `callers` tasks on the runtime, each sending its next call as soon as its
/// previous one has ended, until the run's duration has passed or [`MAX_CALLS`] calls have been
/// sent in all. A call's latency is measured from the moment it is sent.
async fn run_closed_loop(plan: Plan, callers: usize) -> Schedule {
    let Plan {
        config,
        clients,
        template,
        lag,
        outcomes,
        stopped,
        runtime: _,
    } = plan;
    let start = std::time::Instant::now();
    let started = std::time::SystemTime::now();
    let end = Instant::from_std(start) + config.duration;
    // `MAX_CALLS` is a whole number well inside u64.
    let max_calls = MAX_CALLS as u64;
    let sent = Arc::new(AtomicU64::new(0));
    let template = Arc::new(template);
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..callers {
        let client = clients[caller % clients.len()].clone();
        let (sent, template) = (sent.clone(), template.clone());
        let (outcomes, stopped) = (outcomes.clone(), stopped.clone());
        let timeout = config.timeout;
        tasks.spawn(async move {
            while Instant::now() < end && stopped.has_changed().is_ok() {
                let Ok(index) = sent.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max_calls).then_some(n + 1)
                }) else {
                    break;
                };
                let id = index.to_string();
                let mut request = Request::new(ModelInferRequest {
                    id: id.clone(),
                    ..template.request.clone()
                });
                *request.metadata_mut() = template.metadata.clone();
                request.set_timeout(timeout);
                let due = Instant::now();
                let expected = Expected {
                    due,
                    at_us: micros(due.into_std().saturating_duration_since(start)),
                    id,
                    payload: template.payload.clone(),
                };
                call(
                    client.clone(),
                    request,
                    expected,
                    timeout,
                    // A caller has one call out at a time: nothing to count against a limit.
                    None,
                    outcomes.clone(),
                    stopped.clone(),
                )
                .await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Schedule {
        started,
        sent: sent.load(Ordering::Acquire),
        dropped: 0,
        lag,
        send_time: start.elapsed(),
    }
}

/// Sleeps until `due` on the thread's high-resolution timer, in naps of at most [`MAX_NAP`];
/// false if the run was abandoned meanwhile.
fn sleep_until_std(due: std::time::Instant, stopped: &watch::Receiver<()>) -> bool {
    loop {
        if stopped.has_changed().is_err() {
            return false;
        }
        let now = std::time::Instant::now();
        if now >= due {
            return true;
        }
        std::thread::sleep((due - now).min(MAX_NAP));
    }
}

/// Counts a call as outstanding until it ends, however it ends.
struct Outstanding(Arc<AtomicU64>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one call must get back, and when it was due.
struct Expected {
    due: Instant,
    /// When the call was due, in microseconds from the start of the run.
    at_us: u64,
    id: String,
    payload: Bytes,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Makes one call and sends its outcome, unless the run ends first.
async fn call(
    mut client: Client,
    request: Request<ModelInferRequest>,
    expected: Expected,
    timeout: Duration,
    // The open loop's count against `max_in_flight` (none in a closed loop).
    outstanding: Option<Outstanding>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    mut stopped: watch::Receiver<()>,
) {
    // The deadline is also enforced here, so that time spent waiting for the channel (before
    // the request reaches the wire, where `grpc-timeout` applies) is bounded too.
    let result = tokio::select! {
        result = tokio::time::timeout(timeout, client.model_infer(request)) => result,
        _ = stopped.changed() => return,
    };
    let at_us = expected.at_us;
    let latency_us = micros(expected.due.elapsed());
    let outcome = match result {
        Err(_) => Outcome::Failed {
            code: "DEADLINE_EXCEEDED",
            at_us,
            latency_us,
            message: None,
        },
        Ok(Err(status)) => Outcome::Failed {
            code: status_name(&status),
            at_us,
            latency_us,
            message: Some(status.message().to_owned()),
        },
        Ok(Ok(response)) => {
            let (metadata, answer, _) = response.into_parts();
            if echoes(&answer, &expected) {
                Outcome::Ok {
                    latency_us,
                    at_us,
                    attempts: header(&metadata, ATTEMPTS_HEADER)
                        .or_else(|| header(&metadata, ENVOY_ATTEMPTS_HEADER))
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(1),
                    node: header(&metadata, ROUTER_NODE_HEADER)
                        .or_else(|| header(&metadata, SIM_NODE_HEADER))
                        .unwrap_or(DIRECT_NODE)
                        .to_string(),
                    region: header(&metadata, REGION_HEADER)
                        .unwrap_or(UNKNOWN_REGION)
                        .to_string(),
                }
            } else {
                Outcome::Failed {
                    code: "DATA_MISMATCH",
                    at_us,
                    latency_us,
                    message: None,
                }
            }
        }
    };
    // No longer outstanding once its outcome is known.
    drop(outstanding);
    let _ = outcomes.send(outcome);
}

/// The name under which a failed call is counted. tonic's client reports its own expired
/// deadline as CANCELLED ("Timeout expired"), with a `TimeoutExpired` error as the source; that
/// is a deadline, and is counted as `DEADLINE_EXCEEDED` like one the server reports.
fn status_name(status: &tonic::Status) -> &'static str {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return "DEADLINE_EXCEEDED";
        }
        source = e.source();
    }
    code_name(status.code())
}

/// Whether `answer` is the echo of the call: same id, one raw output with the same bytes.
fn echoes(answer: &ModelInferResponse, expected: &Expected) -> bool {
    answer.id == expected.id
        && answer.raw_output_contents.len() == 1
        && answer.raw_output_contents[0] == expected.payload
}

/// A response header as text, if present, non-empty and visible ASCII.
fn header<'a>(metadata: &'a MetadataMap, name: &str) -> Option<&'a str> {
    metadata
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LoadConfig {
        LoadConfig::default()
    }

    #[test]
    fn default_is_valid() {
        config().validate().unwrap();
    }

    #[test]
    fn headers_become_the_metadata_of_every_call() {
        let headers = vec![
            ("fulcrum-priority".to_owned(), "critical".to_owned()),
            ("x-tag".to_owned(), "a".to_owned()),
            ("x-tag".to_owned(), "b".to_owned()),
        ];
        let md = metadata(&headers).unwrap();
        assert_eq!(md.get("fulcrum-priority").unwrap(), "critical");
        let tags: Vec<_> = md.get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"]);
        LoadConfig {
            headers,
            ..config()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn rejects_unbounded_or_meaningless_runs() {
        for c in [
            LoadConfig {
                rps: 0.0,
                ..config()
            },
            LoadConfig {
                rps: -1.0,
                ..config()
            },
            LoadConfig {
                rps: f64::NAN,
                ..config()
            },
            LoadConfig {
                rps: f64::INFINITY,
                ..config()
            },
            LoadConfig {
                duration: Duration::ZERO,
                ..config()
            },
            LoadConfig {
                rps: 100_000.0,
                duration: Duration::from_secs(101),
                ..config()
            },
            LoadConfig {
                timeout: Duration::ZERO,
                ..config()
            },
            LoadConfig {
                connections: 0,
                ..config()
            },
            LoadConfig {
                headers: vec![("bad name".into(), "x".into())],
                ..config()
            },
            LoadConfig {
                headers: vec![("x-value".into(), "line\nbreak".into())],
                ..config()
            },
            LoadConfig {
                headers: vec![("x-data-bin".into(), "AAAA".into())],
                ..config()
            },
            LoadConfig {
                max_in_flight: 0,
                ..config()
            },
            LoadConfig {
                timeline: Some(Duration::ZERO),
                ..config()
            },
            LoadConfig {
                timeline: Some(Duration::from_micros(10)),
                ..config()
            },
            LoadConfig {
                payload_elems: MAX_MESSAGE_SIZE,
                ..config()
            },
            LoadConfig {
                closed_loop: Some(0),
                ..config()
            },
        ] {
            assert!(
                matches!(c.validate(), Err(LoadError::InvalidConfig(_))),
                "{c:?} was accepted"
            );
        }
    }

    #[test]
    fn client_side_timeout_counts_as_deadline_exceeded() {
        let status = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(status.code(), tonic::Code::Cancelled);
        assert_eq!(status_name(&status), "DEADLINE_EXCEEDED");
        assert_eq!(status_name(&tonic::Status::unavailable("x")), "UNAVAILABLE");
    }

    #[test]
    fn template_is_fp32_little_endian() {
        let t = Template::new("echo", 3);
        assert_eq!(t.request.inputs[0].shape, vec![1, 3]);
        assert_eq!(t.payload.len(), 12);
        assert_eq!(&t.payload[4..8], &1.0f32.to_le_bytes());
    }

    #[tokio::test]
    async fn unreachable_target_is_an_error() {
        // A port that was just free: nothing listens on it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let c = LoadConfig {
            target: addr.to_string(),
            timeout: Duration::from_secs(2),
            ..config()
        };
        assert!(matches!(run(c).await, Err(LoadError::Connect { .. })));
    }
}
