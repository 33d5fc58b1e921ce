//! An in-process store for a single machine, persisted to one local file.
//!
//! It keeps the same contract as etcd (revisions that only grow, compare-and-put, prefix
//! watches, leases) so the control plane cannot tell the two apart. Every write rewrites the file
//! atomically (write to a temporary file, then rename), which is plenty for the write rates of a
//! one-machine stack: the control plane batches its writes.
//!
//! Leases live in memory only. A background task, started with the first lease and stopped with
//! the store, deletes the keys of each lease when it expires (all in one revision, as etcd does)
//! and watchers see the deletes. Leases die with the process that holds the store, so keys still
//! attached to a lease when the file is opened again are deleted then: their holders are gone
//! with the process, and a live node registers again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, broadcast};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::{
    AbortOnDrop, Fence, KeyValue, Leadership, MAX_TXN_OPS, Op, Store, StoreError, WatchEvent,
    WatchStream,
};

/// The election key of the embedded store's one-process elections.
const ELECTION_KEY: &str = "/fulcrum/v1/leader/embedded";

/// How many watch events may queue for a slow watcher before it is told it lagged (it then
/// re-reads). Writes are batched by the control plane, so a few thousand covers many seconds.
const WATCH_BUFFER: usize = 4096;

/// When deleting an expired lease's keys fails (the file cannot be written), how long until the
/// next attempt: soon enough that the keys outlive their lease by little once the disk is back,
/// rarely enough not to spin on a full disk.
const EXPIRY_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    revision: i64,
    entries: BTreeMap<String, Entry>,
    /// Live leases by id (in memory only: see the module documentation).
    #[serde(skip)]
    leases: HashMap<i64, Lease>,
    /// The last lease id granted; ids are never reused while the store is open.
    #[serde(skip)]
    last_lease: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
    /// The lease the key is attached to; 0 for none.
    #[serde(default, skip_serializing_if = "is_zero")]
    lease: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl: Duration,
    /// When it expires unless renewed.
    deadline: Instant,
}

impl State {
    /// The lease `id` if it exists and has not expired (its keys may not be deleted yet).
    fn live_lease(&mut self, id: i64, now: Instant) -> Option<&mut Lease> {
        self.leases.get_mut(&id).filter(|l| l.deadline > now)
    }

    /// Keys attached to `lease`. A scan: the store holds a few hundred keys at most.
    fn keys_of(&self, lease: i64) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, e)| e.lease == lease)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// One key's change in a commit: its new value and lease, or `None` to delete it.
type Change = (String, Option<(Vec<u8>, i64)>);

/// What the store and its lease-expiry task share.
#[derive(Debug)]
struct Core {
    state: Mutex<State>,
    path: Option<PathBuf>,
    events: broadcast::Sender<WatchEvent>,
    /// Wakes the expiry task when a lease is granted: its deadline may be the earliest.
    lease_granted: Notify,
}

/// The embedded store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct EmbeddedStore {
    core: Arc<Core>,
    /// Held by the leader; a campaign waits for it.
    election: Arc<Mutex<()>>,
    /// The current leader's name and term (each election starts a new term).
    leader: std::sync::Mutex<(Option<String>, i64)>,
    /// The lease-expiry task, started with the first lease; stopped when the store is dropped.
    expiry: OnceLock<AbortOnDrop>,
}

impl EmbeddedStore {
    /// A store that lives only in memory.
    pub fn in_memory() -> Self {
        Self::with_state(State::default(), None)
    }

    /// Opens (or creates) the store persisted at `path`. Keys attached to a lease are deleted
    /// (see the module documentation).
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut state: State = match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e.into()),
        };
        let before = state.entries.len();
        state.entries.retain(|_, e| e.lease == 0);
        if state.entries.len() != before {
            // A new revision for the deletes; it reaches the file with the next write.
            state.revision += 1;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        Ok(Self::with_state(state, Some(path)))
    }

    fn with_state(state: State, path: Option<PathBuf>) -> Self {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        Self {
            core: Arc::new(Core {
                state: Mutex::new(state),
                path,
                events,
                lease_granted: Notify::new(),
            }),
            election: Arc::default(),
            leader: std::sync::Mutex::new((None, 0)),
            expiry: OnceLock::new(),
        }
    }

    /// Whether `fence` is the current leadership's.
    fn holds(&self, fence: &Fence) -> bool {
        let term = self
            .leader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1;
        fence.key == ELECTION_KEY && fence.revision == term && self.election.try_lock().is_err()
    }

    /// Writes `value` (attached to `lease`, 0 for none) or deletes the key.
    async fn write(
        &self,
        state: &mut State,
        key: &str,
        value: Option<Vec<u8>>,
        lease: i64,
    ) -> Result<i64, StoreError> {
        let change = value.map(|value| (value, lease));
        self.core
            .commit(state, vec![(key.to_owned(), change)])
            .await
    }
}

