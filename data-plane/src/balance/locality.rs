//! Regions as priority levels.
//!
//! Seen from a router, its own region comes first: a call goes to a local node whenever one is
//! eligible, and to the other region only when none is (all local nodes unhealthy, drained, or
//! already tried by this call). Proportional spill-over under partial loss builds on this.

use rand::Rng;

use super::{Candidate, p2c};

/// Where a pick landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Index into the local candidates.
    Local(usize),
    /// Index into the other region's candidates.
    Remote(usize),
}

/// Picks a local candidate if any is eligible, else a remote one.
pub fn pick<R: Rng + ?Sized>(
    local: &[Candidate],
    remote: &[Candidate],
    rng: &mut R,
) -> Option<Pick> {
    p2c::pick(local, rng)
        .map(Pick::Local)
        .or_else(|| p2c::pick(remote, rng).map(Pick::Remote))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn arb(n: usize) -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec(
            (
                prop_oneof![Just(0.0), 0.1f64..10.0],
                0u32..10,
                any::<bool>(),
            )
                .prop_map(|(weight, in_flight, excluded)| Candidate {
                    weight,
                    in_flight,
                    excluded,
                }),
            0..n,
        )
    }

    proptest! {
        #[test]
        fn local_first_remote_only_when_no_local_is_eligible(local in arb(8), remote in arb(8), seed: u64) {
            let mut rng = SmallRng::seed_from_u64(seed);
            let any_local = local.iter().any(Candidate::eligible);
            let any_remote = remote.iter().any(Candidate::eligible);
            match pick(&local, &remote, &mut rng) {
                Some(Pick::Local(i)) => prop_assert!(local[i].eligible()),
                Some(Pick::Remote(i)) => {
                    prop_assert!(!any_local);
                    prop_assert!(remote[i].eligible());
                }
                None => prop_assert!(!any_local && !any_remote),
            }
        }
    }
}
