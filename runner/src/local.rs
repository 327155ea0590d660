//! Local mode: `kubewan-runner local JOB.yaml` runs the same stages as the
//! cluster (prompts, segments, stitch) in one process, walking the same stage
//! graph ([`Plan::ready_steps`]), and folds the reports into the same
//! [`TravelJobStatus`] the operator writes, VLM policy conditions included.
//! The job file is held to the cluster's rules: the CRD schema and the
//! operator's validation. The job's `spec.runner.memoryLimit` holds the
//! stages' memory admission here as the pod's cgroup would on a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kubewan_crds::conditions::set_vlm_conditions;
use kubewan_crds::limits::MAX_JOB_FILE_BYTES;
use kubewan_crds::manifest::parse_job;
use kubewan_crds::status::{JobPhase, StepPhase, StepStatus, TravelJobStatus};
use kubewan_crds::{Plan, StepId, Task, TravelJob};
use kubewan_model_common::device::DeviceChoice;

use crate::fsutil::read_text_bounded;
use crate::progress::{Bar, Progress, Silent};
use crate::report::summary;
use crate::stages::{self, Mounts};

/// Reads a job file: a whole `TravelJob` manifest (what `kubectl apply`
/// takes) or just its spec, checked under the cluster's rules
/// ([`kubewan_crds::manifest::parse_job`]: apiVersion, kind, unknown fields,
/// schema bounds, then the operator's validation). The file must be a
/// regular file of at most [`MAX_JOB_FILE_BYTES`].
pub fn load_job(path: &Path) -> Result<TravelJob> {
    let text = read_text_bounded(path, MAX_JOB_FILE_BYTES)
        .with_context(|| format!("cannot read job file {}", path.display()))?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "job".into());
    parse_job(&text, &name).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub struct LocalOptions {
    pub job: PathBuf,
    pub mounts: Mounts,
    /// Draw progress bars (when stderr is a terminal).
    pub progress: bool,
    /// Overrides where the models compute (`--device`); None: as the job's
    /// `spec.runner.device` says, like its pods would.
    pub device: Option<DeviceChoice>,
}

pub struct LocalResult {
    pub status: TravelJobStatus,
    pub job_dir: PathBuf,
    pub ok: bool,
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Runs the job; `Err` only when it cannot start (unreadable or invalid job).
pub fn run_local(opts: &LocalOptions) -> Result<LocalResult> {
    let job = load_job(&opts.job)?;
    let plan = Plan::from_spec(&job.spec);
    let out_dir = job.output_dir();
    let job_name = job.key();
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
            let task = Task::new(&job, &plan, step);
            overall.set_message(format!("{job_name}: {step}"));
            let start_time = now();
            let device = opts.device.unwrap_or_else(|| stages::device_for(&task));
            let outcome = stages::run(&task, &opts.mounts, device, progress);
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
                    ..Default::default()
                },
            );
            overall.inc(1);
            if !ok {
                failure = Some(format!(
                    "{step} failed: {}",
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
    status.fold_steps(&plan, &steps, &out_dir);
    set_vlm_conditions(&mut status, None, Timestamp::now());
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
            "{} written by {}",
            status.output.clone().unwrap_or_default(),
            plan.video_model_label()
        ),
    });
    Ok(LocalResult {
        status,
        job_dir,
        ok,
    })
}
