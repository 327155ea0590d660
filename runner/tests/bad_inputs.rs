//! The bad-input catalogue (`tests/bad-inputs/<case>/case.yaml`): inputs a
//! careless or hostile user gives `local`, `run-task`, `check-ckpts`,
//! `vlm generate` and `video generate`. Each case is run in a fresh sandbox
//! (checkpoint, inputs and output folders, a work folder and a folder
//! outside them all) and must end as its `expect` says, and also:
//!
//! - no panic and no abort: the exit code is the expected one (1 for a
//!   refused input, with the failure report for `run-task`), never 101 or a
//!   signal, and nothing on stderr says "panicked";
//! - no hang: the run is killed after [`TIMEOUT`];
//! - bounded memory: the run's address space is capped at [`ADDRESS_SPACE`]
//!   (RLIMIT_AS), so an allocation past it aborts, and fails the case;
//! - nothing written outside the output folder: every other file of the
//!   sandbox is the same before and after (work and inputs included);
//! - no temporary left: no `.partial` or write-probe file anywhere.
//!
//! Set `BAD_INPUTS_RUNNER=/path/to/kubewan-runner` to run the catalogue
//! against another build (e.g. an older one, to see what it did), and
//! `BAD_INPUTS_ONLY=<substring>` to run some cases.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kubewan_crds::spec::ComputeDevice;
use kubewan_crds::{Plan, StepId, TravelJob};
use serde::Deserialize;

/// A run taking longer has hung (the slowest case takes a few seconds).
const TIMEOUT: Duration = Duration::from_secs(60);
/// The address-space cap of every run (RLIMIT_AS): every case runs in
/// under 160 MiB of address space here (debug build, tiny models); 1 GiB
/// leaves room for other machines, while a case that allocated frames ×
/// pixels, a whole /dev/zero or attention over a huge prompt needs far more.
const ADDRESS_SPACE: u64 = 1 << 30;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Case {
    /// What the input is and what went wrong with it before.
    about: String,
    /// The class: crash, memory, hang, writes, check-ckpts, validation.
    class: String,
    /// run-task, local, check-ckpts, vlm, video.
    run: String,
    /// run-task: the job spec (YAML) the task is planned from...
    #[serde(default)]
    spec: Option<String>,
    /// ...and the step it runs (`prompts`, `segment-<i>`, `stitch`).
    #[serde(default)]
    step: Option<String>,
    /// run-task: the task JSON as given (instead of spec + step).
    #[serde(default)]
    task_json: Option<String>,
    /// Arguments of the other commands (placeholders: {case} {ckpts} {inputs} {output} {work} {outside}).
    #[serde(default)]
    args: Vec<String>,
    /// What the sandbox holds before the run.
    #[serde(default)]
    setup: Vec<Setup>,
    /// RLIMIT_FSIZE of the run, in bytes: a full disk.
    #[serde(default)]
    file_size_limit: Option<u64>,
    expect: Expect,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Expect {
    exit: i32,
    /// A fragment of the failure report's message (run-task) or of stderr.
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
enum Setup {
    /// A 96×64 gradient PNG.
    Keyframe(String),
    /// A text file.
    Write { to: String, text: String },
    /// A file of the case folder, copied.
    Copy { from: String, to: String },
    /// A FIFO (nobody ever writes to it).
    Fifo(String),
    /// A symlink (`to` may use the placeholders).
    Symlink { link: String, to: String },
    /// Tiny checkpoints under `ckpts/tiny/`.
    TinyCkpts,
    /// A step of the job run first, which must succeed (e.g. the segments a stitch reads).
    RunStep(String),
    /// Bytes overwritten at an offset (negative: from the end).
    Corrupt {
        file: String,
        at: i64,
        bytes: Vec<u8>,
    },
    /// A file cut to `to` bytes.
    Truncate { file: String, to: u64 },
    /// A PNG whose header claims `width`×`height` (the pixel data is not there).
    PngHeader { to: String, width: u32, height: u32 },
    /// A JSON file with some top-level keys replaced (`null` removes one).
    EditJson {
        file: String,
        set: BTreeMap<String, serde_json::Value>,
    },
    /// A safetensors file with `header` (JSON) and `data` zero bytes.
    Safetensors {
        to: String,
        header: String,
        data: u64,
    },
    /// A file or folder removed.
    Remove(String),
    /// A file or folder moved (`to` may use the placeholders).
    Move { from: String, to: String },
    /// A 96×64 JPEG (under whatever name it is given).
    Jpeg(String),
}

struct Sandbox {
    dir: tempfile::TempDir,
    case_dir: PathBuf,
}

impl Sandbox {
    fn new(case_dir: &Path) -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["ckpts", "inputs", "output", "work", "outside"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Sandbox {
            dir,
            case_dir: case_dir.to_owned(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(self.fill(rel))
    }

    /// The placeholders filled: {case} {ckpts} {inputs} {output} {work}
    /// {outside}, and {long:N} (N times "x").
    fn fill(&self, text: &str) -> String {
        let root = self.dir.path();
        let mut text = text.to_owned();
        while let Some(start) = text.find("{long:") {
            let end = start + text[start..].find('}').expect("a closing brace");
            let n: usize = text[start + 6..end].parse().expect("{long:N}");
            text.replace_range(start..=end, &"x".repeat(n));
        }
        text.replace("{case}", &self.case_dir.display().to_string())
            .replace("{ckpts}", &root.join("ckpts").display().to_string())
            .replace("{inputs}", &root.join("inputs").display().to_string())
            .replace("{output}", &root.join("output").display().to_string())
            .replace("{work}", &root.join("work").display().to_string())
            .replace("{outside}", &root.join("outside").display().to_string())
    }

    fn termination_log(&self) -> PathBuf {
        self.dir.path().join("termination-log")
    }

    /// Every path of the sandbox but the output folder, with size and mtime.
    fn snapshot(&self) -> BTreeMap<PathBuf, (u64, i64, i64)> {
        let mut files = BTreeMap::new();
        let skip = [self.dir.path().join("output"), self.termination_log()];
        walk(self.dir.path(), &mut |p| {
            if skip.iter().any(|s| p.starts_with(s)) {
                return;
            }
            if let Ok(m) = std::fs::symlink_metadata(p) {
                files.insert(p.to_owned(), (m.len(), m.mtime(), m.mtime_nsec()));
            }
        });
        files
    }
}

/// Visits every path under `dir` (symlinks not followed).
fn walk(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        visit(&path);
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, visit);
        }
    }
}

fn runner_binary() -> PathBuf {
    std::env::var_os("BAD_INPUTS_RUNNER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kubewan-runner")))
}

