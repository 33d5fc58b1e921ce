//! `fulcrum node-sim`: a simulated Open Inference Protocol node, optionally registering itself
//! with the control plane (`--register`).

use std::collections::HashMap;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use clap::Args;
use fulcrum_proto::fulcrum::v1::{Model, NodeSpec};
use fulcrum_sim::node::{NodeSim, NodeSimConfig, ServiceTime};
use fulcrum_sim::register::{RegisterConfig, Registrar};

/// Flags of `fulcrum node-sim`.
#[derive(Debug, Args)]
pub(crate) struct NodeSimArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: String,
    /// Node name (reported in ServerMetadata and x-fulcrum-sim-node).
    #[arg(long, default_value = "sim")]
    name: String,
    /// Models served (each echoes its inputs), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "echo")]
    models: Vec<String>,
    /// Service time: const:5ms, exp:5ms (exponential, mean) or lognormal:5ms,0.5 (median, sigma).
    #[arg(long, default_value = "const:1ms")]
    service_time: ServiceTime,
    /// Calls served at once.
    #[arg(long, default_value_t = 4)]
    slots: usize,
    /// Calls that may wait for a slot before the node sheds with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Share of calls failing with UNAVAILABLE, in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    error_ratio: f64,
    /// Share of calls that never answer, in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    hang_ratio: f64,
    /// Seed for reproducible random draws.
    #[arg(long)]
    seed: Option<u64>,
    /// Register with the control plane at this address (host:port; several, comma-separated,
    /// are tried in turn) and report load to it; the node leaves the registry when it stops.
    #[arg(long, value_delimiter = ',', value_name = "CONTROL_ADDR")]
    register: Vec<String>,
    /// Region to register in (required with --register).
    #[arg(long, requires = "register")]
    region: Option<String>,
    /// Zone to register in.
    #[arg(long, requires = "register")]
    zone: Option<String>,
    /// Id to register as (default: --name).
    #[arg(long, requires = "register")]
    id: Option<String>,
    /// Capacity to register with, in concurrent calls (default: --slots).
    #[arg(long, requires = "register")]
    capacity: Option<i64>,
    /// Address routers and probes reach this node at (default: the address it listens on,
    /// which must then be a specific one, not 0.0.0.0).
    #[arg(long, requires = "register", value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Token presented to the control plane when registering (its --stream-token); not needed
    /// when the control plane trusts this machine (loopback). Unused without --register. Of a
    /// comma-separated list (a rotation's `new,old`), the first is presented.
    #[arg(
        long,
        env = "FULCRUM_STREAM_TOKEN",
        hide_env_values = true,
        value_parser = crate::cmd::presented_token
    )]
    stream_token: Option<String>,
    /// Label to register with, KEY=VALUE (repeatable).
    #[arg(long = "label", requires = "register", value_name = "KEY=VALUE")]
    labels: Vec<String>,
}

impl NodeSimArgs {
    pub(crate) fn config(&self) -> NodeSimConfig {
        NodeSimConfig {
            name: self.name.clone(),
            models: self.models.clone(),
            service_time: self.service_time,
            slots: self.slots,
            queue: self.queue,
            error_ratio: self.error_ratio,
            hang_ratio: self.hang_ratio,
            seed: self.seed,
        }
    }

    /// The spec `--register` registers, for a node listening on `local`.
    fn spec(&self, local: SocketAddr) -> anyhow::Result<NodeSpec> {
        let Some(region) = self.region.clone() else {
            bail!("--register needs --region");
        };
        let address = match &self.advertise {
            Some(a) => a.clone(),
            None if local.ip().is_unspecified() => bail!(
                "listening on {local}, which other machines cannot dial: pass --advertise HOST:PORT"
            ),
            None => local.to_string(),
        };
        let mut labels = HashMap::new();
        for l in &self.labels {
            let Some((k, v)) = l.split_once('=') else {
                bail!("--label {l:?}: expected KEY=VALUE");
            };
            labels.insert(k.to_owned(), v.to_owned());
        }
        Ok(NodeSpec {
            id: self.id.clone().unwrap_or_else(|| self.name.clone()),
            address,
            region,
            zone: self.zone.clone().unwrap_or_default(),
            models: self
                .models
                .iter()
                .map(|m| Model {
                    name: m.clone(),
                    versions: vec![],
                })
                .collect(),
            capacity: self
                .capacity
                .unwrap_or_else(|| i64::try_from(self.slots).unwrap_or(i64::MAX)),
            labels,
        })
    }
}

pub(crate) async fn run(args: NodeSimArgs) -> anyhow::Result<()> {
    let sim = NodeSim::new(args.config())?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, name = %args.name, service_time = %args.service_time, "node-sim serving");
    if args.register.is_empty() {
        sim.serve(listener, crate::shutdown_signal()).await?;
        return Ok(());
    }
    let spec = args.spec(listener.local_addr()?)?;
    let mut register = RegisterConfig::new(args.register.clone(), spec);
    register.token = args.stream_token.clone();
    let mut registrar = Registrar::spawn(register, sim.controls());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(sim.serve(listener, async {
        let _ = stopped.await;
    }));
    let outcome = tokio::select! {
        () = crate::shutdown_signal() => Ok(()),
        refused = registrar.wait() => refused.context("registering"),
        served = &mut server => return Ok(served??),
    };
    // Leave the registry first, so that routers stop sending calls, then finish serving.
    if let Err(e) = registrar.stop().await {
        tracing::warn!(error = %e, "deregistering");
    }
    let _ = stop.send(());
    server.await??;
    outcome
}
