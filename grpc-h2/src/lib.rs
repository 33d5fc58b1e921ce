//! gRPC on HTTP/2 by hand (the server on the `h2` crate, the client of Fulcrum's own), for the two places where Fulcrum's own work per message is
//! smaller than the glue tonic and hyper put around it: the router's `ModelInfer` path and the
//! control plane's `Subscribe` streams (a version sent to a thousand routers at once).
//!
//! `h2` is the HTTP/2 implementation hyper (and so tonic) is built on; what this crate replaces
//! is hyper's server dispatch, which runs every stream as a task of its own that wakes the
//! connection's task to write. Here a connection and all its calls run on one task. Everything a
//! service does not want to serve by hand still goes to tonic's routes, unchanged.
//!
//! - [`client`]: an HTTP/2 client of Fulcrum's own for unary calls (the router's calls to its
//!   nodes): the calling task writes its request to the socket itself, one task per
//!   connection reads; HPACK decoding by `loona-hpack`. Not on `h2`: there `h2` was the largest
//!   cost of the router's user space.
//! - [`frame`]: a gRPC message as `h2` sends it ([`GrpcFrame`]: the prefix and the message, one
//!   `writev`), a body as it arrives ([`Received`]), and `h2` errors as gRPC statuses.
//! - [`server`]: the HTTP/2 server ([`server::serve`], a [`server::Handler`] per service), and
//!   the ways to answer a stream: a status alone, a response from tonic's routes, a request
//!   body handed to them.
//! - [`timeout`]: the caller's `grpc-timeout`.

#![warn(missing_docs)]

pub mod client;
pub mod frame;
pub mod server;
pub mod timeout;

pub use frame::{GrpcFrame, Received, h2_status};
