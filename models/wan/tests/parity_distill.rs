//! Step-distilled setups against diffusers (`models/wan/scripts/make_tiny.py`, case
//! `tiny-distill` on the `tiny-i2v` pipeline): LoRAs in the diffusers/PEFT layout (with adapter
//! metadata) and in the original Wan / ComfyUI layout (bf16, alpha, diff_b, diff, unused norm
//! diffs) merged while loading, flow-matching Euler, and whole pipeline runs with them (Euler at
//! guidance 1; two LoRAs stacked with UniPC and CFG). Frames within 2e-3 of diffusers.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::*;
use kubewan_wan::euler::FlowEuler;
use kubewan_wan::lora::Lora;
use kubewan_wan::pipeline::{ExpertLoras, WanPipeline};
use kubewan_wan::transformer::WanTransformer;

fn lora(name: &str, scale: f64) -> Lora {
    Lora {
        path: data("tiny-distill").join("lora").join(name),
        scale,
    }
}

fn transformer_dir() -> PathBuf {
    data("tiny-i2v").join("model/transformer")
}

fn merged_case(golden_file: &str, loras: &[Lora]) {
    let want = golden("tiny-distill", golden_file);
    check_merged(
        golden_file,
        &transformer_dir(),
        loras,
        &want,
        "transformer.",
    );
}

#[test]
fn diffusers_layout_lora_merges_like_diffusers() {
    merged_case(
        "merged_diffusers.safetensors",
        &[lora("diffusers.safetensors", 0.8)],
    );
}

#[test]
fn original_layout_lora_merges_like_diffusers() {
    merged_case(
        "merged_original.safetensors",
        &[lora("original.safetensors", 1.0)],
    );
}

#[test]
fn unused_original_tensors_are_reported() {
    let (_, notes) = WanTransformer::load_with_loras(
        &transformer_dir(),
        DType::F32,
        &Device::Cpu,
        &[lora("original.safetensors", 1.0)],
    )
    .unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    for key in [
        "diffusion_model.blocks.0.norm3.diff",
        "diffusion_model.blocks.1.cross_attn.norm_q.diff",
        "diffusion_model.blocks.0.modulation.diff",
    ] {
        assert!(notes[0].contains(key), "{key} missing from {notes:?}");
    }
}

#[test]
fn euler_sigmas_and_timesteps_match_diffusers() {
    let g = golden("tiny-distill", "euler.safetensors");
    let m = meta("tiny-distill");
    for pair in m["euler"]["pairs"].as_array().unwrap() {
        let steps = pair[0].as_u64().unwrap() as usize;
        let shift = pair[1].as_f64().unwrap();
        let mut euler = FlowEuler::new(1000, shift).unwrap();
        euler.set_timesteps(steps).unwrap();
        let key = format!("{steps}_{shift:?}");
        let sigmas: Vec<f32> = g[&format!("sigmas_{key}")].to_vec1().unwrap();
        let timesteps: Vec<f32> = g[&format!("timesteps_{key}")].to_vec1().unwrap();
        assert_eq!(euler.sigmas(), sigmas.as_slice(), "sigmas {key}");
        assert_eq!(euler.timesteps(), timesteps.as_slice(), "timesteps {key}");
    }
}

#[test]
fn euler_step_chain_matches_diffusers() {
    let g = golden("tiny-distill", "euler.safetensors");
    let mut euler = FlowEuler::new(1000, 5.0).unwrap();
    euler.set_timesteps(4).unwrap();
    let mut x = g["chain_sample"].clone();
    for (i, &t) in euler.timesteps().to_vec().iter().enumerate() {
        x = euler
            .step(&g[&format!("chain_model_output_{i}")], t, &x)
            .unwrap();
        check_tol(
            &format!("euler step {i}"),
            &x,
            &g[&format!("chain_out_{i}")],
            1e-6,
        );
    }
    assert!(euler.step(&x, 0.0, &x).is_err(), "no step past the last");
}

