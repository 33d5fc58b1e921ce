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
//! Every attempt carries the caller's metadata ([`forwarded`]: all but what the router sets
//! itself), so credentials, trace context and custom headers reach the node.
//!
//! Unary calls only: a response is never partially sent, so a retry can never duplicate data
//! the caller has seen. (Streams are never retried once data flowed.)

use std::cell::RefCell;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};
use tower::retry::budget::Budget;

use super::fallback::{Failed, Reason};
use super::{deadline, node_status};
use crate::endpoint::{NodeConn, Outcome};
use crate::error::RouteError;
use crate::policy::Hedge;
use crate::priority::Priority;
use crate::queue::{MAX_QUEUE_WAIT, Place, Waited};
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

/// The `grpc-timeout` value tonic's `Request::set_timeout` writes for `timeout`. Made by tonic
/// on a miss and kept per thread for the next call: node deadlines are whole milliseconds
/// ([`node_timeout`]), so consecutive calls with the same deadline repeat the value, and a hit
/// spares the formatting and its two allocations.
fn grpc_timeout_value(timeout: Duration) -> Option<HeaderValue> {
    thread_local! {
        static LAST: RefCell<Option<(Duration, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| {
        if let Some((d, v)) = last
            && *d == timeout
        {
            return Some(v.clone());
        }
        let mut request = Request::new(());
        request.set_timeout(timeout);
        let value = request
            .into_parts()
            .0
            .into_headers()
            .remove(fulcrum_grpc_h2::timeout::GRPC_TIMEOUT)?;
        *last = Some((timeout, value.clone()));
        Some(value)
    })
}

/// Sets `metadata`'s `grpc-timeout` to `timeout` (replacing the caller's).
pub(crate) fn set_grpc_timeout(metadata: &mut MetadataMap, timeout: Duration) {
    if let Some(v) = grpc_timeout_value(timeout) {
        let headers: &mut HeaderMap = metadata.as_mut();
        headers.insert(fulcrum_grpc_h2::timeout::GRPC_TIMEOUT, v);
    }
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

/// [`super::oip::NODE_HEADER`] as a header name made once (a `&str` key is parsed again on
/// every insert).
const NODE_NAME: HeaderName = HeaderName::from_static(super::oip::NODE_HEADER);
/// [`super::oip::REGION_HEADER`], likewise.
const REGION_NAME: HeaderName = HeaderName::from_static(super::oip::REGION_HEADER);
/// [`super::oip::ATTEMPTS_HEADER`], likewise.
const ATTEMPTS_NAME: HeaderName = HeaderName::from_static(super::oip::ATTEMPTS_HEADER);

/// The node that served (or failed) an attempt, named in the response metadata.
pub fn tag(metadata: &mut MetadataMap, node: &NodeConn) {
    let (id, region) = &node.tags;
    let headers: &mut HeaderMap = metadata.as_mut();
    if let Some(v) = id {
        headers.insert(NODE_NAME, v.clone());
    }
    if let Some(v) = region {
        headers.insert(REGION_NAME, v.clone());
    }
}

/// The value of [`super::oip::ATTEMPTS_HEADER`] for `n` attempts: a static value for the
/// counts a call can have ([`crate::policy`] caps attempts at 5), formatted otherwise.
fn attempts_value(n: u32) -> HeaderValue {
    match n {
        1 => HeaderValue::from_static("1"),
        2 => HeaderValue::from_static("2"),
        3 => HeaderValue::from_static("3"),
        4 => HeaderValue::from_static("4"),
        5 => HeaderValue::from_static("5"),
        n => HeaderValue::from(n),
    }
}

/// The affinity key of a call, when the model hashes on a header.
pub fn affinity_key(table: &RoutingTable, model: &str, metadata: &MetadataMap) -> Option<u64> {
    let header = table.models.get(model)?.settings.hash_header.as_deref()?;
    let value = metadata.get(header)?;
    Some(crate::balance::ring::hash(value.as_bytes()))
}

/// Starts `attempt`: in `first` if it is free, else beside it in `others`.
fn run<F: Future>(
    mut first: Pin<&mut Option<F>>,
    others: &mut Option<FuturesUnordered<F>>,
    attempt: F,
) {
    if first.is_none() {
        first.set(Some(attempt));
    } else {
        others
            .get_or_insert_with(FuturesUnordered::new)
            .push(attempt);
    }
}

/// The outcome of the next attempt to finish, of `first` and `others` (pending while none
/// runs).
fn next_finished<'a, F: Future>(
    mut first: Pin<&'a mut Option<F>>,
    others: &'a mut Option<FuturesUnordered<F>>,
) -> impl Future<Output = F::Output> + 'a {
    poll_fn(move |cx| {
        if let Some(attempt) = first.as_mut().as_pin_mut()
            && let Poll::Ready(out) = attempt.poll(cx)
        {
            first.set(None);
            return Poll::Ready(out);
        }
        match others.as_mut().map(|o| o.poll_next_unpin(cx)) {
            Some(Poll::Ready(Some(out))) => Poll::Ready(out),
            _ => Poll::Pending,
        }
    })
}

