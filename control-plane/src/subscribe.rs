//! The `fulcrum.v1.Routing/Subscribe` RPC: one stream per router, fed from the [`Publisher`].
//!
//! A replica with a thousand routers sends every version to each of them. Encoding a version
//! (or cloning it) once per stream would cost a thousand encodings of the same message, and a
//! thousand copies of a 10,000-node snapshot in flight when the routers reconnect together (a
//! replica restart). So each version's updates are encoded once, as whole gRPC messages (the
//! five-byte prefix and the protobuf bytes), when the version is published ([`Published`]), and
//! every stream sends the same reference-counted bytes, without a copy. What a stream holds
//! beyond the shared bytes is its position (the version it sent); a slow router skips to the
//! newest version.
//!
//! A stream is served on the replica's HTTP/2 server ([`fulcrum_grpc_h2::server`]) by one
//! future on its connection's task ([`Subscriptions::serve`]): it reads the router's ACKs,
//! NACKs and load reports, and whenever the stream has room it sends what the router needs at
//! that moment ([`UpdateBody`]: the newest version, a snapshot after a NACK, a heartbeat after
//! a quiet interval). A version thus costs one task wake-up and one write per router. Through
//! tonic and hyper it cost four (hyper's task for the stream, polling the body, woke the
//! connection's task to write; the ACK woke the connection's task, then the task reading the
//! router's messages): at a thousand routers, most of a version's fan-out time.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use fulcrum_grpc_h2::frame::Deframer;
use fulcrum_grpc_h2::server::{GRPC_CONTENT_TYPE, Peer, poll_capacity, send_status};
use fulcrum_grpc_h2::{GrpcFrame, h2_status};
use fulcrum_proto::fulcrum::v1::{RouterMessage, router_message};

use crate::store::SharedStore;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::header::CONTENT_TYPE;
use http_body::{Body as _, Frame};
use prost::Message;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;

use crate::auth::StreamInterceptor;
use crate::publisher::{HEARTBEAT_INTERVAL, Kind, Published, Publisher, RouterInfo, plan};

/// The RPC's path.
pub const SUBSCRIBE_PATH: &str = "/fulcrum.v1.Routing/Subscribe";

/// Largest message accepted from a router: tonic's default (4 MiB). A load report covering
/// 10,000 nodes is about 300 KB.
const MAX_ROUTER_MESSAGE: usize = 4 << 20;

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
    /// The router NACKed a version: send it a snapshot next.
    resync: bool,
    /// The router hung up: end the response.
    closed: bool,
    /// Fires at the latest a [`HEARTBEAT_INTERVAL`] after the last frame; moved on (not reset
    /// at every frame: a timer re-armed per router per version is a thousand timer updates a
    /// version) when it fires early.
    heartbeat: Pin<Box<tokio::time::Sleep>>,
    /// When the last frame went out.
    last_sent: Instant,
    /// The version the router was last sent, and whether it was marked stale.
    held: u64,
    held_stale: bool,
    done: bool,
}

