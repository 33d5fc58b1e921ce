//! The routing stream: every replica follows the routing table in the store (a watch) and serves
//! it to routers over `Subscribe`.
//!
//! The table is stored one key per node (see [`keys::ROUTING`]) and written by the leader in
//! batches closed by a commit marker. The follower applies the entries' changes as the watch
//! reports them, and publishes a new version only when the commit marker is written, at the
//! marker's revision: a router never sees half a batch, and versions (store revisions) only
//! grow, at every router, whichever replica it talks to. When the follower (re)reads the whole
//! table while a batch spanning several transactions is half written (the pending marker is
//! there), it publishes nothing until that batch's commit.
//!
//! Each new version is published with the delta from the one before it (only the nodes whose
//! entry changed, and the ids removed), computed once for all routers from the keys the batch
//! touched. A router that holds the previous version gets the delta; any other gets a snapshot.
//! Fan-out goes through a `tokio::sync::watch` holding only the newest version, so a slow router
//! never holds up the others and never makes memory grow: when it is ready for the next update
//! it gets the newest one, skipping those it missed.
//! Heartbeats keep an idle stream provably alive.
//!
//! A router that skipped versions (it was busy while several were published) gets a delta from
//! the version it holds, as long as that is one of the last [`HISTORY_VERSIONS`] (each version
//! keeps the ids the versions since changed), and a snapshot only beyond that.
//!
//! Each version's updates are encoded once, for every stream (see [`crate::subscribe`]): the
//! delta when the version is published, a delta from an older version or the snapshot when a
//! router first needs it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use fulcrum_proto::fulcrum::v1::{Endpoint, ModelPolicy, RoutingCommit, RoutingUpdate};
use prost::Message;
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::keys;
use crate::load::LoadAggregator;
use crate::store::{SharedStore, WatchEvent};

/// Pause before re-reading the store after the watch broke: short enough that routers see a
/// recovered store within a second, long enough not to hammer a store that is down.
const REWATCH_BACKOFF: Duration = Duration::from_millis(500);

/// A heartbeat goes out on a stream that carried nothing for this long. Routers treat a stream
/// silent for three intervals as dead and move to another replica, so a hung replica costs a
/// router at most six seconds of staleness (while it keeps routing on its last table).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// One node's routing entry and the store revision it was written at.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    revision: u64,
    endpoint: Arc<Endpoint>,
}

/// The table's entries by node id, in a persistent map (`imbl`): versions share what did not
/// change between them, so publishing a version costs what changed, not what exists. With a
/// `BTreeMap` each version copied the whole table (10,000 keys and pointers) and the previous
/// version's copy was freed: 4 to 17 ms per version at 10,000 nodes on the shared 2-core
/// machine, before any router was sent anything (scenario 4).
type Entries = imbl::OrdMap<String, Entry>;

/// One published version: the table, and the delta from the version before it.
#[derive(Debug)]
pub struct Published {
    /// The version: the revision of the commit marker that closed the batch.
    pub version: u64,
    /// The store is unreachable: this is the last good table, possibly old.
    pub stale: bool,
    /// Per-model policies.
    policies: Vec<ModelPolicy>,
    /// The table.
    entries: Entries,
    /// The whole table as an update, built when an operator first asks for it.
    snapshot: OnceLock<Arc<RoutingUpdate>>,
    /// The whole table as an encoded gRPC message, built when a router first needs it and
    /// shared by every stream that sends it.
    snapshot_frame: OnceLock<Bytes>,
    /// The change from `delta.base_version`, when there was a previous table.
    pub delta: Option<RoutingUpdate>,
    /// `delta` encoded, once for every stream.
    delta_frame: Option<Bytes>,
    /// The versions before `delta`'s base a router may hold and still get a delta.
    history: Arc<History>,
    /// Deltas from those versions, encoded when a router first needs one, shared by the
    /// streams that need the same.
    older_deltas: Mutex<Vec<(u64, Bytes)>>,
    /// A heartbeat at this version, encoded.
    heartbeat_frame: Bytes,
}

/// Versions back a router may be and still get a delta rather than a snapshot. A router that
/// was busy for a moment (a burst of versions: a flapping region, a rolling restart) skips to
/// the newest version; with deltas only from the version just before, every such router got
/// the whole table, at 10,000 nodes a megabyte and more to send and for it to decode, which
/// made it fall further behind, and the replica send more snapshots (scenario 4 of
/// docs/benchmarks.md). 64 versions is a few seconds of the busiest table there.
const HISTORY_VERSIONS: usize = 64;

