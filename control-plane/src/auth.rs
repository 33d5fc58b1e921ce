//! Credentials: a bearer token, or (for one-machine setups) callers on loopback.
//!
//! Two credentials, checked by two interceptors before any message of a call is read: the
//! operators' one for the admin API ([`AdminInterceptor`], [`AdminAuth`]), and the one routers
//! and nodes present on their streams, `Routing.Subscribe` and `Registration.Register`
//! ([`StreamInterceptor`], [`StreamAuth`]). They are separate so that a router's or a node's
//! credential, which sits on every router and model server, cannot drain nodes or change
//! policies. A refused call ends with UNAUTHENTICATED before its handler runs: nothing it
//! carried reaches the store.
//!
//! Either credential may be several tokens, comma-separated (`new,old`): a replica accepts any
//! of them, so a token is rotated without a moment in which routers, nodes or operators holding
//! the old one are refused (operations.md, "Rotating a token"). Clients present one token.

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::server::{AdminAuth, StreamAuth};

/// The bearer token a request presents, if any.
fn presented<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether the request comes from this machine (the loopback interface). An IPv4 client of a
/// dual-stack listener (`[::]`) shows as `::ffff:127.0.0.1`, which is loopback too.
fn from_loopback<T>(request: &Request<T>) -> bool {
    request
        .remote_addr()
        .is_some_and(|a| a.ip().to_canonical().is_loopback())
}

/// Checks every admin call against the replica's [`AdminAuth`].
#[derive(Debug, Clone)]
pub struct AdminInterceptor {
    auth: AdminAuth,
}

impl AdminInterceptor {
    /// An interceptor enforcing `auth`.
    pub fn new(auth: AdminAuth) -> Self {
        Self { auth }
    }
}

/// Compares in time independent of where the inputs differ, so the token cannot be guessed
/// byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `got` is one of the comma-separated tokens of `accepted`. Every token is compared,
/// whichever matches, so the time taken does not tell which one (or whether any) did.
fn accepts(accepted: &str, got: &str) -> bool {
    accepted
        .split(',')
        .filter(|t| !t.is_empty())
        .fold(false, |ok, t| ok | same(t.as_bytes(), got.as_bytes()))
}

impl Interceptor for AdminInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let (token, loopback_ok) = match &self.auth {
            AdminAuth::Token(t) => (Some(t.as_str()), false),
            AdminAuth::Loopback(t) => (t.as_deref(), true),
        };
        if loopback_ok && from_loopback(&request) {
            return Ok(request);
        }
        match (token, presented(&request)) {
            (Some(want), Some(got)) if accepts(want, got) => Ok(request),
            (Some(_), Some(_)) => Err(Status::unauthenticated("wrong admin credential")),
            (_, None) => Err(Status::unauthenticated(
                "admin calls need a credential: send `authorization: Bearer <token>` \
                 (fulcrum ctl --token, or FULCRUM_ADMIN_TOKEN)",
            )),
            (None, Some(_)) => Err(Status::unauthenticated(
                "this control plane accepts admin calls from loopback only",
            )),
        }
    }
}

/// Checks every call on the routers' and nodes' streams against the replica's [`StreamAuth`].
#[derive(Debug, Clone)]
pub struct StreamInterceptor {
    auth: StreamAuth,
}

impl StreamInterceptor {
    /// An interceptor enforcing `auth`.
    pub fn new(auth: StreamAuth) -> Self {
        Self { auth }
    }
}

