//! The router's routing table: an immutable snapshot built from the control plane's update,
//! swapped in atomically (`ArcSwap`) so the call path never takes a lock.
//!
//! What must outlive a table is carried from one to the next: each node's pooled
//! [`NodeConn`] (connection, in-flight calls, latency, outlier state) while its address is
//! unchanged, and each model's retry budget, spill share and latency window.
//!
//! Where a node's weight comes from is the router's [`LoadView`]: the control plane's weight
//! (capacity folded with the load every router reports: the global view, the default), or the
//! node's registered capacity alone (the local view: the router balances on its own in-flight
//! calls and latency only). Either way a node the control plane does not route to weighs zero.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{Endpoint as NodeEndpoint, HealthState, RoutingUpdate};
use tower::retry::budget::TpsBudget;

use crate::balance::PolicyState;
use crate::balance::ring::Ring;
use crate::endpoint::NodeConn;
use crate::hedge::LatencyWindow;
use crate::policy::ModelSettings;
use crate::queue::WaitQueue;

/// Retry budget: retries may add at most 20 % to a model's calls (the default, and
/// Linkerd's), with a floor of 10 retries a second so a quiet model can still retry, measured
/// over 10 seconds.
const RETRY_PERCENT: f32 = 0.2;
const RETRY_MIN_PER_SEC: u32 = 10;
const RETRY_TTL: Duration = Duration::from_secs(10);

/// Which view of the fleet's load a router's weights follow (`fulcrum router --load-view`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadView {
    /// The control plane's weights: capacity, health and the load all routers report (their
    /// calls in flight, latency and errors per node, and what nodes say of themselves), damped.
    #[default]
    Global,
    /// The node's registered capacity instead of the control plane's weight: the router
    /// balances on what it sees itself (its own calls in flight and latency per node). A node
    /// the control plane does not route to (unhealthy, drained, cordoned, weight 0) still gets
    /// no calls; an operator's weight override and the halved weight of a degraded node are
    /// not applied (an override of 0 still takes the node out). For comparing the two views (benchmark scenario 5), and for a router that
    /// should not follow load it cannot see.
    Local,
}

impl LoadView {
    /// The weight a routable node gets in this view, from the control plane's `weight` and the
    /// node's registered `capacity`. A node registered without a capacity (which the control
    /// plane refuses) keeps the control plane's weight.
    pub fn weight(self, weight: f64, capacity: i64) -> f64 {
        match self {
            LoadView::Local if capacity > 0 => capacity as f64,
            _ => weight,
        }
    }

    /// The flag's spelling: `global` or `local`.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadView::Global => "global",
            LoadView::Local => "local",
        }
    }
}

impl std::str::FromStr for LoadView {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "global" => Ok(LoadView::Global),
            "local" => Ok(LoadView::Local),
            other => Err(format!(
                "unknown load view {other:?}: expected `global` or `local`"
            )),
        }
    }
}

impl std::fmt::Display for LoadView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node in one table: its pooled connection plus what this table says about it.
#[derive(Debug, Clone)]
pub struct RoutedNode {
    /// The pooled connection.
    pub conn: Arc<NodeConn>,
    /// Weight in the router's [`LoadView`]: the control plane's, or the capacity (0 when not
    /// routable either way).
    pub weight: f64,
    /// The node's registered capacity.
    pub capacity: f64,
    /// Whether the control plane routes to it (healthy or degraded, weight > 0, model ready).
    pub routable: bool,
    /// Whether it can still answer for the model, whatever its weight (healthy, degraded,
    /// draining or cordoned; model ready): a drained node serves the Triton sequences it holds
    /// to their end.
    pub serving: bool,
}

/// The local share of a model's calls as last applied, for the gradual return.
#[derive(Debug)]
pub struct AppliedShare {
    share: AtomicU64,
    stamp_ns: AtomicU64,
}

impl AppliedShare {
    fn new(share: f64) -> Self {
        Self {
            share: AtomicU64::new(share.to_bits()),
            stamp_ns: AtomicU64::new(crate::endpoint::now_ns()),
        }
    }

    /// The share applied last and when.
    pub fn get(&self) -> (f64, u64) {
        (
            f64::from_bits(self.share.load(Ordering::Relaxed)),
            self.stamp_ns.load(Ordering::Relaxed),
        )
    }

