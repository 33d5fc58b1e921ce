//! Per-model settings as the router applies them, from the control plane's `ModelPolicy`.
//! Zero values in the message mean defaults; out-of-range values (the control plane refuses
//! them, but a router must not trust its input blindly) are clamped to the nearest sane value.

use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{Balancer, ModelPolicy};

use crate::balance::Policy;
use crate::balance::locality::DEFAULT_OVERPROVISIONING;
use crate::batch::BatchSpec;
use crate::cache::CacheSpec;
use crate::canary::Canary;
use crate::priority::Priority;
use crate::rate_limit::RateLimitSpec;

/// Default call deadline: the seed article's advice for model APIs (3–5 s) at its upper end,
/// so a slow but healthy model is not cut off.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default attempts per idempotent call: the first and two retries. Two retries turn even two
/// nodes dying between probes into slower calls instead of failures; the retry budget keeps them
/// from multiplying load during an outage.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Most attempts a policy may ask for: beyond five, retries only add load.
pub const MAX_ATTEMPTS_LIMIT: u32 = 5;

/// When to send a hedge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hedge {
    /// Never.
    Off,
    /// After a fixed delay.
    After(Duration),
    /// After the model's observed p95 latency.
    P95,
}

/// The router's view of one model's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// How calls are spread within a region.
    pub balancer: Policy,
    /// Header carrying the affinity key (consistent hashing).
    pub hash_header: Option<String>,
    /// Deadline for calls that bring none.
    pub timeout: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Deadline of one attempt.
    pub per_try_timeout: Option<Duration>,
    /// Whether calls may be retried and hedged.
    pub idempotent: bool,
    /// Hedging.
    pub hedge: Hedge,
    /// Route to unhealthy nodes when no healthy one is left.
    pub panic_mode: bool,
    /// Overprovisioning factor of the spill-over rule.
    pub overprovisioning: f64,
    /// Priority of the calls that name none.
    pub priority: Priority,
    /// The model's rate limit on this router, if any.
    pub rate_limit: Option<RateLimitSpec>,
    /// The model a call goes to when this one cannot serve it ([`crate::ingress::fallback`]).
    /// Never the model itself: a policy naming it (the control plane refuses one) has none.
    pub fallback: Option<String>,
    /// The model's response caching on this router, if any ([`crate::cache`]).
    pub cache: Option<CacheSpec>,
    /// The model's canary, if any ([`crate::canary`]).
    pub canary: Option<Canary>,
    /// The model's request batching, if any ([`crate::batch`]).
    pub batch: Option<BatchSpec>,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self::from_policy(&ModelPolicy::default())
    }
}

impl ModelSettings {
    /// Settings from a policy message, defaults for zero values.
    pub fn from_policy(p: &ModelPolicy) -> Self {
        let balancer = match p.balancer() {
            Balancer::Unspecified | Balancer::P2cEwma => Policy::P2cEwma,
            Balancer::RoundRobin => Policy::RoundRobin,
            Balancer::LeastRequest => Policy::LeastRequest,
            Balancer::ConsistentHash => Policy::ConsistentHash,
        };
        let ms = |v: u32| (v > 0).then(|| Duration::from_millis(u64::from(v)));
        let hedge = if p.hedge_after_p95 {
            Hedge::P95
        } else {
            ms(p.hedge_after_ms).map_or(Hedge::Off, Hedge::After)
        };
        let overprovisioning = if p.overprovisioning.is_finite() && p.overprovisioning >= 1.0 {
            p.overprovisioning.min(10.0)
        } else {
            DEFAULT_OVERPROVISIONING
        };
        Self {
            balancer,
            hash_header: (!p.hash_header.is_empty()).then(|| p.hash_header.to_ascii_lowercase()),
            timeout: ms(p.timeout_ms).unwrap_or(DEFAULT_TIMEOUT),
            max_attempts: match p.max_attempts {
                0 => DEFAULT_MAX_ATTEMPTS,
                n => n.min(MAX_ATTEMPTS_LIMIT),
            },
            per_try_timeout: ms(p.per_try_timeout_ms),
            idempotent: !p.not_idempotent,
            hedge,
            panic_mode: p.panic_mode,
            overprovisioning,
            priority: Priority::from_proto(p.default_priority),
            rate_limit: RateLimitSpec::from_policy(
                p.rate_limit_rps,
                p.rate_limit_burst,
                &p.rate_limit_key_header,
            ),
            fallback: (!p.fallback_model.is_empty() && p.fallback_model != p.model)
                .then(|| p.fallback_model.clone()),
            cache: CacheSpec::from_policy(
                p.cache_ttl_ms,
                &p.cache_key_header,
                !p.not_idempotent,
                p.cache_epoch,
            ),
            canary: Canary::from_policy(
                &p.model,
                &p.canary_model,
                p.canary_percent,
                &p.canary_key_header,
            ),
            batch: BatchSpec::from_policy(p.batch_max_size, p.batch_window_us),
        }
    }

    /// Whether calls of the model go straight to a node: no canary, no cache, no fallback, no
    /// batching.
    pub fn is_plain(&self) -> bool {
        self.canary.is_none()
            && self.cache.is_none()
            && self.fallback.is_none()
            && self.batch.is_none()
    }

    /// Attempts allowed for this call (1 when the model is not idempotent).
    pub fn attempts(&self) -> u32 {
        if self.idempotent {
            self.max_attempts
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_default_and_nonsense_is_clamped() {
        let d = ModelSettings::default();
        assert_eq!(d.balancer, Policy::P2cEwma);
        assert_eq!(d.timeout, DEFAULT_TIMEOUT);
        assert_eq!(d.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(d.hedge, Hedge::Off);
        assert!(d.idempotent && !d.panic_mode);
        assert_eq!(d.priority, Priority::Normal);
        assert_eq!(d.rate_limit, None);
        assert_eq!(d.fallback, None);
        assert_eq!(d.cache, None);
        assert!(d.is_plain());
        let p = ModelPolicy {
            max_attempts: 99,
            overprovisioning: f64::NAN,
            not_idempotent: true,
            hedge_after_ms: 20,
            ..Default::default()
        };
        let s = ModelSettings::from_policy(&p);
        assert_eq!(s.max_attempts, MAX_ATTEMPTS_LIMIT);
        assert_eq!(s.attempts(), 1);
        assert_eq!(s.overprovisioning, DEFAULT_OVERPROVISIONING);
        assert_eq!(s.hedge, Hedge::After(Duration::from_millis(20)));
    }

    #[test]
    fn a_model_is_never_its_own_fallback() {
        let p = |model: &str, fallback: &str| ModelPolicy {
            model: model.into(),
            fallback_model: fallback.into(),
            ..Default::default()
        };
        let fallback = |model, fb| ModelSettings::from_policy(&p(model, fb)).fallback;
        assert_eq!(fallback("big", "small").as_deref(), Some("small"));
        assert_eq!(fallback("big", "big"), None);
        assert_eq!(fallback("big", ""), None);
    }
}