/// Most node ids the history of a version holds, over all its versions: beyond that, a delta
/// would be as large as the table (a fleet rewritten), and keeping them would cost more than
/// the snapshots it saves.
const HISTORY_IDS: usize = 16_384;

/// Recent versions, oldest first, each with the ids its successor changed: a router holding
/// one of them needs the current entries of the ids from there on.
#[derive(Debug, Default)]
struct History {
    versions: std::collections::VecDeque<(u64, Arc<[String]>)>,
    ids: usize,
}

impl History {
    /// This history followed by `version`, whose successor changed `ids`, trimmed to the bounds.
    fn then(&self, version: u64, ids: Arc<[String]>) -> Self {
        let mut versions = self.versions.clone();
        let mut total = self.ids + ids.len();
        versions.push_back((version, ids));
        while versions.len() > HISTORY_VERSIONS || total > HISTORY_IDS {
            match versions.pop_front() {
                Some((_, gone)) => total -= gone.len(),
                None => break,
            }
        }
        Self {
            versions,
            ids: total,
        }
    }

    /// The ids changed since `version`, if it is in the history.
    fn since(&self, version: u64) -> Option<BTreeSet<&str>> {
        let at = self.versions.iter().position(|(v, _)| *v == version)?;
        Some(
            self.versions
                .iter()
                .skip(at)
                .flat_map(|(_, ids)| ids.iter().map(String::as_str))
                .collect(),
        )
    }
}

/// Field number of `RoutingUpdate.endpoints` (routing.proto): the snapshot's endpoints are
/// encoded straight from the shared entries under it, without building a copy of the table.
const ENDPOINTS_FIELD: u32 = 3;

/// A gRPC message: the uncompressed flag, the length, and `body` (which `encode` writes,
/// `len` bytes).
fn grpc_frame(len: usize, encode: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    // A message of 4 GiB or more cannot be framed; no routing table comes near (10,000 nodes
    // are about a megabyte), and a router would refuse it anyway.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    encode(&mut buf);
    buf.freeze()
}

/// `message` as a gRPC message.
fn encode_frame(message: &RoutingUpdate) -> Bytes {
    grpc_frame(message.encoded_len(), |buf| message.encode_raw(buf))
}

/// A heartbeat for a router of a replica that has no table yet.
pub(crate) fn empty_heartbeat() -> Bytes {
    encode_frame(&RoutingUpdate {
        heartbeat: true,
        ..RoutingUpdate::default()
    })
}

/// What a router gets next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The version's delta.
    Delta,
    /// A delta from an older version the router holds, still in the version's history.
    OlderDelta,
    /// The whole table.
    Snapshot,
}

/// What to send a router holding `held` (told last that the table was `held_stale`): nothing
/// when it is current, the delta when it holds the delta's base, a snapshot otherwise
/// (including when it claims a version from the future, and when only the stale flag changed).
pub(crate) fn plan(held: u64, held_stale: bool, p: &Published) -> Option<Kind> {
    if held == p.version && held_stale == p.stale {
        return None;
    }
    match &p.delta {
        Some(d) if d.base_version == held && held != 0 && held_stale == p.stale => {
            Some(Kind::Delta)
        }
        Some(_)
            if held != 0
                && held_stale == p.stale
                && p.history.versions.iter().any(|(v, _)| *v == held) =>
        {
            Some(Kind::OlderDelta)
        }
        _ => Some(Kind::Snapshot),
    }
}

impl Published {
    fn new(
        version: u64,
        stale: bool,
        policies: Vec<ModelPolicy>,
        entries: Entries,
        delta: Option<RoutingUpdate>,
        history: Arc<History>,
    ) -> Self {
        Self {
            delta_frame: delta.as_ref().map(encode_frame),
            history,
            older_deltas: Mutex::default(),
            heartbeat_frame: encode_frame(&RoutingUpdate {
                version,
                heartbeat: true,
                ..RoutingUpdate::default()
            }),
            version,
            stale,
            policies,
            entries,
            snapshot: OnceLock::new(),
            snapshot_frame: OnceLock::new(),
            delta,
        }
    }

