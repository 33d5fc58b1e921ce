//! A real etcd server for tests: Debian's `etcd` binary on free loopback ports, with a
//! temporary data directory, killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::free_port;

/// Times etcd is started on fresh ports when it exits at start: a port taken by someone else
/// between choosing and binding it is rare, twice in a row rarer still.
const START_ATTEMPTS: u32 = 3;

/// A running (or stopped) etcd.
#[derive(Debug)]
pub struct Etcd {
    /// `host:port` of the client endpoint.
    pub client_addr: String,
    peer_addr: String,
    dir: TempDir,
    child: Option<Child>,
}

fn etcd_binary() -> PathBuf {
    if let Ok(p) = std::env::var("FULCRUM_ETCD") {
        return p.into();
    }
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    "etcd".into()
}

impl Etcd {
    /// Starts etcd and waits until it answers. If it exits first (another process took one of
    /// its ports between `free_port` and etcd binding it: tests and other work run side by
    /// side), it is started again on fresh ports, up to [`START_ATTEMPTS`] times.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for etcd");
        let mut etcd = Etcd {
            client_addr: String::new(),
            peer_addr: String::new(),
            dir,
            child: None,
        };
        for attempt in 1..=START_ATTEMPTS {
            etcd.client_addr = format!("127.0.0.1:{}", free_port());
            etcd.peer_addr = format!("127.0.0.1:{}", free_port());
            match etcd.launch().await {
                Ok(()) => return etcd,
                Err(log) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "etcd exited at start (attempt {attempt}), trying other ports: {log}"
                    );
                    let _ = std::fs::remove_dir_all(etcd.dir.path().join("data"));
                }
                Err(log) => panic!("etcd exited at start {START_ATTEMPTS} times; last log: {log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The store URL for `fulcrum control --store`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client_addr)
    }

    /// Starts etcd again (after [`Etcd::stop`]) with the same ports and data.
    pub async fn resume(&mut self) {
        if let Err(log) = self.launch().await {
            panic!("etcd exited at restart: {log}");
        }
    }

    /// Starts etcd on this instance's ports and waits (30 s at most) until it answers; `Err`
    /// with its log if it exits first.
    async fn launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd is already running");
        let client = format!("http://{}", self.client_addr);
        let peer = format!("http://{}", self.peer_addr);
        let log_path = self.dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).expect("etcd log file");
        let child = Command::new(etcd_binary())
            .arg("--name=fulcrum-test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=fulcrum-test={peer}"))
            .arg("--log-level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect(
                "cannot start etcd: install it (apt-get install etcd-server) or set FULCRUM_ETCD",
            );
        self.child = Some(child);
        let url = self.url();
        let up = crate::eventually("etcd answers", Duration::from_secs(30), || {
            let url = url.clone();
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            async move {
                if exited {
                    return Some(false);
                }
                let store = fulcrum_control_plane::store::open(&url).await.ok()?;
                store.list("/").await.ok().map(|_| true)
            }
        })
        .await;
        if up {
            return Ok(());
        }
        self.child = None;
        Err(std::fs::read_to_string(&log_path).unwrap_or_default())
    }

    /// Kills etcd (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
