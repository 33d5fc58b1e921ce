//! The simulated node's gRPC services: `inference.GRPCInferenceService` (echo) and
//! `fulcrum.v1.NodeSimControl`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use fulcrum_proto::fulcrum::v1::SimConfig;
use fulcrum_proto::fulcrum::v1::node_sim_control_server::NodeSimControl;
use fulcrum_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use fulcrum_proto::inference::model_infer_response::InferOutputTensor;
use fulcrum_proto::inference::model_metadata_response::TensorMetadata;
use fulcrum_proto::inference::{
    DataType, ModelConfig, ModelConfigRequest, ModelConfigResponse, ModelInferRequest,
    ModelInferResponse, ModelInput, ModelMetadataRequest, ModelMetadataResponse, ModelOutput,
    ModelReadyRequest, ModelReadyResponse, ModelStreamInferResponse, RepositoryIndexRequest,
    RepositoryIndexResponse, ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest,
    ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
    repository_index_response::ModelIndex,
};
use futures::Stream;
use prost::Message;
use prost::bytes::Bytes;
use rand::Rng;
use tokio::sync::{TryAcquireError, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use super::controls::{Shared, SimControls};
use super::{NODE_HEADER, PLATFORM};

/// Responses a `ModelStreamInfer` stream may have ready before the client reads them. Requests
/// in a stream are served concurrently, so a client that stops reading would otherwise let
/// answers pile up without bound; 64 matches the default queue, enough that a client reading
/// at its own pace never slows the node down.
const STREAM_BUFFER: usize = 64;

/// The version every model reports and answers with when a request names none.
const MODEL_VERSION: &str = "1";

/// `inference.GRPCInferenceService`.
#[derive(Debug, Clone)]
pub(crate) struct InferenceService {
    shared: Arc<Shared>,
}

impl InferenceService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn tag(&self, metadata: &mut MetadataMap) {
        if let Some(v) = &self.shared.node_header {
            metadata.insert(NODE_HEADER, v.clone());
        }
    }
}

/// Decrements the in-flight counter when a call ends, however it ends (answer, error or
/// cancellation by the client).
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one inference request: health, checks, admission, a slot, fault injection, service
/// time, answer (see the module documentation of [`super`]).
pub(crate) async fn infer(
    shared: &Shared,
    request: ModelInferRequest,
) -> Result<ModelInferResponse, Status> {
    shared.calls.fetch_add(1, Ordering::Relaxed);
    if !shared.healthy() {
        return Err(Status::unavailable(format!(
            "node {} is not healthy",
            shared.name
        )));
    }
    let Some(served) = shared.served.get(&request.model_name) else {
        return Err(not_served(&request.model_name, &shared.name));
    };
    let sequence = super::sequences::Step::of(&request);
    // The answer is computed before admission: it is cheap, and a malformed request should not
    // take a place in the queue.
    let response = echo(request)?;
    // A sequence's step is checked before admission too: Triton refuses a step of a sequence it
    // does not hold as soon as it reads the request.
    if let Some(step) = sequence {
        shared.sequences.apply(&shared.name, step)?;
    }

    let _admitted = match shared.admission.try_acquire() {
        Ok(permit) => permit,
        Err(TryAcquireError::NoPermits) => {
            let busy = shared.slots - shared.slot_permits.available_permits();
            let admitted = shared.slots + shared.queue - shared.admission.available_permits();
            let queued = admitted.saturating_sub(busy);
            return Err(Status::resource_exhausted(format!(
                "node {} is overloaded: {busy} slots busy, {queued} queued",
                shared.name
            )));
        }
        Err(TryAcquireError::Closed) => return Err(shutting_down(&shared.name)),
    };
    let _in_flight = InFlight::enter(&shared.in_flight);
    let _slot = shared
        .slot_permits
        .acquire()
        .await
        .map_err(|_| shutting_down(&shared.name))?;

    let (hang, fail, service_time) = {
        let mut rng = shared.rng.lock().unwrap_or_else(PoisonError::into_inner);
        // Drawn every time, so that with a seed the sequence does not depend on the ratios.
        let hang = rng.random::<f64>() < shared.hang_ratio();
        let fail = rng.random::<f64>() < shared.error_ratio();
        (hang, fail, shared.service_time.sample(&mut *rng))
    };
    if hang {
        // Holds the slot until the caller's deadline or cancellation drops this future.
        std::future::pending::<()>().await;
    }
    if fail {
        return Err(Status::unavailable("injected failure"));
    }
    if !service_time.is_zero() {
        tokio::time::sleep(service_time).await;
    }
    // A stalled node completes nothing: a call due to finish during a stall finishes at its end.
    shared.wait_out_stall().await;
    served.fetch_add(1, Ordering::Relaxed);
    Ok(response)
}

