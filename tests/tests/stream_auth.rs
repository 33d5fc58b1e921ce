//! The routers' and nodes' credential on a real etcd: a control plane with a stream token lets
//! routers subscribe and nodes register only with it (from loopback too); a missing or wrong
//! token is UNAUTHENTICATED, says which, and changes nothing (no router listed, no node in the
//! store); routers and node-sims configured with the token work as before.

use std::time::Duration;

use fulcrum_control_plane::store::{SharedStore, open};
use fulcrum_control_plane::{AdminAuth, StreamAuth, keys};
use fulcrum_proto::fulcrum::v1::registration_client::RegistrationClient;
use fulcrum_proto::fulcrum::v1::routing_client::RoutingClient;
use fulcrum_proto::fulcrum::v1::{
    GetStatusRequest, NodeMessage, RouterHello, RouterMessage, RoutingUpdate, node_message,
    router_message,
};
use fulcrum_sim::node::{NodeSimConfig, spawn};
use fulcrum_sim::register::{RegisterConfig, Registrar, RegistrationState};
use fulcrum_tests::etcd::Etcd;
use fulcrum_tests::infer::{assert_echoed, echo_request, served_by};
use fulcrum_tests::stack::{self, Running, admin, oip, register, spec, wait_ready};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const TOKEN: &str = "str3am-t0ken";

async fn control_plane(etcd: &Etcd) -> Running {
    stack::control_plane_configured(
        "127.0.0.1:0".parse().unwrap(),
        &etcd.url(),
        AdminAuth::Loopback(None),
        |c| c.stream_auth = StreamAuth::Token(TOKEN.into()),
    )
    .await
}

