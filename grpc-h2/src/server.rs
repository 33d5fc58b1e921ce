//! An HTTP/2 server on `h2` whose client connections each run on one task, with their calls.
//!
//! Why by hand: hyper's HTTP/2 server (tonic's underneath) runs every stream as a task of its
//! own, and that task wakes the connection's task to write what it queued; a call also passes
//! tower layers, axum's router and tonic's codec on the way in and out. For a unary call whose
//! own work is a few microseconds, or a stream that sends the same few hundred bytes to a
//! thousand subscribers at once, that glue cost more than the work. Here the connection's task
//! accepts each stream and keeps the call in a `FuturesUnordered` beside the connection: a
//! call's answer is queued on the connection and written by the task's next poll of it, with no
//! other task woken. A [`Handler`] serves the calls; the ones it does not serve by hand it
//! hands to tonic's routes ([`RecvBody`] in, [`send_http`] out), unchanged.
//!
//! What it keeps of hyper's server: its HTTP/2 settings ([`Settings::default`]: windows, frame
//! size, header list size, send buffer, the bound on streams reset for protocol errors; no
//! limit on concurrent streams, as tonic set none; no keep-alive pings, as tonic's server sends
//! none unless told to); HTTP/2 only; cancellation (a handler sees the client's RST_STREAM
//! through `SendResponse::poll_reset`); graceful shutdown: on the stop signal every connection
//! sends GOAWAY, finishes its calls in flight and closes, and [`serve`] returns when every
//! connection has. Not kept: hyper's `date` response header (nothing in gRPC reads it).

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::header::{
    CONNECTION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, TRANSFER_ENCODING, UPGRADE,
};
use http_body::{Body as HttpBody, Frame};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::Status;
use tonic::body::Body;
use tonic::service::Routes;
use tower::ServiceExt;

use crate::frame::{GrpcFrame, h2_status};

/// Headers HTTP/2 forbids in a response (RFC 9113, 8.2.2); `h2` refuses a response carrying
/// one, so they are taken out of answers relayed from elsewhere, as hyper did. (Names made
/// once: a `&str` name is parsed again on every removal.)
pub const CONNECTION_HEADERS: [HeaderName; 5] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TRANSFER_ENCODING,
    UPGRADE,
];

/// `content-type` of every gRPC answer.
pub const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");

/// A connection's HTTP/2 settings. The defaults are hyper's server defaults, which Fulcrum's
/// servers had through tonic.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// A stream's receive window: 1 MiB lets a request of a few megabytes stream in without
    /// waiting a round trip per 64 KiB.
    pub stream_window: u32,
    /// The connection's receive window (1 MiB, as the stream's).
    pub connection_window: u32,
    /// Largest frame accepted: 16 KiB, the protocol's smallest maximum.
    pub max_frame_size: u32,
    /// Largest header list accepted: 16 KiB. gRPC metadata is a few hundred bytes; this only
    /// bounds a broken or hostile client.
    pub max_header_list_size: u32,
    /// Streams a client may make the server reset for protocol errors before the connection is
    /// closed (1,024), against clients abusing resets ("MadeYouReset"). (tonic passed hyper no
    /// value, which left it unbounded; bounding it changes nothing for a client that follows
    /// the protocol.)
    pub max_local_error_reset_streams: usize,
    /// Bytes queued per stream beyond what the client's window lets out (400 KiB).
    pub max_send_buffer_size: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            stream_window: 1024 * 1024,
            connection_window: 1024 * 1024,
            max_frame_size: 16 * 1024,
            max_header_list_size: 16 * 1024,
            max_local_error_reset_streams: 1024,
            max_send_buffer_size: 400 * 1024,
        }
    }
}

/// The two ends of a client's connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// This server's address.
    pub local: Option<SocketAddr>,
    /// The client's address.
    pub remote: Option<SocketAddr>,
}

impl Peer {
    /// As tonic's server puts it in a request's extensions (what `Request::remote_addr` reads).
    pub fn connect_info(&self) -> tonic::transport::server::TcpConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: self.remote,
        }
    }
}

