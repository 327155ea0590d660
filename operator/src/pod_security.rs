//! Pure: the Kubernetes "restricted" Pod Security Standard (which includes
//! the baseline one), each of its rules checked on a Pod, as Pod Security
//! admission would at `pod-security.kubernetes.io/enforce=restricted`. The
//! v1.20 test API server predates that admission plugin (v1.23 beta), so the
//! operator's runner pods are checked against these rules instead: by the unit
//! tests below on what [`crate::pods::build_pod`] makes, and by the
//! end-to-end tests on the pods the API server stored and the node ran.
//!
//! Source of every rule, its fields and allowed values:
//! <https://kubernetes.io/docs/concepts/security/pod-security-standards/>
//! ("Baseline" and "Restricted" tables, as of Kubernetes v1.33).

use std::fmt;

use k8s_openapi::api::core::v1::{
    AppArmorProfile, ContainerPort, Pod, PodSecurityContext, PodSpec, SELinuxOptions,
    SeccompProfile, SecurityContext, Volume,
};
use kube::ResourceExt;

/// One rule a pod breaks: the rule's name in the standard, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub rule: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule, self.detail)
    }
}

/// Every rule of the restricted profile (baseline's first), by its name in
/// the standard.
pub const RULES: [(&str, Rule); 17] = [
    ("HostProcess", host_process),
    ("Host Namespaces", host_namespaces),
    ("Privileged Containers", privileged),
    ("Capabilities (baseline)", baseline_capabilities),
    ("HostPath Volumes", host_path_volumes),
    ("Host Ports", host_ports),
    ("AppArmor", app_armor),
    ("SELinux", se_linux),
    ("/proc Mount Type", proc_mount),
    ("Seccomp (baseline)", baseline_seccomp),
    ("Sysctls", sysctls),
    ("Volume Types", volume_types),
    ("Privilege Escalation", privilege_escalation),
    ("Running as Non-root", run_as_non_root),
    ("Running as Non-root user", run_as_non_root_user),
    ("Seccomp (restricted)", restricted_seccomp),
    ("Capabilities (restricted)", restricted_capabilities),
];

/// A rule: where a pod breaks it (empty: it does not).
pub type Rule = fn(&PodFields) -> Vec<String>;

/// What the rules read of a pod.
pub struct PodFields<'a> {
    annotations: &'a std::collections::BTreeMap<String, String>,
    spec: &'a PodSpec,
    pod_context: Option<&'a PodSecurityContext>,
    containers: Vec<ContainerFields<'a>>,
}

/// A container of any kind (init, regular, ephemeral).
struct ContainerFields<'a> {
    /// e.g. `containers[runner]`.
    path: String,
    context: Option<&'a SecurityContext>,
    ports: &'a [ContainerPort],
}

/// Every rule of the restricted profile that `pod` breaks.
pub fn restricted_violations(pod: &Pod) -> Vec<Violation> {
    let default_spec = PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&default_spec);
    let mut containers = Vec::new();
    for (kind, list) in [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("containers", &spec.containers[..]),
    ] {
        containers.extend(list.iter().map(|c| ContainerFields {
            path: format!("{kind}[{}]", c.name),
            context: c.security_context.as_ref(),
            ports: c.ports.as_deref().unwrap_or_default(),
        }));
    }
    containers.extend(
        spec.ephemeral_containers
            .iter()
            .flatten()
            .map(|c| ContainerFields {
                path: format!("ephemeralContainers[{}]", c.name),
                context: c.security_context.as_ref(),
                ports: c.ports.as_deref().unwrap_or_default(),
            }),
    );
    let fields = PodFields {
        annotations: pod.annotations(),
        spec,
        pod_context: spec.security_context.as_ref(),
        containers,
    };
    RULES
        .iter()
        .flat_map(|(rule, check)| {
            check(&fields)
                .into_iter()
                .map(|detail| Violation { rule, detail })
        })
        .collect()
}

