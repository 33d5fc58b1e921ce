//! Node health: a pure state machine fed by probe results ([`NodeHealth::observe`]), the
//! active prober that produces them ([`prober`], which calls nodes through `probe_conn`, a
//! minimal gRPC client on `h2`), and the mass-failure guard ([`guard`]) that keeps the
//! control plane's own trouble (a starved prober, a broken network path from it) from taking a
//! healthy fleet out of the routing table.
//!
//! Thresholds follow the usual load-balancer rule (Envoy, Kubernetes, HAProxy): a node becomes
//! healthy after `healthy_after` consecutive passes and unhealthy after `unhealthy_after`
//! consecutive failures, so one lost probe does not flap routing. A node never probed yet takes
//! the state of its first result, so a new node serves (or is known dead) after one probe.

pub mod guard;
mod probe_conn;
pub mod prober;

use std::sync::atomic::{AtomicU64, Ordering};

use fulcrum_proto::fulcrum::v1::HealthState;

/// When a streak of probe results changes a node's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive passes that make an unhealthy node healthy.
    pub healthy_after: u32,
    /// Consecutive failures that make a healthy node unhealthy.
    pub unhealthy_after: u32,
}

impl Default for Thresholds {
    /// Two and two: a node is declared dead after two missed probes (one can be a lost packet or
    /// a GC pause) and alive after two good ones (so a crash-looping server is not fed traffic
    /// on its first breath).
    fn default() -> Self {
        Self {
            healthy_after: 2,
            unhealthy_after: 2,
        }
    }
}

/// One probe's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The server is ready and every declared model is ready.
    Pass {
        /// Models that answered ready.
        ready_models: Vec<String>,
    },
    /// The server is ready but only some declared models are.
    Degraded {
        /// Models that answered ready.
        ready_models: Vec<String>,
    },
    /// The node answered, and said it cannot serve: not ready, not serving, no model ready,
    /// or its host refused the connection (nothing listens).
    Fail(String),
    /// The node did not answer: the probe timed out, or could not connect or talk to it. A
    /// failure too, but one the observer's own trouble can cause (see [`guard`]).
    NoAnswer(String),
    /// The probe says nothing of the node: it timed out while the prober itself was late (its
    /// task ran long after it was due), so the answer may have been there, unread.
    Inconclusive(String),
}

impl Observation {
    /// Whether the probe failed (answered or not).
    pub fn is_failure(&self) -> bool {
        matches!(self, Observation::Fail(_) | Observation::NoAnswer(_))
    }
}

/// Counters of the probing and of the mass-failure guard, read by the metrics at each scrape.
#[derive(Debug, Default)]
pub struct HealthStats {
    /// Probes that timed out while the prober itself was late: counted neither as a pass nor
    /// as a failure.
    pub inconclusive_probes: AtomicU64,
    /// Times the guard started holding nodes' last state.
    pub guard_trips: AtomicU64,
    /// Nodes whose last state the guard holds now (0 on a replica that does not lead).
    pub guard_held: AtomicU64,
}

impl HealthStats {
    /// A snapshot: (inconclusive probes, guard trips, nodes held now).
    pub fn read(&self) -> (u64, u64, u64) {
        (
            self.inconclusive_probes.load(Ordering::Relaxed),
            self.guard_trips.load(Ordering::Relaxed),
            self.guard_held.load(Ordering::Relaxed),
        )
    }
}

/// What the control plane knows of one node's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealth {
    /// Current state: unspecified (never probed), healthy, degraded or unhealthy.
    pub state: HealthState,
    /// Length of the current streak: positive for passes, negative for failures.
    pub streak: i32,
    /// Why the last failing probe failed.
    pub last_error: String,
    /// Models ready at the last passing probe.
    pub ready_models: Vec<String>,
    /// The models the server listed at the last probe that could list them, for a node
    /// registered without models (empty otherwise). Kept while the node fails, so that its
    /// models stay known (UNAVAILABLE at the routers, not NOT_FOUND).
    pub discovered: Vec<String>,
    /// The last failing probe got no answer ([`Observation::NoAnswer`]): the failure may be
    /// the observer's, which the mass-failure guard weighs.
    pub unanswered: bool,
    /// When the first probe of the current failing streak started (Unix milliseconds; 0 when
    /// the streak is not a failing one): what a node's own signals are compared with.
    pub failing_since_unix_ms: u64,
}

