//! `fulcrum up`: the whole system on one machine — a control plane on an embedded store,
//! a router per region, and simulated nodes in both regions — until Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use fulcrum_control_plane::health::Thresholds;
use fulcrum_control_plane::health::prober::ProbeConfig;
use fulcrum_control_plane::{AdminAuth, ControlPlaneConfig};
use fulcrum_data_plane::RouterConfig;
use fulcrum_proto::fulcrum::v1::admin_client::AdminClient;
use fulcrum_proto::fulcrum::v1::{
    DeregisterNodeRequest, ListNodesRequest, Model, NodeSpec, RegisterNodeRequest,
};
use fulcrum_proto::inference::ServerReadyRequest;
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_sim::node::{NodeSim, NodeSimConfig, ServiceTime};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The two regions of the local stack.
const REGIONS: [&str; 2] = ["a", "b"];

/// Probe interval of the local stack: twice the production default, so that killing a node
/// in the demo shows failover within about a second.
const UP_PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// How long to wait for the stack to become ready before giving up.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Flags of `fulcrum up`.
#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Control plane on this port, routers on the next two, nodes of region a from
    /// port + 101 and of region b from port + 201.
    #[arg(long, default_value_t = 7000)]
    base_port: u16,
    /// Where the embedded store keeps its file.
    #[arg(long, default_value = ".fulcrum/up")]
    state_dir: PathBuf,
    /// Simulated nodes per region.
    #[arg(long, default_value_t = 3)]
    nodes_per_region: u16,
    /// Service time of the simulated nodes.
    #[arg(long, default_value = "exp:2ms")]
    service_time: ServiceTime,
    /// Concurrency slots of each simulated node.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Make both routers check callers' tokens (JWT) signed with a secret of this file, one per
    /// line (`fulcrum token --secret-file FILE --sub me` signs one). Default: no check.
    #[arg(long, value_name = "FILE")]
    jwt_secret_file: Option<PathBuf>,
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

async fn bind(port: u16, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr(port)).await.with_context(|| {
        format!("cannot listen on 127.0.0.1:{port} for {what} (is another `fulcrum up` running?)")
    })
}

/// Metrics ports are ten above their server's: the control plane (base) has its metrics on
/// base + 10, routers (base + 1 and + 2) on base + 11 and + 12, clear of the nodes (base + 101
/// on).
const METRICS_OFFSET: u16 = 10;

