//! Per-model routing policies: validated, stored under `/fulcrum/v1/policies/<model>`, and
//! carried to every router inside the routing table.

use fulcrum_proto::fulcrum::v1::{Balancer, ModelPolicy, Priority};
use prost::Message;

use crate::error::Error;
use crate::keys;
use crate::store::Store;

/// Longest deadline a policy may set: ten minutes, beyond any single inference call; longer
/// work belongs to an asynchronous (submit and poll) API.
const MAX_TIMEOUT_MS: u32 = 600_000;

/// Most attempts a policy may ask for (the router clamps to the same value).
const MAX_ATTEMPTS: u32 = 5;

/// Largest overprovisioning factor: beyond 10 a region would keep all its traffic with 90 % of
/// its capacity gone, which is no longer failover.
const MAX_OVERPROVISIONING: f64 = 10.0;

/// Highest rate limit a policy may set, calls a second per router: far above what one router
/// serves (tens of thousands a second), so any real limit fits, while nonsense (1e300) is
/// refused.
const MAX_RATE_LIMIT_RPS: f64 = 1e6;

/// Largest burst a policy may set: a minute at the highest rate would be pointless; this is
/// ten seconds of it.
const MAX_RATE_LIMIT_BURST: u32 = 10_000_000;

/// Longest time a policy may keep a model's answers cached: an hour. Answers are only as fresh
/// as their TTL (a model updated in place keeps being answered from the cache until then), so
/// anything longer belongs to an application cache that knows when to invalidate.
const MAX_CACHE_TTL_MS: u32 = 3_600_000;

/// Most calls one batch may merge: past a thousand, a batch's answer is one huge message and
/// its slowest member's wait dominates everyone's latency.
const MAX_BATCH_SIZE: u32 = 1024;

/// Longest a call may wait for others to join its batch: 100 ms, far past the few
/// milliseconds batching wants, so a policy can still be wrong only within reason.
const MAX_BATCH_WINDOW_US: u32 = 100_000;

/// Checks a policy; the error names the first bad field.
pub fn validate(p: &ModelPolicy) -> Result<(), Error> {
    let bad = |m: String| {
        Err(Error::InvalidArgument(format!(
            "invalid policy for {:?}: {m}",
            p.model
        )))
    };
    if p.model.is_empty() {
        return Err(Error::InvalidArgument("policy.model is required".into()));
    }
    model_name_valid(&p.model).map_err(Error::InvalidArgument)?;
    if !p.fallback_model.is_empty() {
        if p.fallback_model == p.model {
            return bad("fallback_model names the model itself".into());
        }
        model_name_valid(&p.fallback_model).or_else(|e| bad(format!("fallback_model: {e}")))?;
    }
    if Balancer::try_from(p.balancer).is_err() {
        return bad(format!("unknown balancer {}", p.balancer));
    }
    if p.rate_limit_rps != 0.0
        && !(p.rate_limit_rps.is_finite() && (0.0..=MAX_RATE_LIMIT_RPS).contains(&p.rate_limit_rps))
    {
        return bad(format!(
            "rate_limit_rps {} is outside [0, {MAX_RATE_LIMIT_RPS}]",
            p.rate_limit_rps
        ));
    }
    if p.rate_limit_rps == 0.0 && (p.rate_limit_burst != 0 || !p.rate_limit_key_header.is_empty()) {
        return bad("rate_limit_burst and rate_limit_key_header need rate_limit_rps".into());
    }
    if let Some(e) = above("rate_limit_burst", p.rate_limit_burst, MAX_RATE_LIMIT_BURST) {
        return bad(e);
    }
    if let Some(e) = header_invalid("rate_limit_key_header", &p.rate_limit_key_header) {
        return bad(e);
    }
    if !p.canary_model.is_empty() {
        if p.canary_model == p.model {
            return bad("canary_model names the model itself".into());
        }
        model_name_valid(&p.canary_model).or_else(|e| bad(format!("canary_model: {e}")))?;
    }
    if !(p.canary_percent.is_finite() && (0.0..=100.0).contains(&p.canary_percent)) {
        return bad(format!(
            "canary_percent {} is outside [0, 100]",
            p.canary_percent
        ));
    }
    if p.canary_model.is_empty() && (p.canary_percent != 0.0 || !p.canary_key_header.is_empty()) {
        return bad("canary_percent and canary_key_header need canary_model".into());
    }
    if let Some(e) = header_invalid("canary_key_header", &p.canary_key_header) {
        return bad(e);
    }
    if let Some(e) = above("batch_max_size", p.batch_max_size, MAX_BATCH_SIZE) {
        return bad(e);
    }
    if let Some(e) = above("batch_window_us", p.batch_window_us, MAX_BATCH_WINDOW_US) {
        return bad(e);
    }
    if p.batch_max_size <= 1 && p.batch_window_us != 0 {
        return bad("batch_window_us needs batch_max_size of 2 or more".into());
    }
    if let Some(e) = above("cache_ttl_ms", p.cache_ttl_ms, MAX_CACHE_TTL_MS) {
        return bad(e);
    }
    if p.cache_ttl_ms > 0 && p.not_idempotent {
        return bad(
            "a not_idempotent model cannot be cached: a cached answer would skip its side effects"
                .into(),
        );
    }
    if p.cache_ttl_ms == 0 && !p.cache_key_header.is_empty() {
        return bad("cache_key_header needs cache_ttl_ms".into());
    }
    if let Some(e) = header_invalid("cache_key_header", &p.cache_key_header) {
        return bad(e);
    }
    if Priority::try_from(p.default_priority).is_err() {
        return bad(format!("unknown default_priority {}", p.default_priority));
    }
    if p.balancer() == Balancer::ConsistentHash && p.hash_header.is_empty() {
        return bad("consistent hashing needs hash_header".into());
    }
    if let Some(e) = header_invalid("hash_header", &p.hash_header) {
        return bad(e);
    }
    if let Some(e) = above("timeout_ms", p.timeout_ms, MAX_TIMEOUT_MS) {
        return bad(e);
    }
    if let Some(e) = above("per_try_timeout_ms", p.per_try_timeout_ms, MAX_TIMEOUT_MS) {
        return bad(e);
    }
    if let Some(e) = above("max_attempts", p.max_attempts, MAX_ATTEMPTS) {
        return bad(e);
    }
    if let Some(e) = above("hedge_after_ms", p.hedge_after_ms, MAX_TIMEOUT_MS) {
        return bad(e);
    }
    if p.hedge_after_ms > 0 && p.hedge_after_p95 {
        return bad("hedge after a fixed delay or after p95, not both".into());
    }
    if p.overprovisioning != 0.0
        && !(p.overprovisioning.is_finite()
            && (1.0..=MAX_OVERPROVISIONING).contains(&p.overprovisioning))
    {
        return bad(format!(
            "overprovisioning {} is outside [1, {MAX_OVERPROVISIONING}]",
            p.overprovisioning
        ));
    }
    Ok(())
}