    /// The whole table as an encoded snapshot update (built once, then shared).
    pub(crate) fn snapshot_frame(&self) -> Bytes {
        self.snapshot_frame
            .get_or_init(|| {
                let head = RoutingUpdate {
                    version: self.version,
                    snapshot: true,
                    stale: self.stale,
                    policies: self.policies.clone(),
                    ..RoutingUpdate::default()
                };
                let len = head.encoded_len()
                    + self
                        .entries
                        .values()
                        .map(|e| {
                            prost::encoding::message::encoded_len(ENDPOINTS_FIELD, &*e.endpoint)
                        })
                        .sum::<usize>();
                // Fields may come in any order in protobuf; repeated ones keep theirs.
                grpc_frame(len, |buf| {
                    head.encode_raw(buf);
                    for e in self.entries.values() {
                        prost::encoding::message::encode(ENDPOINTS_FIELD, &*e.endpoint, buf);
                    }
                })
            })
            .clone()
    }

    /// The delta, encoded.
    pub(crate) fn delta_frame(&self) -> Option<&Bytes> {
        self.delta_frame.as_ref()
    }

    /// The delta from `held`, an older version in the history, encoded (once for every stream
    /// that holds `held`); `None` when `held` is not in the history.
    pub(crate) fn older_delta_frame(&self, held: u64) -> Option<Bytes> {
        let mut cache = self
            .older_deltas
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, f)) = cache.iter().find(|(v, _)| *v == held) {
            return Some(f.clone());
        }
        let frame = encode_frame(&self.older_delta(held)?);
        cache.push((held, frame.clone()));
        Some(frame)
    }

    /// The delta from `held`, an older version in the history: the current entry of every
    /// node changed since, and those of them that are gone.
    fn older_delta(&self, held: u64) -> Option<RoutingUpdate> {
        let mut endpoints = Vec::new();
        let mut removed = Vec::new();
        for id in self.history.since(held)? {
            match self.entries.get(id) {
                Some(e) => endpoints.push((*e.endpoint).clone()),
                // Possibly a node the router never had (added and removed since): removing
                // an id it does not hold changes nothing.
                None => removed.push(id.to_owned()),
            }
        }
        Some(RoutingUpdate {
            version: self.version,
            snapshot: false,
            endpoints,
            removed,
            stale: self.stale,
            policies: self.policies.clone(),
            heartbeat: false,
            base_version: held,
        })
    }

    /// A heartbeat at this version, encoded.
    /// A table of nodes `ids` (weight 1) at `version`, with no delta or history: a router
    /// that does not hold `version` gets a snapshot of it.
    #[cfg(test)]
    pub(crate) fn for_test(version: u64, ids: &[&str]) -> Self {
        let entries = ids
            .iter()
            .map(|id| {
                let endpoint = Endpoint {
                    spec: Some(fulcrum_proto::fulcrum::v1::NodeSpec {
                        id: (*id).into(),
                        ..Default::default()
                    }),
                    weight: 1.0,
                    ..Default::default()
                };
                let entry = Entry {
                    revision: 1,
                    endpoint: Arc::new(endpoint),
                };
                ((*id).to_string(), entry)
            })
            .collect();
        Self::new(version, false, vec![], entries, None, Arc::default())
    }

    pub(crate) fn heartbeat_frame(&self) -> Bytes {
        self.heartbeat_frame.clone()
    }

    /// The whole table as a snapshot update.
    pub fn snapshot(&self) -> Arc<RoutingUpdate> {
        self.snapshot
            .get_or_init(|| {
                Arc::new(RoutingUpdate {
                    version: self.version,
                    snapshot: true,
                    endpoints: self
                        .entries
                        .values()
                        .map(|e| (*e.endpoint).clone())
                        .collect(),
                    removed: vec![],
                    stale: self.stale,
                    policies: self.policies.clone(),
                    heartbeat: false,
                    base_version: 0,
                })
            })
            .clone()
    }

    /// How many nodes the table holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table holds no node.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A node's entry.
    pub fn endpoint(&self, id: &str) -> Option<&Endpoint> {
        self.entries.get(id).map(|e| &*e.endpoint)
    }

    /// The first version that carries a node's current entry: a router that acknowledged it
    /// (or a later one) routes to the node as this version says.
    pub fn entry_version(&self, id: &str) -> Option<u64> {
        // An entry written at revision r is published by the commit that closes its batch, at
        // a revision of r or later, and the routers ACK commit revisions: any version ≥ r has it.
        self.entries.get(id).map(|e| e.revision)
    }
}

