//! The router's shared state, and the one function that turns a model name into a node:
//! [`RouterState::pick`]. It builds the candidates of the model's nodes (weights from the
//! control plane; in-flight calls, latency, outlier state and limits from this router), applies
//! the spill-over rule between regions, and lets the model's balancing policy choose. A request
//! of a Triton sequence is placed by [`RouterState::pick_sequence`] instead: on the node that
//! holds the sequence.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;

use crate::balance::locality::{self, Tier};
use crate::balance::{self, Candidate, Policy};
use crate::endpoint::outlier::CONSECUTIVE_FAILURES;
use crate::endpoint::{InFlight, NodeConn, now_ns};
use crate::error::RouteError;
use crate::ingress::forward::Sequence;
use crate::priority::Priority;
use crate::queue::{MAX_QUEUE_WAIT, Place, WaitQueue, Waited, admit_wait, drain_rate};
use crate::table::{ModelRoute, RoutedNode, RoutingTable};

/// Most nodes of one region that may be ejected at once, as a share: half, so outlier ejection
/// can never empty a region by itself (a region whose every node fails is left through the
/// spill-over rule instead, which counts failing nodes as unavailable).
pub const MAX_EJECTED_SHARE: f64 = 0.5;

/// How long a router remembers the node of a Triton sequence that sent nothing: ten minutes,
/// far beyond Triton's default idle timeout for a sequence (one second): forgetting one still
/// open would cut it when its node is draining; remembering one the node already dropped
/// costs an entry.
const SEQUENCE_IDLE: Duration = Duration::from_secs(600);

/// Most sequences a router remembers: bounds the memory clients can make it hold (an entry
/// is a few dozen bytes); a sequence forgotten early falls back to rendezvous hashing, which
/// sends it to the same node unless that node is draining.
const MAX_SEQUENCES: u64 = 1 << 20;

/// A node chosen for one attempt, with the slot it holds.
#[derive(Debug)]
pub struct Picked {
    /// The node as this table sees it.
    pub node: RoutedNode,
    /// The in-flight slot taken on it.
    pub slot: InFlight,
}

/// State shared by the router's services and its subscription.
#[derive(Debug)]
pub struct RouterState {
    /// The region this router serves; its nodes come first.
    pub region: String,
    /// The current table; replaced whole on every update.
    pub table: ArcSwap<RoutingTable>,
    /// Largest message accepted from clients and from nodes.
    pub max_message_size: usize,
    /// Calls waiting for a slot; every node's connection hands its freed slots to it.
    pub queue: Arc<WaitQueue>,
    /// Marked changed whenever a new table is stored (serving threads then connect to its
    /// nodes ahead of calls).
    pub table_updates: tokio::sync::watch::Sender<()>,
    /// Whether a table from the control plane was ever applied.
    applied: std::sync::atomic::AtomicBool,
    /// The node each open Triton sequence went to (sequence key → node id), so that a drained
    /// node keeps its sequences to their end ([`RouterState::pick_sequence`]).
    sequences: moka::sync::Cache<u64, Arc<str>>,
    /// Answers kept for the models whose policy caches them.
    pub cache: crate::cache::ResponseCache,
    /// The cache's shared level, when the router has one ([`crate::shared_cache`]).
    pub shared_cache: Option<Arc<crate::shared_cache::SharedCache>>,
    /// The batches taking calls ([`crate::batch`]).
    pub batcher: crate::batch::Batcher,
    /// Caller authentication, when the router checks tokens ([`crate::auth`]).
    pub auth: Option<Arc<crate::auth::CallerAuth>>,
    /// Calls made in the background for `fulcrum.v1.Tasks` ([`crate::tasks`]).
    pub tasks: Arc<crate::tasks::TaskStore>,
    /// Other routers, asked for the tasks they hold ([`crate::peers`]); none: not asked.
    pub peers: Option<Arc<crate::peers::Peers>>,
}

