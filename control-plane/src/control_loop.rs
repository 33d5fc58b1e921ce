//! The control loop: read the registry, keep the prober in step with it, turn specs, health and
//! overrides into the routing table, and write the table to the store when it changed.
//!
//! Only the leader runs it. Every replica campaigns in the store's election; the one elected
//! probes and writes, each write fenced by its leadership so that a replica that lost the
//! leadership (its lease expired while it was cut off) cannot overwrite its successor's table.
//! A replica that loses the leadership stops probing and campaigns again.
//!
//! The table lives in the store as one key per node (see [`keys::ROUTING`]), so a pass writes
//! only the entries that changed. Writes are batched: a pass's changes are one batch, split
//! into transactions of at most [`MAX_TXN_OPS`] writes (etcd's default limit), the last of which
//! writes the commit marker whose revision is the routing version. Batches are at least
//! [`BATCH_WINDOW`] apart, and transactions are paced by a token bucket ([`TXN_RATE`],
//! [`TXN_BURST`]), so the store's write rate is bounded however many nodes there are and
//! however often they change: changes that arrive while the loop waits are merged into the next
//! batch (a node that changed twice is written once, with its newest entry).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{Endpoint, HealthState, ModelPolicy, NodeSpec, RoutingCommit};
use futures::StreamExt;
use prost::Message;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::Error;
use crate::health::NodeHealth;
use crate::health::prober::Prober;
use crate::store::{AbortOnDrop, Fence, Leadership, MAX_TXN_OPS, Op, SharedStore};
use crate::{keys, load, overrides, policies, registry, table};

/// What the store holds (as far as the leader knows): each node's entry and the policies.
#[derive(Debug, Clone, Default, PartialEq)]
struct Table {
    /// Entries by node id.
    endpoints: BTreeMap<String, Endpoint>,
    /// Per-model policies, as in the commit marker.
    policies: Vec<ModelPolicy>,
    /// The entries are not (all) committed: no commit marker yet, or a batch was left half
    /// written by a deposed leader. The next pass writes a batch even if nothing changed.
    uncommitted: bool,
    /// The pre-split single-key table is still in the store: the next batch deletes it.
    legacy: bool,
}

/// Least time between two batches (from the end of one to the start of the next). The first
/// change after a quiet period is written at once; changes that follow within 50 ms wait and
/// are merged: 50 ms is below what a caller notices in failover (probes already take a second)
/// and caps batches at 20 per second however many nodes change.
const BATCH_WINDOW: Duration = Duration::from_millis(50);

/// Sustained transactions per second the loop may write. A batch is usually one transaction
/// (a few nodes changed), so steady state stays at or below 20 per second (the window); only a
/// change of most of a large fleet at once (a region lost, the first table) needs many, and the
/// bucket spreads those so that the routing table's share of the store's writes stays at 25 per
/// second, half the 50 per second the control plane is allowed in all.
const TXN_RATE: f64 = 25.0;

/// Transactions the loop may write at once after a quiet period: 100 transactions of
/// [`MAX_TXN_OPS`] writes rewrite a 12,800-node table in one go, so a region failure reaches
/// the routers as one version; larger changes are paced at [`TXN_RATE`].
const TXN_BURST: f64 = 100.0;

/// A pass even when nothing signalled a change: picks up load (replicas write their sums once a
/// second) and overrides written by other replicas or directly in the store. One second keeps
/// that lag small at the cost of a few small range reads a second; the registry is re-read only
/// when its watch saw a change.
const RESYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The election every replica campaigns in.
pub const ELECTION: &str = "/fulcrum/v1/leader";

/// Pause before campaigning again after a store error.
const CAMPAIGN_RETRY: Duration = Duration::from_secs(1);

/// Campaigns, leads while elected, and campaigns again, until the task is dropped.
/// `is_leader` tells the rest of the replica whether it leads.
pub async fn run(
    store: SharedStore,
    prober: Arc<Prober>,
    changed: Arc<Notify>,
    replica_id: String,
    leader_ttl: Duration,
    is_leader: tokio::sync::watch::Sender<bool>,
) {
    loop {
        let leadership = match store.campaign(ELECTION, &replica_id, leader_ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot campaign for leadership; retrying");
                tokio::time::sleep(CAMPAIGN_RETRY).await;
                continue;
            }
        };
        tracing::info!(replica = %replica_id, fence = ?leadership.fence, "elected leader");
        is_leader.send_replace(true);
        lead(&store, &prober, &changed, &leadership).await;
        is_leader.send_replace(false);
        prober.sync(&[]);
        tracing::warn!(replica = %replica_id, "leadership lost; campaigning again");
        // Give it up explicitly too, in case only the fence failed.
        if let Err(e) = store.resign(leadership).await {
            tracing::debug!(error = %e, "resign after losing leadership");
        }
    }
}

