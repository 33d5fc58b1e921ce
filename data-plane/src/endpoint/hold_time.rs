//! The mean time a call holds one of a node's slots: how fast the node frees slots, for the
//! wait queue's admission estimate ([`crate::queue::drain_rate`]).
//!
//! Not the peak EWMA that ranks nodes ([`super::peak_ewma`]): that one is pessimistic on
//! purpose (a slow sample replaces it at once and decays over seconds), which is right for
//! steering calls away from a node that turned slow but wrong for predicting how soon slots
//! free up. With log-normal service times (σ = 0.3) the peak estimate sits some 50 % above the
//! mean, so a queue judged by it sheds calls that would have been served well within the wait
//! limit. This is a plain exponential average over calls, of every call's real time in its
//! slot whatever its outcome (a failure frees its slot as fast as it failed; a call that hung
//! until its deadline held the slot that long).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Weight of one call in the average: 1/32, a memory of a few dozen calls. Enough to smooth a
/// log-normal service time to within a few per cent (the average's relative noise is about
/// σ·√(α/2) ≈ 4 % at σ = 0.3) while following a node that slows down within a fraction of a
/// second at the rates where the queue matters (hundreds of calls a second).
const ALPHA: f64 = 1.0 / 32.0;

/// The average, in nanoseconds as `f64` bits; zero until the first call ends. Updated without
/// a lock: two calls ending at once may lose one sample, which an average does not notice.
#[derive(Debug, Default)]
pub struct HoldTime(AtomicU64);

impl HoldTime {
    /// Records that a call held a slot for `held`.
    pub fn observe(&self, held: Duration) {
        let sample = held.as_nanos() as f64;
        let mean = f64::from_bits(self.0.load(Ordering::Relaxed));
        let next = if mean > 0.0 {
            mean + ALPHA * (sample - mean)
        } else {
            sample
        };
        if next.is_finite() {
            self.0.store(next.to_bits(), Ordering::Relaxed);
        }
    }

    /// The mean hold time in milliseconds, `None` before any call has ended.
    pub fn mean_ms(&self) -> Option<f64> {
        let mean = f64::from_bits(self.0.load(Ordering::Relaxed));
        (mean > 0.0).then_some(mean / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_call_sets_the_mean_and_later_ones_move_it_slowly() {
        let h = HoldTime::default();
        assert_eq!(h.mean_ms(), None);
        h.observe(Duration::from_millis(20));
        assert!((h.mean_ms().unwrap() - 20.0).abs() < 1e-9);
        // One call three times longer moves the mean by 1/32 of the difference, not to it.
        h.observe(Duration::from_millis(60));
        assert!((h.mean_ms().unwrap() - 21.25).abs() < 1e-9);
    }

    #[test]
    fn it_follows_the_mean_not_the_peaks() {
        // Alternating 10 ms and 30 ms calls: the mean settles near 20 ms (a peak EWMA would sit
        // near 30 ms).
        let h = HoldTime::default();
        for i in 0..2_000 {
            h.observe(Duration::from_millis(if i % 2 == 0 { 10 } else { 30 }));
        }
        let m = h.mean_ms().unwrap();
        assert!((m - 20.0).abs() < 1.0, "mean {m}");
    }

    #[test]
    fn huge_samples_stay_finite() {
        let h = HoldTime::default();
        h.observe(Duration::MAX);
        h.observe(Duration::MAX);
        assert!(h.mean_ms().unwrap().is_finite());
    }
}
