//! A peak-sensitive moving average of a node's latency (Finagle's and Linkerd's "peak EWMA").
//!
//! A sample above the estimate replaces it at once (a node that turns slow is avoided on the
//! next pick); a sample below pulls it down exponentially with time constant [`DECAY`]. Reading
//! decays the estimate toward zero with the same constant, so a node that received no calls for
//! a while is tried again.
//!
//! Written here rather than taken from `tower::load::PeakEwma` because the router needs lock-free
//! reads of every candidate's estimate on each pick (tower keeps it behind a mutex per service)
//! and counts in-flight calls until streams end, not until response headers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Time constant of the average: two seconds. Linkerd uses ten, but the decay depends on time,
/// not on the number of calls, so one slow batch (common on a shared GPU) would make a fast node
/// look as slow as that batch for ten seconds and erase the difference from a really slow node.
/// Two seconds still rides out single slow calls while letting a recovered node win its share
/// back quickly.
pub const DECAY: Duration = Duration::from_secs(2);

/// Estimate of a node never measured: 10 ms, a typical small-model inference. Too low and a new
/// node gets a burst before its first answer; too high and it waits long for its first calls.
pub const DEFAULT_LATENCY: Duration = Duration::from_millis(10);

/// Highest estimate: one minute, above any call deadline. Failures are recorded as samples
/// several times the current estimate (see `NodeConn::record`), so without a ceiling a node that
/// keeps failing would see its estimate multiply without end until it overflowed; a minute
/// already makes it lose every pick against any working node.
pub const MAX_ESTIMATE: Duration = Duration::from_secs(60);

/// The estimate after `elapsed_ns` without samples.
pub fn decayed(estimate_ns: f64, elapsed_ns: f64) -> f64 {
    estimate_ns * (-elapsed_ns.max(0.0) / DECAY.as_nanos() as f64).exp()
}

/// The estimate after a sample of `rtt_ns`, `elapsed_ns` after the previous update.
pub fn updated(estimate_ns: f64, elapsed_ns: f64, rtt_ns: f64) -> f64 {
    if rtt_ns > estimate_ns {
        return rtt_ns;
    }
    let decay = (-elapsed_ns.max(0.0) / DECAY.as_nanos() as f64).exp();
    estimate_ns * decay + rtt_ns * (1.0 - decay)
}

/// The shared estimate of one node. Two atomics, updated without a lock: a race between two
/// samples can lose one of them, which an average of many samples does not notice.
#[derive(Debug)]
pub struct PeakEwma {
    estimate_ns: AtomicU64,
    stamp_ns: AtomicU64,
}

impl PeakEwma {
    /// A fresh estimate at [`DEFAULT_LATENCY`], stamped `now_ns`.
    pub fn new(now_ns: u64) -> Self {
        Self {
            estimate_ns: AtomicU64::new((DEFAULT_LATENCY.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(now_ns),
        }
    }

    /// Records a call's latency.
    pub fn observe(&self, rtt: Duration, now_ns: u64) {
        let est = f64::from_bits(self.estimate_ns.load(Ordering::Relaxed));
        let stamp = self.stamp_ns.swap(now_ns, Ordering::Relaxed);
        let next = updated(
            est,
            now_ns.saturating_sub(stamp) as f64,
            rtt.min(MAX_ESTIMATE).as_nanos() as f64,
        );
        self.estimate_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    /// The current estimate, in milliseconds.
    pub fn estimate_ms(&self, now_ns: u64) -> f64 {
        let est = f64::from_bits(self.estimate_ns.load(Ordering::Relaxed));
        let stamp = self.stamp_ns.load(Ordering::Relaxed);
        decayed(est, now_ns.saturating_sub(stamp) as f64) / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn peaks_jump_and_valleys_decay() {
        let e = PeakEwma::new(0);
        e.observe(Duration::from_millis(50), MS);
        assert!(
            (e.estimate_ms(MS) - 50.0).abs() < 1e-6,
            "a peak replaces the estimate"
        );
        // Many fast samples, one per 2 ms over one decay time, pull it down toward 2 ms.
        let mut t = MS;
        for _ in 0..1000 {
            t += 2 * MS;
            e.observe(Duration::from_millis(2), t);
        }
        let est = e.estimate_ms(t);
        assert!(est < 50.0 * 0.4 && est > 2.0, "estimate {est}");
        // Reading long after the last sample decays toward zero.
        assert!(e.estimate_ms(t + 60_000 * MS) < est * 0.01);
    }

    #[test]
    fn the_estimate_has_a_ceiling() {
        let e = PeakEwma::new(0);
        e.observe(Duration::MAX, MS);
        assert_eq!(e.estimate_ms(MS), MAX_ESTIMATE.as_millis() as f64);
    }
}
