//! The control plane's errors, and the one place they become gRPC statuses.

use tonic::Status;

use crate::store::StoreError;

/// Why a control-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node spec failed validation; the message says which field and why.
    #[error("invalid node spec: {0}")]
    InvalidSpec(String),
    /// An argument other than a node spec is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// The id is taken by a node at another address.
    #[error("node {id:?} is already registered with address {existing}; deregister it first")]
    AlreadyExists {
        /// The contested id.
        id: String,
        /// The address the id is registered with.
        existing: String,
    },
    /// A node tried to register itself under an id an operator registered.
    #[error(
        "node {0:?} is registered by an operator; deregister it first to let the node register itself"
    )]
    RegisteredByOperator(String),
    /// A self-registered node sent nothing for a lease TTL: taken for dead.
    #[error("node {id:?} sent nothing for {silent:?}; its registration ended")]
    NodeSilent {
        /// The node.
        id: String,
        /// How long it was silent.
        silent: std::time::Duration,
    },
    /// A self-registration's entry was removed or taken over (by an operator, or by the node
    /// registering again on another stream).
    #[error("node {0:?}'s registration was removed or replaced")]
    RegistrationLost(String),
    /// This control-plane replica is shutting down; register with another one.
    #[error("this control-plane replica is shutting down")]
    ShuttingDown,
    /// No node has this id.
    #[error("node {0:?} is not registered")]
    NodeNotFound(String),
    /// No registered node is in this region.
    #[error("no registered node is in region {0:?}")]
    RegionNotFound(String),
    /// No replica holds a stream of this router (with an address).
    #[error(
        "no router {0:?} is connected to the control plane with an address: it stopped, or it gives none (fulcrum router --advertise)"
    )]
    RouterNotFound(String),
    /// No policy is set for this model.
    #[error("no policy is set for model {0:?}")]
    PolicyNotFound(String),
    /// The model's policy caches no answers, so there are none to flush.
    #[error("model {0:?}'s policy caches no answers (cache_ttl_ms is 0): nothing to flush")]
    NotCaching(String),
    /// A concurrent writer changed the same key; the caller may retry.
    #[error("concurrent update of {0}; retry")]
    Conflict(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored value could not be decoded.
    #[error("cannot decode {key}: {source}")]
    Decode {
        /// The key whose value is bad.
        key: String,
        /// The decoder's complaint.
        source: prost::DecodeError,
    },
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidSpec(_) | Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::AlreadyExists { .. } | Error::RegisteredByOperator(_) => {
                Status::already_exists(msg)
            }
            Error::RegistrationLost(_) => Status::aborted(msg),
            Error::NodeSilent { .. } | Error::ShuttingDown => Status::unavailable(msg),
            Error::NodeNotFound(_)
            | Error::PolicyNotFound(_)
            | Error::RegionNotFound(_)
            | Error::RouterNotFound(_) => Status::not_found(msg),
            Error::Conflict(_) => Status::aborted(msg),
            Error::NotCaching(_) => Status::failed_precondition(msg),
            // A lease that expired under a registration: the store was out of reach too long.
            Error::Store(StoreError::Unavailable(_) | StoreError::LeaseNotFound(_)) => {
                Status::unavailable(msg)
            }
            Error::Store(_) | Error::Decode { .. } => Status::internal(msg),
        }
    }
}
