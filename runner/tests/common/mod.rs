//! Helpers shared by the runner's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kubewan_crds::task::{Stage, Task};
use kubewan_crds::{Plan, TravelJobSpec};

pub fn runner() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kubewan-runner"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A plan from a spec written as YAML lines (volumes added).
pub fn plan(spec_yaml: &str) -> Plan {
    let yaml = format!(
        "{spec_yaml}\ncheckpoints: {{hostPath: {{path: /c}}}}\ninputs: {{hostPath: {{path: /i}}}}\noutput: {{volume: {{hostPath: {{path: /o}}}}}}\n"
    );
    let spec: TravelJobSpec = serde_saphyr::from_str(&yaml).unwrap();
    kubewan_crds::validate::validate(&spec).unwrap();
    Plan::from_spec(&spec)
}

pub fn task(plan: &Plan, stage: Stage, segment: Option<u32>) -> Task {
    Task {
        job: "default/t".into(),
        stage,
        segment,
        plan: plan.clone(),
        output_dir: "default/t".into(),
    }
}

/// A keyframe PNG: a smooth gradient tinted by `seed`.
pub fn keyframe(path: &Path, w: u32, h: u32, seed: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 255) / w) as u8 ^ seed,
            ((y * 255) / h) as u8,
            seed.wrapping_mul(3),
        ])
    });
    img.save(path).unwrap();
}

pub struct Volumes {
    pub dir: tempfile::TempDir,
}

impl Volumes {
    pub fn new() -> Volumes {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["ckpts", "inputs", "output"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Volumes { dir }
    }
    pub fn ckpts(&self) -> PathBuf {
        self.dir.path().join("ckpts")
    }
    pub fn inputs(&self) -> PathBuf {
        self.dir.path().join("inputs")
    }
    pub fn output(&self) -> PathBuf {
        self.dir.path().join("output")
    }
    pub fn job_dir(&self) -> PathBuf {
        self.output().join("default/t")
    }
    pub fn termination_log(&self) -> PathBuf {
        self.dir.path().join("termination-log")
    }

    /// Runs `run-task` with `task_json` and these volumes.
    pub fn run_task(&self, task_json: &str) -> Output {
        self.run_task_with_output(task_json, &self.output())
    }

    pub fn run_task_with_output(&self, task_json: &str, output: &Path) -> Output {
        runner()
            .arg("run-task")
            .env("KUBEWAN_TASK", task_json)
            .env("KUBEWAN_CKPTS", self.ckpts())
            .env("KUBEWAN_INPUTS", self.inputs())
            .env("KUBEWAN_OUTPUT", output)
            .env("KUBEWAN_TERMINATION_LOG", self.termination_log())
            .output()
            .unwrap()
    }

    pub fn termination_report(&self) -> kubewan_crds::RunReport {
        let text = std::fs::read_to_string(self.termination_log()).expect("a termination message");
        assert!(
            text.len() < 4096,
            "termination message of {} bytes",
            text.len()
        );
        serde_json::from_str(&text).expect("the termination message is a report")
    }
}

pub fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// No file in `dir` (recursively) looks like a partial or finished video.
pub fn no_videos(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return true;
    };
    entries.flatten().all(|e| {
        let p = e.path();
        if p.is_dir() {
            return no_videos(&p);
        }
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        !(name.ends_with(".mp4") || name.ends_with(".partial"))
    })
}
