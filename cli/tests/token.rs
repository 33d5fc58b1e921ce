//! `fulcrum token` signs tokens a router's token check admits, and `fulcrum router` refuses to
//! start with token flags it cannot use.

use std::process::Command;

use fulcrum_data_plane::auth::{AuthConfig, CallerAuth};
use fulcrum_data_plane::priority::Priority;

const BIN: &str = env!("CARGO_BIN_EXE_fulcrum");

#[test]
fn a_signed_token_is_admitted_by_the_routers_check() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::write(
        &secrets,
        "# rotated 2026-12\nthe routers' secret, long enough\nold\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "token",
            "--sub",
            "svc-a",
            "--ttl",
            "10m",
            "--max-priority",
            "critical",
        ])
        .args(["--models", "chat,embed-*"])
        .arg("--secret-file")
        .arg(&secrets)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let auth = CallerAuth::load(AuthConfig {
        secret_files: vec![secrets],
        ..Default::default()
    })
    .unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().unwrap(),
    );
    let caller = auth.authenticate(&mut headers).unwrap();
    assert_eq!(caller.id, "svc-a");
    assert_eq!(caller.max_priority, Priority::Critical);
    assert!(caller.may_call("embed-small") && !caller.may_call("rerank"));

    let out = Command::new(BIN)
        .args([
            "token",
            "--sub",
            "a",
            "--max-priority",
            "urgent",
            "--secret-file",
        ])
        .arg(dir.path().join("secrets"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not critical, normal or sheddable"));
}

#[test]
fn a_router_does_not_start_with_token_flags_it_cannot_use() {
    for (args, says) in [
        (
            vec!["--jwt-issuer", "https://idp.example"],
            "need keys: give --jwt-secret-file or --jwt-key-file",
        ),
        (
            vec!["--jwt-secret-file", "/nonexistent/fulcrum-secrets"],
            "/nonexistent/fulcrum-secrets",
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
