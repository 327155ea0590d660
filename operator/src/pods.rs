//! Pure: a stage's Pod, built from the TravelJob and its plan.
//!
//! Names are deterministic (`<job>-prompts-<attempt>`, `<job>-seg-<i>-<attempt>`,
//! `<job>-stitch-<attempt>`), so creating a pod that already exists is a no-op
//! conflict rather than a duplicate, whatever the operator's restarts.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, PersistentVolumeClaimVolumeSource, Pod,
    PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use kubewan_crds::spec::VolumeSource;
use kubewan_crds::task::{CKPTS_MOUNT, INPUTS_MOUNT, OUTPUT_MOUNT, TASK_ENV};
use kubewan_crds::{Plan, Stage, StepId, Task, TravelJob};

use crate::error::{Error, Result};

pub const LABEL_JOB: &str = "kubewan.dev/job";
pub const LABEL_STAGE: &str = "kubewan.dev/stage";
pub const LABEL_SEGMENT: &str = "kubewan.dev/segment";
pub const LABEL_ATTEMPT: &str = "kubewan.dev/attempt";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "kubewan-operator";
/// The container that runs the runner (the one whose termination message is read).
pub const CONTAINER: &str = "runner";
/// The non-root user runner pods run as.
pub const RUNNER_UID: i64 = 65532;

/// The stage of a step, as the runner and the labels name it.
pub fn stage_of(step: StepId) -> Stage {
    match step {
        StepId::Prompts => Stage::Prompts,
        StepId::Segment(_) => Stage::Segment,
        StepId::Stitch => Stage::Stitch,
    }
}

/// `<job>-prompts-<attempt>`, `<job>-seg-<i>-<attempt>`, `<job>-stitch-<attempt>`.
pub fn pod_name(job: &str, step: StepId, attempt: u32) -> String {
    match step {
        StepId::Prompts => format!("{job}-prompts-{attempt}"),
        StepId::Segment(i) => format!("{job}-seg-{i}-{attempt}"),
        StepId::Stitch => format!("{job}-stitch-{attempt}"),
    }
}

/// A label value for the job name: the name itself when it fits the 63-character
/// limit of label values, otherwise a prefix plus a stable hash.
pub fn job_label_value(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_owned();
    }
    // FNV-1a: stable across builds and platforms.
    let hash = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let prefix: String = name.chars().take(46).collect();
    format!("{}-{hash:016x}", prefix.trim_end_matches(['-', '.']))
}

/// The job's output folder, relative to the output volume:
/// `<pathPrefix>/<namespace>/<name>`.
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

/// The task a step's runner performs.
pub fn task(job: &TravelJob, plan: &Plan, step: StepId) -> Task {
    Task {
        job: format!(
            "{}/{}",
            job.namespace().unwrap_or_else(|| "default".into()),
            job.name_any()
        ),
        stage: stage_of(step),
        segment: match step {
            StepId::Segment(i) => Some(i),
            _ => None,
        },
        plan: plan.clone(),
        output_dir: output_dir(job),
    }
}

/// Operator-wide defaults for the pods it builds.
#[derive(Clone, Debug)]
pub struct PodDefaults {
    /// Runner image when the spec sets none.
    pub runner_image: String,
    pub image_pull_policy: Option<String>,
}

