//! The router's calls on its HTTP/2 server ([`fulcrum_grpc_h2::own_server`], an HTTP/2 server
//! of Fulcrum's own: each client connection served by one task, which also runs the
//! connection's calls).
//!
//! Why by hand: `tonic::transport::Server` (hyper's HTTP/2 server underneath) ran every call
//! as a task of its own, through tower layers (timeout, error recovery, connection info, size
//! limit, boxing), axum's router and tonic's codec, before `ModelInfer`'s handler; the answer
//! then went back through the same layers, and the call's task woke the connection's task to
//! write it. On the hot path that glue cost more than the router's own work. Here `ModelInfer`
//! is read, routed and answered straight on the stream (HEADERS, DATA and trailers queued
//! together, written in one write at the end of the connection task's turn), with no task
//! spawned and no wake-up of another task. The node side is the router's own client too
//! ([`crate::endpoint::unary`]). Both are Fulcrum's own HTTP/2 rather than the `h2` crate's,
//! which after the glue was gone was the largest cost left in the router's user space.
//!
//! Everything else goes to the services as before, unchanged: health, the other OIP methods,
//! pass-through, and the `ModelInfer` calls the direct path does not take (a compressed
//! request, which tonic refuses with its own status) are handed to tonic's
//! [`Routes`](tonic::service::Routes) as an `http::Request` and their response (headers, body
//! as it streams, trailers) is written back with HTTP/2 flow control, as hyper did.
//!
//! What this keeps of the server it replaces (besides what the server keeps: hyper's HTTP/2
//! windows, frame and header-list sizes, cancellation, graceful shutdown; see
//! [`fulcrum_grpc_h2::own_server`]):
//! - TCP_NODELAY, set where connections are accepted;
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
//!   reset too).
//!
//! Every call but a health check first passes the router's token check, when it has one
//! ([`crate::auth`]): a refused call is answered UNAUTHENTICATED (or PERMISSION_DENIED) before
//! its body is read.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use fulcrum_grpc_h2::Received;
use fulcrum_grpc_h2::own_server::{self, Answered, Handler, RecvBody, Respond, send_status};
use fulcrum_grpc_h2::server::{Peer, Settings};
use fulcrum_proto::inference::ModelInferRequest;
use futures::stream::Stream;
use http::header::{HeaderMap, HeaderName};
use prost::Message;
use tokio::net::TcpStream;
use tonic::Status;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::service::Routes;

use super::infer::{self, MODEL_INFER_PATH, RawInferRequest};
use crate::limits::{FrameScanner, LimitedBody};
use crate::router::RouterState;

/// The header naming a request's compression (a name made once: a `&str` name is parsed again
/// on every look-up).
const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");

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

impl Handler for Services {
    fn call(
        &self,
        _peer: Peer,
        request: http::request::Parts,
        body: RecvBody,
        respond: Respond,
    ) -> impl Future<Output = ()> + Send {
        call(self, request, body, respond)
    }
}

/// Serves the connections `incoming` yields, each on a task of its own, until `signal`
/// completes; then stops accepting, lets every connection finish its calls and returns when
/// all have closed.
pub(crate) async fn serve<I>(services: Services, incoming: I, signal: impl Future<Output = ()>)
where
    I: Stream<Item = std::io::Result<TcpStream>>,
{
    own_server::serve(services, Settings::default(), incoming, signal).await;
}

/// Serves one call: answers it on `respond`, unless the client resets the stream first.
async fn call(
    services: &Services,
    mut parts: http::request::Parts,
    body: RecvBody,
    mut respond: Respond,
) {
    crate::shard::mark_busy();
    // The caller's token, before anything of the call is read ([`crate::auth`]).
    if let Some(auth) = &services.state.auth
        && !is_health_check(&parts)
    {
        match auth.authenticate(&mut parts.headers) {
            // For the services' checks of the models it may call.
            Ok(caller) => {
                parts.extensions.insert(caller);
            }
            Err(e) => {
                tracing::debug!(path = parts.uri.path(), error = %e, "call refused");
                return send_status(&mut respond, &Status::from(e));
            }
        }
    }
    let limit = services.state.max_message_size;
    if !is_direct(&parts) {
        let request = http::Request::from_parts(parts, Body::new(LimitedBody::new(body, limit)));
        // Boxed: the routes' future is ~2 KB, and inline it made every call's future (the
        // direct `ModelInfer` ones too) that large, copied whole into the connection's set of
        // calls. The calls that take this branch pay one allocation; the hot ones none.
        return Box::pin(own_server::route(services.routes.clone(), request, respond)).await;
    }
    let timeout = fulcrum_grpc_h2::timeout::of(&parts.headers);
    // Boxed: the call's whole state (the request, the forwarding, the node's call) is a few
    // kilobytes, and unboxed it was part of this future, copied whole each time it moved (into
    // `answer_within`'s, then into the connection's set of calls): one allocation is cheaper.
    let answer = Box::pin(model_infer(&services.state, parts, body, limit));
    let answered = own_server::answer_within(&mut respond, timeout, answer).await;
    crate::shard::mark_busy();
    match answered {
        Answered::Answer(Ok(response)) => send_message(respond, response),
        Answered::Answer(Err(status)) => send_status(&mut respond, &status),
        Answered::TimedOut => {
            send_status(&mut respond, &fulcrum_grpc_h2::server::timeout_expired());
        }
        Answered::Reset => {}
    }
}

