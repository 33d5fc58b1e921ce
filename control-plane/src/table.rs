//! The routing table: node specs, their health and operator overrides combined into the list
//! of endpoints the routers receive.

use std::collections::{HashMap, HashSet};

use fulcrum_proto::fulcrum::v1::{Endpoint, HealthState, NodeSpec};

use crate::health::NodeHealth;
use crate::weights;

/// Builds the endpoints (sorted by node id) from what the control plane knows.
pub fn build(
    specs: &[NodeSpec],
    health: &HashMap<String, NodeHealth>,
    drained: &HashSet<String>,
) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = specs
        .iter()
        .map(|spec| {
            let h = health.get(&spec.id);
            let probed = h.map_or(HealthState::Unspecified, |h| h.state);
            let state = if drained.contains(&spec.id) {
                HealthState::Draining
            } else {
                probed
            };
            Endpoint {
                spec: Some(spec.clone()),
                health: state as i32,
                weight: weights::weight(spec.capacity, state),
                ready_models: h.map(|h| h.ready_models.clone()).unwrap_or_default(),
            }
        })
        .collect();
    endpoints.sort_by(|a, b| node_id(a).cmp(node_id(b)));
    endpoints
}

/// The id of an endpoint's node ("" for an endpoint without a spec, which is never built).
pub fn node_id(e: &Endpoint) -> &str {
    e.spec.as_ref().map_or("", |s| s.id.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drained_nodes_get_zero_weight() {
        let spec = NodeSpec {
            id: "n".into(),
            capacity: 8,
            ..Default::default()
        };
        let mut health = HashMap::new();
        health.insert(
            "n".to_string(),
            NodeHealth {
                state: HealthState::Healthy,
                ..Default::default()
            },
        );
        let t = build(std::slice::from_ref(&spec), &health, &HashSet::new());
        assert_eq!(t[0].weight, 8.0);
        let t = build(&[spec], &health, &HashSet::from(["n".to_string()]));
        assert_eq!(t[0].weight, 0.0);
        assert_eq!(t[0].health(), HealthState::Draining);
    }
}
