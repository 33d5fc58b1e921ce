//! The weight function: how much traffic a node should get, relative to its peers.
//!
//! One pure function of what the control plane knows of a node ([`Signals`]) gives a *target*
//! weight; [`damp`] moves the published weight toward it gradually. Routers multiply these
//! global weights with their own fast, per-call choice (p2c on latency × in-flight), so the
//! weights only need to steer the long-run mix — and must not swing it: when every router follows
//! the same weights at once, a weight that jumps to "the node with the most headroom" sends
//! everyone there, overloads it, and swings back. Damping (an exponential approach with time
//! constant [`TAU`], and a bound on the change per second) makes the fleet converge instead;
//! the simulated-fleet test below shows both behaviours.
//!
//! Target weight = capacity × health factor × headroom factor × latency factor × error factor,
//! or the operator's override; zero for a node that must get no calls (unhealthy, draining,
//! cordoned, never probed, its region evacuated) — and that zero applies at once, undamped. So
//! does a node's first weight after zero (it got no calls: there is no load to chase; see
//! [`damp`]), and an operator's override (see `table.rs`): it is a decision, not a signal the
//! fleet could chase.

use std::time::Duration;

use fulcrum_proto::fulcrum::v1::HealthState;

/// Share of its capacity a degraded node (some declared models not ready, or failing calls)
/// is given: it still serves, but its peers should take most of the traffic.
const DEGRADED_FACTOR: f64 = 0.5;

/// Headroom factor of a fully utilized node: it keeps a fifth of its weight, so the global
/// weights never starve a node entirely on a momentary peak; the routers' per-call choice does
/// the fine balancing.
const HEADROOM_FLOOR: f64 = 0.2;

/// Smallest latency factor: a node four times slower than its peers keeps a quarter of its
/// weight (the routers already avoid it call by call; the global weight confirms it).
const LATENCY_FLOOR: f64 = 0.25;

/// Smallest error factor: even a node failing most calls keeps a tenth, so its recovery shows
/// in the next reports (the routers eject it meanwhile if it really fails).
const ERROR_FLOOR: f64 = 0.1;

/// Time constant of the damping: a change in load reaches 63 % of its effect on the weights in
/// three seconds — slower than the routers' per-call reaction (immediate) and their outlier
/// ejection, faster than an operator would act.
pub const TAU: Duration = Duration::from_secs(3);

/// Largest change of a weight per second, relative to the larger of its old and new value:
/// halving or doubling takes at least a second even after a long pause between updates.
pub const MAX_CHANGE_PER_SEC: f64 = 0.5;

/// Everything the weight of one node depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signals {
    /// Registered capacity (concurrent calls).
    pub capacity: f64,
    /// Health state (probes, passive signals, operator state).
    pub state: HealthState,
    /// Utilization in [0, 1]: in-flight calls over capacity, or what the node reports.
    pub utilization: Option<f64>,
    /// The node's latency over the median of its peers' (1 = typical).
    pub latency_ratio: Option<f64>,
    /// Share of failed calls in the last reports, in [0, 1].
    pub error_ratio: f64,
    /// The operator's fixed weight, if any.
    pub override_weight: Option<f64>,
}

impl Signals {
    /// A node with no load information: weight from capacity and state only.
    pub fn idle(capacity: f64, state: HealthState) -> Self {
        Self {
            capacity,
            state,
            utilization: None,
            latency_ratio: None,
            error_ratio: 0.0,
            override_weight: None,
        }
    }
}

fn health_factor(state: HealthState) -> f64 {
    match state {
        HealthState::Healthy => 1.0,
        HealthState::Degraded => DEGRADED_FACTOR,
        HealthState::Unspecified
        | HealthState::Unhealthy
        | HealthState::Draining
        | HealthState::Cordoned => 0.0,
    }
}

