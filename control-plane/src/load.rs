//! Live load: what the routers report about each node, summed over all routers.
//!
//! Routers send a [`LoadReport`] on their routing stream every half second: per node, the calls
//! in flight from that router, the calls and errors since its previous report, and its latency
//! estimate. Each replica's [`LoadAggregator`] keeps the newest report of each of its routers;
//! every second the replica writes its sum to the store (`/fulcrum/v1/load/<replica>`), and the
//! leader adds up the sums of all replicas — so each node's load is the global one, whichever
//! replica its routers talk to, at one store write per replica per second.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fulcrum_proto::fulcrum::v1::{LoadReport, NodeLoad};
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

/// How often a replica writes its routers' sum to the store: once a second bounds the store
/// writes to one per replica per second, however many routers and nodes there are.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// One node's load, summed over routers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeLoadSummary {
    /// Calls in flight to the node from all routers.
    pub in_flight: u32,
    /// Calls per second.
    pub calls_per_sec: f64,
    /// Failed calls per second.
    pub errors_per_sec: f64,
    /// Latency estimate, averaged over routers weighted by their calls (none without calls).
    pub latency_ms: Option<f64>,
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

    fn add(&mut self, other: &NodeLoadSummary) {
        let (a, b) = (self.calls_per_sec, other.calls_per_sec);
        self.latency_ms = match (self.latency_ms, other.latency_ms) {
            (Some(x), Some(y)) if a + b > 0.0 => Some((x * a + y * b) / (a + b)),
            (x, y) => x.or(y),
        };
        self.in_flight = self.in_flight.saturating_add(other.in_flight);
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
                        calls_per_sec: calls,
                        errors_per_sec: n.errors as f64 / secs,
                        latency_ms: (calls > 0.0 && n.latency_ewma_ms.is_finite())
                            .then_some(n.latency_ewma_ms),
                    });
            }
        }
        view
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Encodes a replica's view for the store: calls and errors per second are rounded to whole
/// calls per second (the weights do not need more).
pub fn encode(view: &LoadView) -> Vec<u8> {
    let mut nodes: Vec<NodeLoad> = view
        .iter()
        .map(|(id, s)| NodeLoad {
            node_id: id.clone(),
            in_flight: s.in_flight,
            calls: s.calls_per_sec.round() as u64,
            errors: s.errors_per_sec.round() as u64,
            latency_ewma_ms: s.latency_ms.unwrap_or(0.0),
            ejected: false,
        })
        .collect();
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    LoadReport {
        nodes,
        at_unix_ms: now_unix_ms(),
    }
    .encode_to_vec()
}

/// Writes this replica's view (when it has one) to the store.
pub async fn publish(store: &dyn Store, replica_id: &str, view: &LoadView) -> Result<(), Error> {
    if view.is_empty() {
        return Ok(());
    }
    store.put(&keys::load(replica_id), encode(view)).await?;
    Ok(())
}

/// The global view: the sum of every replica's fresh view in the store.
pub async fn global(store: &dyn Store) -> Result<LoadView, Error> {
    let (kvs, _) = store.list(keys::LOAD).await?;
    let now = now_unix_ms();
    let mut view = LoadView::new();
    for kv in kvs {
        let Ok(report) = LoadReport::decode(kv.value.as_slice()) else {
            tracing::warn!(key = %kv.key, "ignoring an undecodable load report");
            continue;
        };
        if now.saturating_sub(report.at_unix_ms) > REPLICA_SUM_TTL.as_millis() as u64 {
            continue;
        }
        for n in report.nodes {
            view.entry(n.node_id).or_default().add(&NodeLoadSummary {
                in_flight: n.in_flight,
                calls_per_sec: n.calls as f64,
                errors_per_sec: n.errors as f64,
                latency_ms: (n.calls > 0 && n.latency_ewma_ms > 0.0).then_some(n.latency_ewma_ms),
            });
        }
    }
    Ok(view)
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
        }
    }

    #[tokio::test]
    async fn routers_add_up_and_latency_is_call_weighted() {
        let agg = LoadAggregator::default();
        agg.record(
            "r1",
            LoadReport {
                nodes: vec![node("n", 3, 10, 1, 10.0)],
                at_unix_ms: 0,
            },
        );
        agg.record(
            "r2",
            LoadReport {
                nodes: vec![node("n", 2, 30, 0, 20.0)],
                at_unix_ms: 0,
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
                calls_per_sec: 10.0,
                errors_per_sec: 0.0,
                latency_ms: Some(4.0),
            },
        );
        let mut b = LoadView::new();
        b.insert(
            "n".into(),
            NodeLoadSummary {
                in_flight: 1,
                calls_per_sec: 30.0,
                errors_per_sec: 3.0,
                latency_ms: Some(8.0),
            },
        );
        publish(&store, "r-a", &a).await.unwrap();
        publish(&store, "r-b", &b).await.unwrap();
        let g = global(&store).await.unwrap();
        assert_eq!(g["n"].in_flight, 3);
        assert_eq!(g["n"].calls_per_sec, 40.0);
        assert!((g["n"].error_ratio() - 0.075).abs() < 1e-9);
        assert!((g["n"].latency_ms.unwrap() - 7.0).abs() < 1e-9);
    }
}
