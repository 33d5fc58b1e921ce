//! `fulcrum ctl`: operate a control plane through its admin API.

use std::collections::HashMap;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use fulcrum_proto::fulcrum::v1::admin_client::AdminClient;
use fulcrum_proto::fulcrum::v1::node_sim_control_client::NodeSimControlClient;
use fulcrum_proto::fulcrum::v1::{
    Balancer, CordonNodeRequest, DeregisterNodeRequest, DrainNodeRequest, GetModelPolicyRequest,
    GetNodeRequest, GetRoutingRequest, GetStatusRequest, HealthState, ListModelPoliciesRequest,
    ListNodesRequest, Model, ModelPolicy, NodeSpec, NodeStatus, Priority, RegionStateRequest,
    RegisterNodeRequest, SimConfig, WatchRequest, WeightOverrideRequest,
};
use serde_json::json;
use tonic::transport::Channel;

use crate::cmd::status_error;

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
    /// Admin bearer token (not needed against `fulcrum up`, which trusts loopback). Of a
    /// comma-separated list (a rotation's `new,old`), the first is presented.
    #[arg(
        long,
        global = true,
        env = "FULCRUM_ADMIN_TOKEN",
        hide_env_values = true,
        value_parser = crate::cmd::presented_token
    )]
    token: Option<String>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// The replica's status: leadership, routing version, staleness, routers.
    Status,
    /// Routers subscribed to the replica, with the version each acknowledged.
    Routers,
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
        /// Models it serves, comma-separated; NAME or NAME:VERSION. Leave it out to have the
        /// control plane list them from the server (model repository `RepositoryIndex`, which
        /// Triton and MLServer answer) on every probe.
        #[arg(long, value_delimiter = ',')]
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
        /// Return at once instead of waiting for the calls in flight to finish.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the calls in flight to finish.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Cordon a node: no new calls (until uncordoned).
    Cordon {
        /// Node id.
        id: String,
    },
    /// Clear a node's cordon.
    Uncordon {
        /// Node id.
        id: String,
    },
    /// Set a node's weight by hand (in [0, 1000000]), or clear it with --clear.
    Weight {
        /// Node id.
        id: String,
        /// The weight.
        #[arg(required_unless_present = "clear")]
        weight: Option<f64>,
        /// Go back to the computed weight.
        #[arg(long)]
        clear: bool,
    },
    /// Manual data-center failover: evacuate a region, or restore it.
    Region {
        /// evacuate or restore.
        action: String,
        /// The region.
        region: String,
    },
    /// The routing table as the routers receive it (JSON).
    Routing,
    /// A live stream of routing changes, one line per node that changed (Ctrl-C to stop).
    Watch,
    /// Clear a node's drain.
    Undrain {
        /// Node id.
        id: String,
    },
    /// Per-model routing policies: balancer, deadline, retries, hedging, spill-over.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
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
        /// Stop completing calls for this long from now (`2s`; `0s` ends a stall), as in a long
        /// garbage-collection pause.
        #[arg(long, value_parser = humantime::parse_duration)]
        stall: Option<std::time::Duration>,
    },
}

