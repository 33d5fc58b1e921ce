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
//! Calls go out on Fulcrum's own HTTP/2 client (`fulcrum_grpc_h2::client`, the router's for its
//! calls to nodes), not tonic's `Channel`: it costs the generator a third less CPU a call (see
//! `Client`), which leaves more of a shared core to what is being measured.
//!
//! Each call carries one FP32 tensor `INPUT0` of shape `[1, payload_elems]` as
//! `raw_input_contents` and must come back echoed (the simulated node's echo model); an answer
//! with other bytes or another id counts as a `DATA_MISMATCH` error.

mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fulcrum_grpc_h2::{answer, client};
use fulcrum_proto::inference::model_infer_request::InferInputTensor;
use fulcrum_proto::inference::{ModelInferRequest, ModelInferResponse};
use hdrhistogram::Histogram;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, TE, USER_AGENT};
use prost::Message;
use prost::bytes::{BufMut, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tonic::metadata::MetadataMap;

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
    #[error("invalid target {target:?}: {why}")]
    InvalidTarget {
        /// The target as given.
        target: String,
        /// What is wrong with it.
        why: String,
    },
    /// A connection to the target could not be made.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// The target as given.
        target: String,
        /// Why not.
        source: ConnectError,
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
    /// The request of every call but its id, encoded: a call's message is its id encoded, then
    /// these bytes (a protobuf message may be cut anywhere between fields and its parts
    /// concatenated in any order), so no call copies or encodes the tensor again.
    encoded: Bytes,
    payload: Bytes,
    /// The headers every call carries: [`LoadConfig::headers`], the gRPC ones and the
    /// deadline (`grpc-timeout`).
    headers: Arc<HeaderMap>,
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
            encoded: request.encode_to_vec().into(),
            payload,
            headers: Arc::default(),
        }
    }

    /// The message of the call with this id.
    fn message(&self, id: &str) -> Bytes {
        let head = ModelInferRequest {
            id: id.to_owned(),
            ..ModelInferRequest::default()
        };
        let mut message = BytesMut::with_capacity(head.encoded_len() + self.encoded.len());
        // Encoding into a buffer with room for it cannot fail.
        let _ = head.encode(&mut message);
        message.put_slice(&self.encoded);
        message.freeze()
    }
}

/// The headers every call carries: `metadata`, then the gRPC ones and the deadline.
fn call_headers(metadata: MetadataMap, timeout: Duration) -> HeaderMap {
    let mut headers = metadata.into_headers();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(TE, HeaderValue::from_static("trailers"));
    // A `--header user-agent=...` of the caller's is kept.
    headers
        .entry(USER_AGENT)
        .or_insert(HeaderValue::from_static(AGENT));
    headers.insert(GRPC_TIMEOUT, grpc_timeout(timeout));
    headers
}

/// `timeout` as gRPC's `grpc-timeout` (at most eight digits and a unit): in microseconds while
/// they fit (a sub-millisecond deadline stays exact), else milliseconds, else seconds (rounded
/// up, so that the target never gives up before this side does).
fn grpc_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let us = timeout.as_micros().max(1);
    let text = if us <= MAX {
        format!("{us}u")
    } else if us.div_ceil(1_000) <= MAX {
        format!("{}m", us.div_ceil(1_000))
    } else {
        format!("{}S", us.div_ceil(1_000_000).min(MAX))
    };
    // Digits and a letter are a valid header value.
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("99999999S"))
}

/// Sent as `user-agent`.
const AGENT: &str = concat!("fulcrum-load/", env!("CARGO_PKG_VERSION"));

/// The request header carrying a call's deadline.
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The method every call invokes.
const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// The streams' and the connection's receive windows: hyper's client defaults, which the
/// generator's connections had on tonic's `Channel` (large enough for a tensor of megabytes).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// Largest header list accepted in an answer: hyper's client default, as on the `Channel`.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Streams opened before the target's SETTINGS say how many it allows: hyper's client default.
const INITIAL_MAX_STREAMS: usize = 100;

/// Keep-alive pings: a connection whose peer stopped answering is dropped within a minute
/// (and made again by the next call) rather than holding calls until their deadlines.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a connection to the target could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The target did not accept the connection in time.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[from] client::Error),
}

