//! `fulcrum token`: sign a caller token (JWT, HS256) with one of a router's secrets.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fulcrum_data_plane::auth::NewToken;
use fulcrum_data_plane::priority::Priority;

/// Flags of `fulcrum token`.
#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    /// The file of HMAC secrets the routers read (`fulcrum router --jwt-secret-file`); the
    /// first secret in it signs.
    #[arg(long, value_name = "FILE")]
    secret_file: PathBuf,
    /// The caller the token names (`sub`): what rate limits, cached answers and canaries key on
    /// (`x-fulcrum-caller`).
    #[arg(long)]
    sub: String,
    /// How long the token is valid (e.g. `1h`, `30d`).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
    /// The highest priority the caller may ask for (`critical`, `normal`, `sheddable`).
    #[arg(long, value_parser = parse_priority)]
    max_priority: Option<Priority>,
    /// The issuer (`iss`), for routers that accept only some (`--jwt-issuer`).
    #[arg(long)]
    iss: Option<String>,
    /// The audience (`aud`), for routers that check it (`--jwt-audience`).
    #[arg(long)]
    aud: Option<String>,
    /// The models the caller may call, comma-separated: names, or prefixes ending in `*`
    /// (`chat,embed-*`). Default: every model.
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
}

fn parse_priority(s: &str) -> Result<Priority, String> {
    Priority::from_name(s).ok_or_else(|| format!("{s:?} is not critical, normal or sheddable"))
}

/// `token` signed with the first secret of `secret_file` (a routers' `--jwt-secret-file`).
pub(crate) fn sign(secret_file: &std::path::Path, token: &NewToken) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(secret_file)
        .with_context(|| format!("reading {}", secret_file.display()))?;
    let secret = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .with_context(|| format!("{} holds no secret", secret_file.display()))?;
    Ok(token.sign_hs256(secret.as_bytes())?)
}

pub(crate) fn run(args: TokenArgs) -> anyhow::Result<()> {
    let token = NewToken {
        subject: args.sub,
        issuer: args.iss,
        audience: args.aud,
        valid_for: args.ttl,
        max_priority: args.max_priority,
        issued_at: None,
        models: args.models,
    };
    let token = sign(&args.secret_file, &token)?;
    outln!("{token}");
    Ok(())
}