fn not_served(model: &str, node: &str) -> Status {
    Status::not_found(format!("model {model} is not served by node {node}"))
}

fn shutting_down(node: &str) -> Status {
    Status::unavailable(format!("node {node} is shutting down"))
}

/// The echo model: every input tensor back as an output of the same name, datatype, shape and
/// contents (raw bytes if the request used `raw_input_contents`, typed contents otherwise),
/// restricted to and ordered as the requested outputs if any were requested. The data is not
/// interpreted, only passed back.
fn echo(request: ModelInferRequest) -> Result<ModelInferResponse, Status> {
    let ModelInferRequest {
        model_name,
        model_version,
        id,
        inputs,
        outputs: requested,
        raw_input_contents,
        ..
    } = request;
    let raw = !raw_input_contents.is_empty();
    if raw && raw_input_contents.len() != inputs.len() {
        return Err(Status::invalid_argument(format!(
            "the request has {} inputs but {} raw_input_contents",
            inputs.len(),
            raw_input_contents.len()
        )));
    }
    if raw && let Some(input) = inputs.iter().find(|i| i.contents.is_some()) {
        return Err(Status::invalid_argument(format!(
            "input {:?} has contents although the request uses raw_input_contents",
            input.name
        )));
    }

    let mut raw_data = raw_input_contents.into_iter();
    let mut by_name: HashMap<String, usize> = HashMap::with_capacity(inputs.len());
    let mut tensors: Vec<Option<(InferOutputTensor, Option<Bytes>)>> =
        Vec::with_capacity(inputs.len());
    for input in inputs {
        if by_name.insert(input.name.clone(), tensors.len()).is_some() {
            return Err(Status::invalid_argument(format!(
                "input {:?} appears more than once",
                input.name
            )));
        }
        let output = InferOutputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            parameters: HashMap::new(),
            contents: input.contents,
        };
        tensors.push(Some((output, raw_data.next())));
    }

    let selected: Vec<(InferOutputTensor, Option<Bytes>)> = if requested.is_empty() {
        tensors.into_iter().flatten().collect()
    } else {
        let mut selected = Vec::with_capacity(requested.len());
        for r in &requested {
            let Some(&index) = by_name.get(&r.name) else {
                return Err(Status::invalid_argument(format!(
                    "output {:?} was requested, but model {model_name} has no such output \
                     (its outputs are named after the request's inputs)",
                    r.name
                )));
            };
            let Some(tensor) = tensors[index].take() else {
                return Err(Status::invalid_argument(format!(
                    "output {:?} is requested more than once",
                    r.name
                )));
            };
            selected.push(tensor);
        }
        selected
    };

    let mut outputs = Vec::with_capacity(selected.len());
    let mut raw_output_contents = Vec::with_capacity(if raw { selected.len() } else { 0 });
    for (output, data) in selected {
        outputs.push(output);
        raw_output_contents.extend(data);
    }
    Ok(ModelInferResponse {
        model_name,
        model_version: version_or_default(model_version),
        id,
        parameters: HashMap::new(),
        outputs,
        raw_output_contents,
    })
}

fn version_or_default(version: String) -> String {
    if version.is_empty() {
        MODEL_VERSION.to_string()
    } else {
        version
    }
}

/// The wildcard tensor the echo model reports as its input and output: any name, any datatype
/// (`BYTES` being the most general), any shape.
fn wildcard_tensor() -> TensorMetadata {
    TensorMetadata {
        name: "*".to_string(),
        datatype: "BYTES".to_string(),
        shape: vec![-1],
        parameters: Default::default(),
    }
}

/// Serves one request of a stream, turning an error into Triton's in-band error message.
async fn infer_in_stream(shared: &Shared, request: ModelInferRequest) -> ModelStreamInferResponse {
    let model_name = request.model_name.clone();
    let model_version = request.model_version.clone();
    let id = request.id.clone();
    match infer(shared, request).await {
        Ok(response) => ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(response),
        },
        Err(status) => ModelStreamInferResponse {
            error_message: status.message().to_string(),
            infer_response: Some(ModelInferResponse {
                model_name,
                model_version: version_or_default(model_version),
                id,
                ..ModelInferResponse::default()
            }),
        },
    }
}