    /// Stores a new applied share.
    pub fn set(&self, share: f64, now_ns: u64) {
        self.share.store(share.to_bits(), Ordering::Relaxed);
        self.stamp_ns.store(now_ns, Ordering::Relaxed);
    }
}

/// What a model keeps across tables.
#[derive(Debug, Clone)]
pub struct ModelState {
    /// Retry budget.
    pub budget: Arc<TpsBudget>,
    /// Local share of calls, as last applied.
    pub share: Arc<AppliedShare>,
    /// Recent latencies, for hedging after p95.
    pub latency: Arc<LatencyWindow>,
    /// Counters for metrics.
    pub stats: Arc<crate::metrics::ModelStats>,
    /// Rate-limit buckets.
    pub limiter: Arc<crate::rate_limit::Limiter>,
}

impl Default for ModelState {
    fn default() -> Self {
        Self {
            budget: Arc::new(TpsBudget::new(RETRY_TTL, RETRY_MIN_PER_SEC, RETRY_PERCENT)),
            share: Arc::new(AppliedShare::new(1.0)),
            latency: Arc::default(),
            stats: Arc::default(),
            limiter: Arc::default(),
        }
    }
}

/// Where one model can be served, and how.
#[derive(Debug)]
pub struct ModelRoute {
    /// The model's policy.
    pub settings: ModelSettings,
    /// Nodes in the router's own region that declare the model.
    pub local: Vec<RoutedNode>,
    /// Nodes in other regions that declare the model.
    pub remote: Vec<RoutedNode>,
    /// Hash rings over `local` and `remote` (consistent hashing only).
    pub rings: Option<(Ring, Ring)>,
    /// Round-robin state of `local` and `remote`.
    pub round_robin: Mutex<(PolicyState, PolicyState)>,
    /// State carried across tables.
    pub state: ModelState,
}

impl ModelRoute {
    /// Whether any node is routable for the model (by the control plane's word).
    pub fn is_routable(&self) -> bool {
        self.local.iter().chain(&self.remote).any(|n| n.routable)
    }
}

/// One immutable routing table.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// The control plane's version of this table (0: none received yet).
    pub version: u64,
    /// Whether the control plane said this table may be out of date.
    pub stale: bool,
    /// Every model any registered node declares, and every model whose policy names a
    /// fallback. A model missing here is unknown (NOT_FOUND); present with no routable node,
    /// it is UNAVAILABLE (or goes to its fallback).
    pub models: HashMap<String, ModelRoute>,
    /// Every node in the table, by id, for connection reuse and load reports.
    pub nodes: HashMap<String, Arc<NodeConn>>,
    /// Number of routable nodes.
    pub routable_nodes: usize,
    /// Whether this table has room the one it was built on had not: a node new to the router,
    /// a raised concurrency limit, more routable nodes (waiting calls then look again).
    pub more_room: bool,
    /// The update this table was built from, as a snapshot: the base deltas apply to.
    pub source: RoutingUpdate,
}

fn routable(e: &NodeEndpoint) -> bool {
    matches!(e.health(), HealthState::Healthy | HealthState::Degraded)
        && e.weight.is_finite()
        && e.weight > 0.0
}

impl RoutingTable {
    /// Builds a table from a snapshot update, seen from `region`, carrying over `previous`'s
    /// connections and model state, with the control plane's weights ([`LoadView::Global`]).
    /// Errors (the router NACKs) when an endpoint is malformed.
    pub fn build(
        update: &RoutingUpdate,
        region: &str,
        previous: &RoutingTable,
        queue: &Arc<WaitQueue>,
    ) -> Result<Self, String> {
        Self::build_in_view(update, region, LoadView::Global, previous, queue)
    }