/// The weight a node should have. Always finite and non-negative.
pub fn target(s: &Signals) -> f64 {
    let health = health_factor(s.state);
    if health == 0.0 {
        return 0.0;
    }
    if let Some(w) = s.override_weight {
        return if w.is_finite() { w.max(0.0) } else { 0.0 };
    }
    let capacity = if s.capacity.is_finite() {
        s.capacity.max(0.0)
    } else {
        0.0
    };
    let headroom = 1.0
        - s.utilization
            .filter(|u| u.is_finite())
            .unwrap_or(0.0)
            .clamp(0.0, 1.0);
    let headroom_factor = HEADROOM_FLOOR + (1.0 - HEADROOM_FLOOR) * headroom;
    let latency_factor = match s.latency_ratio {
        Some(r) if r.is_finite() && r > 1.0 => (1.0 / r).max(LATENCY_FLOOR),
        _ => 1.0,
    };
    let error_factor = if s.error_ratio.is_finite() {
        (1.0 - s.error_ratio).clamp(ERROR_FLOOR, 1.0)
    } else {
        1.0
    };
    capacity * health * headroom_factor * latency_factor * error_factor
}

/// Moves the published weight from `previous` toward `target` over `elapsed`. A node seen for
/// the first time gets its target; a target of zero applies at once.
///
/// So does a node's first weight after zero (a node registered before its first probe, or back
/// from unhealthy, draining or cordoned): damping keeps the fleet from chasing its own load,
/// and a node that got no calls carries no load to chase; its target is its capacity and
/// health alone, like a node seen for the first time. Each router's per-call choice (in-flight
/// calls × latency) keeps a node that just came back from being swamped meanwhile. Ramping up
/// from zero instead would cost its traffic share for about ten seconds per node, and at 10,000
/// nodes some 100,000 table writes to bring a fleet up, not 10,000.
pub fn damp(previous: Option<f64>, target: f64, elapsed: Duration) -> f64 {
    let Some(prev) = previous.filter(|p| p.is_finite() && *p > 0.0) else {
        return target;
    };
    if target <= 0.0 {
        return 0.0;
    }
    let dt = elapsed.as_secs_f64();
    let approach = 1.0 - (-dt / TAU.as_secs_f64()).exp();
    let bound = MAX_CHANGE_PER_SEC * dt * prev.max(target);
    let step = ((target - prev) * approach).clamp(-bound, bound);
    (prev + step).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn finite_non_negative_and_zero_when_not_routable(
            cap in -10.0f64..1e6, s in 0i32..6, u in -1.0f64..2.0, l in 0.0f64..100.0,
            e in -1.0f64..2.0, o in prop::option::of(-5.0f64..100.0),
        ) {
            let state = HealthState::try_from(s).unwrap();
            let sig = Signals { capacity: cap, state, utilization: Some(u), latency_ratio: Some(l), error_ratio: e, override_weight: o };
            let w = target(&sig);
            prop_assert!(w.is_finite() && w >= 0.0);
            if !matches!(state, HealthState::Healthy | HealthState::Degraded) {
                prop_assert_eq!(w, 0.0);
            }
        }

        #[test]
        fn more_load_latency_or_errors_never_mean_more_weight(
            cap in 1.0f64..1000.0, u1 in 0.0f64..1.0, u2 in 0.0f64..1.0,
            l1 in 0.5f64..10.0, l2 in 0.5f64..10.0, e1 in 0.0f64..1.0, e2 in 0.0f64..1.0,
        ) {
            let base = Signals::idle(cap, HealthState::Healthy);
            let w = |u, l, e| target(&Signals { utilization: Some(u), latency_ratio: Some(l), error_ratio: e, ..base });
            prop_assert!(w(u1.max(u2), l1, e1) <= w(u1.min(u2), l1, e1) + 1e-9);
            prop_assert!(w(u1, l1.max(l2), e1) <= w(u1, l1.min(l2), e1) + 1e-9);
            prop_assert!(w(u1, l1, e1.max(e2)) <= w(u1, l1, e1.min(e2)) + 1e-9);
            prop_assert!(target(&Signals::idle(cap, HealthState::Degraded)) < target(&base));
        }

        #[test]
        fn damping_is_bounded_and_moves_toward_the_target(prev in 0.01f64..1000.0, tgt in 0.0f64..1000.0, ms in 0u64..10_000) {
            let elapsed = Duration::from_millis(ms);
            let next = damp(Some(prev), tgt, elapsed);
            if tgt == 0.0 {
                prop_assert_eq!(next, 0.0);
            } else {
                // Between the old value and the target.
                prop_assert!(next >= prev.min(tgt) - 1e-9 && next <= prev.max(tgt) + 1e-9);
                // And no faster than the bound.
                let bound = MAX_CHANGE_PER_SEC * elapsed.as_secs_f64() * prev.max(tgt);
                prop_assert!((next - prev).abs() <= bound + 1e-9);
            }
        }
    }

    #[test]
    fn a_first_weight_after_zero_is_the_target_at_once() {
        // Registered before its first probe (weight 0), then healthy: no ramp from zero.
        assert_eq!(damp(Some(0.0), 8.0, Duration::from_millis(1)), 8.0);
        assert_eq!(damp(None, 8.0, Duration::ZERO), 8.0);
        // From any weight above zero, a rise is still damped.
        assert!(damp(Some(0.5), 8.0, Duration::from_millis(100)) < 1.0);
    }

    #[test]
    fn draining_is_zero_at_once_and_overrides_win() {
        assert_eq!(damp(Some(100.0), 0.0, Duration::from_millis(1)), 0.0);
        assert_eq!(target(&Signals::idle(8.0, HealthState::Draining)), 0.0);
        let o = Signals {
            override_weight: Some(3.0),
            ..Signals::idle(8.0, HealthState::Healthy)
        };
        assert_eq!(target(&o), 3.0);
        // An override does not bring back a node that must get no calls.
        let o = Signals {
            state: HealthState::Unhealthy,
            ..o
        };
        assert_eq!(target(&o), 0.0);
    }

    /// A fleet of nodes of unequal capacity under 80 % of total load, every router following
    /// the same weights. Each step the load splits by weight, utilization follows, and the
    /// control plane recomputes. `steps` returns the last 20 relative weight changes.
    fn simulate(damped: bool) -> (f64, Vec<f64>) {
        let capacity = [4.0, 8.0, 8.0, 16.0];
        let load = 0.8 * capacity.iter().sum::<f64>();
        let dt = Duration::from_millis(500);
        // Start far from balance: everything on the first node.
        let mut w = [4.0, 0.1, 0.1, 0.1];
        let mut changes = Vec::new();
        let mut utilization = [0.0; 4];
        for _ in 0..120 {
            let total: f64 = w.iter().sum();
            for i in 0..capacity.len() {
                utilization[i] = (load * w[i] / total / capacity[i]).min(1.0);
            }
            let mut max_change: f64 = 0.0;
            for i in 0..capacity.len() {
                let t = target(&Signals {
                    utilization: Some(utilization[i]),
                    ..Signals::idle(capacity[i], HealthState::Healthy)
                });
                let next = if damped { damp(Some(w[i]), t, dt) } else { t };
                max_change = max_change.max((next - w[i]).abs() / w[i].max(1e-9));
                w[i] = next;
            }
            changes.push(max_change);
        }
        let spread = utilization.iter().cloned().fold(0.0_f64, f64::max)
            - utilization.iter().cloned().fold(1.0_f64, f64::min);
        (spread, changes[changes.len() - 20..].to_vec())
    }

    #[test]
    fn a_fleet_following_damped_weights_converges() {
        let (spread, last) = simulate(true);
        assert!(
            last.iter().all(|c| *c < 0.01),
            "weights still moving: {last:?}"
        );
        assert!(
            spread < 0.05,
            "utilizations differ by {spread:.3} at the end"
        );
    }

    #[test]
    fn without_damping_the_same_fleet_oscillates() {
        // The control for the test above: it is the damping that makes the fleet converge.
        let (_, last) = simulate(false);
        assert!(
            last.iter().any(|c| *c > 0.2),
            "undamped weights settled, so the fleet test proves nothing: {last:?}"
        );
    }
}
