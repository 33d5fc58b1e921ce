//! An HTTP/2 server of Fulcrum's own, for the router's client connections (the control plane
//! serves on [`crate::server`], on `h2`).
//!
//! Why not `h2`'s server, which the router used before: with the router's calls to nodes on
//! its own client ([`crate::client`]), `h2`'s server was the largest cost left in the router's
//! user space (perf: about an eighth of its samples, spread over stream state machines,
//! prioritization and HPACK), for a protocol whose use here is narrow: gRPC calls, each a
//! request and an answer of a few frames. The structure is [`crate::server`]'s: a client
//! connection is one task, which runs the connection's calls beside it (no task per call, no
//! wake-up of another task to write an answer); the frames a call queues are written by the
//! task's next turn, in one write.
//!
//! What it implements of RFC 9113: the preface and SETTINGS (acknowledged; the client's
//! window and frame size applied to what is sent), flow control both ways (a request's window
//! handed back as its body is read; an answer's data waits for the client's window, and a
//! sender waits while more than [`Settings::max_send_buffer_size`] of its stream is queued),
//! CONTINUATION, padding, PING, RST_STREAM both ways, GOAWAY both ways and a graceful shutdown
//! (GOAWAY, the calls in flight finished, then the connection closed), trailers both ways.
//! Against clients that abuse the protocol: header blocks and lists bounded, streams a client
//! resets before their answer (or makes the server reset) counted against
//! [`Settings::max_local_error_reset_streams`], a connection whose client stops reading while
//! it keeps asking for answers (PING, SETTINGS) closed, concurrent streams bounded
//! ([`MAX_CONCURRENT_STREAMS`], advertised). Every malformed frame is a connection or stream
//! error as RFC 9113 says; nothing a client sends can panic it. Not implemented: server push,
//! priorities (ignored, as RFC 9113 allows), TLS, HTTP/1.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use http::header::{CONTENT_TYPE, HeaderMap};
use http::{Method, StatusCode, Uri};
use http_body::{Body as HttpBody, Frame};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::Status;
use tonic::service::Routes;
use tower::ServiceExt;

use crate::hpack::{self, static_name};
use crate::server::{GRPC_CONTENT_TYPE, Peer, Settings};
use crate::wire::StreamMap;
use crate::wire::{
    CONNECTION_SPECIFIC, DEFAULT_MAX_FRAME, DEFAULT_WINDOW, MAX_WINDOW, Out, PREFACE, ParsedFrame,
    apply_settings, finish_header_block, flag, frame_head, grow_connection_window, hpack_headers,
    hpack_literal, kind, parse_frame, read_once, reason, rst_stream, setting, window_update,
};

/// Streams a client may have open at once, advertised in SETTINGS. A call holds a few
/// kilobytes while it waits for its node; this bounds a connection's memory at a few tens of
/// megabytes while leaving far more room than any client needs (grpc-go's servers allow 100,
/// hyper's unlimited; Fulcrum's tests open a few hundred on one connection).
pub const MAX_CONCURRENT_STREAMS: u32 = 4_096;

/// Bytes of output a connection may have waiting for a client that does not read before it is
/// closed: far more than the answers in flight need (answers wait for flow-control window
/// before they are queued here), so only a client asking for PINGs or SETTINGS
/// acknowledgements without reading them reaches it.
const MAX_UNREAD_OUTPUT: usize = 8 * 1024 * 1024;

/// Frames read from the socket per turn before the thread's other tasks get a turn.
const READS_PER_TURN: usize = 16;

/// HPACK dynamic table size the decoder allows the client (the protocol's default).
const HEADER_TABLE_SIZE: usize = 4_096;

/// Why a stream can no longer be read or answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The client reset the stream with this HTTP/2 error code.
    #[error("the client reset the stream (HTTP/2 error code {0:#x})")]
    Reset(u32),
    /// The connection ended.
    #[error("the client's connection ended")]
    ConnectionLost,
}

impl StreamError {
    /// The status of a call whose stream failed: CANCELLED when the client gave it up.
    pub fn status(self) -> Status {
        match self {
            StreamError::Reset(reason::CANCEL | reason::NO_ERROR) | StreamError::ConnectionLost => {
                Status::cancelled(self.to_string())
            }
            StreamError::Reset(_) => Status::internal(self.to_string()),
        }
    }
}

/// Serves calls: one [`Handler::call`] per stream a client opens, run on the connection's task.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Serves one call: reads `body`, answers on `respond`. The future runs on the
    /// connection's task beside its other calls: it must not block, and it should stop when
    /// [`Respond::poll_reset`] says the client gave up.
    fn call(
        &self,
        peer: Peer,
        request: http::request::Parts,
        body: RecvBody,
        respond: Respond,
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
    crate::server::accept_until(incoming, signal, |tcp, stop| {
        serve_connection(tcp, handler.clone(), settings, stop)
    })
    .await;
}

#[derive(Debug)]
struct Shared {
    tcp: TcpStream,
    inner: Mutex<Inner>,
    settings: Settings,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One stream (one call) as the connection tracks it.
#[derive(Debug, Default)]
struct StreamState {
    // The request side.
    recv: VecDeque<Bytes>,
    recv_trailers: Option<HeaderMap>,
    recv_done: bool,
    recv_window: i64,
    /// Request bytes read by the call and not yet handed back to the client's window.
    recv_unacked: i64,
    recv_waker: Option<Waker>,
    /// The call no longer reads the request: what arrives is dropped (its window handed back).
    recv_dropped: bool,
    // The answer side.
    headers_sent: bool,
    /// END_STREAM queued (or waiting behind `pending`).
    send_done: bool,
    send_window: i64,
    /// Answer data waiting for window, and what follows it.
    pending: VecDeque<Bytes>,
    pending_len: usize,
    pending_end: bool,
    pending_trailers: Option<HeaderMap>,
    send_waker: Option<Waker>,
    // Both.
    /// Why the stream ended early (reset by the client, or the connection lost).
    reset: Option<StreamError>,
    reset_waker: Option<Waker>,
    /// Handles the call holds (its body and its responder).
    handles: u8,
}

impl StreamState {
    fn wake_all(&mut self) {
        for w in [
            self.recv_waker.take(),
            self.send_waker.take(),
            self.reset_waker.take(),
        ]
        .into_iter()
        .flatten()
        {
            w.wake();
        }
    }
}

struct Inner {
    streams: StreamMap<StreamState>,
    /// Highest stream id the client opened.
    last_id: u32,
    decoder: hpack::Decoder,
    /// The fields the client repeats, in typed form.
    typed: hpack::TypedFields,
    /// The last request's URI, with the pseudo-headers it was built from: a client calls the
    /// same few paths on one connection, and building a `Uri` (validating and copying path
    /// and authority) was 3 % of the router's instructions a call.
    last_uri: Option<(UriParts, Uri)>,
    continuation: Option<(u32, bool, BytesMut)>,
    out: Out,
    // The client's settings.
    max_frame: usize,
    initial_send_window: i64,
    conn_send_window: i64,
    /// Streams with answer data waiting for window.
    blocked: VecDeque<u32>,
    conn_recv_window: i64,
    conn_recv_unacked: i64,
    /// GOAWAY sent (shutting down) or received (the client is done): no new streams.
    going_away: bool,
    /// The connection is over.
    closed: bool,
    /// Resets the client may still make us see (or cause) before the connection is closed.
    reset_budget: i64,
    /// Whether the connection's task is in its turn (then what a call queues is written at
    /// its end; otherwise a call that queues output wakes the task).
    in_turn: bool,
    task: Option<Waker>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("streams", &self.streams.len())
            .field("last_id", &self.last_id)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Output was queued by a call: make sure the connection's task writes it.
    fn queued(&mut self) {
        if !self.in_turn
            && let Some(w) = self.task.take()
        {
            w.wake();
        }
    }
}

/// A request's body, as the call reads it.
#[derive(Debug)]
pub struct RecvBody {
    shared: Arc<Shared>,
    id: u32,
}

/// The answer side of a call.
#[derive(Debug)]
pub struct Respond {
    shared: Arc<Shared>,
    id: u32,
}

impl RecvBody {
    /// The next chunk of the body; `None` at its end. The chunk's flow-control window is
    /// handed back to the client as it is taken.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, StreamError>>> {
        let shared = &*self.shared;
        let mut inner = shared.lock();
        let inner = &mut *inner;
        let Some(s) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Some(Err(StreamError::ConnectionLost)));
        };
        if let Some(chunk) = s.recv.pop_front() {
            let n = chunk.len() as i64;
            s.recv_unacked += n;
            let stream_window = i64::from(shared.settings.stream_window);
            let mut queued = false;
            if !s.recv_done && s.recv_unacked >= stream_window / 2 {
                window_update(&mut inner.out.tail, self.id, s.recv_unacked as u32);
                s.recv_window += s.recv_unacked;
                s.recv_unacked = 0;
                queued = true;
            }
            inner.conn_recv_unacked += n;
            if inner.conn_recv_unacked >= i64::from(shared.settings.connection_window) / 2 {
                window_update(&mut inner.out.tail, 0, inner.conn_recv_unacked as u32);
                inner.conn_recv_window += inner.conn_recv_unacked;
                inner.conn_recv_unacked = 0;
                queued = true;
            }
            if queued {
                inner.queued();
            }
            return Poll::Ready(Some(Ok(chunk)));
        }
        if s.recv_done {
            return Poll::Ready(None);
        }
        if let Some(e) = s.reset {
            return Poll::Ready(Some(Err(e)));
        }
        s.recv_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next chunk of the body (see [`RecvBody::poll_data`]).
    pub async fn data(&mut self) -> Option<Result<Bytes, StreamError>> {
        poll_fn(|cx| self.poll_data(cx)).await
    }

    /// The request's trailers, once its data is over.
    pub fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, StreamError>> {
        let mut inner = self.shared.lock();
        let Some(s) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(StreamError::ConnectionLost));
        };
        if s.recv_done {
            return Poll::Ready(Ok(s.recv_trailers.take()));
        }
        if let Some(e) = s.reset {
            return Poll::Ready(Err(e));
        }
        s.recv_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The request's trailers (see [`RecvBody::poll_trailers`]).
    pub async fn trailers(&mut self) -> Result<Option<HeaderMap>, StreamError> {
        poll_fn(|cx| self.poll_trailers(cx)).await
    }

    /// Whether the body is over and read.
    pub fn is_end_stream(&self) -> bool {
        let inner = self.shared.lock();
        inner
            .streams
            .get(&self.id)
            .is_none_or(|s| s.recv_done && s.recv.is_empty() && s.recv_trailers.is_none())
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        if let Some(s) = inner.streams.get_mut(&self.id) {
            s.recv_dropped = true;
            // What was received and not read goes back to the connection's window.
            let unread: i64 = s.recv.drain(..).map(|b| b.len() as i64).sum();
            inner.conn_recv_unacked += unread;
            s.handles -= 1;
        }
        maybe_remove(&self.shared, inner, self.id);
    }
}

