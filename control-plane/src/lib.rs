//! Fulcrum's control plane.
//!
//! It keeps the registry of inference nodes in a store (etcd in production, an embedded file
//! store on one machine), probes every node's health, turns specs, health and overrides into a
//! weighted routing table, writes that table to the store, and streams it to every router.
//!
//! Layout:
//! - [`store`]: the key-value interface and its backends ([`store::etcd`], [`store::embedded`]).
//! - [`keys`]: the store keyspace.
//! - [`registry`]: validating and storing node specs.
//! - [`overrides`]: operator overrides: drain, cordon, weight, region evacuation.
//! - [`health`]: the health state machine and the active [`health::prober`] (which calls nodes
//!   through `health::probe_conn`, a minimal gRPC client on `h2`, one kept connection per node).
//! - [`load`]: live load from the routers' reports, summed over routers and replicas.
//! - [`global_load`]: the leader's global load view, merged beside the control loop.
//! - [`weights`]: the weight function, and its damping.
//! - [`policies`]: per-model routing policies.
//! - [`table`]: specs + health + overrides → the routing table.
//! - [`control_loop`]: recompute and write the table when anything changes.
//! - [`publisher`]: follow the table in the store, as versions with their deltas, each
//!   encoded once.
//! - [`subscribe`]: the `Subscribe` RPC, every stream sending the shared encoded versions,
//!   served by hand on the replica's HTTP/2 server (`fulcrum-grpc-h2`).
//! - [`directory`]: where routers are (for the background calls they hold), listed with a
//!   lease while their streams last.
//! - [`self_registration`]: nodes registering themselves with a lease, and their load reports.
//! - [`admin`]: operator RPCs, and [`auth`]: who may call them and who may open the routers'
//!   and nodes' streams.
//! - [`metrics`]: Prometheus metrics, read from the replica's state at each scrape.
//! - [`error`]: errors and their gRPC statuses.
//! - [`server`]: assemble and serve a replica (`Subscribe` by hand, the other services
//!   through tonic's routes).

#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod control_loop;
pub mod directory;
pub mod error;
pub mod global_load;
pub mod health;
pub mod keys;
pub mod load;
pub mod metrics;
pub mod overrides;
pub mod policies;
pub mod publisher;
pub mod registry;
pub mod self_registration;
pub mod server;
pub mod store;
pub mod subscribe;
pub mod table;
pub mod weights;

pub use error::Error;
pub use server::{AdminAuth, ControlPlaneConfig, StreamAuth, serve, serve_with_metrics};
