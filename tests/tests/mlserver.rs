//! Interoperability with MLServer (Seldon's Open Inference Protocol server, from PyPI), running a
//! small real Python model (`tests/interop/mlserver_model.py`: doubles its FP32 input) on
//! loopback, registered as a node through the admin API:
//!
//! - tritonclient (and MLServer's own stubs) call every RPC MLServer serves through a router
//!   that also fronts node-sims, and get the model's real answers;
//! - a model no node serves falls back to MLServer's model, which reads the renamed request;
//! - calls batched by the router reach MLServer as one request and each gets its own rows of
//!   MLServer's answer;
//! - a killed MLServer makes the router answer UNAVAILABLE, promptly;
//! - with two MLServers in the region, killing one fails over to the other without a failed
//!   call, and calls return to it when it is back.
//!
//! Needs a Python with mlserver and tritonclient: `scripts/test.sh` makes one in `.venv` and
//! sets `FULCRUM_PYTHON`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{GetNodeRequest, ModelPolicy};
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelReadyRequest, ServerReadyRequest,
};
use fulcrum_sim::node::{NodeSimConfig, RunningNodeSim, spawn};
use fulcrum_tests::eventually;
use fulcrum_tests::infer::{assert_echoed, echo_request, served_by};
use fulcrum_tests::mlserver::{MlServer, interop_dir, python};
use fulcrum_tests::stack::{self, admin, oip, register, spec, wait_ready};
use tonic::Code;
use tonic::transport::Channel;

/// Bound on any one call in these tests: an answer (success or error) must come within it.
const CALL_BOUND: Duration = Duration::from_secs(3);