impl Core {
    async fn persist(&self, state: &State) -> Result<(), StoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(state)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode store: {e}")))?;
        let tmp = path.with_extension("tmp");
        tokio::fs::write(&tmp, bytes).await?;
        tokio::fs::rename(&tmp, path).await?;
        Ok(())
    }

    /// Applies writes (`Some((value, lease))`) and deletes (`None`) under the lock, all at one new
    /// revision: bumps the revision, persists, then tells watchers.
    async fn commit(&self, state: &mut State, changes: Vec<Change>) -> Result<i64, StoreError> {
        let revision = state.revision + 1;
        let mut undo = Vec::with_capacity(changes.len());
        for (key, change) in &changes {
            let previous = match change {
                Some((value, lease)) => state.entries.insert(
                    key.clone(),
                    Entry {
                        value: value.clone(),
                        mod_revision: revision,
                        lease: *lease,
                    },
                ),
                None => state.entries.remove(key),
            };
            undo.push((key.clone(), previous));
        }
        state.revision = revision;
        if let Err(e) = self.persist(state).await {
            // Undo, so memory never runs ahead of the file.
            state.revision -= 1;
            for (key, previous) in undo.into_iter().rev() {
                match previous {
                    Some(p) => state.entries.insert(key, p),
                    None => state.entries.remove(&key),
                };
            }
            return Err(e);
        }
        for (key, change) in changes {
            let event = match change {
                Some((value, lease)) => WatchEvent::Put(KeyValue {
                    key,
                    value,
                    mod_revision: revision,
                    lease,
                }),
                None => WatchEvent::Delete { key, revision },
            };
            // No receiver is fine: nobody watches.
            let _ = self.events.send(event);
        }
        Ok(revision)
    }

    /// Deletes the keys of every lease that has expired; returns the earliest deadline of the
    /// leases left.
    async fn expire_leases(&self) -> Option<Instant> {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let expired: Vec<i64> = state
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if !expired.is_empty() {
            let deletes: Vec<_> = expired
                .iter()
                .flat_map(|id| state.keys_of(*id))
                .map(|key| (key, None))
                .collect();
            let deleted = if deletes.is_empty() {
                Ok(0)
            } else {
                self.commit(&mut state, deletes).await
            };
            match deleted {
                Ok(_) => {
                    for id in &expired {
                        state.leases.remove(id);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot delete the keys of expired leases; retrying");
                    for id in &expired {
                        if let Some(l) = state.leases.get_mut(id) {
                            l.deadline = now + EXPIRY_RETRY;
                        }
                    }
                }
            }
        }
        state.leases.values().map(|l| l.deadline).min()
    }

    /// The expiry task: sleeps until the earliest lease deadline (or a new grant), then deletes
    /// what expired. Runs until aborted with its store.
    async fn run_expiry(self: Arc<Self>) {
        loop {
            let next = self.expire_leases().await;
            // A grant made since the scan left a permit: `notified` then completes at once.
            let granted = self.lease_granted.notified();
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = granted => {}
                    }
                }
                None => granted.await,
            }
        }
    }
}

