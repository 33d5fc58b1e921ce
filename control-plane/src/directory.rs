//! The router directory: where each router with an open routing stream can be reached, so
//! that a router asked for another router's background call (`fulcrum.v1.Tasks`) can find the
//! one that holds it.
//!
//! The replica holding a router's stream writes `/fulcrum/v1/routers/<id>` ([`keys::ROUTERS`])
//! with a lease of its own ([`TTL`]), renews it while the stream lasts and revokes it when the
//! stream ends; a replica that dies stops renewing, and the entry expires. Any replica answers
//! `RouterDirectory.FindRouter` from the store, so a router finds routers of other replicas
//! and regions. Only routers that give an address (`RouterHello.address`) are listed.

use std::time::Duration;

use fulcrum_proto::fulcrum::v1::router_directory_server::RouterDirectory;
use fulcrum_proto::fulcrum::v1::{FindRouterRequest, RouterEntry};
use prost::Message;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::keys;
use crate::store::SharedStore;

/// Lease of a directory entry: how long a router stays listed after its replica died (the
/// router itself moves to another replica within seconds and is listed again there). Ten
/// seconds keeps a stale entry short-lived for one renewal every few seconds a router.
pub const TTL: Duration = Duration::from_secs(10);

/// Keeps a router listed while it lives; dropping it (the stream ended) unlists the router.
#[derive(Debug)]
pub struct Listed {
    _stop: oneshot::Sender<()>,
}

/// Lists `entry` in the directory until the returned guard is dropped.
pub fn list(store: SharedStore, entry: RouterEntry) -> Listed {
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(keep_listed(store, entry, stopped));
    Listed { _stop: stop }
}

async fn keep_listed(store: SharedStore, entry: RouterEntry, mut stopped: oneshot::Receiver<()>) {
    let key = format!("{}{}", keys::ROUTERS, entry.router_id);
    let value = entry.encode_to_vec();
    let mut lease = None;
    let mut renew = tokio::time::interval(TTL / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = renew.tick() => {}
        }
        // A lease that lapsed (the store out of reach for a while) is granted again.
        let alive = match lease {
            Some(l) => store.keep_alive(l).await.unwrap_or(false),
            None => false,
        };
        if alive {
            continue;
        }
        let granted = async {
            let l = store.grant_lease(TTL).await?;
            store.put_with_lease(&key, value.clone(), l).await?;
            Ok::<_, crate::store::StoreError>(l)
        };
        match granted.await {
            Ok(l) => lease = Some(l),
            Err(e) => {
                tracing::warn!(router = %entry.router_id, error = %e,
                    "cannot list the router in the directory; retrying");
                lease = None;
            }
        }
    }
    if let Some(l) = lease
        && let Err(e) = store.revoke_lease(l).await
    {
        tracing::debug!(router = %entry.router_id, error = %e,
            "directory entry not revoked; it expires");
    }
}

/// `fulcrum.v1.RouterDirectory`, answered from the store.
#[derive(Debug, Clone)]
pub struct DirectoryService {
    store: SharedStore,
}

impl DirectoryService {
    /// The service over `store`.
    pub fn new(store: SharedStore) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl RouterDirectory for DirectoryService {
    async fn find_router(
        &self,
        request: Request<FindRouterRequest>,
    ) -> Result<Response<RouterEntry>, Status> {
        let id = request.into_inner().router_id;
        if id.is_empty() {
            return Err(Error::InvalidArgument("router_id is required".into()).into());
        }
        let key = format!("{}{id}", keys::ROUTERS);
        let Some(kv) = self.store.get(&key).await.map_err(Error::from)? else {
            return Err(Error::RouterNotFound(id).into());
        };
        let entry = RouterEntry::decode(kv.value.as_slice())
            .map_err(|source| Error::Decode { key, source })?;
        Ok(Response::new(entry))
    }
}
