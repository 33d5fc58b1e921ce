//! The leader's global load view, kept current beside the control loop rather than on its path.
//!
//! Every replica writes its routers' load sum to the store once a second ([`crate::load`]).
//! The leader follows those sums with a watch, decodes them, adds them up
//! ([`load::merge`]) and finds the nodes whose entry depends on what moved ([`LoadSignals`]).
//! At 10,000 nodes that is a third of a megabyte to decode and ten thousand nodes to merge and
//! compare every second: 15 to 30 ms of CPU on the benchmark's shared 2-core machine (scenario
//! 4). Done inside a pass, a weight change arriving meanwhile waited for it; here it runs on a
//! blocking thread of its own, and the loop takes the result ([`GlobalLoad::take`]): the newest
//! view and the nodes to compute again, both ready.
//!
//! The view is made again whenever a sum changes, and at least once every
//! [`REMERGE_INTERVAL`] while there is any load: sums age out with time alone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::LoadReport;
use tokio::sync::Notify;

use crate::keys;
use crate::load::{self, LoadView};
use crate::store::mirror::Mirror;
use crate::store::{AbortOnDrop, SharedStore};
use crate::table::LoadSignals;

/// Longest time between two merges while there is any load: a replica's sum stops counting
/// when it is too old (its replica died), and a node's own report too, with no event to say so.
/// A second is the control loop's resync interval, and the period at which replicas write.
pub const REMERGE_INTERVAL: Duration = Duration::from_secs(1);

/// What the follower made and the loop has not taken yet.
#[derive(Debug, Default)]
struct Made {
    /// The newest view, if made since the loop last took one.
    view: Option<Arc<LoadView>>,
    /// Nodes whose load signals changed (or whose load appeared or went) since the loop last
    /// took a view.
    changed: BTreeSet<String>,
    /// A first view was made (from a complete read of the sums).
    synced: bool,
}

/// The global load view, followed by a task of its own.
#[derive(Debug)]
pub struct GlobalLoad {
    made: Arc<Mutex<Made>>,
    _task: AbortOnDrop,
}

impl GlobalLoad {
    /// Starts following the replicas' load sums in `store`; `changed` is notified whenever a
    /// new view changes a node's signals (and after the first view). Stops when dropped.
    pub fn start(store: SharedStore, changed: Arc<Notify>) -> Self {
        let made = Arc::new(Mutex::new(Made::default()));
        let task = tokio::spawn(follow(store, made.clone(), changed));
        Self {
            made,
            _task: AbortOnDrop(task),
        }
    }

    /// Whether a first view was made.
    pub fn synced(&self) -> bool {
        self.lock().synced
    }

