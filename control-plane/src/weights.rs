//! The weight function: how much traffic a node should get, relative to its peers.
//!
//! This first version is deliberately simple and pure: `capacity × health factor`, zero for a
//! drained, cordoned, unhealthy or never-probed node. Load, latency and errors join it with the
//! live load reports; the function stays pure so it can be property-tested and reasoned about.

use fulcrum_proto::fulcrum::v1::HealthState;

/// Share of its capacity a degraded node (some declared models not ready) is given: it still
/// serves the models that are ready, but its peers should take most of the traffic.
const DEGRADED_FACTOR: f64 = 0.5;

/// A node's weight from its capacity and state. Always finite and non-negative.
pub fn weight(capacity: i64, state: HealthState) -> f64 {
    let factor = match state {
        HealthState::Healthy => 1.0,
        HealthState::Degraded => DEGRADED_FACTOR,
        HealthState::Unspecified
        | HealthState::Unhealthy
        | HealthState::Draining
        | HealthState::Cordoned => 0.0,
    };
    capacity.max(0) as f64 * factor
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn finite_non_negative_and_zero_when_not_routable(cap in i64::MIN..i64::MAX, s in 0i32..6) {
            let state = HealthState::try_from(s).unwrap();
            let w = weight(cap, state);
            prop_assert!(w.is_finite() && w >= 0.0);
            if !matches!(state, HealthState::Healthy | HealthState::Degraded) {
                prop_assert_eq!(w, 0.0);
            }
        }

        #[test]
        fn monotone_in_capacity(a in 1i64..1_000_000, b in 1i64..1_000_000) {
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(weight(lo, HealthState::Healthy) <= weight(hi, HealthState::Healthy));
            prop_assert!(weight(hi, HealthState::Degraded) < weight(hi, HealthState::Healthy));
        }
    }
}
