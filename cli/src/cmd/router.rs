//! `fulcrum router`: one router (data plane) for one region.

use anyhow::Context;
use clap::Args;
use std::sync::Arc;

use fulcrum_data_plane::RouterConfig;
use fulcrum_data_plane::auth::{AuthConfig, CallerAuth};
use fulcrum_data_plane::shared_cache::SharedCacheSetup;
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
    /// Router id reported to the control plane, and named in the ids of its background calls
    /// (default: router-REGION-PID).
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
    /// A second, shared level for the response cache: a Redis every router of the fleet names
    /// (`redis://[:password@]host:port[/db]`, `rediss://` for TLS). A router that does not hold
    /// an answer asks it before a node, and keeps there what nodes answer. Needs
    /// --cache-secret-file.
    #[arg(long, value_name = "URL", requires = "cache_secret_file")]
    cache_redis: Option<String>,
    /// The secret every router sharing --cache-redis holds (a file; at least 16 bytes, 32
    /// random ones say), from which the cache's keys are derived, so that they agree on every
    /// key and no caller can work one out.
    #[arg(long, value_name = "FILE", requires = "cache_redis")]
    cache_secret_file: Option<std::path::PathBuf>,
    /// Token presented to the control plane on the routing stream (the control plane's
    /// --stream-token); not needed when the control plane trusts this machine (loopback). Of a
    /// comma-separated list (a rotation's `new,old`), the first is presented.
    #[arg(long, env = "FULCRUM_STREAM_TOKEN", hide_env_values = true, value_parser = crate::cmd::presented_token)]
    stream_token: Option<String>,
    /// Check callers' tokens (JWT): a file of HMAC secrets (HS256/384/512), one per line
    /// (several while one is rotated). Repeatable. With any key given, every call but a health
    /// check needs `authorization: Bearer <token>`. Files are read again every few seconds.
    #[arg(long = "jwt-secret-file", value_name = "FILE")]
    jwt_secret_files: Vec<std::path::PathBuf>,
    /// Check callers' tokens (JWT): a file holding one public key in PEM (RSA, EC or Ed25519) or
    /// a JWKS. Repeatable.
    #[arg(long = "jwt-key-file", value_name = "FILE")]
    jwt_key_files: Vec<std::path::PathBuf>,
    /// Accept tokens from this issuer (`iss`) only; repeatable (any of them). Default: any.
    #[arg(long = "jwt-issuer", value_name = "ISS")]
    jwt_issuers: Vec<String>,
    /// Accept tokens for this audience (`aud`) only; repeatable (any of them). Default: `aud`
    /// is not checked.
    #[arg(long = "jwt-audience", value_name = "AUD")]
    jwt_audiences: Vec<String>,
    /// Pass callers' `authorization` headers on to nodes (for nodes that check tokens
    /// themselves); by default the router keeps them.
    #[arg(long)]
    jwt_forward_token: bool,
    /// Most background calls (`fulcrum.v1.Tasks`) held at once, running or ended and kept for
    /// fetching; a submission beyond it is refused RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = fulcrum_data_plane::tasks::DEFAULT_MAX_TASKS)]
    max_tasks: usize,
    /// Memory background calls may hold, in MiB (requests running, answers kept); a
    /// submission beyond it is refused RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = fulcrum_data_plane::tasks::DEFAULT_MAX_BYTES >> 20)]
    task_mib: u64,
    /// Where other routers reach this one (host:port), to fetch the background calls it holds
    /// for their callers. Default: --listen, unless it is a wildcard address (0.0.0.0, [::]).
    #[arg(long)]
    advertise: Option<String>,
    /// How long an ended background call's outcome is kept for its caller to fetch.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    task_keep: std::time::Duration,
}

impl RouterArgs {
    /// The token checks the flags ask for, if any; their key files read (an error says which
    /// cannot be used).
    fn auth(&self) -> anyhow::Result<Option<Arc<CallerAuth>>> {
        let config = AuthConfig {
            secret_files: self.jwt_secret_files.clone(),
            key_files: self.jwt_key_files.clone(),
            issuers: self.jwt_issuers.clone(),
            audiences: self.jwt_audiences.clone(),
            forward_token: self.jwt_forward_token,
        };
        if !config.is_enabled() {
            anyhow::ensure!(
                config.issuers.is_empty() && config.audiences.is_empty() && !config.forward_token,
                "--jwt-issuer, --jwt-audience and --jwt-forward-token need keys: give --jwt-secret-file or --jwt-key-file"
            );
            return Ok(None);
        }
        Ok(Some(Arc::new(CallerAuth::load(config)?)))
    }

    /// The cache's shared level the flags ask for, if any (an error says what is wrong: the
    /// secret file, or the URL). Must run on the runtime that then serves.
    fn shared_cache(&self) -> anyhow::Result<Option<SharedCacheSetup>> {
        let (Some(url), Some(file)) = (&self.cache_redis, &self.cache_secret_file) else {
            return Ok(None);
        };
        let secret = std::fs::read(file)
            .with_context(|| format!("reading the cache secret {}", file.display()))?;
        let setup = SharedCacheSetup::new(url, &secret).with_context(|| {
            format!("--cache-redis with --cache-secret-file {}", file.display())
        })?;
        Ok(Some(setup))
    }

    pub(crate) fn config(&self) -> RouterConfig {
        let mut c = RouterConfig::new(self.region.clone(), self.control.clone());
        c.max_message_size = self.max_message_size;
        c.threads = self.threads;
        c.busy_poll = self.busy_poll;
        c.load_view = self.load_view;
        c.cache_bytes = self.cache_mib.saturating_mul(1 << 20);
        c.stream_token = self.stream_token.clone();
        c.task_limits = fulcrum_data_plane::tasks::TaskLimits {
            max_tasks: self.max_tasks,
            max_bytes: self.task_mib.saturating_mul(1 << 20),
            keep: self.task_keep,
        };
        c.advertise.clone_from(&self.advertise);
        if let Some(id) = &self.id {
            c.router_id = id.clone();
        }
        c
    }
}

pub(crate) async fn run(args: RouterArgs) -> anyhow::Result<()> {
    // Keys first: a router that cannot check tokens must not start serving without them.
    let auth = args.auth()?;
    let shared_cache = args.shared_cache()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let metrics = crate::cmd::bind_metrics(args.metrics_listen.as_deref()).await?;
    let mut config = args.config();
    config.auth = auth;
    config.shared_cache = shared_cache;
    tracing::info!(listen = %args.listen, region = %args.region, control = ?args.control,
        load_view = %args.load_view, metrics = ?args.metrics_listen,
        token_keys = config.auth.as_ref().map_or(0, |a| a.key_count()), "router serving");
    fulcrum_data_plane::serve_with_metrics(config, listener, metrics, crate::shutdown_signal())
        .await?;
    Ok(())
}
