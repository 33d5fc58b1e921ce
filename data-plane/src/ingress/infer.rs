//! `ModelInfer` forwarded as the bytes the client sent, and answered with the bytes the node
//! sent.
//!
//! The router has to read a request (its model name routes it, and [`crate::validate`] refuses
//! malformed tensors before they cost a node a round trip), but it has no reason to encode it
//! again for the node, nor to decode and re-encode the node's answer: it changes neither. So
//! the request is decoded once, from a reference-counted copy of its bytes (tensor data in
//! `raw_input_contents` is not copied), and those same bytes go to the node, on the first
//! attempt as on any retry or hedge (a clone is a reference count); the answer is passed back
//! undecoded. A message unknown fields added stays intact on the way, too. The call goes to the
//! node on the router's own HTTP/2 client ([`crate::endpoint::unary`]), not tonic's `Channel`.
//!
//! A compressed request (gzip or deflate) is decompressed by tonic on the way in, within the
//! router's message size limit, and goes to the node uncompressed.
//!
//! [`OipRoutes`] serves this path for `ModelInfer`, answers the methods the router does not
//! serve ([`super::oip::unserved`]) and hands every other OIP method to the generated service
//! ([`super::oip::OipService`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fulcrum_proto::inference::ModelInferRequest;
use fulcrum_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use prost::Message;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codec::{
    Codec, CompressionEncoding, DecodeBuf, Decoder, EnabledCompressionEncodings, EncodeBuf, Encoder,
};
use tonic::metadata::MetadataMap;
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};
use tower::Service;

use super::forward::Sequence;
use super::oip::OipService;
use super::{batched, deadline, fallback, forward};
use crate::cache::{Followed, Leader, Lookup};
use crate::error::RouteError;
use crate::metrics::ModelStats;
use crate::priority::Priority;
use crate::router::RouterState;
use crate::table::RoutedNode;
use crate::validate;

/// The compressions a request may come in (gzip and deflate: what gRPC's clients send and
/// Triton accepts). Answers go uncompressed, as Triton's do by default: compressing every
/// answer would cost CPU on every call, and the node's answer is passed on as it came.
fn accepted() -> EnabledCompressionEncodings {
    let mut e = EnabledCompressionEncodings::default();
    e.enable(CompressionEncoding::Gzip);
    e.enable(CompressionEncoding::Deflate);
    e
}

/// The gRPC path of `ModelInfer`.
pub const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// A `ModelInfer` request: the bytes the client sent, and what they decode to.
#[derive(Debug, Clone)]
pub struct RawInferRequest {
    /// The encoded message, forwarded as it is.
    pub bytes: Bytes,
    /// The decoded message, for routing and validation.
    pub message: ModelInferRequest,
}

/// Writes a message that is already encoded.
#[derive(Debug, Default)]
struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len());
        dst.put(item);
        Ok(())
    }
}

/// Takes a `ModelInferRequest` as bytes and decodes it from them.
#[derive(Debug, Default)]
struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = RawInferRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<RawInferRequest>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        // The same status tonic's generated service gives for a message that does not decode.
        let message = ModelInferRequest::decode(bytes.clone())
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Some(RawInferRequest { bytes, message }))
    }
}

/// The router's side towards clients: requests decoded and kept as bytes, answers as bytes.
#[derive(Debug, Default, Clone, Copy)]
struct ServerCodec;

impl Codec for ServerCodec {
    type Encode = Bytes;
    type Decode = RawInferRequest;
    type Encoder = BytesEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder
    }
}

/// The sequence a request belongs to: Triton's `sequence_id` parameter (a non-zero integer or
/// a non-empty string), with `sequence_start` and `sequence_end`; `None` for a request of no
/// sequence.
pub fn sequence_of(request: &ModelInferRequest) -> Option<Sequence> {
    use fulcrum_proto::inference::infer_parameter::ParameterChoice;
    let id = match request
        .parameters
        .get("sequence_id")?
        .parameter_choice
        .as_ref()?
    {
        ParameterChoice::Int64Param(0) | ParameterChoice::Uint64Param(0) => return None,
        ParameterChoice::Int64Param(v) => v.to_le_bytes().to_vec(),
        ParameterChoice::Uint64Param(v) => v.to_le_bytes().to_vec(),
        ParameterChoice::StringParam(s) if s.is_empty() => return None,
        // A string id apart from an integer one: Triton keeps the two kinds apart, too.
        ParameterChoice::StringParam(s) => [b"s:", s.as_bytes()].concat(),
        _ => return None,
    };
    let flag = |name: &str| {
        matches!(
            request
                .parameters
                .get(name)
                .and_then(|p| p.parameter_choice.as_ref()),
            Some(ParameterChoice::BoolParam(true))
        )
    };
    let (start, end) = (flag("sequence_start"), flag("sequence_end"));
    // The model is part of the key: sequences of different models are independent.
    let key = crate::balance::ring::hash(&[request.model_name.as_bytes(), b"\0", &id].concat());
    Some(Sequence { key, start, end })
}

