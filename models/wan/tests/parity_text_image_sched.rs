//! Parity of the UMT5 text encoder (+ tokenizer and the pipeline's prompt embeddings), the CLIP
//! vision encoder (+ image processor) and the flow UniPC scheduler with diffusers/transformers,
//! on the tiny random-weight pipelines written by `models/wan/scripts/make_tiny.py`.
//!
//! Besides the committed `tests/data/tiny-*`, every directory listed in the environment variable
//! `KUBEWAN_WAN_PARITY_DIRS` (separated by `:`; e.g. the script's `--held-back` output) is checked
//! the same way.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::max_abs;
use kubewan_wan::clip::{self, ClipVision, ImageProcessorConfig, PilFilter};
use kubewan_wan::scheduler::FlowUniPc;
use kubewan_wan::text;
use kubewan_wan::umt5::Umt5Encoder;

const TOL: f32 = 1e-4;

fn data_dirs() -> Vec<PathBuf> {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut dirs = vec![base.join("tiny-flf2v"), base.join("tiny-i2v")];
    if let Ok(extra) = std::env::var("KUBEWAN_WAN_PARITY_DIRS") {
        dirs.extend(
            extra
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        );
    }
    dirs
}

fn golden(dir: &Path, name: &str) -> HashMap<String, Tensor> {
    let path = dir.join("golden").join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn meta(dir: &Path) -> serde_json::Value {
    let path = dir.join("golden/meta.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let err = max_abs(got, want);
    println!("{what}: max abs err {err:.3e}");
    assert!(err <= tol, "{what}: max abs err {err:e} > {tol:e}");
}

fn ids_vec(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

fn load_rgb(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

#[test]
fn umt5_hidden_states_match_transformers() {
    for dir in data_dirs() {
        let g = golden(&dir, "text");
        let enc =
            Umt5Encoder::load(&dir.join("model/text_encoder"), DType::F32, &Device::Cpu).unwrap();
        for key in ["prompt", "negative", "long"] {
            let ids = &g[&format!("{key}_ids")];
            let mask = &g[&format!("{key}_mask")];
            let hidden = enc.encode(ids, Some(mask)).unwrap();
            assert_close(
                &format!("{} umt5 {key} (512, masked)", dir.display()),
                &hidden,
                &g[&format!("{key}_hidden")],
                TOL,
            );
        }
        let hidden = enc.encode(&g["short_ids"], None).unwrap();
        assert_close(
            &format!("{} umt5 unpadded", dir.display()),
            &hidden,
            &g["short_hidden"],
            TOL,
        );
        // The mask matters: without it the padded sequence is far from the reference.
        let unmasked = enc.encode(&g["prompt_ids"], None).unwrap();
        assert!(max_abs(&unmasked, &g["prompt_hidden"]) > 1e-2);
    }
}

#[test]
fn tokenizer_matches_transformers() {
    for dir in data_dirs() {
        let g = golden(&dir, "text");
        let m = meta(&dir);
        let tok = text::load_tokenizer(&dir.join("model/tokenizer")).unwrap();
        for (key, prompt) in [
            ("prompt", m["prompt"].as_str().unwrap()),
            ("negative", m["negative_prompt"].as_str().unwrap()),
            ("long", m["long_prompt"].as_str().unwrap()),
        ] {
            let t = text::tokenize(&tok, prompt, 512).unwrap();
            assert_eq!(
                t.ids,
                ids_vec(&g[&format!("{key}_ids")]),
                "{} {key} ids",
                dir.display()
            );
            assert_eq!(
                t.mask,
                ids_vec(&g[&format!("{key}_mask")]),
                "{} {key} mask",
                dir.display()
            );
        }
        let long = text::tokenize(&tok, m["long_prompt"].as_str().unwrap(), 512).unwrap();
        assert_eq!(long.len, 512, "the long prompt must be truncated");
        assert_eq!(
            long.ids[511],
            tok.token_to_id("</s>").unwrap(),
            "truncation keeps </s> last"
        );
    }
}

#[test]
fn prompt_embeds_match_pipeline() {
    for dir in data_dirs() {
        let g = golden(&dir, "text");
        let m = meta(&dir);
        let tok = text::load_tokenizer(&dir.join("model/tokenizer")).unwrap();
        let enc =
            Umt5Encoder::load(&dir.join("model/text_encoder"), DType::F32, &Device::Cpu).unwrap();
        for (key, prompt) in [
            ("prompt_embeds", m["prompt"].as_str().unwrap()),
            ("negative_embeds", m["negative_prompt"].as_str().unwrap()),
            ("long_embeds", m["long_prompt"].as_str().unwrap()),
        ] {
            let e = text::encode_prompt(&tok, &enc, prompt, 512).unwrap();
            assert_close(&format!("{} {key}", dir.display()), &e, &g[key], TOL);
        }
        let e2e = golden(&dir, "e2e");
        let e = text::encode_prompt(&tok, &enc, m["prompt"].as_str().unwrap(), 512).unwrap();
        assert_close(
            &format!("{} e2e prompt_embeds", dir.display()),
            &e,
            &e2e["prompt_embeds"],
            TOL,
        );
    }
}

#[test]
fn prompt_clean_matches_diffusers() {
    assert_eq!(
        text::prompt_clean("  A red fox  runs\tthrough snow &amp;amp; ice &#39;x&#x27; \n"),
        "A red fox runs through snow & ice 'x'"
    );
    assert_eq!(text::prompt_clean("a & b &unknown; c"), "a & b &unknown; c");
    // Expected values from Python: html.unescape(html.unescape(s)).
    for (s, want) in [
        ("a &amp b", "a & b"),
        ("&ampx", "&x"),
        ("&lt;tag&gt;", "<tag>"),
        ("&amp;amp;", "&"),
        ("&#39;q&#x27;", "'q'"),
        ("&hellip", "&hellip"),
        ("&hellip;", "\u{2026}"),
        ("&#65", "A"),
        ("&copy2024", "\u{a9}2024"),
        ("&apos", "&apos"),
        ("&times3", "\u{d7}3"),
    ] {
        assert_eq!(text::prompt_clean(s), want, "{s:?}");
    }
    // ftfy.fix_text's deterministic fixes; expected values from diffusers' prompt_clean (ftfy 6.3.1).
    for (s, want) in [
        (
            "\u{201c}Hello\u{201d} \u{2018}world\u{2019} \u{201b}x\u{201f}",
            "\"Hello\" 'world' 'x\"",
        ),
        (
            "\u{fb01}ne \u{fb02}ow \u{fb03} \u{0132}ssel \u{01c6}",
            "fine flow ffi IJssel d\u{17e}",
        ),
        (
            "\u{ff21}\u{ff22}\u{ff23}\u{ff11}\u{ff12}\u{ff13}\u{ff01}\u{3000}\u{ff58}",
            "ABC123! x",
        ),
        ("a\r\nb\u{2028}c", "a b c"),
        ("x\u{0}y\u{7}z\u{7f}\u{206a}w\u{feff}\u{fff9}", "xyzw"),
        ("\u{1b}[31mred\u{1b}[0m text", "red text"),
        (
            "C1 \u{93}quoted\u{94} \u{80} \u{81}",
            "C1 \"quoted\" \u{20ac} \u{81}",
        ),
        ("&amp;amp;amp; deep", "& deep"),
        ("<b>&amp;amp;amp;</b>", "<b>&amp;</b>"),
        ("tab\tand   spaces  ", "tab and spaces"),
        ("\u{2bc}n x", "'n x"),
    ] {
        assert_eq!(text::prompt_clean(s), want, "{s:?}");
    }
}

#[test]
fn clip_preprocess_matches_image_processor() {
    for dir in data_dirs() {
        let g = golden(&dir, "clip");
        let m = meta(&dir);
        let cfg =
            ImageProcessorConfig::load(&dir.join("model/image_processor/preprocessor_config.json"))
                .unwrap();
        let first = load_rgb(&dir.join("golden/first.png"));
        let second = load_rgb(
            &dir.join("golden")
                .join(m["clip_two_second"].as_str().unwrap()),
        );
        let a = load_rgb(&dir.join("golden/clip_a.png"));
        let b = load_rgb(&dir.join("golden/clip_b.png"));
        for (key, imgs) in [
            ("one", vec![first.clone()]),
            ("two", vec![first.clone(), second.clone()]),
            ("odd", vec![a.clone(), b.clone()]),
        ] {
            let px = clip::preprocess(&imgs, &cfg, &Device::Cpu).unwrap();
            assert_close(
                &format!("{} clip pixels {key}", dir.display()),
                &px,
                &g[&format!("{key}_pixels")],
                TOL,
            );
        }
        // A different filter gives different pixels: the check can tell filters apart.
        let mut bilinear = cfg.clone();
        bilinear.resample = 2;
        let px = clip::preprocess(&[a.clone(), b.clone()], &bilinear, &Device::Cpu).unwrap();
        assert!(max_abs(&px, &g["odd_pixels"]) > 1e-2);
    }
}

#[test]
fn pil_resize_matches_pillow_for_every_filter() {
    for dir in data_dirs() {
        let g = golden(&dir, "resize");
        let m = meta(&dir);
        let src = load_rgb(
            &dir.join("golden")
                .join(m["resize_source"].as_str().unwrap()),
        );
        let mut checked = 0;
        for (name, code) in m["resize_filters"].as_object().unwrap() {
            let filter = PilFilter::from_code(code.as_u64().unwrap() as u32).unwrap();
            for wh in m["resize_sizes"].as_array().unwrap() {
                let (w, h) = (
                    wh[0].as_u64().unwrap() as u32,
                    wh[1].as_u64().unwrap() as u32,
                );
                let got = clip::pil_resize(&src, w, h, filter);
                let want = &g[&format!("{name}_{w}x{h}")];
                assert_eq!(want.dims(), &[h as usize, w as usize, 3]);
                let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
                let diff = got
                    .as_raw()
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a != b)
                    .count();
                assert_eq!(
                    diff,
                    0,
                    "{} {name} {w}x{h}: {diff} bytes differ",
                    dir.display()
                );
                checked += 1;
            }
        }
        assert!(checked >= 25);
    }
}

#[test]
fn pil_resize_same_size_is_identity_and_lanczos_runs() {
    let img =
        image::RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 50) as u8, 7]));
    assert_eq!(clip::pil_resize(&img, 7, 5, PilFilter::Bicubic), img);
    let up = clip::pil_resize(&img, 14, 10, PilFilter::Lanczos);
    assert_eq!(up.dimensions(), (14, 10));
    // A constant image stays constant under every (normalised) filter.
    let flat = image::RgbImage::from_pixel(9, 6, image::Rgb([100, 150, 200]));
    for f in [
        PilFilter::Bicubic,
        PilFilter::Lanczos,
        PilFilter::Bilinear,
        PilFilter::Box,
        PilFilter::Hamming,
    ] {
        let r = clip::pil_resize(&flat, 4, 11, f);
        assert!(r.pixels().all(|p| p.0 == [100, 150, 200]), "{f:?}");
    }
}

