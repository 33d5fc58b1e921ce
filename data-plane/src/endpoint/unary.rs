//! Unary calls to a node on an HTTP/2 connection of the router's own
//! ([`fulcrum_grpc_h2::client`]) instead of through tonic's `Channel`.
//!
//! Why by hand: on the `ModelInfer` hot path the glue between a call and its connection cost
//! more than the node's answer. Through the `Channel` each call went through tonic's `Buffer`
//! (an mpsc hop to a worker task) and hyper's dispatch (another hop to the connection task),
//! and hyper sent the body from a separate task once it had flow-control capacity: the request
//! left in two writes, each waking the node. On the `h2` crate's client directly (the step
//! before this one) the request left in one write, but `h2` itself was then the largest cost
//! in the router's user space. Now the calling task encodes HEADERS and DATA and writes them to
//! the socket itself; the connection's task only reads (measured: router CPU per call 12-14 %
//! lower than on `h2`'s client, in an A/B in one stack).
//!
//! What this keeps of the `Channel`'s behaviour (see `super::NodeConn`):
//! - one connection per node and per serving thread, made on first use (or in the background
//!   by `NodeConn::preconnect`), concurrent first calls sharing one connection attempt;
//! - the same connect timeout, TCP_NODELAY, hyper's HTTP/2 settings (windows, header list
//!   size, no push), and keep-alive pings every [`super::KEEPALIVE_INTERVAL`], the connection
//!   dropped when one goes unanswered for [`super::KEEPALIVE_TIMEOUT`];
//! - a new connection once the old one has ended (EOF, reset, GOAWAY); a call the node never
//!   processed (the connection had ended, GOAWAY below its stream, REFUSED_STREAM) is sent
//!   again, once;
//! - failures as statuses whose source is the local error ([`client::Error`], or a
//!   [`ConnectError`] around the `io::Error`), so `ingress::node_status` reads them as before:
//!   a refused connection is a connect failure (reconnect backoff, outlier ejection), a
//!   connection lost under a call is UNAVAILABLE;
//! - the answer's status from `grpc-status`, `grpc-message` and `grpc-status-details-bin`, in
//!   the trailers or in the headers of a trailers-only answer, else from the HTTP status, as
//!   tonic's client infers it;
//! - cancellation: dropping the call's future resets its stream (RST_STREAM CANCEL), so the
//!   node stops working on it.
//!
//! Streams, the other OIP methods, health and pass-through keep the `Channel`: they are not on
//! the hot path, or (pass-through) forward bodies of any length as they come.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fulcrum_grpc_h2::{answer, client};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue, TE, USER_AGENT};
use http::uri::{Authority, PathAndQuery};
use tokio::net::TcpStream;
use tonic::{Response, Status};

use super::{CONNECT_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// The streams' and the connection's receive windows, hyper's client defaults (which the
/// `Channel` used): large enough that a multi-megabyte tensor answer streams without waiting
/// for window updates on a data-center round trip.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// Largest header list accepted from a node: hyper's client default. A node's answer headers
/// are a few hundred bytes; this only bounds a broken one.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Streams opened before the node's SETTINGS say how many it allows: hyper's client default.
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// Sent to nodes as `user-agent`.
const AGENT: &str = concat!("fulcrum-router/", env!("CARGO_PKG_VERSION"));

/// A connection attempt that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection failed (refused, unreachable, ...).
    #[error("cannot connect to {address}")]
    Io {
        /// The node's address.
        address: String,
        /// What the socket said.
        #[source]
        source: std::io::Error,
    },
    /// The node did not accept the connection within the connect timeout.
    #[error("connecting to {address} timed out")]
    TimedOut {
        /// The node's address.
        address: String,
    },
    /// The HTTP/2 preface could not be sent.
    #[error("HTTP/2 handshake with {address} failed")]
    Handshake {
        /// The node's address.
        address: String,
        /// What the connection said.
        #[source]
        source: client::Error,
    },
    /// The runtime that was connecting stopped.
    #[error("connecting to {address} was abandoned")]
    Abandoned {
        /// The node's address.
        address: String,
    },
}

/// The status of a call that could not connect: a local error (UNKNOWN, with the error as its
/// source), which `node_status` reads as it read the `Channel`'s.
fn connect_status(e: Arc<ConnectError>) -> Status {
    let mut status = Status::unknown(e.to_string());
    status.set_source(e);
    status
}