impl Interceptor for StreamInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let (token, loopback_ok) = match &self.auth {
            StreamAuth::Token(t) => (Some(t.as_str()), false),
            StreamAuth::Loopback(t) => (t.as_deref(), true),
        };
        if loopback_ok && from_loopback(&request) {
            return Ok(request);
        }
        match (token, presented(&request)) {
            (Some(want), Some(got)) if accepts(want, got) => Ok(request),
            (Some(_), Some(_)) => Err(Status::unauthenticated(
                "wrong stream credential: routers and nodes must present the control plane's \
                 stream token (its --stream-token)",
            )),
            (Some(_), None) => Err(Status::unauthenticated(
                "routers and nodes need a credential: send `authorization: Bearer <token>` \
                 (fulcrum router --stream-token, fulcrum node-sim --stream-token, or \
                 FULCRUM_STREAM_TOKEN)",
            )),
            (None, _) => Err(Status::unauthenticated(
                "this control plane has no stream token and accepts routers and nodes from \
                 its own machine only: start it with --stream-token (or FULCRUM_STREAM_TOKEN)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens() {
        let mut i = AdminInterceptor::new(AdminAuth::Token("s3cret".into()));
        assert!(i.call(req(Some("s3cret"))).is_ok());
        let e = i.call(req(Some("nope"))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("wrong"));
        let e = i.call(req(None)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // No remote address (not loopback): a loopback-only replica refuses.
        let mut l = AdminInterceptor::new(AdminAuth::Loopback(None));
        assert!(l.call(req(None)).is_err());
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }

    #[test]
    fn during_a_rotation_either_token_is_accepted() {
        let mut admin = AdminInterceptor::new(AdminAuth::Token("n3w,0ld".into()));
        assert!(admin.call(req(Some("n3w"))).is_ok());
        assert!(admin.call(req(Some("0ld"))).is_ok());
        // The list itself, a part of a token, or an empty token is none of them.
        for wrong in ["n3w,0ld", "n3", "", "other"] {
            let e = admin.call(req(Some(wrong))).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
        let mut streams = StreamInterceptor::new(StreamAuth::Token("n3w,0ld".into()));
        assert!(streams.call(from("10.0.0.7", Some("0ld"))).is_ok());
        assert!(streams.call(from("10.0.0.7", Some("n3w"))).is_ok());
        assert!(refused(&mut streams, from("10.0.0.7", Some("x"))).contains("wrong"));
        assert!(accepts("a,,b", "b") && !accepts("a,,b", "") && !accepts("", ""));
    }

    /// A request from `ip` (as tonic's TCP server records it), presenting `token` if given.
    fn from(ip: &str, token: Option<&str>) -> Request<()> {
        let mut r = req(token);
        let addr = std::net::SocketAddr::new(ip.parse().unwrap(), 40000);
        r.extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(addr),
            });
        r
    }

    fn refused(i: &mut StreamInterceptor, r: Request<()>) -> String {
        let e = i.call(r).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        e.message().to_string()
    }

    #[test]
    fn stream_tokens_bind_everyone_including_loopback() {
        let mut i = StreamInterceptor::new(StreamAuth::Token("t0ken".into()));
        assert!(i.call(from("10.0.0.7", Some("t0ken"))).is_ok());
        assert!(i.call(from("127.0.0.1", Some("t0ken"))).is_ok());
        assert!(
            refused(&mut i, from("10.0.0.7", Some("nope"))).contains("wrong stream credential")
        );
        assert!(refused(&mut i, from("127.0.0.1", None)).contains("need a credential"));
        assert!(refused(&mut i, from("10.0.0.7", None)).contains("FULCRUM_STREAM_TOKEN"));
        // Not the admin scheme's prefix, not a token.
        let mut basic = from("10.0.0.7", None);
        basic
            .metadata_mut()
            .insert("authorization", "Basic t0ken".parse().unwrap());
        assert!(refused(&mut i, basic).contains("need a credential"));
    }

    #[test]
    fn without_a_stream_token_only_loopback_is_trusted() {
        let mut i = StreamInterceptor::new(StreamAuth::default());
        assert_eq!(StreamAuth::default(), StreamAuth::Loopback(None));
        assert!(i.call(from("127.0.0.1", None)).is_ok());
        assert!(i.call(from("127.0.0.53", None)).is_ok());
        assert!(i.call(from("::1", None)).is_ok());
        assert!(i.call(from("::ffff:127.0.0.1", None)).is_ok());
        assert!(refused(&mut i, from("::ffff:10.0.0.7", None)).contains("own machine only"));
        let m = refused(&mut i, from("10.0.0.7", None));
        assert!(
            m.contains("own machine only") && m.contains("--stream-token"),
            "{m}"
        );
        assert!(refused(&mut i, from("10.0.0.7", Some("guess"))).contains("own machine only"));
        // No address known: not loopback.
        assert!(refused(&mut i, req(None)).contains("own machine only"));
        // With a token as well, others may present it.
        let mut both = StreamInterceptor::new(StreamAuth::Loopback(Some("t0ken".into())));
        assert!(both.call(from("127.0.0.1", None)).is_ok());
        assert!(both.call(from("10.0.0.7", Some("t0ken"))).is_ok());
        assert!(refused(&mut both, from("10.0.0.7", Some("x"))).contains("wrong"));
        assert!(refused(&mut both, from("10.0.0.7", None)).contains("need a credential"));
    }
}