#[test]
fn clip_penultimate_hidden_states_match_transformers() {
    for dir in data_dirs() {
        let g = golden(&dir, "clip");
        let cfg =
            ImageProcessorConfig::load(&dir.join("model/image_processor/preprocessor_config.json"))
                .unwrap();
        let model =
            ClipVision::load(&dir.join("model/image_encoder"), DType::F32, &Device::Cpu).unwrap();
        for key in ["one", "two", "odd"] {
            let h = model
                .forward_penultimate(&g[&format!("{key}_pixels")])
                .unwrap();
            assert_close(
                &format!("{} clip hidden[-2] {key}", dir.display()),
                &h,
                &g[&format!("{key}_hidden")],
                TOL,
            );
        }
        // From the image file through our own preprocessing, as the pipeline's encode_image.
        let first = load_rgb(&dir.join("golden/first.png"));
        let px = clip::preprocess(&[first], &cfg, &Device::Cpu).unwrap();
        let h = model.forward_penultimate(&px).unwrap();
        assert_close(
            &format!("{} clip encode_image", dir.display()),
            &h,
            &g["one_pipeline"],
            TOL,
        );
        assert_eq!(h.dim(1).unwrap(), model.tokens_per_image());
    }
}

#[test]
fn scheduler_sigmas_and_timesteps_match_diffusers() {
    for dir in data_dirs() {
        let g = golden(&dir, "scheduler");
        let m = meta(&dir);
        let cfg_path = dir.join("model/scheduler/scheduler_config.json");
        for pair in m["scheduler_pairs"].as_array().unwrap() {
            let steps = pair[0].as_u64().unwrap() as usize;
            let shift = pair[1].as_f64().unwrap();
            let key = format!("{steps}_{shift:?}");
            let mut s = FlowUniPc::from_config(&cfg_path, Some(shift)).unwrap();
            s.set_timesteps(steps).unwrap();
            let want_t = g[&format!("timesteps_{key}")].to_vec1::<i64>().unwrap();
            assert_eq!(
                s.timesteps(),
                &want_t[..],
                "{} timesteps {key}",
                dir.display()
            );
            let want_s = g[&format!("sigmas_{key}")].to_vec1::<f32>().unwrap();
            assert_eq!(s.sigmas().len(), want_s.len());
            let err = s
                .sigmas()
                .iter()
                .zip(&want_s)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            println!("{} sigmas {key}: max abs err {err:e}", dir.display());
            assert!(err <= 1e-6, "{} sigmas {key}: {err}", dir.display());
        }
        // Without the override the config's own flow_shift is used.
        let shift = m["flow_shift"].as_f64().unwrap();
        let steps = m["steps"].as_u64().unwrap() as usize;
        let mut s = FlowUniPc::from_config(&cfg_path, None).unwrap();
        s.set_timesteps(steps).unwrap();
        let want_t = g[&format!("timesteps_{steps}_{shift:?}")]
            .to_vec1::<i64>()
            .unwrap();
        assert_eq!(s.timesteps(), &want_t[..]);
    }
}

