//! The etcd backend: the production store, shared by every control-plane replica in both data
//! centers.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;

use super::{KeyValue, Store, StoreError, WatchEvent, WatchStream};

/// Per-request timeout. etcd answers in milliseconds when healthy; three seconds rides out a
/// leader election inside etcd (its default election timeout is one second) without letting a
/// dead cluster stall the control loop for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Connect timeout: loopback or in-region etcd connects in well under a second.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2 keep-alive so a silently dead etcd member is noticed (and its watch broken) within
/// seconds rather than at the next TCP timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// A store backed by etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Result<i64, StoreError> {
    h.map(|h| h.revision())
        .ok_or_else(|| StoreError::Corrupt("etcd response without a header".into()))
}

fn to_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: kv
            .key_str()
            .map_err(|e| StoreError::Corrupt(format!("non-UTF-8 key: {e}")))?
            .to_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
    })
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`).
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(unavailable)?;
        Ok(Self { client })
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(unavailable)?;
        resp.kvs().first().map(to_kv).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(unavailable)?;
        let kvs = resp.kvs().iter().map(to_kv).collect::<Result<_, _>>()?;
        Ok((kvs, header_revision(resp.header())?))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError> {
        let resp = self
            .client
            .kv_client()
            .put(key, value, None)
            .await
            .map_err(unavailable)?;
        header_revision(resp.header())
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
    ) -> Result<Option<i64>, StoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key, value, None)]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(unavailable)?;
        if !resp.succeeded() {
            return Ok(None);
        }
        header_revision(resp.header()).map(Some)
    }

    async fn delete(&self, key: &str) -> Result<Option<i64>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .delete(key, None)
            .await
            .map_err(unavailable)?;
        if resp.deleted() == 0 {
            return Ok(None);
        }
        header_revision(resp.header()).map(Some)
    }

    async fn watch(&self, prefix: &str, after_revision: i64) -> Result<WatchStream, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after_revision + 1);
        let stream = self
            .client
            .watch_client()
            .watch(prefix, Some(options))
            .await
            .map_err(unavailable)?;
        let events = stream.flat_map(|resp| {
            let items: Vec<Result<WatchEvent, StoreError>> = match resp {
                Err(e) => vec![Err(unavailable(e))],
                Ok(r) if r.canceled() => vec![Err(StoreError::Unavailable(format!(
                    "etcd cancelled the watch (compacted at {}): {}",
                    r.compact_revision(),
                    r.cancel_reason()
                )))],
                Ok(r) => r
                    .events()
                    .iter()
                    .filter_map(|ev| {
                        let kv = ev.kv()?;
                        Some(match ev.event_type() {
                            EventType::Put => to_kv(kv).map(WatchEvent::Put),
                            EventType::Delete => to_kv(kv).map(|kv| WatchEvent::Delete {
                                key: kv.key,
                                revision: kv.mod_revision,
                            }),
                        })
                    })
                    .collect(),
            };
            futures::stream::iter(items)
        });
        Ok(Box::pin(events))
    }
}
