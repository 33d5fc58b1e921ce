//! An HTTP/2 client for unary gRPC calls, written for the router's calls to its nodes.
//!
//! Why our own and not `h2`'s client: on the router's `ModelInfer` path `h2` was the largest
//! single cost in user space (perf: a fifth of the router's samples for both of a call's
//! connections, spread thin over stream state machines, prioritization, flow-control
//! bookkeeping and HPACK), and the router's user-space time per call was twice nginx's. A
//! unary call needs a small part of HTTP/2: one request sent whole, one answer gathered whole.
//! Here a call encodes its HEADERS and DATA frames into the connection's output and writes
//! them to the socket itself, under the connection's lock (no task is woken to write them); the
//! connection's task reads, sorts frames to their calls and wakes the call when its answer is
//! complete. HPACK decoding is Fulcrum's own (`crate::hpack`);
//! requests are encoded without the dynamic table (static-table names, literal values), which
//! needs no state and which every decoder accepts.
//!
//! What it implements of RFC 9113: the preface and SETTINGS (both ways, acknowledged), flow
//! control both ways (requests wait for window; the answer's windows are handed back as data
//! arrives), the peer's concurrent-stream limit (calls wait for a free stream), CONTINUATION,
//! padding, PING (answered; and sent as a keep-alive, the connection dropped when one goes
//! unanswered), RST_STREAM both ways (a dropped call resets its stream with CANCEL), GOAWAY
//! (calls above its last stream id fail as never processed, the rest finish), and the
//! connection errors a peer can cause (a frame too large, a window overflow, a malformed header
//! block, a push promise: the connection is closed with GOAWAY and its calls fail). It never
//! panics on the peer's bytes. What it does not: server push (disabled in SETTINGS), priorities
//! (ignored, as RFC 9113 allows), streaming calls, TLS.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::frame::Received;
use crate::hpack;
use crate::wire::StreamMap;
pub use crate::wire::reason;
use crate::wire::{
    DEFAULT_MAX_FRAME, DEFAULT_WINDOW, MAX_WINDOW, Out, PREFACE, ParsedFrame, apply_settings,
    finish_header_block, flag, frame_head, grow_connection_window, hpack_headers, hpack_literal,
    kind, parse_frame, read_once, rst_stream, setting, window_update,
};

/// HPACK dynamic table size this client's decoder allows the peer (the protocol's default; a
/// node's answers repeat a handful of headers, which fit many times over).
const HEADER_TABLE_SIZE: usize = 4_096;

/// Frames read from the socket per turn of the connection's task before it lets other tasks of
/// its thread run: a peer that sends without pause must not starve the thread's calls.
const READS_PER_TURN: usize = 16;

/// How a connection is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Receive window of each stream (SETTINGS_INITIAL_WINDOW_SIZE).
    pub stream_window: u32,
    /// Receive window of the connection (raised by a WINDOW_UPDATE right after the preface).
    pub connection_window: u32,
    /// Largest header list accepted in an answer (SETTINGS_MAX_HEADER_LIST_SIZE); larger ones
    /// fail the call.
    pub max_header_list_size: u32,
    /// Streams opened at most before the peer's SETTINGS say how many it allows.
    pub initial_max_streams: usize,
    /// A PING is sent this long after the last one was answered.
    pub keepalive_interval: Duration,
    /// The connection is dropped when a PING is not answered within this time.
    pub keepalive_timeout: Duration,
}

/// Why a call on a connection failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Reading or writing the socket failed (the connection is gone).
    #[error("connection to the node lost: {0}")]
    Io(#[source] Arc<io::Error>),
    /// The node closed the connection.
    #[error("the node closed the connection")]
    Eof,
    /// The node reset the call's stream with this HTTP/2 error code.
    #[error("the node reset the stream (HTTP/2 error code {0:#x})")]
    Reset(u32),
    /// The node said GOAWAY before it processed the call (it may be sent again).
    #[error(
        "the node is closing the connection (GOAWAY, HTTP/2 error code {0:#x}); the call was not processed"
    )]
    GoneAway(u32),
    /// The connection had ended before the call could be sent (it may be sent again).
    #[error("the connection to the node had ended")]
    Closed,
    /// The node broke HTTP/2; the connection was closed with this error code.
    #[error("HTTP/2 protocol error from the node (code {code:#x}): {what}")]
    Protocol {
        /// The HTTP/2 error code sent in GOAWAY.
        code: u32,
        /// What was wrong.
        what: &'static str,
    },
    /// The answer's headers could not be read (one call fails, the connection stays).
    #[error("the node's answer headers are malformed: {0}")]
    BadHeaders(&'static str),
    /// A keep-alive PING went unanswered.
    #[error("the node did not answer a keep-alive ping within {0:?}")]
    KeepaliveTimeout(Duration),
}

impl Error {
    /// Whether the node never processed the call, so that it may be sent again on a new
    /// connection without risk of running twice.
    pub fn is_unprocessed(&self) -> bool {
        matches!(
            self,
            Error::Closed | Error::GoneAway(_) | Error::Reset(reason::REFUSED_STREAM)
        )
    }

    /// The gRPC status code for this failure: HTTP/2 error codes as the gRPC over HTTP/2
    /// specification maps them (and as tonic does), anything that lost the connection
    /// UNAVAILABLE.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::Reset(reason::REFUSED_STREAM) => Code::Unavailable,
            Error::Reset(reason::CANCEL) => Code::Cancelled,
            Error::Reset(reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
            Error::Reset(reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
            Error::Reset(_) | Error::BadHeaders(_) => Code::Internal,
            Error::Io(_)
            | Error::Eof
            | Error::GoneAway(_)
            | Error::Closed
            | Error::Protocol { .. }
            | Error::KeepaliveTimeout(_) => Code::Unavailable,
        }
    }
}

/// What a call sends: the request's path, authority and headers (the caller's metadata and the
/// gRPC headers), and one framed gRPC message.
#[derive(Debug)]
pub struct Request<'a> {
    /// `:path`.
    pub path: &'a str,
    /// `:authority`.
    pub authority: &'a str,
    /// Every other header.
    pub headers: &'a HeaderMap,
    /// The 5-byte gRPC prefix of the message.
    pub prefix: [u8; 5],
    /// The message.
    pub message: Bytes,
}

