//! The routing stream: every replica follows the routing table in the store (a watch) and serves
//! it to routers over `Subscribe`.
//!
//! Fan-out goes through a `tokio::sync::watch` channel holding only the newest table, so a slow
//! router never holds up the others and never makes memory grow: when it is ready for the next
//! update it gets the newest one, skipping those it missed. Versions are store revisions, so
//! they only grow, at every router, whichever replica it talks to.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::routing_server::Routing;
use fulcrum_proto::fulcrum::v1::{RouterMessage, RoutingUpdate, router_message};
use futures::Stream;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::keys;
use crate::store::{SharedStore, WatchEvent};

/// Pause before re-reading the store after the watch broke: short enough that routers see a
/// recovered store within a second, long enough not to hammer a store that is down.
const REWATCH_BACKOFF: Duration = Duration::from_millis(500);

/// Updates queued per router stream beyond the one being sent. One is enough: the watch channel
/// already coalesces, this only lets the next send start while the previous is on the wire.
const STREAM_BUFFER: usize = 1;

/// What a router has told us about itself.
#[derive(Debug, Clone, Default)]
pub struct RouterInfo {
    /// The router's id.
    pub id: String,
    /// The region it serves.
    pub region: String,
    /// The newest version it acknowledged.
    pub acked_version: u64,
    /// NACKs received.
    pub nacks: u64,
}

/// The newest routing table, shared by every `Subscribe` stream of this replica.
#[derive(Debug, Clone)]
pub struct Publisher {
    table: watch::Receiver<Option<Arc<RoutingUpdate>>>,
    routers: Arc<Mutex<HashMap<String, RouterInfo>>>,
}

impl Publisher {
    /// Starts following the routing table in `store`; the task runs until aborted.
    pub fn start(store: SharedStore) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(follow(store, tx));
        let publisher = Self {
            table: rx,
            routers: Arc::default(),
        };
        (publisher, task)
    }

    /// The newest table, if one was ever read.
    pub fn current(&self) -> Option<Arc<RoutingUpdate>> {
        self.table.borrow().clone()
    }

    /// Routers currently subscribed to this replica.
    pub fn routers(&self) -> Vec<RouterInfo> {
        let routers = self.routers.lock().unwrap_or_else(PoisonError::into_inner);
        routers.values().cloned().collect()
    }
}

fn publish(tx: &watch::Sender<Option<Arc<RoutingUpdate>>>, value: &[u8], version: i64) {
    match RoutingUpdate::decode(value) {
        Ok(mut update) => {
            update.version = version as u64;
            update.snapshot = true;
            update.stale = false;
            tx.send_replace(Some(Arc::new(update)));
        }
        // A NACK-worthy table never reaches the routers; they keep the last good one.
        Err(e) => tracing::error!(version, error = %e, "undecodable routing table in the store"),
    }
}

fn mark_stale(tx: &watch::Sender<Option<Arc<RoutingUpdate>>>) {
    tx.send_if_modified(|current| match current {
        Some(t) if !t.stale => {
            let mut stale = (**t).clone();
            stale.stale = true;
            *current = Some(Arc::new(stale));
            true
        }
        _ => false,
    });
}

async fn follow(store: SharedStore, tx: watch::Sender<Option<Arc<RoutingUpdate>>>) {
    loop {
        let result: Result<(), crate::store::StoreError> = async {
            let (kvs, revision) = store.list(keys::ROUTING).await?;
            if let Some(kv) = kvs.iter().find(|kv| kv.key == keys::ROUTING) {
                publish(&tx, &kv.value, kv.mod_revision);
            }
            let mut events = store.watch(keys::ROUTING, revision).await?;
            while let Some(ev) = events.next().await {
                match ev? {
                    WatchEvent::Put(kv) if kv.key == keys::ROUTING => {
                        publish(&tx, &kv.value, kv.mod_revision)
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "routing watch broken; serving the last table as stale");
            mark_stale(&tx);
        }
        tokio::time::sleep(REWATCH_BACKOFF).await;
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

type UpdateStream = Pin<Box<dyn Stream<Item = Result<RoutingUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Routing for RoutingService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<RouterMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
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
        let routers = self.publisher.routers.clone();
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
        let mut table = self.publisher.table.clone();
        let router_id = hello.router_id.clone();
        // Outbound: the current table, then the newest one after every change.
        let sender = tokio::spawn(async move {
            table.mark_changed();
            while table.changed().await.is_ok() {
                let Some(update) = table.borrow_and_update().clone() else {
                    continue;
                };
                if tx.send(Ok((*update).clone())).await.is_err() {
                    return;
                }
            }
        });
        // Inbound: ACKs, NACKs and load reports, until the router hangs up.
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let mut routers = routers.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(info) = routers.get_mut(&router_id) else {
                    continue;
                };
                match msg.message {
                    Some(router_message::Message::Ack(a)) => {
                        info.acked_version = info.acked_version.max(a.version)
                    }
                    Some(router_message::Message::Nack(n)) => {
                        info.nacks += 1;
                        tracing::warn!(router = %router_id, version = n.version,
                            reason = %n.reason, "router rejected a routing update");
                    }
                    Some(router_message::Message::Load(_))
                    | Some(router_message::Message::Hello(_))
                    | None => {}
                }
            }
            sender.abort();
            routers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&router_id);
            tracing::info!(router = %router_id, "router unsubscribed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