/// A token bucket over transactions: a batch may start while the bucket holds at least one
/// token, and takes as many as it wrote (possibly running into debt, which the next batch then
/// waits out), so the long-run rate is at most [`TXN_RATE`].
#[derive(Debug)]
struct Pacer {
    tokens: f64,
    at: Instant,
}

impl Pacer {
    fn new(now: Instant) -> Self {
        Self {
            tokens: TXN_BURST,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * TXN_RATE;
        self.tokens = (self.tokens + earned).min(TXN_BURST);
        self.at = now;
    }

    /// When the next batch may start.
    fn ready_at(&self) -> Instant {
        if self.tokens >= 1.0 {
            self.at
        } else {
            self.at + Duration::from_secs_f64((1.0 - self.tokens) / TXN_RATE)
        }
    }

    fn spend(&mut self, now: Instant, txns: usize) {
        self.refill(now);
        self.tokens -= txns as f64;
    }
}

/// The registry as the leader last read it. A watch on the node specs marks it dirty (and wakes
/// the loop) when a node is written or deleted, so a pass re-reads the registry only when it
/// changed: at 10,000 nodes a read is megabytes, and most passes (a weight change, new load, a
/// probe result) do not need one.
struct Registry {
    specs: Vec<NodeSpec>,
    /// The store revision the specs were read at.
    read_at: i64,
    dirty: Arc<AtomicBool>,
    _watch: AbortOnDrop,
}

impl Registry {
    fn new(store: &SharedStore, changed: Arc<Notify>) -> Self {
        // Dirty until the first read.
        let dirty = Arc::new(AtomicBool::new(true));
        let watch = tokio::spawn(watch_registry(store.clone(), dirty.clone(), changed));
        Self {
            specs: vec![],
            read_at: 0,
            dirty,
            _watch: AbortOnDrop(watch),
        }
    }

    /// Re-reads the specs if they changed since the last read; whether it did.
    async fn refresh(&mut self, store: &SharedStore) -> Result<bool, Error> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        match registry::list_at(store.as_ref()).await {
            Ok((specs, read_at)) => {
                self.specs = specs;
                self.read_at = read_at;
                Ok(true)
            }
            Err(e) => {
                self.dirty.store(true, Ordering::Release);
                Err(e)
            }
        }
    }
}

/// Marks `dirty` and wakes the loop on every write under the node specs; after the watch (re)starts
/// too, since writes may have been missed meanwhile.
async fn watch_registry(store: SharedStore, dirty: Arc<AtomicBool>, changed: Arc<Notify>) {
    loop {
        let result: Result<(), crate::store::StoreError> = async {
            // A small range read for the current revision: the watch starts after it.
            let (_, revision) = store.list(ELECTION).await?;
            let mut events = store.watch(keys::NODES, revision).await?;
            dirty.store(true, Ordering::Release);
            changed.notify_one();
            while let Some(event) = events.next().await {
                event?;
                dirty.store(true, Ordering::Release);
                changed.notify_one();
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "registry watch broken; re-reading the registry");
        }
        dirty.store(true, Ordering::Release);
        tokio::time::sleep(CAMPAIGN_RETRY).await;
    }
}

