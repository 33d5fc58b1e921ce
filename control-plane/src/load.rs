//! Live load: what the routers report about each node, summed over all routers.
//!
//! Routers send a [`LoadReport`] on their routing stream every half second: per node, the calls
//! in flight from that router, the calls and errors since its previous report, and its latency
//! estimate. Each replica's [`LoadAggregator`] keeps the newest report of each of its routers;
//! every second the replica writes its sum to the store (`/fulcrum/v1/load/<replica>`), and the
//! leader adds up the sums of all replicas — so each node's load is the global one, whichever
//! replica its routers talk to, at one store write per replica per second.
//!
//! What nodes say of themselves travels the same way: each replica adds to its sum the newest
//! report of every node registered through it (in flight, queue depth, utilization), and the
//! leader keeps, per node, the newest of those ([`SelfLoad`]). [`NodeLoadSummary::utilization`]
//! merges both views into the utilization the weights use.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fulcrum_proto::fulcrum::v1::{LoadReport, NodeLoad, SelfReport};
use prost::Message;
use tokio::time::Instant;

use crate::error::Error;
use crate::keys;
use crate::store::Store;

/// A router's report older than this is ignored: the router is gone or cut off (it reports
/// every half second, so three seconds is six missed reports).
const ROUTER_REPORT_TTL: Duration = Duration::from_secs(3);

/// A replica's sum older than this is ignored (the replica died). Wall-clock based, so it also
/// absorbs a few seconds of clock skew between replicas.
const REPLICA_SUM_TTL: Duration = Duration::from_secs(10);

/// A node's own report older than this is ignored. Nodes report every second or so and a
/// registration ends after a lease TTL (5 s) of silence; ten seconds also covers a replica's sum
/// being a second old and a few seconds of clock skew.
const SELF_REPORT_TTL: Duration = Duration::from_secs(10);

/// What a self-registered node last said of its own load.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SelfLoad {
    /// Requests admitted and not yet answered, from every client (not only Fulcrum's routers).
    pub in_flight: u32,
    /// Of those, requests waiting for a free slot.
    pub queue_depth: u32,
    /// Share of its serving capacity in use, in [0, 1].
    pub utilization: f64,
    /// When the node made the report (Unix milliseconds, as the replica that received it saw).
    pub at_unix_ms: u64,
}

/// How often a replica writes its routers' sum to the store: once a second bounds the store
/// writes to one per replica per second, however many routers and nodes there are.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// One node's load, summed over routers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeLoadSummary {
    /// Calls in flight to the node from all routers, at their last reports.
    pub in_flight: u32,
    /// Calls in flight to the node from all routers, each averaged over the interval before
    /// its last report (a router that does not report the mean counts with its `in_flight`):
    /// what the utilization is made of. A count at one instant swings with every call (a
    /// 4-slot node at 70 % has 0 to 4 calls in flight from one moment to the next), and the
    /// weights made of it swung with it.
    pub mean_in_flight: f64,
    /// Calls per second.
    pub calls_per_sec: f64,
    /// Failed calls per second.
    pub errors_per_sec: f64,
    /// Latency estimate, averaged over routers weighted by their calls (none without calls).
    pub latency_ms: Option<f64>,
    /// What the node itself reported, if it registered itself and reported recently.
    pub reported: Option<SelfLoad>,
}