/// The task JSON of `step` of the job `spec`, planned as the operator would,
/// on the CPU (`spec.runner.device: cpu`: the runner under test is a CPU build).
fn task_json(spec: &str, step: &str) -> String {
    let mut job: TravelJob = serde_saphyr::from_str(&format!(
        "apiVersion: kubewan.dev/v1alpha1\nkind: TravelJob\nmetadata: {{name: t, namespace: default}}\nspec:\n{}  checkpoints: {{hostPath: {{path: /c}}}}\n  inputs: {{hostPath: {{path: /i}}}}\n  output: {{volume: {{hostPath: {{path: /o}}}}}}\n",
        spec.lines().map(|l| format!("  {l}\n")).collect::<String>()
    ))
    .expect("the case's spec parses");
    job.spec.runner.device = ComputeDevice::Cpu;
    let plan = Plan::validated(&job.spec).expect("the case's spec is valid");
    let step: StepId = serde_json::from_value(match step.split_once('-') {
        Some((stage, i)) => {
            serde_json::json!({"stage": stage, "segment": i.parse::<u32>().unwrap()})
        }
        None => serde_json::json!({"stage": step}),
    })
    .expect("a step");
    serde_json::to_string(&kubewan_crds::Task::new(&job, &plan, step)).unwrap()
}

/// The runner's command for `case` in `sandbox` (run-task gets `task`).
fn command(case: &Case, sandbox: &Sandbox, task: Option<&str>) -> Command {
    let mut cmd = Command::new(runner_binary());
    let root = sandbox.dir.path();
    cmd.current_dir(root.join("work"))
        .env("HOME", root.join("work"))
        .env("KUBEWAN_NO_NVML", "1")
        .env_remove("KUBEWAN_TASK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match case.run.as_str() {
        "run-task" => {
            cmd.arg("run-task")
                .env("KUBEWAN_TASK", task.unwrap_or_default())
                .env("KUBEWAN_CKPTS", root.join("ckpts"))
                .env("KUBEWAN_INPUTS", root.join("inputs"))
                .env("KUBEWAN_OUTPUT", root.join("output"))
                .env("KUBEWAN_TERMINATION_LOG", sandbox.termination_log());
        }
        "local" | "check-ckpts" => {
            cmd.arg(&case.run);
        }
        "vlm" | "video" => {
            cmd.arg(&case.run).arg("generate");
        }
        other => panic!("unknown command {other:?}"),
    }
    cmd.args(case.args.iter().map(|a| sandbox.fill(a)));
    cmd
}

