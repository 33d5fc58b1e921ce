//! Assembles one control-plane replica (store, prober, control loop, publisher, services) and
//! serves it.

use std::future::Future;
use std::sync::Arc;

use fulcrum_proto::fulcrum::v1::admin_server::AdminServer;
use fulcrum_proto::fulcrum::v1::routing_server::RoutingServer;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;

use crate::admin::AdminService;
use crate::control_loop;
use crate::health::prober::{ProbeConfig, Prober};
use crate::publisher::{Publisher, RoutingService};
use crate::store::SharedStore;

/// Settings of one replica.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneConfig {
    /// Active health probing.
    pub probe: ProbeConfig,
}

/// Runs a replica on `listener` until `shutdown` completes.
pub async fn serve(
    config: ControlPlaneConfig,
    store: SharedStore,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let changed = Arc::new(Notify::new());
    let prober = Arc::new(Prober::new(config.probe, changed.clone()));
    let (publisher, follower) = Publisher::start(store.clone());
    let loop_task = tokio::spawn(control_loop::run(
        store.clone(),
        prober.clone(),
        changed.clone(),
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RoutingServer<RoutingService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;

    let admin = AdminService::new(store, prober, publisher.clone(), changed);
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(RoutingServer::new(RoutingService::new(publisher)))
        .add_service(AdminServer::new(admin))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    loop_task.abort();
    follower.abort();
    result
}
