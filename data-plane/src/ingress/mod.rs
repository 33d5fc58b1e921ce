//! What the router serves to clients.
//!
//! - [`oip`]: `inference.GRPCInferenceService`, the Open Inference Protocol v2, including
//!   Triton's bidirectional `ModelStreamInfer`.
//! - `connection`: the router's HTTP/2 server: a client connection and its calls on one
//!   task, `ModelInfer` answered on `h2` directly, every other call handed to the routes.
//! - [`infer`]: `ModelInfer` forwarded as the client's bytes, answered with the node's.
//! - [`forward`]: one unary call's attempts, retries, hedging and deadline.
//! - [`fallback`]: a call its model cannot serve, sent once to the model's fallback.
//! - `batched`: calls of a batching model, in their batches ([`crate::batch`]).
//! - [`passthrough`]: any other gRPC API, forwarded undecoded by the `x-fulcrum-model` header.
//! - [`tasks`]: `fulcrum.v1.Tasks`, `ModelInfer` calls made in the background.
//! - [`deadline`]: the `grpc-timeout` header.
//! - `node_status`: a failed call to a node as the caller sees it.
//! - `stream_dialect`: a node's `ModelStreamInfer` answers in Triton's or MLServer's form.

mod batched;
pub(crate) mod connection;
pub mod deadline;
pub mod fallback;
pub mod forward;
pub mod infer;
pub(crate) mod node_status;
pub mod oip;
pub mod passthrough;
mod stream_dialect;
pub mod tasks;
