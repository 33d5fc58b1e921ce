//! Caller authentication at the router: JSON Web Tokens, the seed article's scheme (a token
//! signed with the caller's secret, `iss`/`iat`/`exp` claims), checked where calls enter the
//! fleet rather than on every model server.
//!
//! A router given keys (`fulcrum router --jwt-secret-file` for HMAC secrets,
//! `--jwt-key-file` for RSA, EC or Ed25519 public keys in PEM or a JWKS) admits a call only
//! with `authorization: Bearer <token>`, the token signed by one of its keys, unexpired, and
//! (when the router names them) from an accepted issuer for an accepted audience. Else the call
//! ends UNAUTHENTICATED, saying why, before any of it is read or routed. gRPC health checks
//! need no token: load balancers and orchestrators probe without one.
//!
//! What an admitted call carries on:
//! - the caller's identity, the token's `sub` (else its `iss`), in the [`CALLER_HEADER`]
//!   request header, set by the router (a caller's own value is dropped). Policies key rate
//!   limits, cached answers and canary assignment by it (`--rate-limit-key x-fulcrum-caller`):
//!   buckets per verified caller, not per header anyone can write; nodes see it too.
//! - the highest priority the caller may ask for, the token's [`PRIORITY_CLAIM`] (`critical`,
//!   `normal` or `sheddable`; `normal` when absent). A call asking for more in its
//!   `fulcrum-priority` header is refused PERMISSION_DENIED: with tokens, priorities are
//!   credentials. A model's default priority is the operator's and applies as set.
//! - the models the caller may call, the token's [`MODELS_CLAIM`] (`["chat", "embed-*"]`: names,
//!   or prefixes ending in `*`; every model when absent). A call for another model, by any RPC
//!   that names one (inference, streams, metadata, readiness, configuration, pass-through), is
//!   refused PERMISSION_DENIED; the repository index lists only the allowed ones. A call its
//!   model's canary or fallback takes is checked against the model it asked for: where the
//!   operator sends it is not the caller's choice.
//! - the `authorization` header is not passed on to nodes (they trust the router), unless the
//!   router is told to (`--jwt-forward-token`, for nodes that check tokens themselves).
//!
//! Tokens must expire (`exp`); `nbf` is honoured; both with [`LEEWAY_SECS`] of clock skew. A
//! token naming a key id (`kid`) is checked against the keys of that id; one naming none
//! against every key for its algorithm. `alg: none` is never accepted. Verified tokens are
//! remembered (at most [`CACHE_ENTRIES`], each until it expires), so a caller's later calls
//! cost a look-up, not a signature check.
//!
//! Keys rotate without a restart: the key files are read again every [`RELOAD_INTERVAL`] and,
//! when their contents changed and parse, replace the keys (and forget remembered tokens, so a
//! removed key's tokens stop working at once). A file that no longer parses leaves the keys as
//! they were, with an error in the log and in `fulcrum_router_auth_key_reloads_total`.
//!
//! Written here rather than as a tower layer: the router's own HTTP/2 server runs `ModelInfer`
//! without tower ([`crate::ingress`]), and one check at the connection covers every call.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::error::{AuthError, AuthSetupError};
use crate::priority::Priority;

/// The request header carrying the verified caller's identity.
pub const CALLER_HEADER: HeaderName = HeaderName::from_static("x-fulcrum-caller");

/// The claim naming the highest priority a caller may ask for.
pub const PRIORITY_CLAIM: &str = "fulcrum_priority";

/// The claim listing the models a caller may call (names, or prefixes ending in `*`).
pub const MODELS_CLAIM: &str = "fulcrum_models";

/// The most entries a token's [`MODELS_CLAIM`] may list: each call looks through them, and a
/// caller needing more is better served by a naming scheme its prefixes can cover.
const MAX_MODEL_PATTERNS: usize = 64;

/// Clock skew tolerated on `exp` and `nbf`, in seconds. Hosts kept by NTP agree within
/// milliseconds; half a minute covers a badly synced issuer or router, yet a leaked token is
/// dead half a minute after it expires (jsonwebtoken's default is a minute).
pub const LEEWAY_SECS: u64 = 30;

/// How often the key files are read again. Seconds are what a rotation needs (the new key
/// is added everywhere before any token is signed with it); the read is a few small files.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Verified tokens remembered. A token is some hundreds of bytes, so 10,000 are a few MiB:
/// enough for every caller of a busy router to hold a token at once; beyond it the least
/// used are forgotten and cost a signature check on their next call.
pub const CACHE_ENTRIES: u64 = 10_000;