/// One HTTP/2 connection to the target, made again when it has ended (the target restarted,
/// or a proxy closed it), so that a run outlives a connection as it did on tonic's `Channel`.
///
/// Why not the `Channel`: the generator is the measuring instrument, and on the `Channel` a
/// call cost it about 70 µs of CPU at 8,000 calls/s (pinned to one core): tonic's `Buffer`
/// hands each call to a worker task, hyper's dispatch to the connection's task, and hyper sends
/// the body from a task of its own, so a request left in two `writev`s. In the benchmark
/// suite's one-core ladder the load generator and the node-sims share one core, and they filled
/// it before any proxy filled its own. Fulcrum's own client (the router's, for its calls to
/// nodes) writes a call's HEADERS and DATA in one `writev` from the calling task. Measured
/// (2026-12-08, 8,000 calls/s for 4 s, generator and node-sim on one core, three runs each):
/// the generator's CPU through a router 0.55-0.57 → 0.36-0.38 cores, straight to a node-sim
/// 0.47-0.51 → 0.31-0.32, and the node-sim's own 0.30-0.31 → 0.19-0.20 (a request now wakes
/// it once).
#[derive(Clone)]
struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    /// `host:port`, which is also the `:authority` every call sends.
    address: String,
    connect_timeout: Duration,
    /// The connection and how many were made before it; replaced under this lock once it has
    /// ended (or refused a call it never processed), so that concurrent calls make one new
    /// connection, not one each.
    conn: tokio::sync::Mutex<(u64, client::Connection)>,
}

impl Client {
    async fn connect(address: &str, timeout: Duration) -> Result<Self, ConnectError> {
        let conn = open(address, timeout).await?;
        Ok(Self {
            inner: Arc::new(ClientInner {
                address: address.to_owned(),
                connect_timeout: timeout,
                conn: tokio::sync::Mutex::new((0, conn)),
            }),
        })
    }

    /// The live connection and its number, made again if it has ended or if it is connection
    /// number `stale` (which refused a call without processing it: it is going away).
    async fn connection(
        &self,
        stale: Option<u64>,
    ) -> Result<(u64, client::Connection), tonic::Status> {
        let mut guard = self.inner.conn.lock().await;
        let (number, conn) = &mut *guard;
        if conn.is_closed() || stale == Some(*number) {
            *conn = open(&self.inner.address, self.inner.connect_timeout)
                .await
                .map_err(|e| {
                    tonic::Status::unavailable(format!(
                        "cannot connect to {}: {e}",
                        self.inner.address
                    ))
                })?;
            *number += 1;
        }
        Ok((*number, conn.clone()))
    }

    /// One `ModelInfer` call. A call the target never processed (the connection had ended, or
    /// the target said GOAWAY before it, or refused its stream) is sent once more on a new
    /// connection, as the router does with its nodes and tonic's `Channel` did (a proxy's
    /// graceful restart must not show up as failed calls).
    async fn model_infer(
        &self,
        headers: &HeaderMap,
        message: Bytes,
    ) -> Result<tonic::Response<ModelInferResponse>, tonic::Status> {
        let l = u32::try_from(message.len())
            .map_err(|_| tonic::Status::resource_exhausted("message too large"))?
            .to_be_bytes();
        let mut stale = None;
        let answer = loop {
            let (number, conn) = self.connection(stale).await?;
            let request = client::Request {
                path: MODEL_INFER_PATH,
                authority: &self.inner.address,
                headers,
                prefix: [0, l[0], l[1], l[2], l[3]],
                message: message.clone(),
            };
            match conn.call(request, MAX_MESSAGE_SIZE).await {
                Ok(answer) => break answer,
                Err(e) if e.is_unprocessed() && stale.is_none() => stale = Some(number),
                Err(e) => {
                    return Err(tonic::Status::new(
                        e.code(),
                        format!("call to {} failed: {e}", self.inner.address),
                    ));
                }
            }
        };
        let (metadata, message, extensions) =
            answer::read_answer(answer, MAX_MESSAGE_SIZE)?.into_parts();
        let response = ModelInferResponse::decode(message).map_err(|e| {
            tonic::Status::internal(format!("the answer is not a ModelInferResponse: {e}"))
        })?;
        Ok(tonic::Response::from_parts(metadata, response, extensions))
    }
}

/// A new connection to `address` with TCP_NODELAY (Nagle's algorithm would hold small frames
/// back).
async fn open(address: &str, timeout: Duration) -> Result<client::Connection, ConnectError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| ConnectError::TimedOut(timeout))??;
    tcp.set_nodelay(true)?;
    let config = client::Config {
        stream_window: STREAM_WINDOW,
        connection_window: CONNECTION_WINDOW,
        max_header_list_size: MAX_HEADER_LIST_SIZE,
        initial_max_streams: INITIAL_MAX_STREAMS,
        keepalive_interval: KEEPALIVE_INTERVAL,
        keepalive_timeout: KEEPALIVE_TIMEOUT,
    };
    Ok(client::Connection::handshake(tcp, config).await?)
}

