//! Self-registration, the second way into the registry: a node (or a sidecar beside it) opens
//! the `fulcrum.v1.Registration/Register` stream, sends its spec, and keeps the stream open for
//! as long as it serves, reporting its live load on it (see `registration.proto`).
//!
//! The spec is validated as an operator's would be ([`registry::validate`]) and written at
//! [`keys::node`] with a store lease; from then on the control plane's prober, control loop and
//! routers treat the node like any other. The entry lives as long as the lease:
//!
//! - The replica holding the stream renews the lease every third of its TTL while the node keeps
//!   talking. The node's messages are its heartbeat: one that sends nothing for a TTL (its host
//!   lost power, a partition left the connection half open) is taken for dead.
//! - When the stream ends — the node says goodbye by closing its side, its connection breaks, it
//!   falls silent, or it sends something invalid — the replica revokes the lease: the node
//!   leaves the registry at once.
//! - When the replica itself dies, nothing renews the lease and it expires within its TTL,
//!   unless the node has registered again through another replica first.
//! - When the replica shuts down, its streams end with UNAVAILABLE and their leases are left to
//!   expire, not revoked: a node that registers again through another replica within the TTL
//!   takes its entry over and never leaves the routing table.
//!
//! Both ways into the registry coexist, and neither takes the other's ids: a node cannot
//! register itself under an id an operator registered (`ALREADY_EXISTS`, nothing written), and
//! a second live node cannot take an id registered from another address. The same node
//! (same id and address) registering again takes its entry over, which is what a reconnect is.
//! An operator's `fulcrum ctl register` stays lease-less. An operator acting on a leased entry
//! wins: `ctl register` with the same address and another spec makes the entry the operator's
//! (lease-less), `ctl deregister` removes it; either way the stream that held it ends with
//! ABORTED at its next renewal (a node that keeps running then registers again, or is refused
//! while the operator holds its id).
//!
//! Load: each replica keeps the newest report of each node registered through it in
//! [`NodeReports`], for the rest of the control plane to read. A node's report is known only to
//! the replica holding its stream.
//!
//! Nodes present no credential yet: whoever reaches the control plane's port can register a
//! node, and so receive traffic for the models it claims. Deployments must keep that port
//! reachable by trusted networks only until nodes authenticate.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::registration_server::Registration;
use fulcrum_proto::fulcrum::v1::{
    NodeMessage, NodeReport, NodeSpec, RegistrationEvent, node_message,
};
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::store::{SharedStore, Store, StoreError};
use crate::{keys, registry};

/// Default lease TTL of a self-registered node. A dead node whose stream breaks leaves at once
/// (the lease is revoked); the TTL bounds the other cases: a node that falls silent without
/// closing its connection, and a replica that dies holding streams. Five seconds keeps those
/// within what the prober would take anyway to mark such a node unhealthy plus a little, while
/// riding out a few lost keep-alives (one every 1.7 s), a slow etcd write or a long pause of the
/// replica without dropping healthy nodes. Nodes report every half second, so a TTL is ten
/// reports.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

/// Most named metrics in one report: a handful of gauges is the intent (KV-cache use, batch
/// size); 64 leaves room while bounding what each node makes every replica keep.
const MAX_METRICS: usize = 64;

/// Longest metric name, as for ids and model names.
const MAX_METRIC_NAME_LEN: usize = 128;

/// Responses queued for a node: the acceptance and, possibly, the status that ends the stream.
const EVENT_BUFFER: usize = 2;

/// A node's newest report, as one replica received it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedReport {
    /// What the node reported.
    pub report: NodeReport,
    /// When this replica received it.
    pub received_at: Instant,
    /// The lease of the registration that carried it.
    pub lease: i64,
}

/// The newest report of each node registered through this replica, by node id. Cheap to clone:
/// clones share the map. A node's report is dropped when its registration ends.
#[derive(Debug, Clone, Default)]
pub struct NodeReports {
    inner: Arc<RwLock<HashMap<String, Slot>>>,
}

/// A node's place in [`NodeReports`]: owned by its newest registration on this replica, so an
/// older stream of the same node, still draining, cannot overwrite or drop the newer one's
/// reports.
#[derive(Debug)]
struct Slot {
    lease: i64,
    report: Option<ReceivedReport>,
}

