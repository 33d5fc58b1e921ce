//! `fulcrum load`: open-loop load with coordinated-omission-free latency.

use std::time::Duration;

use clap::Args;
use fulcrum_sim::load::{self, Arrivals, LoadConfig};

/// Flags of `fulcrum load`.
#[derive(Debug, Args)]
pub(crate) struct LoadArgs {
    /// host:port of a router or node.
    #[arg(long, default_value = "127.0.0.1:7001")]
    target: String,
    /// Model to call.
    #[arg(long, default_value = "echo")]
    model: String,
    /// Calls per second, scheduled by time whatever the answers do.
    #[arg(long, default_value_t = 100.0)]
    rps: f64,
    /// How long to send.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Deadline of each call.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// FP32 elements in the request tensor.
    #[arg(long, default_value_t = 16)]
    payload_elems: usize,
    /// HTTP/2 connections to spread calls over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Calls in flight at most; a call due beyond that is counted as dropped.
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// How calls are spaced: `uniform` (evenly) or `poisson` (exponential gaps, seeded by
    /// `--seed`, the same for every run with that seed).
    #[arg(long, default_value = "uniform", value_parser = ["uniform", "poisson"])]
    arrivals: String,
    /// Seed of Poisson arrivals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Closed loop instead of a schedule: this many callers, each sending its next call as
    /// soon as its previous one has ended (`--rps` and `--arrivals` unused; latency from each
    /// call's send). One caller measures sequential calls.
    #[arg(long, value_name = "CALLERS")]
    closed_loop: Option<usize>,
    /// A request header every call carries, `NAME=VALUE` (repeatable): `--header
    /// fulcrum-priority=critical`.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Also report outcomes by the time calls were due, in buckets this wide (`100ms`).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeline: Option<Duration>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// With --json, include the latency histogram (`latency_histogram`: `[latency_us, calls]`
    /// pairs), to merge the reports of several generators into exact percentiles.
    #[arg(long, requires = "json")]
    histogram: bool,
}

pub(crate) async fn run(args: LoadArgs) -> anyhow::Result<()> {
    lower_timer_slack();
    let config = LoadConfig {
        target: args.target,
        model: args.model,
        rps: args.rps,
        duration: args.duration,
        timeout: args.timeout,
        max_in_flight: args.max_in_flight,
        payload_elems: args.payload_elems,
        connections: args.connections,
        arrivals: match args.arrivals.as_str() {
            "poisson" => Arrivals::Poisson { seed: args.seed },
            _ => Arrivals::Uniform,
        },
        timeline: args.timeline,
        closed_loop: args.closed_loop,
        headers: args.headers,
    };
    let mut report = load::run(config).await?;
    if !args.histogram {
        report.latency_histogram.clear();
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!("{report}");
    }
    Ok(())
}

/// `NAME=VALUE` as a header (checked further by the load generator).
pub(crate) fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    if name.is_empty() {
        return Err(format!("{s:?} has no header name"));
    }
    Ok((name.to_ascii_lowercase(), value.to_owned()))
}

/// Timer slack this process asks for, in nanoseconds: how late Linux may wake a sleeping thread
/// to batch wake-ups (50 µs by default). The load generator's scheduling thread sleeps until
/// each call is due, so the slack is generator delay added to every measured latency.
const TIMER_SLACK_NS: &str = "1000";

/// Lowers the timer slack of the main thread (the one `/proc/self/timerslack_ns` names), which
/// runs this command and so creates the scheduling thread; a thread inherits its creator's
/// slack. Best effort: on another system, or if the file cannot be written, the default stays.
fn lower_timer_slack() {
    if let Err(e) = std::fs::write("/proc/self/timerslack_ns", TIMER_SLACK_NS) {
        tracing::debug!(error = %e, "timer slack left at its default");
    }
}
