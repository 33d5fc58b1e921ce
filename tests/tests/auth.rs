//! Caller tokens end to end (real etcd, real gRPC, a node-sim, a router checking JWTs): calls
//! without a valid token are refused UNAUTHENTICATED, saying why, and reach no node; health
//! checks need none; an admitted call reaches the node naming its verified caller and without
//! the token; rate limits keyed by the verified caller cannot be dodged by writing the header;
//! a priority above the token's is refused PERMISSION_DENIED, and so is a model the token does
//! not list, by every RPC that names one; a rotated secret takes effect without a restart.

use std::sync::Arc;
use std::time::Duration;

use fulcrum_data_plane::auth::{CALLER_HEADER, CallerAuth, NewToken};
use fulcrum_data_plane::priority::Priority;
use fulcrum_proto::fulcrum::v1::ModelPolicy;
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_proto::inference::{
    ModelConfigRequest, ModelMetadataRequest, ModelReadyRequest, RepositoryIndexRequest,
    ServerLiveRequest,
};
use fulcrum_sim::node::{NodeSimConfig, RunningNodeSim};
use fulcrum_tests::infer::{assert_echoed, echo_request};
use fulcrum_tests::stack::{self, Running, oip};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SECRET: &str = "the first secret of this test, 32+ bytes";
const NEXT: &str = "the secret it is rotated to, also 32+ bytes";

struct Stack {
    node: RunningNodeSim,
    router: Running,
    auth: Arc<CallerAuth>,
    /// The router's secrets file, and the folder that holds it.
    check: stack::TokenCheck,
    _cp: Running,
    _etcd: fulcrum_tests::etcd::Etcd,
}

