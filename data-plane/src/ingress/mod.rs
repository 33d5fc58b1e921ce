//! What the router serves to clients.
//!
//! - [`oip`]: `inference.GRPCInferenceService`, the Open Inference Protocol v2, including
//!   Triton's bidirectional `ModelStreamInfer`.
//! - [`deadline`]: the `grpc-timeout` header.

pub mod deadline;
pub mod oip;
