//! The control loop: follow the registry, keep the prober in step with it, turn specs, health,
//! load and overrides into the routing table, and write the table to the store when it changed.
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
//!
//! Passes are incremental, so that one costs what changed, not what exists: the leader follows
//! its inputs (node specs, overrides, policies) with watches ([`Mirror`]), the replicas' load
//! sums through [`GlobalLoad`] (merged on a thread of its own, which says whose load moved),
//! the prober says which nodes' health changed, and a pass computes only the
//! nodes whose inputs changed, plus those whose weight is still moving toward its target
//! (damping). A weight override at 10,000 nodes computes one entry and writes one key.
//!
//! Probe verdicts reach the table through the mass-failure guard ([`guard`]): when most of the
//! routable fleet fails its probes at once, unconfirmed by the nodes' own signals, a pass
//! publishes those nodes' last state instead ([`Guarded`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{Endpoint, HealthState, ModelPolicy, NodeSpec, RoutingCommit};
use prost::Message;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::Error;
use crate::global_load::GlobalLoad;
use crate::health::NodeHealth;
use crate::health::guard::{self, NodeView, Passive, Previous, Verdict};
use crate::health::prober::Prober;
use crate::load::LoadView;
use crate::overrides::{Overrides, Subject};
use crate::store::mirror::Mirror;
use crate::store::{Fence, Leadership, MAX_TXN_OPS, Op, SharedStore, StoreError};
use crate::{keys, load, overrides, registry, table};

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

/// A pass even when nothing signalled a change: load sums age out with time alone, and weights
/// still moving toward their targets (damping) move on. Everything the store holds arrives by
/// watches, which wake the loop themselves.
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
        prober
            .stats()
            .guard_held
            .store(0, std::sync::atomic::Ordering::Relaxed);
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

/// The largest first step of a weight that starts moving. Damping measures time from a node's
/// clock: when its weight was last published, or last found settled (at its target). While a
/// weight moves, time accumulates until the step it earns clears the hysteresis and is
/// published. But a node settled for a minute whose load then jumps must still move gradually,
/// as if followed all along: the first step after it was settled covers at most a second (the
/// resync interval: a moving weight is recomputed at least that often).
const MAX_DAMP_STEP: Duration = RESYNC_INTERVAL;

/// What the leader knows of the store's inputs to the table, kept current by watches
/// ([`Mirror`]) instead of reads on every pass.
struct Follow {
    nodes: Mirror,
    overrides: Mirror,
    policies: Mirror,
    load: GlobalLoad,
}

impl Follow {
    fn start(store: &SharedStore, changed: &Arc<Notify>) -> Self {
        let mirror = |prefix| Mirror::start(store.clone(), prefix, changed.clone());
        Self {
            nodes: mirror(keys::NODES),
            overrides: mirror(keys::OVERRIDES),
            policies: mirror(keys::POLICIES),
            load: GlobalLoad::start(store.clone(), changed.clone()),
        }
    }

    fn synced(&self) -> bool {
        [&self.nodes, &self.overrides, &self.policies]
            .iter()
            .all(|m| m.synced())
            && self.load.synced()
    }
}

/// The inputs as the leader holds them, decoded.
#[derive(Default)]
struct Inputs {
    specs: BTreeMap<String, NodeSpec>,
    /// The store revision the registry is complete at.
    registry_revision: i64,
    overrides: Overrides,
    policies: Vec<ModelPolicy>,
    /// The sum of the replicas' load sums, as [`GlobalLoad`] last made it.
    load: Arc<LoadView>,
    /// Median latency per model, from `load`.
    medians: HashMap<String, f64>,
}

