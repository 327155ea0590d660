//! The cluster operator's policy on what a TravelJob may ask of its runner
//! pods (the chart's `runner.allowedImages` and `volumes.allowedKinds`): the
//! image repositories they may run, the kinds of volume they may mount, and
//! no pod annotation that would loosen the runtime's security profiles.
//! Pure. [`SpecPolicy::admit`] is the one gate between a spec and its plan:
//! a spec that does not validate is [`REASON_INVALID`], a valid one the
//! policy forbids is [`REASON_FORBIDDEN`], each naming every field at fault,
//! and no pod is ever built for either.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use kubewan_crds::spec::VolumeSource;
use kubewan_crds::validate::{FieldError, ValidationErrors};
use kubewan_crds::{Plan, TravelJobSpec};

use crate::conditions::{REASON_FORBIDDEN, REASON_INVALID};

/// A kind of volume source a TravelJob can name (`spec.checkpoints`,
/// `spec.inputs`, `spec.output.volume`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum VolumeKind {
    PersistentVolumeClaim,
    Nfs,
    HostPath,
}

impl VolumeKind {
    pub const ALL: [VolumeKind; 3] = [
        VolumeKind::PersistentVolumeClaim,
        VolumeKind::Nfs,
        VolumeKind::HostPath,
    ];

    /// The field name, as in the spec and the chart's values.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeKind::PersistentVolumeClaim => "persistentVolumeClaim",
            VolumeKind::Nfs => "nfs",
            VolumeKind::HostPath => "hostPath",
        }
    }

    /// The kinds `source` sets (validation makes that exactly one).
    fn of(source: &VolumeSource) -> impl Iterator<Item = VolumeKind> {
        [
            source
                .persistent_volume_claim
                .as_ref()
                .map(|_| VolumeKind::PersistentVolumeClaim),
            source.nfs.as_ref().map(|_| VolumeKind::Nfs),
            source.host_path.as_ref().map(|_| VolumeKind::HostPath),
        ]
        .into_iter()
        .flatten()
    }
}

impl fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VolumeKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VolumeKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown volume kind {s:?} (one of persistentVolumeClaim, nfs, hostPath)")
            })
    }
}

/// An allowed image: one repository (any tag or digest of it), or, ending in
/// `/`, every repository under a registry or path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImagePattern {
    /// As configured, for messages.
    text: String,
    /// Normalised: `ghcr.io/kubewan/kubewan-runner`, or `ghcr.io/kubewan/` for a prefix.
    normalised: String,
}

impl ImagePattern {
    pub fn parse(text: &str) -> Result<ImagePattern, String> {
        let normalised = match text.strip_suffix('/') {
            Some(stem) if !stem.contains('/') && is_domain(stem) => {
                format!("{}/", stem.to_ascii_lowercase())
            }
            Some(stem) => format!(
                "{}/",
                normalise_name(stem, false)
                    .map_err(|why| format!("allowed image {text:?} {why}"))?
            ),
            None => {
                let last = text.rsplit('/').next().unwrap_or_default();
                if text.contains('@') || last.contains(':') {
                    return Err(format!(
                        "allowed image {text:?} has a tag or digest: name a repository \
                         (any tag of it) or a prefix ending in '/'"
                    ));
                }
                normalise_name(text, true).map_err(|why| format!("allowed image {text:?} {why}"))?
            }
        };
        Ok(ImagePattern {
            text: text.to_owned(),
            normalised,
        })
    }

    /// Whether the image whose normalised repository is `repository` is allowed.
    fn matches(&self, repository: &str) -> bool {
        if self.normalised.ends_with('/') {
            repository.starts_with(&self.normalised)
        } else {
            repository == self.normalised
        }
    }
}

/// The repository of an image reference as the container runtime resolves
/// it (`busybox:1` is `docker.io/library/busybox`), without tag or digest;
/// an error says why `image` is not a valid reference.
pub fn image_repository(image: &str) -> Result<String, String> {
    let (name_tag, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let valid = digest.split_once(':').is_some_and(|(algorithm, hex)| {
            !algorithm.is_empty()
                && algorithm
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c))
                && hex.len() >= 32
                && hex.chars().all(|c| c.is_ascii_hexdigit())
        });
        if !valid {
            return Err(format!("{image:?} has an invalid digest"));
        }
    }
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let valid = !tag.is_empty()
            && tag.len() <= 128
            && !tag.starts_with(['.', '-'])
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid {
            return Err(format!("{image:?} has an invalid tag"));
        }
    }
    normalise_name(name, true).map_err(|why| format!("{image:?} {why}"))
}

