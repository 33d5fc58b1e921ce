//! Assembles a router (state, subscription, services) and serves it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::ingress::connection::{self, Services};
use crate::ingress::infer::OipRoutes;
use crate::ingress::oip::OipService;
use crate::limits::DEFAULT_MAX_MESSAGE_SIZE;
use crate::router::RouterState;
use crate::shard::{self, Shard};
use crate::subscriber::{self, SubscriberConfig};
use crate::table::LoadView;

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
    /// Serving threads ([`crate::shard`]); 0: one per core the process may run on.
    pub threads: usize,
    /// How long a serving thread keeps polling its sockets after a call rather than sleeping
    /// ([`crate::shard`]): lower latency on machines where waking a thread is dear, for CPU
    /// spent polling. Zero (the default): threads sleep when they have nothing to do.
    pub busy_poll: Duration,
    /// Whether the weights follow the control plane's global load view or only the node's
    /// capacity ([`LoadView`]).
    pub load_view: LoadView,
    /// The token presented to the control plane on the routing stream (its --stream-token).
    pub stream_token: Option<String>,
    /// Size of the response cache, in bytes ([`crate::cache`]).
    pub cache_bytes: u64,
    /// The response cache's shared level, in Redis ([`crate::shared_cache`]); none: each
    /// router's cache is its own.
    pub shared_cache: Option<crate::shared_cache::SharedCacheSetup>,
    /// Caller authentication ([`crate::auth`]); none: every call is admitted.
    pub auth: Option<Arc<crate::auth::CallerAuth>>,
    /// Bounds on the calls made in the background ([`crate::tasks`]).
    pub task_limits: crate::tasks::TaskLimits,
    /// Where other routers reach this one (`host:port`), for the background calls it holds;
    /// none: the address it listens on, unless that is a wildcard (0.0.0.0, ::), which names
    /// no machine: then other routers cannot reach its tasks.
    pub advertise: Option<String>,
}

impl RouterConfig {
    /// Defaults for a router of `region` following `control`.
    pub fn new(region: impl Into<String>, control: Vec<String>) -> Self {
        let region = region.into();
        // The second and later routers of one process (tests, embedded use) get a number too:
        // the control plane tells routers apart by id, and a task's id names its router's.
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let pid = std::process::id();
        let router_id = match MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
            0 => format!("router-{region}-{pid}"),
            n => format!("router-{region}-{pid}-{}", n + 1),
        };
        Self {
            router_id,
            region,
            control,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            shutdown_grace: SHUTDOWN_GRACE,
            threads: 0,
            busy_poll: Duration::ZERO,
            load_view: LoadView::Global,
            stream_token: None,
            cache_bytes: crate::cache::DEFAULT_CACHE_BYTES,
            shared_cache: None,
            auth: None,
            task_limits: crate::tasks::TaskLimits::default(),
            advertise: None,
        }
    }
}

/// How long the accept loop pauses after a failed accept (out of file descriptors, most
/// likely): long enough not to spin on an error that persists, short enough that clients
/// barely notice once descriptors free up.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Runs a router on `listener` until `shutdown` completes; then stops accepting calls, lets
/// those in flight finish (at most [`RouterConfig::shutdown_grace`]), and leaves the control
/// plane (its routing stream closes, and the control plane forgets it).
///
/// Calls are served by [`RouterConfig::threads`] serving threads ([`crate::shard`]); this
/// future accepts connections and deals them out, and runs the control-plane subscription.
pub async fn serve(
    config: RouterConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_with_metrics(config, listener, None, shutdown).await
}

/// [`serve`], with Prometheus metrics ([`crate::metrics`]) on `metrics` when given.
pub async fn serve_with_metrics(
    config: RouterConfig,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let mut state = RouterState::new(config.region.clone(), config.max_message_size);
    state.cache = match &config.shared_cache {
        // Every router sharing the level hashes requests alike.
        Some(shared) => crate::cache::ResponseCache::with_keys(config.cache_bytes, shared.keys),
        None => crate::cache::ResponseCache::new(config.cache_bytes),
    };
    state.shared_cache = config.shared_cache.as_ref().map(|s| s.cache.clone());
    state.auth = config.auth.clone();
    state.tasks = Arc::new(crate::tasks::TaskStore::new(
        config.router_id.clone(),
        config.task_limits,
    ));
    state.peers = Some(Arc::new(crate::peers::Peers::new(
        &config.control,
        config.stream_token.as_deref(),
    )));
    let state = Arc::new(state);
    let expiry = tokio::spawn(crate::tasks::expire_every_second(state.tasks.clone()));
    let reload = config
        .auth
        .clone()
        .map(|auth| tokio::spawn(crate::auth::reload_keys(auth)));
    let metrics = metrics.map(|l| {
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(state, l).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        })
    });
    let subscription = tokio::spawn(subscriber::run(
        SubscriberConfig {
            control: config.control.clone(),
            router_id: config.router_id.clone(),
            load_view: config.load_view,
            token: config.stream_token.clone(),
            address: config.advertise.clone().or_else(|| {
                listener
                    .local_addr()
                    .ok()
                    .filter(|a| !a.ip().is_unspecified())
                    .map(|a| a.to_string())
            }),
        },
        state.clone(),
    ));
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_readiness(state.clone(), health_reporter));
    let threads = match config.threads {
        0 => shard::default_count(),
        n => n,
    };
    let mut shards = Vec::with_capacity(threads);
    for index in 0..threads {
        let (state, health) = (state.clone(), health_service.clone());
        let started = Shard::start(index, threads, config.busy_poll, move |conns, stop| {
            tokio::spawn(preconnect(state.clone()));
            let incoming = UnboundedReceiverStream::new(conns).map(TcpStream::from_std);
            serve_connections(state, health, incoming, async move {
                let _ = stop.await;
            })
        });
        match started {
            Ok(s) => shards.push(s),
            Err(e) => {
                tracing::error!(error = %e, thread = index, "cannot start a serving thread");
                break;
            }
        }
    }
    let result = if shards.is_empty() {
        // No thread could start: serve on the caller's runtime rather than not at all.
        serve_inline(&config, state, health_service, listener, shutdown).await
    } else {
        serve_sharded(&config, &mut shards, listener, shutdown).await
    };
    subscription.abort();
    expiry.abort();
    if let Some(r) = reload {
        r.abort();
    }
    if let Some(m) = metrics {
        m.abort();
    }
    result
}