/// The request headers a router does not pass on to a node: those it writes itself on its own
/// call to the node (`te`, `content-type`, `user-agent`, and `grpc-timeout`, which carries
/// each attempt's remaining budget), and the compression ones (the router sends a node the
/// message uncompressed and reads its answers only so).
const NOT_FORWARDED: [HeaderName; 6] = [
    http::header::TE,
    http::header::CONTENT_TYPE,
    http::header::USER_AGENT,
    fulcrum_grpc_h2::timeout::GRPC_TIMEOUT,
    HeaderName::from_static("grpc-encoding"),
    HeaderName::from_static("grpc-accept-encoding"),
];

/// The caller's metadata as a node gets it: every entry (custom headers, credentials,
/// trace context such as `traceparent`, binary `-bin` values) but [`NOT_FORWARDED`], as a
/// proxy passes request headers on.
pub fn forwarded(metadata: &MetadataMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in metadata.as_ref() {
        if !NOT_FORWARDED.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// A request of a Triton sequence (a stateful model's requests sharing a `sequence_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    /// Where it goes ([`RouterState::pick_sequence`]): the hash of model and sequence id.
    pub key: u64,
    /// Whether it starts the sequence (`sequence_start`): then no node holds the sequence's
    /// state yet, and a failed attempt may be retried on another node. A later request is not:
    /// its state is on the node it failed on, and another node would refuse it for want of a
    /// start, hiding the real failure.
    pub start: bool,
    /// Whether it ends the sequence (`sequence_end`): the router may forget its node.
    pub end: bool,
}

/// Why a call of `priority` that waited for a slot (and did not get one: `waited`) was shed.
pub fn shed_error(model: &str, priority: Priority, waited: Waited) -> RouteError {
    let model = model.to_owned();
    match waited {
        Waited::Displaced => RouteError::Displaced { model, priority },
        Waited::Woken | Waited::TimedOut | Waited::QueueFull => RouteError::AllNodesBusy { model },
    }
}

/// Forwards a unary call for `model` with `call`, which sends one attempt to a node. A request
/// of a `sequence` goes to the sequence's node, is never hedged, and is retried only when it
/// starts the sequence.
pub async fn unary<Req, T, F, Fut>(
    state: &RouterState,
    model: &str,
    metadata: &MetadataMap,
    sequence: Option<Sequence>,
    message: Req,
    call: F,
) -> Result<Response<T>, Status>
where
    Req: Clone,
    F: Fn(RoutedNode, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    unary_or_failed(state, model, metadata, sequence, message, call)
        .await
        .map_err(|f| f.status)
}

/// [`unary`], saying of a failed call whether the model could not serve it (and why), for its
/// fallback ([`super::fallback`]).
pub async fn unary_or_failed<Req, T, F, Fut>(
    state: &RouterState,
    model: &str,
    metadata: &MetadataMap,
    sequence: Option<Sequence>,
    message: Req,
    call: F,
) -> Result<Response<T>, Failed>
where
    Req: Clone,
    F: Fn(RoutedNode, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    unary_or_failed_admitted(state, model, metadata, sequence, message, call, true).await
}

/// [`unary_or_failed`], checking the model's rate limit only when `limited`: a batch's call
/// ([`crate::batch`]) is not, as each of its calls was before it joined.
pub async fn unary_or_failed_admitted<Req, T, F, Fut>(
    state: &RouterState,
    model: &str,
    metadata: &MetadataMap,
    sequence: Option<Sequence>,
    message: Req,
    call: F,
    limited: bool,
) -> Result<Response<T>, Failed>
where
    Req: Clone,
    F: Fn(RoutedNode, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let table = state.table.load_full();
    let route = table
        .models
        .get(model)
        .ok_or_else(|| Failed::r#final(RouteError::UnknownModel(model.to_owned())))?;
    let settings = route.settings.clone();
    let priority = Priority::of(metadata.as_ref(), settings.priority).map_err(Failed::r#final)?;
    if limited
        && let Some(limit) = &settings.rate_limit
        && let Err(e) = route.state.limiter.check(model, limit, metadata.as_ref())
    {
        route.state.stats.rate_limited();
        return Err(Failed::r#final(e));
    }
    let budget = deadline::budget(metadata, settings.timeout);
    let started = Instant::now();
    let deadline_at = started + budget;
    let key = affinity_key(&table, model, metadata);
    let attempts = match sequence {
        Some(Sequence { start: false, .. }) => 1,
        _ => settings.attempts(),
    };
    let retry_budget = route.state.budget.clone();
    let latency = route.state.latency.clone();
    retry_budget.deposit();

    let stats = route.state.stats.clone();
    let result: Result<Response<T>, Failed> = async {
    let mut tried: Vec<Arc<NodeConn>> = Vec::new();
    let mut queued_until: Option<Instant> = None;
    let mut place = Place::default();
    // The attempts running: the first one (usually the only one) in place, without the two
    // allocations, the copy into the heap and the waker bookkeeping of a `FuturesUnordered`,
    // which only attempts running beside it (hedges) need.
    let mut first = pin!(None);
    let mut others: Option<FuturesUnordered<_>> = None;
    let mut started_attempts = 0u32;
    let mut last_failure: Option<Status> = None;
    let hedge_delay = match settings.hedge {
        // Two attempts of one sequence step would both change the sequence's state.
        _ if !settings.idempotent || sequence.is_some() => None,
        Hedge::Off => None,
        Hedge::After(d) => Some(d),
        Hedge::P95 => latency.p95(),
    };
    let mut hedge_at = hedge_delay.map(|d| started + d);
    let headers = forwarded(metadata);

    // Starts one attempt, or says why none can start.
    let start = |picked: Picked, remaining: Duration| {
        let Picked { node, slot } = picked;
        let per_try = settings
            .per_try_timeout
            .map_or(remaining, |t| t.min(remaining));
        let mut request = Request::from_parts(
            MetadataMap::from_headers(headers.clone()),
            http::Extensions::default(),
            message.clone(),
        );
        set_grpc_timeout(request.metadata_mut(), node_timeout(per_try));
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
        if first.is_none() && others.as_ref().is_none_or(FuturesUnordered::is_empty) {
            let remaining = deadline_at.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Failed::r#final(last_failure.unwrap_or_else(|| {
                    RouteError::DeadlineExceeded {
                        budget,
                        waiting_for: None,
                    }
                    .into()
                })));
            }
            let picked = match sequence {
                Some(seq) => state.pick_sequence(&table, model, &tried, seq),
                None => state.pick(&table, model, &tried, key),
            };
            match picked {
                Ok(picked) => {
                    tried.push(picked.node.conn.clone());
                    started_attempts += 1;
                    run(first.as_mut(), &mut others, start(picked, remaining));
                }
                Err(RouteError::AllNodesBusy { .. }) => {
                    // Wait for a slot, at most MAX_QUEUE_WAIT in all for this call.
                    let queue_end = *queued_until.get_or_insert(Instant::now() + MAX_QUEUE_WAIT);
                    let wait = queue_end
                        .min(deadline_at)
                        .saturating_duration_since(Instant::now());
                    let waited = if wait.is_zero() {
                        Waited::TimedOut
                    } else {
                        state
                            .wait_for_slot(&table, model, &tried, wait, priority, &mut place)
                            .await
                    };
                    if waited == Waited::Woken {
                        continue;
                    }
                    return Err(match last_failure {
                        Some(status) => node_failed(status),
                        None => {
                            stats.shed(priority);
                            Failed {
                                status: shed_error(model, priority, waited).into(),
                                unserved: Some(Reason::Overloaded),
                                attempted: started_attempts > 0,
                            }
                        }
                    });
                }
                Err(e) => {
                    return Err(match last_failure {
                        Some(status) => node_failed(status),
                        None => Failed {
                            unserved: matches!(e, RouteError::NoHealthyNode { .. })
                                .then_some(Reason::Unavailable),
                            status: e.into(),
                            attempted: started_attempts > 0,
                        },
                    });
                }
            }
        }
        let hedge_sleep = async {
            match hedge_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            (conn, result, streak, elapsed) = next_finished(first.as_mut(), &mut others) => {
                match result {
                    Ok(mut resp) => {
                        latency.record(elapsed);
                        tag(resp.metadata_mut(), &conn);
                        let headers: &mut HeaderMap = resp.metadata_mut().as_mut();
                        headers.insert(ATTEMPTS_NAME, attempts_value(started_attempts));
                        return Ok(resp);
                    }
                    Err(mut status) => {
                        state.node_failed(&table, &conn, streak);
                        tag(status.metadata_mut(), &conn);
                        let can_retry = retryable(&status)
                            && started_attempts < attempts
                            && Instant::now() < deadline_at;
                        last_failure = Some(status);
                        if first.is_some() || others.as_ref().is_some_and(|o| !o.is_empty()) {
                            // A hedge is still running: its answer may yet win.
                            continue;
                        }
                        if !can_retry || !retry_budget.withdraw() {
                            return Err(node_failed(last_failure.take().expect("just set")));
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
                        run(first.as_mut(), &mut others, start(picked, remaining));
                    }
                }
            }
            () = tokio::time::sleep_until(deadline_at) => {
                let waiting_for = tried.last().map(|n| n.id.clone());
                let mut status: Status = RouteError::DeadlineExceeded { budget, waiting_for }.into();
                if let Some(node) = tried.last() {
                    tag(status.metadata_mut(), node);
                }
                return Err(Failed {
                    status,
                    unserved: None,
                    attempted: true,
                });
            }
        }
    }
    }
    .await;
    let code = result
        .as_ref()
        .map_or_else(|f| f.status.code(), |_| Code::Ok);
    stats.answered(code, started.elapsed());
    result
}

