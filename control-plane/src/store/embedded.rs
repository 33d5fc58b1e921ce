//! An in-process store for a single machine, persisted to one local file.
//!
//! It keeps the same contract as etcd (revisions that only grow, compare-and-put, prefix
//! watches) so the control plane cannot tell the two apart. Every write rewrites the file
//! atomically (write to a temporary file, then rename), which is plenty for the write rates of a
//! one-machine stack: the control plane batches its writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, broadcast};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::{Fence, KeyValue, Leadership, Store, StoreError, WatchEvent, WatchStream};

/// The election key of the embedded store's one-process elections.
const ELECTION_KEY: &str = "/fulcrum/v1/leader/embedded";

/// How many watch events may queue for a slow watcher before it is told it lagged (it then
/// re-reads). Writes are batched by the control plane, so a few thousand covers many seconds.
const WATCH_BUFFER: usize = 4096;

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    revision: i64,
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
}

/// The embedded store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct EmbeddedStore {
    state: Mutex<State>,
    path: Option<PathBuf>,
    events: broadcast::Sender<WatchEvent>,
    /// Held by the leader; a campaign waits for it.
    election: std::sync::Arc<Mutex<()>>,
    /// The current leader's name and term (each election starts a new term).
    leader: std::sync::Mutex<(Option<String>, i64)>,
}

impl EmbeddedStore {
    /// A store that lives only in memory.
    pub fn in_memory() -> Self {
        Self::with_state(State::default(), None)
    }

    /// Opens (or creates) the store persisted at `path`.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let state = match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e.into()),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        Ok(Self::with_state(state, Some(path)))
    }

    fn with_state(state: State, path: Option<PathBuf>) -> Self {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        Self {
            state: Mutex::new(state),
            path,
            events,
            election: std::sync::Arc::default(),
            leader: std::sync::Mutex::new((None, 0)),
        }
    }

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

    /// Applies one write under the lock: bumps the revision, persists, then tells watchers.
    async fn write(
        &self,
        state: &mut State,
        key: &str,
        value: Option<Vec<u8>>,
    ) -> Result<i64, StoreError> {
        let revision = state.revision + 1;
        let previous = match &value {
            Some(v) => state.entries.insert(
                key.to_owned(),
                Entry {
                    value: v.clone(),
                    mod_revision: revision,
                },
            ),
            None => state.entries.remove(key),
        };
        state.revision = revision;
        if let Err(e) = self.persist(state).await {
            // Undo, so memory never runs ahead of the file.
            state.revision -= 1;
            match previous {
                Some(p) => state.entries.insert(key.to_owned(), p),
                None => state.entries.remove(key),
            };
            return Err(e);
        }
        let event = match value {
            Some(value) => WatchEvent::Put(KeyValue {
                key: key.to_owned(),
                value,
                mod_revision: revision,
            }),
            None => WatchEvent::Delete {
                key: key.to_owned(),
                revision,
            },
        };
        // No receiver is fine: nobody watches.
        let _ = self.events.send(event);
        Ok(revision)
    }
}

fn to_kv(key: &str, e: &Entry) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: e.value.clone(),
        mod_revision: e.mod_revision,
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let state = self.state.lock().await;
        Ok(state.entries.get(key).map(|e| to_kv(key, e)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let state = self.state.lock().await;
        let kvs = state
            .entries
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| to_kv(k, e))
            .collect();
        Ok((kvs, state.revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError> {
        let mut state = self.state.lock().await;
        self.write(&mut state, key, Some(value)).await
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
    ) -> Result<Option<i64>, StoreError> {
        let mut state = self.state.lock().await;
        let current = state.entries.get(key).map_or(0, |e| e.mod_revision);
        if current != expected {
            return Ok(None);
        }
        self.write(&mut state, key, Some(value)).await.map(Some)
    }

    async fn delete(&self, key: &str) -> Result<Option<i64>, StoreError> {
        let mut state = self.state.lock().await;
        if !state.entries.contains_key(key) {
            return Ok(None);
        }
        self.write(&mut state, key, None).await.map(Some)
    }

    async fn watch(&self, prefix: &str, after_revision: i64) -> Result<WatchStream, StoreError> {
        // Subscribe under the lock so no write falls between the caller's read and the watch.
        let state = self.state.lock().await;
        let rx = self.events.subscribe();
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
        let mut state = self.state.lock().await;
        let term = self
            .leader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1;
        if fence.key != ELECTION_KEY || fence.revision != term || self.election.try_lock().is_ok() {
            return Ok(None);
        }
        self.write(&mut state, key, Some(value)).await.map(Some)
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
}