    /// [`RoutingTable::build`], with the weights of `view`.
    pub fn build_in_view(
        update: &RoutingUpdate,
        region: &str,
        view: LoadView,
        previous: &RoutingTable,
        queue: &Arc<WaitQueue>,
    ) -> Result<Self, String> {
        let mut table = RoutingTable {
            version: update.version,
            stale: update.stale,
            source: update.clone(),
            ..Default::default()
        };
        let policies: HashMap<&str, ModelSettings> = update
            .policies
            .iter()
            .map(|p| (p.model.as_str(), ModelSettings::from_policy(p)))
            .collect();
        let mut lists: HashMap<String, (Vec<RoutedNode>, Vec<RoutedNode>)> = HashMap::new();
        for e in &update.endpoints {
            let spec = e
                .spec
                .as_ref()
                .ok_or_else(|| "an endpoint has no spec".to_string())?;
            if spec.id.is_empty() {
                return Err("an endpoint has no id".into());
            }
            let limit = concurrency_limit(spec.capacity);
            let conn = match previous.nodes.get(&spec.id) {
                Some(c) if c.address == spec.address && c.region == spec.region => {
                    table.more_room |= c.limit() != 0 && (limit == 0 || limit > c.limit());
                    c.set_limit(limit);
                    c.clone()
                }
                _ => {
                    table.more_room = true;
                    Arc::new(NodeConn::new(
                        &spec.id,
                        &spec.address,
                        &spec.region,
                        limit,
                        queue.clone(),
                    )?)
                }
            };
            table.nodes.insert(spec.id.clone(), conn.clone());
            let node_routable = routable(e);
            // Drained and cordoned nodes take no new calls but still answer.
            let node_up = matches!(
                e.health(),
                HealthState::Healthy
                    | HealthState::Degraded
                    | HealthState::Draining
                    | HealthState::Cordoned
            );
            table.routable_nodes += usize::from(node_routable);
            for m in &spec.models {
                let ready = e.ready_models.iter().any(|r| r == &m.name);
                let (local, remote) = lists.entry(m.name.clone()).or_default();
                let node = RoutedNode {
                    conn: conn.clone(),
                    weight: if node_routable {
                        view.weight(e.weight, spec.capacity)
                    } else {
                        0.0
                    },
                    capacity: spec.capacity.max(0) as f64,
                    // A node serves a model when the control plane saw it ready there.
                    routable: node_routable && ready,
                    serving: node_up && ready,
                };
                if spec.region == region {
                    local.push(node);
                } else {
                    remote.push(node);
                }
            }
        }
        // A model whose policy names a fallback is known even while no node declares it (its
        // fleet deregistered, or its leases expired): its calls then go to the fallback rather
        // than being refused NOT_FOUND.
        for (model, settings) in &policies {
            if settings.fallback.is_some() {
                lists.entry((*model).to_owned()).or_default();
            }
        }
        for (model, (local, remote)) in lists {
            let settings = policies.get(model.as_str()).cloned().unwrap_or_default();
            let rings = (settings.balancer == crate::balance::Policy::ConsistentHash).then(|| {
                let ring = |nodes: &[RoutedNode]| {
                    let ids: Vec<&str> = nodes.iter().map(|n| n.conn.id.as_str()).collect();
                    let weights: Vec<f64> = nodes.iter().map(|n| n.capacity).collect();
                    Ring::build(&ids, &weights)
                };
                (ring(&local), ring(&remote))
            });
            let state = previous
                .models
                .get(&model)
                .map(|r| r.state.clone())
                .unwrap_or_default();
            table.models.insert(
                model,
                ModelRoute {
                    settings,
                    local,
                    remote,
                    rings,
                    round_robin: Mutex::default(),
                    state,
                },
            );
        }
        Ok(table)
    }
}

/// Applies a delta to the snapshot it is based on; the result is a snapshot at the delta's
/// version. Errors when the delta is based on another version than `base`.
pub fn merge(base: &RoutingUpdate, delta: &RoutingUpdate) -> Result<RoutingUpdate, String> {
    if delta.base_version != base.version {
        return Err(format!(
            "delta from version {} to {}, but this router holds version {}",
            delta.base_version, delta.version, base.version
        ));
    }
    let id = |e: &NodeEndpoint| e.spec.as_ref().map(|s| s.id.clone()).unwrap_or_default();
    let mut endpoints: std::collections::BTreeMap<String, NodeEndpoint> =
        base.endpoints.iter().map(|e| (id(e), e.clone())).collect();
    for gone in &delta.removed {
        endpoints.remove(gone);
    }
    for e in &delta.endpoints {
        endpoints.insert(id(e), e.clone());
    }
    Ok(RoutingUpdate {
        version: delta.version,
        snapshot: true,
        endpoints: endpoints.into_values().collect(),
        removed: vec![],
        stale: delta.stale,
        policies: delta.policies.clone(),
        heartbeat: false,
        base_version: 0,
    })
}

