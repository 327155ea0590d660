//! The chart's `helm test` checks the checkpoints volume with the runner image
//! (it passes on the complete tiny checkpoints and fails, naming the file, when
//! one is missing), and every example manifest is valid for the API server
//! (CRD schema, built-in kinds) and for the operator's own validation.

use std::path::{Path, PathBuf};
use std::process::Command;

use kubewan_crds::TravelJob;
use kubewan_e2e::*;

/// `helm test kubewan --logs`: (succeeded, stdout + stderr).
fn helm_test() -> (bool, String) {
    require_cluster();
    let out = Command::new("helm")
        .args([
            "test",
            "kubewan",
            "-n",
            RELEASE_NS,
            "--logs",
            "--timeout",
            "2m",
        ])
        .output()
        .expect("helm on PATH (~/.cache/kubewan/tools/bin)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    (out.status.success(), text)
}

/// Moves a file away and back, whatever the test does in between.
struct Hidden {
    path: PathBuf,
    away: PathBuf,
}

impl Hidden {
    fn new(path: PathBuf) -> Hidden {
        let away = path.with_extension("hidden-by-e2e");
        std::fs::rename(&path, &away).unwrap();
        Hidden { path, away }
    }
}

impl Drop for Hidden {
    fn drop(&mut self) {
        std::fs::rename(&self.away, &self.path).unwrap();
    }
}

#[test]
fn helm_test_passes_on_complete_checkpoints_and_names_a_missing_file() {
    let (ok, text) = helm_test();
    assert!(ok, "helm test on the complete tiny checkpoints: {text}");
    assert!(text.contains("Phase:          Succeeded"), "{text}");
    for model in ["tiny/qwen2.5-vl", "tiny/wan2.1-flf2v"] {
        assert!(text.contains(&format!("ok: model \"{model}\"")), "{text}");
    }

    let ckpts = host_root().join("var/lib/kubewan/ckpts");
    let missing = ckpts.join("tiny/wan2.1-flf2v/vae/config.json");
    {
        let _hidden = Hidden::new(missing.clone());
        let (ok, text) = helm_test();
        assert!(!ok, "helm test must fail without {}", missing.display());
        assert!(text.contains("Phase:          Failed"), "{text}");
        assert!(
            text.contains("missing: /ckpts/tiny/wan2.1-flf2v/vae/config.json"),
            "the runner's message names the file: {text}"
        );
        assert!(text.contains("ok: model \"tiny/qwen2.5-vl\""), "{text}");
    }
    let (ok, text) = helm_test();
    assert!(ok, "helm test after restoring the file: {text}");
}

fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The TravelJobs among a file's documents.
fn travel_jobs(path: &Path) -> Vec<TravelJob> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("\n---")
        .filter(|doc| doc.contains("kind: TravelJob"))
        .map(|doc| {
            serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

#[test]
fn every_example_is_accepted_by_the_api_server_and_the_operators_validation() {
    let files = example_files();
    for expected in [
        "storage.yaml",
        "preview.yaml",
        "flf2v-14b.yaml",
        "flf2v-14b-parallel.yaml",
        "kueue.yaml",
        "traveljob.yaml",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(expected)),
            "examples/{expected}"
        );
    }
    for file in &files {
        // The API server validates every object: TravelJobs against the CRD's
        // schema, PVCs against the built-in one.
        let out = kubectl_ok(&[
            "apply",
            "--dry-run=server",
            "-n",
            "default",
            "-f",
            file.to_str().unwrap(),
        ]);
        println!("{}: {}", file.display(), out.trim());
        assert!(out.contains("(server dry run)"), "{out}");
        for job in travel_jobs(file) {
            if let Err(errors) = kubewan_crds::validate::validate(&job.spec) {
                panic!("{}: {errors}", file.display());
            }
        }
    }
    // The chart's `helm test` checks the models the real examples use.
    let values = std::fs::read_to_string(repo_root().join("charts/kubewan/values.yaml")).unwrap();
    for file in ["flf2v-14b.yaml", "flf2v-14b-parallel.yaml", "kueue.yaml"] {
        for job in travel_jobs(&repo_root().join("examples").join(file)) {
            for model in [&job.spec.enhance_prompt.model, &job.spec.model.name] {
                assert!(
                    values.contains(&format!("    - {model}\n")),
                    "{file} uses {model}, which charts/kubewan/values.yaml checkpoints.models does not name"
                );
            }
        }
    }
}
