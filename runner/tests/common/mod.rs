//! Helpers shared by the runner's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kubewan_crds::task::Task;
use kubewan_crds::{Plan, StepId, TravelJob, TravelJobSpec, TravelJobStatus};

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

/// The task of `step` of job `default/t`.
pub fn task(plan: &Plan, step: StepId) -> Task {
    Task {
        job: "default/t".into(),
        step,
        gpu: false,
        plan: plan.clone(),
        output_dir: "default/t".into(),
        memory_limit_bytes: None,
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
        self.run_task_command(task_json, output).output().unwrap()
    }

    /// `run-task` with `task_json`, these volumes and `output`, not started.
    pub fn run_task_command(&self, task_json: &str, output: &Path) -> Command {
        let mut cmd = runner();
        cmd.arg("run-task")
            .env("KUBEWAN_TASK", task_json)
            .env("KUBEWAN_CKPTS", self.ckpts())
            .env("KUBEWAN_INPUTS", self.inputs())
            .env("KUBEWAN_OUTPUT", output)
            .env("KUBEWAN_TERMINATION_LOG", self.termination_log());
        cmd
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

/// What `kubewan-runner local` prints on stdout.
#[derive(serde::Deserialize)]
pub struct Printed {
    pub status: TravelJobStatus,
}

/// A local run's outcome: the process output and the status it printed.
pub struct LocalRun {
    pub output: Output,
    pub status: TravelJobStatus,
    /// The job's output folder.
    pub job_dir: PathBuf,
}

/// Writes `job` to `work/job.yaml` and runs it with [`run_local`]: tiny
/// checkpoints in `work/ckpts`, outputs in `work/out`.
pub fn run_job(work: &Path, job: &TravelJob, inputs: &Path) -> LocalRun {
    let path = work.join("job.yaml");
    std::fs::write(&path, serde_saphyr::to_string(job).unwrap()).unwrap();
    run_local(&path, &work.join("ckpts"), inputs, &work.join("out"))
}

/// The repository's examples folder: the example's inputs.
pub fn examples() -> PathBuf {
    repo_root().join("examples")
}

/// Runs `kubewan-runner local JOB --quiet` with the checkpoint root `ckpts`
/// (tiny checkpoints written there first), inputs `inputs` and output `out`.
pub fn run_local(job: &Path, ckpts: &Path, inputs: &Path, out: &Path) -> LocalRun {
    let output = runner()
        .arg("local")
        .arg(job)
        .arg("--ckpts")
        .arg(ckpts)
        .arg("--inputs")
        .arg(inputs)
        .arg("--out")
        .arg(out)
        .arg("--tiny-ckpts")
        .arg("--quiet")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let status = serde_saphyr::from_str::<Printed>(&stdout)
        .unwrap_or_else(|e| panic!("the printed status does not parse: {e}\n{}", text(&output)))
        .status;
    let job = kubewan_runner::local::load_job(job).unwrap();
    LocalRun {
        job_dir: out.join(job.output_dir()),
        output,
        status,
    }
}

/// (frames, width, height, codec) of a video as ffprobe, an independent
/// decoder, counts them.
pub fn ffprobe(path: &Path) -> (u64, u64, u64, String) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "ffprobe is needed to check the video independently ({e}); install it with `apt-get install -y ffmpeg`"
            )
        });
    assert!(
        out.status.success(),
        "ffprobe rejects {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["streams"][0];
    let num = |k: &str| {
        s[k].as_u64()
            .or_else(|| s[k].as_str().and_then(|t| t.parse().ok()))
            .unwrap_or_else(|| panic!("ffprobe gave no {k}: {v}"))
    };
    (
        num("nb_read_frames"),
        num("width"),
        num("height"),
        s["codec_name"].as_str().unwrap_or("").to_owned(),
    )
}

/// Every frame of a video as RGB8 bytes, decoded by ffmpeg.
pub fn ffmpeg_frames(path: &Path, width: u32, height: u32) -> Vec<Vec<u8>> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .expect("ffmpeg decodes the videos independently (apt-get install -y ffmpeg)");
    assert!(out.status.success(), "ffmpeg rejects {}", path.display());
    out.stdout
        .chunks(width as usize * height as usize * 3)
        .map(<[u8]>::to_vec)
        .collect()
}

/// Mean absolute difference of two RGB8 frames, in levels of 0..255.
pub fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y) as f64)
        .sum::<f64>()
        / a.len() as f64
}
