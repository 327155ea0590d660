//! Parity of the Wan DiT, VAE and the whole pipeline against diffusers' goldens
//! (`models/wan/scripts/make_tiny.py`), max abs error <= 2e-3 in f32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kubewan_wan::transformer::WanTransformer;

const TOL: f32 = 2e-3;

fn data(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(case)
}

fn golden(case: &str, file: &str) -> HashMap<String, Tensor> {
    let p = data(case).join("golden").join(file);
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check(what: &str, got: &Tensor, want: &Tensor) {
    let err = max_abs(got, want);
    let scale = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("{what}: max abs err {err:.3e} (max |ref| {scale:.3})");
    assert!(err <= TOL, "{what}: max abs error {err} > {TOL}");
}

fn dit_case(case: &str) {
    let g = golden(case, "dit.safetensors");
    let model = WanTransformer::load(
        &data(case).join("model/transformer"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let t: Vec<f32> = g["timestep"].to_vec1().unwrap();
    let out = model
        .forward(
            &g["hidden_states"],
            &t,
            &g["encoder_hidden_states"],
            Some(&g["encoder_hidden_states_image"]),
        )
        .unwrap();
    check(&format!("{case} dit forward"), &out, &g["output"]);
}

#[test]
fn dit_forward_flf2v() {
    dit_case("tiny-flf2v");
}

#[test]
fn dit_forward_i2v() {
    dit_case("tiny-i2v");
}

fn vae_case(case: &str) {
    let g = golden(case, "vae.safetensors");
    let vae =
        kubewan_wan::vae::WanVae::load(&data(case).join("model/vae"), DType::F32, &Device::Cpu)
            .unwrap();
    let mean = vae.encode(&g["video"]).unwrap();
    check(
        &format!("{case} vae encode (latent mean)"),
        &mean,
        &g["latent_mean"],
    );
    let dec = vae.decode(&g["z"]).unwrap();
    check(&format!("{case} vae decode"), &dec, &g["decoded"]);
}

#[test]
fn vae_encode_decode_flf2v() {
    vae_case("tiny-flf2v");
}

#[test]
fn vae_encode_decode_i2v() {
    vae_case("tiny-i2v");
}

fn meta(case: &str) -> serde_json::Value {
    let p = data(case).join("golden/meta.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn load_png(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn pipeline_case(case: &str) {
    use kubewan_wan::pipeline::{VideoRequest, WanPipeline};
    let m = meta(case);
    let gold = data(case).join("golden");
    let pipe = WanPipeline::load(&data(case).join("model"), DType::F32, &Device::Cpu).unwrap();
    let latents = golden(case, "latents.safetensors")
        .remove("latents")
        .unwrap();
    let req = VideoRequest {
        first: load_png(&gold.join(m["e2e_first"].as_str().unwrap())),
        last: m["e2e_last"].as_str().map(|l| load_png(&gold.join(l))),
        known_frames: vec![],
        width: m["width"].as_u64().unwrap() as usize,
        height: m["height"].as_u64().unwrap() as usize,
        frames: m["frames"].as_u64().unwrap() as usize,
        steps: m["steps"].as_u64().unwrap() as usize,
        guidance: m["guidance"].as_f64().unwrap(),
        flow_shift: m["flow_shift"].as_f64(),
        seed: 0,
        latents: Some(latents),
    };
    let e2e = golden(case, "e2e.safetensors");
    let cond = pipe
        .encode_conditioning(
            m["prompt"].as_str().unwrap(),
            m["negative_prompt"].as_str(),
            req.guidance,
            &req.first,
            req.last.as_ref(),
        )
        .unwrap();
    check(
        &format!("{case} prompt embeds"),
        &cond.prompt_embeds,
        &e2e["prompt_embeds"],
    );
    check(
        &format!("{case} negative embeds"),
        cond.negative_embeds.as_ref().unwrap(),
        &e2e["negative_prompt_embeds"],
    );
    check(
        &format!("{case} image embeds"),
        cond.image_embeds.as_ref().unwrap(),
        &e2e["image_embeds"],
    );
    let mut steps = 0;
    let fin = pipe.denoise(&req, &cond, &mut |_, _| steps += 1).unwrap();
    assert_eq!(steps, req.steps);
    check(
        &format!("{case} final latents"),
        &fin,
        &e2e["final_latents"],
    );
    let frames = pipe.decode(&fin, &mut |_, _| {}).unwrap();
    let want = golden(case, "frames.safetensors").remove("frames").unwrap();
    check(&format!("{case} frames (end to end)"), &frames, &want);
}

#[test]
fn pipeline_end_to_end_flf2v() {
    pipeline_case("tiny-flf2v");
}

#[test]
fn pipeline_end_to_end_i2v() {
    pipeline_case("tiny-i2v");
}