/// `registry/path` of an image name (no tag or digest), with Docker Hub's
/// defaults filled in (`library/` only for a whole repository name).
fn normalise_name(name: &str, repository: bool) -> Result<String, String> {
    let (domain, path) = match name.split_once('/') {
        Some((first, rest)) if is_domain(first) => (first.to_ascii_lowercase(), rest),
        _ => ("docker.io".to_owned(), name),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io".to_owned()
    } else {
        domain
    };
    let components: Vec<&str> = path.split('/').collect();
    for component in &components {
        let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        let valid = component.starts_with(alnum)
            && component.ends_with(alnum)
            && component.chars().all(|c| alnum(c) || "._-".contains(c));
        if !valid {
            return Err(format!(
                "is not a valid image name (path component {component:?}: lower-case letters, \
                 digits and '.', '_', '-' between them)"
            ));
        }
    }
    let path = if repository && domain == "docker.io" && components.len() == 1 {
        format!("library/{path}")
    } else {
        path.to_owned()
    };
    Ok(format!("{domain}/{path}"))
}

/// The first component of an image name is a registry when it looks like a
/// host: a dot, a port, or `localhost`.
fn is_domain(component: &str) -> bool {
    (component.contains(['.', ':']) || component == "localhost")
        && component
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c))
}

/// Pod annotations that set a container's AppArmor or seccomp profile (the
/// Pod Security Standards' AppArmor and seccomp rules): only the operator
/// decides them (RuntimeDefault seccomp, the runtime's default AppArmor).
const SECURITY_ANNOTATION_PREFIXES: [&str; 3] = [
    "container.apparmor.security.beta.kubernetes.io/",
    "seccomp.security.alpha.kubernetes.io/",
    "container.seccomp.security.alpha.kubernetes.io/",
];

/// Why a spec gets no pods: the Failed condition's reason and the message
/// naming every field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecRejection {
    pub reason: &'static str,
    pub message: String,
}

impl From<ValidationErrors> for SpecRejection {
    fn from(errors: ValidationErrors) -> Self {
        SpecRejection {
            reason: REASON_INVALID,
            message: errors.to_string(),
        }
    }
}

/// What this cluster lets a TravelJob's runner pods use.
#[derive(Clone, Debug)]
pub struct SpecPolicy {
    /// Always includes the repository of the operator's default runner image.
    images: Vec<ImagePattern>,
    volume_kinds: BTreeSet<VolumeKind>,
}

impl SpecPolicy {
    /// The policy of an operator whose default runner image is
    /// `default_image` (always allowed, with its whole repository), that
    /// also allows `images` and the volume kinds `volume_kinds`.
    pub fn new(
        default_image: &str,
        images: &[String],
        volume_kinds: &[VolumeKind],
    ) -> Result<SpecPolicy, String> {
        let default = ImagePattern::parse(&image_repository(default_image)?)?;
        let mut patterns = vec![default];
        for text in images {
            let pattern = ImagePattern::parse(text)?;
            if !patterns.iter().any(|p| p.normalised == pattern.normalised) {
                patterns.push(pattern);
            }
        }
        Ok(SpecPolicy {
            images: patterns,
            volume_kinds: volume_kinds.iter().copied().collect(),
        })
    }

    /// The plan of `spec`, or why it gets no pods: it does not validate, or
    /// this policy forbids it.
    pub fn admit(&self, spec: &TravelJobSpec) -> Result<Plan, SpecRejection> {
        let plan = Plan::validated(spec)?;
        let forbidden = self.forbidden(spec);
        if forbidden.is_empty() {
            return Ok(plan);
        }
        let problems: Vec<String> = forbidden.iter().map(|e| e.to_string()).collect();
        Err(SpecRejection {
            reason: REASON_FORBIDDEN,
            message: format!(
                "forbidden by this cluster's policy: {}",
                problems.join("; ")
            ),
        })
    }

