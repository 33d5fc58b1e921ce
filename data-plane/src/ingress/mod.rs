//! What the router serves to clients.
//!
//! - [`oip`]: `inference.GRPCInferenceService`, the Open Inference Protocol v2, including
//!   Triton's bidirectional `ModelStreamInfer`.
//! - [`forward`]: one unary call's attempts, retries, hedging and deadline.
//! - [`passthrough`]: any other gRPC API, forwarded undecoded by the `x-fulcrum-model` header.
//! - [`deadline`]: the `grpc-timeout` header.

pub mod deadline;
pub mod forward;
pub mod oip;
pub mod passthrough;
