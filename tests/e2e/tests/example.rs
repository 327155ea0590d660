//! The example TravelJob, applied with kubectl, runs to `Succeeded` on the
//! test control plane: pods scheduled onto the GPU node and run by the test
//! kubelet, a memory report per segment, a playable MP4, printer columns filled.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kubewan_crds::Plan;
use kubewan_crds::status::{JobPhase, StepPhase};
use kubewan_e2e::*;

const NS: &str = "e2e-example";

#[tokio::test]
async fn example_job_succeeds_with_memory_figures_and_a_playable_video() {
    let client = client().await;
    fresh_namespace(&client, NS).await.unwrap();
    let example_path = repo_root().join("examples/traveljob.yaml");
    let out = kubectl_ok(&["apply", "-n", NS, "-f", example_path.to_str().unwrap()]);
    assert!(
        out.contains("traveljob.kubewan.dev/example created"),
        "{out}"
    );

    let job = wait_job(
        &client,
        NS,
        "example",
        Duration::from_secs(600),
        "finished",
        |j| j.status.as_ref().is_some_and(|s| s.phase.is_finished()),
    )
    .await
    .unwrap();
    let status = job.status.clone().unwrap();
    assert_eq!(
        status.phase,
        JobPhase::Succeeded,
        "the example failed: {}",
        serde_json::to_string_pretty(&status).unwrap()
    );

    // One pod per stage, deterministic names, all on the GPU node, all succeeded.
    let pods = job_pods(&client, NS, "example").await.unwrap();
    let names: BTreeSet<String> = pods.iter().map(|p| p.name_any()).collect();
    let expected: BTreeSet<String> = [
        "example-prompts-1",
        "example-seg-0-1",
        "example-seg-1-1",
        "example-stitch-1",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, expected);
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.node_name.as_deref(),
            Some("gpu-node-1"),
            "{} was not scheduled onto the GPU node",
            pod.name_any()
        );
        assert_eq!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded"),
            "{}",
            pod.name_any()
        );
        check_restricted(pod);
        let limits = spec.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default();
        let gpus = limits.get("nvidia.com/gpu").map(|q| q.0.as_str());
        let expected_gpus = if pod.name_any().contains("-stitch-") {
            None
        } else {
            Some("1")
        };
        assert_eq!(gpus, expected_gpus, "{}: GPU limit", pod.name_any());
    }

    // Every segment carries its memory report.
    assert_eq!(status.segments.len(), 2);
    for seg in &status.segments {
        assert_eq!(
            seg.step.phase,
            StepPhase::Succeeded,
            "segment {}",
            seg.index
        );
        let report = seg
            .step
            .report
            .as_ref()
            .unwrap_or_else(|| panic!("segment {} has no report", seg.index));
        assert!(
            report.peak_rss_bytes > 0,
            "segment {} peak RSS: {report:?}",
            seg.index
        );
        assert!(!report.phases.is_empty(), "segment {} phases", seg.index);
        assert!(report.preview, "the preview model is labelled as such");
        assert!(seg.output.is_some(), "segment {} output", seg.index);
        assert!(seg.prompt.as_ref().is_some_and(|p| !p.is_empty()));
        println!(
            "segment {}: peak RSS {} bytes, peak VRAM {:?}, pod {:?}",
            seg.index, report.peak_rss_bytes, report.peak_vram_bytes, seg.step.pod
        );
    }
    let prompts = status
        .prompts
        .as_ref()
        .expect("the prompts step (enhancePrompt is on)");
    assert_eq!(prompts.phase, StepPhase::Succeeded);
    let memory = status.memory.as_ref().expect("a memory summary");
    assert!(
        memory.peak_ram_bytes > 0 && !memory.peak_ram.is_empty(),
        "{memory:?}"
    );
    // No GPU on this node agent: the VRAM column says so instead of staying empty.
    let vram = memory
        .peak_vram
        .as_deref()
        .expect("a VRAM figure or 'no GPU'");
    assert!(!vram.is_empty());
    // The VLM's release is measured whenever the VLM really loaded; when it
    // could not (e.g. no Qwen2.5-VL checkpoint), every prompt says it fell back.
    let vlm_ran = prompts.report.as_ref().is_some_and(|r| r.release.is_some());
    if vlm_ran {
        assert!(
            memory.vlm_ram_freed.is_some(),
            "the VLM release is measured: {memory:?}"
        );
    } else {
        assert_eq!(
            status.prompt_fallbacks.len(),
            2,
            "without a VLM release every prompt must say it fell back: {:?}",
            prompts.report
        );
        println!(
            "note: the VLM did not load ({:?}); the VLM RAM FREED column stays empty",
            status.prompt_fallbacks[0].reason
        );
    }
    assert_eq!(status.video_model.as_deref(), Some("preview (preview)"));
    assert_eq!(status.progress.as_deref(), Some("2/2"));
    assert_eq!(status.observed_generation, job.metadata.generation);
    assert!(status.start_time.is_some() && status.completion_time.is_some());
    let succeeded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Succeeded")
        .unwrap();
    assert_eq!(succeeded.status, "True");

    // The final video exists in the output volume and plays.
    let output = status.output.clone().expect("status.output");
    let path = output_root().join(&output);
    let frames = check_mp4(&path).unwrap();
    let plan = Plan::from_spec(&job.spec);
    println!(
        "final video {} ({frames:?} frames, plan {})",
        path.display(),
        plan.total_frames
    );
    if let Some(frames) = frames {
        assert_eq!(
            frames, plan.total_frames as u64,
            "stitched frames = Σ frames − Σ overlaps"
        );
    }

    // `kubectl get tj` is the dashboard.
    let table = kubectl_ok(&["get", "tj", "-n", NS]);
    println!("{table}");
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for column in [
        "NAME",
        "PHASE",
        "SEGMENTS",
        "PEAK RAM",
        "PEAK VRAM",
        "VLM RAM FREED",
        "AGE",
    ] {
        assert!(header.contains(column), "missing column {column}: {header}");
    }
    let row = lines.next().unwrap();
    assert!(row.starts_with("example"), "{row}");
    assert!(row.contains("Succeeded") && row.contains("2/2"), "{row}");
    assert!(row.contains(&memory.peak_ram), "{row}");
    assert!(row.contains(vram), "{row}");
    assert!(!row.contains("<none>"), "every column is filled: {row}");
    if let Some(freed) = &memory.vlm_ram_freed {
        assert!(row.contains(freed.as_str()), "{row}");
    }
    let wide = kubectl_ok(&["get", "tj", "-n", NS, "-o", "wide"]);
    assert!(wide.contains("preview (preview)"), "{wide}");

    // Events on transitions.
    let events = events_of(&client, NS, "example").await.unwrap();
    let reasons: BTreeSet<String> = events.iter().filter_map(|e| e.reason.clone()).collect();
    for reason in [
        "CreatedPod",
        "Prompting",
        "Generating",
        "Stitching",
        "Succeeded",
    ] {
        assert!(reasons.contains(reason), "no {reason} event: {reasons:?}");
    }

    // The operator's metrics saw it.
    let (code, metrics) = http_get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("kubewan_pods_created_total{stage=\"segment\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("kubewan_reconciles_total"), "{metrics}");
}

/// The pod security settings the issue asks for, as the API server stored them.
fn check_restricted(pod: &Pod) {
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let c = &spec.containers[0];
    assert_eq!(
        c.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    let mounts = c.volume_mounts.as_ref().unwrap();
    let ckpts = mounts.iter().find(|m| m.mount_path == "/ckpts").unwrap();
    assert_eq!(ckpts.read_only, Some(true));
    let owner = &pod.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("TravelJob", Some(true))
    );
}
