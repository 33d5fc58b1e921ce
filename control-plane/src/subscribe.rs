//! The `fulcrum.v1.Routing/Subscribe` RPC: one stream per router, fed from the [`Publisher`].
//!
//! A replica with a thousand routers sends every version to each of them. Encoding a version
//! (or cloning it) once per stream would cost a thousand encodings of the same message, and a
//! thousand copies of a 10,000-node snapshot in flight when the routers reconnect together (a
//! replica restart). So each version's updates are encoded once, as whole gRPC messages (the
//! five-byte prefix and the protobuf bytes), when the version is published ([`Published`]), and
//! every stream sends the same reference-counted bytes: the response body hands them to HTTP/2
//! as they are, without a copy. What a stream holds beyond the shared bytes is its position
//! (the version it sent) and one update queued; a slow router skips to the newest version.
//!
//! The service is written against `tonic::server` directly (the generated `RoutingServer` would
//! encode each message itself): requests are decoded with tonic's streaming decoder, the
//! response is a body of shared frames closed by the `grpc-status` trailer.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use fulcrum_proto::fulcrum::v1::{RouterMessage, router_message};
use http_body::Frame;
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::server::NamedService;

use crate::publisher::{HEARTBEAT_INTERVAL, Kind, Published, Publisher, RouterInfo, plan};

/// The RPC's path.
pub const SUBSCRIBE_PATH: &str = "/fulcrum.v1.Routing/Subscribe";

/// Updates queued per router stream beyond the one being sent. One is enough: the publisher's
/// watch channel already coalesces versions, this only lets the next send start while the
/// previous is on the wire.
const STREAM_BUFFER: usize = 1;

/// Largest message accepted from a router: tonic's default (4 MiB). A load report covering
/// 10,000 nodes is about 300 KB.
const MAX_ROUTER_MESSAGE: usize = 4 << 20;

/// Decodes what routers send.
#[derive(Debug, Default)]
struct RouterMessageDecoder;

impl Decoder for RouterMessageDecoder {
    type Item = RouterMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<RouterMessage>, Status> {
        let len = src.remaining();
        RouterMessage::decode(src.copy_to_bytes(len))
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("undecodable RouterMessage: {e}")))
    }
}

/// The response body: the frames a stream's sender queues, then the `grpc-status` trailer.
struct UpdateBody {
    frames: mpsc::Receiver<Bytes>,
    done: bool,
}

