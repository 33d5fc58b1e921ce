//! Weighted power-of-two-choices on peak-EWMA latency × load.
//!
//! Draw two distinct eligible nodes at random with probability proportional to their weight,
//! and keep the one with the lower cost, `latency × (in_flight + 1) / capacity`: the expected
//! wait of a call sent there ("shortest expected delay" over the pair). Two random choices
//! instead of one turn the maximum queue length from `log n / log log n` into `log log n`
//! (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", 2001); multiplying by
//! a peak-sensitive latency estimate (Finagle's and Linkerd's "peak EWMA") steers away from slow
//! nodes before they have a queue; drawing by weight keeps the global shares the control plane
//! asked for, and a tie goes to the first drawn, so under equal load the shares follow the
//! weights exactly.
//!
//! The cost divides by capacity, not weight: the control plane's weight already carries the
//! node's latency, load and errors, and the draw applies it; dividing the cost by it again made
//! a node three times slower lose on latency, on its weight in the draw and on its weight in the
//! cost — it got about 8 % of the calls where join-the-shortest-queue gives it 11 % (the
//! routing-quality benchmark), overloading its peers at high load.
//!
//! Why not `tower::balance::p2c::Balance`: it owns the services and discovers them through a
//! `Stream` of changes, is `Pending` when empty (we must fail fast with a status), and picks
//! uniformly, ignoring the control plane's weights. The algorithm is a dozen lines; owning it
//! lets it stay pure and take weights.

use rand::Rng;

use super::Candidate;

/// The cost p2c compares: the expected wait of one more call, latency × (in-flight + 1) spread
/// over the node's capacity.
pub fn cost(c: &Candidate) -> f64 {
    let capacity = if c.capacity.is_finite() && c.capacity > 0.0 {
        c.capacity
    } else {
        1.0
    };
    c.latency_ms.max(f64::MIN_POSITIVE) * (f64::from(c.in_flight) + 1.0) / capacity
}

/// Picks one eligible candidate, or `None` when there is none.
pub fn pick<R: Rng + ?Sized>(candidates: &[Candidate], rng: &mut R) -> Option<usize> {
    let total: f64 = candidates
        .iter()
        .filter(|c| c.eligible())
        .map(|c| c.weight)
        .sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let first = draw(candidates, total, None, rng)?;
    let rest = total - candidates[first].weight;
    if rest <= 0.0 {
        return Some(first);
    }
    let Some(second) = draw(candidates, rest, Some(first), rng) else {
        return Some(first);
    };
    Some(if cost(&candidates[second]) < cost(&candidates[first]) {
        second
    } else {
        first
    })
}

/// Draws one eligible candidate (other than `skip`) with probability weight / `total`.
pub(crate) fn draw<R: Rng + ?Sized>(
    candidates: &[Candidate],
    total: f64,
    skip: Option<usize>,
    rng: &mut R,
) -> Option<usize> {
    let mut target = rng.random::<f64>() * total;
    let mut last = None;
    for (i, c) in candidates.iter().enumerate() {
        if !c.eligible() || Some(i) == skip {
            continue;
        }
        last = Some(i);
        if target < c.weight {
            return Some(i);
        }
        target -= c.weight;
    }
    // Floating-point rounding can leave `target` a hair above zero at the end.
    last
}

