//! The `TravelJob` custom resource: what a user applies.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, HostPathVolumeSource, NFSVolumeSource, PersistentVolumeClaimVolumeSource, Toleration,
};
use kube::{CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::limits;
use crate::status::TravelJobStatus;
use crate::step::Stage;

/// A "travel between images" video: one generated segment between each pair of
/// consecutive keyframes, stitched into one MP4.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kubewan.dev",
    version = "v1alpha1",
    kind = "TravelJob",
    plural = "traveljobs",
    shortname = "tj",
    namespaced,
    status = "TravelJobStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Segments","type":"string","jsonPath":".status.progress","description":"segments done/total"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","description":"what the job does or waits for, or why it failed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Peak RAM","type":"string","jsonPath":".status.memory.peakRam","priority":1}"#,
    printcolumn = r#"{"name":"Peak VRAM","type":"string","jsonPath":".status.memory.peakVram","priority":1}"#,
    printcolumn = r#"{"name":"VLM RAM Freed","type":"string","jsonPath":".status.memory.vlmRamFreed","priority":1}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".status.videoModel","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TravelJobSpec {
    /// Keyframe image paths, relative to the inputs volume (at least 2). Segment i
    /// travels from keyframe i to keyframe i+1.
    #[schemars(length(min = 2, max = limits::MAX_KEYFRAMES), inner(length(min = 1, max = limits::MAX_PATH_BYTES)))]
    pub keyframes: Vec<String>,
    /// The overall prompt, used for every segment that has no prompt of its own and
    /// as guidance for the prompt-writing VLM.
    #[serde(default)]
    #[schemars(length(max = limits::MAX_PROMPT_BYTES))]
    pub prompt: String,
    /// Optional per-segment prompts (one per segment, i.e. keyframes - 1). An empty
    /// string falls back to `prompt`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = limits::MAX_KEYFRAMES - 1), inner(length(max = limits::MAX_PROMPT_BYTES)))]
    pub prompts: Vec<String>,
    /// What the video model should avoid (classifier-free guidance negative prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = limits::MAX_NEGATIVE_PROMPT_BYTES))]
    pub negative_prompt: Option<String>,
    /// Frames per segment; normalised down to the nearest 4N+1 (Wan's temporal compression).
    #[serde(default = "default_frames")]
    #[schemars(range(min = 5, max = limits::MAX_FRAMES))]
    pub frames: u32,
    /// Frames shared by neighbouring segments; rounded down to even and capped by both neighbours.
    #[serde(default = "default_overlap")]
    #[schemars(range(max = limits::MAX_FRAMES))]
    pub overlap: u32,
    /// Frames per second of the output video.
    #[serde(default = "default_fps")]
    #[schemars(range(min = 1, max = limits::MAX_FPS))]
    pub fps: u32,
    /// Output size as "WIDTHxHEIGHT"; each side is snapped down to a multiple of 16.
    #[serde(default = "default_resolution")]
    #[schemars(regex(pattern = r"^[0-9]{2,4}x[0-9]{2,4}$"), length(max = 9))]
    pub resolution: String,
    /// Seed of the initial noise. Every segment uses this same seed (not seed + i):
    /// segments with the same inputs come out the same, and retrying a segment
    /// reproduces it.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Denoising steps per segment.
    #[serde(default = "default_steps")]
    #[schemars(range(min = 1, max = limits::MAX_STEPS))]
    pub steps: u32,
    /// Classifier-free guidance scale (1 or less skips the unconditional pass, halving the
    /// work of a step: what step-distilled LoRAs run with). On a Wan2.2 two-expert model, the
    /// high-noise expert's.
    #[serde(default = "default_guidance")]
    pub guidance_scale: f64,
    /// Guidance of the low-noise expert of a Wan2.2 two-expert model; unset uses `guidanceScale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale_2: Option<f64>,
    /// Flow-matching sigma shift; unset uses the model's scheduler config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_shift: Option<f64>,
    /// true: segment i starts from the last `overlap` frames of segment i-1 (sequential).
    /// false: independent first-last-frame segments in parallel, then a crossfade stitch.
    #[serde(default = "default_true")]
    pub chain: bool,
    /// How many segment pods may run at once when `chain` is false.
    #[serde(default = "default_parallelism")]
    #[schemars(range(min = 1, max = limits::MAX_KEYFRAMES))]
    pub parallelism: u32,
    /// The prompt-writing vision-language model.
    #[serde(default)]
    pub enhance_prompt: EnhancePromptSpec,
    /// The video model.
    #[serde(default)]
    pub model: VideoModelSpec,
    /// Volume holding the model checkpoints; mounted read-only at /ckpts.
    pub checkpoints: VolumeSource,
    /// Volume holding the keyframes; mounted read-only at /inputs.
    pub inputs: VolumeSource,
    /// Volume and path prefix receiving segments, prompts and the final video.
    pub output: OutputSpec,
    /// How runner pods are built and scheduled.
    #[serde(default)]
    pub runner: RunnerSpec,
    /// Retries per pod before the job fails.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(max = limits::MAX_BACKOFF_LIMIT))]
    pub backoff_limit: u32,
    /// Deadline for each runner pod, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// While true no new pods are created and running ones are deleted.
    #[serde(default)]
    pub suspend: bool,
    /// Delete the TravelJob this many seconds after it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
}

