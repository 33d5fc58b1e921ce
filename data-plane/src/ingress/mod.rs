//! What the router serves to clients.
//!
//! - [`oip`]: `inference.GRPCInferenceService`, the Open Inference Protocol v2, including
//!   Triton's bidirectional `ModelStreamInfer`.
//! - [`forward`]: one unary call's attempts, retries, hedging and deadline.
//! - [`deadline`]: the `grpc-timeout` header.

pub mod deadline;
pub mod forward;
pub mod oip;
