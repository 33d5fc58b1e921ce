//! A real etcd server for tests: Debian's `etcd` binary on free loopback ports, with a
//! temporary data directory, killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::free_port;

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
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for etcd");
        let mut etcd = Etcd {
            client_addr: format!("127.0.0.1:{}", free_port()),
            peer_addr: format!("127.0.0.1:{}", free_port()),
            dir,
            child: None,
        };
        etcd.resume().await;
        etcd
    }

    /// The store URL for `fulcrum control --store`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client_addr)
    }

    /// Starts etcd again (after [`Etcd::stop`]) with the same ports and data.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let client = format!("http://{}", self.client_addr);
        let peer = format!("http://{}", self.peer_addr);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log file");
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
        crate::eventually("etcd answers", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                let store = fulcrum_control_plane::store::open(&url).await.ok()?;
                store.list("/").await.ok().map(|_| ())
            }
        })
        .await;
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
