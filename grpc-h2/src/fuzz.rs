//! Random frame sequences against Fulcrum's own HTTP/2 server ([`crate::own_server`]) and
//! client ([`crate::client`]): whatever a peer sends, neither panics, and the server still
//! serves a well-formed call afterwards.
//!
//! The frames are mostly well-framed (a 9-byte header whose length matches its payload) so
//! that they reach the frame handling rather than stopping at the framing: known and unknown
//! types, any flags, stream ids around the ones a connection uses, payloads of random bytes or
//! of header blocks that decode (a request, a `:status`, trailers); now and then bytes with no
//! framing at all. A panic counts when it happens on the thread that runs the server or the
//! client under test (named `fuzzed-…`): a panic hook counts those, whatever tokio does with
//! the task that panicked.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use proptest::collection::vec;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::client;
use crate::own_server::{self, Handler, RecvBody, Respond};
use crate::server::{Peer, Settings};
use crate::wire::{PREFACE, frame_head, hpack_literal, kind};

/// Panics on the threads under test.
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics on threads named `fuzzed-…` (installed once; every panic still goes on to the
/// hook that was there before, which prints it).
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().map(str::to_owned);
            if name.is_some_and(|n| n.starts_with("fuzzed-")) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// How long a peer waits for more bytes before it takes the other side to be done.
const QUIET: Duration = Duration::from_millis(50);

/// Reads until the peer closes, fails, or sends nothing for [`QUIET`].
async fn drain(tcp: &mut TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(QUIET, tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

/// A request's header block: `POST`, `http`, `:path /p`, `:authority x`.
fn request_block() -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(0x83);
    b.put_u8(0x86);
    hpack_literal(&mut b, 4, b"", b"/p");
    hpack_literal(&mut b, 1, b"", b"x");
    b.to_vec()
}

/// Trailers' header block: `grpc-status: 0`.
fn trailers_block() -> Vec<u8> {
    let mut b = BytesMut::new();
    hpack_literal(&mut b, 0, b"grpc-status", b"0");
    b.to_vec()
}

/// One frame's bytes (or, now and then, bytes with no framing).
fn frame() -> impl Strategy<Value = Vec<u8>> {
    let ty = prop_oneof![6 => 0u8..=9, 1 => any::<u8>()];
    let id = prop_oneof![
        2 => Just(0u32),
        4 => Just(1u32),
        2 => Just(3u32),
        2 => 0u32..16,
        1 => any::<u32>(),
    ];
    let payload = prop_oneof![
        4 => vec(any::<u8>(), 0..40),
        2 => Just(request_block()),
        1 => Just(vec![0x88]), // `:status: 200`
        1 => Just(trailers_block()),
        1 => Just(vec![0, 0, 0, 0, 2, 7, 7]), // a gRPC message of two bytes
    ];
    let framed = (ty, any::<u8>(), id, payload).prop_map(|(ty, flags, id, payload)| {
        let mut b = BytesMut::new();
        frame_head(&mut b, payload.len(), ty, flags, id);
        b.put_slice(&payload);
        b.to_vec()
    });
    prop_oneof![12 => framed, 1 => vec(any::<u8>(), 1..24)]
}

/// Reads a request to its end and answers it with one message and `grpc-status: 0`.
#[derive(Clone)]
struct Answer;

impl Handler for Answer {
    async fn call(
        &self,
        _peer: Peer,
        _request: http::request::Parts,
        mut body: RecvBody,
        mut respond: Respond,
    ) {
        while let Some(chunk) = body.data().await {
            if chunk.is_err() {
                return;
            }
        }
        if body.trailers().await.is_err() {
            return;
        }
        respond.send_response(StatusCode::OK, &HeaderMap::new(), false);
        respond.send_message(Bytes::from_static(b"ok"), false);
        respond.send_ok_trailers();
    }
}

/// The server under test: started once, on a thread of its own (`fuzzed-server`).
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        count_panics();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::Builder::new()
            .name("fuzzed-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).unwrap();
                    let incoming = futures::stream::unfold(listener, |l| async move {
                        Some((l.accept().await.map(|(tcp, _)| tcp), l))
                    });
                    own_server::serve(
                        Answer,
                        Settings::default(),
                        incoming,
                        std::future::pending(),
                    )
                    .await;
                });
            })
            .unwrap();
        addr
    })
}

/// A well-formed call on a new connection, answered `ok`.
async fn good_call(addr: SocketAddr) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let request = http::Request::post("http://x/p").body(()).unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    let (parts, mut body) = response.await.unwrap().into_parts();
    assert_eq!(parts.status, StatusCode::OK);
    let mut got = BytesMut::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(&got[..], b"\0\0\0\0\x02ok");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Cases per test: a few dozen in the suite (a fraction of a second); `FULCRUM_FUZZ_CASES`
/// asks for more, for a longer search.
fn cases() -> u32 {
    std::env::var("FULCRUM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Whatever frames a client sends after the preface, the server does not panic, and it
    /// serves the next connection's call.
    #[test]
    fn the_server_survives_any_frames(frames in vec(frame(), 1..12)) {
        let addr = server();
        runtime().block_on(async {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(PREFACE).await.unwrap();
            for f in &frames {
                if tcp.write_all(f).await.is_err() {
                    break;
                }
            }
            drain(&mut tcp).await;
            drop(tcp);
            good_call(addr).await;
        });
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    }

    /// Whatever frames a node answers a call with, the client does not panic, and the call
    /// ends (the node closes the connection after its frames).
    #[test]
    fn the_client_survives_any_answer(frames in vec(frame(), 1..12)) {
        count_panics();
        let ran = std::thread::Builder::new()
            .name("fuzzed-client".into())
            .spawn(move || runtime().block_on(call_a_random_node(frames)))
            .unwrap()
            .join();
        prop_assert!(ran.is_ok(), "the client's thread panicked");
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    }
}

/// One call to a node that answers with `frames` (after its SETTINGS) and then closes.
async fn call_a_random_node(frames: Vec<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let node = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut settings = BytesMut::new();
        frame_head(&mut settings, 0, kind::SETTINGS, 0, 0);
        let _ = tcp.write_all(&settings).await;
        for f in &frames {
            if tcp.write_all(f).await.is_err() {
                break;
            }
        }
        drain(&mut tcp).await;
    });
    let config = client::Config {
        stream_window: 65_535,
        connection_window: 1 << 20,
        max_header_list_size: 16 * 1024,
        initial_max_streams: 100,
        keepalive_interval: Duration::from_secs(60),
        keepalive_timeout: Duration::from_secs(20),
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    if let Ok(conn) = client::Connection::handshake(tcp, config).await {
        let headers = HeaderMap::new();
        let request = client::Request {
            path: "/p",
            authority: "node",
            headers: &headers,
            prefix: [0, 0, 0, 0, 1],
            message: Bytes::from_static(b"x"),
        };
        // Bounded: the node closes its side once it has sent its frames and gone quiet, which
        // ends the call; the bound only keeps a broken client from hanging the test.
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.call(request, 1 << 20)).await;
    }
    node.await.unwrap();
}