/// Checks a model name by the rules a node's declared models follow (the registry's), so a
/// policy can only name a model a node could serve.
fn model_name_valid(model: &str) -> Result<(), String> {
    crate::registry::validate(&fulcrum_proto::fulcrum::v1::NodeSpec {
        id: "policy".into(),
        address: "127.0.0.1:1".into(),
        region: "r".into(),
        capacity: 1,
        models: vec![fulcrum_proto::fulcrum::v1::Model {
            name: model.to_owned(),
            versions: vec![],
        }],
        ..Default::default()
    })
    .map_err(|e| e.to_string().replace("invalid node spec: ", ""))
}

/// Why `value` of `field` is too large, if it is.
fn above(field: &str, value: u32, max: u32) -> Option<String> {
    (value > max).then(|| format!("{field} {value} is above {max}"))
}

/// Why `value` of `field` is not a header name, if it is set and is not.
fn header_invalid(field: &str, value: &str) -> Option<String> {
    (!value.is_empty() && http_header_name_invalid(value))
        .then(|| format!("{field} {value:?} is not a valid header name"))
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        || name.starts_with(':')
}

/// Times a read-modify-write of a policy is tried when concurrent writers keep changing it:
/// operators' commands, so a conflict is rare and two or three tries settle it; past this many
/// the caller is told to retry (ABORTED) rather than kept waiting.
const WRITE_TRIES: usize = 8;

/// Stores a policy (replacing the previous one) and returns it as stored: with the cache epoch
/// the control plane keeps ([`ModelPolicy::cache_epoch`]; a value sent is ignored). A policy
/// that caches keeps the stored policy's epoch when that one cached too, else gets a new one,
/// so answers cached under an earlier policy (one deleted since, say) are never served again.
pub async fn set(store: &dyn Store, p: &ModelPolicy) -> Result<ModelPolicy, Error> {
    validate(p)?;
    update(store, &p.model, |old| {
        let cache_epoch = match old {
            _ if p.cache_ttl_ms == 0 => 0,
            Some(o) if o.cache_ttl_ms > 0 => o.cache_epoch,
            Some(o) => new_epoch(o.cache_epoch),
            None => new_epoch(0),
        };
        Ok(ModelPolicy {
            cache_epoch,
            ..p.clone()
        })
    })
    .await
}

