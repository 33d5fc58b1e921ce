//! Fulcrum's wire protocols, generated from the `.proto` files in this crate's `proto/` folder.
//!
//! - [`inference`]: the Open Inference Protocol v2 (KServe v2) as Triton and MLServer speak it,
//!   with Triton's bidirectional `ModelStreamInfer` and `ModelConfig` (and the part of Triton's
//!   `ModelConfig` message a simulated node fills in, `model_config.proto`).
//! - [`fulcrum::v1`]: Fulcrum's own API: node specs and endpoints (`node.proto`), the routing
//!   stream between control plane and routers (`routing.proto`), operator RPCs (`admin.proto`),
//!   nodes' self-registration (`registration.proto`), calls made in the background by routers
//!   (`tasks.proto`), and the simulated node's control RPC (`sim.proto`).
//!
//! The generated code is not documented item by item; the `.proto` files are.

#![warn(missing_docs)]

/// The Open Inference Protocol v2 (package `inference`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod inference {
    tonic::include_proto!("inference");
}

/// Fulcrum's own protocols.
pub mod fulcrum {
    /// Version 1 of Fulcrum's API (package `fulcrum.v1`).
    #[allow(missing_docs, unreachable_pub, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("fulcrum.v1");
    }
}