impl Respond {
    /// Sends the answer's headers (`end`: and nothing else).
    pub fn send_response(&mut self, status: StatusCode, headers: &HeaderMap, end: bool) {
        self.send_head(status, headers, &[], end);
    }

    /// Queues a gRPC answer's headers: `:status 200`, `content-type: application/grpc`, then
    /// the call's `metadata` less the names gRPC reserves ([`GRPC_RESERVED`]: the status goes
    /// in the trailers, the content type is this one). The names are skipped as the block is
    /// encoded, which costs a few comparisons a header, not a map look-up a name.
    pub fn send_grpc_headers(&mut self, metadata: &HeaderMap) {
        self.send_head(StatusCode::OK, metadata, &GRPC_RESERVED, false);
    }

    fn send_head(&mut self, status: StatusCode, headers: &HeaderMap, skip: &[&str], end: bool) {
        let shared = &*self.shared;
        let mut inner = shared.lock();
        let inner = &mut *inner;
        let Some(s) = inner.streams.get_mut(&self.id) else {
            return;
        };
        if s.headers_sent || s.reset.is_some() {
            return;
        }
        s.headers_sent = true;
        s.send_done = end;
        let max_frame = inner.max_frame;
        let head = Head {
            status: Some(status),
            grpc: !skip.is_empty(),
        };
        encode_block(
            &mut inner.out.tail,
            self.id,
            head,
            headers,
            skip,
            end,
            max_frame,
        );
        inner.queued();
        if end {
            maybe_remove(shared, inner, self.id);
        }
    }

    /// Queues answer data (`end`: the last of the answer). It leaves as the client's window
    /// allows; a sender of much data waits for [`Respond::poll_ready`] between chunks.
    pub fn send_data(&mut self, data: Bytes, end: bool) {
        let shared = &*self.shared;
        let mut inner = shared.lock();
        let inner = &mut *inner;
        let Some(s) = inner.streams.get_mut(&self.id) else {
            return;
        };
        if !s.headers_sent || s.send_done || s.reset.is_some() {
            return;
        }
        s.pending_len += data.len();
        s.pending.push_back(data);
        s.pending_end = end;
        s.send_done = end;
        if !send_pending(inner, self.id) {
            inner.blocked.push_back(self.id);
        }
        inner.queued();
        if end {
            maybe_remove(shared, inner, self.id);
        }
    }

    /// Queues one gRPC message (`end`: the last of the answer): its 5-byte prefix and the
    /// message in one DATA frame when the windows allow, written straight to the output
    /// (the common case: no queue, no allocation); otherwise as [`Respond::send_data`] does.
    pub fn send_message(&mut self, message: Bytes, end: bool) {
        let Ok(len) = u32::try_from(message.len()) else {
            return self.send_reset(0x2); // INTERNAL_ERROR: cannot be framed
        };
        let l = len.to_be_bytes();
        let prefix = [0, l[0], l[1], l[2], l[3]];
        {
            let mut inner = self.shared.lock();
            let inner = &mut *inner;
            let max_frame = inner.max_frame;
            let conn_window = inner.conn_send_window;
            let Some(s) = inner.streams.get_mut(&self.id) else {
                return;
            };
            if !s.headers_sent || s.send_done || s.reset.is_some() {
                return;
            }
            let n = message.len() + 5;
            if s.pending.is_empty()
                && n <= max_frame
                && (n as i64) <= s.send_window.min(conn_window)
            {
                let flags = if end { flag::END_STREAM } else { 0 };
                frame_head(&mut inner.out.tail, n, kind::DATA, flags, self.id);
                inner.out.tail.put_slice(&prefix);
                inner.out.payload(message);
                s.send_window -= n as i64;
                inner.conn_send_window -= n as i64;
                s.send_done = end;
                inner.queued();
                return;
            }
        }
        self.send_data(Bytes::copy_from_slice(&prefix), false);
        self.send_data(message, end);
    }

    /// Ends the answer with the trailers of a call that succeeded, `grpc-status: 0` (an
    /// encoding made once).
    pub fn send_ok_trailers(&mut self) {
        {
            let mut guard = self.shared.lock();
            let inner = &mut *guard;
            let Some(s) = inner.streams.get_mut(&self.id) else {
                return;
            };
            if !s.headers_sent || s.send_done || s.reset.is_some() {
                return;
            }
            if s.pending.is_empty() {
                s.send_done = true;
                // `grpc-status: 0`, a literal without indexing (RFC 7541 §6.2.2).
                const BLOCK: &[u8] = b"\x00\x0bgrpc-status\x010";
                frame_head(
                    &mut inner.out.tail,
                    BLOCK.len(),
                    kind::HEADERS,
                    flag::END_HEADERS | flag::END_STREAM,
                    self.id,
                );
                inner.out.tail.put_slice(BLOCK);
                inner.queued();
                return;
            }
        }
        // Data still waits for window: the trailers go after it.
        self.send_trailers(&crate::server::ok_trailers());
    }

