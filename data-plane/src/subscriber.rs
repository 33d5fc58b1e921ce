//! The router's side of the routing stream: subscribe to a control-plane replica, apply every
//! update atomically, ACK or NACK it, and move to the next replica when the stream breaks.
//!
//! Static stability: whatever happens to the control plane, the router keeps the last table it
//! applied and goes on routing with it; it never goes back to an older version.

use std::sync::Arc;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::routing_client::RoutingClient;
use fulcrum_proto::fulcrum::v1::{
    Ack, Nack, RouterHello, RouterMessage, RoutingUpdate, router_message,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::router::RouterState;
use crate::table::RoutingTable;

/// First reconnect delay: quick enough that a replica restart costs the router well under a
/// second of staleness.
const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Longest reconnect delay: a control plane that is down for long is retried every few
/// seconds, which costs nothing and bounds how stale a router stays after it returns.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Connect timeout to a control-plane replica (loopback or in-region).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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

/// One subscription; returns how many updates it applied.
async fn session(
    addr: &str,
    config: &SubscriberConfig,
    state: &RouterState,
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
    })))
    .await?;
    let mut updates = RoutingClient::new(channel)
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(control = %addr, "subscribed to the control plane");
    let mut applied = 0;
    while let Some(update) = updates.message().await? {
        let reply = match apply(&update, state) {
            Ok(()) => {
                applied += 1;
                router_message::Message::Ack(Ack {
                    version: update.version,
                })
            }
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
    Ok(applied)
}

/// Applies one update, or says why not. Never moves to an older version.
pub fn apply(update: &RoutingUpdate, state: &RouterState) -> Result<(), String> {
    let current = state.table.load();
    if update.version < current.version {
        return Err(format!(
            "version {} is older than the applied {}",
            update.version, current.version
        ));
    }
    if !update.snapshot {
        return Err("delta updates need a base snapshot this router does not hold".into());
    }
    let table = RoutingTable::build(update, &state.region, &current, &state.slot_freed)?;
    tracing::debug!(
        version = table.version,
        routable = table.routable_nodes,
        stale = table.stale,
        "routing table applied"
    );
    state.table.store(Arc::new(table));
    Ok(())
}
