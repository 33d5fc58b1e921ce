//! The simulated node's shared state: its run-time settings (health and fault injection), which
//! [`SimControls`] and the `fulcrum.v1.NodeSimControl/Configure` RPC change, and its counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::SimConfig;
use fulcrum_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::service::InferenceService;
use super::{NodeSimConfig, SimError};

/// The settings of a simulated node that can change while it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimSettings {
    /// Whether the node reports itself ready and serves inference.
    pub healthy: bool,
    /// Share of answered calls that fail with UNAVAILABLE, in [0, 1].
    pub error_ratio: f64,
    /// Share of calls that never answer (until the caller's deadline), in [0, 1].
    pub hang_ratio: f64,
    /// What is left of the current stall (zero when the node is not stalled).
    pub stall_left: Duration,
}

/// Longest stall one change may start. Stalls model pauses of seconds (a garbage collection, a
/// GPU reset); ten minutes is far beyond any of them, and a larger value is more likely a unit
/// mistake (microseconds for milliseconds) than a wish to freeze a node for hours.
pub const MAX_STALL: Duration = Duration::from_secs(600);

/// A change of settings: fields left `None` keep their value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SimUpdate {
    /// New health.
    pub healthy: Option<bool>,
    /// New error ratio, in [0, 1].
    pub error_ratio: Option<f64>,
    /// New hang ratio, in [0, 1].
    pub hang_ratio: Option<f64>,
    /// Stall for this long from now (replacing any stall in progress; zero ends it), at most
    /// [`MAX_STALL`].
    pub stall: Option<Duration>,
}

impl From<SimConfig> for SimUpdate {
    fn from(c: SimConfig) -> Self {
        Self {
            healthy: c.healthy,
            error_ratio: c.error_ratio,
            hang_ratio: c.hang_ratio,
            stall: c.stall_ms.map(Duration::from_millis),
        }
    }
}

