//! The control loop: read the registry, keep the prober in step with it, turn specs, health and
//! overrides into the routing table, and write the table to the store when it changed.
//!
//! Only the leader runs it. Every replica campaigns in the store's election; the one elected
//! probes and writes, each write fenced by its leadership so that a replica that lost the
//! leadership (its lease expired while it was cut off) cannot overwrite its successor's table.
//! A replica that loses the leadership stops probing and campaigns again.
//!
//! Writes happen only on change and are batched: a burst of health changes (a whole region
//! going down) within [`BATCH_WINDOW`] becomes one write, so the store's write rate is bounded
//! by the window, not by the number of nodes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{Endpoint, ModelPolicy, RoutingUpdate};
use prost::Message;
use tokio::sync::Notify;

use crate::error::Error;
use crate::health::prober::Prober;
use crate::store::{Fence, Leadership, SharedStore};
use crate::{keys, load, overrides, policies, registry, table};

/// What the loop last wrote: the endpoints and the policies.
#[derive(Debug, Clone, PartialEq)]
struct Table {
    endpoints: Vec<Endpoint>,
    policies: Vec<ModelPolicy>,
}

/// How long to gather further changes after the first one before writing the table. 50 ms is
/// below what a caller notices in failover (probes already take a second) and caps the routing
/// writes at 20 per second however many nodes change.
const BATCH_WINDOW: Duration = Duration::from_millis(50);

/// Full re-read of the registry even when nothing signalled a change: picks up writes made by
/// other replicas or directly in the store. One second keeps that lag small at a cost of two
/// range reads a second.
const RESYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The election every replica campaigns in.
pub const ELECTION: &str = "/fulcrum/v1/leader";

/// Pause before campaigning again after a store error.
const CAMPAIGN_RETRY: Duration = Duration::from_secs(1);

/// Campaigns, leads while elected, and campaigns again, until the task is dropped.
/// `is_leader` tells the rest of the replica whether it leads.
pub async fn run(
    store: SharedStore,
    prober: Arc<Prober>,
    changed: Arc<Notify>,
    replica_id: String,
    leader_ttl: Duration,
    is_leader: tokio::sync::watch::Sender<bool>,
) {
    loop {
        let leadership = match store.campaign(ELECTION, &replica_id, leader_ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot campaign for leadership; retrying");
                tokio::time::sleep(CAMPAIGN_RETRY).await;
                continue;
            }
        };
        tracing::info!(replica = %replica_id, fence = ?leadership.fence, "elected leader");
        is_leader.send_replace(true);
        lead(&store, &prober, &changed, &leadership).await;
        is_leader.send_replace(false);
        prober.sync(&[]);
        tracing::warn!(replica = %replica_id, "leadership lost; campaigning again");
        // Give it up explicitly too, in case only the fence failed.
        if let Err(e) = store.resign(leadership).await {
            tracing::debug!(error = %e, "resign after losing leadership");
        }
    }
}

/// Leads until the leadership is lost.
async fn lead(store: &SharedStore, prober: &Prober, changed: &Notify, leadership: &Leadership) {
    let mut lost = leadership.lost.clone();
    // Damping measures time from the table last written.
    let mut written_at = tokio::time::Instant::now();
    let mut last: Option<Table> = match current_table(store).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the routing table; will write a fresh one");
            None
        }
    };
    loop {
        if *lost.borrow() {
            return;
        }
        let elapsed = written_at.elapsed();
        match reconcile(store, prober, &leadership.fence, last.as_ref(), elapsed).await {
            Ok(Written::Table(t)) => {
                last = Some(t);
                written_at = tokio::time::Instant::now();
            }
            Ok(Written::Nothing) => {}
            Ok(Written::Fenced) => {
                tracing::warn!("a fenced write was refused: another replica leads");
                return;
            }
            // Static stability: keep the last table (routers keep theirs) and try again.
            Err(e) => {
                tracing::warn!(error = %e, "control loop: store unavailable, keeping last state")
            }
        }
        tokio::select! {
            () = changed.notified() => tokio::time::sleep(BATCH_WINDOW).await,
            () = tokio::time::sleep(RESYNC_INTERVAL) => {}
            lost_now = lost.changed() => {
                if lost_now.is_err() || *lost.borrow() {
                    return;
                }
            }
        }
    }
}

/// What one pass of the loop did.
enum Written {
    /// Wrote a new table.
    Table(Table),
    /// Nothing changed.
    Nothing,
    /// The write was refused: this replica no longer leads.
    Fenced,
}

async fn current_table(store: &SharedStore) -> Result<Option<Table>, Error> {
    let Some(kv) = store.get(keys::ROUTING).await? else {
        return Ok(None);
    };
    let update = RoutingUpdate::decode(kv.value.as_slice()).map_err(|source| Error::Decode {
        key: kv.key.clone(),
        source,
    })?;
    Ok(Some(Table {
        endpoints: update.endpoints,
        policies: update.policies,
    }))
}

/// One pass: recompute the table and write it (fenced) if it changed.
async fn reconcile(
    store: &SharedStore,
    prober: &Prober,
    fence: &Fence,
    last: Option<&Table>,
    elapsed: Duration,
) -> Result<Written, Error> {
    let specs = registry::list(store.as_ref()).await?;
    let overrides = overrides::load(store.as_ref()).await?;
    let policies = policies::list(store.as_ref()).await?;
    let load = load::global(store.as_ref()).await?;
    prober.sync(&specs);
    let previous: HashMap<String, f64> = last
        .map(|t| {
            t.endpoints
                .iter()
                .map(|e| (table::node_id(e).to_owned(), e.weight))
                .collect()
        })
        .unwrap_or_default();
    let next = Table {
        endpoints: table::build(&table::Inputs {
            specs: &specs,
            health: &prober.snapshot(),
            overrides: &overrides,
            load: &load,
            previous: &previous,
            elapsed,
        }),
        policies,
    };
    if last == Some(&next) {
        return Ok(Written::Nothing);
    }
    let update = RoutingUpdate {
        version: 0, // the key's mod revision is the version
        snapshot: true,
        endpoints: next.endpoints.clone(),
        removed: vec![],
        stale: false,
        policies: next.policies.clone(),
        heartbeat: false,
        base_version: 0,
    };
    let Some(rev) = store
        .put_fenced(fence, keys::ROUTING, update.encode_to_vec())
        .await?
    else {
        return Ok(Written::Fenced);
    };
    tracing::debug!(
        version = rev,
        nodes = update.endpoints.len(),
        "routing table written"
    );
    Ok(Written::Table(next))
}