pub(crate) async fn run(args: UpArgs) -> anyhow::Result<()> {
    let base = args.base_port;
    if base > u16::MAX - 200 - args.nodes_per_region {
        bail!("--base-port {base} leaves no room for the node ports");
    }
    // The routers' token check, if asked for: read first, so a bad file starts nothing.
    let auth = match &args.jwt_secret_file {
        Some(file) => Some(std::sync::Arc::new(
            fulcrum_data_plane::auth::CallerAuth::load(fulcrum_data_plane::auth::AuthConfig {
                secret_files: vec![file.clone()],
                ..Default::default()
            })?,
        )),
        None => None,
    };
    // What `up` itself presents to its routers while it waits for them to be ready.
    let probe_token = match &args.jwt_secret_file {
        Some(file) => Some(super::token::sign(
            file,
            &fulcrum_data_plane::auth::NewToken {
                subject: "fulcrum-up".into(),
                valid_for: READY_DEADLINE * 2,
                ..Default::default()
            },
        )?),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = JoinSet::new();

    // Control plane on the embedded store.
    let store_path = args.state_dir.join("store.json");
    let store = fulcrum_control_plane::store::open(&format!("embedded:{}", store_path.display()))
        .await
        .with_context(|| format!("opening the embedded store at {}", store_path.display()))?;
    let control = bind(base, "the control plane").await?;
    let control_metrics = bind(base + METRICS_OFFSET, "the control plane's metrics").await?;
    // One machine: the admin API trusts loopback, so `fulcrum ctl` works with no flags.
    let mut config = ControlPlaneConfig::new("control-up", AdminAuth::Loopback(None));
    config.probe = ProbeConfig {
        interval: UP_PROBE_INTERVAL,
        timeout: UP_PROBE_INTERVAL,
        thresholds: Thresholds::default(),
        ..ProbeConfig::default()
    };
    tasks.spawn(fulcrum_control_plane::serve_with_metrics(
        config,
        store,
        control,
        Some(control_metrics),
        stopped(),
    ));

    // Simulated nodes.
    let mut specs = Vec::new();
    for (r, region) in REGIONS.iter().enumerate() {
        for i in 1..=args.nodes_per_region {
            let id = format!("{region}-{i}");
            let port = base + 101 + 100 * r as u16 + (i - 1);
            let sim = NodeSim::new(NodeSimConfig {
                name: id.clone(),
                service_time: args.service_time,
                slots: args.slots,
                ..Default::default()
            })?;
            let listener = bind(port, &format!("node {id}")).await?;
            tasks.spawn(sim.serve(listener, stopped()));
            specs.push(NodeSpec {
                id,
                address: addr(port),
                region: (*region).into(),
                zone: String::new(),
                models: vec![Model {
                    name: "echo".into(),
                    versions: vec![],
                }],
                capacity: args.slots as i64,
                labels: Default::default(),
            });
        }
    }

    // Routers.
    for (r, region) in REGIONS.iter().enumerate() {
        let port = base + 1 + r as u16;
        let listener = bind(port, &format!("router {region}")).await?;
        let metrics = bind(port + METRICS_OFFSET, &format!("router {region}'s metrics")).await?;
        let mut config = RouterConfig::new(*region, vec![addr(base)]);
        config.router_id = format!("router-{region}");
        config.auth.clone_from(&auth);
        tasks.spawn(fulcrum_data_plane::serve_with_metrics(
            config,
            listener,
            Some(metrics),
            stopped(),
        ));
    }

    // Register the nodes as an operator would, through the admin API.
    let mut admin = connect_admin(&addr(base)).await?;
    for spec in &specs {
        admin
            .register_node(RegisterNodeRequest {
                spec: Some(spec.clone()),
            })
            .await
            .map_err(|s| anyhow::anyhow!("registering {}: {}", spec.id, s.message()))?;
    }
    // The store outlives runs: forget nodes an earlier run registered that this one does not.
    let listed = admin
        .list_nodes(ListNodesRequest::default())
        .await
        .map_err(|s| anyhow::anyhow!("listing nodes: {}", s.message()))?
        .into_inner();
    for old in listed
        .nodes
        .iter()
        .filter_map(|n| n.endpoint.as_ref()?.spec.as_ref())
    {
        if !specs.iter().any(|s| s.id == old.id) {
            admin
                .deregister_node(DeregisterNodeRequest { id: old.id.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("deregistering {}: {}", old.id, s.message()))?;
        }
    }
    for (r, region) in REGIONS.iter().enumerate() {
        wait_ready(&addr(base + 1 + r as u16), region, probe_token.as_deref()).await?;
    }

    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| {
            let cwd = std::env::current_dir().ok()?;
            Some(
                p.strip_prefix(&cwd)
                    .map(|r| format!("./{}", r.display()))
                    .unwrap_or_else(|_| p.display().to_string()),
            )
        })
        .unwrap_or_else(|| "fulcrum".into());
    outln!(
        "Fulcrum is up: two regions on this machine (embedded store: {})",
        store_path.display()
    );
    outln!();
    outln!(
        "  control plane  {}    admin API + routing stream; metrics http://{}/metrics",
        addr(base),
        addr(base + METRICS_OFFSET)
    );
    for (r, region) in REGIONS.iter().enumerate() {
        let nodes: Vec<String> = specs
            .iter()
            .filter(|s| s.region == *region)
            .map(|s| format!("{} {}", s.id, s.address))
            .collect();
        outln!(
            "  router {region}       {}    Open Inference Protocol (gRPC); metrics http://{}/metrics",
            addr(base + 1 + r as u16),
            addr(base + 1 + r as u16 + METRICS_OFFSET)
        );
        outln!("  nodes {region}        {}", nodes.join(", "));
    }
    outln!();
    // `fulcrum ctl` talks to 127.0.0.1:7000 by default; say where the control plane is otherwise.
    let control_flag = if base == 7000 {
        String::new()
    } else {
        format!(" --control {}", addr(base))
    };
    outln!("Try:");
    outln!("  {exe} ctl{control_flag} nodes");
    match &args.jwt_secret_file {
        Some(file) => {
            outln!(
                "  {exe} load --target {} --model echo --rps 200 --duration 5s --header \"authorization=Bearer $({exe} token --secret-file {} --sub me)\"",
                addr(base + 1),
                file.display()
            );
            outln!("  (the routers check tokens: calls without one are refused UNAUTHENTICATED)");
        }
        None => outln!(
            "  {exe} load --target {} --model echo --rps 200 --duration 5s",
            addr(base + 1)
        ),
    }
    outln!(
        "  {exe} ctl{control_flag} drain a-1        (and a-2, a-3: router a then serves from region b)"
    );
    outln!();
    outln!("Ctrl-C stops everything.");

    tokio::select! {
        () = crate::shutdown_signal() => {}
        Some(res) = tasks.join_next() => {
            // A component ended on its own: that is a failure of the whole stack.
            let _ = stop_tx.send(true);
            match res {
                Ok(Ok(())) => bail!("a component stopped unexpectedly"),
                Ok(Err(e)) => bail!("a component failed: {e}"),
                Err(e) => bail!("a component panicked: {e}"),
            }
        }
    }
    // The stack stops cleanly whether or not anyone still reads its output.
    let _ = super::write_line(format_args!("stopping…"));
    let _ = stop_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    Ok(())
}

async fn connect_admin(addr: &str) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    let end = tokio::time::Instant::now() + READY_DEADLINE;
    loop {
        match AdminClient::connect(format!("http://{addr}")).await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() >= end => {
                bail!("the control plane at {addr} did not come up: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Waits until the router at `addr` is ready (`ServerReady`, with `token` when its router checks
/// tokens).
async fn wait_ready(addr: &str, region: &str, token: Option<&str>) -> anyhow::Result<()> {
    let end = tokio::time::Instant::now() + READY_DEADLINE;
    loop {
        let mut request = tonic::Request::new(ServerReadyRequest {});
        if let Some(v) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
            request.metadata_mut().insert("authorization", v);
        }
        if let Ok(mut c) = GrpcInferenceServiceClient::connect(format!("http://{addr}")).await
            && let Ok(r) = c.server_ready(request).await
            && r.get_ref().ready
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= end {
            bail!("router {region} at {addr} was not ready within {READY_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