/// Whether the call is a gRPC health check, which needs no token: load balancers and
/// orchestrators probe without one.
fn is_health_check(request: &http::request::Parts) -> bool {
    request.uri.path().starts_with("/grpc.health.v1.Health/")
}

/// Whether `ModelInfer` takes the direct path: every request but a compressed one (tonic
/// decompresses that, or refuses a compression the router does not take).
fn is_direct(request: &http::request::Parts) -> bool {
    request.uri.path() == MODEL_INFER_PATH
        && request
            .headers
            .get(GRPC_ENCODING)
            .is_none_or(|e| e.as_bytes() == b"identity")
}

/// `ModelInfer` on the direct path: the request read and decoded, then validated, routed and
/// forwarded as [`infer::model_infer`] does for the routes.
async fn model_infer(
    state: &RouterState,
    parts: http::request::Parts,
    body: RecvBody,
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
    mut body: RecvBody,
    limit: usize,
) -> Result<(Bytes, Option<HeaderMap>), Status> {
    let mut scanner = FrameScanner::new(limit);
    let mut received = Received::default();
    // The window goes back to the client as the bytes are taken (it may send more).
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.status())?;
        scanner.scan(&chunk)?;
        received.push(chunk);
    }
    let trailers = body.trailers().await.map_err(|e| e.status())?;
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
    fulcrum_grpc_h2::frame::uncompressed(all[0], ", while sending request")?;
    let len = u32::from_be_bytes([all[1], all[2], all[3], all[4]]) as usize;
    if all.len() - 5 < len {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    }
    Ok(all.slice(5..5 + len))
}

/// Answers with one message: headers (`content-type` and the metadata, less the names gRPC
/// reserves and connection-specific ones: [`Respond::send_grpc_headers`]), the message, and
/// `grpc-status: 0` in the trailers, queued together so that they leave in one write.
fn send_message(mut respond: Respond, response: tonic::Response<Bytes>) {
    let (metadata, message, _) = response.into_parts();
    if u32::try_from(message.len()).is_err() {
        let status = Status::resource_exhausted(format!(
            "a {} byte answer cannot be sent in one gRPC frame",
            message.len()
        ));
        return send_status(&mut respond, &status);
    }
    respond.send_grpc_headers(metadata.as_ref());
    respond.send_message(message, false);
    respond.send_ok_trailers();
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

    use http::header::HeaderValue;

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
        framed_with(0, message)
    }

    /// `message` framed with compression flag `flag`.
    fn framed_with(flag: u8, message: &[u8]) -> Bytes {
        let mut b = vec![flag];
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

    /// The connection serves a `ModelInfer` call (for a model the empty table does not know:
    /// NOT_FOUND, from the router itself).
    async fn assert_serves(c: &mut SendRequest<Bytes>) {
        let a = call(
            c,
            request(MODEL_INFER_PATH, GRPC),
            Some(framed(&infer_request("m"))),
        )
        .await;
        assert_eq!(a.status().0, Code::NotFound);
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
        assert_serves(&mut c).await;
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
        // A compressed ModelInfer is left to tonic, which decompresses gzip (and deflate): the
        // request is read, and refused for its model (this router has none).
        let mut headers = GRPC.to_vec();
        headers.push(("grpc-encoding", "gzip"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &infer_request("m")).unwrap();
        let compressed = framed_with(1, &gz.finish().unwrap());
        let a = call(
            &mut c,
            request(MODEL_INFER_PATH, &headers),
            Some(compressed),
        )
        .await;
        let (code, message) = a.status();
        assert_eq!(code, Code::NotFound, "{message}");
        assert!(message.contains("model \"m\" is not served"), "{message}");
        // A compression the router does not take is refused, naming it.
        let mut headers = GRPC.to_vec();
        headers.push(("grpc-encoding", "snappy"));
        let frame = framed_with(1, &infer_request("m"));
        let a = call(&mut c, request(MODEL_INFER_PATH, &headers), Some(frame)).await;
        let (code, message) = a.status();
        assert_eq!(code, Code::Unimplemented, "{message}");
        assert!(message.contains("snappy"), "{message}");
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
        assert_serves(&mut c).await;
        // Not HTTP/2 at all: the connection is closed, the server goes on.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest).await;
        let mut c = client(addr).await;
        assert_serves(&mut c).await;
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
        assert_serves(&mut c).await;
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
