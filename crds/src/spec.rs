//! The `TravelJob` custom resource: what a user applies.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, HostPathVolumeSource, NFSVolumeSource, PersistentVolumeClaimVolumeSource, Toleration,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::TravelJobStatus;

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
    printcolumn = r#"{"name":"Peak RAM","type":"string","jsonPath":".status.memory.peakRam"}"#,
    printcolumn = r#"{"name":"Peak VRAM","type":"string","jsonPath":".status.memory.peakVram"}"#,
    printcolumn = r#"{"name":"VLM RAM Freed","type":"string","jsonPath":".status.memory.vlmRamFreed"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".status.videoModel","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TravelJobSpec {
    /// Keyframe image paths, relative to the inputs volume (at least 2). Segment i
    /// travels from keyframe i to keyframe i+1.
    #[schemars(length(min = 2))]
    pub keyframes: Vec<String>,
    /// The overall prompt, used for every segment that has no prompt of its own and
    /// as guidance for the prompt-writing VLM.
    #[serde(default)]
    pub prompt: String,
    /// Optional per-segment prompts (one per segment, i.e. keyframes - 1). An empty
    /// string falls back to `prompt`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<String>,
    /// What the video model should avoid (classifier-free guidance negative prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Frames per segment; normalised down to the nearest 4N+1 (Wan's temporal compression).
    #[serde(default = "default_frames")]
    #[schemars(range(min = 5))]
    pub frames: u32,
    /// Frames shared by neighbouring segments; rounded down to even and capped by both neighbours.
    #[serde(default = "default_overlap")]
    pub overlap: u32,
    /// Frames per second of the output video.
    #[serde(default = "default_fps")]
    #[schemars(range(min = 1, max = 120))]
    pub fps: u32,
    /// Output size as "WIDTHxHEIGHT"; each side is snapped down to a multiple of 16.
    #[serde(default = "default_resolution")]
    #[schemars(regex(pattern = r"^[0-9]+x[0-9]+$"))]
    pub resolution: String,
    /// Random seed; every segment uses the same seed.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Denoising steps per segment.
    #[serde(default = "default_steps")]
    #[schemars(range(min = 1, max = 1000))]
    pub steps: u32,
    /// Classifier-free guidance scale (1 disables the negative branch).
    #[serde(default = "default_guidance")]
    pub guidance_scale: f64,
    /// Flow-matching sigma shift; unset uses the model's scheduler config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_shift: Option<f64>,
    /// true: segment i starts from the last `overlap` frames of segment i-1 (sequential).
    /// false: independent first-last-frame segments in parallel, then a crossfade stitch.
    #[serde(default = "default_true")]
    pub chain: bool,
    /// How many segment pods may run at once when `chain` is false.
    #[serde(default = "default_parallelism")]
    #[schemars(range(min = 1))]
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
    #[schemars(range(max = 20))]
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

/// Settings of the prompt-writing VLM (Qwen2.5-VL).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnhancePromptSpec {
    /// Write each segment's prompt with the VLM (false: use the spec's prompts as they are).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Model folder, relative to the checkpoints volume (Hugging Face layout).
    #[serde(default = "default_vlm_model")]
    pub model: String,
    /// Upper bound on generated tokens per prompt.
    #[serde(default = "default_max_new_tokens")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_new_tokens: u32,
}

impl Default for EnhancePromptSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            model: default_vlm_model(),
            max_new_tokens: default_max_new_tokens(),
        }
    }
}

/// The video model.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoModelSpec {
    /// Model folder relative to the checkpoints volume (diffusers layout), or
    /// `preview` for the built-in crossfade preview (no checkpoints, no GPU).
    #[serde(default = "default_video_model")]
    pub name: String,
    /// Weight dtype on the device.
    #[serde(default)]
    pub dtype: Dtype,
}

impl Default for VideoModelSpec {
    fn default() -> Self {
        Self {
            name: default_video_model(),
            dtype: Dtype::default(),
        }
    }
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
    /// GPUs per GPU pod (prompts and segments; the stitch pod gets none).
    #[serde(default = "default_gpus")]
    pub gpus: u32,
    /// Extended resource name of a GPU.
    #[serde(default = "default_gpu_resource")]
    pub gpu_resource: String,
    /// Memory request of GPU pods (a Kubernetes quantity, e.g. "32Gi").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_request: Option<String>,
    /// Memory limit of GPU pods.
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

impl Default for RunnerSpec {
    fn default() -> Self {
        Self {
            image: None,
            image_pull_policy: None,
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
