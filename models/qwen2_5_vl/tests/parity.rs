//! Parity with transformers on tiny random-weight checkpoints.
//!
//! `tests/data/` holds checkpoints and goldens written by `scripts/make_tiny.py`
//! (transformers' own model, processor and greedy `generate`). Every case must
//! give the same prompt token ids and greedy tokens, and the first-position
//! logits must agree within 1e-4 relative (|a-b| <= 1e-4 * max(1, |b|)).
//!
//! Held-back checkpoints (`make_tiny.py --held-back DIR`) are checked with
//! `KUBEWAN_QWEN_GOLDENS=DIR cargo test -p kubewan-qwen2-5-vl --test parity held_back`
//! at 1e-3 on the top-5 logits.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kubewan_qwen2_5_vl::{GenerateRequest, Qwen25Vl, Sampling};
use serde_json::Value;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

struct Report {
    cases: usize,
    worst_rel: f32,
    failures: Vec<String>,
}

fn check_goldens(root: &Path, tol: f32, full_logits: bool) -> Report {
    let goldens: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("goldens.json")).expect("goldens.json"),
    )
    .expect("goldens.json is JSON");
    let mut report = Report {
        cases: 0,
        worst_rel: 0.0,
        failures: Vec::new(),
    };
    let ckpts = goldens["checkpoints"].as_object().expect("checkpoints");
    assert!(!ckpts.is_empty());
    for (name, cases) in ckpts {
        let mut model = Qwen25Vl::load(&root.join(name), DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (ci, case) in cases.as_array().unwrap().iter().enumerate() {
            let images = case["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| image::open(root.join("images").join(n.as_str().unwrap())).unwrap())
                .collect();
            let req = GenerateRequest {
                system: case["system"].as_str().map(str::to_owned),
                images,
                prompt: case["prompt"].as_str().unwrap().to_owned(),
                max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as usize,
                sampling: Sampling::Greedy,
            };
            let ids = |v: &Value| -> Vec<u32> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            };
            let what = format!("{name} case {ci} ({:?})", case["images"]);
            let out = model
                .generate(&req)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                out.prompt_token_ids,
                ids(&case["prompt_token_ids"]),
                "{what}: prompt token ids"
            );
            assert_eq!(
                out.token_ids,
                ids(&case["token_ids"]),
                "{what}: greedy tokens"
            );
            assert_eq!(out.text, case["text"].as_str().unwrap(), "{what}: text");
            let close = |a: f32, b: f32| (a - b).abs() / b.abs().max(1.0);
            let mut case_worst = 0f32;
            let gold_top = case["top_logits"].as_array().unwrap();
            assert_eq!(out.top_logits.len(), 5);
            for ((id, logit), g) in out.top_logits.iter().zip(gold_top) {
                let (gid, gl) = (g[0].as_u64().unwrap() as u32, g[1].as_f64().unwrap() as f32);
                assert_eq!(
                    *id, gid,
                    "{what}: top-5 ids {:?} vs {gold_top:?}",
                    out.top_logits
                );
                let r = close(*logit, gl);
                case_worst = case_worst.max(r);
                if r > tol {
                    report.failures.push(format!(
                        "{what}: top logit {id}: {logit} vs {gl} (rel {r:.3e})"
                    ));
                }
            }
            if full_logits {
                let first = model.first_logits(&req).unwrap();
                let gold: Vec<f32> = case["first_logits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                assert_eq!(first.len(), gold.len(), "{what}: vocab size");
                for (i, (a, b)) in first.iter().zip(&gold).enumerate() {
                    let r = close(*a, *b);
                    case_worst = case_worst.max(r);
                    if r > tol {
                        report
                            .failures
                            .push(format!("{what}: logit {i}: {a} vs {b} (rel {r:.3e})"));
                    }
                }
            }
            eprintln!(
                "{what}: ids and tokens identical, worst relative logit error {case_worst:.3e}"
            );
            report.worst_rel = report.worst_rel.max(case_worst);
            report.cases += 1;
        }
    }
    report
}

#[test]
fn committed_tiny_checkpoints_match_transformers() {
    let r = check_goldens(&data_dir(), 1e-4, true);
    eprintln!(
        "{} cases, worst relative logit error {:.3e}",
        r.cases, r.worst_rel
    );
    assert!(r.failures.is_empty(), "{}", r.failures.join("\n"));
    assert!(r.cases >= 8);
}

#[test]
fn held_back() {
    let Ok(dir) = std::env::var("KUBEWAN_QWEN_GOLDENS") else {
        eprintln!("KUBEWAN_QWEN_GOLDENS not set: skipping the held-back check");
        return;
    };
    let r = check_goldens(Path::new(&dir), 1e-3, false);
    eprintln!(
        "held-back {dir}: {} cases, worst relative top-5 logit error {:.3e}",
        r.cases, r.worst_rel
    );
    assert!(r.failures.is_empty(), "{}", r.failures.join("\n"));
    assert!(r.cases > 0);
}

/// bf16 / f16 loading: same prompt, logits close to f32 (loose: half precision).
#[test]
fn half_precision_dtypes_track_f32() {
    let dir = data_dir().join("tiny-released-untied-gqa");
    let img = image::open(data_dir().join("images/img0_168x112.png")).unwrap();
    let req = GenerateRequest {
        system: None,
        images: vec![img],
        prompt: "Describe this image.".into(),
        max_new_tokens: 3,
        sampling: Sampling::Greedy,
    };
    let mut f32_model = Qwen25Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let reference = f32_model.first_logits(&req).unwrap();
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    for dtype in [DType::BF16, DType::F16] {
        let mut m = Qwen25Vl::load(&dir, dtype, &Device::Cpu).unwrap();
        let logits = m.first_logits(&req).unwrap();
        let worst = logits
            .iter()
            .zip(&reference)
            .fold(0f32, |w, (a, b)| w.max((a - b).abs()));
        eprintln!("{dtype:?}: worst |logit - f32| = {worst:.4} (scale {scale:.2})");
        assert!(worst < 0.08 * scale, "{dtype:?}: {worst} vs scale {scale}");
        let out = m.generate(&req).unwrap();
        assert_eq!(
            out.prompt_token_ids,
            f32_model.generate(&req).unwrap().prompt_token_ids
        );
    }
}

#[test]
fn a_broken_folder_names_what_is_missing() {
    let dir = std::env::temp_dir().join(format!("kubewan-qwen-broken-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = data_dir().join("tiny-released-untied-gqa");
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let e = Qwen25Vl::load(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("preprocessor_config.json") && e.contains("chat_template"),
        "{e}"
    );
    for f in ["preprocessor_config.json", "chat_template.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    // the index names shards that are not there
    let e = Qwen25Vl::load(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model-00001-of-00003.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
