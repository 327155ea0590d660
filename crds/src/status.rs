//! What the operator (or local mode) writes back into a TravelJob: derived from
//! the runner reports, so `kubectl get tj` is the dashboard.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::plan::{Plan, StepId};
use crate::report::{PromptOutcome, ReleaseReport, RunReport};

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum JobPhase {
    #[default]
    Pending,
    Prompting,
    Generating,
    Stitching,
    Succeeded,
    Failed,
    Suspended,
}

impl JobPhase {
    pub fn is_finished(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed)
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum StepPhase {
    /// Not started (waiting for its dependencies).
    #[default]
    Pending,
    /// A pod exists and has not finished.
    Running,
    /// Failed; retried after a backoff while attempts remain.
    Retrying,
    Succeeded,
    /// Failed and out of retries.
    Failed,
}

/// One step of the stage graph (the prompts step and the stitch step).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    pub phase: StepPhase,
    /// The pod of the latest attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Attempts made so far (1 = first try).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The runner's report of the latest finished attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<RunReport>,
}

/// One generated segment.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SegmentStatus {
    pub index: u32,
    #[serde(flatten)]
    pub step: StepStatus,
    /// The prompt the segment was generated with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The segment's video, relative to the output volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// The job's memory figures, in bytes and in human units for the printer columns.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemorySummary {
    pub peak_ram_bytes: u64,
    pub peak_ram: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_vram_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_vram: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlm_ram_loaded_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlm_ram_freed_bytes: Option<u64>,
    /// e.g. "14.2GiB (99%)".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlm_ram_freed: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TravelJobStatus {
    #[serde(default)]
    pub phase: JobPhase,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The video model, with " (preview)" when it is the built-in preview.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_model: Option<String>,
    /// Segments succeeded / total, e.g. "2/3".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// The prompts step (absent when the VLM is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<StepStatus>,
    /// Which pairs fell back to their own prompt, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_fallbacks: Vec<PromptOutcome>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<SegmentStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stitch: Option<StepStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemorySummary>,
    /// The final video, relative to the output volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl TravelJobStatus {
    /// Every report of the job's steps, in stage order.
    pub fn reports(&self) -> impl Iterator<Item = &RunReport> {
        self.prompts
            .iter()
            .chain(self.segments.iter().map(|s| &s.step))
            .chain(self.stitch.iter())
            .filter_map(|step| step.report.as_ref())
    }

    /// Recomputes the derived fields (progress, memory summary, prompt fallbacks)
    /// from the steps' reports.
    pub fn summarise(&mut self) {
        let done = self
            .segments
            .iter()
            .filter(|s| s.step.phase == StepPhase::Succeeded)
            .count();
        self.progress = Some(format!("{done}/{}", self.segments.len()));
        self.memory = memory_summary(self.reports());
        self.prompt_fallbacks = self
            .prompts
            .as_ref()
            .and_then(|p| p.report.as_ref())
            .map(|r| r.prompts.iter().filter(|p| p.fell_back).cloned().collect())
            .unwrap_or_default();
    }
}

/// `dir/file`, unless `file` already starts with `dir`.
fn join_output(dir: &str, file: &str) -> String {
    if !dir.is_empty() && file.starts_with(dir) {
        file.to_owned()
    } else if dir.is_empty() {
        file.trim_start_matches('/').to_owned()
    } else {
        format!(
            "{}/{}",
            dir.trim_end_matches('/'),
            file.trim_start_matches('/')
        )
    }
}

impl TravelJobStatus {
    /// Puts the steps' states into the status, the same way in the operator and
    /// in the runner's local mode: the prompts step (when the plan has a VLM),
    /// one entry per planned segment (its prompt: the one its own report used,
    /// else the prompts step's, else the plan's; its output, joined to the job's
    /// `output_dir`, once it succeeded), the stitch step, the final video, the
    /// video model label (" (preview)" for the built-in preview), then
    /// [`TravelJobStatus::summarise`]. Steps absent from `steps` are Pending.
    pub fn fold_steps(
        &mut self,
        plan: &Plan,
        steps: &BTreeMap<StepId, StepStatus>,
        output_dir: &str,
    ) {
        let get = |id: StepId| steps.get(&id).cloned().unwrap_or_default();
        self.video_model = Some(plan.video_model_label());
        self.prompts = plan.vlm.is_some().then(|| get(StepId::Prompts));
        let prompt_report = self.prompts.as_ref().and_then(|p| p.report.clone());
        self.segments = plan
            .segments
            .iter()
            .map(|seg| {
                let step = get(StepId::Segment(seg.index));
                let written = |r: &RunReport| {
                    r.prompts
                        .iter()
                        .find(|p| p.segment == seg.index)
                        .map(|p| p.prompt.clone())
                };
                let prompt = step
                    .report
                    .as_ref()
                    .and_then(written)
                    .or_else(|| prompt_report.as_ref().and_then(written))
                    .unwrap_or_else(|| seg.prompt.clone());
                let output = step
                    .report
                    .as_ref()
                    .filter(|_| step.phase == StepPhase::Succeeded)
                    .and_then(|r| r.output.as_deref())
                    .map(|o| join_output(output_dir, o));
                SegmentStatus {
                    index: seg.index,
                    step,
                    prompt: Some(prompt),
                    output,
                }
            })
            .collect();
        self.stitch = Some(get(StepId::Stitch));
        self.output = self
            .stitch
            .as_ref()
            .filter(|s| s.phase == StepPhase::Succeeded)
            .and_then(|s| s.report.as_ref())
            .and_then(|r| r.output.as_deref())
            .map(|o| join_output(output_dir, o));
        self.summarise();
    }
}

