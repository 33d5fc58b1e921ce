//! The etcd backend: the production store, shared by every control-plane replica in both data
//! centers.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use futures::StreamExt;

use super::{
    Fence, KeyValue, Leadership, MAX_TXN_OPS, Op, Store, StoreError, WatchEvent, WatchStream,
};

/// Per-request timeout. etcd answers in milliseconds when healthy; three seconds rides out a
/// leader election inside etcd (its default election timeout is one second) without letting a
/// dead cluster stall the control loop for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Connect timeout: loopback or in-region etcd connects in well under a second.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2 keep-alive so a silently dead etcd member is noticed (and its watches broken) within
/// seconds rather than at the next TCP timeout. Not more often than every 5 s: etcd refuses
/// pings closer than its `--grpc-keepalive-min-time` (5 s by default) and, after three, closes
/// the connection (GOAWAY `too_many_pings`), breaking every watch on it. Ten seconds keeps well
/// clear of that; requests have their own timeout, and the leader lease its own renewals.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keep-alive ping may go unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A store backed by etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// The cluster's endpoints, for the leader lease's own connection.
    endpoints: Vec<String>,
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
        lease: kv.lease(),
    })
}

/// Whether etcd refused a request because the lease it names does not exist (any more).
fn lease_not_found(e: &etcd_client::Error) -> bool {
    // etcd answers "etcdserver: requested lease not found"; etcd-client's keep-alive says
    // "lease not found" when etcd renews nothing (TTL 0).
    e.to_string().contains("lease not found")
}

/// A failed write with a lease: [`StoreError::LeaseNotFound`] when the lease is gone.
fn lease_error(e: etcd_client::Error, lease: i64) -> StoreError {
    if lease_not_found(&e) {
        StoreError::LeaseNotFound(lease)
    } else {
        unavailable(e)
    }
}

