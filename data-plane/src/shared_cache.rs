//! The response cache's shared level: answers kept in Redis, shared by every router that
//! names the same Redis and the same secret (`fulcrum router --cache-redis URL
//! --cache-secret-file FILE`).
//!
//! The seed article's second cache level, under the local one ([`crate::cache`]): a router
//! that does not hold an answer asks Redis before a node, so a request answered by one router
//! is answered from memory by the others (in both regions, when they share a Redis), and a
//! router that restarts finds its answers there. The order on a miss of the local level:
//! identical calls in flight wait for the first ([`crate::cache::Lookup`]), which asks Redis
//! (one `GET` and `PTTL`, pipelined), then a node; an answer a node gave is written back with
//! the model's TTL (`SET … PX`), in the background.
//!
//! - **Keys** are the local level's keys (the request but its id, the key header's value, the
//!   policy's cache epoch: a flush reaches this level too), hashed with keys derived from the
//!   shared secret instead of the router's random ones, so every router computes the same key
//!   and no caller can work one out: `fulcrum:cache:` and 32 hex digits.
//! - **Never in the way**: a lookup waits at most [`LOOKUP_TIMEOUT`]; an error or a timeout
//!   counts as a miss and pauses the level for [`PAUSE_AFTER_ERROR`] (calls go straight to
//!   nodes meanwhile, so a Redis that is down costs one timeout, not one per call); writes
//!   run in the background, at most [`MAX_WRITES_IN_FLIGHT`] at once (more are dropped, and
//!   counted). The connection is redis-rs's `ConnectionManager`, which connects again by
//!   itself.
//! - **What it holds** is what the local level would keep: successful answers of the model
//!   itself, no larger than the local level's largest entry. Redis's own `maxmemory` policy
//!   bounds it (`allkeys-lru` suits a cache).
//! - **Trust**: whoever can write to that Redis can plant answers for every router. Give it
//!   the care the routers' own memory gets (a network of its own, `requirepass` or ACLs in the
//!   URL, TLS with a `rediss://` URL).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::error::SharedCacheError;

/// Longest a lookup waits for Redis. A `GET` within a data center answers in about a
/// millisecond; 20 ms covers a busy Redis and a pause of the router's host, and stays small
/// next to the model calls a hit spares (tens of milliseconds and up for the models worth
/// caching).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_millis(20);

/// How long the level is skipped after an error or a timeout: long enough that a Redis that is
/// down costs each router one timeout a second rather than one per call, short enough that a
/// Redis back up serves again within a second or so.
pub const PAUSE_AFTER_ERROR: Duration = Duration::from_secs(1);

/// Writes in flight at most. A write holds a copy of the answer until Redis acknowledges it;
/// this bounds that memory when Redis is slow (at the local level's largest entry, 4 MiB by
/// default, a few hundred megabytes at worst; answers are usually kilobytes).
pub const MAX_WRITES_IN_FLIGHT: usize = 256;

/// Longest a connection attempt to Redis waits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Shortest secret accepted: 16 bytes (128 bits), as the keys derived from it.
pub const MIN_SECRET_LEN: usize = 16;

/// The prefix of every key the level writes.
pub const KEY_PREFIX: &str = "fulcrum:cache:";

/// The two SipHash keys of the cache, derived from the shared secret (SHA-256 of a label and
/// the secret): every router with the secret hashes requests alike.
pub fn keys_from_secret(secret: &[u8]) -> (u64, u64) {
    let digest = Sha256::new()
        .chain_update(b"fulcrum response cache keys v1\0")
        .chain_update(secret)
        .finalize();
    let half = |i: usize| {
        let mut b = [0; 8];
        b.copy_from_slice(&digest[i..i + 8]);
        u64::from_le_bytes(b)
    };
    (half(0), half(8))
}

/// The Redis key of a cache key.
pub fn redis_key(key: u128) -> String {
    format!("{KEY_PREFIX}{key:032x}")
}

