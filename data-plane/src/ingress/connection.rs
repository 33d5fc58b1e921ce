//! The router's HTTP/2 server: each client connection served on the `h2` crate directly by one
//! task, which also runs the connection's calls.
//!
//! Why by hand: `tonic::transport::Server` (hyper's HTTP/2 server underneath) ran every call
//! as a task of its own, through tower layers (timeout, error recovery, connection info, size
//! limit, boxing), axum's router and tonic's codec, before `ModelInfer`'s handler; the answer
//! then went back through the same layers, and the call's task woke the connection's task to
//! write it. On the hot path that glue cost more than the router's own work. Here the
//! connection's task accepts a stream and keeps the call in a `FuturesUnordered` next to the
//! connection: `ModelInfer` is read, routed and answered straight on the stream (HEADERS, DATA
//! and trailers queued together, written in one `writev` by the next poll of the connection),
//! with no task spawned and no wake-up of another task. The node side is the router's own
//! client too ([`crate::endpoint::unary`]).
//!
//! Everything else goes to the services as before, unchanged: health, the other OIP methods,
//! pass-through, and the `ModelInfer` calls the direct path does not take (a compressed
//! request, which tonic refuses with its own status) are handed to tonic's
//! [`Routes`](tonic::service::Routes) as an `http::Request` and their response (headers, body
//! as it streams, trailers) is written back with HTTP/2 flow control, as hyper did.
//!
//! What this keeps of the server it replaces:
//! - the HTTP/2 settings the router had through tonic (hyper's windows, frame size, header list
//!   size and send buffer; no limit on concurrent streams, as tonic set none); no keep-alive
//!   pings (tonic's server sends none unless told to); HTTP/2 only; TCP_NODELAY is set where
//!   connections are accepted;
//! - the caller's `grpc-timeout` as a backstop on every call: a call not answered by then is
//!   ended with CANCELLED "Timeout expired", as tonic's server did (`ModelInfer` answers
//!   DEADLINE_EXCEEDED itself a little earlier, see [`super::deadline`]);
//! - the inbound message size limit ([`crate::limits`]), RESOURCE_EXHAUSTED, on every call;
//! - tonic's statuses for a `ModelInfer` request that cannot be read (no message, a truncated
//!   one, a compression flag without `grpc-encoding`, a message that does not decode), and its
//!   answer's form: metadata in the headers (reserved gRPC headers left out), `content-type:
//!   application/grpc`, the message, `grpc-status: 0` in the trailers; an error as a
//!   trailers-only answer;
//! - cancellation: a call whose client resets its stream is dropped (so the node's call is
//!   reset too);
//! - graceful shutdown: on the stop signal every connection sends GOAWAY, finishes its calls in
//!   flight and closes; the server returns when every connection has.
//!
//! Not kept: hyper's `date` response header (nothing in gRPC reads it).

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use fulcrum_proto::inference::ModelInferRequest;
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http_body::{Body as HttpBody, Frame};
use prost::Message;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::Status;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::service::Routes;
use tower::ServiceExt;

use super::deadline;
use super::infer::{self, MODEL_INFER_PATH, RawInferRequest};
use crate::endpoint::unary::{GrpcFrame, Received, h2_status};
use crate::limits::{FrameScanner, LimitedBody};
use crate::router::RouterState;

/// A stream's receive window: hyper's server default (1 MiB), which the router had through
/// tonic: a request of a few megabytes streams in without waiting a round trip per 64 KiB.
const STREAM_WINDOW: u32 = 1024 * 1024;

/// The connection's receive window: hyper's server default, as [`STREAM_WINDOW`].
const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Largest frame the router accepts: hyper's server default (the protocol's smallest maximum).
const MAX_FRAME_SIZE: u32 = 16 * 1024;

/// Largest header list accepted from a client: hyper's server default; gRPC metadata is a few
/// hundred bytes, this only bounds a broken or hostile client.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Streams a client may make the router reset for protocol errors before the connection is
/// closed: hyper's server default, against clients abusing resets ("MadeYouReset"). (tonic
/// passed hyper no value, which left this unbounded; bounding it changes nothing for a client
/// that follows the protocol.)
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Bytes queued per stream beyond what the client's window lets out: hyper's server default.
const MAX_SEND_BUFFER_SIZE: usize = 400 * 1024;

