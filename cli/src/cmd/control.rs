//! `fulcrum control`: one control-plane replica.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fulcrum_control_plane::health::Thresholds;
use fulcrum_control_plane::health::prober::ProbeConfig;
use fulcrum_control_plane::{AdminAuth, ControlPlaneConfig, StreamAuth};

/// Flags of `fulcrum control`.
#[derive(Debug, Args)]
pub(crate) struct ControlArgs {
    /// Address to serve the routing stream and the admin API on.
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: String,
    /// Address to serve Prometheus metrics on (`GET /metrics`); none by default.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Store: etcd://host:port[,host:port…] (production) or embedded:PATH (one machine).
    #[arg(
        long,
        default_value = "embedded:.fulcrum/control/store.json",
        env = "FULCRUM_STORE"
    )]
    store: String,
    /// Time between two health probes of a node.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    probe_interval: Duration,
    /// Deadline of one health probe.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    probe_timeout: Duration,
    /// Consecutive passing probes that make an unhealthy node healthy.
    #[arg(long, default_value_t = 2)]
    healthy_after: u32,
    /// Consecutive failing probes that make a healthy node unhealthy.
    #[arg(long, default_value_t = 2)]
    unhealthy_after: u32,
    /// Mass-failure guard ("fail open"): when more than this share (in percent) of a
    /// region's routable nodes fail their probes at once without answering, in every region,
    /// and the nodes' own signals do not confirm it, hold their last state instead of
    /// publishing them unhealthy (the prober or its network is the likelier cause). A region
    /// failing alone while others are fine is published (a data-center failure). 0 or 100
    /// turns the guard off.
    #[arg(long, default_value_t = 50.0, value_parser = percent)]
    mass_failure_threshold: f64,
    /// This replica's id (default: control-HOST:PORT of --listen).
    #[arg(long)]
    id: Option<String>,
    /// Leader lease TTL: how soon another replica takes over when this one dies.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    leader_ttl: Duration,
    /// Bearer token admin calls must present; several, comma-separated, are all accepted (to
    /// rotate: `new,old`, then `new` once every operator has it).
    #[arg(long, env = "FULCRUM_ADMIN_TOKEN", hide_env_values = true, value_parser = crate::cmd::accepted_tokens)]
    admin_token: Option<String>,
    /// Accept admin calls from loopback without a token (one-machine setups).
    #[arg(long)]
    admin_trust_loopback: bool,
    /// Bearer token routers (`Routing.Subscribe`) and self-registering nodes
    /// (`Registration.Register`) must present. Without it, only routers and nodes on this
    /// machine (loopback) are accepted. Several, comma-separated, are all accepted (to rotate:
    /// `new,old`, then `new` once every router and node has it).
    #[arg(long, env = "FULCRUM_STREAM_TOKEN", hide_env_values = true, value_parser = crate::cmd::accepted_tokens)]
    stream_token: Option<String>,
    /// With --stream-token, still accept routers and nodes on loopback without it.
    #[arg(long)]
    stream_trust_loopback: bool,
    /// Lease TTL of self-registered nodes (whole seconds): how soon a node that falls silent,
    /// or whose replica dies, leaves the registry.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    registration_ttl: Duration,
}

impl ControlArgs {
    pub(crate) fn config(&self) -> anyhow::Result<ControlPlaneConfig> {
        let admin_auth = match (&self.admin_token, self.admin_trust_loopback) {
            (Some(t), false) if !t.is_empty() => AdminAuth::Token(t.clone()),
            (t, true) => AdminAuth::Loopback(t.clone().filter(|t| !t.is_empty())),
            _ => anyhow::bail!(
                "the admin API needs a credential: pass --admin-token (or set FULCRUM_ADMIN_TOKEN), \
                 or --admin-trust-loopback to accept admin calls from this machine only"
            ),
        };
        let token = self.stream_token.clone().filter(|t| !t.is_empty());
        let stream_auth = match (token, self.stream_trust_loopback) {
            (Some(t), false) => StreamAuth::Token(t),
            (t, _) => StreamAuth::Loopback(t),
        };
        Ok(ControlPlaneConfig {
            replica_id: self
                .id
                .clone()
                .unwrap_or_else(|| format!("control-{}", self.listen)),
            leader_ttl: self.leader_ttl,
            admin_auth,
            stream_auth,
            registration_ttl: self.registration_ttl,
            probe: ProbeConfig {
                interval: self.probe_interval,
                timeout: self.probe_timeout,
                thresholds: Thresholds {
                    healthy_after: self.healthy_after.max(1),
                    unhealthy_after: self.unhealthy_after.max(1),
                },
                mass_failure_threshold: self.mass_failure_threshold / 100.0,
            },
        })
    }
}

/// A percentage in [0, 100].
fn percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a percentage in [0, 100]"))
    }
}

pub(crate) async fn run(args: ControlArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    if matches!(config.stream_auth, StreamAuth::Loopback(None)) {
        tracing::info!(
            "no --stream-token: routers and nodes are accepted from this machine (loopback) only"
        );
    }
    let store = fulcrum_control_plane::store::open(&args.store)
        .await
        .with_context(|| format!("opening store {}", args.store))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let metrics = crate::cmd::bind_metrics(args.metrics_listen.as_deref()).await?;
    tracing::info!(listen = %args.listen, store = %args.store, metrics = ?args.metrics_listen,
        "control plane serving");
    fulcrum_control_plane::serve_with_metrics(
        config,
        store,
        listener,
        metrics,
        crate::shutdown_signal(),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn thresholds_are_percentages() {
        assert_eq!(super::percent("50"), Ok(50.0));
        assert_eq!(super::percent("12.5%"), Ok(12.5));
        assert_eq!(super::percent("0"), Ok(0.0));
        assert_eq!(super::percent("100"), Ok(100.0));
        assert!(
            super::percent("101")
                .unwrap_err()
                .contains("not a percentage")
        );
        assert!(
            super::percent("-1")
                .unwrap_err()
                .contains("not a percentage")
        );
        assert!(
            super::percent("NaN")
                .unwrap_err()
                .contains("not a percentage")
        );
        assert!(super::percent("half").unwrap_err().contains("not a number"));
    }
}