// Parsed once per command: the size of its largest variant (`Set`, every policy field) costs
// nothing, and boxing it would only make the match below harder to read.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// List every model's policy.
    List,
    /// Show one model's policy.
    Get {
        /// Model name.
        model: String,
    },
    /// Set a model's policy (fields not given take their defaults).
    Set {
        /// Model name.
        model: String,
        /// p2c-ewma (default), round-robin, least-request or consistent-hash.
        #[arg(long, default_value = "p2c-ewma")]
        balancer: String,
        /// Request header carrying the affinity key (consistent-hash).
        #[arg(long, default_value = "")]
        hash_header: String,
        /// Deadline for calls that bring none (default 5s).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Attempts per call, the first included (default 3; 1 disables retries).
        #[arg(long, default_value_t = 0)]
        max_attempts: u32,
        /// Deadline of one attempt.
        #[arg(long, value_parser = humantime::parse_duration)]
        per_try_timeout: Option<std::time::Duration>,
        /// The model's calls have side effects: never retry or hedge them.
        #[arg(long)]
        not_idempotent: bool,
        /// Hedge after a delay (e.g. 50ms), or after the observed p95 ("p95").
        #[arg(long)]
        hedge_after: Option<String>,
        /// Route to unhealthy nodes when no healthy one is left.
        #[arg(long)]
        panic_mode: bool,
        /// Overprovisioning factor of the spill-over rule (default 1.4).
        #[arg(long, default_value_t = 0.0)]
        overprovisioning: f64,
        /// Priority of the calls that name none in the fulcrum-priority header: critical,
        /// normal (default) or sheddable.
        #[arg(long, default_value = "normal")]
        default_priority: String,
        /// Token-bucket rate limit: calls a second each router admits for the model (default:
        /// none).
        #[arg(long, default_value_t = 0.0)]
        rate_limit: f64,
        /// Calls admitted at once after a quiet spell (default: one second's worth).
        #[arg(long, default_value_t = 0)]
        rate_limit_burst: u32,
        /// Request header telling callers apart, each with a bucket of its own (an API key).
        #[arg(long, default_value = "")]
        rate_limit_key: String,
        /// Model that takes a call this model cannot serve (no node, every node full, or its
        /// nodes failing): once, with what is left of the call's deadline.
        #[arg(long, default_value = "")]
        fallback_model: String,
        /// Keep the model's answers this long (e.g. 30s; at most 1h) in each router's
        /// response cache, and answer repeated requests from it (default: no caching).
        #[arg(long, value_parser = humantime::parse_duration)]
        cache_ttl: Option<std::time::Duration>,
        /// Request header whose value is part of the cache key (a tenant, an API key), so
        /// callers with different values never share answers.
        #[arg(long, default_value = "")]
        cache_key: String,
        /// Canary release: the model (the next version, under its own name) that takes
        /// --canary-percent of this model's calls.
        #[arg(long, default_value = "")]
        canary_model: String,
        /// Share of the calls the canary takes, in percent (0 to 100).
        #[arg(long, default_value_t = 0.0)]
        canary_percent: f64,
        /// Request header whose value decides which calls the canary takes (a user, a
        /// session), so a caller keeps seeing one model (default: calls drawn at random).
        #[arg(long, default_value = "")]
        canary_key: String,
        /// Merge ModelInfer calls that arrive together (same shapes but the first dimension,
        /// same parameters and priority) into one node call of at most this many, along the
        /// first dimension, and split the answer (0: off).
        #[arg(long, default_value_t = 0)]
        batch_max_size: u32,
        /// The longest a call waits for others to join its batch (default 2ms; at most 100ms).
        #[arg(long, value_parser = humantime::parse_duration)]
        batch_window: Option<std::time::Duration>,
    },
    /// Remove a model's policy (back to the defaults).
    Clear {
        /// Model name.
        model: String,
    },
    /// Make every router's cached answers of a model stale, as after updating the model in
    /// place: its next calls reach nodes.
    FlushCache {
        /// Model name.
        model: String,
    },
}

fn millis(d: Option<std::time::Duration>) -> anyhow::Result<u32> {
    d.map_or(Ok(0), |d| {
        u32::try_from(d.as_millis()).map_err(|_| anyhow::anyhow!("duration {d:?} is too long"))
    })
}

