//! `kubewan-runner bench …` on the CPU with tiny configs: every command builds
//! its random-weight model, runs its timed rows and prints the event lines the
//! GPU benchmark driver (scripts/gpu-bench/run.py) reads, so the prepared GPU
//! command cannot rot while no GPU is at hand.

mod common;

use common::*;
use serde_json::Value;

const TINY_WAN: &str = "models/wan/tests/data/tiny-flf2v/model";

/// Runs `bench ARGS --device cpu` and returns its event lines.
fn bench(args: &[&str]) -> Vec<Value> {
    let out = runner()
        .arg("bench")
        .args(args)
        .args(["--device", "cpu"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// The (row, event) pairs in order, and the end events by row.
fn events(lines: &[Value]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| {
            (
                l["row"].as_str().unwrap().to_owned(),
                l["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn end<'a>(lines: &'a [Value], row: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["row"] == row && l["event"] == "end")
        .unwrap_or_else(|| panic!("no end event for {row}: {lines:?}"))
}

#[test]
fn dit_rows_time_a_guided_step_per_size() {
    let config = format!("{TINY_WAN}/transformer/config.json");
    let lines = bench(&[
        "dit",
        "--row",
        "dit",
        "--config",
        &config,
        "--size",
        "small=64x48x9",
        "--size",
        "wide=96x48x5",
    ]);
    let rows: Vec<_> = events(&lines);
    assert_eq!(
        rows,
        [
            ("dit-small".into(), "start".into()),
            ("dit-small".into(), "end".into()),
            ("dit-small".into(), "check".into()),
            ("dit-wide".into(), "start".into()),
            ("dit-wide".into(), "end".into()),
            ("dit-wide".into(), "check".into()),
        ]
    );
    let small = end(&lines, "dit-small");
    // 9 frames -> 3 latent frames of 6 x 8, patches of 2 x 2: 3 x 3 x 4 tokens
    assert_eq!(small["tokens"], 36);
    assert!(small["seconds"].as_f64().unwrap() > 0.0);
    assert!(
        lines
            .iter()
            .filter(|l| l["event"] == "check")
            .all(|l| l["finite"] == true)
    );
}

#[test]
fn vae_umt5_and_attention_rows_run() {
    let vae = bench(&[
        "vae-decode",
        "--row",
        "vae",
        "--config",
        &format!("{TINY_WAN}/vae/config.json"),
        "--size",
        "s=32x32x5",
    ]);
    assert_eq!(end(&vae, "vae-s")["frames"], 5);
    let umt5 = bench(&[
        "umt5",
        "--row",
        "umt5",
        "--config",
        &format!("{TINY_WAN}/text_encoder/config.json"),
        "--tokens",
        "16",
    ]);
    assert_eq!(end(&umt5, "umt5")["tokens"], 16);
    // The CPU has no flash attention: one row timing the attention every
    // model calls (the tiled path), with its fastest run as the summary.
    let attention = bench(&[
        "attention",
        "--row",
        "a",
        "--heads",
        "2",
        "--tokens",
        "40",
        "--head-dim",
        "16",
    ]);
    assert_eq!(
        events(&attention),
        [
            ("a-cpu".into(), "start".into()),
            ("a-cpu".into(), "end".into()),
            ("a-cpu".into(), "summary".into())
        ]
    );
}

#[test]
fn vlm_rows_load_prefill_generate_and_release() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("vlm");
    let out = runner()
        .args(["bench", "write-vlm"])
        .arg(&model)
        .args(["--shape", "tiny"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let image = dir.path().join("k.png");
    keyframe(&image, 96, 64, 7);
    let image = image.to_str().unwrap();
    let lines = bench(&[
        "vlm",
        "--row",
        "vlm",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image,
        "--image",
        image,
        "--max-new-tokens",
        "4",
    ]);
    let rows: Vec<String> = events(&lines)
        .into_iter()
        .map(|(r, e)| format!("{r}/{e}"))
        .collect();
    assert_eq!(
        rows,
        [
            "vlm-load/start",
            "vlm-load/end",
            "vlm-prefill/start",
            "vlm-prefill/end",
            "vlm-generate/start",
            "vlm-generate/end",
            "vlm-release/check",
        ]
    );
    assert!(end(&lines, "vlm-load")["weight_bytes"].as_u64().unwrap() > 0);
    let new_tokens = end(&lines, "vlm-generate")["new_tokens"].as_u64().unwrap();
    assert!((1..=4).contains(&new_tokens));
}
