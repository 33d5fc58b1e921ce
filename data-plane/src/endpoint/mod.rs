//! A node as the router holds it across routing tables: its pooled connection, the calls in
//! flight to it, its latency estimate, its outlier state and its concurrency limit.
//!
//! - [`peak_ewma`]: the latency estimate that ranks nodes.
//! - [`hold_time`]: the mean time a call holds a slot (how fast the node frees slots).
//! - [`outlier`]: consecutive-failure ejection.
//! - [`reconnect`]: backoff after a failed connection.
//! - [`unary`]: unary calls on the router's own HTTP/2 client (the `ModelInfer` hot path).

pub mod hold_time;
pub mod outlier;
pub mod peak_ewma;
pub mod reconnect;
pub mod unary;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Response, Status};

use hold_time::HoldTime;
use outlier::Outlier;
use peak_ewma::PeakEwma;
use rand::Rng;
use reconnect::Reconnect;
use unary::{Target, UnaryConn};

use crate::queue::WaitQueue;

/// Connect timeout to a node. Nodes are in the same or the neighbouring data center; a second
/// is many round trips even across regions, and a dead node must not hold a call for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP/2 keep-alive: a silently dead node (power loss, partition) is detected in
/// interval + timeout = 10 s even when no call is in flight to fail fast on it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How much slower than its usual latency a failed call makes a node look. Four times: enough
/// that power-of-two-choices steers around a node failing fast (instead of preferring it for
/// its short "latency"), while a node with a rare failure recovers its share within a couple of
/// seconds as the estimate decays.
const FAILURE_PENALTY: u32 = 4;

/// Nanoseconds since the first call in this process, on tokio's clock (so tests with paused
/// time control it).
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(base).as_nanos() as u64
}

/// How a finished call reflects on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered (an answer about the request itself, like NOT_FOUND, counts too).
    Success,
    /// It failed in a way that is the node's fault: unreachable, overloaded, timed out.
    Failure,
    /// Cancelled by the router (a hedge lost, the caller left): says nothing about the node.
    Cancelled,
}

/// One serving thread's connections to a node.
#[derive(Debug, Default)]
struct ShardSlot {
    /// The `Channel` (streams, the other RPCs), once made.
    channel: OnceLock<Channel>,
    /// Whether a background connect is under way (one at a time).
    connecting: AtomicBool,
    /// The connection for unary calls ([`unary`]).
    unary: UnaryConn,
}

/// A pooled node connection, shared by every table that contains the node.
#[derive(Debug)]
pub struct NodeConn {
    /// Node id.
    pub id: String,
    /// The address the channel connects to.
    pub address: String,
    /// The node's region.
    pub region: String,
    /// `id` and `region` as response metadata values (made once; a call clones them).
    pub(crate) tags: (Option<HeaderValue>, Option<HeaderValue>),
    /// How to connect to the node.
    endpoint: Endpoint,
    /// Where the node is, for the unary client.
    target: Target,
    /// The connection used outside the router's serving threads (tests, tools).
    shared: OnceLock<Channel>,
    /// The unary connection used outside the router's serving threads.
    shared_unary: UnaryConn,
    /// One connection per serving thread ([`crate::shard`]), made by that thread on its first
    /// call, so that a call and its connection's tasks run on the same thread.
    per_shard: OnceLock<Box<[ShardSlot]>>,
    /// Latency estimate.
    pub latency: PeakEwma,
    /// Mean time a call holds a slot.
    pub hold: HoldTime,
    /// Outlier state.
    pub outlier: Outlier,
    /// Reconnect backoff.
    pub reconnect: Reconnect,
    in_flight: AtomicU32,
    /// The calls in flight integrated over time, for the mean reported to the control plane.
    busy: Mutex<Busy>,
    limit: AtomicU32,
    calls: AtomicU64,
    errors: AtomicU64,
    /// `calls` and `errors` since the start, for metrics (those two are reset by load reports).
    calls_total: AtomicU64,
    errors_total: AtomicU64,
    /// Calls in the wait queue that could use this node, by priority (kept by [`WaitQueue`]).
    pub(crate) waiting: [AtomicU32; 3],
    queue: Arc<WaitQueue>,
}

