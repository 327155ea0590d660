//! Parity of the Wan DiT, VAE and the whole pipeline against diffusers' goldens
//! (`models/wan/scripts/make_tiny.py`), max abs error <= 2e-3 in f32.

mod common;

use candle_core::{DType, Device};
use common::*;
use kubewan_wan::pipeline::ExpertLoras;
use kubewan_wan::transformer::WanTransformer;

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

fn pipeline_case(case: &str) {
    use kubewan_wan::pipeline::{GuidancePasses, VideoRequest, WanPipeline};
    let m = meta(case);
    let gold = data(case).join("golden");
    let pipe = WanPipeline::load(
        &data(case).join("model"),
        DType::F32,
        &Device::Cpu,
        &ExpertLoras::default(),
    )
    .unwrap();
    let first = load_png(&gold.join(m["e2e_first"].as_str().unwrap()));
    let last = m["e2e_last"].as_str().map(|l| load_png(&gold.join(l)));
    let req = golden_request(&m, &m, first, last, case);
    let e2e = golden(case, "e2e.safetensors");
    let cond = golden_conditioning(&pipe, &m, &req);
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
    // diffusers runs two passes per step; one batch of 2 must give the same latents.
    let mut finals = Vec::new();
    for passes in [GuidancePasses::Separate, GuidancePasses::Batched] {
        let req = VideoRequest {
            guidance_passes: passes,
            ..req.clone()
        };
        let mut steps = 0;
        let fin = pipe.denoise(&req, &cond, &mut |_, _| steps += 1).unwrap();
        assert_eq!(steps, req.steps);
        check(
            &format!("{case} final latents ({passes:?})"),
            &fin,
            &e2e["final_latents"],
        );
        finals.push(fin);
    }
    let batch_err = max_abs(&finals[0], &finals[1]);
    assert!(
        batch_err < 1e-5,
        "{case}: batched vs separate guidance differ by {batch_err}"
    );
    let fin = finals.remove(1);
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
        guidance_2: None,
        sampler: Default::default(),
        flow_shift: Some(5.0),
        seed: 3,
        latents: None,
        guidance_passes: kubewan_wan::pipeline::GuidancePasses::Batched,
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
    let pipe = WanPipeline::load_denoiser(
        &data("tiny-flf2v").join("model"),
        DType::F32,
        &Device::Cpu,
        &ExpertLoras::default(),
    )
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
    // everything the catalogue names, the image branch included
    let inventory = kubewan_wan::checkpoint::require(&dir).unwrap();
    assert!(
        inventory
            .weights
            .contains(&dir.join("image_encoder/model.safetensors")),
        "{inventory:?}"
    );
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
    let pipe = WanPipeline::load(&dir, DType::F32, &Device::Cpu, &ExpertLoras::default()).unwrap();
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