/// The longest identity a token may give: it becomes a header on every call and a rate-limit
/// bucket key, so an unbounded one would let a token bloat both.
const MAX_IDENTITY: usize = 256;

/// Where a router's token checks come from.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Files of HMAC secrets (HS256, HS384, HS512), one per line (blank lines and lines
    /// starting with `#` skipped): several lines while a secret is rotated.
    pub secret_files: Vec<PathBuf>,
    /// Files of public keys: one PEM key (RSA, EC or Ed25519) or a JWKS (`{"keys": [...]}`).
    pub key_files: Vec<PathBuf>,
    /// Accepted issuers (`iss`); empty: any.
    pub issuers: Vec<String>,
    /// Accepted audiences (`aud`: one of them must be in the token); empty: `aud` not checked.
    pub audiences: Vec<String>,
    /// Pass the caller's `authorization` header on to nodes.
    pub forward_token: bool,
}

impl AuthConfig {
    /// Whether any key is configured (else the router admits every call).
    pub fn is_enabled(&self) -> bool {
        !self.secret_files.is_empty() || !self.key_files.is_empty()
    }
}

/// One verifying key.
struct Key {
    /// Its key id, for tokens that name one (JWKS keys may have one).
    kid: Option<String>,
    key: DecodingKey,
    /// The algorithms it verifies.
    algorithms: Vec<Algorithm>,
}

