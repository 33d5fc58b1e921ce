//! Per-model rate limits: a token bucket per caller, enforced by each router on its own.
//!
//! The seed article's advice, a token bucket at about 1.5 × the peak rate, for a model's calls:
//! `ModelPolicy.rate_limit_rps` calls a second with bursts of `rate_limit_burst`, for every
//! caller together or, when `rate_limit_key_header` names a request header (an API key, a
//! tenant), for each value of it. A call over its bucket is refused RESOURCE_EXHAUSTED before
//! it is routed, saying when a call would be admitted again; it never reaches a node.
//!
//! Each router keeps its own buckets, as Envoy's local rate limit does: a fleet of N routers
//! admits up to N times the rate (a caller's calls spread over routers by its connections). A
//! global limit would need every router to ask a shared counter on every call; routers have
//! no such path, and the control plane is deliberately not on the call path.
//!
//! The buckets are governor's (GCRA: a token bucket kept as one timestamp, updated with one
//! compare-and-swap). Per-caller buckets live in a bounded cache ([`MAX_KEYS`]), because their
//! keys come from the network.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::HeaderMap;

use crate::error::RouteError;

/// Most callers' buckets one model keeps per router. The keys come from the network, so they
/// must be bounded: at about a hundred bytes a bucket this is some ten megabytes at worst. A
/// caller whose bucket was evicted (the least recently and frequently used go first) starts
/// again with a full one: a flood of made-up keys can earn each of them one burst, no more.
pub const MAX_KEYS: u64 = 100_000;

/// Shortest time a caller's idle bucket is kept. A bucket idle for longer than it takes to
/// refill (burst ÷ rate) is full anyway, so forgetting it then changes nothing; a minute keeps
/// the cache from churning for callers that pause briefly.
const MIN_IDLE: Duration = Duration::from_secs(60);

/// Longest key a refusal's message repeats: a header can be kilobytes long.
const MAX_KEY_IN_MESSAGE: usize = 64;

/// A model's rate limit, from its policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitSpec {
    /// Calls a second admitted.
    pub rps: f64,
    /// Calls admitted at once after a quiet spell.
    pub burst: u32,
    /// The header telling callers apart (lowercase), if any.
    pub key_header: Option<String>,
}

impl RateLimitSpec {
    /// The limit a policy sets, if any: `None` for a rate of 0 (or nonsense, which the control
    /// plane refuses). A burst of 0 means one second's worth, at least 1.
    pub fn from_policy(rps: f64, burst: u32, key_header: &str) -> Option<Self> {
        if !(rps.is_finite() && rps > 0.0) {
            return None;
        }
        let burst = if burst == 0 {
            // At least 1; a rate in the millions makes a burst in the millions, in range.
            rps.ceil().clamp(1.0, f64::from(u32::MAX)) as u32
        } else {
            burst
        };
        Some(Self {
            rps,
            burst,
            key_header: (!key_header.is_empty()).then(|| key_header.to_ascii_lowercase()),
        })
    }

    fn quota(&self) -> Option<Quota> {
        let period = Duration::try_from_secs_f64(1.0 / self.rps).ok()?;
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))?;
        Some(quota.allow_burst(NonZeroU32::new(self.burst)?))
    }
}

/// The buckets of one spec.
enum Buckets {
    /// One for every caller together.
    One(DefaultDirectRateLimiter),
    /// One per value of the key header (a call without the header uses the empty key).
    Keyed {
        quota: Quota,
        buckets: moka::sync::Cache<Vec<u8>, Arc<DefaultDirectRateLimiter>>,
    },
}

impl Buckets {
    fn new(spec: &RateLimitSpec) -> Option<Self> {
        let quota = spec.quota()?;
        Some(match spec.key_header {
            None => Buckets::One(RateLimiter::direct(quota)),
            Some(_) => {
                let refill = Duration::try_from_secs_f64(f64::from(spec.burst) / spec.rps)
                    .unwrap_or(MIN_IDLE);
                Buckets::Keyed {
                    quota,
                    buckets: moka::sync::Cache::builder()
                        .max_capacity(MAX_KEYS)
                        .time_to_idle(refill.max(MIN_IDLE))
                        .build(),
                }
            }
        })
    }
}

/// A model's buckets on this router, kept across routing tables (a new table every few
/// seconds must not refill every bucket) and rebuilt when the model's limit changes.
#[derive(Default)]
pub struct Limiter {
    current: Mutex<Option<(RateLimitSpec, Arc<Buckets>)>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").finish_non_exhaustive()
    }
}