impl PodFields<'_> {
    /// `(path, value)` of a security-context field at the pod level (when
    /// `pod` reads it) and in every container that sets it.
    fn contexts<T>(
        &self,
        pod: impl Fn(&PodSecurityContext) -> Option<T>,
        container: impl Fn(&SecurityContext) -> Option<T>,
    ) -> Vec<(String, T)> {
        let mut found: Vec<(String, T)> = self
            .pod_context
            .and_then(&pod)
            .map(|v| ("securityContext".to_owned(), v))
            .into_iter()
            .collect();
        for c in &self.containers {
            if let Some(v) = c.context.and_then(&container) {
                found.push((format!("{}.securityContext", c.path), v));
            }
        }
        found
    }

    /// Per container: its own value of a field, or else the pod's.
    fn effective<T: Clone>(
        &self,
        pod: impl Fn(&PodSecurityContext) -> Option<T>,
        container: impl Fn(&SecurityContext) -> Option<T>,
    ) -> Vec<(&str, Option<T>)> {
        let pod_value = self.pod_context.and_then(pod);
        self.containers
            .iter()
            .map(|c| {
                let own = c.context.and_then(&container);
                (c.path.as_str(), own.or_else(|| pod_value.clone()))
            })
            .collect()
    }

    fn no_pod_level<T>(_: &PodSecurityContext) -> Option<T> {
        None
    }
}

fn host_process(p: &PodFields) -> Vec<String> {
    p.contexts(
        |s| s.windows_options.as_ref()?.host_process,
        |s| s.windows_options.as_ref()?.host_process,
    )
    .into_iter()
    .filter(|(_, on)| *on)
    .map(|(path, _)| format!("{path}.windowsOptions.hostProcess is true"))
    .collect()
}

fn host_namespaces(p: &PodFields) -> Vec<String> {
    [
        ("hostNetwork", p.spec.host_network),
        ("hostPID", p.spec.host_pid),
        ("hostIPC", p.spec.host_ipc),
    ]
    .into_iter()
    .filter(|(_, on)| *on == Some(true))
    .map(|(field, _)| format!("spec.{field} is true"))
    .collect()
}

fn privileged(p: &PodFields) -> Vec<String> {
    p.contexts(PodFields::no_pod_level, |s| s.privileged)
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(path, _)| format!("{path}.privileged is true"))
        .collect()
}

/// Capabilities the baseline profile lets a container add.
const BASELINE_ADDABLE: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// `(path, capability)` of every capability a container adds outside `allowed`.
fn added_capabilities(p: &PodFields, allowed: &[&str]) -> Vec<String> {
    p.contexts(PodFields::no_pod_level, |s| {
        s.capabilities.as_ref()?.add.clone()
    })
    .into_iter()
    .flat_map(|(path, add)| {
        add.into_iter()
            .filter(|cap| !allowed.contains(&cap.as_str()))
            .map(move |cap| format!("{path}.capabilities.add has {cap}"))
    })
    .collect()
}

fn baseline_capabilities(p: &PodFields) -> Vec<String> {
    added_capabilities(p, &BASELINE_ADDABLE)
}

fn restricted_capabilities(p: &PodFields) -> Vec<String> {
    let mut found = added_capabilities(p, &["NET_BIND_SERVICE"]);
    for (path, drop) in p.effective(PodFields::no_pod_level, |s| {
        s.capabilities.as_ref()?.drop.clone()
    }) {
        if !drop.unwrap_or_default().iter().any(|c| c == "ALL") {
            found.push(format!(
                "{path}.securityContext.capabilities.drop lacks ALL"
            ));
        }
    }
    found
}

fn volumes<'a>(p: &PodFields<'a>) -> &'a [Volume] {
    p.spec.volumes.as_deref().unwrap_or_default()
}

fn host_path_volumes(p: &PodFields) -> Vec<String> {
    volumes(p)
        .iter()
        .filter(|v| v.host_path.is_some())
        .map(|v| format!("volume {} is a hostPath", v.name))
        .collect()
}

fn host_ports(p: &PodFields) -> Vec<String> {
    p.containers
        .iter()
        .flat_map(|c| {
            c.ports
                .iter()
                .filter_map(|port| port.host_port.filter(|h| *h != 0))
                .map(move |h| format!("{}.ports has hostPort {h}", c.path))
        })
        .collect()
}

fn app_armor(p: &PodFields) -> Vec<String> {
    let annotation_ok =
        |v: &str| v.is_empty() || v == "runtime/default" || v.starts_with("localhost/");
    let profile_ok =
        |a: &AppArmorProfile| matches!(a.type_.as_str(), "RuntimeDefault" | "Localhost");
    let mut found: Vec<String> = p
        .annotations
        .iter()
        .filter(|(k, v)| {
            k.starts_with("container.apparmor.security.beta.kubernetes.io/") && !annotation_ok(v)
        })
        .map(|(k, v)| format!("annotation {k} is {v:?}"))
        .collect();
    found.extend(
        p.contexts(
            |s| s.app_armor_profile.clone(),
            |s| s.app_armor_profile.clone(),
        )
        .into_iter()
        .filter(|(_, a)| !profile_ok(a))
        .map(|(path, a)| format!("{path}.appArmorProfile.type is {:?}", a.type_)),
    );
    found
}

