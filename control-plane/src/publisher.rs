//! The routing stream: every replica follows the routing table in the store (a watch) and serves
//! it to routers over `Subscribe`.
//!
//! Each new table is published with the delta from the one before it (only the nodes that
//! changed, and the ids removed), computed once for all routers. A router that holds the previous
//! version gets the delta; any other gets a snapshot. Fan-out goes through a `tokio::sync::watch`
//! holding only the newest table, so a slow router never holds up the others and never makes
//! memory grow: when it is ready for the next update it gets the newest one (as a snapshot if it
//! missed a version), skipping those it missed. Versions are store revisions, so they only grow,
//! at every router, whichever replica it talks to. Heartbeats keep an idle stream provably alive.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::routing_server::Routing;
use fulcrum_proto::fulcrum::v1::{Endpoint, RouterMessage, RoutingUpdate, router_message};
use futures::Stream;
use prost::Message;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::keys;
use crate::load::LoadAggregator;
use crate::store::{SharedStore, WatchEvent};
use crate::table::node_id;

/// Pause before re-reading the store after the watch broke: short enough that routers see a
/// recovered store within a second, long enough not to hammer a store that is down.
const REWATCH_BACKOFF: Duration = Duration::from_millis(500);

/// Updates queued per router stream beyond the one being sent. One is enough: the watch channel
/// already coalesces, this only lets the next send start while the previous is on the wire.
const STREAM_BUFFER: usize = 1;

/// A heartbeat goes out on a stream that carried nothing for this long. Routers treat a stream
/// silent for three intervals as dead and move to another replica, so a hung replica costs a
/// router at most six seconds of staleness (while it keeps routing on its last table).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// One published version: the snapshot, and the delta from the version before it.
#[derive(Debug)]
pub struct Published {
    /// The whole table.
    pub snapshot: RoutingUpdate,
    /// The change from `delta.base_version`, when there was a previous table.
    pub delta: Option<RoutingUpdate>,
}

/// The delta from `prev` to `next`: endpoints that are new or changed, ids that are gone, and
/// all policies (they are few).
pub fn delta(prev: &RoutingUpdate, next: &RoutingUpdate) -> RoutingUpdate {
    let before: HashMap<&str, &Endpoint> = prev.endpoints.iter().map(|e| (node_id(e), e)).collect();
    let after: HashMap<&str, &Endpoint> = next.endpoints.iter().map(|e| (node_id(e), e)).collect();
    RoutingUpdate {
        version: next.version,
        snapshot: false,
        endpoints: next
            .endpoints
            .iter()
            .filter(|e| before.get(node_id(e)) != Some(e))
            .cloned()
            .collect(),
        removed: prev
            .endpoints
            .iter()
            .map(node_id)
            .filter(|id| !after.contains_key(id))
            .map(str::to_owned)
            .collect(),
        stale: next.stale,
        policies: next.policies.clone(),
        heartbeat: false,
        base_version: prev.version,
    }
}

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

type Table = Option<Arc<Published>>;

/// The newest routing table, shared by every `Subscribe` stream of this replica.
#[derive(Debug, Clone)]
pub struct Publisher {
    table: watch::Receiver<Table>,
    routers: Arc<Mutex<HashMap<String, RouterInfo>>>,
    load: Arc<LoadAggregator>,
}

impl Publisher {
    /// Starts following the routing table in `store`; the task runs until aborted. Load reports
    /// from routers go to `load`.
    pub fn start(
        store: SharedStore,
        load: Arc<LoadAggregator>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(follow(store, tx));
        let publisher = Self {
            table: rx,
            routers: Arc::default(),
            load,
        };
        (publisher, task)
    }

    /// The newest table, if one was ever read.
    pub fn current(&self) -> Option<Arc<RoutingUpdate>> {
        self.table
            .borrow()
            .as_ref()
            .map(|p| Arc::new(p.snapshot.clone()))
    }

    /// Every new table from now on (the newest first).
    pub fn tables(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.table.clone()
    }

    /// Routers currently subscribed to this replica.
    pub fn routers(&self) -> Vec<RouterInfo> {
        let routers = self.routers.lock().unwrap_or_else(PoisonError::into_inner);
        routers.values().cloned().collect()
    }
}

fn publish(tx: &watch::Sender<Table>, value: &[u8], version: i64) {
    match RoutingUpdate::decode(value) {
        Ok(mut snapshot) => {
            snapshot.version = version as u64;
            snapshot.snapshot = true;
            snapshot.stale = false;
            snapshot.heartbeat = false;
            snapshot.base_version = 0;
            tx.send_modify(|current| {
                let delta = current
                    .as_ref()
                    .filter(|p| p.snapshot.version < snapshot.version)
                    .map(|p| delta(&p.snapshot, &snapshot));
                *current = Some(Arc::new(Published { snapshot, delta }));
            });
        }
        // A NACK-worthy table never reaches the routers; they keep the last good one.
        Err(e) => tracing::error!(version, error = %e, "undecodable routing table in the store"),
    }
}