    /// Sends trailers, ending the answer (after any data still waiting for window).
    pub fn send_trailers(&mut self, trailers: &HeaderMap) {
        let shared = &*self.shared;
        let mut inner = shared.lock();
        let inner = &mut *inner;
        let Some(s) = inner.streams.get_mut(&self.id) else {
            return;
        };
        if !s.headers_sent || s.send_done || s.reset.is_some() {
            return;
        }
        s.send_done = true;
        if s.pending.is_empty() {
            let max_frame = inner.max_frame;
            encode_block(
                &mut inner.out.tail,
                self.id,
                TRAILERS,
                trailers,
                &[],
                true,
                max_frame,
            );
        } else {
            s.pending_trailers = Some(trailers.clone());
        }
        inner.queued();
        maybe_remove(shared, inner, self.id);
    }

    /// Resets the stream with `code`.
    pub fn send_reset(&mut self, code: u32) {
        let shared = &*self.shared;
        let mut inner = shared.lock();
        let inner = &mut *inner;
        let Some(s) = inner.streams.get_mut(&self.id) else {
            return;
        };
        if s.reset.is_some() {
            return;
        }
        s.reset = Some(StreamError::Reset(code));
        s.pending.clear();
        s.pending_trailers = None;
        s.send_done = true;
        s.wake_all();
        rst_stream(&mut inner.out.tail, self.id, code);
        inner.queued();
        maybe_remove(shared, inner, self.id);
    }

