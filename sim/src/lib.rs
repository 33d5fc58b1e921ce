//! Tools to exercise and measure Fulcrum without real inference servers.
//!
//! - [`node`]: a simulated Open Inference Protocol v2 node (`fulcrum node-sim`): an echo model
//!   with a configurable service-time distribution, bounded concurrency and queue, injectable
//!   errors and hangs, gRPC health, and a control RPC to change its behaviour while it runs.
//! - [`load`]: an open-loop load generator that measures latency from each call's scheduled
//!   start (no coordinated omission), checks every answer, and reports which node and region
//!   served the calls.
//! - [`register`]: a node registering itself with the control plane and reporting its load
//!   (`fulcrum node-sim --register`).

#![warn(missing_docs)]

pub mod load;
pub mod node;
pub mod register;

pub use load::{LoadConfig, LoadError, LoadReport};
pub use node::{NodeSim, NodeSimConfig, RunningNodeSim, ServiceTime, SimControls};
pub use register::{RegisterConfig, Registrar, RegistrationState};
