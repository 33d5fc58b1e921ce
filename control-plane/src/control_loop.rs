//! The control loop: read the registry, keep the prober in step with it, turn specs, health and
//! overrides into the routing table, and write the table to the store when it changed.
//!
//! Writes happen only on change and are batched: a burst of health changes (a whole region
//! going down) within [`BATCH_WINDOW`] becomes one write, so the store's write rate is bounded
//! by the window, not by the number of nodes.

use std::sync::Arc;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{Endpoint, ModelPolicy, RoutingUpdate};
use prost::Message;
use tokio::sync::Notify;

use crate::error::Error;
use crate::health::prober::Prober;
use crate::store::SharedStore;
use crate::{keys, policies, registry, table};

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

/// Runs the control loop until the task is dropped.
pub async fn run(store: SharedStore, prober: Arc<Prober>, changed: Arc<Notify>) {
    let mut last: Option<Table> = match current_table(&store).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the routing table; will write a fresh one");
            None
        }
    };
    loop {
        match reconcile(&store, &prober, last.as_ref()).await {
            Ok(Some(written)) => last = Some(written),
            Ok(None) => {}
            // Static stability: keep the last table (routers keep theirs) and try again.
            Err(e) => {
                tracing::warn!(error = %e, "control loop: store unavailable, keeping last state")
            }
        }
        tokio::select! {
            () = changed.notified() => tokio::time::sleep(BATCH_WINDOW).await,
            () = tokio::time::sleep(RESYNC_INTERVAL) => {}
        }
    }
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

/// One pass; returns the table it wrote, if it wrote one.
async fn reconcile(
    store: &SharedStore,
    prober: &Prober,
    last: Option<&Table>,
) -> Result<Option<Table>, Error> {
    let specs = registry::list(store.as_ref()).await?;
    let drained = registry::drained(store.as_ref()).await?;
    let policies = policies::list(store.as_ref()).await?;
    prober.sync(&specs);
    let next = Table {
        endpoints: table::build(&specs, &prober.snapshot(), &drained),
        policies,
    };
    if last == Some(&next) {
        return Ok(None);
    }
    let update = RoutingUpdate {
        version: 0, // the key's mod revision is the version
        snapshot: true,
        endpoints: next.endpoints.clone(),
        removed: vec![],
        stale: false,
        policies: next.policies.clone(),
    };
    let rev = store.put(keys::ROUTING, update.encode_to_vec()).await?;
    tracing::debug!(
        version = rev,
        nodes = update.endpoints.len(),
        "routing table written"
    );
    Ok(Some(next))
}