/// A node's complete answer.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body, as far as it was kept (see `max_body` of [`Connection::call`]).
    pub body: Received,
    /// The trailers, if the answer had any.
    pub trailers: Option<HeaderMap>,
}

/// A handle on a connection; clones share it. The connection ends when its last handle and
/// call are gone (or the peer or the network ends it).
#[derive(Debug)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl Clone for Connection {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last handle: the connection's task ends once its calls have.
            if let Some(w) = self.shared.lock().driver.take() {
                w.wake();
            }
        }
    }
}

#[derive(Debug)]
struct Shared {
    tcp: TcpStream,
    inner: Mutex<Inner>,
    handles: AtomicUsize,
    closed: AtomicBool,
    config: Config,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing is left half-changed across a panic that matters: a poisoned lock is used as
        // it is (the connection would fail its calls at worst).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One stream (one call) as the connection tracks it.
#[derive(Debug)]
struct Stream {
    waker: Option<Waker>,
    head: Option<(StatusCode, HeaderMap)>,
    body: Received,
    body_len: usize,
    max_body: usize,
    trailers: Option<HeaderMap>,
    /// Set when the answer is complete (Ok) or the call failed.
    outcome: Option<Result<(), Error>>,
    /// Flow control: what this client may still send on the stream.
    send_window: i64,
    /// The request's bytes not sent yet for want of window.
    pending: Option<Pending>,
    /// Flow control: what the peer may still send on the stream.
    recv_window: i64,
}

#[derive(Debug)]
struct Pending {
    prefix: Option<[u8; 5]>,
    message: Bytes,
}

impl Pending {
    fn len(&self) -> usize {
        self.prefix.map_or(0, |p| p.len()) + self.message.len()
    }
}

/// A header block being gathered from HEADERS and CONTINUATION frames.
#[derive(Debug)]
struct Continuation {
    stream: u32,
    end_stream: bool,
    block: BytesMut,
}

struct Inner {
    streams: StreamMap<Stream>,
    next_id: u32,
    /// The peer's limits.
    max_streams: usize,
    max_frame: usize,
    initial_send_window: i64,
    conn_send_window: i64,
    /// Streams with request bytes waiting for window, in the order they were opened.
    blocked: VecDeque<u32>,
    /// Flow control of the connection as a receiver.
    conn_recv_window: i64,
    conn_recv_unacked: i64,
    /// Calls waiting for a free stream.
    open_waiters: VecDeque<Waker>,
    decoder: hpack::Decoder,
    /// The fields the node repeats, in typed form.
    typed: hpack::TypedFields,
    continuation: Option<Continuation>,
    /// Bytes to write.
    out: Out,
    /// Why the connection ended, once it has.
    closed: Option<Error>,
    /// The peer's GOAWAY: no stream may be opened any more.
    going_away: Option<u32>,
    /// The connection task's waker (to flush what a call could not write, or to end).
    driver: Option<Waker>,
    ping_outstanding: bool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("streams", &self.streams.len())
            .field("next_id", &self.next_id)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Starts HTTP/2 on `tcp` (sends the preface and this client's SETTINGS) and spawns the
    /// task that reads from it. Calls may start at once: RFC 9113 lets a client send requests
    /// before the server's SETTINGS arrive.
    pub async fn handshake(tcp: TcpStream, config: Config) -> Result<Self, Error> {
        let mut inner = Inner {
            streams: StreamMap::default(),
            next_id: 1,
            max_streams: config.initial_max_streams,
            max_frame: DEFAULT_MAX_FRAME,
            initial_send_window: DEFAULT_WINDOW,
            conn_send_window: DEFAULT_WINDOW,
            blocked: VecDeque::new(),
            conn_recv_window: i64::from(config.connection_window).max(DEFAULT_WINDOW),
            conn_recv_unacked: 0,
            open_waiters: VecDeque::new(),
            decoder: hpack::Decoder::new(HEADER_TABLE_SIZE),
            typed: hpack::TypedFields::default(),
            continuation: None,
            out: Out::new(),
            closed: None,
            going_away: None,
            driver: None,
            ping_outstanding: false,
        };
        let t = &mut inner.out.tail;
        t.put_slice(PREFACE);
        frame_head(t, 18, kind::SETTINGS, 0, 0);
        for (id, value) in [
            (setting::ENABLE_PUSH, 0),
            (setting::INITIAL_WINDOW_SIZE, config.stream_window),
            (setting::MAX_HEADER_LIST_SIZE, config.max_header_list_size),
        ] {
            t.put_u16(id);
            t.put_u32(value);
        }
        let raise = i64::from(config.connection_window) - DEFAULT_WINDOW;
        if raise > 0 {
            window_update(t, 0, raise as u32);
        }
        let shared = Arc::new(Shared {
            tcp,
            inner: Mutex::new(inner),
            handles: AtomicUsize::new(1),
            closed: AtomicBool::new(false),
            config,
        });
        // The preface goes out now; what the socket does not take, the task writes.
        {
            let mut inner = shared.lock();
            flush(&shared, &mut inner);
            if let Some(e) = &inner.closed {
                return Err(e.clone());
            }
        }
        tokio::spawn(drive(shared.clone()));
        Ok(Self { shared })
    }

    /// Whether the connection has ended or will open no more streams.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Sends one unary call and gathers its answer. At most `max_body` bytes of the answer's
    /// body (plus its gRPC prefix) are kept; the call's stream is reset when more come, and the
    /// answer ends there with what was kept. Dropping the future before it is ready resets the
    /// stream (CANCEL).
    pub async fn call(&self, request: Request<'_>, max_body: usize) -> Result<Answer, Error> {
        let mut call = Call {
            conn: self.clone(),
            id: None,
        };
        poll_fn(|cx| call.poll_open(cx, &request, max_body)).await?;
        poll_fn(|cx| call.poll_answer(cx)).await
    }
}

/// One call in progress: its stream is reset if it is dropped before its answer is complete.
struct Call {
    conn: Connection,
    id: Option<u32>,
}

impl Call {
    fn poll_open(
        &mut self,
        cx: &mut Context<'_>,
        request: &Request<'_>,
        max_body: usize,
    ) -> Poll<Result<(), Error>> {
        let shared = &self.conn.shared;
        let mut inner = shared.lock();
        if let Some(e) = &inner.closed {
            return Poll::Ready(Err(if e.is_unprocessed() {
                e.clone()
            } else {
                Error::Closed
            }));
        }
        if let Some(code) = inner.going_away {
            return Poll::Ready(Err(Error::GoneAway(code)));
        }
        if inner.streams.len() >= inner.max_streams {
            inner.open_waiters.push_back(cx.waker().clone());
            return Poll::Pending;
        }
        let id = inner.next_id;
        if id > MAX_WINDOW as u32 - 2 {
            // Stream ids are spent: this connection opens no more (a new one will).
            shared.closed.store(true, Ordering::Release);
            return Poll::Ready(Err(Error::Closed));
        }
        inner.next_id += 2;
        let max_frame = inner.max_frame;
        encode_headers(&mut inner.out.tail, id, request, max_frame);
        let stream = Stream {
            waker: None,
            head: None,
            body: Received::default(),
            body_len: 0,
            max_body: max_body.saturating_add(5),
            trailers: None,
            outcome: None,
            send_window: inner.initial_send_window,
            pending: Some(Pending {
                prefix: Some(request.prefix),
                message: request.message.clone(),
            }),
            recv_window: i64::from(shared.config.stream_window),
        };
        inner.streams.insert(id, stream);
        self.id = Some(id);
        if !send_pending(&mut inner, id) {
            inner.blocked.push_back(id);
        }
        flush(shared, &mut inner);
        Poll::Ready(Ok(()))
    }

    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Result<Answer, Error>> {
        let Some(id) = self.id else {
            return Poll::Ready(Err(Error::Closed));
        };
        let shared = &self.conn.shared;
        let mut inner = shared.lock();
        let Some(stream) = inner.streams.get_mut(&id) else {
            self.id = None;
            return Poll::Ready(Err(Error::Closed));
        };
        match stream.outcome.take() {
            None => {
                if !stream
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    stream.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Some(outcome) => {
                self.id = None;
                let Some(stream) = inner.streams.remove(&id) else {
                    return Poll::Ready(Err(Error::Closed));
                };
                stream_closed(&mut inner);
                drop(inner);
                Poll::Ready(outcome.and_then(|()| match stream.head {
                    Some((status, headers)) => Ok(Answer {
                        status,
                        headers,
                        body: stream.body,
                        trailers: stream.trailers,
                    }),
                    None => Err(Error::BadHeaders("the answer ended without headers")),
                }))
            }
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        let shared = &self.conn.shared;
        let mut inner = shared.lock();
        if let Some(stream) = inner.streams.remove(&id) {
            if stream.outcome.is_none() && inner.closed.is_none() {
                rst_stream(&mut inner.out.tail, id, reason::CANCEL);
                flush(shared, &mut inner);
            }
            stream_closed(&mut inner);
        }
    }
}

/// A stream was removed: a call waiting for one may open it; and the connection's task may end
/// if it was the last.
fn stream_closed(inner: &mut Inner) {
    // Every waiter, not one: a waiter may have given up (its call dropped) and would take the
    // only wake-up with it.
    for w in inner.open_waiters.drain(..) {
        w.wake();
    }
    if inner.streams.is_empty()
        && let Some(w) = inner.driver.take()
    {
        w.wake();
    }
}

/// HEADERS (and CONTINUATION frames if the block is larger than a frame) for a request. The
/// block is encoded in place behind a frame header whose length is filled in after.
fn encode_headers(buf: &mut BytesMut, id: u32, request: &Request<'_>, max_frame: usize) {
    let start = buf.len();
    frame_head(buf, 0, kind::HEADERS, flag::END_HEADERS, id);
    buf.put_u8(0x83); // :method POST
    buf.put_u8(0x86); // :scheme http
    hpack_literal(buf, 4, b"", request.path.as_bytes());
    hpack_literal(buf, 1, b"", request.authority.as_bytes());
    hpack_headers(buf, request.headers, &[]);
    finish_header_block(buf, start, id, 0, max_frame);
}

/// Moves as much of a stream's request body into DATA frames as the windows allow.
fn send_pending(inner: &mut Inner, id: u32) -> bool {
    let Some(stream) = inner.streams.get_mut(&id) else {
        return true;
    };
    let Some(pending) = stream.pending.as_mut() else {
        return true;
    };
    loop {
        let left = pending.len();
        let allowed = stream
            .send_window
            .min(inner.conn_send_window)
            .min(inner.max_frame as i64)
            .max(0) as usize;
        let n = left.min(allowed);
        if n == 0 && left > 0 {
            return false;
        }
        let end = n == left;
        frame_head(
            &mut inner.out.tail,
            n,
            kind::DATA,
            if end { flag::END_STREAM } else { 0 },
            id,
        );
        let mut want = n;
        if let Some(p) = pending.prefix.take() {
            let k = want.min(p.len());
            inner.out.tail.put_slice(&p[..k]);
            if k < p.len() {
                // Only part of the prefix fits: send the rest as message bytes later.
                let mut rest = BytesMut::with_capacity(p.len() - k + pending.message.len());
                rest.put_slice(&p[k..]);
                rest.put_slice(&pending.message);
                pending.message = rest.freeze();
            }
            want -= k;
        }
        if want > 0 {
            let chunk = pending.message.split_to(want);
            inner.out.payload(chunk);
        }
        stream.send_window -= n as i64;
        inner.conn_send_window -= n as i64;
        if end {
            stream.pending = None;
            return true;
        }
    }
}

/// Sends what the windows now allow of every blocked stream, in order.
fn unblock(inner: &mut Inner) {
    let mut still = VecDeque::new();
    while let Some(id) = inner.blocked.pop_front() {
        if !send_pending(inner, id) {
            still.push_back(id);
        }
    }
    inner.blocked = still;
}

/// Writes what is queued, as far as the socket takes it without waiting; the rest stays
/// queued and the connection's task is woken to write it when the socket is writable.
fn flush(shared: &Shared, inner: &mut Inner) {
    if inner.closed.is_some() {
        return;
    }
    match inner.out.write_to(&shared.tcp) {
        Ok(true) => {}
        Ok(false) => {
            if let Some(w) = inner.driver.take() {
                w.wake();
            }
        }
        Err(e) => close(shared, inner, Error::Io(Arc::new(e))),
    }
}

/// Ends the connection: every call still on it fails with `why`.
fn close(shared: &Shared, inner: &mut Inner, why: Error) {
    if inner.closed.is_some() {
        return;
    }
    shared.closed.store(true, Ordering::Release);
    for stream in inner.streams.values_mut() {
        if stream.outcome.is_none() {
            stream.outcome = Some(Err(why.clone()));
            if let Some(w) = stream.waker.take() {
                w.wake();
            }
        }
    }
    for w in inner.open_waiters.drain(..) {
        w.wake();
    }
    inner.closed = Some(why);
    inner.out.clear();
    if let Some(w) = inner.driver.take() {
        w.wake();
    }
}

/// Ends the connection for a protocol error of the peer's: GOAWAY with `code` (best effort),
/// then every call fails.
fn protocol_error(shared: &Shared, inner: &mut Inner, code: u32, what: &'static str) {
    if inner.closed.is_some() {
        return;
    }
    tracing::debug!(
        code,
        what,
        "HTTP/2 protocol error from a node; closing the connection"
    );
    frame_head(&mut inner.out.tail, 8, kind::GOAWAY, 0, 0);
    let last = inner.next_id.saturating_sub(2);
    inner.out.tail.put_u32(last);
    inner.out.tail.put_u32(code);
    flush(shared, inner);
    close(shared, inner, Error::Protocol { code, what });
}

/// Fails one call (and resets its stream), leaving the connection up.
fn fail_stream(inner: &mut Inner, id: u32, why: Error, reset: Option<u32>) {
    if let Some(stream) = inner.streams.get_mut(&id)
        && stream.outcome.is_none()
    {
        stream.outcome = Some(Err(why));
        stream.pending = None;
        if let Some(w) = stream.waker.take() {
            w.wake();
        }
        if let Some(code) = reset {
            rst_stream(&mut inner.out.tail, id, code);
        }
    }
}

/// The connection's task: reads and dispatches frames, writes what calls left queued, sends
/// keep-alive pings. Ends when the connection fails or its last handle and call are gone.
async fn drive(shared: Arc<Shared>) {
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let interval = shared.config.keepalive_interval;
    let timeout = shared.config.keepalive_timeout;
    // One timer, two phases: waiting to send the next PING, then waiting for its answer. It is
    // never touched on a call's path (resetting a timer takes the timer driver's lock).
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(interval));
    let mut pinged = false;
    poll_fn(|cx| {
        while timer.as_mut().poll(cx).is_ready() {
            let mut inner = shared.lock();
            if pinged {
                if inner.ping_outstanding {
                    close(&shared, &mut inner, Error::KeepaliveTimeout(timeout));
                    return Poll::Ready(());
                }
                pinged = false;
                timer.as_mut().reset(Instant::now() + interval);
            } else {
                frame_head(&mut inner.out.tail, 8, kind::PING, 0, 0);
                inner.out.tail.put_u64(0x6675_6c63_7275_6d00); // "fulcrum\0"
                inner.ping_outstanding = true;
                flush(&shared, &mut inner);
                pinged = true;
                timer.as_mut().reset(Instant::now() + timeout);
            }
        }
        let mut reads = 0;
        loop {
            if reads == READS_PER_TURN {
                // More may be waiting: come back after the thread's other tasks had a turn.
                cx.waker().wake_by_ref();
                break;
            }
            match shared.tcp.poll_read_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => {
                    close(&shared, &mut shared.lock(), Error::Io(Arc::new(e)));
                    break;
                }
                Poll::Ready(Ok(())) => {}
            }
            if rbuf.capacity() - rbuf.len() < 16 * 1024 {
                rbuf.reserve(64 * 1024);
            }
            reads += 1;
            match read_once(&shared.tcp, &mut rbuf) {
                Ok((0, _)) => {
                    close(&shared, &mut shared.lock(), Error::Eof);
                    break;
                }
                // Drained or not, the loop goes on: the next `poll_read_ready` registers the
                // task for the next data (a drained socket's readiness was cleared, so that
                // costs no system call).
                Ok(_) => {
                    let mut inner = shared.lock();
                    read_frames(&shared, &mut inner, &mut rbuf);
                    flush(&shared, &mut inner);
                    if inner.closed.is_some() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    close(&shared, &mut shared.lock(), Error::Io(Arc::new(e)));
                    break;
                }
            }
        }
        let mut inner = shared.lock();
        if inner.closed.is_some() {
            return Poll::Ready(());
        }
        if shared.handles.load(Ordering::Acquire) == 0 && inner.streams.is_empty() {
            // Nobody can use the connection any more: say so and end it.
            frame_head(&mut inner.out.tail, 8, kind::GOAWAY, 0, 0);
            inner.out.tail.put_u32(0);
            inner.out.tail.put_u32(reason::NO_ERROR);
            flush(&shared, &mut inner);
            close(&shared, &mut inner, Error::Closed);
            return Poll::Ready(());
        }
        if !inner.out.is_empty() {
            match shared.tcp.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {
                    flush(&shared, &mut inner);
                    if !inner.out.is_empty() {
                        // Writable again before the rest went: try on the next turn.
                        cx.waker().wake_by_ref();
                    }
                }
                Poll::Ready(Err(e)) => close(&shared, &mut inner, Error::Io(Arc::new(e))),
                Poll::Pending => {}
            }
        }
        if inner.closed.is_some() {
            return Poll::Ready(());
        }
        if !inner
            .driver
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            inner.driver = Some(cx.waker().clone());
        }
        Poll::Pending
    })
    .await;
}

