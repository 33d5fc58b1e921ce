//! Inline outlier detection: a node that fails several calls in a row is ejected — taken out
//! of this router's selection — for a while, before the control plane's probes notice.
//!
//! Ejection time grows with each ejection (`base × 2^(n-1)`, capped) so a flapping node stays
//! out longer each time, and shrinks back once the node behaves. How many nodes of a region may
//! be ejected at once is bounded by the router (see `router.rs`): ejection is for outliers, and
//! when a whole region fails the region is left through the spill-over rule instead, which
//! counts failing nodes as unavailable even when the cap kept them from being ejected.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Consecutive failures (UNAVAILABLE, connection errors, timeouts) that make a node an
/// outlier: Envoy's default. Fewer ejects healthy nodes on bad luck; more lets a dead node
/// fail many calls first (retries hide those from callers).
pub const CONSECUTIVE_FAILURES: u32 = 5;

/// First ejection: five seconds. The control plane's probes take a dead node out within about
/// two seconds anyway, so ejection only has to bridge that gap; a short first ejection brings a
/// node that only hiccuped back quickly.
pub const BASE_EJECTION: Duration = Duration::from_secs(5);

/// Longest ejection: a node that keeps failing is retried at least once a minute.
pub const MAX_EJECTION: Duration = Duration::from_secs(60);

/// How long the `n`-th consecutive ejection lasts (`n` ≥ 1).
pub fn ejection_time(n: u32) -> Duration {
    let factor = 1u32 << n.saturating_sub(1).min(16);
    BASE_EJECTION.saturating_mul(factor).min(MAX_EJECTION)
}

/// One node's outlier state, shared by all calls.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive: AtomicU32,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    /// Ejections ever (for metrics; `ejections` resets when the node behaves).
    ejections_total: AtomicU64,
}

impl Outlier {
    /// A call succeeded: the failure streak ends; a node that stayed in for a full base
    /// ejection time since its last ejection has its ejection count reset.
    pub fn on_success(&self, now_ms: u64) {
        self.consecutive.store(0, Ordering::Relaxed);
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until > 0 && now_ms > until + BASE_EJECTION.as_millis() as u64 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// The node could not be reached at all: the streak jumps to one short of an outlier's, so
    /// that the failure being recorded makes it one (a refused connection needs no more
    /// evidence).
    pub fn on_unreachable(&self) {
        self.consecutive
            .fetch_max(CONSECUTIVE_FAILURES - 1, Ordering::Relaxed);
    }

    /// A call failed; returns the length of the failure streak.
    pub fn on_failure(&self) -> u32 {
        self.consecutive.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Ejects the node from `now_ms`; returns for how long.
    pub fn eject(&self, now_ms: u64) -> Duration {
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let t = ejection_time(n);
        self.ejected_until_ms
            .store(now_ms + t.as_millis() as u64, Ordering::Relaxed);
        // The streak that caused this ejection is spent.
        self.consecutive.store(0, Ordering::Relaxed);
        t
    }

    /// Times the node was ejected since the router started.
    pub fn ejections(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    /// Whether the node is ejected at `now_ms`.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// Whether the node should count as unavailable: ejected, or failing enough to be (even if
    /// the ejection cap kept it in).
    pub fn is_failing(&self, now_ms: u64) -> bool {
        self.is_ejected(now_ms) || self.consecutive.load(Ordering::Relaxed) >= CONSECUTIVE_FAILURES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_time_doubles_and_is_capped() {
        assert_eq!(ejection_time(1), BASE_EJECTION);
        assert_eq!(ejection_time(2), BASE_EJECTION * 2);
        assert_eq!(ejection_time(3), BASE_EJECTION * 4);
        assert_eq!(ejection_time(30), MAX_EJECTION);
        assert_eq!(ejection_time(u32::MAX), MAX_EJECTION);
    }

    #[test]
    fn streaks_ejections_and_recovery() {
        let o = Outlier::default();
        for i in 1..CONSECUTIVE_FAILURES {
            assert_eq!(o.on_failure(), i);
            assert!(!o.is_failing(0));
        }
        assert_eq!(o.on_failure(), CONSECUTIVE_FAILURES);
        assert!(o.is_failing(0) && !o.is_ejected(0));
        assert_eq!(o.eject(1_000), BASE_EJECTION);
        assert!(o.is_ejected(1_000 + 4_999));
        assert!(!o.is_ejected(1_000 + 5_000));
        // Second ejection right away is twice as long.
        assert_eq!(o.eject(7_000), BASE_EJECTION * 2);
        // Behaving long enough resets the count.
        o.on_success(7_000 + 10_000 + 5_001);
        assert_eq!(o.eject(30_000), BASE_EJECTION);
    }

    #[test]
    fn one_unreachable_failure_makes_an_outlier() {
        let o = Outlier::default();
        o.on_unreachable();
        assert!(!o.is_failing(0));
        assert_eq!(o.on_failure(), CONSECUTIVE_FAILURES);
        assert!(o.is_failing(0));
        // A longer streak is not shortened.
        o.on_failure();
        o.on_unreachable();
        assert_eq!(o.on_failure(), CONSECUTIVE_FAILURES + 2);
    }
}
