//! Active health probing: one task per registered node, asking on every interval
//! `grpc.health.v1.Health/Check` (overall server health), the Open Inference Protocol's
//! `ServerReady`, and `ModelReady` for each model the node declares.
//!
//! A node registered without models has them listed by its server on every probe, with the
//! model repository extension's `RepositoryIndex` (Triton and MLServer both answer it), so
//! models loaded or unloaded on the server show up at the routers without a registration.
//!
//! A server that does not implement grpc.health.v1 (UNIMPLEMENTED) is judged by the OIP calls
//! alone, since Triton and MLServer differ in what they expose.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::NodeSpec;
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_proto::inference::{ModelReadyRequest, RepositoryIndexRequest, ServerReadyRequest};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{NodeHealth, Observation, Thresholds};

/// Most models taken from one server's `RepositoryIndex`: far more than a server loads at once,
/// and a bound on what a misbehaving server can make the control plane store and publish.
const MAX_DISCOVERED_MODELS: usize = 1024;

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

/// Runs the probe tasks and holds their results.
#[derive(Debug)]
pub struct Prober {
    config: ProbeConfig,
    health: HealthMap,
    tasks: Mutex<HashMap<String, (NodeSpec, JoinHandle<()>)>>,
    changed: Arc<Notify>,
}

impl Prober {
    /// A prober that signals `changed` whenever a node's routable state changes.
    pub fn new(config: ProbeConfig, changed: Arc<Notify>) -> Self {
        Self {
            config,
            health: Arc::default(),
            tasks: Mutex::default(),
            changed,
        }
    }

    /// Probes exactly the nodes in `specs`: starts tasks for new (or changed) nodes and stops
    /// those of nodes that are gone.
    pub fn sync(&self, specs: &[NodeSpec]) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        let wanted: HashMap<&str, &NodeSpec> = specs.iter().map(|s| (s.id.as_str(), s)).collect();
        tasks.retain(|id, (spec, handle)| {
            let keep = wanted
                .get(id.as_str())
                .is_some_and(|w| w.address == spec.address && w.models == spec.models);
            if !keep {
                handle.abort();
                self.health
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(id);
            }
            keep
        });
        for spec in specs {
            if !tasks.contains_key(&spec.id) {
                let handle = tokio::spawn(probe_loop(
                    spec.clone(),
                    self.config,
                    self.health.clone(),
                    self.changed.clone(),
                ));
                tasks.insert(spec.id.clone(), (spec.clone(), handle));
            }
        }
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

async fn probe_loop(spec: NodeSpec, config: ProbeConfig, health: HealthMap, changed: Arc<Notify>) {
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
        let (obs, discovered) = tokio::time::timeout(config.timeout, probe(channel.clone(), &spec))
            .await
            .unwrap_or_else(|_| {
                let why = format!("probe timed out after {:?}", config.timeout);
                (Observation::Fail(why), None)
            });
        let did_change = {
            let mut map = health.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = map.entry(spec.id.clone()).or_default();
            let before = entry.state;
            let mut did_change = false;
            if let Some(models) = discovered
                && models != entry.discovered
            {
                tracing::info!(node = %spec.id, ?models, "models listed by the server");
                entry.discovered = models;
                did_change = true;
            }
            did_change |= entry.observe(obs, config.thresholds);
            if entry.state != before {
                tracing::info!(node = %spec.id, from = ?before, to = ?entry.state,
                    error = %entry.last_error, "node health changed");
            }
            did_change
        };
        if did_change {
            changed.notify_one();
        }
    }
}

/// One probe of one node: its verdict, and the models its server listed when it was registered
/// without any (`None` when it was not, or when they could not be listed).
async fn probe(channel: Channel, spec: &NodeSpec) -> (Observation, Option<Vec<String>>) {
    let mut oip = GrpcInferenceServiceClient::new(channel.clone());
    let discovered = if spec.models.is_empty() {
        match list_models(&mut oip).await {
            Ok(models) => Some(models),
            Err(why) => return (Observation::Fail(why), None),
        }
    } else {
        None
    };
    let models: Vec<String> = match &discovered {
        Some(models) => models.clone(),
        None => spec.models.iter().map(|m| m.name.clone()).collect(),
    };
    let obs = check(channel, oip, &models).await;
    (obs, discovered)
}

/// The models a server lists (`RepositoryIndex`), whatever their state, sorted; names that
/// could not be registered are skipped.
async fn list_models(oip: &mut GrpcInferenceServiceClient<Channel>) -> Result<Vec<String>, String> {
    let request = RepositoryIndexRequest {
        repository_name: String::new(),
        ready: false,
    };
    let index = match oip.repository_index(request).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::Unimplemented => {
            return Err(
                "registered without models, and the server cannot list them \
                 (RepositoryIndex is unimplemented): register the node with its models"
                    .into(),
            );
        }
        Err(s) => return Err(format!("RepositoryIndex: {}", s.message())),
    };
    let mut models: Vec<String> = index
        .models
        .into_iter()
        .map(|m| m.name)
        .filter(|name| crate::registry::check_name("model name", name, true).is_ok())
        .collect();
    models.sort();
    models.dedup();
    models.truncate(MAX_DISCOVERED_MODELS);
    if models.is_empty() {
        return Err("registered without models, and the server lists none".into());
    }
    Ok(models)
}

/// Checks a server's health and the readiness of `models` on it.
async fn check(
    channel: Channel,
    mut oip: GrpcInferenceServiceClient<Channel>,
    models: &[String],
) -> Observation {
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
    match oip.server_ready(ServerReadyRequest {}).await {
        Ok(r) if r.get_ref().ready => {}
        Ok(_) => return Observation::Fail("ServerReady says not ready".into()),
        Err(s) => return Observation::Fail(format!("ServerReady: {}", s.message())),
    }
    let mut ready_models = Vec::new();
    for name in models {
        let req = ModelReadyRequest {
            name: name.clone(),
            version: String::new(),
        };
        if let Ok(r) = oip.model_ready(req).await
            && r.get_ref().ready
        {
            ready_models.push(name.clone());
        }
    }
    if ready_models.is_empty() {
        Observation::Fail("no model of the node is ready".into())
    } else if ready_models.len() < models.len() {
        Observation::Degraded { ready_models }
    } else {
        Observation::Pass { ready_models }
    }
}
