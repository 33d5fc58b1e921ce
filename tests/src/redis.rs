//! A real Redis server for tests: Debian's `redis-server` on a free loopback port, keeping
//! nothing on disk, killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::free_port;

/// Times Redis is started on a fresh port when it exits at start (another process took the
/// port between choosing and binding it).
const START_ATTEMPTS: u32 = 3;

/// A running (or stopped) Redis.
#[derive(Debug)]
pub struct Redis {
    /// `host:port` it listens on.
    pub addr: String,
    dir: TempDir,
    child: Option<Child>,
}

fn redis_binary() -> PathBuf {
    if let Ok(p) = std::env::var("FULCRUM_REDIS") {
        return p.into();
    }
    "redis-server".into()
}

impl Redis {
    /// Starts Redis and waits until it answers.
    pub async fn start() -> Self {
        let mut redis = Redis {
            addr: String::new(),
            dir: tempfile::tempdir().expect("temp dir for redis"),
            child: None,
        };
        for attempt in 1..=START_ATTEMPTS {
            redis.addr = format!("127.0.0.1:{}", free_port());
            match redis.launch().await {
                Ok(()) => return redis,
                Err(log) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "redis exited at start (attempt {attempt}), trying another port: {log}"
                    );
                }
                Err(log) => panic!("redis exited at start {START_ATTEMPTS} times; last log: {log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The URL for `fulcrum router --cache-redis`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Keys it holds now (`DBSIZE`), or `None` when it does not answer.
    pub fn keys(&self) -> Option<u64> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()?;
        redis::cmd("DBSIZE").query(&mut conn).ok()
    }

    /// Starts Redis again (after [`Redis::stop`]) on the same port, empty.
    pub async fn resume(&mut self) {
        if let Err(log) = self.launch().await {
            panic!("redis exited at restart: {log}");
        }
    }

    async fn launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "redis is already running");
        let (host, port) = self.addr.rsplit_once(':').expect("host:port");
        let log_path = self.dir.path().join("redis.log");
        let child = Command::new(redis_binary())
            .args(["--bind", host, "--port", port])
            // Nothing on disk: no snapshots, no append-only file.
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log_path)
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server: install it (apt-get install redis-server) or set FULCRUM_REDIS");
        self.child = Some(child);
        let up = crate::eventually("redis answers", Duration::from_secs(30), || {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            let answers = !exited && self.keys().is_some();
            async move { (exited || answers).then_some(answers) }
        })
        .await;
        if up {
            return Ok(());
        }
        self.child = None;
        Err(std::fs::read_to_string(&log_path).unwrap_or_default())
    }

    /// Kills Redis (what it held is gone).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
