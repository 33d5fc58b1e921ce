//! The router's side of the routing stream: subscribe to a control-plane replica, apply every
//! update atomically, ACK or NACK it, and move to the next replica when the stream breaks.
//!
//! Static stability: whatever happens to the control plane, the router keeps the last table it
//! applied and goes on routing with it; it never goes back to an older version.

use std::sync::Arc;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::routing_client::RoutingClient;
use fulcrum_proto::fulcrum::v1::{
    Ack, LoadReport, Nack, NodeLoad, RouterHello, RouterMessage, RoutingUpdate, router_message,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::endpoint::now_ns;
use crate::router::RouterState;
use crate::table::{LoadView, RoutingTable, merge};

/// First reconnect delay: quick enough that a replica restart costs the router well under a
/// second of staleness.
const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Longest reconnect delay: a control plane that is down for long is retried every few
/// seconds, which costs nothing and bounds how stale a router stays after it returns.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Connect timeout to a control-plane replica (loopback or in-region).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the router reports per-node load to the control plane: a few times a second, so
/// the global view lags the routers' own by well under a second, at the cost of one small
/// message per interval.
const REPORT_INTERVAL: Duration = Duration::from_millis(500);

/// A stream silent for this long is dead (the control plane sends heartbeats every two seconds):
/// drop it and move to another replica.
const SILENCE_LIMIT: Duration = Duration::from_secs(6);

/// Messages to the control plane queued on one stream (ACKs, NACKs, reports): they are tiny and
/// the stream drains them at once; the bound only guards against a stuck connection.
const UPSTREAM_BUFFER: usize = 64;

/// Who the router is to the control plane.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// Control-plane replicas (`host:port`), tried in order, round robin.
    pub control: Vec<String>,
    /// This router's id, unique per process.
    pub router_id: String,
    /// Where the table's weights come from (the router still reports its load either way).
    pub load_view: LoadView,
    /// The control plane's stream token, sent as `authorization: Bearer <token>` (none: the
    /// control plane must trust this router's address, loopback).
    pub token: Option<String>,
    /// Where other routers reach this one (for the background calls it holds), listed in the
    /// control plane's router directory; none: not listed.
    pub address: Option<String>,
}

/// Follows the control plane forever, applying updates to `state`.
pub async fn run(config: SubscriberConfig, state: Arc<RouterState>) {
    if config.control.is_empty() {
        tracing::warn!("no control plane configured; the routing table stays empty");
        return;
    }
    let mut failures: u32 = 0;
    for addr in config.control.iter().cycle() {
        match session(addr, &config, &state).await {
            Ok(applied) if applied > 0 => failures = 0,
            Ok(_) => failures += 1,
            Err(e) => {
                failures += 1;
                tracing::warn!(control = %addr, error = %e, "routing stream failed; keeping the last table");
            }
        }
        let exp = BACKOFF_MIN.saturating_mul(1 << failures.min(6));
        let delay = exp
            .min(BACKOFF_MAX)
            .mul_f64(rand::rng().random_range(0.5..1.0));
        tokio::time::sleep(delay).await;
    }
}

/// One subscription; returns how many messages it received before the stream ended.
async fn session(
    addr: &str,
    config: &SubscriberConfig,
    state: &Arc<RouterState>,
) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let (tx, rx) = mpsc::channel(UPSTREAM_BUFFER);
    let send = |m: router_message::Message| RouterMessage { message: Some(m) };
    tx.send(send(router_message::Message::Hello(RouterHello {
        router_id: config.router_id.clone(),
        region: state.region.clone(),
        known_version: state.table.load().version,
        address: config.address.clone().unwrap_or_default(),
    })))
    .await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = &config.token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the stream token is not a valid header value (visible ASCII only)")?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut updates = RoutingClient::new(channel)
        .subscribe(request)
        .await?
        .into_inner();
    tracing::info!(control = %addr, "subscribed to the control plane");
    let reporter = tokio::spawn(report_load(tx.clone(), state.clone()));
    let _stop_reporter = AbortOnDrop(reporter);
    let mut received = 0;
    loop {
        let update = match tokio::time::timeout(SILENCE_LIMIT, updates.message()).await {
            Err(_) => return Err(format!("no message from {addr} for {SILENCE_LIMIT:?}").into()),
            Ok(msg) => match msg? {
                Some(update) => update,
                None => break,
            },
        };
        received += 1;
        if update.heartbeat {
            continue;
        }
        let reply = match apply_in_view(&update, state, config.load_view) {
            Ok(held) => router_message::Message::Ack(Ack { version: held }),
            Err(reason) => {
                tracing::warn!(version = update.version, %reason, "rejected a routing update");
                router_message::Message::Nack(Nack {
                    version: update.version,
                    reason,
                })
            }
        };
        tx.send(send(reply)).await?;
    }
    Ok(received)
}