/// Shared generators for the policies' property tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::Candidate;
    use proptest::prelude::*;

    /// Any candidate, eligible or not (zero, negative and NaN weights; excluded ones).
    pub(crate) fn arb_candidate() -> impl Strategy<Value = Candidate> {
        (
            prop_oneof![Just(0.0), Just(-1.0), Just(f64::NAN), 0.001f64..1000.0],
            prop_oneof![Just(0.0), Just(f64::NAN), 0.5f64..64.0],
            0u32..100,
            0.01f64..1000.0,
            any::<bool>(),
        )
            .prop_map(
                |(weight, capacity, in_flight, latency_ms, excluded)| Candidate {
                    weight,
                    capacity,
                    in_flight,
                    latency_ms,
                    excluded,
                },
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn cand(weight: f64, in_flight: u32) -> Candidate {
        Candidate {
            in_flight,
            ..Candidate::idle(weight)
        }
    }

    fn arb_candidate() -> impl Strategy<Value = Candidate> {
        super::tests_support::arb_candidate()
    }

    proptest! {
        #[test]
        fn never_picks_an_ineligible_node(cands in prop::collection::vec(arb_candidate(), 0..20), seed: u64) {
            let mut rng = SmallRng::seed_from_u64(seed);
            match pick(&cands, &mut rng) {
                Some(i) => prop_assert!(cands[i].eligible()),
                None => prop_assert!(cands.iter().all(|c| !c.eligible())),
            }
        }

        #[test]
        fn picks_the_cheaper_of_two_equal_weight_nodes(a in 0u32..50, b in 0u32..50, la in 0.1f64..100.0, lb in 0.1f64..100.0, seed: u64) {
            let cands = [
                Candidate { latency_ms: la, ..cand(1.0, a) },
                Candidate { latency_ms: lb, ..cand(1.0, b) },
            ];
            prop_assume!((cost(&cands[0]) - cost(&cands[1])).abs() > 1e-9);
            let mut rng = SmallRng::seed_from_u64(seed);
            let want = if cost(&cands[0]) < cost(&cands[1]) { 0 } else { 1 };
            prop_assert_eq!(pick(&cands, &mut rng), Some(want));
        }
    }

    /// Under equal load, choices follow the weights: with weights 1:2:3:4 and no calls in flight
    /// every comparison is a tie, won by the node drawn first (by weight), so each node's share
    /// must be within one percentage point of its share of the weight.
    #[test]
    fn shares_follow_weights_under_equal_load() {
        let weights = [1.0, 2.0, 3.0, 4.0];
        let cands: Vec<_> = weights.iter().map(|&w| cand(w, 0)).collect();
        let mut rng = SmallRng::seed_from_u64(7);
        let n = 200_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[pick(&cands, &mut rng).unwrap()] += 1;
        }
        let total: f64 = weights.iter().sum();
        for i in 0..4 {
            let got = counts[i] as f64 / n as f64;
            let expect = weights[i] / total;
            assert!(
                (got - expect).abs() < 0.01,
                "node {i}: share {got:.3}, expected {expect:.3}"
            );
        }
    }

    /// Capacity, not weight, divides the cost: of two idle nodes with equal latency, the one
    /// with more room wins; a lower weight (the control plane's view of load or latency) makes a
    /// node drawn less often but does not also make it lose every comparison.
    #[test]
    fn capacity_divides_the_cost_and_weight_only_the_draw() {
        let big = Candidate {
            capacity: 8.0,
            in_flight: 3,
            ..cand(1.0, 0)
        };
        let small = Candidate {
            capacity: 2.0,
            in_flight: 1,
            ..cand(1.0, 0)
        };
        // 1 × 4 / 8 = 0.5 against 1 × 2 / 2 = 1: the big node, though busier, wins.
        assert!(cost(&big) < cost(&small));
        let mut rng = SmallRng::seed_from_u64(5);
        for _ in 0..1_000 {
            assert_eq!(pick(&[small, big], &mut rng), Some(1));
        }
        // Equal capacity and load, weights 1 and 3: shares 1/4 and 3/4.
        let light = cand(1.0, 2);
        let heavy = cand(3.0, 2);
        let n = 100_000;
        let got = (0..n)
            .filter(|_| pick(&[light, heavy], &mut rng) == Some(0))
            .count() as f64
            / n as f64;
        assert!((got - 0.25).abs() < 0.01, "light share {got:.3}");
    }

    /// A node three times slower than its idle peers loses every comparison it takes part in,
    /// so it gets no calls until its peers' queues make them costlier than it.
    #[test]
    fn a_slow_node_gets_less() {
        let mut cands = vec![cand(1.0, 0); 4];
        cands[0].latency_ms = 3.0;
        let mut rng = SmallRng::seed_from_u64(3);
        let n = 100_000;
        let slow = (0..n).filter(|_| pick(&cands, &mut rng) == Some(0)).count();
        assert_eq!(
            slow, 0,
            "the slow node won a comparison against an idle fast one"
        );
        // With four calls queued on each fast node, the slow idle node is cheaper: 3 × 1 < 1 × 5.
        for c in &mut cands[1..] {
            c.in_flight = 4;
        }
        let slow = (0..n).filter(|_| pick(&cands, &mut rng) == Some(0)).count();
        assert!(slow > n / 4, "the idle slow node got only {slow} of {n}");
    }

    #[test]
    fn a_single_eligible_node_is_picked_and_empty_is_none() {
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(pick(&[], &mut rng), None);
        let cands = [cand(0.0, 0), cand(5.0, 99)];
        assert_eq!(pick(&cands, &mut rng), Some(1));
    }
}
