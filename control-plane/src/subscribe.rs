//! The `fulcrum.v1.Routing/Subscribe` RPC: one stream per router, fed from the [`Publisher`].
//!
//! A replica with a thousand routers sends every version to each of them. Encoding a version
//! (or cloning it) once per stream would cost a thousand encodings of the same message, and a
//! thousand copies of a 10,000-node snapshot in flight when the routers reconnect together (a
//! replica restart). So each version's updates are encoded once, as whole gRPC messages (the
//! five-byte prefix and the protobuf bytes), when the version is published ([`Published`]), and
//! every stream sends the same reference-counted bytes: the response body hands them to HTTP/2
//! as they are, without a copy. What a stream holds beyond the shared bytes is its position
//! (the version it sent); a slow router skips to the newest version.
//!
//! The response body reads the publisher's watch channel itself ([`UpdateBody`]): HTTP/2 asks
//! it for the next frame when the stream has room, and it answers with what the router needs
//! at that moment. A task per stream feeding the body through a channel (as before) cost a
//! thousand extra task wake-ups per version at a thousand routers, the larger part of a
//! version's fan-out time, and a queued frame could be one version behind.
//!
//! The service is written against `tonic::server` directly (the generated `RoutingServer` would
//! encode each message itself): requests are decoded with tonic's streaming decoder, the
//! response is a body of shared frames closed by the `grpc-status` trailer.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use fulcrum_proto::fulcrum::v1::{RouterMessage, router_message};
use futures::task::AtomicWaker;
use http_body::Frame;
use prost::Message;
use tokio::sync::watch;
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::server::NamedService;

use crate::publisher::{HEARTBEAT_INTERVAL, Kind, Published, Publisher, RouterInfo, plan};

/// The RPC's path.
pub const SUBSCRIBE_PATH: &str = "/fulcrum.v1.Routing/Subscribe";

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

/// What the task reading a router's messages tells its response body.
#[derive(Debug, Default)]
struct StreamControl {
    /// The router NACKed a version: send it a snapshot next.
    resync: AtomicBool,
    /// The router hung up: end the response.
    closed: AtomicBool,
    /// The body's waker, woken when either flag is set.
    waker: AtomicWaker,
}

