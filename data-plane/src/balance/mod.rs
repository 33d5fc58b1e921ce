//! Node selection: pure functions from a list of candidates (and an injected RNG) to a choice.
//! No I/O, no clocks, no tonic: the router wraps these, the tests drive them directly.
//!
//! - [`p2c`]: weighted power-of-two-choices on in-flight calls within one region.
//! - [`locality`]: regions as priority levels, seen from the router's own region.

pub mod locality;
pub mod p2c;

/// A node as the balancer sees it at the moment of a pick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Control-plane weight; a node with weight ≤ 0 (or not finite) is never picked.
    pub weight: f64,
    /// Calls this router has in flight to the node.
    pub in_flight: u32,
    /// Already tried for this call (a retry must go elsewhere); never picked.
    pub excluded: bool,
}

impl Candidate {
    /// Whether the node may be picked at all.
    pub fn eligible(&self) -> bool {
        !self.excluded && self.weight.is_finite() && self.weight > 0.0
    }
}
