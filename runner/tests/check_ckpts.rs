//! `check-ckpts`: one error naming the model, the root, the folder and every
//! missing file; escapes refused; broken weight files caught.

mod common;

use std::fs;
use std::path::Path;

use common::*;

fn safetensors(path: &Path, floats: usize) {
    let header = format!(
        "{{\"w\":{{\"dtype\":\"F32\",\"shape\":[{floats}],\"data_offsets\":[0,{}]}}}}",
        floats * 4
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(1u8, floats * 4));
    fs::write(path, bytes).unwrap();
}

/// A Qwen2.5-VL folder in the Hugging Face layout, sharded.
fn qwen(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.json"), r#"{"model_type":"qwen2_5_vl"}"#).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.json",
    ] {
        fs::write(dir.join(f), "{}").unwrap();
    }
    fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    safetensors(&dir.join("model-00001-of-00002.safetensors"), 64);
    safetensors(&dir.join("model-00002-of-00002.safetensors"), 64);
}

/// A Wan2.1 folder in the diffusers layout.
fn wan(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::write(
        dir.join("model_index.json"),
        r#"{"_class_name":"WanImageToVideoPipeline","transformer":["diffusers","WanTransformer3DModel"],"vae":["diffusers","AutoencoderKLWan"],"text_encoder":["transformers","UMT5EncoderModel"],"tokenizer":["transformers","T5TokenizerFast"],"scheduler":["diffusers","UniPCMultistepScheduler"],"image_encoder":["transformers","CLIPVisionModel"],"image_processor":["transformers","CLIPImageProcessor"]}"#,
    )
    .unwrap();
    for (sub, stem) in [
        ("transformer", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("image_encoder", "model"),
    ] {
        fs::create_dir_all(dir.join(sub)).unwrap();
        fs::write(dir.join(sub).join("config.json"), "{}").unwrap();
        safetensors(&dir.join(sub).join(format!("{stem}.safetensors")), 32);
    }
    fs::create_dir_all(dir.join("tokenizer")).unwrap();
    fs::write(dir.join("tokenizer/tokenizer.json"), "{}").unwrap();
    fs::create_dir_all(dir.join("scheduler")).unwrap();
    fs::write(dir.join("scheduler/scheduler_config.json"), "{}").unwrap();
    fs::create_dir_all(dir.join("image_processor")).unwrap();
    fs::write(dir.join("image_processor/preprocessor_config.json"), "{}").unwrap();
}

fn check(root: &Path, models: &[&str]) -> std::process::Output {
    let mut cmd = runner();
    cmd.arg("check-ckpts").arg("--ckpts").arg(root);
    for m in models {
        cmd.arg("--model").arg(m);
    }
    cmd.output().unwrap()
}

#[test]
fn complete_folders_pass() {
    let root = tempfile::tempdir().unwrap();
    qwen(&root.path().join("vlm"));
    wan(&root.path().join("video"));
    let out = check(root.path(), &["vlm", "video"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("qwen2_5_vl") && stdout.contains("wan (diffusers"),
        "{stdout}"
    );
}

#[test]
fn a_removed_file_is_named_with_the_root_and_folder() {
    let root = tempfile::tempdir().unwrap();
    qwen(&root.path().join("vlm"));
    wan(&root.path().join("video"));
    fs::remove_file(root.path().join("vlm/model-00002-of-00002.safetensors")).unwrap();
    fs::remove_file(
        root.path()
            .join("video/vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    fs::remove_file(root.path().join("video/scheduler/scheduler_config.json")).unwrap();
    let out = check(root.path(), &["vlm"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let canon = fs::canonicalize(root.path()).unwrap();
    assert!(
        stderr.contains("model-00002-of-00002.safetensors"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("checkpoint root {}", canon.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("folder {}", canon.join("vlm").display())),
        "{stderr}"
    );
    assert!(stderr.contains("nothing is downloaded"), "{stderr}");
    let out = check(root.path(), &["video"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Every missing file, in one error.
    assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");
    assert!(
        stderr.contains("vae/diffusion_pytorch_model.safetensors")
            && stderr.contains("scheduler/scheduler_config.json"),
        "{stderr}"
    );
}

#[test]
fn paths_escaping_the_root_are_refused() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("ckpts");
    fs::create_dir_all(&root).unwrap();
    qwen(&base.path().join("elsewhere"));
    std::os::unix::fs::symlink(base.path().join("elsewhere"), root.join("sneaky")).unwrap();
    for (model, needle) in [
        ("../elsewhere", "escapes the root"),
        ("/etc", "absolute"),
        ("sneaky", "outside the root"),
    ] {
        let out = check(&root, &[model]);
        assert_eq!(out.status.code(), Some(1), "{model}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{model}: {stderr}");
    }
    let out = check(&root, &["not-there"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing is downloaded"));
}

#[test]
fn truncated_and_mislabelled_weights_are_caught() {
    let root = tempfile::tempdir().unwrap();
    qwen(&root.path().join("vlm"));
    let shard = root.path().join("vlm/model-00001-of-00002.safetensors");
    let bytes = fs::read(&shard).unwrap();
    fs::write(&shard, &bytes[..bytes.len() - 17]).unwrap();
    let out = check(root.path(), &["vlm"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("model-00001-of-00002.safetensors") && stderr.contains("truncated"),
        "{stderr}"
    );
    // A PNG saved under a weights name.
    let png = root.path().join("picture.png");
    keyframe(&png, 8, 8, 1);
    fs::copy(&png, &shard).unwrap();
    let out = check(root.path(), &["vlm"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a valid safetensors file"), "{stderr}");
}

#[test]
fn a_folder_of_an_unknown_kind_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("llama");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("config.json"), r#"{"model_type":"llama"}"#).unwrap();
    let out = check(root.path(), &["llama"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("model_type \"llama\"") && stderr.contains("qwen2_5_vl"),
        "{stderr}"
    );
}
