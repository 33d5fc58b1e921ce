//! The control plane's store: a small key-value interface with revisions and watches, and its
//! two backends.
//!
//! - [`etcd`]: the production backend, a real etcd cluster (`--store etcd://host:port,...`).
//! - [`embedded`]: an in-process store persisted to a local file, for one machine (`fulcrum up`).
//!
//! [`mirror`] keeps a prefix in memory from a watch, for readers that follow it.
//!
//! Everything the control plane keeps (node specs, operator overrides, the routing table) goes
//! through [`Store`], so both backends behave the same: every write returns the store's new
//! revision, revisions only grow, and a compare-and-put is the one primitive for "create only if
//! absent" and "update only if unchanged".
//!
//! Leases: a key written with a lease ([`Store::put_with_lease`],
//! [`Store::compare_and_put_with_lease`]) lives only as long as the lease. The lease's holder
//! renews it ([`Store::keep_alive`]) more often than its TTL; when it stops (it died, or lost
//! the store), the lease expires and the store deletes its keys, which watchers see as deletes.
//! Revoking it ([`Store::revoke_lease`]) deletes them at once. A later write without the lease
//! (or with another one) detaches the key from it, as in etcd.

pub mod embedded;
pub mod etcd;
pub mod mirror;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;

/// One key and its value as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The full key, e.g. `/fulcrum/v1/nodes/a-1`.
    pub key: String,
    /// The value's bytes (protobuf-encoded Fulcrum messages).
    pub value: Vec<u8>,
    /// The store revision of the key's last write.
    pub mod_revision: i64,
    /// The lease the key is attached to; 0 for none.
    pub lease: i64,
}

/// What a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was written.
    Put(KeyValue),
    /// A key was deleted, at this revision.
    Delete {
        /// The deleted key.
        key: String,
        /// The store revision of the delete.
        revision: i64,
    },
}

/// A stream of watch events. It ends (or yields an error) when the watch breaks; the watcher then
/// re-reads and watches again.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

/// A shared store handle.
pub type SharedStore = Arc<dyn Store>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something Fulcrum cannot use.
    #[error("store returned bad data: {0}")]
    Corrupt(String),
    /// The embedded store's file could not be read or written.
    #[error("store file: {0}")]
    Io(#[from] std::io::Error),
    /// The lease does not exist (any more): it expired or was revoked.
    #[error("lease {0:x} has expired or was revoked")]
    LeaseNotFound(i64),
    /// A transaction held more operations than a store accepts in one ([`MAX_TXN_OPS`]).
    #[error("a transaction of {0} operations exceeds the limit of {MAX_TXN_OPS}")]
    TooManyOps(usize),
}

/// Most writes one transaction may hold: etcd's default `--max-txn-ops`. Writers split larger
/// batches into several transactions; the embedded store enforces the same limit so that a
/// batch that works on one machine works against etcd.
pub const MAX_TXN_OPS: usize = 128;

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Writes `value` at `key` (without a lease).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// Deletes `key` (nothing when it does not exist).
    Delete {
        /// The key.
        key: String,
    },
}

/// What a leader's writes are fenced by: its election key and the revision that created it.
/// A write carrying a fence lands only while that key still exists with that revision, so a
/// deposed leader (its lease expired, another elected) cannot write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The leader's election key.
    pub key: String,
    /// The key's create revision.
    pub revision: i64,
    /// The lease the key is attached to (0 for the embedded store).
    pub lease: i64,
}

/// A leadership held by this replica.
pub struct Leadership {
    /// What writes are fenced by.
    pub fence: Fence,
    /// Becomes `true` when the leadership is lost (lease expired, store unreachable).
    pub lost: tokio::sync::watch::Receiver<bool>,
    /// Whatever keeps the leadership alive (a lease keep-alive task, a lock guard); dropping it
    /// gives the leadership up.
    pub hold: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("fence", &self.fence)
            .field("lost", &*self.lost.borrow())
            .finish_non_exhaustive()
    }
}

