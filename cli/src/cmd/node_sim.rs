//! `fulcrum node-sim`: a simulated Open Inference Protocol node.

use anyhow::Context;
use clap::Args;
use fulcrum_sim::node::{NodeSim, NodeSimConfig, ServiceTime};

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
}

pub(crate) async fn run(args: NodeSimArgs) -> anyhow::Result<()> {
    let sim = NodeSim::new(args.config())?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, name = %args.name, service_time = %args.service_time, "node-sim serving");
    sim.serve(listener, crate::shutdown_signal()).await?;
    Ok(())
}
