//! Fallback models: a `ModelInfer` call its model cannot serve goes, once, to the model its
//! policy names (`ModelPolicy.fallback_model`). The seed article's last line of defence — when
//! the big model's API is down, answer from a lighter one rather than not at all — done so that
//! the caller can tell: the answer names the fallback (the response's `model_name`, and the
//! [`FALLBACK_HEADER`] and [`FALLBACK_REASON_HEADER`] response headers).
//!
//! When a call falls back ([`Failed::fallback`]):
//! - the model could not serve it ([`Reason`]): no node routable (or none declared), the call
//!   shed because every node was full, or its attempts failed as a node's fault (unavailable,
//!   overloaded, timed out) with no retry left;
//! - the call is not a request of a sequence (its state lives on the primary's node);
//! - the model is idempotent, or no attempt reached a node (a model with side effects never
//!   runs one call twice);
//! - some of the call's deadline is left: the fallback gets what remains of it.
//!
//! Never for what the call is (bad input, an unknown model, a priority that is not one), its
//! caller's quota (the rate limit: falling back would lift it), a spent deadline, or an answer a
//! node gave about the request (NOT_FOUND, INVALID_ARGUMENT, …). One hop: the fallback's own
//! fallback is not followed, so a cycle of policies cannot loop. The fallback model is routed
//! by its own policy (its rate limit, priorities, retries); its answers and errors count under
//! it in the metrics, and `fulcrum_router_fallbacks_total` counts the hops.
//!
//! A fallback that fails too answers with the primary model's status code (the caller asked
//! for that model, and its retry logic keys on it), its message naming both failures.

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use tonic::metadata::MetadataMap;
use tonic::{Code, Response, Status};

use super::deadline;
use super::forward::{self, Sequence};
use crate::router::RouterState;

/// Response header naming the fallback model that answered (or was tried, when it failed too).
pub const FALLBACK_HEADER: &str = "x-fulcrum-fallback";

/// Response header saying why the call fell back ([`Reason::name`]).
pub const FALLBACK_REASON_HEADER: &str = "x-fulcrum-fallback-reason";

/// Why a model could not serve a call, when that is a reason to try its fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No node could take the call: none routable or declared, or every attempt failed as a
    /// node's fault (unavailable, unreachable, timed out).
    Unavailable,
    /// Every node was full: the router shed the call, or the last node said RESOURCE_EXHAUSTED.
    Overloaded,
}

impl Reason {
    /// Every reason, in [`Reason::index`] order.
    pub const ALL: [Reason; 2] = [Reason::Unavailable, Reason::Overloaded];

    /// Its name in the response header and the metrics' `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Unavailable => "unavailable",
            Reason::Overloaded => "overloaded",
        }
    }

    /// Its index in per-reason counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Why a node's failed attempt (the call's last) leaves the model unable to serve it:
    /// the failures a retry on another node would have been for ([`forward::retryable`]).
    /// `None` for a node's answer about the request itself.
    pub fn of_node_failure(status: &Status) -> Option<Reason> {
        if !forward::retryable(status) {
            return None;
        }
        Some(match status.code() {
            Code::ResourceExhausted => Reason::Overloaded,
            _ => Reason::Unavailable,
        })
    }
}

/// A call that failed: what its caller gets unless a fallback takes it.
#[derive(Debug)]
pub struct Failed {
    /// The status the call failed with.
    pub status: Status,
    /// Why the model could not serve it, when that is a reason to fall back; `None` when the
    /// call was refused for what it is, or its deadline ran out.
    pub unserved: Option<Reason>,
    /// Whether an attempt was sent to a node (and may have run).
    pub attempted: bool,
}

impl Failed {
    /// A failure that no fallback mends.
    pub fn r#final(status: impl Into<Status>) -> Self {
        Self {
            status: status.into(),
            unserved: None,
            attempted: false,
        }
    }

    /// Whether, and why, the call may go to its model's fallback, given whether the model
    /// is idempotent and whether the call is a request of a sequence.
    pub fn fallback(&self, idempotent: bool, sequence: bool) -> Option<Reason> {
        if sequence || (self.attempted && !idempotent) {
            return None;
        }
        self.unserved
    }
}

/// The status of a call whose fallback failed too: the primary's code and metadata, a message
/// naming both failures.
pub fn both_failed(primary: Status, model: &str, fallback: &str, second: &Status) -> Status {
    let message = format!(
        "{} (then model {model:?}'s fallback, model {fallback:?}: {})",
        primary.message(),
        second.message()
    );
    let mut status = Status::with_metadata(primary.code(), message, primary.metadata().clone());
    mark(status.metadata_mut(), fallback, None);
    status
}

/// Names the fallback (and why the call went to it) in `metadata`.
fn mark(metadata: &mut MetadataMap, fallback: &str, reason: Option<Reason>) {
    let headers: &mut HeaderMap = metadata.as_mut();
    if let Ok(v) = HeaderValue::from_str(fallback) {
        headers.insert(HeaderName::from_static(FALLBACK_HEADER), v);
    }
    if let Some(r) = reason {
        headers.insert(
            HeaderName::from_static(FALLBACK_REASON_HEADER),
            HeaderValue::from_static(r.name()),
        );
    }
}

/// The caller's metadata for the fallback call: the same, with the deadline that is left.
fn with_deadline(metadata: &MetadataMap, left: Duration) -> MetadataMap {
    let mut out = metadata.clone();
    // `deadline::budget` takes its margin off again: give it back, so the fallback's budget is
    // what is left of the call's.
    forward::set_grpc_timeout(&mut out, left + deadline::DEADLINE_MARGIN);
    out
}