/// A router's shared level and the keys its cache hashes with, checked and ready for
/// [`crate::RouterConfig::shared_cache`].
#[derive(Debug, Clone)]
pub struct SharedCacheSetup {
    /// The connection to Redis.
    pub cache: Arc<SharedCache>,
    /// The cache's hash keys, from the secret ([`keys_from_secret`]).
    pub keys: (u64, u64),
}

impl SharedCacheSetup {
    /// The level at `url`, with keys from `secret` (at least [`MIN_SECRET_LEN`] bytes; leading
    /// and trailing whitespace, such as a file's last newline, is not part of it). Must be
    /// called on a tokio runtime.
    pub fn new(url: &str, secret: &[u8]) -> Result<Self, SharedCacheError> {
        let secret = secret.trim_ascii();
        if secret.len() < MIN_SECRET_LEN {
            return Err(SharedCacheError::ShortSecret {
                len: secret.len(),
                min: MIN_SECRET_LEN,
            });
        }
        Ok(Self {
            cache: Arc::new(SharedCache::new(url)?),
            keys: keys_from_secret(secret),
        })
    }
}

/// What the level did, for the router's metrics.
#[derive(Debug, Default)]
pub struct SharedStats {
    /// Lookups answered with an answer.
    pub hits: AtomicU64,
    /// Lookups that found nothing.
    pub misses: AtomicU64,
    /// Lookups that failed or timed out.
    pub lookup_errors: AtomicU64,
    /// Writes that failed or timed out.
    pub write_errors: AtomicU64,
    /// Lookups not made because the level was paused after an error.
    pub skipped: AtomicU64,
    /// Answers written.
    pub writes: AtomicU64,
    /// Answers not written because [`MAX_WRITES_IN_FLIGHT`] were in flight.
    pub writes_dropped: AtomicU64,
}

/// A router's connection to the shared level.
pub struct SharedCache {
    conn: ConnectionManager,
    writes: Arc<Semaphore>,
    /// Until when (microseconds since `epoch`) the level is skipped; 0: not paused.
    paused_until_us: AtomicU64,
    epoch: Instant,
    stats: Arc<SharedStats>,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl SharedCache {
    /// The level at the Redis of `url` (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` for TLS). Connects on first use, and again by itself whenever the connection
    /// is lost; must be made on a tokio runtime, which then runs the connection.
    pub fn new(url: &str) -> Result<Self, SharedCacheError> {
        let client = redis::Client::open(url).map_err(|e| SharedCacheError::Url {
            url: redacted(url),
            reason: e.to_string(),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(LOOKUP_TIMEOUT.max(Duration::from_millis(100))));
        let conn =
            client
                .get_connection_manager_lazy(config)
                .map_err(|e| SharedCacheError::Url {
                    url: redacted(url),
                    reason: e.to_string(),
                })?;
        Ok(Self {
            conn,
            writes: Arc::new(Semaphore::new(MAX_WRITES_IN_FLIGHT)),
            paused_until_us: AtomicU64::new(0),
            epoch: Instant::now(),
            stats: Arc::new(SharedStats::default()),
        })
    }

    /// What the level did.
    pub fn stats(&self) -> &SharedStats {
        &self.stats
    }

    /// The answer kept for `key` and how long it has left, if Redis holds one and answers in
    /// time. Anything else (nothing kept, an error, a timeout, the level paused) is `None`.
    pub async fn get(&self, key: u128) -> Option<(Bytes, Duration)> {
        if self.paused() {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut conn = self.conn.clone();
        let k = redis_key(key);
        let mut pipe = redis::pipe();
        pipe.get(&k).pttl(&k);
        let lookup = pipe.query_async::<(Option<Vec<u8>>, i64)>(&mut conn);
        match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok((Some(answer), left_ms))) => match remaining(left_ms) {
                Some(left) => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    Some((Bytes::from(answer), left))
                }
                None => {
                    self.stats.misses.fetch_add(1, Ordering::Relaxed);
                    None
                }
            },
            Ok(Ok((None, _))) => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(Err(e)) => {
                self.failed(&self.stats.lookup_errors, "lookup", &e.to_string());
                None
            }
            Err(_) => {
                self.failed(&self.stats.lookup_errors, "lookup", "timed out");
                None
            }
        }
    }