impl TravelJob {
    /// The job's namespace; "default" for a job read from a file without one.
    pub fn namespace_or_default(&self) -> String {
        self.namespace().unwrap_or_else(|| "default".into())
    }

    /// `<namespace>/<name>`: how logs, tasks and reports name the job.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace_or_default(), self.name_any())
    }

    /// The job's output folder, relative to the output volume:
    /// `<pathPrefix>/<namespace>/<name>`.
    pub fn output_dir(&self) -> String {
        let prefix = self.spec.output.path_prefix.trim_matches('/');
        if prefix.is_empty() {
            self.key()
        } else {
            format!("{prefix}/{}", self.key())
        }
    }
}

/// Settings of the prompt-writing VLM (Qwen2.5-VL).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnhancePromptSpec {
    /// Write each segment's prompt with the VLM (false: use the spec's prompts as they are).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Model folder, relative to the checkpoints volume (Hugging Face layout).
    #[serde(default = "default_vlm_model")]
    #[schemars(length(min = 1, max = limits::MAX_PATH_BYTES))]
    pub model: String,
    /// Upper bound on generated tokens per prompt.
    #[serde(default = "default_max_new_tokens")]
    #[schemars(range(min = 1, max = limits::MAX_NEW_TOKENS))]
    pub max_new_tokens: u32,
    /// What happens when the VLM cannot write a prompt (its memory admission
    /// refuses it, it fails to load or to generate, or it writes nothing).
    /// Fallback (default): that segment uses its own prompt (`prompts[i]`, else
    /// `prompt`) and the job goes on; condition PromptsFellBack turns True with
    /// the cause as its reason (VlmRefused, VlmFailed, EmptyPrompt). Fail: the
    /// prompts step fails, and once its retries are spent the job fails with the
    /// cause as the reason of its Failed condition.
    #[serde(default)]
    pub on_failure: VlmFailurePolicy,
    /// What a failed release check does: after the prompts the VLM is dropped
    /// and the runner measures whether its RAM (and VRAM) came back (at least
    /// 95 %, beyond allocator noise); condition VlmReleased says how it came
    /// out (reason MemoryReturned or MemoryNotReturned). Warn (default): the job
    /// goes on. Fail: the prompts step fails, and once its retries are spent
    /// the job fails with reason VlmNotReleased.
    #[serde(default)]
    pub release_check: ReleaseCheckPolicy,
}

impl Default for EnhancePromptSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            model: default_vlm_model(),
            max_new_tokens: default_max_new_tokens(),
            on_failure: VlmFailurePolicy::default(),
            release_check: ReleaseCheckPolicy::default(),
        }
    }
}

/// `enhancePrompt.onFailure`: what happens when the VLM cannot write a prompt.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VlmFailurePolicy {
    /// The segment uses its own prompt; the job goes on.
    #[default]
    Fallback,
    /// The prompts step fails.
    Fail,
}

/// `enhancePrompt.releaseCheck`: what a VLM that did not give its memory back does.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReleaseCheckPolicy {
    /// Condition VlmReleased is False; the job goes on.
    #[default]
    Warn,
    /// The prompts step fails.
    Fail,
}

/// The video model.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoModelSpec {
    /// Model folder relative to the checkpoints volume (diffusers layout), or
    /// `preview` for the built-in crossfade preview (no checkpoints, no GPU).
    #[serde(default = "default_video_model")]
    #[schemars(length(min = 1, max = limits::MAX_PATH_BYTES))]
    pub name: String,
    /// Weight dtype on the device.
    #[serde(default)]
    pub dtype: Dtype,
    /// LoRAs merged into the transformer weights while they load (no runtime cost), e.g. a
    /// step-distillation LoRA (LightX2V, Lightning, CausVid) run at 4-8 steps with guidance 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraSpec>,
    /// The sampler: `unipc` (the model folder's scheduler) or `euler` (flow-matching Euler,
    /// what step-distilled LoRAs are used with). Both use `flowShift` (else the model's).
    #[serde(default)]
    pub scheduler: Scheduler,
}

impl Default for VideoModelSpec {
    fn default() -> Self {
        Self {
            name: default_video_model(),
            dtype: Dtype::default(),
            loras: Vec::new(),
            scheduler: Scheduler::default(),
        }
    }
}

