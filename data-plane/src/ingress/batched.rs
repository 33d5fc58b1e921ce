//! `ModelInfer` calls of a batching model ([`crate::batch`]): a call joins its batch, the
//! first of a batch sends it and shares the answer out, and every call that cannot be served
//! in a batch goes alone ([`super::infer`]'s usual way).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fulcrum_proto::inference::ModelInferRequest;
use prost::Message;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Response, Status};

use super::deadline;
use super::infer::{RawInferRequest, pass_on_remaining, send};
use crate::error::RouteError;
use crate::metrics::ModelStats;
use crate::priority::Priority;
use crate::router::RouterState;

/// How a call may be batched: its model's batching, its group and rows, the model's counters
/// and rate limit, and its time budget.
pub(super) struct Batching {
    spec: crate::batch::BatchSpec,
    key: u128,
    rows: i64,
    stats: Arc<ModelStats>,
    limit: Option<(
        Arc<crate::rate_limit::Limiter>,
        crate::rate_limit::RateLimitSpec,
    )>,
    budget: Duration,
}

/// The batching of a call of `message`'s model, if the model batches and the request can
/// share a batch ([`crate::batch::group_key`]).
pub(super) fn batching(
    state: &RouterState,
    message: &ModelInferRequest,
    metadata: &MetadataMap,
) -> Result<Option<Batching>, Status> {
    let table = state.table.load();
    let Some(route) = table.models.get(&message.model_name) else {
        return Ok(None);
    };
    let Some(spec) = route.settings.batch else {
        return Ok(None);
    };
    let priority = Priority::of(metadata.as_ref(), route.settings.priority)?;
    let Some((key, rows)) = crate::batch::group_key(message, priority, metadata.as_ref()) else {
        return Ok(None);
    };
    Ok(Some(Batching {
        spec,
        key,
        rows,
        stats: route.state.stats.clone(),
        limit: route
            .settings
            .rate_limit
            .clone()
            .map(|l| (route.state.limiter.clone(), l)),
        budget: deadline::budget(metadata, route.settings.timeout),
    }))
}

/// Response header saying how many calls shared the node call that answered this one.
const BATCH_HEADER: &str = "x-fulcrum-batch";

/// Sends a call in a batch ([`crate::batch`]): it waits for others (or for the first of its
/// batch to send it), and gets its share of the answer. Each call is held to its model's rate
/// limit here, one by one; the batch's own call is not counted again.
pub(super) async fn call(
    state: &RouterState,
    started: Instant,
    b: Batching,
    metadata: &mut MetadataMap,
    raw: RawInferRequest,
) -> Result<Response<Bytes>, Status> {
    use crate::batch::{Joined, Share};
    let model = raw.message.model_name.clone();
    if let Some((limiter, spec)) = &b.limit
        && let Err(e) = limiter.check(&model, spec, metadata.as_ref())
    {
        b.stats.rate_limited();
        return Err(e.into());
    }
    let bytes = raw.bytes;
    match state.batcher.join(b.key, b.spec, raw.message, b.rows) {
        Joined::Alone(_) => send(state, metadata, None, &model, bytes, false).await,
        Joined::Member(share) => {
            let Ok(got) = tokio::time::timeout_at(started + b.budget, share).await else {
                b.stats
                    .answered(tonic::Code::DeadlineExceeded, started.elapsed());
                return Err(RouteError::DeadlineExceeded {
                    budget: b.budget,
                    waiting_for: None,
                }
                .into());
            };
            match got {
                Ok(Share::Answered(Ok((answer, headers)))) => {
                    b.stats.answered(tonic::Code::Ok, started.elapsed());
                    let mut response = Response::new(answer);
                    *response.metadata_mut() = MetadataMap::from_headers(headers);
                    Ok(response)
                }
                Ok(Share::Answered(Err(status))) => {
                    b.stats.answered(status.code(), started.elapsed());
                    Err(status)
                }
                // Its batch could not be split, or its leader went: alone, in what is left of
                // its time.
                Ok(Share::Alone) | Err(_) => {
                    pass_on_remaining(metadata, started, b.budget);
                    send(state, metadata, None, &model, bytes, false).await
                }
            }
        }
        Joined::Lead(mut lead, own) => {
            let members = lead.collect(b.spec.window).await;
            if members.is_empty() {
                return send(state, metadata, None, &model, bytes, false).await;
            }
            let size = members.len() + 1;
            let requests: Vec<&ModelInferRequest> = std::iter::once(&own)
                .chain(members.iter().map(|m| &m.request))
                .collect();
            let rows: Vec<i64> = std::iter::once(b.rows)
                .chain(members.iter().map(|m| m.rows))
                .collect();
            let merged = Bytes::from(crate::batch::merge(&requests).encode_to_vec());
            pass_on_remaining(metadata, started, b.budget);
            b.stats.batched(size);
            let answer = send(state, metadata, None, &model, merged, false).await;
            let response = match answer {
                Ok(response) => response,
                Err(status) => {
                    // The batch's call had its leader's deadline: a call with time left beyond
                    // it tries alone. Any other failure is every call's.
                    let share = || match status.code() {
                        tonic::Code::DeadlineExceeded => Share::Alone,
                        _ => Share::Answered(Err(status.clone())),
                    };
                    for m in members {
                        let _ = m.share.send(share());
                    }
                    return Err(status);
                }
            };
            let (metadata_out, body, _) = response.into_parts();
            let parts = fulcrum_proto::inference::ModelInferResponse::decode(body)
                .map_err(|e| e.to_string())
                .and_then(|a| crate::batch::split(&a, &rows));
            let mut parts = match parts {
                Ok(parts) => parts.into_iter(),
                Err(why) => {
                    tracing::debug!(model, %why, "a batch's answer could not be split; its calls go alone");
                    for m in members {
                        let _ = m.share.send(Share::Alone);
                    }
                    return send(state, metadata, None, &model, bytes, false).await;
                }
            };
            let mut headers = metadata_out.into_headers();
            if let Ok(v) = http::HeaderValue::from_str(&size.to_string()) {
                headers.insert(http::HeaderName::from_static(BATCH_HEADER), v);
            }
            let mut mine = parts.next().unwrap_or_default();
            for (m, mut part) in members.into_iter().zip(parts) {
                part.id = m.request.id;
                let answer = Bytes::from(part.encode_to_vec());
                let _ = m.share.send(Share::Answered(Ok((answer, headers.clone()))));
            }
            mine.id = own.id;
            let mut response = Response::new(Bytes::from(mine.encode_to_vec()));
            *response.metadata_mut() = MetadataMap::from_headers(headers);
            Ok(response)
        }
    }
}