impl NodeReports {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The newest report of node `id`, if it registered itself through this replica and has
    /// reported.
    pub fn get(&self, id: &str) -> Option<ReceivedReport> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .and_then(|s| s.report.clone())
    }

    /// Every node's newest report.
    pub fn snapshot(&self) -> HashMap<String, ReceivedReport> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|(id, s)| Some((id.clone(), s.report.clone()?)))
            .collect()
    }

    /// Gives node `id`'s slot to its registration with `lease`.
    fn own(&self, id: &str, lease: i64) {
        self.inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id.to_owned(),
                Slot {
                    lease,
                    report: None,
                },
            );
    }

    /// Keeps `report` as node `id`'s newest, if its registration with `lease` owns the slot.
    fn record(&self, id: &str, lease: i64, report: NodeReport) {
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = map.get_mut(id).filter(|s| s.lease == lease) {
            slot.report = Some(ReceivedReport {
                report,
                received_at: Instant::now(),
                lease,
            });
        }
    }

    /// Drops node `id`'s slot if its registration with `lease` owns it.
    fn forget(&self, id: &str, lease: i64) {
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if map.get(id).is_some_and(|s| s.lease == lease) {
            map.remove(id);
        }
    }
}

/// Ids of the registered nodes that registered themselves (their entries have a lease).
pub async fn leased_ids(store: &dyn Store) -> Result<HashSet<String>, Error> {
    let (kvs, _) = store.list(keys::NODES).await?;
    Ok(kvs
        .into_iter()
        .filter(|kv| kv.lease != 0)
        .filter_map(|kv| kv.key.strip_prefix(keys::NODES).map(str::to_owned))
        .collect())
}

/// Checks a report: utilization in [0, 1]; at most 64 metrics, named with 1-128 characters of
/// `[A-Za-z0-9._:-]` (Prometheus-style names such as `vllm:gpu_cache_usage_perc` fit), with
/// finite values.
pub fn validate_report(report: &NodeReport) -> Result<(), Error> {
    if !(0.0..=1.0).contains(&report.utilization) {
        return Err(Error::InvalidArgument(format!(
            "NodeReport.utilization must be in [0, 1], got {}",
            report.utilization
        )));
    }
    if report.metrics.len() > MAX_METRICS {
        return Err(Error::InvalidArgument(format!(
            "NodeReport carries {} metrics; at most {MAX_METRICS} are accepted",
            report.metrics.len()
        )));
    }
    for (name, value) in &report.metrics {
        let name_ok = !name.is_empty()
            && name.len() <= MAX_METRIC_NAME_LEN
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
        if !name_ok {
            return Err(Error::InvalidArgument(format!(
                "metric name {name:?} must be 1-{MAX_METRIC_NAME_LEN} characters of \
                 letters, digits, '.', '_', ':' and '-'"
            )));
        }
        if !value.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "metric {name:?} is {value}; values must be finite"
            )));
        }
    }
    Ok(())
}

/// Writes `spec` with a new lease of `ttl`, unless its id is taken by an operator's
/// registration or by a live one from another address. Returns the lease and the revision.
/// Every check runs before anything is written.
async fn claim(store: &dyn Store, spec: &NodeSpec, ttl: Duration) -> Result<(i64, i64), Error> {
    registry::validate(spec)?;
    let key = keys::node(&spec.id);
    let expected = match store.get(&key).await? {
        None => 0,
        Some(kv) if kv.lease == 0 => return Err(Error::RegisteredByOperator(spec.id.clone())),
        Some(kv) => {
            let old = registry::decode(&key, &kv.value)?;
            if old.address != spec.address {
                return Err(Error::AlreadyExists {
                    id: spec.id.clone(),
                    existing: old.address,
                });
            }
            // The same node again (a reconnect): it takes its entry over.
            kv.mod_revision
        }
    };
    let lease = store.grant_lease(ttl).await?;
    let written = store
        .compare_and_put_with_lease(&key, expected, spec.encode_to_vec(), lease)
        .await;
    match written {
        Ok(Some(revision)) => Ok((lease, revision)),
        Ok(None) => {
            revoke(store, lease).await;
            Err(Error::Conflict(key))
        }
        Err(e) => {
            revoke(store, lease).await;
            Err(e.into())
        }
    }
}

