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
    /// The caller's deadline (or the model's default) ran out while the call waited for an
    /// identical call's answer ([`crate::cache`]).
    #[error(
        "deadline of {budget:?} exceeded waiting for the answer to an identical call in flight (the router sends identical calls of a cached model to a node once)"
    )]
    DeadlineWaitingForIdentical {
        /// The call's time budget.
        budget: Duration,
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
            RouteError::DeadlineExceeded { .. }
            | RouteError::DeadlineWaitingForIdentical { .. } => Status::deadline_exceeded(msg),
        }
    }
}

/// Why a call's token was refused ([`crate::auth`]).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The call carries no `authorization` header.
    #[error("no bearer token: this router admits calls with `authorization: Bearer <JWT>`")]
    Missing,
    /// The header or the token is not what a bearer JWT looks like.
    #[error("the bearer token is malformed: {0}")]
    Malformed(String),
    /// No key of the router is for the token's algorithm (or key id).
    #[error("the bearer token cannot be checked: {0}")]
    UnknownKey(String),
    /// No key the token could be signed with verifies it.
    #[error("the bearer token is not valid: {0}")]
    BadSignature(String),
    /// The token expired (beyond the leeway).
    #[error("the bearer token expired; get a new one")]
    Expired,
    /// The token's `nbf` is in the future (beyond the leeway).
    #[error("the bearer token is not valid yet (nbf is in the future)")]
    NotYetValid,
    /// The token's issuer is not accepted.
    #[error("the bearer token is not accepted: {0}")]
    WrongIssuer(String),
    /// The token's audience is not accepted.
    #[error("the bearer token is not accepted: {0}")]
    WrongAudience(String),
    /// A claim the router reads is missing or wrong.
    #[error("the bearer token's claims are not usable: {0}")]
    BadClaim(String),
    /// The call is for a model its token does not list.
    #[error(
        "caller {caller:?} may not call model {model:?} (its token's fulcrum_models claim allows: {allowed})"
    )]
    ModelNotAllowed {
        /// The caller's identity.
        caller: String,
        /// The model asked for.
        model: String,
        /// What the token allows, as listed.
        allowed: String,
    },
    /// The call asks for a priority above the one its token allows.
    #[error(
        "caller {caller:?} may ask for priority {allowed} at most (its token's fulcrum_priority claim); this call asked for {asked}"
    )]
    PriorityNotAllowed {
        /// The caller's identity.
        caller: String,
        /// The priority the call asked for.
        asked: crate::priority::Priority,
        /// The highest its token allows.
        allowed: crate::priority::Priority,
    },
}

impl AuthError {
    /// Every [`AuthError::reason`], in the order of [`AuthError::reason_index`].
    pub const REASONS: [&'static str; 11] = [
        "missing",
        "malformed",
        "unknown_key",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "bad_claim",
        "priority_not_allowed",
        "model_not_allowed",
    ];

    /// Its place in [`AuthError::REASONS`].
    pub fn reason_index(&self) -> usize {
        match self {
            AuthError::Missing => 0,
            AuthError::Malformed(_) => 1,
            AuthError::UnknownKey(_) => 2,
            AuthError::BadSignature(_) => 3,
            AuthError::Expired => 4,
            AuthError::NotYetValid => 5,
            AuthError::WrongIssuer(_) => 6,
            AuthError::WrongAudience(_) => 7,
            AuthError::BadClaim(_) => 8,
            AuthError::PriorityNotAllowed { .. } => 9,
            AuthError::ModelNotAllowed { .. } => 10,
        }
    }

    /// The reason, as the metrics label it.
    pub fn reason(&self) -> &'static str {
        Self::REASONS[self.reason_index()]
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        let msg = e.to_string();
        match e {
            AuthError::PriorityNotAllowed { .. } | AuthError::ModelNotAllowed { .. } => {
                Status::permission_denied(msg)
            }
            _ => Status::unauthenticated(msg),
        }
    }
}

/// Why a router's token keys could not be loaded ([`crate::auth`]).
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// A key file cannot be read.
    #[error("cannot read key file {}: {error}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A key file holds no usable key.
    #[error("key file {}: {why}", path.display())]
    BadKey {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A token could not be signed.
    #[error("cannot sign the token: {0}")]
    Sign(String),
}

