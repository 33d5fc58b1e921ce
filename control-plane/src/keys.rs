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

/// Prefix of the router directory: `/fulcrum/v1/routers/<id>` holds a protobuf `RouterEntry`,
/// written with a lease by the replica holding the router's stream (see `directory.rs`).
pub const ROUTERS: &str = "/fulcrum/v1/routers/";

/// Prefix of the routing table the routers receive. It is split so that a change to one node
/// rewrites one small key, not the whole table:
/// - `/fulcrum/v1/routing/nodes/<id>`: the node's `Endpoint` (spec, health, weight);
/// - [`ROUTING_COMMIT`]: a `RoutingCommit` (policies), written last in every batch; its mod
///   revision is the routing version;
/// - [`ROUTING_PENDING`]: present while a batch that spans several transactions is half
///   written.
pub const ROUTING: &str = "/fulcrum/v1/routing/";

/// Prefix of the routing table's per-node entries.
pub const ROUTING_NODES: &str = "/fulcrum/v1/routing/nodes/";

/// The routing table's commit marker: see [`ROUTING`].
pub const ROUTING_COMMIT: &str = "/fulcrum/v1/routing/commit";

/// Written by the first transaction of a batch that spans several and deleted by its last one
/// (with the commit marker): a replica that lists the table while it exists knows that the
/// entries it read may be half a batch, and waits for the next commit before publishing.
pub const ROUTING_PENDING: &str = "/fulcrum/v1/routing/pending";

/// Where the whole table lived as one value before it was split (deleted by the first leader
/// that writes the split table).
pub const LEGACY_ROUTING: &str = "/fulcrum/v1/routing";

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

/// Key of a node's routing entry.
pub fn routing_node(id: &str) -> String {
    format!("{ROUTING_NODES}{id}")
}