/// Revokes `lease`; when the store cannot be reached, the lease expires on its own.
async fn revoke(store: &dyn Store, lease: i64) {
    if let Err(e) = store.revoke_lease(lease).await {
        tracing::warn!(lease, error = %e, "cannot revoke a registration lease; it will expire");
    }
}

/// The `fulcrum.v1.Registration` service of one control-plane replica.
#[derive(Debug, Clone)]
pub struct RegistrationService {
    store: SharedStore,
    ttl: Duration,
    reports: NodeReports,
    changed: Arc<Notify>,
    alive: watch::Receiver<()>,
}

/// Keeps a replica's registrations going. Dropping it (the replica shuts down or dies) ends
/// every registration stream of the replica with UNAVAILABLE, without revoking the leases: the
/// nodes register again elsewhere, or their entries expire.
#[derive(Debug)]
pub struct Registrations {
    _alive: watch::Sender<()>,
}

impl RegistrationService {
    /// A service writing to `store` with leases of `ttl` (rounded up to whole seconds, at least
    /// one, as etcd counts them), keeping reports in `reports` and waking the control loop
    /// through `changed` when a node comes or goes. The registrations last while the returned
    /// [`Registrations`] does.
    pub fn new(
        store: SharedStore,
        ttl: Duration,
        reports: NodeReports,
        changed: Arc<Notify>,
    ) -> (Self, Registrations) {
        let secs = (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1);
        let (alive_tx, alive) = watch::channel(());
        let service = Self {
            store,
            ttl: Duration::from_secs(secs),
            reports,
            changed,
            alive,
        };
        (service, Registrations { _alive: alive_tx })
    }

    /// Reads the spec, registers the node and starts holding its registration.
    async fn open<S>(
        &self,
        mut inbound: S,
    ) -> Result<ReceiverStream<Result<RegistrationEvent, Status>>, Status>
    where
        S: Stream<Item = Result<NodeMessage, Status>> + Unpin + Send + 'static,
    {
        let first = match tokio::time::timeout(self.ttl, inbound.next()).await {
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "no NodeSpec within {:?} of opening the Register stream",
                    self.ttl
                ))
                .into());
            }
            Ok(Some(Err(status))) => return Err(status),
            Ok(None) => None,
            Ok(Some(Ok(m))) => m.message,
        };
        let Some(node_message::Message::Spec(spec)) = first else {
            return Err(Error::InvalidArgument(
                "the first message on a Register stream must be a NodeSpec".into(),
            )
            .into());
        };
        let (lease, revision) = claim(self.store.as_ref(), &spec, self.ttl).await?;
        tracing::info!(node = %spec.id, address = %spec.address, region = %spec.region,
            lease, revision, "node registered itself");
        self.reports.own(&spec.id, lease);
        self.changed.notify_one();
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let accepted = RegistrationEvent {
            revision: u64::try_from(revision).unwrap_or_default(),
            lease_ttl_seconds: u32::try_from(self.ttl.as_secs()).unwrap_or(u32::MAX),
            accepted: true,
        };
        // The channel is new and has room.
        let _ = tx.try_send(Ok(accepted));
        let held = Held {
            store: self.store.clone(),
            reports: self.reports.clone(),
            changed: self.changed.clone(),
            key: keys::node(&spec.id),
            id: spec.id,
            lease,
            ttl: self.ttl,
        };
        tokio::spawn(held.hold(inbound, tx, self.alive.clone()));
        Ok(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    type RegisterStream = ReceiverStream<Result<RegistrationEvent, Status>>;

    async fn register(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let peer = request.remote_addr();
        self.open(request.into_inner())
            .await
            .map(Response::new)
            .inspect_err(|s| {
                tracing::info!(?peer, code = ?s.code(), message = s.message(), "registration refused");
            })
    }
}

/// One live registration.
struct Held {
    store: SharedStore,
    reports: NodeReports,
    changed: Arc<Notify>,
    id: String,
    key: String,
    lease: i64,
    ttl: Duration,
}

/// How a registration ended.
enum Ended {
    /// The node closed its side of the stream.
    Goodbye,
    /// The node's connection broke, or it stopped reading.
    Gone(String),
    /// The registration failed: the stream ends with this error.
    Failed(Error),
    /// The replica is shutting down or died: the lease is left to expire.
    ShuttingDown,
}

