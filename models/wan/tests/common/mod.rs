//! What the parity tests share: the committed tiny pipelines and goldens under `tests/data`
//! (written by `models/wan/scripts/make_tiny.py`) and the max-abs-error comparison.
#![allow(dead_code)] // each test binary uses its own part

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kubewan_model_common::safetensors::{SafetensorsFile, var_builder_with};
use kubewan_wan::lora::{Lora, LoraMerge};
use kubewan_wan::pipeline::{Conditioning, GuidancePasses, VideoRequest, WanPipeline};
use kubewan_wan::sampler::SamplerKind;

/// The frames tolerance of every end-to-end parity test (max abs error, values in 0..1).
pub const TOL: f32 = 2e-3;

/// `tests/data/<case>`.
pub fn data(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(case)
}

/// The tensors of `tests/data/<case>/golden/<file>`.
pub fn golden(case: &str, file: &str) -> HashMap<String, Tensor> {
    let p = data(case).join("golden").join(file);
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `tests/data/<case>/golden/meta.json`.
pub fn meta(case: &str) -> serde_json::Value {
    let p = data(case).join("golden/meta.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
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

/// Asserts `got` is within `tol` (max abs) of `want`, printing the error and the scale.
pub fn check_tol(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let err = max_abs(got, want);
    let scale = max_abs(want, &want.zeros_like().unwrap());
    eprintln!("{what}: max abs err {err:.3e} (max |ref| {scale:.3})");
    assert!(err <= tol, "{what}: max abs error {err} > {tol}");
}

/// [`check_tol`] at [`TOL`].
pub fn check(what: &str, got: &Tensor, want: &Tensor) {
    check_tol(what, got, want, TOL)
}

pub fn load_png(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// Every weight of the transformer folder `dir` loaded with `loras` merged, against diffusers'
/// fused weights: `want` holds the tensors the merge changed (named `<prefix><name>`); every
/// other weight must come out unchanged.
#[allow(clippy::result_large_err)] // the loader's transform returns the crate's Error
pub fn check_merged(
    what: &str,
    dir: &Path,
    loras: &[Lora],
    want: &HashMap<String, Tensor>,
    prefix: &str,
) {
    let mut merge = LoraMerge::open(loras).unwrap();
    let vb = var_builder_with(
        dir,
        "diffusion_pytorch_model",
        DType::F32,
        &Device::Cpu,
        &mut |name: &str, t: Tensor| merge.apply(name, t),
    )
    .unwrap();
    merge.finish(dir).unwrap();
    let base = SafetensorsFile::open(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut changed = 0;
    for (name, info) in &base.header.tensors {
        let got = vb.get(info.shape.as_slice(), name).unwrap();
        match want.get(&format!("{prefix}{name}")) {
            Some(w) => {
                changed += 1;
                check_tol(&format!("{what} {name}"), &got, w, 1e-5)
            }
            None => assert_eq!(
                max_abs(&got, &base.tensor(name).unwrap()),
                0.0,
                "{what}: {name} changed, diffusers leaves it"
            ),
        }
    }
    let expected = want.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(
        changed, expected,
        "{what}: every tensor diffusers changed is checked"
    );
}

/// The request of a golden run: size from `sizes` (`width`, `height`, `frames`), sampling from
/// `run` (`steps`, `guidance`, optional `guidance_2`, `sampler` (default UniPC) and the shift as
/// `shift` or `flow_shift`), the initial noise `latents` of the golden case `latents_case`.
pub fn golden_request(
    sizes: &serde_json::Value,
    run: &serde_json::Value,
    first: image::RgbImage,
    last: Option<image::RgbImage>,
    latents_case: &str,
) -> VideoRequest {
    let int = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap() as usize;
    VideoRequest {
        first,
        last,
        known_frames: vec![],
        width: int(sizes, "width"),
        height: int(sizes, "height"),
        frames: int(sizes, "frames"),
        steps: int(run, "steps"),
        guidance: run["guidance"].as_f64().unwrap(),
        guidance_2: run["guidance_2"].as_f64(),
        sampler: run["sampler"]
            .as_str()
            .map(|s| s.parse::<SamplerKind>().unwrap())
            .unwrap_or_default(),
        flow_shift: run["shift"].as_f64().or(run["flow_shift"].as_f64()),
        seed: 0,
        latents: Some(
            golden(latents_case, "latents.safetensors")
                .remove("latents")
                .unwrap(),
        ),
        guidance_passes: GuidancePasses::Separate,
    }
}

/// The pipeline's conditioning for `req` from the prompt and negative prompt of
/// a case's golden metadata `meta`.
pub fn golden_conditioning(
    pipe: &WanPipeline,
    meta: &serde_json::Value,
    req: &VideoRequest,
) -> Conditioning {
    pipe.encode_conditioning(
        meta["prompt"].as_str().unwrap(),
        meta["negative_prompt"].as_str(),
        req,
    )
    .unwrap()
}
