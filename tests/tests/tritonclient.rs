//! A stock Open Inference Protocol client (tritonclient, from PyPI) calls routers of both
//! regions for every RPC and checks the answers. The control plane runs on the embedded store
//! here, so that backend is exercised end to end too. And a stock gRPC client (grpcio) uses
//! the routers' background calls (`fulcrum.v1.Tasks`).
//!
//! Needs a Python with tritonclient and PyJWT: `scripts/test.sh` makes one in `.venv` and sets
//! `FULCRUM_PYTHON`.

use std::path::PathBuf;
use std::process::Command;

use fulcrum_proto::fulcrum::v1::ModelPolicy;
use fulcrum_sim::node::{NodeSimConfig, spawn};
use fulcrum_tests::mlserver::python;
use fulcrum_tests::stack::{self, admin, register, spec, wait_ready};

/// An admin client of the control plane at `control`, and node-sim `a-1` serving `echo` in
/// region `a`, registered with it.
async fn echo_node(
    control: std::net::SocketAddr,
) -> (
    fulcrum_proto::fulcrum::v1::admin_client::AdminClient<tonic::transport::Channel>,
    fulcrum_sim::node::RunningNodeSim,
) {
    let mut admin = admin(control).await;
    let config = NodeSimConfig {
        name: "a-1".into(),
        models: vec!["echo".into()],
        ..Default::default()
    };
    let node = spawn(config, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    register(&mut admin, spec("a-1", node.addr, "a", &["echo"], 4)).await;
    (admin, node)
}

/// Runs the interop script `script` (in `tests/interop`) with `args`; its standard output, once
/// it has exited successfully (else the test fails with both outputs).
async fn run_check(script: &str, args: Vec<String>) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("interop")
        .join(script);
    let run = script.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(run)
            .args(args)
            .output()
            .expect("run python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{stderr}",
        script.display()
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_gets_correct_answers_from_both_routers() {
    let cp = stack::control_plane("memory:").await;
    let mut admin = admin(cp.addr).await;
    let mut nodes = Vec::new();
    // Model `cached` echoes too, and its policy keeps answers in the routers' caches.
    let models = ["echo", "cached"];
    for (id, region) in [("a-1", "a"), ("a-2", "a"), ("b-1", "b")] {
        let config = NodeSimConfig {
            name: id.into(),
            models: models.map(str::to_owned).to_vec(),
            ..Default::default()
        };
        let n = spawn(config, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        register(&mut admin, spec(id, n.addr, region, &models, 4)).await;
        nodes.push(n);
    }
    let policy = ModelPolicy {
        model: "cached".into(),
        cache_ttl_ms: 600_000,
        ..Default::default()
    };
    admin.set_model_policy(policy.clone()).await.unwrap();
    let router_a = stack::router("a", cp.addr, None).await;
    let router_b = stack::router("b", cp.addr, None).await;
    wait_ready(router_a.addr).await;
    wait_ready(router_b.addr).await;
    stack::wait_policies_applied(&admin, &[policy]).await;

    let args = vec![router_a.addr.to_string(), router_b.addr.to_string()];
    let stdout = run_check("tritonclient_check.py", args).await;
    assert!(
        stdout.contains("ok: ") && stdout.matches("ok: ").count() == 2,
        "{stdout}"
    );
}

/// A router checking caller tokens, called by tritonclient with a token PyJWT signs the seed
/// article's way: admitted with it, UNAUTHENTICATED without or with a wrong one,
/// PERMISSION_DENIED asking for a priority the token does not give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_with_a_pyjwt_token_is_admitted_and_without_refused() {
    let cp = stack::control_plane("memory:").await;
    let (admin, node) = echo_node(cp.addr).await;
    let secret = "the interop test's secret, long enough";
    // Kept to the end: the router reads its secrets file again every few seconds.
    let check = stack::token_check(secret);
    let auth = check.auth.clone();
    let router = stack::router_configured("a", &[cp.addr], move |c| c.auth = Some(auth)).await;
    stack::wait_serving(&admin, "a-1", "echo").await;

    let args = vec![router.addr.to_string(), secret.to_owned()];
    let stdout = run_check("tritonclient_auth_check.py", args).await;
    assert!(stdout.contains("ok: tokens"), "{stdout}");
    assert_eq!(
        node.controls().served("echo"),
        1,
        "only the admitted call reached the node"
    );
}

/// A stock gRPC client (grpcio) submits background calls and polls them, the seed article's
/// way, then waits for one in a long poll; its messages are read from Fulcrum's `.proto` files
/// (a descriptor set `protoc` writes here), so the service's wire form is what is checked.
/// A task submitted to one router is then waited for and deleted through another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_submits_and_polls_background_calls() {
    let cp = stack::control_plane("memory:").await;
    let (admin, node) = echo_node(cp.addr).await;
    let router = stack::router("a", cp.addr, None).await;
    let other = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    wait_ready(other.addr).await;
    stack::wait_serving(&admin, "a-1", "echo").await;

    let dir = tempfile::tempdir().unwrap();
    let descriptors = dir.path().join("tasks.pb");
    let protos = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto/proto");
    let protoc = std::env::var("PROTOC").unwrap_or_else(|_| "protoc".into());
    let status = Command::new(&protoc)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", descriptors.display()))
        .arg(format!("-I{}", protos.display()))
        .arg("fulcrum/v1/tasks.proto")
        .status()
        .unwrap_or_else(|e| panic!("run {protoc}: {e}"));
    assert!(status.success(), "protoc failed");
    let args = vec![
        router.addr.to_string(),
        descriptors.display().to_string(),
        other.addr.to_string(),
    ];
    let stdout = run_check("tasks_check.py", args).await;
    assert!(stdout.contains("ok: polled"), "{stdout}");
    assert!(stdout.contains("ok: the other router answered"), "{stdout}");
    assert_eq!(node.controls().calls(), 3, "each task called the node once");
}