/// The router's concurrency limit for a node of `capacity`: one and a half times it, rounded up
/// (0, no limit, for a capacity of 0). Capacity is what the node serves at once; keeping exactly
/// that many calls in flight would leave a slot idle from each answer until the router's next
/// call arrives (a round trip, and a wake-up of the router on a busy host), and with queueing at
/// the router that idle time is lost capacity. With half as much again, the node always has its
/// next calls queued: the routing-quality benchmark (scenario 2) saw the p99 fall from 244 ms
/// to 139 ms going from 1× to 1.5×, and no gain at 2× (where the node's own queue starts to hide
/// load from the router).
pub fn concurrency_limit(capacity: i64) -> u32 {
    let c = u32::try_from(capacity.max(0)).unwrap_or(u32::MAX);
    c.saturating_add(c.div_ceil(2))
}

#[cfg(test)]
mod limit_tests {
    use super::concurrency_limit;

    #[test]
    fn the_limit_is_one_and_a_half_capacities_rounded_up() {
        assert_eq!(concurrency_limit(0), 0);
        assert_eq!(concurrency_limit(-3), 0);
        assert_eq!(concurrency_limit(1), 2);
        assert_eq!(concurrency_limit(2), 3);
        assert_eq!(concurrency_limit(4), 6);
        assert_eq!(concurrency_limit(i64::MAX), u32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::{Model, ModelPolicy, NodeSpec};

    #[test]
    fn deltas_merge_onto_their_base_only() {
        let base = RoutingUpdate {
            version: 4,
            snapshot: true,
            endpoints: vec![
                ep("a1", "a", HealthState::Healthy, true),
                ep("a2", "a", HealthState::Healthy, true),
            ],
            ..Default::default()
        };
        let delta = RoutingUpdate {
            version: 7,
            base_version: 4,
            endpoints: vec![ep("a2", "a", HealthState::Unhealthy, false)],
            removed: vec!["a1".into()],
            ..Default::default()
        };
        let merged = merge(&base, &delta).unwrap();
        assert_eq!(merged.version, 7);
        assert_eq!(merged.endpoints.len(), 1);
        assert_eq!(merged.endpoints[0].health(), HealthState::Unhealthy);
        let wrong = RoutingUpdate {
            base_version: 5,
            ..delta
        };
        assert!(
            merge(&base, &wrong)
                .unwrap_err()
                .contains("holds version 4")
        );
    }

    pub(crate) fn ep(id: &str, region: &str, health: HealthState, ready: bool) -> NodeEndpoint {
        let ok = matches!(health, HealthState::Healthy | HealthState::Degraded);
        NodeEndpoint {
            spec: Some(NodeSpec {
                id: id.into(),
                address: format!("127.0.0.1:{}", 9000 + id.len()),
                region: region.into(),
                models: vec![Model {
                    name: "echo".into(),
                    versions: vec![],
                }],
                capacity: 2,
                ..Default::default()
            }),
            health: health as i32,
            weight: if ok { 2.0 } else { 0.0 },
            ready_models: if ready { vec!["echo".into()] } else { vec![] },
        }
    }

    fn build(update: &RoutingUpdate, previous: &RoutingTable) -> RoutingTable {
        RoutingTable::build(update, "a", previous, &Arc::default()).unwrap()
    }

    #[tokio::test]
    async fn splits_by_region_and_keeps_connections_and_state() {
        let update = RoutingUpdate {
            version: 5,
            snapshot: true,
            endpoints: vec![
                ep("a1", "a", HealthState::Healthy, true),
                ep("a2", "a", HealthState::Unhealthy, false),
                ep("b1", "b", HealthState::Healthy, true),
            ],
            ..Default::default()
        };
        let t1 = build(&update, &RoutingTable::default());
        let echo = &t1.models["echo"];
        assert_eq!(echo.local.len(), 2);
        assert_eq!(echo.local.iter().filter(|n| n.routable).count(), 1);
        assert_eq!(echo.remote.len(), 1);
        assert_eq!(t1.routable_nodes, 2);
        let t2 = build(&update, &t1);
        assert!(Arc::ptr_eq(&t1.nodes["a1"], &t2.nodes["a1"]));
        assert!(Arc::ptr_eq(
            &t1.models["echo"].state.budget,
            &t2.models["echo"].state.budget
        ));
    }

    #[tokio::test]
    async fn policies_travel_with_the_table() {
        let update = RoutingUpdate {
            endpoints: vec![ep("a1", "a", HealthState::Healthy, true)],
            policies: vec![ModelPolicy {
                model: "echo".into(),
                timeout_ms: 1234,
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = build(&update, &RoutingTable::default());
        assert_eq!(
            t.models["echo"].settings.timeout,
            Duration::from_millis(1234)
        );
    }

    #[tokio::test]
    async fn a_model_with_a_fallback_is_known_without_nodes() {
        let policy = |model: &str, fallback: &str| ModelPolicy {
            model: model.into(),
            fallback_model: fallback.into(),
            ..Default::default()
        };
        let update = RoutingUpdate {
            endpoints: vec![ep("a1", "a", HealthState::Healthy, true)],
            policies: vec![policy("big", "echo"), policy("typo", "")],
            ..Default::default()
        };
        let t = build(&update, &RoutingTable::default());
        let big = &t.models["big"];
        assert!(big.local.is_empty() && big.remote.is_empty() && !big.is_routable());
        assert_eq!(big.settings.fallback.as_deref(), Some("echo"));
        // A policy without a fallback does not make its model known.
        assert!(!t.models.contains_key("typo"));
    }

    #[tokio::test]
    async fn the_local_view_weighs_routable_nodes_by_capacity_and_the_rest_zero() {
        // The control plane's weight (load-derived) differs from the capacity on purpose.
        let busy = NodeEndpoint {
            weight: 0.7,
            ..ep("a1", "a", HealthState::Healthy, true)
        };
        let mut big = ep("a2", "a", HealthState::Healthy, true);
        big.weight = 3.5;
        big.spec.as_mut().unwrap().capacity = 8;
        let update = RoutingUpdate {
            version: 3,
            snapshot: true,
            endpoints: vec![
                busy,
                big,
                ep("a3", "a", HealthState::Unhealthy, false),
                ep("a4", "a", HealthState::Draining, true),
                // Healthy, but the control plane gives it no weight (an override of 0).
                NodeEndpoint {
                    weight: 0.0,
                    ..ep("a5", "a", HealthState::Healthy, true)
                },
                // Degraded: the control plane halves its weight.
                NodeEndpoint {
                    weight: 1.0,
                    ..ep("b1", "b", HealthState::Degraded, true)
                },
            ],
            ..Default::default()
        };
        let weights = |view: LoadView| -> Vec<(String, f64, bool)> {
            let t = RoutingTable::build_in_view(
                &update,
                "a",
                view,
                &RoutingTable::default(),
                &Arc::default(),
            )
            .unwrap();
            let echo = &t.models["echo"];
            echo.local
                .iter()
                .chain(&echo.remote)
                .map(|n| (n.conn.id.clone(), n.weight, n.routable))
                .collect()
        };
        let w = |id: &str, weight: f64, routable: bool| (id.to_string(), weight, routable);
        assert_eq!(
            weights(LoadView::Global),
            vec![
                w("a1", 0.7, true),
                w("a2", 3.5, true),
                w("a3", 0.0, false),
                w("a4", 0.0, false),
                w("a5", 0.0, false),
                w("b1", 1.0, true),
            ]
        );
        assert_eq!(
            weights(LoadView::Local),
            vec![
                w("a1", 2.0, true),
                w("a2", 8.0, true),
                w("a3", 0.0, false),
                w("a4", 0.0, false),
                w("a5", 0.0, false),
                w("b1", 2.0, true),
            ]
        );
        // `build` is the global view.
        let t = build(&update, &RoutingTable::default());
        assert_eq!(t.models["echo"].local[0].weight, 0.7);
    }

    #[test]
    fn load_views_parse_from_their_names_only() {
        assert_eq!("global".parse(), Ok(LoadView::Global));
        assert_eq!("local".parse(), Ok(LoadView::Local));
        assert_eq!(LoadView::default(), LoadView::Global);
        for v in [LoadView::Global, LoadView::Local] {
            assert_eq!(v.to_string().parse(), Ok(v));
        }
        let err = "Local".parse::<LoadView>().unwrap_err();
        assert!(
            err.contains("\"Local\"") && err.contains("`global` or `local`"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_model_with_no_routable_node_is_known_but_unroutable() {
        let update = RoutingUpdate {
            endpoints: vec![ep("a2", "a", HealthState::Unhealthy, false)],
            ..Default::default()
        };
        let t = build(&update, &RoutingTable::default());
        assert!(!t.models["echo"].is_routable());
    }
}
