//! Forwarding one unary call: attempts, retries, hedging and deadlines.
//!
//! A call gets a time budget (the caller's `grpc-timeout`, else the model's default). Within it:
//! - an attempt goes to the node [`RouterState::pick`] chooses, with the remaining budget
//!   passed on to the node (and capped by the model's per-try timeout);
//! - a failed attempt (UNAVAILABLE, a node's RESOURCE_EXHAUSTED, an attempt timing out) of an
//!   idempotent call is retried on a node not tried yet — local first, the other region last —
//!   after a short jittered backoff, while the model's retry budget allows;
//! - with hedging on, a second attempt starts after the hedge delay if no answer came; the
//!   first answer wins and the other attempt is cancelled;
//! - when every node is at its concurrency limit the call waits briefly in a bounded queue,
//!   then is shed with RESOURCE_EXHAUSTED.
//!
//! Unary calls only: a response is never partially sent, so a retry can never duplicate data
//! the caller has seen. (Streams are never retried once data flowed.)

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::Rng;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};
use tower::retry::budget::Budget;

use super::{deadline, node_status};
use crate::endpoint::{NodeConn, Outcome};
use crate::error::RouteError;
use crate::policy::Hedge;
use crate::queue::{MAX_QUEUE_WAIT, Place};
use crate::router::{Picked, RouterState};
use crate::table::{RoutedNode, RoutingTable};

/// First retry backoff: a few milliseconds, enough for a connection refusal to be more than a
/// race with a restart, small next to any call's deadline.
const BACKOFF_BASE: Duration = Duration::from_millis(5);

/// Longest retry backoff: retries are for failing over, not for waiting a node out.
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Backoff before retry number `n` (1-based): exponential with full jitter.
pub fn backoff(n: u32, rng: &mut impl Rng) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1 << n.saturating_sub(1).min(10))
        .min(BACKOFF_MAX);
    cap.mul_f64(rng.random_range(0.0..1.0))
}

/// Slack added to the deadline passed on to a node, so that the router's own per-attempt timer
/// fires first and the attempt ends as DEADLINE_EXCEEDED here (retryable, and blamed on the
/// node) rather than as tonic's client-side CANCELLED. A few milliseconds: the node's own
/// timer firing a hair later changes nothing, as the router cancels the call at its deadline.
const NODE_DEADLINE_SLACK: Duration = Duration::from_millis(5);

/// The deadline an attempt passes on to its node: its own plus [`NODE_DEADLINE_SLACK`], rounded
/// up to a whole millisecond. Unrounded, the remaining budget differs by some microseconds from
/// call to call, so every call's `grpc-timeout` was a new HPACK literal, Huffman-coded and added
/// to the header table on both ends (pushing the connection's other headers out of it); rounded,
/// consecutive calls repeat the value and it travels as a one-byte table index.
pub fn node_timeout(per_try: Duration) -> Duration {
    let nanos = (per_try + NODE_DEADLINE_SLACK).as_nanos();
    Duration::from_millis(u64::try_from(nanos.div_ceil(1_000_000)).unwrap_or(u64::MAX))
}

/// Whether a failed attempt may be retried elsewhere: the node said it cannot serve now
/// (UNAVAILABLE, RESOURCE_EXHAUSTED), the attempt timed out, or the connection failed under the
/// call (a status made by the client transport, not sent by the node: resets, GOAWAY races).
pub fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded
    ) || std::error::Error::source(status).is_some()
}

/// How an attempt's status reflects on the node.
pub fn outcome_of(status: &Status) -> Outcome {
    match status.code() {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Internal
        | Code::Unknown
        | Code::DataLoss => Outcome::Failure,
        // The connection failed under the call.
        _ if std::error::Error::source(status).is_some() => Outcome::Failure,
        // The node answered about the request (NOT_FOUND, INVALID_ARGUMENT, …): it works.
        _ => Outcome::Success,
    }
}

/// The node that served (or failed) an attempt, named in the response metadata.
pub fn tag(metadata: &mut MetadataMap, node: &NodeConn) {
    let (id, region) = &node.tags;
    if let Some(v) = id {
        metadata.insert(super::oip::NODE_HEADER, v.clone());
    }
    if let Some(v) = region {
        metadata.insert(super::oip::REGION_HEADER, v.clone());
    }
}

