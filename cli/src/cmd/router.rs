//! `fulcrum router`: one router (data plane) for one region.

use anyhow::Context;
use clap::Args;
use fulcrum_data_plane::RouterConfig;
use fulcrum_data_plane::table::LoadView;

/// Flags of `fulcrum router`.
#[derive(Debug, Args)]
pub(crate) struct RouterArgs {
    /// The region (data center) this router serves; its nodes are preferred.
    #[arg(long)]
    region: String,
    /// Control-plane replicas, comma-separated host:port, tried in order.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7000")]
    control: Vec<String>,
    /// Address to serve the Open Inference Protocol on.
    #[arg(long, default_value = "127.0.0.1:8001")]
    listen: String,
    /// Largest inbound message, in bytes.
    #[arg(long, default_value_t = fulcrum_data_plane::limits::DEFAULT_MAX_MESSAGE_SIZE)]
    max_message_size: usize,
    /// Router id reported to the control plane (default: router-REGION-PID).
    #[arg(long)]
    id: Option<String>,
    /// Serving threads, each a single-threaded runtime serving its share of the client
    /// connections (0: one per core this process may run on).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// How long each serving thread keeps polling its sockets after a call rather than going
    /// to sleep (e.g. `200us`; 0: never). Lower latency where waking a thread is dear (virtual
    /// machines), for CPU: a thread polls all through its calls and this long after each.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    busy_poll: std::time::Duration,
    /// Address to serve Prometheus metrics on (`GET /metrics`); none by default.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Where node weights come from: `global`, the control plane's weights (capacity and
    /// health folded with the load every router reports); `local`, each node's capacity (the
    /// router balances on its own calls in flight and latency only; unhealthy, drained and
    /// cordoned nodes still get nothing).
    #[arg(long, default_value = "global")]
    load_view: LoadView,
    /// Size of the response cache, in MiB, for the models whose policy caches answers
    /// (`ctl policy set M --cache-ttl 30s`); 0 keeps nothing.
    #[arg(long, default_value_t = fulcrum_data_plane::cache::DEFAULT_CACHE_BYTES >> 20)]
    cache_mib: u64,
    /// Token presented to the control plane on the routing stream (the control plane's
    /// --stream-token); not needed when the control plane trusts this machine (loopback). Of a
    /// comma-separated list (a rotation's `new,old`), the first is presented.
    #[arg(long, env = "FULCRUM_STREAM_TOKEN", hide_env_values = true, value_parser = crate::cmd::presented_token)]
    stream_token: Option<String>,
}

impl RouterArgs {
    pub(crate) fn config(&self) -> RouterConfig {
        let mut c = RouterConfig::new(self.region.clone(), self.control.clone());
        c.max_message_size = self.max_message_size;
        c.threads = self.threads;
        c.busy_poll = self.busy_poll;
        c.load_view = self.load_view;
        c.cache_bytes = self.cache_mib.saturating_mul(1 << 20);
        c.stream_token = self.stream_token.clone();
        if let Some(id) = &self.id {
            c.router_id = id.clone();
        }
        c
    }
}

pub(crate) async fn run(args: RouterArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let metrics = crate::cmd::bind_metrics(args.metrics_listen.as_deref()).await?;
    tracing::info!(listen = %args.listen, region = %args.region, control = ?args.control,
        load_view = %args.load_view, metrics = ?args.metrics_listen, "router serving");
    fulcrum_data_plane::serve_with_metrics(
        args.config(),
        listener,
        metrics,
        crate::shutdown_signal(),
    )
    .await?;
    Ok(())
}
