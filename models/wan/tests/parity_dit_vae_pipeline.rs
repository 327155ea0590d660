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

fn small_request(
    first: image::RgbImage,
    last: Option<image::RgbImage>,
    known: Vec<image::RgbImage>,
) -> kubewan_wan::pipeline::VideoRequest {
    kubewan_wan::pipeline::VideoRequest {
        first,
        last,
        known_frames: known,
        width: 48,
        height: 32,
        frames: 9,
        steps: 2,
        guidance: 3.0,
        flow_shift: Some(5.0),
        seed: 3,
        latents: None,
    }
}

fn solid(v: u8) -> image::RgbImage {
    image::RgbImage::from_pixel(48, 32, image::Rgb([v, 255 - v, v / 2]))
}

/// Chained mode pins extra frames through the mask: latent frame 0 covers pixel frame 0 (4×),
/// latent frame j covers pixel frames 4j-3..=4j.
#[test]
fn known_frames_set_the_mask() {
    use kubewan_wan::pipeline::WanPipeline;
    let pipe =
        WanPipeline::load_denoiser(&data("tiny-flf2v").join("model"), DType::F32, &Device::Cpu)
            .unwrap();
    let mask_of = |req: &kubewan_wan::pipeline::VideoRequest| -> Vec<Vec<f32>> {
        let c = pipe.condition(req).unwrap(); // [1, 4+16, 3, 4, 6]
        assert_eq!(c.dims(), &[1, 20, 3, 4, 6]);
        let m = c.narrow(1, 0, 4).unwrap().squeeze(0).unwrap(); // [4, T', h, w]
        // every pixel of a (channel, latent frame) plane is equal
        let plane_max = m.max_keepdim(3).unwrap().max_keepdim(2).unwrap();
        let plane_min = m.min_keepdim(3).unwrap().min_keepdim(2).unwrap();
        assert_eq!(max_abs(&plane_max, &plane_min), 0.0);
        plane_max
            .squeeze(3)
            .unwrap()
            .squeeze(2)
            .unwrap()
            .t()
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    // FLF2V: first and last
    let m = mask_of(&small_request(solid(10), Some(solid(200)), vec![]));
    assert_eq!(
        m,
        vec![vec![1.0; 4], vec![0.0; 4], vec![0.0, 0.0, 0.0, 1.0]]
    );
    // chained: first + 2 known frames (pixel frames 1, 2) + last
    let m = mask_of(&small_request(
        solid(10),
        Some(solid(200)),
        vec![solid(50), solid(90)],
    ));
    assert_eq!(
        m,
        vec![
            vec![1.0; 4],
            vec![1.0, 1.0, 0.0, 0.0],
            vec![0.0, 0.0, 0.0, 1.0]
        ]
    );
    // I2V: first only
    let m = mask_of(&small_request(solid(10), None, vec![]));
    assert_eq!(m, vec![vec![1.0; 4], vec![0.0; 4], vec![0.0; 4]]);
    // the known frames change the condition latents, not only the mask
    let a = pipe
        .condition(&small_request(solid(10), Some(solid(200)), vec![]))
        .unwrap();
    let b = pipe
        .condition(&small_request(
            solid(10),
            Some(solid(200)),
            vec![solid(50), solid(90)],
        ))
        .unwrap();
    assert!(max_abs(&a.narrow(1, 4, 16).unwrap(), &b.narrow(1, 4, 16).unwrap()) > 1e-3);
}

/// The Rust-written tiny pipeline (what `kubewan-runner tiny-ckpts` writes) loads and runs.
#[test]
fn tiny_checkpoint_runs() {
    use kubewan_wan::pipeline::WanPipeline;
    let dir = std::env::temp_dir().join(format!("kubewan-wan-tiny-{}", std::process::id()));
    kubewan_wan::write_tiny_checkpoint(&dir, 7).unwrap();
    for f in kubewan_wan::required_files() {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    // fresh weights, not the committed ones
    let ours = candle_core::safetensors::load(
        dir.join("transformer/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let committed = candle_core::safetensors::load(
        data("tiny-flf2v").join("model/transformer/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ours.len(), committed.len());
    assert!(max_abs(&ours["proj_out.weight"], &committed["proj_out.weight"]) > 1e-3);
    let pipe = WanPipeline::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let req = small_request(solid(10), Some(solid(200)), vec![solid(40)]);
    let frames = pipe.generate(&req, "a fox", Some("blurry")).unwrap();
    assert_eq!(frames.dims(), &[9, 32, 48, 3]);
    let v: Vec<f32> = frames.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
    std::fs::remove_dir_all(&dir).ok();
}

/// The bf16 path (the TravelJob default dtype) runs and stays close to the f32 reference.
#[test]
fn dit_forward_bf16_close() {
    let case = "tiny-flf2v";
    let g = golden(case, "dit.safetensors");
    let model = WanTransformer::load(
        &data(case).join("model/transformer"),
        DType::BF16,
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
    assert_eq!(out.dtype(), DType::BF16);
    let err = max_abs(&out, &g["output"]);
    eprintln!("{case} dit forward bf16: max abs err {err:.3e}");
    assert!(err < 0.1, "bf16 forward too far from f32: {err}");
}