/// Headers HTTP/2 forbids in a response (RFC 9113, 8.2.2); `h2` refuses a response carrying
/// one, so they are taken out of answers relayed from elsewhere, as hyper did.
const CONNECTION_HEADERS: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Metadata names gRPC reserves, left out of an answer's headers (tonic's list): the router
/// sets `content-type` itself and the status goes in the trailers.
const RESERVED_HEADERS: [&str; 5] = [
    "te",
    "content-type",
    "grpc-message",
    "grpc-message-type",
    "grpc-status",
];

const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");

/// What a connection's calls are served by.
#[derive(Clone)]
pub(crate) struct Services {
    /// Routes `ModelInfer` on the direct path.
    state: Arc<RouterState>,
    /// Every other call: health, the other OIP methods, pass-through.
    routes: Routes,
}

impl Services {
    /// `ModelInfer` served with `state`, every other call by `routes`.
    pub(crate) fn new(state: Arc<RouterState>, routes: Routes) -> Self {
        Self { state, routes }
    }
}

/// Serves the connections `incoming` yields, each on a task of its own, until `signal`
/// completes; then stops accepting, lets every connection finish its calls and returns when
/// all have closed.
pub(crate) async fn serve<I>(services: Services, incoming: I, signal: impl Future<Output = ()>)
where
    I: Stream<Item = std::io::Result<TcpStream>>,
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
                        tokio::spawn(serve_connection(tcp, services.clone(), stopped.clone()));
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
async fn serve_connection(tcp: TcpStream, services: Services, mut stop: watch::Receiver<()>) {
    // Held until the connection is done: the server waits for every receiver to go.
    let _serving = stop.clone();
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .max_send_buffer_size(MAX_SEND_BUFFER_SIZE);
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
        loop {
            // The socket: frames read, answers the calls queued written, new streams taken.
            let mut accepted = false;
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((request, respond)))) => {
                        calls.push(call(&services, request, respond));
                        accepted = true;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    // Closed (and, after GOAWAY, every stream done).
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            // The calls: new ones run to their first wait, woken ones on. What they answer is
            // queued on the connection; polling it again writes it.
            let mut finished = false;
            while let Poll::Ready(Some(())) = calls.poll_next_unpin(cx) {
                finished = true;
            }
            if !accepted && !finished {
                return Poll::Pending;
            }
        }
    })
    .await;
    if let Err(e) = ended {
        tracing::debug!(error = %e, "client connection ended");
    }
}

/// What a call answers.
enum Reply {
    /// `ModelInfer` on the direct path: the node's answer (metadata and encoded message).
    Unary(Result<tonic::Response<Bytes>, Status>),
    /// A call served by the routes: their response, its body streamed as it comes.
    Http(http::Response<Body>),
}

/// Serves one call: answers it on `respond`, unless the client resets the stream first.
async fn call(
    services: &Services,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<GrpcFrame>,
) {
    let timeout = request
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(deadline::parse_grpc_timeout);
    let answer = answer(services, request);
    let mut answer = pin!(async move {
        match timeout {
            Some(t) => tokio::time::timeout(t, answer)
                .await
                .unwrap_or_else(|_| Reply::Unary(Err(Status::cancelled("Timeout expired")))),
            None => answer.await,
        }
    });
    let reply = poll_fn(|cx| {
        if let Poll::Ready(reply) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(reply));
        }
        // The client gave up (RST_STREAM): dropping the call cancels what it started.
        match respond.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    match reply {
        None => {}
        Some(Reply::Unary(Ok(response))) => send_message(respond, response),
        Some(Reply::Unary(Err(status))) => send_status(respond, &status),
        Some(Reply::Http(response)) => send_http(respond, response).await,
    }
}

