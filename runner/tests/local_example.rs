//! `kubewan-runner local examples/traveljob.yaml`: the tiny Qwen2.5-VL writes
//! the prompts, the tiny Wan2.1 FLF2V generates the chained segments, the
//! stitch writes a playable MP4. The test fails when the pipeline is bypassed:
//! every prompt must be the VLM's (with its tokens), every segment Wan's (its
//! report names the model, dtype, steps, seed, per-phase memory and
//! admission), the chained segment must start with the previous segment's
//! tail, and ffprobe must count the planned frames.
//!
//! The seam is checked on the frames before encoding, exactly: the chained
//! segment's report has a digest of its first `overlap` frames, the previous
//! segment's a digest of its last ones, and the tail file between them holds
//! those frames. H.264 is lossy (about 16 levels of 255 on the noise the
//! random weights draw), so the written MP4s are compared only to each other,
//! within 8 levels, against the ~60 levels between two generated frames.

mod common;

use common::*;
use kubewan_crds::Plan;
use kubewan_crds::spec::Dtype;
use kubewan_crds::status::{JobPhase, StepPhase};
use kubewan_e2e::pipeline::{check_seams, check_vlm_prompts, check_wan_segment, full_report};
use kubewan_runner::video::frames::{FramesShape, frames_digest, read_frames_safetensors};

#[test]
fn the_example_runs_the_vlm_and_wan_and_writes_a_playable_video() {
    let work = tempfile::tempdir().unwrap();
    let example = repo_root().join("examples/traveljob.yaml");
    let run = run_local(
        &example,
        &work.path().join("ckpts"),
        &examples(),
        &work.path().join("out"),
    );
    assert!(run.output.status.success(), "{}", text(&run.output));
    let status = &run.status;
    let job = kubewan_e2e::example();
    let plan = Plan::validated(&job.spec).unwrap();
    assert!(plan.chain && plan.segments[1].overlap_before == 4);
    assert_eq!(plan.dtype, Dtype::Bf16);
    assert_eq!(status.phase, JobPhase::Succeeded);
    assert_eq!(status.progress.as_deref(), Some("2/2"));
    assert_eq!(status.video_model.as_deref(), Some("tiny/wan2.1-flf2v"));
    assert_eq!(status.output.as_deref(), Some("default/example/travel.mp4"));

    // The VLM wrote every prompt and Wan generated every segment with it.
    let out = work.path().join("out");
    check_vlm_prompts(status, &plan, &out);
    let vlm = full_report(&out, status.prompts.as_ref().unwrap());
    let admitted: Vec<&str> = vlm.admission.iter().map(|a| a.phase.as_str()).collect();
    assert_eq!(admitted, ["vlm_load", "vlm_generate"]);
    for seg in &status.segments {
        check_wan_segment(seg, &plan, &out);
        let report = full_report(&out, &seg.step);
        assert_eq!(
            report.prompts[0].prompt, vlm.prompts[seg.index as usize].prompt,
            "segment {} used the VLM's prompt for it",
            seg.index
        );
    }

    // The seam: segment 1 starts with segment 0's tail, exactly, and that
    // tail is what the tail file handed over.
    check_seams(status, &plan, &out);
    let tail = read_frames_safetensors(
        &run.job_dir.join("segment-0.tail.safetensors"),
        FramesShape {
            count: plan.segments[1].overlap_before,
            width: plan.width,
            height: plan.height,
        },
    )
    .unwrap();
    assert_eq!(tail.len(), 4);
    let handed = full_report(&out, &status.segments[0].step).chain.unwrap();
    assert_eq!(handed.tail_digest, Some(frames_digest(&tail)));
    // ... and in the written videos, as an independent decoder reads them.
    let (w, h) = (plan.width, plan.height);
    let seg0 = ffmpeg_frames(&run.job_dir.join("segment-0.mp4"), w, h);
    let seg1 = ffmpeg_frames(&run.job_dir.join("segment-1.mp4"), w, h);
    assert_eq!((seg0.len(), seg1.len()), (17, 17));
    for k in 0..4 {
        let d = mean_abs_diff(&seg1[k], &seg0[13 + k]);
        assert!(d < 8.0, "overlap frame {k}: {d:.1} levels apart");
    }
    let generated = mean_abs_diff(&seg1[4], &seg0[16]);
    assert!(
        generated > 24.0,
        "the first generated frame is new: {generated:.1}"
    );

    // Plan: 2 segments of 17 frames, overlap 4 -> 30 frames of 160x96.
    let video = run.job_dir.join("travel.mp4");
    let (frames, vw, vh) = kubewan_runner::video::mp4::probe_video(&video).unwrap();
    assert_eq!((frames, vw, vh), (plan.total_frames as usize, w, h));
    assert_eq!(plan.total_frames, 30);
    let (ff_frames, ff_w, ff_h, codec) = ffprobe(&video);
    assert_eq!((ff_frames, ff_w, ff_h), (30, 160, 96));
    assert_eq!(codec, "h264");
    for i in 0..2 {
        assert!(run.job_dir.join(format!("memory-segment-{i}.svg")).exists());
    }
    // The stitch's memory, too: every stage has per-phase figures.
    let stitch = full_report(&out, status.stitch.as_ref().unwrap());
    assert!(
        stitch
            .phases
            .iter()
            .any(|p| p.name == "stitch" && p.peak_rss_bytes > 0)
    );
}

