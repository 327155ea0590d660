//! What the operator hands a runner pod: one JSON document (in the
//! `KUBEWAN_TASK` environment variable), never API credentials.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::plan::Plan;
use crate::quantity::memory_bytes;
use crate::spec::TravelJob;
use crate::step::StepId;

/// Where the volumes are mounted inside a runner pod (and mapped in local mode).
pub const CKPTS_MOUNT: &str = "/ckpts";
pub const INPUTS_MOUNT: &str = "/inputs";
pub const OUTPUT_MOUNT: &str = "/output";
/// Environment variable carrying the task JSON.
pub const TASK_ENV: &str = "KUBEWAN_TASK";

/// One runner invocation's work.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    /// `<namespace>/<name>` of the TravelJob, for logs and reports.
    pub job: String,
    #[serde(flatten)]
    pub step: StepId,
    /// True when the pod requested a GPU: the runner then computes on it or
    /// fails at once, never on the CPU behind the user's back.
    pub gpu: bool,
    /// The whole normalised plan (every stage reads the part it needs).
    pub plan: Plan,
    /// The job's output folder, relative to the output volume.
    pub output_dir: String,
    /// The pod's memory limit (`spec.runner.memoryLimit`), bytes. The kubelet
    /// enforces it through the pod's cgroup; the runner's memory admission
    /// also holds the process to it where no cgroup says so (local mode, a
    /// node without memory cgroups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
}

impl Task {
    /// The task of `step` of `job` (planned as `plan`), in a pod or in local mode.
    pub fn new(job: &TravelJob, plan: &Plan, step: StepId) -> Task {
        Task {
            job: job.key(),
            step,
            gpu: job.spec.runner.gpu_for(step.stage()),
            plan: plan.clone(),
            output_dir: job.output_dir(),
            memory_limit_bytes: job
                .spec
                .runner
                .memory_limit
                .as_deref()
                .and_then(memory_bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TravelJobSpec;
    use crate::limits::*;
    use crate::validate::validate_job;

    /// The largest task any valid job can produce fits in `KUBEWAN_TASK`:
    /// every string at its limit, made of characters JSON escapes to two bytes.
    #[test]
    fn the_largest_valid_task_fits_in_one_environment_variable() {
        let text = |bytes: usize| "\"".repeat(bytes);
        let keyframes: Vec<String> = (0..MAX_KEYFRAMES)
            .map(|i| format!("{i:02}{}", text(MAX_PATH_BYTES - 2)))
            .collect();
        let spec = TravelJobSpec {
            keyframes,
            prompt: text(MAX_PROMPT_BYTES),
            prompts: vec![text(MAX_PROMPT_BYTES); MAX_KEYFRAMES - 1],
            negative_prompt: Some(text(MAX_NEGATIVE_PROMPT_BYTES)),
            ..serde_saphyr::from_str(
                "keyframes: []\ncheckpoints: {hostPath: {path: /c}}\ninputs: {hostPath: {path: /i}}\noutput: {volume: {hostPath: {path: /o}}}\n",
            )
            .unwrap()
        };
        let mut spec = spec;
        spec.model.name = text(MAX_PATH_BYTES);
        spec.enhance_prompt.model = text(MAX_PATH_BYTES);
        spec.output.path_prefix = text(MAX_PATH_BYTES);
        spec.flow_shift = Some(f64::MAX);
        spec.seed = u64::MAX;
        let mut job = TravelJob::new(&"n".repeat(MAX_NAME_BYTES), spec);
        job.metadata.namespace = Some("s".repeat(MAX_NAMESPACE_BYTES));
        validate_job(&job).unwrap();
        let plan = Plan::from_spec(&job.spec);
        let json = serde_json::to_string(&Task::new(&job, &plan, StepId::Stitch)).unwrap();
        assert!(
            json.len() <= MAX_TASK_BYTES,
            "the largest task is {} bytes, the environment takes {MAX_TASK_BYTES}",
            json.len()
        );
        eprintln!("largest task: {} bytes of {MAX_TASK_BYTES}", json.len());
    }
}