impl UpdateBody {
    fn new(mut table: Tables, known_version: u64) -> Self {
        // The router needs the current table (or a delta to it) at once.
        table.mark_changed();
        Self {
            current: table.clone(),
            changed: next_version(table),
            resync: false,
            closed: false,
            heartbeat: Box::pin(tokio::time::sleep(HEARTBEAT_INTERVAL)),
            last_sent: Instant::now(),
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
        self.last_sent = Instant::now();
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
        if this.closed {
            return this.end();
        }
        if std::mem::take(&mut this.resync) {
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
        while this.heartbeat.as_mut().poll(cx).is_ready() {
            let due = this.last_sent + HEARTBEAT_INTERVAL;
            if due > Instant::now() {
                // A frame went out since the timer was set: wait from that one.
                this.heartbeat.as_mut().reset(due);
                continue;
            }
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

/// The `fulcrum.v1.Routing` service's path prefix: calls under it are served here.
pub const ROUTING_PREFIX: &str = "/fulcrum.v1.Routing/";

/// The `fulcrum.v1.Routing` service: routers' `Subscribe` streams.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    publisher: Publisher,
    auth: StreamInterceptor,
    /// Where routers that give an address are listed ([`crate::directory`]).
    store: SharedStore,
}

impl Subscriptions {
    /// Serves the tables `publisher` follows to routers that pass `auth`, listing those that
    /// give an address in `store`'s router directory while their streams last.
    pub fn new(publisher: Publisher, auth: StreamInterceptor, store: SharedStore) -> Self {
        Self {
            publisher,
            auth,
            store,
        }
    }

    /// Serves one call to the service: a router's stream, from its hello until it hangs up
    /// (or the replica stops: the publisher is gone), answering with a status alone what is
    /// refused before the stream opens.
    pub async fn serve(
        &self,
        peer: Peer,
        request: http::Request<RecvStream>,
        mut respond: SendResponse<GrpcFrame>,
    ) {
        let (parts, recv) = request.into_parts();
        if parts.uri.path() != SUBSCRIBE_PATH {
            let status = Status::unimplemented(format!(
                "{} is not a method of fulcrum.v1.Routing",
                parts.uri.path()
            ));
            return send_status(respond, &status);
        }
        // The stream credential, before any message is read.
        let mut check = tonic::Request::from_parts(
            MetadataMap::from_headers(parts.headers),
            http::Extensions::new(),
            (),
        );
        check.extensions_mut().insert(peer.connect_info());
        if let Err(status) = self.auth.clone().call(check) {
            return send_status(respond, &status);
        }
        let mut inbound = Inbound::new(recv);
        let hello = poll_fn(|cx| {
            if respond.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            inbound.poll_message(cx).map(Some)
        })
        .await;
        let hello = match hello {
            // Reset before the hello.
            None => return,
            Some(Ok(Some(RouterMessage {
                message: Some(router_message::Message::Hello(h)),
            }))) => h,
            Some(Err(status)) => return send_status(respond, &status),
            Some(Ok(_)) => {
                let status = Status::invalid_argument(
                    "the first message on a Subscribe stream must be a RouterHello",
                );
                return send_status(respond, &status);
            }
        };
        if hello.router_id.is_empty() {
            let status = Status::invalid_argument("RouterHello.router_id is required");
            return send_status(respond, &status);
        }
        let mut head = http::Response::new(());
        head.headers_mut().insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
        let Ok(mut tx) = respond.send_response(head, false) else {
            return;
        };
        tracing::info!(router = %hello.router_id, region = %hello.region,
            known_version = hello.known_version, "router subscribed");
        let router = Subscribed::new(&self.publisher, &hello);
        // Unlisted when this call ends (the guard drops with it).
        let _listed = (!hello.address.is_empty()).then(|| {
            crate::directory::list(
                self.store.clone(),
                fulcrum_proto::fulcrum::v1::RouterEntry {
                    router_id: hello.router_id.clone(),
                    region: hello.region.clone(),
                    address: hello.address.clone(),
                },
            )
        });
        let mut body = UpdateBody::new(self.publisher.tables(), hello.known_version);
        // Claimed once; claimed again after each frame (see `stream`).
        tx.reserve_capacity(1);
        poll_fn(|cx| stream(cx, &router, &mut inbound, &mut body, &mut tx)).await;
    }
}

/// A router on this replica's list while its stream lasts.
struct Subscribed {
    id: String,
    publisher: Publisher,
}

impl Subscribed {
    fn new(publisher: &Publisher, hello: &fulcrum_proto::fulcrum::v1::RouterHello) -> Self {
        let id = &hello.router_id;
        publisher
            .routers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id.clone(),
                RouterInfo {
                    id: id.clone(),
                    region: hello.region.clone(),
                    acked_version: 0,
                    nacks: 0,
                    address: hello.address.clone(),
                },
            );
        Self {
            id: id.clone(),
            publisher: publisher.clone(),
        }
    }

    /// Takes in one message from the router.
    fn received(&self, message: RouterMessage, body: &mut UpdateBody) {
        let with_info = |f: &mut dyn FnMut(&mut RouterInfo)| {
            let mut routers = self
                .publisher
                .routers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(info) = routers.get_mut(&self.id) {
                f(info);
            }
        };
        match message.message {
            Some(router_message::Message::Load(report)) => {
                self.publisher.load.record(&self.id, report);
            }
            Some(router_message::Message::Ack(a)) => {
                with_info(&mut |info| info.acked_version = info.acked_version.max(a.version));
            }
            Some(router_message::Message::Nack(n)) => {
                with_info(&mut |info| info.nacks += 1);
                tracing::warn!(router = %self.id, version = n.version,
                    reason = %n.reason, "router rejected a routing update; sending a snapshot");
                body.resync = true;
            }
            Some(router_message::Message::Hello(_)) | None => {}
        }
    }
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.publisher.load.forget(&self.id);
        self.publisher
            .routers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        tracing::info!(router = %self.id, "router unsubscribed");
    }
}

/// One poll of an open stream: the router's messages taken in, then what it needs sent while
/// the stream has room. Ready when the stream is over (ended, reset or broken).
fn stream(
    cx: &mut Context<'_>,
    router: &Subscribed,
    inbound: &mut Inbound,
    body: &mut UpdateBody,
    tx: &mut SendStream<GrpcFrame>,
) -> Poll<()> {
    loop {
        match inbound.poll_message(cx) {
            Poll::Ready(Ok(Some(message))) => router.received(message, body),
            // The router hung up: the body ends the response.
            Poll::Ready(Ok(None)) => {
                body.closed = true;
                break;
            }
            Poll::Ready(Err(status)) => {
                if inbound.broken {
                    // Reset or lost: no one to tell.
                    return Poll::Ready(());
                }
                tracing::debug!(router = %router.id, %status, "unreadable message from a router");
                let mut trailers = http::HeaderMap::new();
                let _ = status.add_header(&mut trailers);
                let _ = tx.send_trailers(trailers);
                return Poll::Ready(());
            }
            Poll::Pending => break,
        }
    }
    loop {
        // The next frame only once the last one is on its way: a router that reads slowly
        // gets the newest version when it has room, not every version queued. The trailers
        // need no room.
        if !body.closed && !ready!(poll_capacity(tx, cx)) {
            return Poll::Ready(());
        }
        let frame = match ready!(Pin::new(&mut *body).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(_)) | None => return Poll::Ready(()),
        };
        match frame.into_data() {
            Ok(data) => {
                if tx.send_data(GrpcFrame::raw(data), false).is_err() {
                    return Poll::Ready(());
                }
                tx.reserve_capacity(1);
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = tx.send_trailers(trailers);
                }
                return Poll::Ready(());
            }
        }
    }
}

