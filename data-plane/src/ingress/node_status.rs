//! How a failed call to a node reads to the router's caller (and to its retry logic).
//!
//! A status the node sent is passed on as it is. A status made by the router's own gRPC client
//! carries the local error it came from as its source, and tonic's codes for some of those
//! mislead: a pooled connection that the node's death closed under a call comes back as
//! CANCELLED ("operation was canceled": hyper's dispatch was dropped) or UNKNOWN ("transport
//! error": a broken pipe), which would tell the caller that it cancelled the call itself, or
//! that the node failed in some unknown way; and a per-try deadline that tonic's own timeout
//! layer enforces comes back as CANCELLED. For the caller the node was unreachable
//! (UNAVAILABLE, which is retried on another node) or too slow (DEADLINE_EXCEEDED).

use std::error::Error;

use tonic::{Code, Status, TimeoutExpired};

/// The status that a node's trailers (or the headers of a trailers-only answer) carry, if they
/// carry one (details that are not base64 dropped rather than panicking, see
/// [`fulcrum_grpc_h2::answer::status_from_headers`]).
pub(crate) use fulcrum_grpc_h2::answer::status_from_headers as from_headers;

/// Whether a failed call never reached the node: the router's client could not connect (the
/// address refuses, or nothing answers the connection). Only a local error can say so, never a
/// status the node sent.
pub(crate) fn is_connect_failure(status: &Status) -> bool {
    let mut next = status.source();
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::AddrNotAvailable
            )
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The status to act on, and answer with, for a failed call to a node.
pub(crate) fn from_node(status: Status) -> Status {
    // Statuses received from the node have no source.
    let Some(source) = status.source() else {
        return status;
    };
    let mut causes = Vec::new();
    let mut timed_out = false;
    let mut next = Some(source);
    while let Some(e) = next {
        timed_out |= e.is::<TimeoutExpired>();
        causes.push(e.to_string());
        next = e.source();
    }
    let code = match status.code() {
        Code::Cancelled if timed_out => Code::DeadlineExceeded,
        Code::Cancelled | Code::Unknown => Code::Unavailable,
        _ => return status,
    };
    let mut mapped = Status::new(
        code,
        format!("call to the node failed: {}", causes.join(": ")),
    );
    *mapped.metadata_mut() = status.metadata().clone();
    mapped
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local (transport) error, as hyper's are, with `cause` as its source.
    #[derive(Debug)]
    struct Transport(Box<dyn Error + Send + Sync>);

    impl std::fmt::Display for Transport {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "transport error")
        }
    }

    impl Error for Transport {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    fn local(cause: impl Error + Send + Sync + 'static) -> Status {
        Status::from_error(Box::new(Transport(Box::new(cause))))
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure_and_a_node_status_is_not() {
        use fulcrum_proto::inference::ServerLiveRequest;
        use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
        // A port that was just free: nothing listens on it, the connection is refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let status = GrpcInferenceServiceClient::new(channel)
            .server_live(ServerLiveRequest {})
            .await
            .unwrap_err();
        assert!(is_connect_failure(&status), "{status:?}");
        assert_eq!(from_node(status).code(), Code::Unavailable);
        assert!(!is_connect_failure(&Status::unavailable(
            "node is draining"
        )));
        let broken = local(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(!is_connect_failure(&broken));
    }

    #[test]
    fn a_connection_closed_under_a_call_is_unavailable() {
        // What tonic makes of hyper's "connection closed" cancellation.
        let closed = local(Status::cancelled("operation was canceled"));
        assert_eq!(closed.code(), Code::Cancelled);
        let s = from_node(closed);
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("operation was canceled"), "{s:?}");
        // A broken pipe has no status in its chain: tonic says UNKNOWN.
        let broken = local(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(broken.code(), Code::Unknown);
        let s = from_node(broken);
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("broken pipe"), "{s:?}");
    }

    #[test]
    fn tonics_own_timeout_is_a_deadline() {
        let timeout = Status::from_error(Box::new(TimeoutExpired(())));
        assert_eq!(timeout.code(), Code::Cancelled);
        assert_eq!(from_node(timeout).code(), Code::DeadlineExceeded);
    }

    #[test]
    fn statuses_the_node_sent_pass_unchanged() {
        for sent in [
            Status::cancelled("the node cancelled"),
            Status::unknown("model raised"),
            Status::invalid_argument("bad input"),
            Status::unavailable("draining"),
            Status::internal("model crashed"),
        ] {
            let (code, message) = (sent.code(), sent.message().to_owned());
            let s = from_node(sent);
            assert_eq!((s.code(), s.message()), (code, message.as_str()));
        }
    }
}