impl Default for NodeHealth {
    fn default() -> Self {
        Self {
            state: HealthState::Unspecified,
            streak: 0,
            last_error: String::new(),
            ready_models: Vec::new(),
            discovered: Vec::new(),
            unanswered: false,
            failing_since_unix_ms: 0,
        }
    }
}

impl NodeHealth {
    /// Feeds one probe result; returns true when the routable state changed (state or ready
    /// models), i.e. when the routing table must be recomputed.
    pub fn observe(&mut self, obs: Observation, t: Thresholds) -> bool {
        let before = (self.state, self.ready_models.clone());
        let first = self.state == HealthState::Unspecified;
        let unanswered = matches!(obs, Observation::NoAnswer(_));
        let (target, ready_models) = match obs {
            Observation::Pass { ready_models } => (HealthState::Healthy, ready_models),
            Observation::Degraded { ready_models } => (HealthState::Degraded, ready_models),
            Observation::Inconclusive(_) => return false,
            Observation::Fail(why) | Observation::NoAnswer(why) => {
                self.unanswered = unanswered;
                self.streak = self.streak.min(0).saturating_sub(1);
                self.last_error = why;
                if first || -self.streak >= t.unhealthy_after as i32 {
                    self.state = HealthState::Unhealthy;
                    self.ready_models.clear();
                }
                return before != (self.state, self.ready_models.clone());
            }
        };
        self.streak = self.streak.max(0).saturating_add(1);
        // Healthy and degraded move between each other at once; leaving unhealthy takes a streak.
        if first || self.state != HealthState::Unhealthy || self.streak >= t.healthy_after as i32 {
            self.state = target;
            self.ready_models = ready_models;
        }
        before != (self.state, self.ready_models.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass() -> Observation {
        Observation::Pass {
            ready_models: vec!["echo".into()],
        }
    }

    #[test]
    fn first_probe_decides_then_thresholds_apply() {
        let t = Thresholds::default();
        let mut h = NodeHealth::default();
        assert!(h.observe(pass(), t));
        assert_eq!(h.state, HealthState::Healthy);
        // One failure is not enough to leave healthy.
        assert!(!h.observe(Observation::Fail("x".into()), t));
        assert_eq!(h.state, HealthState::Healthy);
        assert!(h.observe(Observation::Fail("x".into()), t));
        assert_eq!(h.state, HealthState::Unhealthy);
        assert!(h.ready_models.is_empty());
        // One pass is not enough to come back.
        assert!(!h.observe(pass(), t));
        assert_eq!(h.state, HealthState::Unhealthy);
        assert!(h.observe(pass(), t));
        assert_eq!(h.state, HealthState::Healthy);
    }

    #[test]
    fn a_new_node_that_fails_is_unhealthy_at_once() {
        let mut h = NodeHealth::default();
        h.observe(Observation::Fail("refused".into()), Thresholds::default());
        assert_eq!(h.state, HealthState::Unhealthy);
        assert_eq!(h.last_error, "refused");
    }

    #[test]
    fn inconclusive_probes_change_nothing_and_failures_say_whether_they_were_answered() {
        let t = Thresholds::default();
        let mut h = NodeHealth::default();
        h.observe(pass(), t);
        assert!(!h.observe(Observation::NoAnswer("timed out".into()), t));
        let before = h.clone();
        assert!(!h.observe(Observation::Inconclusive("late".into()), t));
        assert_eq!(h, before, "neither a pass nor a failure");
        assert!(h.observe(Observation::NoAnswer("timed out".into()), t));
        assert_eq!(h.state, HealthState::Unhealthy);
        assert!(h.unanswered);
        // Recovering: a pass does not make the failure an answered one.
        h.observe(pass(), t);
        assert!(h.unanswered);
        h.observe(Observation::Fail("not ready".into()), t);
        assert!(!h.unanswered);
    }

    #[test]
    fn degraded_follows_ready_models() {
        let t = Thresholds::default();
        let mut h = NodeHealth::default();
        h.observe(pass(), t);
        assert!(h.observe(
            Observation::Degraded {
                ready_models: vec![]
            },
            t
        ));
        assert_eq!(h.state, HealthState::Degraded);
    }
}