    /// Every field of `spec` this policy forbids.
    pub fn forbidden(&self, spec: &TravelJobSpec) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(image) = &spec.runner.image
            && let Some(why) = self.image_forbidden(image)
        {
            errors.push(FieldError {
                field: "spec.runner.image".into(),
                message: why,
            });
        }
        for (field, source) in [
            ("spec.checkpoints", &spec.checkpoints),
            ("spec.inputs", &spec.inputs),
            ("spec.output.volume", &spec.output.volume),
        ] {
            for kind in VolumeKind::of(source).filter(|k| !self.volume_kinds.contains(k)) {
                errors.push(FieldError {
                    field: field.into(),
                    message: format!(
                        "{kind} volumes are not allowed in this cluster (allowed: {})",
                        join(self.volume_kinds.iter())
                    ),
                });
            }
        }
        for key in spec.runner.annotations.keys().filter(|k| {
            SECURITY_ANNOTATION_PREFIXES
                .iter()
                .any(|prefix| k.starts_with(prefix))
        }) {
            errors.push(FieldError {
                field: format!("spec.runner.annotations[{key:?}]"),
                message: "sets a security profile of the runner pods, which only the operator \
                          sets (seccomp RuntimeDefault, the runtime's default AppArmor profile)"
                    .into(),
            });
        }
        errors
    }

    /// Why `image` may not run here, if it may not.
    fn image_forbidden(&self, image: &str) -> Option<String> {
        let allowed = || join(self.images.iter().map(|p| &p.text));
        match image_repository(image) {
            Ok(repository) if self.images.iter().any(|p| p.matches(&repository)) => None,
            Ok(_) => Some(format!(
                "{image:?} is not in the images this cluster allows ({})",
                allowed()
            )),
            Err(why) => Some(format!(
                "{why}; this cluster allows images from {}",
                allowed()
            )),
        }
    }
}