/// The keys of one read of the key files.
struct KeySet {
    keys: Vec<Key>,
    /// The files' contents, to tell whether a later read changed anything.
    contents: Vec<Vec<u8>>,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub`, else its `iss`.
    pub id: HeaderValue,
    /// The highest priority the caller may ask for.
    pub max_priority: Priority,
    /// When the token expires (seconds since the Unix epoch).
    pub expires_at: u64,
    /// The models it may call (names, or prefixes ending in `*`); `None`: every model.
    pub models: Option<Vec<String>>,
    /// Its `authorization` header (`Bearer <token>`), for the calls the router makes on its
    /// behalf to another router (a background call that router holds). Kept with the verified
    /// caller, so it costs nothing per call.
    pub bearer: HeaderValue,
}

impl Caller {
    /// Whether the caller may call `model`.
    pub fn may_call(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|patterns| {
            patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => model.starts_with(prefix),
                None => p == model,
            })
        })
    }

    /// [`Caller::may_call`], as the error a refused call gets.
    pub fn check_model(&self, model: &str) -> Result<(), AuthError> {
        if self.may_call(model) {
            return Ok(());
        }
        Err(AuthError::ModelNotAllowed {
            caller: self.id.to_str().unwrap_or_default().to_owned(),
            model: model.to_owned(),
            allowed: self.models.as_deref().unwrap_or_default().join(", "),
        })
    }
}

/// The claims Fulcrum reads. `iss` and `aud` are checked by jsonwebtoken's validation, the
/// times here (against a clock the tests can set).
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    iss: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    #[serde(rename = "fulcrum_priority")]
    priority: Option<String>,
    #[serde(rename = "fulcrum_models")]
    models: Option<Vec<String>>,
}

/// Why calls were refused, for the metrics: one counter per [`AuthError::reason`].
#[derive(Debug, Default)]
pub struct AuthStats {
    refused: [AtomicU64; AuthError::REASONS.len()],
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl AuthStats {
    /// Calls refused for each reason, in [`AuthError::REASONS`] order.
    pub fn refused(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        AuthError::REASONS
            .iter()
            .zip(&self.refused)
            .map(|(r, c)| (*r, c.load(Ordering::Relaxed)))
    }

    fn count(&self, refused: &AuthError) {
        self.refused[refused.reason_index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Key reloads that changed the keys, and reads that failed.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }
}

/// A router's token checks: its keys, the validation rules, and the tokens it verified.
pub struct CallerAuth {
    config: AuthConfig,
    keys: ArcSwap<KeySet>,
    verified: moka::sync::Cache<Box<[u8]>, Arc<Caller>>,
    /// Refusals and reloads.
    pub stats: AuthStats,
}

impl std::fmt::Debug for CallerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerAuth")
            .field("config", &self.config)
            .field("keys", &self.keys.load().keys.len())
            .finish_non_exhaustive()
    }
}

impl CallerAuth {
    /// Reads the key files of `config`; fails when one cannot be read or holds no usable key.
    pub fn load(config: AuthConfig) -> Result<Self, AuthSetupError> {
        let keys = read_keys(&config)?;
        Ok(Self {
            config,
            keys: ArcSwap::from_pointee(keys),
            verified: moka::sync::Cache::builder()
                .max_capacity(CACHE_ENTRIES)
                .build(),
            stats: AuthStats::default(),
        })
    }

    /// How many keys it holds.
    pub fn key_count(&self) -> usize {
        self.keys.load().keys.len()
    }

    /// Reads the key files again; when they changed and parse, their keys replace the old
    /// ones and remembered tokens are forgotten. Returns whether the keys changed.
    pub fn reload(&self) -> Result<bool, AuthSetupError> {
        let result = self.try_reload();
        match &result {
            Ok(true) => self.stats.reloads_ok.fetch_add(1, Ordering::Relaxed),
            Ok(false) => 0,
            Err(_) => self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    fn try_reload(&self) -> Result<bool, AuthSetupError> {
        let contents = read_files(&self.config)?;
        if contents == self.keys.load().contents {
            return Ok(false);
        }
        let keys = parse_keys(&self.config, contents)?;
        self.keys.store(Arc::new(keys));
        self.verified.invalidate_all();
        Ok(true)
    }

    /// Checks that the caller of a request with `extensions` (the [`Caller`] [`authenticate`]
    /// admitted, which the router's server puts there) may call `model`.
    ///
    /// [`authenticate`]: CallerAuth::authenticate
    pub fn check_model(&self, extensions: &http::Extensions, model: &str) -> Result<(), AuthError> {
        let Some(caller) = extensions.get::<Arc<Caller>>() else {
            return Ok(());
        };
        caller
            .check_model(model)
            .inspect_err(|e| self.stats.count(e))
    }

    /// Checks the call whose request headers are `headers`: its bearer token, and the priority
    /// it asks for against the token's. On success the headers carry the caller's identity
    /// ([`CALLER_HEADER`]) and, unless forwarding is configured, no longer the token.
    pub fn authenticate(&self, headers: &mut HeaderMap) -> Result<Arc<Caller>, AuthError> {
        self.check(headers, jsonwebtoken::get_current_timestamp())
            .inspect_err(|e| self.stats.count(e))
    }

    fn check(&self, headers: &mut HeaderMap, now: u64) -> Result<Arc<Caller>, AuthError> {
        let token = bearer(headers)?;
        let caller = match self.verified.get(token.as_bytes()) {
            Some(c) if now <= c.expires_at.saturating_add(LEEWAY_SECS) => c,
            _ => {
                let caller = Arc::new(self.verify(token, now)?);
                self.verified
                    .insert(token.as_bytes().into(), caller.clone());
                caller
            }
        };
        // A priority that is none is refused later, as without tokens; none named asks for
        // nothing (the lowest passes every token).
        if let Ok(asked) = Priority::of(headers, Priority::Sheddable)
            && asked > caller.max_priority
        {
            return Err(AuthError::PriorityNotAllowed {
                caller: caller.id.to_str().unwrap_or_default().to_owned(),
                asked,
                allowed: caller.max_priority,
            });
        }
        // Replaces every value the caller sent.
        headers.insert(CALLER_HEADER, caller.id.clone());
        if !self.config.forward_token {
            headers.remove(AUTHORIZATION);
        }
        Ok(caller)
    }

    /// Verifies `token` against the keys that could have signed it.
    fn verify(&self, token: &str, now: u64) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Malformed(format!("its header does not decode: {e}")))?;
        let keys = self.keys.load();
        let by_alg = || {
            keys.keys
                .iter()
                .filter(|k| k.algorithms.contains(&header.alg))
        };
        let named: Vec<&Key> = match &header.kid {
            Some(kid) => by_alg()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect(),
            None => Vec::new(),
        };
        let candidates: Vec<&Key> = if named.is_empty() {
            by_alg().collect()
        } else {
            named
        };
        if candidates.is_empty() {
            return Err(AuthError::UnknownKey(match &header.kid {
                Some(kid) => format!(
                    "no key of this router verifies {:?} tokens (kid {kid:?})",
                    header.alg
                ),
                None => format!("no key of this router verifies {:?} tokens", header.alg),
            }));
        }
        let validation = self.validation(header.alg);
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return caller_of(data.claims, now, token),
                // Another key may have signed it.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidSignature
                            | ErrorKind::InvalidEcdsaKey
                            | ErrorKind::InvalidRsaKey(_)
                            | ErrorKind::InvalidEddsaKey
                            | ErrorKind::InvalidKeyFormat
                            | ErrorKind::InvalidAlgorithm
                    ) => {}
                Err(e) => return Err(claims_error(e)),
            }
        }
        Err(AuthError::BadSignature(format!(
            "its {:?} signature does not verify with any key of this router",
            header.alg
        )))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        // Times are checked by `caller_of`.
        v.required_spec_claims.clear();
        v.validate_exp = false;
        v.validate_nbf = false;
        if !self.config.issuers.is_empty() {
            v.set_issuer(&self.config.issuers);
        }
        if self.config.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.config.audiences);
        }
        v
    }
}

/// The token of the request's `authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AuthError::Missing);
    };
    if values.next().is_some() {
        return Err(AuthError::Malformed(
            "the authorization header is given more than once".into(),
        ));
    }
    let text = value
        .to_str()
        .map_err(|_| AuthError::Malformed("the authorization header is not ASCII".into()))?;
    // The scheme is case-insensitive (RFC 7235, section 2.1).
    let token = match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => {
            return Err(AuthError::Malformed(
                "the authorization header is not `Bearer <token>`".into(),
            ));
        }
    };
    if token.is_empty() {
        return Err(AuthError::Malformed("the bearer token is empty".into()));
    }
    Ok(token)
}