/// Leads until the leadership is lost.
async fn lead(
    store: &SharedStore,
    prober: &Prober,
    changed: &Arc<Notify>,
    leadership: &Leadership,
) {
    let mut lost = leadership.lost.clone();
    let mut registry = Registry::new(store, changed.clone());
    // Damping measures time from the table last written.
    let mut written_at = Instant::now();
    let mut pacer = Pacer::new(written_at);
    // The end of the last batch (long ago: the first pass may write at once).
    let mut batch_end: Option<Instant> = None;
    let mut last: Table = loop {
        match current_table(store).await {
            Ok(t) => break t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the routing table; retrying");
                tokio::select! {
                    () = tokio::time::sleep(CAMPAIGN_RETRY) => {}
                    _ = lost.wait_for(|l| *l) => return,
                }
            }
        }
    };
    loop {
        if *lost.borrow() {
            return;
        }
        // Pace: the window since the last batch, and the transaction budget.
        let mut start = pacer.ready_at();
        if let Some(end) = batch_end {
            start = start.max(end + BATCH_WINDOW);
        }
        if start > Instant::now() {
            tokio::select! {
                () = tokio::time::sleep_until(start) => {}
                _ = lost.wait_for(|l| *l) => return,
            }
        }
        let elapsed = written_at.elapsed();
        match reconcile(
            store,
            prober,
            &mut registry,
            &leadership.fence,
            &last,
            elapsed,
        )
        .await
        {
            Ok(Written::Batch { table, txns }) => {
                last = table;
                let now = Instant::now();
                written_at = now;
                batch_end = Some(now);
                pacer.spend(now, txns);
            }
            Ok(Written::Nothing) => {}
            Ok(Written::Fenced) => {
                tracing::warn!("a fenced write was refused: another replica leads");
                return;
            }
            // Static stability: keep the last table (routers keep theirs) and try again. What
            // the store holds is unknown now (some transactions of the batch may have landed):
            // read it again before the next batch.
            Err(e) => {
                tracing::warn!(error = %e, "control loop: store unavailable, keeping last state");
                if let Ok(t) = current_table(store).await {
                    last = t;
                }
            }
        }
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(RESYNC_INTERVAL) => {}
            lost_now = lost.changed() => {
                if lost_now.is_err() || *lost.borrow() {
                    return;
                }
            }
        }
    }
}

/// What one pass of the loop did.
enum Written {
    /// Wrote a batch of `txns` transactions; the store now holds `table`.
    Batch { table: Table, txns: usize },
    /// Nothing changed.
    Nothing,
    /// The write was refused: this replica no longer leads.
    Fenced,
}

/// The table as the store holds it.
async fn current_table(store: &SharedStore) -> Result<Table, Error> {
    let (kvs, _) = store.list(keys::ROUTING).await?;
    let mut t = Table {
        uncommitted: true,
        ..Table::default()
    };
    let mut pending = false;
    for kv in kvs {
        if let Some(id) = kv.key.strip_prefix(keys::ROUTING_NODES) {
            // An undecodable entry is kept as an empty one: it differs from any real entry, so
            // the next batch rewrites it (or deletes it, when the node is gone).
            let e = Endpoint::decode(kv.value.as_slice()).unwrap_or_else(|e| {
                tracing::error!(key = %kv.key, error = %e, "undecodable routing entry; rewriting it");
                Endpoint::default()
            });
            t.endpoints.insert(id.to_owned(), e);
        } else if kv.key == keys::ROUTING_COMMIT {
            match RoutingCommit::decode(kv.value.as_slice()) {
                Ok(c) => {
                    t.policies = c.policies;
                    t.uncommitted = false;
                }
                Err(e) => tracing::error!(error = %e, "undecodable routing commit; rewriting it"),
            }
        } else if kv.key == keys::ROUTING_PENDING {
            pending = true;
        }
    }
    t.uncommitted |= pending;
    t.legacy = store.get(keys::LEGACY_ROUTING).await?.is_some();
    Ok(t)
}

