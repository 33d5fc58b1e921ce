//! gRPC on HTTP/2 by hand, for the two places where Fulcrum's own work per message is
//! smaller than the glue tonic and hyper put around it: the router's `ModelInfer` path and the
//! control plane's `Subscribe` streams (a version sent to a thousand routers at once).
//!
//! What this crate replaces is hyper's server dispatch, which runs every stream as a task of its
//! own that wakes the connection's task to write: here a connection and all its calls run on
//! one task. Everything a service does not want to serve by hand still goes to tonic's routes,
//! unchanged. The control plane serves on the `h2` crate (hyper's HTTP/2 implementation,
//! [`server`]); the router, whose calls are many and small, on an HTTP/2 server and client of
//! Fulcrum's own ([`own_server`], [`client`]), because there `h2` itself was the largest cost
//! left in user space.
//!
//! - [`answer`]: a unary answer on [`client`] read as tonic's client reads it (its status, its
//!   one message), for the router's calls to nodes and the load generator's calls.
//! - [`client`]: an HTTP/2 client of Fulcrum's own for unary calls (the router's calls to its
//!   nodes): the calling task writes its request to the socket itself, one task per
//!   connection reads. Not on `h2`: there `h2` was the largest cost of the router's user space.
//! - [`own_server`]: the router's HTTP/2 server, of Fulcrum's own: the same one-task structure
//!   as [`server`], the same settings, hardened against abusive clients (bounded header
//!   blocks, streams and unread output; a budget of resets); the gRPC answers on it.
//! - [`frame`]: a gRPC message as `h2` sends it ([`GrpcFrame`]: the prefix and the message, one
//!   `writev`), a body as it arrives ([`Received`]), and `h2` errors as gRPC statuses.
//! - [`server`]: the control plane's HTTP/2 server, on `h2` ([`server::serve`], a
//!   [`server::Handler`] per service), and
//!   the ways to answer a stream: a status alone, a response from tonic's routes, a request
//!   body handed to them.
//! - [`timeout`]: the caller's `grpc-timeout`.
//! - `wire`: HTTP/2 frames and HPACK encodings shared by [`client`] and [`own_server`];
//!   `hpack`: their HPACK decoder and typed-field memory; `fuzz` (tests): random frame
//!   sequences against both.

#![warn(missing_docs)]

pub mod answer;
pub mod client;
pub mod frame;
#[cfg(test)]
mod fuzz;
mod hpack;
pub mod own_server;
pub mod server;
pub mod timeout;
mod wire;

pub use frame::{GrpcFrame, Received, h2_status};
