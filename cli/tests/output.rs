//! The binary's output when its reader goes away: `fulcrum load --json | head -1` (or any
//! reader that closes the pipe early) must end the command quietly, not with a panic and a
//! backtrace on standard error.

use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fulcrum");

/// Kills the node-sim when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    // A port free now; the node-sim binds it next (another process taking it in between would
    // fail the wait below, not pass the test).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("127.0.0.1:{port}");
    let _sim = Killed(
        Command::new(BIN)
            .args(["node-sim", "--listen", &target, "--name", "sim"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start node-sim"),
    );
    let end = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&target).is_err() {
        assert!(Instant::now() < end, "node-sim did not listen on {target}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut load = Command::new(BIN)
        .args([
            "load",
            "--target",
            &target,
            "--rps",
            "50",
            "--duration",
            "300ms",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start load");
    // The reader goes away before the report is written.
    drop(load.stdout.take());
    let out = load.wait_with_output().expect("wait for load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "load ended with {} after its reader closed the pipe:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