fn se_linux(p: &PodFields) -> Vec<String> {
    const TYPES: [&str; 5] = [
        "",
        "container_t",
        "container_init_t",
        "container_kvm_t",
        "container_engine_t",
    ];
    let mut found = Vec::new();
    for (path, o) in p.contexts(
        |s| s.se_linux_options.clone(),
        |s| s.se_linux_options.clone(),
    ) {
        let SELinuxOptions {
            type_, user, role, ..
        } = o;
        if let Some(t) = type_.filter(|t| !TYPES.contains(&t.as_str())) {
            found.push(format!("{path}.seLinuxOptions.type is {t:?}"));
        }
        for (field, value) in [("user", user), ("role", role)] {
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                found.push(format!("{path}.seLinuxOptions.{field} is {v:?}"));
            }
        }
    }
    found
}

fn proc_mount(p: &PodFields) -> Vec<String> {
    p.contexts(PodFields::no_pod_level, |s| s.proc_mount.clone())
        .into_iter()
        .filter(|(_, m)| m != "Default")
        .map(|(path, m)| format!("{path}.procMount is {m:?}"))
        .collect()
}

fn seccomp_type(profile: &Option<SeccompProfile>) -> Option<String> {
    profile.as_ref().map(|s| s.type_.clone())
}

fn baseline_seccomp(p: &PodFields) -> Vec<String> {
    p.contexts(
        |s| seccomp_type(&s.seccomp_profile),
        |s| seccomp_type(&s.seccomp_profile),
    )
    .into_iter()
    .filter(|(_, t)| t == "Unconfined")
    .map(|(path, _)| format!("{path}.seccompProfile.type is Unconfined"))
    .collect()
}

fn restricted_seccomp(p: &PodFields) -> Vec<String> {
    p.effective(
        |s| seccomp_type(&s.seccomp_profile),
        |s| seccomp_type(&s.seccomp_profile),
    )
    .into_iter()
    .filter(|(_, t)| !matches!(t.as_deref(), Some("RuntimeDefault" | "Localhost")))
    .map(|(path, t)| format!("{path}: seccompProfile.type is {t:?} (RuntimeDefault or Localhost)"))
    .collect()
}

fn sysctls(p: &PodFields) -> Vec<String> {
    const SAFE: [&str; 10] = [
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    ];
    p.pod_context
        .and_then(|s| s.sysctls.as_ref())
        .into_iter()
        .flatten()
        .filter(|s| !SAFE.contains(&s.name.as_str()))
        .map(|s| format!("securityContext.sysctls has {}", s.name))
        .collect()
}

fn volume_types(p: &PodFields) -> Vec<String> {
    const ALLOWED: [&str; 8] = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    let mut found = Vec::new();
    for v in volumes(p) {
        // The volume's source is its one field besides the name.
        let json = serde_json::to_value(v).unwrap_or_default();
        for kind in json.as_object().into_iter().flat_map(|o| o.keys()) {
            if kind != "name" && !ALLOWED.contains(&kind.as_str()) {
                found.push(format!("volume {} is a {kind}", v.name));
            }
        }
    }
    found
}

fn privilege_escalation(p: &PodFields) -> Vec<String> {
    p.effective(PodFields::no_pod_level, |s| s.allow_privilege_escalation)
        .into_iter()
        .filter(|(_, allowed)| *allowed != Some(false))
        .map(|(path, _)| format!("{path}.securityContext.allowPrivilegeEscalation is not false"))
        .collect()
}

fn run_as_non_root(p: &PodFields) -> Vec<String> {
    p.effective(|s| s.run_as_non_root, |s| s.run_as_non_root)
        .into_iter()
        .filter(|(_, non_root)| *non_root != Some(true))
        .map(|(path, _)| format!("{path}: runAsNonRoot is not true (in the pod or the container)"))
        .collect()
}

