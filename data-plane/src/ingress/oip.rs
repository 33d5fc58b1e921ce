//! `inference.GRPCInferenceService` at the router.
//!
//! `ServerLive`, `ServerReady` and `ServerMetadata` are answered by the router itself (ready:
//! it holds a table with at least one routable node). `ModelReady` and `ModelMetadata` are
//! asked of a node that serves the model. `ModelInfer` is validated, routed (own region first)
//! and forwarded; `ModelStreamInfer` opens one upstream stream per model named on the client's
//! stream and multiplexes the answers back. `RepositoryIndex` lists the models the router
//! routes: `READY` when a node is routable for it, `UNAVAILABLE` otherwise. Triton's
//! `ModelConfig` is asked of a node that serves the model, and its answer passed on as the node
//! encoded it. The rest of Triton's service acts on one server's own state (statistics, loading
//! models, shared memory, trace and log settings): [`unserved`] answers it with UNIMPLEMENTED,
//! saying why. Every answer from a node carries `x-fulcrum-node` and `x-fulcrum-region`; a
//! unary answer also `x-fulcrum-attempts`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use fulcrum_proto::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    ModelStreamInferResponse, RepositoryIndexRequest, RepositoryIndexResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse, repository_index_response::ModelIndex,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::fallback::Reason;
use super::forward::{self, tag};
use super::stream_dialect;
use crate::auth::Caller;
use crate::endpoint::InFlight;
use crate::error::RouteError;
use crate::priority::Priority;
use crate::router::RouterState;
use crate::table::RoutedNode;
use crate::validate;

/// Responses buffered per client stream; backpressure beyond that reaches the nodes.
const STREAM_BUFFER: usize = 16;

/// Response metadata naming the node that answered.
pub const NODE_HEADER: &str = "x-fulcrum-node";
/// Response metadata naming that node's region.
pub const REGION_HEADER: &str = "x-fulcrum-region";
/// Response header of a unary call saying how many attempts the router started for it
/// (retries and hedges included), so that clients and benchmarks can see failover at work.
pub const ATTEMPTS_HEADER: &str = "x-fulcrum-attempts";

/// The service's gRPC path prefix.
const SERVICE_PREFIX: &str = "/inference.GRPCInferenceService/";

/// The methods of `inference.GRPCInferenceService` the router serves.
const SERVED: [&str; 9] = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "RepositoryIndex",
    "ModelConfig",
];

/// Triton's methods that read or change one server's own state, and what that state is.
const NODE_LOCAL: [(&str, &str); 11] = [
    (
        "ModelStatistics",
        "its statistics count the calls that one server served",
    ),
    ("RepositoryModelLoad", "it loads a model into one server"),
    (
        "RepositoryModelUnload",
        "it unloads a model from one server",
    ),
    ("SystemSharedMemoryStatus", "shared memory is one machine's"),
    (
        "SystemSharedMemoryRegister",
        "shared memory is one machine's",
    ),
    (
        "SystemSharedMemoryUnregister",
        "shared memory is one machine's",
    ),
    ("CudaSharedMemoryStatus", "GPU memory is one machine's"),
    ("CudaSharedMemoryRegister", "GPU memory is one machine's"),
    ("CudaSharedMemoryUnregister", "GPU memory is one machine's"),
    ("TraceSetting", "trace settings are one server's"),
    ("LogSettings", "log settings are one server's"),
];

/// UNIMPLEMENTED, saying why, for a call to `path` on `inference.GRPCInferenceService` that
/// the router does not serve (tonic's generated service would answer it with no message);
/// `None` for every other path.
pub fn unserved(path: &str) -> Option<Status> {
    let method = path.strip_prefix(SERVICE_PREFIX)?;
    if SERVED.contains(&method) {
        return None;
    }
    Some(Status::unimplemented(
        match NODE_LOCAL.iter().find(|(m, _)| *m == method) {
            Some((_, why)) => format!(
                "a Fulcrum router does not serve inference.GRPCInferenceService/{method}: \
                 {why}, and the router spreads calls over many; call a node directly"
            ),
            None => format!(
                "inference.GRPCInferenceService has no method {method:?} that a Fulcrum router \
                 serves (it serves {})",
                SERVED.join(", ")
            ),
        },
    ))
}

/// The router's Open Inference Protocol service.
#[derive(Debug, Clone)]
pub struct OipService {
    state: Arc<RouterState>,
}

impl OipService {
    /// A service routing with `state`.
    pub fn new(state: Arc<RouterState>) -> Self {
        Self { state }
    }

    fn client(&self, node: &RoutedNode) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(node.conn.channel())
            .max_decoding_message_size(self.state.max_message_size)
            .max_encoding_message_size(self.state.max_message_size)
    }
}