impl Held {
    /// Holds the registration until the stream ends, then cleans up after it.
    async fn hold<S>(
        self,
        mut inbound: S,
        tx: mpsc::Sender<Result<RegistrationEvent, Status>>,
        mut alive: watch::Receiver<()>,
    ) where
        S: Stream<Item = Result<NodeMessage, Status>> + Unpin + Send + 'static,
    {
        let ended = self.run(&mut inbound, &tx, &mut alive).await;
        self.reports.forget(&self.id, self.lease);
        let error = match ended {
            Ended::Goodbye => {
                tracing::info!(node = %self.id, "node deregistered itself");
                None
            }
            Ended::Gone(why) => {
                tracing::info!(node = %self.id, %why, "node's registration stream broke");
                None
            }
            Ended::Failed(e) => {
                tracing::warn!(node = %self.id, error = %e, "node's registration ended");
                Some(e)
            }
            Ended::ShuttingDown => Some(Error::ShuttingDown),
        };
        if !matches!(error, Some(Error::ShuttingDown)) {
            // Revoking a lease that no longer holds the entry (taken over, or expired) deletes
            // nothing.
            revoke(self.store.as_ref(), self.lease).await;
        }
        self.changed.notify_one();
        if let Some(e) = error {
            // The node may be gone, or not reading: never wait on it.
            let _ = tx.try_send(Err(e.into()));
        }
    }

