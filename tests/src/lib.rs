//! Harness for Fulcrum's end-to-end tests: a real etcd on a free loopback port with a temporary
//! data directory, control planes, routers and simulated nodes over real gRPC on loopback, and a
//! helper to wait for conditions with a deadline instead of sleeping.
//!
//! Layout:
//! - [`etcd`]: start, stop and restart an etcd server.
//! - [`redis`]: start, stop and restart a Redis server (the response cache's shared level).
//! - [`stack`]: control plane, routers and node-sims wired together.
//! - [`eventually`]: poll a condition until it holds or a deadline passes.
//! - [`infer`]: building and checking Open Inference Protocol requests.
//! - [`mlserver`]: a real MLServer (from PyPI) serving a small Python model.
//! - [`scrape`]: reading a Prometheus scrape.

#![warn(missing_docs)]

pub mod etcd;
pub mod infer;
pub mod mlserver;
pub mod redis;
pub mod scrape;
pub mod stack;

use std::future::Future;
use std::time::Duration;

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released for the caller to bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

/// Serializes the tests that measure shares, latencies or timing within one test binary, so
/// they do not compete with each other for this machine's two cores. Hold the guard for the
/// whole test.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}
