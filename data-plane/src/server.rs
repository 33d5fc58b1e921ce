//! Assembles a router (state, subscription, services) and serves it.

use std::future::Future;
use std::sync::Arc;

use fulcrum_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::ingress::oip::OipService;
use crate::limits::{DEFAULT_MAX_MESSAGE_SIZE, MaxMessageSizeLayer};
use crate::router::RouterState;
use crate::subscriber::{self, SubscriberConfig};

/// How long a stopping router lets calls in flight finish after it stops accepting new ones:
/// ten seconds covers the default five-second deadline twice over, so a call that started just
/// before the stop is not cut; a rolling restart waits at most that long per router.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A router's bootstrap settings (policy comes from the control plane).
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The region this router serves.
    pub region: String,
    /// Unique id of this router process.
    pub router_id: String,
    /// Control-plane replicas, `host:port`.
    pub control: Vec<String>,
    /// Largest message accepted, in bytes.
    pub max_message_size: usize,
    /// How long calls in flight may finish after a shutdown begins.
    pub shutdown_grace: std::time::Duration,
}

impl RouterConfig {
    /// Defaults for a router of `region` following `control`.
    pub fn new(region: impl Into<String>, control: Vec<String>) -> Self {
        let region = region.into();
        Self {
            router_id: format!("router-{region}-{}", std::process::id()),
            region,
            control,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

/// Runs a router on `listener` until `shutdown` completes; then stops accepting calls, lets
/// those in flight finish (at most [`RouterConfig::shutdown_grace`]), and leaves the control
/// plane (its routing stream closes, and the control plane forgets it).
pub async fn serve(
    config: RouterConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let state = Arc::new(RouterState::new(
        config.region.clone(),
        config.max_message_size,
    ));
    let subscription = tokio::spawn(subscriber::run(
        SubscriberConfig {
            control: config.control.clone(),
            router_id: config.router_id.clone(),
        },
        state.clone(),
    ));
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GrpcInferenceServiceServer<OipService>>()
        .await;
    let oip = GrpcInferenceServiceServer::new(OipService::new(state.clone()))
        // Backstop only: the layer answers oversized messages first, with the right status.
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size);
    // Everything the router does not serve itself is passed through by model header.
    let passthrough_state = state.clone();
    let passthrough = tower::service_fn(move |req: http::Request<axum::body::Body>| {
        let state = passthrough_state.clone();
        async move {
            Ok::<_, std::convert::Infallible>(
                crate::ingress::passthrough::forward(state, req).await,
            )
        }
    });
    let routes = tonic::service::Routes::new(health_service)
        .add_service(oip)
        .into_axum_router()
        .fallback_service(passthrough);
    let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("router stopping: no new calls, finishing those in flight");
        let _ = stopping_tx.send(());
    };
    // TCP_NODELAY on every client connection: a response goes out as several small writes
    // (headers, data, trailers), and Nagle's algorithm would hold the later ones back until
    // the client acknowledged the first. (tonic's `Server::tcp_nodelay` applies only to
    // listeners tonic binds itself, not to an incoming stream like this one.)
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .layer(MaxMessageSizeLayer::new(config.max_message_size))
        .add_routes(routes.into())
        .serve_with_incoming_shutdown(incoming, signal);
    let grace = config.shutdown_grace;
    let result = tokio::select! {
        r = server => r,
        () = async move {
            if stopping.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(?grace, "calls still in flight after the grace period; stopping anyway");
            Ok(())
        }
    };
    subscription.abort();
    result
}