    async fn run<S>(
        &self,
        inbound: &mut S,
        tx: &mpsc::Sender<Result<RegistrationEvent, Status>>,
        alive: &mut watch::Receiver<()>,
    ) -> Ended
    where
        S: Stream<Item = Result<NodeMessage, Status>> + Unpin,
    {
        // A renewal every third of the TTL survives two lost ones.
        let period = self.ttl / 3;
        let mut renew = tokio::time::interval_at(Instant::now() + period, period);
        renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                // First, so that a replica going down never revokes: its connections may break
                // at the same time.
                biased;
                _ = alive.changed() => return Ended::ShuttingDown,
                message = inbound.next() => match message {
                    Some(Ok(NodeMessage { message: Some(node_message::Message::Report(report)) })) => {
                        if let Err(e) = validate_report(&report) {
                            return Ended::Failed(e);
                        }
                        heard = Instant::now();
                        self.reports.record(&self.id, self.lease, report);
                    }
                    Some(Ok(_)) => {
                        return Ended::Failed(Error::InvalidArgument(
                            "after its NodeSpec, a Register stream carries only NodeReports".into(),
                        ));
                    }
                    None => return Ended::Goodbye,
                    Some(Err(status)) => return Ended::Gone(status.to_string()),
                },
                _ = renew.tick() => match self.renew().await {
                    Ok(()) => {}
                    // Static stability: a store out of reach does not end registrations; if it
                    // stays out of reach past the TTL, the lease is found expired when it is back.
                    Err(Error::Store(StoreError::Unavailable(e))) => {
                        tracing::warn!(node = %self.id, error = %e, "cannot renew a registration lease");
                    }
                    Err(e) => return Ended::Failed(e),
                },
                () = tokio::time::sleep_until(heard + self.ttl) => {
                    return Ended::Failed(Error::NodeSilent { id: self.id.clone(), silent: self.ttl });
                }
                () = tx.closed() => return Ended::Gone("the node stopped reading".into()),
            }
        }
    }

    /// Renews the lease, and checks that it still holds the node's entry.
    async fn renew(&self) -> Result<(), Error> {
        if !self.store.keep_alive(self.lease).await? {
            return Err(StoreError::LeaseNotFound(self.lease).into());
        }
        match self.store.get(&self.key).await? {
            Some(kv) if kv.lease == self.lease => Ok(()),
            _ => Err(Error::RegistrationLost(self.id.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use fulcrum_proto::fulcrum::v1::Model;

    fn spec(id: &str, address: &str) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            address: address.into(),
            region: "a".into(),
            zone: "z1".into(),
            models: vec![Model {
                name: "echo".into(),
                versions: vec!["1".into()],
            }],
            capacity: 4,
            labels: [("gpu".to_owned(), "l4".to_owned())].into(),
        }
    }

    fn spec_message(s: NodeSpec) -> Result<NodeMessage, Status> {
        Ok(NodeMessage {
            message: Some(node_message::Message::Spec(s)),
        })
    }

    fn report(in_flight: u32, utilization: f64) -> Result<NodeMessage, Status> {
        Ok(NodeMessage {
            message: Some(node_message::Message::Report(NodeReport {
                in_flight,
                queue_depth: 0,
                utilization,
                metrics: [("kv_cache_usage".to_owned(), 0.5)].into(),
            })),
        })
    }

    struct Fixture {
        store: Arc<EmbeddedStore>,
        service: RegistrationService,
        registrations: Option<Registrations>,
        reports: NodeReports,
    }

    fn fixture() -> Fixture {
        let store = Arc::new(EmbeddedStore::in_memory());
        let reports = NodeReports::new();
        let (service, registrations) = RegistrationService::new(
            store.clone(),
            Duration::from_secs(3),
            reports.clone(),
            Arc::new(Notify::new()),
        );
        Fixture {
            store,
            service,
            registrations: Some(registrations),
            reports,
        }
    }

    type Node = mpsc::Sender<Result<NodeMessage, Status>>;

    /// Opens a registration fed by the returned sender.
    async fn open(
        f: &Fixture,
        first: Result<NodeMessage, Status>,
    ) -> Result<(Node, ReceiverStream<Result<RegistrationEvent, Status>>), Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let events = f.service.open(ReceiverStream::new(rx)).await?;
        Ok((tx, events))
    }

    async fn node_lease(store: &EmbeddedStore, id: &str) -> Option<i64> {
        store.get(&keys::node(id)).await.unwrap().map(|kv| kv.lease)
    }

    #[tokio::test(start_paused = true)]
    async fn registered_while_talking_gone_at_goodbye() {
        let f = fixture();
        let (node, mut events) = open(&f, spec_message(spec("n1", "127.0.0.1:1")))
            .await
            .unwrap();
        let accepted = events.next().await.unwrap().unwrap();
        assert!(accepted.accepted);
        assert_eq!(accepted.lease_ttl_seconds, 3);
        let lease = node_lease(&f.store, "n1").await.unwrap();
        assert_ne!(lease, 0);
        assert_eq!(
            leased_ids(f.store.as_ref()).await.unwrap(),
            HashSet::from(["n1".to_owned()])
        );
        assert_eq!(
            registry::get(f.store.as_ref(), "n1").await.unwrap(),
            spec("n1", "127.0.0.1:1")
        );

        // Reporting every second for ten TTLs keeps it registered, and the newest report is kept.
        for i in 0..30 {
            node.send(report(i, 0.25)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(node_lease(&f.store, "n1").await, Some(lease));
        let r = f.reports.get("n1").unwrap();
        assert_eq!(r.report.in_flight, 29);
        assert_eq!(r.report.metrics["kv_cache_usage"], 0.5);

        // Goodbye: the entry goes at once, the stream ends cleanly, the report is dropped.
        drop(node);
        assert!(events.next().await.is_none());
        assert_eq!(node_lease(&f.store, "n1").await, None);
        assert!(f.reports.get("n1").is_none());
        assert!(
            !f.store.keep_alive(lease).await.unwrap(),
            "lease not revoked"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_node_is_dropped_after_a_ttl() {
        let f = fixture();
        let (node, mut events) = open(&f, spec_message(spec("n1", "127.0.0.1:1")))
            .await
            .unwrap();
        events.next().await.unwrap().unwrap();
        let start = Instant::now();
        let err = events.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_millis(3100),
            "{waited:?}"
        );
        assert_eq!(node_lease(&f.store, "n1").await, None);
        drop(node);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bad_report_ends_the_registration() {
        let f = fixture();
        let (node, mut events) = open(&f, spec_message(spec("n1", "127.0.0.1:1")))
            .await
            .unwrap();
        events.next().await.unwrap().unwrap();
        node.send(report(1, f64::NAN)).await.unwrap();
        let err = events.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(node_lease(&f.store, "n1").await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_shutting_down_leaves_the_lease_to_expire() {
        let mut f = fixture();
        let (node, mut events) = open(&f, spec_message(spec("n1", "127.0.0.1:1")))
            .await
            .unwrap();
        events.next().await.unwrap().unwrap();
        node.send(report(1, 0.5)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        drop(f.registrations.take());
        let err = events.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(
            node_lease(&f.store, "n1").await.is_some(),
            "revoked on shutdown"
        );
        // Last renewed at 2 s (every second with a 3 s TTL): gone at 5 s.
        tokio::time::sleep(Duration::from_millis(2400)).await;
        assert!(node_lease(&f.store, "n1").await.is_some());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            node_lease(&f.store, "n1").await,
            None,
            "lease did not expire"
        );
        drop(node);
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_node_takes_its_entry_over_and_others_are_refused() {
        let f = fixture();
        let (first, mut first_events) = open(&f, spec_message(spec("n1", "127.0.0.1:1")))
            .await
            .unwrap();
        first_events.next().await.unwrap().unwrap();
        let first_lease = node_lease(&f.store, "n1").await.unwrap();

        // Another address: refused, nothing written.
        let (_, before) = f.store.list(keys::ROOT).await.unwrap();
        let err = open(&f, spec_message(spec("n1", "127.0.0.1:2")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
        assert_eq!(f.store.list(keys::ROOT).await.unwrap().1, before);

        // The same node reconnecting: it takes over; the old stream ends without removing it.
        let (second, mut second_events) = open(&f, spec_message(spec("n1", "127.0.0.1:1")))
            .await
            .unwrap();
        second_events.next().await.unwrap().unwrap();
        let second_lease = node_lease(&f.store, "n1").await.unwrap();
        assert_ne!(first_lease, second_lease);
        second.send(report(1, 0.5)).await.unwrap();
        first.send(report(9, 0.5)).await.unwrap();
        let err = first_events.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
        assert_eq!(node_lease(&f.store, "n1").await, Some(second_lease));
        assert_eq!(f.reports.get("n1").unwrap().lease, second_lease);
    }

    #[tokio::test(start_paused = true)]
    async fn an_operator_deregistering_the_node_ends_its_stream() {
        let f = fixture();
        let (node, mut events) = open(&f, spec_message(spec("n1", "127.0.0.1:1")))
            .await
            .unwrap();
        events.next().await.unwrap().unwrap();
        node.send(report(1, 0.5)).await.unwrap();
        registry::deregister(f.store.as_ref(), "n1").await.unwrap();
        let err = events.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
        assert!(f.reports.get("n1").is_none());
        assert_eq!(node_lease(&f.store, "n1").await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_openings_change_nothing() {
        let f = fixture();
        registry::register(f.store.as_ref(), &spec("op", "127.0.0.1:5"))
            .await
            .unwrap();
        let (_, before) = f.store.list(keys::ROOT).await.unwrap();
        let mut bad = spec("n1", "127.0.0.1:1");
        bad.capacity = 0;
        let cases = [
            (spec_message(bad), tonic::Code::InvalidArgument),
            (report(1, 0.5), tonic::Code::InvalidArgument),
            (
                Ok(NodeMessage { message: None }),
                tonic::Code::InvalidArgument,
            ),
            // An operator's id, whatever the address.
            (
                spec_message(spec("op", "127.0.0.1:5")),
                tonic::Code::AlreadyExists,
            ),
            (
                spec_message(spec("op", "127.0.0.1:6")),
                tonic::Code::AlreadyExists,
            ),
        ];
        for (first, code) in cases {
            let err = open(&f, first).await.unwrap_err();
            assert_eq!(err.code(), code, "{err:?}");
        }
        // A stream that sends nothing is refused after a TTL.
        let (_tx, rx) = mpsc::channel(1);
        let err = f.service.open(ReceiverStream::new(rx)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(f.store.list(keys::ROOT).await.unwrap().1, before);
        assert!(leased_ids(f.store.as_ref()).await.unwrap().is_empty());
    }

    #[test]
    fn reports() {
        let ok = |r: &NodeReport| validate_report(r).is_ok();
        let mut r = NodeReport {
            in_flight: 3,
            queue_depth: 1,
            utilization: 1.0,
            metrics: [("vllm:gpu_cache_usage_perc".to_owned(), 0.7)].into(),
        };
        assert!(ok(&r));
        r.utilization = 1.01;
        assert!(!ok(&r));
        r.utilization = -0.1;
        assert!(!ok(&r));
        r.utilization = 0.0;
        r.metrics.insert("bad name".into(), 1.0);
        assert!(!ok(&r));
        r.metrics.remove("bad name");
        r.metrics.insert("inf".into(), f64::INFINITY);
        assert!(!ok(&r));
        r.metrics = (0..=MAX_METRICS).map(|i| (format!("m{i}"), 0.0)).collect();
        assert!(!ok(&r));
    }
}
