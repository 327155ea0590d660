//! Test fixtures shared by every operator unit test: a TravelJob, the clock,
//! pod views, runner pods and the pods decide asks for.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::ObjectMeta;
use kubewan_crds::{Plan, RunReport, StepId, TravelJob, TravelJobSpec};

use crate::decide::NewPod;
use crate::observe::{PodPhase, PodView};
use crate::pods::CONTAINER;

/// A spec that sets every pod-shaping field (the preview model, three keyframes).
pub const SPEC: &str = "keyframes: [a.png, b.png, c.png]\nmodel: {name: preview}\ncheckpoints: {persistentVolumeClaim: {claimName: ckpts}}\ninputs: {hostPath: {path: /data/in}}\noutput: {volume: {hostPath: {path: /data/out}}, pathPrefix: videos}\nrunner: {gpus: 2, memoryRequest: 32Gi, memoryLimit: 48Gi, cpuRequest: '4', nodeSelector: {gpu: a100}, tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}], priorityClassName: gpu-high, labels: {kueue.x-k8s.io/queue-name: videos, kubewan.dev/job: spoofed}, annotations: {team: art}}\nactiveDeadlineSeconds: 3600\n";

/// TravelJob `studio/trip` (uid `uid-1`, generation 3) with the spec `yaml`.
pub fn job(yaml: &str) -> TravelJob {
    let spec: TravelJobSpec = serde_saphyr::from_str(yaml).unwrap();
    let mut job = TravelJob::new("trip", spec);
    job.metadata.namespace = Some("studio".into());
    job.metadata.uid = Some("uid-1".into());
    job.metadata.generation = Some(3);
    job
}

/// `secs` seconds into the tests' clock.
pub fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

/// The pod decide would ask for: attempt `attempt` of `step` of `job`.
pub fn new_pod(job: &TravelJob, step: StepId, attempt: u32) -> NewPod {
    NewPod::new(job, &Plan::from_spec(&job.spec), step.attempt(attempt))
}

/// A view of attempt `attempt` of `step` of job `trip`: started at 0, finished
/// at 10; a success reports 100 MiB and its output, a failure says why.
pub fn view(step: StepId, attempt: u32, phase: PodPhase) -> PodView {
    PodView {
        name: step.attempt(attempt).pod_name("trip"),
        step,
        attempt,
        phase,
        deletion: None,
        started: Some(t(0)),
        finished: phase.is_finished().then(|| t(10)),
        report: (phase == PodPhase::Succeeded).then(|| RunReport {
            step,
            ok: true,
            peak_rss_bytes: 100 << 20,
            output: Some(format!("{}.mp4", step.run_name())),
            ..Default::default()
        }),
        failure: (phase == PodPhase::Failed).then(|| "exit code 1: keyframe missing".into()),
        waiting: None,
        cannot_start: false,
        permanent: false,
    }
}

/// The runner pod of attempt `attempt` of `step` of `studio/trip`, in pod
/// phase `phase`, labelled and owned as the operator builds it.
pub fn pod(step: StepId, attempt: u32, phase: &str) -> Pod {
    let owner = job(SPEC).controller_owner_ref(&()).unwrap();
    let step_attempt = step.attempt(attempt);
    Pod {
        metadata: ObjectMeta {
            name: Some(step_attempt.pod_name("trip")),
            namespace: Some("studio".into()),
            labels: Some(step_attempt.labels("trip")),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: None,
        status: Some(PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        }),
    }
}

/// `pod` with its runner container terminated at 5 with `exit_code` and
/// termination message `message`.
pub fn with_report(mut pod: Pod, message: &str, exit_code: i32) -> Pod {
    pod.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
        name: CONTAINER.into(),
        state: Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code,
                message: Some(message.into()),
                finished_at: Some(Time(t(5))),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    pod
}