/// A live connection (clones share it).
#[derive(Clone)]
struct Live {
    conn: client::Connection,
}

impl Live {
    fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }
}

type Connecting = Shared<BoxFuture<'static, Result<Live, Arc<ConnectError>>>>;

#[derive(Default)]
enum State {
    #[default]
    Idle,
    Connecting(Connecting),
    Ready(Live),
}

/// One serving thread's connection to a node for unary calls.
#[derive(Default)]
pub(crate) struct UnaryConn {
    /// Only the owning thread takes this lock, never across an await: it is never contended.
    state: Mutex<State>,
}

impl std::fmt::Debug for UnaryConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnaryConn").finish_non_exhaustive()
    }
}

/// Where a node is, for connecting and for the requests' `:authority`.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) address: String,
    pub(crate) authority: Authority,
}

impl UnaryConn {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves nothing half-done: the state is replaced whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live connection, connecting first if there is none (or the last one ended).
    async fn live(&self, target: &Target) -> Result<Live, Arc<ConnectError>> {
        let connecting = {
            let mut state = self.lock();
            match &*state {
                State::Ready(live) if !live.is_closed() => return Ok(live.clone()),
                State::Connecting(c) => c.clone(),
                _ => {
                    let c = start_connect(target.clone());
                    *state = State::Connecting(c.clone());
                    c
                }
            }
        };
        let result = connecting.clone().await;
        let mut state = self.lock();
        if matches!(&*state, State::Connecting(c) if c.ptr_eq(&connecting)) {
            *state = match &result {
                Ok(live) => State::Ready(live.clone()),
                Err(_) => State::Idle,
            };
        }
        result
    }

    /// Whether a live connection is in place.
    pub(crate) fn is_ready(&self) -> bool {
        matches!(&*self.lock(), State::Ready(live) if !live.is_closed())
    }

    /// Connects now if there is no connection (a failure is forgotten: the next call tries
    /// again).
    pub(crate) async fn preconnect(&self, target: &Target) {
        let _ = self.live(target).await;
    }

    /// Sends one unary call: `message` (one encoded protobuf message) to `path` with `headers`
    /// (the caller's metadata, `grpc-timeout` included), and reads the answer, a message of at
    /// most `max_response` bytes.
    pub(crate) async fn call(
        &self,
        target: &Target,
        path: PathAndQuery,
        headers: HeaderMap,
        message: Bytes,
        max_response: usize,
    ) -> Result<Response<Bytes>, Status> {
        let len = u32::try_from(message.len()).map_err(|_| {
            Status::resource_exhausted(format!(
                "a {} byte message cannot be sent in one gRPC frame",
                message.len()
            ))
        })?;
        let l = len.to_be_bytes();
        let prefix = [0, l[0], l[1], l[2], l[3]];
        let mut headers = headers;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        headers.insert(USER_AGENT, HeaderValue::from_static(AGENT));

        // A call the node never processed (the connection had ended, the node said GOAWAY
        // before reading it, or refused its stream) is sent again, once, on a live connection.
        let mut fresh = false;
        loop {
            let live = self.live(target).await.map_err(connect_status)?;
            let request = client::Request {
                path: path.as_str(),
                authority: target.authority.as_str(),
                headers: &headers,
                prefix,
                message: message.clone(),
            };
            match live.conn.call(request, max_response).await {
                Ok(answer) => return answer::read_answer(answer, max_response),
                Err(e) if e.is_unprocessed() && !fresh => {
                    tracing::debug!(node = %target.address, error = %e, "call not processed; sending it again");
                    fresh = true;
                }
                Err(e) => return Err(client_status(e)),
            }
        }
    }
}

/// The status of a call the connection failed, with the error as its source (so that
/// `node_status` reads it as a local error, not as a status the node sent).
fn client_status(e: client::Error) -> Status {
    let mut status = Status::new(e.code(), format!("call to the node failed: {e}"));
    status.set_source(Arc::new(e));
    status
}

/// Starts connecting in a task of its own (a call that gives up waiting does not abandon the
/// attempt other calls may be waiting for).
fn start_connect(target: Target) -> Connecting {
    let address = target.address.clone();
    let task = tokio::spawn(connect(target));
    async move {
        task.await
            .unwrap_or_else(|_| Err(Arc::new(ConnectError::Abandoned { address })))
    }
    .boxed()
    .shared()
}