/// The caller a verified token's claims name.
fn caller_of(claims: Claims, now: u64, token: &str) -> Result<Caller, AuthError> {
    let expires_at = claims.exp.ok_or_else(|| {
        AuthError::BadClaim("the token has no exp claim; tokens must expire".into())
    })?;
    if now > expires_at.saturating_add(LEEWAY_SECS) {
        return Err(AuthError::Expired);
    }
    if claims
        .nbf
        .is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECS))
    {
        return Err(AuthError::NotYetValid);
    }
    let id = claims
        .sub
        .filter(|s| !s.is_empty())
        .or(claims.iss.filter(|s| !s.is_empty()))
        .ok_or_else(|| {
            AuthError::BadClaim("the token names no caller: no sub or iss claim".into())
        })?;
    if id.len() > MAX_IDENTITY {
        return Err(AuthError::BadClaim(format!(
            "the caller's name is {} bytes long, over {MAX_IDENTITY}",
            id.len()
        )));
    }
    // Visible ASCII only: it is a header value on every call and a label in logs.
    let id = id
        .bytes()
        .all(|b| b.is_ascii_graphic())
        .then(|| HeaderValue::from_str(&id).ok())
        .flatten()
        .ok_or_else(|| {
            AuthError::BadClaim(format!("the caller's name {id:?} is not visible ASCII"))
        })?;
    let max_priority = match claims.priority.as_deref() {
        None => Priority::Normal,
        Some(p) => Priority::from_name(p).ok_or_else(|| {
            AuthError::BadClaim(format!(
                "claim {PRIORITY_CLAIM} is {p:?}, not critical, normal or sheddable"
            ))
        })?,
    };
    if let Some(models) = &claims.models {
        if models.len() > MAX_MODEL_PATTERNS {
            return Err(AuthError::BadClaim(format!(
                "claim {MODELS_CLAIM} lists {} models, over {MAX_MODEL_PATTERNS}",
                models.len()
            )));
        }
        if let Some(bad) = models
            .iter()
            .find(|m| m.is_empty() || m.strip_suffix('*').unwrap_or(m).contains('*'))
        {
            return Err(AuthError::BadClaim(format!(
                "claim {MODELS_CLAIM} lists {bad:?}: give model names, or prefixes ending in *"
            )));
        }
    }
    let mut bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| AuthError::Malformed("the token is not a header value".into()))?;
    bearer.set_sensitive(true);
    Ok(Caller {
        id,
        max_priority,
        expires_at,
        models: claims.models,
        bearer,
    })
}

/// A token whose signature verified but whose claims do not pass.
fn claims_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidIssuer => {
            AuthError::WrongIssuer("its issuer (iss) is not one this router accepts".into())
        }
        ErrorKind::InvalidAudience => {
            AuthError::WrongAudience("its audience (aud) is not one this router accepts".into())
        }
        ErrorKind::InvalidClaimFormat(c) => {
            AuthError::BadClaim(format!("claim {c} is not of its registered type"))
        }
        ErrorKind::Json(e) => AuthError::BadClaim(format!("the claims do not decode: {e}")),
        _ => AuthError::Malformed(format!("{e}")),
    }
}

/// The key files' contents, in configuration order (secrets first).
fn read_files(config: &AuthConfig) -> Result<Vec<Vec<u8>>, AuthSetupError> {
    config
        .secret_files
        .iter()
        .chain(&config.key_files)
        .map(|p| {
            std::fs::read(p).map_err(|e| AuthSetupError::Read {
                path: p.clone(),
                error: e,
            })
        })
        .collect()
}

fn read_keys(config: &AuthConfig) -> Result<KeySet, AuthSetupError> {
    parse_keys(config, read_files(config)?)
}