fn run_as_non_root_user(p: &PodFields) -> Vec<String> {
    p.contexts(|s| s.run_as_user, |s| s.run_as_user)
        .into_iter()
        .filter(|(_, uid)| *uid == 0)
        .map(|(path, _)| format!("{path}.runAsUser is 0"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{SPEC, job, new_pod};
    use crate::pods::{PodDefaults, build_pod};
    use k8s_openapi::api::core::v1::{
        Capabilities, ContainerPort, EphemeralContainer, HostPathVolumeSource, Sysctl,
        WindowsSecurityContextOptions,
    };
    use kubewan_crds::StepId;

    /// The fixture's spec with every volume a claim (the chart's default policy).
    fn claims_only_spec() -> String {
        SPEC.replace(
            "inputs: {hostPath: {path: /data/in}}",
            "inputs: {persistentVolumeClaim: {claimName: data}}",
        )
        .replace(
            "output: {volume: {hostPath: {path: /data/out}}",
            "output: {volume: {persistentVolumeClaim: {claimName: out}}",
        )
    }

    /// The pod the operator builds for `spec`'s segment 0.
    fn runner_pod(spec: &str) -> Pod {
        let job = job(spec);
        let defaults = PodDefaults {
            runner_image: "ghcr.io/kubewan/kubewan-runner:test".into(),
            image_pull_policy: None,
        };
        build_pod(&job, &new_pod(&job, StepId::Segment(0), 1), &defaults).unwrap()
    }

    fn rules_broken(pod: &Pod) -> Vec<&'static str> {
        let mut rules: Vec<&str> = restricted_violations(pod).iter().map(|v| v.rule).collect();
        rules.dedup();
        rules
    }

    #[test]
    fn a_runner_pod_of_a_claims_only_job_passes_every_restricted_rule() {
        for step in [StepId::Prompts, StepId::Segment(0), StepId::Stitch] {
            let job = job(&claims_only_spec());
            let defaults = PodDefaults {
                runner_image: "r:1".into(),
                image_pull_policy: None,
            };
            let pod = build_pod(&job, &new_pod(&job, step, 1), &defaults).unwrap();
            assert_eq!(restricted_violations(&pod), vec![], "{step}");
        }
    }

    #[test]
    fn host_path_breaks_baseline_and_nfs_the_restricted_volume_types() {
        // What a cluster that allows these kinds (volumes.allowedKinds) gives up.
        let host_path = runner_pod(SPEC);
        assert_eq!(
            rules_broken(&host_path),
            ["HostPath Volumes", "Volume Types"],
            "{:?}",
            restricted_violations(&host_path)
        );
        let nfs = runner_pod(&claims_only_spec().replace(
            "checkpoints: {persistentVolumeClaim: {claimName: ckpts}}",
            "checkpoints: {nfs: {server: nfs.example, path: /ckpts}}",
        ));
        let violations = restricted_violations(&nfs);
        assert_eq!(
            violations,
            [Violation {
                rule: "Volume Types",
                detail: "volume checkpoints is a nfs".into()
            }]
        );
    }

    fn context(pod: &mut Pod) -> &mut SecurityContext {
        pod.spec.as_mut().unwrap().containers[0]
            .security_context
            .get_or_insert_with(Default::default)
    }

    fn pod_context(pod: &mut Pod) -> &mut PodSecurityContext {
        pod.spec
            .as_mut()
            .unwrap()
            .security_context
            .get_or_insert_with(Default::default)
    }

    /// Each rule catches a pod that breaks it, and only that rule (with its
    /// baseline or restricted twin) fires: no rule is a check that cannot fail.
    #[test]
    fn every_rule_catches_the_pod_that_breaks_it() {
        type Edit = fn(&mut Pod);
        let cases: [(Edit, &[&str]); 22] = [
            (
                |p| {
                    context(p).windows_options = Some(WindowsSecurityContextOptions {
                        host_process: Some(true),
                        ..Default::default()
                    })
                },
                &["HostProcess"],
            ),
            (
                |p| p.spec.as_mut().unwrap().host_network = Some(true),
                &["Host Namespaces"],
            ),
            (
                |p| p.spec.as_mut().unwrap().host_pid = Some(true),
                &["Host Namespaces"],
            ),
            (
                |p| p.spec.as_mut().unwrap().host_ipc = Some(true),
                &["Host Namespaces"],
            ),
            (
                |p| context(p).privileged = Some(true),
                &["Privileged Containers"],
            ),
            (
                |p| context(p).capabilities.as_mut().unwrap().add = Some(vec!["SYS_ADMIN".into()]),
                &["Capabilities (baseline)", "Capabilities (restricted)"],
            ),
            (
                |p| context(p).capabilities.as_mut().unwrap().add = Some(vec!["CHOWN".into()]),
                &["Capabilities (restricted)"],
            ),
            (
                |p| context(p).capabilities = Some(Capabilities::default()),
                &["Capabilities (restricted)"],
            ),
            (
                |p| {
                    p.spec
                        .as_mut()
                        .unwrap()
                        .volumes
                        .as_mut()
                        .unwrap()
                        .push(Volume {
                            name: "host".into(),
                            host_path: Some(HostPathVolumeSource {
                                path: "/".into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                },
                &["HostPath Volumes", "Volume Types"],
            ),
            (
                |p| {
                    p.spec.as_mut().unwrap().containers[0].ports = Some(vec![ContainerPort {
                        container_port: 80,
                        host_port: Some(80),
                        ..Default::default()
                    }])
                },
                &["Host Ports"],
            ),
            (
                |p| {
                    p.metadata
                        .annotations
                        .get_or_insert_with(Default::default)
                        .insert(
                            "container.apparmor.security.beta.kubernetes.io/runner".into(),
                            "unconfined".into(),
                        );
                },
                &["AppArmor"],
            ),
            (
                |p| {
                    context(p).app_armor_profile = Some(AppArmorProfile {
                        type_: "Unconfined".into(),
                        ..Default::default()
                    })
                },
                &["AppArmor"],
            ),
            (
                |p| {
                    pod_context(p).se_linux_options = Some(SELinuxOptions {
                        type_: Some("spc_t".into()),
                        ..Default::default()
                    })
                },
                &["SELinux"],
            ),
            (
                |p| {
                    context(p).se_linux_options = Some(SELinuxOptions {
                        user: Some("system_u".into()),
                        ..Default::default()
                    })
                },
                &["SELinux"],
            ),
            (
                |p| context(p).proc_mount = Some("Unmasked".into()),
                &["/proc Mount Type"],
            ),
            (
                |p| {
                    context(p).seccomp_profile = Some(SeccompProfile {
                        type_: "Unconfined".into(),
                        ..Default::default()
                    })
                },
                &["Seccomp (baseline)", "Seccomp (restricted)"],
            ),
            (
                |p| {
                    context(p).seccomp_profile = None;
                    pod_context(p).seccomp_profile = None;
                },
                &["Seccomp (restricted)"],
            ),
            (
                |p| {
                    pod_context(p).sysctls = Some(vec![Sysctl {
                        name: "kernel.msgmax".into(),
                        value: "1".into(),
                    }])
                },
                &["Sysctls"],
            ),
            (
                |p| context(p).allow_privilege_escalation = None,
                &["Privilege Escalation"],
            ),
            (
                |p| {
                    context(p).run_as_non_root = Some(false);
                },
                &["Running as Non-root"],
            ),
            (
                |p| context(p).run_as_user = Some(0),
                &["Running as Non-root user"],
            ),
            (
                // A debug container: every rule reads ephemeral containers too.
                |p| {
                    p.spec.as_mut().unwrap().ephemeral_containers = Some(vec![EphemeralContainer {
                        name: "debug".into(),
                        ..Default::default()
                    }])
                },
                &["Privilege Escalation", "Capabilities (restricted)"],
            ),
        ];
        let clean = runner_pod(&claims_only_spec());
        for (i, (edit, expected)) in cases.iter().enumerate() {
            let mut pod = clean.clone();
            edit(&mut pod);
            let mut broken = rules_broken(&pod);
            broken.sort();
            let mut expected = expected.to_vec();
            expected.sort();
            assert_eq!(
                broken,
                expected,
                "case {i}: {:?}",
                restricted_violations(&pod)
            );
        }
        // Every rule was caught by some case above.
        for (rule, _) in RULES {
            assert!(
                cases.iter().any(|(_, e)| e.contains(&rule)),
                "no case breaks {rule}"
            );
        }
    }

    #[test]
    fn run_as_non_root_may_come_from_the_pod_alone() {
        let mut pod = runner_pod(&claims_only_spec());
        context(&mut pod).run_as_non_root = None;
        assert_eq!(restricted_violations(&pod), vec![]);
        pod_context(&mut pod).run_as_non_root = None;
        assert_eq!(rules_broken(&pod), ["Running as Non-root"]);
    }
}