/// Validates, routes and forwards one `ModelInfer` call: from the response cache when the
/// model caches answers and holds this one ([`crate::cache`]), else to a node (or to the
/// model's fallback when the model cannot serve it).
pub async fn model_infer(
    state: &RouterState,
    request: Request<RawInferRequest>,
) -> Result<Response<Bytes>, Status> {
    let started = Instant::now();
    let (metadata, extensions, mut raw) = request.into_parts();
    validate::check_infer_request(&raw.message).map_err(RouteError::InvalidRequest)?;
    state.check_model(&extensions, &raw.message.model_name)?;
    // Most models have no canary, cache or fallback: one look at the table, and the call goes
    // to a node the usual way (an unknown model too: forwarding refuses it NOT_FOUND).
    let plain = state
        .table
        .load()
        .models
        .get(&raw.message.model_name)
        .is_none_or(|r| r.settings.is_plain());
    if plain {
        let sequence = sequence_of(&raw.message);
        let model = raw.message.model_name;
        let max_size = state.max_message_size;
        return forward::unary(state, &model, &metadata, sequence, raw.bytes, |node, r| {
            to_node(node, r, max_size)
        })
        .await;
    }
    // A call its model's canary takes is a call of the canary from here on.
    let Some(canary) = canary_of(state, &raw.message, metadata.as_ref()) else {
        return serve(state, started, metadata, raw).await;
    };
    raw.bytes = renamed(&raw.bytes, &canary);
    canary.clone_into(&mut raw.message.model_name);
    raw.message.model_version.clear();
    let mut answer = serve(state, started, metadata, raw).await;
    let value = http::HeaderValue::from_str(&canary).ok();
    let headers: &mut http::HeaderMap = match &mut answer {
        Ok(response) => response.metadata_mut().as_mut(),
        Err(status) => status.metadata_mut().as_mut(),
    };
    if let Some(v) = value {
        headers.insert(
            http::HeaderName::from_static(crate::canary::CANARY_HEADER),
            v,
        );
    }
    answer
}

/// The canary a call of `message`'s model goes to, if the model's policy has one and the call
/// falls in its share ([`crate::canary`]): placed by the key header's value, else by the call's
/// sequence, else at random. A canary without a routable node takes nothing.
pub fn canary_of(
    state: &RouterState,
    message: &ModelInferRequest,
    headers: &http::HeaderMap,
) -> Option<String> {
    let table = state.table.load();
    let route = table.models.get(&message.model_name)?;
    let canary = route.settings.canary.as_ref()?;
    let key = canary
        .key_header
        .as_deref()
        .and_then(|h| headers.get(h))
        .map(|v| crate::balance::ring::hash(v.as_bytes()))
        .or_else(|| sequence_of(message).map(|s| s.key));
    // A canary no node can serve now (not deployed yet, or down) takes no calls: they stay
    // with the model the caller named.
    let ready = || {
        table
            .models
            .get(&canary.model)
            .is_some_and(|r| r.is_routable())
    };
    if !canary.takes(key, &mut rand::rng()) || !ready() {
        return None;
    }
    route.state.stats.canary();
    Some(canary.model.clone())
}

