//! Control planes, routers and node-sims, each on its own loopback port, wired together the way
//! `fulcrum up` and a real deployment wire them: nodes registered through the admin API, routers
//! subscribed to the control plane.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use fulcrum_control_plane::health::Thresholds;
use fulcrum_control_plane::health::prober::ProbeConfig;
use fulcrum_control_plane::{AdminAuth, ControlPlaneConfig};
use fulcrum_data_plane::RouterConfig;
use fulcrum_proto::fulcrum::v1::admin_client::AdminClient;
use fulcrum_proto::fulcrum::v1::{
    GetNodeRequest, GetRoutingRequest, GetStatusRequest, HealthState, Model, ModelPolicy, NodeSpec,
    NodeStatus, RegisterNodeRequest,
};
use fulcrum_proto::inference::ServerReadyRequest;
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_sim::node::{NodeSimConfig, RunningNodeSim};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::etcd::Etcd;

/// A server running on a tokio task until stopped (or dropped).
#[derive(Debug)]
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    /// Binds a free loopback port and runs `serve(listener, shutdown)` on a task.
    pub async fn spawn<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self::spawn_at("127.0.0.1:0".parse().expect("loopback"), serve).await
    }

    /// Binds `addr` and runs `serve(listener, shutdown)` on a task.
    pub async fn spawn_at<F, Fut>(addr: SocketAddr, serve: F) -> Self
    where
        F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(addr).await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, stopped));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Shuts the server down and waits (briefly) for it to finish.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(mut t) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut t)
                .await
                .is_err()
        {
            t.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Probe settings for tests: fast, so failover happens in a fraction of a second, with the
/// production thresholds so flapping rules are exercised as shipped.
pub fn fast_probes() -> ProbeConfig {
    ProbeConfig {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        thresholds: Thresholds::default(),
        ..ProbeConfig::default()
    }
}

/// Starts a control-plane replica on `store_url` (an `etcd://` URL, or `memory:`).
pub async fn control_plane(store_url: &str) -> Running {
    control_plane_with(store_url, AdminAuth::Loopback(None)).await
}

/// Starts a control-plane replica on `store_url` with the given admin credentials.
pub async fn control_plane_with(store_url: &str, auth: AdminAuth) -> Running {
    control_plane_at("127.0.0.1:0".parse().expect("loopback"), store_url, auth).await
}

/// Starts a control-plane replica listening on `addr` (to restart one on the same address).
pub async fn control_plane_at(addr: SocketAddr, store_url: &str, auth: AdminAuth) -> Running {
    control_plane_configured(addr, store_url, auth, |_| {}).await
}

/// Starts a control-plane replica listening on `addr` (port 0: any) with the given admin
/// credentials, fast probes, and whatever else `configure` changes in its configuration.
pub async fn control_plane_configured(
    addr: SocketAddr,
    store_url: &str,
    auth: AdminAuth,
    configure: impl FnOnce(&mut ControlPlaneConfig) + Send + 'static,
) -> Running {
    let store = fulcrum_control_plane::store::open(store_url)
        .await
        .expect("open store");
    Running::spawn_at(addr, move |listener, stopped| async move {
        let id = format!("control-{}", listener.local_addr().expect("local addr"));
        let mut config = ControlPlaneConfig::new(id, auth);
        config.probe = fast_probes();
        configure(&mut config);
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(e) = fulcrum_control_plane::serve(config, store, listener, shutdown).await {
            panic!("control plane failed: {e}");
        }
    })
    .await
}

/// The smallest stack most tests start from: a real etcd, a control plane on it, an admin
/// client, and one node-sim registered as node `a-1` in region `a`, serving model `echo`.
/// Fields drop in the order they are declared, node first and etcd last, as locals would.
#[derive(Debug)]
pub struct OneNode {
    /// The node-sim `a-1`.
    pub node: RunningNodeSim,
    /// An admin client for the control plane.
    pub admin: AdminClient<Channel>,
    /// The control plane.
    pub cp: Running,
    /// The etcd the control plane stores its state in.
    pub etcd: Etcd,
}

/// Starts [`OneNode`]: `sim` runs as node `a-1` (its name is set here) and is registered with
/// `capacity` concurrent calls.
pub async fn one_node(sim: NodeSimConfig, capacity: i64) -> OneNode {
    let etcd = Etcd::start().await;
    let cp = control_plane(&etcd.url()).await;
    let mut admin = admin(cp.addr).await;
    let node = fulcrum_sim::node::spawn(
        NodeSimConfig {
            name: "a-1".into(),
            ..sim
        },
        "127.0.0.1:0".parse().expect("loopback"),
    )
    .await
    .expect("start node-sim a-1");
    register(&mut admin, spec("a-1", node.addr, "a", &["echo"], capacity)).await;
    OneNode {
        node,
        admin,
        cp,
        etcd,
    }
}

/// Starts a router for `region` following the control plane at `control`.
pub async fn router(region: &str, control: SocketAddr, max_message_size: Option<usize>) -> Running {
    router_following(region, &[control], max_message_size).await
}

/// Starts a router for `region` following the control-plane replicas `control`, in order.
pub async fn router_following(
    region: &str,
    control: &[SocketAddr],
    max_message_size: Option<usize>,
) -> Running {
    router_configured(region, control, move |c| {
        if let Some(m) = max_message_size {
            c.max_message_size = m;
        }
    })
    .await
}

/// Starts a router for `region` following `control`, with whatever `configure` changes in its
/// configuration.
pub async fn router_configured(
    region: &str,
    control: &[SocketAddr],
    configure: impl FnOnce(&mut RouterConfig),
) -> Running {
    let control = control.iter().map(ToString::to_string).collect();
    let mut config = RouterConfig::new(region, control);
    configure(&mut config);
    Running::spawn(move |listener, stopped| async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(e) = fulcrum_data_plane::serve(config, listener, shutdown).await {
            panic!("router failed: {e}");
        }
    })
    .await
}