fn to_kv(key: &str, e: &Entry) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: e.value.clone(),
        mod_revision: e.mod_revision,
        lease: e.lease,
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let state = self.core.state.lock().await;
        Ok(state.entries.get(key).map(|e| to_kv(key, e)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let state = self.core.state.lock().await;
        let kvs = state
            .entries
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| to_kv(k, e))
            .collect();
        Ok((kvs, state.revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError> {
        let mut state = self.core.state.lock().await;
        self.write(&mut state, key, Some(value), 0).await
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
    ) -> Result<Option<i64>, StoreError> {
        let mut state = self.core.state.lock().await;
        let current = state.entries.get(key).map_or(0, |e| e.mod_revision);
        if current != expected {
            return Ok(None);
        }
        self.write(&mut state, key, Some(value), 0).await.map(Some)
    }

    async fn delete(&self, key: &str) -> Result<Option<i64>, StoreError> {
        let mut state = self.core.state.lock().await;
        if !state.entries.contains_key(key) {
            return Ok(None);
        }
        self.write(&mut state, key, None, 0).await.map(Some)
    }

    async fn compare_and_delete(
        &self,
        key: &str,
        expected: i64,
    ) -> Result<Option<i64>, StoreError> {
        let mut state = self.core.state.lock().await;
        if state.entries.get(key).map(|e| e.mod_revision) != Some(expected) {
            return Ok(None);
        }
        self.write(&mut state, key, None, 0).await.map(Some)
    }

    async fn watch(&self, prefix: &str, after_revision: i64) -> Result<WatchStream, StoreError> {
        // Subscribe under the lock so no write falls between the caller's read and the watch.
        let state = self.core.state.lock().await;
        let rx = self.core.events.subscribe();
        let mut replay = Vec::new();
        if after_revision < state.revision {
            // The embedded store keeps no history: replay the current values written since.
            for (k, e) in state.entries.range(prefix.to_owned()..) {
                if !k.starts_with(prefix) {
                    break;
                }
                if e.mod_revision > after_revision {
                    replay.push(Ok(WatchEvent::Put(to_kv(k, e))));
                }
            }
        }
        drop(state);
        let prefix = prefix.to_owned();
        let live = BroadcastStream::new(rx).filter_map(move |item| match item {
            Ok(ev) => {
                let key = match &ev {
                    WatchEvent::Put(kv) => &kv.key,
                    WatchEvent::Delete { key, .. } => key,
                };
                key.starts_with(&prefix).then_some(Ok(ev))
            }
            Err(BroadcastStreamRecvError::Lagged(n)) => Some(Err(StoreError::Unavailable(
                format!("watcher fell {n} events behind"),
            ))),
        });
        Ok(Box::pin(tokio_stream::iter(replay).chain(live)))
    }

    async fn campaign(
        &self,
        _name: &str,
        who: &str,
        _ttl: std::time::Duration,
    ) -> Result<Leadership, StoreError> {
        let guard = self.election.clone().lock_owned().await;
        let term = {
            let mut l = self
                .leader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            l.1 += 1;
            l.0 = Some(who.to_owned());
            l.1
        };
        // One process cannot lose touch with itself: the leadership is lost only by resigning.
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        Ok(Leadership {
            fence: Fence {
                key: ELECTION_KEY.to_owned(),
                revision: term,
                lease: 0,
            },
            lost,
            hold: Box::new((guard, lost_tx)),
        })
    }

    async fn resign(&self, leadership: Leadership) -> Result<(), StoreError> {
        self.leader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0 = None;
        drop(leadership);
        Ok(())
    }

    async fn put_fenced(
        &self,
        fence: &Fence,
        key: &str,
        value: Vec<u8>,
    ) -> Result<Option<i64>, StoreError> {
        let mut state = self.core.state.lock().await;
        if !self.holds(fence) {
            return Ok(None);
        }
        self.write(&mut state, key, Some(value), 0).await.map(Some)
    }

    async fn txn_fenced(&self, fence: &Fence, ops: Vec<Op>) -> Result<Option<i64>, StoreError> {
        if ops.len() > MAX_TXN_OPS {
            return Err(StoreError::TooManyOps(ops.len()));
        }
        let mut state = self.core.state.lock().await;
        if !self.holds(fence) {
            return Ok(None);
        }
        // As in etcd, deleting a key that does not exist changes (and reports) nothing.
        let changes: Vec<Change> = ops
            .into_iter()
            .filter_map(|op| match op {
                Op::Put { key, value } => Some((key, Some((value, 0)))),
                Op::Delete { key } => state.entries.contains_key(&key).then_some((key, None)),
            })
            .collect();
        if changes.is_empty() {
            return Ok(Some(state.revision));
        }
        self.core.commit(&mut state, changes).await.map(Some)
    }

    async fn leader(&self, _name: &str) -> Result<Option<String>, StoreError> {
        if self.election.try_lock().is_ok() {
            return Ok(None);
        }
        Ok(self
            .leader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<i64, StoreError> {
        let core = self.core.clone();
        self.expiry
            .get_or_init(|| AbortOnDrop(tokio::spawn(core.run_expiry())));
        let mut state = self.core.state.lock().await;
        state.last_lease += 1;
        let id = state.last_lease;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        drop(state);
        self.core.lease_granted.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
        let mut state = self.core.state.lock().await;
        let now = Instant::now();
        Ok(match state.live_lease(lease, now) {
            Some(l) => {
                l.deadline = now + l.ttl;
                true
            }
            None => false,
        })
    }

    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        let mut state = self.core.state.lock().await;
        if !state.leases.contains_key(&lease) {
            return Ok(());
        }
        let deletes: Vec<_> = state
            .keys_of(lease)
            .into_iter()
            .map(|key| (key, None))
            .collect();
        if !deletes.is_empty() {
            self.core.commit(&mut state, deletes).await?;
        }
        state.leases.remove(&lease);
        Ok(())
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<i64, StoreError> {
        let mut state = self.core.state.lock().await;
        if state.live_lease(lease, Instant::now()).is_none() {
            return Err(StoreError::LeaseNotFound(lease));
        }
        self.write(&mut state, key, Some(value), lease).await
    }

    async fn compare_and_put_with_lease(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<Option<i64>, StoreError> {
        let mut state = self.core.state.lock().await;
        if state.live_lease(lease, Instant::now()).is_none() {
            return Err(StoreError::LeaseNotFound(lease));
        }
        let current = state.entries.get(key).map_or(0, |e| e.mod_revision);
        if current != expected {
            return Ok(None);
        }
        self.write(&mut state, key, Some(value), lease)
            .await
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn revisions_grow_and_cas_guards_writes() {
        let s = EmbeddedStore::in_memory();
        let r1 = s.put("/a", b"1".to_vec()).await.unwrap();
        let r2 = s.put("/b", b"2".to_vec()).await.unwrap();
        assert!(r2 > r1);
        // Create-if-absent fails on an existing key and changes nothing.
        assert_eq!(
            s.compare_and_put("/a", 0, b"x".to_vec()).await.unwrap(),
            None
        );
        assert_eq!(s.get("/a").await.unwrap().unwrap().value, b"1");
        // Update-if-unchanged succeeds with the right revision.
        let r3 = s.compare_and_put("/a", r1, b"3".to_vec()).await.unwrap();
        assert!(r3.unwrap() > r2);
        assert_eq!(s.delete("/zzz").await.unwrap(), None);
    }

    #[tokio::test]
    async fn persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.json");
        let rev = {
            let s = EmbeddedStore::open(&path).await.unwrap();
            s.put("/fulcrum/x", b"hello".to_vec()).await.unwrap()
        };
        let s = EmbeddedStore::open(&path).await.unwrap();
        let (kvs, at) = s.list("/fulcrum/").await.unwrap();
        assert_eq!(at, rev);
        assert_eq!(kvs.len(), 1);
        assert_eq!(kvs[0].value, b"hello");
    }

    #[tokio::test]
    async fn a_deposed_leader_cannot_write() {
        let s = std::sync::Arc::new(EmbeddedStore::in_memory());
        let ttl = std::time::Duration::from_secs(1);
        let first = s.campaign("e", "one", ttl).await.unwrap();
        assert_eq!(s.leader("e").await.unwrap().as_deref(), Some("one"));
        let old_fence = first.fence.clone();
        assert!(
            s.put_fenced(&old_fence, "/k", b"1".to_vec())
                .await
                .unwrap()
                .is_some()
        );
        // A second campaign waits until the first leader resigns.
        let s2 = s.clone();
        let second = tokio::spawn(async move { s2.campaign("e", "two", ttl).await.unwrap() });
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        s.resign(first).await.unwrap();
        let second = second.await.unwrap();
        assert_eq!(s.leader("e").await.unwrap().as_deref(), Some("two"));
        assert_eq!(
            s.put_fenced(&old_fence, "/k", b"stale".to_vec())
                .await
                .unwrap(),
            None
        );
        assert_eq!(s.get("/k").await.unwrap().unwrap().value, b"1");
        assert!(
            s.put_fenced(&second.fence, "/k", b"2".to_vec())
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn watch_sees_only_its_prefix_in_order() {
        let s = EmbeddedStore::in_memory();
        let (_, rev) = s.list("/p/").await.unwrap();
        let mut w = s.watch("/p/", rev).await.unwrap();
        s.put("/q/1", b"no".to_vec()).await.unwrap();
        s.put("/p/1", b"yes".to_vec()).await.unwrap();
        s.delete("/p/1").await.unwrap();
        match w.next().await.unwrap().unwrap() {
            WatchEvent::Put(kv) => assert_eq!(kv.key, "/p/1"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            w.next().await.unwrap().unwrap(),
            WatchEvent::Delete { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_not_kept_alive_expires_and_takes_its_keys() {
        let s = EmbeddedStore::in_memory();
        let ttl = Duration::from_secs(2);
        let lease = s.grant_lease(ttl).await.unwrap();
        let (_, rev) = s.list("/n/").await.unwrap();
        let mut w = s.watch("/n/", rev).await.unwrap();
        let put = s
            .put_with_lease("/n/a", b"a".to_vec(), lease)
            .await
            .unwrap();
        s.put("/n/plain", b"p".to_vec()).await.unwrap();
        assert_eq!(s.get("/n/a").await.unwrap().unwrap().lease, lease);
        assert_eq!(s.get("/n/plain").await.unwrap().unwrap().lease, 0);

        // Renewed before its deadline, it outlives its first TTL.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(s.keep_alive(lease).await.unwrap());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            s.get("/n/a").await.unwrap().is_some(),
            "expired while kept alive"
        );

        // Not renewed: gone one TTL after the last renewal, and watchers see the delete.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(s.get("/n/a").await.unwrap().is_none(), "outlived its lease");
        assert!(
            s.get("/n/plain").await.unwrap().is_some(),
            "a key without lease went"
        );
        assert!(
            matches!(w.next().await.unwrap().unwrap(), WatchEvent::Put(kv) if kv.key == "/n/a")
        );
        assert!(
            matches!(w.next().await.unwrap().unwrap(), WatchEvent::Put(kv) if kv.key == "/n/plain")
        );
        match w.next().await.unwrap().unwrap() {
            WatchEvent::Delete { key, revision } => {
                assert_eq!(key, "/n/a");
                assert!(revision > put);
            }
            other => panic!("unexpected {other:?}"),
        }
        // The lease is gone for good.
        assert!(!s.keep_alive(lease).await.unwrap());
        assert!(matches!(
            s.put_with_lease("/n/a", b"again".to_vec(), lease).await,
            Err(StoreError::LeaseNotFound(l)) if l == lease
        ));
        assert!(matches!(
            s.compare_and_put_with_lease("/n/b", 0, b"b".to_vec(), lease)
                .await,
            Err(StoreError::LeaseNotFound(_))
        ));
        s.revoke_lease(lease).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_past_its_deadline_cannot_be_renewed() {
        let s = EmbeddedStore::in_memory();
        let lease = s.grant_lease(Duration::from_millis(300)).await.unwrap();
        s.put_with_lease("/n/a", b"a".to_vec(), lease)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // At its deadline it is expired, whether or not its keys are deleted yet.
        assert!(!s.keep_alive(lease).await.unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(s.get("/n/a").await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn revoking_deletes_at_once_and_a_plain_write_detaches_the_key() {
        let s = EmbeddedStore::in_memory();
        let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        let other = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        assert_ne!(lease, other);
        for k in ["/n/a", "/n/b", "/n/c"] {
            s.put_with_lease(k, b"x".to_vec(), lease).await.unwrap();
        }
        s.put_with_lease("/n/d", b"x".to_vec(), other)
            .await
            .unwrap();
        // Rewritten without the lease (as an operator would) or with another one: detached.
        s.put("/n/b", b"mine".to_vec()).await.unwrap();
        assert_eq!(
            s.compare_and_put_with_lease("/n/c", 0, b"y".to_vec(), other)
                .await
                .unwrap(),
            None,
            "create-if-absent on an existing key"
        );
        let c_rev = s.get("/n/c").await.unwrap().unwrap().mod_revision;
        s.compare_and_put_with_lease("/n/c", c_rev, b"y".to_vec(), other)
            .await
            .unwrap()
            .unwrap();
        let (_, rev) = s.list("/n/").await.unwrap();
        let mut w = s.watch("/n/", rev).await.unwrap();
        s.revoke_lease(lease).await.unwrap();
        let (kvs, after) = s.list("/n/").await.unwrap();
        let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["/n/b", "/n/c", "/n/d"]);
        assert_eq!(after, rev + 1, "a revoke deletes in one revision");
        assert_eq!(
            w.next().await.unwrap().unwrap(),
            WatchEvent::Delete {
                key: "/n/a".into(),
                revision: after
            }
        );
        assert!(!s.keep_alive(lease).await.unwrap());
        assert!(s.keep_alive(other).await.unwrap());
        // Revoking again, or an unknown lease, is not an error and changes nothing.
        s.revoke_lease(lease).await.unwrap();
        s.revoke_lease(12345).await.unwrap();
        assert_eq!(s.list("/n/").await.unwrap().1, after);
    }

    #[tokio::test]
    async fn reopening_drops_leased_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.json");
        let rev = {
            let s = EmbeddedStore::open(&path).await.unwrap();
            s.put("/n/plain", b"p".to_vec()).await.unwrap();
            let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
            s.put_with_lease("/n/leased", b"l".to_vec(), lease)
                .await
                .unwrap()
        };
        let s = EmbeddedStore::open(&path).await.unwrap();
        let (kvs, at) = s.list("/n/").await.unwrap();
        assert_eq!(kvs.len(), 1);
        assert_eq!(kvs[0].key, "/n/plain");
        assert!(at > rev, "the deletes need a new revision");
    }
}
