//! The `fulcrum.v1.Admin` service: operator RPCs behind `fulcrum ctl`.

use std::sync::Arc;

use fulcrum_proto::fulcrum::v1::admin_server::Admin;
use fulcrum_proto::fulcrum::v1::{
    ControlStatus, CordonNodeRequest, DeleteModelPolicyResponse, DeregisterNodeRequest,
    DeregisterNodeResponse, DrainNodeRequest, Endpoint, GetModelPolicyRequest, GetNodeRequest,
    GetRoutingRequest, GetStatusRequest, ListModelPoliciesRequest, ListModelPoliciesResponse,
    ListNodesRequest, ListNodesResponse, ModelPolicy, NodeSpec, NodeStatus, RegionStateRequest,
    RegionStateResponse, RegisterNodeRequest, RegisterNodeResponse, RouterStatus, RoutingUpdate,
    WatchEvent, WatchRequest, WeightOverrideRequest,
};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::health::prober::Prober;
use crate::publisher::Publisher;
use crate::self_registration::NodeReports;
use crate::store::SharedStore;
use crate::{overrides, policies, registry};

/// The admin service of one control-plane replica.
#[derive(Debug, Clone)]
pub struct AdminService {
    store: SharedStore,
    prober: Arc<Prober>,
    publisher: Publisher,
    changed: Arc<Notify>,
    replica_id: String,
    is_leader: tokio::sync::watch::Receiver<bool>,
    reports: NodeReports,
}

