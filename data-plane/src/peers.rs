//! Other routers: where they are (the control plane's router directory) and a channel to each,
//! for the background calls ([`crate::tasks`]) that another router holds. A caller asking one
//! router for a task another one holds is answered by the holder, through this router.
//!
//! Look-ups go to the control-plane replicas in order (with the stream token, as the routing
//! stream does) and are remembered for [`ADDRESS_TTL`]; channels are tonic's, one per peer
//! address, connected when first used. Both caches are bounded: router ids come from task ids,
//! that is from the network.

use std::time::Duration;

use fulcrum_proto::fulcrum::v1::FindRouterRequest;
use fulcrum_proto::fulcrum::v1::router_directory_client::RouterDirectoryClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::PeerError;

/// How long a peer's address is remembered. A router that restarts elsewhere (a new address
/// under the same id) is found again within this; it is short next to how long a router lives.
pub const ADDRESS_TTL: Duration = Duration::from_secs(30);

/// How long "no such router" is remembered: a caller polling a stopped router's task in a
/// loop costs the control plane one look-up every few seconds, not one a poll; a router that
/// starts under that id is found at most this late.
pub const MISSING_TTL: Duration = Duration::from_secs(5);

/// Most peers remembered (addresses, channels): far more routers than a fleet has.
const MAX_PEERS: u64 = 1_000;

/// Time to connect to a replica or a peer: both are in the fleet's network, a few milliseconds
/// away at most; a second tells "unreachable" from "slow" without holding a caller long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Time a look-up may take at a replica (one store read).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The routers this one knows of.
#[derive(Debug)]
pub struct Peers {
    /// The control-plane replicas, in order, and the stream token presented to them.
    replicas: Vec<Channel>,
    token: Option<http::HeaderValue>,
    /// Router id → its address.
    addresses: moka::sync::Cache<String, String>,
    /// Address → channel.
    channels: moka::sync::Cache<String, Channel>,
    /// Router ids the directory did not list, lately.
    missing: moka::sync::Cache<String, ()>,
}

impl Peers {
    /// Peers found through the replicas `control` (`host:port`), presenting `token`.
    pub fn new(control: &[String], token: Option<&str>) -> Self {
        let replicas = control
            .iter()
            .filter_map(|addr| {
                Endpoint::from_shared(format!("http://{addr}"))
                    .ok()
                    .map(|e| e.connect_timeout(CONNECT_TIMEOUT).connect_lazy())
            })
            .collect();
        let token = token.and_then(|t| {
            let mut v = http::HeaderValue::from_str(&format!("Bearer {t}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        Self {
            replicas,
            token,
            addresses: moka::sync::Cache::builder()
                .max_capacity(MAX_PEERS)
                .time_to_live(ADDRESS_TTL)
                .build(),
            channels: moka::sync::Cache::builder().max_capacity(MAX_PEERS).build(),
            missing: moka::sync::Cache::builder()
                .max_capacity(MAX_PEERS)
                .time_to_live(MISSING_TTL)
                .build(),
        }
    }

    /// A channel to the router `id`, found through the directory.
    pub async fn channel(&self, id: &str) -> Result<(String, Channel), PeerError> {
        let address = match self.addresses.get(id) {
            Some(a) => a,
            None if self.missing.contains_key(id) => {
                return Err(PeerError::NotListed(id.to_owned()));
            }
            None => {
                let found = self.find(id).await;
                if let Err(PeerError::NotListed(_)) = &found {
                    self.missing.insert(id.to_owned(), ());
                }
                let a = found?;
                self.addresses.insert(id.to_owned(), a.clone());
                a
            }
        };
        if let Some(c) = self.channels.get(&address) {
            return Ok((address, c));
        }
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| PeerError::BadAddress {
                router: id.to_owned(),
                address: address.clone(),
                why: e.to_string(),
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_lazy();
        self.channels.insert(address.clone(), channel.clone());
        Ok((address, channel))
    }

    /// Forgets where `id` is (its address failed us), so the next call looks again.
    pub fn forget(&self, id: &str) {
        self.addresses.invalidate(id);
    }

    async fn find(&self, id: &str) -> Result<String, PeerError> {
        let mut last = None;
        for replica in &self.replicas {
            let mut request = tonic::Request::new(FindRouterRequest {
                router_id: id.to_owned(),
            });
            request.set_timeout(LOOKUP_TIMEOUT);
            if let Some(t) = &self.token {
                request
                    .metadata_mut()
                    .as_mut()
                    .insert(http::header::AUTHORIZATION, t.clone());
            }
            match RouterDirectoryClient::new(replica.clone())
                .find_router(request)
                .await
            {
                Ok(entry) => return Ok(entry.into_inner().address),
                // The directory is shared: one replica's "not listed" is every replica's.
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(PeerError::NotListed(id.to_owned()));
                }
                Err(s) => last = Some(s),
            }
        }
        Err(PeerError::DirectoryUnreachable {
            router: id.to_owned(),
            why: last.map_or_else(
                || "no control plane is configured".to_owned(),
                |s| format!("{:?}: {}", s.code(), s.message()),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use fulcrum_proto::fulcrum::v1::RouterEntry;
    use fulcrum_proto::fulcrum::v1::router_directory_server::{
        RouterDirectory, RouterDirectoryServer,
    };
    use tonic::{Request, Response, Status};

    use super::*;

    /// A directory that lists `r1`, not `gone`, fails for anything else, and counts look-ups.
    #[derive(Clone, Default)]
    struct Directory {
        lookups: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl RouterDirectory for Directory {
        async fn find_router(
            &self,
            request: Request<FindRouterRequest>,
        ) -> Result<Response<RouterEntry>, Status> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            match request.into_inner().router_id.as_str() {
                "r1" => Ok(Response::new(RouterEntry {
                    router_id: "r1".into(),
                    region: "a".into(),
                    address: "127.0.0.1:9".into(),
                })),
                "gone" => Err(Status::not_found("no router gone")),
                _ => Err(Status::unavailable("the store is down")),
            }
        }
    }

    async fn directory() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let dir = Directory::default();
        let lookups = dir.lookups.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RouterDirectoryServer::new(dir))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr, lookups)
    }

    #[tokio::test]
    async fn addresses_and_absences_are_remembered_failures_are_not() {
        let (addr, lookups) = directory().await;
        let peers = Peers::new(&[addr], None);
        let looked = || lookups.load(Ordering::SeqCst);

        // Listed: looked up once, then remembered; forgotten, looked up again.
        assert_eq!(peers.channel("r1").await.unwrap().0, "127.0.0.1:9");
        assert_eq!(peers.channel("r1").await.unwrap().0, "127.0.0.1:9");
        assert_eq!(looked(), 1);
        peers.forget("r1");
        peers.channel("r1").await.unwrap();
        assert_eq!(looked(), 2);

        // Not listed: one look-up answers every poll for MISSING_TTL.
        for _ in 0..3 {
            assert!(matches!(
                peers.channel("gone").await,
                Err(PeerError::NotListed(id)) if id == "gone"
            ));
        }
        assert_eq!(looked(), 3);

        // The directory failing is not remembered: each call asks again.
        for _ in 0..2 {
            assert!(matches!(
                peers.channel("other").await,
                Err(PeerError::DirectoryUnreachable { .. })
            ));
        }
        assert_eq!(looked(), 5);
    }
}
