//! Reconnect backoff: a node this router could not connect to is left alone for a while, so that
//! calls do not each pay for a doomed connection attempt (tonic's channel would try again on
//! every call) and a restarting node is not stormed by every router at once.
//!
//! After the n-th failed connection in a row the node is skipped for `base × 2^(n-1)`, capped,
//! with ±20 % jitter (gRPC's connection-backoff recipe, with shorter times: here the control
//! plane's probes also watch the node, and a router holding a node back for two minutes would
//! leave capacity unused long after it came back). When the pause ends, the next call that picks
//! the node is the probe: it connects and the backoff ends, or it fails (and is retried on
//! another node) and the next pause is longer. Unlike outlier ejection, there is no cap on how
//! many nodes of a region may be in backoff: a refused connection is not a matter of opinion,
//! and a region whose nodes all refuse is left by the spill-over rule at once. For the same
//! reason one refused connection also counts as a full failure streak for outlier ejection
//! (see `NodeConn::connect_failed`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// First pause: one second, the control plane's probe interval. Shorter pauses made every
/// router knock on a dead node's door several times a second until the probes took it out,
/// each knock a retried call (the failover benchmark saw them stretch a region's failover over
/// seconds); a node that restarts in place is still used again within a second or two.
pub const BASE_BACKOFF: Duration = Duration::from_secs(1);

/// Longest pause: thirty seconds, past the control plane's probe interval many times over; a
/// node down for longer is out of the routing table anyway.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The pause after the `n`-th failed connection in a row (`n` ≥ 1), before jitter.
pub fn backoff(n: u32) -> Duration {
    let factor = 1u32 << n.saturating_sub(1).min(16);
    BASE_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

/// One node's reconnect state, shared by all calls.
#[derive(Debug, Default)]
pub struct Reconnect {
    failures: AtomicU32,
    paused_until_ms: AtomicU64,
}

impl Reconnect {
    /// A connection attempt failed at `now_ms`; `jitter` in [0, 1) spreads the pause over
    /// ±20 %. Returns the pause.
    pub fn failed(&self, now_ms: u64, jitter: f64) -> Duration {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let pause = backoff(n).mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0));
        let until = now_ms.saturating_add(pause.as_millis() as u64);
        self.paused_until_ms.fetch_max(until, Ordering::Relaxed);
        pause
    }

    /// The node answered: the backoff ends.
    pub fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.paused_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Whether calls should skip the node at `now_ms`.
    pub fn is_paused(&self, now_ms: u64) -> bool {
        now_ms < self.paused_until_ms.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_a_cap_and_end_on_success() {
        assert_eq!(backoff(1), BASE_BACKOFF);
        assert_eq!(backoff(2), BASE_BACKOFF * 2);
        assert_eq!(backoff(40), MAX_BACKOFF);
        let r = Reconnect::default();
        assert!(!r.is_paused(0));
        let p = r.failed(1_000, 0.5);
        assert_eq!(p, BASE_BACKOFF);
        assert!(r.is_paused(1_000 + 999));
        assert!(!r.is_paused(1_000 + 1_000));
        // The second failure in a row pauses twice as long, within the jitter.
        let p = r.failed(3_000, 0.0);
        assert_eq!(p, (BASE_BACKOFF * 2).mul_f64(0.8));
        assert!(r.is_paused(3_000 + 1_599));
        r.succeeded();
        assert!(!r.is_paused(3_001));
        assert_eq!(r.failed(5_000, 1.0), BASE_BACKOFF.mul_f64(1.2));
    }
}