#[test]
fn scheduler_step_chain_matches_diffusers() {
    for dir in data_dirs() {
        let g = golden(&dir, "scheduler");
        let m = meta(&dir);
        let cfg_text =
            std::fs::read_to_string(dir.join("model/scheduler/scheduler_config.json")).unwrap();
        for (j, chain) in m["scheduler_chains"].as_array().unwrap().iter().enumerate() {
            let steps = chain[0].as_u64().unwrap() as usize;
            let shift = chain[1].as_f64().unwrap();
            let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
            for (k, v) in chain[2].as_object().unwrap() {
                cfg[k] = v.clone();
            }
            let cfg: kubewan_wan::scheduler::UniPcConfig = serde_json::from_value(cfg).unwrap();
            let key = format!("chain{j}");
            let mut s = FlowUniPc::new(cfg, Some(shift)).unwrap();
            s.set_timesteps(steps).unwrap();
            let want_t = g[&format!("{key}_timesteps")].to_vec1::<i64>().unwrap();
            assert_eq!(
                s.timesteps(),
                &want_t[..],
                "{} {key} timesteps",
                dir.display()
            );
            let mut x = g[&format!("{key}_sample")].clone();
            for (i, t) in want_t.iter().enumerate() {
                let mo = &g[&format!("{key}_model_output_{i}")];
                x = s.step(mo, *t, &x).unwrap();
                assert_close(
                    &format!("{} {key} {} step {i}", dir.display(), chain[2]),
                    &x,
                    &g[&format!("{key}_out_{i}")],
                    TOL,
                );
            }
            assert!(s.step(&g[&format!("{key}_model_output_0")], 0, &x).is_err());
        }
    }
}