/// `grpc.health.v1` at the router: the whole server (`""`) is SERVING while the process runs
/// (a liveness probe), the inference service (`inference.GRPCInferenceService`, a readiness
/// probe) only once the router holds a routing table: before its first table it could only
/// answer UNAVAILABLE. A table once held, it stays SERVING, also when the control plane is
/// unreachable (the router routes on the last table) or no node is healthy (the router then
/// answers UNAVAILABLE itself, promptly, which a client can act on; a router taken out of its
/// load balancer would refuse connections instead).
async fn report_readiness(state: Arc<RouterState>, reporter: tonic_health::server::HealthReporter) {
    reporter
        .set_not_serving::<GrpcInferenceServiceServer<OipService>>()
        .await;
    let mut updates = state.table_updates.subscribe();
    while !state.has_table() {
        if updates.changed().await.is_err() {
            return;
        }
    }
    reporter
        .set_serving::<GrpcInferenceServiceServer<OipService>>()
        .await;
}

/// On a serving thread: connects to the nodes of every new table ahead of the calls, so the
/// first call a thread sends to a node neither waits for the connection nor makes the node look
/// slow by the connect time (each thread has its own connections).
async fn preconnect(state: Arc<RouterState>) {
    let mut updates = state.table_updates.subscribe();
    loop {
        let table = state.table.load_full();
        for node in table.nodes.values() {
            node.preconnect();
        }
        if updates.changed().await.is_err() {
            return;
        }
    }
}

/// Accepts connections and deals them out to `shards` until `shutdown`, then stops them
/// gracefully, waiting at most the grace period.
async fn serve_sharded(
    config: &RouterConfig,
    shards: &mut [Shard],
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let accept = async {
        let mut next = 0usize;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            // A response goes out as several small writes (headers, data, trailers); Nagle's
            // algorithm would hold the later ones back until the client acknowledged the first.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
            let Ok(mut conn) = stream.into_std() else {
                continue;
            };
            // A shard that stopped (it cannot, before shutdown) passes the connection on.
            for _ in 0..shards.len() {
                let shard = &shards[next % shards.len()];
                next = next.wrapping_add(1);
                match shard.serve(conn) {
                    Ok(()) => break,
                    Err(back) => conn = back,
                }
            }
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
    drop(listener);
    tracing::info!("router stopping: no new calls, finishing those in flight");
    for s in shards.iter_mut() {
        s.stop();
    }
    let finished = async {
        let mut result = Ok(());
        for s in shards.iter_mut() {
            if let Err(e) = s.finished().await {
                result = Err(e);
            }
        }
        result
    };
    match tokio::time::timeout(config.shutdown_grace, finished).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(grace = ?config.shutdown_grace,
                "calls still in flight after the grace period; stopping anyway");
            // Dropping the shards (by the caller) stops them at once.
            Ok(())
        }
    }
}

/// Serves on the caller's runtime (when no serving thread could be started).
async fn serve_inline<H: Health>(
    config: &RouterConfig,
    state: Arc<RouterState>,
    health: HealthServer<H>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("router stopping: no new calls, finishing those in flight");
        let _ = stopping_tx.send(());
    };
    // TCP_NODELAY, as in `serve_sharded`. (tonic's `Server::tcp_nodelay` applies only to
    // listeners tonic binds itself, not to an incoming stream like this one.)
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = serve_connections(state, health, incoming, signal);
    let grace = config.shutdown_grace;
    tokio::select! {
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
    }
}

/// Serves the router's services (OIP, health, pass-through for everything else) on the
/// connections `incoming` yields, until `signal` completes and the calls in flight finish.
///
/// The HTTP/2 server is the router's own ([`crate::ingress::connection`]): `ModelInfer` is
/// answered on it directly; every other call goes to these routes.
async fn serve_connections<H: Health, I>(
    state: Arc<RouterState>,
    health: HealthServer<H>,
    incoming: I,
    signal: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    I: Stream<Item = std::io::Result<TcpStream>>,
{
    connection::serve(services(state, health), incoming, signal).await;
    Ok(())
}

/// What the router serves: `ModelInfer` on the server's direct path, and routes for the rest
/// (health, the other OIP methods, background calls, pass-through by model header for any
/// other call).
pub(crate) fn services<H: Health>(state: Arc<RouterState>, health: HealthServer<H>) -> Services {
    let oip = OipRoutes::new(state.clone());
    // Everything the router does not serve itself is passed through by model header.
    let passthrough = {
        let state = state.clone();
        tower::service_fn(move |req: http::Request<axum::body::Body>| {
            let state = state.clone();
            async move {
                Ok::<_, std::convert::Infallible>(
                    crate::ingress::passthrough::forward(state, req).await,
                )
            }
        })
    };
    let routes = tonic::service::Routes::new(health)
        .add_service(oip)
        .add_service(crate::ingress::tasks::TaskService::server(state.clone()))
        .into_axum_router()
        .fallback_service(passthrough);
    // The server applies the inbound size limit (`state.max_message_size`) to every call.
    Services::new(state, routes.into())
}