/// A PNG of `width`×`height` according to its header, with one empty IDAT.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut png, b"IEND", &[]);
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn set_up(case: &Case, sandbox: &Sandbox) -> Result<(), String> {
    for step in &case.setup {
        let parent = |p: &Path| std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        match step {
            Setup::Keyframe(to) => {
                let path = sandbox.path(to);
                parent(&path);
                common::keyframe(&path, 96, 64, path.to_string_lossy().len() as u8);
            }
            Setup::Write { to, text } => {
                let path = sandbox.path(to);
                parent(&path);
                std::fs::write(&path, sandbox.fill(text)).unwrap();
            }
            Setup::Copy { from, to } => {
                let path = sandbox.path(to);
                parent(&path);
                std::fs::copy(sandbox.case_dir.join(from), &path).unwrap();
            }
            Setup::Fifo(at) => {
                let path = sandbox.path(at);
                parent(&path);
                let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
            }
            Setup::Symlink { link, to } => {
                let path = sandbox.path(link);
                parent(&path);
                std::os::unix::fs::symlink(sandbox.fill(to), &path).unwrap();
            }
            Setup::TinyCkpts => {
                kubewan_runner::tiny::write_tiny_checkpoints(&sandbox.path("ckpts")).unwrap();
            }
            Setup::RunStep(step) => {
                let spec = case
                    .spec
                    .as_deref()
                    .expect("run-step needs the case's spec");
                let out = command(case, sandbox, Some(&task_json(spec, step)))
                    .output()
                    .unwrap();
                if !out.status.success() {
                    return Err(format!("setup step {step} failed: {}", common::text(&out)));
                }
            }
            Setup::Corrupt { file, at, bytes } => {
                let path = sandbox.path(file);
                let mut data = std::fs::read(&path).unwrap();
                let start = if *at < 0 {
                    data.len() - at.unsigned_abs() as usize
                } else {
                    *at as usize
                };
                data[start..start + bytes.len()].copy_from_slice(bytes);
                std::fs::write(&path, data).unwrap();
            }
            Setup::Truncate { file, to } => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(sandbox.path(file))
                    .unwrap()
                    .set_len(*to)
                    .unwrap();
            }
            Setup::PngHeader { to, width, height } => {
                let path = sandbox.path(to);
                parent(&path);
                std::fs::write(&path, png_header(*width, *height)).unwrap();
            }
            Setup::EditJson { file, set } => {
                let path = sandbox.path(file);
                let mut json: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                for (key, value) in set {
                    if value.is_null() {
                        json.remove(key);
                    } else {
                        json.insert(key.clone(), value.clone());
                    }
                }
                std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
            }
            Setup::Safetensors { to, header, data } => {
                let path = sandbox.path(to);
                parent(&path);
                let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
                bytes.extend_from_slice(header.as_bytes());
                bytes.resize(bytes.len() + *data as usize, 0);
                std::fs::write(&path, bytes).unwrap();
            }
            Setup::Move { from, to } => {
                let to = sandbox.path(to);
                parent(&to);
                std::fs::rename(sandbox.path(from), to).unwrap();
            }
            Setup::Jpeg(to) => {
                let path = sandbox.path(to);
                parent(&path);
                image::RgbImage::from_fn(96, 64, |x, y| image::Rgb([x as u8 * 2, y as u8 * 3, 90]))
                    .save_with_format(&path, image::ImageFormat::Jpeg)
                    .unwrap();
            }
            Setup::Remove(what) => {
                let path = sandbox.path(what);
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).unwrap();
                } else {
                    std::fs::remove_file(&path).unwrap();
                }
            }
        }
    }
    Ok(())
}