impl NodeConn {
    /// A connection to `address`, allowing `limit` concurrent calls from this router; a call
    /// ending hands its slot to `queue`'s next waiter.
    pub fn new(
        id: &str,
        address: &str,
        region: &str,
        limit: u32,
        queue: Arc<WaitQueue>,
    ) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("node {id}: bad address {address:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let authority = address
            .parse()
            .map_err(|e| format!("node {id}: bad address {address:?}: {e}"))?;
        Ok(Self {
            id: id.to_owned(),
            address: address.to_owned(),
            region: region.to_owned(),
            tags: (
                HeaderValue::from_str(id).ok(),
                HeaderValue::from_str(region).ok(),
            ),
            endpoint,
            target: Target {
                address: address.to_owned(),
                authority,
            },
            shared: OnceLock::new(),
            shared_unary: UnaryConn::default(),
            per_shard: OnceLock::new(),
            latency: PeakEwma::new(now_ns()),
            hold: HoldTime::default(),
            outlier: Outlier::default(),
            reconnect: Reconnect::default(),
            in_flight: AtomicU32::new(0),
            busy: Mutex::new(Busy::new(now_ns())),
            limit: AtomicU32::new(limit),
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            calls_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            waiting: std::array::from_fn(|_| AtomicU32::new(0)),
            queue,
        })
    }

    /// The lazily connected, reconnecting HTTP/2 channel to the node for the calling thread:
    /// a serving thread's own connection, made on its first call (its tasks then live on that
    /// thread's runtime), or the shared one elsewhere. Must be called within a tokio runtime.
    pub fn channel(&self) -> Channel {
        match self.shard_slot() {
            Some(slot) => slot
                .channel
                .get_or_init(|| self.endpoint.connect_lazy())
                .clone(),
            None => self
                .shared
                .get_or_init(|| self.endpoint.connect_lazy())
                .clone(),
        }
    }

    /// Sends a unary call to the node on the calling thread's [`unary`] connection: `message`
    /// (one encoded protobuf message) to `path` with `headers` (the caller's metadata,
    /// `grpc-timeout` included); the answer is a message of at most `max_response` bytes, as
    /// the node encoded it.
    pub async fn unary(
        &self,
        path: PathAndQuery,
        headers: HeaderMap,
        message: Bytes,
        max_response: usize,
    ) -> Result<Response<Bytes>, Status> {
        let conn = match self.shard_slot() {
            Some(slot) => &slot.unary,
            None => &self.shared_unary,
        };
        conn.call(&self.target, path, headers, message, max_response)
            .await
    }

