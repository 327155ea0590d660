//! What the operator (or local mode) writes back into a TravelJob: derived from
//! the runner reports, so `kubectl get tj` is the dashboard.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::plan::Plan;
use crate::report::{PromptOutcome, ReleaseReport, RunReport};
use crate::step::StepId;

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
    /// The latest attempt's number (1 = first try). Attempt numbers are never
    /// reused: an attempt stopped by a suspend is not a failure, but its pod's
    /// name is taken.
    #[serde(default)]
    pub attempts: u32,
    /// The attempts that failed, counted against `spec.backoffLimit`. Kept
    /// here so that deleting failed pods (by hand or by the pod garbage
    /// collector) gives no attempt back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_attempts: Vec<u32>,
    /// Creations of the step's next pod that the API server refused in a row
    /// for a reason that may pass (a full ResourceQuota, an admission webhook,
    /// the server unavailable). Each one doubles the wait before the next try;
    /// kept here so that an operator restart does not start the wait over.
    /// Back to 0 once a pod of the step is created.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub create_refusals: u32,
    /// Why the latest failed attempt failed (kept once its pod is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A summary of the runner's report of the latest finished attempt
    /// ([`RunReport::summary`]: no per-phase timeline or admission records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<RunReport>,
    /// The full report, relative to the output volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_file: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl StepStatus {
    /// Keeps the summary of the step's report, and names the full one in the
    /// job's `output_dir`.
    fn summarise_report(&mut self, step: StepId, output_dir: &str) {
        if let Some(report) = &self.report {
            self.report = Some(report.summary());
            self.report_file = Some(join_output(output_dir, &step.report_file_name()));
        }
    }
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
    /// Denoising steps the segment ran (from its report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// The flow shift it was sampled with (the spec's, else the model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<f64>,
}