/// Gives a caching model's policy a new cache epoch: every router's cached answers of it go
/// stale. NOT_FOUND without a policy, FAILED_PRECONDITION when it caches nothing; returns the
/// policy as stored.
pub async fn flush_cache(store: &dyn Store, model: &str) -> Result<ModelPolicy, Error> {
    if model.is_empty() {
        return Err(Error::InvalidArgument(
            "name the model whose cached answers to flush".into(),
        ));
    }
    update(store, model, |old| match old {
        None => Err(Error::PolicyNotFound(model.to_owned())),
        Some(o) if o.cache_ttl_ms == 0 => Err(Error::NotCaching(model.to_owned())),
        Some(o) => Ok(ModelPolicy {
            cache_epoch: new_epoch(o.cache_epoch),
            ..o.clone()
        }),
    })
    .await
}

/// A cache epoch newer than `old`: the control plane's clock in Unix milliseconds, so that a
/// policy deleted and set again does not start over at an epoch it had before; one more than
/// `old` if the clock is behind it.
fn new_epoch(old: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    now.max(old.saturating_add(1))
}

/// Writes `model`'s policy as `change` makes it from the stored one, if the stored one is
/// still what `change` saw (compare-and-put), trying again when a concurrent writer won.
async fn update<F>(store: &dyn Store, model: &str, change: F) -> Result<ModelPolicy, Error>
where
    F: Fn(Option<&ModelPolicy>) -> Result<ModelPolicy, Error>,
{
    let key = keys::policy(model);
    for _ in 0..WRITE_TRIES {
        let current = store.get(&key).await?;
        let (expected, old) = match &current {
            Some(kv) => (
                kv.mod_revision,
                Some(
                    ModelPolicy::decode(kv.value.as_slice()).map_err(|source| Error::Decode {
                        key: key.clone(),
                        source,
                    })?,
                ),
            ),
            None => (0, None),
        };
        let new = change(old.as_ref())?;
        if store
            .compare_and_put(&key, expected, new.encode_to_vec())
            .await?
            .is_some()
        {
            return Ok(new);
        }
    }
    Err(Error::Conflict(format!("model {model:?}'s policy")))
}

/// One model's policy; NOT_FOUND when none is set.
pub async fn get(store: &dyn Store, model: &str) -> Result<ModelPolicy, Error> {
    let key = keys::policy(model);
    let kv = store
        .get(&key)
        .await?
        .ok_or_else(|| Error::PolicyNotFound(model.to_owned()))?;
    ModelPolicy::decode(kv.value.as_slice()).map_err(|source| Error::Decode { key, source })
}

/// Every stored policy, sorted by model.
pub async fn list(store: &dyn Store) -> Result<Vec<ModelPolicy>, Error> {
    let (kvs, _) = store.list(keys::POLICIES).await?;
    kvs.iter()
        .map(|kv| {
            ModelPolicy::decode(kv.value.as_slice()).map_err(|source| Error::Decode {
                key: kv.key.clone(),
                source,
            })
        })
        .collect()
}

