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