/// One node serving `echo`, `policies` set, and a router checking tokens signed with
/// [`SECRET`], ready (its inference service SERVING: readiness needs no token).
async fn start(policies: &[ModelPolicy]) -> Stack {
    let stack::OneNode {
        node,
        mut admin,
        cp,
        etcd,
    } = stack::one_node(NodeSimConfig::default(), 8).await;
    for p in policies {
        admin.set_model_policy(p.clone()).await.unwrap();
    }
    let check = stack::token_check(SECRET);
    let auth = check.auth.clone();
    let with = auth.clone();
    let router = stack::router_configured("a", &[cp.addr], move |c| c.auth = Some(with)).await;
    let channel = Channel::from_shared(format!("http://{}", router.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel);
    fulcrum_tests::eventually("the router ready", Duration::from_secs(20), || {
        let mut h = health.clone();
        async move {
            let r = h
                .check(HealthCheckRequest {
                    service: "inference.GRPCInferenceService".into(),
                })
                .await
                .ok()?;
            (r.into_inner().status() == ServingStatus::Serving).then_some(())
        }
    })
    .await;
    stack::wait_serving(&admin, "a-1", "echo").await;
    stack::wait_policies_applied(&admin, policies).await;
    Stack {
        node,
        router,
        auth,
        check,
        _cp: cp,
        _etcd: etcd,
    }
}

fn token(secret: &str, sub: &str, max_priority: Option<Priority>) -> String {
    NewToken {
        subject: sub.into(),
        valid_for: Duration::from_secs(600),
        max_priority,
        ..Default::default()
    }
    .sign_hs256(secret.as_bytes())
    .unwrap()
}

/// `message` with `authorization: Bearer <token>` (none for `None`) and `headers`.
fn with_token<T>(
    message: T,
    token: Option<&str>,
    headers: &[(&'static str, &str)],
) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    for (k, v) in headers {
        r.metadata_mut().insert(*k, v.parse().unwrap());
    }
    r
}

async fn infer(
    c: &mut GrpcInferenceServiceClient<Channel>,
    token: Option<&str>,
    headers: &[(&'static str, &str)],
) -> Result<tonic::Response<fulcrum_proto::inference::ModelInferResponse>, tonic::Status> {
    c.model_infer(with_token(echo_request("echo", &[2.0]), token, headers))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_token_are_refused_and_reach_no_node() {
    let s = start(&[]).await;
    let mut c = oip(s.router.addr).await;
    let stale = NewToken {
        subject: "alice".into(),
        valid_for: Duration::from_secs(3600),
        issued_at: Some(now() - 7200),
        ..Default::default()
    }
    .sign_hs256(SECRET.as_bytes())
    .unwrap();
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "no bearer token"),
        (Some("not-a-jwt".into()), "malformed"),
        (
            Some(token("some other secret!", "alice", None)),
            "not valid",
        ),
        (Some(stale), "expired"),
    ];
    for (t, says) in &cases {
        let e = infer(&mut c, t.as_deref(), &[]).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains(says), "{}", e.message());
        // Every other inference RPC too: a stream, metadata, liveness.
        let e = c
            .model_metadata(with_token(
                ModelMetadataRequest {
                    name: "echo".into(),
                    version: String::new(),
                },
                t.as_deref(),
                &[],
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let e = c
            .server_live(with_token(ServerLiveRequest {}, t.as_deref(), &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let stream = tokio_stream::iter(vec![echo_request("echo", &[1.0])]);
        let mut r = tonic::Request::new(stream);
        if let Some(t) = t {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let e = c.model_stream_infer(r).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    assert_eq!(
        s.node.controls().calls(),
        0,
        "no refused call reached the node"
    );
    let refused: std::collections::HashMap<_, _> = s.auth.stats.refused().collect();
    assert_eq!(refused["missing"], 4);
    assert_eq!(refused["malformed"], 4);
    assert_eq!(refused["bad_signature"], 4);
    assert_eq!(refused["expired"], 4);
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_call_names_its_verified_caller_to_the_node() {
    let s = start(&[]).await;
    let mut c = oip(s.router.addr).await;
    let alice = token(SECRET, "alice", None);
    // A caller writing the identity header itself gets it replaced by its token's.
    let req = echo_request("echo", &[2.0]);
    let resp = infer(&mut c, Some(&alice), &[("x-fulcrum-caller", "root")])
        .await
        .unwrap();
    assert_echoed(&req, resp.get_ref());
    let seen = s
        .node
        .controls()
        .last_headers()
        .expect("the node got the call");
    let callers: Vec<_> = seen.get_all(CALLER_HEADER).iter().collect();
    assert_eq!(callers, ["alice"]);
    assert!(
        seen.get("authorization").is_none(),
        "the token stays at the router"
    );
    // Health checks need no token.
    let channel = Channel::from_shared(format!("http://{}", s.router.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(health.into_inner().status(), ServingStatus::Serving);
    // A stream with a token is served.
    let mut r = tonic::Request::new(tokio_stream::iter(vec![req.clone()]));
    r.metadata_mut()
        .insert("authorization", format!("Bearer {alice}").parse().unwrap());
    let mut answers = c.model_stream_infer(r).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("an answer");
    assert_eq!(first.error_message, "");
    assert_echoed(&req, first.infer_response.as_ref().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_keyed_by_the_verified_caller_cannot_be_dodged() {
    let limit = ModelPolicy {
        model: "echo".into(),
        rate_limit_rps: 0.01,
        rate_limit_burst: 1,
        rate_limit_key_header: "x-fulcrum-caller".into(),
        ..Default::default()
    };
    let s = start(std::slice::from_ref(&limit)).await;
    let mut c = oip(s.router.addr).await;
    let (alice, bob) = (token(SECRET, "alice", None), token(SECRET, "bob", None));
    infer(&mut c, Some(&alice), &[]).await.unwrap();
    let before = s.node.controls().calls();
    // Alice's bucket is empty, whatever she writes in the header.
    for spoof in [None, Some("bob"), Some("carol")] {
        let headers: Vec<(&'static str, &str)> =
            spoof.map(|v| ("x-fulcrum-caller", v)).into_iter().collect();
        let e = infer(&mut c, Some(&alice), &headers).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains("x-fulcrum-caller \"alice\""),
            "{}",
            e.message()
        );
    }
    assert_eq!(
        s.node.controls().calls(),
        before,
        "refused calls reach no node"
    );
    // Bob has his own.
    infer(&mut c, Some(&bob), &[]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_above_the_tokens_is_refused() {
    let s = start(&[]).await;
    let mut c = oip(s.router.addr).await;
    let (user, ops) = (
        token(SECRET, "user", None),
        token(SECRET, "ops", Some(Priority::Critical)),
    );
    let before = s.node.controls().calls();
    let e = infer(&mut c, Some(&user), &[("fulcrum-priority", "critical")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("caller \"user\" may ask for priority normal at most"),
        "{}",
        e.message()
    );
    assert_eq!(s.node.controls().calls(), before);
    infer(&mut c, Some(&user), &[("fulcrum-priority", "sheddable")])
        .await
        .unwrap();
    infer(&mut c, Some(&ops), &[("fulcrum-priority", "critical")])
        .await
        .unwrap();
    // A value that is no priority is refused as without tokens.
    let e = infer(&mut c, Some(&user), &[("fulcrum-priority", "urgent")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_takes_effect_without_a_restart() {
    let s = start(&[]).await;
    let mut c = oip(s.router.addr).await;
    let (old, new) = (token(SECRET, "alice", None), token(NEXT, "alice", None));
    infer(&mut c, Some(&old), &[]).await.unwrap();
    assert_eq!(
        infer(&mut c, Some(&new), &[]).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // Both secrets while the rotation runs, then the new one alone.
    std::fs::write(&s.check.secrets, format!("{NEXT}\n{SECRET}\n")).unwrap();
    let client = c.clone();
    fulcrum_tests::eventually("the new secret admitted", Duration::from_secs(30), || {
        let mut c = client.clone();
        let new = new.clone();
        async move { infer(&mut c, Some(&new), &[]).await.ok() }
    })
    .await;
    infer(&mut c, Some(&old), &[]).await.unwrap();
    std::fs::write(&s.check.secrets, format!("{NEXT}\n")).unwrap();
    fulcrum_tests::eventually("the old secret refused", Duration::from_secs(30), || {
        let mut c = client.clone();
        let old = old.clone();
        async move {
            let e = infer(&mut c, Some(&old), &[]).await.err()?;
            (e.code() == Code::Unauthenticated).then_some(())
        }
    })
    .await;
    infer(&mut c, Some(&new), &[]).await.unwrap();
    // A file that no longer holds a key leaves the keys as they were.
    std::fs::write(&s.check.secrets, "").unwrap();
    fulcrum_tests::eventually("the bad file seen", Duration::from_secs(30), || {
        let failed = s.auth.stats.reloads().1;
        async move { (failed > 0).then_some(()) }
    })
    .await;
    infer(&mut c, Some(&new), &[]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_the_token_does_not_list_is_refused_by_every_rpc() {
    let s = start(&[]).await;
    let mut c = oip(s.router.addr).await;
    let scoped = |models: &[&str]| {
        NewToken {
            subject: "tenant-a".into(),
            valid_for: Duration::from_secs(600),
            models: Some(models.iter().map(|m| (*m).to_owned()).collect()),
            ..Default::default()
        }
        .sign_hs256(SECRET.as_bytes())
        .unwrap()
    };
    let (other, echo) = (scoped(&["chat", "embed-*"]), scoped(&["ech*"]));
    let denied = |e: tonic::Status| {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            e.message()
                .contains("caller \"tenant-a\" may not call model \"echo\""),
            "{}",
            e.message()
        );
    };
    denied(infer(&mut c, Some(&other), &[]).await.unwrap_err());
    let name = || "echo".to_owned();
    let t = Some(other.as_str());
    denied(
        c.model_metadata(with_token(
            ModelMetadataRequest {
                name: name(),
                version: String::new(),
            },
            t,
            &[],
        ))
        .await
        .unwrap_err(),
    );
    denied(
        c.model_ready(with_token(
            ModelReadyRequest {
                name: name(),
                version: String::new(),
            },
            t,
            &[],
        ))
        .await
        .unwrap_err(),
    );
    denied(
        c.model_config(with_token(
            ModelConfigRequest {
                name: name(),
                version: String::new(),
            },
            t,
            &[],
        ))
        .await
        .unwrap_err(),
    );
    // A stream's request gets its refusal in-band.
    let mut r = tonic::Request::new(tokio_stream::iter(vec![echo_request("echo", &[1.0])]));
    r.metadata_mut()
        .insert("authorization", format!("Bearer {other}").parse().unwrap());
    let mut answers = c.model_stream_infer(r).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("an answer");
    assert!(
        first.error_message.contains("may not call model \"echo\""),
        "{}",
        first.error_message
    );
    // The repository index shows the caller its models only.
    let index = |t: &str| {
        let mut c = c.clone();
        let t = t.to_owned();
        async move {
            c.repository_index(with_token(RepositoryIndexRequest::default(), Some(&t), &[]))
                .await
                .unwrap()
                .into_inner()
                .models
                .into_iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
        }
    };
    assert!(index(&other).await.is_empty());
    assert_eq!(index(&echo).await, ["echo"]);
    // Pass-through (here the node-sim's own control API) names its model in a header.
    let channel = Channel::from_shared(format!("http://{}", s.router.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let sim =
        fulcrum_proto::fulcrum::v1::node_sim_control_client::NodeSimControlClient::new(channel);
    let passthrough = |t: &str| {
        let mut sim = sim.clone();
        let r = with_token(
            fulcrum_proto::fulcrum::v1::SimConfig::default(),
            Some(t),
            &[("x-fulcrum-model", "echo")],
        );
        async move { sim.configure(r).await }
    };
    denied(passthrough(&other).await.unwrap_err());
    assert_eq!(
        s.node.controls().calls(),
        0,
        "no refused call reached the node"
    );
    // A token listing the model (by prefix) is served.
    infer(&mut c, Some(&echo), &[]).await.unwrap();
    passthrough(&echo).await.unwrap();
    let refused: std::collections::HashMap<_, _> = s.auth.stats.refused().collect();
    assert_eq!(refused["model_not_allowed"], 6);
}