impl OipService {
    /// Asks a node serving the model the request names (`name`; required) with `call`.
    async fn ask_a_node<Req, T, Fut>(
        &self,
        request: Request<Req>,
        name: impl Fn(&Req) -> &str,
        call: impl Fn(GrpcInferenceServiceClient<Channel>, Request<Req>) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Req: Clone,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let (metadata, extensions, message) = request.into_parts();
        let model = name(&message).to_owned();
        if model.is_empty() {
            return Err(RouteError::InvalidRequest("model name is required".into()).into());
        }
        self.state.check_model(&extensions, &model)?;
        forward::unary(&self.state, &model, &metadata, None, message, |node, r| {
            call(self.client(&node), r)
        })
        .await
    }
}

type StreamOut = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for OipService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = self.state.table.load().routable_nodes > 0;
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        self.state.check_model(&extensions, &message.name)?;
        let routable = self
            .state
            .table
            .load()
            .models
            .get(&message.name)
            .is_some_and(|r| r.is_routable());
        if !routable {
            // Unknown, or no healthy node: the honest answer to "is it ready?" is no.
            return Ok(Response::new(ModelReadyResponse { ready: false }));
        }
        let model = message.name.clone();
        let answer = forward::unary(&self.state, &model, &metadata, None, message, |node, r| {
            let mut c = self.client(&node);
            async move { c.model_ready(r).await }
        })
        .await;
        match answer {
            // Every node of the model is out of reach (ejected, refusing connections, or
            // unavailable when asked): not ready, which is an answer, not an error.
            Err(s) if s.code() == tonic::Code::Unavailable => {
                Ok(Response::new(ModelReadyResponse { ready: false }))
            }
            other => other,
        }
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        // A caller whose token lists models sees those only.
        let caller = request.extensions().get::<Arc<Caller>>().cloned();
        let request = request.into_inner();
        if !request.repository_name.is_empty() {
            return Err(RouteError::UnknownRepository(request.repository_name).into());
        }
        let table = self.state.table.load();
        let mut models: Vec<ModelIndex> = table
            .models
            .iter()
            .filter(|(_, route)| !request.ready || route.is_routable())
            .filter(|(name, _)| caller.as_ref().is_none_or(|c| c.may_call(name)))
            .map(|(name, route)| {
                let ready = route.is_routable();
                ModelIndex {
                    name: name.clone(),
                    version: String::new(),
                    state: if ready { "READY" } else { "UNAVAILABLE" }.into(),
                    reason: if ready {
                        String::new()
                    } else {
                        "no healthy node serves it".into()
                    },
                }
            })
            .collect();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "fulcrum".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec![],
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.ask_a_node(
            request,
            |m| &m.name,
            |mut c, r| async move { c.model_metadata(r).await },
        )
        .await
    }

    /// Asked of a node serving the model; the configuration comes back as that node encoded
    /// it (`ModelConfigResponse.config` is bytes here), so no field is lost.
    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        self.ask_a_node(
            request,
            |m| &m.name,
            |mut c, r| async move { c.model_config(r).await },
        )
        .await
    }

    /// Served by [`super::infer::OipRoutes`] without re-encoding; this decoding version is
    /// used only where the generated service is mounted directly.
    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let (metadata, extensions, mut message) = request.into_parts();
        validate::check_infer_request(&message).map_err(RouteError::InvalidRequest)?;
        self.state.check_model(&extensions, &message.model_name)?;
        if let Some(canary) = super::infer::canary_of(&self.state, &message, metadata.as_ref()) {
            message.model_name = canary;
            message.model_version.clear();
        }
        let model = message.model_name.clone();
        let sequence = super::infer::sequence_of(&message);
        super::fallback::unary(
            &self.state,
            &model,
            &metadata,
            sequence,
            message,
            |mut message, fallback| {
                fallback.clone_into(&mut message.model_name);
                message.model_version.clear();
                message
            },
            |node, r| {
                let mut c = self.client(&node);
                async move { c.model_infer(r).await }
            },
        )
        .await
    }

    type ModelStreamInferStream = StreamOut;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let (metadata, extensions, mut inbound) = request.into_parts();
        // A stream's requests are not queued (a request finding every node full gets its
        // error in-band at once), so its priority changes nothing; a malformed one is refused
        // all the same, as on every other call.
        Priority::of(metadata.as_ref(), Priority::Normal)?;
        let (out, out_rx) = mpsc::channel(STREAM_BUFFER);
        let mut session = StreamSession {
            service: self.clone(),
            metadata: forward::forwarded(&metadata),
            upstreams: HashMap::new(),
            out,
            extensions,
        };
        // Route the first request before answering, so the response headers can name the node.
        let first_node = match inbound.message().await? {
            Some(first) => session.handle(first).await,
            None => None,
        };
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        session.handle(msg).await;
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(error = %status, "client stream ended with an error");
                        break;
                    }
                }
            }
            // Dropping the session closes every upstream's request side; their answers still
            // drain to the client, then the response stream ends.
        });
        let mut response = Response::new(Box::pin(ReceiverStream::new(out_rx)) as StreamOut);
        if let Some(node) = first_node {
            tag(response.metadata_mut(), &node.conn);
        }
        Ok(response)
    }
}