#[test]
fn scheduler_rejects_unsupported_configs() {
    let dir = &data_dirs()[0];
    let text = std::fs::read_to_string(dir.join("model/scheduler/scheduler_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["prediction_type"] = "epsilon".into();
    let cfg: kubewan_wan::scheduler::UniPcConfig = serde_json::from_value(v).unwrap();
    assert!(FlowUniPc::new(cfg, None).is_err());
}

/// The released Wan folders were saved by transformers 4.x: the CLIP weights carry a
/// `vision_model.` prefix, and the UMT5-XXL weights are sharded with an index. Rebuild the tiny
/// components in that layout (plus a nested `vision_config` and `encoder.embed_tokens.weight`
/// instead of `shared.weight`) and check they load and give the same outputs.
#[test]
fn released_layouts_load_and_match() {
    let dir = &data_dirs()[0];
    let tmp = std::env::temp_dir().join(format!("kubewan-wan-layouts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);

    // CLIP: prefixed keys, nested config.
    let clip_dir = tmp.join("image_encoder");
    std::fs::create_dir_all(&clip_dir).unwrap();
    let src = dir.join("model/image_encoder");
    let weights =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let prefixed: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, v)| (format!("vision_model.{k}"), v))
        .collect();
    candle_core::safetensors::save(&prefixed, clip_dir.join("model.safetensors")).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let nested = serde_json::json!({"model_type": "clip", "vision_config": cfg});
    std::fs::write(clip_dir.join("config.json"), nested.to_string()).unwrap();
    let g = golden(dir, "clip");
    let model = ClipVision::load(&clip_dir, DType::F32, &Device::Cpu).unwrap();
    let h = model.forward_penultimate(&g["two_pixels"]).unwrap();
    assert_close("clip, transformers 4.x layout", &h, &g["two_hidden"], TOL);

    // UMT5: two shards + index, embed_tokens name.
    let te_dir = tmp.join("text_encoder");
    std::fs::create_dir_all(&te_dir).unwrap();
    let src = dir.join("model/text_encoder");
    std::fs::copy(src.join("config.json"), te_dir.join("config.json")).unwrap();
    let mut weights =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let shared = weights.remove("shared.weight").unwrap();
    weights.insert("encoder.embed_tokens.weight".into(), shared);
    let mut names: Vec<String> = weights.keys().cloned().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    let (a, b) = names.split_at(names.len() / 2);
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|k| (k.clone(), weights[k].clone()))
            .collect();
        candle_core::safetensors::save(&shard, te_dir.join(&file)).unwrap();
        for k in part.iter() {
            map.insert(k.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        te_dir.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let g = golden(dir, "text");
    let enc = Umt5Encoder::load(&te_dir, DType::F32, &Device::Cpu).unwrap();
    let hidden = enc
        .encode(&g["prompt_ids"], Some(&g["prompt_mask"]))
        .unwrap();
    assert_close("umt5, sharded layout", &hidden, &g["prompt_hidden"], TOL);

    // A missing shard is reported by name.
    std::fs::remove_file(te_dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = Umt5Encoder::load(&te_dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Half precision (how the released encoders run on a GPU) goes through the same code: the
/// softmax and norm statistics stay in f32, so the result is close to the f32 reference.
#[test]
fn encoders_run_in_bf16_and_f16() {
    let dir = &data_dirs()[0];
    let gt = golden(dir, "text");
    let gc = golden(dir, "clip");
    for dtype in [DType::BF16, DType::F16] {
        let enc = Umt5Encoder::load(&dir.join("model/text_encoder"), dtype, &Device::Cpu).unwrap();
        let h = enc
            .encode(&gt["prompt_ids"], Some(&gt["prompt_mask"]))
            .unwrap();
        assert_eq!(h.dtype(), dtype);
        let scale = max_abs(
            &gt["prompt_hidden"],
            &gt["prompt_hidden"].zeros_like().unwrap(),
        );
        let err = max_abs(&h, &gt["prompt_hidden"]);
        println!("umt5 {dtype:?}: max abs err {err:.3e} (max |x| {scale:.2})");
        assert!(err < 0.05 * scale, "umt5 {dtype:?}: {err}");
        let model =
            ClipVision::load(&dir.join("model/image_encoder"), dtype, &Device::Cpu).unwrap();
        let h = model.forward_penultimate(&gc["two_pixels"]).unwrap();
        assert_eq!(h.dtype(), dtype);
        let scale = max_abs(&gc["two_hidden"], &gc["two_hidden"].zeros_like().unwrap());
        let err = max_abs(&h, &gc["two_hidden"]);
        println!("clip {dtype:?}: max abs err {err:.3e} (max |x| {scale:.2})");
        assert!(err < 0.05 * scale, "clip {dtype:?}: {err}");
    }
}