/// Runs `cmd` with the case's limits; returns (exit code or -signal, stdout, stderr, seconds).
fn run_limited(
    mut cmd: Command,
    file_size_limit: Option<u64>,
) -> Result<(i32, String, String), String> {
    // SAFETY: only async-signal-safe setrlimit calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let cap = |resource, value: u64| {
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            cap(libc::RLIMIT_AS, ADDRESS_SPACE)?;
            cap(libc::RLIMIT_CORE, 0)?;
            if let Some(bytes) = file_size_limit {
                cap(libc::RLIMIT_FSIZE, bytes)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).ok();
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            child.kill().ok();
            child.wait().ok();
            return Err(format!("hung: still running after {TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let code = status
        .code()
        .unwrap_or_else(|| -std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0));
    Ok((code, out_reader.join().unwrap(), err_reader.join().unwrap()))
}

/// Runs one case; Err says how it failed.
fn run_case(case_dir: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(case_dir.join("case.yaml")).unwrap();
    let case: Case = serde_saphyr::from_str(&text).map_err(|e| format!("case.yaml: {e}"))?;
    check_case(&case, case_dir).map_err(|why| format!("({}) {why}", case.about.trim()))
}

fn check_case(case: &Case, case_dir: &Path) -> Result<(), String> {
    assert!(
        [
            "crash",
            "memory",
            "hang",
            "writes",
            "check-ckpts",
            "validation"
        ]
        .contains(&case.class.as_str()),
        "{}: unknown class {:?}",
        case_dir.display(),
        case.class
    );
    let sandbox = Sandbox::new(case_dir);
    set_up(case, &sandbox)?;
    let task = match (&case.task_json, &case.spec, &case.step) {
        (Some(json), _, _) => Some(sandbox.fill(json.trim())),
        (None, Some(spec), Some(step)) => Some(task_json(spec, step)),
        _ => None,
    };
    let before = sandbox.snapshot();
    let (code, stdout, stderr) = run_limited(
        command(case, &sandbox, task.as_deref()),
        case.file_size_limit,
    )?;
    let shown = || format!("exit {code}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    if code == 101 || code < 0 || stderr.contains("panicked") {
        return Err(format!("panicked or aborted:\n{}", shown()));
    }
    if code != case.expect.exit {
        return Err(format!(
            "exit {code}, expected {}:\n{}",
            case.expect.exit,
            shown()
        ));
    }
    let said = if case.run == "run-task" {
        let report = std::fs::read_to_string(sandbox.termination_log())
            .map_err(|e| format!("no termination report ({e}):\n{}", shown()))?;
        if report.len() >= 4096 {
            return Err(format!("termination report of {} bytes", report.len()));
        }
        let report: kubewan_crds::RunReport = serde_json::from_str(&report)
            .map_err(|e| format!("the termination report does not parse: {e}: {report}"))?;
        if report.ok != (case.expect.exit == 0) {
            return Err(format!("report ok = {}:\n{}", report.ok, shown()));
        }
        report.message.unwrap_or_default()
    } else {
        stderr.clone()
    };
    if let Some(fragment) = &case.expect.message
        && !said.contains(&sandbox.fill(fragment))
    {
        return Err(format!(
            "the message does not say {fragment:?}: {said}\n{}",
            shown()
        ));
    }
    let after = sandbox.snapshot();
    let changed: Vec<String> = after
        .iter()
        .filter(|(p, m)| before.get(*p) != Some(m))
        .map(|(p, _)| format!("{} (written)", p.display()))
        .chain(
            before
                .keys()
                .filter(|p| !after.contains_key(*p))
                .map(|p| format!("{} (removed)", p.display())),
        )
        .collect();
    if !changed.is_empty() {
        return Err(format!(
            "changed outside the output folder: {}",
            changed.join(", ")
        ));
    }
    let mut leftovers = Vec::new();
    walk(sandbox.dir.path(), &mut |p| {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if name.ends_with(".partial") || name.starts_with(".kubewan-write-test") {
            leftovers.push(p.display().to_string());
        }
    });
    if !leftovers.is_empty() {
        return Err(format!("temporary files left: {}", leftovers.join(", ")));
    }
    Ok(())
}

#[test]
fn every_bad_input_is_refused_with_a_clear_error_and_no_harm() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-inputs");
    let only = std::env::var("BAD_INPUTS_ONLY").unwrap_or_default();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("case.yaml").is_file())
        .filter(|p| p.to_string_lossy().contains(&only))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases under {}", root.display());
    let mut failed = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let start = Instant::now();
        let outcome = run_case(case);
        eprintln!(
            "{} {name} ({:.1}s){}",
            if outcome.is_ok() { "ok  " } else { "FAIL" },
            start.elapsed().as_secs_f64(),
            outcome
                .as_ref()
                .err()
                .map(|e| format!(": {}", e.lines().next().unwrap_or("")))
                .unwrap_or_default()
        );
        if let Err(why) = outcome {
            failed.push(format!("{name}: {why}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n\n")
    );
}