impl From<SimSettings> for SimConfig {
    fn from(s: SimSettings) -> Self {
        Self {
            healthy: Some(s.healthy),
            error_ratio: Some(s.error_ratio),
            hang_ratio: Some(s.hang_ratio),
            stall_ms: Some(u64::try_from(s.stall_left.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// What a simulated node has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Inference requests received (unary calls and stream messages), whatever their outcome.
    pub calls: u64,
    /// Inference requests admitted and not yet answered (waiting for a slot or in service).
    pub in_flight: u64,
    /// Inference requests answered successfully, per served model.
    pub served: BTreeMap<String, u64>,
}

/// A simulated node's load at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimLoad {
    /// Calls served at once at most (the configured slots).
    pub slots: usize,
    /// Slots in use.
    pub busy_slots: usize,
    /// Calls admitted and waiting for a slot.
    pub queued: usize,
}

impl SimLoad {
    /// Share of the slots in use, in [0, 1].
    pub fn utilization(&self) -> f64 {
        if self.slots == 0 {
            return 0.0;
        }
        (self.busy_slots as f64 / self.slots as f64).clamp(0.0, 1.0)
    }
}

/// A cloneable handle on a running (or about to run) simulated node: reads and changes its
/// settings, and reads its counters. Health changes are reflected in `grpc.health.v1` before
/// the changing call returns.
#[derive(Debug, Clone)]
pub struct SimControls {
    pub(crate) shared: Arc<Shared>,
}

/// Everything the node's services share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    /// `x-fulcrum-sim-node` response header value; `None` if the name is not a valid header.
    pub(crate) node_header: Option<AsciiMetadataValue>,
    pub(crate) service_time: super::ServiceTime,
    pub(crate) slots: usize,
    pub(crate) queue: usize,
    /// Served models and the number of successful answers for each.
    pub(crate) served: HashMap<String, AtomicU64>,
    /// Models in configuration order, for metadata answers.
    pub(crate) models: Vec<String>,
    /// `slots + queue` permits: a call that cannot take one is rejected, so at most `queue`
    /// calls ever wait for a slot.
    pub(crate) admission: Semaphore,
    /// `slots` permits: held while a call is in service.
    pub(crate) slot_permits: Semaphore,
    pub(crate) rng: Mutex<SmallRng>,
    pub(crate) calls: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    /// The request headers of the last `ModelInfer` call: what a router passed on.
    pub(crate) last_headers: Mutex<Option<http::HeaderMap>>,
    /// Triton sequences open on this node.
    pub(crate) sequences: super::sequences::Sequences,
    healthy: AtomicBool,
    /// `f64` bits.
    error_ratio: AtomicU64,
    /// `f64` bits.
    hang_ratio: AtomicU64,
    /// When the current stall ends, if one was started. A watch, so that calls waiting for the
    /// end of a stall wake up when it is cut short or extended.
    pub(crate) stall_end: tokio::sync::watch::Sender<Option<Instant>>,
    /// Serializes changes, so that concurrent changes cannot leave the health flag and the
    /// health reporter disagreeing, and `configure` returns a consistent snapshot.
    update: tokio::sync::Mutex<()>,
    pub(crate) health: HealthReporter,
}

impl Shared {
    pub(crate) fn new(config: NodeSimConfig) -> Result<Self, SimError> {
        config.validate()?;
        let node_header = MetadataValue::try_from(config.name.as_str()).ok();
        if node_header.is_none() {
            tracing::warn!(
                name = %config.name,
                "node name is not a valid header value; responses will not carry x-fulcrum-sim-node"
            );
        }
        let rng = match config.seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_os_rng(),
        };
        let mut served = HashMap::with_capacity(config.models.len());
        let mut models = Vec::with_capacity(config.models.len());
        for m in config.models {
            if !served.contains_key(&m) {
                served.insert(m.clone(), AtomicU64::new(0));
                models.push(m);
            }
        }
        Ok(Self {
            node_header,
            service_time: config.service_time,
            slots: config.slots,
            queue: config.queue,
            served,
            models,
            // `validate` checked that the sum is within the semaphore's limit.
            admission: Semaphore::new(config.slots + config.queue),
            slot_permits: Semaphore::new(config.slots),
            rng: Mutex::new(rng),
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_headers: Mutex::new(None),
            sequences: Default::default(),
            healthy: AtomicBool::new(true),
            error_ratio: AtomicU64::new(config.error_ratio.to_bits()),
            hang_ratio: AtomicU64::new(config.hang_ratio.to_bits()),
            stall_end: tokio::sync::watch::Sender::new(None),
            update: tokio::sync::Mutex::new(()),
            health: HealthReporter::new(),
            name: config.name,
        })
    }

    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub(crate) fn error_ratio(&self) -> f64 {
        f64::from_bits(self.error_ratio.load(Ordering::Acquire))
    }

    pub(crate) fn hang_ratio(&self) -> f64 {
        f64::from_bits(self.hang_ratio.load(Ordering::Acquire))
    }

    /// When the current stall ends, if one is in progress.
    pub(crate) fn stall_end(&self) -> Option<Instant> {
        let end = (*self.stall_end.borrow())?;
        (end > Instant::now()).then_some(end)
    }

    /// Waits until no stall is in progress, following changes made meanwhile.
    pub(crate) async fn wait_out_stall(&self) {
        if self.stall_end().is_none() {
            return;
        }
        let mut changes = self.stall_end.subscribe();
        loop {
            let end = *changes.borrow_and_update();
            match end {
                Some(end) if end > Instant::now() => {
                    tokio::select! {
                        () = tokio::time::sleep_until(end) => {}
                        // The sender lives as long as `self`; an error cannot happen while a
                        // call holds `self`, but ending the wait is the safe answer anyway.
                        changed = changes.changed() => if changed.is_err() { return },
                    }
                }
                _ => return,
            }
        }
    }

    /// Starts a stall of `length` from now (zero ends the current one).
    fn stall(&self, length: Duration) {
        let end = (!length.is_zero()).then(|| Instant::now() + length);
        self.stall_end.send_replace(end);
    }

    pub(crate) fn serves(&self, model: &str) -> bool {
        self.served.contains_key(model)
    }

    fn settings(&self) -> SimSettings {
        SimSettings {
            healthy: self.healthy(),
            error_ratio: self.error_ratio(),
            hang_ratio: self.hang_ratio(),
            stall_left: self.stall_end().map_or(Duration::ZERO, |end| {
                end.saturating_duration_since(Instant::now())
            }),
        }
    }

    /// Sets the health reporter from the health flag; callers hold `update`.
    async fn publish_health(&self) {
        let status = if self.healthy() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        // "" is the server as a whole, which is what probes ask about; the service's own name is
        // kept in step for clients that ask about it specifically.
        self.health.set_service_status("", status).await;
        self.health
            .set_service_status(
                <GrpcInferenceServiceServer<InferenceService> as NamedService>::NAME,
                status,
            )
            .await;
    }
}

/// Checks that a ratio is a probability.
pub(crate) fn check_ratio(field: &'static str, value: f64) -> Result<(), SimError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(SimError::InvalidRatio { field, value })
    }
}