/// Whether `ModelInfer` takes the direct path: every request but a compressed one (tonic
/// answers that: the router supports no compression).
fn is_direct(request: &http::Request<RecvStream>) -> bool {
    request.uri().path() == MODEL_INFER_PATH
        && request
            .headers()
            .get("grpc-encoding")
            .is_none_or(|e| e.as_bytes() == b"identity")
}

async fn answer(services: &Services, request: http::Request<RecvStream>) -> Reply {
    let limit = services.state.max_message_size;
    if is_direct(&request) {
        let (parts, body) = request.into_parts();
        return Reply::Unary(model_infer(&services.state, parts, body, limit).await);
    }
    let request = request.map(|body| Body::new(LimitedBody::new(RecvBody::new(body), limit)));
    match services.routes.clone().oneshot(request).await {
        Ok(response) => Reply::Http(response),
        Err(never) => match never {},
    }
}

/// `ModelInfer` on the direct path: the request read and decoded, then validated, routed and
/// forwarded as [`infer::model_infer`] does for the routes.
async fn model_infer(
    state: &RouterState,
    parts: http::request::Parts,
    body: RecvStream,
    limit: usize,
) -> Result<tonic::Response<Bytes>, Status> {
    let (bytes, trailers) = read_unary(body, limit).await?;
    // The same status tonic's generated service gives for a message that does not decode.
    let message =
        ModelInferRequest::decode(bytes.clone()).map_err(|e| Status::internal(e.to_string()))?;
    let mut headers = parts.headers;
    if let Some(trailers) = trailers {
        headers.extend(trailers);
    }
    let request = tonic::Request::from_parts(
        MetadataMap::from_headers(headers),
        parts.extensions,
        RawInferRequest { bytes, message },
    );
    infer::model_infer(state, request).await
}

/// Reads a unary request's body: its one message (without the 5-byte prefix) and its
/// trailers, refusing a message over `limit` as soon as its prefix arrives.
async fn read_unary(
    mut body: RecvStream,
    limit: usize,
) -> Result<(Bytes, Option<HeaderMap>), Status> {
    let mut scanner = FrameScanner::new(limit);
    let mut received = Received::default();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(h2_status)?;
        // Hand the window back as the bytes are taken (the client may send more).
        let _ = body.flow_control().release_capacity(chunk.len());
        scanner.scan(&chunk)?;
        received.push(chunk);
    }
    let trailers = body.trailers().await.map_err(h2_status)?;
    Ok((first_message(received)?, trailers))
}

/// The first message of a request body, with tonic's statuses for a body that holds none
/// (anything after it is ignored: a unary request has one).
fn first_message(received: Received) -> Result<Bytes, Status> {
    let all = received.into_bytes();
    if all.is_empty() {
        return Err(Status::internal("Missing request message."));
    }
    if all.len() < 5 {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    }
    match all[0] {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding \
                     was specified",
            ));
        }
        f => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {f} (valid \
                     flags are 0 and 1), while sending request"
            )));
        }
    }
    let len = u32::from_be_bytes([all[1], all[2], all[3], all[4]]) as usize;
    if all.len() - 5 < len {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    }
    Ok(all.slice(5..5 + len))
}

/// Answers with one message: headers (the metadata, `content-type`), the message, and
/// `grpc-status: 0` in the trailers, queued together so that they leave in one write.
fn send_message(mut respond: SendResponse<GrpcFrame>, response: tonic::Response<Bytes>) {
    let (metadata, message, _) = response.into_parts();
    let Ok(len) = u32::try_from(message.len()) else {
        let status = Status::resource_exhausted(format!(
            "a {} byte answer cannot be sent in one gRPC frame",
            message.len()
        ));
        return send_status(respond, &status);
    };
    let mut head = http::Response::new(());
    let headers = head.headers_mut();
    *headers = metadata.into_headers();
    for name in RESERVED_HEADERS.iter().chain(&CONNECTION_HEADERS) {
        headers.remove(*name);
    }
    headers.insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
    let Ok(mut stream) = respond.send_response(head, false) else {
        return;
    };
    if stream
        .send_data(GrpcFrame::new(len, message), false)
        .is_err()
    {
        return;
    }
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from_static("0"),
    );
    let _ = stream.send_trailers(trailers);
}