/// The keys in `contents` (as [`read_files`] reads them).
fn parse_keys(config: &AuthConfig, contents: Vec<Vec<u8>>) -> Result<KeySet, AuthSetupError> {
    let mut keys = Vec::new();
    let paths = config.secret_files.iter().chain(&config.key_files);
    for (i, (path, bytes)) in paths.zip(&contents).enumerate() {
        let bad = |why: String| AuthSetupError::BadKey {
            path: path.clone(),
            why,
        };
        let before = keys.len();
        if i < config.secret_files.len() {
            let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let key = DecodingKey::from_secret(line.as_bytes())
                    .map_err(|e| bad(format!("a secret: {e}")))?;
                keys.push(Key {
                    kid: None,
                    key,
                    algorithms: vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
                });
            }
        } else {
            public_keys(bytes, &mut keys).map_err(bad)?;
        }
        if keys.len() == before {
            return Err(bad("it holds no key".into()));
        }
    }
    Ok(KeySet { keys, contents })
}

/// The public keys of one key file: a JWKS, else one PEM key.
fn public_keys(bytes: &[u8], keys: &mut Vec<Key>) -> Result<(), String> {
    if bytes.trim_ascii_start().starts_with(b"{") {
        let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
        for jwk in &set.keys {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                format!(
                    "key {:?} of the JWKS: {e}",
                    jwk.common.key_id.as_deref().unwrap_or("")
                )
            })?;
            let algorithms = match jwk.common.key_algorithm {
                Some(a) => vec![Algorithm::try_from(a).map_err(|e| {
                    format!(
                        "key {:?} of the JWKS: {e}",
                        jwk.common.key_id.as_deref().unwrap_or("")
                    )
                })?],
                None => key.family().algorithms().to_vec(),
            };
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                key,
                algorithms,
            });
        }
        return Ok(());
    }
    let key = DecodingKey::from_rsa_pem(bytes)
        .or_else(|_| DecodingKey::from_ec_pem(bytes))
        .or_else(|_| DecodingKey::from_ed_pem(bytes))
        .map_err(|_| "neither a JWKS nor an RSA, EC or Ed25519 public key in PEM".to_owned())?;
    let algorithms = key.family().algorithms().to_vec();
    keys.push(Key {
        kid: None,
        key,
        algorithms,
    });
    Ok(())
}

/// A token to sign with an HMAC secret: what `fulcrum token` makes (the seed article's
/// `generate_token`, for scripts, tests and small deployments without an identity provider).
#[derive(Debug, Clone, Default)]
pub struct NewToken {
    /// The caller (`sub`).
    pub subject: String,
    /// The issuer (`iss`), if any.
    pub issuer: Option<String>,
    /// The audience (`aud`), if any.
    pub audience: Option<String>,
    /// How long it is valid from now.
    pub valid_for: Duration,
    /// The highest priority the caller may ask for ([`PRIORITY_CLAIM`]), if not normal.
    pub max_priority: Option<Priority>,
    /// When it is issued (`iat`, seconds since the Unix epoch); `None`: now. Its expiry is this
    /// plus `valid_for`.
    pub issued_at: Option<u64>,
    /// The models the caller may call ([`MODELS_CLAIM`]); `None`: every model.
    pub models: Option<Vec<String>>,
}

impl NewToken {
    /// The token signed with `secret` by HS256.
    pub fn sign_hs256(&self, secret: &[u8]) -> Result<String, AuthSetupError> {
        let iat = self
            .issued_at
            .unwrap_or_else(jsonwebtoken::get_current_timestamp);
        let mut claims = serde_json::json!({
            "sub": self.subject,
            "iat": iat,
            "exp": iat.saturating_add(self.valid_for.as_secs()),
        });
        if let Some(iss) = &self.issuer {
            claims["iss"] = iss.as_str().into();
        }
        if let Some(aud) = &self.audience {
            claims["aud"] = aud.as_str().into();
        }
        if let Some(p) = self.max_priority {
            claims[PRIORITY_CLAIM] = p.name().into();
        }
        if let Some(models) = &self.models {
            claims[MODELS_CLAIM] = models.clone().into();
        }
        let bad = |e: jsonwebtoken::errors::Error| AuthSetupError::Sign(e.to_string());
        let key = jsonwebtoken::EncodingKey::from_secret(secret).map_err(bad)?;
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).map_err(bad)
    }
}

