//! Pure: the one builder of a runner Pod, from the TravelJob and the
//! [`NewPod`] decided for it (name, step attempt, task): labels, owner
//! reference, GPU limits, volumes and a restricted security context.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, PersistentVolumeClaimVolumeSource, Pod,
    PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use kubewan_crds::TravelJob;
use kubewan_crds::spec::VolumeSource;
use kubewan_crds::task::{CKPTS_MOUNT, INPUTS_MOUNT, OUTPUT_MOUNT, TASK_ENV};

use crate::decide::NewPod;
use crate::error::{Error, Result};

/// The container that runs the runner (the one whose termination message is read).
pub const CONTAINER: &str = "runner";
/// The non-root user runner pods run as.
pub const RUNNER_UID: i64 = 65532;

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

/// The job's volumes and their mounts: checkpoints and inputs read-only, the
/// output writable, and one volume per distinct source. A kubelet mounts a
/// claim once per pod: a second volume of the same claim (e.g. inputs and
/// output on one claim) never mounts and the pod waits forever in
/// ContainerCreating. So a shared source is one volume, named after its first
/// use, writable when any of its mounts is, mounted at each path.
fn job_volumes(job: &TravelJob) -> (Vec<Volume>, Vec<VolumeMount>) {
    let uses: [(&str, &VolumeSource, &str, bool); 3] = [
        ("checkpoints", &job.spec.checkpoints, CKPTS_MOUNT, true),
        ("inputs", &job.spec.inputs, INPUTS_MOUNT, true),
        ("output", &job.spec.output.volume, OUTPUT_MOUNT, false),
    ];
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for (i, (name, source, path, read_only)) in uses.iter().enumerate() {
        let first = uses[..i].iter().find(|u| u.1 == *source);
        let volume_name = first.map_or(*name, |u| u.0);
        if first.is_none() {
            let all_read_only = uses.iter().all(|u| u.1 != *source || u.3);
            volumes.push(volume(name, source, all_read_only));
        }
        mounts.push(mount(volume_name, path, *read_only));
    }
    (volumes, mounts)
}

/// Builds the Pod of `pod` for `job`.
pub fn build_pod(job: &TravelJob, pod: &NewPod, defaults: &PodDefaults) -> Result<Pod> {
    let runner = &job.spec.runner;
    let owner = job
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;

    // Extra labels first, so the step's own labels always win.
    let mut labels: BTreeMap<String, String> = runner.labels.clone();
    labels.extend(pod.attempt.labels(&job.name_any()));

    let task_json = serde_json::to_string(&pod.task).map_err(|source| Error::Serialize {
        what: "the runner task",
        source,
    })?;

    // Prompts and segment pods of a `gpu` job get the GPU limit (and their
    // task says so); the stitch pod is CPU-only.
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
    if pod.task.gpu {
        limits.insert(
            runner.gpu_resource.clone(),
            Quantity(runner.gpus.to_string()),
        );
    }

    let (mut volumes, mut mounts) = job_volumes(job);
    mounts.push(mount("tmp", "/tmp", false));
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
        volume_mounts: Some(mounts),
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

    volumes.push(Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });

    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod.name.clone()),
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
mod tests {
    use super::*;
    use crate::fixtures::{SPEC, job, new_pod};
    use kubewan_crds::step::{LABEL_ATTEMPT, LABEL_JOB, LABEL_SEGMENT, LABEL_STAGE};
    use kubewan_crds::{StepId, Task};

    fn defaults() -> PodDefaults {
        PodDefaults {
            runner_image: "ghcr.io/kubewan/runner:test".into(),
            image_pull_policy: None,
        }
    }

    fn build(step: StepId, attempt: u32) -> Pod {
        let job = job(SPEC);
        build_pod(&job, &new_pod(&job, step, attempt), &defaults()).unwrap()
    }

    #[test]
    fn the_pod_carries_the_decided_name() {
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
    fn the_task_says_whether_its_pod_has_a_gpu() {
        let gpu_job = job(SPEC);
        assert!(new_pod(&gpu_job, StepId::Segment(0), 1).task.gpu);
        assert!(new_pod(&gpu_job, StepId::Prompts, 1).task.gpu);
        assert!(!new_pod(&gpu_job, StepId::Stitch, 1).task.gpu);
        // On the CPU on purpose: no GPU limit, and the runner is told so.
        let cpu_job = job(&SPEC.replace("runner: {gpus: 2,", "runner: {device: cpu, gpus: 2,"));
        let pod = new_pod(&cpu_job, StepId::Segment(0), 1);
        assert!(!pod.task.gpu);
        let pod = build_pod(&cpu_job, &pod, &defaults()).unwrap();
        let limits = pod.spec.unwrap().containers[0]
            .resources
            .clone()
            .unwrap()
            .limits
            .unwrap_or_default();
        assert!(!limits.contains_key("nvidia.com/gpu"), "{limits:?}");
        assert_eq!(limits["memory"], Quantity("48Gi".into()));
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

    /// (volume, path, read-only) of the runner container's mounts.
    fn mounts(spec: &PodSpec) -> Vec<(String, String, bool)> {
        spec.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .map(|m| (m.name, m.mount_path, m.read_only.unwrap()))
            .collect()
    }

    #[test]
    fn volumes_are_mounted_read_only_except_output() {
        let spec = build(StepId::Segment(0), 1).spec.unwrap();
        let mounts = mounts(&spec);
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
    fn a_claim_used_for_inputs_and_output_is_one_volume_mounted_twice() {
        let shared = SPEC
            .replace(
                "inputs: {hostPath: {path: /data/in}}",
                "inputs: {persistentVolumeClaim: {claimName: data}}",
            )
            .replace(
                "output: {volume: {hostPath: {path: /data/out}}",
                "output: {volume: {persistentVolumeClaim: {claimName: data}}",
            );
        let job = job(&shared);
        let pod = build_pod(&job, &new_pod(&job, StepId::Segment(0), 1), &defaults()).unwrap();
        let spec = pod.spec.unwrap();
        let names: Vec<&str> = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(names, ["checkpoints", "inputs", "tmp"]);
        // Writable, since the output is written through it.
        let data = &spec.volumes.as_ref().unwrap()[1];
        assert_eq!(
            data.persistent_volume_claim.as_ref().unwrap().read_only,
            Some(false)
        );
        let mounts = mounts(&spec);
        assert!(mounts.contains(&("inputs".into(), "/inputs".into(), true)));
        assert!(mounts.contains(&("inputs".into(), "/output".into(), false)));
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
        assert_eq!(task.step, StepId::Segment(1));
        assert_eq!(task.output_dir, "videos/studio/trip");
        assert_eq!(task.plan.segments.len(), 2);
    }

    #[test]
    fn spec_image_wins_over_the_default() {
        let mut j = job(SPEC);
        j.spec.runner.image = Some("mine:1".into());
        let pod = build_pod(&j, &new_pod(&j, StepId::Stitch, 1), &defaults()).unwrap();
        assert_eq!(
            pod.spec.unwrap().containers[0].image.as_deref(),
            Some("mine:1")
        );
    }
}