/// The delta from `prev` to `entries` at `version`: of the `touched` node ids, those whose
/// entry is new or changed, and those that are gone.
fn delta<'a>(
    prev: &Published,
    entries: &Entries,
    touched: impl Iterator<Item = &'a String>,
    policies: &[ModelPolicy],
    version: u64,
) -> RoutingUpdate {
    let mut endpoints = Vec::new();
    let mut removed = Vec::new();
    for id in touched {
        match (prev.entries.get(id), entries.get(id)) {
            (Some(a), Some(b)) if a.endpoint == b.endpoint => {}
            (_, Some(b)) => endpoints.push((*b.endpoint).clone()),
            (Some(_), None) => removed.push(id.clone()),
            (None, None) => {}
        }
    }
    RoutingUpdate {
        version,
        snapshot: false,
        endpoints,
        removed,
        stale: false,
        policies: policies.to_vec(),
        heartbeat: false,
        base_version: prev.version,
    }
}

/// What a router has told us about itself.
#[derive(Debug, Clone, Default)]
pub struct RouterInfo {
    /// The router's id.
    pub id: String,
    /// The region it serves.
    pub region: String,
    /// The newest version it acknowledged.
    pub acked_version: u64,
    /// NACKs received.
    pub nacks: u64,
    /// Where other routers reach it; empty: it gives none.
    pub address: String,
}

type Table = Option<Arc<Published>>;

/// The newest routing table, shared by every `Subscribe` stream of this replica.
#[derive(Debug, Clone)]
pub struct Publisher {
    table: watch::Receiver<Table>,
    /// The routers subscribed to this replica, by id.
    pub(crate) routers: Arc<Mutex<HashMap<String, RouterInfo>>>,
    /// Where their load reports go.
    pub(crate) load: Arc<LoadAggregator>,
}

impl Publisher {
    /// Starts following the routing table in `store`; the task runs until aborted. Load reports
    /// from routers go to `load`.
    pub fn start(
        store: SharedStore,
        load: Arc<LoadAggregator>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(follow(store, tx));
        let publisher = Self {
            table: rx,
            routers: Arc::default(),
            load,
        };
        (publisher, task)
    }

    /// The newest table, if one was ever read.
    pub fn current(&self) -> Option<Arc<RoutingUpdate>> {
        self.table.borrow().as_ref().map(|p| p.snapshot())
    }

    /// Every new table from now on (the newest first).
    pub fn tables(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.table.clone()
    }

    /// Routers currently subscribed to this replica.
    pub fn routers(&self) -> Vec<RouterInfo> {
        let routers = self.routers.lock().unwrap_or_else(PoisonError::into_inner);
        routers.values().cloned().collect()
    }
}

/// Publishes the table in `entries` at `version` (the commit marker's revision), with the delta
/// over the nodes in `touched` (which it clears). A version not newer than the published one is
/// not published: versions never go backwards.
///
/// The follower's task is the only writer of `tx` (this and [`mark_stale`]), so the version is
/// built from the current one outside the channel's lock and swapped in at the end: streams
/// reading the current table wait for the swap only, and the version replaced is dropped after.
fn publish(
    tx: &watch::Sender<Table>,
    entries: &Entries,
    touched: &mut BTreeSet<String>,
    commit: RoutingCommit,
    version: i64,
) {
    let version = version as u64;
    let started = std::time::Instant::now();
    let current = tx.borrow().clone();
    if current.as_ref().is_some_and(|p| p.version >= version) {
        return;
    }
    let delta = current
        .as_ref()
        .map(|p| delta(p, entries, touched.iter(), &commit.policies, version));
    // A router at the previous version, or one in its history, can get a delta.
    let history = match (current.as_ref(), delta.as_ref()) {
        (Some(p), Some(d)) if !p.stale => {
            let ids: Arc<[String]> = d
                .endpoints
                .iter()
                .map(|e| crate::table::node_id(e).to_owned())
                .chain(d.removed.iter().cloned())
                .collect();
            Arc::new(p.history.then(p.version, ids))
        }
        _ => Arc::default(),
    };
    if commit.endpoints != entries.len() as u64 {
        tracing::error!(
            version,
            expected = commit.endpoints,
            held = entries.len(),
            "the routing table read does not have as many nodes as its commit says"
        );
    }
    let next = Arc::new(Published::new(
        version,
        false,
        commit.policies,
        entries.clone(),
        delta,
        history,
    ));
    let built = started.elapsed();
    let replaced = tx.send_replace(Some(next));
    let changed = touched.len();
    touched.clear();
    tracing::debug!(
        version,
        changed,
        built_us = built.as_micros() as u64,
        published_us = started.elapsed().as_micros() as u64,
        "version published"
    );
    drop((current, replaced));
}

