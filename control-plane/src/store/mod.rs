//! The control plane's store: a small key-value interface with revisions and watches, and its
//! two backends.
//!
//! - [`etcd`]: the production backend, a real etcd cluster (`--store etcd://host:port,...`).
//! - [`embedded`]: an in-process store persisted to a local file, for one machine (`fulcrum up`).
//!
//! Everything the control plane keeps (node specs, operator overrides, the routing table) goes
//! through [`Store`], so both backends behave the same: every write returns the store's new
//! revision, revisions only grow, and a compare-and-put is the one primitive for "create only if
//! absent" and "update only if unchanged".

pub mod embedded;
pub mod etcd;

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

    /// Watches every key under `prefix` for writes after `after_revision`.
    async fn watch(&self, prefix: &str, after_revision: i64) -> Result<WatchStream, StoreError>;
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