/// `message` with `authorization: Bearer <token>` when a token is given.
fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// Subscribes as router `id`, presenting `token`; the first update, or the refusal.
async fn subscribe(
    cp: &Running,
    id: &str,
    token: Option<&str>,
) -> Result<RoutingUpdate, tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(RouterMessage {
        message: Some(router_message::Message::Hello(RouterHello {
            router_id: id.into(),
            region: "a".into(),
            known_version: 0,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut client = RoutingClient::connect(format!("http://{}", cp.addr))
        .await
        .unwrap();
    let mut updates = client
        .subscribe(with_token(ReceiverStream::new(rx), token))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(20), updates.message())
        .await
        .expect("no update within 20 s")?
        .expect("the stream ended without an update");
    // Keep the router subscribed while the caller looks: the sender lives with the stream.
    drop(tx);
    Ok(first)
}

async fn routers_listed(cp: &Running) -> Vec<String> {
    admin(cp.addr)
        .await
        .get_status(GetStatusRequest::default())
        .await
        .expect("status")
        .into_inner()
        .routers
        .into_iter()
        .map(|r| r.router_id)
        .collect()
}

fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, says: &str) {
    let e = result.expect_err("accepted without the right credential");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains(says), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_subscribe_only_with_the_stream_token() {
    let etcd = Etcd::start().await;
    let cp = control_plane(&etcd).await;
    let node = spawn(NodeSimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    register(
        &mut admin(cp.addr).await,
        spec("n-1", node.addr, "a", &["echo"], 4),
    )
    .await;

    // From loopback, with no token or a wrong one: refused before any update, and not listed.
    assert_refused(subscribe(&cp, "no-token", None).await, "need a credential");
    assert_refused(
        subscribe(&cp, "wrong-token", Some("guess")).await,
        "wrong stream credential",
    );

    // With it: a snapshot.
    let first = subscribe(&cp, "with-token", Some(TOKEN))
        .await
        .expect("subscribe");
    assert!(first.snapshot, "{first:?}");
    let listed = routers_listed(&cp).await;
    assert!(
        !listed.iter().any(|r| r == "no-token" || r == "wrong-token"),
        "a refused router is listed: {listed:?}"
    );

    // A router configured with the token gets its table and routes.
    let router = stack::router_configured("a", &[cp.addr], |c| {
        c.stream_token = Some(TOKEN.into());
    })
    .await;
    wait_ready(router.addr).await;
    let req = echo_request("echo", &[1.0, 2.0]);
    let resp = oip(router.addr)
        .await
        .model_infer(req.clone())
        .await
        .expect("a call through the router");
    assert_eq!(served_by(resp.metadata()), ("n-1".into(), "a".into()));
    assert_echoed(&req, resp.get_ref());

    // The router directory takes the same credential.
    use fulcrum_proto::fulcrum::v1::FindRouterRequest;
    use fulcrum_proto::fulcrum::v1::router_directory_client::RouterDirectoryClient;
    let mut directory = RouterDirectoryClient::connect(format!("http://{}", cp.addr))
        .await
        .unwrap();
    let find = || FindRouterRequest {
        router_id: "with-token".into(),
    };
    assert_refused(
        directory.find_router(with_token(find(), None)).await,
        "need a credential",
    );
    assert_refused(
        directory
            .find_router(with_token(find(), Some("guess")))
            .await,
        "wrong stream credential",
    );
    // With it, an answer: NOT_FOUND, as the hand-made subscriber gave no address.
    let e = directory
        .find_router(with_token(find(), Some(TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

fn spec_message(id: &str, addr: std::net::SocketAddr) -> NodeMessage {
    NodeMessage {
        message: Some(node_message::Message::Spec(spec(
            id,
            addr,
            "a",
            &["echo"],
            4,
        ))),
    }
}

/// Opens a registration stream for `id` presenting `token`; the first answer, or the refusal.
async fn raw_register(
    cp: &Running,
    id: &str,
    addr: std::net::SocketAddr,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(spec_message(id, addr)).await.unwrap();
    let mut client = RegistrationClient::connect(format!("http://{}", cp.addr))
        .await
        .unwrap();
    let mut events = client
        .register(with_token(ReceiverStream::new(rx), token))
        .await?
        .into_inner();
    events.message().await?.expect("an answer");
    drop(tx);
    Ok(())
}

async fn in_store(store: &SharedStore, id: &str) -> bool {
    store
        .get(&keys::node(id))
        .await
        .expect("read etcd")
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_register_only_with_the_stream_token() {
    let etcd = Etcd::start().await;
    let store = open(&etcd.url()).await.expect("open etcd");
    let cp = control_plane(&etcd).await;
    let node = spawn(NodeSimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();

    assert_refused(
        raw_register(&cp, "no-token", node.addr, None).await,
        "need a credential",
    );
    assert_refused(
        raw_register(&cp, "wrong-token", node.addr, Some("guess")).await,
        "wrong stream credential",
    );
    assert!(
        !in_store(&store, "no-token").await,
        "a refused node was stored"
    );
    assert!(
        !in_store(&store, "wrong-token").await,
        "a refused node was stored"
    );

    // A node-sim without the token keeps being refused, and says why.
    let refused = Registrar::spawn(
        RegisterConfig::new(
            vec![cp.addr.to_string()],
            spec("sim-no-token", node.addr, "a", &["echo"], 4),
        ),
        node.controls(),
    );
    let mut states = refused.watch();
    let state = tokio::time::timeout(
        Duration::from_secs(20),
        states.wait_for(|s| {
            matches!(
                s,
                RegistrationState::Connecting {
                    last_error: Some(_)
                }
            )
        }),
    )
    .await
    .expect("no refusal within 20 s")
    .expect("registrar gone")
    .clone();
    let RegistrationState::Connecting {
        last_error: Some(why),
    } = state
    else {
        unreachable!()
    };
    assert!(
        why.contains("Unauthenticated") && why.contains("need a credential"),
        "{why}"
    );
    assert!(!in_store(&store, "sim-no-token").await);

    // With the token: registered, with a lease, and routable.
    let mut config = RegisterConfig::new(
        vec![cp.addr.to_string()],
        spec("sim-1", node.addr, "a", &["echo"], 4),
    );
    config.token = Some(TOKEN.into());
    let registrar = Registrar::spawn(config, node.controls());
    let mut states = registrar.watch();
    tokio::time::timeout(
        Duration::from_secs(20),
        states.wait_for(|s| matches!(s, RegistrationState::Registered { .. })),
    )
    .await
    .expect("not registered within 20 s")
    .expect("registrar gone");
    let entry = store
        .get(&keys::node("sim-1"))
        .await
        .unwrap()
        .expect("stored");
    assert_ne!(entry.lease, 0, "a self-registered node without a lease");
    // Still refused: the one without a token never got in meanwhile.
    assert!(!in_store(&store, "sim-no-token").await);
    drop(refused);
    registrar.stop().await.expect("goodbye");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_rotation_routers_with_either_token_subscribe() {
    let etcd = Etcd::start().await;
    // `--stream-token n3w,0ld`: the new token first, the old one still accepted.
    let cp = stack::control_plane_configured(
        "127.0.0.1:0".parse().unwrap(),
        &etcd.url(),
        AdminAuth::Loopback(None),
        |c| c.stream_auth = StreamAuth::Token("n3w-t0ken,0ld-t0ken".into()),
    )
    .await;
    for (id, token) in [("old", "0ld-t0ken"), ("new", "n3w-t0ken")] {
        let first = subscribe(&cp, id, Some(token)).await.expect(id);
        assert!(first.snapshot, "{id}: {first:?}");
    }
    // The list is not itself a token, nor is anything else.
    for (id, token) in [("list", "n3w-t0ken,0ld-t0ken"), ("other", "0ld")] {
        assert_refused(
            subscribe(&cp, id, Some(token)).await,
            "wrong stream credential",
        );
    }
    let listed = routers_listed(&cp).await;
    assert!(
        !listed.iter().any(|r| r == "list" || r == "other"),
        "a refused router is listed: {listed:?}"
    );
}