#[test]
fn an_invalid_job_fails_with_every_problem_named() {
    let work = tempfile::tempdir().unwrap();
    let job = work.path().join("bad.yaml");
    std::fs::write(
        &job,
        "apiVersion: kubewan.dev/v1alpha1\nkind: TravelJob\nmetadata: {name: bad}\nspec:\n  keyframes: [../a.png]\n  resolution: wide\n  checkpoints: {hostPath: {path: /c}}\n  inputs: {hostPath: {path: /i}}\n  output: {volume: {hostPath: {path: /o}}}\n",
    )
    .unwrap();
    let out = runner()
        .arg("local")
        .arg(&job)
        .arg("--quiet")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in ["spec.keyframes", "spec.keyframes[0]", "spec.resolution"] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    std::fs::write(&job, "keyframes: [a.png, b.png\n").unwrap();
    let out = runner()
        .arg("local")
        .arg(&job)
        .arg("--quiet")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid YAML"));
}

#[test]
fn a_failing_stage_fails_the_job_with_its_message_and_stops_dependants() {
    let work = tempfile::tempdir().unwrap();
    let inputs = work.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    keyframe(&inputs.join("a.png"), 64, 48, 1);
    keyframe(&inputs.join("b.png"), 64, 48, 2);
    // c.png is missing: segment 1 fails, the stitch never runs.
    let job = work.path().join("job.yaml");
    std::fs::write(
        &job,
        "apiVersion: kubewan.dev/v1alpha1\nkind: TravelJob\nmetadata: {name: broken}\nspec:\n  keyframes: [a.png, b.png, c.png]\n  frames: 9\n  overlap: 2\n  resolution: 64x48\n  model: {name: preview}\n  enhancePrompt: {enabled: false}\n  checkpoints: {hostPath: {path: /c}}\n  inputs: {hostPath: {path: /i}}\n  output: {volume: {hostPath: {path: /o}}}\n",
    )
    .unwrap();
    let out = runner()
        .arg("local")
        .arg(&job)
        .arg("--inputs")
        .arg(&inputs)
        .arg("--out")
        .arg(work.path().join("out"))
        .arg("--quiet")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let status = serde_saphyr::from_str::<Printed>(&stdout).unwrap().status;
    assert_eq!(status.phase, JobPhase::Failed);
    let message = status.message.unwrap();
    assert!(
        message.contains("segment 1 failed") && message.contains("c.png"),
        "{message}"
    );
    assert_eq!(status.segments[1].step.phase, StepPhase::Failed);
    assert_eq!(status.stitch.unwrap().phase, StepPhase::Pending);
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: segment 1 failed"));
}
