//! Smooth weighted round robin, nginx's algorithm.
//!
//! The naive weighted round robin (send `w` calls in a row to a node of weight `w`, as the seed
//! article does) is exact over a cycle but bursty: a node of weight 5 gets five calls back to
//! back while its peers idle. The smooth variant keeps a running "current weight" per node:
//! every pick adds each eligible node's weight to its current weight, picks the largest, and
//! subtracts the total from the winner. Over a cycle each node is still picked exactly in
//! proportion to its weight, but the picks are interleaved (weights 5,1,1 give `a a b a c a a`).

use super::Candidate;

/// Picks the next candidate; `current` is the policy's state (reset when the number of
/// candidates changes).
pub fn pick(candidates: &[Candidate], current: &mut Vec<f64>) -> Option<usize> {
    if current.len() != candidates.len() {
        current.clear();
        current.resize(candidates.len(), 0.0);
    }
    let mut total = 0.0;
    let mut best: Option<usize> = None;
    for (i, c) in candidates.iter().enumerate() {
        if !c.eligible() {
            continue;
        }
        current[i] += c.weight;
        total += c.weight;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nginx_example_is_smooth() {
        let cands: Vec<_> = [5.0, 1.0, 1.0].into_iter().map(Candidate::idle).collect();
        let mut state = Vec::new();
        let seq: Vec<usize> = (0..7).map(|_| pick(&cands, &mut state).unwrap()).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    proptest! {
        /// Over one cycle of sum(weights) picks, each node is picked exactly its weight times,
        /// and never more than its fair share plus one within any prefix (smoothness).
        #[test]
        fn exact_and_smooth(weights in prop::collection::vec(1u32..8, 1..8), excluded in prop::collection::vec(any::<bool>(), 8)) {
            let cands: Vec<_> = weights.iter().zip(&excluded).map(|(&w, &x)| Candidate {
                excluded: x,
                ..Candidate::idle(f64::from(w))
            }).collect();
            let total: u32 = cands.iter().filter(|c| c.eligible()).map(|c| c.weight as u32).sum();
            let mut state = Vec::new();
            let mut counts = vec![0u32; cands.len()];
            for n in 1..=total {
                let i = pick(&cands, &mut state).unwrap();
                prop_assert!(cands[i].eligible());
                counts[i] += 1;
                let fair = f64::from(n) * cands[i].weight / f64::from(total);
                prop_assert!(f64::from(counts[i]) <= fair.ceil() + 1.0, "burst at pick {n}: {counts:?}");
            }
            for (c, n) in cands.iter().zip(&counts) {
                let want = if c.eligible() { c.weight as u32 } else { 0 };
                prop_assert_eq!(*n, want);
            }
            if total == 0 {
                prop_assert_eq!(pick(&cands, &mut state), None);
            }
        }
    }
}
