//! Assembles one control-plane replica (store, prober, control loop, publisher, services) and
//! serves it.

use std::future::Future;
use std::sync::Arc;

use fulcrum_grpc_h2::GrpcFrame;
use fulcrum_grpc_h2::server::{self, Handler, Peer, RecvBody, Settings};
use fulcrum_proto::fulcrum::v1::SelfReport;
use fulcrum_proto::fulcrum::v1::admin_server::AdminServer;
use fulcrum_proto::fulcrum::v1::registration_server::RegistrationServer;
use fulcrum_proto::fulcrum::v1::router_directory_server::RouterDirectoryServer;
use h2::RecvStream;
use h2::server::SendResponse;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::body::Body;
use tonic::service::Routes;

use crate::admin::AdminService;
use crate::control_loop;
use crate::health::prober::{ProbeConfig, Prober};
use crate::load::{self, LoadAggregator};
use crate::publisher::Publisher;
use crate::self_registration::{NodeReports, RegistrationService};
use crate::store::{AbortOnDrop, SharedStore};
use crate::subscribe::{ROUTING_PREFIX, Subscriptions};

/// Leader lease TTL: a replica that dies (or is cut off from the store) loses the leadership
/// within three seconds, so a new leader is elected within the TTL plus a second; shorter would
/// let a long garbage-collection pause or a slow etcd depose a healthy leader.
pub const DEFAULT_LEADER_TTL: std::time::Duration = std::time::Duration::from_secs(3);

/// Who may call the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAuth {
    /// Callers must present `authorization: Bearer <token>`.
    Token(String),
    /// Callers on the loopback interface need no credential (one-machine setups: `fulcrum up`);
    /// with a token, others may still call with it.
    Loopback(Option<String>),
}

/// Who may open the routers' and nodes' streams (`Routing.Subscribe`,
/// `Registration.Register`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamAuth {
    /// Routers and nodes must present `authorization: Bearer <token>`, wherever they are.
    Token(String),
    /// Routers and nodes on the loopback interface need no credential; with a token, others
    /// may present it. Without one (the default: a replica given no stream token), only this
    /// machine's routers and nodes get in, so `fulcrum up` works with no flags and nothing
    /// from the network can register a node or read the routing table.
    Loopback(Option<String>),
}

impl Default for StreamAuth {
    fn default() -> Self {
        StreamAuth::Loopback(None)
    }
}

/// Settings of one replica.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// This replica's id (shown as the leader's name).
    pub replica_id: String,
    /// Active health probing.
    pub probe: ProbeConfig,
    /// Leader lease TTL.
    pub leader_ttl: std::time::Duration,
    /// Admin API credentials.
    pub admin_auth: AdminAuth,
    /// Routers' and nodes' credentials (default: loopback only).
    pub stream_auth: StreamAuth,
    /// Lease TTL of self-registered nodes (whole seconds).
    pub registration_ttl: std::time::Duration,
}

impl ControlPlaneConfig {
    /// Defaults with the given id and credentials.
    pub fn new(replica_id: impl Into<String>, admin_auth: AdminAuth) -> Self {
        Self {
            replica_id: replica_id.into(),
            probe: ProbeConfig::default(),
            leader_ttl: DEFAULT_LEADER_TTL,
            admin_auth,
            stream_auth: StreamAuth::default(),
            registration_ttl: crate::self_registration::DEFAULT_TTL,
        }
    }
}

/// Runs a replica on `listener` until `shutdown` completes.
///
/// Dropping the returned future (or aborting its task) stops the replica's background work too,
/// including the leader lease keep-alive, as if the process had died.
pub async fn serve(
    config: ControlPlaneConfig,
    store: SharedStore,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_with_metrics(config, store, listener, None, shutdown).await
}

