//! Active health probing: one task per registered node, asking on every interval
//! `grpc.health.v1.Health/Check` (overall server health), the Open Inference Protocol's
//! `ServerReady`, and `ModelReady` for each model the node declares.
//!
//! A server that does not implement grpc.health.v1 (UNIMPLEMENTED) is judged by the OIP calls
//! alone, since Triton and MLServer differ in what they expose.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::NodeSpec;
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_proto::inference::{ModelReadyRequest, ServerReadyRequest};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{NodeHealth, Observation, Thresholds};

/// How and how often nodes are probed.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    /// Time between two probes of one node.
    pub interval: Duration,
    /// Deadline of one probe (all its calls together).
    pub timeout: Duration,
    /// Streaks that change a node's state.
    pub thresholds: Thresholds,
}

impl Default for ProbeConfig {
    /// One probe a second with a one-second deadline: with the default thresholds a dead node is
    /// out of the routing table within about two seconds, while probe traffic stays negligible
    /// (three small calls a second per node). Routers' own failure handling covers the gap.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            thresholds: Thresholds::default(),
        }
    }
}

type HealthMap = Arc<Mutex<HashMap<String, NodeHealth>>>;

/// Nodes whose routable state changed since the control loop last asked.
type Changed = Arc<Mutex<HashSet<String>>>;

/// Runs the probe tasks and holds their results.
#[derive(Debug)]
pub struct Prober {
    config: ProbeConfig,
    health: HealthMap,
    tasks: Mutex<HashMap<String, (NodeSpec, JoinHandle<()>)>>,
    changed: Arc<Notify>,
    changed_ids: Changed,
}

impl Prober {
    /// A prober that signals `changed` whenever a node's routable state changes.
    pub fn new(config: ProbeConfig, changed: Arc<Notify>) -> Self {
        Self {
            config,
            health: Arc::default(),
            tasks: Mutex::default(),
            changed,
            changed_ids: Changed::default(),
        }
    }

    /// Probes exactly the nodes in `specs`: starts tasks for new (or changed) nodes and stops
    /// those of nodes that are gone.
    pub fn sync(&self, specs: &[NodeSpec]) {
        let wanted: HashSet<&str> = specs.iter().map(|s| s.id.as_str()).collect();
        let gone: Vec<String> = self
            .lock_tasks()
            .keys()
            .filter(|id| !wanted.contains(id.as_str()))
            .cloned()
            .collect();
        self.remove(&gone);
        self.upsert(specs);
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, (NodeSpec, JoinHandle<()>)>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops probing the nodes `ids` and forgets their health.
    pub fn remove(&self, ids: &[String]) {
        let mut tasks = self.lock_tasks();
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            if let Some((_, handle)) = tasks.remove(id) {
                handle.abort();
            }
            health.remove(id);
        }
    }

    /// Probes the nodes in `specs`: starts a task for each new node, and restarts that of a
    /// node whose address or models changed (forgetting its health).
    pub fn upsert(&self, specs: &[NodeSpec]) {
        let mut tasks = self.lock_tasks();
        let mut start: Vec<&NodeSpec> = Vec::new();
        for spec in specs {
            match tasks.get(&spec.id) {
                Some((s, _)) if s.address == spec.address && s.models == spec.models => {}
                Some(_) => {
                    if let Some((_, handle)) = tasks.remove(&spec.id) {
                        handle.abort();
                    }
                    self.health
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&spec.id);
                    start.push(spec);
                }
                None => start.push(spec),
            }
        }
        for spec in start {
            let handle = tokio::spawn(probe_loop(
                spec.clone(),
                self.config,
                Probed {
                    health: self.health.clone(),
                    changed: self.changed.clone(),
                    changed_ids: self.changed_ids.clone(),
                },
            ));
            tasks.insert(spec.id.clone(), (spec.clone(), handle));
        }
    }

    /// The nodes whose routable state (health, ready models) changed since the last call.
    pub fn take_changed(&self) -> HashSet<String> {
        std::mem::take(
            &mut *self
                .changed_ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// What is known of one node.
    pub fn get(&self, id: &str) -> Option<NodeHealth> {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// What is known of every probed node.
    pub fn snapshot(&self) -> HashMap<String, NodeHealth> {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (_, (_, handle)) in tasks.drain() {
            handle.abort();
        }
    }
}

/// Where a probe task reports.
struct Probed {
    health: HealthMap,
    changed: Arc<Notify>,
    changed_ids: Changed,
}

async fn probe_loop(spec: NodeSpec, config: ProbeConfig, to: Probed) {
    let channel = match Endpoint::from_shared(format!("http://{}", spec.address)) {
        Ok(e) => e.connect_timeout(config.timeout).connect_lazy(),
        Err(e) => {
            // Unreachable in practice: addresses are validated at registration.
            tracing::error!(node = %spec.id, error = %e, "cannot probe: bad address");
            return;
        }
    };
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let obs = tokio::time::timeout(config.timeout, probe(channel.clone(), &spec))
            .await
            .unwrap_or_else(|_| {
                Observation::Fail(format!("probe timed out after {:?}", config.timeout))
            });
        let did_change = {
            let mut map = to.health.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = map.entry(spec.id.clone()).or_default();
            let before = entry.state;
            let did_change = entry.observe(obs, config.thresholds);
            if entry.state != before {
                tracing::info!(node = %spec.id, from = ?before, to = ?entry.state,
                    error = %entry.last_error, "node health changed");
            }
            did_change
        };
        if did_change {
            to.changed_ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(spec.id.clone());
            to.changed.notify_one();
        }
    }
}

/// One probe of one node.
async fn probe(channel: Channel, spec: &NodeSpec) -> Observation {
    let mut health = HealthClient::new(channel.clone());
    match health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(r) if r.get_ref().status() == ServingStatus::Serving => {}
        Ok(r) => {
            return Observation::Fail(format!("grpc.health.v1 says {:?}", r.get_ref().status()));
        }
        Err(s) if s.code() == Code::Unimplemented => {}
        Err(s) => return Observation::Fail(format!("health check: {}", s.message())),
    }
    let mut oip = GrpcInferenceServiceClient::new(channel);
    match oip.server_ready(ServerReadyRequest {}).await {
        Ok(r) if r.get_ref().ready => {}
        Ok(_) => return Observation::Fail("ServerReady says not ready".into()),
        Err(s) => return Observation::Fail(format!("ServerReady: {}", s.message())),
    }
    let mut ready_models = Vec::new();
    for m in &spec.models {
        let req = ModelReadyRequest {
            name: m.name.clone(),
            version: String::new(),
        };
        if let Ok(r) = oip.model_ready(req).await
            && r.get_ref().ready
        {
            ready_models.push(m.name.clone());
        }
    }
    if ready_models.is_empty() {
        Observation::Fail("no declared model is ready".into())
    } else if ready_models.len() < spec.models.len() {
        Observation::Degraded { ready_models }
    } else {
        Observation::Pass { ready_models }
    }
}
