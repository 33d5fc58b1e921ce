//! `fulcrum`: the one binary. Each subcommand is a thin shell over a library crate:
//!
//! - `control`  — a control-plane replica (`fulcrum-control-plane`).
//! - `router`   — a router for one region (`fulcrum-data-plane`).
//! - `ctl`      — operator commands against a control plane's admin API.
//! - `up`       — a whole two-region stack on one machine, embedded store, no etcd needed.
//! - `node-sim` — a simulated inference node (`fulcrum-sim`).
//! - `load`     — an open-loop load generator (`fulcrum-sim`).
//! - `token`    — sign a caller token for routers that check tokens.
//! - `task`     — background calls at a router (`fulcrum.v1.Tasks`).

mod cmd;

/// mimalloc instead of the C library's allocator. A call through the router allocates and frees
/// some hundred small objects (HTTP/2 frames, header maps, futures) on both of its connections;
/// with glibc's malloc that was 15 % of the router's instructions. mimalloc's per-thread free
/// lists make each of those a few dozen instructions (see the commit introducing it for the
/// measurement). The whole binary uses it: node-sims and the load generator get the same speed-up.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Fulcrum keeps inference traffic flowing across two data centers.
#[derive(Debug, Parser)]
#[command(name = "fulcrum", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a control-plane replica.
    Control(cmd::control::ControlArgs),
    /// Run a router (data plane) for one region.
    Router(cmd::router::RouterArgs),
    /// Operate a control plane: nodes, register, deregister, drain.
    Ctl(cmd::ctl::CtlArgs),
    /// Run a whole two-region stack on this machine (embedded store, no etcd).
    Up(cmd::up::UpArgs),
    /// Run a simulated Open Inference Protocol node.
    NodeSim(cmd::node_sim::NodeSimArgs),
    /// Send open-loop load to a router or node and report latency and shares.
    Load(cmd::load::LoadArgs),
    /// Sign a caller token (JWT, HS256) for routers that check tokens.
    Token(cmd::token::TokenArgs),
    /// Background calls at a router: submit, get (or wait for), cancel, delete.
    Task(cmd::task::TaskArgs),
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_level = match cli.command {
        // Operator and load commands print their own output; keep logs to warnings.
        Command::Ctl(_) | Command::Load(_) | Command::Token(_) | Command::Task(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let done = match cli.command {
        Command::Control(a) => cmd::control::run(a).await,
        Command::Router(a) => cmd::router::run(a).await,
        Command::Ctl(a) => cmd::ctl::run(a).await,
        Command::Up(a) => cmd::up::run(a).await,
        Command::NodeSim(a) => cmd::node_sim::run(a).await,
        Command::Load(a) => cmd::load::run(a).await,
        Command::Token(a) => cmd::token::run(a),
        Command::Task(a) => cmd::task::run(a).await,
    };
    match done {
        // The reader of the output went away (`| head`): it had what it wanted.
        Err(e) if e.is::<cmd::StdoutClosed>() => Ok(()),
        done => done,
    }
}
