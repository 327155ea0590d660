//! `check-ckpts`: one error naming the model, the root, the folder and every
//! missing file; escapes refused; broken weight files caught; exactly the
//! files the model loaders read are required (their catalogues).

mod common;

use std::fs;
use std::path::Path;

use common::*;

/// A Qwen2.5-VL folder in the Hugging Face layout (the tiny checkpoint:
/// real configs and tokenizer, weights in three shards, the chat template in
/// `chat_template.json`).
fn qwen(dir: &Path) {
    kubewan_qwen2_5_vl::write_tiny_checkpoint(dir, 0).unwrap();
}

/// A Wan2.1 FLF2V folder in the diffusers layout (the tiny checkpoint).
fn wan(dir: &Path) {
    kubewan_wan::write_tiny_checkpoint(dir, 0).unwrap();
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
    fs::remove_file(root.path().join("vlm/model-00002-of-00003.safetensors")).unwrap();
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
        stderr.contains("model-00002-of-00003.safetensors"),
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
    let shard = root.path().join("vlm/model-00001-of-00003.safetensors");
    let bytes = fs::read(&shard).unwrap();
    fs::write(&shard, &bytes[..bytes.len() - 17]).unwrap();
    let out = check(root.path(), &["vlm"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("model-00001-of-00003.safetensors") && stderr.contains("truncated"),
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

#[test]
fn the_chat_template_may_be_in_any_file_the_loader_reads_it_from() {
    let root = tempfile::tempdir().unwrap();
    let vlm = root.path().join("vlm");
    qwen(&vlm);
    // chat_template.json holds it
    let out = check(root.path(), &["vlm"]);
    assert!(out.status.success(), "{}", text(&out));
    // the template kept in tokenizer_config.json (older releases)
    fs::rename(
        vlm.join("chat_template.json"),
        vlm.join("tokenizer_config.json"),
    )
    .unwrap();
    let out = check(root.path(), &["vlm"]);
    assert!(out.status.success(), "{}", text(&out));
    // none of the three: every alternative is named, with what it is for
    fs::remove_file(vlm.join("tokenizer_config.json")).unwrap();
    let out = check(root.path(), &["vlm"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for name in [
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer_config.json",
        "the chat template",
    ] {
        assert!(stderr.contains(name), "{name}: {stderr}");
    }
}

/// A real `transformer/config.json`, with or without the image branch.
fn transformer_config(dir: &Path, image_dim: Option<usize>) {
    let image = image_dim.map_or(String::new(), |d| format!(r#","image_dim":{d}"#));
    fs::write(
        dir.join("transformer/config.json"),
        format!(
            r#"{{"num_attention_heads":2,"attention_head_dim":12,"in_channels":36,"out_channels":16,"text_dim":32,"freq_dim":16,"ffn_dim":48,"num_layers":1{image}}}"#
        ),
    )
    .unwrap();
}

#[test]
fn wan_needs_the_fast_tokenizer_and_clip_only_with_an_image_branch() {
    let root = tempfile::tempdir().unwrap();
    let video = root.path().join("video");
    wan(&video);
    // spiece.model is not read: the tokenizer is tokenizer.json
    fs::rename(
        video.join("tokenizer/tokenizer.json"),
        video.join("tokenizer/spiece.model"),
    )
    .unwrap();
    let out = check(root.path(), &["video"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tokenizer/tokenizer.json (the UMT5 tokenizer"),
        "{stderr}"
    );
    fs::rename(
        video.join("tokenizer/spiece.model"),
        video.join("tokenizer/tokenizer.json"),
    )
    .unwrap();
    // no image branch: no CLIP encoder read, none required
    transformer_config(&video, None);
    fs::remove_dir_all(video.join("image_encoder")).unwrap();
    fs::remove_dir_all(video.join("image_processor")).unwrap();
    let out = check(root.path(), &["video"]);
    assert!(out.status.success(), "{}", text(&out));
    // an image branch: CLIP's config, weights and image processor are required
    transformer_config(&video, Some(64));
    let out = check(root.path(), &["video"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for file in [
        "image_encoder/config.json",
        "image_encoder/model.safetensors",
        "image_processor/preprocessor_config.json",
    ] {
        assert!(stderr.contains(file), "{file}: {stderr}");
    }
}

#[test]
fn wan22_needs_its_low_noise_expert_and_a_usable_index() {
    let root = tempfile::tempdir().unwrap();
    let video = root.path().join("video");
    wan(&video);
    transformer_config(&video, None);
    fs::remove_dir_all(video.join("image_encoder")).unwrap();
    fs::remove_dir_all(video.join("image_processor")).unwrap();
    // the tiny Wan2.1 index with Wan2.2's boundary and second transformer
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(video.join("model_index.json")).unwrap()).unwrap();
    index["boundary_ratio"] = serde_json::json!(0.9);
    index["transformer_2"] = serde_json::json!(["diffusers", "WanTransformer3DModel"]);
    index["image_encoder"] = serde_json::json!([null, null]);
    index["image_processor"] = serde_json::json!([null, null]);
    let index = index.to_string();
    fs::write(video.join("model_index.json"), &index).unwrap();
    let out = check(root.path(), &["video"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for file in [
        "transformer_2/config.json",
        "transformer_2/diffusion_pytorch_model.safetensors",
    ] {
        assert!(stderr.contains(file), "{file}: {stderr}");
    }
    fs::create_dir_all(video.join("transformer_2")).unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        fs::copy(
            video.join("transformer").join(file),
            video.join("transformer_2").join(file),
        )
        .unwrap();
    }
    let out = check(root.path(), &["video"]);
    assert!(out.status.success(), "{}", text(&out));
    // Wan2.2 TI2V-5B's per-token timesteps are refused by name
    fs::write(
        video.join("model_index.json"),
        index.replace("\"boundary_ratio\":0.9", "\"expand_timesteps\":true"),
    )
    .unwrap();
    let out = check(root.path(), &["video"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expand_timesteps"), "{stderr}");
}