async fn connect(target: Target) -> Result<Live, Arc<ConnectError>> {
    let address = target.address;
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&address)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => return Err(Arc::new(ConnectError::Io { address, source })),
        Err(_) => return Err(Arc::new(ConnectError::TimedOut { address })),
    };
    if let Err(source) = tcp.set_nodelay(true) {
        return Err(Arc::new(ConnectError::Io { address, source }));
    }
    let config = client::Config {
        stream_window: STREAM_WINDOW,
        connection_window: CONNECTION_WINDOW,
        max_header_list_size: MAX_HEADER_LIST_SIZE,
        initial_max_streams: INITIAL_MAX_SEND_STREAMS,
        keepalive_interval: KEEPALIVE_INTERVAL,
        keepalive_timeout: KEEPALIVE_TIMEOUT,
    };
    match client::Connection::handshake(tcp, config).await {
        Ok(conn) => Ok(Live { conn }),
        Err(source) => Err(Arc::new(ConnectError::Handshake { address, source })),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use h2::RecvStream;
    use h2::server::SendResponse;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use bytes::BytesMut;

    use tonic::Code;

    use super::*;
    use crate::endpoint::NodeConn;
    use crate::ingress::node_status;

    const PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

    /// A request as the node saw it: headers and body.
    type Seen = (http::request::Parts, Bytes);

    /// An HTTP/2 server on loopback answering each request with `answer`; every request it
    /// reads is also sent on the returned channel. Returns its address and a count of the
    /// connections it accepted.
    async fn node<F>(answer: F) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>, Arc<AtomicU32>)
    where
        F: Fn(SendResponse<Bytes>) + Clone + Send + 'static,
    {
        node_with(answer, false).await
    }

    /// [`node`], closing each connection (GOAWAY) after its first answer when `goaway`.
    async fn node_with<F>(
        answer: F,
        goaway: bool,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>, Arc<AtomicU32>)
    where
        F: Fn(SendResponse<Bytes>) + Clone + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let conns = Arc::new(AtomicU32::new(0));
        let count = conns.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (answer, seen_tx) = (answer.clone(), seen_tx.clone());
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else {
                        return;
                    };
                    // Polling `accept` drives the connection: requests are served by tasks.
                    while let Some(Ok((request, respond))) = conn.accept().await {
                        if goaway {
                            // The request accepted is still served, then the connection ends.
                            conn.graceful_shutdown();
                        }
                        let (answer, seen_tx) = (answer.clone(), seen_tx.clone());
                        tokio::spawn(async move {
                            let (parts, body) = request.into_parts();
                            let body = read_all(body).await;
                            let _ = seen_tx.send((parts, body));
                            answer(respond);
                        });
                    }
                });
            }
        });
        (addr, seen, conns)
    }

    async fn read_all(mut body: RecvStream) -> Bytes {
        let mut all = BytesMut::new();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            all.extend_from_slice(&chunk);
        }
        all.freeze()
    }

    fn framed(message: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.extend_from_slice(&[0]);
        b.extend_from_slice(&(message.len() as u32).to_be_bytes());
        b.extend_from_slice(message);
        b.freeze()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|&(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    /// Answers `message` then `trailers`.
    fn reply(
        mut respond: SendResponse<Bytes>,
        message: Option<&[u8]>,
        trailers: &[(&'static str, &'static str)],
    ) {
        let response = http::Response::new(());
        let mut stream = respond.send_response(response, false).unwrap();
        if let Some(m) = message {
            stream.send_data(framed(m), false).unwrap();
        }
        stream.send_trailers(headers(trailers)).unwrap();
    }

    fn conn_to(addr: SocketAddr) -> NodeConn {
        NodeConn::new("n", &addr.to_string(), "a", 0, Arc::default()).unwrap()
    }

    async fn call(node: &NodeConn, message: &'static [u8]) -> Result<Response<Bytes>, Status> {
        node.unary(
            PathAndQuery::from_static(PATH),
            headers(&[("grpc-timeout", "2000000u")]),
            Bytes::from_static(message),
            1024,
        )
        .await
    }

    #[tokio::test]
    async fn a_call_reaches_the_node_framed_and_its_answer_comes_back() {
        let (addr, mut seen, _) = node(|respond| {
            reply(
                respond,
                Some(b"answer"),
                &[("grpc-status", "0"), ("x-trailer", "t")],
            );
        })
        .await;
        let node = conn_to(addr);
        let response = call(&node, b"question").await.unwrap();
        assert_eq!(response.get_ref(), &Bytes::from_static(b"answer"));
        assert_eq!(response.metadata().get("x-trailer").unwrap(), "t");
        let (parts, body) = seen.recv().await.unwrap();
        assert_eq!(body, framed(b"question"));
        assert_eq!(parts.method, http::Method::POST);
        assert_eq!(parts.uri.path(), PATH);
        assert_eq!(parts.uri.authority().unwrap().as_str(), addr.to_string());
        assert_eq!(parts.headers["content-type"], "application/grpc");
        assert_eq!(parts.headers["te"], "trailers");
        assert_eq!(parts.headers["grpc-timeout"], "2000000u");
        // Later calls share the connection.
        call(&node, b"again").await.unwrap();
    }

    #[tokio::test]
    async fn the_nodes_statuses_are_read_from_trailers_headers_and_http() {
        // One server per case keeps each answer simple.
        async fn status_of(answer: fn(SendResponse<Bytes>)) -> Status {
            let (addr, _seen, _) = node(answer).await;
            call(&conn_to(addr), b"q").await.unwrap_err()
        }
        // Trailers-only.
        let s = status_of(|mut respond| {
            let mut response = http::Response::new(());
            *response.headers_mut() =
                headers(&[("grpc-status", "5"), ("grpc-message", "no%20model")]);
            respond.send_response(response, true).unwrap();
        })
        .await;
        assert_eq!((s.code(), s.message()), (Code::NotFound, "no model"));
        // A status after the message.
        let s = status_of(|respond| {
            reply(
                respond,
                Some(b"partial"),
                &[("grpc-status", "13"), ("grpc-message", "oops")],
            );
        })
        .await;
        assert_eq!((s.code(), s.message()), (Code::Internal, "oops"));
        // Details that are not base64 do not panic the router.
        let s = status_of(|respond| {
            reply(
                respond,
                None,
                &[("grpc-status", "8"), ("grpc-status-details-bin", "@@@")],
            );
        })
        .await;
        assert_eq!(s.code(), Code::ResourceExhausted);
        // No grpc-status at all: from the HTTP status.
        let s = status_of(|mut respond| {
            let mut response = http::Response::new(());
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            respond.send_response(response, true).unwrap();
        })
        .await;
        assert_eq!(s.code(), Code::Unavailable);
        let s = status_of(|respond| reply(respond, Some(b"m"), &[])).await;
        assert_eq!(s.code(), Code::Unknown);
        // OK without a message.
        let s = status_of(|respond| reply(respond, None, &[("grpc-status", "0")])).await;
        assert_eq!(s.code(), Code::Internal);
        // Larger than the limit (1,024 bytes).
        let s = status_of(|respond| {
            reply(respond, Some(&[7; 2000]), &[("grpc-status", "0")]);
        })
        .await;
        assert_eq!(s.code(), Code::OutOfRange);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let status = call(&conn_to(addr), b"q").await.unwrap_err();
        assert!(node_status::is_connect_failure(&status), "{status:?}");
        assert_eq!(node_status::from_node(status).code(), Code::Unavailable);
    }

    #[tokio::test]
    async fn a_node_that_goes_away_is_reconnected_to() {
        // Each connection answers one call, then says GOAWAY and closes.
        let (addr, _seen, conns) = node_with(
            |respond| reply(respond, Some(b"a"), &[("grpc-status", "0")]),
            true,
        )
        .await;
        let node = conn_to(addr);
        call(&node, b"q").await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while node.shared_unary.is_ready() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the connection never ended"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        call(&node, b"q").await.unwrap();
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn dropping_a_call_resets_its_stream() {
        let (reset_tx, mut reset) = mpsc::unbounded_channel();
        let (addr, _seen, _) = node(move |mut respond| {
            let reset_tx = reset_tx.clone();
            tokio::spawn(async move {
                let reason = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                let _ = reset_tx.send(reason.ok());
            });
        })
        .await;
        let node = conn_to(addr);
        let answered = tokio::time::timeout(Duration::from_millis(200), call(&node, b"q")).await;
        assert!(answered.is_err(), "the node never answers");
        assert_eq!(reset.recv().await.unwrap(), Some(h2::Reason::CANCEL));
    }
}