fn mark_stale(tx: &watch::Sender<Table>, stale: bool) {
    tx.send_if_modified(|current| match current {
        Some(p) if p.stale != stale => {
            // The flag alone changes; routers get it as a snapshot.
            *current = Some(Arc::new(Published::new(
                p.version,
                stale,
                p.policies.clone(),
                p.entries.clone(),
                None,
                Arc::default(),
            )));
            true
        }
        _ => false,
    });
}

fn decode_commit(value: &[u8]) -> Option<RoutingCommit> {
    RoutingCommit::decode(value)
        .inspect_err(|e| tracing::error!(error = %e, "undecodable routing commit in the store"))
        .ok()
}

/// The follower's copy of the table in the store, as of the last event it applied, and what
/// changed since the version it last published.
#[derive(Debug, Default)]
struct Follower {
    entries: Entries,
    /// Node ids written or deleted since the last published version.
    touched: BTreeSet<String>,
}

impl Follower {
    /// Applies a write of a node's entry. An undecodable entry drops the node (it cannot be
    /// routed to safely) and is logged.
    fn put_entry(&mut self, id: &str, value: &[u8], revision: i64) {
        match Endpoint::decode(value) {
            Ok(e) => {
                let entry = Entry {
                    revision: revision as u64,
                    endpoint: Arc::new(e),
                };
                self.entries.insert(id.to_owned(), entry);
            }
            Err(e) => {
                tracing::error!(node = %id, error = %e, "undecodable routing entry in the store");
                self.entries.remove(id);
            }
        }
        self.touched.insert(id.to_owned());
    }

    /// Starts over from a read of the whole table (`kvs`, under [`keys::ROUTING`]), and
    /// publishes it unless a batch is half written.
    fn read(&mut self, tx: &watch::Sender<Table>, kvs: &[crate::store::KeyValue]) {
        self.entries.clear();
        // Any node may have changed since the version published: compare them all.
        if let Some(p) = tx.borrow().as_ref() {
            self.touched.extend(p.entries.keys().cloned());
        }
        let mut commit = None;
        let mut pending = false;
        for kv in kvs {
            if let Some(id) = kv.key.strip_prefix(keys::ROUTING_NODES) {
                self.put_entry(id, &kv.value, kv.mod_revision);
            } else if kv.key == keys::ROUTING_COMMIT {
                commit = decode_commit(&kv.value).map(|c| (c, kv.mod_revision));
            } else if kv.key == keys::ROUTING_PENDING {
                pending = true;
            }
        }
        match commit {
            // What was read may be half a batch: wait for its commit.
            Some(_) if pending => tracing::info!("routing table half written; awaiting its commit"),
            Some((c, rev)) => publish(tx, &self.entries, &mut self.touched, c, rev),
            None => {}
        }
    }

    /// Applies one watch event; a commit marker publishes the table.
    fn apply(&mut self, tx: &watch::Sender<Table>, event: WatchEvent) {
        match event {
            WatchEvent::Put(kv) => {
                if let Some(id) = kv.key.strip_prefix(keys::ROUTING_NODES) {
                    self.put_entry(id, &kv.value, kv.mod_revision);
                } else if kv.key == keys::ROUTING_COMMIT
                    && let Some(c) = decode_commit(&kv.value)
                {
                    publish(tx, &self.entries, &mut self.touched, c, kv.mod_revision);
                }
            }
            WatchEvent::Delete { key, .. } => {
                if let Some(id) = key.strip_prefix(keys::ROUTING_NODES) {
                    self.entries.remove(id);
                    self.touched.insert(id.to_owned());
                }
            }
        }
    }
}