fn print_policy(p: &ModelPolicy) -> anyhow::Result<()> {
    let balancer = match p.balancer() {
        Balancer::Unspecified | Balancer::P2cEwma => "p2c-ewma",
        Balancer::RoundRobin => "round-robin",
        Balancer::LeastRequest => "least-request",
        Balancer::ConsistentHash => "consistent-hash",
    };
    let or_default = |v: u32, d: &str, unit: &str| {
        if v == 0 {
            d.to_owned()
        } else {
            format!("{v}{unit}")
        }
    };
    let hedge = if p.hedge_after_p95 {
        "after p95".to_owned()
    } else {
        or_default(p.hedge_after_ms, "off", "ms")
    };
    let priority = match p.default_priority() {
        Priority::Unspecified | Priority::Normal => "normal",
        Priority::Critical => "critical",
        Priority::Sheddable => "sheddable",
    };
    let rate_limit = if p.rate_limit_rps > 0.0 {
        let burst = if p.rate_limit_burst == 0 {
            "1s".to_owned()
        } else {
            p.rate_limit_burst.to_string()
        };
        let per = if p.rate_limit_key_header.is_empty() {
            String::new()
        } else {
            format!(" per {}", p.rate_limit_key_header)
        };
        format!("{}/s burst={burst}{per}", p.rate_limit_rps)
    } else {
        "none".to_owned()
    };
    let canary = match (p.canary_model.as_str(), p.canary_key_header.as_str()) {
        ("", _) => "none".to_owned(),
        (m, "") => format!("{m} {}%", p.canary_percent),
        (m, key) => format!("{m} {}% by {key}", p.canary_percent),
    };
    let batch = match (p.batch_max_size, p.batch_window_us) {
        (0 | 1, _) => "none".to_owned(),
        (n, 0) => format!("{n} within 2000us"),
        (n, us) => format!("{n} within {us}us"),
    };
    let cache = match (p.cache_ttl_ms, p.cache_key_header.as_str()) {
        (0, _) => "none".to_owned(),
        (ms, "") => format!("{ms}ms"),
        (ms, key) => format!("{ms}ms per {key}"),
    };
    outln!(
        "{}: balancer={balancer}{} timeout={} max_attempts={} per_try_timeout={} idempotent={} hedge={hedge} panic_mode={} overprovisioning={} default_priority={priority} rate_limit={rate_limit:?} fallback={} cache={cache:?} canary={canary:?} batch={batch:?}",
        p.model,
        if p.hash_header.is_empty() {
            String::new()
        } else {
            format!(" hash_header={}", p.hash_header)
        },
        or_default(p.timeout_ms, "5000ms", "ms"),
        or_default(p.max_attempts, "3", ""),
        or_default(p.per_try_timeout_ms, "none", "ms"),
        !p.not_idempotent,
        p.panic_mode,
        if p.overprovisioning == 0.0 {
            "1.4".to_owned()
        } else {
            p.overprovisioning.to_string()
        },
        if p.fallback_model.is_empty() {
            "none"
        } else {
            &p.fallback_model
        },
    );
    Ok(())
}