impl RouterState {
    /// A router state with an empty table.
    pub fn new(region: String, max_message_size: usize) -> Self {
        Self {
            region,
            table: ArcSwap::from_pointee(RoutingTable::default()),
            max_message_size,
            queue: Arc::default(),
            table_updates: tokio::sync::watch::Sender::new(()),
            applied: std::sync::atomic::AtomicBool::new(false),
            sequences: moka::sync::Cache::builder()
                .max_capacity(MAX_SEQUENCES)
                .time_to_idle(SEQUENCE_IDLE)
                .build(),
            cache: crate::cache::ResponseCache::default(),
            shared_cache: None,
            batcher: crate::batch::Batcher::default(),
            auth: None,
            tasks: Arc::new(crate::tasks::TaskStore::new(
                "router",
                crate::tasks::TaskLimits::default(),
            )),
            peers: None,
        }
    }

    /// Whether the caller of a request with `extensions` may call `model`: always, unless the
    /// router checks tokens and the caller's does not list it ([`crate::auth`]).
    pub fn check_model(
        &self,
        extensions: &http::Extensions,
        model: &str,
    ) -> Result<(), crate::error::AuthError> {
        match &self.auth {
            Some(auth) => auth.check_model(extensions, model),
            None => Ok(()),
        }
    }

    /// Makes `table` the current table.
    pub fn set_table(&self, table: RoutingTable) {
        let more_room = table.more_room || table.routable_nodes > self.table.load().routable_nodes;
        self.table.store(Arc::new(table));
        self.applied
            .store(true, std::sync::atomic::Ordering::Release);
        self.table_updates.send_replace(());
        if more_room {
            // Limits rose or nodes came back: waiting calls look again.
            self.queue.wake_all();
        }
    }