/// Folds the reports into the job's memory summary (None before any report).
pub fn memory_summary<'a>(reports: impl Iterator<Item = &'a RunReport>) -> Option<MemorySummary> {
    let mut summary: Option<MemorySummary> = None;
    for report in reports {
        let s = summary.get_or_insert_with(MemorySummary::default);
        s.peak_ram_bytes = s.peak_ram_bytes.max(report.peak_rss_bytes);
        if let Some(vram) = report.peak_vram_bytes {
            s.peak_vram_bytes = Some(s.peak_vram_bytes.unwrap_or(0).max(vram));
        }
        if let Some(ReleaseReport {
            loaded_bytes,
            freed_bytes,
            ..
        }) = &report.release
        {
            s.vlm_ram_loaded_bytes = Some(*loaded_bytes);
            s.vlm_ram_freed_bytes = Some(*freed_bytes);
        }
    }
    let mut s = summary?;
    s.peak_ram = human_bytes(s.peak_ram_bytes);
    // Without a GPU there is no VRAM figure; say so rather than leave the column blank.
    s.peak_vram = Some(
        s.peak_vram_bytes
            .map(human_bytes)
            .unwrap_or_else(|| "no GPU".into()),
    );
    s.vlm_ram_freed = match (s.vlm_ram_loaded_bytes, s.vlm_ram_freed_bytes) {
        (Some(loaded), Some(freed)) if loaded > 0 => Some(format!(
            "{} ({:.0}%)",
            human_bytes(freed),
            100.0 * freed as f64 / loaded as f64
        )),
        (_, Some(freed)) => Some(human_bytes(freed)),
        _ => None,
    };
    Some(s)
}

/// Bytes in binary units with one decimal, e.g. "1.5GiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Stage;

    #[test]
    fn fold_steps_places_reports_prompts_and_outputs() {
        let spec: crate::TravelJobSpec = serde_saphyr::from_str(
            "keyframes: [a, b, c]\nmodel: {name: preview}\ncheckpoints: {hostPath: {path: /c}}\ninputs: {hostPath: {path: /i}}\noutput: {volume: {hostPath: {path: /o}}}\n",
        )
        .unwrap();
        let plan = Plan::from_spec(&spec);
        let done = |report: RunReport| StepStatus {
            phase: StepPhase::Succeeded,
            attempts: 1,
            report: Some(report),
            ..Default::default()
        };
        let mut steps = BTreeMap::new();
        steps.insert(
            StepId::Prompts,
            done(RunReport {
                stage: Stage::Prompts,
                ok: true,
                prompts: vec![PromptOutcome {
                    segment: 1,
                    prompt: "written by the VLM".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        );
        steps.insert(
            StepId::Segment(0),
            done(RunReport {
                stage: Stage::Segment,
                segment: Some(0),
                ok: true,
                peak_rss_bytes: 1 << 30,
                output: Some("segment-0.mp4".into()),
                ..Default::default()
            }),
        );
        let mut status = TravelJobStatus::default();
        status.fold_steps(&plan, &steps, "default/job");
        assert_eq!(status.video_model.as_deref(), Some("preview (preview)"));
        assert_eq!(status.progress.as_deref(), Some("1/2"));
        assert_eq!(
            status.segments[0].output.as_deref(),
            Some("default/job/segment-0.mp4")
        );
        assert_eq!(
            status.segments[1].prompt.as_deref(),
            Some("written by the VLM")
        );
        assert_eq!(status.segments[1].step.phase, StepPhase::Pending);
        assert_eq!(status.stitch.as_ref().unwrap().phase, StepPhase::Pending);
        assert!(status.output.is_none());
        assert_eq!(status.memory.unwrap().peak_ram, "1.0GiB");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(15 * 1024 * 1024 * 1024), "15.0GiB");
    }

    #[test]
    fn summary_takes_maxima_and_the_vlm_release() {
        let mut status = TravelJobStatus {
            prompts: Some(StepStatus {
                phase: StepPhase::Succeeded,
                report: Some(RunReport {
                    stage: Stage::Prompts,
                    ok: true,
                    peak_rss_bytes: 3 << 30,
                    peak_vram_bytes: Some(16 << 30),
                    release: Some(ReleaseReport {
                        loaded_bytes: 2 << 30,
                        freed_bytes: 2 << 30,
                        freed_ratio: 1.0,
                        ..Default::default()
                    }),
                    prompts: vec![PromptOutcome {
                        segment: 1,
                        fell_back: true,
                        reason: Some("vlm failed".into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            segments: vec![
                SegmentStatus {
                    index: 0,
                    step: StepStatus {
                        phase: StepPhase::Succeeded,
                        report: Some(RunReport {
                            peak_rss_bytes: 5 << 30,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                SegmentStatus {
                    index: 1,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        status.summarise();
        let m = status.memory.unwrap();
        assert_eq!(m.peak_ram, "5.0GiB");
        assert_eq!(m.peak_vram.as_deref(), Some("16.0GiB"));
        assert_eq!(m.vlm_ram_freed.as_deref(), Some("2.0GiB (100%)"));
        assert_eq!(status.progress.as_deref(), Some("1/2"));
        assert_eq!(status.prompt_fallbacks.len(), 1);
    }
}
