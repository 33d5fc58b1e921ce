//! Fulcrum's data plane: the router.
//!
//! A router serves the Open Inference Protocol to clients exactly as a model server would,
//! follows the control plane's routing table over a gRPC stream, and sends each call to the
//! best node: one that serves the model and is healthy, in its own region first, the least
//! loaded of two random choices weighted by the control plane's weights.
//!
//! Layout:
//! - [`balance`]: pure node selection: policies ([`balance::p2c`], [`balance::least_request`],
//!   [`balance::round_robin`], [`balance::ring`]), Triton sequences ([`balance::rendezvous`])
//!   and regions ([`balance::locality`]).
//! - [`endpoint`]: a node's pooled connection, in-flight calls, latency ([`endpoint::peak_ewma`])
//!   and outlier ejection ([`endpoint::outlier`]); `ModelInfer` goes to nodes on the router's
//!   own HTTP/2 client ([`endpoint::unary`]).
//! - [`table`]: the immutable routing table.
//! - [`policy`]: per-model settings from the control plane.
//! - [`router`]: shared router state and the pick (spill-over, limits, ejection cap; a
//!   sequence's node).
//! - [`queue`]: the wait queue of calls that found every node full, served by priority.
//! - [`priority`]: call priorities (the `fulcrum-priority` header, a model's default).
//! - [`auth`]: caller authentication by JSON Web Token (the caller's identity and highest
//!   priority).
//! - [`rate_limit`]: per-model token buckets, per caller key, on each router.
//! - [`batch`]: request batching (calls merged along their first dimension, answers split).
//! - [`cache`]: the router's response cache, for the models whose policy asks for one.
//! - [`shared_cache`]: the response cache's shared level, in Redis (`--cache-redis`).
//! - [`tasks`]: calls made in the background (submit, then fetch or wait for the answer),
//!   held by the router that accepted them.
//! - [`peers`]: other routers (the control plane's directory), asked for the tasks they hold.
//! - [`canary`]: which calls a model's canary takes (pure, property-tested).
//! - [`hedge`]: latency windows for hedging.
//! - [`subscriber`]: following the control plane's routing stream.
//! - [`ingress`]: the services clients call ([`ingress::oip`]), deadlines, and the router's
//!   own HTTP/2 server (`ingress::connection`: `ModelInfer` answered on it directly, every
//!   other call through tonic's routes).
//! - [`validate`]: request checks done before forwarding.
//! - [`limits`]: the inbound message size limit.
//! - [`metrics`]: Prometheus metrics, read from the router's state at each scrape.
//! - [`error`]: errors and their gRPC statuses.
//! - [`shard`]: the serving threads, one single-threaded runtime each.
//! - [`server`]: assemble and serve a router.

#![warn(missing_docs)]

pub mod auth;
pub mod balance;
pub mod batch;
pub mod cache;
pub mod canary;
pub mod endpoint;
pub mod error;
pub mod hedge;
pub mod ingress;
pub mod limits;
pub mod metrics;
pub mod peers;
pub mod policy;
pub mod priority;
pub mod queue;
pub mod rate_limit;
pub mod router;
pub mod server;
pub mod shard;
pub mod shared_cache;
pub mod subscriber;
pub mod table;
pub mod tasks;
pub mod validate;

pub use server::{RouterConfig, serve, serve_with_metrics};