/// The `host:port` to connect to (and send as `:authority`), from a target given as
/// `host:port` or as an `http://` URL.
fn parse_target(target: &str) -> Result<String, String> {
    let rest = match target.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "scheme {scheme:?} is not supported (the load generator speaks plain-text HTTP/2)"
            ));
        }
        None => target,
    };
    let authority = rest.trim_end_matches('/');
    let parsed: http::uri::Authority = authority
        .parse()
        .map_err(|e| format!("{authority:?} is not host:port: {e}"))?;
    if parsed.port_u16().is_none() {
        return Err(format!("{authority:?} has no port"));
    }
    Ok(authority.to_owned())
}

/// Opens `config.connections` connections to the target.
async fn connect(config: &LoadConfig) -> Result<Vec<Client>, LoadError> {
    let address = parse_target(&config.target).map_err(|why| LoadError::InvalidTarget {
        target: config.target.clone(),
        why,
    })?;
    let mut clients = Vec::with_capacity(config.connections);
    for _ in 0..config.connections {
        // Connected up front, so that connection setup is not part of any call's latency.
        let client = Client::connect(&address, config.timeout)
            .await
            .map_err(|source| LoadError::Connect {
                target: config.target.clone(),
                source,
            })?;
        clients.push(client);
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
    template.headers = Arc::new(call_headers(
        metadata(&config.headers).map_err(LoadError::InvalidConfig)?,
        config.timeout,
    ));
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
        let request = (template.headers.clone(), template.message(&id));
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
                let request = (template.headers.clone(), template.message(&id));
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
    client: Client,
    (headers, message): (Arc<HeaderMap>, Bytes),
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
        result = tokio::time::timeout(timeout, client.model_infer(&headers, message)) => result,
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

/// The name under which a failed call is counted. A deadline that passes here, before the
/// target answers, is counted in [`call`] as `DEADLINE_EXCEEDED`; so is one a tonic server
/// reports: when the `grpc-timeout` it was sent expires, tonic answers CANCELLED "Timeout
/// expired" (its `TimeoutExpired` error as a status), and that answer can beat this side's own
/// timer when both expire in the same millisecond.
fn status_name(status: &tonic::Status) -> &'static str {
    if status.code() == tonic::Code::Cancelled && status.message() == TONIC_TIMEOUT_MESSAGE {
        return "DEADLINE_EXCEEDED";
    }
    code_name(status.code())
}

/// The message of tonic's `TimeoutExpired` error, which a tonic server sends (as CANCELLED)
/// when a call's `grpc-timeout` expires.
const TONIC_TIMEOUT_MESSAGE: &str = "Timeout expired";

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
    fn a_tonic_servers_expired_deadline_counts_as_deadline_exceeded() {
        let status = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(status.code(), tonic::Code::Cancelled);
        assert_eq!(status.message(), TONIC_TIMEOUT_MESSAGE);
        assert_eq!(status_name(&status), "DEADLINE_EXCEEDED");
        assert_eq!(status_name(&tonic::Status::cancelled("gone")), "CANCELLED");
        assert_eq!(status_name(&tonic::Status::unavailable("x")), "UNAVAILABLE");
    }

    #[test]
    fn a_calls_message_is_the_template_with_its_id() {
        let t = Template::new("echo", 3);
        let decoded = ModelInferRequest::decode(t.message("42")).unwrap();
        assert_eq!(
            decoded,
            ModelInferRequest {
                id: "42".into(),
                ..ModelInferRequest::decode(t.encoded.clone()).unwrap()
            }
        );
        assert_eq!(decoded.model_name, "echo");
    }

    #[test]
    fn every_call_carries_the_grpc_headers_the_deadline_and_the_callers() {
        let md = metadata(&[("fulcrum-priority".into(), "critical".into())]).unwrap();
        let h = call_headers(md, Duration::from_millis(1500));
        assert_eq!(h["grpc-timeout"], "1500000u");
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["fulcrum-priority"], "critical");
        assert!(
            h["user-agent"]
                .to_str()
                .unwrap()
                .starts_with("fulcrum-load/")
        );
        // Longer deadlines in coarser units, never shorter than asked.
        assert_eq!(grpc_timeout(Duration::from_secs(3600)), "3600000m");
        assert_eq!(
            grpc_timeout(Duration::from_micros(100_000_000_001)),
            "100001S"
        );
        assert_eq!(grpc_timeout(Duration::ZERO), "1u");
        assert_eq!(
            fulcrum_grpc_h2::timeout::parse_grpc_timeout("3600000m"),
            Some(Duration::from_secs(3600))
        );
        // The caller's own user-agent stays.
        let md = metadata(&[("user-agent".into(), "mine".into())]).unwrap();
        assert_eq!(
            call_headers(md, Duration::from_secs(1))["user-agent"],
            "mine"
        );
    }

    #[test]
    fn targets_are_host_port_or_http_urls() {
        let ok = |t: &str| parse_target(t).unwrap();
        assert_eq!(ok("127.0.0.1:8001"), "127.0.0.1:8001");
        assert_eq!(ok("http://127.0.0.1:8001"), "127.0.0.1:8001");
        assert_eq!(ok("http://localhost:8001/"), "localhost:8001");
        for bad in ["https://127.0.0.1:8001", "127.0.0.1", "not a host", ""] {
            assert!(parse_target(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn template_is_fp32_little_endian() {
        let t = Template::new("echo", 3);
        let request = ModelInferRequest::decode(t.encoded.clone()).unwrap();
        assert_eq!(request.inputs[0].shape, vec![1, 3]);
        assert_eq!(request.raw_input_contents.len(), 1);
        assert_eq!(request.raw_input_contents[0], t.payload);
        assert_eq!(t.payload.len(), 12);
        assert_eq!(&t.payload[4..8], &1.0f32.to_le_bytes());
    }

    /// A node-sim answering at once, on `addr` (port 0: any free one).
    async fn echo_node(addr: &str) -> crate::node::RunningNodeSim {
        use crate::node::{NodeSimConfig, ServiceTime, spawn};
        let config = NodeSimConfig {
            name: "n1".into(),
            service_time: ServiceTime::Constant(Duration::ZERO),
            ..NodeSimConfig::default()
        };
        spawn(config, addr.parse().unwrap()).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_after_the_connection_ended_makes_a_new_one() {
        let node = echo_node("127.0.0.1:0").await;
        let addr = node.url().trim_start_matches("http://").to_owned();
        let client = Client::connect(&addr, Duration::from_secs(2))
            .await
            .unwrap();
        let t = Template::new("echo", 4);
        let headers = call_headers(MetadataMap::new(), Duration::from_secs(2));
        let answer = client.model_infer(&headers, t.message("1")).await.unwrap();
        assert_eq!(answer.get_ref().id, "1");
        assert!(echoes(
            answer.get_ref(),
            &Expected {
                due: Instant::now(),
                at_us: 0,
                id: "1".into(),
                payload: t.payload.clone()
            }
        ));
        node.stop().await;
        // The node is gone: the call fails as unavailable.
        let lost = client
            .model_infer(&headers, t.message("2"))
            .await
            .unwrap_err();
        assert_eq!(lost.code(), tonic::Code::Unavailable, "{lost:?}");
        // A node on the same address again: the next call connects anew.
        let node = echo_node(&addr).await;
        let answer = client.model_infer(&headers, t.message("3")).await.unwrap();
        assert_eq!(answer.get_ref().id, "3");
        node.stop().await;
    }

    #[tokio::test]
    async fn a_call_the_target_refused_unprocessed_is_sent_again_on_a_new_connection() {
        use std::sync::atomic::AtomicU32;
        // The first connection refuses every stream (REFUSED_STREAM: never processed); later
        // ones answer with an echo of id "7".
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let conns = Arc::new(AtomicU32::new(0));
        let count = conns.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let refuse = count.fetch_add(1, Ordering::SeqCst) == 0;
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else {
                        return;
                    };
                    while let Some(Ok((_request, mut respond))) = conn.accept().await {
                        if refuse {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        let answer = ModelInferResponse {
                            id: "7".into(),
                            ..ModelInferResponse::default()
                        }
                        .encode_to_vec();
                        let mut body = vec![0];
                        body.extend_from_slice(&(answer.len() as u32).to_be_bytes());
                        body.extend_from_slice(&answer);
                        let head = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(head, false).unwrap();
                        send.send_data(body.into(), false).unwrap();
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        send.send_trailers(trailers).unwrap();
                    }
                });
            }
        });
        let client = Client::connect(&addr, Duration::from_secs(2))
            .await
            .unwrap();
        let t = Template::new("echo", 1);
        let headers = call_headers(MetadataMap::new(), Duration::from_secs(2));
        let answer = client.model_infer(&headers, t.message("7")).await.unwrap();
        assert_eq!(answer.get_ref().id, "7");
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "sent again on a second connection"
        );
    }

    #[tokio::test]
    async fn an_unknown_model_is_the_targets_status() {
        let node = echo_node("127.0.0.1:0").await;
        let report = run(LoadConfig {
            target: node.url(),
            model: "no-such-model".into(),
            rps: 50.0,
            duration: Duration::from_millis(100),
            connections: 1,
            ..config()
        })
        .await
        .unwrap();
        assert_eq!(report.ok, 0, "{report}");
        assert_eq!(
            report.errors.get("NOT_FOUND"),
            Some(&report.sent),
            "{report}"
        );
        node.stop().await;
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
