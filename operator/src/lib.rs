//! kubewan's operator: turns each TravelJob into its stages' runner pods and
//! folds their reports into the job's status. A reconcile observes, decides
//! and applies:
//!
//! - [`controller`]: the kube-runtime controller: `Context`, `reconcile`,
//!   `error_policy`, and the pod watch shared by trigger and cache.
//! - [`observe`]: a job's pods from the watch cache, as per-step [`observe::PodView`]s.
//! - [`step`]: one step's state machine (pods → pending/running/retrying/
//!   succeeded/failed) and the retry backoff.
//! - [`decide`]: pure: everything one reconcile does (status, pods to create
//!   and delete, events, requeue), including a refused pod creation.
//! - [`conditions`]: the job's four standard conditions.
//! - [`events`]: which changes deserve a Kubernetes event, and what it says.
//! - [`apply`]: carries a decision out against the API server.
//! - [`own_writes`]: the statuses written that the job cache does not show yet.
//! - [`pods`]: pure building of a runner Pod.
//! - [`policy`]: pure: the images and volume kinds this cluster lets a job
//!   use; the gate between a spec and its plan.
//! - [`pod_security`]: pure: the "restricted" Pod Security Standard, rule by
//!   rule, as a check of a Pod (runner pods pass it).
//! - [`leader`]: Lease-based leader election.
//! - [`metrics`]: Prometheus metrics and the health server.
//! - [`telemetry`]: logging setup.

pub mod apply;
pub mod conditions;
pub mod controller;
pub mod decide;
pub mod error;
pub mod events;
#[cfg(test)]
mod fixtures;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod own_writes;
pub mod pod_security;
pub mod pods;
pub mod policy;
pub mod step;
pub mod telemetry;

pub use error::{Error, Result};
