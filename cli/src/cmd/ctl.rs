//! `fulcrum ctl`: operate a control plane through its admin API.

use std::collections::HashMap;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use fulcrum_proto::fulcrum::v1::admin_client::AdminClient;
use fulcrum_proto::fulcrum::v1::node_sim_control_client::NodeSimControlClient;
use fulcrum_proto::fulcrum::v1::{
    DeregisterNodeRequest, DrainNodeRequest, GetNodeRequest, HealthState, ListNodesRequest, Model,
    NodeSpec, NodeStatus, RegisterNodeRequest, SimConfig,
};
use serde_json::json;
use tonic::transport::Channel;

/// Flags of `fulcrum ctl`.
#[derive(Debug, Args)]
pub(crate) struct CtlArgs {
    /// The control plane's admin address.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:7000",
        env = "FULCRUM_CONTROL"
    )]
    control: String,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// List nodes with their health, weight and models.
    Nodes {
        /// Print JSON (an array of nodes) instead of a table.
        #[arg(long)]
        json: bool,
        /// Only nodes of this region.
        #[arg(long, default_value = "")]
        region: String,
    },
    /// Show one node.
    Node {
        /// Node id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Register a node (a server that knows nothing of Fulcrum: Triton, MLServer, node-sim).
    Register {
        /// Unique node id.
        #[arg(long)]
        id: String,
        /// host:port of its gRPC endpoint.
        #[arg(long)]
        address: String,
        /// Its region (data center).
        #[arg(long)]
        region: String,
        /// Its zone inside the region.
        #[arg(long, default_value = "")]
        zone: String,
        /// Models it serves, comma-separated; NAME or NAME:VERSION.
        #[arg(long, value_delimiter = ',', required = true)]
        models: Vec<String>,
        /// Concurrent calls it is sized for.
        #[arg(long, allow_negative_numbers = true)]
        capacity: i64,
        /// Labels, KEY=VALUE, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Remove a node.
    Deregister {
        /// Node id.
        id: String,
    },
    /// Drain a node: weight zero, no new calls (in-flight calls finish).
    Drain {
        /// Node id.
        id: String,
        /// Clear the drain instead.
        #[arg(long)]
        undo: bool,
    },
    /// Clear a node's drain.
    Undrain {
        /// Node id.
        id: String,
    },
    /// Change a simulated node's behaviour (talks to the node-sim itself, not the control plane).
    Sim {
        /// host:port of the node-sim.
        address: String,
        /// Make it healthy (true) or unhealthy (false).
        #[arg(long)]
        healthy: Option<bool>,
        /// Share of calls failing with UNAVAILABLE, in [0, 1].
        #[arg(long)]
        error_ratio: Option<f64>,
        /// Share of calls that never answer, in [0, 1].
        #[arg(long)]
        hang_ratio: Option<f64>,
    },
}

async fn connect(addr: &str) -> anyhow::Result<AdminClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot reach the control plane at {addr}"))?;
    Ok(AdminClient::new(channel))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn health_name(h: i32) -> &'static str {
    match HealthState::try_from(h).unwrap_or(HealthState::Unspecified) {
        HealthState::Unspecified => "unknown",
        HealthState::Healthy => "healthy",
        HealthState::Degraded => "degraded",
        HealthState::Unhealthy => "unhealthy",
        HealthState::Draining => "draining",
        HealthState::Cordoned => "cordoned",
    }
}

fn node_json(n: &NodeStatus) -> serde_json::Value {
    let e = n.endpoint.clone().unwrap_or_default();
    let s = e.spec.clone().unwrap_or_default();
    json!({
        "id": s.id,
        "region": s.region,
        "zone": s.zone,
        "address": s.address,
        "models": s.models.iter().map(|m| json!({"name": m.name, "versions": m.versions})).collect::<Vec<_>>(),
        "capacity": s.capacity,
        "labels": s.labels,
        "health": health_name(e.health),
        "weight": e.weight,
        "ready_models": e.ready_models,
        "drained": n.drained,
        "probe_streak": n.probe_streak,
        "last_error": n.last_error,
    })
}

