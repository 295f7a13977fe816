//! The operator's one error type.

/// Everything that can fail in the operator. Each variant has a fixed metric
/// label ([`Error::metric_label`]), so error metrics stay bounded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed: {action}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    /// The API server could not be reached at start.
    #[error(transparent)]
    Connect(#[from] kube_dsr_process::api::ConnectError),
    /// A status or object could not be serialized for an apply patch.
    #[error("serializing {what}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// An object from the API lacks a field every stored object has.
    #[error("{kind} object has no {field}")]
    MissingField { kind: &'static str, field: &'static str },
    /// Leader election failed.
    #[error("leader election")]
    Lease(#[source] kube_lease_manager::LeaseManagerError),
    /// The metrics and health endpoint could not be served.
    #[error(transparent)]
    Http(#[from] kube_dsr_process::http::Error),
    /// Leadership was lost while reconciling; the process exits so that it
    /// restarts as a clean follower.
    #[error("lost the leader lease")]
    LostLease,
}

impl Error {
    /// Fixed label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } | Error::Connect(_) => "kube_api",
            Error::Serialize { .. } => "serialize",
            Error::MissingField { .. } => "missing_field",
            Error::Lease(_) => "lease",
            Error::Http(_) => "http",
            Error::LostLease => "lost_lease",
        }
    }
}