/// [`model_infer`] once the model is settled.
async fn serve(
    state: &RouterState,
    started: Instant,
    mut metadata: MetadataMap,
    raw: RawInferRequest,
) -> Result<Response<Bytes>, Status> {
    let sequence = sequence_of(&raw.message);
    // A request of a sequence is never cached: its answer depends on the sequence's state.
    let cached = match sequence {
        None => cached(state, started, &raw.message, &mut metadata).await?,
        Some(_) => None,
    };
    let hit = |answer: Bytes, stats: Arc<ModelStats>, how: &'static str| {
        stats.answered(tonic::Code::Ok, started.elapsed());
        let mut response = Response::new(answer);
        mark(&mut response, how);
        Ok(response)
    };
    let leader = match cached {
        Some(Cached::Hit { answer, stats, how }) => return hit(answer, stats, how),
        Some(Cached::Lead(leader, ttl, stats)) => {
            // The shared level, before a node ([`crate::shared_cache`]).
            if let Some(shared) = &state.shared_cache
                && let Some((answer, left)) = shared.get(leader.key()).await
            {
                stats.cache_shared_hit();
                let answer = leader.found_shared(answer, left.min(ttl), &raw.message.id);
                return hit(answer, stats, "hit-shared");
            }
            Some((leader, ttl))
        }
        None => None,
    };
    let mut answer = match sequence {
        None => match batched::batching(state, &raw.message, &metadata)? {
            Some(batch) => batched::call(state, started, batch, &mut metadata, raw).await,
            None => alone(state, &metadata, None, raw, true).await,
        },
        Some(_) => alone(state, &metadata, sequence, raw, true).await,
    };
    if let Some((leader, ttl)) = leader {
        match &mut answer {
            // An answer from the fallback model is not this model's.
            Ok(response) if !response.metadata().contains_key(fallback::FALLBACK_HEADER) => {
                let key = leader.key();
                if leader.answered(response.get_ref().clone(), ttl) {
                    mark(response, "miss");
                    if let Some(shared) = &state.shared_cache {
                        shared.put(key, response.get_ref().clone(), ttl);
                    }
                }
            }
            // This call's own deadline, which an identical call waiting may not share.
            Err(status) if status.code() == tonic::Code::DeadlineExceeded => leader.abandoned(),
            _ => leader.not_shared(),
        }
    }
    answer
}

/// Forwards one call (to its model's fallback when the model cannot serve it), checking the
/// model's rate limit when `limited` (a call that joined a batch was checked then).
async fn alone(
    state: &RouterState,
    metadata: &MetadataMap,
    sequence: Option<Sequence>,
    raw: RawInferRequest,
    limited: bool,
) -> Result<Response<Bytes>, Status> {
    send(
        state,
        metadata,
        sequence,
        &raw.message.model_name,
        raw.bytes,
        limited,
    )
    .await
}

/// [`alone`], for an encoded request of `model`.
pub(super) async fn send(
    state: &RouterState,
    metadata: &MetadataMap,
    sequence: Option<Sequence>,
    model: &str,
    bytes: Bytes,
    limited: bool,
) -> Result<Response<Bytes>, Status> {
    let max_size = state.max_message_size;
    fallback::unary_admitted(
        state,
        model,
        metadata,
        sequence,
        bytes,
        |bytes, fallback| renamed(&bytes, fallback),
        |node, r| to_node(node, r, max_size),
        limited,
    )
    .await
}

/// Sends one attempt's bytes to `node` on the router's own HTTP/2 client.
fn to_node(
    node: RoutedNode,
    request: Request<Bytes>,
    max_size: usize,
) -> impl Future<Output = Result<Response<Bytes>, Status>> {
    let (metadata, _, message) = request.into_parts();
    let path = http::uri::PathAndQuery::from_static(MODEL_INFER_PATH);
    async move {
        node.conn
            .unary(path, metadata.into_headers(), message, max_size)
            .await
    }
}

/// What the response cache does for a call of a model that caches answers.
enum Cached<'a> {
    /// Answered without a node: from the cache (`how` is `hit`), or with the answer of an
    /// identical call it waited for (`coalesced`); and the model's counters.
    Hit {
        answer: Bytes,
        stats: Arc<ModelStats>,
        how: &'static str,
    },
    /// Not held: this call goes to a node (after the shared level), for identical calls too,
    /// and its answer is kept for the model's TTL; and the model's counters.
    Lead(Leader<'a>, Duration, Arc<ModelStats>),
}