async fn policy(admin: &mut Admin, command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::List => {
            let resp = admin
                .list_model_policies(ListModelPoliciesRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if resp.policies.is_empty() {
                outln!("no policies set: every model uses the defaults");
            }
            for p in &resp.policies {
                print_policy(p)?;
            }
        }
        PolicyCommand::Get { model } => {
            let p = admin
                .get_model_policy(GetModelPolicyRequest { model })
                .await
                .map_err(status_error)?
                .into_inner();
            print_policy(&p)?;
        }
        PolicyCommand::Set {
            model,
            balancer,
            hash_header,
            timeout,
            max_attempts,
            per_try_timeout,
            not_idempotent,
            hedge_after,
            panic_mode,
            overprovisioning,
            default_priority,
            rate_limit,
            rate_limit_burst,
            rate_limit_key,
            fallback_model,
            cache_ttl,
            cache_key,
            canary_model,
            canary_percent,
            canary_key,
            batch_max_size,
            batch_window,
        } => {
            let balancer = match balancer.as_str() {
                "p2c-ewma" | "p2c" => Balancer::P2cEwma,
                "round-robin" | "rr" => Balancer::RoundRobin,
                "least-request" | "lr" => Balancer::LeastRequest,
                "consistent-hash" | "ch" => Balancer::ConsistentHash,
                other => bail!(
                    "unknown balancer {other:?}: use p2c-ewma, round-robin, least-request or consistent-hash"
                ),
            };
            let default_priority = match default_priority.as_str() {
                "critical" => Priority::Critical,
                "normal" => Priority::Normal,
                "sheddable" => Priority::Sheddable,
                other => bail!("unknown priority {other:?}: use critical, normal or sheddable"),
            };
            let (hedge_after_ms, hedge_after_p95) = match hedge_after.as_deref() {
                None => (0, false),
                Some("p95") => (0, true),
                Some(d) => (millis(Some(humantime::parse_duration(d)?))?, false),
            };
            let p = ModelPolicy {
                model,
                balancer: balancer as i32,
                hash_header,
                timeout_ms: millis(timeout)?,
                max_attempts,
                per_try_timeout_ms: millis(per_try_timeout)?,
                not_idempotent,
                hedge_after_ms,
                hedge_after_p95,
                panic_mode,
                overprovisioning,
                default_priority: default_priority as i32,
                rate_limit_rps: rate_limit,
                rate_limit_burst,
                rate_limit_key_header: rate_limit_key,
                fallback_model,
                cache_ttl_ms: millis(cache_ttl)?,
                cache_key_header: cache_key,
                canary_model,
                canary_percent,
                canary_key_header: canary_key,
                // The control plane's to set.
                cache_epoch: 0,
                batch_max_size,
                batch_window_us: match batch_window {
                    None => 0,
                    Some(d) => u32::try_from(d.as_micros())
                        .map_err(|_| anyhow::anyhow!("--batch-window {d:?} is too long"))?,
                },
            };
            let p = admin
                .set_model_policy(p)
                .await
                .map_err(status_error)?
                .into_inner();
            print_policy(&p)?;
        }
        PolicyCommand::Clear { model } => {
            admin
                .delete_model_policy(GetModelPolicyRequest {
                    model: model.clone(),
                })
                .await
                .map_err(status_error)?;
            outln!("{model}: policy removed, defaults apply");
        }
        PolicyCommand::FlushCache { model } => {
            let p = admin
                .flush_model_cache(GetModelPolicyRequest { model })
                .await
                .map_err(status_error)?
                .into_inner();
            outln!(
                "{}: cached answers flushed (cache epoch {}); the next calls reach nodes",
                p.model,
                p.cache_epoch
            );
        }
    }
    Ok(())
}

/// Adds the bearer token to every admin call.
#[derive(Debug, Clone)]
struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

type Admin = AdminClient<tonic::service::interceptor::InterceptedService<Channel, Token>>;

async fn connect(addr: &str, token: Option<&str>) -> anyhow::Result<Admin> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot reach the control plane at {addr}"))?;
    let token = token
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .context("the token is not a valid header value")?;
    Ok(AdminClient::with_interceptor(channel, Token(token)))
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
        "cordoned": n.cordoned,
        "weight_override": n.weight_override,
        "region_evacuated": n.region_evacuated,
        "in_flight": n.in_flight,
        "mean_in_flight": n.mean_in_flight,
        "calls_per_sec": n.calls_per_sec,
        "error_ratio": n.error_ratio,
        "latency_ms": n.latency_ms,
        "probe_streak": n.probe_streak,
        "last_error": n.last_error,
        "leased": n.leased,
        "self_report": n.self_report.as_ref().map(|r| json!({
            "in_flight": r.in_flight,
            "queue_depth": r.queue_depth,
            "utilization": r.utilization,
            "metrics": r.metrics,
        })),
    })
}

