//! A unary call's answer as gRPC reads it: the status in its trailers (or in the headers of a
//! trailers-only answer, or inferred from the HTTP status) and its one message, as tonic's
//! client reads them. Shared by the router's calls to its nodes and by the load generator
//! (`fulcrum load`), both on [`crate::client`].

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use tonic::metadata::MetadataMap;
use tonic::{Code, Response, Status};

use crate::client::Answer;
use crate::frame::Received;

/// The header (trailer) holding a call's status code.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_STATUS_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// `grpc-status-details-bin` is base64, padded or not (gRPC's encoding of binary metadata, as
/// tonic reads it).
const DETAILS_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The status that an answer's trailers (or the headers of a trailers-only answer) carry, if
/// they carry one: tonic's `Status::from_header_map`, except that a `grpc-status-details-bin`
/// that is not base64 is dropped — tonic panics on it, and a peer's bytes must not panic us.
pub fn status_from_headers(headers: &HeaderMap) -> Option<Status> {
    headers.get(GRPC_STATUS)?;
    if let Some(details) = headers.get(GRPC_STATUS_DETAILS)
        && DETAILS_BASE64.decode(details.as_bytes()).is_err()
    {
        let mut headers = headers.clone();
        headers.remove(GRPC_STATUS_DETAILS);
        return Status::from_header_map(&headers);
    }
    Status::from_header_map(headers)
}

/// Reads a unary answer as tonic's client would: the one message with the headers and
/// trailers as its metadata, or the status the answer carries (in its trailers, in the headers
/// of a trailers-only answer, else inferred from the HTTP status). A message whose prefix says
/// it is compressed or longer than `max_response` bytes is refused with tonic's statuses; so is
/// an answer with no message or a truncated one.
pub fn read_answer(answer: Answer, max_response: usize) -> Result<Response<Bytes>, Status> {
    let Answer {
        status: http_status,
        headers,
        body,
        trailers,
    } = answer;
    // A trailers-only answer: the status is in the headers, there is no message.
    if let Some(status) = status_from_headers(&headers) {
        if status.code() != Code::Ok {
            return Err(status);
        }
        return Err(Status::internal("Missing response message."));
    }
    check_prefix(&body, http_status, max_response)?;
    let mut metadata = headers;
    let ok = trailers
        .as_ref()
        .and_then(|t| t.get(GRPC_STATUS))
        .is_some_and(|v| v.as_bytes() == b"0");
    if !ok {
        match trailers.as_ref().and_then(status_from_headers) {
            Some(mut status) if status.code() != Code::Ok => {
                let mut headers = metadata;
                headers.extend(status.metadata().clone().into_headers());
                *status.metadata_mut() = MetadataMap::from_headers(headers);
                return Err(status);
            }
            Some(_) => {}
            None => return Err(status_from_http(http_status)),
        }
    }
    if let Some(trailers) = trailers {
        metadata.extend(trailers);
    }
    let message = answer_message(body)?;
    Ok(Response::from_parts(
        MetadataMap::from_headers(metadata),
        message,
        http::Extensions::new(),
    ))
}

/// The status of an answer that ended without a `grpc-status`, as tonic's client infers it
/// (gRPC's HTTP-to-gRPC status mapping).
fn status_from_http(status: http::StatusCode) -> Status {
    use http::StatusCode as S;
    let code = match status {
        S::OK => {
            return Status::unknown(
                "protocol error: missing grpc-status trailer, stream was terminated without a \
                 final status",
            );
        }
        S::BAD_REQUEST => Code::Internal,
        S::UNAUTHORIZED => Code::Unauthenticated,
        S::FORBIDDEN => Code::PermissionDenied,
        S::NOT_FOUND => Code::Unimplemented,
        S::TOO_MANY_REQUESTS | S::BAD_GATEWAY | S::SERVICE_UNAVAILABLE | S::GATEWAY_TIMEOUT => {
            Code::Unavailable
        }
        _ => Code::Unknown,
    };
    Status::new(
        code,
        format!(
            "grpc-status header missing, mapped from HTTP status code {}",
            status.as_u16()
        ),
    )
}

/// Refuses the message as soon as its prefix shows it cannot be read (compressed, or larger
/// than the limit), with tonic's statuses.
fn check_prefix(
    received: &Received,
    http_status: http::StatusCode,
    max: usize,
) -> Result<(), Status> {
    let b = received.bytes();
    if b.len() < 5 {
        return Ok(());
    }
    crate::frame::uncompressed(
        b[0],
        format_args!(" while receiving response with status: {http_status}"),
    )?;
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    if len > max {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: \
             {max} bytes"
        )));
    }
    Ok(())
}

/// The answer's first message (a unary answer has one; anything after it is ignored, as tonic does).
fn answer_message(received: Received) -> Result<Bytes, Status> {
    let all = match received {
        Received::Nothing => return Err(Status::internal("Missing response message.")),
        Received::One(b) => b,
        Received::Many(b) => b.freeze(),
    };
    if all.len() < 5 {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    }
    let len = u32::from_be_bytes([all[1], all[2], all[3], all[4]]) as usize;
    if all.len() - 5 < len {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    }
    Ok(all.slice(5..5 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_in_headers_are_read_and_bad_details_dropped() {
        let mut h = HeaderMap::new();
        assert!(status_from_headers(&h).is_none());
        h.insert("grpc-status", "5".parse().unwrap());
        h.insert("grpc-message", "no%20such%20model".parse().unwrap());
        h.insert("x-extra", "1".parse().unwrap());
        let s = status_from_headers(&h).unwrap();
        assert_eq!((s.code(), s.message()), (Code::NotFound, "no such model"));
        assert!(s.metadata().get("x-extra").is_some());
        h.insert("grpc-status-details-bin", "aGVsbG8".parse().unwrap());
        assert_eq!(status_from_headers(&h).unwrap().details(), b"hello");
        // Not base64: tonic's own reading would panic.
        h.insert("grpc-status-details-bin", "@@not base64@@".parse().unwrap());
        let s = status_from_headers(&h).unwrap();
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.details().is_empty());
    }
}
