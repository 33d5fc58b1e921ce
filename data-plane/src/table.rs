//! The router's routing table: an immutable snapshot built from the control plane's update,
//! swapped in atomically (`ArcSwap`) so the call path never takes a lock.
//!
//! Connections outlive tables: each table build reuses the pooled [`NodeConn`] of every node
//! whose address did not change, so a weight change never drops a connection or its in-flight
//! count.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{Endpoint as NodeEndpoint, HealthState, RoutingUpdate};
use tonic::transport::{Channel, Endpoint};

use crate::balance::Candidate;

/// Connect timeout to a node. Nodes are in the same or the neighbouring data center; a second
/// is many round trips even across regions, and a dead node must not hold a call for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP/2 keep-alive: a silently dead node (power loss, partition) is detected in
/// interval + timeout = 10 s even when no call is in flight to fail fast on it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled connection to one node, shared by every table that contains the node.
#[derive(Debug)]
pub struct NodeConn {
    /// Node id.
    pub id: String,
    /// The address the channel connects to.
    pub address: String,
    /// Lazily connected, reconnecting HTTP/2 channel.
    pub channel: Channel,
    /// Calls (and streams) this router has open to the node.
    pub in_flight: AtomicU32,
}

impl NodeConn {
    fn new(id: &str, address: &str) -> Result<Self, String> {
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("node {id}: bad address {address:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(Self {
            id: id.to_owned(),
            address: address.to_owned(),
            channel,
            in_flight: AtomicU32::new(0),
        })
    }

    /// Counts a call as in flight until the returned guard drops.
    pub fn start_call(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// Holds one in-flight count on a node; releases it on drop (also when a call is cancelled).
#[derive(Debug)]
pub struct InFlight(Arc<NodeConn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A node in one table: its pooled connection plus what this table says about it.
#[derive(Debug, Clone)]
pub struct RoutedNode {
    /// The pooled connection.
    pub conn: Arc<NodeConn>,
    /// The node's region.
    pub region: String,
    /// Control-plane weight.
    pub weight: f64,
}

impl RoutedNode {
    /// The node as the pure balancer sees it.
    pub fn candidate(&self, excluded: bool) -> Candidate {
        Candidate {
            weight: self.weight,
            in_flight: self.conn.in_flight.load(Ordering::Relaxed),
            excluded,
        }
    }
}

/// Where one model can be served.
#[derive(Debug, Clone, Default)]
pub struct ModelRoute {
    /// Routable nodes in the router's own region.
    pub local: Vec<RoutedNode>,
    /// Routable nodes in other regions.
    pub remote: Vec<RoutedNode>,
}

impl ModelRoute {
    /// Whether any node can take a call for the model right now.
    pub fn is_routable(&self) -> bool {
        self.local
            .iter()
            .chain(&self.remote)
            .any(|n| n.candidate(false).eligible())
    }
}

/// One immutable routing table.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// The control plane's version of this table (0: none received yet).
    pub version: u64,
    /// Whether the control plane said this table may be out of date.
    pub stale: bool,
    /// Every model any registered node declares, with the nodes that can serve it now. A model
    /// missing here is unknown (NOT_FOUND); present with no routable node, it is UNAVAILABLE.
    pub models: HashMap<String, ModelRoute>,
    /// Every node in the table, by id (also unroutable ones), for connection reuse.
    pub nodes: HashMap<String, Arc<NodeConn>>,
    /// Number of routable nodes.
    pub routable_nodes: usize,
}

fn routable(e: &NodeEndpoint) -> bool {
    matches!(e.health(), HealthState::Healthy | HealthState::Degraded)
        && e.weight.is_finite()
        && e.weight > 0.0
}

impl RoutingTable {
    /// Builds a table from a snapshot update, seen from `region`, reusing `previous`'s
    /// connections. Errors (the router NACKs) when an endpoint is malformed.
    pub fn build(
        update: &RoutingUpdate,
        region: &str,
        previous: &RoutingTable,
    ) -> Result<Self, String> {
        let mut table = RoutingTable {
            version: update.version,
            stale: update.stale,
            ..Default::default()
        };
        for e in &update.endpoints {
            let spec = e
                .spec
                .as_ref()
                .ok_or_else(|| "an endpoint has no spec".to_string())?;
            let conn = match previous.nodes.get(&spec.id) {
                Some(c) if c.address == spec.address => c.clone(),
                _ => Arc::new(NodeConn::new(&spec.id, &spec.address)?),
            };
            table.nodes.insert(spec.id.clone(), conn.clone());
            let is_routable = routable(e);
            table.routable_nodes += usize::from(is_routable);
            for m in &spec.models {
                let route = table.models.entry(m.name.clone()).or_default();
                // A node serves a model when the control plane saw it ready there.
                if !is_routable || !e.ready_models.iter().any(|r| r == &m.name) {
                    continue;
                }
                let node = RoutedNode {
                    conn: conn.clone(),
                    region: spec.region.clone(),
                    weight: e.weight,
                };
                if spec.region == region {
                    route.local.push(node);
                } else {
                    route.remote.push(node);
                }
            }
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::{Model, NodeSpec};

    fn ep(id: &str, region: &str, health: HealthState, ready: bool) -> NodeEndpoint {
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
            weight: if routable_state(health) { 2.0 } else { 0.0 },
            ready_models: if ready { vec!["echo".into()] } else { vec![] },
        }
    }

    fn routable_state(h: HealthState) -> bool {
        matches!(h, HealthState::Healthy | HealthState::Degraded)
    }

    #[tokio::test]
    async fn splits_by_region_and_keeps_connections() {
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
        let t1 = RoutingTable::build(&update, "a", &RoutingTable::default()).unwrap();
        let echo = &t1.models["echo"];
        assert_eq!(echo.local.len(), 1);
        assert_eq!(echo.remote.len(), 1);
        assert_eq!(t1.routable_nodes, 2);
        let t2 = RoutingTable::build(&update, "a", &t1).unwrap();
        assert!(Arc::ptr_eq(&t1.nodes["a1"], &t2.nodes["a1"]));
    }

    #[tokio::test]
    async fn a_model_with_no_routable_node_is_known_but_unroutable() {
        let update = RoutingUpdate {
            endpoints: vec![ep("a2", "a", HealthState::Unhealthy, false)],
            ..Default::default()
        };
        let t = RoutingTable::build(&update, "a", &RoutingTable::default()).unwrap();
        assert!(!t.models["echo"].is_routable());
    }
}