/// etcd's lease TTL, in whole seconds (at least one).
fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        // Pings only while a call or watch is open: etcd refuses pings on an idle connection
        // (it does not permit them without streams) and closes the connection after a few.
        .with_keep_alive_while_idle(false)
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`).
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let client = Client::connect(endpoints, Some(connect_options()))
            .await
            .map_err(unavailable)?;
        Ok(Self {
            client,
            endpoints: endpoints.to_vec(),
        })
    }
}

/// Keeps the leader lease alive on its own thread, runtime and connection: renewals must not
/// wait behind the replica's other work (a pass of the control loop, thousands of probe tasks
/// and router streams in the runtime's queues) nor behind large reads and watch events on the
/// shared connection, or a busy leader loses its lease and the leadership flaps. Sets `lost`
/// when a renewal fails or goes unanswered; stops when the returned guard is dropped.
fn keep_lease_alive(
    endpoints: Vec<String>,
    lease: i64,
    ttl: Duration,
    lost: tokio::sync::watch::Sender<bool>,
) -> Result<LeaseKeeper, StoreError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Unavailable(format!("cannot start the lease runtime: {e}")))?;
    std::thread::Builder::new()
        .name("fulcrum-leader-lease".into())
        .spawn(move || {
            runtime.block_on(async move {
                let renew = async {
                    let client = Client::connect(&endpoints, Some(connect_options())).await?;
                    let (mut keeper, mut responses) =
                        client.lease_client().keep_alive(lease).await?;
                    // A renewal every third of the TTL survives two lost ones.
                    let mut ticker = tokio::time::interval(ttl / 3);
                    loop {
                        ticker.tick().await;
                        keeper.keep_alive().await?;
                        match tokio::time::timeout(REQUEST_TIMEOUT, responses.message()).await {
                            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                            _ => return Ok::<(), etcd_client::Error>(()),
                        }
                    }
                };
                tokio::select! {
                    // The guard was dropped: the leadership is given up.
                    _ = stopped => return,
                    r = renew => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "leader lease keep-alive failed");
                        }
                    }
                }
                let _ = lost.send(true);
            });
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot start the lease thread: {e}")))?;
    Ok(LeaseKeeper { _stop: stop })
}

/// Keeps the leader lease's keep-alive thread running; dropping it stops the thread.
struct LeaseKeeper {
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl EtcdStore {
    /// Runs `put` under `compare`; the new revision when the comparison held, `None` otherwise.
    async fn conditional(&self, compare: Compare, put: TxnOp) -> Result<Option<i64>, StoreError> {
        let txn = Txn::new().when([compare]).and_then([put]);
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
        self.conditional(
            Compare::mod_revision(key, CompareOp::Equal, expected),
            TxnOp::put(key, value, None),
        )
        .await
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

    async fn compare_and_delete(
        &self,
        key: &str,
        expected: i64,
    ) -> Result<Option<i64>, StoreError> {
        self.conditional(
            Compare::mod_revision(key, CompareOp::Equal, expected),
            TxnOp::delete(key, None),
        )
        .await
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

    async fn campaign(
        &self,
        name: &str,
        who: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError> {
        let ttl_secs = ttl.as_secs().max(1) as i64;
        let lease = self
            .client
            .lease_client()
            .grant(ttl_secs, None)
            .await
            .map_err(unavailable)?
            .id();
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        // Keep the lease alive from now on (also while campaigning).
        let hold = keep_lease_alive(
            self.endpoints.clone(),
            lease,
            Duration::from_secs(ttl_secs as u64),
            lost_tx,
        )?;
        let mut lost_while_campaigning = lost.clone();
        let mut election = self.client.election_client();
        let elected = tokio::select! {
            r = election.campaign(name, who, lease) => r.map_err(unavailable)?,
            _ = lost_while_campaigning.wait_for(|l| *l) => {
                return Err(StoreError::Unavailable("lease lost while campaigning".into()));
            }
        };
        let leader = elected
            .leader()
            .ok_or_else(|| StoreError::Corrupt("campaign answered without a leader key".into()))?;
        let key = leader
            .key_str()
            .map_err(|e| StoreError::Corrupt(format!("non-UTF-8 election key: {e}")))?
            .to_owned();
        Ok(Leadership {
            fence: Fence {
                key,
                revision: leader.rev(),
                lease,
            },
            lost,
            hold: Box::new(hold),
        })
    }

    async fn resign(&self, leadership: Leadership) -> Result<(), StoreError> {
        let lease = leadership.fence.lease;
        drop(leadership);
        // Revoking the lease deletes the election key: the next candidate is elected at once.
        self.client
            .lease_client()
            .revoke(lease)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn put_fenced(
        &self,
        fence: &Fence,
        key: &str,
        value: Vec<u8>,
    ) -> Result<Option<i64>, StoreError> {
        self.conditional(
            Compare::create_revision(fence.key.as_str(), CompareOp::Equal, fence.revision),
            TxnOp::put(key, value, None),
        )
        .await
    }

    async fn txn_fenced(&self, fence: &Fence, ops: Vec<Op>) -> Result<Option<i64>, StoreError> {
        if ops.len() > MAX_TXN_OPS {
            return Err(StoreError::TooManyOps(ops.len()));
        }
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(key, value, None),
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let txn = Txn::new()
            .when([Compare::create_revision(
                fence.key.as_str(),
                CompareOp::Equal,
                fence.revision,
            )])
            .and_then(ops);
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

    async fn leader(&self, name: &str) -> Result<Option<String>, StoreError> {
        match self.client.election_client().leader(name).await {
            Ok(resp) => Ok(resp
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // etcd answers "election: no leader" as an error.
            Err(e) if e.to_string().contains("no leader") => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<i64, StoreError> {
        let resp = self
            .client
            .lease_client()
            .grant(ttl_seconds(ttl), None)
            .await
            .map_err(unavailable)?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
        // One renewal: etcd-client opens the keep-alive stream, sends one request and waits for
        // its answer (an error when etcd renewed nothing), and the stream closes when dropped.
        // The timeout bounds the wait for that answer, which the client's request timeout does
        // not cover on a stream.
        let mut client = self.client.lease_client();
        match tokio::time::timeout(REQUEST_TIMEOUT, client.keep_alive(lease)).await {
            Err(_) => Err(StoreError::Unavailable(format!(
                "lease keep-alive not answered within {REQUEST_TIMEOUT:?}"
            ))),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if lease_not_found(&e) => Ok(false),
            Ok(Err(e)) => Err(unavailable(e)),
        }
    }

    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        match self.client.lease_client().revoke(lease).await {
            Ok(_) => Ok(()),
            Err(e) if lease_not_found(&e) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<i64, StoreError> {
        let resp = self
            .client
            .kv_client()
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(|e| lease_error(e, lease))?;
        header_revision(resp.header())
    }

    async fn compare_and_put_with_lease(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<Option<i64>, StoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| lease_error(e, lease))?;
        if !resp.succeeded() {
            return Ok(None);
        }
        header_revision(resp.header()).map(Some)
    }
}