impl http_body::Body for UpdateBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.frames.poll_recv(cx) {
            Poll::Ready(Some(bytes)) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            // The sender stopped (the replica is shutting down): end the stream cleanly.
            Poll::Ready(None) => {
                self.done = true;
                let mut trailers = http::HeaderMap::new();
                trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The `fulcrum.v1.Routing` service.
#[derive(Debug, Clone)]
pub struct RoutingService {
    publisher: Publisher,
}

impl RoutingService {
    /// Serves the tables `publisher` follows.
    pub fn new(publisher: Publisher) -> Self {
        Self { publisher }
    }
}

impl NamedService for RoutingService {
    const NAME: &'static str = fulcrum_proto::fulcrum::v1::routing_server::SERVICE_NAME;
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static>>;

impl tower::Service<http::Request<Body>> for RoutingService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> ResponseFuture {
        let publisher = self.publisher.clone();
        Box::pin(async move {
            if req.uri().path() != SUBSCRIBE_PATH {
                return Ok(Status::unimplemented(format!(
                    "{} is not a method of fulcrum.v1.Routing",
                    req.uri().path()
                ))
                .into_http());
            }
            Ok(subscribe(publisher, req)
                .await
                .unwrap_or_else(Status::into_http))
        })
    }
}

/// Opens one router's stream: reads its hello, then sends what it needs and reads its ACKs,
/// NACKs and load reports until it hangs up.
async fn subscribe(
    publisher: Publisher,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, Status> {
    // Messages come uncompressed (a compressed one fails to decode, with tonic's status).
    let mut inbound = Streaming::new_request(
        RouterMessageDecoder,
        req.into_body(),
        None,
        Some(MAX_ROUTER_MESSAGE),
    );
    let hello = match inbound.message().await? {
        Some(RouterMessage {
            message: Some(router_message::Message::Hello(h)),
        }) => h,
        _ => {
            return Err(Status::invalid_argument(
                "the first message on a Subscribe stream must be a RouterHello",
            ));
        }
    };
    if hello.router_id.is_empty() {
        return Err(Status::invalid_argument(
            "RouterHello.router_id is required",
        ));
    }
    tracing::info!(router = %hello.router_id, region = %hello.region,
        known_version = hello.known_version, "router subscribed");
    let routers = publisher.routers.clone();
    let load = publisher.load.clone();
    routers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(
            hello.router_id.clone(),
            RouterInfo {
                id: hello.router_id.clone(),
                region: hello.region.clone(),
                acked_version: 0,
                nacks: 0,
            },
        );

    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let router_id = hello.router_id.clone();
    // A NACK makes the next update a snapshot.
    let resync = Arc::new(Notify::new());
    let sender = tokio::spawn(send_updates(
        publisher.tables(),
        hello.known_version,
        resync.clone(),
        tx,
    ));
    // Inbound: ACKs, NACKs and load reports, until the router hangs up.
    tokio::spawn(async move {
        while let Ok(Some(msg)) = inbound.message().await {
            match msg.message {
                Some(router_message::Message::Load(report)) => load.record(&router_id, report),
                Some(router_message::Message::Ack(a)) => {
                    let mut routers = routers.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(info) = routers.get_mut(&router_id) {
                        info.acked_version = info.acked_version.max(a.version);
                    }
                }
                Some(router_message::Message::Nack(n)) => {
                    if let Some(info) = routers
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_mut(&router_id)
                    {
                        info.nacks += 1;
                    }
                    tracing::warn!(router = %router_id, version = n.version,
                        reason = %n.reason, "router rejected a routing update; sending a snapshot");
                    resync.notify_one();
                }
                Some(router_message::Message::Hello(_)) | None => {}
            }
        }
        sender.abort();
        load.forget(&router_id);
        routers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&router_id);
        tracing::info!(router = %router_id, "router unsubscribed");
    });
    let mut response = http::Response::new(Body::new(UpdateBody {
        frames: rx,
        done: false,
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        tonic::metadata::GRPC_CONTENT_TYPE,
    );
    Ok(response)
}

/// The frame to send a router that holds `held` (and was last told the table is `held_stale`).
fn frame_for(held: u64, held_stale: bool, p: &Published) -> Option<Bytes> {
    match plan(held, held_stale, p)? {
        Kind::Delta => p.delta_frame().cloned(),
        Kind::OlderDelta => p
            .older_delta_frame(held)
            .or_else(|| Some(p.snapshot_frame())),
        Kind::Snapshot => Some(p.snapshot_frame()),
    }
}

/// Outbound: what the router needs now, then each newer version, with heartbeats between.
/// Ends when the router hangs up (the body, and with it `tx`, is dropped).
async fn send_updates(
    mut table: tokio::sync::watch::Receiver<Option<Arc<Published>>>,
    known_version: u64,
    resync: Arc<Notify>,
    tx: mpsc::Sender<Bytes>,
) {
    let mut held = known_version;
    let mut held_stale = false;
    table.mark_changed();
    loop {
        let next = tokio::select! {
            changed = table.changed() => {
                if changed.is_err() {
                    return;
                }
                let p = table.borrow_and_update().clone();
                p.and_then(|p| frame_for(held, held_stale, &p).map(|f| (f, Some(p))))
            }
            () = resync.notified() => {
                let p = table.borrow().clone();
                p.map(|p| (p.snapshot_frame(), Some(p)))
            }
            () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {
                let p = table.borrow().clone();
                Some(match p {
                    Some(p) => (p.heartbeat_frame(), None),
                    None => (crate::publisher::empty_heartbeat(), None),
                })
            }
        };
        let Some((frame, version)) = next else {
            continue;
        };
        if let Some(p) = version {
            held = p.version;
            held_stale = p.stale;
        }
        if tx.send(frame).await.is_err() {
            return;
        }
    }
}
