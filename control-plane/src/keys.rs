//! The store keyspace. Everything Fulcrum writes lives under [`ROOT`], versioned so a future
//! layout can live beside this one during an upgrade.

/// Root of Fulcrum's keys.
pub const ROOT: &str = "/fulcrum/v1/";

/// Prefix of node specs: `/fulcrum/v1/nodes/<id>` holds a protobuf `NodeSpec`.
pub const NODES: &str = "/fulcrum/v1/nodes/";

/// Prefix of operator overrides (drain, cordon, weight, region); see `overrides.rs`.
pub const OVERRIDES: &str = "/fulcrum/v1/overrides/";

/// Prefix of per-model policies: `/fulcrum/v1/policies/<model>` holds a protobuf `ModelPolicy`.
pub const POLICIES: &str = "/fulcrum/v1/policies/";

/// Prefix of live load: `/fulcrum/v1/load/<replica>` holds a protobuf `LoadReport`, the sum of
/// what that replica's routers report.
pub const LOAD: &str = "/fulcrum/v1/load/";

/// The routing table the routers receive: a protobuf `RoutingUpdate` snapshot. Its mod revision
/// is the routing version.
pub const ROUTING: &str = "/fulcrum/v1/routing";

/// Key of a node's spec.
pub fn node(id: &str) -> String {
    format!("{NODES}{id}")
}

/// Key of a model's policy.
pub fn policy(model: &str) -> String {
    format!("{POLICIES}{model}")
}

/// Key of a replica's load sum.
pub fn load(replica: &str) -> String {
    format!("{LOAD}{replica}")
}