fn run_case(name: &str) {
    let m = meta("tiny-distill");
    let run = &m["runs"][name];
    let base = meta("tiny-i2v");
    let loras: Vec<Lora> = run["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| lora(l[0].as_str().unwrap(), l[1].as_f64().unwrap()))
        .collect();
    let pipe = WanPipeline::load(
        &data("tiny-i2v").join("model"),
        DType::F32,
        &Device::Cpu,
        &ExpertLoras {
            high: loras,
            low: vec![],
        },
    )
    .unwrap();
    let first = load_png(&data("tiny-i2v").join("golden/first.png"));
    let req = golden_request(&base, run, first, None, "tiny-i2v");
    let cond = golden_conditioning(&pipe, &base, &req);
    assert_eq!(cond.negative_embeds.is_some(), req.guidance > 1.0);
    let want = golden("tiny-distill", &format!("run_{name}.safetensors"));
    let latents = pipe.denoise(&req, &cond, &mut |_, _| {}).unwrap();
    check(
        &format!("{name} final latents"),
        &latents,
        &want["final_latents"],
    );
    let frames = pipe.decode(&latents, &mut |_, _| {}).unwrap();
    check(&format!("{name} frames"), &frames, &want["frames"]);
}

#[test]
fn distilled_run_euler_guidance_1_matches_diffusers() {
    run_case("euler_guidance1");
}

#[test]
fn stacked_loras_with_unipc_and_cfg_match_diffusers() {
    run_case("stacked_unipc");
}

/// A LoRA naming a module the model lacks, or with a shape that does not fit, is one error
/// naming the LoRA file and the key.
#[test]
fn wrong_keys_and_shapes_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = candle_core::safetensors::load(
        data("tiny-distill").join("lora/diffusers.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let write = |name: &str, tensors: HashMap<String, Tensor>| {
        let path = tmp.path().join(name);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        Lora { path, scale: 1.0 }
    };
    let load = |l: &Lora| {
        WanTransformer::load_with_loras(
            &transformer_dir(),
            DType::F32,
            &Device::Cpu,
            std::slice::from_ref(l),
        )
        .expect_err("the LoRA must be refused")
        .to_string()
    };
    // a block the model does not have
    let mut moved = HashMap::new();
    for (k, v) in &src {
        moved.insert(
            k.replace("blocks.1.attn1.to_q", "blocks.7.attn1.to_q"),
            v.clone(),
        );
    }
    let err = load(&write("wrong_key.safetensors", moved));
    assert!(
        err.contains("wrong_key.safetensors")
            && err.contains("transformer.blocks.7.attn1.to_q.lora_A.weight")
            && err.contains("does not have"),
        "{err}"
    );
    // a lora_B of the wrong width
    let mut bad = src.clone();
    bad.insert(
        "transformer.blocks.0.attn1.to_q.lora_B.weight".into(),
        Tensor::zeros((33, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load(&write("wrong_shape.safetensors", bad));
    assert!(
        err.contains("wrong_shape.safetensors")
            && err.contains("transformer.blocks.0.attn1.to_q.lora_B.weight")
            && err.contains("[33, 4]"),
        "{err}"
    );
    // half a low-rank pair
    let mut half = src.clone();
    half.remove("transformer.blocks.1.ffn.net.2.lora_B.weight");
    let err = load(&write("half.safetensors", half));
    assert!(
        err.contains("half.safetensors")
            && err.contains("transformer.blocks.1.ffn.net.2.lora_A.weight")
            && err.contains("comes without its up"),
        "{err}"
    );
    // a key that is no LoRA tensor at all
    let mut odd = src.clone();
    odd.insert(
        "transformer.blocks.0.attn1.to_q.weight".into(),
        Tensor::zeros((32, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load(&write("odd.safetensors", odd));
    assert!(
        err.contains("odd.safetensors") && err.contains("transformer.blocks.0.attn1.to_q.weight"),
        "{err}"
    );
}