async fn follow(store: SharedStore, tx: watch::Sender<Table>) {
    let mut follower = Follower::default();
    loop {
        let result: Result<(), crate::store::StoreError> = async {
            let (kvs, revision) = store.list(keys::ROUTING).await?;
            mark_stale(&tx, false);
            follower.read(&tx, &kvs);
            drop(kvs);
            let mut events = store.watch(keys::ROUTING, revision).await?;
            while let Some(ev) = events.next().await {
                follower.apply(&tx, ev?);
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "routing watch broken; serving the last table as stale");
            mark_stale(&tx, true);
        }
        tokio::time::sleep(REWATCH_BACKOFF).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::NodeSpec;

    fn ep(id: &str, weight: f64) -> Endpoint {
        Endpoint {
            spec: Some(NodeSpec {
                id: id.into(),
                ..Default::default()
            }),
            weight,
            ..Default::default()
        }
    }

    fn entries(eps: Vec<Endpoint>) -> Entries {
        eps.into_iter()
            .map(|e| {
                let id = e.spec.as_ref().unwrap().id.clone();
                let entry = Entry {
                    revision: 1,
                    endpoint: Arc::new(e),
                };
                (id, entry)
            })
            .collect()
    }

    fn published(version: u64, eps: Vec<Endpoint>) -> Published {
        Published::new(version, false, vec![], entries(eps), None, Arc::default())
    }

    /// Decodes a gRPC frame, checking its prefix.
    fn unframe(frame: &Bytes) -> RoutingUpdate {
        assert_eq!(frame[0], 0, "compressed flag");
        let len = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 5, "length prefix");
        RoutingUpdate::decode(&frame[5..]).unwrap()
    }

    fn commit(n: usize) -> RoutingCommit {
        RoutingCommit {
            policies: vec![],
            endpoints: n as u64,
        }
    }

    #[test]
    fn deltas_carry_only_what_changed() {
        let a = published(5, vec![ep("x", 1.0), ep("y", 1.0), ep("z", 1.0)]);
        let b = entries(vec![ep("x", 1.0), ep("y", 2.0), ep("w", 1.0)]);
        let touched: Vec<String> = ["w", "x", "y", "z", "never"].map(String::from).into();
        let d = delta(&a, &b, touched.iter(), &[], 9);
        assert!(!d.snapshot);
        assert_eq!((d.version, d.base_version), (9, 5));
        let ids: Vec<_> = d.endpoints.iter().map(crate::table::node_id).collect();
        assert_eq!(ids, vec!["w", "y"], "x is unchanged, never never existed");
        assert_eq!(d.removed, vec!["z".to_string()]);
    }

    #[test]
    fn versions_never_go_backwards_and_deltas_chain() {
        let (tx, rx) = watch::channel(None);
        let mut e = entries(vec![ep("x", 1.0)]);
        let mut touched = BTreeSet::from(["x".to_string()]);
        publish(&tx, &e, &mut touched, commit(1), 7);
        assert!(touched.is_empty());
        let first = rx.borrow().clone().unwrap();
        assert_eq!((first.version, first.len()), (7, 1));
        assert!(
            first.delta.is_none(),
            "the first version has nothing to be a delta of"
        );
        e.insert(
            "x".into(),
            Entry {
                revision: 10,
                endpoint: Arc::new(ep("x", 3.0)),
            },
        );
        touched.insert("x".into());
        publish(&tx, &e, &mut touched, commit(1), 5);
        assert_eq!(rx.borrow().as_ref().unwrap().version, 7, "went backwards");
        assert!(!touched.is_empty(), "an unpublished change was forgotten");
        publish(&tx, &e, &mut touched, commit(1), 12);
        let second = rx.borrow().clone().unwrap();
        let d = second.delta.as_ref().unwrap();
        assert_eq!((d.base_version, d.version, d.endpoints.len()), (7, 12, 1));
        assert_eq!(second.snapshot().endpoints[0].weight, 3.0);
        assert_eq!(
            first.snapshot().endpoints[0].weight,
            1.0,
            "versions share entries"
        );
    }

    #[test]
    fn what_each_router_gets() {
        let a = published(5, vec![ep("x", 1.0)]);
        let b = entries(vec![ep("x", 2.0)]);
        let d = delta(&a, &b, ["x".to_string()].iter(), &[], 9);
        let p = Published::new(9, false, vec![], b, Some(d), Arc::default());
        assert_eq!(plan(9, false, &p), None, "a current router gets nothing");
        assert_eq!(plan(5, false, &p), Some(Kind::Delta), "the base holder");
        assert_eq!(plan(3, false, &p), Some(Kind::Snapshot), "an older router");
        assert_eq!(plan(0, false, &p), Some(Kind::Snapshot), "a new router");
        assert_eq!(
            plan(u64::MAX, false, &p),
            Some(Kind::Snapshot),
            "the future"
        );
        assert_eq!(plan(9, true, &p), Some(Kind::Snapshot), "no longer stale");
        assert_eq!(plan(5, true, &p), Some(Kind::Snapshot), "stale base");
    }

    #[test]
    fn a_router_versions_behind_gets_a_delta_from_the_version_it_holds() {
        let (tx, rx) = watch::channel(None);
        let mut e = entries(vec![ep("x", 1.0), ep("y", 1.0), ep("z", 1.0)]);
        let mut touched = BTreeSet::new();
        publish(&tx, &e, &mut touched, commit(3), 5);
        let at = |id: &str, w: f64, rev: u64| Entry {
            revision: rev,
            endpoint: Arc::new(ep(id, w)),
        };
        // 7: x changes; 9: z goes, w comes; 11: y changes.
        e.insert("x".into(), at("x", 2.0, 7));
        touched.insert("x".into());
        publish(&tx, &e, &mut touched, commit(3), 7);
        e.remove("z");
        e.insert("w".into(), at("w", 4.0, 9));
        touched.extend(["z".to_string(), "w".to_string()]);
        publish(&tx, &e, &mut touched, commit(3), 9);
        e.insert("y".into(), at("y", 3.0, 11));
        touched.insert("y".into());
        publish(&tx, &e, &mut touched, commit(3), 11);
        let p = rx.borrow().clone().unwrap();

        assert_eq!(plan(9, false, &p), Some(Kind::Delta));
        assert_eq!(
            plan(5, false, &p),
            Some(Kind::OlderDelta),
            "three versions behind"
        );
        assert_eq!(plan(7, false, &p), Some(Kind::OlderDelta));
        assert_eq!(plan(6, false, &p), Some(Kind::Snapshot), "never a version");
        assert_eq!(plan(5, true, &p), Some(Kind::Snapshot), "stale base");
        assert_eq!(plan(0, false, &p), Some(Kind::Snapshot));

        let d = unframe(&p.older_delta_frame(5).unwrap());
        assert_eq!((d.base_version, d.version, d.snapshot), (5, 11, false));
        let ids: Vec<_> = d.endpoints.iter().map(crate::table::node_id).collect();
        assert_eq!(
            ids,
            ["w", "x", "y"],
            "every node changed since 5, as it is now"
        );
        assert_eq!(d.removed, ["z"]);
        let d = unframe(&p.older_delta_frame(7).unwrap());
        let ids: Vec<_> = d.endpoints.iter().map(crate::table::node_id).collect();
        assert_eq!(
            (ids, d.removed.clone()),
            (vec!["w", "y"], vec!["z".to_string()])
        );
        assert_eq!(
            p.older_delta_frame(7).unwrap().as_ptr(),
            p.older_delta_frame(7).unwrap().as_ptr(),
            "encoded once, shared"
        );
        assert!(p.older_delta_frame(6).is_none());
    }

    #[test]
    fn the_history_is_bounded() {
        let mut h = History::default();
        for v in 0..(HISTORY_VERSIONS as u64 + 10) {
            h = h.then(v, Arc::from(vec!["a".to_string()]));
        }
        assert_eq!(h.versions.len(), HISTORY_VERSIONS);
        assert!(h.since(0).is_none(), "the oldest versions are forgotten");
        assert!(h.since(HISTORY_VERSIONS as u64 + 9).is_some());
        let big: Arc<[String]> = (0..HISTORY_IDS).map(|i| i.to_string()).collect();
        let h = h.then(1000, big);
        assert_eq!(
            (h.versions.len(), h.ids),
            (1, HISTORY_IDS),
            "older versions give way to a large one"
        );
    }

    #[test]
    fn frames_are_the_updates_encoded() {
        let policy = ModelPolicy {
            model: "m".into(),
            ..Default::default()
        };
        let a = published(5, vec![ep("x", 1.0), ep("z", 1.0)]);
        let b = entries(vec![ep("w", 4.0), ep("x", 2.0), ep("y", 3.0)]);
        let touched: Vec<String> = ["w", "x", "y", "z"].map(String::from).into();
        let d = delta(&a, &b, touched.iter(), std::slice::from_ref(&policy), 9);
        let p = Published::new(
            9,
            true,
            vec![policy.clone()],
            b,
            Some(d.clone()),
            Arc::default(),
        );
        assert_eq!(unframe(p.delta_frame().unwrap()), d);
        let snapshot = unframe(&p.snapshot_frame());
        assert_eq!(
            snapshot,
            *p.snapshot(),
            "the frame and the decoded snapshot agree"
        );
        assert_eq!(
            snapshot,
            RoutingUpdate {
                version: 9,
                snapshot: true,
                endpoints: vec![ep("w", 4.0), ep("x", 2.0), ep("y", 3.0)],
                stale: true,
                policies: vec![policy],
                ..Default::default()
            }
        );
        assert_eq!(
            p.snapshot_frame().as_ptr(),
            p.snapshot_frame().as_ptr(),
            "encoded once, shared"
        );
        let hb = unframe(&p.heartbeat_frame());
        assert!(hb.heartbeat && hb.version == 9 && hb.endpoints.is_empty());
        assert!(unframe(&empty_heartbeat()).heartbeat);
    }

    fn kv(key: &str, value: Vec<u8>, rev: i64) -> crate::store::KeyValue {
        crate::store::KeyValue {
            key: key.into(),
            value,
            mod_revision: rev,
            lease: 0,
        }
    }

    fn entry(id: &str, w: f64, rev: i64) -> crate::store::KeyValue {
        kv(&keys::routing_node(id), ep(id, w).encode_to_vec(), rev)
    }

    fn commit_kv(n: usize, rev: i64) -> crate::store::KeyValue {
        kv(keys::ROUTING_COMMIT, commit(n).encode_to_vec(), rev)
    }

    fn version(tx: &watch::Sender<Table>) -> Option<u64> {
        tx.borrow().as_ref().map(|p| p.version)
    }

    #[test]
    fn half_a_batch_is_never_published() {
        let (tx, _rx) = watch::channel(None);
        let mut f = Follower::default();
        f.read(&tx, &[entry("x", 1.0, 3), commit_kv(1, 3)]);
        assert_eq!(version(&tx), Some(3));

        // A batch in two transactions: nothing is published until its commit.
        f.apply(&tx, WatchEvent::Put(kv(keys::ROUTING_PENDING, vec![], 4)));
        f.apply(&tx, WatchEvent::Put(entry("x", 2.0, 4)));
        f.apply(
            &tx,
            WatchEvent::Delete {
                key: keys::routing_node("gone"),
                revision: 4,
            },
        );
        assert_eq!(version(&tx), Some(3));
        assert_eq!(
            tx.borrow().as_ref().unwrap().endpoint("x").unwrap().weight,
            1.0
        );

        // A follower reading the store now (the half-written table) publishes nothing either.
        let (tx2, _rx2) = watch::channel(None);
        let mut g = Follower::default();
        let half = [
            entry("x", 2.0, 4),
            commit_kv(1, 3),
            kv(keys::ROUTING_PENDING, vec![], 4),
        ];
        g.read(&tx2, &half);
        assert_eq!(version(&tx2), None, "published half a batch after a read");
        // Nor does one that already published the previous version and reads again.
        f.read(&tx, &half);
        assert_eq!(version(&tx), Some(3));

        // The batch's last transaction: both publish it whole.
        for (f, tx) in [(&mut f, &tx), (&mut g, &tx2)] {
            f.apply(tx, WatchEvent::Put(entry("y", 1.0, 5)));
            f.apply(tx, WatchEvent::Put(commit_kv(2, 5)));
            f.apply(
                tx,
                WatchEvent::Delete {
                    key: keys::ROUTING_PENDING.into(),
                    revision: 5,
                },
            );
            let p = tx.borrow().clone().unwrap();
            assert_eq!((p.version, p.len()), (5, 2));
            assert_eq!(p.endpoint("x").unwrap().weight, 2.0);
            assert_eq!(
                p.entry_version("x"),
                Some(4),
                "x changed in the first transaction"
            );
            assert_eq!(p.entry_version("y"), Some(5));
        }
        let d = tx.borrow().as_ref().unwrap().delta.clone().unwrap();
        assert_eq!((d.base_version, d.endpoints.len()), (3, 2));
        assert!(d.removed.is_empty());
    }
}
