//! The servers answering the control plane's probes of the benchmark's nodes: the three calls
//! a probe makes (`grpc.health.v1.Health/Check`, OIP `ServerReady` and `ModelReady`), each
//! answered "serving" / "ready", on `fulcrum-grpc-h2`'s HTTP/2 server; anything else gets
//! UNIMPLEMENTED.
//!
//! Why not node-sim: the nodes are not the control plane, yet on this one machine their CPU is
//! taken from the same two cores. node-sim serves through tonic (a task per call, the tower
//! stack), which at 1,000 probes a second (3,000 calls) cost about a fifth of a core, a tenth
//! of the machine, all through the routers' fan-out the benchmark times. Answering the three
//! calls by hand costs a fraction of it; the control plane's side of every probe is unchanged.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use fulcrum_grpc_h2::GrpcFrame;
use fulcrum_grpc_h2::server::{self, GRPC_CONTENT_TYPE, Handler, Peer, Settings};
use fulcrum_proto::inference::{ModelReadyResponse, ServerReadyResponse};
use h2::RecvStream;
use h2::server::SendResponse;
use http::header::CONTENT_TYPE;
use prost::Message;
use tokio::net::TcpListener;
use tonic::Status;
use tonic_health::pb::HealthCheckResponse;
use tonic_health::pb::health_check_response::ServingStatus;

/// The answers, encoded once as whole gRPC messages.
#[derive(Debug, Clone)]
struct ProbeTarget {
    serving: Bytes,
    server_ready: Bytes,
    model_ready: Bytes,
}

fn framed(message: &impl Message) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + message.encoded_len());
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(message.encoded_len() as u32).to_be_bytes());
    message
        .encode(&mut buf)
        .expect("a BytesMut grows as needed");
    buf.freeze()
}

impl ProbeTarget {
    fn new() -> Self {
        Self {
            serving: framed(&HealthCheckResponse {
                status: ServingStatus::Serving as i32,
            }),
            server_ready: framed(&ServerReadyResponse { ready: true }),
            model_ready: framed(&ModelReadyResponse { ready: true }),
        }
    }
}

impl Handler for ProbeTarget {
    async fn call(
        &self,
        _peer: Peer,
        request: http::Request<RecvStream>,
        respond: SendResponse<GrpcFrame>,
    ) {
        let answer = match request.uri().path() {
            "/grpc.health.v1.Health/Check" => self.serving.clone(),
            "/inference.GRPCInferenceService/ServerReady" => self.server_ready.clone(),
            "/inference.GRPCInferenceService/ModelReady" => self.model_ready.clone(),
            other => {
                let status = Status::unimplemented(format!("{other} is not served here"));
                return server::send_status(respond, &status);
            }
        };
        // The request (a few bytes) is read to its end, so that its flow-control credit goes
        // back to the connection.
        let mut body = request.into_body();
        while let Some(chunk) = body.data().await {
            match chunk {
                Ok(c) => {
                    let _ = body.flow_control().release_capacity(c.len());
                }
                Err(_) => return,
            }
        }
        let mut respond = respond;
        let mut head = http::Response::new(());
        head.headers_mut().insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
        let Ok(mut tx) = respond.send_response(head, false) else {
            return;
        };
        if tx.send_data(GrpcFrame::raw(answer), false).is_ok() {
            let _ = tx.send_trailers(server::ok_trailers());
        }
    }
}

/// Starts one probe target on a free loopback port; it serves until the runtime stops.
pub(crate) async fn spawn() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(server::serve(
        ProbeTarget::new(),
        Settings::default(),
        incoming,
        std::future::pending(),
    ));
    Ok(addr)
}