fn print_table(nodes: &[NodeStatus], version: u64) -> anyhow::Result<()> {
    let rows: Vec<[String; 10]> = nodes
        .iter()
        .map(|n| {
            let e = n.endpoint.clone().unwrap_or_default();
            let s = e.spec.clone().unwrap_or_default();
            let models: Vec<_> = s.models.iter().map(|m| m.name.as_str()).collect();
            // The node's own report: in flight + queued, and utilization.
            let load = n.self_report.as_ref().map_or_else(String::new, |r| {
                format!(
                    "{}+{} {:.0}%",
                    r.in_flight,
                    r.queue_depth,
                    r.utilization * 100.0
                )
            });
            [
                s.id.clone(),
                s.region.clone(),
                s.address.clone(),
                health_name(e.health).to_owned(),
                format!("{:.1}", e.weight),
                if n.leased { "yes" } else { "-" }.to_owned(),
                load,
                if n.entry_version == 0 {
                    "-".to_owned()
                } else {
                    format!(
                        "{}/{} @{}",
                        n.routers_current, n.routers_total, n.entry_version
                    )
                },
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
        "LEASE",
        "LOAD",
        "ROUTERS",
        "MODELS",
        "LAST ERROR",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| -> anyhow::Result<()> {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        outln!("{}", s.join("  ").trim_end());
        Ok(())
    };
    line(header.to_vec())?;
    for r in &rows {
        line(r.iter().map(String::as_str).collect())?;
    }
    outln!(
        "\n{} node(s); routing version {version}; ROUTERS: routers of this replica holding the \
         node's newest entry / all, @ the version that carries it",
        rows.len()
    );
    Ok(())
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
        stall,
    } = args.command
    {
        let config = SimConfig {
            healthy,
            error_ratio,
            hang_ratio,
            stall_ms: stall.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        return sim(&address, config).await;
    }
    let mut admin = connect(&args.control, args.token.as_deref()).await?;
    match args.command {
        CtlCommand::Status => {
            let s = admin
                .get_status(GetStatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            let leader = if s.leader_id.is_empty() {
                "unknown"
            } else {
                &s.leader_id
            };
            outln!("replica          {}", s.replica_id);
            outln!(
                "leader           {}{}",
                leader,
                if s.leader { " (this replica)" } else { "" }
            );
            outln!(
                "routing version  {}{}",
                s.routing_version,
                if s.stale {
                    "  STALE: the store is unreachable, serving the last good table"
                } else {
                    ""
                }
            );
            outln!("routers          {}", s.routers.len());
        }
        CtlCommand::Routers => {
            let s = admin
                .get_status(GetStatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            outln!(
                "{:<28} {:<8} {:>10} {:>6} {:>6}  ADDRESS",
                "ROUTER",
                "REGION",
                "ACKED",
                "LAG",
                "NACKS"
            );
            for r in &s.routers {
                outln!(
                    "{:<28} {:<8} {:>10} {:>6} {:>6}  {}",
                    r.router_id,
                    r.region,
                    r.acked_version,
                    s.routing_version.saturating_sub(r.acked_version),
                    r.nacks,
                    if r.address.is_empty() {
                        "-"
                    } else {
                        &r.address
                    }
                );
            }
            outln!(
                "\n{} router(s) on replica {}; routing version {}",
                s.routers.len(),
                s.replica_id,
                s.routing_version
            );
        }
        CtlCommand::Nodes { json, region } => {
            let resp = admin
                .list_nodes(ListNodesRequest { region })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                let nodes: Vec<_> = resp.nodes.iter().map(node_json).collect();
                outln!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print_table(&resp.nodes, resp.routing_version)?;
            }
        }
        CtlCommand::Node { id, json } => {
            let n = admin
                .get_node(GetNodeRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                outln!("{}", serde_json::to_string_pretty(&node_json(&n))?);
            } else {
                print_table(std::slice::from_ref(&n), 0)?;
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
            outln!("node {id} {what} (revision {})", resp.revision);
        }
        CtlCommand::Deregister { id } => {
            let resp = admin
                .deregister_node(DeregisterNodeRequest { id: id.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            outln!("node {id} deregistered (revision {})", resp.revision);
        }
        CtlCommand::Drain {
            id,
            undo,
            no_wait,
            timeout,
        } => {
            drain(&mut admin, id.clone(), !undo).await?;
            if !undo && !no_wait {
                wait_drained(&mut admin, &id, timeout).await?;
            }
        }
        CtlCommand::Undrain { id } => drain(&mut admin, id, false).await?,
        CtlCommand::Cordon { id } => {
            admin
                .cordon_node(CordonNodeRequest {
                    id: id.clone(),
                    cordon: true,
                })
                .await
                .map_err(status_error)?;
            outln!("node {id} cordoned: no new calls");
        }
        CtlCommand::Uncordon { id } => {
            admin
                .cordon_node(CordonNodeRequest {
                    id: id.clone(),
                    cordon: false,
                })
                .await
                .map_err(status_error)?;
            outln!("node {id} uncordoned");
        }
        CtlCommand::Weight { id, weight, clear } => {
            let weight = if clear { None } else { weight };
            admin
                .set_weight_override(WeightOverrideRequest {
                    id: id.clone(),
                    weight,
                })
                .await
                .map_err(status_error)?;
            match weight {
                Some(w) => outln!("node {id}: weight set to {w}"),
                None => outln!("node {id}: weight override cleared"),
            }
        }
        CtlCommand::Region { action, region } => {
            let evacuated = match action.as_str() {
                "evacuate" => true,
                "restore" => false,
                other => bail!("unknown region action {other:?}: use evacuate or restore"),
            };
            let resp = admin
                .set_region_state(RegionStateRequest {
                    region: region.clone(),
                    evacuated,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            outln!(
                "region {region} {}; evacuated now: {}",
                if evacuated {
                    "evacuated: its routers send calls to the other region"
                } else {
                    "restored"
                },
                if resp.evacuated.is_empty() {
                    "none".to_owned()
                } else {
                    resp.evacuated.join(", ")
                }
            );
        }
        CtlCommand::Watch => {
            let mut events = admin
                .watch(WatchRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(e) = events.message().await.map_err(status_error)? {
                outln!("version {:>6}  {}", e.version, e.description);
            }
        }
        CtlCommand::Routing => {
            let t = admin
                .get_routing(GetRoutingRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            let endpoints: Vec<_> = t
                .endpoints
                .iter()
                .map(|e| {
                    let s = e.spec.clone().unwrap_or_default();
                    json!({
                        "id": s.id, "region": s.region, "address": s.address,
                        "health": health_name(e.health), "weight": e.weight,
                        "ready_models": e.ready_models,
                    })
                })
                .collect();
            let out = json!({
                "version": t.version,
                "stale": t.stale,
                "endpoints": endpoints,
                "policies": t.policies.iter().map(|p| p.model.clone()).collect::<Vec<_>>(),
            });
            outln!("{}", serde_json::to_string_pretty(&out)?);
        }
        CtlCommand::Policy { command } => policy(&mut admin, command).await?,
        CtlCommand::Sim { .. } => unreachable!("handled before connecting to the control plane"),
    }
    Ok(())
}

/// Waits until no router reports calls in flight to the node, printing progress.
async fn wait_drained(
    admin: &mut Admin,
    id: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let end = tokio::time::Instant::now() + timeout;
    // Routers report every half second and replicas share sums every second: wait for at least
    // one full round of fresh reports before trusting a zero.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    loop {
        let n = admin
            .get_node(GetNodeRequest { id: id.to_owned() })
            .await
            .map_err(status_error)?
            .into_inner();
        if n.in_flight == 0 {
            outln!("node {id} drained: no calls in flight");
            return Ok(());
        }
        if tokio::time::Instant::now() >= end {
            bail!(
                "node {id} still has {} call(s) in flight after {timeout:?}",
                n.in_flight
            );
        }
        outln!("node {id}: {} call(s) in flight…", n.in_flight);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

async fn drain(admin: &mut Admin, id: String, drain: bool) -> anyhow::Result<()> {
    admin
        .drain_node(DrainNodeRequest {
            id: id.clone(),
            drain,
        })
        .await
        .map_err(status_error)?;
    outln!("node {id} {}", if drain { "draining" } else { "undrained" });
    Ok(())
}

async fn sim(address: &str, config: SimConfig) -> anyhow::Result<()> {
    let mut client = NodeSimControlClient::connect(format!("http://{address}"))
        .await
        .with_context(|| format!("cannot reach the node-sim at {address}"))?;
    let now = client
        .configure(config)
        .await
        .map_err(status_error)?
        .into_inner();
    outln!(
        "node-sim {address}: healthy={} error_ratio={} hang_ratio={} stall_left={}ms",
        now.healthy.unwrap_or_default(),
        now.error_ratio.unwrap_or_default(),
        now.hang_ratio.unwrap_or_default(),
        now.stall_ms.unwrap_or_default()
    );
    Ok(())
}
