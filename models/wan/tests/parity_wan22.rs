//! Wan2.2 I2V-A14B against diffusers (`models/wan/scripts/make_tiny.py`, case `tiny-wan22`): a
//! `WanImageToVideoPipeline` folder with `transformer` (high noise), `transformer_2` (low noise)
//! and `boundary_ratio`, no image encoder; first-last-frame runs end to end with a guidance per
//! expert (UniPC), and at guidance 1 with Euler and a LoRA merged into the low-noise expert only.
//! Both with the experts resident together and loaded one at a time. Frames within 2e-3.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use kubewan_wan::checkpoint::{self, Expert};
use kubewan_wan::lora::Lora;
use kubewan_wan::pipeline::{ExpertLoras, VideoRequest, WanPipeline};

const CASE: &str = "tiny-wan22";

fn model_dir() -> std::path::PathBuf {
    data(CASE).join("model")
}

fn loras(run: &serde_json::Value) -> ExpertLoras {
    ExpertLoras {
        high: vec![],
        low: run["loras_2"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| Lora {
                path: data(CASE).join("lora").join(l[0].as_str().unwrap()),
                scale: l[1].as_f64().unwrap(),
            })
            .collect(),
    }
}

fn request(run: &serde_json::Value) -> VideoRequest {
    let gold = data(CASE).join("golden");
    let first = load_png(&gold.join("first.png"));
    let last = load_png(&gold.join("last.png"));
    golden_request(&meta(CASE), run, first, Some(last), CASE)
}

/// The experts diffusers called, one per step (the unconditional call of a CFG step follows
/// the conditional one with the same expert).
fn experts_called(run: &serde_json::Value, req: &VideoRequest) -> Vec<Expert> {
    let calls: Vec<Expert> = run["transformer_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| match c.as_str().unwrap() {
            "transformer" => Expert::High,
            _ => Expert::Low,
        })
        .collect();
    let mut steps = Vec::new();
    let mut i = 0;
    while i < calls.len() {
        steps.push(calls[i]);
        i += if req.guidance_of(calls[i]) > 1.0 {
            2
        } else {
            1
        };
    }
    steps
}

/// Runs `name` with both experts resident and with one expert at a time; both must match the
/// golden frames, and the steps each expert ran must be diffusers'.
fn run_case(name: &str) {
    let m = meta(CASE);
    let run = &m["runs"][name];
    let req = request(run);
    let want = golden(CASE, &format!("run_{name}.safetensors"));
    let loras = loras(run);

    let pipe = WanPipeline::load(&model_dir(), DType::F32, &Device::Cpu, &loras).unwrap();
    assert_eq!(pipe.experts(), [Expert::High, Expert::Low]);
    let cond = golden_conditioning(&pipe, &m, &req);
    assert!(cond.image_embeds.is_none(), "Wan2.2 has no CLIP branch");
    let mut order = Vec::new();
    let mut run_state = pipe.start_denoising(&req).unwrap();
    let expected = experts_called(run, &req);
    let per_expert: Vec<(Expert, usize)> = pipe
        .experts()
        .into_iter()
        .map(|e| (e, expected.iter().filter(|&&x| x == e).count()))
        .collect();
    assert_eq!(pipe.steps_per_expert(&req).unwrap(), per_expert);
    for expert in pipe.experts() {
        assert_eq!(
            run_state.steps_of(expert),
            expected.iter().filter(|&&e| e == expert).count(),
            "{name}: steps of the {} expert",
            expert.name()
        );
        pipe.denoise_expert(&mut run_state, expert, &req, &cond, &mut |done, _| {
            order.push((done, expert))
        })
        .unwrap();
    }
    assert_eq!(
        order.iter().map(|(_, e)| *e).collect::<Vec<_>>(),
        expected,
        "{name}: the expert of each step"
    );
    let latents = run_state.finish().unwrap();
    check(
        &format!("{name} final latents (resident)"),
        &latents,
        &want["final_latents"],
    );
    let frames = pipe.decode(&latents, &mut |_, _| {}).unwrap();
    check(
        &format!("{name} frames (resident)"),
        &frames,
        &want["frames"],
    );

    // One expert at a time: load, run, drop; the same result.
    let mut pipe = WanPipeline::load_base(&model_dir(), DType::F32, &Device::Cpu, &loras).unwrap();
    let mut run_state = pipe.start_denoising(&req).unwrap();
    for expert in pipe.experts() {
        pipe.load_expert(expert).unwrap();
        pipe.denoise_expert(&mut run_state, expert, &req, &cond, &mut |_, _| {})
            .unwrap();
        pipe.drop_expert(expert);
        assert!(pipe.expert(expert).is_err());
    }
    let one_at_a_time = run_state.finish().unwrap();
    assert_eq!(
        max_abs(&one_at_a_time, &latents),
        0.0,
        "{name}: same latents"
    );
}

