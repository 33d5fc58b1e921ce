//! A prefix of the store kept in memory by a watch, with the keys that changed since the
//! reader last looked.
//!
//! The leader follows the registry, the overrides, the policies and the replicas' load sums
//! this way instead of reading them whole on every pass: at 10,000 nodes the registry alone is
//! megabytes, and a pass that follows one weight override needs to look at one key. A mirror
//! reads its prefix once, then applies the watch's events; when the watch breaks (the store is
//! unreachable) it keeps what it has (static stability), and when it can read again it compares
//! the new read with what it held, so that the reader sees every key that changed meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;

use super::{AbortOnDrop, KeyValue, SharedStore, StoreError, WatchEvent};

/// Pause before reading again after the watch broke: a store that is down is not hammered, one
/// that is back is followed again within a second.
const RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct State {
    /// The prefix's keys and values.
    kvs: BTreeMap<String, KeyValue>,
    /// Keys written or deleted since the last [`Mirror::changes`].
    touched: BTreeSet<String>,
    /// A first read has completed.
    synced: bool,
    /// The store revision the mirror is complete at: the read's, or the newest event's.
    revision: i64,
}

/// Changes since the last look.
#[derive(Debug, Default)]
pub struct Changes {
    /// Each key that changed, with its value now (`None`: deleted).
    pub keys: Vec<(String, Option<KeyValue>)>,
    /// The store revision the mirror is complete at.
    pub revision: i64,
}

/// A prefix of the store, followed by a watch.
#[derive(Debug)]
pub struct Mirror {
    state: Arc<Mutex<State>>,
    _task: AbortOnDrop,
}

impl Mirror {
    /// Starts following `prefix`; `changed` is notified after every change (and after each
    /// read). The watch stops when the mirror is dropped.
    pub fn start(store: SharedStore, prefix: &'static str, changed: Arc<Notify>) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(follow(store, prefix, state.clone(), changed));
        Self {
            state,
            _task: AbortOnDrop(task),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the prefix was read at least once.
    pub fn synced(&self) -> bool {
        self.lock().synced
    }

    /// The keys that changed since the last call (every key, the first time).
    pub fn changes(&self) -> Changes {
        let mut s = self.lock();
        let touched = std::mem::take(&mut s.touched);
        Changes {
            keys: touched
                .into_iter()
                .map(|k| {
                    let v = s.kvs.get(&k).cloned();
                    (k, v)
                })
                .collect(),
            revision: s.revision,
        }
    }

    /// Marks every key as changed: the next [`Mirror::changes`] returns them all.
    pub fn touch_all(&self) {
        let mut s = self.lock();
        let keys: Vec<String> = s.kvs.keys().cloned().collect();
        s.touched.extend(keys);
    }

    /// Runs `f` over the keys and values held.
    pub fn with<R>(&self, f: impl FnOnce(&BTreeMap<String, KeyValue>) -> R) -> R {
        f(&self.lock().kvs)
    }
}

/// Replaces what `s` holds with a read at `revision`, marking what differs.
fn replace(s: &mut State, kvs: Vec<KeyValue>, revision: i64) {
    let mut fresh: BTreeMap<String, KeyValue> =
        kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
    for (k, old) in &s.kvs {
        match fresh.get(k) {
            Some(new) if new == old => {}
            _ => {
                s.touched.insert(k.clone());
            }
        }
    }
    for k in fresh.keys() {
        if !s.kvs.contains_key(k) {
            s.touched.insert(k.clone());
        }
    }
    std::mem::swap(&mut s.kvs, &mut fresh);
    s.revision = revision;
    s.synced = true;
}

fn apply(s: &mut State, event: WatchEvent) {
    match event {
        WatchEvent::Put(kv) => {
            s.revision = s.revision.max(kv.mod_revision);
            s.touched.insert(kv.key.clone());
            s.kvs.insert(kv.key.clone(), kv);
        }
        WatchEvent::Delete { key, revision } => {
            s.revision = s.revision.max(revision);
            s.kvs.remove(&key);
            s.touched.insert(key);
        }
    }
}

async fn follow(
    store: SharedStore,
    prefix: &'static str,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
) {
    let lock = || state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let result: Result<(), StoreError> = async {
            let (kvs, revision) = store.list(prefix).await?;
            replace(&mut lock(), kvs, revision);
            changed.notify_one();
            let mut events = store.watch(prefix, revision).await?;
            while let Some(event) = events.next().await {
                apply(&mut lock(), event?);
                changed.notify_one();
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(prefix, error = %e, "watch broken; reading the prefix again");
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    async fn changes_when(m: &Mirror, want: usize) -> Changes {
        for _ in 0..500 {
            if m.synced() && m.lock().touched.len() >= want {
                return m.changes();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the mirror did not see {want} changes");
    }

    #[tokio::test]
    async fn follows_writes_and_deletes() {
        let store: SharedStore = Arc::new(EmbeddedStore::in_memory());
        store.put("/p/a", b"1".to_vec()).await.unwrap();
        store.put("/q/x", b"1".to_vec()).await.unwrap();
        let m = Mirror::start(store.clone(), "/p/", Arc::new(Notify::new()));
        let first = changes_when(&m, 1).await;
        assert_eq!(first.keys.len(), 1, "other prefixes are not followed");
        assert_eq!(first.keys[0].0, "/p/a");
        assert!(m.changes().keys.is_empty(), "changes are taken once");

        store.put("/p/b", b"2".to_vec()).await.unwrap();
        let rev = store.delete("/p/a").await.unwrap().unwrap();
        let c = changes_when(&m, 2).await;
        let keys: Vec<(&str, bool)> = c
            .keys
            .iter()
            .map(|(k, v)| (k.as_str(), v.is_some()))
            .collect();
        assert_eq!(keys, [("/p/a", false), ("/p/b", true)]);
        assert_eq!(c.revision, rev);
        m.touch_all();
        assert_eq!(m.changes().keys.len(), 1);
    }

    #[test]
    fn a_new_read_marks_what_changed_meanwhile() {
        let kv = |k: &str, rev: i64| KeyValue {
            key: k.into(),
            value: vec![],
            mod_revision: rev,
            lease: 0,
        };
        let mut s = State::default();
        replace(&mut s, vec![kv("a", 1), kv("b", 2), kv("c", 3)], 3);
        s.touched.clear();
        replace(&mut s, vec![kv("a", 1), kv("b", 7), kv("d", 8)], 9);
        let touched: Vec<&str> = s.touched.iter().map(String::as_str).collect();
        assert_eq!(touched, ["b", "c", "d"]);
        assert_eq!(s.revision, 9);
    }
}