fn volume(name: &str, source: &VolumeSource, read_only: bool) -> Volume {
    Volume {
        name: name.to_owned(),
        persistent_volume_claim: source.persistent_volume_claim.clone().map(|pvc| {
            PersistentVolumeClaimVolumeSource {
                read_only: Some(read_only || pvc.read_only.unwrap_or(false)),
                ..pvc
            }
        }),
        host_path: source.host_path.clone(),
        nfs: source.nfs.clone().map(|mut nfs| {
            if read_only {
                nfs.read_only = Some(true);
            }
            nfs
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

/// Builds the Pod of `step` (attempt `attempt`, 1-based) of `job`.
pub fn build_pod(
    job: &TravelJob,
    plan: &Plan,
    step: StepId,
    attempt: u32,
    defaults: &PodDefaults,
) -> Result<Pod> {
    let name = job.name_any();
    let runner = &job.spec.runner;
    let stage = stage_of(step);
    let owner = job
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;

    // Extra labels first, so the operator's own labels always win.
    let mut labels: BTreeMap<String, String> = runner.labels.clone();
    labels.insert(LABEL_JOB.into(), job_label_value(&name));
    labels.insert(LABEL_STAGE.into(), stage.as_str().into());
    if let StepId::Segment(i) = step {
        labels.insert(LABEL_SEGMENT.into(), i.to_string());
    }
    labels.insert(LABEL_ATTEMPT.into(), attempt.to_string());
    labels.insert(LABEL_MANAGED_BY.into(), MANAGER.into());
    labels.insert("app.kubernetes.io/name".into(), "kubewan-runner".into());

    let task_json =
        serde_json::to_string(&task(job, plan, step)).map_err(|source| Error::Serialize {
            what: "the runner task",
            source,
        })?;

    // GPU pods (prompts, segments) get the GPU limit and the memory figures of
    // the spec; the stitch pod is CPU-only.
    let gpu_pod = stage != Stage::Stitch;
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpu) = &runner.cpu_request {
        requests.insert("cpu".to_owned(), Quantity(cpu.clone()));
    }
    if let Some(mem) = &runner.memory_request {
        requests.insert("memory".to_owned(), Quantity(mem.clone()));
    }
    if let Some(mem) = &runner.memory_limit {
        limits.insert("memory".to_owned(), Quantity(mem.clone()));
    }
    if gpu_pod && runner.gpus > 0 {
        limits.insert(
            runner.gpu_resource.clone(),
            Quantity(runner.gpus.to_string()),
        );
    }

    let container = Container {
        name: CONTAINER.into(),
        image: Some(
            runner
                .image
                .clone()
                .unwrap_or_else(|| defaults.runner_image.clone()),
        ),
        image_pull_policy: runner
            .image_pull_policy
            .clone()
            .or_else(|| defaults.image_pull_policy.clone()),
        command: Some(vec!["kubewan-runner".into(), "run-task".into()]),
        env: Some(vec![EnvVar {
            name: TASK_ENV.into(),
            value: Some(task_json),
            ..Default::default()
        }]),
        volume_mounts: Some(vec![
            mount("checkpoints", CKPTS_MOUNT, true),
            mount("inputs", INPUTS_MOUNT, true),
            mount("output", OUTPUT_MOUNT, false),
            mount("tmp", "/tmp", false),
        ]),
        resources: Some(ResourceRequirements {
            requests: (!requests.is_empty()).then_some(requests),
            limits: (!limits.is_empty()).then_some(limits),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    let volumes = vec![
        volume("checkpoints", &job.spec.checkpoints, true),
        volume("inputs", &job.spec.inputs, true),
        volume("output", &job.spec.output.volume, false),
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ];

    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name, step, attempt)),
            namespace: job.namespace(),
            labels: Some(labels),
            annotations: (!runner.annotations.is_empty()).then(|| runner.annotations.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            active_deadline_seconds: job.spec.active_deadline_seconds,
            node_selector: (!runner.node_selector.is_empty()).then(|| runner.node_selector.clone()),
            tolerations: (!runner.tolerations.is_empty()).then(|| runner.tolerations.clone()),
            affinity: runner.affinity.clone(),
            priority_class_name: runner.priority_class_name.clone(),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUNNER_UID),
                run_as_group: Some(RUNNER_UID),
                fs_group: Some(RUNNER_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            volumes: Some(volumes),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kubewan_crds::TravelJobSpec;

    pub(crate) fn job(yaml: &str) -> TravelJob {
        let spec: TravelJobSpec = serde_saphyr::from_str(yaml).unwrap();
        let mut job = TravelJob::new("trip", spec);
        job.metadata.namespace = Some("studio".into());
        job.metadata.uid = Some("uid-1".into());
        job.metadata.generation = Some(3);
        job
    }

    pub(crate) const SPEC: &str = "keyframes: [a.png, b.png, c.png]\nmodel: {name: preview}\ncheckpoints: {persistentVolumeClaim: {claimName: ckpts}}\ninputs: {hostPath: {path: /data/in}}\noutput: {volume: {hostPath: {path: /data/out}}, pathPrefix: videos}\nrunner: {gpus: 2, memoryRequest: 32Gi, memoryLimit: 48Gi, cpuRequest: '4', nodeSelector: {gpu: a100}, tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}], priorityClassName: gpu-high, labels: {kueue.x-k8s.io/queue-name: videos, kubewan.dev/job: spoofed}, annotations: {team: art}}\nactiveDeadlineSeconds: 3600\n";

    fn defaults() -> PodDefaults {
        PodDefaults {
            runner_image: "ghcr.io/kubewan/runner:test".into(),
            image_pull_policy: None,
        }
    }

    fn build(step: StepId, attempt: u32) -> Pod {
        let job = job(SPEC);
        let plan = Plan::from_spec(&job.spec);
        build_pod(&job, &plan, step, attempt, &defaults()).unwrap()
    }

    #[test]
    fn names_are_deterministic() {
        assert_eq!(pod_name("trip", StepId::Prompts, 1), "trip-prompts-1");
        assert_eq!(pod_name("trip", StepId::Segment(2), 3), "trip-seg-2-3");
        assert_eq!(pod_name("trip", StepId::Stitch, 1), "trip-stitch-1");
        assert_eq!(
            build(StepId::Segment(1), 2).metadata.name.as_deref(),
            Some("trip-seg-1-2")
        );
    }

    #[test]
    fn labels_owner_and_extras() {
        let pod = build(StepId::Segment(1), 2);
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(
            labels[LABEL_JOB], "trip",
            "the spec cannot spoof the job label"
        );
        assert_eq!(labels[LABEL_STAGE], "segment");
        assert_eq!(labels[LABEL_SEGMENT], "1");
        assert_eq!(labels[LABEL_ATTEMPT], "2");
        assert_eq!(labels["kueue.x-k8s.io/queue-name"], "videos");
        assert_eq!(pod.metadata.annotations.as_ref().unwrap()["team"], "art");
        assert_eq!(pod.metadata.namespace.as_deref(), Some("studio"));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.uid, "uid-1");
        assert_eq!(owner.kind, "TravelJob");
        assert!(
            !build(StepId::Stitch, 1)
                .metadata
                .labels
                .unwrap()
                .contains_key(LABEL_SEGMENT)
        );
    }

    #[test]
    fn gpu_pods_get_the_gpu_limit_and_stitch_none() {
        for step in [StepId::Prompts, StepId::Segment(0)] {
            let pod = build(step, 1);
            let res = pod.spec.unwrap().containers[0].resources.clone().unwrap();
            let limits = res.limits.unwrap();
            assert_eq!(limits["nvidia.com/gpu"], Quantity("2".into()));
            assert_eq!(limits["memory"], Quantity("48Gi".into()));
            let requests = res.requests.unwrap();
            assert_eq!(requests["memory"], Quantity("32Gi".into()));
            assert_eq!(requests["cpu"], Quantity("4".into()));
        }
        let stitch = build(StepId::Stitch, 1);
        let res = stitch.spec.unwrap().containers[0]
            .resources
            .clone()
            .unwrap();
        assert!(
            !res.limits
                .unwrap_or_default()
                .contains_key("nvidia.com/gpu")
        );
    }

    #[test]
    fn scheduling_fields_come_from_the_spec() {
        let spec = build(StepId::Segment(0), 1).spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["gpu"], "a100");
        assert_eq!(
            spec.tolerations.unwrap()[0].key.as_deref(),
            Some("nvidia.com/gpu")
        );
        assert_eq!(spec.priority_class_name.as_deref(), Some("gpu-high"));
        assert_eq!(spec.active_deadline_seconds, Some(3600));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.automount_service_account_token, Some(false));
    }

    #[test]
    fn volumes_are_mounted_read_only_except_output() {
        let spec = build(StepId::Segment(0), 1).spec.unwrap();
        let c = &spec.containers[0];
        let mounts: Vec<(String, String, bool)> = c
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .map(|m| (m.name, m.mount_path, m.read_only.unwrap()))
            .collect();
        assert!(mounts.contains(&("checkpoints".into(), "/ckpts".into(), true)));
        assert!(mounts.contains(&("inputs".into(), "/inputs".into(), true)));
        assert!(mounts.contains(&("output".into(), "/output".into(), false)));
        let volumes = spec.volumes.unwrap();
        let ckpts = volumes.iter().find(|v| v.name == "checkpoints").unwrap();
        let pvc = ckpts.persistent_volume_claim.as_ref().unwrap();
        assert_eq!(
            (pvc.claim_name.as_str(), pvc.read_only),
            ("ckpts", Some(true))
        );
        let out = volumes.iter().find(|v| v.name == "output").unwrap();
        assert_eq!(out.host_path.as_ref().unwrap().path, "/data/out");
    }

    #[test]
    fn container_is_restricted_and_carries_the_task() {
        let pod = build(StepId::Segment(1), 1);
        let spec = pod.spec.unwrap();
        let c = &spec.containers[0];
        assert_eq!(
            c.command.as_deref(),
            Some(&["kubewan-runner".to_string(), "run-task".to_string()][..])
        );
        assert_eq!(c.image.as_deref(), Some("ghcr.io/kubewan/runner:test"));
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        assert_eq!(spec.security_context.unwrap().run_as_non_root, Some(true));
        let env = c.env.as_ref().unwrap();
        let task_json = env
            .iter()
            .find(|e| e.name == TASK_ENV)
            .unwrap()
            .value
            .clone()
            .unwrap();
        let task: Task = serde_json::from_str(&task_json).unwrap();
        assert_eq!(task.job, "studio/trip");
        assert_eq!(task.stage, Stage::Segment);
        assert_eq!(task.segment, Some(1));
        assert_eq!(task.output_dir, "videos/studio/trip");
        assert_eq!(task.plan.segments.len(), 2);
    }

    #[test]
    fn spec_image_wins_over_the_default() {
        let mut j = job(SPEC);
        j.spec.runner.image = Some("mine:1".into());
        let plan = Plan::from_spec(&j.spec);
        let pod = build_pod(&j, &plan, StepId::Stitch, 1, &defaults()).unwrap();
        assert_eq!(
            pod.spec.unwrap().containers[0].image.as_deref(),
            Some("mine:1")
        );
    }

    #[test]
    fn long_job_names_get_a_valid_label() {
        let name = "x".repeat(100);
        let v = job_label_value(&name);
        assert!(v.len() <= 63, "{v}");
        assert_eq!(v, job_label_value(&name));
        assert_ne!(v, job_label_value(&"y".repeat(100)));
    }
}