/// Forwards a unary call for `model` as [`forward::unary`] does and, when the model cannot
/// serve it and its policy names a fallback, forwards it once to the fallback, as `rename`
/// makes the request name it.
pub async fn unary<Req, T, F, Fut>(
    state: &RouterState,
    model: &str,
    metadata: &MetadataMap,
    sequence: Option<Sequence>,
    message: Req,
    rename: impl FnOnce(Req, &str) -> Req,
    call: F,
) -> Result<Response<T>, Status>
where
    Req: Clone,
    F: Fn(crate::table::RoutedNode, tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    unary_admitted(
        state, model, metadata, sequence, message, rename, call, true,
    )
    .await
}

/// [`unary`], checking the model's rate limit only when `limited` (a batch's call is not: its
/// calls were, one by one; should it go to the fallback, it counts there as one call).
#[allow(clippy::too_many_arguments)]
pub async fn unary_admitted<Req, T, F, Fut>(
    state: &RouterState,
    model: &str,
    metadata: &MetadataMap,
    sequence: Option<Sequence>,
    message: Req,
    rename: impl FnOnce(Req, &str) -> Req,
    call: F,
    limited: bool,
) -> Result<Response<T>, Status>
where
    Req: Clone,
    F: Fn(crate::table::RoutedNode, tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let started = Instant::now();
    // Most models have no fallback: a short look at the table (no reference to it kept across
    // the call), and the call goes its usual way.
    let found = state.table.load().models.get(model).and_then(|r| {
        let s = &r.settings;
        Some((
            s.fallback.clone()?,
            s.idempotent,
            s.timeout,
            r.state.stats.clone(),
        ))
    });
    let Some((fallback, idempotent, timeout, stats)) = found else {
        return forward::unary_or_failed_admitted(
            state, model, metadata, sequence, message, call, limited,
        )
        .await
        .map_err(|f| f.status);
    };
    let first = forward::unary_or_failed_admitted(
        state,
        model,
        metadata,
        sequence,
        message.clone(),
        &call,
        limited,
    )
    .await;
    let failed = match first {
        Ok(answer) => return Ok(answer),
        Err(failed) => failed,
    };
    let Some(reason) = failed.fallback(idempotent, sequence.is_some()) else {
        return Err(failed.status);
    };
    let left = deadline::budget(metadata, timeout).saturating_sub(started.elapsed());
    if left.is_zero() {
        return Err(failed.status);
    }
    tracing::debug!(model, fallback, reason = reason.name(), "falling back");
    let second = forward::unary(
        state,
        &fallback,
        &with_deadline(metadata, left),
        None,
        rename(message, &fallback),
        &call,
    )
    .await;
    stats.fell_back(reason, second.is_ok());
    match second {
        Ok(mut answer) => {
            mark(answer.metadata_mut(), &fallback, Some(reason));
            Ok(answer)
        }
        Err(second) => Err(both_failed(failed.status, model, &fallback, &second)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_falls_back() {
        let unserved = |reason| Failed {
            status: Status::unavailable("no node"),
            unserved: Some(reason),
            attempted: false,
        };
        let f = unserved(Reason::Unavailable);
        assert_eq!(f.fallback(true, false), Some(Reason::Unavailable));
        // Not a request of a sequence: its state is on the primary's node.
        assert_eq!(f.fallback(true, true), None);
        // A model with side effects falls back only when no node got the call.
        assert_eq!(f.fallback(false, false), Some(Reason::Unavailable));
        let attempted = Failed {
            attempted: true,
            ..unserved(Reason::Overloaded)
        };
        assert_eq!(attempted.fallback(false, false), None);
        assert_eq!(attempted.fallback(true, false), Some(Reason::Overloaded));
        assert_eq!(
            Failed::r#final(Status::invalid_argument("bad")).fallback(true, false),
            None
        );
    }

    #[test]
    fn node_failures_that_leave_the_model_unable_to_serve() {
        let of = |s: Status| Reason::of_node_failure(&s);
        assert_eq!(of(Status::unavailable("down")), Some(Reason::Unavailable));
        assert_eq!(
            of(Status::deadline_exceeded("slow")),
            Some(Reason::Unavailable)
        );
        assert_eq!(
            of(Status::resource_exhausted("full")),
            Some(Reason::Overloaded)
        );
        // The node answered about the request: another model would not mend it.
        assert_eq!(of(Status::invalid_argument("shape")), None);
        assert_eq!(of(Status::not_found("model")), None);
        assert_eq!(of(Status::internal("bug")), None);
    }

    #[test]
    fn a_double_failure_keeps_the_primary_code_and_names_both() {
        let mut primary = Status::unavailable("no healthy node serves model \"big\"");
        primary
            .metadata_mut()
            .insert("x-fulcrum-node", "a-1".parse().unwrap());
        let s = both_failed(
            primary,
            "big",
            "small",
            &Status::resource_exhausted("every node serving model \"small\" is full"),
        );
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("\"big\"") && s.message().contains("\"small\" is full"));
        assert_eq!(s.metadata().get("x-fulcrum-node").unwrap(), "a-1");
        assert_eq!(s.metadata().get(FALLBACK_HEADER).unwrap(), "small");
    }

    #[test]
    fn the_fallback_gets_the_deadline_that_is_left() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "1S".parse().unwrap());
        metadata.insert("x-api-key", "k".parse().unwrap());
        let out = with_deadline(&metadata, Duration::from_millis(300));
        let budget = deadline::budget(&out, Duration::from_secs(9));
        assert!(
            budget >= Duration::from_millis(300) && budget <= Duration::from_millis(301),
            "{budget:?}"
        );
        assert_eq!(out.get("x-api-key").unwrap(), "k");
    }
}