/// One upstream stream to a node, carrying one model's requests of a client stream.
struct Upstream {
    tx: mpsc::Sender<ModelInferRequest>,
    node: RoutedNode,
    closed: Arc<AtomicBool>,
}

/// The state of one client `ModelStreamInfer` stream.
struct StreamSession {
    service: OipService,
    /// The client's metadata, as each upstream stream passes it on.
    metadata: http::HeaderMap,
    upstreams: HashMap<String, Upstream>,
    out: mpsc::Sender<Result<ModelStreamInferResponse, Status>>,
    /// The call's extensions: the verified caller, when the router checks tokens.
    extensions: http::Extensions,
}

fn stream_error(req: &ModelInferRequest, message: String) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: message,
        infer_response: Some(ModelInferResponse {
            model_name: req.model_name.clone(),
            model_version: req.model_version.clone(),
            id: req.id.clone(),
            ..Default::default()
        }),
    }
}

/// A stream request the router could not send on.
struct Unrouted {
    /// The request, for its in-band error.
    req: ModelInferRequest,
    /// Why, as the error message says it.
    message: String,
    /// Why the model could not serve it, when that is a reason to try its fallback.
    unserved: Option<Reason>,
}

impl StreamSession {
    /// Forwards one request; errors go back in-band, as Triton does, and keep the stream open.
    /// A request its model's canary takes goes to the canary. A request its model cannot serve
    /// goes to the model's fallback, as a unary call would ([`super::fallback`]; a request of a
    /// sequence does not). Returns the node the request went to.
    async fn handle(&mut self, mut req: ModelInferRequest) -> Option<RoutedNode> {
        // The model asked for must be one the caller may call (its canary or fallback is the
        // operator's choice, not the caller's).
        if let Err(e) = self
            .service
            .state
            .check_model(&self.extensions, &req.model_name)
        {
            self.answer_error(&req, e.to_string()).await;
            return None;
        }
        // A request its model's canary takes goes to the canary's stream.
        if let Some(canary) = super::infer::canary_of(&self.service.state, &req, &self.metadata) {
            req.model_name = canary;
            req.model_version.clear();
        }
        let failed = match self.route(req).await {
            Ok(node) => return Some(node),
            Err(failed) => failed,
        };
        let model = failed.req.model_name.clone();
        let fallback = self
            .service
            .state
            .table
            .load()
            .models
            .get(&model)
            .and_then(|r| Some((r.settings.fallback.clone()?, r.state.stats.clone())));
        let (reason, (fallback, stats)) = match (failed.unserved, fallback) {
            (Some(reason), Some(fallback)) if super::infer::sequence_of(&failed.req).is_none() => {
                (reason, fallback)
            }
            _ => {
                self.answer_error(&failed.req, failed.message).await;
                return None;
            }
        };
        let mut req = failed.req.clone();
        req.model_name.clone_from(&fallback);
        req.model_version.clear();
        let second = self.route(req).await;
        stats.fell_back(reason, second.is_ok());
        match second {
            Ok(node) => Some(node),
            Err(second) => {
                let message = format!(
                    "{} (then model {model:?}'s fallback, model {fallback:?}: {})",
                    failed.message, second.message
                );
                self.answer_error(&failed.req, message).await;
                None
            }
        }
    }

    /// Answers `req` in-band with `message`: the stream stays open (a closed client stream has
    /// nobody to tell, so a failed send is dropped).
    async fn answer_error(&self, req: &ModelInferRequest, message: String) {
        let _ = self.out.send(Ok(stream_error(req, message))).await;
    }