    /// The newest view, if one was made since the last call, with the nodes whose entry may
    /// have changed since the view taken before it.
    pub fn take(&self) -> Option<(Arc<LoadView>, BTreeSet<String>)> {
        let mut made = self.lock();
        let view = made.view.take()?;
        Some((view, std::mem::take(&mut made.changed)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Made> {
        self.made.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The replicas' sums as last decoded, and the view made from them.
#[derive(Debug, Default)]
struct Sums {
    /// Each replica's sum, by key.
    reports: BTreeMap<String, LoadReport>,
    view: Arc<LoadView>,
}

impl Sums {
    /// Applies the sums that changed (`None`: deleted), merges them at `now_ms`, and returns
    /// the new view with the nodes whose signals differ from the previous view's.
    fn remerge(
        &mut self,
        changes: Vec<(String, Option<Vec<u8>>)>,
        now_ms: u64,
    ) -> (Arc<LoadView>, BTreeSet<String>) {
        for (key, value) in changes {
            match value.and_then(|v| load::decode(&key, &v)) {
                Some(r) => self.reports.insert(key, r),
                None => self.reports.remove(&key),
            };
        }
        let merged = load::merge(self.reports.values(), now_ms);
        let mut changed = BTreeSet::new();
        for (id, l) in &merged {
            // Only a change the node's entry depends on makes it worth computing again.
            if LoadSignals::of(self.view.get(id)) != LoadSignals::of(Some(l)) {
                changed.insert(id.clone());
            }
        }
        for id in self.view.keys() {
            if !merged.contains_key(id) {
                changed.insert(id.clone());
            }
        }
        self.view = Arc::new(merged);
        (self.view.clone(), changed)
    }
}

async fn follow(store: SharedStore, made: Arc<Mutex<Made>>, changed: Arc<Notify>) {
    let wake = Arc::new(Notify::new());
    let mirror = Mirror::start(store, keys::LOAD, wake.clone());
    let mut sums = Some(Sums::default());
    loop {
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(REMERGE_INTERVAL) => {}
        }
        if !mirror.synced() {
            continue;
        }
        let changes: Vec<(String, Option<Vec<u8>>)> = mirror
            .changes()
            .keys
            .into_iter()
            .map(|(k, kv)| (k, kv.map(|kv| kv.value)))
            .collect();
        let Some(mut s) = sums.take() else { return };
        let first = !made.lock().unwrap_or_else(PoisonError::into_inner).synced;
        if changes.is_empty() && !first && s.reports.is_empty() && s.view.is_empty() {
            sums = Some(s);
            continue;
        }
        // Decoding and merging thousands of nodes is CPU work: off the runtime's workers, so
        // that the streams and calls they run are not held up behind it.
        let joined = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let (view, ids) = s.remerge(changes, load::now_unix_ms());
            if started.elapsed() >= Duration::from_millis(2) {
                tracing::debug!(
                    nodes = view.len(),
                    changed = ids.len(),
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "load view made"
                );
            }
            (s, view, ids)
        })
        .await;
        let Ok((s, view, ids)) = joined else {
            // Only a panic in the merge gets here: the loop keeps the view it has, and the next
            // merge starts over (every node it holds counts as changed).
            tracing::error!("making the load view failed; starting over");
            sums = Some(Sums::default());
            continue;
        };
        sums = Some(s);
        let notify = {
            let mut m = made.lock().unwrap_or_else(PoisonError::into_inner);
            let notify = !ids.is_empty() || !m.synced;
            m.view = Some(view);
            m.changed.extend(ids);
            m.synced = true;
            notify
        };
        if notify {
            changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::NodeLoadSummary;
    use crate::store::embedded::EmbeddedStore;

    fn view(nodes: &[(&str, u32, f64)]) -> LoadView {
        nodes
            .iter()
            .map(|(id, in_flight, calls)| {
                (
                    (*id).to_owned(),
                    NodeLoadSummary {
                        in_flight: *in_flight,
                        mean_in_flight: f64::from(*in_flight),
                        calls_per_sec: *calls,
                        latency_ms: Some(5.0),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    fn encoded(v: &LoadView) -> Option<Vec<u8>> {
        Some(load::encode(v, vec![]))
    }

    #[test]
    fn only_nodes_whose_signals_moved_are_computed_again() {
        let mut sums = Sums::default();
        let now = load::now_unix_ms();
        let a = view(&[("x", 1, 10.0), ("y", 2, 10.0)]);
        let (v, changed) = sums.remerge(vec![("load/a".into(), encoded(&a))], now);
        assert_eq!(v.len(), 2);
        assert_eq!(
            changed,
            BTreeSet::from(["x".into(), "y".into()]),
            "first sight"
        );

        // y's call rate moves (no signal of its entry), x's mean in flight does.
        let a = view(&[("x", 3, 10.0), ("y", 2, 12.0)]);
        let (v, changed) = sums.remerge(vec![("load/a".into(), encoded(&a))], now);
        assert_eq!(changed, BTreeSet::from(["x".into()]));
        assert_eq!(v["y"].calls_per_sec, 12.0, "the view is the newest still");

        // A second replica's sum adds to x; the first one's goes: y leaves the view.
        let b = view(&[("x", 1, 5.0)]);
        let (v, changed) = sums.remerge(
            vec![("load/b".into(), encoded(&b)), ("load/a".into(), None)],
            now,
        );
        assert_eq!(v.len(), 1);
        assert_eq!(v["x"].in_flight, 1);
        assert_eq!(changed, BTreeSet::from(["x".into(), "y".into()]));
    }

    #[test]
    fn old_sums_age_out_without_an_event() {
        let mut sums = Sums::default();
        let now = load::now_unix_ms();
        let a = view(&[("x", 1, 10.0)]);
        sums.remerge(vec![("load/a".into(), encoded(&a))], now);
        let later = now + 60_000;
        let (v, changed) = sums.remerge(vec![], later);
        assert!(v.is_empty(), "a sum a minute old still counts");
        assert_eq!(changed, BTreeSet::from(["x".into()]));
    }

    #[tokio::test]
    async fn the_loop_takes_the_newest_view_and_every_node_changed_since() {
        let store: SharedStore = Arc::new(EmbeddedStore::in_memory());
        let changed = Arc::new(Notify::new());
        let global = GlobalLoad::start(store.clone(), changed.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !global.synced() {
            assert!(tokio::time::Instant::now() < deadline, "never synced");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (v, _) = global.take().expect("a first view");
        assert!(v.is_empty());

        store
            .put(
                &keys::load("a"),
                load::encode(&view(&[("x", 1, 1.0)]), vec![]),
            )
            .await
            .unwrap();
        store
            .put(
                &keys::load("b"),
                load::encode(&view(&[("y", 1, 1.0)]), vec![]),
            )
            .await
            .unwrap();
        // Both writes may be made into one view or two: the loop sees both nodes either way.
        let mut seen = BTreeSet::new();
        let mut last = None;
        while seen.len() < 2 || last.as_ref().is_none_or(|v: &Arc<LoadView>| v.len() < 2) {
            assert!(tokio::time::Instant::now() < deadline, "saw only {seen:?}");
            tokio::time::timeout(Duration::from_millis(200), changed.notified())
                .await
                .ok();
            if let Some((v, ids)) = global.take() {
                seen.extend(ids);
                last = Some(v);
            }
        }
        assert_eq!(seen, BTreeSet::from(["x".into(), "y".into()]));
        assert!(global.take().is_none(), "nothing new to take");
    }
}
