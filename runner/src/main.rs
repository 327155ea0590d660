//! `kubewan-runner`: see `kubewan-runner --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kubewan_model_common::device::DeviceChoice;
use kubewan_runner::ckpts::{CKPTS_DEFAULT, CKPTS_ENV, CkptRoot};
use kubewan_runner::local::{LocalOptions, run_local};
use kubewan_runner::report::{TERMINATION_LOG_DEFAULT, TERMINATION_LOG_ENV};
use kubewan_runner::stages::Mounts;
use kubewan_runner::{bench, logging, panics, stop, task, tiny, video_cli, vlm_cli};

#[derive(Parser, Debug)]
#[command(
    name = "kubewan-runner",
    version,
    about = "kubewan's runner: generates travel-between-images video segments, stitches them, measures memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pod entry point: run the task in $KUBEWAN_TASK against the mounted volumes.
    RunTask {
        /// Checkpoint root (read-only).
        #[arg(long, env = CKPTS_ENV, default_value = CKPTS_DEFAULT)]
        ckpts: PathBuf,
        /// Inputs volume (keyframes).
        #[arg(long, env = "KUBEWAN_INPUTS", default_value = kubewan_crds::task::INPUTS_MOUNT)]
        inputs: PathBuf,
        /// Output volume.
        #[arg(long, env = "KUBEWAN_OUTPUT", default_value = kubewan_crds::task::OUTPUT_MOUNT)]
        output: PathBuf,
        /// Where the bounded report goes (the kubelet's termination message file).
        #[arg(long, env = TERMINATION_LOG_ENV, default_value = TERMINATION_LOG_DEFAULT)]
        termination_log: PathBuf,
    },
    /// Run a TravelJob on this machine (no cluster, no GPU needed with model `preview`).
    Local {
        /// The TravelJob manifest (or its spec) as YAML.
        job: PathBuf,
        /// Checkpoint root [default: $KUBEWAN_CKPTS, /ckpts, or ~/.cache/kubewan/tiny-ckpts with --tiny-ckpts].
        #[arg(long)]
        ckpts: Option<PathBuf>,
        /// Output volume [default: ./kubewan-output].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Inputs volume (keyframes) [default: the job file's folder].
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// Write tiny random-weight checkpoints into the checkpoint root first, when missing.
        #[arg(long)]
        tiny_ckpts: bool,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
        /// Where the models compute: auto, cpu, cuda or cuda:N [default: as
        /// the job's spec.runner.device says, like its pods: gpu → cuda:0].
        #[arg(long)]
        device: Option<DeviceChoice>,
    },
    /// Check model folders under a checkpoint root; names every missing file.
    CheckCkpts {
        #[arg(long, env = CKPTS_ENV, default_value = CKPTS_DEFAULT)]
        ckpts: PathBuf,
        /// Model folder(s), relative to the root.
        #[arg(long = "model", required = true, num_args = 1..)]
        models: Vec<String>,
    },
    /// Write tiny random-weight checkpoints (real layouts) into DIR.
    TinyCkpts { dir: PathBuf },
    /// Qwen2.5-VL developer commands.
    #[command(subcommand)]
    Vlm(vlm_cli::VlmCommand),
    /// Wan2.1 developer commands.
    #[command(subcommand)]
    Video(video_cli::VideoCommand),
    /// The runner's side of the GPU benchmark (scripts/gpu-bench/run.py).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::from(1)
}

fn tiny_default() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/kubewan/tiny-ckpts")
}

fn main() -> ExitCode {
    stop::on_termination_signals();
    panics::install_hook();
    // Past a file size limit (RLIMIT_FSIZE) a write fails with EFBIG and is
    // reported like a full disk, instead of the signal killing the process.
    // SAFETY: setting a signal's disposition to ignore has no preconditions.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let cli = Cli::parse();
    logging::init(match cli.command {
        Command::RunTask { .. } => "info",
        _ => "warn",
    });
    panics::catch(|| run(cli)).unwrap_or_else(|message| fail(anyhow::anyhow!(message)))
}

fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::RunTask {
            ckpts,
            inputs,
            output,
            termination_log,
        } => {
            let json = std::env::var(kubewan_crds::task::TASK_ENV).ok();
            let code = task::run_task(
                json.as_deref(),
                Mounts {
                    ckpts,
                    inputs,
                    output,
                },
                termination_log,
            );
            ExitCode::from(code as u8)
        }
        Command::Local {
            job,
            ckpts,
            out,
            inputs,
            tiny_ckpts,
            quiet,
            device,
        } => {
            let ckpts = ckpts.unwrap_or_else(|| {
                if tiny_ckpts {
                    tiny_default()
                } else {
                    std::env::var_os(CKPTS_ENV)
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from(CKPTS_DEFAULT))
                }
            });
            if tiny_ckpts {
                match tiny::write_tiny_checkpoints(&ckpts) {
                    Ok(o) => {
                        for w in &o.written {
                            eprintln!("tiny checkpoint written: {w}");
                        }
                        for s in &o.skipped {
                            eprintln!("tiny checkpoint not written: {s}");
                        }
                    }
                    Err(e) => return fail(e),
                }
            }
            let inputs = inputs.unwrap_or_else(|| {
                job.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."))
            });
            let out = out.unwrap_or_else(|| PathBuf::from("kubewan-output"));
            let progress = !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let result = match run_local(&LocalOptions {
                job,
                mounts: Mounts {
                    ckpts,
                    inputs,
                    output: out,
                },
                progress,
                device,
            }) {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            match serde_saphyr::to_string(&result.status) {
                Ok(yaml) => println!("status:\n{}", indent(&yaml)),
                Err(e) => eprintln!("warning: cannot print the status: {e}"),
            }
            eprintln!("job folder: {}", result.job_dir.display());
            if result.ok {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "error: {}",
                    result.status.message.as_deref().unwrap_or("the job failed")
                );
                ExitCode::from(1)
            }
        }
        Command::CheckCkpts { ckpts, models } => {
            let root = match CkptRoot::open(&ckpts) {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            let mut ok = true;
            for model in &models {
                match root.check(model, None) {
                    Ok(m) => println!(
                        "ok: model {model:?} ({}) at {}: {} files, {} of weights",
                        m.kind,
                        m.dir.display(),
                        m.files.len(),
                        kubewan_crds::status::human_bytes(m.weight_bytes)
                    ),
                    Err(e) => {
                        ok = false;
                        eprintln!("error: {e:#}");
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::TinyCkpts { dir } => match tiny::write_tiny_checkpoints(&dir) {
            Ok(o) => {
                for w in &o.written {
                    println!("written: {w}");
                }
                for s in &o.skipped {
                    println!("not written: {s}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Vlm(cmd) => match vlm_cli::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Video(cmd) => match video_cli::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Bench(cmd) => match bench::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
