//! Regions as priority levels.
//!
//! Seen from a router, its own region comes first. Following Envoy's priority levels, the local
//! region takes `min(1, overprovisioning × available / total)` of the calls, where `total` is
//! the capacity of every local node that declares the model and `available` the weight of those
//! that can take calls now (healthy, not ejected, not failing). With the default
//! overprovisioning of 1.4, losing up to 1/1.4 ≈ 29 % of local capacity moves nothing; beyond
//! that the other region takes the remainder in proportion, and all of it when nothing local is
//! left. The share climbs back at a bounded rate when local nodes return, so a recovering region
//! is not hit by the whole load at once (no herd), and falls at once when they fail.

/// Envoy's default overprovisioning factor: a region keeps all its traffic until less than
/// 1/1.4 ≈ 71 % of its capacity is available, which absorbs the loss of one node in three to
/// four without sending calls across regions.
pub const DEFAULT_OVERPROVISIONING: f64 = 1.4;

/// How fast the local share may grow back, per second: from nothing to everything in two
/// seconds. Long enough that connections and caches of a recovering region warm up under a
/// rising load; short enough that cross-region latency is not paid for long.
pub const RECOVERY_RATE_PER_SEC: f64 = 0.5;

/// Where a call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// The router's own region.
    Local,
    /// Another region.
    Remote,
}

/// The share of calls the local region should take.
pub fn local_share(available: f64, total: f64, overprovisioning: f64) -> f64 {
    let share = overprovisioning * available / total;
    // NaN (no capacity at all) and negatives mean no local share.
    if share.is_nan() || total <= 0.0 || available <= 0.0 {
        return 0.0;
    }
    share.clamp(0.0, 1.0)
}

/// Moves the applied share toward `target`: down at once, up by at most `rate` per second.
pub fn ramp(previous: f64, target: f64, elapsed_secs: f64, rate: f64) -> f64 {
    if target <= previous {
        return target;
    }
    (previous + rate * elapsed_secs.max(0.0)).min(target)
}

/// Chooses the tier for one call, `u` a uniform draw in [0, 1). Local when local has a node
/// and the draw falls in its share (or remote has none); remote otherwise; `None` when neither
/// has a node.
pub fn tier(local_share: f64, local_any: bool, remote_any: bool, u: f64) -> Option<Tier> {
    match (local_any, remote_any) {
        (false, false) => None,
        (true, false) => Some(Tier::Local),
        (false, true) => Some(Tier::Remote),
        (true, true) if u < local_share => Some(Tier::Local),
        (true, true) => Some(Tier::Remote),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn envoy_rule() {
        // All available: everything local.
        assert_eq!(local_share(10.0, 10.0, 1.4), 1.0);
        // Half available: 70 % local, 30 % spills.
        assert!((local_share(5.0, 10.0, 1.4) - 0.7).abs() < 1e-12);
        // 1/1.4 available is the break-even point.
        assert!((local_share(10.0 / 1.4, 10.0, 1.4) - 1.0).abs() < 1e-12);
        assert_eq!(local_share(0.0, 10.0, 1.4), 0.0);
        assert_eq!(local_share(1.0, 0.0, 1.4), 0.0);
    }

    #[test]
    fn ramps_up_slowly_and_down_at_once() {
        assert_eq!(ramp(1.0, 0.2, 0.01, 0.5), 0.2);
        assert!((ramp(0.0, 1.0, 0.5, 0.5) - 0.25).abs() < 1e-12);
        assert_eq!(ramp(0.9, 1.0, 10.0, 0.5), 1.0);
    }

    proptest! {
        #[test]
        fn share_is_a_probability(a in -10.0f64..100.0, t in -10.0f64..100.0, o in 1.0f64..3.0) {
            let s = local_share(a, t, o);
            prop_assert!((0.0..=1.0).contains(&s));
        }

        #[test]
        fn tier_never_picks_an_empty_side(share in 0.0f64..=1.0, l: bool, r: bool, u in 0.0f64..1.0) {
            match tier(share, l, r, u) {
                Some(Tier::Local) => prop_assert!(l),
                Some(Tier::Remote) => prop_assert!(r),
                None => prop_assert!(!l && !r),
            }
            if l && share >= 1.0 {
                prop_assert_eq!(tier(share, l, r, u), Some(Tier::Local));
            }
        }
    }
}
