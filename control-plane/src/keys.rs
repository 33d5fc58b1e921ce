//! The store keyspace. Everything Fulcrum writes lives under [`ROOT`], versioned so a future
//! layout can live beside this one during an upgrade.

/// Root of Fulcrum's keys.
pub const ROOT: &str = "/fulcrum/v1/";

/// Prefix of node specs: `/fulcrum/v1/nodes/<id>` holds a protobuf `NodeSpec`.
pub const NODES: &str = "/fulcrum/v1/nodes/";

/// Prefix of drain overrides: `/fulcrum/v1/overrides/drain/<id>` exists while the node drains.
pub const DRAINS: &str = "/fulcrum/v1/overrides/drain/";

/// Prefix of per-model policies: `/fulcrum/v1/policies/<model>` holds a protobuf `ModelPolicy`.
pub const POLICIES: &str = "/fulcrum/v1/policies/";

/// The routing table the routers receive: a protobuf `RoutingUpdate` snapshot. Its mod revision
/// is the routing version.
pub const ROUTING: &str = "/fulcrum/v1/routing";

/// Key of a node's spec.
pub fn node(id: &str) -> String {
    format!("{NODES}{id}")
}

/// Key of a node's drain override.
pub fn drain(id: &str) -> String {
    format!("{DRAINS}{id}")
}

/// Key of a model's policy.
pub fn policy(model: &str) -> String {
    format!("{POLICIES}{model}")
}