/// Looks the call up in the response cache, when its model caches answers: a hit, the lead
/// (this call goes to a node for identical calls too), or, after waiting for an identical call
/// whose outcome was not one to share, `None` (the call goes to a node alone). A hit is still a
/// call: a priority that is not one is refused as it would be otherwise. A call that waited
/// passes on what is left of its deadline (`metadata`'s `grpc-timeout`).
async fn cached<'a>(
    state: &'a RouterState,
    started: Instant,
    message: &ModelInferRequest,
    metadata: &mut MetadataMap,
) -> Result<Option<Cached<'a>>, Status> {
    let (spec, stats, budget, priority) = {
        let table = state.table.load();
        let Some(route) = table.models.get(&message.model_name) else {
            return Ok(None);
        };
        let Some(spec) = &route.settings.cache else {
            return Ok(None);
        };
        let priority = Priority::of(metadata.as_ref(), route.settings.priority)?;
        let budget = deadline::budget(metadata, route.settings.timeout);
        (spec.clone(), route.state.stats.clone(), budget, priority)
    };
    let key = state.cache.key(&spec, message, metadata.as_ref());
    let mut waited = false;
    loop {
        let lookup = state.cache.lookup(key, &message.id, priority);
        if !waited {
            stats.cache_lookup(matches!(lookup, Lookup::Hit(_)));
        }
        let follower = match lookup {
            Lookup::Hit(answer) => {
                // After a wait, the answer kept is the identical call's.
                let how = if waited {
                    stats.cache_coalesced();
                    "coalesced"
                } else {
                    "hit"
                };
                return Ok(Some(Cached::Hit { answer, stats, how }));
            }
            Lookup::Lead(leader) => {
                if waited {
                    pass_on_remaining(metadata, started, budget);
                }
                return Ok(Some(Cached::Lead(leader, spec.ttl, stats)));
            }
            Lookup::Follow(follower) => follower,
            Lookup::Overtake => {
                if waited {
                    pass_on_remaining(metadata, started, budget);
                }
                return Ok(None);
            }
        };
        waited = true;
        let Ok(followed) =
            tokio::time::timeout_at(started + budget, follower.wait(&message.id)).await
        else {
            stats.answered(tonic::Code::DeadlineExceeded, started.elapsed());
            return Err(RouteError::DeadlineWaitingForIdentical { budget }.into());
        };
        match followed {
            Followed::Answer(answer) => {
                stats.cache_coalesced();
                return Ok(Some(Cached::Hit {
                    answer,
                    stats,
                    how: "coalesced",
                }));
            }
            Followed::CallAlone => {
                pass_on_remaining(metadata, started, budget);
                return Ok(None);
            }
            Followed::LookAgain => {}
        }
    }
}

/// Sets `metadata`'s deadline to what is left of `budget`, so that a call that waited for an
/// identical one does not start its own with the whole of it.
pub(super) fn pass_on_remaining(metadata: &mut MetadataMap, started: Instant, budget: Duration) {
    let left = budget.saturating_sub(started.elapsed());
    // `deadline::budget` takes the margin off again.
    forward::set_grpc_timeout(metadata, left + deadline::DEADLINE_MARGIN);
}

/// Says in the response headers where the answer came from ([`crate::cache::CACHE_HEADER`]).
fn mark(response: &mut Response<Bytes>, how: &'static str) {
    let headers: &mut http::HeaderMap = response.metadata_mut().as_mut();
    headers.insert(
        http::HeaderName::from_static(crate::cache::CACHE_HEADER),
        http::HeaderValue::from_static(how),
    );
}

/// `request`, an encoded `ModelInferRequest`, naming `model` (and no version) instead of its
/// own. Appended as fields 1 (`model_name`) and 2 (`model_version`) rather than decoded and
/// encoded again: protobuf parsers take the last value of a field that is not repeated ("last
/// one wins", in the encoding spec), so the rest of the message — tensors, parameters, fields
/// the router does not know — goes to the other model (a fallback, a canary) byte for byte.
pub fn renamed(request: &Bytes, model: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(request.len() + model.len() + 12);
    out.put_slice(request);
    // Field 1, wire type 2 (length-delimited): tag (1 << 3) | 2.
    out.put_u8(0x0a);
    put_varint(&mut out, model.len() as u64);
    out.put_slice(model.as_bytes());
    // Field 2, wire type 2, empty: the other model's version is its own choice.
    out.put_u8(0x12);
    out.put_u8(0);
    out.freeze()
}

/// Writes `v` as a protobuf varint.
pub(crate) fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// `ModelInfer` as a tonic unary service.
struct InferService(Arc<RouterState>);

impl UnaryService<RawInferRequest> for InferService {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Status>> + Send>>;

    fn call(&mut self, request: Request<RawInferRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move { model_infer(&state, request).await })
    }
}

type RouteFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static>>;