#[test]
fn two_experts_with_their_own_guidance_match_diffusers() {
    run_case("unipc_cfg");
}

#[test]
fn euler_at_guidance_1_with_a_lora_on_the_low_noise_expert_matches_diffusers() {
    run_case("euler_lora_low");
}

/// The low-noise LoRA merged into `transformer_2` gives diffusers' fused weights
/// (`load_into_transformer_2`), and diffusers changed nothing in `transformer`.
#[test]
fn the_low_noise_lora_merges_into_transformer_2_like_diffusers() {
    let want = golden(CASE, "merged_low.safetensors");
    assert!(
        want.keys().all(|k| k.starts_with("transformer_2.")),
        "{:?}",
        want.keys()
    );
    let m = meta(CASE);
    let loras = loras(&m["runs"]["euler_lora_low"]);
    check_merged(
        "merged_low",
        &model_dir().join("transformer_2"),
        &loras.low,
        &want,
        "transformer_2.",
    );
}

/// The catalogue lists `transformer_2`, whose weights a runner sizes before loading them.
#[test]
fn the_catalogue_and_the_sizes_know_both_experts() {
    let inventory = checkpoint::require(&model_dir()).unwrap();
    assert!(
        inventory
            .weights
            .contains(&model_dir().join("transformer_2/diffusion_pytorch_model.safetensors"))
    );
    assert!(
        !inventory
            .files
            .iter()
            .any(|f| f.starts_with(model_dir().join("image_encoder")))
    );
    assert_eq!(
        (
            Expert::High.weights().component,
            Expert::Low.weights().component
        ),
        ("transformer", "transformer_2")
    );
}

/// Steps out of order, a missing expert and LoRAs for an expert the model lacks are refused.
#[test]
fn misuse_is_refused_with_a_reason() {
    let m = meta(CASE);
    let req = request(&m["runs"]["unipc_cfg"]);
    let mut pipe = WanPipeline::load_base(
        &model_dir(),
        DType::F32,
        &Device::Cpu,
        &ExpertLoras::default(),
    )
    .unwrap();
    let mut run = pipe.start_denoising(&req).unwrap();
    let cond = kubewan_wan::pipeline::Conditioning {
        prompt_embeds: Tensor::zeros((1, 512, 32), DType::F32, &Device::Cpu).unwrap(),
        negative_embeds: None,
        image_embeds: None,
    };
    pipe.load_expert(Expert::Low).unwrap();
    let err = pipe
        .denoise_expert(&mut run, Expert::Low, &req, &cond, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("start at step 3"), "{err}");
    let err = pipe
        .denoise_expert(&mut run, Expert::High, &req, &cond, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("high expert (transformer) is not loaded"),
        "{err}"
    );
    let err = run.finish().unwrap_err().to_string();
    assert!(err.contains("after 0 of 4 steps"), "{err}");

    let wan21 = data("tiny-i2v").join("model");
    let loras = ExpertLoras {
        high: vec![],
        low: vec![Lora {
            path: data(CASE).join("lora/low_noise.safetensors"),
            scale: 1.0,
        }],
    };
    let err = WanPipeline::load_base(&wan21, DType::F32, &Device::Cpu, &loras)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("one-transformer (Wan2.1) model"), "{err}");
}

/// With every timestep above the boundary (one step starts at 999), the low-noise expert has
/// nothing to do, so a runner need not load it.
#[test]
fn an_expert_without_steps_is_left_out() {
    let m = meta(CASE);
    let mut req = request(&m["runs"]["unipc_cfg"]);
    let pipe = WanPipeline::load_base(
        &model_dir(),
        DType::F32,
        &Device::Cpu,
        &ExpertLoras::default(),
    )
    .unwrap();
    req.steps = 1;
    assert_eq!(pipe.steps_per_expert(&req).unwrap(), [(Expert::High, 1)]);
    req.steps = 4;
    assert_eq!(
        pipe.steps_per_expert(&req).unwrap(),
        [(Expert::High, 2), (Expert::Low, 2)]
    );
}