impl SimControls {
    /// The node's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The models the node serves, in configuration order, without duplicates.
    pub fn models(&self) -> &[String] {
        &self.shared.models
    }

    /// The current settings.
    pub fn settings(&self) -> SimSettings {
        self.shared.settings()
    }

    /// Applies `update` all at once, or not at all if a ratio is outside [0, 1] (or NaN), and
    /// returns the settings now in force.
    pub async fn configure(&self, update: SimUpdate) -> Result<SimSettings, SimError> {
        if let Some(r) = update.error_ratio {
            check_ratio("error_ratio", r)?;
        }
        if let Some(r) = update.hang_ratio {
            check_ratio("hang_ratio", r)?;
        }
        if let Some(stall) = update.stall
            && stall > MAX_STALL
        {
            return Err(SimError::InvalidConfig(format!(
                "stall must be at most {} ms, got {} ms",
                MAX_STALL.as_millis(),
                stall.as_millis()
            )));
        }
        let shared = &*self.shared;
        let _guard = shared.update.lock().await;
        if let Some(r) = update.error_ratio {
            shared.error_ratio.store(r.to_bits(), Ordering::Release);
        }
        if let Some(r) = update.hang_ratio {
            shared.hang_ratio.store(r.to_bits(), Ordering::Release);
        }
        if let Some(stall) = update.stall {
            shared.stall(stall);
        }
        if let Some(h) = update.healthy {
            shared.healthy.store(h, Ordering::Release);
            shared.publish_health().await;
        }
        Ok(shared.settings())
    }

    /// Marks the node healthy or not: `ServerReady`, `ModelReady` and `grpc.health.v1` follow,
    /// and inference calls fail with UNAVAILABLE while unhealthy.
    pub async fn set_healthy(&self, healthy: bool) {
        let update = SimUpdate {
            healthy: Some(healthy),
            ..SimUpdate::default()
        };
        // Infallible: no ratio is being set.
        let _ = self.configure(update).await;
    }

    /// Sets the share of answered calls that fail with UNAVAILABLE.
    pub async fn set_error_ratio(&self, ratio: f64) -> Result<(), SimError> {
        let update = SimUpdate {
            error_ratio: Some(ratio),
            ..SimUpdate::default()
        };
        self.configure(update).await.map(drop)
    }

    /// Sets the share of calls that never answer.
    pub async fn set_hang_ratio(&self, ratio: f64) -> Result<(), SimError> {
        let update = SimUpdate {
            hang_ratio: Some(ratio),
            ..SimUpdate::default()
        };
        self.configure(update).await.map(drop)
    }

    /// Inference requests received so far (unary calls and stream messages).
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::Relaxed)
    }

    /// The request headers of the last `ModelInfer` call received (what the caller, or a router
    /// in front, sent), if there was one.
    pub fn last_headers(&self) -> Option<http::HeaderMap> {
        self.shared
            .last_headers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Triton sequences open on the node (started, not ended).
    pub fn open_sequences(&self) -> usize {
        self.shared.sequences.len()
    }

    /// Inference requests admitted and not yet answered.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Successful answers for `model` so far (0 for a model the node does not serve).
    pub fn served(&self, model: &str) -> u64 {
        self.shared
            .served
            .get(model)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The node's load now: slots in use and calls queued for one (read from the semaphores,
    /// each atomically, not both together).
    pub fn load(&self) -> SimLoad {
        let shared = &*self.shared;
        let busy_slots = shared
            .slots
            .saturating_sub(shared.slot_permits.available_permits());
        let admitted =
            (shared.slots + shared.queue).saturating_sub(shared.admission.available_permits());
        SimLoad {
            slots: shared.slots,
            busy_slots,
            queued: admitted.saturating_sub(busy_slots),
        }
    }

    /// All counters at once (each read atomically, not all together).
    pub fn stats(&self) -> SimStats {
        SimStats {
            calls: self.calls(),
            in_flight: self.in_flight(),
            served: self
                .shared
                .served
                .iter()
                .map(|(m, c)| (m.clone(), c.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Brings the health reporter in step with the health flag (used when serving starts).
    pub(crate) async fn sync_health(&self) {
        let _guard = self.shared.update.lock().await;
        self.shared.publish_health().await;
    }
}