    /// Ready when the stream has room for more data (less than the send buffer size waits for
    /// window); an error when the client reset it.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        let limit = self.shared.settings.max_send_buffer_size;
        let mut inner = self.shared.lock();
        let Some(s) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(StreamError::ConnectionLost));
        };
        if let Some(e) = s.reset {
            return Poll::Ready(Err(e));
        }
        if s.pending_len < limit {
            return Poll::Ready(Ok(()));
        }
        s.send_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ready once the client has reset the stream (or the connection is gone).
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<StreamError> {
        let mut inner = self.shared.lock();
        let Some(s) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(StreamError::ConnectionLost);
        };
        match s.reset {
            Some(e) => Poll::Ready(e),
            None => {
                if !s
                    .reset_waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    s.reset_waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Respond {
    fn drop(&mut self) {
        let shared = &*self.shared;
        let mut inner = shared.lock();
        let inner = &mut *inner;
        if let Some(s) = inner.streams.get_mut(&self.id) {
            s.handles -= 1;
            if !s.send_done && s.reset.is_none() && !inner.closed {
                // The call ended without finishing its answer.
                s.reset = Some(StreamError::Reset(reason::CANCEL));
                s.pending.clear();
                s.send_done = true;
                rst_stream(&mut inner.out.tail, self.id, reason::CANCEL);
                inner.queued();
            }
        }
        maybe_remove(shared, inner, self.id);
    }
}

/// Forgets a stream once its call has let go of it and nothing of it is left to send. A
/// request still arriving after a complete answer is stopped (RST_STREAM NO_ERROR).
fn maybe_remove(shared: &Shared, inner: &mut Inner, id: u32) {
    let Some(s) = inner.streams.get(&id) else {
        return;
    };
    let answered = s.send_done && s.pending.is_empty() && s.pending_trailers.is_none();
    if s.handles > 0 || !(answered || s.reset.is_some()) {
        return;
    }
    if s.reset.is_none() && !s.recv_done && !inner.closed {
        rst_stream(&mut inner.out.tail, id, reason::NO_ERROR);
        inner.queued();
    }
    if let Some(s) = inner.streams.remove(&id) {
        // Unread request bytes go back to the connection's window.
        let unread: i64 = s.recv.iter().map(|b| b.len() as i64).sum();
        inner.conn_recv_unacked += unread;
        if s.reset.is_none() {
            // A call answered in full earns back a reset (see `reset_budget`).
            inner.reset_budget =
                (inner.reset_budget + 1).min(shared.settings.max_local_error_reset_streams as i64);
        }
    }
    if inner.going_away
        && inner.streams.is_empty()
        && let Some(w) = inner.task.take()
    {
        w.wake();
    }
}

/// A header block (HEADERS, then CONTINUATION frames if it is larger than a frame): an
/// answer's headers (`status`) or trailers.
/// What a header block starts with, before the caller's headers.
#[derive(Debug, Clone, Copy)]
struct Head {
    /// `:status` (none in trailers).
    status: Option<StatusCode>,
    /// `content-type: application/grpc`.
    grpc: bool,
}

/// A trailers block's start: nothing before the caller's headers.
const TRAILERS: Head = Head {
    status: None,
    grpc: false,
};

/// Names gRPC reserves, left out of a gRPC answer's headers (tonic's list): the content type
/// is the answer's own, the status goes in the trailers.
pub const GRPC_RESERVED: [&str; 5] = [
    "te",
    "content-type",
    "grpc-message",
    "grpc-message-type",
    "grpc-status",
];

fn encode_block(
    buf: &mut BytesMut,
    id: u32,
    head: Head,
    headers: &HeaderMap,
    skip: &[&str],
    end: bool,
    max_frame: usize,
) {
    let start = buf.len();
    let end_flag = if end { flag::END_STREAM } else { 0 };
    frame_head(buf, 0, kind::HEADERS, flag::END_HEADERS | end_flag, id);
    match head.status {
        Some(StatusCode::OK) => buf.put_u8(0x88), // :status 200, static index 8
        Some(other) => hpack_literal(buf, 8, b"", other.as_str().as_bytes()),
        None => {}
    }
    if head.grpc {
        hpack_literal(buf, static_name("content-type"), b"", b"application/grpc");
    }
    hpack_headers(buf, headers, skip);
    finish_header_block(buf, start, id, end_flag, max_frame);
}

/// Moves as much of a stream's waiting answer into DATA frames as the windows allow (a frame
/// may carry several chunks: a message's prefix and the message leave as one); then its
/// trailers. Returns whether nothing is left waiting.
fn send_pending(inner: &mut Inner, id: u32) -> bool {
    let max_frame = inner.max_frame;
    let Some(s) = inner.streams.get_mut(&id) else {
        return true;
    };
    while !s.pending.is_empty() {
        let left = s.pending_len;
        if left == 0 && !s.pending_end {
            s.pending.clear();
            break;
        }
        let allowed = s
            .send_window
            .min(inner.conn_send_window)
            .min(max_frame as i64)
            .max(0) as usize;
        if allowed == 0 && left > 0 {
            return false;
        }
        let n = left.min(allowed);
        let end = n == left && s.pending_end && s.pending_trailers.is_none();
        frame_head(
            &mut inner.out.tail,
            n,
            kind::DATA,
            if end { flag::END_STREAM } else { 0 },
            id,
        );
        let mut want = n;
        while let Some(front) = s.pending.front_mut() {
            let k = want.min(front.len());
            if k > 0 {
                inner.out.payload(front.split_to(k));
                want -= k;
            }
            if front.is_empty() {
                s.pending.pop_front();
            } else {
                break;
            }
        }
        s.send_window -= n as i64;
        inner.conn_send_window -= n as i64;
        s.pending_len -= n;
        if n == left {
            s.pending.clear();
        }
    }
    if let Some(trailers) = s.pending_trailers.take() {
        encode_block(
            &mut inner.out.tail,
            id,
            TRAILERS,
            &trailers,
            &[],
            true,
            max_frame,
        );
    }
    if let Some(w) = s.send_waker.take() {
        w.wake();
    }
    true
}

/// Sends what the windows now allow of every blocked stream, in order.
fn unblock(shared: &Shared, inner: &mut Inner) {
    let mut still = VecDeque::new();
    while let Some(id) = inner.blocked.pop_front() {
        if send_pending(inner, id) {
            maybe_remove(shared, inner, id);
        } else {
            still.push_back(id);
        }
    }
    inner.blocked = still;
}

/// Ends the connection: every call still on it sees its stream reset.
fn close(inner: &mut Inner) {
    if inner.closed {
        return;
    }
    inner.closed = true;
    for s in inner.streams.values_mut() {
        s.reset.get_or_insert(StreamError::ConnectionLost);
        s.wake_all();
    }
    inner.out.clear();
}

/// Ends the connection for the client's protocol error: GOAWAY with `code`, then closed.
fn connection_error(shared: &Shared, inner: &mut Inner, code: u32, what: &'static str) {
    if inner.closed {
        return;
    }
    tracing::debug!(
        code,
        what,
        "HTTP/2 protocol error from a client; closing the connection"
    );
    goaway(inner, code);
    let _ = inner.out.write_to(&shared.tcp);
    close(inner);
}

fn goaway(inner: &mut Inner, code: u32) {
    frame_head(&mut inner.out.tail, 8, kind::GOAWAY, 0, 0);
    let last = inner.last_id;
    inner.out.tail.put_u32(last);
    inner.out.tail.put_u32(code);
    inner.going_away = true;
}

/// Resets one stream for the client's error (counted against the reset budget).
fn stream_error(shared: &Shared, inner: &mut Inner, id: u32, code: u32) {
    rst_stream(&mut inner.out.tail, id, code);
    if let Some(s) = inner.streams.get_mut(&id)
        && s.reset.is_none()
    {
        s.reset = Some(StreamError::Reset(code));
        s.pending.clear();
        s.wake_all();
    }
    spend_reset(shared, inner);
}

fn spend_reset(shared: &Shared, inner: &mut Inner) {
    inner.reset_budget -= 1;
    if inner.reset_budget < 0 {
        connection_error(
            shared,
            inner,
            reason::ENHANCE_YOUR_CALM,
            "too many streams reset before their answer",
        );
    }
}

/// A request the frames completed: a new call to start.
type NewCall = (u32, http::request::Parts);

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
    let mut out = Out::new();
    frame_head(&mut out.tail, 18, kind::SETTINGS, 0, 0);
    for (id, value) in [
        (setting::MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
        (setting::INITIAL_WINDOW_SIZE, settings.stream_window),
        (setting::MAX_HEADER_LIST_SIZE, settings.max_header_list_size),
    ] {
        out.tail.put_u16(id);
        out.tail.put_u32(value);
    }
    let raise = i64::from(settings.connection_window) - DEFAULT_WINDOW;
    if raise > 0 {
        window_update(&mut out.tail, 0, raise as u32);
    }
    let decoder = hpack::Decoder::new(HEADER_TABLE_SIZE);
    let typed = hpack::TypedFields::default();
    let shared = Arc::new(Shared {
        tcp,
        inner: Mutex::new(Inner {
            streams: StreamMap::default(),
            last_id: 0,
            decoder,
            typed,
            last_uri: None,
            continuation: None,
            out,
            max_frame: DEFAULT_MAX_FRAME,
            initial_send_window: DEFAULT_WINDOW,
            conn_send_window: DEFAULT_WINDOW,
            blocked: VecDeque::new(),
            conn_recv_window: i64::from(settings.connection_window).max(DEFAULT_WINDOW),
            conn_recv_unacked: 0,
            going_away: false,
            closed: false,
            reset_budget: settings.max_local_error_reset_streams as i64,
            in_turn: false,
            task: None,
        }),
        settings,
    });
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut preface_left = PREFACE.len();
    let mut stopping = pin!(async move {
        let _ = stop.changed().await;
    });
    let mut stopped = false;
    let mut calls = FuturesUnordered::new();
    let mut new_calls: Vec<NewCall> = Vec::new();
    poll_fn(|cx| {
        shared.lock().in_turn = true;
        if !stopped && stopping.as_mut().poll(cx).is_ready() {
            stopped = true;
            let mut inner = shared.lock();
            if !inner.going_away {
                goaway(&mut inner, reason::NO_ERROR);
            }
        }
        // Calls first, then the socket, as long as either has something for the other (see
        // `crate::server` for why in this order).
        let mut turn = 0;
        loop {
            let mut finished = false;
            while let Poll::Ready(Some(())) = calls.poll_next_unpin(cx) {
                finished = true;
            }
            if turn > 0 && !finished {
                break;
            }
            turn += 1;
            let read = read_socket(&shared, cx, &mut rbuf, &mut preface_left, &mut new_calls);
            for (id, parts) in new_calls.drain(..) {
                let body = RecvBody {
                    shared: shared.clone(),
                    id,
                };
                let respond = Respond {
                    shared: shared.clone(),
                    id,
                };
                calls.push(handler.call(peer, parts, body, respond));
                finished = true;
            }
            if !read && !finished {
                break;
            }
        }
        let mut inner = shared.lock();
        let inner = &mut *inner;
        inner.in_turn = false;
        if !inner.closed {
            if inner.out.len() > MAX_UNREAD_OUTPUT {
                tracing::debug!("a client does not read what it asks for; closing its connection");
                close(inner);
            } else {
                match inner.out.write_to(&shared.tcp) {
                    Ok(true) => {}
                    Ok(false) => {
                        if shared.tcp.poll_write_ready(cx).is_ready() {
                            cx.waker().wake_by_ref();
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "writing to a client failed");
                        close(inner);
                    }
                }
            }
        }
        if inner.closed || (inner.going_away && inner.streams.is_empty() && calls.is_empty()) {
            return Poll::Ready(());
        }
        if !inner.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            inner.task = Some(cx.waker().clone());
        }
        Poll::Pending
    })
    .await;
    // The calls still running (a lost connection) are dropped here, which cancels what they
    // started.
}

/// Reads what the socket has (a bounded number of reads) and handles its frames. Returns
/// whether anything was read.
fn read_socket(
    shared: &Shared,
    cx: &mut Context<'_>,
    rbuf: &mut BytesMut,
    preface_left: &mut usize,
    new_calls: &mut Vec<NewCall>,
) -> bool {
    let mut any = false;
    for reads in 0.. {
        if shared.lock().closed {
            break;
        }
        if reads == READS_PER_TURN {
            cx.waker().wake_by_ref();
            break;
        }
        match shared.tcp.poll_read_ready(cx) {
            Poll::Pending => break,
            Poll::Ready(Err(_)) => {
                close(&mut shared.lock());
                break;
            }
            Poll::Ready(Ok(())) => {}
        }
        if rbuf.capacity() - rbuf.len() < 16 * 1024 {
            rbuf.reserve(64 * 1024);
        }
        match read_once(&shared.tcp, rbuf) {
            Ok((0, _)) => {
                close(&mut shared.lock());
                break;
            }
            Ok(_) => {
                any = true;
                let mut inner = shared.lock();
                if *preface_left > 0 {
                    let n = (*preface_left).min(rbuf.len());
                    let at = PREFACE.len() - *preface_left;
                    if rbuf[..n] != PREFACE[at..at + n] {
                        // Not HTTP/2 (an HTTP/1 request, or noise): nothing to answer.
                        close(&mut inner);
                        break;
                    }
                    rbuf.advance(n);
                    *preface_left -= n;
                    if *preface_left > 0 {
                        continue;
                    }
                }
                // Drained or not, the loop goes on: the next `poll_read_ready` registers the
                // task for the next data (no system call once the readiness was cleared).
                read_frames(shared, &mut inner, rbuf, new_calls);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                close(&mut shared.lock());
                break;
            }
        }
    }
    any
}

/// Handles every complete frame in `rbuf`.
fn read_frames(
    shared: &Shared,
    inner: &mut Inner,
    rbuf: &mut BytesMut,
    new_calls: &mut Vec<NewCall>,
) {
    while rbuf.len() >= 9 && !inner.closed {
        let len = (usize::from(rbuf[0]) << 16) | (usize::from(rbuf[1]) << 8) | usize::from(rbuf[2]);
        if len > DEFAULT_MAX_FRAME {
            return connection_error(
                shared,
                inner,
                reason::FRAME_SIZE_ERROR,
                "a frame larger than allowed",
            );
        }
        if rbuf.len() < 9 + len {
            rbuf.reserve(9 + len - rbuf.len());
            break;
        }
        let head = rbuf.split_to(9);
        let payload = rbuf.split_to(len).freeze();
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        frame(shared, inner, head[3], head[4], id, payload, new_calls);
    }
}

/// Handles one frame: its form checked by [`parse_frame`], its meaning here.
fn frame(
    shared: &Shared,
    inner: &mut Inner,
    ty: u8,
    flags: u8,
    id: u32,
    payload: Bytes,
    new_calls: &mut Vec<NewCall>,
) {
    let continuing = inner.continuation.as_ref().map(|(stream, _, _)| *stream);
    let frame = match parse_frame(ty, flags, id, payload, continuing) {
        Ok(frame) => frame,
        Err(e) => return connection_error(shared, inner, e.code, e.what),
    };
    match frame {
        ParsedFrame::Data {
            id,
            end_stream,
            flow_len,
            payload,
        } => {
            inner.conn_recv_window -= flow_len;
            if inner.conn_recv_window < 0 {
                return connection_error(
                    shared,
                    inner,
                    reason::FLOW_CONTROL_ERROR,
                    "DATA beyond the connection's window",
                );
            }
            // Padding, and data no call will read, go back to the window at once.
            let mut released = flow_len - payload.len() as i64;
            let Some(s) = inner.streams.get_mut(&id) else {
                if id > inner.last_id {
                    return connection_error(
                        shared,
                        inner,
                        reason::PROTOCOL_ERROR,
                        "DATA on a stream never opened",
                    );
                }
                inner.conn_recv_unacked += flow_len;
                return release_connection(shared, inner);
            };
            if s.recv_done {
                // Closed for the client's sending: a stream error (STREAM_CLOSED).
                inner.conn_recv_unacked += flow_len;
                release_connection(shared, inner);
                return stream_error(shared, inner, id, 0x5);
            }
            s.recv_window -= flow_len;
            if s.recv_window < 0 {
                inner.conn_recv_unacked += flow_len;
                release_connection(shared, inner);
                return stream_error(shared, inner, id, reason::FLOW_CONTROL_ERROR);
            }
            if s.recv_dropped || s.reset.is_some() {
                released = flow_len;
            } else if !payload.is_empty() {
                s.recv.push_back(payload);
            }
            s.recv_unacked += released;
            if end_stream {
                s.recv_done = true;
            }
            if let Some(w) = s.recv_waker.take() {
                w.wake();
            }
            inner.conn_recv_unacked += released;
            release_connection(shared, inner);
        }
        ParsedFrame::Headers {
            id,
            end_stream,
            end_headers,
            fragment,
        } => {
            let block = BytesMut::from(&fragment[..]);
            if end_headers {
                header_block(shared, inner, id, end_stream, block, new_calls);
            } else {
                inner.continuation = Some((id, end_stream, block));
            }
        }
        ParsedFrame::Continuation {
            end_headers,
            fragment,
        } => {
            // `parse_frame` refused a CONTINUATION with no header block being gathered.
            let Some((stream, end_stream, mut block)) = inner.continuation.take() else {
                return;
            };
            if block.len() + fragment.len() > shared.settings.max_header_list_size as usize * 4 {
                // A block this much longer than the list limit cannot decode to a list within
                // it (a header counts its bytes; Huffman coding does not halve text).
                return connection_error(
                    shared,
                    inner,
                    reason::ENHANCE_YOUR_CALM,
                    "a header block far larger than the header list limit",
                );
            }
            block.extend_from_slice(&fragment);
            if end_headers {
                header_block(shared, inner, stream, end_stream, block, new_calls);
            } else {
                inner.continuation = Some((stream, end_stream, block));
            }
        }
        ParsedFrame::RstStream { id, code } => {
            if id > inner.last_id {
                return connection_error(
                    shared,
                    inner,
                    reason::PROTOCOL_ERROR,
                    "RST_STREAM on a stream never opened",
                );
            }
            let Some(s) = inner.streams.get_mut(&id) else {
                return;
            };
            let unanswered = !s.send_done;
            if s.reset.is_none() {
                s.reset = Some(StreamError::Reset(code));
                s.pending.clear();
                s.pending_trailers = None;
                s.wake_all();
            }
            if unanswered {
                // "Rapid reset": streams opened and reset at once cost the server work each.
                spend_reset(shared, inner);
            }
            maybe_remove(shared, inner, id);
        }
        ParsedFrame::Settings(settings) => {
            // A client's stream limit concerns a server that pushes, which this one does not.
            apply_settings(
                &settings,
                &mut inner.initial_send_window,
                inner.streams.values_mut().map(|s| &mut s.send_window),
                &mut inner.max_frame,
                &mut inner.out.tail,
            );
            unblock(shared, inner);
        }
        ParsedFrame::SettingsAck | ParsedFrame::Ping { ack: true, .. } | ParsedFrame::Ignored => {}
        ParsedFrame::PushPromise => {
            connection_error(
                shared,
                inner,
                reason::PROTOCOL_ERROR,
                "PUSH_PROMISE from a client",
            );
        }
        ParsedFrame::Ping { ack: false, data } => {
            frame_head(&mut inner.out.tail, 8, kind::PING, flag::ACK, 0);
            inner.out.tail.put_slice(&data);
        }
        ParsedFrame::GoAway { .. } => {
            // The client opens no more streams; the calls in flight finish.
            inner.going_away = true;
        }
        ParsedFrame::WindowUpdate { id, increment } => {
            if id == 0 {
                if let Err(e) = grow_connection_window(&mut inner.conn_send_window, increment) {
                    return connection_error(shared, inner, e.code, e.what);
                }
            } else if let Some(s) = inner.streams.get_mut(&id) {
                s.send_window += increment;
                if increment == 0 || s.send_window > MAX_WINDOW {
                    return stream_error(shared, inner, id, reason::FLOW_CONTROL_ERROR);
                }
            } else if id > inner.last_id {
                return connection_error(
                    shared,
                    inner,
                    reason::PROTOCOL_ERROR,
                    "WINDOW_UPDATE on a stream never opened",
                );
            }
            unblock(shared, inner);
        }
    }
}

/// Hands the connection's window back once half of it was used.
fn release_connection(shared: &Shared, inner: &mut Inner) {
    if inner.conn_recv_unacked >= i64::from(shared.settings.connection_window) / 2 {
        window_update(&mut inner.out.tail, 0, inner.conn_recv_unacked as u32);
        inner.conn_recv_window += inner.conn_recv_unacked;
        inner.conn_recv_unacked = 0;
    }
}

/// A complete header block: always decoded (the decoder's table must follow the client's),
/// then a new request, or a request's trailers.
fn header_block(
    shared: &Shared,
    inner: &mut Inner,
    id: u32,
    end_stream: bool,
    block: BytesMut,
    new_calls: &mut Vec<NewCall>,
) {
    let limit = shared.settings.max_header_list_size as usize;
    let mut size = 0usize;
    let mut malformed: Option<&'static str> = None;
    let mut pseudo_done = false;
    let (mut method, mut scheme, mut authority, mut path) = (None, None, None, None);
    let mut headers = HeaderMap::new();
    let decoded = inner.decoder.decode(&block, |name, value| {
        size += name.len() + value.len() + 32;
        if size > limit {
            malformed.get_or_insert("the header list is larger than allowed");
            return;
        }
        if malformed.is_some() {
            return;
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            if pseudo_done {
                malformed = Some("a pseudo-header after a regular header");
                return;
            }
            let slot = match pseudo {
                b"method" => &mut method,
                b"scheme" => &mut scheme,
                b"authority" => &mut authority,
                b"path" => &mut path,
                _ => {
                    malformed = Some("an unknown pseudo-header");
                    return;
                }
            };
            if slot.replace(value.to_vec()).is_some() {
                malformed = Some("a repeated pseudo-header");
            }
            return;
        }
        pseudo_done = true;
        if name.iter().any(u8::is_ascii_uppercase) {
            malformed = Some("an upper-case header name");
            return;
        }
        if name == b"te" && value != b"trailers" {
            malformed = Some("a te header other than \"trailers\"");
            return;
        }
        match inner.typed.get(name, value) {
            Some((n, v)) => {
                if CONNECTION_SPECIFIC.contains(&n.as_str()) {
                    malformed = Some("a connection-specific header");
                } else {
                    headers.append(n, v);
                }
            }
            None => malformed = Some("a header name or value that is not valid"),
        }
    });
    if decoded.is_err() {
        return connection_error(
            shared,
            inner,
            reason::COMPRESSION_ERROR,
            "a header block that does not decode",
        );
    }
    if let Some(s) = inner.streams.get_mut(&id) {
        // Trailers of a request.
        if s.recv_done {
            return stream_error(shared, inner, id, 0x5);
        }
        if !end_stream || malformed.is_some() || method.is_some() || path.is_some() {
            return stream_error(shared, inner, id, reason::PROTOCOL_ERROR);
        }
        s.recv_trailers = Some(headers);
        s.recv_done = true;
        if let Some(w) = s.recv_waker.take() {
            w.wake();
        }
        return;
    }
    if id.is_multiple_of(2) {
        return connection_error(
            shared,
            inner,
            reason::PROTOCOL_ERROR,
            "HEADERS on a stream id a client may not open",
        );
    }
    if id <= inner.last_id {
        // A stream this server has closed (reset, or answered before the request ended):
        // frames the client sent before it learned so are ignored (RFC 9113 §5.1).
        return;
    }
    inner.last_id = id;
    if inner.going_away {
        // Opened after GOAWAY: not served (the client sends it again elsewhere).
        rst_stream(&mut inner.out.tail, id, reason::REFUSED_STREAM);
        return;
    }
    if inner.streams.len() >= MAX_CONCURRENT_STREAMS as usize {
        rst_stream(&mut inner.out.tail, id, reason::REFUSED_STREAM);
        return spend_reset(shared, inner);
    }
    let parts = match (malformed, method, scheme, path) {
        (None, Some(method), Some(scheme), Some(path)) if !path.is_empty() => {
            let key = UriParts {
                scheme,
                authority,
                path,
            };
            request_parts(&method, key, &mut inner.last_uri, headers)
        }
        _ => None,
    };
    let Some(parts) = parts else {
        rst_stream(&mut inner.out.tail, id, reason::PROTOCOL_ERROR);
        return spend_reset(shared, inner);
    };
    let window = i64::from(shared.settings.stream_window);
    inner.streams.insert(
        id,
        StreamState {
            recv_done: end_stream,
            recv_window: window,
            send_window: inner.initial_send_window,
            handles: 2,
            ..StreamState::default()
        },
    );
    new_calls.push((id, parts));
}

/// A request's head from its pseudo-headers and headers; `None` if they do not make one.
/// A request's `:scheme`, `:authority` and `:path`.
#[derive(Debug, PartialEq, Eq)]
struct UriParts {
    scheme: Vec<u8>,
    authority: Option<Vec<u8>>,
    path: Vec<u8>,
}

fn request_parts(
    method: &[u8],
    key: UriParts,
    last_uri: &mut Option<(UriParts, Uri)>,
    headers: HeaderMap,
) -> Option<http::request::Parts> {
    let method = Method::from_bytes(method).ok()?;
    let uri = match last_uri {
        Some((last, uri)) if *last == key => uri.clone(),
        _ => {
            let mut uri = http::uri::Builder::new().path_and_query(key.path.as_slice());
            // A URI has a scheme only with an authority (`http::Uri`'s rule); without
            // `:authority` (RFC 9113 allows it) the request's URI is its path.
            if let Some(a) = &key.authority {
                uri = uri
                    .scheme(std::str::from_utf8(&key.scheme).ok()?)
                    .authority(a.as_slice());
            }
            let uri: Uri = uri.build().ok()?;
            *last_uri = Some((key, uri.clone()));
            uri
        }
    };
    let mut request = http::Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = headers;
    Some(request.into_parts().0)
}

// ---- gRPC on top: what the router's handler answers with -------------------------------------

/// How a call's wait for its answer ended.
pub use crate::server::Answered;

/// Waits for `answer`, within `timeout` if the caller sent one, unless the client resets the
/// stream first: `answer` is then dropped, which cancels what it started.
pub async fn answer_within<T>(
    respond: &mut Respond,
    timeout: Option<Duration>,
    answer: impl Future<Output = T>,
) -> Answered<T> {
    crate::server::answer_unless_reset(|cx| respond.poll_reset(cx).map(|_| ()), timeout, answer)
        .await
}

/// Answers with a status alone: a trailers-only response, as tonic sends one.
pub fn send_status(respond: &mut Respond, status: &Status) {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
    if let Err(e) = status.add_header(&mut headers) {
        tracing::debug!(error = %e, "a status could not be put in headers");
        headers.clear();
        headers.insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
        let _ =
            Status::internal("the answer's status could not be encoded").add_header(&mut headers);
    }
    respond.send_response(StatusCode::OK, &headers, true);
}

/// Serves a call with tonic's `routes`, as tonic's server would: the caller's `grpc-timeout`
/// as a backstop, the call dropped if the client resets it, the response relayed as it
/// streams ([`send_http`]).
pub async fn route(
    routes: Routes,
    request: http::Request<tonic::body::Body>,
    mut respond: Respond,
) {
    let timeout = crate::timeout::of(request.headers());
    match answer_within(&mut respond, timeout, routes.oneshot(request)).await {
        Answered::Answer(Ok(response)) => send_http(respond, response).await,
        Answered::Answer(Err(never)) => match never {},
        Answered::TimedOut => send_status(&mut respond, &crate::server::timeout_expired()),
        Answered::Reset => {}
    }
}

/// Answers with a response from elsewhere (tonic's routes): its headers, then its body as it
/// comes (each chunk waiting while the stream's queue is full), then its trailers.
pub async fn send_http(mut respond: Respond, response: http::Response<tonic::body::Body>) {
    let (parts, body) = response.into_parts();
    let mut headers = parts.headers;
    for name in crate::server::CONNECTION_HEADERS {
        headers.remove(name);
    }
    if headers
        .get(http::header::TE)
        .is_some_and(|v| v != "trailers")
    {
        headers.remove(http::header::TE);
    }
    let end = body.is_end_stream();
    respond.send_response(parts.status, &headers, end);
    if end {
        return;
    }
    let mut body = pin!(body);
    loop {
        let next = poll_fn(|cx| {
            if respond.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            body.as_mut().poll_frame(cx).map(Some)
        })
        .await;
        let frame = match next {
            None => return,
            Some(None) => return respond.send_data(Bytes::new(), true),
            Some(Some(Err(status))) => {
                tracing::debug!(%status, "an answer's body failed");
                return respond.send_reset(0x2); // INTERNAL_ERROR
            }
            Some(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                respond.send_data(data, end);
                if end {
                    return;
                }
                if poll_fn(|cx| respond.poll_ready(cx)).await.is_err() {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return respond.send_trailers(&trailers);
                }
            }
        }
    }
}

/// A request body as tonic's routes read it.
impl HttpBody for RecvBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match this.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.status()))),
            Poll::Ready(None) => {}
            Poll::Pending => return Poll::Pending,
        }
        match this.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.status()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        RecvBody::is_end_stream(self)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use h2::client::SendRequest;
    use http::header::HeaderValue;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Echoes a request: its body back (in chunks as they come, each waiting for room), its
    /// trailers' `x-t` as a header of the answer's trailers, and `grpc-status: 0`. A request
    /// with `x-hang` is never answered.
    #[derive(Clone)]
    struct Echo;

    impl Handler for Echo {
        async fn call(
            &self,
            _peer: Peer,
            request: http::request::Parts,
            mut body: RecvBody,
            mut respond: Respond,
        ) {
            {
                if request.headers.contains_key("x-hang") {
                    return std::future::pending().await;
                }
                if let Some(n) = request.headers.get("x-message") {
                    // One gRPC message of that many bytes, then `grpc-status: 0`.
                    let n: usize = n.to_str().unwrap().parse().unwrap();
                    respond.send_response(StatusCode::OK, &HeaderMap::new(), false);
                    respond.send_message(Bytes::from(vec![7u8; n]), false);
                    return respond.send_ok_trailers();
                }
                let mut headers = HeaderMap::new();
                headers.insert("x-path", HeaderValue::from_str(request.uri.path()).unwrap());
                if let Some(a) = request.uri.authority() {
                    headers.insert("x-authority", HeaderValue::from_str(a.as_str()).unwrap());
                }
                respond.send_response(StatusCode::OK, &headers, false);
                while let Some(chunk) = body.data().await {
                    let Ok(chunk) = chunk else { return };
                    respond.send_data(chunk, false);
                    if poll_fn(|cx| respond.poll_ready(cx)).await.is_err() {
                        return;
                    }
                }
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                if let Ok(Some(t)) = body.trailers().await
                    && let Some(v) = t.get("x-t")
                {
                    trailers.insert("x-t", v.clone());
                }
                respond.send_trailers(&trailers);
            }
        }
    }

    async fn start() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(tcp, _)| tcp), l))
        });
        tokio::spawn(serve(
            Echo,
            Settings::default(),
            incoming,
            std::future::pending(),
        ));
        addr
    }

    async fn h2_client(
        addr: SocketAddr,
    ) -> (
        SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    ) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        let task = tokio::spawn(conn);
        (send.ready().await.unwrap(), task)
    }

    fn post(path: &str) -> http::Request<()> {
        http::Request::post(format!("http://router{path}"))
            .body(())
            .unwrap()
    }

    /// Each call on a connection gets its own path and authority, whether or not it repeats
    /// the previous call's (the last URI is kept and reused when they match).
    #[tokio::test]
    async fn each_call_gets_its_own_uri() {
        let addr = start().await;
        let (mut c, _conn) = h2_client(addr).await;
        for (authority, path) in [
            ("a", "/x"),
            ("a", "/x"),
            ("a", "/y"),
            ("b", "/y"),
            ("a", "/x"),
        ] {
            let request = http::Request::post(format!("http://{authority}{path}"))
                .body(())
                .unwrap();
            let (response, _) = c.send_request(request, true).unwrap();
            let parts = response.await.unwrap().into_parts().0;
            assert_eq!(parts.headers["x-path"], path);
            assert_eq!(parts.headers["x-authority"], authority);
        }
    }

    #[tokio::test]
    async fn large_bodies_and_trailers_flow_both_ways_under_flow_control() {
        let addr = start().await;
        let (mut c, _conn) = h2_client(addr).await;
        // h2's client windows are 64 KiB: the answer waits for its window updates, the
        // request for the server's.
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut calls = Vec::new();
        for _ in 0..3 {
            let (response, mut stream) = c.send_request(post("/echo"), false).unwrap();
            let body = body.clone();
            // The echo answers as the request comes: send and read at once.
            tokio::spawn(async move {
                let mut rest = Bytes::from(body);
                while !rest.is_empty() {
                    stream.reserve_capacity(rest.len().min(1 << 20));
                    let n = poll_fn(|cx| stream.poll_capacity(cx))
                        .await
                        .unwrap()
                        .unwrap();
                    stream
                        .send_data(rest.split_to(n.min(rest.len())), false)
                        .unwrap();
                }
                let mut t = HeaderMap::new();
                t.insert("x-t", HeaderValue::from_static("tail"));
                stream.send_trailers(t).unwrap();
            });
            calls.push(tokio::spawn(async move {
                let (parts, mut recv) = response.await.unwrap().into_parts();
                let mut got = BytesMut::new();
                while let Some(chunk) = recv.data().await {
                    let chunk = chunk.unwrap();
                    let _ = recv.flow_control().release_capacity(chunk.len());
                    got.extend_from_slice(&chunk);
                }
                let trailers = recv.trailers().await.unwrap().unwrap();
                (parts, got, trailers)
            }));
        }
        for call in calls {
            let (parts, got, trailers) = call.await.unwrap();
            assert_eq!(parts.status, StatusCode::OK);
            assert_eq!(parts.headers["x-path"], "/echo");
            assert_eq!(got.len(), body.len());
            assert!(got[..] == body[..]);
            assert_eq!(trailers["x-t"], "tail");
            assert_eq!(trailers["grpc-status"], "0");
        }
    }

    #[tokio::test]
    async fn grpc_messages_small_and_large_are_framed_whole() {
        let addr = start().await;
        let (mut c, _conn) = h2_client(addr).await;
        for n in [0usize, 100, 16_379, 16_380, 100_000, 2_000_000] {
            let mut request = post("/m");
            request
                .headers_mut()
                .insert("x-message", HeaderValue::from(n));
            let (response, _s) = c.send_request(request, true).unwrap();
            let (_, mut recv) = response.await.unwrap().into_parts();
            let mut got = BytesMut::new();
            while let Some(chunk) = recv.data().await {
                let chunk = chunk.unwrap();
                let _ = recv.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            assert_eq!(got.len(), n + 5, "{n}");
            assert_eq!(
                &got[..5],
                &[0, (n >> 24) as u8, (n >> 16) as u8, (n >> 8) as u8, n as u8]
            );
            assert!(got[5..].iter().all(|&b| b == 7), "{n}");
            let trailers = recv.trailers().await.unwrap().unwrap();
            assert_eq!(trailers["grpc-status"], "0", "{n}");
        }
    }

    /// A connection with the preface and an empty SETTINGS sent, and the server's SETTINGS
    /// read (up to its first frames).
    async fn raw(addr: SocketAddr) -> TcpStream {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(PREFACE).await.unwrap();
        tcp.write_all(&[0, 0, 0, kind::SETTINGS, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        tcp
    }

    /// Reads frames until one of type `ty` comes (its flags, stream and payload), or the
    /// connection ends (`None`).
    async fn until(tcp: &mut TcpStream, ty: u8) -> Option<(u8, u32, Vec<u8>)> {
        loop {
            let mut head = [0u8; 9];
            tcp.read_exact(&mut head).await.ok()?;
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.ok()?;
            if head[3] == ty {
                let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
                return Some((head[4], id, payload));
            }
        }
    }

    /// A request's header block: POST, http, `path`, and `extra` literal bytes.
    fn request_block(path: &str, extra: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(0x83);
        b.put_u8(0x86);
        hpack_literal(&mut b, 4, b"", path.as_bytes());
        b.put_slice(extra);
        b.to_vec()
    }

    fn headers_frame(id: u32, flags: u8, block: &[u8]) -> Vec<u8> {
        crate::wire::test_frame(kind::HEADERS, flags, id, block)
    }

    #[tokio::test]
    async fn protocol_errors_close_the_connection_with_goaway() {
        let addr = start().await;
        let good = request_block("/echo", &[]);
        use crate::wire::test_frame as frame;
        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            (
                "a frame over 16 KiB",
                frame(kind::DATA, 0, 1, &[0; 16_385]),
                reason::FRAME_SIZE_ERROR,
            ),
            (
                "DATA on stream 0",
                frame(kind::DATA, 0, 0, &[9]),
                reason::PROTOCOL_ERROR,
            ),
            (
                "DATA on a stream never opened",
                frame(kind::DATA, 0, 7, &[9]),
                reason::PROTOCOL_ERROR,
            ),
            (
                "an even stream id",
                headers_frame(2, flag::END_HEADERS, &good),
                reason::PROTOCOL_ERROR,
            ),
            (
                "an undecodable header block",
                headers_frame(1, flag::END_HEADERS, &[0xff, 0x7f]),
                reason::COMPRESSION_ERROR,
            ),
            (
                "CONTINUATION without HEADERS",
                frame(kind::CONTINUATION, flag::END_HEADERS, 1, &[0x88]),
                reason::PROTOCOL_ERROR,
            ),
            (
                "a header block interrupted",
                [
                    headers_frame(1, 0, &good),
                    frame(kind::PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]),
                ]
                .concat(),
                reason::PROTOCOL_ERROR,
            ),
            (
                "a PUSH_PROMISE",
                frame(kind::PUSH_PROMISE, flag::END_HEADERS, 1, &[0, 0, 0, 2]),
                reason::PROTOCOL_ERROR,
            ),
            (
                "SETTINGS of a bad length",
                frame(kind::SETTINGS, 0, 0, &[0, 4, 0, 0, 0]),
                reason::FRAME_SIZE_ERROR,
            ),
            (
                "an initial window over 2^31-1",
                frame(kind::SETTINGS, 0, 0, &[0, 4, 0xff, 0xff, 0xff, 0xff]),
                reason::FLOW_CONTROL_ERROR,
            ),
            (
                "a zero WINDOW_UPDATE",
                frame(kind::WINDOW_UPDATE, 0, 0, &[0, 0, 0, 0]),
                reason::PROTOCOL_ERROR,
            ),
            (
                "a PING of 3 bytes",
                frame(kind::PING, 0, 0, &[1, 2, 3]),
                reason::FRAME_SIZE_ERROR,
            ),
        ];
        for (what, bytes, want) in cases {
            let mut tcp = raw(addr).await;
            tcp.write_all(&bytes).await.unwrap();
            let (_, _, payload) =
                tokio::time::timeout(Duration::from_secs(10), until(&mut tcp, kind::GOAWAY))
                    .await
                    .unwrap_or_else(|_| panic!("{what}: no GOAWAY"))
                    .unwrap_or_else(|| panic!("{what}: closed without GOAWAY"));
            let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
            assert_eq!(code, want, "{what}");
            // Then the connection is closed.
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest))
                .await
                .expect(what);
        }
        // The server still serves.
        let (mut c, _conn) = h2_client(addr).await;
        let (response, _s) = c.send_request(post("/echo"), true).unwrap();
        assert_eq!(response.await.unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn malformed_requests_are_refused_alone() {
        let addr = start().await;
        let mut tcp = raw(addr).await;
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("no :path", vec![0x83, 0x86]),
            (
                "an upper-case name",
                request_block("/echo", &[0x00, 1, b'X', 1, b'y']),
            ),
            (
                "a connection header",
                request_block(
                    "/echo",
                    &[
                        0x00, 10, b'c', b'o', b'n', b'n', b'e', b'c', b't', b'i', b'o', b'n', 5,
                        b'c', b'l', b'o', b's', b'e',
                    ],
                ),
            ),
            (
                "te other than trailers",
                request_block("/echo", &[0x00, 2, b't', b'e', 4, b'g', b'z', b'i', b'p']),
            ),
            (
                "an unknown pseudo-header",
                request_block("/echo", &[0x00, 4, b':', b'f', b'o', b'o', 1, b'x']),
            ),
        ];
        let mut id = 1;
        for (what, block) in bad {
            tcp.write_all(&headers_frame(
                id,
                flag::END_HEADERS | flag::END_STREAM,
                &block,
            ))
            .await
            .unwrap();
            let (_, got, payload) =
                tokio::time::timeout(Duration::from_secs(10), until(&mut tcp, kind::RST_STREAM))
                    .await
                    .unwrap_or_else(|_| panic!("{what}: no RST_STREAM"))
                    .expect(what);
            assert_eq!(got, id, "{what}");
            assert_eq!(payload, reason::PROTOCOL_ERROR.to_be_bytes(), "{what}");
            id += 2;
        }
        // The connection still serves: a good request is answered.
        let block = request_block("/echo", &[]);
        tcp.write_all(&headers_frame(
            id,
            flag::END_HEADERS | flag::END_STREAM,
            &block,
        ))
        .await
        .unwrap();
        let (flags, got, _) =
            tokio::time::timeout(Duration::from_secs(10), until(&mut tcp, kind::HEADERS))
                .await
                .expect("no answer")
                .unwrap();
        assert_eq!(got, id);
        assert_eq!(flags & flag::END_STREAM, 0, "headers, then the trailers");
    }

    #[tokio::test]
    async fn a_request_still_coming_after_its_answer_is_stopped_and_its_late_frames_ignored() {
        let addr = start().await;
        let mut tcp = raw(addr).await;
        let mut x_message = vec![0x00, 9];
        x_message.extend_from_slice(b"x-message");
        x_message.extend_from_slice(&[1, b'3']);
        // Stream 1: the request does not end; the answer comes anyway.
        let block = request_block("/m", &x_message);
        tcp.write_all(&headers_frame(1, flag::END_HEADERS, &block))
            .await
            .unwrap();
        let (_, id, payload) =
            tokio::time::timeout(Duration::from_secs(10), until(&mut tcp, kind::RST_STREAM))
                .await
                .expect("no RST_STREAM")
                .unwrap();
        assert_eq!((id, payload), (1, reason::NO_ERROR.to_be_bytes().to_vec()));
        // The client's DATA and trailers sent before it saw the reset: ignored.
        tcp.write_all(&[0, 0, 2, kind::DATA, 0, 0, 0, 0, 1, 9, 9])
            .await
            .unwrap();
        let trailers = [0x00, 3, b'x', b'-', b't', 1, b'1'];
        tcp.write_all(&headers_frame(
            1,
            flag::END_HEADERS | flag::END_STREAM,
            &trailers,
        ))
        .await
        .unwrap();
        // Stream 3 is served on the same connection.
        tcp.write_all(&headers_frame(
            3,
            flag::END_HEADERS | flag::END_STREAM,
            &block,
        ))
        .await
        .unwrap();
        let (_, id, _) = tokio::time::timeout(Duration::from_secs(10), until(&mut tcp, kind::DATA))
            .await
            .expect("no answer")
            .unwrap();
        assert_eq!(id, 3);
    }

    #[tokio::test]
    async fn streams_beyond_the_advertised_limit_are_refused() {
        let addr = start().await;
        let mut tcp = raw(addr).await;
        let mut x_hang = vec![0x00, 6];
        x_hang.extend_from_slice(b"x-hang");
        x_hang.extend_from_slice(&[1, b'1']);
        let block = request_block("/echo", &x_hang);
        let mut burst = Vec::new();
        for k in 0..=MAX_CONCURRENT_STREAMS {
            burst.extend(headers_frame(
                2 * k + 1,
                flag::END_HEADERS | flag::END_STREAM,
                &block,
            ));
        }
        tcp.write_all(&burst).await.unwrap();
        // Every stream up to the limit waits for its (never coming) answer; the one beyond is
        // refused.
        let (_, id, payload) =
            tokio::time::timeout(Duration::from_secs(30), until(&mut tcp, kind::RST_STREAM))
                .await
                .expect("no RST_STREAM")
                .unwrap();
        assert_eq!(id, 2 * MAX_CONCURRENT_STREAMS + 1);
        assert_eq!(payload, reason::REFUSED_STREAM.to_be_bytes());
    }

    #[tokio::test]
    async fn a_client_resetting_streams_without_end_is_sent_away() {
        let addr = start().await;
        let (mut c, conn) = h2_client(addr).await;
        let mut hang = post("/echo");
        hang.headers_mut()
            .insert("x-hang", HeaderValue::from_static("1"));
        // Budget: 1,024 resets of unanswered streams (Settings::default()).
        let mut refused = false;
        for _ in 0..3_000 {
            let Ok(ready) = tokio::time::timeout(Duration::from_secs(10), c.clone().ready()).await
            else {
                panic!("the client could not open a stream");
            };
            let Ok(mut ready) = ready else {
                refused = true;
                break;
            };
            let Ok((_response, mut stream)) = ready.send_request(hang.clone(), false) else {
                refused = true;
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            c = ready;
            tokio::task::yield_now().await;
        }
        let ended = tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the connection was closed")
            .unwrap();
        let e = ended.expect_err("closed with GOAWAY");
        assert_eq!(
            e.reason(),
            Some(h2::Reason::ENHANCE_YOUR_CALM),
            "{e} (refused: {refused})"
        );
    }

    #[tokio::test]
    async fn a_client_that_asks_without_reading_is_dropped() {
        let addr = start().await;
        let mut tcp = raw(addr).await;
        let ping = [0, 0, 8, kind::PING, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let burst: Vec<u8> = ping
            .iter()
            .copied()
            .cycle()
            .take(ping.len() * 4096)
            .collect();
        // Each PING asks for 17 bytes back; the client reads none. Bounded: 200 MiB of PINGs.
        let mut closed = false;
        for _ in 0..3_000 {
            match tokio::time::timeout(Duration::from_secs(10), tcp.write_all(&burst)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                // The server stopped reading: it is about to close, or has.
                Err(_) => break,
            }
        }
        if !closed {
            let mut buf = vec![0u8; 1 << 16];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(_)) => {}
                    Err(_) => panic!("the connection stayed open"),
                }
            }
        }
    }
}