impl StreamControl {
    fn raise(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// The publisher's tables, as a stream follows them.
type Tables = watch::Receiver<Option<Arc<Published>>>;

/// Waits for the next version: owns the receiver while it waits and hands it back with the
/// result (a future borrowing a receiver kept in the body would make the body
/// self-referential).
type NextVersion =
    Pin<Box<dyn Future<Output = (Result<(), watch::error::RecvError>, Tables)> + Send>>;

fn next_version(mut table: Tables) -> NextVersion {
    Box::pin(async move { (table.changed().await, table) })
}

/// The response body of one router's stream: what the router needs whenever HTTP/2 has room
/// for it (the newest version, a snapshot after a NACK, a heartbeat after a quiet
/// [`HEARTBEAT_INTERVAL`]), then the `grpc-status` trailer when the router hangs up or the
/// replica shuts down.
struct UpdateBody {
    /// The next change of the table.
    changed: NextVersion,
    /// The table now (for snapshots and heartbeats between changes).
    current: Tables,
    control: Arc<StreamControl>,
    heartbeat: Pin<Box<tokio::time::Sleep>>,
    /// The version the router was last sent, and whether it was marked stale.
    held: u64,
    held_stale: bool,
    done: bool,
}

impl UpdateBody {
    fn new(mut table: Tables, known_version: u64, control: Arc<StreamControl>) -> Self {
        // The router needs the current table (or a delta to it) at once.
        table.mark_changed();
        Self {
            current: table.clone(),
            changed: next_version(table),
            control,
            heartbeat: Box::pin(tokio::time::sleep(HEARTBEAT_INTERVAL)),
            held: known_version,
            held_stale: false,
            done: false,
        }
    }

    /// Records that `frame` (carrying `version`, unless a heartbeat) goes out now.
    fn sending(
        &mut self,
        frame: Bytes,
        version: Option<&Published>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(p) = version {
            self.held = p.version;
            self.held_stale = p.stale;
        }
        self.heartbeat
            .as_mut()
            .reset(tokio::time::Instant::now() + HEARTBEAT_INTERVAL);
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn end(&mut self) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl http_body::Body for UpdateBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        this.control.waker.register(cx.waker());
        if this.control.closed.load(Ordering::Acquire) {
            return this.end();
        }
        if this.control.resync.swap(false, Ordering::AcqRel) {
            let p = this.current.borrow().clone();
            if let Some(p) = p {
                return this.sending(p.snapshot_frame(), Some(&p));
            }
        }
        // Newer versions, until one has something for this router.
        while let Poll::Ready((changed, mut table)) = this.changed.as_mut().poll(cx) {
            if changed.is_err() {
                // The publisher is gone: the replica is shutting down.
                return this.end();
            }
            let p = table.borrow_and_update().clone();
            this.changed = next_version(table);
            if let Some(p) = p
                && let Some(frame) = frame_for(this.held, this.held_stale, &p)
            {
                return this.sending(frame, Some(&p));
            }
        }
        if this.heartbeat.as_mut().poll(cx).is_ready() {
            let frame = match this.current.borrow().as_ref() {
                Some(p) => p.heartbeat_frame(),
                None => crate::publisher::empty_heartbeat(),
            };
            return this.sending(frame, None);
        }
        Poll::Pending
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

    let router_id = hello.router_id.clone();
    let control = Arc::new(StreamControl::default());
    let body = UpdateBody::new(publisher.tables(), hello.known_version, control.clone());
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
                    control.raise(&control.resync);
                }
                Some(router_message::Message::Hello(_)) | None => {}
            }
        }
        control.raise(&control.closed);
        load.forget(&router_id);
        routers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&router_id);
        tracing::info!(router = %router_id, "router unsubscribed");
    });
    let mut response = http::Response::new(Body::new(body));
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

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::RoutingUpdate;
    use futures::FutureExt as _;
    use http_body::Body as _;

    type Polled = Option<Result<Frame<Bytes>, Status>>;

    /// The body's next frame if it has one now.
    fn next_now(body: &mut UpdateBody) -> Option<Polled> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).now_or_never()
    }

    async fn next(body: &mut UpdateBody) -> Polled {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    /// The body's next frame is the `grpc-status: 0` trailer.
    async fn assert_ends_ok(body: &mut UpdateBody) {
        let trailers = next(body)
            .await
            .expect("a frame")
            .expect("not an error")
            .into_trailers()
            .expect("the trailers");
        assert_eq!(trailers.get(Status::GRPC_STATUS).unwrap(), "0");
    }

    fn update(polled: Polled) -> RoutingUpdate {
        let data = polled
            .expect("a frame")
            .expect("not an error")
            .into_data()
            .expect("a data frame");
        RoutingUpdate::decode(&data[5..]).expect("a RoutingUpdate")
    }

    fn table(version: u64) -> (watch::Sender<Option<Arc<Published>>>, Tables) {
        watch::channel(Some(Arc::new(Published::for_test(version, &["a", "b"]))))
    }

    fn publish(tx: &watch::Sender<Option<Arc<Published>>>, version: u64) {
        tx.send_replace(Some(Arc::new(Published::for_test(version, &["a", "b"]))));
    }

    #[tokio::test]
    async fn a_new_router_gets_a_snapshot_then_nothing_until_a_change() {
        let (tx, rx) = table(7);
        let mut body = UpdateBody::new(rx, 0, Arc::default());
        let first = update(next_now(&mut body).expect("the table at once"));
        assert!(first.snapshot);
        assert_eq!((first.version, first.endpoints.len()), (7, 2));
        assert!(next_now(&mut body).is_none(), "nothing new to send");
        publish(&tx, 8);
        assert_eq!(update(next_now(&mut body).expect("the change")).version, 8);
    }

    #[tokio::test]
    async fn a_router_holding_the_version_gets_nothing() {
        let (_tx, rx) = table(7);
        let mut body = UpdateBody::new(rx, 7, Arc::default());
        assert!(next_now(&mut body).is_none());
    }

    #[tokio::test]
    async fn a_slow_router_skips_to_the_newest_version() {
        let (tx, rx) = table(1);
        let mut body = UpdateBody::new(rx, 0, Arc::default());
        assert_eq!(update(next_now(&mut body).unwrap()).version, 1);
        // Three versions while HTTP/2 had no room to ask for a frame.
        for v in 2..=4 {
            publish(&tx, v);
        }
        assert_eq!(update(next_now(&mut body).unwrap()).version, 4);
        assert!(
            next_now(&mut body).is_none(),
            "versions 2 and 3 are never sent"
        );
    }

    #[tokio::test]
    async fn a_nack_brings_a_snapshot_of_the_current_version() {
        let (_tx, rx) = table(3);
        let control = Arc::new(StreamControl::default());
        let mut body = UpdateBody::new(rx, 0, control.clone());
        update(next_now(&mut body).unwrap());
        control.raise(&control.resync);
        let again = update(next_now(&mut body).expect("a snapshot after the NACK"));
        assert!(again.snapshot);
        assert_eq!(again.version, 3);
        assert!(next_now(&mut body).is_none());
    }

    #[tokio::test]
    async fn the_stream_ends_with_ok_when_the_router_hangs_up_or_the_publisher_stops() {
        let (_tx, rx) = table(3);
        let control = Arc::new(StreamControl::default());
        let mut body = UpdateBody::new(rx, 3, control.clone());
        let waiting = tokio::spawn(async move {
            assert_ends_ok(&mut body).await;
            assert!(body.is_end_stream());
            assert!(next(&mut body).await.is_none());
        });
        tokio::task::yield_now().await;
        // Raising the flag wakes the waiting body.
        control.raise(&control.closed);
        waiting.await.unwrap();

        let (tx, rx) = table(3);
        let mut body = UpdateBody::new(rx, 3, Arc::default());
        drop(tx);
        assert_ends_ok(&mut body).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_carries_heartbeats() {
        let (_tx, rx) = table(5);
        let mut body = UpdateBody::new(rx, 5, Arc::default());
        let started = tokio::time::Instant::now();
        let beat = update(next(&mut body).await);
        assert!(beat.heartbeat);
        assert_eq!(beat.version, 5);
        assert!(started.elapsed() >= HEARTBEAT_INTERVAL);
        let beat = update(next(&mut body).await);
        assert!(beat.heartbeat);
        assert!(started.elapsed() >= 2 * HEARTBEAT_INTERVAL);
    }
}
