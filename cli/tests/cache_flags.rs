//! `fulcrum router` refuses to start with a shared cache level it cannot use.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fulcrum");

#[test]
fn a_router_does_not_start_with_cache_flags_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, "too short\n").unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, "a secret long enough for the cache\n").unwrap();
    let (short, good) = (short.to_str().unwrap(), good.to_str().unwrap());
    for (args, says) in [
        (
            vec!["--cache-redis", "redis://127.0.0.1:6379"],
            "--cache-secret-file",
        ),
        (vec!["--cache-secret-file", good], "--cache-redis"),
        (
            vec![
                "--cache-redis",
                "redis://127.0.0.1:6379",
                "--cache-secret-file",
                "/nonexistent/fulcrum-cache-secret",
            ],
            "/nonexistent/fulcrum-cache-secret",
        ),
        (
            vec![
                "--cache-redis",
                "redis://127.0.0.1:6379",
                "--cache-secret-file",
                short,
            ],
            "9 bytes; it must be at least 16",
        ),
        (
            vec![
                "--cache-redis",
                "memcached://x",
                "--cache-secret-file",
                good,
            ],
            "cannot use Redis URL memcached://x",
        ),
    ] {
        let out = Command::new(BIN)
            .args(["router", "--region", "a", "--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