/// Aborts a task when dropped (the session ends one way or another).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends a load report every [`REPORT_INTERVAL`] until the stream closes: per node, the calls
/// in flight now and on average since the last report, calls and errors since the last
/// report, the latency estimate and whether the node is ejected here.
async fn report_load(tx: mpsc::Sender<RouterMessage>, state: Arc<RouterState>) {
    let mut ticker = tokio::time::interval(REPORT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let table = state.table.load();
        let now = now_ns();
        let nodes = table
            .nodes
            .values()
            .map(|n| {
                let (calls, errors) = n.take_counts();
                NodeLoad {
                    node_id: n.id.clone(),
                    in_flight: n.in_flight(),
                    calls,
                    errors,
                    latency_ewma_ms: n.latency.estimate_ms(now),
                    ejected: n.outlier.is_ejected(now / 1_000_000),
                    mean_in_flight: n.take_mean_in_flight(),
                }
            })
            .collect();
        let report = RouterMessage {
            message: Some(router_message::Message::Load(LoadReport {
                nodes,
                at_unix_ms: 0,
                self_reports: vec![],
            })),
        };
        if tx.send(report).await.is_err() {
            return;
        }
    }
}

/// Applies one update, or says why not. Never moves to an older version.
///
/// Returns the version the router holds afterwards (acknowledged to the control plane). An
/// update older than the table held — a replica whose watch lags behind the one the router
/// left — is ignored, not rejected: rejecting would only bring the same old snapshot again.
pub fn apply(update: &RoutingUpdate, state: &RouterState) -> Result<u64, String> {
    apply_in_view(update, state, LoadView::Global)
}

/// [`apply`], with the weights of `view`.
pub fn apply_in_view(
    update: &RoutingUpdate,
    state: &RouterState,
    view: LoadView,
) -> Result<u64, String> {
    let current = state.table.load();
    if update.version < current.version {
        tracing::debug!(
            version = update.version,
            held = current.version,
            "ignoring an update older than the table held"
        );
        return Ok(current.version);
    }
    if update.version == current.version && !update.snapshot {
        return Ok(current.version);
    }
    let merged;
    let full = if update.snapshot {
        update
    } else {
        merged = merge(&current.source, update)?;
        &merged
    };
    let table = RoutingTable::build_in_view(full, &state.region, view, &current, &state.queue)?;
    tracing::debug!(
        version = table.version,
        routable = table.routable_nodes,
        stale = table.stale,
        "routing table applied"
    );
    let version = table.version;
    state.set_table(table);
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::{Endpoint, HealthState, Model, NodeSpec};

    fn snapshot(version: u64, weight: f64) -> RoutingUpdate {
        RoutingUpdate {
            version,
            snapshot: true,
            endpoints: vec![Endpoint {
                spec: Some(NodeSpec {
                    id: "n".into(),
                    address: "127.0.0.1:9".into(),
                    region: "a".into(),
                    models: vec![Model {
                        name: "m".into(),
                        versions: vec![],
                    }],
                    capacity: 1,
                    ..Default::default()
                }),
                health: HealthState::Healthy as i32,
                weight,
                ready_models: vec!["m".into()],
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn versions_never_go_backwards() {
        let state = RouterState::new("a".into(), 1 << 20);
        assert_eq!(apply(&snapshot(5, 1.0), &state), Ok(5));
        // An older snapshot (a lagging replica) is ignored, and the router says what it holds.
        assert_eq!(apply(&snapshot(3, 9.0), &state), Ok(5));
        assert_eq!(state.table.load().version, 5);
        assert_eq!(state.table.load().source.endpoints[0].weight, 1.0);
        // A delta on another base is rejected (NACK); the table stays.
        let delta = RoutingUpdate {
            version: 8,
            base_version: 6,
            ..Default::default()
        };
        assert!(apply(&delta, &state).is_err());
        assert_eq!(state.table.load().version, 5);
        // A delta on the held version applies.
        let delta = RoutingUpdate {
            version: 8,
            base_version: 5,
            endpoints: snapshot(8, 2.0).endpoints,
            ..Default::default()
        };
        assert_eq!(apply(&delta, &state), Ok(8));
        assert_eq!(state.table.load().source.endpoints[0].weight, 2.0);
    }
}