/// Starts a router for `region` following `control` and serving its Prometheus metrics;
/// returns it and the metrics address.
pub async fn router_with_metrics(region: &str, control: SocketAddr) -> (Running, SocketAddr) {
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let metrics_addr = metrics.local_addr().expect("metrics address");
    let config = RouterConfig::new(region, vec![control.to_string()]);
    let router = Running::spawn(move |listener, stopped| async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(e) =
            fulcrum_data_plane::serve_with_metrics(config, listener, Some(metrics), shutdown).await
        {
            panic!("router failed: {e}");
        }
    })
    .await;
    (router, metrics_addr)
}

/// An admin client for the control plane at `addr`.
pub async fn admin(addr: SocketAddr) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://{addr}"))
        .await
        .expect("connect admin")
}

/// An Open Inference Protocol client for `addr` (a router or a node).
pub async fn oip(addr: SocketAddr) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect OIP")
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20)
}

/// A node spec serving `models`.
pub fn spec(id: &str, addr: SocketAddr, region: &str, models: &[&str], capacity: i64) -> NodeSpec {
    NodeSpec {
        id: id.into(),
        address: addr.to_string(),
        region: region.into(),
        zone: String::new(),
        models: models
            .iter()
            .map(|m| Model {
                name: (*m).into(),
                versions: vec![],
            })
            .collect(),
        capacity,
        labels: Default::default(),
    }
}

/// Registers a node through the admin API, panicking on refusal.
pub async fn register(admin: &mut AdminClient<Channel>, spec: NodeSpec) {
    admin
        .register_node(RegisterNodeRequest { spec: Some(spec) })
        .await
        .expect("register node");
}

/// Waits until the router at `addr` reports ready (it holds a table with a routable node).
pub async fn wait_ready(addr: SocketAddr) {
    let client = oip(addr).await;
    crate::eventually("router ready", Duration::from_secs(20), || {
        let mut c = client.clone();
        async move {
            let r = c.server_ready(ServerReadyRequest {}).await.ok()?;
            r.get_ref().ready.then_some(())
        }
    })
    .await;
}