/// The router's side of its stream, cut into messages.
struct Inbound {
    recv: RecvStream,
    messages: Deframer,
    /// The router ended its side.
    ended: bool,
    /// The stream failed (reset, connection lost): nothing more can be sent on it either.
    broken: bool,
}

impl Inbound {
    fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            messages: Deframer::new(MAX_ROUTER_MESSAGE),
            ended: false,
            broken: false,
        }
    }

    /// The router's next message; `None` once it has ended its side.
    fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<RouterMessage>, Status>> {
        loop {
            if let Some(bytes) = self.messages.next_message()? {
                return Poll::Ready(RouterMessage::decode(bytes).map(Some).map_err(|e| {
                    Status::invalid_argument(format!("undecodable RouterMessage: {e}"))
                }));
            }
            if self.ended {
                return Poll::Ready(if self.messages.is_partial() {
                    Err(Status::internal("Unexpected EOF decoding stream."))
                } else {
                    Ok(None)
                });
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.messages.push(&chunk);
                }
                Some(Err(e)) => {
                    self.broken = true;
                    return Poll::Ready(Err(h2_status(e)));
                }
                None => self.ended = true,
            }
        }
    }
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
        let mut body = UpdateBody::new(rx, 0);
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
        let mut body = UpdateBody::new(rx, 7);
        assert!(next_now(&mut body).is_none());
    }

    #[tokio::test]
    async fn a_slow_router_skips_to_the_newest_version() {
        let (tx, rx) = table(1);
        let mut body = UpdateBody::new(rx, 0);
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
        let mut body = UpdateBody::new(rx, 0);
        update(next_now(&mut body).unwrap());
        body.resync = true;
        let again = update(next_now(&mut body).expect("a snapshot after the NACK"));
        assert!(again.snapshot);
        assert_eq!(again.version, 3);
        assert!(next_now(&mut body).is_none());
    }

    #[tokio::test]
    async fn the_stream_ends_with_ok_when_the_router_hangs_up_or_the_publisher_stops() {
        let (_tx, rx) = table(3);
        let mut body = UpdateBody::new(rx, 3);
        assert!(next_now(&mut body).is_none(), "nothing to send yet");
        body.closed = true;
        assert_ends_ok(&mut body).await;
        assert!(body.is_end_stream());
        assert!(next(&mut body).await.is_none());

        let (tx, rx) = table(3);
        let mut body = UpdateBody::new(rx, 3);
        drop(tx);
        assert_ends_ok(&mut body).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_carries_heartbeats() {
        let (_tx, rx) = table(5);
        let mut body = UpdateBody::new(rx, 5);
        let started = tokio::time::Instant::now();
        let beat = update(next(&mut body).await);
        assert!(beat.heartbeat);
        assert_eq!(beat.version, 5);
        assert!(started.elapsed() >= HEARTBEAT_INTERVAL);
        let beat = update(next(&mut body).await);
        assert!(beat.heartbeat);
        assert!(started.elapsed() >= 2 * HEARTBEAT_INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_waits_a_whole_interval_after_the_last_frame() {
        let (tx, rx) = table(5);
        let mut body = UpdateBody::new(rx, 5);
        let started = tokio::time::Instant::now();
        tokio::time::sleep(HEARTBEAT_INTERVAL * 3 / 4).await;
        assert!(next_now(&mut body).is_none(), "quiet so far");
        publish(&tx, 6);
        let sent = tokio::time::Instant::now();
        assert_eq!(update(next_now(&mut body).expect("the change")).version, 6);
        let beat = update(next(&mut body).await);
        assert!(beat.heartbeat);
        assert!(
            sent.elapsed() >= HEARTBEAT_INTERVAL,
            "a heartbeat {:?} after the change, {:?} after the start",
            sent.elapsed(),
            started.elapsed()
        );
    }
}
