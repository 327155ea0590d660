//! The test node runs pods as real containers and the kubelet and runtime
//! enforce what a runner pod asks for: probes made from a pod the operator
//! built (same image, security context, volumes), with another command, show
//! that the checkpoints and the root filesystem cannot be written, that no API
//! token is mounted, and that memory limits and deadlines kill containers.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::Client;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kubewan_crds::status::JobPhase;
use kubewan_e2e::*;

const NS: &str = "e2e-node";
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A runner pod exactly as the operator built it (a segment of a finished job).
async fn operator_built_pod(client: &Client) -> Pod {
    fresh_namespace(client, NS).await.unwrap();
    let mut job = example();
    job.metadata.name = Some("template".into());
    job.spec.enhance_prompt.enabled = false;
    create_job(client, NS, &job).await.unwrap();
    let job = wait_job(
        client,
        NS,
        "template",
        Duration::from_secs(600),
        "finished",
        |j| j.status.as_ref().is_some_and(|s| s.phase.is_finished()),
    )
    .await
    .unwrap();
    assert_eq!(job.status.unwrap().phase, JobPhase::Succeeded);
    Api::<Pod>::namespaced(client.clone(), NS)
        .get("template-seg-0-1")
        .await
        .unwrap()
}

/// Pods made from a runner pod the operator built.
struct Probes {
    client: Client,
    template: Pod,
}

impl Probes {
    /// The template renamed, unowned, running `kubewan-runner ARGS`; `edit`
    /// changes anything else.
    fn pod(&self, name: &str, args: &[&str], edit: impl FnOnce(&mut Pod)) -> Pod {
        let mut spec = self.template.spec.clone().unwrap();
        spec.node_name = None;
        let container = &mut spec.containers[0];
        container.command = Some(vec!["kubewan-runner".into()]);
        container.args = Some(args.iter().map(|a| a.to_string()).collect());
        container.env = None;
        let mut pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(NS.into()),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        };
        edit(&mut pod);
        pod
    }

    /// Runs the pod [`Probes::pod`] makes to its end; returns how its container
    /// terminated.
    async fn run(
        &self,
        name: &str,
        args: &[&str],
        edit: impl FnOnce(&mut Pod),
    ) -> ContainerStateTerminated {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), NS);
        api.create(&PostParams::default(), &self.pod(name, args, edit))
            .await
            .unwrap();
        let terminated = |p: Pod| {
            p.status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c.first().and_then(|c| c.state.clone()))
                .and_then(|s| s.terminated)
        };
        wait_until(
            Duration::from_secs(120),
            &format!("pod {name} to end"),
            || async { Ok(terminated(api.get(name).await?).is_some()) },
        )
        .await
        .unwrap();
        let t = terminated(api.get(name).await.unwrap()).unwrap();
        println!(
            "{name}: exit {} {:?}: {}",
            t.exit_code,
            t.reason,
            message(&t).trim()
        );
        t
    }
}

fn message(t: &ContainerStateTerminated) -> &str {
    t.message.as_deref().unwrap_or("")
}

/// The write failed because the filesystem is read-only.
fn refused_read_only(t: &ContainerStateTerminated) {
    assert_eq!(t.exit_code, 1, "{t:?}");
    assert!(message(t).contains("Read-only file system"), "{t:?}");
}

fn without_tmp_volume(pod: &mut Pod) {
    let c = &mut pod.spec.as_mut().unwrap().containers[0];
    c.volume_mounts
        .as_mut()
        .unwrap()
        .retain(|m| m.mount_path != "/tmp");
}

#[tokio::test]
async fn a_runner_pod_cannot_write_its_checkpoints_or_root_filesystem_and_has_no_api_token() {
    let client = client().await;
    let probes = Probes {
        template: operator_built_pod(&client).await,
        client,
    };

    // The checkpoints are mounted read-only: writing there fails.
    refused_read_only(
        &probes
            .run("write-ckpts", &["tiny-ckpts", "/ckpts/probe"], |_| {})
            .await,
    );
    // The root filesystem is read-only: /tmp without its emptyDir is the
    // image's (world-writable) /tmp, and still refuses the write...
    let write_tmp = ["tiny-ckpts", "/tmp/probe"];
    refused_read_only(
        &probes
            .run("write-root", &write_tmp, without_tmp_volume)
            .await,
    );
    // ...which a writable root filesystem would have taken.
    let t = probes
        .run("write-root-allowed", &write_tmp, |pod| {
            without_tmp_volume(pod);
            let c = &mut pod.spec.as_mut().unwrap().containers[0];
            c.security_context
                .as_mut()
                .unwrap()
                .read_only_root_filesystem = Some(false);
        })
        .await;
    assert_eq!(t.exit_code, 0, "{t:?}");

    // No service-account token: the folder is not there at all...
    let look_for_token = ["check-ckpts", "--ckpts", TOKEN_DIR, "--model", "token"];
    let t = probes.run("token", &look_for_token, |_| {}).await;
    assert_eq!(t.exit_code, 1);
    assert!(
        message(&t).contains(&format!("checkpoint root {TOKEN_DIR} does not exist")),
        "{t:?}"
    );
    // ...where a pod that lets the token be mounted finds it (the "model"
    // `token` is a file there, the token itself).
    let t = probes
        .run("token-allowed", &look_for_token, |pod| {
            pod.spec.as_mut().unwrap().automount_service_account_token = Some(true);
        })
        .await;
    assert!(
        message(&t).contains("/token is not a folder")
            && message(&t).contains(&format!("(checkpoint root {TOKEN_DIR})")),
        "{t:?}"
    );
}

#[tokio::test]
async fn the_kubelet_kills_a_runner_over_its_memory_limit_or_deadline() {
    let client = client().await;
    let probes = Probes {
        template: operator_built_pod(&client).await,
        client: client.clone(),
    };

    let t = probes
        .run("oom", &["tiny-ckpts", "/tmp/weights"], |pod| {
            let c = &mut pod.spec.as_mut().unwrap().containers[0];
            c.resources
                .get_or_insert_default()
                .limits
                .get_or_insert_default()
                .insert("memory".into(), Quantity("6Mi".into()));
        })
        .await;
    assert_eq!(t.reason.as_deref(), Some("OOMKilled"), "{t:?}");
    assert_eq!(t.exit_code, 137);

    // The operator image waits on the API forever (as the namespace's default
    // ServiceAccount it may list nothing): only the deadline ends it.
    let operator_image = Api::<Pod>::namespaced(client.clone(), RELEASE_NS)
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .unwrap()
        .items[0]
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone();
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let deadline = probes.pod("deadline", &[], |pod| {
        let spec = pod.spec.as_mut().unwrap();
        spec.active_deadline_seconds = Some(3);
        spec.automount_service_account_token = Some(true);
        let c = &mut spec.containers[0];
        c.image = operator_image;
        c.command = None;
        c.args = Some(vec!["--metrics-addr=127.0.0.1:8080".into()]);
    });
    api.create(&PostParams::default(), &deadline).await.unwrap();
    wait_until(
        Duration::from_secs(120),
        "the deadline pod to fail",
        || async {
            let p = api.get("deadline").await?;
            Ok(p.status.and_then(|s| s.reason).as_deref() == Some("DeadlineExceeded"))
        },
    )
    .await
    .unwrap();
    let p = api.get("deadline").await.unwrap();
    assert_eq!(
        p.status.and_then(|s| s.phase).as_deref(),
        Some("Failed"),
        "a pod past activeDeadlineSeconds fails"
    );
}
