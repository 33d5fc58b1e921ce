//! A simulated Open Inference Protocol v2 node: a measuring instrument for tests and benchmarks.
//!
//! It serves `inference.GRPCInferenceService` (every served model echoes its inputs),
//! `grpc.health.v1.Health` and `fulcrum.v1.NodeSimControl`. Each inference request goes through
//! the same steps, in this order:
//!
//! 1. health: an unhealthy node answers UNAVAILABLE;
//! 2. model and request checks: NOT_FOUND for a model the node does not serve, INVALID_ARGUMENT
//!    for a malformed request, and for a request of a Triton sequence this node never saw start
//!    (`sequence_id`, `sequence_start`, `sequence_end`: the sequence's state is on the node that
//!    saw its start, as on a Triton server; see `sequences.rs`);
//! 3. admission: at most `slots + queue` requests are admitted at once; one more is answered
//!    RESOURCE_EXHAUSTED at once, so at most `queue` requests ever wait for a slot;
//! 4. a slot: at most `slots` requests are in service at once, the others wait in FIFO order;
//! 5. with probability `hang_ratio`, the request is never answered (it holds its slot until the
//!    caller gives up: deadline or cancellation); otherwise, with probability `error_ratio`, it
//!    fails at once with UNAVAILABLE ("injected failure"); otherwise it holds its slot for a
//!    service time drawn from [`ServiceTime`] and is answered.
//!
//! Service times are slept on tokio's timer, which has millisecond resolution and rounds
//! deadlines up: a call is held for its service time plus up to about a millisecond (plus
//! scheduling delay on a busy machine), so sub-millisecond settings measure the timer, not the
//! setting. Benchmarks should compare runs against the same simulator (say, direct and through
//! a router) rather than against the configured time. Every `ModelInfer` answer, success or error, carries the response header
//! `x-fulcrum-sim-node: <name>`, and so do `ModelStreamInfer` streams.

mod controls;
mod sequences;
mod service;
mod service_time;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::node_sim_control_server::NodeSimControlServer;
use fulcrum_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthService;

pub use controls::{MAX_STALL, SimControls, SimLoad, SimSettings, SimStats, SimUpdate};
pub use service_time::{ParseServiceTimeError, ServiceTime};

use controls::{Shared, check_ratio};
use service::{ControlService, InferenceService};

/// Largest message the node accepts or sends. tonic's default decoding limit (4 MiB) is below
/// real inference payloads (a batch of images, a long token sequence), and a benchmark that
/// measures a router with large tensors must not be cut short by the simulator. 64 MiB covers
/// those payloads while still bounding what one call can make the node buffer.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// How long [`RunningNodeSim::stop`] waits for calls in progress before it gives up on a
/// graceful shutdown. Calls in service finish within their service time (milliseconds by
/// default), but a hanging call never does; two seconds is long enough for the former and keeps
/// `stop` from waiting on the latter until its caller's deadline.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The response header naming the simulated node that answered.
pub const NODE_HEADER: &str = "x-fulcrum-sim-node";

/// Platform reported in `ModelMetadata`.
pub(crate) const PLATFORM: &str = "fulcrum-sim";

/// How a simulated node behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSimConfig {
    /// The node's id, reported in `ServerMetadata` and in the `x-fulcrum-sim-node` header.
    pub name: String,
    /// Models served; each one echoes its inputs.
    pub models: Vec<String>,
    /// Time one call holds a slot.
    pub service_time: ServiceTime,
    /// Calls served at once.
    pub slots: usize,
    /// Calls that may wait for a slot; beyond them, calls are answered RESOURCE_EXHAUSTED.
    pub queue: usize,
    /// Initial share of answered calls that fail with UNAVAILABLE, in [0, 1].
    pub error_ratio: f64,
    /// Initial share of calls that never answer, in [0, 1].
    pub hang_ratio: f64,
    /// Seed of the random draws (fault injection, service times); `None` seeds from the OS.
    /// With a seed, the sequence of draws is reproducible, though which call gets which draw
    /// depends on arrival order.
    pub seed: Option<u64>,
}

impl Default for NodeSimConfig {
    /// One model, `echo`, with 4 slots and a queue of 64: a small GPU server that batches a few
    /// requests at once and lets a bounded backlog build before shedding load, so benchmarks
    /// see queueing delay first and overload errors second, as with a real server.
    fn default() -> Self {
        Self {
            name: "sim".to_string(),
            models: vec!["echo".to_string()],
            service_time: ServiceTime::default(),
            slots: 4,
            queue: 64,
            error_ratio: 0.0,
            hang_ratio: 0.0,
            seed: None,
        }
    }
}

