//! Assembles a router (state, subscription, services) and serves it.

use std::future::Future;
use std::sync::Arc;

use fulcrum_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::ingress::oip::OipService;
use crate::limits::{DEFAULT_MAX_MESSAGE_SIZE, MaxMessageSizeLayer};
use crate::router::RouterState;
use crate::subscriber::{self, SubscriberConfig};

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
        }
    }
}

/// Runs a router on `listener` until `shutdown` completes.
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
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .layer(MaxMessageSizeLayer::new(config.max_message_size))
        .add_routes(routes.into())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    subscription.abort();
    result
}