impl Inputs {
    /// Applies what changed in the store since the last pass; the nodes whose entry may have
    /// changed go to `dirty`. Returns whether a node left the registry or an override changed
    /// (overrides of nodes that left may need removing).
    fn update(&mut self, follow: &Follow, prober: &Prober, dirty: &mut BTreeSet<String>) -> bool {
        let mut maybe_orphans = false;
        let mut recompute_medians = false;
        let nodes = follow.nodes.changes();
        self.registry_revision = nodes.revision;
        let mut started = Vec::new();
        let mut stopped = Vec::new();
        for (key, kv) in nodes.keys {
            let Some(id) = key.strip_prefix(keys::NODES) else {
                continue;
            };
            let spec = kv.and_then(|kv| {
                registry::decode(&kv.key, &kv.value)
                    .inspect_err(|e| tracing::error!(key = %kv.key, error = %e, "ignoring an undecodable node spec"))
                    .ok()
            });
            recompute_medians = true;
            dirty.insert(id.to_owned());
            match spec {
                Some(spec) => {
                    started.push(spec.clone());
                    self.specs.insert(id.to_owned(), spec);
                }
                None => {
                    stopped.push(id.to_owned());
                    self.specs.remove(id);
                    // Even when this leader never held the node: registered and gone between
                    // two passes, it can have left overrides behind that an earlier pass saw
                    // (the overrides' watch delivered them before the registry's delivered the
                    // registration) and spared, written after the registry as read then.
                    maybe_orphans = true;
                }
            }
        }
        prober.remove(&stopped);
        prober.upsert(&started);

        for (key, kv) in follow.overrides.changes().keys {
            maybe_orphans = true;
            match self
                .overrides
                .apply(&key, kv.as_ref().map(|kv| kv.value.as_slice()))
            {
                Some(Subject::Node(id)) => {
                    dirty.insert(id);
                }
                Some(Subject::Region(region)) => dirty.extend(
                    self.specs
                        .values()
                        .filter(|s| s.region == region)
                        .map(|s| s.id.clone()),
                ),
                None => {}
            }
        }

        if !follow.policies.changes().keys.is_empty() {
            self.policies = follow.policies.with(|kvs| {
                kvs.values()
                    .filter_map(|kv| {
                        ModelPolicy::decode(kv.value.as_slice())
                            .inspect_err(|e| tracing::error!(key = %kv.key, error = %e, "ignoring an undecodable policy"))
                            .ok()
                    })
                    .collect()
            });
        }

        if let Some((view, moved)) = follow.load.take() {
            // Medians read latencies, one of the signals: none moved, none changed.
            recompute_medians |= !moved.is_empty();
            dirty.extend(moved);
            self.load = view;
        }
        if recompute_medians {
            let medians = table::peer_medians(self.specs.values(), &self.load);
            if medians != self.medians {
                // Every node serving a model whose median moved is judged against new peers.
                let moved: HashSet<&str> = medians
                    .iter()
                    .filter(|(m, v)| self.medians.get(*m) != Some(*v))
                    .map(|(m, _)| m.as_str())
                    .chain(
                        self.medians
                            .keys()
                            .filter(|m| !medians.contains_key(*m))
                            .map(String::as_str),
                    )
                    .collect();
                dirty.extend(
                    self.specs
                        .values()
                        .filter(|s| s.models.iter().any(|m| moved.contains(m.name.as_str())))
                        .map(|s| s.id.clone()),
                );
                self.medians = medians;
            }
        }
        dirty.extend(prober.take_changed());
        maybe_orphans
    }
}

/// What a leadership keeps between passes besides the table.
struct Leading {
    /// Each node's damping clock: when its weight was last published or found settled.
    clock: HashMap<String, Instant>,
    /// When the leadership began: the clock of nodes not computed yet.
    since: Instant,
    /// Nodes whose weight is still moving toward its target: computed again every pass.
    unsettled: BTreeSet<String>,
    /// Compute every node on the next pass (the first, or after the table was read again).
    full: bool,
    /// Transactions sent by the last pass (retries included), for the pacer.
    sent: usize,
    /// The mass-failure guard's memory.
    guard: Guarded,
}