/// Handles every complete frame in `rbuf`.
fn read_frames(shared: &Shared, inner: &mut Inner, rbuf: &mut BytesMut) {
    while rbuf.len() >= 9 && inner.closed.is_none() {
        let len = (usize::from(rbuf[0]) << 16) | (usize::from(rbuf[1]) << 8) | usize::from(rbuf[2]);
        if len > DEFAULT_MAX_FRAME {
            protocol_error(
                shared,
                inner,
                reason::FRAME_SIZE_ERROR,
                "a frame larger than allowed",
            );
            return;
        }
        if rbuf.len() < 9 + len {
            rbuf.reserve(9 + len - rbuf.len());
            break;
        }
        let head = rbuf.split_to(9);
        let payload = rbuf.split_to(len).freeze();
        let (ty, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        frame(shared, inner, ty, flags, stream, payload);
    }
}

/// Handles one frame: its form checked by [`parse_frame`], its meaning here.
fn frame(shared: &Shared, inner: &mut Inner, ty: u8, flags: u8, id: u32, payload: Bytes) {
    let continuing = inner.continuation.as_ref().map(|c| c.stream);
    let frame = match parse_frame(ty, flags, id, payload, continuing) {
        Ok(frame) => frame,
        Err(e) => return protocol_error(shared, inner, e.code, e.what),
    };
    match frame {
        ParsedFrame::Data {
            id,
            end_stream,
            flow_len,
            mut payload,
        } => {
            inner.conn_recv_window -= flow_len;
            if inner.conn_recv_window < 0 {
                return protocol_error(
                    shared,
                    inner,
                    reason::FLOW_CONTROL_ERROR,
                    "DATA beyond the connection's window",
                );
            }
            // The connection's window is handed back as data arrives, whoever it was for.
            inner.conn_recv_unacked += flow_len;
            if inner.conn_recv_unacked >= i64::from(shared.config.connection_window) / 2 {
                let n = inner.conn_recv_unacked;
                inner.conn_recv_window += n;
                inner.conn_recv_unacked = 0;
                window_update(&mut inner.out.tail, 0, n as u32);
            }
            let stream_window = i64::from(shared.config.stream_window);
            let Some(stream) = inner.streams.get_mut(&id) else {
                return unknown_stream(shared, inner, id);
            };
            if stream.outcome.is_some() {
                return;
            }
            stream.recv_window -= flow_len;
            if stream.recv_window < 0 {
                return fail_stream(
                    inner,
                    id,
                    Error::Protocol {
                        code: reason::FLOW_CONTROL_ERROR,
                        what: "DATA beyond the stream's window",
                    },
                    Some(reason::FLOW_CONTROL_ERROR),
                );
            }
            if stream.head.is_none() {
                return fail_stream(
                    inner,
                    id,
                    Error::BadHeaders("DATA before the answer's headers"),
                    Some(reason::PROTOCOL_ERROR),
                );
            }
            let room = stream.max_body.saturating_sub(stream.body_len);
            if payload.len() > room {
                // More than the call accepts: keep what fits (its prefix tells the call what
                // was wrong) and stop the node sending the rest.
                payload.truncate(room);
                stream.body_len += payload.len();
                if !payload.is_empty() {
                    stream.body.push(payload);
                }
                stream.outcome = Some(Ok(()));
                if let Some(w) = stream.waker.take() {
                    w.wake();
                }
                rst_stream(&mut inner.out.tail, id, reason::CANCEL);
                return;
            }
            stream.body_len += payload.len();
            if !payload.is_empty() {
                stream.body.push(payload);
            }
            if end_stream {
                complete(stream);
            } else if stream_window - stream.recv_window >= stream_window / 2 {
                let n = stream_window - stream.recv_window;
                stream.recv_window = stream_window;
                window_update(&mut inner.out.tail, id, n as u32);
            }
        }
        ParsedFrame::Headers {
            id,
            end_stream,
            end_headers,
            fragment,
        } => {
            let c = Continuation {
                stream: id,
                end_stream,
                block: BytesMut::from(&fragment[..]),
            };
            if end_headers {
                header_block(shared, inner, c);
            } else {
                inner.continuation = Some(c);
            }
        }
        ParsedFrame::Continuation {
            end_headers,
            fragment,
        } => {
            // `parse_frame` refused a CONTINUATION with no header block being gathered.
            let Some(mut c) = inner.continuation.take() else {
                return;
            };
            if c.block.len() + fragment.len() > shared.config.max_header_list_size as usize * 4 {
                // A block this much longer than the list limit cannot decode to a list within
                // it (a header counts its bytes, and Huffman coding does not halve text):
                // stop gathering it.
                return protocol_error(
                    shared,
                    inner,
                    reason::ENHANCE_YOUR_CALM,
                    "a header block far larger than the header list limit",
                );
            }
            c.block.extend_from_slice(&fragment);
            if end_headers {
                header_block(shared, inner, c);
            } else {
                inner.continuation = Some(c);
            }
        }
        ParsedFrame::RstStream { id, code } => {
            // A reset after a complete answer (some servers send NO_ERROR there) changes nothing.
            fail_stream(inner, id, Error::Reset(code), None);
            if let Some(s) = inner.streams.get_mut(&id) {
                s.pending = None;
            }
        }
        ParsedFrame::Settings(settings) => {
            if let Some(max) = settings.max_concurrent_streams {
                let before = inner.max_streams;
                inner.max_streams = max as usize;
                if inner.max_streams > before {
                    for w in inner.open_waiters.drain(..) {
                        w.wake();
                    }
                }
            }
            apply_settings(
                &settings,
                &mut inner.initial_send_window,
                inner.streams.values_mut().map(|s| &mut s.send_window),
                &mut inner.max_frame,
                &mut inner.out.tail,
            );
            unblock(inner);
        }
        ParsedFrame::SettingsAck | ParsedFrame::Ignored => {}
        ParsedFrame::PushPromise => {
            protocol_error(
                shared,
                inner,
                reason::PROTOCOL_ERROR,
                "PUSH_PROMISE with push disabled",
            );
        }
        ParsedFrame::Ping { ack: true, .. } => inner.ping_outstanding = false,
        ParsedFrame::Ping { ack: false, data } => {
            frame_head(&mut inner.out.tail, 8, kind::PING, flag::ACK, 0);
            inner.out.tail.put_slice(&data);
        }
        ParsedFrame::GoAway { last, code } => {
            inner.going_away = Some(code);
            shared.closed.store(true, Ordering::Release);
            let refused: Vec<u32> = inner
                .streams
                .keys()
                .copied()
                .filter(|&s| s > last)
                .collect();
            for s in refused {
                fail_stream(inner, s, Error::GoneAway(code), None);
            }
            for w in inner.open_waiters.drain(..) {
                w.wake();
            }
        }
        ParsedFrame::WindowUpdate { id, increment } => {
            if id == 0 {
                if let Err(e) = grow_connection_window(&mut inner.conn_send_window, increment) {
                    return protocol_error(shared, inner, e.code, e.what);
                }
            } else if let Some(s) = inner.streams.get_mut(&id) {
                s.send_window += increment;
                if increment == 0 || s.send_window > MAX_WINDOW {
                    let why = Error::Protocol {
                        code: reason::FLOW_CONTROL_ERROR,
                        what: "a bad WINDOW_UPDATE on the stream",
                    };
                    return fail_stream(inner, id, why, Some(reason::FLOW_CONTROL_ERROR));
                }
            }
            unblock(inner);
        }
    }
}

/// A frame for a stream this client does not track: one it reset or finished is fine (frames
/// may still be in flight); one it never opened is a protocol error.
fn unknown_stream(shared: &Shared, inner: &mut Inner, id: u32) {
    if id.is_multiple_of(2) || id >= inner.next_id {
        protocol_error(
            shared,
            inner,
            reason::PROTOCOL_ERROR,
            "a frame for a stream never opened",
        );
    }
}

/// The answer is complete.
fn complete(stream: &mut Stream) {
    stream.outcome = Some(Ok(()));
    if let Some(w) = stream.waker.take() {
        w.wake();
    }
}

/// A complete header block: decoded always (the decoder's table must follow the peer's even for
/// a stream this client has dropped), then given to its stream as headers or trailers.
fn header_block(shared: &Shared, inner: &mut Inner, c: Continuation) {
    let limit = shared.config.max_header_list_size as usize;
    let mut size = 0usize;
    let mut status: Option<Result<StatusCode, ()>> = None;
    let mut map = HeaderMap::new();
    let mut malformed: Option<&'static str> = None;
    let decoded = inner.decoder.decode(&c.block, |name, value| {
        size += name.len() + value.len() + 32;
        if size > limit {
            malformed.get_or_insert("the header list is larger than allowed");
            return;
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            if pseudo == b"status" && status.is_none() {
                status = Some(StatusCode::from_bytes(value).map_err(|_| ()));
            } else {
                malformed.get_or_insert("an unexpected pseudo-header");
            }
            return;
        }
        match inner.typed.get(name, value) {
            Some((n, v)) => {
                map.append(n, v);
            }
            None => {
                malformed.get_or_insert("a header name or value that is not valid");
            }
        }
    });
    if decoded.is_err() {
        return protocol_error(
            shared,
            inner,
            reason::COMPRESSION_ERROR,
            "a header block that does not decode",
        );
    }
    let id = c.stream;
    let Some(stream) = inner.streams.get_mut(&id) else {
        return unknown_stream(shared, inner, id);
    };
    if stream.outcome.is_some() {
        return;
    }
    if let Some(what) = malformed {
        return fail_stream(
            inner,
            id,
            Error::BadHeaders(what),
            Some(reason::PROTOCOL_ERROR),
        );
    }
    if stream.head.is_none() {
        let status = match status {
            Some(Ok(s)) => s,
            _ => {
                return fail_stream(
                    inner,
                    id,
                    Error::BadHeaders("no valid :status"),
                    Some(reason::PROTOCOL_ERROR),
                );
            }
        };
        if status.is_informational() {
            // 1xx: the real answer follows.
            return;
        }
        stream.head = Some((status, map));
        if c.end_stream {
            complete(stream);
        }
    } else {
        if !c.end_stream || status.is_some() {
            return fail_stream(
                inner,
                id,
                Error::BadHeaders("a second header block that is not trailers"),
                Some(reason::PROTOCOL_ERROR),
            );
        }
        stream.trailers = Some(map);
        complete(stream);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use h2::RecvStream;
    use h2::server::SendResponse;
    use http::HeaderValue;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn config() -> Config {
        Config {
            stream_window: 2 * 1024 * 1024,
            connection_window: 5 * 1024 * 1024,
            max_header_list_size: 16 * 1024,
            initial_max_streams: 100,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
        }
    }

    async fn connect(addr: SocketAddr, config: Config) -> Connection {
        let tcp = TcpStream::connect(addr).await.unwrap();
        Connection::handshake(tcp, config).await.unwrap()
    }

    /// An `h2` server (the crate hyper and tonic serve with) on loopback; each request goes to
    /// `serve` on a task of its own.
    async fn h2_node<F, Fut>(builder: h2::server::Builder, serve: F) -> SocketAddr
    where
        F: Fn(http::Request<RecvStream>, SendResponse<Bytes>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (serve, builder) = (serve.clone(), builder.clone());
                tokio::spawn(async move {
                    let Ok(mut conn) = builder.handshake(socket).await else {
                        return;
                    };
                    while let Some(Ok((request, respond))) = conn.accept().await {
                        tokio::spawn(serve.clone()(request, respond));
                    }
                });
            }
        });
        addr
    }

    async fn read_body(body: &mut RecvStream) -> BytesMut {
        let mut all = BytesMut::new();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            all.extend_from_slice(&chunk);
        }
        all
    }

    fn request<'a>(headers: &'a HeaderMap, message: &[u8]) -> Request<'a> {
        let l = (message.len() as u32).to_be_bytes();
        Request {
            path: "/pkg.Service/Method",
            authority: "node.example:50051",
            headers,
            prefix: [0, l[0], l[1], l[2], l[3]],
            message: Bytes::copy_from_slice(message),
        }
    }

    /// Answers with `body` (sent in chunks of at most 16 KiB) and `grpc-status: 0`.
    fn answer(respond: &mut SendResponse<Bytes>, body: Bytes) {
        let mut response = http::Response::new(());
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        let mut stream = respond.send_response(response, false).unwrap();
        let mut rest = body;
        while !rest.is_empty() {
            let n = rest.len().min(16 * 1024);
            stream.send_data(rest.split_to(n), false).unwrap();
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        stream.send_trailers(trailers).unwrap();
    }

    #[tokio::test]
    async fn a_call_reaches_an_h2_server_with_its_headers_and_gets_the_answer() {
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let addr = h2_node(
            h2::server::Builder::new(),
            move |mut request, mut respond| {
                let seen_tx = seen_tx.clone();
                async move {
                    let body = read_body(request.body_mut()).await;
                    let _ = seen_tx.send((request.into_parts().0, body));
                    answer(&mut respond, Bytes::from_static(b"\0\0\0\0\x02ok"));
                }
            },
        )
        .await;
        let conn = connect(addr, config()).await;
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.append("x-tag", HeaderValue::from_static("one"));
        headers.append("x-tag", HeaderValue::from_static("two"));
        headers.insert("connection", HeaderValue::from_static("close"));
        for _ in 0..3 {
            let a = conn
                .call(request(&headers, b"question"), 1024)
                .await
                .unwrap();
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(a.headers["content-type"], "application/grpc");
            assert_eq!(a.body.bytes(), b"\0\0\0\0\x02ok");
            assert_eq!(a.trailers.unwrap()["grpc-status"], "0");
            let (parts, body) = seen.recv().await.unwrap();
            assert_eq!(parts.method, http::Method::POST);
            assert_eq!(parts.uri.path(), "/pkg.Service/Method");
            assert_eq!(parts.uri.scheme_str(), Some("http"));
            assert_eq!(
                parts.uri.authority().unwrap().as_str(),
                "node.example:50051"
            );
            assert_eq!(parts.headers["te"], "trailers");
            let tags: Vec<_> = parts.headers.get_all("x-tag").iter().collect();
            assert_eq!(tags, ["one", "two"]);
            // Connection-specific headers are not sent (h2 would refuse the request).
            assert!(parts.headers.get("connection").is_none());
            assert_eq!(&body[..], b"\0\0\0\0\x08question");
        }
    }

    #[tokio::test]
    async fn header_blocks_larger_than_a_frame_go_in_continuation_frames_both_ways() {
        let big = "v".repeat(40_000);
        let echo = big.clone();
        let addr = h2_node(
            h2::server::Builder::new(),
            move |mut request, mut respond| {
                let echo = echo.clone();
                async move {
                    let _ = read_body(request.body_mut()).await;
                    let got = request.headers().get("x-big").map(|v| v.len());
                    let mut response = http::Response::new(());
                    let h = response.headers_mut();
                    h.insert("x-got", HeaderValue::from(got.unwrap_or(0)));
                    h.insert("x-big", HeaderValue::from_str(&echo).unwrap());
                    let mut stream = respond.send_response(response, false).unwrap();
                    stream
                        .send_data(Bytes::from_static(b"\0\0\0\0\0"), false)
                        .unwrap();
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    stream.send_trailers(trailers).unwrap();
                }
            },
        )
        .await;
        let roomy = Config {
            max_header_list_size: 100_000,
            ..config()
        };
        let conn = connect(addr, roomy).await;
        let mut headers = HeaderMap::new();
        headers.insert("x-big", HeaderValue::from_str(&big).unwrap());
        let a = conn.call(request(&headers, b"x"), 10).await.unwrap();
        assert_eq!(a.headers["x-got"], "40000");
        assert_eq!(a.headers["x-big"].len(), 40_000);
        // Over the client's header list limit: that call fails, the connection stays.
        let conn = connect(addr, config()).await;
        let e = conn.call(request(&headers, b"x"), 10).await.unwrap_err();
        assert!(matches!(e, Error::BadHeaders(_)), "{e:?}");
        assert!(!conn.is_closed());
    }

    #[tokio::test]
    async fn large_requests_and_answers_follow_flow_control() {
        // The server's windows start at 64 KiB; the client's are made as small.
        let addr = h2_node(
            h2::server::Builder::new(),
            |mut request, mut respond| async move {
                let body = read_body(request.body_mut()).await.freeze();
                // The answer is the request, whole.
                answer(&mut respond, body);
            },
        )
        .await;
        let small = Config {
            stream_window: 65_535,
            connection_window: 65_535,
            ..config()
        };
        let conn = connect(addr, small).await;
        let headers = HeaderMap::new();
        let message: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let calls = (0..3).map(|_| conn.call(request(&headers, &message), 4_000_000));
        for a in futures::future::join_all(calls).await {
            let a = a.unwrap();
            let body = a.body.bytes();
            assert_eq!(body.len(), message.len() + 5);
            assert_eq!(&body[5..], &message[..]);
            assert_eq!(a.trailers.unwrap()["grpc-status"], "0");
        }
    }

    #[tokio::test]
    async fn calls_wait_for_a_stream_when_the_server_allows_few() {
        let mut builder = h2::server::Builder::new();
        builder.max_concurrent_streams(1);
        let addr = h2_node(builder, |mut request, mut respond| async move {
            let _ = read_body(request.body_mut()).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            answer(&mut respond, Bytes::from_static(b"\0\0\0\0\0"));
        })
        .await;
        let conn = connect(addr, config()).await;
        // Let the server's SETTINGS arrive (one stream at a time), then start six at once.
        conn.call(request(&HeaderMap::new(), b"x"), 10)
            .await
            .unwrap();
        let headers = HeaderMap::new();
        let calls = (0..6).map(|_| conn.call(request(&headers, b"x"), 10));
        for a in futures::future::join_all(calls).await {
            a.unwrap();
        }
    }

    #[tokio::test]
    async fn answers_beyond_the_limit_are_cut_and_the_stream_reset() {
        let addr = h2_node(
            h2::server::Builder::new(),
            |mut request, mut respond| async move {
                let _ = read_body(request.body_mut()).await;
                answer(&mut respond, Bytes::from(vec![7u8; 100_000]));
            },
        )
        .await;
        let conn = connect(addr, config()).await;
        let a = conn
            .call(request(&HeaderMap::new(), b"x"), 1000)
            .await
            .unwrap();
        assert!(a.body.bytes().len() <= 1005, "{}", a.body.bytes().len());
        // The connection carries on.
        let a = conn
            .call(request(&HeaderMap::new(), b"x"), 200_000)
            .await
            .unwrap();
        assert_eq!(a.body.bytes().len(), 100_000);
    }

    /// A server of raw bytes: reads the client's preface, runs `then` on the socket.
    async fn raw_node<F, Fut>(then: F) -> SocketAddr
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut preface = [0u8; 24];
            socket.read_exact(&mut preface).await.unwrap();
            assert_eq!(&preface[..], PREFACE);
            then(socket).await;
        });
        addr
    }

    /// Reads (and drops) whatever the client sends until it closes.
    async fn drain(mut socket: TcpStream) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    }

    #[tokio::test]
    async fn a_connection_lost_under_a_call_fails_it_unavailable() {
        let addr = raw_node(|mut socket| async move {
            let mut buf = [0u8; 256];
            let _ = socket.read(&mut buf).await;
            drop(socket);
        })
        .await;
        let conn = connect(addr, config()).await;
        let e = conn
            .call(request(&HeaderMap::new(), b"x"), 10)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Eof | Error::Io(_)), "{e:?}");
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(conn.is_closed());
        // A call on the ended connection was never sent: it may be sent again elsewhere.
        let e = conn
            .call(request(&HeaderMap::new(), b"x"), 10)
            .await
            .unwrap_err();
        assert!(e.is_unprocessed(), "{e:?}");
    }

    /// Every malformed input below ends the connection with a protocol error and fails the
    /// call; none panics.
    #[tokio::test]
    async fn a_peer_breaking_the_protocol_closes_the_connection() {
        use crate::wire::test_frame as frame;
        let cases: Vec<(Vec<u8>, u32)> = vec![
            // A frame larger than 16 KiB.
            (
                frame(kind::DATA, 0, 1, &[0; 16_385]),
                reason::FRAME_SIZE_ERROR,
            ),
            // A header block HPACK cannot decode (index 127 of an empty dynamic table).
            (
                frame(kind::HEADERS, flag::END_HEADERS, 1, &[0xff, 0x7f]),
                reason::COMPRESSION_ERROR,
            ),
            // DATA on stream 0.
            (frame(kind::DATA, 0, 0, &[9]), reason::PROTOCOL_ERROR),
            // A PUSH_PROMISE, push being disabled.
            (
                frame(kind::PUSH_PROMISE, flag::END_HEADERS, 1, &[0, 0, 0, 2]),
                reason::PROTOCOL_ERROR,
            ),
            // A stream the client never opened.
            (
                frame(kind::HEADERS, flag::END_HEADERS, 9, &[0x88]),
                reason::PROTOCOL_ERROR,
            ),
            // A PING of the wrong size.
            (
                frame(kind::PING, 0, 0, &[1, 2, 3]),
                reason::FRAME_SIZE_ERROR,
            ),
            // An initial window above 2^31-1.
            (
                frame(kind::SETTINGS, 0, 0, &[0, 4, 0xff, 0xff, 0xff, 0xff]),
                reason::FLOW_CONTROL_ERROR,
            ),
            // A connection window overflowing.
            (
                frame(kind::WINDOW_UPDATE, 0, 0, &[0x7f, 0xff, 0xff, 0xff]),
                reason::FLOW_CONTROL_ERROR,
            ),
            // Padding longer than the frame.
            (
                frame(
                    kind::HEADERS,
                    flag::END_HEADERS | flag::PADDED,
                    1,
                    &[5, 0x88],
                ),
                reason::PROTOCOL_ERROR,
            ),
        ];
        for (bytes, want) in cases {
            let sent = bytes.clone();
            let addr = raw_node(move |mut socket| async move {
                // Wait for the request, then answer with the bad frame.
                let mut buf = [0u8; 256];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(&sent).await;
                drain(socket).await;
            })
            .await;
            let conn = connect(addr, config()).await;
            let e = conn
                .call(request(&HeaderMap::new(), b"x"), 10)
                .await
                .unwrap_err();
            match e {
                Error::Protocol { code, .. } => assert_eq!(code, want, "{bytes:x?}: {e}"),
                other => panic!("{bytes:x?}: {other:?}"),
            }
            assert!(conn.is_closed());
        }
    }

    #[tokio::test]
    async fn malformed_answer_headers_fail_the_call_and_keep_the_connection() {
        let addr = raw_node(|mut socket| async move {
            let mut buf = [0u8; 256];
            let _ = socket.read(&mut buf).await;
            // Stream 1: a header block without :status ("x-a: b" as a literal).
            let block = [0x00, 3, b'x', b'-', b'a', 1, b'b'];
            let f = crate::wire::test_frame(
                kind::HEADERS,
                flag::END_HEADERS | flag::END_STREAM,
                1,
                &block,
            );
            let _ = socket.write_all(&f).await;
            // Stream 3 (the next call): ":status: 200" (static index 8), and trailers-only.
            let _ = socket.read(&mut buf).await;
            let f = crate::wire::test_frame(
                kind::HEADERS,
                flag::END_HEADERS | flag::END_STREAM,
                3,
                &[0x88],
            );
            let _ = socket.write_all(&f).await;
            drain(socket).await;
        })
        .await;
        let conn = connect(addr, config()).await;
        let e = conn
            .call(request(&HeaderMap::new(), b"x"), 10)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::BadHeaders(_)), "{e:?}");
        assert_eq!(e.code(), tonic::Code::Internal);
        assert!(!conn.is_closed());
        let a = conn
            .call(request(&HeaderMap::new(), b"x"), 10)
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.trailers.is_none());
    }

    #[tokio::test]
    async fn goaway_fails_the_calls_it_did_not_take_as_unprocessed() {
        let addr = raw_node(|mut socket| async move {
            let mut buf = [0u8; 256];
            let _ = socket.read(&mut buf).await;
            // GOAWAY, last stream 0: stream 1 was not processed.
            let f = [0, 0, 8, kind::GOAWAY, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            let _ = socket.write_all(&f).await;
            drain(socket).await;
        })
        .await;
        let conn = connect(addr, config()).await;
        let e = conn
            .call(request(&HeaderMap::new(), b"x"), 10)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::GoneAway(reason::NO_ERROR)), "{e:?}");
        assert!(e.is_unprocessed());
        assert!(conn.is_closed());
    }

    #[tokio::test]
    async fn an_unanswered_ping_drops_the_connection() {
        // The server reads everything and answers nothing, not even PING.
        let addr = raw_node(drain).await;
        let quick = Config {
            keepalive_interval: Duration::from_millis(50),
            keepalive_timeout: Duration::from_millis(50),
            ..config()
        };
        let conn = connect(addr, quick).await;
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            conn.call(request(&HeaderMap::new(), b"x"), 10),
        )
        .await
        .expect("the keep-alive ends the call")
        .unwrap_err();
        assert!(matches!(e, Error::KeepaliveTimeout(_)), "{e:?}");
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn the_connection_ends_when_its_last_handle_is_dropped() {
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            // `accept` yields nothing and ends when the client closes the connection.
            while let Some(Ok(_)) = conn.accept().await {}
            let _ = ended_tx.send(());
        });
        let conn = connect(addr, config()).await;
        let other = conn.clone();
        drop(conn);
        assert!(!other.is_closed());
        drop(other);
        tokio::time::timeout(Duration::from_secs(10), ended)
            .await
            .expect("the server saw the connection end")
            .unwrap();
    }
}