/// Serves calls: one [`Handler::call`] per stream a client opens, run on the connection's task.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Serves one call: reads `request`, answers on `respond`. The future runs on the
    /// connection's task beside its other calls: it must not block, and it should stop when
    /// `respond.poll_reset` says the client gave up.
    fn call(
        &self,
        peer: Peer,
        request: http::Request<RecvStream>,
        respond: SendResponse<GrpcFrame>,
    ) -> impl Future<Output = ()> + Send;
}

/// Serves the connections `incoming` yields, each on a task of its own, until `signal`
/// completes; then stops accepting, lets every connection finish its calls and returns when
/// all have closed.
pub async fn serve<H, I>(
    handler: H,
    settings: Settings,
    incoming: I,
    signal: impl Future<Output = ()>,
) where
    H: Handler,
    I: Stream<Item = std::io::Result<TcpStream>>,
{
    accept_until(incoming, signal, |tcp, stop| {
        serve_connection(tcp, handler.clone(), settings, stop)
    })
    .await;
}

/// The accept loop of both servers ([`serve`] and [`crate::own_server::serve`]): `connection`
/// runs on a task of its own for each connection `incoming` yields, with a receiver that
/// changes when `signal` completes (the connection then finishes its calls and closes, dropping
/// the receiver). Returns once every connection has.
pub(crate) async fn accept_until<I, F, C>(
    incoming: I,
    signal: impl Future<Output = ()>,
    connection: F,
) where
    I: Stream<Item = std::io::Result<TcpStream>>,
    F: Fn(TcpStream, watch::Receiver<()>) -> C,
    C: Future<Output = ()> + Send + 'static,
{
    let (stop, stopped) = watch::channel(());
    {
        let mut incoming = pin!(incoming);
        let mut signal = pin!(signal);
        loop {
            tokio::select! {
                () = &mut signal => break,
                next = incoming.next() => match next {
                    Some(Ok(tcp)) => {
                        tokio::spawn(connection(tcp, stopped.clone()));
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "accepting a connection failed"),
                    None => break,
                },
            }
        }
        // `incoming` is dropped here: no new connections.
    }
    let _ = stop.send(());
    drop(stopped);
    // Every connection holds a receiver until it has closed.
    stop.closed().await;
}

/// Serves one client connection until it closes, or until `stop` changes and its calls have
/// finished.
async fn serve_connection<H: Handler>(
    tcp: TcpStream,
    handler: H,
    settings: Settings,
    mut stop: watch::Receiver<()>,
) {
    // Held until the connection is done: the server waits for every receiver to go.
    let _serving = stop.clone();
    let peer = Peer {
        local: tcp.local_addr().ok(),
        remote: tcp.peer_addr().ok(),
    };
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_header_list_size(settings.max_header_list_size)
        .max_local_error_reset_streams(Some(settings.max_local_error_reset_streams))
        .max_send_buffer_size(settings.max_send_buffer_size);
    let mut conn = tokio::select! {
        handshake = builder.handshake::<_, GrpcFrame>(tcp) => match handshake {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP/2 handshake with a client failed");
                return;
            }
        },
        // Stopping before the first call: nothing to finish.
        _ = stop.changed() => return,
    };
    let mut stopping = pin!(async move {
        let _ = stop.changed().await;
    });
    let mut stopped = false;
    let mut calls = FuturesUnordered::new();
    let ended = poll_fn(|cx| {
        if !stopped && stopping.as_mut().poll(cx).is_ready() {
            stopped = true;
            conn.graceful_shutdown();
        }
        // Calls first, then the connection, as long as either has something for the other.
        // Why in this order, and why stop where it stops: a poll of the connection is the
        // costly part of a turn (every queue of `h2` looked at, the socket read), and each of
        // a unary call's two turns needs exactly one. When a request arrives, the connection
        // takes the stream and the call runs until it waits for its node; when the node's
        // answer wakes the call, the call queues its answer and the connection writes it. (The
        // connection first, as before, polled it twice a turn: once for nothing before the
        // answer was queued, or again after a call that queued nothing.) Anything else a call
        // queues on the connection without finishing (a window update, a streamed answer's
        // next message) makes `h2` wake this task, which then polls the connection again.
        let mut turn = 0;
        loop {
            // The calls: new ones run to their first wait, woken ones on. What they answer is
            // queued on the connection; polling it writes it.
            let mut finished = false;
            while let Poll::Ready(Some(())) = calls.poll_next_unpin(cx) {
                finished = true;
            }
            // Nothing new since the connection was last polled in this turn.
            if turn > 0 && !finished {
                return Poll::Pending;
            }
            turn += 1;
            // The socket: frames read (which may wake calls: the loop runs them at once rather
            // than through the scheduler), what the calls queued written, new streams taken.
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((request, respond)))) => {
                        calls.push(handler.call(peer, request, respond));
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    // Closed (and, after GOAWAY, every stream done).
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
        }
    })
    .await;
    if let Err(e) = ended {
        tracing::debug!(error = %e, "client connection ended");
    }
}