/// Answers with a status alone: a trailers-only response, as tonic sends one.
fn send_status(mut respond: SendResponse<GrpcFrame>, status: &Status) {
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

/// Answers with a response from the routes: its headers, then its body as it comes, each
/// chunk waiting for the client's flow-control window, then its trailers.
async fn send_http(mut respond: SendResponse<GrpcFrame>, response: http::Response<Body>) {
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
async fn wait_for_capacity(tx: &mut SendStream<GrpcFrame>) -> bool {
    // A claim of one byte, not the chunk's length: a waiting stream then pins little of the
    // connection's window that other streams could use (hyper does the same).
    tx.reserve_capacity(1);
    poll_fn(|cx| {
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
    })
    .await
}

/// A request body read from its `h2` stream, handing the flow-control window back as its
/// bytes are taken.
struct RecvBody {
    recv: RecvStream,
    /// Whether the data frames are over (what remains is the trailers).
    data_done: bool,
}

impl RecvBody {
    fn new(recv: RecvStream) -> Self {
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use fulcrum_proto::inference::model_infer_request::InferInputTensor;
    use fulcrum_proto::inference::{ServerLiveRequest, ServerLiveResponse};
    use h2::client::SendRequest;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tonic::Code;

    use super::*;

    /// The message size limit of the test server: small, so the oversized case is cheap.
    const LIMIT: usize = 64 * 1024;

    /// A router server with an empty routing table on loopback: its address, the stop
    /// signal, and the server's task (ends once every connection has closed).
    async fn server() -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(RouterState::new("a".into(), LIMIT));
        let (_, health) = tonic_health::server::health_reporter();
        let services = crate::server::services(state, health);
        let incoming = futures::stream::unfold(listener, |l| async move {
            let conn = l.accept().await.map(|(tcp, _)| tcp);
            Some((conn, l))
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(services, incoming, async move {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    async fn client(addr: SocketAddr) -> SendRequest<Bytes> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        send.ready().await.unwrap()
    }

    fn request(path: &str, headers: &[(&'static str, &'static str)]) -> http::Request<()> {
        let mut r = http::Request::post(format!("http://router{path}"))
            .body(())
            .unwrap();
        for (k, v) in headers {
            r.headers_mut().insert(*k, HeaderValue::from_static(v));
        }
        r
    }

    const GRPC: &[(&str, &str)] = &[("content-type", "application/grpc"), ("te", "trailers")];

    fn framed(message: &[u8]) -> Bytes {
        let mut b = vec![0u8];
        b.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        b.extend_from_slice(message);
        b.into()
    }

    /// An answer: its headers, body and trailers.
    struct Answer {
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    }

    impl Answer {
        /// The gRPC status: from the trailers, else (trailers-only) from the headers.
        fn status(&self) -> (Code, String) {
            let h = self.trailers.as_ref().unwrap_or(&self.headers);
            let status = Status::from_header_map(h).expect("no grpc-status");
            (status.code(), status.message().to_owned())
        }
    }

    /// Sends `body` (if any; the stream ends after it) and reads the whole answer.
    async fn call(
        send: &mut SendRequest<Bytes>,
        req: http::Request<()>,
        body: Option<Bytes>,
    ) -> Answer {
        let (response, mut stream) = send.send_request(req, body.is_none()).unwrap();
        if let Some(b) = body {
            stream.send_data(b, true).unwrap();
        }
        read(response).await
    }

    async fn read(response: h2::client::ResponseFuture) -> Answer {
        let (parts, mut recv) = response.await.unwrap().into_parts();
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.unwrap();
            let _ = recv.flow_control().release_capacity(chunk.len());
            body.extend_from_slice(&chunk);
        }
        let trailers = recv.trailers().await.unwrap();
        Answer {
            headers: parts.headers,
            body: body.freeze(),
            trailers,
        }
    }

    fn infer_request(model: &str) -> Bytes {
        ModelInferRequest {
            model_name: model.into(),
            inputs: vec![InferInputTensor {
                name: "INPUT0".into(),
                datatype: "FP32".into(),
                shape: vec![1, 1],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from_static(&[0, 0, 128, 63])],
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    }

    #[tokio::test]
    async fn model_infer_is_routed_on_the_direct_path() {
        let (addr, _stop, _task) = server().await;
        let mut c = client(addr).await;
        let a = call(
            &mut c,
            request(MODEL_INFER_PATH, GRPC),
            Some(framed(&infer_request("no-such-model"))),
        )
        .await;
        let (code, message) = a.status();
        assert_eq!(code, Code::NotFound, "{message}");
        assert!(message.contains("no-such-model"), "{message}");
        assert_eq!(a.headers["content-type"], "application/grpc");
        assert!(a.trailers.is_none(), "an error is a trailers-only answer");
    }

    #[tokio::test]
    async fn unreadable_model_infer_requests_get_tonics_statuses() {
        let (addr, _stop, _task) = server().await;
        let mut c = client(addr).await;
        let mut truncated = framed(&infer_request("m")).to_vec();
        truncated.truncate(truncated.len() - 3);
        let mut compressed = framed(&infer_request("m")).to_vec();
        compressed[0] = 1;
        let mut bad_flag = framed(&infer_request("m")).to_vec();
        bad_flag[0] = 7;
        let cases: Vec<(&str, Option<Bytes>, Code, &str)> = vec![
            ("no body", None, Code::Internal, "Missing request message."),
            (
                "empty body",
                Some(Bytes::new()),
                Code::Internal,
                "Missing request message.",
            ),
            (
                "short prefix",
                Some(Bytes::from_static(&[0, 0])),
                Code::Internal,
                "Unexpected EOF",
            ),
            (
                "truncated",
                Some(truncated.into()),
                Code::Internal,
                "Unexpected EOF",
            ),
            (
                "compressed flag",
                Some(compressed.into()),
                Code::Internal,
                "compressed-flag",
            ),
            (
                "bad flag",
                Some(bad_flag.into()),
                Code::Internal,
                "invalid compression flag: 7",
            ),
            ("not protobuf", Some(framed(&[0xff; 8])), Code::Internal, ""),
            (
                "over the limit",
                Some(framed(&vec![0; LIMIT + 1])),
                Code::ResourceExhausted,
                "limit",
            ),
        ];
        for (what, body, want, text) in cases {
            let a = call(&mut c, request(MODEL_INFER_PATH, GRPC), body).await;
            let (code, message) = a.status();
            assert_eq!(code, want, "{what}: {message}");
            assert!(message.contains(text), "{what}: {message}");
        }
        // The connection still serves.
        let a = call(
            &mut c,
            request(MODEL_INFER_PATH, GRPC),
            Some(framed(&infer_request("m"))),
        )
        .await;
        assert_eq!(a.status().0, Code::NotFound);
    }

    #[tokio::test]
    async fn other_calls_go_to_the_routes() {
        let (addr, _stop, _task) = server().await;
        let mut c = client(addr).await;
        // An OIP method the generated service answers: headers, one message, trailers.
        let live = framed(&ServerLiveRequest {}.encode_to_vec());
        let a = call(
            &mut c,
            request("/inference.GRPCInferenceService/ServerLive", GRPC),
            Some(live),
        )
        .await;
        assert_eq!(a.status(), (Code::Ok, String::new()));
        let reply = ServerLiveResponse::decode(&a.body[5..]).unwrap();
        assert!(reply.live);
        // Anything else is passed through by model header; without one it is not served.
        let a = call(&mut c, request("/no.Such/Method", &[]), Some(framed(b"x"))).await;
        let (code, message) = a.status();
        assert_eq!(code, Code::Unimplemented, "{message}");
        assert!(message.contains("/no.Such/Method"), "{message}");
        // A compressed ModelInfer is left to tonic, which supports no compression.
        let mut headers = GRPC.to_vec();
        headers.push(("grpc-encoding", "gzip"));
        let a = call(
            &mut c,
            request(MODEL_INFER_PATH, &headers),
            Some(framed(&infer_request("m"))),
        )
        .await;
        let (code, message) = a.status();
        assert_eq!(code, Code::Unimplemented, "{message}");
        assert!(message.contains("gzip"), "{message}");
        // Over the size limit on the routes too.
        let a = call(
            &mut c,
            request("/inference.GRPCInferenceService/ServerLive", GRPC),
            Some(framed(&vec![0; LIMIT + 1])),
        )
        .await;
        assert_eq!(a.status().0, Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn a_call_outliving_its_grpc_timeout_is_cancelled() {
        let (addr, _stop, _task) = server().await;
        let mut c = client(addr).await;
        let mut headers = GRPC.to_vec();
        headers.push(("grpc-timeout", "20m"));
        // The request never ends: only the timeout can answer it.
        let (response, _stream) = c
            .send_request(request(MODEL_INFER_PATH, &headers), false)
            .unwrap();
        let a = read(response).await;
        assert_eq!(a.status(), (Code::Cancelled, "Timeout expired".into()));
    }

    #[tokio::test]
    async fn a_client_resetting_a_call_or_sending_garbage_harms_nothing() {
        let (addr, _stop, _task) = server().await;
        let mut c = client(addr).await;
        let (response, mut stream) = c
            .send_request(request(MODEL_INFER_PATH, GRPC), false)
            .unwrap();
        stream
            .send_data(Bytes::from_static(&[0, 0, 0]), false)
            .unwrap();
        stream.send_reset(h2::Reason::CANCEL);
        assert!(response.await.is_err());
        // The same connection serves the next call.
        let a = call(
            &mut c,
            request(MODEL_INFER_PATH, GRPC),
            Some(framed(&infer_request("m"))),
        )
        .await;
        assert_eq!(a.status().0, Code::NotFound);
        // Not HTTP/2 at all: the connection is closed, the server goes on.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest).await;
        let mut c = client(addr).await;
        let a = call(
            &mut c,
            request(MODEL_INFER_PATH, GRPC),
            Some(framed(&infer_request("m"))),
        )
        .await;
        assert_eq!(a.status().0, Code::NotFound);
    }

    #[tokio::test]
    async fn a_connection_may_have_more_calls_open_than_hypers_default() {
        // tonic set no limit on concurrent streams; 300 is over hyper's default of 200.
        let (addr, _stop, _task) = server().await;
        let mut c = client(addr).await;
        let mut open = Vec::new();
        for _ in 0..300 {
            // Opening a stream waits while the server's limit is reached: a deadline, not a
            // hang, says it was.
            c = tokio::time::timeout(Duration::from_secs(10), c.ready())
                .await
                .expect("the server limits concurrent streams")
                .unwrap();
            let (response, stream) = c
                .send_request(request(MODEL_INFER_PATH, GRPC), false)
                .unwrap();
            open.push((response, stream));
        }
        for (response, mut stream) in open {
            stream.send_data(framed(&infer_request("m")), true).unwrap();
            assert_eq!(read(response).await.status().0, Code::NotFound);
        }
    }

    #[tokio::test]
    async fn stopping_finishes_the_calls_in_flight_then_returns() {
        let (addr, stop, task) = server().await;
        let mut c = client(addr).await;
        // A call in flight: its request is not over yet.
        let (response, mut stream) = c
            .send_request(request(MODEL_INFER_PATH, GRPC), false)
            .unwrap();
        // Make sure the server has taken the stream before stopping it.
        let first = call(
            &mut c,
            request(MODEL_INFER_PATH, GRPC),
            Some(framed(&infer_request("m"))),
        )
        .await;
        assert_eq!(first.status().0, Code::NotFound);
        stop.send(()).unwrap();
        // The connection stays up for the call in flight, which is answered.
        stream.send_data(framed(&infer_request("m")), true).unwrap();
        let a = read(response).await;
        assert_eq!(
            a.status().0,
            Code::NotFound,
            "the call in flight was not answered"
        );
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the server did not return once its calls were done")
            .unwrap();
    }
}
