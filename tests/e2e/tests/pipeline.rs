//! The real pipeline on the test control plane beyond the example: parallel
//! first-last-frame segments by the tiny Wan, and a VLM that cannot fit under
//! the pod's memory limit, whose refusal and policy outcome a user can
//! `kubectl wait` on as TravelJob conditions.

use std::time::Duration;

use kubewan_crds::Plan;
use kubewan_crds::spec::VlmFailurePolicy;
use kubewan_crds::status::{JobPhase, StepPhase};
use kubewan_e2e::*;

#[tokio::test]
async fn parallel_first_last_frame_segments_are_generated_by_wan() {
    let client = client().await;
    let ns = "e2e-parallel";
    fresh_namespace(&client, ns).await.unwrap();
    let mut job = example();
    job.metadata.name = Some("parallel".into());
    job.spec.chain = false;
    job.spec.parallelism = 2;
    create_job(&client, ns, &job).await.unwrap();
    let job = wait_succeeded(&client, ns, "parallel", Duration::from_secs(600)).await;
    let status = job.status.clone().unwrap();
    let plan = Plan::from_spec(&job.spec);
    assert!(!plan.chain);
    check_vlm_prompts(&status, &plan, &output_root());
    for seg in &status.segments {
        check_wan_segment(seg, &plan, &output_root());
        let report = full_report(&output_root(), &seg.step);
        assert!(report.chain.is_none(), "independent segments have no seams");
    }
    let video = output_root().join(status.output.as_deref().expect("status.output"));
    assert_eq!(
        check_mp4(&video).unwrap(),
        Some(plan.total_frames as u64),
        "the crossfaded overlaps: Σ frames − Σ overlaps, counted by ffprobe"
    );
}

#[tokio::test]
async fn a_vlm_that_cannot_fit_shows_its_refusal_and_the_policy_outcome_as_conditions() {
    let client = client().await;
    let ns = "e2e-vlm-refused";
    fresh_namespace(&client, ns).await.unwrap();
    install_hires_vlm_and_big_keyframes(&node_path("ckpts"), &node_path("inputs")).unwrap();
    for (name, policy) in [
        ("fallback", VlmFailurePolicy::Fallback),
        ("strict", VlmFailurePolicy::Fail),
    ] {
        create_job(&client, ns, &vlm_cannot_fit(example(), name, policy))
            .await
            .unwrap();
    }

    // Fallback: the condition a user waits on, then the job goes on.
    kubectl_wait(ns, "fallback", "PromptsFellBack");
    let job = wait_succeeded(&client, ns, "fallback", Duration::from_secs(300)).await;
    check_refused_and_fell_back(&job.status.unwrap(), &output_root());

    // Fail: the job fails, with the refusal as the Failed condition's reason.
    kubectl_wait(ns, "strict", "Failed");
    let strict = wait_finished(&client, ns, "strict", Duration::from_secs(60))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(strict.phase, JobPhase::Failed);
    assert_eq!(
        condition(&strict, "Failed"),
        ("True".into(), "VlmRefused".into())
    );
    let message = strict.message.clone().unwrap_or_default();
    assert!(message.contains("onFailure is Fail"), "{message}");
    assert_eq!(strict.prompts.as_ref().unwrap().phase, StepPhase::Failed);
    assert_eq!(strict.segments[0].step.phase, StepPhase::Pending);
}