/// `inference.GRPCInferenceService` at the router: `ModelInfer` forwarded as bytes, every
/// other method by the generated service.
#[derive(Debug, Clone)]
pub struct OipRoutes {
    state: Arc<RouterState>,
    generated: GrpcInferenceServiceServer<OipService>,
}

impl OipRoutes {
    /// The service routing with `state`.
    pub fn new(state: Arc<RouterState>) -> Self {
        let max = state.max_message_size;
        // The generated service takes the compressions of `accepted` one by one.
        let generated = GrpcInferenceServiceServer::new(OipService::new(state.clone()))
            // Backstop only: the size layer answers oversized messages first, with the right
            // status.
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Deflate);
        Self { state, generated }
    }
}

impl NamedService for OipRoutes {
    const NAME: &'static str = <GrpcInferenceServiceServer<OipService> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for OipRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> RouteFuture {
        if req.uri().path() != MODEL_INFER_PATH {
            if let Some(status) = super::oip::unserved(req.uri().path()) {
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
            return self.generated.call(req);
        }
        let state = self.state.clone();
        Box::pin(async move {
            let max = Some(state.max_message_size);
            let mut grpc = tonic::server::Grpc::new(ServerCodec)
                .apply_max_message_size_config(max, max)
                .apply_compression_config(accepted(), EnabledCompressionEncodings::default());
            Ok(grpc.unary(InferService(state), req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::inference::InferParameter;
    use fulcrum_proto::inference::infer_parameter::ParameterChoice;
    use fulcrum_proto::inference::model_infer_request::InferInputTensor;

    fn request(model: &str, params: &[(&str, ParameterChoice)]) -> ModelInferRequest {
        ModelInferRequest {
            model_name: model.into(),
            parameters: params
                .iter()
                .map(|(k, v)| {
                    let p = InferParameter {
                        parameter_choice: Some(v.clone()),
                    };
                    ((*k).to_owned(), p)
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_renamed_request_names_the_other_model_and_keeps_the_rest() {
        let original = ModelInferRequest {
            model_name: "big".into(),
            model_version: "7".into(),
            id: "call-1".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![2],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from_static(&[0, 0, 128, 63, 0, 0, 0, 64])],
            ..Default::default()
        };
        let bytes = Bytes::from(original.encode_to_vec());
        // Long enough that its length takes a two-byte varint.
        let long = "m".repeat(300);
        for name in ["small", long.as_str()] {
            let decoded = ModelInferRequest::decode(renamed(&bytes, name)).unwrap();
            assert_eq!(decoded.model_name, name);
            assert_eq!(decoded.model_version, "");
            assert_eq!(
                ModelInferRequest {
                    model_name: "big".into(),
                    model_version: "7".into(),
                    ..decoded
                },
                original
            );
        }
    }

    #[test]
    fn what_belongs_to_a_sequence() {
        use ParameterChoice::*;
        let of = |model, p: &[(&str, ParameterChoice)]| sequence_of(&request(model, p));
        assert_eq!(of("m", &[]), None);
        assert_eq!(of("m", &[("sequence_id", Int64Param(0))]), None);
        assert_eq!(of("m", &[("sequence_id", Uint64Param(0))]), None);
        assert_eq!(
            of("m", &[("sequence_id", StringParam(String::new()))]),
            None
        );
        assert_eq!(of("m", &[("sequence_id", BoolParam(true))]), None);
        let a = of("m", &[("sequence_id", Int64Param(42))]).unwrap();
        assert!(!a.start);
        // The same sequence whichever integer kind carries its id; its start says so.
        let start = [
            ("sequence_id", Uint64Param(42)),
            ("sequence_start", BoolParam(true)),
        ];
        assert_eq!(of("m", &start), Some(Sequence { start: true, ..a }));
        let end = [
            ("sequence_id", Int64Param(42)),
            ("sequence_end", BoolParam(true)),
        ];
        assert_eq!(of("m", &end), Some(Sequence { end: true, ..a }));
        // Another id, a string id, another model: other sequences.
        assert_ne!(
            of("m", &[("sequence_id", Int64Param(43))]).unwrap().key,
            a.key
        );
        let s = of("m", &[("sequence_id", StringParam("42".into()))]).unwrap();
        assert_ne!(s.key, a.key);
        assert_ne!(
            of("n", &[("sequence_id", Int64Param(42))]).unwrap().key,
            a.key
        );
    }
}