    /// Whether the router holds a table from the control plane (it has applied one, however
    /// old or empty).
    pub fn has_table(&self) -> bool {
        self.applied.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Picks a node for a call to `model`, avoiding `tried`, and takes a slot on it.
    /// `key` is the affinity hash for consistent hashing.
    pub fn pick(
        &self,
        table: &RoutingTable,
        model: &str,
        tried: &[Arc<NodeConn>],
        key: Option<u64>,
    ) -> Result<Picked, RouteError> {
        let route = table
            .models
            .get(model)
            .ok_or_else(|| RouteError::UnknownModel(model.to_owned()))?;
        let no_node = || RouteError::NoHealthyNode {
            model: model.to_owned(),
            region: self.region.clone(),
            version: table.version,
        };
        let panic = !route.is_routable() && route.settings.panic_mode;
        if !route.is_routable() && !panic {
            return Err(no_node());
        }
        let now = now_ns();
        let now_ms = now / 1_000_000;
        let was_tried = |n: &RoutedNode| tried.iter().any(|t| Arc::ptr_eq(t, &n.conn));
        let weight = |n: &RoutedNode| match (n.routable, panic) {
            (true, _) => n.weight,
            (false, true) => n.capacity,
            (false, false) => 0.0,
        };
        // Candidates ignoring limits, then with them: tells "all full" from "none at all".
        let build = |nodes: &[RoutedNode], with_limits: bool| -> Vec<Candidate> {
            nodes
                .iter()
                .map(|n| Candidate {
                    weight: weight(n),
                    capacity: n.capacity,
                    in_flight: n.conn.in_flight(),
                    latency_ms: n.conn.latency.estimate_ms(now),
                    excluded: was_tried(n)
                        || n.conn.is_out(now_ms)
                        || (with_limits && n.conn.is_full()),
                })
                .collect()
        };
        let mut rng = rand::rng();
        // A slot can be taken by another call between the candidates and the pick: try again.
        for _ in 0..4 {
            let local = build(&route.local, true);
            let remote = build(&route.remote, true);
            let any = |c: &[Candidate]| c.iter().any(Candidate::eligible);
            if !any(&local) && !any(&remote) {
                let unlimited = |nodes: &[RoutedNode]| any(&build(nodes, false));
                return Err(if unlimited(&route.local) || unlimited(&route.remote) {
                    RouteError::AllNodesBusy {
                        model: model.to_owned(),
                    }
                } else {
                    no_node()
                });
            }
            let share = self.local_share(route, now, now_ms, panic);
            let tier = locality::tier(share, any(&local), any(&remote), rng.random());
            let (nodes, cands, which) = match tier {
                Some(Tier::Local) => (&route.local, &local, 0),
                Some(Tier::Remote) => (&route.remote, &remote, 1),
                None => return Err(no_node()),
            };
            let i = self
                .pick_in(route, cands, which, key, &mut rng)
                .ok_or_else(no_node)?;
            let node = nodes[i].clone();
            if let Some(slot) = node.conn.try_start_call() {
                return Ok(Picked { node, slot });
            }
        }
        Err(RouteError::AllNodesBusy {
            model: model.to_owned(),
        })
    }

    /// Picks the node for a request of a Triton `sequence`, avoiding `tried`, and takes a slot
    /// on it. Every request of a sequence must reach the node holding its state:
    /// - a request that starts a sequence goes to its node by [`balance::rendezvous`] over the
    ///   model's routable nodes of one region (this router's own while any is routable, else
    ///   the other's), and the router remembers that node for the sequence;
    /// - a later request goes to the node remembered, as long as that node still serves the
    ///   model, weight 0 included: a drained node finishes the sequences it holds and gets no
    ///   new ones; a sequence this router does not know (started through another router, or
    ///   forgotten) goes where rendezvous hashing sends it, the node it started on unless that
    ///   node has left since;
    /// - load, weights and the spill-over share play no part (they change all the time; a
    ///   sequence must not move with them). A node that leaves (unhealthy, ejected,
    ///   deregistered) takes its sequences with it: their next request goes to another node,
    ///   which refuses it for want of a start, as Triton does.
    ///
    /// When the sequence's node is at its concurrency limit the call waits for it
    /// ([`RouteError::AllNodesBusy`]), never goes elsewhere. An ending request is forgotten.
    pub fn pick_sequence(
        &self,
        table: &RoutingTable,
        model: &str,
        tried: &[Arc<NodeConn>],
        sequence: Sequence,
    ) -> Result<Picked, RouteError> {
        let route = table
            .models
            .get(model)
            .ok_or_else(|| RouteError::UnknownModel(model.to_owned()))?;
        let panic = !route.is_routable() && route.settings.panic_mode;
        let now_ms = now_ns() / 1_000_000;
        let open = |n: &RoutedNode| {
            !tried.iter().any(|t| Arc::ptr_eq(t, &n.conn)) && !n.conn.is_out(now_ms)
        };
        let all = || route.local.iter().chain(&route.remote);
        let remembered = (!sequence.start)
            .then(|| self.sequences.get(&sequence.key))
            .flatten()
            .and_then(|id| {
                all()
                    .find(|n| *n.conn.id == *id && n.serving && open(n))
                    .cloned()
            });
        // A sequence found in memory stays there (the look-up renewed its idle time); one
        // placed afresh is remembered below.
        let (node, known) = match remembered {
            Some(node) => (node, true),
            None => {
                let members = |nodes: &[RoutedNode]| -> Vec<balance::rendezvous::Member> {
                    nodes
                        .iter()
                        .map(|n| balance::rendezvous::Member {
                            id_hash: balance::ring::hash(n.conn.id.as_bytes()),
                            capacity: n.capacity,
                            eligible: (n.routable || panic) && open(n),
                        })
                        .collect()
                };
                let picked = [&route.local, &route.remote].into_iter().find_map(|nodes| {
                    balance::rendezvous::pick(&members(nodes), sequence.key)
                        .map(|i| nodes[i].clone())
                });
                let node = picked.ok_or_else(|| RouteError::NoHealthyNode {
                    model: model.to_owned(),
                    region: self.region.clone(),
                    version: table.version,
                })?;
                (node, false)
            }
        };
        let slot = node
            .conn
            .try_start_call()
            .ok_or_else(|| RouteError::AllNodesBusy {
                model: model.to_owned(),
            })?;
        if sequence.end {
            self.sequences.invalidate(&sequence.key);
        } else if !known {
            self.sequences
                .insert(sequence.key, Arc::from(node.conn.id.as_str()));
        }
        Ok(Picked { node, slot })
    }

    fn pick_in(
        &self,
        route: &ModelRoute,
        cands: &[Candidate],
        which: usize,
        key: Option<u64>,
        rng: &mut impl Rng,
    ) -> Option<usize> {
        let policy = route.settings.balancer;
        if policy == Policy::RoundRobin {
            let mut states = route
                .round_robin
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let state = if which == 0 {
                &mut states.0
            } else {
                &mut states.1
            };
            return balance::pick(policy, cands, state, None, key, rng);
        }
        let ring = route
            .rings
            .as_ref()
            .map(|(l, r)| if which == 0 { l } else { r });
        balance::pick(policy, cands, &mut Default::default(), ring, key, rng)
    }

    /// The share of calls the local region takes now (Envoy's rule, ramped up gradually).
    fn local_share(&self, route: &ModelRoute, now_ns: u64, now_ms: u64, panic: bool) -> f64 {
        let total: f64 = route.local.iter().map(|n| n.capacity).sum();
        // Capacity, not weight: weights also carry load (a busy node's weight is lowered), and
        // a busy region is still an available one; its load is balanced call by call.
        let available: f64 = route
            .local
            .iter()
            .filter(|n| {
                (n.routable || panic)
                    && !n.conn.outlier.is_failing(now_ms)
                    && !n.conn.reconnect.is_paused(now_ms)
            })
            .map(|n| n.capacity)
            .sum();
        let target = locality::local_share(available, total, route.settings.overprovisioning);
        let (previous, stamp) = route.state.share.get();
        let elapsed = now_ns.saturating_sub(stamp) as f64 / 1e9;
        let applied = locality::ramp(previous, target, elapsed, locality::RECOVERY_RATE_PER_SEC);
        if applied != previous || elapsed > 1.0 {
            route.state.share.set(applied, now_ns);
        }
        applied
    }

    /// Records a failed call on `node`; ejects it when its failure streak makes it an outlier
    /// and its region is not already at the ejection cap.
    pub fn node_failed(&self, table: &RoutingTable, node: &NodeConn, streak: u32) {
        if streak < CONSECUTIVE_FAILURES {
            return;
        }
        let now_ms = now_ns() / 1_000_000;
        let peers = table.nodes.values().filter(|n| n.region == node.region);
        let (count, ejected) = peers.fold((0usize, 0usize), |(c, e), n| {
            (c + 1, e + usize::from(n.outlier.is_ejected(now_ms)))
        });
        if ((ejected + 1) as f64) <= MAX_EJECTED_SHARE * count as f64 {
            let t = node.outlier.eject(now_ms);
            tracing::warn!(node = %node.id, region = %node.region, ejection = ?t,
                "node ejected after {streak} consecutive failures");
        }
    }

    /// Waits up to `wait` (at most [`MAX_QUEUE_WAIT`]) for a slot on one of the nodes a call
    /// of `priority` to `model` could use (routable, not in `tried`), in line behind the calls
    /// of its priority that queued before it and every call of higher priority
    /// ([`crate::queue`]); [`Waited::Woken`] when it may pick again. `place` keeps the call's
    /// place between waits.
    ///
    /// A call joining the queue is shed at once ([`Waited::QueueFull`]) when the calls ahead of
    /// it (those of its priority or higher waiting for any of its nodes) would take longer than
    /// [`admit_wait`] (half a second; a quarter for sheddable calls) to drain at the rate its
    /// nodes finish calls, less what calls above it take: fast shedding, and a
    /// queue whose length follows the nodes' speed rather than a fixed count.
    pub async fn wait_for_slot(
        &self,
        table: &RoutingTable,
        model: &str,
        tried: &[Arc<NodeConn>],
        wait: Duration,
        priority: Priority,
        place: &mut Place,
    ) -> Waited {
        let Some(route) = table.models.get(model) else {
            return Waited::QueueFull;
        };
        let panic = !route.is_routable() && route.settings.panic_mode;
        let nodes: Vec<Arc<NodeConn>> = route
            .local
            .iter()
            .chain(&route.remote)
            .filter(|n| n.routable || panic)
            .filter(|n| !tried.iter().any(|t| Arc::ptr_eq(t, &n.conn)))
            .map(|n| n.conn.clone())
            .collect();
        let mut drain_per_sec = None;
        if !place.has_queued() {
            let now = now_ns();
            // How fast slots free up: each node's mean slot hold time (its peak latency
            // estimate before any call has ended there).
            drain_per_sec = drain_rate(nodes.iter().map(|n| {
                let hold = n.hold.mean_ms();
                (
                    n.in_flight(),
                    hold.unwrap_or_else(|| n.latency.estimate_ms(now)),
                )
            }));
            // Calls of higher priority overtake this one: it drains at the rate of freed slots
            // they leave it (all of them when none queue).
            let in_line = self.queue.waiting_for(&nodes, priority) as f64 + 1.0;
            if drain_per_sec.is_some_and(|rate| {
                let left = self.queue.rate_left_for(priority, rate);
                left <= 0.0 || in_line / left > admit_wait(priority).as_secs_f64()
            }) {
                return Waited::QueueFull;
            }
        }
        let wait = wait.min(MAX_QUEUE_WAIT);
        self.queue
            .wait(place, priority, nodes, wait, drain_per_sec)
            .await
    }
}

#[cfg(test)]
impl RouterState {
    /// A router of region `a` holding `endpoints` and `policy` as its first table (for tests).
    pub(crate) fn with_table(
        endpoints: Vec<fulcrum_proto::fulcrum::v1::Endpoint>,
        policy: fulcrum_proto::fulcrum::v1::ModelPolicy,
    ) -> Self {
        let state = RouterState::new("a".into(), 1 << 20);
        let update = fulcrum_proto::fulcrum::v1::RoutingUpdate {
            version: 1,
            snapshot: true,
            endpoints,
            policies: vec![policy],
            ..Default::default()
        };
        let table =
            RoutingTable::build(&update, "a", &RoutingTable::default(), &state.queue).unwrap();
        state.table.store(Arc::new(table));
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::{Endpoint, HealthState, Model, ModelPolicy, NodeSpec};

    fn endpoint(id: &str, region: &str, health: HealthState) -> Endpoint {
        let routable = health == HealthState::Healthy;
        Endpoint {
            spec: Some(NodeSpec {
                id: id.into(),
                address: format!("127.0.0.1:{}", 9000 + id.len()),
                region: region.into(),
                models: vec![Model {
                    name: "m".into(),
                    versions: vec![],
                }],
                capacity: 4,
                ..Default::default()
            }),
            health: health as i32,
            weight: if routable { 4.0 } else { 0.0 },
            ready_models: if routable { vec!["m".into()] } else { vec![] },
        }
    }

    fn state_with(endpoints: Vec<Endpoint>, panic_mode: bool) -> RouterState {
        RouterState::with_table(
            endpoints,
            ModelPolicy {
                model: "m".into(),
                panic_mode,
                ..Default::default()
            },
        )
    }

    #[tokio::test]
    async fn fails_closed_by_default_and_panics_only_when_asked() {
        let down = vec![endpoint("a1", "a", HealthState::Unhealthy)];
        let state = state_with(down.clone(), false);
        let table = state.table.load();
        assert!(matches!(
            state.pick(&table, "m", &[], None),
            Err(RouteError::NoHealthyNode { .. })
        ));
        let state = state_with(down, true);
        let table = state.table.load();
        let picked = state
            .pick(&table, "m", &[], None)
            .expect("panic mode routes anyway");
        assert_eq!(picked.node.conn.id, "a1");
        // Panic mode is for when nothing is healthy: a healthy node anywhere is preferred.
        let state = state_with(
            vec![
                endpoint("a1", "a", HealthState::Unhealthy),
                endpoint("b1", "b", HealthState::Healthy),
            ],
            true,
        );
        let table = state.table.load();
        for _ in 0..50 {
            assert_eq!(
                state.pick(&table, "m", &[], None).unwrap().node.conn.id,
                "b1"
            );
        }
    }

    #[tokio::test]
    async fn unknown_models_and_full_nodes_have_their_own_errors() {
        let state = state_with(vec![endpoint("a1", "a", HealthState::Healthy)], false);
        let table = state.table.load();
        assert!(matches!(
            state.pick(&table, "nope", &[], None),
            Err(RouteError::UnknownModel(_))
        ));
        // Fill the node's six slots (capacity 4, limit 1.5×): the next pick is "all busy", not
        // "no healthy node".
        let slots: Vec<_> = (0..6)
            .map(|_| state.pick(&table, "m", &[], None).unwrap())
            .collect();
        assert!(matches!(
            state.pick(&table, "m", &[], None),
            Err(RouteError::AllNodesBusy { .. })
        ));
        drop(slots);
        assert!(state.pick(&table, "m", &[], None).is_ok());
    }
}