/// Waits until the control plane at `admin` publishes a routing table that carries every one of
/// `policies` as it is (a policy just set, say) and every router has applied that table.
///
/// It looks for the policies themselves, not just for a newer version: a node's health or load
/// can bump the version before the store's watch brings the policy to the control loop. A
/// policy's `cache_epoch` is the control plane's to set: one of 0 matches any (a policy as the
/// caller sent it), another only itself (a policy as `SetModelPolicy` or `FlushModelCache`
/// returned it).
pub async fn wait_policies_applied(admin: &AdminClient<Channel>, policies: &[ModelPolicy]) {
    let carries = |table: &[ModelPolicy], p: &ModelPolicy| {
        table.iter().any(|t| {
            t == p
                || (p.cache_epoch == 0
                    && ModelPolicy {
                        cache_epoch: 0,
                        ..t.clone()
                    } == *p)
        })
    };
    crate::eventually(
        "the routers applied a table with the policies",
        Duration::from_secs(20),
        || {
            let mut a = admin.clone();
            async move {
                let table = a.get_routing(GetRoutingRequest {}).await.ok()?.into_inner();
                if !policies.iter().all(|p| carries(&table.policies, p)) {
                    return None;
                }
                let s = a.get_status(GetStatusRequest {}).await.ok()?.into_inner();
                (!s.routers.is_empty()
                    && s.routers.iter().all(|r| r.acked_version >= table.version))
                .then_some(())
            }
        },
    )
    .await;
}

/// Waits until node `id` is healthy with `model` ready in the routing table, and every router
/// has applied that table: calls for `model` can be routed to it.
pub async fn wait_serving(admin: &AdminClient<Channel>, id: &str, model: &str) {
    wait_applied(admin, id, |n| {
        n.endpoint.as_ref().is_some_and(|e| {
            e.health() == HealthState::Healthy && e.ready_models.iter().any(|m| m == model)
        })
    })
    .await;
}

/// Waits until `check` holds for node `id` as the control plane at `admin` reports it, and
/// every router has applied the control plane's current table.
pub async fn wait_applied(
    admin: &AdminClient<Channel>,
    id: &str,
    check: impl Fn(&NodeStatus) -> bool,
) {
    let what = format!("the routers applied the change to {id}");
    crate::eventually(&what, Duration::from_secs(20), || {
        let mut a = admin.clone();
        let id = id.to_owned();
        let check = &check;
        async move {
            let n = a.get_node(GetNodeRequest { id }).await.ok()?.into_inner();
            let s = a.get_status(GetStatusRequest {}).await.ok()?.into_inner();
            (check(&n)
                && !s.routers.is_empty()
                && s.routers
                    .iter()
                    .all(|r| r.acked_version >= s.routing_version))
            .then_some(())
        }
    })
    .await;
}

/// A router's token check over one HMAC secret, kept in a file of a temporary folder (which
/// lives as long as this does).
#[derive(Debug)]
pub struct TokenCheck {
    /// The check, for [`RouterConfig::auth`].
    pub auth: std::sync::Arc<fulcrum_data_plane::auth::CallerAuth>,
    /// The secrets file it reads (write it again to rotate).
    pub secrets: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A token check that accepts tokens signed with `secret`.
pub fn token_check(secret: &str) -> TokenCheck {
    use fulcrum_data_plane::auth::{AuthConfig, CallerAuth};
    let dir = tempfile::tempdir().expect("a temporary folder");
    let secrets = dir.path().join("secrets");
    std::fs::write(&secrets, format!("{secret}\n")).expect("write the secrets file");
    let auth = CallerAuth::load(AuthConfig {
        secret_files: vec![secrets.clone()],
        ..Default::default()
    })
    .expect("a usable secret");
    TokenCheck {
        auth: std::sync::Arc::new(auth),
        secrets,
        _dir: dir,
    }
}

/// Sets each of the `refused` policies (with what its refusal must say) and checks that the
/// control plane refuses it INVALID_ARGUMENT saying so, and that the model's policy stored
/// before, `kept`, is still the one stored: bad input changes nothing.
pub async fn assert_policies_refused(
    admin: &AdminClient<Channel>,
    kept: &ModelPolicy,
    refused: Vec<(ModelPolicy, &str)>,
) {
    let mut admin = admin.clone();
    for (bad, says) in refused {
        let err = admin
            .set_model_policy(bad.clone())
            .await
            .expect_err(&format!("accepted {bad:?}"));
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
    }
    let stored = admin
        .get_model_policy(fulcrum_proto::fulcrum::v1::GetModelPolicyRequest {
            model: kept.model.clone(),
        })
        .await
        .expect("the model's policy")
        .into_inner();
    assert_eq!(&stored, kept);
}