/// The affinity key of a call, when the model hashes on a header.
pub fn affinity_key(table: &RoutingTable, model: &str, metadata: &MetadataMap) -> Option<u64> {
    let header = table.models.get(model)?.settings.hash_header.as_deref()?;
    let value = metadata.get(header)?;
    Some(crate::balance::ring::hash(value.as_bytes()))
}

/// Forwards a unary call for `model` with `call`, which sends one attempt to a node.
pub async fn unary<Req, T, F, Fut>(
    state: &RouterState,
    model: &str,
    metadata: &MetadataMap,
    message: Req,
    call: F,
) -> Result<Response<T>, Status>
where
    Req: Clone,
    F: Fn(RoutedNode, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let table = state.table.load_full();
    let route = table
        .models
        .get(model)
        .ok_or_else(|| RouteError::UnknownModel(model.to_owned()))?;
    let settings = route.settings.clone();
    let budget = deadline::budget(metadata, settings.timeout);
    let started = Instant::now();
    let deadline_at = started + budget;
    let key = affinity_key(&table, model, metadata);
    let attempts = settings.attempts();
    let retry_budget = route.state.budget.clone();
    let latency = route.state.latency.clone();
    retry_budget.deposit();

    let stats = route.state.stats.clone();
    let result: Result<Response<T>, Status> = async {
    let mut tried: Vec<Arc<NodeConn>> = Vec::new();
    let mut queued_until: Option<Instant> = None;
    let mut place = Place::default();
    let mut running = FuturesUnordered::new();
    let mut started_attempts = 0u32;
    let mut last_failure: Option<Status> = None;
    let hedge_delay = match settings.hedge {
        _ if !settings.idempotent => None,
        Hedge::Off => None,
        Hedge::After(d) => Some(d),
        Hedge::P95 => latency.p95(),
    };
    let mut hedge_at = hedge_delay.map(|d| started + d);

    // Starts one attempt, or says why none can start.
    let start = |picked: Picked, remaining: Duration| {
        let Picked { node, slot } = picked;
        let per_try = settings
            .per_try_timeout
            .map_or(remaining, |t| t.min(remaining));
        let mut request = Request::new(message.clone());
        request.set_timeout(node_timeout(per_try));
        let fut = call(node.clone(), request);
        async move {
            let t0 = Instant::now();
            let result = match tokio::time::timeout(per_try, fut).await {
                Ok(r) => r.map_err(|s| {
                    if node_status::is_connect_failure(&s) {
                        node.conn.connect_failed();
                    }
                    node_status::from_node(s)
                }),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "node {} did not answer within {per_try:?}",
                    node.conn.id
                ))),
            };
            let outcome = match &result {
                Ok(_) => Outcome::Success,
                Err(s) => outcome_of(s),
            };
            let streak = node.conn.record(outcome, t0.elapsed());
            drop(slot);
            (node.conn.clone(), result, streak, t0.elapsed())
        }
    };

    loop {
        // Start an attempt when none runs (first, or retry after a failure).
        if running.is_empty() {
            let remaining = deadline_at.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(last_failure.unwrap_or_else(|| {
                    RouteError::DeadlineExceeded {
                        budget,
                        waiting_for: None,
                    }
                    .into()
                }));
            }
            match state.pick(&table, model, &tried, key) {
                Ok(picked) => {
                    tried.push(picked.node.conn.clone());
                    started_attempts += 1;
                    running.push(start(picked, remaining));
                }
                Err(RouteError::AllNodesBusy { .. }) => {
                    // Wait for a slot, at most MAX_QUEUE_WAIT in all for this call.
                    let queue_end = *queued_until.get_or_insert(Instant::now() + MAX_QUEUE_WAIT);
                    let wait = queue_end
                        .min(deadline_at)
                        .saturating_duration_since(Instant::now());
                    if !wait.is_zero()
                        && state
                            .wait_for_slot(&table, model, &tried, wait, &mut place)
                            .await
                    {
                        continue;
                    }
                    return Err(last_failure.unwrap_or_else(|| {
                        stats.shed();
                        RouteError::AllNodesBusy {
                            model: model.to_owned(),
                        }
                        .into()
                    }));
                }
                Err(e) => return Err(last_failure.unwrap_or_else(|| e.into())),
            }
        }
        let hedge_sleep = async {
            match hedge_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some((conn, result, streak, elapsed)) = running.next() => {
                match result {
                    Ok(mut resp) => {
                        latency.record(elapsed);
                        tag(resp.metadata_mut(), &conn);
                        resp.metadata_mut()
                            .insert(super::oip::ATTEMPTS_HEADER, started_attempts.into());
                        return Ok(resp);
                    }
                    Err(mut status) => {
                        state.node_failed(&table, &conn, streak);
                        tag(status.metadata_mut(), &conn);
                        let can_retry = retryable(&status)
                            && started_attempts < attempts
                            && Instant::now() < deadline_at;
                        last_failure = Some(status);
                        if !running.is_empty() {
                            // A hedge is still running: its answer may yet win.
                            continue;
                        }
                        if !can_retry || !retry_budget.withdraw() {
                            return Err(last_failure.take().expect("just set"));
                        }
                        tracing::debug!(node = %conn.id, attempt = started_attempts, "retrying on another node");
                        stats.retried();
                        let pause = backoff(started_attempts, &mut rand::rng())
                            .min(deadline_at.saturating_duration_since(Instant::now()));
                        tokio::time::sleep(pause).await;
                        hedge_at = None;
                    }
                }
            }
            () = hedge_sleep => {
                hedge_at = None;
                if started_attempts < attempts && retry_budget.withdraw() {
                    let remaining = deadline_at.saturating_duration_since(Instant::now());
                    if let Ok(picked) = state.pick(&table, model, &tried, key) {
                        tracing::debug!(node = %picked.node.conn.id, "hedging");
                        stats.hedged();
                        tried.push(picked.node.conn.clone());
                        started_attempts += 1;
                        running.push(start(picked, remaining));
                    }
                }
            }
            () = tokio::time::sleep_until(deadline_at) => {
                let waiting_for = tried.last().map(|n| n.id.clone());
                let mut status: Status = RouteError::DeadlineExceeded { budget, waiting_for }.into();
                if let Some(node) = tried.last() {
                    tag(status.metadata_mut(), node);
                }
                return Err(status);
            }
        }
    }
    }
    .await;
    let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
    stats.answered(code, started.elapsed());
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn backoff_is_bounded_and_grows() {
        let mut rng = SmallRng::seed_from_u64(1);
        for n in 1..20 {
            let b = backoff(n, &mut rng);
            assert!(b <= BACKOFF_MAX);
        }
        let first_max = (0..1000).map(|_| backoff(1, &mut rng)).max().unwrap();
        assert!(first_max <= BACKOFF_BASE);
    }

    #[test]
    fn node_deadlines_are_whole_milliseconds_never_shorter() {
        for us in [0, 1, 999, 1_000, 1_001, 4_999_999] {
            let per_try = Duration::from_micros(us);
            let t = node_timeout(per_try);
            assert!(t >= per_try + NODE_DEADLINE_SLACK, "{per_try:?} -> {t:?}");
            assert!(t < per_try + NODE_DEADLINE_SLACK + Duration::from_millis(1));
            assert_eq!(t.subsec_nanos() % 1_000_000, 0, "{t:?}");
        }
        // Two calls a few microseconds apart pass the node the same deadline.
        let a = node_timeout(Duration::from_micros(1_994_990));
        let b = node_timeout(Duration::from_micros(1_994_970));
        assert_eq!(a, b);
    }

    #[test]
    fn what_is_retried() {
        assert!(retryable(&Status::unavailable("x")));
        assert!(retryable(&Status::resource_exhausted("x")));
        assert!(!retryable(&Status::invalid_argument("x")));
        assert!(!retryable(&Status::not_found("x")));
        assert_eq!(outcome_of(&Status::not_found("x")), Outcome::Success);
        assert_eq!(outcome_of(&Status::unavailable("x")), Outcome::Failure);
    }
}
