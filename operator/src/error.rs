//! The operator's one error type.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("serialising {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("TravelJob has no {0}")]
    MissingField(&'static str),

    #[error("leader election: {0}")]
    Leader(String),

    #[error("the runner pods' watch cache is not ready (is the pod watch failing?)")]
    PodCacheNotReady,
}

impl Error {
    /// A short, bounded label for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Serialize { .. } => "serialize",
            Error::MissingField(_) => "missing_field",
            Error::Leader(_) => "leader",
            Error::PodCacheNotReady => "pod_cache_not_ready",
        }
    }

    /// How long to wait before reconciling again after this error.
    pub fn retry_after(&self) -> Duration {
        match self {
            // Conflicts resolve on the next read of the cache.
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => Duration::from_secs(1),
            _ => Duration::from_secs(15),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
