//! Canary releases (the seed article's gray release, 灰度发布): a share of a model's calls goes
//! to another model — its next version, deployed under its own name — so that a new model is
//! tried on some traffic before all of it.
//!
//! `ModelPolicy.canary_model` takes `canary_percent` of the model's `ModelInfer` calls. Which
//! calls: with `canary_key_header`, those whose header value (a user, a session) falls in the
//! canary's share of a hash space, so a caller keeps seeing one model and raising the percent
//! only ever moves more callers to the canary, never one back ([`Canary::takes`] is monotone in
//! the share); without it, calls are drawn at random, except that the requests of a Triton
//! sequence are placed by the sequence's id, so a sequence stays on one model.
//!
//! A canary call is a call of the canary model from then on: its own policy routes it (its
//! rate limit, cache, fallback — a canary whose policy falls back to the stable model turns its
//! overload and node failures into the stable model's answers). A canary with no routable node
//! (not deployed yet, or down) takes no calls. The answer names the canary
//! (`x-fulcrum-canary`, and the model name in the response).
//!
//! The choice is pure (no I/O; the random draw comes from the caller's RNG) and
//! property-tested.

use rand::Rng;

/// Response header naming the canary model that took the call.
pub const CANARY_HEADER: &str = "x-fulcrum-canary";

/// Buckets the hash space is cut into for keyed choices: shares are honoured to a hundredth of
/// a percent, the finest step an operator can ask for (`canary_percent` 0.01).
const BUCKETS: u64 = 10_000;

/// A model's canary, from its policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Canary {
    /// The model that takes the canary's share.
    pub model: String,
    /// Its share of the calls, in [0, 1].
    pub share: f64,
    /// The request header whose value decides (lowercase), if any.
    pub key_header: Option<String>,
}

impl Canary {
    /// The canary a policy of `model` sets, if any: `None` without a canary model, for the
    /// model itself, or for a share of 0. Percentages outside [0, 100] (the control plane
    /// refuses them; a router does not trust it) are clamped.
    pub fn from_policy(model: &str, canary: &str, percent: f64, key_header: &str) -> Option<Self> {
        if canary.is_empty() || canary == model || !(percent.is_finite() && percent > 0.0) {
            return None;
        }
        Some(Self {
            model: canary.to_owned(),
            share: (percent / 100.0).min(1.0),
            key_header: (!key_header.is_empty()).then(|| key_header.to_ascii_lowercase()),
        })
    }

    /// Whether a call goes to the canary: by `key` (the hash of the key header's value, or of
    /// the call's sequence) when there is one, else at random from `rng`.
    pub fn takes(&self, key: Option<u64>, rng: &mut impl Rng) -> bool {
        match key {
            // The bucket is below the share's bound: raising the share keeps every key that
            // was in, so no caller flips back.
            Some(k) => (k % BUCKETS) < (self.share * BUCKETS as f64).round() as u64,
            None => rng.random::<f64>() < self.share,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn canary(percent: f64) -> Canary {
        Canary::from_policy("m", "m-next", percent, "").unwrap()
    }

    #[test]
    fn a_policy_without_a_share_or_naming_the_model_itself_has_no_canary() {
        assert_eq!(Canary::from_policy("m", "", 10.0, ""), None);
        assert_eq!(Canary::from_policy("m", "m", 10.0, ""), None);
        assert_eq!(Canary::from_policy("m", "n", 0.0, ""), None);
        assert_eq!(Canary::from_policy("m", "n", f64::NAN, ""), None);
        let c = Canary::from_policy("m", "n", 250.0, "X-User").unwrap();
        assert_eq!(c.share, 1.0);
        assert_eq!(c.key_header.as_deref(), Some("x-user"));
    }

    #[test]
    fn all_or_nothing_shares() {
        let mut rng = SmallRng::seed_from_u64(1);
        let all = canary(100.0);
        let tiny = canary(0.01);
        for k in 0..10_000u64 {
            assert!(all.takes(Some(k), &mut rng));
            assert!(all.takes(None, &mut rng));
            // 0.01 %: exactly one bucket of the ten thousand.
            assert_eq!(tiny.takes(Some(k), &mut rng), k % BUCKETS == 0);
        }
    }

    proptest! {
        #[test]
        fn raising_the_share_never_moves_a_caller_back(
            keys in proptest::collection::vec(any::<u64>(), 1..200),
            low in 0.0f64..100.0,
            more in 0.0f64..100.0,
        ) {
            let mut rng = SmallRng::seed_from_u64(2);
            let (a, b) = (canary(low.max(0.01)), canary((low + more).clamp(0.01, 100.0)));
            for k in keys {
                if a.takes(Some(k), &mut rng) {
                    prop_assert!(b.takes(Some(k), &mut rng));
                }
            }
        }

        #[test]
        fn a_key_always_gets_the_same_answer(key in any::<u64>(), percent in 0.01f64..100.0) {
            let c = canary(percent);
            let mut rng = SmallRng::seed_from_u64(3);
            let first = c.takes(Some(key), &mut rng);
            for _ in 0..10 {
                prop_assert_eq!(c.takes(Some(key), &mut rng), first);
            }
        }

        #[test]
        fn the_share_of_calls_is_the_canary_s(percent in 1.0f64..99.0, seed in any::<u64>()) {
            let c = canary(percent);
            let mut rng = SmallRng::seed_from_u64(seed);
            let n = 10_000;
            let keyed = (0..n)
                .filter(|i| c.takes(Some(crate::balance::ring::hash(&u64::to_le_bytes(*i))), &mut rng))
                .count() as f64 / n as f64;
            let drawn = (0..n).filter(|_| c.takes(None, &mut rng)).count() as f64 / n as f64;
            // Six standard deviations of a binomial share at n = 10,000 are at most 3 %.
            for got in [keyed, drawn] {
                prop_assert!((got - percent / 100.0).abs() < 0.03, "{} vs {}%", got, percent);
            }
        }
    }
}
