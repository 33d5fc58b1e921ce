//! Admin API credentials: a bearer token, or (for one-machine setups) callers on loopback.

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::server::AdminAuth;

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

impl Interceptor for AdminInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let (token, loopback_ok) = match &self.auth {
            AdminAuth::Token(t) => (Some(t.as_str()), false),
            AdminAuth::Loopback(t) => (t.as_deref(), true),
        };
        if loopback_ok && request.remote_addr().is_some_and(|a| a.ip().is_loopback()) {
            return Ok(request);
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match (token, presented) {
            (Some(want), Some(got)) if same(want.as_bytes(), got.as_bytes()) => Ok(request),
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
}
