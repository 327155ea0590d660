//! A VLM that cannot fit (see [`kubewan_e2e::pipeline::vlm_cannot_fit`]):
//! the tiny Qwen2.5-VL, allowed images of up to 4 Mpx, gets a pair of
//! 1920×1080 keyframes under `runner.memoryLimit: 128Mi`, which local mode
//! holds the stages to as a pod's cgroup would. Its vision tower's
//! activations over ~20000 patches are about 200 MiB, so the admission
//! refuses phase vlm_generate before anything is loaded, and
//! `enhancePrompt.onFailure` decides: Fallback goes on with the spec's
//! prompts and says so in condition PromptsFellBack (reason VlmRefused); Fail
//! fails the job.

mod common;

use std::path::Path;

use common::*;
use kubewan_crds::conditions::COND_PROMPTS_FELL_BACK;
use kubewan_crds::report::VlmIssue;
use kubewan_crds::spec::VlmFailurePolicy;
use kubewan_crds::status::{JobPhase, StepPhase};
use kubewan_e2e::pipeline::{
    check_refused_and_fell_back, install_hires_vlm_and_big_keyframes, vlm_cannot_fit,
};

/// Runs the job that cannot fit under `policy` in `work`.
fn run_with(policy: VlmFailurePolicy, work: &Path) -> LocalRun {
    let (ckpts, inputs) = (work.join("ckpts"), work.join("inputs"));
    let out = runner().arg("tiny-ckpts").arg(&ckpts).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    install_hires_vlm_and_big_keyframes(&ckpts, &inputs).unwrap();
    let job = vlm_cannot_fit(kubewan_e2e::example(), "big-pictures", policy);
    run_job(work, &job, &inputs)
}

#[test]
fn a_refused_vlm_falls_back_and_says_so_in_a_condition() {
    let work = tempfile::tempdir().unwrap();
    let run = run_with(VlmFailurePolicy::Fallback, work.path());
    assert!(run.output.status.success(), "{}", text(&run.output));
    let status = &run.status;
    assert_eq!(status.phase, JobPhase::Succeeded);
    check_refused_and_fell_back(status, &work.path().join("out"));
    assert_eq!(status.segments[0].step.phase, StepPhase::Succeeded);
    assert_eq!(status.prompt_fallbacks.len(), 1);
    assert_eq!(status.prompt_fallbacks[0].cause, Some(VlmIssue::VlmRefused));
}

#[test]
fn a_refused_vlm_fails_the_job_when_the_policy_says_fail() {
    let work = tempfile::tempdir().unwrap();
    let run = run_with(VlmFailurePolicy::Fail, work.path());
    assert_eq!(run.output.status.code(), Some(1), "{}", text(&run.output));
    let status = &run.status;
    assert_eq!(status.phase, JobPhase::Failed);
    let prompts = status.prompts.as_ref().unwrap();
    assert_eq!(prompts.phase, StepPhase::Failed);
    let report = prompts.report.as_ref().unwrap();
    assert_eq!(report.policy_failure, Some(VlmIssue::VlmRefused));
    let message = status.message.as_deref().unwrap();
    assert!(
        message.contains("onFailure is Fail") && message.contains("phase vlm_generate"),
        "{message}"
    );
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.type_ != COND_PROMPTS_FELL_BACK),
        "nothing fell back: {:?}",
        status.conditions
    );
    assert_eq!(status.segments[0].step.phase, StepPhase::Pending);
    assert!(no_videos(&run.job_dir));
}