/// [`serve`], with Prometheus metrics ([`crate::metrics`]) on `metrics` when given.
pub async fn serve_with_metrics(
    config: ControlPlaneConfig,
    store: SharedStore,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let changed = Arc::new(Notify::new());
    let prober = Arc::new(Prober::new(config.probe, changed.clone()));
    let load = Arc::new(LoadAggregator::default());
    let (publisher, follower) = Publisher::start(store.clone(), load.clone());
    let follower = AbortOnDrop(follower);
    let reports = NodeReports::new();
    // This replica's routers' load and its nodes' own reports, shared with the leader through
    // the store.
    let _load_publisher = AbortOnDrop(tokio::spawn(publish_load(
        store.clone(),
        config.replica_id.clone(),
        load,
        reports.clone(),
    )));
    let (is_leader_tx, is_leader) = tokio::sync::watch::channel(false);
    // Tied to this future: if the replica is dropped (or its task aborted), its leadership
    // lapses with it.
    let _control_loop = AbortOnDrop(tokio::spawn(control_loop::run(
        store.clone(),
        prober.clone(),
        changed.clone(),
        config.replica_id.clone(),
        config.leader_ttl,
        is_leader_tx,
    )));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status(
            fulcrum_proto::fulcrum::v1::routing_server::SERVICE_NAME,
            tonic_health::ServingStatus::Serving,
        )
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    health_reporter
        .set_serving::<RegistrationServer<RegistrationService>>()
        .await;

    // Nodes register themselves with the stream credential, as routers subscribe, not with the
    // operators' admin one.
    let (registration, registrations) = RegistrationService::new(
        store.clone(),
        config.registration_ttl,
        reports.clone(),
        changed.clone(),
    );
    // Registrations and routers' streams end when shutdown begins (so that it does not wait on
    // them), or when this future is dropped: the publisher gone, every `Subscribe` stream ends
    // with `grpc-status: 0` and its router moves to another replica.
    let shutdown = async move {
        shutdown.await;
        drop(registrations);
        drop(follower);
    };

    let _metrics = metrics.map(|l| {
        let state = crate::metrics::ReplicaState {
            publisher: publisher.clone(),
            is_leader: is_leader.clone(),
            health: prober.stats().clone(),
        };
        AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(state, l).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        }))
    });
    let admin = AdminService::new(
        store.clone(),
        prober,
        publisher.clone(),
        changed,
        config.replica_id.clone(),
        is_leader,
    )
    .with_node_reports(reports);
    let auth = crate::auth::AdminInterceptor::new(config.admin_auth.clone());
    let streams = crate::auth::StreamInterceptor::new(config.stream_auth.clone());
    let routes = Routes::new(health_service)
        .add_service(AdminServer::with_interceptor(admin, auth))
        .add_service(RegistrationServer::with_interceptor(
            registration,
            streams.clone(),
        ))
        .add_service(RouterDirectoryServer::with_interceptor(
            crate::directory::DirectoryService::new(store.clone()),
            streams.clone(),
        ));
    let calls = Calls {
        subscriptions: Subscriptions::new(publisher, streams, store.clone()),
        routes,
    };
    // TCP_NODELAY: a version is one small frame, sent at once.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    server::serve(calls, Settings::default(), incoming, shutdown).await;
    Ok(())
}

/// What a replica serves on its HTTP/2 server ([`fulcrum_grpc_h2::server`]): routers'
/// `Subscribe` streams by hand ([`Subscriptions`]: a version costs one task wake-up and one
/// write a router), everything else (admin, registration, health) through tonic's routes.
#[derive(Clone)]
struct Calls {
    subscriptions: Subscriptions,
    routes: Routes,
}

impl Handler for Calls {
    async fn call(
        &self,
        peer: Peer,
        request: http::Request<RecvStream>,
        respond: SendResponse<GrpcFrame>,
    ) {
        if request.uri().path().starts_with(ROUTING_PREFIX) {
            return self.subscriptions.serve(peer, request, respond).await;
        }
        let mut request = request.map(|body| Body::new(RecvBody::new(body)));
        // Where tonic's server puts the caller's address (the loopback credential reads it).
        request.extensions_mut().insert(peer.connect_info());
        server::route(self.routes.clone(), request, respond).await;
    }
}

/// Writes this replica's routers' load and its nodes' own reports to the store every
/// [`load::PUBLISH_INTERVAL`].
async fn publish_load(
    store: SharedStore,
    replica_id: String,
    aggregator: Arc<LoadAggregator>,
    reports: NodeReports,
) {
    let mut ticker = tokio::time::interval(load::PUBLISH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let own: Vec<SelfReport> = reports
            .snapshot()
            .into_iter()
            .map(|(node_id, r)| SelfReport {
                node_id,
                age_ms: r.received_at.elapsed().as_millis() as u64,
                report: Some(r.report),
            })
            .collect();
        let started = std::time::Instant::now();
        let view = aggregator.view();
        match load::publish(store.as_ref(), &replica_id, &view, own).await {
            Ok(()) => tracing::debug!(
                nodes = view.len(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "load sum written"
            ),
            Err(e) => {
                tracing::debug!(error = %e, "cannot publish load; the leader keeps the last sum")
            }
        }
    }
}
