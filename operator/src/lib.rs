//! kubewan's operator: turns each TravelJob into its stages' runner pods and
//! folds their reports into the job's status.
//!
//! - [`pods`]: pure pod building (names, labels, GPU limits, volumes, security).
//! - [`status`]: pure folding of pods into step states and conditions.
//! - [`decide`]: pure reconcile decisions (create, retry with backoff, fail,
//!   suspend, TTL, events).
//! - [`controller`]: the kube-runtime controller that carries decisions out.
//! - [`leader`]: Lease-based leader election.
//! - [`metrics`]: Prometheus metrics and the health server.

pub mod controller;
pub mod decide;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod pods;
pub mod status;
pub mod telemetry;

pub use error::{Error, Result};