impl Limiter {
    fn buckets(&self, spec: &RateLimitSpec) -> Option<Arc<Buckets>> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((s, b)) = current.as_ref()
            && s == spec
        {
            return Some(b.clone());
        }
        let buckets = Arc::new(Buckets::new(spec)?);
        *current = Some((spec.clone(), buckets.clone()));
        Some(buckets)
    }

    /// Takes a token for a call to `model` with `headers` under `spec`, or says when the
    /// caller may call again.
    pub fn check(
        &self,
        model: &str,
        spec: &RateLimitSpec,
        headers: &HeaderMap,
    ) -> Result<(), RouteError> {
        let Some(buckets) = self.buckets(spec) else {
            return Ok(());
        };
        let (result, key) = match &*buckets {
            Buckets::One(bucket) => (bucket.check(), None),
            Buckets::Keyed { quota, buckets } => {
                let name = spec.key_header.as_deref().unwrap_or_default();
                let key = headers
                    .get(name)
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default();
                let bucket =
                    buckets.get_with_by_ref(&key, || Arc::new(RateLimiter::direct(*quota)));
                (bucket.check(), Some((name, key)))
            }
        };
        result.map_err(|not_until| {
            let retry_after = not_until.wait_time_from(DefaultClock::default().now());
            let caller = key.map(|(name, value)| {
                let mut shown = String::from_utf8_lossy(&value).into_owned();
                if shown.len() > MAX_KEY_IN_MESSAGE {
                    let mut end = MAX_KEY_IN_MESSAGE;
                    while !shown.is_char_boundary(end) {
                        end -= 1;
                    }
                    shown.truncate(end);
                    shown.push('…');
                }
                format!("{name} {shown:?}")
            });
            RouteError::RateLimited {
                model: model.to_owned(),
                caller,
                rps: spec.rps,
                retry_after,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(key: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(k) = key {
            h.insert("x-api-key", k.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_policy_sets_a_limit_or_none() {
        assert_eq!(RateLimitSpec::from_policy(0.0, 10, ""), None);
        assert_eq!(RateLimitSpec::from_policy(f64::NAN, 10, ""), None);
        assert_eq!(RateLimitSpec::from_policy(-1.0, 10, ""), None);
        let s = RateLimitSpec::from_policy(2.5, 0, "X-Api-Key").unwrap();
        assert_eq!(s.burst, 3, "one second's worth, rounded up");
        assert_eq!(s.key_header.as_deref(), Some("x-api-key"));
        assert_eq!(RateLimitSpec::from_policy(0.1, 0, "").unwrap().burst, 1);
        assert_eq!(
            RateLimitSpec::from_policy(1e12, 0, "").unwrap().burst,
            u32::MAX
        );
    }

    #[test]
    fn a_bucket_admits_its_burst_then_refuses_saying_when() {
        // 1 call a second, bursts of 3: within this test's few milliseconds, exactly 3 pass.
        let spec = RateLimitSpec::from_policy(1.0, 3, "").unwrap();
        let limiter = Limiter::default();
        let h = headers(None);
        for _ in 0..3 {
            limiter.check("echo", &spec, &h).unwrap();
        }
        let e = limiter.check("echo", &spec, &h).unwrap_err();
        let RouteError::RateLimited { retry_after, .. } = &e else {
            panic!("{e:?}");
        };
        assert!(*retry_after > Duration::from_millis(500), "{retry_after:?}");
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("rate limit of 1 calls/s"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn callers_have_buckets_of_their_own() {
        let spec = RateLimitSpec::from_policy(1.0, 2, "x-api-key").unwrap();
        let limiter = Limiter::default();
        for _ in 0..2 {
            limiter.check("echo", &spec, &headers(Some("a"))).unwrap();
        }
        let e = limiter
            .check("echo", &spec, &headers(Some("a")))
            .unwrap_err();
        assert!(e.to_string().contains("x-api-key \"a\""), "{e}");
        // b, and callers without the key (one shared bucket), are untouched by a's calls.
        for _ in 0..2 {
            limiter.check("echo", &spec, &headers(Some("b"))).unwrap();
            limiter.check("echo", &spec, &headers(None)).unwrap();
        }
        assert!(limiter.check("echo", &spec, &headers(None)).is_err());
        // A long key is cut short in the message.
        let long = "k".repeat(500);
        for _ in 0..2 {
            limiter.check("echo", &spec, &headers(Some(&long))).unwrap();
        }
        let e = limiter
            .check("echo", &spec, &headers(Some(&long)))
            .unwrap_err();
        assert!(e.to_string().len() < 300, "{e}");
    }

    #[test]
    fn a_changed_limit_starts_new_buckets_and_an_unchanged_one_keeps_them() {
        let limiter = Limiter::default();
        let h = headers(None);
        let one = RateLimitSpec::from_policy(1.0, 1, "").unwrap();
        limiter.check("echo", &one, &h).unwrap();
        assert!(
            limiter.check("echo", &one.clone(), &h).is_err(),
            "same spec, same bucket"
        );
        let two = RateLimitSpec::from_policy(1.0, 2, "").unwrap();
        limiter.check("echo", &two, &h).unwrap();
        limiter.check("echo", &two, &h).unwrap();
        assert!(limiter.check("echo", &two, &h).is_err());
    }
}