    /// Writes `answer` for `key`, to live `ttl`, in the background (dropped, and counted, when
    /// [`MAX_WRITES_IN_FLIGHT`] writes are in flight or the level is paused).
    pub fn put(self: &Arc<Self>, key: u128, answer: Bytes, ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let Ok(permit) = self.writes.clone().try_acquire_owned() else {
            self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if self.paused() {
            self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut conn = this.conn.clone();
            let mut set = redis::cmd("SET");
            set.arg(redis_key(key))
                .arg(answer.as_ref())
                .arg("PX")
                .arg(ms);
            let write = set.query_async::<()>(&mut conn);
            match tokio::time::timeout(CONNECT_TIMEOUT, write).await {
                Ok(Ok(())) => {
                    this.stats.writes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => this.failed(&this.stats.write_errors, "write", &e.to_string()),
                Err(_) => this.failed(&this.stats.write_errors, "write", "timed out"),
            }
        });
    }

    fn paused(&self) -> bool {
        let until = self.paused_until_us.load(Ordering::Relaxed);
        until != 0 && self.now_us() < until
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Counts an error on `counter` and pauses the level for [`PAUSE_AFTER_ERROR`].
    fn failed(&self, counter: &AtomicU64, what: &str, reason: &str) {
        counter.fetch_add(1, Ordering::Relaxed);
        let until = self.now_us() + PAUSE_AFTER_ERROR.as_micros() as u64;
        if self.paused_until_us.swap(until, Ordering::Relaxed) < self.now_us() {
            tracing::warn!(what, reason, pause = ?PAUSE_AFTER_ERROR,
                "shared response cache failed; calls skip it for a while");
        }
    }
}

/// What Redis's `PTTL` says is left of a key's life: `None` when it has none left (it expired
/// between the two commands, -2) ; a key without expiry (-1, written by something else) is
/// trusted for a minute at most.
fn remaining(pttl_ms: i64) -> Option<Duration> {
    match pttl_ms {
        -1 => Some(Duration::from_secs(60)),
        ms if ms > 0 => Some(Duration::from_millis(ms.unsigned_abs())),
        _ => None,
    }
}

/// `url` without its password, for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_secret_alone() {
        assert_eq!(
            keys_from_secret(b"a shared secret!"),
            keys_from_secret(b"a shared secret!")
        );
        assert_ne!(
            keys_from_secret(b"a shared secret!"),
            keys_from_secret(b"a shared secret?")
        );
        let (a, b) = keys_from_secret(b"x");
        assert_ne!(a, b);
    }

    #[test]
    fn redis_keys_are_prefixed_hex() {
        assert_eq!(
            redis_key(0xab),
            format!("fulcrum:cache:{}ab", "0".repeat(30))
        );
        assert_eq!(redis_key(u128::MAX).len(), KEY_PREFIX.len() + 32);
    }

    #[test]
    fn what_is_left_of_a_key() {
        assert_eq!(remaining(1500), Some(Duration::from_millis(1500)));
        assert_eq!(remaining(-2), None);
        assert_eq!(remaining(0), None);
        assert_eq!(remaining(-1), Some(Duration::from_secs(60)));
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redacted("redis://:hunter2@10.0.0.1:6379/0"),
            "redis://…@10.0.0.1:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[tokio::test]
    async fn a_bad_url_is_refused_and_an_absent_redis_is_a_miss_then_a_pause() {
        let err = SharedCache::new("http://nope").unwrap_err();
        assert!(err.to_string().contains("http://nope"), "{err}");
        // Nothing listens on port 1: the lookup fails, counts, and pauses the level.
        let shared = SharedCache::new("redis://127.0.0.1:1").unwrap();
        assert_eq!(shared.get(7).await, None);
        assert_eq!(shared.stats().lookup_errors.load(Ordering::Relaxed), 1);
        assert_eq!(shared.get(7).await, None);
        assert_eq!(shared.stats().skipped.load(Ordering::Relaxed), 1);
    }
}