/// The job's memory figures, in bytes and in human units for the printer columns.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemorySummary {
    pub peak_ram_bytes: u64,
    pub peak_ram: String,
    /// The highest GPU memory of one runner process (its own, not the device's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_vram_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_vram: Option<String>,
    /// The highest device-wide GPU memory a runner saw (every process on its GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_vram_device_bytes: Option<u64>,
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
    /// The recorded state of one step (what [`TravelJobStatus::fold_steps`] put there).
    pub fn step(&self, id: StepId) -> Option<&StepStatus> {
        match id {
            StepId::Prompts => self.prompts.as_ref(),
            StepId::Segment(i) => self.segments.iter().find(|s| s.index == i).map(|s| &s.step),
            StepId::Stitch => self.stitch.as_ref(),
        }
    }

    /// The recorded state of one step, to change it.
    pub fn step_mut(&mut self, id: StepId) -> Option<&mut StepStatus> {
        match id {
            StepId::Prompts => self.prompts.as_mut(),
            StepId::Segment(i) => self
                .segments
                .iter_mut()
                .find(|s| s.index == i)
                .map(|s| &mut s.step),
            StepId::Stitch => self.stitch.as_mut(),
        }
    }

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
        // What earlier folds found in full reports that status keeps only in
        // summary (a segment's prompt, steps and shift).
        let earlier = std::mem::take(&mut self.segments);
        self.segments = plan
            .segments
            .iter()
            .map(|seg| {
                let step = get(StepId::Segment(seg.index));
                let before = earlier.iter().find(|s| s.index == seg.index);
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
                    .or_else(|| before.and_then(|b| b.prompt.clone()))
                    .unwrap_or_else(|| seg.prompt.clone());
                let output = step
                    .report
                    .as_ref()
                    .filter(|_| step.phase == StepPhase::Succeeded)
                    .and_then(|r| r.output.as_deref())
                    .map(|o| join_output(output_dir, o));
                let generation = step.report.as_ref().and_then(|r| r.generation.as_ref());
                let earlier_run = before.filter(|_| step.report.is_some());
                SegmentStatus {
                    index: seg.index,
                    steps: generation
                        .map(|g| g.steps)
                        .or_else(|| earlier_run.and_then(|b| b.steps)),
                    shift: generation
                        .map(|g| g.shift)
                        .or_else(|| earlier_run.and_then(|b| b.shift)),
                    step,
                    prompt: Some(prompt),
                    output,
                }
            })
            .collect();
        self.stitch = Some(get(StepId::Stitch));
        for step in plan.steps() {
            if let Some(status) = self.step_mut(step) {
                status.summarise_report(step, output_dir);
            }
        }
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
        if let Some(vram) = report.peak_vram_device_bytes {
            s.peak_vram_device_bytes = Some(s.peak_vram_device_bytes.unwrap_or(0).max(vram));
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
    use crate::report::GenerationReport;

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
                step: StepId::Prompts,
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
                step: StepId::Segment(0),
                ok: true,
                peak_rss_bytes: 1 << 30,
                output: Some("segment-0.mp4".into()),
                generation: Some(GenerationReport {
                    steps: 4,
                    shift: 5.0,
                    ..Default::default()
                }),
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
            (status.segments[0].steps, status.segments[0].shift),
            (Some(4), Some(5.0))
        );
        assert_eq!(status.segments[1].steps, None);
        assert_eq!(
            status.segments[1].prompt.as_deref(),
            Some("written by the VLM")
        );
        assert_eq!(status.segments[1].step.phase, StepPhase::Pending);
        assert_eq!(status.stitch.as_ref().unwrap().phase, StepPhase::Pending);
        assert!(status.output.is_none());
        assert_eq!(status.memory.as_ref().unwrap().peak_ram, "1.0GiB");
        for (id, step) in &steps {
            let kept = status.step(*id).unwrap();
            assert_eq!(
                kept.report,
                step.report.as_ref().map(RunReport::summary),
                "{id}"
            );
            assert_eq!(
                kept.report_file,
                Some(format!("default/job/{}", id.report_file_name())),
                "{id}: the full report is named"
            );
        }
        assert_eq!(status.step(StepId::Segment(7)), None);

        // Folded again from what status kept (the pods are gone): nothing
        // the full reports said is lost.
        let kept: BTreeMap<StepId, StepStatus> = steps
            .keys()
            .map(|id| (*id, status.step(*id).unwrap().clone()))
            .collect();
        let before = status.clone();
        status.fold_steps(&plan, &kept, "default/job");
        assert_eq!(status, before);
    }

    /// A report as a Wan segment's runner writes it: a memory timeline of
    /// eight phases, four admission records, its prompt, how it generated.
    fn full_segment_report(index: u32) -> RunReport {
        use crate::report::{AdmissionReport, ChainReport, MemorySample, PhaseReport};
        let sample = MemorySample {
            rss_bytes: 3 << 30,
            available_bytes: Some(20 << 30),
            ..Default::default()
        };
        RunReport {
            step: StepId::Segment(index),
            ok: true,
            message: Some(format!("segment {index}: 81 frames 1280x720 by Wan2.1-FLF2V-14B-720P-diffusers")),
            model: "Wan2.1-FLF2V-14B-720P-diffusers".into(),
            device: Some("cuda:0".into()),
            seconds: 812.5,
            peak_rss_bytes: 9 << 30,
            peak_vram_bytes: Some(60 << 30),
            peak_vram_device_bytes: Some(61 << 30),
            phases: (0..8)
                .map(|i| PhaseReport {
                    name: format!("phase_{i}"),
                    seconds: 100.0,
                    start: sample.clone(),
                    end: sample.clone(),
                    peak_rss_bytes: 4 << 30,
                    ..Default::default()
                })
                .collect(),
            admission: (0..4)
                .map(|i| AdmissionReport {
                    phase: format!("phase_{i}"),
                    admitted: true,
                    need_ram_bytes: 1 << 30,
                    available_ram_bytes: Some(20 << 30),
                    ..Default::default()
                })
                .collect(),
            prompts: vec![PromptOutcome {
                segment: index,
                prompt: "the camera glides over a misty valley at dawn as the river turns to gold and birds rise from the reeds into a pale sky".into(),
                ..Default::default()
            }],
            generation: Some(GenerationReport {
                steps: 40,
                shift: 5.0,
                ..Default::default()
            }),
            chain: Some(ChainReport {
                head_frames: 8,
                tail_frames: 8,
                tail_digest: Some("d87d87f8acaf65dc".into()),
                head_digest: Some("0f0e0d0c0b0a0908".into()),
            }),
            output: Some(format!("segment-{index}.mp4")),
            frames: Some(81),
            ..Default::default()
        }
    }

    /// etcd refuses objects over about 1.5 MiB: a job of 1000 segments
    /// (far past the keyframe limit, to show the bound) keeps its status
    /// well under 1 MiB, because each step keeps a report summary.
    #[test]
    fn a_thousand_segment_job_has_a_status_well_under_a_mebibyte() {
        let keyframes: Vec<String> = (0..1001).map(|i| format!("k/{i}.png")).collect();
        let spec: crate::TravelJobSpec = serde_saphyr::from_str(&format!(
            "keyframes: {keyframes:?}\nmodel: {{name: Wan2.1-FLF2V-14B-720P-diffusers}}\ncheckpoints: {{hostPath: {{path: /c}}}}\ninputs: {{hostPath: {{path: /i}}}}\noutput: {{volume: {{hostPath: {{path: /o}}}}}}\n"
        ))
        .unwrap();
        let plan = Plan::from_spec(&spec);
        assert_eq!(plan.segments.len(), 1000);
        let steps: BTreeMap<StepId, StepStatus> = plan
            .segments
            .iter()
            .map(|seg| {
                let step = StepId::Segment(seg.index);
                let status = StepStatus {
                    phase: StepPhase::Succeeded,
                    pod: Some(step.attempt(1).pod_name("a-travel-job-with-a-long-name")),
                    attempts: 1,
                    message: Some(format!("segment {}: 81 frames 1280x720", seg.index)),
                    report: Some(full_segment_report(seg.index)),
                    ..Default::default()
                };
                (step, status)
            })
            .collect();
        let full: usize = steps
            .values()
            .map(|s| serde_json::to_string(s).unwrap().len())
            .sum();
        let mut status = TravelJobStatus::default();
        status.fold_steps(&plan, &steps, "videos/studio/a-travel-job-with-a-long-name");
        let bytes = serde_json::to_string(&status).unwrap().len();
        println!("status of 1000 segments: {bytes} bytes (full reports: {full})");
        assert!(bytes < 768 * 1024, "{bytes} bytes");
        let seg = &status.segments[999].step;
        assert!(seg.report.as_ref().unwrap().phases.is_empty());
        assert_eq!(
            seg.report_file.as_deref(),
            Some("videos/studio/a-travel-job-with-a-long-name/report-segment-999.json")
        );
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
                    step: StepId::Prompts,
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