/// How a call's wait for its answer ended.
#[derive(Debug)]
pub enum Answered<T> {
    /// The answer.
    Answer(T),
    /// The caller's `grpc-timeout` passed first: answer [`timeout_expired`].
    TimedOut,
    /// The client reset the stream first: there is no one to answer.
    Reset,
}

/// Waits for `answer`, within `timeout` if the caller sent one, unless the client resets the
/// stream first (RST_STREAM): `answer` is then dropped, which cancels what it started.
pub async fn answer_within<T>(
    respond: &mut SendResponse<GrpcFrame>,
    timeout: Option<Duration>,
    answer: impl Future<Output = T>,
) -> Answered<T> {
    answer_unless_reset(|cx| respond.poll_reset(cx).map(|_| ()), timeout, answer).await
}

/// [`answer_within`] for either server's streams: `poll_reset` is ready once the client has
/// reset the stream.
pub(crate) async fn answer_unless_reset<T>(
    mut poll_reset: impl FnMut(&mut Context<'_>) -> Poll<()>,
    timeout: Option<Duration>,
    answer: impl Future<Output = T>,
) -> Answered<T> {
    let mut answer = pin!(async move {
        match timeout {
            Some(t) => tokio::time::timeout(t, answer)
                .await
                .map_or(Answered::TimedOut, Answered::Answer),
            None => Answered::Answer(answer.await),
        }
    });
    poll_fn(|cx| {
        if let Poll::Ready(answered) = answer.as_mut().poll(cx) {
            return Poll::Ready(answered);
        }
        poll_reset(cx).map(|()| Answered::Reset)
    })
    .await
}

/// What tonic's server answers a call that outlives its `grpc-timeout`.
pub fn timeout_expired() -> Status {
    Status::cancelled("Timeout expired")
}

/// Serves a call with tonic's `routes`, as tonic's server would: the caller's `grpc-timeout`
/// as a backstop ([`timeout_expired`]), the call dropped if the client resets it, the response
/// relayed as it streams ([`send_http`]).
pub async fn route(
    routes: Routes,
    request: http::Request<Body>,
    mut respond: SendResponse<GrpcFrame>,
) {
    let timeout = crate::timeout::of(request.headers());
    match answer_within(&mut respond, timeout, routes.oneshot(request)).await {
        Answered::Answer(Ok(response)) => send_http(respond, response).await,
        Answered::Answer(Err(never)) => match never {},
        Answered::TimedOut => send_status(respond, &timeout_expired()),
        Answered::Reset => {}
    }
}

/// Trailers ending a call that succeeded: `grpc-status: 0`.
pub fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from_static("0"),
    );
    trailers
}

