//! kubewan's API, shared by the operator and the runner.
//!
//! - [`spec`]: the `TravelJob` custom resource (`kubewan.dev/v1alpha1`, short name `tj`).
//! - [`status`]: what the operator writes back (phase, segments, memory summary).
//! - [`report`]: what a runner measures and writes to its termination message.
//! - [`task`]: what the operator hands a runner pod (JSON, no API credentials).
//! - [`plan`]: pure planning: normalised frames/overlaps/resolution and the stage graph.
//! - [`validate`]: spec validation with one clear message per problem.

pub mod plan;
pub mod report;
pub mod spec;
pub mod status;
pub mod task;
pub mod validate;

pub use plan::{Plan, SegmentPlan, StepId};
pub use report::{MemorySample, PhaseReport, ReleaseReport, RunReport};
pub use spec::{TravelJob, TravelJobSpec};
pub use status::{JobPhase, SegmentStatus, StepPhase, StepStatus, TravelJobStatus};
pub use task::{Stage, Task};

/// The name of the built-in video model that needs no checkpoints and no GPU.
/// Everything it produces is labelled as a preview.
pub const PREVIEW_MODEL: &str = "preview";