impl NodeLoadSummary {
    /// Share of failed calls (0 without calls).
    pub fn error_ratio(&self) -> f64 {
        if self.calls_per_sec > 0.0 {
            (self.errors_per_sec / self.calls_per_sec).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// The node's utilization for the weights, in [0, 1]: the largest of what the routers'
    /// mean calls in flight make of its `capacity` and what the node reports (its utilization, and
    /// its own count in flight over `capacity`). The node sees calls from every client, not only
    /// Fulcrum's routers, and knows its real state (a batch-filled GPU, a full KV cache), so
    /// when it says it is busier than the routers think, it is. A node with a queue is full.
    pub fn utilization(&self, capacity: f64) -> f64 {
        let capacity = capacity.max(1.0);
        let mut u = self.mean_in_flight / capacity;
        if let Some(r) = &self.reported {
            if r.utilization.is_finite() {
                u = u.max(r.utilization);
            }
            u = u.max(f64::from(r.in_flight) / capacity);
            if r.queue_depth > 0 {
                u = 1.0;
            }
        }
        u.clamp(0.0, 1.0)
    }

    fn add(&mut self, other: &NodeLoadSummary) {
        let (a, b) = (self.calls_per_sec, other.calls_per_sec);
        self.latency_ms = match (self.latency_ms, other.latency_ms) {
            (Some(x), Some(y)) if a + b > 0.0 => Some((x * a + y * b) / (a + b)),
            (x, y) => x.or(y),
        };
        self.in_flight = self.in_flight.saturating_add(other.in_flight);
        self.mean_in_flight += other.mean_in_flight;
        self.calls_per_sec += b;
        self.errors_per_sec += other.errors_per_sec;
    }
}

/// Load by node id.
pub type LoadView = HashMap<String, NodeLoadSummary>;

#[derive(Debug)]
struct RouterEntry {
    at: Instant,
    interval: Duration,
    nodes: Vec<NodeLoad>,
}

/// The newest report of each router subscribed to this replica.
#[derive(Debug, Default)]
pub struct LoadAggregator {
    routers: Mutex<HashMap<String, RouterEntry>>,
}

impl LoadAggregator {
    /// Records a router's report.
    pub fn record(&self, router_id: &str, report: LoadReport) {
        let now = Instant::now();
        let mut routers = self.routers.lock().unwrap_or_else(PoisonError::into_inner);
        // The calls in a report were counted since the router's previous one.
        let interval = routers
            .get(router_id)
            .map_or(Duration::from_millis(500), |e| {
                now.saturating_duration_since(e.at)
            })
            .max(Duration::from_millis(50));
        routers.insert(
            router_id.to_owned(),
            RouterEntry {
                at: now,
                interval,
                nodes: report.nodes,
            },
        );
    }

    /// Forgets a router (its stream ended).
    pub fn forget(&self, router_id: &str) {
        let mut routers = self.routers.lock().unwrap_or_else(PoisonError::into_inner);
        routers.remove(router_id);
    }

    /// The sum over this replica's routers with fresh reports.
    pub fn view(&self) -> LoadView {
        let now = Instant::now();
        let routers = self.routers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut view = LoadView::new();
        for entry in routers.values() {
            if now.saturating_duration_since(entry.at) > ROUTER_REPORT_TTL {
                continue;
            }
            let secs = entry.interval.as_secs_f64();
            for n in &entry.nodes {
                let calls = n.calls as f64 / secs;
                view.entry(n.node_id.clone())
                    .or_default()
                    .add(&NodeLoadSummary {
                        in_flight: n.in_flight,
                        mean_in_flight: mean_in_flight(n),
                        calls_per_sec: calls,
                        errors_per_sec: n.errors as f64 / secs,
                        latency_ms: (calls > 0.0 && n.latency_ewma_ms.is_finite())
                            .then_some(n.latency_ewma_ms),
                        reported: None,
                    });
            }
        }
        view
    }
}

/// Resolution of a mean count in flight: steps per call. Finer differences do not matter to
/// the weights (a node's utilization moves by 1 / (8 × capacity) per step, before damping),
/// and without a resolution every node with traffic would count as changed at every merge of
/// the load sums (see `table::LoadSignals`), its entry computed again every second.
const MEAN_IN_FLIGHT_STEPS: f64 = 8.0;

/// A report's mean calls in flight, to [`MEAN_IN_FLIGHT_STEPS`]: the mean when it carries a
/// sensible one (a finite count, not negative), else its count in flight at the time of the
/// report. Sums of such steps are exact.
fn mean_in_flight(n: &NodeLoad) -> f64 {
    let mean = n
        .mean_in_flight
        .filter(|m| m.is_finite() && *m >= 0.0)
        .unwrap_or_else(|| f64::from(n.in_flight));
    // Far beyond any real count (2^40 calls) the steps would stop being exact.
    (mean.min(1e12) * MEAN_IN_FLIGHT_STEPS).round() / MEAN_IN_FLIGHT_STEPS
}

/// Encodes a replica's view and its nodes' own reports for the store: calls and errors per
/// second are rounded to whole calls per second (the weights do not need more).
pub fn encode(view: &LoadView, self_reports: Vec<SelfReport>) -> Vec<u8> {
    let mut nodes: Vec<NodeLoad> = view
        .iter()
        .map(|(id, s)| NodeLoad {
            node_id: id.clone(),
            in_flight: s.in_flight,
            calls: s.calls_per_sec.round() as u64,
            errors: s.errors_per_sec.round() as u64,
            latency_ewma_ms: s.latency_ms.unwrap_or(0.0),
            ejected: false,
            mean_in_flight: Some(s.mean_in_flight),
        })
        .collect();
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    LoadReport {
        nodes,
        at_unix_ms: now_unix_ms(),
        self_reports,
    }
    .encode_to_vec()
}

/// Writes this replica's view and its nodes' own reports (when it has any) to the store.
pub async fn publish(
    store: &dyn Store,
    replica_id: &str,
    view: &LoadView,
    self_reports: Vec<SelfReport>,
) -> Result<(), Error> {
    if view.is_empty() && self_reports.is_empty() {
        return Ok(());
    }
    store
        .put(&keys::load(replica_id), encode(view, self_reports))
        .await?;
    Ok(())
}

/// The global view: the sum of every replica's fresh view in the store.
pub async fn global(store: &dyn Store) -> Result<LoadView, Error> {
    let (kvs, _) = store.list(keys::LOAD).await?;
    let reports: Vec<LoadReport> = kvs
        .iter()
        .filter_map(|kv| decode(&kv.key, &kv.value))
        .collect();
    Ok(merge(reports.iter(), now_unix_ms()))
}

/// One node's global load (a view holding that node at most): [`global`] without merging the
/// other nodes. An operator command about one node (`ctl node`, `ctl weight`, ...) needed ~10 ms
/// of CPU at 10,000 nodes to merge every node's load and keep one, while the change it made
/// went out to the routers.
pub async fn of_node(store: &dyn Store, id: &str) -> Result<LoadView, Error> {
    let (kvs, _) = store.list(keys::LOAD).await?;
    let reports: Vec<LoadReport> = kvs
        .iter()
        .filter_map(|kv| decode(&kv.key, &kv.value))
        .map(|mut r| {
            r.nodes.retain(|n| n.node_id == id);
            r.self_reports.retain(|s| s.node_id == id);
            r
        })
        .collect();
    Ok(merge(reports.iter(), now_unix_ms()))
}

/// A replica's stored sum; `None` (logged) when it does not decode.
pub fn decode(key: &str, value: &[u8]) -> Option<LoadReport> {
    LoadReport::decode(value)
        .inspect_err(|_| tracing::warn!(key = %key, "ignoring an undecodable load report"))
        .ok()
}

/// The current Unix time in milliseconds, as [`merge`] takes it.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The sum of the replicas' stored sums that are fresh at `now` (Unix milliseconds).
pub fn merge<'a>(reports: impl IntoIterator<Item = &'a LoadReport>, now: u64) -> LoadView {
    let mut view = LoadView::new();
    for report in reports {
        if now.saturating_sub(report.at_unix_ms) > REPLICA_SUM_TTL.as_millis() as u64 {
            continue;
        }
        for n in &report.nodes {
            let summary = NodeLoadSummary {
                in_flight: n.in_flight,
                mean_in_flight: mean_in_flight(n),
                calls_per_sec: n.calls as f64,
                errors_per_sec: n.errors as f64,
                latency_ms: (n.calls > 0 && n.latency_ewma_ms > 0.0).then_some(n.latency_ewma_ms),
                reported: None,
            };
            match view.get_mut(&n.node_id) {
                Some(v) => v.add(&summary),
                None => {
                    view.insert(n.node_id.clone(), summary);
                }
            }
        }
        // A node reports through one replica at a time; while it moves, two may hold a report:
        // the newest wins.
        for r in &report.self_reports {
            let Some(own) = &r.report else { continue };
            let at = report.at_unix_ms.saturating_sub(r.age_ms);
            if now.saturating_sub(at) > SELF_REPORT_TTL.as_millis() as u64 {
                continue;
            }
            let entry = view.entry(r.node_id.clone()).or_default();
            if entry
                .reported
                .as_ref()
                .is_none_or(|old| old.at_unix_ms < at)
            {
                entry.reported = Some(SelfLoad {
                    in_flight: own.in_flight,
                    queue_depth: own.queue_depth,
                    utilization: own.utilization,
                    at_unix_ms: at,
                });
            }
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, in_flight: u32, calls: u64, errors: u64, lat: f64) -> NodeLoad {
        NodeLoad {
            node_id: id.into(),
            in_flight,
            calls,
            errors,
            latency_ewma_ms: lat,
            ejected: false,
            mean_in_flight: None,
        }
    }

    #[tokio::test]
    async fn the_mean_in_flight_is_what_utilization_is_made_of() {
        let agg = LoadAggregator::default();
        let with_mean = |id, in_flight, mean| NodeLoad {
            mean_in_flight: mean,
            ..node(id, in_flight, 10, 0, 5.0)
        };
        // Routers that report the mean; one that does not (its count stands in); and
        // nonsense, which falls back to the count too.
        for (router, report) in [
            ("r1", with_mean("n", 4, Some(1.5))),
            ("r2", with_mean("n", 0, Some(0.5))),
            ("r3", with_mean("n", 2, None)),
            ("r4", with_mean("n", 1, Some(f64::NAN))),
            ("r5", with_mean("n", 0, Some(-3.0))),
        ] {
            agg.record(
                router,
                LoadReport {
                    nodes: vec![report],
                    at_unix_ms: 0,
                    self_reports: vec![],
                },
            );
        }
        let v = agg.view();
        assert_eq!(v["n"].in_flight, 7);
        assert_eq!(v["n"].mean_in_flight, 1.5 + 0.5 + 2.0 + 1.0 + 0.0);
        assert_eq!(
            v["n"].utilization(10.0),
            0.5,
            "from the mean, not the count"
        );
        // To an eighth of a call.
        agg.record(
            "r6",
            LoadReport {
                nodes: vec![with_mean("n", 0, Some(0.3))],
                at_unix_ms: 0,
                self_reports: vec![],
            },
        );
        assert_eq!(agg.view()["n"].mean_in_flight, 5.0 + 0.25);
        agg.forget("r6");
        let v = agg.view();

        // Through the store, replicas' sums add up the same way.
        let store = crate::store::embedded::EmbeddedStore::in_memory();
        publish(&store, "r-a", &v, vec![]).await.unwrap();
        publish(&store, "r-b", &v, vec![]).await.unwrap();
        let g = global(&store).await.unwrap();
        assert_eq!(g["n"].mean_in_flight, 10.0);
        assert_eq!(g["n"].in_flight, 14);
    }

    #[tokio::test]
    async fn routers_add_up_and_latency_is_call_weighted() {
        let agg = LoadAggregator::default();
        agg.record(
            "r1",
            LoadReport {
                nodes: vec![node("n", 3, 10, 1, 10.0)],
                at_unix_ms: 0,
                self_reports: vec![],
            },
        );
        agg.record(
            "r2",
            LoadReport {
                nodes: vec![node("n", 2, 30, 0, 20.0)],
                at_unix_ms: 0,
                self_reports: vec![],
            },
        );
        let v = agg.view();
        let n = &v["n"];
        assert_eq!(n.in_flight, 5);
        // 40 calls over the default half second, 1 error.
        assert!((n.calls_per_sec - 80.0).abs() < 1e-9);
        assert!((n.error_ratio() - 1.0 / 40.0).abs() < 1e-9);
        assert!((n.latency_ms.unwrap() - 17.5).abs() < 1e-9);
        agg.forget("r2");
        assert_eq!(agg.view()["n"].in_flight, 3);
    }

    #[tokio::test]
    async fn replicas_add_up_through_the_store() {
        let store = crate::store::embedded::EmbeddedStore::in_memory();
        let mut a = LoadView::new();
        a.insert(
            "n".into(),
            NodeLoadSummary {
                in_flight: 2,
                mean_in_flight: 1.5,
                calls_per_sec: 10.0,
                errors_per_sec: 0.0,
                latency_ms: Some(4.0),
                reported: None,
            },
        );
        let mut b = LoadView::new();
        b.insert(
            "n".into(),
            NodeLoadSummary {
                in_flight: 1,
                mean_in_flight: 0.25,
                calls_per_sec: 30.0,
                errors_per_sec: 3.0,
                latency_ms: Some(8.0),
                reported: None,
            },
        );
        publish(&store, "r-a", &a, vec![]).await.unwrap();
        publish(&store, "r-b", &b, vec![]).await.unwrap();
        let g = global(&store).await.unwrap();
        assert_eq!(g["n"].in_flight, 3);
        assert_eq!(g["n"].mean_in_flight, 1.75);
        assert_eq!(g["n"].calls_per_sec, 40.0);
        assert!((g["n"].error_ratio() - 0.075).abs() < 1e-9);
        assert!((g["n"].latency_ms.unwrap() - 7.0).abs() < 1e-9);
    }

    fn own(id: &str, utilization: f64, queue_depth: u32, age_ms: u64) -> SelfReport {
        SelfReport {
            node_id: id.into(),
            report: Some(fulcrum_proto::fulcrum::v1::NodeReport {
                in_flight: 1,
                queue_depth,
                utilization,
                metrics: Default::default(),
            }),
            age_ms,
        }
    }

    #[tokio::test]
    async fn nodes_own_reports_merge_with_the_routers_view() {
        let store = crate::store::embedded::EmbeddedStore::in_memory();
        let mut routers = LoadView::new();
        routers.insert(
            "n".into(),
            NodeLoadSummary {
                in_flight: 2,
                calls_per_sec: 10.0,
                ..Default::default()
            },
        );
        // Replica a holds n's stream; replica b held it before (an older report); replica a also
        // has a node no router calls, and one whose report is too old to count.
        let stale = SELF_REPORT_TTL.as_millis() as u64 + 1000;
        publish(
            &store,
            "r-a",
            &routers,
            vec![
                own("n", 0.9, 0, 100),
                own("quiet", 0.1, 0, 0),
                own("old", 1.0, 0, stale),
            ],
        )
        .await
        .unwrap();
        publish(
            &store,
            "r-b",
            &LoadView::new(),
            vec![own("n", 0.2, 0, 3000)],
        )
        .await
        .unwrap();
        let g = global(&store).await.unwrap();
        let n = &g["n"];
        assert_eq!(n.in_flight, 2, "routers' load is kept");
        assert_eq!(n.reported.as_ref().unwrap().utilization, 0.9, "newest wins");
        assert!(
            (n.utilization(8.0) - 0.9).abs() < 1e-9,
            "the node knows better"
        );
        assert!(g["quiet"].reported.is_some());
        assert!(!g.contains_key("old"), "an old report counted");

        // One node's load, as the whole view has it, and nothing else.
        for id in ["n", "quiet"] {
            let one = of_node(&store, id).await.unwrap();
            assert_eq!(one.len(), 1, "{id}: other nodes were kept");
            assert_eq!(one[id], g[id], "{id}: not what the whole view says");
        }
        assert!(of_node(&store, "old").await.unwrap().is_empty());
        assert!(of_node(&store, "unknown").await.unwrap().is_empty());
    }

    #[test]
    fn utilization_is_the_larger_view() {
        let mut l = NodeLoadSummary {
            mean_in_flight: 6.0,
            ..Default::default()
        };
        assert_eq!(l.utilization(8.0), 0.75, "routers only");
        l.reported = Some(SelfLoad {
            utilization: 0.5,
            ..Default::default()
        });
        assert_eq!(l.utilization(8.0), 0.75, "the routers see more");
        l.reported = Some(SelfLoad {
            in_flight: 8,
            utilization: 0.5,
            ..Default::default()
        });
        assert_eq!(l.utilization(8.0), 1.0, "other clients fill it");
        l.reported = Some(SelfLoad {
            queue_depth: 3,
            ..Default::default()
        });
        assert_eq!(l.utilization(8.0), 1.0, "a queue means full");
        l.reported = Some(SelfLoad {
            utilization: f64::NAN,
            ..Default::default()
        });
        assert_eq!(l.utilization(8.0), 0.75, "a bad number is ignored");
    }
}