/// The transactions of a batch that takes the store from `last` to `next`: every changed or new
/// entry written, every gone one deleted, and the commit marker written in the last one. A batch
/// that needs several transactions opens with the pending marker and closes (with the commit)
/// by deleting it. Empty when nothing changed and `last` is committed.
fn batch(last: &Table, next: &Table) -> Vec<Vec<Op>> {
    let mut ops: Vec<Op> = next
        .endpoints
        .iter()
        .filter(|(id, e)| last.endpoints.get(*id) != Some(*e))
        .map(|(id, e)| Op::Put {
            key: keys::routing_node(id),
            value: e.encode_to_vec(),
        })
        .collect();
    ops.extend(
        last.endpoints
            .keys()
            .filter(|id| !next.endpoints.contains_key(*id))
            .map(|id| Op::Delete {
                key: keys::routing_node(id),
            }),
    );
    if last.legacy {
        ops.push(Op::Delete {
            key: keys::LEGACY_ROUTING.to_owned(),
        });
    }
    if ops.is_empty() && last.policies == next.policies && !last.uncommitted {
        return vec![];
    }
    let commit = [
        Op::Put {
            key: keys::ROUTING_COMMIT.to_owned(),
            value: RoutingCommit {
                policies: next.policies.clone(),
                endpoints: next.endpoints.len() as u64,
            }
            .encode_to_vec(),
        },
        Op::Delete {
            key: keys::ROUTING_PENDING.to_owned(),
        },
    ];
    if ops.len() + commit.len() > MAX_TXN_OPS {
        ops.insert(
            0,
            Op::Put {
                key: keys::ROUTING_PENDING.to_owned(),
                value: vec![],
            },
        );
    }
    let mut txns: Vec<Vec<Op>> = Vec::with_capacity(ops.len() / MAX_TXN_OPS + 1);
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        txns.push(ops.by_ref().take(MAX_TXN_OPS).collect());
    }
    match txns.last_mut() {
        Some(t) if t.len() + commit.len() <= MAX_TXN_OPS => t.extend(commit),
        _ => txns.push(commit.into()),
    }
    txns
}

/// The health a table entry implies, for a node not probed yet. Operator states (draining,
/// cordoned) say nothing of the node's health: it counts as never probed, as the node was
/// getting no calls anyway.
fn inherited_health(e: &Endpoint) -> NodeHealth {
    let state = match e.health() {
        s @ (HealthState::Healthy | HealthState::Degraded | HealthState::Unhealthy) => s,
        HealthState::Unspecified | HealthState::Draining | HealthState::Cordoned => {
            HealthState::Unspecified
        }
    };
    NodeHealth {
        state,
        ready_models: e.ready_models.clone(),
        // The entry's models are the discovered ones when the node declares none.
        discovered: e
            .spec
            .iter()
            .flat_map(|s| &s.models)
            .map(|m| m.name.clone())
            .collect(),
        ..NodeHealth::default()
    }
}