/// Removes a model's policy; NOT_FOUND when none is set.
pub async fn delete(store: &dyn Store, model: &str) -> Result<i64, Error> {
    store
        .delete(&keys::policy(model))
        .await?
        .ok_or_else(|| Error::PolicyNotFound(model.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(model: &str) -> ModelPolicy {
        ModelPolicy {
            model: model.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_new_cache_epoch_is_newer_than_the_old_one_whatever_the_clock() {
        let now = new_epoch(0);
        assert!(
            now > 1_700_000_000_000,
            "{now}: the clock in Unix milliseconds"
        );
        // An epoch ahead of the clock (a clock set back) is still passed.
        assert_eq!(new_epoch(now + 10_000), now + 10_001);
        assert_eq!(new_epoch(u64::MAX), u64::MAX);
    }

    #[test]
    fn validation() {
        validate(&p("echo")).unwrap();
        assert!(validate(&p("")).is_err());
        assert!(validate(&p("a/b")).is_err());
        let mut x = p("echo");
        x.balancer = Balancer::ConsistentHash as i32;
        assert!(
            validate(&x)
                .unwrap_err()
                .to_string()
                .contains("hash_header")
        );
        x.hash_header = "x-user".into();
        validate(&x).unwrap();
        x.hash_header = "bad header".into();
        assert!(validate(&x).is_err());
        let mut x = p("echo");
        x.balancer = 42;
        assert!(validate(&x).is_err());
        let mut x = p("echo");
        x.max_attempts = 6;
        assert!(validate(&x).is_err());
        let mut x = p("echo");
        x.overprovisioning = 0.5;
        assert!(validate(&x).is_err());
        x.overprovisioning = f64::NAN;
        assert!(validate(&x).is_err());
        let mut x = p("echo");
        x.hedge_after_ms = 10;
        x.hedge_after_p95 = true;
        assert!(validate(&x).is_err());
        let mut x = p("echo");
        x.default_priority = Priority::Sheddable as i32;
        validate(&x).unwrap();
        x.default_priority = 7;
        let e = validate(&x).unwrap_err().to_string();
        assert!(e.contains("unknown default_priority 7"), "{e}");
        let mut x = p("echo");
        x.rate_limit_rps = 50.0;
        x.rate_limit_burst = 75;
        x.rate_limit_key_header = "x-api-key".into();
        validate(&x).unwrap();
        for (rps, burst, key, says) in [
            (-1.0, 0, "", "rate_limit_rps -1"),
            (f64::NAN, 0, "", "rate_limit_rps NaN"),
            (2e6, 0, "", "rate_limit_rps 2000000"),
            (0.0, 10, "", "need rate_limit_rps"),
            (0.0, 0, "x-api-key", "need rate_limit_rps"),
            (5.0, 20_000_000, "", "rate_limit_burst 20000000"),
            (5.0, 0, "bad key", "not a valid header name"),
        ] {
            let mut x = p("echo");
            x.rate_limit_rps = rps;
            x.rate_limit_burst = burst;
            x.rate_limit_key_header = key.into();
            let e = validate(&x).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn caching_is_bounded_and_only_for_idempotent_models() {
        let mut x = p("echo");
        x.cache_ttl_ms = 30_000;
        x.cache_key_header = "x-tenant".into();
        validate(&x).unwrap();
        for (ttl, key, not_idempotent, says) in [
            (3_600_001, "", false, "cache_ttl_ms 3600001"),
            (1000, "", true, "not_idempotent model cannot be cached"),
            (0, "x-tenant", false, "cache_key_header needs cache_ttl_ms"),
            (1000, "bad key", false, "not a valid header name"),
        ] {
            let mut x = p("echo");
            x.cache_ttl_ms = ttl;
            x.cache_key_header = key.into();
            x.not_idempotent = not_idempotent;
            let e = validate(&x).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn a_canary_is_another_model_with_a_share_in_percent() {
        let mut x = p("llm");
        x.canary_model = "llm-next".into();
        x.canary_percent = 12.5;
        x.canary_key_header = "x-user".into();
        validate(&x).unwrap();
        // Staged: named, no traffic yet.
        x.canary_percent = 0.0;
        validate(&x).unwrap();
        for (model, percent, key, says) in [
            ("llm", 10.0, "", "canary_model names the model itself"),
            ("a/b", 10.0, "", "canary_model"),
            (
                "llm-next",
                100.5,
                "",
                "canary_percent 100.5 is outside [0, 100]",
            ),
            ("llm-next", -1.0, "", "canary_percent -1"),
            ("llm-next", f64::NAN, "", "canary_percent NaN"),
            ("", 10.0, "", "need canary_model"),
            ("", 0.0, "x-user", "need canary_model"),
            ("llm-next", 10.0, "bad key", "not a valid header name"),
        ] {
            let mut x = p("llm");
            x.canary_model = model.into();
            x.canary_percent = percent;
            x.canary_key_header = key.into();
            let e = validate(&x).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn a_fallback_is_another_valid_model_name() {
        let mut x = p("big");
        x.fallback_model = "small".into();
        validate(&x).unwrap();
        x.fallback_model = "big".into();
        let e = validate(&x).unwrap_err().to_string();
        assert!(e.contains("names the model itself"), "{e}");
        x.fallback_model = "a/b".into();
        let e = validate(&x).unwrap_err().to_string();
        assert!(e.contains("fallback_model") && e.contains("\"a/b\""), "{e}");
    }

    #[tokio::test]
    async fn a_refused_policy_stores_nothing() {
        let store = crate::store::embedded::EmbeddedStore::in_memory();
        let mut x = p("echo");
        x.max_attempts = 100;
        assert!(set(&store, &x).await.is_err());
        assert!(list(&store).await.unwrap().is_empty());
        assert!(matches!(
            get(&store, "echo").await,
            Err(Error::PolicyNotFound(_))
        ));
        set(&store, &p("echo")).await.unwrap();
        assert_eq!(list(&store).await.unwrap().len(), 1);
        delete(&store, "echo").await.unwrap();
        assert!(matches!(
            delete(&store, "echo").await,
            Err(Error::PolicyNotFound(_))
        ));
    }
}
