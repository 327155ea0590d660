//! Local mode: `kubewan-runner local JOB.yaml` runs the same stages as the
//! cluster (prompts, segments, stitch) in one process, walking the same stage
//! graph ([`Plan::ready_steps`]), and folds the reports into the same
//! [`TravelJobStatus`] the operator writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kubewan_crds::status::{JobPhase, StepPhase, StepStatus, TravelJobStatus};
use kubewan_crds::task::{Stage, Task};
use kubewan_crds::{Plan, StepId, TravelJob, TravelJobSpec};

use crate::progress::{Bar, Progress, Silent};
use crate::report::summary;
use crate::stages::{self, Mounts};

/// Reads a job file: a whole `TravelJob` manifest (what `kubectl apply` takes)
/// or just its spec.
pub fn load_job(path: &Path) -> Result<TravelJob> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read job file {}", path.display()))?;
    match serde_saphyr::from_str::<TravelJob>(&text) {
        Ok(job) => Ok(job),
        Err(manifest_err) => match serde_saphyr::from_str::<TravelJobSpec>(&text) {
            Ok(spec) => {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "job".into());
                Ok(TravelJob::new(&name, spec))
            }
            Err(_) => bail!(
                "{} is not a TravelJob manifest (or spec): {manifest_err}",
                path.display()
            ),
        },
    }
}

/// The job's output folder relative to the output volume (as the operator names it).
pub fn output_dir(job: &TravelJob) -> String {
    let prefix = job.spec.output.path_prefix.trim_matches('/');
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    let rel = format!("{ns}/{}", job.name_any());
    if prefix.is_empty() {
        rel
    } else {
        format!("{prefix}/{rel}")
    }
}

pub struct LocalOptions {
    pub job: PathBuf,
    pub mounts: Mounts,
    /// Draw progress bars (when stderr is a terminal).
    pub progress: bool,
}

pub struct LocalResult {
    pub status: TravelJobStatus,
    pub job_dir: PathBuf,
    pub ok: bool,
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn step_name(step: StepId) -> String {
    match step {
        StepId::Prompts => "prompts".into(),
        StepId::Segment(i) => format!("segment {i}"),
        StepId::Stitch => "stitch".into(),
    }
}

/// Puts the steps' states into the status, the way the operator does
/// ([`TravelJobStatus::fold_steps`], shared through kubewan-crds).
pub fn fold_status(
    status: &mut TravelJobStatus,
    plan: &Plan,
    steps: &BTreeMap<StepId, StepStatus>,
    output_dir: &str,
) {
    status.fold_steps(plan, steps, output_dir);
}

/// Runs the job; `Err` only when it cannot start (unreadable or invalid job).
pub fn run_local(opts: &LocalOptions) -> Result<LocalResult> {
    let job = load_job(&opts.job)?;
    kubewan_crds::validate::validate(&job.spec)
        .map_err(|e| anyhow::anyhow!("{}: {e}", opts.job.display()))?;
    let plan = Plan::from_spec(&job.spec);
    let out_dir = output_dir(&job);
    let job_name = format!(
        "{}/{}",
        job.namespace().unwrap_or_else(|| "default".into()),
        job.name_any()
    );
    let job_dir = opts.mounts.output.join(&out_dir);

    let multi = MultiProgress::new();
    if !opts.progress {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let all_steps = plan.steps();
    let overall = multi.add(ProgressBar::new(all_steps.len() as u64));
    overall.set_style(
        ProgressStyle::with_template("{msg:<26} [{bar:30}] {pos}/{len} steps {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    overall.set_message(job_name.clone());
    let bar = Bar::new(&multi);
    let silent = Silent;
    let progress: &dyn Progress = if opts.progress { &bar } else { &silent };

    let mut status = TravelJobStatus {
        start_time: Some(now()),
        ..Default::default()
    };
    let mut steps: BTreeMap<StepId, StepStatus> = BTreeMap::new();
    let mut done = BTreeSet::new();
    let none = BTreeSet::new();
    let mut failure: Option<String> = None;
    'graph: loop {
        let ready = plan.ready_steps(&done, &none);
        if ready.is_empty() {
            break;
        }
        for step in ready {
            status.phase = match step {
                StepId::Prompts => JobPhase::Prompting,
                StepId::Segment(_) => JobPhase::Generating,
                StepId::Stitch => JobPhase::Stitching,
            };
            let task = Task {
                job: job_name.clone(),
                stage: match step {
                    StepId::Prompts => Stage::Prompts,
                    StepId::Segment(_) => Stage::Segment,
                    StepId::Stitch => Stage::Stitch,
                },
                segment: match step {
                    StepId::Segment(i) => Some(i),
                    _ => None,
                },
                plan: plan.clone(),
                output_dir: out_dir.clone(),
            };
            overall.set_message(format!("{job_name}: {}", step_name(step)));
            let start_time = now();
            let outcome = stages::run(&task, &opts.mounts, progress);
            let report = outcome.report;
            multi.suspend(|| eprint!("{}", summary(&report)));
            let ok = report.ok;
            let message = report.message.clone();
            steps.insert(
                step,
                StepStatus {
                    phase: if ok {
                        StepPhase::Succeeded
                    } else {
                        StepPhase::Failed
                    },
                    pod: None,
                    attempts: 1,
                    start_time: Some(start_time),
                    finish_time: Some(now()),
                    message: message.clone(),
                    report: Some(report),
                },
            );
            overall.inc(1);
            if !ok {
                failure = Some(format!(
                    "{} failed: {}",
                    step_name(step),
                    message.unwrap_or_else(|| "no message".into())
                ));
                break 'graph;
            }
            done.insert(step);
        }
    }
    overall.finish_and_clear();
    bar.finish();
    multi.clear().ok();
    fold_status(&mut status, &plan, &steps, &out_dir);
    status.completion_time = Some(now());
    let ok = failure.is_none();
    status.phase = if ok {
        JobPhase::Succeeded
    } else {
        JobPhase::Failed
    };
    status.message = Some(match &failure {
        Some(f) => f.clone(),
        None => format!(
            "{} written{}",
            status.output.clone().unwrap_or_default(),
            if plan.is_preview() { " (preview)" } else { "" }
        ),
    });
    Ok(LocalResult {
        status,
        job_dir,
        ok,
    })
}
