//! Pass-through for any other gRPC API: calls to a service the router does not serve itself
//! are forwarded untouched — never decoded — to a node serving the model named in the
//! `x-fulcrum-model` request header, with the same node selection, locality, outlier state
//! and concurrency limits as Open Inference Protocol calls.
//!
//! What it cannot know, it does not do: without decoding, the router cannot tell whether a call
//! is idempotent or whether the node has read it, so pass-through calls are not retried; a
//! call whose model has no node fails fast with the same statuses as `ModelInfer`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body as AxumBody;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tower::Service;

use super::forward::{outcome_of, tag};
use crate::endpoint::{InFlight, Outcome};
use crate::error::RouteError;
use crate::priority::Priority;
use crate::queue::{MAX_QUEUE_WAIT, Place, Waited};
use crate::router::RouterState;

/// The request header naming the model of a pass-through call.
pub const MODEL_HEADER: &str = "x-fulcrum-model";

/// Forwards one pass-through call.
pub async fn forward(
    state: Arc<RouterState>,
    req: http::Request<AxumBody>,
) -> http::Response<AxumBody> {
    match try_forward(&state, req).await {
        Ok(resp) => resp,
        Err(status) => status.into_http::<AxumBody>(),
    }
}

async fn try_forward(
    state: &RouterState,
    req: http::Request<AxumBody>,
) -> Result<http::Response<AxumBody>, Status> {
    let model = req
        .headers()
        .get(MODEL_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| {
            Status::unimplemented(format!(
                "{} is not served by this router; to pass a call through to a model's nodes, \
                 name the model in the {MODEL_HEADER} header",
                req.uri().path()
            ))
        })?;
    state.check_model(req.extensions(), &model)?;
    let table = state.table.load_full();
    let metadata = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
    let key = super::forward::affinity_key(&table, &model, &metadata);
    let route = table.models.get(&model);
    let default = route.map_or(Priority::Normal, |r| r.settings.priority);
    let priority = Priority::of(req.headers(), default)?;
    if let Some(r) = route
        && let Some(limit) = &r.settings.rate_limit
        && let Err(e) = r.state.limiter.check(&model, limit, req.headers())
    {
        r.state.stats.rate_limited();
        return Err(e.into());
    }
    let mut place = Place::default();
    let queue_end = Instant::now() + MAX_QUEUE_WAIT;
    let picked = loop {
        match state.pick(&table, &model, &[], key) {
            Ok(p) => break p,
            Err(RouteError::AllNodesBusy { .. }) => {
                let wait = queue_end.saturating_duration_since(Instant::now());
                let waited = if wait.is_zero() {
                    Waited::TimedOut
                } else {
                    state
                        .wait_for_slot(&table, &model, &[], wait, priority, &mut place)
                        .await
                };
                if waited != Waited::Woken {
                    if let Some(route) = table.models.get(&model) {
                        route.state.stats.shed(priority);
                    }
                    return Err(super::forward::shed_error(&model, priority, waited).into());
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    let node = picked.node.conn.clone();
    let mut channel = node.channel();
    let started = Instant::now();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::unavailable(format!("node {}: {e}", node.id)))?;
    match channel.call(req.map(Body::new)).await {
        Ok(resp) => {
            // A trailers-only error answer carries its status in the headers.
            let outcome = super::node_status::from_headers(resp.headers())
                .filter(|s| s.code() != tonic::Code::Ok)
                .map_or(Outcome::Success, |s| outcome_of(&s));
            let streak = node.record(outcome, started.elapsed());
            state.node_failed(&table, &node, streak);
            let (mut parts, body) = resp.into_parts();
            let mut md = tonic::metadata::MetadataMap::new();
            tag(&mut md, &node);
            parts.headers.extend(md.into_headers());
            Ok(http::Response::from_parts(
                parts,
                AxumBody::new(Guarded {
                    inner: body,
                    _slot: picked.slot,
                }),
            ))
        }
        Err(e) => {
            let streak = node.record(Outcome::Failure, started.elapsed());
            state.node_failed(&table, &node, streak);
            let mut status = Status::unavailable(format!("node {}: {e}", node.id));
            tag(status.metadata_mut(), &node);
            Err(status)
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds the call's in-flight slot until it ends, so a long stream
    /// counts as load for as long as it lasts.
    struct Guarded {
        #[pin]
        inner: Body,
        _slot: InFlight,
    }
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
