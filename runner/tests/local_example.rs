//! `kubewan-runner local examples/traveljob.yaml`: a playable MP4 (frame count
//! and size read back by the runner's own reader AND by ffprobe) and a status
//! with per-phase memory figures.

mod common;

use std::process::Command;

use common::*;
use kubewan_crds::TravelJobStatus;
use kubewan_crds::status::{JobPhase, StepPhase};

#[derive(serde::Deserialize)]
struct Printed {
    status: TravelJobStatus,
}

fn ffprobe(path: &std::path::Path) -> (u64, u64, u64, String) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "ffprobe is needed to check the video independently ({e}); install it with `apt-get install -y ffmpeg`"
            )
        });
    assert!(
        out.status.success(),
        "ffprobe rejects {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["streams"][0];
    let num = |k: &str| {
        s[k].as_u64()
            .or_else(|| s[k].as_str().and_then(|t| t.parse().ok()))
            .unwrap_or_else(|| panic!("ffprobe gave no {k}: {v}"))
    };
    (
        num("nb_read_frames"),
        num("width"),
        num("height"),
        s["codec_name"].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn the_example_job_runs_locally_and_writes_a_playable_video() {
    let work = tempfile::tempdir().unwrap();
    let out_dir = work.path().join("out");
    let example = repo_root().join("examples/traveljob.yaml");
    let out = runner()
        .arg("local")
        .arg(&example)
        .arg("--ckpts")
        .arg(work.path().join("ckpts"))
        .arg("--out")
        .arg(&out_dir)
        .arg("--tiny-ckpts")
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let status = serde_saphyr::from_str::<Printed>(&stdout)
        .unwrap_or_else(|e| panic!("the printed status does not parse: {e}\n{stdout}"))
        .status;
    assert_eq!(status.phase, JobPhase::Succeeded, "{stdout}");
    assert_eq!(status.progress.as_deref(), Some("2/2"));
    assert_eq!(status.video_model.as_deref(), Some("preview (preview)"));
    let output = status.output.clone().expect("a final video");
    assert_eq!(output, "default/example/travel.mp4");

    // Per-phase memory figures in every step's report.
    let memory = status.memory.clone().expect("a memory summary");
    assert!(memory.peak_ram_bytes > 0 && !memory.peak_ram.is_empty());
    for seg in &status.segments {
        assert_eq!(seg.step.phase, StepPhase::Succeeded);
        let report = seg.step.report.as_ref().unwrap();
        assert!(report.preview);
        let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
        assert!(
            names.contains(&"video_load") && names.contains(&"encode"),
            "{names:?}"
        );
        for p in &report.phases {
            assert!(
                p.peak_rss_bytes >= p.start.rss_bytes.min(p.end.rss_bytes) && p.peak_rss_bytes > 0
            );
            assert!(p.start.available_bytes.is_some());
        }
    }
    let stitch = status.stitch.as_ref().unwrap().report.as_ref().unwrap();
    assert!(
        stitch
            .phases
            .iter()
            .any(|p| p.name == "stitch" && p.peak_rss_bytes > 0)
    );
    // The tiny VLM wrote the prompts (any pair that fell back says why), and
    // its release was measured.
    let prompts = status.prompts.as_ref().unwrap();
    assert_eq!(prompts.phase, StepPhase::Succeeded);
    assert!(
        status.prompt_fallbacks.iter().all(|p| p.reason.is_some()),
        "{stdout}"
    );
    let vlm = prompts.report.as_ref().unwrap();
    let names: Vec<&str> = vlm.phases.iter().map(|p| p.name.as_str()).collect();
    for phase in ["vlm_load", "vlm_generate", "vlm_release"] {
        assert!(names.contains(&phase), "{names:?}");
    }
    assert!(vlm.release.is_some(), "{stdout}");
    assert!(memory.vlm_ram_freed.is_some(), "{stdout}");

    // Plan: 2 segments of 33 frames, overlap 8 → 58 frames of 320x192.
    let video = out_dir.join(&output);
    let (frames, w, h) = kubewan_runner::video::mp4::probe_video(&video).unwrap();
    assert_eq!((frames, w, h), (58, 320, 192));
    let (ff_frames, ff_w, ff_h, codec) = ffprobe(&video);
    assert_eq!((ff_frames, ff_w, ff_h), (58, 320, 192));
    assert_eq!(codec, "h264");
    for i in 0..2 {
        let seg = out_dir.join(format!("default/example/segment-{i}.mp4"));
        assert_eq!(ffprobe(&seg).0, 33);
        assert!(
            out_dir
                .join(format!("default/example/memory-segment-{i}.svg"))
                .exists()
        );
    }
    assert!(out_dir.join("default/example/prompts.json").exists());
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a TravelJob"));
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
