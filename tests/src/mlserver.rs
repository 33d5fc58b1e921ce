//! A real MLServer (PyPI `mlserver`, Seldon's Open Inference Protocol server) as a child process:
//! a temporary model repository serving the `Doubler` model of `tests/interop/mlserver_model.py`
//! under the names asked for, gRPC and HTTP on free 127.0.0.1 ports, metrics off, one process
//! (no parallel inference workers), killed when dropped.
//!
//! Needs a Python with `mlserver`: `scripts/test.sh` makes one in `.venv` and sets
//! `FULCRUM_PYTHON`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fulcrum_proto::inference::ServerReadyRequest;
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use serde_json::json;
use tempfile::TempDir;
use tonic::transport::Endpoint;

use crate::free_port;

/// How long MLServer may take from spawn to `ServerReady` (it starts in 2–3 s on an idle
/// 2-core machine; imports dominate, so a busy machine takes several times that).
pub const START_DEADLINE: Duration = Duration::from_secs(40);

/// The Python that runs MLServer and tritonclient: `$FULCRUM_PYTHON`, else the project's
/// `.venv`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("FULCRUM_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with mlserver and tritonclient: run scripts/test.sh (it creates .venv) or set FULCRUM_PYTHON"
    );
    venv
}

/// The folder holding the Python helpers (`mlserver_model.py`, the check scripts).
pub fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

/// A running (or killed) MLServer.
#[derive(Debug)]
pub struct MlServer {
    /// Its gRPC (Open Inference Protocol) address.
    pub grpc_addr: SocketAddr,
    /// Its HTTP (REST) address.
    pub http_addr: SocketAddr,
    dir: TempDir,
    child: Option<Child>,
}

/// Writes the model repository: `settings.json` (server) and one `model-settings.json` per model.
fn write_repository(dir: &Path, grpc_port: u16, http_port: u16, models: &[&str]) {
    let settings = json!({
        "debug": false,
        "host": "127.0.0.1",
        "grpc_port": grpc_port,
        "http_port": http_port,
        "metrics_endpoint": null,
        "parallel_workers": 0,
        "load_models_at_startup": true,
    });
    std::fs::write(dir.join("settings.json"), settings.to_string()).expect("write settings.json");
    for model in models {
        let tensor = json!({
            "name": "x",
            "datatype": "FP32",
            "shape": [-1, -1],
            "parameters": {"content_type": "np"},
        });
        let model_settings = json!({
            "name": model,
            "implementation": "mlserver_model.Doubler",
            "platform": "fulcrum-test",
            "versions": ["doubler/1"],
            "inputs": [tensor],
            "outputs": [tensor],
            "parameters": {"content_type": "np"},
        });
        let model_dir = dir.join("models").join(model);
        std::fs::create_dir_all(&model_dir).expect("model dir");
        std::fs::write(
            model_dir.join("model-settings.json"),
            model_settings.to_string(),
        )
        .expect("write model-settings.json");
    }
}

impl MlServer {
    /// Starts MLServer serving the doubler under each of `models`, and waits (at most
    /// [`START_DEADLINE`]) until its `ServerReady` says ready over gRPC.
    pub async fn start(models: &[&str]) -> Self {
        Self::start_on(models, free_port(), free_port()).await
    }

    /// Starts MLServer on the given ports (see [`MlServer::start`]).
    pub async fn start_on(models: &[&str], grpc_port: u16, http_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for MLServer");
        write_repository(dir.path(), grpc_port, http_port, models);
        let log = std::fs::File::create(dir.path().join("mlserver.log")).expect("log file");
        let child = Command::new(python())
            .arg("-c")
            .arg("import sys; from mlserver.cli import main; sys.argv[0] = 'mlserver'; sys.exit(main())")
            .arg("start")
            .arg(dir.path())
            .current_dir(dir.path())
            .env("PYTHONPATH", interop_dir())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("cannot start MLServer: run scripts/test.sh (it installs it in .venv) or set FULCRUM_PYTHON");
        let mut server = MlServer {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], grpc_port)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], http_port)),
            dir,
            child: Some(child),
        };
        server.wait_ready().await;
        for port in [grpc_port, http_port] {
            let listeners = listeners_on(port);
            assert!(
                !listeners.is_empty() && listeners.iter().all(|a| is_loopback(a)),
                "MLServer must listen on 127.0.0.1 only; port {port} has listeners {listeners:?}"
            );
        }
        server
    }

    /// Polls `ServerReady` until it says ready; panics with MLServer's log if the process exits
    /// or the deadline passes.
    async fn wait_ready(&mut self) {
        let channel = Endpoint::from_shared(format!("http://{}", self.grpc_addr))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .connect_lazy();
        let mut client = GrpcInferenceServiceClient::new(channel);
        let end = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            if let Ok(r) = client.server_ready(ServerReadyRequest {}).await
                && r.get_ref().ready
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "MLServer exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if tokio::time::Instant::now() >= end {
                panic!(
                    "MLServer not ready after {START_DEADLINE:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What MLServer wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mlserver.log")).unwrap_or_default()
    }

    /// Kills MLServer (SIGKILL, as a crash would) and reaps it; its ports close at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Local addresses (hex, as the kernel writes them) of the TCP sockets listening on `port`.
fn listeners_on(port: u16) -> Vec<String> {
    let port = format!("{port:04X}");
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `sl local_address rem_address st …`; state 0A is LISTEN.
            if let [_, local, _, "0A", ..] = fields[..]
                && let Some((addr, p)) = local.split_once(':')
                && p == port
            {
                found.push(addr.to_owned());
            }
        }
    }
    found
}

/// Whether a `/proc/net/tcp{,6}` address is 127.0.0.1, `::ffff:127.0.0.1` or `::1`.
fn is_loopback(hex: &str) -> bool {
    hex == "0100007F"
        || hex == "0000000000000000FFFF00000100007F"
        || hex == "00000000000000000000000001000000"
}

impl Drop for MlServer {
    fn drop(&mut self) {
        self.kill();
    }
}
