//! The router's errors, and the one place they become gRPC statuses.

use std::time::Duration;

use tonic::Status;

/// Why the router could not route a call.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The request is malformed; nothing was forwarded.
    #[error("{0}")]
    InvalidRequest(String),
    /// No registered node declares the model.
    #[error("model {0:?} is not served by any registered node")]
    UnknownModel(String),
    /// A model repository other than the router's one (its routing table) was named.
    #[error(
        "unknown model repository {0:?}: a router has one, the models it routes; leave repository_name empty"
    )]
    UnknownRepository(String),
    /// Nodes declare the model, but none is healthy (in any region).
    #[error(
        "no healthy node serves model {model:?} (router region {region:?}, routing version {version})"
    )]
    NoHealthyNode {
        /// The model asked for.
        model: String,
        /// The router's region.
        region: String,
        /// The routing table version the router holds.
        version: u64,
    },
    /// Every node that could serve the model is at its concurrency limit, and the wait queue
    /// is full or a slot did not free up in time.
    #[error(
        "every node serving model {model:?} is at its concurrency limit; call shed, back off and retry"
    )]
    AllNodesBusy {
        /// The model asked for.
        model: String,
    },
    /// Every node that could serve the model is at its concurrency limit, and a call of higher
    /// priority took this call's place in the full wait queue.
    #[error(
        "every node serving model {model:?} is at its concurrency limit and calls of higher priority took this {priority} call's place in the wait queue; call shed, back off and retry"
    )]
    Displaced {
        /// The model asked for.
        model: String,
        /// The shed call's priority.
        priority: crate::priority::Priority,
    },
    /// The caller (or all callers together) is over the model's rate limit on this router.
    #[error("{} over model {model:?}'s rate limit of {rps} calls/s on this router; retry in {} ms", match caller {
        Some(c) => format!("caller {c} is"),
        None => "calls are".to_owned(),
    }, retry_after.as_millis().max(1))]
    RateLimited {
        /// The model asked for.
        model: String,
        /// The caller's key (header name and value), if the limit is per caller.
        caller: Option<String>,
        /// The limit.
        rps: f64,
        /// When a call would be admitted again.
        retry_after: Duration,
    },
    /// The caller's deadline (or the model's default) ran out.
    #[error("deadline of {budget:?} exceeded{}", match waiting_for {
        Some(node) => format!(" waiting for node {node}"),
        None => " before a node could be called".to_owned(),
    })]
    DeadlineExceeded {
        /// The call's time budget.
        budget: Duration,
        /// The node whose answer was awaited, if one was called.
        waiting_for: Option<String>,
    },
}

impl From<RouteError> for Status {
    fn from(e: RouteError) -> Self {
        let msg = e.to_string();
        match e {
            RouteError::InvalidRequest(_) => Status::invalid_argument(msg),
            RouteError::UnknownModel(_) | RouteError::UnknownRepository(_) => {
                Status::not_found(msg)
            }
            RouteError::NoHealthyNode { .. } => Status::unavailable(msg),
            RouteError::AllNodesBusy { .. }
            | RouteError::Displaced { .. }
            | RouteError::RateLimited { .. } => Status::resource_exhausted(msg),
            RouteError::DeadlineExceeded { .. } => Status::deadline_exceeded(msg),
        }
    }
}
