//! `fulcrum up` as a new user runs it: the real binary, the whole two-region stack, then
//! `fulcrum ctl`, `fulcrum load` and `fulcrum task` against it, a manual failover by draining region a, and a
//! clean stop on Ctrl-C (SIGINT); and `fulcrum up --jwt-secret-file`, whose routers admit only
//! callers with a token `fulcrum token` signed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fulcrum");

/// Kills the stack if the test fails half-way.
struct Stack(Child);

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fulcrum(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run fulcrum");
    assert!(
        out.status.success(),
        "fulcrum {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn load(router: &str) -> serde_json::Value {
    let out = fulcrum(&[
        "load",
        "--target",
        router,
        "--model",
        "echo",
        "--rps",
        "100",
        "--duration",
        "1s",
        "--json",
    ]);
    serde_json::from_str(&out).expect("load --json output")
}

/// Regions that served the calls of a load report, and whether every call succeeded.
fn regions(report: &serde_json::Value) -> (Vec<String>, bool) {
    let all_ok = report["ok"] == report["sent"] && report["sent"].as_u64() > Some(0);
    let regions = report["regions"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    (regions, all_ok)
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET path` from 127.0.0.1:`port` over HTTP/1.1; the whole answer.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A base port for `fulcrum up` whose ports (base to base + 2, and the node ports from base + 101
/// and base + 201) are free now: below Linux's ephemeral range (32768 and up, where other
/// programs' outgoing connections take ports at random), away from the default 7000 so that a
/// developer's own `fulcrum up` does not collide, and probed rather than assumed. Tests of this
/// file run at once: each starts its search `offset` blocks apart, so they do not pick the same.
fn free_base(offset: u16) -> u16 {
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    let start = (std::process::id() % 40) as u16 + offset;
    for k in 0..40 {
        let base = 20_000 + ((start + k) % 40) * 300;
        let ports = (0..3).chain(10..13).chain(101..111).chain(201..211);
        if ports.map(|p| base + p).all(free) {
            return base;
        }
    }
    panic!("no free block of ports between 20000 and 32000");
}

/// Starts `fulcrum up` on `base` with its state in `state` and `extra` flags; the running
/// stack and its banner, once printed (at most 60 s).
fn start_up(base: u16, state: &std::path::Path, extra: &[&std::ffi::OsStr]) -> (Stack, String) {
    let mut child = Command::new(BIN)
        .args(["up", "--base-port", &base.to_string(), "--state-dir"])
        .arg(state)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start fulcrum up");
    let stdout = child.stdout.take().unwrap();
    let stack = Stack(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut banner = String::new();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("fulcrum up did not print its banner");
        banner.push_str(&line);
        banner.push('\n');
        if line.contains("Ctrl-C stops everything") {
            return (stack, banner);
        }
    }
}

#[test]
fn up_serves_both_regions_and_fails_over_on_drain() {
    let state = tempfile::tempdir().unwrap();
    let base = free_base(0);
    let (mut stack, banner) = start_up(base, state.path(), &[]);
    let control = format!("127.0.0.1:{base}");
    let router_a = format!("127.0.0.1:{}", base + 1);
    let router_b = format!("127.0.0.1:{}", base + 2);
    assert!(
        banner.contains(&router_a) && banner.contains(&router_b),
        "{banner}"
    );

    let nodes: serde_json::Value =
        serde_json::from_str(&fulcrum(&["ctl", "--control", &control, "nodes", "--json"])).unwrap();
    let nodes = nodes.as_array().expect("a JSON array of nodes");
    assert_eq!(nodes.len(), 6);
    for region in ["a", "b"] {
        assert_eq!(nodes.iter().filter(|n| n["region"] == region).count(), 3);
    }
    assert!(nodes.iter().all(|n| n["id"].is_string()));

    // Nodes pass their probes one by one as the stack starts, and while a region is only
    // partly up its router spills some calls to the other one, then climbs back to all-local
    // gradually (the spill-over rule): wait for it rather than catch the ramp.
    eventually("router a serves from region a only", || {
        regions(&load(&router_a)) == (vec!["a".to_string()], true)
    });
    eventually("router b serves from region b only", || {
        regions(&load(&router_b)) == (vec!["b".to_string()], true)
    });
    // Each router's metrics count the calls just made.
    let metrics = http_get(base + 11, "/metrics");
    assert!(
        metrics.contains("fulcrum_router_requests_total{model=\"echo\",code=\"OK\"}"),
        "{metrics}"
    );

    // A background call, as README shows it: submitted, then waited for; the answer is the
    // node's echo.
    let id = fulcrum(&[
        "task", "--router", &router_a, "submit", "--model", "echo", "--values", "1,2,3",
    ]);
    let id = id.trim();
    assert!(id.contains('@'), "{id}");
    let shown = fulcrum(&["task", "--router", &router_a, "get", id, "--wait"]);
    assert!(shown.contains("state   SUCCEEDED"), "{shown}");
    assert!(
        shown.contains("output  INPUT0 FP32 [1, 3] = [1.0, 2.0, 3.0]"),
        "{shown}"
    );
    assert!(shown.contains("x-fulcrum-region: a"), "{shown}");
    // Router b answers for it too, asking router a (found in the control plane's directory).
    let via_b = fulcrum(&["task", "--router", &router_b, "get", id]);
    assert!(via_b.contains("state   SUCCEEDED"), "{via_b}");
    assert!(id.ends_with("@router-a"), "{id}");
    fulcrum(&["task", "--router", &router_b, "delete", id]);
    let gone = Command::new(BIN)
        .args(["task", "--router", &router_a, "get", id])
        .output()
        .expect("run fulcrum");
    assert!(!gone.status.success(), "a deleted task was answered");
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(stderr.contains("NotFound: no task"), "{stderr}");

    // A model's default priority, set and read back through ctl; one that is not a priority
    // is refused before anything is sent.
    let policy = |args: &[&str]| {
        let mut all = vec!["ctl", "--control", control.as_str(), "policy"];
        all.extend_from_slice(args);
        fulcrum(&all)
    };
    let out = policy(&["set", "echo", "--default-priority", "sheddable"]);
    assert!(out.contains("default_priority=sheddable"), "{out}");
    let refused = Command::new(BIN)
        .args(["ctl", "--control", &control, "policy", "set", "echo"])
        .args(["--default-priority", "urgent"])
        .output()
        .expect("run fulcrum");
    assert!(
        !refused.status.success(),
        "priority \"urgent\" was accepted"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("unknown priority \"urgent\""), "{stderr}");
    let out = policy(&["get", "echo"]);
    assert!(out.contains("default_priority=sheddable"), "{out}");
    let out = policy(&[
        "set",
        "echo",
        "--rate-limit",
        "50",
        "--rate-limit-key",
        "x-api-key",
    ]);
    assert!(
        out.contains("rate_limit=\"50/s burst=1s per x-api-key\""),
        "{out}"
    );
    policy(&["clear", "echo"]);
    // A fallback model, set and read back; a model cannot be its own.
    let out = policy(&["set", "big", "--fallback-model", "echo"]);
    assert!(out.contains("fallback=echo"), "{out}");
    let out = policy(&["get", "big"]);
    assert!(out.contains("fallback=echo"), "{out}");
    let refused = Command::new(BIN)
        .args(["ctl", "--control", &control, "policy", "set", "big"])
        .args(["--fallback-model", "big"])
        .output()
        .expect("run fulcrum");
    assert!(!refused.status.success(), "a model was its own fallback");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("names the model itself"), "{stderr}");
    policy(&["clear", "big"]);
    // Response caching, set and read back.
    let out = policy(&[
        "set",
        "echo",
        "--cache-ttl",
        "30s",
        "--cache-key",
        "x-tenant",
    ]);
    assert!(out.contains("cache=\"30000ms per x-tenant\""), "{out}");
    let out = policy(&["flush-cache", "echo"]);
    assert!(out.contains("echo: cached answers flushed"), "{out}");
    let out = policy(&[
        "set",
        "echo",
        "--batch-max-size",
        "8",
        "--batch-window",
        "1ms",
    ]);
    assert!(out.contains("batch=\"8 within 1000us\""), "{out}");
    let out = policy(&[
        "set",
        "echo",
        "--canary-model",
        "echo-next",
        "--canary-percent",
        "10",
        "--canary-key",
        "x-user",
    ]);
    assert!(out.contains("canary=\"echo-next 10% by x-user\""), "{out}");
    // That policy caches nothing: there is nothing to flush.
    let refused = Command::new(BIN)
        .args([
            "ctl",
            "--control",
            &control,
            "policy",
            "flush-cache",
            "echo",
        ])
        .output()
        .expect("run fulcrum");
    assert!(
        !refused.status.success(),
        "flushed a model that caches nothing"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("caches no answers"), "{stderr}");
    policy(&["clear", "echo"]);

    for id in ["a-1", "a-2", "a-3"] {
        fulcrum(&["ctl", "--control", &control, "drain", id]);
    }
    eventually("router a serves from region b only", || {
        regions(&load(&router_a)) == (vec!["b".to_string()], true)
    });
    for id in ["a-1", "a-2", "a-3"] {
        fulcrum(&["ctl", "--control", &control, "undrain", id]);
    }
    eventually("router a serves from region a again", || {
        regions(&load(&router_a)) == (vec!["a".to_string()], true)
    });

    // Region a's servers turn unhealthy (as a crashed model would): the probes see it.
    let a_nodes: Vec<String> = (101..=103)
        .map(|p| format!("127.0.0.1:{}", base + p))
        .collect();
    for n in &a_nodes {
        fulcrum(&["ctl", "sim", n, "--healthy", "false"]);
    }
    eventually("router a fails over to region b", || {
        regions(&load(&router_a)) == (vec!["b".to_string()], true)
    });
    for n in &a_nodes {
        fulcrum(&["ctl", "sim", n, "--healthy", "true"]);
    }
    eventually("router a is back on region a", || {
        regions(&load(&router_a)) == (vec!["a".to_string()], true)
    });

    // Ctrl-C stops everything cleanly.
    let pid = stack.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let end = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = stack.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "fulcrum up did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "fulcrum up exited with {status}");
}

#[test]
fn up_with_a_secret_file_admits_only_callers_with_tokens() {
    let state = tempfile::tempdir().unwrap();
    let secrets = state.path().join("secrets");
    std::fs::write(&secrets, "the secret of this test, long enough\n").unwrap();
    let base = free_base(20);
    let flags = [
        "--nodes-per-region".as_ref(),
        "1".as_ref(),
        "--jwt-secret-file".as_ref(),
    ];
    let mut extra: Vec<&std::ffi::OsStr> = flags.to_vec();
    extra.push(secrets.as_os_str());
    let (_stack, banner) = start_up(base, state.path(), &extra);
    assert!(banner.contains("the routers check tokens"), "{banner}");
    let router = format!("127.0.0.1:{}", base + 1);
    let secret_file = secrets.to_str().unwrap();
    let token = fulcrum(&["token", "--secret-file", secret_file, "--sub", "me"]);
    let header = format!("authorization=Bearer {}", token.trim());
    let load = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "load",
            "--target",
            &router,
            "--rps",
            "50",
            "--duration",
            "500ms",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&fulcrum(&args)).expect("load --json output")
    };
    // With a token: once the routers hold their table, every call is served.
    eventually("calls with a token served", || {
        let r = load(&["--header", &header]);
        r["ok"] == r["sent"] && r["sent"].as_u64() > Some(0)
    });
    // Without one: every call refused.
    let r = load(&[]);
    assert_eq!(r["ok"], 0, "{r}");
    assert_eq!(r["errors"]["UNAUTHENTICATED"], r["sent"], "{r}");
}