/// Reads `auth`'s key files again every [`RELOAD_INTERVAL`], for ever (the router aborts it).
pub async fn reload_keys(auth: Arc<CallerAuth>) {
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match auth.reload() {
            Ok(true) => tracing::info!(keys = auth.key_count(), "token keys reloaded"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "token keys not reloaded; keeping the old ones"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::priority::PRIORITY_HEADER;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "a secret of the right length, 32b";

    fn secret_file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn auth(dir: &tempfile::TempDir, config: AuthConfig) -> CallerAuth {
        let config = AuthConfig {
            secret_files: vec![secret_file(dir, "secrets", &format!("# keys\n{SECRET}\n"))],
            ..config
        };
        CallerAuth::load(config).unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn token(secret: &str, claims: &serde_json::Value) -> String {
        encode(
            &Header::default(),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        h
    }

    #[test]
    fn a_valid_token_names_its_caller_and_is_not_passed_on() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(&dir, AuthConfig::default());
        let t = token(SECRET, &json!({"sub": "alice", "exp": now() + 600}));
        let mut h = headers(&t);
        h.insert(CALLER_HEADER, "mallory".parse().unwrap());
        let caller = a.authenticate(&mut h).unwrap();
        assert_eq!(caller.id, "alice");
        assert_eq!(caller.max_priority, Priority::Normal);
        assert_eq!(h.get_all(CALLER_HEADER).iter().count(), 1);
        assert_eq!(h[CALLER_HEADER], "alice");
        assert!(h.get(AUTHORIZATION).is_none());
        // The seed article's token: the caller is its iss.
        let t = token(
            SECRET,
            &json!({"iss": "key-7", "iat": now(), "exp": now() + 3600}),
        );
        assert_eq!(a.authenticate(&mut headers(&t)).unwrap().id, "key-7");
    }

    #[test]
    fn the_token_is_passed_on_when_told_to() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(
            &dir,
            AuthConfig {
                forward_token: true,
                ..Default::default()
            },
        );
        let t = token(SECRET, &json!({"sub": "alice", "exp": now() + 600}));
        let mut h = headers(&t);
        a.authenticate(&mut h).unwrap();
        assert_eq!(h[AUTHORIZATION], format!("Bearer {t}"));
        assert_eq!(h[CALLER_HEADER], "alice");
    }

    #[test]
    fn bad_tokens_are_refused_saying_why() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(&dir, AuthConfig::default());
        let exp = now() + 600;
        let cases: Vec<(HeaderMap, &str, &str)> = vec![
            (HeaderMap::new(), "missing", "no bearer token"),
            (
                {
                    let mut h = HeaderMap::new();
                    h.insert(AUTHORIZATION, "Basic YWxpY2U6cHc=".parse().unwrap());
                    h
                },
                "malformed",
                "Bearer <token>",
            ),
            (
                headers("not.a.token"),
                "malformed",
                "header does not decode",
            ),
            (
                headers(&token("another secret", &json!({"sub": "a", "exp": exp}))),
                "bad_signature",
                "does not verify",
            ),
            (
                headers(&token(SECRET, &json!({"sub": "a", "exp": now() - 120}))),
                "expired",
                "expired",
            ),
            (
                headers(&token(
                    SECRET,
                    &json!({"sub": "a", "exp": exp, "nbf": now() + 300}),
                )),
                "not_yet_valid",
                "not valid yet",
            ),
            (
                headers(&token(SECRET, &json!({"sub": "a"}))),
                "bad_claim",
                "no exp claim",
            ),
            (
                headers(&token(SECRET, &json!({"exp": exp}))),
                "bad_claim",
                "names no caller",
            ),
            (
                headers(&token(SECRET, &json!({"sub": "ü", "exp": exp}))),
                "bad_claim",
                "not visible ASCII",
            ),
            (
                headers(&token(
                    SECRET,
                    &json!({"sub": "a", "exp": exp, "fulcrum_priority": "urgent"}),
                )),
                "bad_claim",
                "\"urgent\"",
            ),
            (
                headers(
                    &encode(
                        &Header::new(Algorithm::HS384),
                        &json!({"sub": "a", "exp": exp}),
                        &EncodingKey::from_secret(b"other").unwrap(),
                    )
                    .unwrap(),
                ),
                "bad_signature",
                "HS384",
            ),
        ];
        for (mut h, reason, says) in cases {
            let before = h.clone();
            let e = a.authenticate(&mut h).unwrap_err();
            assert_eq!(e.reason(), reason, "{e}");
            assert!(e.to_string().contains(says), "{e}");
            assert_eq!(h, before, "a refused call's headers are left alone");
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        let refused: u64 = a.stats.refused().map(|(_, n)| n).sum();
        assert_eq!(refused, 11);
    }

    #[test]
    fn a_token_for_an_algorithm_without_a_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(&dir, AuthConfig::default());
        // An RS256 header with an HMAC body: no RSA key here.
        let t = token(SECRET, &json!({"sub": "a", "exp": now() + 60}));
        let rest = t.split_once('.').unwrap().1.to_owned();
        let t = format!("{}.{rest}", base64_url(br#"{"alg":"RS256","typ":"JWT"}"#));
        let e = a.authenticate(&mut headers(&t)).unwrap_err();
        assert_eq!(e.reason(), "unknown_key", "{e}");
        assert!(e.to_string().contains("RS256"), "{e}");
        // alg none is not even an algorithm to jsonwebtoken.
        let none = format!("{}.{rest}", base64_url(br#"{"alg":"none"}"#));
        let e = a.authenticate(&mut headers(&none)).unwrap_err();
        assert_eq!(e.reason(), "malformed", "{e}");
    }

    fn base64_url(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn issuer_and_audience_are_checked_when_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(
            &dir,
            AuthConfig {
                issuers: vec!["https://idp.example".into()],
                audiences: vec!["fulcrum".into()],
                ..Default::default()
            },
        );
        let exp = now() + 600;
        let good =
            json!({"sub": "a", "iss": "https://idp.example", "aud": ["x", "fulcrum"], "exp": exp});
        assert!(a.authenticate(&mut headers(&token(SECRET, &good))).is_ok());
        let wrong_iss =
            json!({"sub": "a", "iss": "https://evil.example", "aud": "fulcrum", "exp": exp});
        let e = a
            .authenticate(&mut headers(&token(SECRET, &wrong_iss)))
            .unwrap_err();
        assert_eq!(e.reason(), "wrong_issuer");
        let wrong_aud =
            json!({"sub": "a", "iss": "https://idp.example", "aud": "other", "exp": exp});
        let e = a
            .authenticate(&mut headers(&token(SECRET, &wrong_aud)))
            .unwrap_err();
        assert_eq!(e.reason(), "wrong_audience");
        // Without an audience configured, a token's aud is not checked.
        let plain = auth(&tempfile::tempdir().unwrap(), AuthConfig::default());
        assert!(
            plain
                .authenticate(&mut headers(&token(SECRET, &wrong_aud)))
                .is_ok()
        );
    }

    #[test]
    fn priorities_above_the_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(&dir, AuthConfig::default());
        let exp = now() + 600;
        let normal = token(SECRET, &json!({"sub": "bob", "exp": exp}));
        let critical = token(
            SECRET,
            &json!({"sub": "ops", "exp": exp, "fulcrum_priority": "critical"}),
        );
        let shed = token(
            SECRET,
            &json!({"sub": "batch", "exp": exp, "fulcrum_priority": "sheddable"}),
        );
        let ask = |t: &str, p: &'static str| {
            let mut h = headers(t);
            h.insert(PRIORITY_HEADER, p.parse().unwrap());
            a.authenticate(&mut h)
        };
        assert!(ask(&normal, "normal").is_ok());
        assert!(ask(&normal, "sheddable").is_ok());
        let e = ask(&normal, "critical").unwrap_err();
        assert_eq!(e.reason(), "priority_not_allowed");
        assert!(
            e.to_string()
                .contains("caller \"bob\" may ask for priority normal at most"),
            "{e}"
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::PermissionDenied);
        assert!(ask(&critical, "CRITICAL").is_ok());
        assert!(ask(&shed, "normal").is_err());
        // A value that is no priority is for the router to refuse later, as without tokens.
        assert!(ask(&normal, "urgent").is_ok());
    }

    #[test]
    fn a_models_claim_limits_the_models_a_caller_may_call() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(&dir, AuthConfig::default());
        let exp = now() + 600;
        let caller =
            |claims: serde_json::Value| a.authenticate(&mut headers(&token(SECRET, &claims)));
        let any = caller(json!({"sub": "a", "exp": exp})).unwrap();
        assert!(any.may_call("anything"));
        let some =
            caller(json!({"sub": "a", "exp": exp, "fulcrum_models": ["chat", "embed-*"]})).unwrap();
        for (model, allowed) in [
            ("chat", true),
            ("chat-2", false),
            ("embed-", true),
            ("embed-small", true),
            ("embed", false),
            ("", false),
        ] {
            assert_eq!(some.may_call(model), allowed, "{model:?}");
        }
        let e = some.check_model("chat-2").unwrap_err();
        assert_eq!(e.reason(), "model_not_allowed");
        assert!(
            e.to_string()
                .contains("caller \"a\" may not call model \"chat-2\" (its token's fulcrum_models claim allows: chat, embed-*)"),
            "{e}"
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::PermissionDenied);
        let none = caller(json!({"sub": "a", "exp": exp, "fulcrum_models": []})).unwrap();
        assert!(!none.may_call("chat"));
        // Every model a wildcard.
        let all = caller(json!({"sub": "a", "exp": exp, "fulcrum_models": ["*"]})).unwrap();
        assert!(all.may_call("chat"));
        for bad in [json!(["a*b"]), json!([""]), json!("chat"), json!(["ü*x*"])] {
            let e = caller(json!({"sub": "a", "exp": exp, "fulcrum_models": bad})).unwrap_err();
            assert_eq!(e.reason(), "bad_claim", "{bad}: {e}");
        }
        let many: Vec<String> = (0..65).map(|i| format!("m{i}")).collect();
        let e = caller(json!({"sub": "a", "exp": exp, "fulcrum_models": many})).unwrap_err();
        assert!(e.to_string().contains("over 64"), "{e}");
        // Counted where the model is checked.
        let mut extensions = http::Extensions::new();
        extensions.insert(some);
        assert!(a.check_model(&extensions, "chat").is_ok());
        assert!(a.check_model(&extensions, "chat-2").is_err());
        assert!(a.check_model(&http::Extensions::new(), "chat-2").is_ok());
        let refused: std::collections::HashMap<_, _> = a.stats.refused().collect();
        assert_eq!(refused["model_not_allowed"], 1);
    }

    #[test]
    fn verified_tokens_are_remembered_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(&dir, AuthConfig::default());
        let t = token(SECRET, &json!({"sub": "a", "exp": now() + 60}));
        let mut h = headers(&t);
        let first = a.check(&mut h, now()).unwrap();
        let mut h = headers(&t);
        let again = a.check(&mut h, now()).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the second call is a look-up");
        // Past its expiry (and the leeway) the remembered token is checked again, and refused.
        let later = now() + 60 + LEEWAY_SECS + 1;
        let e = a.check(&mut headers(&t), later);
        assert!(e.is_err());
    }

    #[test]
    fn rotated_keys_take_effect_and_bad_files_keep_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(&dir, AuthConfig::default());
        let old = token(SECRET, &json!({"sub": "a", "exp": now() + 600}));
        let new = token("the next secret", &json!({"sub": "a", "exp": now() + 600}));
        assert!(a.authenticate(&mut headers(&old)).is_ok());
        assert!(!a.reload().unwrap(), "nothing changed");
        // Both during the rotation.
        secret_file(&dir, "secrets", &format!("the next secret\n{SECRET}\n"));
        assert!(a.reload().unwrap());
        assert_eq!(a.key_count(), 2);
        assert!(a.authenticate(&mut headers(&old)).is_ok());
        assert!(a.authenticate(&mut headers(&new)).is_ok());
        // The old one removed: its tokens stop at once, remembered or not.
        secret_file(&dir, "secrets", "the next secret\n");
        assert!(a.reload().unwrap());
        assert_eq!(
            a.authenticate(&mut headers(&old)).unwrap_err().reason(),
            "bad_signature"
        );
        // An empty file is refused and changes nothing.
        secret_file(&dir, "secrets", "# nothing\n");
        let e = a.reload().unwrap_err();
        assert!(e.to_string().contains("holds no key"), "{e}");
        assert!(a.authenticate(&mut headers(&new)).is_ok());
        assert_eq!(a.stats.reloads(), (2, 1));
    }

    #[test]
    fn public_keys_from_pem_and_jwks() {
        let dir = tempfile::tempdir().unwrap();
        // An Ed25519 key pair (RFC 8032's test vector 1), PEM and JWK.
        let private = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n-----END PRIVATE KEY-----\n";
        let public = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n-----END PUBLIC KEY-----\n";
        let pem = secret_file(&dir, "ed.pem", public);
        let jwks = secret_file(
            &dir,
            "jwks.json",
            r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1", "alg": "EdDSA", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#,
        );
        let signer = EncodingKey::from_ed_pem(private.as_bytes()).unwrap();
        let claims = json!({"sub": "svc", "exp": now() + 600});
        for (file, kid) in [(pem, None), (jwks, Some("k1"))] {
            let a = CallerAuth::load(AuthConfig {
                key_files: vec![file],
                ..Default::default()
            })
            .unwrap();
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = kid.map(str::to_owned);
            let t = encode(&header, &claims, &signer).unwrap();
            assert_eq!(a.authenticate(&mut headers(&t)).unwrap().id, "svc");
        }
        let junk = secret_file(
            &dir,
            "junk.pem",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        );
        let e = CallerAuth::load(AuthConfig {
            key_files: vec![junk],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("neither a JWKS nor"), "{e}");
        let e = CallerAuth::load(AuthConfig {
            key_files: vec![dir.path().join("absent")],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
    }
}