impl AdminService {
    /// An admin service over the replica's store, prober and publisher; `changed` wakes the
    /// control loop after a write.
    pub fn new(
        store: SharedStore,
        prober: Arc<Prober>,
        publisher: Publisher,
        changed: Arc<Notify>,
        replica_id: String,
        is_leader: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            prober,
            publisher,
            changed,
            replica_id,
            is_leader,
            reports: NodeReports::default(),
        }
    }

    /// Shows the self-registered nodes' reports from `reports` in node statuses.
    pub fn with_node_reports(mut self, reports: NodeReports) -> Self {
        self.reports = reports;
        self
    }

    /// The status of each node in `nodes` (its spec, and whether it is held by a lease).
    async fn status_of(&self, nodes: Vec<(NodeSpec, bool)>) -> Result<Vec<NodeStatus>, Error> {
        let overrides = overrides::load(self.store.as_ref()).await?;
        // Load is informational here: a store hiccup reading it must not fail the listing.
        let load = match nodes.as_slice() {
            [(spec, _)] => crate::load::of_node(self.store.as_ref(), &spec.id).await,
            _ => crate::load::global(self.store.as_ref()).await,
        }
        .unwrap_or_default();
        // One node's health, not a copy of the fleet's, when one node is asked for.
        let health = match nodes.as_slice() {
            [(spec, _)] => self
                .prober
                .get(&spec.id)
                .map(|h| (spec.id.clone(), h))
                .into_iter()
                .collect(),
            _ => self.prober.snapshot(),
        };
        let table = self.publisher.tables().borrow().clone();
        // Acknowledged versions of this replica's routers, sorted: the routers holding a node's
        // newest entry are those at or past its version.
        let mut acked: Vec<u64> = self
            .publisher
            .routers()
            .iter()
            .map(|r| r.acked_version)
            .collect();
        acked.sort_unstable();
        let routers_total = u32::try_from(acked.len()).unwrap_or(u32::MAX);
        Ok(nodes
            .into_iter()
            .map(|(spec, leased)| {
                let routed = table.as_ref().and_then(|t| t.endpoint(&spec.id));
                let h = health.get(&spec.id).cloned().unwrap_or_default();
                // The entry the routers hold, when there is one: its health, weight and ready
                // models together (the prober may already know newer ones; the table says what
                // routing does now).
                let endpoint = Endpoint {
                    health: routed.map_or(h.state as i32, |e| e.health),
                    weight: routed.map_or(0.0, |e| e.weight),
                    ready_models: routed
                        .map_or_else(|| h.ready_models.clone(), |e| e.ready_models.clone()),
                    spec: Some(spec.clone()),
                };
                let l = load.get(&spec.id).cloned().unwrap_or_default();
                let entry_version = table
                    .as_ref()
                    .and_then(|t| t.entry_version(&spec.id))
                    .unwrap_or(0);
                let routers_current = if entry_version == 0 {
                    0
                } else {
                    let behind = acked.partition_point(|v| *v < entry_version);
                    u32::try_from(acked.len() - behind).unwrap_or(u32::MAX)
                };
                NodeStatus {
                    entry_version,
                    routers_current,
                    routers_total,
                    in_flight: l.in_flight,
                    mean_in_flight: l.mean_in_flight,
                    calls_per_sec: l.calls_per_sec,
                    error_ratio: l.error_ratio(),
                    latency_ms: l.latency_ms.unwrap_or(0.0),
                    cordoned: overrides.cordoned.contains(&spec.id),
                    weight_override: overrides.weights.get(&spec.id).copied(),
                    region_evacuated: overrides.evacuated.contains(&spec.region),
                    endpoint: Some(endpoint),
                    drained: overrides.drained.contains(&spec.id),
                    probe_streak: h.streak,
                    last_error: h.last_error,
                    self_report: self.reports.get(&spec.id).map(|r| r.report),
                    leased,
                }
            })
            .collect())
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("RegisterNodeRequest.spec is required"))?;
        let (created, revision) = registry::register(self.store.as_ref(), &spec).await?;
        tracing::info!(node = %spec.id, address = %spec.address, region = %spec.region, created, "node registered");
        self.changed.notify_one();
        Ok(Response::new(RegisterNodeResponse {
            created,
            revision: revision as u64,
        }))
    }

    async fn deregister_node(
        &self,
        request: Request<DeregisterNodeRequest>,
    ) -> Result<Response<DeregisterNodeResponse>, Status> {
        let id = request.into_inner().id;
        let revision = registry::deregister(self.store.as_ref(), &id).await?;
        tracing::info!(node = %id, "node deregistered");
        self.changed.notify_one();
        Ok(Response::new(DeregisterNodeResponse {
            revision: revision as u64,
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let region = request.into_inner().region;
        let specs: Vec<(NodeSpec, bool)> = registry::list_leased(self.store.as_ref())
            .await?
            .into_iter()
            .filter(|(s, _)| region.is_empty() || s.region == region)
            .collect();
        let nodes = self.status_of(specs).await?;
        Ok(Response::new(ListNodesResponse {
            nodes,
            routing_version: self
                .publisher
                .tables()
                .borrow()
                .as_ref()
                .map_or(0, |t| t.version),
        }))
    }

    async fn get_node(
        &self,
        request: Request<GetNodeRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        self.one_status(&request.into_inner().id).await
    }

    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        let DrainNodeRequest { id, drain } = request.into_inner();
        overrides::set_drain(self.store.as_ref(), &id, drain).await?;
        tracing::info!(node = %id, drain, "drain changed");
        self.changed.notify_one();
        self.one_status(&id).await
    }

    async fn set_model_policy(
        &self,
        request: Request<ModelPolicy>,
    ) -> Result<Response<ModelPolicy>, Status> {
        let policy = policies::set(self.store.as_ref(), &request.into_inner()).await?;
        tracing::info!(model = %policy.model, ?policy, "model policy set");
        self.changed.notify_one();
        Ok(Response::new(policy))
    }

    async fn flush_model_cache(
        &self,
        request: Request<GetModelPolicyRequest>,
    ) -> Result<Response<ModelPolicy>, Status> {
        let model = request.into_inner().model;
        let policy = policies::flush_cache(self.store.as_ref(), &model).await?;
        tracing::info!(model = %model, epoch = policy.cache_epoch, "model's cached answers flushed");
        self.changed.notify_one();
        Ok(Response::new(policy))
    }

    async fn get_model_policy(
        &self,
        request: Request<GetModelPolicyRequest>,
    ) -> Result<Response<ModelPolicy>, Status> {
        let model = request.into_inner().model;
        Ok(Response::new(
            policies::get(self.store.as_ref(), &model).await?,
        ))
    }

    async fn list_model_policies(
        &self,
        _: Request<ListModelPoliciesRequest>,
    ) -> Result<Response<ListModelPoliciesResponse>, Status> {
        Ok(Response::new(ListModelPoliciesResponse {
            policies: policies::list(self.store.as_ref()).await?,
        }))
    }

    async fn delete_model_policy(
        &self,
        request: Request<GetModelPolicyRequest>,
    ) -> Result<Response<DeleteModelPolicyResponse>, Status> {
        let model = request.into_inner().model;
        policies::delete(self.store.as_ref(), &model).await?;
        tracing::info!(model = %model, "model policy removed");
        self.changed.notify_one();
        Ok(Response::new(DeleteModelPolicyResponse {}))
    }

    async fn get_status(
        &self,
        _: Request<GetStatusRequest>,
    ) -> Result<Response<ControlStatus>, Status> {
        let table = self.publisher.tables().borrow().clone();
        // The leader's name comes from the store; unknown (not an error) when it is unreachable.
        let leader_id = self
            .store
            .leader(crate::control_loop::ELECTION)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut routers: Vec<RouterStatus> = self
            .publisher
            .routers()
            .into_iter()
            .map(|r| RouterStatus {
                router_id: r.id,
                region: r.region,
                acked_version: r.acked_version,
                nacks: r.nacks,
                address: r.address,
            })
            .collect();
        routers.sort_by(|a, b| a.router_id.cmp(&b.router_id));
        Ok(Response::new(ControlStatus {
            replica_id: self.replica_id.clone(),
            leader: *self.is_leader.borrow(),
            leader_id,
            routing_version: table.as_ref().map_or(0, |t| t.version),
            stale: table.as_ref().is_some_and(|t| t.stale),
            routers,
        }))
    }

    async fn cordon_node(
        &self,
        request: Request<CordonNodeRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        let CordonNodeRequest { id, cordon } = request.into_inner();
        overrides::set_cordon(self.store.as_ref(), &id, cordon).await?;
        tracing::info!(node = %id, cordon, "cordon changed");
        self.changed.notify_one();
        self.one_status(&id).await
    }

    async fn set_weight_override(
        &self,
        request: Request<WeightOverrideRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        let WeightOverrideRequest { id, weight } = request.into_inner();
        overrides::set_weight(self.store.as_ref(), &id, weight).await?;
        tracing::info!(node = %id, ?weight, "weight override changed");
        self.changed.notify_one();
        self.one_status(&id).await
    }

    async fn set_region_state(
        &self,
        request: Request<RegionStateRequest>,
    ) -> Result<Response<RegionStateResponse>, Status> {
        let RegionStateRequest { region, evacuated } = request.into_inner();
        overrides::set_region(self.store.as_ref(), &region, evacuated).await?;
        tracing::warn!(%region, evacuated, "region state changed");
        self.changed.notify_one();
        let mut evacuated: Vec<String> = overrides::load(self.store.as_ref())
            .await?
            .evacuated
            .into_iter()
            .collect();
        evacuated.sort();
        Ok(Response::new(RegionStateResponse { evacuated }))
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchEvent, Status>> + Send>>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let mut tables = self.publisher.tables();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut last: Option<RoutingUpdate> = None;
            tables.mark_changed();
            while tables.changed().await.is_ok() {
                let Some(p) = tables.borrow_and_update().clone() else {
                    continue;
                };
                let snapshot = p.snapshot();
                for event in describe(last.as_ref(), &snapshot) {
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                last = Some((*snapshot).clone());
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_routing(
        &self,
        _: Request<GetRoutingRequest>,
    ) -> Result<Response<RoutingUpdate>, Status> {
        self.publisher
            .current()
            .map(|t| Response::new((*t).clone()))
            .ok_or_else(|| Status::unavailable("this replica has not read a routing table yet"))
    }
}

/// Events describing the change from `before` to `after` (everything, when `before` is none).
pub fn describe(before: Option<&RoutingUpdate>, after: &RoutingUpdate) -> Vec<WatchEvent> {
    use crate::table::node_id;
    let health = |e: &Endpoint| format!("{:?}", e.health()).to_lowercase();
    let old: std::collections::HashMap<&str, &Endpoint> = before
        .map(|b| b.endpoints.iter().map(|e| (node_id(e), e)).collect())
        .unwrap_or_default();
    let mut events = Vec::new();
    if before.is_none_or(|b| b.stale != after.stale) && (before.is_some() || after.stale) {
        events.push(WatchEvent {
            version: after.version,
            description: if after.stale {
                "the store is unreachable: the routing table is stale".into()
            } else {
                "the store is reachable again".into()
            },
            stale: after.stale,
            ..Default::default()
        });
    }
    for e in &after.endpoints {
        let id = node_id(e);
        let description = match old.get(id) {
            Some(o) if *o == e => continue,
            Some(o) => format!(
                "node {id}: {} → {}, weight {:.1} → {:.1}",
                health(o),
                health(e),
                o.weight,
                e.weight
            ),
            None => format!("node {id}: {}, weight {:.1}", health(e), e.weight),
        };
        events.push(WatchEvent {
            version: after.version,
            description,
            node_id: id.to_owned(),
            health: e.health,
            weight: e.weight,
            ..Default::default()
        });
    }
    let now: std::collections::HashSet<&str> = after.endpoints.iter().map(node_id).collect();
    for id in old.keys().filter(|id| !now.contains(*id)) {
        events.push(WatchEvent {
            version: after.version,
            description: format!("node {id}: removed"),
            node_id: (*id).to_owned(),
            removed: true,
            ..Default::default()
        });
    }
    events
}

impl AdminService {
    async fn one_status(&self, id: &str) -> Result<Response<NodeStatus>, Status> {
        let node = registry::get_leased(self.store.as_ref(), id).await?;
        let mut status = self.status_of(vec![node]).await?;
        status
            .pop()
            .map(Response::new)
            .ok_or_else(|| Status::internal("node status lost"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::HealthState;

    fn ep(id: &str, health: HealthState, weight: f64) -> Endpoint {
        Endpoint {
            spec: Some(NodeSpec {
                id: id.into(),
                ..Default::default()
            }),
            health: health as i32,
            weight,
            ready_models: vec![],
        }
    }

    #[test]
    fn watch_events_describe_what_changed() {
        let a = RoutingUpdate {
            version: 3,
            endpoints: vec![
                ep("x", HealthState::Healthy, 8.0),
                ep("y", HealthState::Healthy, 8.0),
            ],
            ..Default::default()
        };
        assert_eq!(describe(None, &a).len(), 2, "first sight: every node");
        let b = RoutingUpdate {
            version: 5,
            endpoints: vec![
                ep("x", HealthState::Unhealthy, 0.0),
                ep("z", HealthState::Healthy, 4.0),
            ],
            stale: true,
            ..Default::default()
        };
        let events = describe(Some(&a), &b);
        let text: Vec<&str> = events.iter().map(|e| e.description.as_str()).collect();
        assert!(text.iter().any(|t| t.contains("stale")), "{text:?}");
        assert!(
            text.iter()
                .any(|t| t.contains("node x: healthy → unhealthy, weight 8.0 → 0.0")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("node z: healthy, weight 4.0")),
            "{text:?}"
        );
        assert!(
            events.iter().any(|e| e.node_id == "y" && e.removed),
            "{text:?}"
        );
        assert!(
            describe(Some(&b), &b).is_empty(),
            "nothing changed, nothing said"
        );
    }
}