/// One pass: recompute the table and write what changed (fenced).
async fn reconcile(
    store: &SharedStore,
    prober: &Prober,
    registry: &mut Registry,
    fence: &Fence,
    last: &Table,
    elapsed: Duration,
) -> Result<Written, Error> {
    let pass_started = Instant::now();
    if registry.refresh(store).await? {
        prober.sync(&registry.specs);
    }
    let specs = &registry.specs;
    let registered: HashSet<&str> = specs.iter().map(|s| s.id.as_str()).collect();
    // Overrides of nodes that left without `deregister` (a lease expired) go with them.
    if let Err(e) = overrides::remove_orphans(store.as_ref(), &registered, registry.read_at).await {
        tracing::warn!(error = %e, "cannot remove the overrides of nodes that left; retrying");
    }
    let overrides = overrides::load(store.as_ref()).await?;
    let policies = policies::list(store.as_ref()).await?;
    let load = load::global(store.as_ref()).await?;
    let previous: HashMap<String, f64> = last
        .endpoints
        .iter()
        .map(|(id, e)| (id.clone(), e.weight))
        .collect();
    // A node this replica has not probed yet (it was just elected, or the node is new) keeps
    // the health the table gives it: the previous leader's verdict. Otherwise every new leader
    // would publish the whole fleet unroutable until its first probes answer.
    let mut health = prober.snapshot();
    for (id, e) in &last.endpoints {
        if !health.contains_key(id) {
            health.insert(id.clone(), inherited_health(e));
        }
    }
    let next = Table {
        endpoints: table::build(&table::Inputs {
            specs,
            health: &health,
            overrides: &overrides,
            load: &load,
            previous: &previous,
            elapsed,
        })
        .into_iter()
        .map(|e| (table::node_id(&e).to_owned(), e))
        .collect(),
        policies,
        uncommitted: false,
        legacy: false,
    };
    let txns = batch(last, &next);
    let computed_in = pass_started.elapsed();
    if txns.is_empty() {
        return Ok(Written::Nothing);
    }
    let count = txns.len();
    let mut version = 0;
    for (i, ops) in txns.into_iter().enumerate() {
        match store.txn_fenced(fence, ops).await? {
            Some(rev) => version = rev,
            // Refused: another replica leads. It reads what this one wrote before and
            // rewrites what it must; the batch was never committed.
            None => {
                if i > 0 {
                    tracing::warn!(written = i, of = count, "leadership lost in a batch");
                }
                return Ok(Written::Fenced);
            }
        }
    }
    tracing::debug!(
        version,
        txns = count,
        nodes = next.endpoints.len(),
        computed_ms = computed_in.as_secs_f64() * 1e3,
        pass_ms = pass_started.elapsed().as_secs_f64() * 1e3,
        "routing table written"
    );
    Ok(Written::Batch {
        table: next,
        txns: count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::NodeSpec;

    fn table(n: usize, weight: f64) -> Table {
        Table {
            endpoints: (0..n)
                .map(|i| {
                    let id = format!("n{i:05}");
                    let e = Endpoint {
                        spec: Some(NodeSpec {
                            id: id.clone(),
                            ..Default::default()
                        }),
                        weight,
                        ..Default::default()
                    };
                    (id, e)
                })
                .collect(),
            ..Table::default()
        }
    }

    fn key(op: &Op) -> &str {
        match op {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }

    #[test]
    fn a_small_change_is_one_transaction_with_the_commit() {
        let last = table(10, 1.0);
        let mut next = last.clone();
        next.endpoints.get_mut("n00003").unwrap().weight = 2.0;
        next.endpoints.remove("n00007");
        let txns = batch(&last, &next);
        assert_eq!(txns.len(), 1);
        let keys: Vec<&str> = txns[0].iter().map(key).collect();
        assert_eq!(
            keys,
            [
                "/fulcrum/v1/routing/nodes/n00003",
                "/fulcrum/v1/routing/nodes/n00007",
                keys::ROUTING_COMMIT,
                keys::ROUTING_PENDING
            ]
        );
        assert!(matches!(&txns[0][1], Op::Delete { .. }));
        assert!(
            batch(&next, &next).is_empty(),
            "nothing changed, nothing written"
        );
    }

    #[test]
    fn a_large_change_is_bounded_transactions_opened_and_closed_by_markers() {
        let last = table(1000, 1.0);
        let next = table(1000, 2.0);
        let txns = batch(&last, &next);
        // 1,000 entries + pending + commit + pending delete, 128 per transaction.
        assert_eq!(txns.len(), 8);
        assert!(txns.iter().all(|t| t.len() <= MAX_TXN_OPS && !t.is_empty()));
        assert!(matches!(&txns[0][0], Op::Put { key, .. } if key == keys::ROUTING_PENDING));
        let tail: Vec<&str> = txns[7].iter().rev().take(2).map(key).collect();
        assert_eq!(tail, [keys::ROUTING_PENDING, keys::ROUTING_COMMIT]);
        let written: usize = txns
            .iter()
            .flatten()
            .filter(|op| key(op).starts_with(keys::ROUTING_NODES))
            .count();
        assert_eq!(written, 1000);
        // Commit markers appear only in the last transaction.
        assert!(
            txns[..7]
                .iter()
                .flatten()
                .all(|op| key(op) != keys::ROUTING_COMMIT)
        );
    }

    #[test]
    fn an_uncommitted_table_gets_a_commit_and_the_legacy_key_goes() {
        let mut last = table(3, 1.0);
        last.uncommitted = true;
        let next = table(3, 1.0);
        let txns = batch(&last, &next);
        let keys: Vec<&str> = txns.iter().flatten().map(key).collect();
        assert_eq!(keys, [keys::ROUTING_COMMIT, keys::ROUTING_PENDING]);
        last.uncommitted = false;
        last.legacy = true;
        let keys: Vec<String> = batch(&last, &next)
            .iter()
            .flatten()
            .map(|op| key(op).to_owned())
            .collect();
        assert_eq!(keys[0], keys::LEGACY_ROUTING);
    }

    #[test]
    fn the_pacer_bounds_the_long_run_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        assert_eq!(p.ready_at(), t0, "a full bucket writes at once");
        p.spend(t0, 150);
        // 50 in debt: the next batch waits until one token is back.
        let wait = p.ready_at() - t0;
        assert_eq!(wait, Duration::from_secs_f64(51.0 / TXN_RATE));
    }
}