fn mark_stale(tx: &watch::Sender<Table>, stale: bool) {
    tx.send_if_modified(|current| match current {
        Some(p) if p.snapshot.stale != stale => {
            let mut snapshot = p.snapshot.clone();
            snapshot.stale = stale;
            // The flag alone changes; routers get it as a snapshot.
            *current = Some(Arc::new(Published {
                snapshot,
                delta: None,
            }));
            true
        }
        _ => false,
    });
}

async fn follow(store: SharedStore, tx: watch::Sender<Table>) {
    loop {
        let result: Result<(), crate::store::StoreError> = async {
            let (kvs, revision) = store.list(keys::ROUTING).await?;
            mark_stale(&tx, false);
            if let Some(kv) = kvs.iter().find(|kv| kv.key == keys::ROUTING) {
                let known = tx.borrow().as_ref().map_or(0, |p| p.snapshot.version);
                if kv.mod_revision as u64 > known {
                    publish(&tx, &kv.value, kv.mod_revision);
                }
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
            mark_stale(&tx, true);
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

/// What to send a router holding `held`: nothing when it is current, the delta when it holds
/// the delta's base, a snapshot otherwise (including when it claims a version from the future).
fn update_for(held: u64, p: &Published) -> Option<RoutingUpdate> {
    if held == p.snapshot.version {
        return None;
    }
    match &p.delta {
        Some(d) if d.base_version == held && held != 0 => Some(d.clone()),
        _ => Some(p.snapshot.clone()),
    }
}

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
        let load = self.publisher.load.clone();
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
        // A NACK makes the next update a snapshot.
        let resync = Arc::new(Notify::new());
        let resync_rx = resync.clone();
        let mut held = hello.known_version;
        // Outbound: what the router needs now, then each newer version, with heartbeats between.
        let sender = tokio::spawn(async move {
            table.mark_changed();
            loop {
                let next = tokio::select! {
                    changed = table.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let p = table.borrow_and_update().clone();
                        p.and_then(|p| update_for(held, &p).map(|u| (u, p.snapshot.version)))
                    }
                    () = resync_rx.notified() => {
                        held = 0;
                        let p = table.borrow().clone();
                        p.map(|p| (p.snapshot.clone(), p.snapshot.version))
                    }
                    () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {
                        let version = table.borrow().as_ref().map_or(0, |p| p.snapshot.version);
                        Some((RoutingUpdate { version, heartbeat: true, ..Default::default() }, version))
                    }
                };
                let Some((update, version)) = next else {
                    continue;
                };
                if !update.heartbeat {
                    held = version;
                }
                if tx.send(Ok(update)).await.is_err() {
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
                            reason = %n.reason, "router rejected a routing update; sending a snapshot");
                        resync.notify_one();
                    }
                    Some(router_message::Message::Load(report)) => load.record(&router_id, report),
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
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::NodeSpec;

    fn ep(id: &str, weight: f64) -> Endpoint {
        Endpoint {
            spec: Some(NodeSpec {
                id: id.into(),
                ..Default::default()
            }),
            weight,
            ..Default::default()
        }
    }

    fn table(version: u64, eps: Vec<Endpoint>) -> RoutingUpdate {
        RoutingUpdate {
            version,
            snapshot: true,
            endpoints: eps,
            ..Default::default()
        }
    }

    #[test]
    fn deltas_carry_only_what_changed() {
        let a = table(5, vec![ep("x", 1.0), ep("y", 1.0), ep("z", 1.0)]);
        let b = table(9, vec![ep("x", 1.0), ep("y", 2.0), ep("w", 1.0)]);
        let d = delta(&a, &b);
        assert!(!d.snapshot);
        assert_eq!((d.version, d.base_version), (9, 5));
        let ids: Vec<_> = d.endpoints.iter().map(node_id).collect();
        assert_eq!(ids, vec!["y", "w"]);
        assert_eq!(d.removed, vec!["z".to_string()]);
    }

    #[test]
    fn what_each_router_gets() {
        let a = table(5, vec![ep("x", 1.0)]);
        let b = table(9, vec![ep("x", 2.0)]);
        let p = Published {
            delta: Some(delta(&a, &b)),
            snapshot: b,
        };
        assert!(update_for(9, &p).is_none(), "a current router gets nothing");
        assert!(
            !update_for(5, &p).unwrap().snapshot,
            "the base holder gets the delta"
        );
        assert!(
            update_for(3, &p).unwrap().snapshot,
            "an older router gets a snapshot"
        );
        assert!(
            update_for(0, &p).unwrap().snapshot,
            "a new router gets a snapshot"
        );
        assert!(
            update_for(u64::MAX, &p).unwrap().snapshot,
            "a version from the future too"
        );
    }
}