async fn node_sim(name: &str) -> RunningNodeSim {
    let config = NodeSimConfig {
        name: name.into(),
        ..Default::default()
    };
    spawn(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("start node-sim")
}

/// Little-endian FP32 values of a raw tensor.
fn f32s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// One `ModelInfer` through `client`, bounded by [`CALL_BOUND`] (panics if it takes longer:
/// the router must never leave a caller hanging).
async fn infer(
    client: &mut GrpcInferenceServiceClient<Channel>,
    req: &ModelInferRequest,
) -> Result<tonic::Response<ModelInferResponse>, tonic::Status> {
    let mut request = tonic::Request::new(req.clone());
    request.set_timeout(CALL_BOUND);
    match tokio::time::timeout(
        CALL_BOUND + Duration::from_secs(1),
        client.model_infer(request),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => panic!("ModelInfer({}) hung", req.model_name),
    }
}

/// Calls the doubler through `client`; returns the serving node, after checking the answer.
async fn double(
    client: &mut GrpcInferenceServiceClient<Channel>,
    req: &ModelInferRequest,
) -> Result<String, tonic::Status> {
    let resp = infer(client, req).await?;
    let out = resp.get_ref();
    assert_eq!(out.outputs.len(), 1, "one output: {out:?}");
    assert_eq!(out.outputs[0].shape, req.inputs[0].shape);
    assert_eq!(out.outputs[0].datatype, "FP32");
    let want: Vec<f32> = f32s(&req.raw_input_contents[0])
        .iter()
        .map(|v| v * 2.0)
        .collect();
    assert_eq!(f32s(&out.raw_output_contents[0]), want, "doubled");
    Ok(served_by(resp.metadata()).0)
}

/// Waits until the router at `router` says `model` is ready (a node serving it is routable
/// and answers `ModelReady`).
async fn wait_model_ready(router: SocketAddr, model: &str) {
    let client = oip(router).await;
    eventually(
        &format!("model {model} ready via the router"),
        Duration::from_secs(20),
        || {
            let mut c = client.clone();
            let req = ModelReadyRequest {
                name: model.into(),
                version: String::new(),
            };
            async move { c.model_ready(req).await.ok()?.get_ref().ready.then_some(()) }
        },
    )
    .await;
}

/// Runs `tests/interop/mlserver_check.py` against `router` with the client `mode`
/// (`tritonclient` or `mlserver-stubs`); returns what it printed.
async fn run_check(mode: &str, router: SocketAddr, ml: &MlServer, ml_node: &str) -> String {
    let script = interop_dir().join("mlserver_check.py");
    let args = [
        mode.into(),
        router.to_string(),
        ml.grpc_addr.to_string(),
        ml_node.into(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
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
        "mlserver check ({mode}) failed:\n{stdout}\n{stderr}\nMLServer log:\n{}",
        ml.log()
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_through_a_router_to_mlserver_and_node_sims_then_mlserver_dies() {
    let cp = stack::control_plane("memory:").await;
    let mut admin = admin(cp.addr).await;
    let ml = MlServer::start(&["doubler"]).await;
    // Registered without models: the control plane lists them from MLServer (RepositoryIndex).
    register(&mut admin, spec("ml-1", ml.grpc_addr, "a", &[], 4)).await;
    let sims = [node_sim("sim-1").await, node_sim("sim-2").await];
    for (i, s) in sims.iter().enumerate() {
        register(
            &mut admin,
            spec(&format!("sim-{}", i + 1), s.addr, "a", &["echo"], 4),
        )
        .await;
    }
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    wait_model_ready(router.addr, "doubler").await;
    wait_model_ready(router.addr, "echo").await;

    // The control plane's prober judges MLServer healthy although it has no grpc.health.v1.
    let status = admin
        .get_node(GetNodeRequest { id: "ml-1".into() })
        .await
        .expect("get node ml-1")
        .into_inner();
    assert!(status.probe_streak > 0, "ml-1 probes: {status:?}");

    let (triton, stubs) = tokio::join!(
        run_check("tritonclient", router.addr, &ml, "ml-1"),
        run_check("mlserver-stubs", router.addr, &ml, "ml-1"),
    );
    let stdout = triton + &stubs;
    for what in [
        "ServerLive",
        "ModelMetadata",
        "ModelInfer",
        "errors",
        "ModelStreamInfer",
        "MLServer stubs",
    ] {
        assert!(
            stdout.contains(&format!("ok: {what}")),
            "{what} not checked:\n{stdout}"
        );
    }

    // A model no node serves, whose policy falls back to MLServer's doubler: the router sends
    // the request on with the fallback's name appended to the client's bytes, and MLServer's
    // own protobuf parser (the last value of a field wins) reads it as a call for doubler.
    let mut client = oip(router.addr).await;
    let policy = ModelPolicy {
        model: "doubler-xl".into(),
        fallback_model: "doubler".into(),
        ..Default::default()
    };
    admin
        .set_model_policy(policy.clone())
        .await
        .expect("set the fallback policy");
    stack::wait_policies_applied(&admin, &[policy]).await;
    let xl = echo_request("doubler-xl", &[1.5, -4.0]);
    let resp = infer(&mut client, &xl)
        .await
        .expect("doubler-xl falls back");
    let md = resp.metadata();
    assert_eq!(served_by(md).0, "ml-1");
    assert_eq!(md.get("x-fulcrum-fallback").unwrap(), "doubler");
    let out = resp.get_ref();
    assert_eq!(out.model_name, "doubler", "{out:?}");
    assert_eq!(f32s(&out.raw_output_contents[0]), [3.0, -8.0], "doubled");

    // Batching in front of MLServer: four calls arriving together reach it as one request of
    // all their rows, and MLServer's answer (shape and raw data of the whole batch) is split
    // back: each caller gets its own rows doubled.
    let batching = ModelPolicy {
        model: "doubler".into(),
        batch_max_size: 4,
        batch_window_us: 100_000,
        ..Default::default()
    };
    admin
        .set_model_policy(batching.clone())
        .await
        .expect("set the batching policy");
    stack::wait_policies_applied(&admin, &[batching]).await;
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let values: Vec<f32> = (0..2 * (1 + i % 2)).map(|v| (10 * i + v) as f32).collect();
            let mut req = echo_request("doubler", &values);
            req.id = format!("batched-{i}");
            req.inputs[0].shape = vec![1 + i64::from(i % 2), 2];
            let mut c = client.clone();
            tokio::spawn(async move {
                let resp = infer(&mut c, &req).await;
                (req, resp)
            })
        })
        .collect();
    for call in calls {
        let (req, resp) = call.await.unwrap();
        let resp = resp.expect("a batched call to MLServer");
        assert_eq!(resp.metadata().get("x-fulcrum-batch").unwrap(), "4");
        let out = resp.get_ref();
        assert_eq!(out.id, req.id);
        assert_eq!(out.outputs[0].shape, req.inputs[0].shape);
        let want: Vec<f32> = f32s(&req.raw_input_contents[0])
            .iter()
            .map(|v| v * 2.0)
            .collect();
        assert_eq!(
            f32s(&out.raw_output_contents[0]),
            want,
            "its own rows, doubled"
        );
    }
    admin
        .delete_model_policy(fulcrum_proto::fulcrum::v1::GetModelPolicyRequest {
            model: "doubler".into(),
        })
        .await
        .expect("remove the batching policy");

    // MLServer dies: calls for its model are refused with UNAVAILABLE, never left hanging,
    // while the node-sims' model is still served.
    let doubler = echo_request("doubler", &[1.0, -2.5, 3.0]);
    let echo = echo_request("echo", &[4.0, 5.0]);
    let mut ml = ml;
    ml.kill();
    let started = tokio::time::Instant::now();
    let first = infer(&mut client, &doubler).await;
    assert_eq!(
        first.as_ref().map_err(|s| s.code()).err(),
        Some(Code::Unavailable),
        "first call after the kill: {first:?}"
    );
    assert!(started.elapsed() < CALL_BOUND, "refused promptly");
    let status = eventually(
        "the router knows no healthy node for doubler",
        Duration::from_secs(20),
        || {
            let mut c = client.clone();
            let req = doubler.clone();
            async move {
                match infer(&mut c, &req).await {
                    Err(s) if s.code() == Code::Unavailable && s.message().contains("healthy") => {
                        Some(s)
                    }
                    Err(s) => {
                        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                        None
                    }
                    Ok(_) => panic!("doubler answered with MLServer dead"),
                }
            }
        },
    )
    .await;
    assert!(status.message().contains("doubler"), "{status:?}");
    let resp = infer(&mut client, &echo).await.expect("echo still served");
    assert_echoed(&echo, resp.get_ref());
    assert!(served_by(resp.metadata()).0.starts_with("sim-"));
    let ready = client
        .model_ready(ModelReadyRequest {
            name: "doubler".into(),
            version: String::new(),
        })
        .await
        .expect("ModelReady");
    assert!(!ready.get_ref().ready, "doubler is not ready any more");
    let ready = client.server_ready(ServerReadyRequest {}).await.unwrap();
    assert!(ready.get_ref().ready, "the router still serves echo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mlservers_in_a_region_fail_over_and_back_without_a_failed_call() {
    let cp = stack::control_plane("memory:").await;
    let mut admin = admin(cp.addr).await;
    let (ml1, ml2) = tokio::join!(MlServer::start(&["doubler"]), MlServer::start(&["doubler"]));
    register(
        &mut admin,
        spec("ml-1", ml1.grpc_addr, "a", &["doubler"], 4),
    )
    .await;
    register(
        &mut admin,
        spec("ml-2", ml2.grpc_addr, "a", &["doubler"], 4),
    )
    .await;
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    let client = oip(router.addr).await;
    let req = echo_request("doubler", &[0.5, 1.0, -8.0, 1e6]);

    // Both MLServers take calls.
    eventually("both MLServers serve", Duration::from_secs(20), || {
        let mut c = client.clone();
        let req = req.clone();
        async move {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..20 {
                seen.insert(double(&mut c, &req).await.ok()?);
            }
            (seen.len() == 2).then_some(())
        }
    })
    .await;

    // ml-1 dies between two calls: every later call succeeds, served by ml-2, both before the
    // control plane notices (the router retries on ml-2) and after (ml-1 is out of the table).
    let mut ml1 = ml1;
    ml1.kill();
    let mut c = client.clone();
    let mut calls = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut noticed_after = None;
    loop {
        let node = double(&mut c, &req)
            .await
            .unwrap_or_else(|s| panic!("call {calls} after the kill failed: {s:?}"));
        assert_eq!(node, "ml-2", "call {calls} after the kill");
        calls += 1;
        if noticed_after.is_none() {
            let st = admin
                .get_node(GetNodeRequest { id: "ml-1".into() })
                .await
                .expect("get node")
                .into_inner();
            if st.probe_streak < 0 && st.endpoint.is_some_and(|e| e.weight == 0.0) {
                noticed_after = Some(calls);
            }
        }
        if noticed_after.is_some_and(|n| calls >= n + 50) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the control plane did not mark ml-1 down within 20 s ({calls} calls)"
        );
    }

    // ml-1 comes back on the same address: the prober finds it healthy again and calls return
    // to it, still without a failed call.
    let ml1 = MlServer::start_on(&["doubler"], ml1.grpc_addr.port(), ml1.http_addr.port()).await;
    eventually("calls return to ml-1", Duration::from_secs(20), || {
        let mut c = client.clone();
        let req = req.clone();
        async move {
            let node = double(&mut c, &req).await.expect("no call fails");
            (node == "ml-1").then_some(())
        }
    })
    .await;
    drop((ml1, ml2));
}