    /// On a serving thread without connections to the node yet: connects in the background
    /// (the call that would have connected is then spared the wait, and the node's latency
    /// estimate the connect time). A failure changes nothing: the first call connects lazily.
    pub fn preconnect(self: &Arc<Self>) {
        let Some(slot) = self.shard_slot() else {
            return;
        };
        if !slot.unary.is_ready() {
            let node = self.clone();
            tokio::spawn(async move {
                if let Some(slot) = node.shard_slot() {
                    slot.unary.preconnect(&node.target).await;
                }
            });
        }
        if slot.channel.get().is_some() || slot.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            let connected = node.endpoint.connect().await;
            if let Some(slot) = node.shard_slot() {
                if let Ok(channel) = connected {
                    // A call may have connected meanwhile; its channel stays.
                    let _ = slot.channel.set(channel);
                }
                slot.connecting.store(false, Ordering::Release);
            }
        });
    }

    /// The calling serving thread's connection slot, if the caller is a serving thread.
    fn shard_slot(&self) -> Option<&ShardSlot> {
        let (index, count) = crate::shard::current()?;
        self.per_shard
            .get_or_init(|| (0..count).map(|_| ShardSlot::default()).collect())
            .get(index)
    }

    /// Calls in flight from this router.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The concurrency limit (0: none).
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Updates the concurrency limit (the node's capacity changed).
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Whether the node is at its concurrency limit.
    pub fn is_full(&self) -> bool {
        let limit = self.limit();
        limit > 0 && self.in_flight() >= limit
    }

    /// Takes a slot, unless the node is at its limit.
    pub fn try_start_call(self: &Arc<Self>) -> Option<InFlight> {
        let limit = self.limit();
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (limit == 0 || n < limit).then_some(n + 1)
            })
            .ok()?;
        self.busy().change(1, now_ns());
        Some(InFlight(self.clone()))
    }

    /// Takes a slot whatever the limit (streams, panic routing).
    pub fn start_call(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.busy().change(1, now_ns());
        InFlight(self.clone())
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, Busy> {
        // Every update leaves the integral whole: a panic elsewhere cannot leave it half-done.
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The calls in flight integrated over time until now (call-nanoseconds since the node
    /// was added): the difference of two readings divided by the time between them is the
    /// mean count in flight over that time.
    pub fn busy_ns(&self) -> u128 {
        self.busy().integral(now_ns())
    }

    /// The mean count in flight since the previous call of this method (since the node was
    /// added, the first time), for load reports; `None` when no time has passed.
    pub fn take_mean_in_flight(&self) -> Option<f64> {
        self.busy().take_mean(now_ns())
    }

    /// Records how a call ended and how long it took; returns the failure streak after a
    /// failure (0 otherwise).
    pub fn record(&self, outcome: Outcome, elapsed: Duration) -> u32 {
        let now = now_ns();
        self.hold.observe(elapsed);
        match outcome {
            Outcome::Success => {
                self.calls.fetch_add(1, Ordering::Relaxed);
                self.calls_total.fetch_add(1, Ordering::Relaxed);
                self.latency.observe(elapsed, now);
                self.outlier.on_success(now / 1_000_000);
                self.reconnect.succeeded();
                0
            }
            Outcome::Failure => {
                self.calls.fetch_add(1, Ordering::Relaxed);
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.calls_total.fetch_add(1, Ordering::Relaxed);
                self.errors_total.fetch_add(1, Ordering::Relaxed);
                // A failure counts as a call FAILURE_PENALTY times slower than the node's usual:
                // a node that fails fast must not look fast (p2c would pour calls into it), and
                // a node that times out is at least as slow as the time it took.
                // Never panics: the estimate is finite and at most a minute (`MAX_ESTIMATE`),
                // and `saturating_mul` cannot overflow.
                let usual = Duration::try_from_secs_f64(self.latency.estimate_ms(now) / 1e3)
                    .unwrap_or(peak_ewma::MAX_ESTIMATE);
                self.latency
                    .observe(elapsed.max(usual.saturating_mul(FAILURE_PENALTY)), now);
                self.outlier.on_failure()
            }
            Outcome::Cancelled => 0,
        }
    }

    /// A connection to the node could not be made: calls skip it for a while (see
    /// [`reconnect`]), and the failure about to be recorded makes it an outlier at once.
    pub fn connect_failed(&self) {
        self.outlier.on_unreachable();
        let pause = self
            .reconnect
            .failed(now_ns() / 1_000_000, rand::rng().random());
        tracing::debug!(node = %self.id, ?pause, "cannot connect; pausing calls to the node");
    }

    /// Whether calls should skip the node now: ejected as an outlier, or in reconnect backoff.
    pub fn is_out(&self, now_ms: u64) -> bool {
        self.outlier.is_ejected(now_ms) || self.reconnect.is_paused(now_ms)
    }

    /// Attempts and failed attempts since the router started (for metrics).
    pub fn totals(&self) -> (u64, u64) {
        (
            self.calls_total.load(Ordering::Relaxed),
            self.errors_total.load(Ordering::Relaxed),
        )
    }

    /// Calls and errors since the previous call of this method (for load reports).
    pub fn take_counts(&self) -> (u64, u64) {
        (
            self.calls.swap(0, Ordering::Relaxed),
            self.errors.swap(0, Ordering::Relaxed),
        )
    }
}

/// A count in flight integrated over time: each change adds the count so far times the time
/// it lasted. A lock, not atomics: the integral and the count must change together (read
/// apart, a call started between the two reads would count as in flight since the start),
/// and a node's lock is held for a few instructions, twice a call.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Busy {
    /// The count since `since_ns`.
    count: u64,
    since_ns: u64,
    /// Call-nanoseconds up to `since_ns`.
    integral: u128,
    /// The integral and the time of the last [`Busy::take_mean`].
    taken: (u128, u64),
}

impl Busy {
    /// Nothing in flight, from `now_ns` on.
    pub(crate) fn new(now_ns: u64) -> Self {
        Self {
            since_ns: now_ns,
            taken: (0, now_ns),
            ..Self::default()
        }
    }

    /// The mean count from the previous call (or the start) to `now_ns`; `None` when no time
    /// has passed.
    pub(crate) fn take_mean(&mut self, now_ns: u64) -> Option<f64> {
        let (integral, at) = self.taken;
        let elapsed = now_ns.checked_sub(at).filter(|&e| e > 0)?;
        let now_integral = self.integral(now_ns);
        self.taken = (now_integral, now_ns);
        Some(now_integral.saturating_sub(integral) as f64 / elapsed as f64)
    }

    /// The count changes by `delta` at `now_ns` (a clock that never goes back; a reading
    /// earlier than the last one counts as the same instant).
    pub(crate) fn change(&mut self, delta: i64, now_ns: u64) {
        self.integral = self.integral(now_ns);
        self.since_ns = self.since_ns.max(now_ns);
        self.count = self.count.saturating_add_signed(delta);
    }

    /// Call-nanoseconds up to `now_ns`.
    pub(crate) fn integral(&self, now_ns: u64) -> u128 {
        let elapsed = now_ns.saturating_sub(self.since_ns);
        self.integral + u128::from(self.count) * u128::from(elapsed)
    }
}

/// One in-flight call on a node; released on drop (also when a call is cancelled).
#[derive(Debug)]
pub struct InFlight(Arc<NodeConn>);

impl InFlight {
    /// The node the call is on.
    pub fn node(&self) -> &Arc<NodeConn> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.busy().change(-1, now_ns());
        self.0.queue.slot_freed(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_limit_is_enforced_and_slots_come_back() {
        let n = Arc::new(NodeConn::new("n", "127.0.0.1:1", "a", 2, Arc::default()).unwrap());
        let a = n.try_start_call().unwrap();
        let _b = n.try_start_call().unwrap();
        assert!(n.is_full());
        assert!(n.try_start_call().is_none());
        drop(a);
        assert_eq!(n.in_flight(), 1);
        assert!(n.try_start_call().is_some());
        // Streams ignore the limit.
        let _s = n.start_call();
        assert_eq!(n.in_flight(), 2);
    }

    #[test]
    fn busy_integrates_the_count_over_time() {
        let mut b = Busy::default();
        assert_eq!(b.integral(1_000), 0);
        b.change(1, 100);
        b.change(1, 300);
        // One call for 200 ns, then two for 100 ns.
        assert_eq!(b.integral(400), 400);
        b.change(-1, 400);
        b.change(-1, 1_000);
        assert_eq!(b.integral(5_000), 400 + 600);
        // A clock reading that goes back counts as the same instant; a count never goes
        // below zero.
        b.change(1, 900);
        assert_eq!(b.integral(1_100), 1_000 + 100);
        b.change(-5, 1_100);
        assert_eq!(b.integral(9_000), 1_100);
    }

    #[test]
    fn the_mean_in_flight_is_taken_interval_by_interval() {
        let mut b = Busy::new(1_000);
        b.change(1, 1_000);
        b.change(1, 1_500);
        // 1 call for 500 ns, 2 for 500 ns: 1.5 on average since the start.
        assert_eq!(b.take_mean(2_000), Some(1.5));
        assert_eq!(b.take_mean(2_000), None, "no time has passed");
        b.change(-2, 2_500);
        // 2 calls for 500 ns, none for 1,500 ns.
        assert_eq!(b.take_mean(4_000), Some(0.5));
        assert_eq!(b.take_mean(5_000), Some(0.0));
    }

    #[tokio::test]
    async fn a_nodes_busy_time_follows_its_calls() {
        let n = Arc::new(NodeConn::new("n", "127.0.0.1:1", "a", 0, Arc::default()).unwrap());
        let idle = n.busy_ns();
        assert_eq!(n.busy_ns(), idle, "no call, no busy time");
        let call = n.start_call();
        let (before, t0) = (n.busy_ns(), now_ns());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (after, t1) = (n.busy_ns(), now_ns());
        // One call in flight: busy time grows with the clock (at most as fast).
        assert!(after > before);
        assert!(after - before <= u128::from(t1 - t0) + 1_000_000);
        drop(call);
        let done = n.busy_ns();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(n.busy_ns(), done, "nothing in flight: it stops growing");
    }

    #[tokio::test]
    async fn endless_failures_saturate_the_latency_estimate_without_panicking() {
        // Found by the failover benchmark: each failure multiplied the estimate, which
        // overflowed to infinity after a few hundred timeouts of a hung node.
        let n = NodeConn::new("n", "127.0.0.1:1", "a", 2, Arc::default()).unwrap();
        for _ in 0..2_000 {
            n.record(Outcome::Failure, Duration::from_millis(200));
        }
        let est = n.latency.estimate_ms(now_ns());
        assert!(est.is_finite(), "{est}");
        assert!(est <= peak_ewma::MAX_ESTIMATE.as_millis() as f64, "{est}");
        assert!(est > 1_000.0, "a failing node must look slow: {est}");
    }
}
