//! `run-task` (the pod entry point) with the preview model, and every kind of
//! bad input: one clear error, a failed report, a non-zero exit, no partial
//! video presented as finished.

mod common;

use common::*;
use kubewan_crds::StepId;
use std::time::{Duration, Instant};

fn two_keyframes(v: &Volumes) {
    keyframe(&v.inputs().join("a.png"), 96, 64, 10);
    keyframe(&v.inputs().join("b.png"), 96, 64, 200);
}

const PREVIEW: &str = "keyframes: [a.png, b.png]\nframes: 9\noverlap: 0\nresolution: 64x48\nmodel: {name: preview}\nenhancePrompt: {enabled: false}";

#[test]
fn preview_segment_writes_a_video_reports_and_a_timeline() {
    let v = Volumes::new();
    two_keyframes(&v);
    let plan = plan(PREVIEW);
    let task = task(&plan, StepId::Segment(0));
    let out = v.run_task(&serde_json::to_string(&task).unwrap());
    assert!(out.status.success(), "{}", text(&out));
    let report = v.termination_report();
    assert!(report.ok && report.preview, "{report:?}");
    assert_eq!(report.model, "preview");
    assert_eq!(report.output.as_deref(), Some("segment-0.mp4"));
    assert_eq!(report.frames, Some(9));
    let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["video_load", "preview_generate", "encode"]);
    assert!(
        report
            .phases
            .iter()
            .all(|p| p.peak_rss_bytes > 0 && p.seconds >= 0.0)
    );
    assert!(report.peak_rss_bytes > 0);
    // The last stdout line is the report too (FallbackToLogsOnError).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: kubewan_crds::RunReport =
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last.frames, Some(9));
    let (frames, w, h) =
        kubewan_runner::video::mp4::probe_video(&v.job_dir().join("segment-0.mp4")).unwrap();
    assert_eq!((frames, w, h), (9, 64, 48));
    let full: kubewan_crds::RunReport = serde_json::from_str(
        &std::fs::read_to_string(v.job_dir().join("report-segment-0.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(full.phases.len(), 3);
    let svg = std::fs::read_to_string(v.job_dir().join("memory-segment-0.svg")).unwrap();
    assert!(svg.contains("preview_generate") && svg.contains("process RSS"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("segment-0: ok") && stderr.contains("(preview)"),
        "{stderr}"
    );
}

/// A pod that requested a GPU computes on it or fails: this CPU build refuses
/// at once, before any checkpoint is read, with a message that says why; the
/// same task without the GPU gets as far as the (missing) checkpoint, and a
/// preview segment, which runs no model, still runs on a GPU pod.
#[test]
#[cfg(not(feature = "cuda"))]
fn a_gpu_task_on_a_cpu_only_runner_fails_at_once() {
    let v = Volumes::new();
    two_keyframes(&v);
    let wan = plan(
        "keyframes: [a.png, b.png]\nframes: 9\noverlap: 0\nresolution: 64x48\nmodel: {name: wan/absent}\nenhancePrompt: {enabled: true, model: vlm/absent}",
    );
    for step in [StepId::Prompts, StepId::Segment(0)] {
        let mut gpu_task = task(&wan, step);
        gpu_task.gpu = true;
        let out = v.run_task(&serde_json::to_string(&gpu_task).unwrap());
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let report = v.termination_report();
        let msg = report.message.clone().unwrap();
        assert!(!report.ok, "{report:?}");
        assert!(
            msg.contains("cannot run the models on cuda:0") && msg.contains("built without CUDA"),
            "{msg}"
        );
        assert!(
            !msg.contains("absent"),
            "refused before the checkpoint: {msg}"
        );
        assert!(
            report.phases.is_empty() && report.device.is_none(),
            "{report:?}"
        );
        assert!(no_videos(&v.output()));

        let cpu_task = task(&wan, step);
        v.run_task(&serde_json::to_string(&cpu_task).unwrap());
        let report = v.termination_report();
        assert_eq!(report.device.as_deref(), Some("cpu"), "{report:?}");
        if step == StepId::Segment(0) {
            assert!(report.message.unwrap().contains("wan/absent"));
        }
    }
    let mut preview = task(&plan(PREVIEW), StepId::Segment(0));
    preview.gpu = true;
    let out = v.run_task(&serde_json::to_string(&preview).unwrap());
    assert!(out.status.success(), "{}", text(&out));
    assert!(v.termination_report().device.is_none());
}

#[test]
fn an_unparsable_task_fails_with_a_report() {
    let v = Volumes::new();
    let out = v.run_task("{\"job\": 3");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = v.termination_report();
    assert!(!report.ok);
    assert!(
        report
            .message
            .as_deref()
            .unwrap()
            .contains("does not parse"),
        "{report:?}"
    );
    let out = v.run_task("");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        v.termination_report()
            .message
            .unwrap()
            .contains("KUBEWAN_TASK")
    );
}

#[test]
fn a_missing_keyframe_is_named() {
    let v = Volumes::new();
    keyframe(&v.inputs().join("a.png"), 96, 64, 10);
    let plan = plan(PREVIEW);
    let out = v.run_task(&serde_json::to_string(&task(&plan, StepId::Segment(0))).unwrap());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = v.termination_report().message.unwrap();
    assert!(
        msg.contains("b.png") && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(no_videos(&v.output()));
}

#[test]
fn a_corrupt_keyframe_is_a_clear_error_and_leaves_no_video() {
    let v = Volumes::new();
    keyframe(&v.inputs().join("a.png"), 96, 64, 10);
    std::fs::write(
        v.inputs().join("b.png"),
        b"\x89PNG\r\n\x1a\nthis is not a picture",
    )
    .unwrap();
    let plan = plan(PREVIEW);
    let out = v.run_task(&serde_json::to_string(&task(&plan, StepId::Segment(0))).unwrap());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = v.termination_report().message.unwrap();
    assert!(msg.contains("b.png") && msg.contains("corrupt"), "{msg}");
    assert!(no_videos(&v.output()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_keyframe_escaping_the_inputs_is_refused() {
    let v = Volumes::new();
    two_keyframes(&v);
    std::os::unix::fs::symlink("/etc/hostname", v.inputs().join("b.png")).ok();
    std::fs::remove_file(v.inputs().join("b.png")).ok();
    std::os::unix::fs::symlink("/etc/hostname", v.inputs().join("b.png")).unwrap();
    let out =
        v.run_task(&serde_json::to_string(&task(&plan(PREVIEW), StepId::Segment(0))).unwrap());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = v.termination_report().message.unwrap();
    assert!(msg.contains("outside the inputs folder"), "{msg}");
}

#[test]
fn an_unwritable_output_folder_fails_before_any_work() {
    let v = Volumes::new();
    two_keyframes(&v);
    // A regular file where the output volume should be: nothing can be created in it
    // (this holds even for root, unlike permission bits).
    let blocked = v.dir.path().join("not-a-folder");
    std::fs::write(&blocked, b"x").unwrap();
    let plan = plan(PREVIEW);
    let out = v.run_task_with_output(
        &serde_json::to_string(&task(&plan, StepId::Segment(0))).unwrap(),
        &blocked,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = v.termination_report().message.unwrap();
    assert!(
        msg.contains("output folder") && msg.contains("cannot be created"),
        "{msg}"
    );
}

#[test]
fn a_video_model_folder_of_the_wrong_kind_is_refused() {
    let v = Volumes::new();
    two_keyframes(&v);
    let vlm = v.ckpts().join("Qwen2.5-VL-7B-Instruct");
    std::fs::create_dir_all(&vlm).unwrap();
    std::fs::write(vlm.join("config.json"), r#"{"model_type": "qwen2_5_vl"}"#).unwrap();
    let plan = plan(
        "keyframes: [a.png, b.png]\nframes: 9\noverlap: 0\nresolution: 64x48\nmodel: {name: Qwen2.5-VL-7B-Instruct}\nenhancePrompt: {enabled: false}",
    );
    let out = v.run_task(&serde_json::to_string(&task(&plan, StepId::Segment(0))).unwrap());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = v.termination_report().message.unwrap();
    assert!(
        msg.contains("is a qwen2_5_vl")
            && msg.contains("wan (diffusers layout) checkpoint is needed"),
        "{msg}"
    );
}

#[test]
fn a_chained_segment_without_its_predecessor_tail_says_so() {
    let v = Volumes::new();
    keyframe(&v.inputs().join("a.png"), 96, 64, 10);
    keyframe(&v.inputs().join("b.png"), 96, 64, 100);
    keyframe(&v.inputs().join("c.png"), 96, 64, 200);
    let plan = plan(
        "keyframes: [a.png, b.png, c.png]\nframes: 9\noverlap: 4\nresolution: 64x48\nmodel: {name: preview}\nenhancePrompt: {enabled: false}",
    );
    let out = v.run_task(&serde_json::to_string(&task(&plan, StepId::Segment(1))).unwrap());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = v.termination_report().message.unwrap();
    assert!(msg.contains("segment-0.tail.safetensors"), "{msg}");
    // In order it works, and segment 1 starts from segment 0's last frames.
    for i in 0..2 {
        let out = v.run_task(&serde_json::to_string(&task(&plan, StepId::Segment(i))).unwrap());
        assert!(out.status.success(), "{}", text(&out));
    }
    let tail = kubewan_runner::video::frames::read_frames_safetensors(
        &v.job_dir().join("segment-0.tail.safetensors"),
        kubewan_runner::video::frames::FramesShape {
            count: 4,
            width: 64,
            height: 48,
        },
    )
    .unwrap();
    assert_eq!(tail.len(), 4);
    let mut r = kubewan_runner::video::Mp4Reader::open(&v.job_dir().join("segment-1.mp4")).unwrap();
    let first = r.next_frame().unwrap().unwrap();
    let diff = first
        .rgb
        .iter()
        .zip(&tail[0].rgb)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / first.rgb.len() as f64;
    assert!(
        diff < 6.0,
        "segment 1 does not start from segment 0's tail (mean diff {diff})"
    );
    // A truncated tail file is caught.
    let tail_path = v.job_dir().join("segment-0.tail.safetensors");
    let bytes = std::fs::read(&tail_path).unwrap();
    std::fs::write(&tail_path, &bytes[..bytes.len() / 2]).unwrap();
    let out = v.run_task(&serde_json::to_string(&task(&plan, StepId::Segment(1))).unwrap());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = v.termination_report().message.unwrap();
    assert!(msg.contains("not a readable safetensors"), "{msg}");
}

#[test]
fn prompts_written_for_another_plan_are_not_reused() {
    use kubewan_runner::stages::{PROMPTS_PLAN_FILE, plan_fingerprint};
    let v = Volumes::new();
    two_keyframes(&v);
    let write_prompts = |marker: &str, text: &str| {
        let file = kubewan_runner::stages::prompts::PromptsFile {
            prompts: vec![kubewan_crds::report::PromptOutcome {
                segment: 0,
                prompt: text.into(),
                ..Default::default()
            }],
        };
        std::fs::create_dir_all(v.job_dir()).unwrap();
        std::fs::write(
            v.job_dir().join("prompts.json"),
            serde_json::to_string(&file).unwrap(),
        )
        .unwrap();
        std::fs::write(v.job_dir().join(PROMPTS_PLAN_FILE), marker).unwrap();
    };
    // prompts.json from an earlier version of the job (other keyframes).
    let old = plan(
        "keyframes: [a.png, z.png]\nframes: 9\noverlap: 0\nresolution: 64x48\nmodel: {name: preview}",
    );
    write_prompts(&plan_fingerprint(&old), "a stale prompt");
    let current = plan(
        "keyframes: [a.png, b.png]\nframes: 9\noverlap: 0\nresolution: 64x48\nmodel: {name: preview}\nprompt: the real prompt",
    );
    let seg0 = serde_json::to_string(&task(&current, StepId::Segment(0))).unwrap();
    let out = v.run_task(&seg0);
    assert!(out.status.success(), "{}", text(&out));
    let report = v.termination_report();
    assert_eq!(report.prompts[0].prompt, "the real prompt");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("not written for this version")),
        "{report:?}"
    );
    // Written for this plan, it is used.
    write_prompts(&plan_fingerprint(&current), "written by the VLM");
    let out = v.run_task(&seg0);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        v.termination_report().prompts[0].prompt,
        "written by the VLM"
    );
    // With the VLM off, prompts.json is never read.
    let no_vlm = plan(
        "keyframes: [a.png, b.png]\nframes: 9\noverlap: 0\nresolution: 64x48\nmodel: {name: preview}\nprompt: own prompt\nenhancePrompt: {enabled: false}",
    );
    let out = v.run_task(&serde_json::to_string(&task(&no_vlm, StepId::Segment(0))).unwrap());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(v.termination_report().prompts[0].prompt, "own prompt");
}

/// In a container the runner is PID 1, which gets no signal it does not
/// handle: a deleted pod must stop at once, not hold its GPU through the
/// grace period, and leave no temporary file behind.
#[test]
fn sigterm_stops_a_segment_at_once_and_leaves_no_partial_video() {
    let v = Volumes::new();
    two_keyframes(&v);
    let plan = plan(
        "keyframes: [a.png, b.png]\nframes: 241\noverlap: 0\nresolution: 1280x720\nmodel: {name: preview}\nenhancePrompt: {enabled: false}",
    );
    let task = task(&plan, StepId::Segment(0));
    let mut child = v
        .run_task_command(&serde_json::to_string(&task).unwrap(), &v.output())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let partial = v.job_dir().join(".segment-0.mp4.partial");
    let started = Instant::now();
    while !partial.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the segment ended before it was stopped"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no video started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "still running 20 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    assert!(!partial.exists(), "the temporary video stayed behind");
    assert!(!v.job_dir().join("segment-0.mp4").exists());
    let report = v.termination_report();
    assert!(!report.ok, "{report:?}");
    assert!(
        report
            .message
            .unwrap()
            .contains("stopped before writing its report"),
    );
}
