//! The upstream side of `ModelStreamInfer`, for nodes of either dialect.
//!
//! The Open Inference Protocol itself defines no streaming RPC. Triton answers
//! `ModelStreamInfer` with `ModelStreamInferResponse { error_message = 1; infer_response = 2; }`;
//! MLServer serves the same method name but answers with bare `ModelInferResponse` messages
//! (`model_name = 1; model_version = 2; id = 3; parameters = 4; outputs = 5;
//! raw_output_contents = 6`). Decoded as Triton's message, an MLServer answer would read as the
//! error "<model name>" with no response. Clients of the router speak Triton's form, so answers
//! are decoded here whatever the node speaks: a message with a field numbered above 2 is a bare
//! `ModelInferResponse` (Triton's message has no such field; MLServer always sets `id`, field 3)
//! and is wrapped into a `ModelStreamInferResponse`; any other message is Triton's.

use bytes::Buf;
use fulcrum_proto::inference::{ModelInferRequest, ModelInferResponse, ModelStreamInferResponse};
use futures::Stream;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming};
use tonic::transport::Channel;
use tonic::{GrpcMethod, Request, Response, Status};

/// Highest field number of Triton's `ModelStreamInferResponse`.
const TRITON_LAST_FIELD: u64 = 2;

/// Opens `ModelStreamInfer` on a node, sending `requests` with `metadata` (the client's, as
/// [`super::forward::forwarded`] passes it on); answers come back in Triton's form
/// whichever dialect the node speaks.
pub(crate) async fn model_stream_infer(
    channel: Channel,
    max_message_size: usize,
    metadata: http::HeaderMap,
    requests: impl Stream<Item = ModelInferRequest> + Send + 'static,
) -> Result<Response<Streaming<ModelStreamInferResponse>>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(max_message_size)
        .max_encoding_message_size(max_message_size);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("node not ready: {e}")))?;
    let mut request = Request::new(requests);
    *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(metadata);
    request.extensions_mut().insert(GrpcMethod::new(
        "inference.GRPCInferenceService",
        "ModelStreamInfer",
    ));
    let path =
        http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelStreamInfer");
    grpc.streaming(request, path, AnyDialect).await
}

/// Encodes requests as usual, decodes answers of either dialect.
#[derive(Debug, Clone, Copy, Default)]
struct AnyDialect;

impl Codec for AnyDialect {
    type Encode = ModelInferRequest;
    type Decode = ModelStreamInferResponse;
    type Encoder = AnyDialect;
    type Decoder = AnyDialect;

    fn encoder(&mut self) -> Self::Encoder {
        AnyDialect
    }

    fn decoder(&mut self) -> Self::Decoder {
        AnyDialect
    }
}

impl Encoder for AnyDialect {
    type Item = ModelInferRequest;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding a request: {e}")))
    }
}

impl Decoder for AnyDialect {
    type Item = ModelStreamInferResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        decode_answer(&bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding a node's stream answer: {e}")))
    }
}

/// One stream answer of either dialect, in Triton's form.
fn decode_answer(bytes: &[u8]) -> Result<ModelStreamInferResponse, prost::DecodeError> {
    if has_field_above(bytes, TRITON_LAST_FIELD) {
        Ok(ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(ModelInferResponse::decode(bytes)?),
        })
    } else {
        ModelStreamInferResponse::decode(bytes)
    }
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// Whether the top level of the protobuf message in `buf` has a field numbered above `max`.
/// Malformed input answers false (then the decoder reports it).
fn has_field_above(mut buf: &[u8], max: u64) -> bool {
    while !buf.is_empty() {
        let Some(key) = read_varint(&mut buf) else {
            return false;
        };
        if key >> 3 > max {
            return true;
        }
        let len = match key & 7 {
            0 => match read_varint(&mut buf) {
                Some(_) => 0,
                None => return false,
            },
            1 => 8,
            2 => match read_varint(&mut buf).and_then(|l| usize::try_from(l).ok()) {
                Some(l) => l,
                None => return false,
            },
            5 => 4,
            // Groups (3, 4) appear in neither message.
            _ => return false,
        };
        if len > buf.len() {
            return false;
        }
        buf = &buf[len..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::inference::model_infer_response::InferOutputTensor;

    fn answer() -> ModelInferResponse {
        ModelInferResponse {
            model_name: "doubler".into(),
            model_version: "1".into(),
            id: "req-7".into(),
            outputs: vec![InferOutputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1, 1],
                ..Default::default()
            }],
            raw_output_contents: vec![2.0f32.to_le_bytes().to_vec().into()],
            ..Default::default()
        }
    }

    #[test]
    fn triton_answers_decode_as_they_are() {
        let ok = ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(answer()),
        };
        assert_eq!(decode_answer(&ok.encode_to_vec()).unwrap(), ok);
        let err = ModelStreamInferResponse {
            error_message: "model failed".into(),
            infer_response: Some(ModelInferResponse {
                id: "req-7".into(),
                ..Default::default()
            }),
        };
        assert_eq!(decode_answer(&err.encode_to_vec()).unwrap(), err);
        let empty = ModelStreamInferResponse::default();
        assert_eq!(decode_answer(&empty.encode_to_vec()).unwrap(), empty);
    }

    #[test]
    fn mlserver_answers_are_wrapped() {
        // MLServer sends the bare ModelInferResponse on its stream.
        let got = decode_answer(&answer().encode_to_vec()).unwrap();
        assert_eq!(got.error_message, "");
        assert_eq!(got.infer_response, Some(answer()));
        // Only an id besides the name (an answer with no outputs) is still recognised.
        let bare = ModelInferResponse {
            model_name: "doubler".into(),
            id: "x".into(),
            ..Default::default()
        };
        assert_eq!(
            decode_answer(&bare.encode_to_vec()).unwrap().infer_response,
            Some(bare)
        );
    }

    #[test]
    fn malformed_answers_are_errors() {
        assert!(decode_answer(&[0x12, 0x05, 0x01]).is_err());
        assert!(decode_answer(&[0xff; 11]).is_err());
    }
}
