//! A replica's Prometheus metrics, served on their own listener (`fulcrum control
//! --metrics-listen`) at `GET /metrics`, read from the replica's state at each scrape.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `fulcrum_control_leader` | | 1 on the replica that computes and writes the table |
//! | `fulcrum_control_routing_version`, `fulcrum_control_routing_stale` | | the table this replica serves |
//! | `fulcrum_control_nodes` | health | nodes in the table, by health state |
//! | `fulcrum_control_node_weight` | node, region | the weight routers get |
//! | `fulcrum_control_routers` | | routers subscribed to this replica |
//! | `fulcrum_control_router_lag` | router, region | versions between the table and the router's newest ACK |
//! | `fulcrum_control_router_nacks_total` | router, region | versions the router rejected |
//! | `fulcrum_control_probes_inconclusive_total` | | probes that timed out while the prober itself was late (not counted as failures) |
//! | `fulcrum_control_guard_trips_total` | | times the mass-failure guard started holding nodes' last state |
//! | `fulcrum_control_guard_held_nodes` | | nodes whose last state the guard holds now (the leader only) |

use std::sync::Arc;

use fulcrum_proto::fulcrum::v1::HealthState;
use fulcrum_telemetry::family;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::health::HealthStats;
use crate::publisher::Publisher;

/// What a replica's metrics are read from.
#[derive(Debug, Clone)]
pub struct ReplicaState {
    /// The table this replica serves, and its routers.
    pub publisher: Publisher,
    /// Whether this replica leads.
    pub is_leader: watch::Receiver<bool>,
    /// The prober's and the mass-failure guard's counters.
    pub health: Arc<HealthStats>,
}

#[derive(Debug, Clone)]
struct ReplicaCollector(ReplicaState);

impl Collector for ReplicaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let gauge = |v: f64| ConstGauge::new(v);
        let leader = *self.0.is_leader.borrow();
        family(
            e,
            "fulcrum_control_leader",
            "1 on the replica that computes and writes the routing table",
            MetricType::Gauge,
            [(vec![], gauge(f64::from(u8::from(leader))))],
        )?;
        let table = self.0.publisher.current();
        let version = table.as_ref().map_or(0, |t| t.version);
        family(
            e,
            "fulcrum_control_routing_version",
            "Version of the routing table this replica serves (0: none yet)",
            MetricType::Gauge,
            [(vec![], gauge(version as f64))],
        )?;
        let stale = table.as_ref().is_some_and(|t| t.stale);
        family(
            e,
            "fulcrum_control_routing_stale",
            "1 while the store is unreachable and the table may be out of date",
            MetricType::Gauge,
            [(vec![], gauge(f64::from(u8::from(stale))))],
        )?;
        let endpoints = table
            .as_ref()
            .map(|t| t.endpoints.as_slice())
            .unwrap_or(&[]);
        let states = [
            HealthState::Unspecified,
            HealthState::Healthy,
            HealthState::Degraded,
            HealthState::Unhealthy,
            HealthState::Draining,
            HealthState::Cordoned,
        ];
        family(
            e,
            "fulcrum_control_nodes",
            "Nodes in the routing table, by health state",
            MetricType::Gauge,
            states.iter().map(|s| {
                let n = endpoints.iter().filter(|e| e.health() == *s).count();
                let name = s.as_str_name().trim_start_matches("HEALTH_STATE_");
                (vec![("health", name.to_lowercase())], gauge(n as f64))
            }),
        )?;
        family(
            e,
            "fulcrum_control_node_weight",
            "The weight routers get for the node",
            MetricType::Gauge,
            endpoints.iter().filter_map(|e| {
                let s = e.spec.as_ref()?;
                let labels = vec![("node", s.id.clone()), ("region", s.region.clone())];
                Some((labels, gauge(e.weight)))
            }),
        )?;
        let mut routers = self.0.publisher.routers();
        routers.sort_by(|a, b| a.id.cmp(&b.id));
        family(
            e,
            "fulcrum_control_routers",
            "Routers subscribed to this replica",
            MetricType::Gauge,
            [(vec![], gauge(routers.len() as f64))],
        )?;
        let router = |r: &crate::publisher::RouterInfo| {
            vec![("router", r.id.clone()), ("region", r.region.clone())]
        };
        family(
            e,
            "fulcrum_control_router_lag",
            "Versions between the table this replica serves and the router's newest ACK",
            MetricType::Gauge,
            routers.iter().map(|r| {
                let lag = version.saturating_sub(r.acked_version);
                (router(r), gauge(lag as f64))
            }),
        )?;
        family(
            e,
            "fulcrum_control_router_nacks",
            "Routing versions the router rejected",
            MetricType::Counter,
            routers
                .iter()
                .map(|r| (router(r), ConstCounter::new(r.nacks))),
        )?;
        let (inconclusive, trips, held) = self.0.health.read();
        family(
            e,
            "fulcrum_control_probes_inconclusive",
            "Probes that timed out while the prober itself was late, counted neither as passes nor as failures",
            MetricType::Counter,
            [(vec![], ConstCounter::new(inconclusive))],
        )?;
        family(
            e,
            "fulcrum_control_guard_trips",
            "Times the mass-failure guard started holding nodes' last state instead of publishing their failed probes",
            MetricType::Counter,
            [(vec![], ConstCounter::new(trips))],
        )?;
        family(
            e,
            "fulcrum_control_guard_held_nodes",
            "Nodes whose last state the mass-failure guard holds now",
            MetricType::Gauge,
            [(vec![], gauge(held as f64))],
        )?;
        Ok(())
    }
}

/// The replica's metrics in Prometheus' text format.
pub fn render(state: &ReplicaState) -> String {
    fulcrum_telemetry::render(&ReplicaCollector(state.clone()))
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(state: ReplicaState, listener: TcpListener) -> std::io::Result<()> {
    fulcrum_telemetry::serve(ReplicaCollector(state), listener).await
}
