//! kubewan's API, shared by the operator and the runner.
//!
//! - [`spec`]: the `TravelJob` custom resource (`kubewan.dev/v1alpha1`, short name `tj`).
//! - [`status`]: what the operator writes back (phase, segments, memory summary).
//! - [`conditions`]: setting a condition, and the conditions of the VLM policies.
//! - [`report`]: what a runner measures and writes to its termination message.
//! - [`task`]: what the operator hands a runner pod (JSON, no API credentials).
//! - [`step`]: a step's identity: stage, names, pod name and pod labels.
//! - [`plan`]: pure planning: normalised frames/overlaps/resolution and the stage graph.
//! - [`validate`]: spec validation with one clear message per problem.
//! - [`quantity`]: Kubernetes memory quantities as bytes.
//! - [`manifest`]: a TravelJob read from YAML under the cluster's rules (local mode).
//! - [`limits`]: every size limit (frames, resolution, prompts, images, task size), in one place.
//! - [`hash`]: the one stable hash (FNV-1a).
//! - [`fuzzing`]: the entry points of the fuzz targets of specs and reports.

pub mod conditions;
pub mod fuzzing;
pub mod hash;
pub mod limits;
pub mod manifest;
pub mod plan;
pub mod quantity;
pub mod report;
pub mod spec;
pub mod status;
pub mod step;
pub mod task;
pub mod validate;

pub use plan::{Plan, SegmentPlan};
pub use report::{MemorySample, PhaseReport, ReleaseReport, RunReport};
pub use spec::{TravelJob, TravelJobSpec};
pub use status::{JobPhase, SegmentStatus, StepPhase, StepStatus, TravelJobStatus};
pub use step::{Stage, StepAttempt, StepId};
pub use task::Task;

/// The name of the built-in video model that needs no checkpoints and no GPU.
/// Everything it produces is labelled as a preview.
pub const PREVIEW_MODEL: &str = "preview";

/// How a model is shown to people: its name, marked " (preview)" when its
/// output comes from the built-in preview model (the only place that mark is made).
pub fn model_label(model: &str, preview: bool) -> String {
    if preview {
        format!("{model} (preview)")
    } else {
        model.to_owned()
    }
}