/// Answers with a status alone: a trailers-only response, as tonic sends one.
pub fn send_status(mut respond: SendResponse<GrpcFrame>, status: &Status) {
    let mut head = http::Response::new(());
    head.headers_mut().insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
    if let Err(e) = status.add_header(head.headers_mut()) {
        tracing::debug!(error = %e, "a status could not be put in headers");
        head.headers_mut().clear();
        head.headers_mut().insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
        let _ = Status::internal("the answer's status could not be encoded")
            .add_header(head.headers_mut());
    }
    let _ = respond.send_response(head, true);
}

/// Answers with a response from elsewhere (tonic's routes): its headers, then its body as it
/// comes, each chunk waiting for the client's flow-control window, then its trailers.
pub async fn send_http(mut respond: SendResponse<GrpcFrame>, response: http::Response<Body>) {
    let (parts, body) = response.into_parts();
    let mut head = http::Response::from_parts(parts, ());
    let headers = head.headers_mut();
    for name in CONNECTION_HEADERS {
        headers.remove(name);
    }
    if headers
        .get(http::header::TE)
        .is_some_and(|v| v != "trailers")
    {
        headers.remove(http::header::TE);
    }
    let end = body.is_end_stream();
    let Ok(stream) = respond.send_response(head, end) else {
        return;
    };
    if !end {
        pipe(stream, body).await;
    }
}

/// Sends `body` on `tx`; stops when the client resets the stream.
async fn pipe(mut tx: SendStream<GrpcFrame>, body: Body) {
    let mut body = pin!(body);
    loop {
        let next = poll_fn(|cx| {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            body.as_mut().poll_frame(cx).map(Some)
        })
        .await;
        let frame = match next {
            // Reset by the client.
            None => return,
            Some(None) => {
                let _ = tx.send_data(GrpcFrame::raw(Bytes::new()), true);
                return;
            }
            Some(Some(Err(status))) => {
                tracing::debug!(%status, "an answer's body failed");
                tx.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Some(Ok(frame))) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    tx.reserve_capacity(0);
                    let _ = tx.send_trailers(trailers);
                    return;
                }
                continue;
            }
        };
        let end = body.is_end_stream();
        if !data.is_empty() && !wait_for_capacity(&mut tx).await {
            return;
        }
        if tx.send_data(GrpcFrame::raw(data), end).is_err() || end {
            return;
        }
    }
}

/// Waits until the client's window lets some of a chunk out (`h2` sends what it can and keeps
/// the rest until the window grows): false if the stream was reset or failed meanwhile.
pub async fn wait_for_capacity(tx: &mut SendStream<GrpcFrame>) -> bool {
    // A claim of one byte, not the chunk's length: a waiting stream then pins little of the
    // connection's window that other streams could use (hyper does the same).
    tx.reserve_capacity(1);
    poll_fn(|cx| poll_capacity(tx, cx)).await
}

/// The poll inside [`wait_for_capacity`], for a caller that has claimed capacity
/// (`reserve_capacity`): `Ready(true)` once some of the next chunk can go out, `Ready(false)`
/// if the stream was reset or failed.
pub fn poll_capacity(tx: &mut SendStream<GrpcFrame>, cx: &mut Context<'_>) -> Poll<bool> {
    loop {
        if tx.capacity() > 0 {
            return Poll::Ready(true);
        }
        match tx.poll_capacity(cx) {
            Poll::Ready(Some(Ok(_))) => {}
            Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(false),
            Poll::Pending => {
                return if tx.poll_reset(cx).is_ready() {
                    Poll::Ready(false)
                } else {
                    Poll::Pending
                };
            }
        }
    }
}

/// A request body read from its `h2` stream, handing the flow-control window back as its
/// bytes are taken: what tonic's routes read.
pub struct RecvBody {
    recv: RecvStream,
    /// Whether the data frames are over (what remains is the trailers).
    data_done: bool,
}

impl RecvBody {
    /// The body of `recv`.
    pub fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
        }
    }
}

impl HttpBody for RecvBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(h2_status(e)))),
                None => this.data_done = true,
            }
        }
        Poll::Ready(match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(h2_status(e))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}