    /// Sends one request on the stream of its model's node, opening one when there is none.
    async fn route(&mut self, req: ModelInferRequest) -> Result<RoutedNode, Unrouted> {
        let refused = |req, e: RouteError| Unrouted {
            req,
            unserved: match e {
                RouteError::NoHealthyNode { .. } => Some(Reason::Unavailable),
                RouteError::AllNodesBusy { .. } | RouteError::Displaced { .. } => {
                    Some(Reason::Overloaded)
                }
                _ => None,
            },
            message: Status::from(e).message().to_owned(),
        };
        if let Err(why) = validate::check_infer_request(&req) {
            return Err(refused(req, RouteError::InvalidRequest(why)));
        }
        let model = req.model_name.clone();
        // Every request of a stream is a call against the model's rate limit.
        let limited = self
            .service
            .state
            .table
            .load()
            .models
            .get(&model)
            .and_then(|r| {
                let limit = r.settings.rate_limit.as_ref()?;
                let refused = r.state.limiter.check(&model, limit, &self.metadata).err()?;
                r.state.stats.rate_limited();
                Some(refused)
            });
        if let Some(e) = limited {
            return Err(refused(req, e));
        }
        if let Some(up) = self.upstreams.get(&model) {
            if !up.closed.load(Ordering::Acquire) {
                let node = up.node.clone();
                match up.tx.send(req).await {
                    Ok(()) => return Ok(node),
                    Err(mpsc::error::SendError(returned)) => {
                        self.upstreams.remove(&model);
                        return Box::pin(self.route(returned)).await;
                    }
                }
            }
            self.upstreams.remove(&model);
        }
        let table = self.service.state.table.load();
        // A stream's requests for a model all go to one node, the stream's; a stream opened
        // by a request of a sequence goes to the sequence's node.
        let picked = match super::infer::sequence_of(&req) {
            Some(seq) => self.service.state.pick_sequence(&table, &model, &[], seq),
            None => self.service.state.pick(&table, &model, &[], None),
        };
        let picked = match picked {
            Ok(picked) => picked,
            Err(e) => return Err(refused(req, e)),
        };
        let node = picked.node;
        // A stream holds its slot until it ends, whatever its length.
        let in_flight = picked.slot;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        // Queue the request before opening: a node may wait for it before sending headers.
        let first = req.clone();
        let _ = tx.send(req).await;
        let channel = node.conn.channel();
        let max_size = self.service.state.max_message_size;
        let requests = ReceiverStream::new(rx);
        let upstream = match stream_dialect::model_stream_infer(
            channel,
            max_size,
            self.metadata.clone(),
            requests,
        )
        .await
        {
            Ok(resp) => resp.into_inner(),
            Err(status) => {
                return Err(Unrouted {
                    message: format!("node {}: {}", node.conn.id, status.message()),
                    // The node may have taken the request: only a model's lack of nodes or
                    // room sends a stream request to the fallback.
                    unserved: None,
                    req: first,
                });
            }
        };
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(pump(
            upstream,
            self.out.clone(),
            node.conn.id.clone(),
            closed.clone(),
            in_flight,
        ));
        self.upstreams.insert(
            model,
            Upstream {
                tx,
                node: node.clone(),
                closed,
            },
        );
        Ok(node)
    }
}

/// Copies a node's stream answers to the client until either side ends.
async fn pump(
    mut upstream: Streaming<ModelStreamInferResponse>,
    out: mpsc::Sender<Result<ModelStreamInferResponse, Status>>,
    node_id: String,
    closed: Arc<AtomicBool>,
    _in_flight: InFlight,
) {
    loop {
        match upstream.message().await {
            Ok(Some(resp)) => {
                if out.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(status) => {
                let msg = format!("stream to node {node_id} failed: {}", status.message());
                let _ = out
                    .send(Ok(ModelStreamInferResponse {
                        error_message: msg,
                        infer_response: None,
                    }))
                    .await;
                break;
            }
        }
    }
    closed.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_methods_and_other_services_pass() {
        for m in SERVED {
            assert!(unserved(&format!("{SERVICE_PREFIX}{m}")).is_none(), "{m}");
        }
        assert!(unserved("/grpc.health.v1.Health/Check").is_none());
        assert!(unserved("/inference.GRPCInferenceServiceX/ModelStatistics").is_none());
    }

    #[test]
    fn node_local_methods_say_why() {
        for (m, why) in NODE_LOCAL {
            let s = unserved(&format!("{SERVICE_PREFIX}{m}")).expect(m);
            assert_eq!(s.code(), tonic::Code::Unimplemented);
            assert!(
                s.message().contains(m) && s.message().contains(why),
                "{s:?}"
            );
        }
    }

    #[test]
    fn unknown_methods_name_what_is_served() {
        let s = unserved(&format!("{SERVICE_PREFIX}NoSuchMethod")).unwrap();
        assert_eq!(s.code(), tonic::Code::Unimplemented);
        assert!(
            s.message().contains("\"NoSuchMethod\"") && s.message().contains("ModelConfig"),
            "{s:?}"
        );
    }
}