/// The mass-failure guard's memory between passes ([`guard`] decides; this feeds it and
/// remembers what it needs of the passes before).
#[derive(Debug, Default)]
struct Guarded {
    /// Nodes the probes moved from routable to unhealthy within the guard's window: when, and
    /// the health they had before (what holding them publishes again).
    moved: HashMap<String, (Instant, NodeHealth)>,
    /// Nodes held by the last pass: published with their last state, not their probes'.
    held: BTreeSet<String>,
    /// Why, for logging when it changes.
    trip: guard::Trip,
    /// The last pass whose decision tripped the guard (the grace runs from it).
    tripped_at: Option<Instant>,
}

impl Guarded {
    /// Decides which nodes this pass holds; those entering or leaving the hold go to `dirty`.
    fn pass(
        &mut self,
        prober: &Prober,
        inputs: &Inputs,
        last: &Table,
        now: Instant,
        dirty: &mut BTreeSet<String>,
    ) {
        let config = prober.config();
        let threshold = config.mass_failure_threshold;
        let window = guard::window(config);
        let unhealthy = prober.unhealthy();
        self.moved.retain(|id, (at, _)| {
            now.saturating_duration_since(*at) < window && unhealthy.contains_key(id)
        });
        let routable = |id: &str| {
            last.endpoints
                .get(id)
                .is_some_and(|e| matches!(e.health(), HealthState::Healthy | HealthState::Degraded))
        };
        // Nothing to decide (the common case, a few long-dead nodes included) unless a failing
        // node is at stake or some are held.
        let at_stake = unhealthy
            .keys()
            .any(|id| routable(id) || self.moved.contains_key(id));
        let grace = self
            .tripped_at
            .is_some_and(|at| now.saturating_duration_since(at) < window);
        let decision = if guard::enabled(threshold) && (at_stake || !self.held.is_empty()) {
            let now_ms = load::now_unix_ms();
            let views = inputs.specs.iter().filter_map(|(id, spec)| {
                let held = self.held.contains(id);
                let previous = if self.moved.contains_key(id) {
                    Previous::RecentlyMoved
                } else if routable(id) {
                    Previous::Routable
                } else if held {
                    // Held, and not published yet (a node restored by the last pass).
                    Previous::Routable
                } else {
                    return None;
                };
                let failing = unhealthy.get(id);
                let verdict = match failing {
                    None => Verdict::Up,
                    Some(f) if f.recovering => Verdict::Recovering,
                    Some(f) if f.unanswered => Verdict::DownUnanswered,
                    Some(_) => Verdict::DownAnswered,
                };
                let since = failing.map_or(0, |f| f.since_unix_ms);
                let passive = Passive::of(inputs.load.get(id), now_ms, since);
                Some((
                    id.as_str(),
                    NodeView {
                        region: &spec.region,
                        previous,
                        verdict,
                        passive,
                        held,
                    },
                ))
            });
            guard::decide(views, threshold, grace)
        } else {
            guard::Decision::default()
        };
        if decision.tripped() {
            self.tripped_at = Some(now);
        }
        dirty.extend(self.held.symmetric_difference(&decision.hold).cloned());
        let stats = prober.stats();
        if self.held.is_empty() && !decision.hold.is_empty() {
            stats
                .guard_trips
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        stats.guard_held.store(
            decision.hold.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if decision.trip != self.trip {
            let (held, suspects, at_stake) =
                (decision.hold.len(), decision.suspects, decision.at_stake);
            match &decision.trip {
                guard::Trip::Everywhere => tracing::warn!(
                    held,
                    suspects,
                    at_stake,
                    "mass-failure guard: most of every region's routable nodes failed their \
                     probes at once without an answer, unconfirmed by their own signals; the \
                     prober (or its network) is the likelier cause: holding their last state"
                ),
                guard::Trip::Regions(regions) => tracing::warn!(
                    ?regions,
                    held,
                    suspects,
                    at_stake,
                    "mass-failure guard: these regions' nodes failed their probes at once while \
                     other regions are fine: published as a data-center failure, but for the \
                     held nodes, which show life on their own"
                ),
                guard::Trip::Clear if self.trip != guard::Trip::Clear => tracing::info!(
                    still_held = held,
                    "mass-failure guard cleared: probe verdicts are published again (nodes \
                     still held go when their probes pass, or after a grace)"
                ),
                guard::Trip::Clear => {}
            }
        }
        self.held = decision.hold;
        self.trip = decision.trip;
    }

    /// The health to publish for node `id` (its probes' or, held, its last), given its last
    /// published entry `old`.
    fn health(&self, prober: &Prober, id: &str, old: Option<&Endpoint>) -> Option<NodeHealth> {
        if self.held.contains(id) {
            if let Some((_, before)) = self.moved.get(id) {
                return Some(before.clone());
            }
            return old.map(inherited_health);
        }
        // A node this replica has not probed yet (it was just elected, or the node is new)
        // keeps the health the table gives it: the previous leader's verdict. Otherwise every
        // new leader would publish the whole fleet unroutable until its first probes answer.
        prober.get(id).or_else(|| old.map(inherited_health))
    }

    /// Remembers a node its probes take out of the routing table by this pass.
    fn published(&mut self, id: &str, old: Option<&Endpoint>, new: &Endpoint, now: Instant) {
        if let Some(old) = old
            && matches!(old.health(), HealthState::Healthy | HealthState::Degraded)
            && new.health() == HealthState::Unhealthy
        {
            self.moved
                .insert(id.to_owned(), (now, inherited_health(old)));
        }
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
    let follow = Follow::start(store, changed);
    let mut inputs = Inputs::default();
    let now = Instant::now();
    let mut leading = Leading {
        clock: HashMap::new(),
        since: now,
        unsettled: BTreeSet::new(),
        full: true,
        sent: 0,
        guard: Guarded::default(),
    };
    let mut pacer = Pacer::new(now);
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
    // The first pass needs the whole registry, overrides, policies and load.
    while !follow.synced() {
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(RESYNC_INTERVAL) => {}
            _ = lost.wait_for(|l| *l) => return,
        }
    }
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
        let written = reconcile(
            store,
            prober,
            &follow,
            &mut inputs,
            &leadership.fence,
            &mut last,
            &mut leading,
        )
        .await;
        // Every transaction sent is charged, those of a failed batch and the retries too.
        let sent = std::mem::take(&mut leading.sent);
        if sent > 0 {
            pacer.spend(Instant::now(), sent);
        }
        match written {
            Ok(Written::Batch) => batch_end = Some(Instant::now()),
            Ok(Written::Nothing) => {}
            Ok(Written::Fenced) => {
                tracing::warn!("a fenced write was refused: another replica leads");
                return;
            }
            // Static stability: keep the last table (routers keep theirs) and try again. What
            // the store holds is unknown now (some transactions of the batch may have landed):
            // read it again, and compute every node against it, before the next batch.
            Err(e) => {
                tracing::warn!(error = %e, "control loop: store unavailable, keeping last state");
                if let Ok(t) = current_table(store).await {
                    last = t;
                }
                leading.full = true;
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

/// A pass that wrote nothing yet took this long is logged (at debug level) with its timing: a
/// change arriving meanwhile waits for it. Two milliseconds is several times what computing one
/// node's entry costs, and a tenth of scenario 4's change-to-ACK budget.
const SLOW_PASS: Duration = Duration::from_millis(2);

/// What one pass of the loop did.
enum Written {
    /// Wrote a batch.
    Batch,
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

/// A pass's changes to the table, by node id: the new entry, or `None` for a node gone.
type Changes = BTreeMap<String, Option<Endpoint>>;

/// The transactions of a batch that applies `changes` (and `policies`) to the table the store
/// holds (`last`): every changed or new entry written, every gone one deleted, and the commit
/// marker written in the last transaction. A batch that needs several transactions opens with
/// the pending marker and closes (with the commit) by deleting it. Empty when nothing changed
/// and `last` is committed.
fn batch(last: &Table, changes: &Changes, policies: &[ModelPolicy]) -> Vec<Vec<Op>> {
    let mut count = last.endpoints.len();
    let mut ops: Vec<Op> = Vec::with_capacity(changes.len() + 3);
    for (id, e) in changes {
        let held = last.endpoints.contains_key(id);
        match e {
            Some(e) => {
                count += usize::from(!held);
                ops.push(Op::Put {
                    key: keys::routing_node(id),
                    value: e.encode_to_vec(),
                });
            }
            None if held => {
                count -= 1;
                ops.push(Op::Delete {
                    key: keys::routing_node(id),
                });
            }
            None => {}
        }
    }
    if last.legacy {
        ops.push(Op::Delete {
            key: keys::LEGACY_ROUTING.to_owned(),
        });
    }
    if ops.is_empty() && last.policies == policies && !last.uncommitted {
        return vec![];
    }
    let commit = [
        Op::Put {
            key: keys::ROUTING_COMMIT.to_owned(),
            value: RoutingCommit {
                policies: policies.to_vec(),
                endpoints: count as u64,
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

/// One pass: apply what changed in the store and the probes, compute the entries of the nodes
/// it concerns (every node on a full pass), and write those that changed (fenced). On success
/// `last` is the table the store holds.
async fn reconcile(
    store: &SharedStore,
    prober: &Prober,
    follow: &Follow,
    inputs: &mut Inputs,
    fence: &Fence,
    last: &mut Table,
    leading: &mut Leading,
) -> Result<Written, Error> {
    let pass_started = Instant::now();
    let moving = std::mem::take(&mut leading.unsettled);
    let mut dirty = moving.clone();
    let maybe_orphans = inputs.update(follow, prober, &mut dirty);
    let full = std::mem::take(&mut leading.full);
    if full {
        dirty.extend(inputs.specs.keys().cloned());
        dirty.extend(last.endpoints.keys().cloned());
    }
    // Overrides of nodes that left without `deregister` (a lease expired) go with them.
    if maybe_orphans || full {
        let orphans: Vec<(String, i64)> = follow.overrides.with(|kvs| {
            kvs.values()
                .filter(|kv| {
                    overrides::node_of(&kv.key).is_some_and(|id| !inputs.specs.contains_key(id))
                })
                .map(|kv| (kv.key.clone(), kv.mod_revision))
                .collect()
        });
        if !orphans.is_empty() {
            let found = orphans.iter().map(|(k, r)| (k.as_str(), *r));
            let registered = |id: &str| inputs.specs.contains_key(id);
            if let Err(e) = overrides::remove_orphans_of(
                store.as_ref(),
                found,
                registered,
                inputs.registry_revision,
            )
            .await
            {
                tracing::warn!(error = %e, "cannot remove the overrides of nodes that left; retrying");
                // Look again next pass.
                follow.overrides.touch_all();
            }
        }
    }
    let now = Instant::now();
    leading.guard.pass(prober, inputs, last, now, &mut dirty);
    let mut changes = Changes::new();
    for id in &dirty {
        let Some(spec) = inputs.specs.get(id) else {
            if last.endpoints.contains_key(id) {
                changes.insert(id.clone(), None);
            }
            continue;
        };
        let old = last.endpoints.get(id);
        let health = leading.guard.health(prober, id, old);
        let clock = leading.clock.get(id).copied().unwrap_or(leading.since);
        let mut elapsed = now.saturating_duration_since(clock);
        if !moving.contains(id) {
            elapsed = elapsed.min(MAX_DAMP_STEP);
        }
        let (e, settled) = table::endpoint(&table::NodeInputs {
            spec,
            health: health.as_ref(),
            overrides: &inputs.overrides,
            load: inputs.load.get(id),
            medians: &inputs.medians,
            previous: old.map(|e| e.weight),
            elapsed,
        });
        if settled {
            leading.clock.insert(id.clone(), now);
        } else {
            leading.unsettled.insert(id.clone());
        }
        if old != Some(&e) {
            leading.guard.published(id, old, &e, now);
            changes.insert(id.clone(), Some(e));
        }
    }
    let txns = batch(last, &changes, &inputs.policies);
    let computed_in = pass_started.elapsed();
    if txns.is_empty() {
        // Passes over many nodes that change nothing (load sums moving within the hysteresis)
        // are what a change may queue behind: their cost shows at debug level.
        if dirty.len() >= 100 || computed_in >= SLOW_PASS {
            tracing::debug!(
                computed = dirty.len(),
                computed_ms = computed_in.as_secs_f64() * 1e3,
                "pass wrote nothing"
            );
        }
        return Ok(Written::Nothing);
    }
    let count = txns.len();
    let mut version = 0;
    for (i, ops) in txns.into_iter().enumerate() {
        match write_txn(store, fence, ops, &mut leading.sent).await? {
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
    let written = changes.len();
    for (id, e) in changes {
        match e {
            Some(e) => {
                if last
                    .endpoints
                    .get(&id)
                    .is_none_or(|old| old.weight != e.weight)
                {
                    leading.clock.insert(id.clone(), now);
                }
                last.endpoints.insert(id, e);
            }
            None => {
                leading.clock.remove(&id);
                last.endpoints.remove(&id);
            }
        }
    }
    last.policies = inputs.policies.clone();
    last.uncommitted = false;
    last.legacy = false;
    tracing::debug!(
        version,
        txns = count,
        nodes = last.endpoints.len(),
        computed = dirty.len(),
        written,
        full,
        computed_ms = computed_in.as_secs_f64() * 1e3,
        pass_ms = pass_started.elapsed().as_secs_f64() * 1e3,
        "routing table written"
    );
    Ok(Written::Batch)
}

/// Most times one transaction of a batch is sent before the batch is given up. A transaction
/// that times out (etcd slow, not down: a starved machine, a long fsync) usually lands at the
/// next try; giving the whole batch up instead means reading the table again and writing every
/// difference in a new batch, which on a slow etcd fails again the same way, for minutes, while
/// nothing is committed. Three tries ride out a few seconds of a slow store; a store that is
/// down fails the batch within about ten seconds (three request timeouts and two pauses), and
/// the loop keeps the last table as before.
const TXN_ATTEMPTS: u32 = 3;

/// Pause before sending a transaction again: long enough not to add to a store that is
/// struggling, short against the request timeout (3 s) that made it fail.
const TXN_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Sends one transaction of a batch, fenced, trying again (the same operations) after a store
/// error up to [`TXN_ATTEMPTS`] times; counts every send in `sent` (the pacer charges them).
///
/// Sending it again is safe: every operation is a put or a delete of a value this batch
/// decided, so a transaction that landed although its answer was lost lands the same state
/// again, and the fence still refuses it once another replica leads.
async fn write_txn(
    store: &SharedStore,
    fence: &Fence,
    ops: Vec<Op>,
    sent: &mut usize,
) -> Result<Option<i64>, Error> {
    let mut attempt = 1;
    loop {
        *sent += 1;
        match store.txn_fenced(fence, ops.clone()).await {
            Ok(r) => return Ok(r),
            Err(e @ StoreError::Unavailable(_)) if attempt < TXN_ATTEMPTS => {
                tracing::info!(error = %e, attempt, "a transaction of the routing table failed; sending it again");
                attempt += 1;
                tokio::time::sleep(TXN_RETRY_PAUSE).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{KeyValue, WatchStream};
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

    /// The batch taking the store from `last` to `next`.
    fn batch_to(last: &Table, next: &Table) -> Vec<Vec<Op>> {
        let mut changes: Changes = next
            .endpoints
            .iter()
            .filter(|(id, e)| last.endpoints.get(*id) != Some(*e))
            .map(|(id, e)| (id.clone(), Some(e.clone())))
            .collect();
        for id in last.endpoints.keys() {
            if !next.endpoints.contains_key(id) {
                changes.insert(id.clone(), None);
            }
        }
        batch(last, &changes, &next.policies)
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
        let txns = batch_to(&last, &next);
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
        let Op::Put { value, .. } = &txns[0][2] else {
            panic!("no commit")
        };
        assert_eq!(
            RoutingCommit::decode(value.as_slice()).unwrap().endpoints,
            9
        );
        assert!(
            batch_to(&next, &next).is_empty(),
            "nothing changed, nothing written"
        );
    }

    #[test]
    fn a_large_change_is_bounded_transactions_opened_and_closed_by_markers() {
        let last = table(1000, 1.0);
        let next = table(1000, 2.0);
        let txns = batch_to(&last, &next);
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
        let txns = batch_to(&last, &next);
        let keys: Vec<&str> = txns.iter().flatten().map(key).collect();
        assert_eq!(keys, [keys::ROUTING_COMMIT, keys::ROUTING_PENDING]);
        last.uncommitted = false;
        last.legacy = true;
        let keys: Vec<String> = batch_to(&last, &next)
            .iter()
            .flatten()
            .map(|op| key(op).to_owned())
            .collect();
        assert_eq!(keys[0], keys::LEGACY_ROUTING);
    }

    /// An in-memory store whose next `failures` transactions fail as if they timed out, after
    /// landing when `land` (the answer was lost, not the write).
    #[derive(Debug)]
    struct Flaky {
        inner: crate::store::embedded::EmbeddedStore,
        failures: std::sync::atomic::AtomicU32,
        land: bool,
    }

    #[async_trait::async_trait]
    impl crate::store::Store for Flaky {
        async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
            self.inner.list(prefix).await
        }
        async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError> {
            self.inner.put(key, value).await
        }
        async fn compare_and_put(
            &self,
            key: &str,
            expected: i64,
            value: Vec<u8>,
        ) -> Result<Option<i64>, StoreError> {
            self.inner.compare_and_put(key, expected, value).await
        }
        async fn delete(&self, key: &str) -> Result<Option<i64>, StoreError> {
            self.inner.delete(key).await
        }
        async fn compare_and_delete(
            &self,
            key: &str,
            expected: i64,
        ) -> Result<Option<i64>, StoreError> {
            self.inner.compare_and_delete(key, expected).await
        }
        async fn watch(&self, prefix: &str, after: i64) -> Result<WatchStream, StoreError> {
            self.inner.watch(prefix, after).await
        }
        async fn campaign(
            &self,
            name: &str,
            who: &str,
            ttl: Duration,
        ) -> Result<Leadership, StoreError> {
            self.inner.campaign(name, who, ttl).await
        }
        async fn resign(&self, leadership: Leadership) -> Result<(), StoreError> {
            self.inner.resign(leadership).await
        }
        async fn put_fenced(
            &self,
            fence: &Fence,
            key: &str,
            value: Vec<u8>,
        ) -> Result<Option<i64>, StoreError> {
            self.inner.put_fenced(fence, key, value).await
        }
        async fn txn_fenced(&self, fence: &Fence, ops: Vec<Op>) -> Result<Option<i64>, StoreError> {
            use std::sync::atomic::Ordering;
            let fail = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if !fail {
                return self.inner.txn_fenced(fence, ops).await;
            }
            if self.land {
                self.inner.txn_fenced(fence, ops).await?;
            }
            Err(StoreError::Unavailable("request timed out".into()))
        }
        async fn leader(&self, name: &str) -> Result<Option<String>, StoreError> {
            self.inner.leader(name).await
        }
        async fn grant_lease(&self, ttl: Duration) -> Result<i64, StoreError> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
            self.inner.revoke_lease(lease).await
        }
        async fn put_with_lease(
            &self,
            key: &str,
            value: Vec<u8>,
            lease: i64,
        ) -> Result<i64, StoreError> {
            self.inner.put_with_lease(key, value, lease).await
        }
        async fn compare_and_put_with_lease(
            &self,
            key: &str,
            expected: i64,
            value: Vec<u8>,
            lease: i64,
        ) -> Result<Option<i64>, StoreError> {
            self.inner
                .compare_and_put_with_lease(key, expected, value, lease)
                .await
        }
    }

    fn flaky(failures: u32, land: bool) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner: crate::store::embedded::EmbeddedStore::in_memory(),
            failures: failures.into(),
            land,
        })
    }

    fn put(key: &str) -> Vec<Op> {
        vec![Op::Put {
            key: key.to_owned(),
            value: b"v".to_vec(),
        }]
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_transaction_is_sent_again_not_the_whole_batch() {
        for land in [false, true] {
            let f = flaky(TXN_ATTEMPTS - 1, land);
            let store: SharedStore = f.clone();
            let l = store
                .campaign(ELECTION, "r", Duration::from_secs(3))
                .await
                .unwrap();
            let mut sent = 0;
            let rev = write_txn(&store, &l.fence, put("/k"), &mut sent)
                .await
                .unwrap();
            assert!(
                rev.is_some(),
                "written at the last attempt (landed before: {land})"
            );
            assert_eq!(sent, TXN_ATTEMPTS as usize, "every attempt is charged");
            assert!(store.get("/k").await.unwrap().is_some());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_transaction_failing_every_attempt_fails_the_batch() {
        let store: SharedStore = flaky(TXN_ATTEMPTS, false);
        let l = store
            .campaign(ELECTION, "r", Duration::from_secs(3))
            .await
            .unwrap();
        let mut sent = 0;
        let r = write_txn(&store, &l.fence, put("/k"), &mut sent).await;
        assert!(
            matches!(r, Err(Error::Store(StoreError::Unavailable(_)))),
            "{r:?}"
        );
        assert_eq!(sent, TXN_ATTEMPTS as usize);
        assert!(store.get("/k").await.unwrap().is_none(), "nothing written");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_the_leadership_is_lost_is_refused_by_the_fence() {
        // The first attempt fails; by the second, this replica no longer leads.
        let f = flaky(1, false);
        let store: SharedStore = f.clone();
        let l = store
            .campaign(ELECTION, "r", Duration::from_secs(3))
            .await
            .unwrap();
        let fence = l.fence.clone();
        store.resign(l).await.unwrap();
        let _successor = store
            .campaign(ELECTION, "s", Duration::from_secs(3))
            .await
            .unwrap();
        let mut sent = 0;
        let r = write_txn(&store, &fence, put("/k"), &mut sent)
            .await
            .unwrap();
        assert_eq!(r, None, "fenced");
        assert_eq!(sent, 2);
        assert!(store.get("/k").await.unwrap().is_none());
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

    /// A node registered and gone between two passes, never held by this leader, still makes
    /// the pass look for orphaned overrides: an earlier pass may have seen its overrides before
    /// the registry's watch delivered its registration, and spared them (the self-registration
    /// test `a_leaving_node_takes_its_overrides_along` failed that way once, at start-up).
    #[tokio::test]
    async fn a_node_that_came_and_went_between_passes_is_checked_for_orphans() {
        let store: SharedStore = Arc::new(crate::store::embedded::EmbeddedStore::in_memory());
        let changed = Arc::new(Notify::new());
        let follow = Follow::start(&store, &changed);
        let prober = Prober::new(
            crate::health::prober::ProbeConfig::default(),
            changed.clone(),
        );
        let mut inputs = Inputs::default();
        let spec = |id: &str| NodeSpec {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            region: "a".into(),
            models: vec![fulcrum_proto::fulcrum::v1::Model {
                name: "m".into(),
                versions: vec![],
            }],
            capacity: 1,
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !follow.synced() {
            assert!(Instant::now() < deadline, "mirrors never synced");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!inputs.update(&follow, &prober, &mut BTreeSet::new()));

        registry::register(store.as_ref(), &spec("gone"))
            .await
            .unwrap();
        store.delete(&keys::node("gone")).await.unwrap();
        // A marker node after it: once the mirror holds it, it has seen both events.
        registry::register(store.as_ref(), &spec("marker"))
            .await
            .unwrap();
        while !follow
            .nodes
            .with(|kvs| kvs.contains_key(&keys::node("marker")))
        {
            assert!(Instant::now() < deadline, "the mirror never saw the marker");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut dirty = BTreeSet::new();
        assert!(
            inputs.update(&follow, &prober, &mut dirty),
            "a node that left unseen did not make the pass look for orphans"
        );
        assert!(dirty.contains("gone") && inputs.specs.contains_key("marker"));
        assert!(!inputs.specs.contains_key("gone"));
    }
}
