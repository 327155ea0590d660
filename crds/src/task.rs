//! What the operator hands a runner pod: one JSON document (in the
//! `KUBEWAN_TASK` environment variable), never API credentials.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// Where the volumes are mounted inside a runner pod (and mapped in local mode).
pub const CKPTS_MOUNT: &str = "/ckpts";
pub const INPUTS_MOUNT: &str = "/inputs";
pub const OUTPUT_MOUNT: &str = "/output";
/// Environment variable carrying the task JSON.
pub const TASK_ENV: &str = "KUBEWAN_TASK";

#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    /// Write every segment's prompt with the VLM (one load for all pairs).
    #[default]
    Prompts,
    /// Generate one segment.
    Segment,
    /// Crossfade-stitch all segments into the final video.
    Stitch,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Prompts => "prompts",
            Stage::Segment => "segment",
            Stage::Stitch => "stitch",
        }
    }
}

/// One runner invocation's work.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    /// `<namespace>/<name>` of the TravelJob, for logs and reports.
    pub job: String,
    pub stage: Stage,
    /// The segment index, for `Stage::Segment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<u32>,
    /// The whole normalised plan (every stage reads the part it needs).
    pub plan: Plan,
    /// The job's output folder, relative to the output volume.
    pub output_dir: String,
}