type StreamItem = Result<ModelStreamInferResponse, Status>;

/// Reads a stream's requests and serves each one on its own task, so requests in one stream are
/// served concurrently (as on separate unary calls) and answered in completion order; each
/// answer carries its request's `id`. When the client goes away, the request tasks stop.
async fn drive_stream(
    shared: Arc<Shared>,
    mut inbound: Streaming<ModelInferRequest>,
    tx: mpsc::Sender<StreamItem>,
) {
    loop {
        let next = tokio::select! {
            next = inbound.message() => next,
            () = tx.closed() => return,
        };
        match next {
            Ok(Some(request)) => {
                let shared = shared.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        response = infer_in_stream(&shared, request) => {
                            let _ = tx.send(Ok(response)).await;
                        }
                        () = tx.closed() => {}
                    }
                });
            }
            Ok(None) => return,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
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
        Ok(Response::new(ServerReadyResponse {
            ready: self.shared.healthy(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let ready = self.shared.healthy() && self.shared.serves(&request.get_ref().name);
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let request = request.into_inner();
        if !request.repository_name.is_empty() {
            return Err(Status::not_found(format!(
                "node {} has one model repository; unknown repository {:?}",
                self.shared.name, request.repository_name
            )));
        }
        let ready = self.shared.healthy();
        if request.ready && !ready {
            return Ok(Response::new(RepositoryIndexResponse::default()));
        }
        let models = self
            .shared
            .models
            .iter()
            .map(|name| ModelIndex {
                name: name.clone(),
                version: MODEL_VERSION.to_string(),
                state: if ready { "READY" } else { "UNAVAILABLE" }.to_string(),
                reason: String::new(),
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: self.shared.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let name = request.into_inner().name;
        if !self.shared.serves(&name) {
            return Err(not_served(&name, &self.shared.name));
        }
        Ok(Response::new(ModelMetadataResponse {
            name,
            versions: vec![MODEL_VERSION.to_string()],
            platform: PLATFORM.to_string(),
            inputs: vec![wildcard_tensor()],
            outputs: vec![wildcard_tensor()],
            parameters: Default::default(),
        }))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let name = request.into_inner().name;
        if !self.shared.serves(&name) {
            return Err(not_served(&name, &self.shared.name));
        }
        // The echo model as Triton would describe it: one tensor of any name, type and shape
        // in (`TYPE_STRING`, Triton's `BYTES`, as in the metadata), the same out, no batching
        // of its own.
        let config = ModelConfig {
            name,
            platform: PLATFORM.to_string(),
            max_batch_size: 0,
            input: vec![ModelInput {
                name: "*".to_string(),
                data_type: DataType::TypeString.into(),
                dims: vec![-1],
            }],
            output: vec![ModelOutput {
                name: "*".to_string(),
                data_type: DataType::TypeString.into(),
                dims: vec![-1],
            }],
            backend: String::new(),
        };
        Ok(Response::new(ModelConfigResponse {
            config: config.encode_to_vec(),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        *self
            .shared
            .last_headers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(request.metadata().clone().into_headers());
        match infer(&self.shared, request.into_inner()).await {
            Ok(answer) => {
                let mut response = Response::new(answer);
                self.tag(response.metadata_mut());
                Ok(response)
            }
            Err(mut status) => {
                self.tag(status.metadata_mut());
                Err(status)
            }
        }
    }

    type ModelStreamInferStream = Pin<Box<dyn Stream<Item = StreamItem> + Send + 'static>>;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(drive_stream(self.shared.clone(), request.into_inner(), tx));
        let mut response =
            Response::new(Box::pin(ReceiverStream::new(rx)) as Self::ModelStreamInferStream);
        self.tag(response.metadata_mut());
        Ok(response)
    }
}

/// `fulcrum.v1.NodeSimControl`.
#[derive(Debug, Clone)]
pub(crate) struct ControlService {
    controls: SimControls,
}

impl ControlService {
    pub(crate) fn new(controls: SimControls) -> Self {
        Self { controls }
    }
}

#[tonic::async_trait]
impl NodeSimControl for ControlService {
    async fn configure(&self, request: Request<SimConfig>) -> Result<Response<SimConfig>, Status> {
        let settings = self.controls.configure(request.into_inner().into()).await?;
        Ok(Response::new(settings.into()))
    }
}