fn join<T: fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{SPEC, job};

    const DEFAULT: &str = "ghcr.io/kubewan/kubewan-runner:0.1.0";

    fn policy(images: &[&str], kinds: &[VolumeKind]) -> SpecPolicy {
        let images: Vec<String> = images.iter().map(|s| s.to_string()).collect();
        SpecPolicy::new(DEFAULT, &images, kinds).unwrap()
    }

    /// The fixture's spec (a claim for checkpoints, hostPath inputs and
    /// output) with `image` as spec.runner.image.
    fn spec_with_image(image: Option<&str>) -> TravelJobSpec {
        let mut spec = job(SPEC).spec;
        spec.runner.image = image.map(str::to_owned);
        spec
    }

    fn image_allowed(policy: &SpecPolicy, image: &str) -> bool {
        policy.forbidden(&spec_with_image(Some(image))).is_empty()
    }

    const ALL_KINDS: [VolumeKind; 3] = VolumeKind::ALL;

    #[test]
    fn image_references_normalise_as_the_runtime_resolves_them() {
        for (image, repository) in [
            ("busybox", "docker.io/library/busybox"),
            ("busybox:1.36", "docker.io/library/busybox"),
            ("docker.io/busybox", "docker.io/library/busybox"),
            (
                "index.docker.io/library/busybox",
                "docker.io/library/busybox",
            ),
            ("kubewan/runner:1", "docker.io/kubewan/runner"),
            (
                "ghcr.io/kubewan/kubewan-runner:0.1.0-cuda",
                "ghcr.io/kubewan/kubewan-runner",
            ),
            ("localhost:5000/runner:dev", "localhost:5000/runner"),
            ("Registry.Example:443/a/b/c", "registry.example:443/a/b/c"),
            (
                "ghcr.io/kubewan/kubewan-runner@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "ghcr.io/kubewan/kubewan-runner",
            ),
        ] {
            assert_eq!(
                image_repository(image).as_deref(),
                Ok(repository),
                "{image}"
            );
        }
        for bad in [
            "",
            "ghcr.io/kubewan/../evil",
            "ghcr.io/Kubewan/runner",
            "ghcr.io//runner",
            "runner:",
            "runner:-x",
            "runner@sha256:xyz",
            "ghcr.io/kubewan/runner extra",
        ] {
            assert!(image_repository(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn the_default_image_and_its_repository_are_always_allowed() {
        let p = policy(&[], &ALL_KINDS);
        assert!(p.forbidden(&spec_with_image(None)).is_empty());
        assert!(image_allowed(&p, DEFAULT));
        assert!(image_allowed(
            &p,
            "ghcr.io/kubewan/kubewan-runner:0.1.0-cuda"
        ));
        assert!(!image_allowed(&p, "evil.io/x:1"));
    }

    #[test]
    fn a_repository_pattern_is_not_a_string_prefix() {
        let p = policy(&["registry.example/ml/runner"], &ALL_KINDS);
        for evil in [
            "ghcr.io/kubewan/kubewan-runner-evil:1",
            "ghcr.io/kubewan/kubewan-runner/evil:1",
            "ghcr.io/kubewan/kubewan-runnerx",
            "ghcr.io/kubewan:1",
            "registry.example/ml/runner2:1",
            "registry.example/ml/runner.evil/x",
            "registry.example.evil/ml/runner:1",
            "ghcr.io.evil/kubewan/kubewan-runner:1",
        ] {
            assert!(!image_allowed(&p, evil), "{evil} allowed");
        }
        assert!(image_allowed(&p, "registry.example/ml/runner:2"));
    }

    #[test]
    fn a_prefix_pattern_ends_in_a_slash_and_matches_whole_components() {
        let p = policy(&["registry.example/ml/", "mirror.example/"], &ALL_KINDS);
        assert!(image_allowed(&p, "registry.example/ml/runner:1"));
        assert!(image_allowed(&p, "registry.example/ml/team/runner:1"));
        assert!(image_allowed(&p, "mirror.example/anything/here:1"));
        assert!(!image_allowed(&p, "registry.example/mlx/runner:1"));
        assert!(!image_allowed(&p, "registry.example/runner:1"));
        assert!(!image_allowed(&p, "mirror.example.evil/x:1"));
        // Docker Hub: `library/` is filled in for an image, not for a prefix.
        let hub = policy(&["kubewan/", "busybox"], &ALL_KINDS);
        assert!(image_allowed(&hub, "kubewan/runner:1"));
        assert!(image_allowed(&hub, "docker.io/kubewan/runner:1"));
        assert!(image_allowed(&hub, "busybox:1.36"));
        assert!(!image_allowed(&hub, "runner:1"));
    }

    #[test]
    fn patterns_with_a_tag_or_nonsense_are_refused_at_startup() {
        for bad in [
            "ghcr.io/kubewan/kubewan-runner:1",
            "ghcr.io/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "Ghcr.io/UPPER/",
            "",
        ] {
            let err = SpecPolicy::new(DEFAULT, &[bad.to_owned()], &ALL_KINDS);
            assert!(err.is_err(), "{bad:?} accepted");
        }
        assert!(SpecPolicy::new("not an image", &[], &ALL_KINDS).is_err());
        // A registry with a port is a registry, not a tag.
        assert!(SpecPolicy::new(DEFAULT, &["localhost:5000/runner".into()], &ALL_KINDS).is_ok());
    }

    #[test]
    fn a_forbidden_image_is_named_with_what_is_allowed() {
        let p = policy(&["registry.example/ml/"], &ALL_KINDS);
        let errors = p.forbidden(&spec_with_image(Some("evil.io/x:1")));
        assert_eq!(
            errors,
            vec![FieldError {
                field: "spec.runner.image".into(),
                message: "\"evil.io/x:1\" is not in the images this cluster allows \
                          (ghcr.io/kubewan/kubewan-runner, registry.example/ml/)"
                    .into(),
            }]
        );
        let errors = p.forbidden(&spec_with_image(Some("evil.io/../x")));
        assert!(
            errors[0].message.contains("is not a valid image name"),
            "{errors:?}"
        );
    }

    #[test]
    fn volume_kinds_of_checkpoints_inputs_and_output_are_each_checked() {
        // The fixture: checkpoints a claim, inputs and output hostPath.
        let spec = spec_with_image(None);
        let claims_only = policy(&[], &[VolumeKind::PersistentVolumeClaim]);
        let fields: Vec<String> = claims_only
            .forbidden(&spec)
            .into_iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            fields,
            [
                "spec.inputs: hostPath volumes are not allowed in this cluster (allowed: persistentVolumeClaim)",
                "spec.output.volume: hostPath volumes are not allowed in this cluster (allowed: persistentVolumeClaim)",
            ]
        );
        let with_host_path = policy(
            &[],
            &[VolumeKind::PersistentVolumeClaim, VolumeKind::HostPath],
        );
        assert!(with_host_path.forbidden(&spec).is_empty());
        // An nfs checkpoints volume where only hostPath is allowed.
        let mut nfs = spec.clone();
        nfs.checkpoints =
            serde_saphyr::from_str("nfs: {server: nfs.example, path: /ckpts}").unwrap();
        let host_path_only = policy(&[], &[VolumeKind::HostPath]);
        let errors = host_path_only.forbidden(&nfs);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "spec.checkpoints");
        assert!(errors[0].message.starts_with("nfs volumes are not allowed"));
    }

    #[test]
    fn annotations_that_set_security_profiles_are_forbidden_everywhere() {
        let p = policy(&[], &ALL_KINDS);
        let mut spec = spec_with_image(None);
        for key in [
            "container.apparmor.security.beta.kubernetes.io/runner",
            "seccomp.security.alpha.kubernetes.io/pod",
            "container.seccomp.security.alpha.kubernetes.io/runner",
        ] {
            spec.runner
                .annotations
                .insert(key.into(), "unconfined".into());
        }
        let fields: Vec<String> = p.forbidden(&spec).into_iter().map(|e| e.field).collect();
        assert_eq!(fields.len(), 3, "{fields:?}");
        assert!(fields[0].starts_with("spec.runner.annotations[\"container.apparmor"));
    }

    #[test]
    fn admit_validates_first_then_names_every_forbidden_field() {
        let p = policy(&[], &[VolumeKind::PersistentVolumeClaim]);
        let mut spec = spec_with_image(Some("evil.io/x:1"));
        let rejection = p.admit(&spec).unwrap_err();
        assert_eq!(rejection.reason, REASON_FORBIDDEN);
        assert!(
            rejection.message.starts_with(
                "forbidden by this cluster's policy: spec.runner.image: \"evil.io/x:1\" is not in"
            ),
            "{}",
            rejection.message
        );
        assert!(rejection.message.contains("; spec.inputs: hostPath"));
        assert!(rejection.message.contains("; spec.output.volume: hostPath"));
        spec.keyframes.truncate(1);
        let rejection = p.admit(&spec).unwrap_err();
        assert_eq!(rejection.reason, REASON_INVALID);
        assert!(
            rejection.message.contains("spec.keyframes"),
            "{}",
            rejection.message
        );
        let fine = policy(&[], &ALL_KINDS).admit(&spec_with_image(None));
        assert!(fine.is_ok(), "{fine:?}");
    }

    #[test]
    fn a_forbidden_job_fails_with_its_own_reason_an_event_and_no_pod() {
        use crate::conditions::failed_reason;
        use crate::decide::{Settings, decide};
        use crate::fixtures::t;
        use kubewan_crds::JobPhase;

        let p = policy(&[], &ALL_KINDS);
        let mut j = job(SPEC);
        j.spec.runner.image = Some("evil.io/x:1".into());
        let d = decide(&j, &p.admit(&j.spec), &[], &Settings::default(), t(0));
        assert!(d.create.is_empty());
        assert_eq!(d.status.phase, JobPhase::Failed);
        assert_eq!(failed_reason(&d.status), Some(REASON_FORBIDDEN));
        let message = d.status.message.clone().unwrap();
        assert!(message.contains("spec.runner.image"), "{message}");
        assert!(
            d.events
                .iter()
                .any(|e| e.warning && e.reason == REASON_FORBIDDEN)
        );
        // Said once; the image fixed, the job starts.
        j.status = Some(d.status);
        let again = decide(&j, &p.admit(&j.spec), &[], &Settings::default(), t(1));
        assert!(again.events.is_empty() && again.create.is_empty());
        j.spec.runner.image = None;
        let fixed = decide(&j, &p.admit(&j.spec), &[], &Settings::default(), t(2));
        assert_eq!(fixed.create.len(), 1, "{:?}", fixed.status);
        assert!(!fixed.status.phase.is_finished());
    }

    #[test]
    fn volume_kinds_parse_by_their_field_names() {
        assert_eq!("hostPath".parse(), Ok(VolumeKind::HostPath));
        assert_eq!(
            "persistentVolumeClaim".parse(),
            Ok(VolumeKind::PersistentVolumeClaim)
        );
        let err = "emptyDir".parse::<VolumeKind>().unwrap_err();
        assert!(err.contains("emptyDir"), "{err}");
    }
}