impl NodeSimConfig {
    /// Checks the configuration: a non-empty name, at least one slot, ratios in [0, 1], a valid
    /// service time.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.name.is_empty() {
            return Err(SimError::InvalidConfig("the node name is empty".into()));
        }
        if self.slots == 0 {
            return Err(SimError::InvalidConfig(
                "slots must be at least 1 (no call could ever be served)".into(),
            ));
        }
        if self
            .slots
            .checked_add(self.queue)
            .is_none_or(|n| n > tokio::sync::Semaphore::MAX_PERMITS)
        {
            return Err(SimError::InvalidConfig(format!(
                "slots + queue must be at most {}",
                tokio::sync::Semaphore::MAX_PERMITS
            )));
        }
        if self.models.iter().any(String::is_empty) {
            return Err(SimError::InvalidConfig("a model name is empty".into()));
        }
        check_ratio("error_ratio", self.error_ratio)?;
        check_ratio("hang_ratio", self.hang_ratio)?;
        self.service_time
            .validate()
            .map_err(|e| SimError::InvalidConfig(e.to_string()))
    }
}

/// Why a simulated node could not be configured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// A ratio is outside [0, 1] or NaN.
    #[error("{field} must be in [0, 1], got {value}")]
    InvalidRatio {
        /// The setting.
        field: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// Another setting is invalid; the message says which and why.
    #[error("invalid node-sim configuration: {0}")]
    InvalidConfig(String),
}

impl From<SimError> for tonic::Status {
    fn from(e: SimError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// A simulated node, configured and ready to serve.
#[derive(Debug)]
pub struct NodeSim {
    controls: SimControls,
}

impl NodeSim {
    /// A node with this configuration, or why it is invalid.
    pub fn new(config: NodeSimConfig) -> Result<Self, SimError> {
        let shared = Arc::new(Shared::new(config)?);
        Ok(Self {
            controls: SimControls { shared },
        })
    }

    /// A handle to change the node's settings and read its counters, before or while it serves.
    pub fn controls(&self) -> SimControls {
        self.controls.clone()
    }

    /// Serves the node on `listener` until `shutdown` completes, then finishes the calls in
    /// progress (a graceful shutdown) and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let controls = self.controls;
        controls.sync_health().await;
        let shared = controls.shared.clone();
        let health = tonic_health::pb::health_server::HealthServer::new(
            HealthService::from_health_reporter(shared.health.clone()),
        );
        let inference = GrpcInferenceServiceServer::new(InferenceService::new(shared))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
            // As Triton: gzip and deflate requests accepted, answers uncompressed.
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Deflate);
        let control = NodeSimControlServer::new(ControlService::new(controls));
        // Without TCP_NODELAY, Nagle's algorithm holds small response frames back until the
        // client acknowledges earlier ones, adding up to tens of milliseconds to measured
        // latencies; a measuring instrument must not.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(inference)
            .add_service(control)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }
}

/// Binds `addr` (port 0 picks a free port) and serves a node with `config` on a tokio task.
pub async fn spawn(config: NodeSimConfig, addr: SocketAddr) -> std::io::Result<RunningNodeSim> {
    let sim = NodeSim::new(config)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let controls = sim.controls();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(sim.serve(listener, async move {
        // Either a stop request or the sender's drop ends serving.
        let _ = stopped.await;
    }));
    Ok(RunningNodeSim {
        addr,
        controls,
        stop: Some(stop),
        task: Some(task),
    })
}

/// A simulated node serving on a tokio task. Dropping it stops the node: the listener closes
/// at once and connections are shut down gracefully in the background.
#[derive(Debug)]
pub struct RunningNodeSim {
    /// The address the node listens on.
    pub addr: SocketAddr,
    controls: SimControls,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl RunningNodeSim {
    /// A handle to change the node's settings and read its counters.
    pub fn controls(&self) -> SimControls {
        self.controls.clone()
    }

    /// `http://<addr>`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections, waits (at most two seconds) for calls in progress to
    /// finish, and returns once the server task has ended.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(mut task) = self.task.take() else {
            return;
        };
        match tokio::time::timeout(STOP_GRACE, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "node-sim server failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "node-sim server task failed"),
            Err(_) => {
                tracing::warn!(
                    node = %self.controls.name(),
                    "calls still in progress after {STOP_GRACE:?}; stopping the node-sim anyway"
                );
                task.abort();
                let _ = task.await;
            }
        }
    }
}

impl Drop for RunningNodeSim {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests;