fn print_table(nodes: &[NodeStatus], version: u64) {
    let rows: Vec<[String; 7]> = nodes
        .iter()
        .map(|n| {
            let e = n.endpoint.clone().unwrap_or_default();
            let s = e.spec.clone().unwrap_or_default();
            let models: Vec<_> = s.models.iter().map(|m| m.name.as_str()).collect();
            [
                s.id.clone(),
                s.region.clone(),
                s.address.clone(),
                health_name(e.health).to_owned(),
                format!("{:.1}", e.weight),
                models.join(","),
                n.last_error.clone(),
            ]
        })
        .collect();
    let header = [
        "ID",
        "REGION",
        "ADDRESS",
        "HEALTH",
        "WEIGHT",
        "MODELS",
        "LAST ERROR",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    println!("\n{} node(s); routing version {version}", rows.len());
}

fn parse_models(models: &[String]) -> Vec<Model> {
    let mut out: Vec<Model> = Vec::new();
    for m in models.iter().filter(|m| !m.is_empty()) {
        let (name, version) = match m.split_once(':') {
            Some((n, v)) => (n, Some(v)),
            None => (m.as_str(), None),
        };
        let entry = match out.iter().position(|x| x.name == name) {
            Some(i) => &mut out[i],
            None => {
                out.push(Model {
                    name: name.to_owned(),
                    versions: vec![],
                });
                out.last_mut().expect("just pushed")
            }
        };
        if let Some(v) = version {
            entry.versions.push(v.to_owned());
        }
    }
    out
}

pub(crate) async fn run(args: CtlArgs) -> anyhow::Result<()> {
    if let CtlCommand::Sim {
        address,
        healthy,
        error_ratio,
        hang_ratio,
    } = args.command
    {
        return sim(&address, healthy, error_ratio, hang_ratio).await;
    }
    let mut admin = connect(&args.control).await?;
    match args.command {
        CtlCommand::Nodes { json, region } => {
            let resp = admin
                .list_nodes(ListNodesRequest { region })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                let nodes: Vec<_> = resp.nodes.iter().map(node_json).collect();
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print_table(&resp.nodes, resp.routing_version);
            }
        }
        CtlCommand::Node { id, json } => {
            let n = admin
                .get_node(GetNodeRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&node_json(&n))?);
            } else {
                print_table(std::slice::from_ref(&n), 0);
            }
        }
        CtlCommand::Register {
            id,
            address,
            region,
            zone,
            models,
            capacity,
            labels,
        } => {
            let mut label_map = HashMap::new();
            for l in labels {
                let Some((k, v)) = l.split_once('=') else {
                    bail!("label {l:?} is not KEY=VALUE");
                };
                label_map.insert(k.to_owned(), v.to_owned());
            }
            let spec = NodeSpec {
                id: id.clone(),
                address,
                region,
                zone,
                models: parse_models(&models),
                capacity,
                labels: label_map,
            };
            let resp = admin
                .register_node(RegisterNodeRequest { spec: Some(spec) })
                .await
                .map_err(status_error)?
                .into_inner();
            let what = if resp.created {
                "registered"
            } else {
                "unchanged"
            };
            println!("node {id} {what} (revision {})", resp.revision);
        }
        CtlCommand::Deregister { id } => {
            let resp = admin
                .deregister_node(DeregisterNodeRequest { id: id.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("node {id} deregistered (revision {})", resp.revision);
        }
        CtlCommand::Drain { id, undo } => drain(&mut admin, id, !undo).await?,
        CtlCommand::Undrain { id } => drain(&mut admin, id, false).await?,
        CtlCommand::Sim { .. } => unreachable!("handled before connecting to the control plane"),
    }
    Ok(())
}

async fn drain(admin: &mut AdminClient<Channel>, id: String, drain: bool) -> anyhow::Result<()> {
    admin
        .drain_node(DrainNodeRequest {
            id: id.clone(),
            drain,
        })
        .await
        .map_err(status_error)?;
    println!("node {id} {}", if drain { "draining" } else { "undrained" });
    Ok(())
}

async fn sim(
    address: &str,
    healthy: Option<bool>,
    error_ratio: Option<f64>,
    hang_ratio: Option<f64>,
) -> anyhow::Result<()> {
    let mut client = NodeSimControlClient::connect(format!("http://{address}"))
        .await
        .with_context(|| format!("cannot reach the node-sim at {address}"))?;
    let now = client
        .configure(SimConfig {
            healthy,
            error_ratio,
            hang_ratio,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "node-sim {address}: healthy={} error_ratio={} hang_ratio={}",
        now.healthy.unwrap_or_default(),
        now.error_ratio.unwrap_or_default(),
        now.hang_ratio.unwrap_or_default()
    );
    Ok(())
}
