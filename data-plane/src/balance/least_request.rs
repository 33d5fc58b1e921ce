//! Weighted least outstanding requests ("weighted least-connections").
//!
//! Every eligible node is considered; the one with the fewest in-flight calls per unit of
//! weight, `(in_flight + 1) / weight`, wins, ties broken at random so equal nodes share evenly.
//! Full scans are fine at the sizes a model is served by (tens of nodes); p2c is the default
//! because it stays cheap and avoids herding when many routers see the same counts.

use rand::Rng;

use super::Candidate;

/// Picks the least-loaded eligible candidate, or `None` when there is none.
pub fn pick<R: Rng + ?Sized>(candidates: &[Candidate], rng: &mut R) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    let mut ties = 0u32;
    for (i, c) in candidates.iter().enumerate() {
        if !c.eligible() {
            continue;
        }
        let load = (f64::from(c.in_flight) + 1.0) / c.weight;
        match best {
            Some((b, _)) if load > b => {}
            Some((b, _)) if load == b => {
                // Reservoir sampling over the tied minimum.
                ties += 1;
                if rng.random_range(0..ties) == 0 {
                    best = Some((load, i));
                }
            }
            _ => {
                best = Some((load, i));
                ties = 1;
            }
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    proptest! {
        #[test]
        fn picks_an_eligible_minimum(cands in prop::collection::vec(crate::balance::p2c::tests_support::arb_candidate(), 0..20), seed: u64) {
            let mut rng = SmallRng::seed_from_u64(seed);
            match pick(&cands, &mut rng) {
                Some(i) => {
                    prop_assert!(cands[i].eligible());
                    let load = |c: &Candidate| (f64::from(c.in_flight) + 1.0) / c.weight;
                    for c in cands.iter().filter(|c| c.eligible()) {
                        prop_assert!(load(&cands[i]) <= load(c));
                    }
                }
                None => prop_assert!(cands.iter().all(|c| !c.eligible())),
            }
        }
    }

    #[test]
    fn ties_are_shared() {
        let cands = [Candidate::idle(1.0); 3];
        let mut rng = SmallRng::seed_from_u64(9);
        let mut counts = [0; 3];
        for _ in 0..30_000 {
            counts[pick(&cands, &mut rng).unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
    }
}
