//! What hedging needs to know: a model's recent latency distribution, for "hedge after p95".
//!
//! Two ten-second windows of an HDR histogram: the p95 comes from the last full window (or the
//! current one while there is none), so it follows the model's latency as it drifts without
//! being moved by any single call.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

/// Window length: long enough for hundreds of samples at modest rates, short enough to follow
/// a model whose latency changes (a new version, a loaded GPU).
const WINDOW: Duration = Duration::from_secs(10);

/// Fewest samples a p95 is computed from; below that one slow call would be the p95.
const MIN_SAMPLES: u64 = 20;

/// Highest latency recorded, in microseconds (values above are clamped): one minute.
const MAX_US: u64 = 60_000_000;

#[derive(Debug)]
struct Windows {
    current: Histogram<u64>,
    previous: Histogram<u64>,
    started: Instant,
}

/// Recent latencies of one model.
#[derive(Debug)]
pub struct LatencyWindow {
    inner: Mutex<Windows>,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        let h = || Histogram::new_with_bounds(1, MAX_US, 2).expect("static histogram bounds");
        Self {
            inner: Mutex::new(Windows {
                current: h(),
                previous: h(),
                started: Instant::now(),
            }),
        }
    }
}

impl LatencyWindow {
    /// Records one successful call's latency.
    pub fn record(&self, d: Duration) {
        let mut w = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if w.started.elapsed() >= WINDOW {
            let Windows {
                current, previous, ..
            } = &mut *w;
            std::mem::swap(current, previous);
            current.reset();
            w.started = Instant::now();
        }
        let us = (d.as_micros() as u64).clamp(1, MAX_US);
        let _ = w.current.record(us);
    }

    /// The p95, when enough calls were seen.
    pub fn p95(&self) -> Option<Duration> {
        let w = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let h = if w.previous.len() >= MIN_SAMPLES {
            &w.previous
        } else if w.current.len() >= MIN_SAMPLES {
            &w.current
        } else {
            return None;
        };
        Some(Duration::from_micros(h.value_at_quantile(0.95)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_needs_samples_then_follows_them() {
        let w = LatencyWindow::default();
        for _ in 0..10 {
            w.record(Duration::from_millis(1));
        }
        assert_eq!(w.p95(), None);
        for i in 0..90 {
            w.record(Duration::from_millis(if i < 80 { 1 } else { 50 }));
        }
        let p = w.p95().unwrap();
        assert!(p >= Duration::from_millis(49), "{p:?}");
    }
}
