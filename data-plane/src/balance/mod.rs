//! Node selection: pure functions from a list of candidates (and an injected RNG) to a choice.
//! No I/O, no clocks, no tonic: the router wraps these, the tests drive them directly.
//!
//! - [`p2c`]: weighted power-of-two-choices on peak-EWMA latency × (in-flight + 1) — the default.
//! - [`least_request`]: weighted least-connections.
//! - [`round_robin`]: smooth weighted round robin (nginx's algorithm).
//! - [`ring`]: consistent hashing with bounded load, for affinity.
//! - [`rendezvous`]: weighted rendezvous hashing, for Triton sequences (moved by membership
//!   only).
//! - [`locality`]: regions as priority levels, with Envoy-style spill-over and gradual return.

pub mod least_request;
pub mod locality;
pub mod p2c;
pub mod rendezvous;
pub mod ring;
pub mod round_robin;

use rand::Rng;

/// A node as the balancer sees it at the moment of a pick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Control-plane weight; a node with weight ≤ 0 (or not finite) is never picked.
    pub weight: f64,
    /// How many calls the node serves at once (its registered capacity): p2c divides the
    /// expected wait by it. Not positive or not finite counts as one.
    pub capacity: f64,
    /// Calls this router has in flight to the node.
    pub in_flight: u32,
    /// Peak-EWMA latency estimate of the node, in milliseconds (> 0).
    pub latency_ms: f64,
    /// Not to be picked for this call: already tried, ejected, or at its concurrency limit.
    pub excluded: bool,
}

impl Candidate {
    /// A candidate with no load and a nominal latency, for tests and defaults.
    pub fn idle(weight: f64) -> Self {
        Self {
            weight,
            capacity: 1.0,
            in_flight: 0,
            latency_ms: 1.0,
            excluded: false,
        }
    }

    /// Whether the node may be picked at all.
    pub fn eligible(&self) -> bool {
        !self.excluded && self.weight.is_finite() && self.weight > 0.0
    }
}

/// How a model's calls are spread over its nodes within a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Power of two choices on latency × load, weighted (the default).
    #[default]
    P2cEwma,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Weighted least outstanding requests.
    LeastRequest,
    /// Consistent hashing on a request header, with bounded load.
    ConsistentHash,
}

/// Mutable per-model state some policies keep between picks.
#[derive(Debug, Default, Clone)]
pub struct PolicyState {
    /// Smooth round robin's current weights, one per candidate.
    pub round_robin: Vec<f64>,
}

/// Picks a candidate with `policy`. `key` is the affinity hash (consistent hashing only; other
/// policies ignore it) and `ring` the model's hash ring over the same candidates.
pub fn pick<R: Rng + ?Sized>(
    policy: Policy,
    candidates: &[Candidate],
    state: &mut PolicyState,
    ring: Option<&ring::Ring>,
    key: Option<u64>,
    rng: &mut R,
) -> Option<usize> {
    match policy {
        Policy::P2cEwma => p2c::pick(candidates, rng),
        Policy::LeastRequest => least_request::pick(candidates, rng),
        Policy::RoundRobin => round_robin::pick(candidates, &mut state.round_robin),
        Policy::ConsistentHash => match (ring, key) {
            (Some(ring), Some(key)) => ring::pick(ring, key, candidates, ring::DEFAULT_LOAD_BOUND),
            // No affinity key on this call: balance it like any other.
            _ => p2c::pick(candidates, rng),
        },
    }
}
