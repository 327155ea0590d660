//! The prompts stage: one VLM load for all keyframe pairs, one prompt per
//! segment, then the VLM is released (and the release measured). On any VLM
//! failure a pair falls back to its segment's own prompt, and the report says
//! why. Writes `prompts.json` (full texts) to the job's output folder; the
//! segment stage reads it (a segment without an entry uses its plan prompt).
//!
//! OWNERSHIP: the Qwen2.5-VL engineer owns the final content of this file. The
//! VLM call goes in [`vlm_prompts`]; until Qwen2.5-VL lands it returns
//! "Qwen2.5-VL support is not built yet", so every pair falls back.

use std::path::Path;

use anyhow::{Context, Result, bail};
use kubewan_crds::plan::VlmPlan;
use kubewan_crds::report::{PromptOutcome, ReleaseReport, RunReport};
use serde::{Deserialize, Serialize};

use super::{PROMPTS_FILE, StageCtx};
use crate::fsutil::write_atomic;

/// `prompts.json`: every segment's prompt, full text.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PromptsFile {
    pub prompts: Vec<PromptOutcome>,
}

impl PromptsFile {
    /// Reads `prompts.json` from a job folder; None when the stage did not run.
    pub fn read(job_dir: &Path) -> Result<Option<PromptsFile>> {
        let path = job_dir.join(PROMPTS_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a prompts file", path.display()))?;
        Ok(Some(file))
    }

    /// The prompt written for segment `i`, if any.
    pub fn prompt_for(&self, i: u32) -> Option<&PromptOutcome> {
        self.prompts
            .iter()
            .find(|p| p.segment == i && !p.prompt.trim().is_empty())
    }
}

/// What the VLM produced: one result per segment (in plan order) and the
/// measured release of the model.
pub struct VlmPrompts {
    pub prompts: Vec<Result<String, String>>,
    pub release: Option<ReleaseReport>,
}

/// Writes every segment's prompt with the VLM: check the folder and the memory
/// (`ctx.check_model(&vlm.model, ModelKind::Qwen2_5Vl)`), take a baseline
/// (`ctx.probe.sample()`), load once (phase `vlm_load`), generate per pair
/// (`vlm_generate`; keyframes via `ctx.keyframe_path`), then release and
/// measure (`ctx.probe.release("vlm_release", …, model, &baseline, &loaded)`,
/// which drops the model, returns the heap to the OS and reports
/// loaded/freed bytes with a warning under 95 %).
pub fn vlm_prompts(ctx: &mut StageCtx<'_>, vlm: &VlmPlan) -> Result<VlmPrompts> {
    let _ = (ctx, vlm);
    bail!("Qwen2.5-VL support is not built yet")
}

pub fn run(ctx: &mut StageCtx<'_>, mut report: RunReport) -> Result<RunReport> {
    let plan = ctx.plan().clone();
    let Some(vlm) = plan.vlm.clone() else {
        bail!("the prompts stage runs only when enhancePrompt is enabled");
    };
    let (results, release) = match vlm_prompts(ctx, &vlm) {
        Ok(out) => {
            if out.prompts.len() != plan.segments.len() {
                let why = format!(
                    "the VLM returned {} prompts for {} segments",
                    out.prompts.len(),
                    plan.segments.len()
                );
                (vec![Err(why); plan.segments.len()], out.release)
            } else {
                (out.prompts, out.release)
            }
        }
        Err(e) => (vec![Err(format!("{e:#}")); plan.segments.len()], None),
    };
    let mut outcomes = Vec::new();
    for (seg, result) in plan.segments.iter().zip(results) {
        outcomes.push(match result {
            Ok(text) if !text.trim().is_empty() => PromptOutcome {
                segment: seg.index,
                prompt: text.trim().to_owned(),
                fell_back: false,
                reason: None,
            },
            Ok(_) => PromptOutcome {
                segment: seg.index,
                prompt: seg.prompt.clone(),
                fell_back: true,
                reason: Some("the VLM wrote an empty prompt".into()),
            },
            Err(why) => PromptOutcome {
                segment: seg.index,
                prompt: seg.prompt.clone(),
                fell_back: true,
                reason: Some(why),
            },
        });
    }
    let file = PromptsFile {
        prompts: outcomes.clone(),
    };
    let json = serde_json::to_string_pretty(&file)?;
    write_atomic(&ctx.job_file(PROMPTS_FILE), json.as_bytes())?;
    let fell_back = outcomes.iter().filter(|p| p.fell_back).count();
    if fell_back > 0 {
        let reason = outcomes
            .iter()
            .find_map(|p| p.reason.clone())
            .unwrap_or_default();
        report.warnings.push(format!(
            "{fell_back} of {} prompts fell back to the segment's own prompt: {reason}",
            outcomes.len()
        ));
    }
    report.ok = true;
    report.release = release;
    report.prompts = outcomes;
    report.output = Some(PROMPTS_FILE.into());
    report.message = Some(format!(
        "{} prompts written ({} by the VLM, {fell_back} fell back)",
        plan.segments.len(),
        plan.segments.len() - fell_back
    ));
    Ok(report)
}