/// A call whose last attempt failed with `status` at a node (its attempts or the retry budget
/// spent).
fn node_failed(status: Status) -> Failed {
    Failed {
        unserved: Reason::of_node_failure(&status),
        status,
        attempted: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::{Endpoint, HealthState, Model, ModelPolicy, NodeSpec};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn the_callers_metadata_is_forwarded_but_what_the_router_sets() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-python/1.0"),
            ("grpc-timeout", "5S"),
            ("grpc-encoding", "gzip"),
            ("grpc-accept-encoding", "identity,deflate,gzip"),
            ("authorization", "Bearer t"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("x-tag", "one"),
            ("x-tag", "two"),
            ("trace-bin", "AAEC"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = forwarded(&MetadataMap::from_headers(h));
        let kept: Vec<(&str, &str)> = out
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            kept,
            [
                ("authorization", "Bearer t"),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                ),
                ("x-tag", "one"),
                ("x-tag", "two"),
                ("trace-bin", "AAEC"),
            ]
        );
    }

    /// A router state whose model `m` has three healthy nodes and `policy`.
    fn state_with(policy: ModelPolicy) -> RouterState {
        let endpoints = (1..=3)
            .map(|i| Endpoint {
                spec: Some(NodeSpec {
                    id: format!("a{i}"),
                    address: format!("127.0.0.1:{}", 9100 + i),
                    region: "a".into(),
                    models: vec![Model {
                        name: "m".into(),
                        versions: vec![],
                    }],
                    capacity: 4,
                    ..Default::default()
                }),
                health: HealthState::Healthy as i32,
                weight: 4.0,
                ready_models: vec!["m".into()],
            })
            .collect();
        RouterState::with_table(
            endpoints,
            ModelPolicy {
                model: "m".into(),
                ..policy
            },
        )
    }

    /// When a scripted attempt answers.
    #[derive(Clone, Copy)]
    enum Wait {
        /// At once.
        Now,
        /// Never (until it is cancelled).
        Never,
        /// Once this many attempts have started.
        Started(usize),
        /// Once this many attempts have answered.
        Answered(usize),
    }

    /// How one attempt of a scripted call goes: when it answers, and what.
    #[derive(Clone, Copy)]
    struct Step(Wait, Result<&'static str, Code>);

    /// What a scripted call did: its result (the answer, and the attempts header), the nodes
    /// its attempts went to, and whether an attempt still running at the end was cancelled.
    struct Scripted {
        result: Result<(&'static str, String), Code>,
        nodes: Vec<String>,
        cancelled: bool,
    }

    /// Sets its flag when dropped before its attempt answered.
    struct Cancelled(Arc<AtomicBool>, bool);

    impl Drop for Cancelled {
        fn drop(&mut self) {
            if !self.1 {
                self.0.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Forwards one call whose attempts go as `steps` says, in the order they start (events,
    /// not durations, order them: no assertion depends on timing).
    async fn scripted(policy: ModelPolicy, steps: &[Step]) -> Scripted {
        scripted_in(policy, None, steps).await
    }

    /// [`scripted`] for a request of `sequence`.
    async fn scripted_in(
        policy: ModelPolicy,
        sequence: Option<Sequence>,
        steps: &[Step],
    ) -> Scripted {
        let state = state_with(policy);
        let nodes = Arc::new(Mutex::new(Vec::new()));
        let cancelled = Arc::new(AtomicBool::new(false));
        // Attempts started, attempts answered.
        let progress = Arc::new(tokio::sync::watch::Sender::new((0usize, 0usize)));
        let call = |node: RoutedNode, _: Request<()>| {
            let n = {
                let mut nodes = nodes.lock().unwrap();
                nodes.push(node.conn.id.clone());
                nodes.len()
            };
            progress.send_modify(|p| p.0 += 1);
            let Step(wait, answer) = steps[n - 1];
            let guard = Cancelled(cancelled.clone(), false);
            let progress = progress.clone();
            async move {
                // The whole guard (a closure would take only the field it writes).
                let mut guard = guard;
                let mut seen = progress.subscribe();
                match wait {
                    Wait::Now => {}
                    Wait::Never => std::future::pending().await,
                    Wait::Started(k) => drop(seen.wait_for(|p| p.0 >= k).await),
                    Wait::Answered(k) => drop(seen.wait_for(|p| p.1 >= k).await),
                }
                guard.1 = true;
                progress.send_modify(|p| p.1 += 1);
                answer
                    .map(Response::new)
                    .map_err(|code| Status::new(code, "scripted"))
            }
        };
        let result = unary(&state, "m", &MetadataMap::new(), sequence, (), call).await;
        let result = result
            .map(|r| {
                let attempts = r
                    .metadata()
                    .get(super::super::oip::ATTEMPTS_HEADER)
                    .unwrap();
                (*r.get_ref(), attempts.to_str().unwrap().to_owned())
            })
            .map_err(|s| s.code());
        let nodes = nodes.lock().unwrap().clone();
        Scripted {
            result,
            nodes,
            cancelled: cancelled.load(Ordering::SeqCst),
        }
    }

    fn step_of(key: u64) -> Option<Sequence> {
        Some(Sequence {
            key,
            start: false,
            end: false,
        })
    }

    #[tokio::test]
    async fn a_sequence_keeps_its_node_and_sequences_spread() {
        let mut nodes_of = std::collections::HashMap::new();
        for key in 0..24u64 {
            for _ in 0..3 {
                let s = scripted_in(
                    ModelPolicy::default(),
                    step_of(key),
                    &[Step(Wait::Now, Ok("ok"))],
                )
                .await;
                nodes_of
                    .entry(key)
                    .or_insert_with(std::collections::HashSet::new)
                    .extend(s.nodes);
            }
        }
        assert!(nodes_of.values().all(|n| n.len() == 1), "{nodes_of:?}");
        let used: std::collections::HashSet<_> = nodes_of.values().flatten().collect();
        assert_eq!(used.len(), 3, "24 sequences over 3 nodes used {used:?}");
    }

    #[tokio::test]
    async fn a_sequence_step_is_not_retried_elsewhere_but_its_start_is() {
        let policy = ModelPolicy {
            max_attempts: 3,
            ..Default::default()
        };
        let steps = [
            Step(Wait::Now, Err(Code::Unavailable)),
            Step(Wait::Now, Ok("retried")),
        ];
        let s = scripted_in(policy.clone(), step_of(7), &steps).await;
        assert_eq!(s.result, Err(Code::Unavailable));
        assert_eq!(s.nodes.len(), 1);
        let start = Some(Sequence {
            key: 7,
            start: true,
            end: false,
        });
        let s = scripted_in(policy, start, &steps).await;
        assert_eq!(s.result, Ok(("retried", "2".into())));
        assert_eq!(s.nodes.len(), 2);
        assert_ne!(s.nodes[0], s.nodes[1]);
    }

    #[tokio::test]
    async fn a_sequence_step_is_never_hedged() {
        // Without the sequence, the hedge would answer (see the hedging tests); with it, the
        // one attempt runs into the deadline alone.
        let policy = ModelPolicy {
            timeout_ms: 300,
            ..hedged()
        };
        let steps = [Step(Wait::Never, Ok("first")), Step(Wait::Now, Ok("hedge"))];
        let s = scripted_in(policy, step_of(7), &steps).await;
        assert_eq!(s.result, Err(Code::DeadlineExceeded));
        assert_eq!(s.nodes.len(), 1);
    }

    fn hedged() -> ModelPolicy {
        ModelPolicy {
            hedge_after_ms: 50,
            max_attempts: 3,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn one_attempt_answers_alone() {
        let s = scripted(hedged(), &[Step(Wait::Now, Ok("first"))]).await;
        assert_eq!(s.result, Ok(("first", "1".into())));
        assert_eq!(s.nodes.len(), 1);
        assert!(!s.cancelled);
    }

    #[tokio::test]
    async fn a_hedge_beside_the_first_attempt_wins_and_the_first_is_cancelled() {
        let steps = [Step(Wait::Never, Ok("first")), Step(Wait::Now, Ok("hedge"))];
        let s = scripted(hedged(), &steps).await;
        assert_eq!(s.result, Ok(("hedge", "2".into())));
        assert_eq!(s.nodes.len(), 2);
        assert_ne!(s.nodes[0], s.nodes[1]);
        assert!(s.cancelled, "the first attempt was left running");
    }

    #[tokio::test]
    async fn a_first_attempt_failing_while_the_hedge_runs_waits_for_the_hedge() {
        let steps = [
            Step(Wait::Started(2), Err(Code::Unavailable)),
            Step(Wait::Answered(1), Ok("hedge")),
        ];
        let s = scripted(hedged(), &steps).await;
        assert_eq!(s.result, Ok(("hedge", "2".into())));
        assert!(!s.cancelled);
    }

    #[tokio::test]
    async fn after_the_first_attempt_and_the_hedge_fail_a_retry_answers() {
        let steps = [
            Step(Wait::Started(2), Err(Code::Unavailable)),
            Step(Wait::Answered(1), Err(Code::Unavailable)),
            Step(Wait::Now, Ok("retry")),
        ];
        let s = scripted(hedged(), &steps).await;
        assert_eq!(s.result, Ok(("retry", "3".into())));
        let mut distinct = s.nodes.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "{:?}", s.nodes);
    }

    #[tokio::test]
    async fn without_hedging_failures_are_retried_one_after_the_other() {
        let policy = ModelPolicy {
            max_attempts: 3,
            ..Default::default()
        };
        let steps = [
            Step(Wait::Now, Err(Code::Unavailable)),
            Step(Wait::Now, Ok("retry")),
        ];
        let s = scripted(policy.clone(), &steps).await;
        assert_eq!(s.result, Ok(("retry", "2".into())));
        // A status that is not retried is the answer.
        let s = scripted(policy, &[Step(Wait::Now, Err(Code::NotFound))]).await;
        assert_eq!(s.result, Err(Code::NotFound));
        assert_eq!(s.nodes.len(), 1);
    }

    #[tokio::test]
    async fn an_attempt_outliving_the_deadline_ends_the_call() {
        let policy = ModelPolicy {
            timeout_ms: 100,
            max_attempts: 1,
            ..Default::default()
        };
        let s = scripted(policy, &[Step(Wait::Never, Ok("late"))]).await;
        assert_eq!(s.result, Err(Code::DeadlineExceeded));
        assert!(s.cancelled);
    }

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
    fn node_deadlines_are_written_as_tonic_writes_them() {
        let tonics = |d: Duration| {
            let mut r = Request::new(());
            r.set_timeout(d);
            r.metadata().get("grpc-timeout").unwrap().clone()
        };
        // Repeated (a hit), then new values (misses), then the first again.
        for ms in [2_000, 2_000, 5, 30_000, 99_999_999, 100_000_000, 2_000] {
            let d = Duration::from_millis(ms);
            let ours = grpc_timeout_value(d).unwrap();
            assert_eq!(ours.as_bytes(), tonics(d).as_bytes(), "{d:?}");
        }
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
