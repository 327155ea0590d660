//! `run-task` segments on real tiny Wan checkpoints (the committed parity folders of
//! `models/wan/tests/data`): Wan2.2's two experts with a LoRA on the low-noise one and Euler at
//! guidance 1, Wan2.1 with a LoRA and UniPC; the report's phases, generation and warnings; LoRA
//! files that are missing or do not fit the model fail the segment with their name.

mod common;

use std::path::Path;

use common::*;
use kubewan_crds::StepId;
use kubewan_crds::spec::Scheduler;

fn wan_data(rel: &str) -> std::path::PathBuf {
    repo_root().join("models/wan/tests/data").join(rel)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Volumes with two keyframes, the Wan folder `model` as `video` and the LoRA `lora` as
/// `loras/l.safetensors` under the checkpoints.
fn volumes(model: &str, lora: &Path) -> Volumes {
    let v = Volumes::new();
    keyframe(&v.inputs().join("a.png"), 96, 64, 10);
    keyframe(&v.inputs().join("b.png"), 96, 64, 200);
    copy_dir(&wan_data(model), &v.ckpts().join("video"));
    std::fs::create_dir_all(v.ckpts().join("loras")).unwrap();
    std::fs::copy(lora, v.ckpts().join("loras/l.safetensors")).unwrap();
    v
}

fn segment(v: &Volumes, model_yaml: &str, sampling_yaml: &str) -> kubewan_crds::RunReport {
    let plan = plan(&format!(
        "keyframes: [a.png, b.png]\nframes: 5\noverlap: 0\nresolution: 48x32\nenhancePrompt: {{enabled: false}}\nprompt: a fox\nnegativePrompt: blurry\n{sampling_yaml}\nmodel: {{name: video, dtype: f32, {model_yaml}}}"
    ));
    let out = v.run_task(&serde_json::to_string(&task(&plan, StepId::Segment(0))).unwrap());
    let report = v.termination_report();
    assert_eq!(out.status.success(), report.ok, "{}", text(&out));
    report
}

fn phase_names(report: &kubewan_crds::RunReport) -> Vec<&str> {
    report.phases.iter().map(|p| p.name.as_str()).collect()
}

#[test]
fn wan22_experts_with_a_low_noise_lora_at_guidance_1() {
    let v = volumes(
        "tiny-wan22/model",
        &wan_data("tiny-wan22/lora/low_noise.safetensors"),
    );
    let report = segment(
        &v,
        "scheduler: euler, loras: [{path: loras/l.safetensors, expert: low}]",
        "steps: 4\nguidanceScale: 1\nflowShift: 5",
    );
    assert!(report.ok, "{report:?}");
    assert_eq!(
        phase_names(&report),
        [
            "text_encode",
            "video_load",
            "expert_high_load",
            "expert_low_load",
            "expert_high_denoise",
            "expert_low_denoise",
            "vae_decode",
            "encode"
        ]
    );
    let generation = report.generation.as_ref().unwrap();
    assert_eq!(
        (generation.scheduler, generation.steps, generation.shift),
        (Scheduler::Euler, 4, 5.0)
    );
    let experts: Vec<(&str, u32, f64)> = generation
        .experts
        .iter()
        .map(|e| (e.expert.as_str(), e.steps, e.guidance))
        .collect();
    assert_eq!(experts, [("high", 2, 1.0), ("low", 2, 1.0)]);
    assert_eq!(generation.residency.as_deref(), Some("both"));
    assert_eq!(generation.loras, ["loras/l.safetensors@1 (low)"]);
    assert!(
        report.warnings.iter().any(|w| w.contains("left unused")),
        "{:?}",
        report.warnings
    );
    let (frames, w, h) =
        kubewan_runner::video::mp4::probe_video(&v.job_dir().join("segment-0.mp4")).unwrap();
    assert_eq!((frames, w, h), (5, 48, 32));
}

#[test]
fn wan21_with_a_lora_and_cfg_keeps_its_phases() {
    // the FLF2V folder (a segment always pins its end keyframe); the tiny-distill LoRAs fit it
    let v = volumes(
        "tiny-flf2v/model",
        &wan_data("tiny-distill/lora/diffusers.safetensors"),
    );
    let report = segment(
        &v,
        "loras: [{path: loras/l.safetensors, scale: 0.5}]",
        "steps: 3\nguidanceScale: 3.5",
    );
    assert!(report.ok, "{report:?}");
    assert_eq!(
        phase_names(&report),
        [
            "text_encode",
            "video_load",
            "denoise",
            "vae_decode",
            "encode"
        ]
    );
    let generation = report.generation.as_ref().unwrap();
    // the model's own shift (tiny-flf2v's scheduler config: 16)
    assert_eq!(
        (generation.scheduler, generation.shift),
        (Scheduler::Unipc, 16.0)
    );
    assert_eq!(generation.experts.len(), 1);
    assert_eq!(
        (generation.experts[0].steps, generation.experts[0].guidance),
        (3, 3.5)
    );
    // the tiny model's two sequences fit: guidance ran as one batch of 2
    assert!(generation.experts[0].guidance_batched, "{generation:?}");
    assert_eq!(generation.residency, None);
    assert_eq!(report.device.as_deref(), Some("cpu"));
}

#[test]
fn lora_problems_fail_the_segment_naming_the_file_and_key() {
    // a LoRA made for the Wan2.1 image branch names modules Wan2.2 lacks
    let v = volumes(
        "tiny-wan22/model",
        &wan_data("tiny-distill/lora/original.safetensors"),
    );
    let report = segment(&v, "loras: [{path: loras/l.safetensors}]", "steps: 2");
    let msg = report.message.unwrap();
    assert!(
        msg.contains("l.safetensors")
            && msg.contains("diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight")
            && msg.contains("does not have"),
        "{msg}"
    );
    assert!(no_videos(&v.output()));
    // a low-noise LoRA for a one-transformer model
    let v = volumes(
        "tiny-i2v/model",
        &wan_data("tiny-wan22/lora/low_noise.safetensors"),
    );
    let report = segment(
        &v,
        "loras: [{path: loras/l.safetensors, expert: low}]",
        "steps: 2",
    );
    let msg = report.message.unwrap();
    assert!(msg.contains("one-transformer (Wan2.1) model"), "{msg}");
    // a missing file
    let report = segment(&v, "loras: [{path: loras/missing.safetensors}]", "steps: 2");
    let msg = report.message.unwrap();
    assert!(
        msg.contains("spec.model.loras[0]")
            && msg.contains("loras/missing.safetensors")
            && msg.contains("not found"),
        "{msg}"
    );
}