/// A LoRA file (diffusers/PEFT or original Wan / ComfyUI layout, safetensors).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraSpec {
    /// The file, relative to the checkpoints volume.
    pub path: String,
    /// Strength (1.0: as trained).
    #[serde(default = "default_lora_scale")]
    pub scale: f64,
    /// The transformer it is merged into: `high` (`transformer`: Wan2.1's only one, Wan2.2's
    /// high-noise expert) or `low` (`transformer_2`, Wan2.2's low-noise expert).
    #[serde(default)]
    pub expert: Expert,
}

/// One of the denoising transformers of a video model.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Expert {
    #[default]
    High,
    Low,
}

/// The flow-matching sampler of the segments.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// UniPC multistep, as the model folder's scheduler config sets it up.
    #[default]
    Unipc,
    /// Flow-matching Euler.
    Euler,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    Bf16,
    F16,
    F32,
}

/// A volume: exactly one of the sources below.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NFSVolumeSource>,
}

/// Where outputs go.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// The output volume (mounted read-write at /output).
    pub volume: VolumeSource,
    /// Folder inside the volume; the job writes to `<pathPrefix>/<namespace>/<job name>/`.
    #[serde(default)]
    #[schemars(length(max = limits::MAX_PATH_BYTES))]
    pub path_prefix: String,
}

/// How runner pods are built and scheduled.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunnerSpec {
    /// Container image with `kubewan-runner`; unset uses the operator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Where the models compute. `gpu`: prompts and segment pods request
    /// `gpus` GPUs and a runner that cannot use one fails at once. `cpu`: the
    /// CPU on purpose (tiny checkpoints, tests, demos): no pod requests a GPU.
    #[serde(default)]
    pub device: ComputeDevice,
    /// GPUs per GPU pod (prompts and segments; the stitch pod gets none).
    #[serde(default = "default_gpus")]
    pub gpus: u32,
    /// Extended resource name of a GPU.
    #[serde(default = "default_gpu_resource")]
    pub gpu_resource: String,
    /// Memory request of GPU pods (a Kubernetes quantity, e.g. "32Gi").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_request: Option<String>,
    /// Memory limit of runner pods (a Kubernetes quantity, e.g. "48Gi"). The
    /// kubelet enforces it; before each model load the runner's memory
    /// admission refuses a phase that would not fit under it (local mode
    /// applies it the same way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<String>,
    /// CPU request of every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_request: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Extra pod labels (e.g. `kueue.x-k8s.io/queue-name`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Where a job's models compute (`spec.runner.device`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDevice {
    #[default]
    Gpu,
    Cpu,
}

impl RunnerSpec {
    /// Whether the pod of `stage` requests GPUs and its runner must compute on
    /// one: prompts and segments of a `gpu` job; never the stitch.
    pub fn gpu_for(&self, stage: Stage) -> bool {
        self.device == ComputeDevice::Gpu && stage != Stage::Stitch
    }
}

impl Default for RunnerSpec {
    fn default() -> Self {
        Self {
            image: None,
            image_pull_policy: None,
            device: ComputeDevice::default(),
            gpus: default_gpus(),
            gpu_resource: default_gpu_resource(),
            memory_request: None,
            memory_limit: None,
            cpu_request: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            priority_class_name: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }
}

fn default_frames() -> u32 {
    81
}
fn default_overlap() -> u32 {
    16
}
fn default_fps() -> u32 {
    16
}
fn default_resolution() -> String {
    "832x480".into()
}
fn default_seed() -> u64 {
    12345
}
fn default_steps() -> u32 {
    40
}
fn default_guidance() -> f64 {
    5.0
}
fn default_lora_scale() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_parallelism() -> u32 {
    2
}
fn default_vlm_model() -> String {
    "Qwen2.5-VL-7B-Instruct".into()
}
fn default_max_new_tokens() -> u32 {
    512
}
fn default_video_model() -> String {
    "Wan2.1-FLF2V-14B-720P-diffusers".into()
}
fn default_gpus() -> u32 {
    1
}
fn default_gpu_resource() -> String {
    "nvidia.com/gpu".into()
}
fn default_backoff_limit() -> u32 {
    2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(namespace: Option<&str>, prefix: &str) -> TravelJob {
        let spec: TravelJobSpec = serde_saphyr::from_str(&format!(
            "keyframes: [a, b]\ncheckpoints: {{hostPath: {{path: /c}}}}\ninputs: {{hostPath: {{path: /i}}}}\noutput: {{volume: {{hostPath: {{path: /o}}}}, pathPrefix: '{prefix}'}}\n"
        ))
        .unwrap();
        let mut job = TravelJob::new("trip", spec);
        job.metadata.namespace = namespace.map(Into::into);
        job
    }

    #[test]
    fn key_and_output_dir_name_the_namespace() {
        assert_eq!(job(Some("studio"), "").key(), "studio/trip");
        assert_eq!(job(None, "").key(), "default/trip");
        assert_eq!(job(Some("studio"), "").output_dir(), "studio/trip");
        assert_eq!(
            job(Some("studio"), "/videos/").output_dir(),
            "videos/studio/trip"
        );
    }
}