/// Aborts a task when dropped: ties a background task's life to its owner's.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The key-value interface both backends implement.
#[async_trait::async_trait]
pub trait Store: std::fmt::Debug + Send + Sync + 'static {
    /// The value at `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key under `prefix`, sorted by key, and the store revision they were read at.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError>;

    /// Writes `value` at `key` unconditionally; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError>;

    /// Writes `value` at `key` only if the key's mod revision is `expected` (0: the key must not
    /// exist). Returns the new revision when written, `None` when the condition failed.
    async fn compare_and_put(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
    ) -> Result<Option<i64>, StoreError>;

    /// Deletes `key`; returns the new revision when it existed, `None` when it did not.
    async fn delete(&self, key: &str) -> Result<Option<i64>, StoreError>;

    /// Deletes `key` only if its mod revision is `expected` (it was not rewritten since it was
    /// read); the new revision when deleted, `None` otherwise.
    async fn compare_and_delete(&self, key: &str, expected: i64)
    -> Result<Option<i64>, StoreError>;

    /// Watches every key under `prefix` for writes after `after_revision`.
    async fn watch(&self, prefix: &str, after_revision: i64) -> Result<WatchStream, StoreError>;

    /// Campaigns in the election `name` as `who`, with a lease of `ttl`; resolves once elected.
    async fn campaign(
        &self,
        name: &str,
        who: &str,
        ttl: std::time::Duration,
    ) -> Result<Leadership, StoreError>;

    /// Gives a leadership up at once (instead of letting its lease expire).
    async fn resign(&self, leadership: Leadership) -> Result<(), StoreError>;

    /// Writes `value` at `key` only while `fence` holds; `None` when it no longer does.
    async fn put_fenced(
        &self,
        fence: &Fence,
        key: &str,
        value: Vec<u8>,
    ) -> Result<Option<i64>, StoreError>;

    /// Applies `ops` in one transaction (one revision) only while `fence` holds; the new
    /// revision, or `None` when the fence no longer holds (nothing is written then). At most
    /// [`MAX_TXN_OPS`] operations, on distinct keys.
    async fn txn_fenced(&self, fence: &Fence, ops: Vec<Op>) -> Result<Option<i64>, StoreError>;

    /// Who leads the election `name`, if anyone.
    async fn leader(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Grants a lease that expires `ttl` after its grant or its last renewal, and returns its
    /// id. etcd counts TTLs in whole seconds: `ttl` is rounded up to one.
    async fn grant_lease(&self, ttl: std::time::Duration) -> Result<i64, StoreError>;

    /// Renews `lease` for another TTL. `false` when it has already expired or was revoked (its
    /// keys are gone).
    async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError>;

    /// Revokes `lease` now, deleting its keys. Revoking a lease that has already expired or was
    /// revoked is not an error.
    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError>;

    /// Writes `value` at `key`, attached to `lease`; returns the new revision.
    /// [`StoreError::LeaseNotFound`] when the lease has expired.
    async fn put_with_lease(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<i64, StoreError>;

    /// [`Store::compare_and_put`] attaching the key to `lease`.
    /// [`StoreError::LeaseNotFound`] when the lease has expired.
    async fn compare_and_put_with_lease(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<Option<i64>, StoreError>;
}

/// Opens the store named by a `--store` URL: `etcd://host:port[,host:port…]` or
/// `embedded:///path/to/file` (also accepted: `embedded:PATH`, and `memory:` for a store that is
/// not persisted at all).
pub async fn open(url: &str) -> Result<SharedStore, StoreError> {
    if let Some(rest) = url.strip_prefix("etcd://") {
        let endpoints: Vec<String> = rest
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| format!("http://{s}"))
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable(format!(
                "no etcd endpoint in {url:?}"
            )));
        }
        return Ok(Arc::new(etcd::EtcdStore::connect(&endpoints).await?));
    }
    if url == "memory:" {
        return Ok(Arc::new(embedded::EmbeddedStore::in_memory()));
    }
    let path = url
        .strip_prefix("embedded://")
        .or_else(|| url.strip_prefix("embedded:"))
        .ok_or_else(|| {
            StoreError::Unavailable(format!(
                "unknown store {url:?}: expected etcd://host:port[,host:port] or embedded:PATH"
            ))
        })?;
    Ok(Arc::new(embedded::EmbeddedStore::open(path).await?))
}