/// Why a `fulcrum.v1.Tasks` call was refused ([`crate::tasks`]).
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// `SubmitTask` without a request.
    #[error("SubmitTaskRequest.request is missing: it is the ModelInferRequest to make")]
    MissingRequest,
    /// A task deadline over [`crate::tasks::MAX_TIMEOUT`].
    #[error("timeout_ms {0} is over the longest a task may take, {max} ms", max = crate::tasks::MAX_TIMEOUT.as_millis())]
    BadTimeout(u64),
    /// Not a task id.
    #[error(
        "{0:?} is not a task id: one is 32 hex digits, '@' and the id of the router holding the task, as SubmitTask answered it"
    )]
    BadId(String),
    /// Another router's task.
    #[error(
        "task {id} is held by router {holder:?}, not this one ({this:?}): ask the router that accepted it"
    )]
    Elsewhere {
        /// The id asked for.
        id: String,
        /// The router it names.
        holder: String,
        /// This router.
        this: String,
    },
    /// No such task here (or not the caller's).
    #[error("no task {id} on this router: it was deleted, or ended more than {}s ago, or never existed (a router's restart ends its tasks)", keep.as_secs())]
    NotFound {
        /// The id asked for.
        id: String,
        /// How long ended tasks are kept.
        keep: Duration,
    },
    /// The router holds as many tasks (or bytes of them) as it may.
    #[error(
        "this router holds {tasks} tasks in {bytes} bytes and may hold {max_tasks} in {max_bytes}; this one needs {asked} more bytes: fetch and delete ended tasks (DeleteTask) or retry later"
    )]
    Full {
        /// Tasks held.
        tasks: usize,
        /// Bytes held.
        bytes: u64,
        /// Bytes the refused task's request needs.
        asked: u64,
        /// The router's bound on tasks.
        max_tasks: usize,
        /// The router's bound on bytes.
        max_bytes: u64,
    },
}

impl From<TaskError> for Status {
    fn from(e: TaskError) -> Self {
        let msg = e.to_string();
        match e {
            TaskError::MissingRequest | TaskError::BadTimeout(_) | TaskError::BadId(_) => {
                Status::invalid_argument(msg)
            }
            TaskError::Elsewhere { .. } | TaskError::NotFound { .. } => Status::not_found(msg),
            TaskError::Full { .. } => Status::resource_exhausted(msg),
        }
    }
}

/// Why another router could not be asked for a task it holds ([`crate::peers`]).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The directory does not list the router.
    #[error(
        "router {0:?}, which holds the task, is not connected to the control plane: it stopped (its tasks ended with it) or gives no address; submit the call again"
    )]
    NotListed(String),
    /// No control-plane replica answered the look-up.
    #[error(
        "cannot find router {router:?}, which holds the task: the control plane did not answer ({why})"
    )]
    DirectoryUnreachable {
        /// The router looked up.
        router: String,
        /// The last replica's error.
        why: String,
    },
    /// The directory's address for the router is not one.
    #[error(
        "router {router:?}, which holds the task, gives the address {address:?}, which is not one: {why}"
    )]
    BadAddress {
        /// The router.
        router: String,
        /// What it gave.
        address: String,
        /// Why it is not an address.
        why: String,
    },
    /// The router holding the task did not answer.
    #[error("router {router:?} at {address}, which holds the task, cannot be reached: {why}")]
    Unreachable {
        /// The router.
        router: String,
        /// Its address.
        address: String,
        /// The call's error.
        why: String,
    },
}

impl From<PeerError> for Status {
    fn from(e: PeerError) -> Self {
        let msg = e.to_string();
        match e {
            PeerError::NotListed(_) => Status::not_found(msg),
            PeerError::DirectoryUnreachable { .. }
            | PeerError::BadAddress { .. }
            | PeerError::Unreachable { .. } => Status::unavailable(msg),
        }
    }
}

/// The response cache's shared level could not be set up ([`crate::shared_cache`]).
#[derive(Debug, thiserror::Error)]
pub enum SharedCacheError {
    /// The Redis URL is not one.
    #[error("cannot use Redis URL {url}: {reason}")]
    Url {
        /// The URL, without its password.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The secret is too short to derive keys from.
    #[error(
        "the cache secret is {len} bytes; it must be at least {min} (32 random bytes, say: head -c 32 /dev/urandom | base64)"
    )]
    ShortSecret {
        /// Its length.
        len: usize,
        /// The shortest accepted.
        min: usize,
    },
}
