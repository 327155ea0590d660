//! Spec validation with one clear message per problem. The CRD schema carries
//! what OpenAPI can express; this covers the rest, and is enforced by the
//! operator (old API servers ignore CEL rules) and by local mode.

use std::fmt;
use std::path::{Component, Path};

use crate::plan::{normalise_frames, parse_resolution};
use crate::spec::{TravelJobSpec, VolumeSource};

/// One problem, at a field path such as `spec.keyframes[2]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All problems of a spec, joined into one message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid TravelJob: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct ValidationErrors(pub Vec<FieldError>);

/// Checks a spec; every problem found is reported, not just the first.
pub fn validate(spec: &TravelJobSpec) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    let mut fail = |field: String, message: String| errors.push(FieldError { field, message });

    if spec.keyframes.len() < 2 {
        fail(
            "spec.keyframes".into(),
            format!("needs at least 2 keyframes, got {}", spec.keyframes.len()),
        );
    }
    for (i, keyframe) in spec.keyframes.iter().enumerate() {
        if let Err(why) = check_relative_path(keyframe) {
            fail(
                format!("spec.keyframes[{i}]"),
                format!("{keyframe:?} {why} (paths are relative to the inputs volume)"),
            );
        }
    }
    let segments = spec.keyframes.len().saturating_sub(1);
    if spec.prompts.len() > segments {
        fail(
            "spec.prompts".into(),
            format!(
                "{} prompts for {segments} segments (one per pair of keyframes)",
                spec.prompts.len()
            ),
        );
    }
    if spec.frames < 5 {
        fail(
            "spec.frames".into(),
            format!("must be at least 5, got {}", spec.frames),
        );
    }
    let frames = normalise_frames(spec.frames);
    if spec.overlap >= frames {
        fail(
            "spec.overlap".into(),
            format!(
                "{} must be smaller than the segment's {frames} frames",
                spec.overlap
            ),
        );
    }
    if spec.fps == 0 {
        fail("spec.fps".into(), "must be positive".into());
    }
    if spec.steps == 0 {
        fail("spec.steps".into(), "must be positive".into());
    }
    if parse_resolution(&spec.resolution).is_none() {
        fail(
            "spec.resolution".into(),
            format!(
                "{:?} is not WIDTHxHEIGHT with both sides at least 16",
                spec.resolution
            ),
        );
    }
    if !(spec.guidance_scale.is_finite() && spec.guidance_scale >= 0.0) {
        fail(
            "spec.guidanceScale".into(),
            format!("must be a non-negative number, got {}", spec.guidance_scale),
        );
    }
    if let Some(shift) = spec.flow_shift
        && !(shift.is_finite() && shift > 0.0)
    {
        fail(
            "spec.flowShift".into(),
            format!("must be positive, got {shift}"),
        );
    }
    if spec.parallelism == 0 {
        fail("spec.parallelism".into(), "must be at least 1".into());
    }
    if let Err(why) = check_relative_path(&spec.model.name) {
        fail(
            "spec.model.name".into(),
            format!(
                "{:?} {why} (model folders are relative to the checkpoints volume)",
                spec.model.name
            ),
        );
    }
    if spec.enhance_prompt.enabled {
        if let Err(why) = check_relative_path(&spec.enhance_prompt.model) {
            fail(
                "spec.enhancePrompt.model".into(),
                format!(
                    "{:?} {why} (model folders are relative to the checkpoints volume)",
                    spec.enhance_prompt.model
                ),
            );
        }
        if spec.enhance_prompt.max_new_tokens == 0 {
            fail(
                "spec.enhancePrompt.maxNewTokens".into(),
                "must be positive".into(),
            );
        }
    }
    if !spec.output.path_prefix.is_empty()
        && let Err(why) = check_relative_path(&spec.output.path_prefix)
    {
        fail(
            "spec.output.pathPrefix".into(),
            format!("{:?} {why}", spec.output.path_prefix),
        );
    }
    for (field, volume) in [
        ("spec.checkpoints", &spec.checkpoints),
        ("spec.inputs", &spec.inputs),
        ("spec.output.volume", &spec.output.volume),
    ] {
        if let Err(message) = check_volume(volume) {
            fail(field.into(), message);
        }
    }
    if spec.runner.gpu_resource.trim().is_empty() {
        fail(
            "spec.runner.gpuResource".into(),
            "must name an extended resource such as nvidia.com/gpu".into(),
        );
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errors))
    }
}

/// A path that stays inside the folder it is relative to: not empty, not
/// absolute, no `..`.
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.trim().is_empty() {
        return Err("is empty");
    }
    let p = Path::new(path);
    if p.is_absolute() {
        return Err("is absolute");
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err("escapes its volume with '..'");
    }
    Ok(())
}

fn check_volume(volume: &VolumeSource) -> Result<(), String> {
    let set = [
        volume.persistent_volume_claim.is_some(),
        volume.host_path.is_some(),
        volume.nfs.is_some(),
    ];
    match set.iter().filter(|s| **s).count() {
        1 => Ok(()),
        0 => Err("needs one volume source (persistentVolumeClaim, hostPath or nfs)".into()),
        _ => Err("sets more than one volume source; choose one".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> TravelJobSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const VOLUMES: &str = "checkpoints: {hostPath: {path: /c}}\ninputs: {hostPath: {path: /i}}\noutput: {volume: {hostPath: {path: /o}}}\n";

    #[test]
    fn a_good_spec_passes() {
        validate(&spec(&format!("keyframes: [a.png, b.png]\n{VOLUMES}"))).unwrap();
    }

    #[test]
    fn every_problem_is_named_with_its_field() {
        let errors = validate(&spec(&format!(
            "keyframes: [../etc/passwd]\nframes: 9\noverlap: 9\nresolution: 0x0\nmodel: {{name: /abs}}\n{VOLUMES}"
        )))
        .unwrap_err()
        .0;
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.keyframes",
                "spec.keyframes[0]",
                "spec.overlap",
                "spec.resolution",
                "spec.model.name"
            ]
        );
        assert!(errors[1].message.contains("'..'"), "{}", errors[1]);
    }

    #[test]
    fn volumes_need_exactly_one_source() {
        let errors = validate(&spec(
            "keyframes: [a, b]\ncheckpoints: {}\ninputs: {hostPath: {path: /i}, nfs: {server: s, path: /p}}\noutput: {volume: {hostPath: {path: /o}}}\n",
        ))
        .unwrap_err();
        let text = errors.to_string();
        assert!(
            text.contains("spec.checkpoints: needs one volume source"),
            "{text}"
        );
        assert!(text.contains("spec.inputs: sets more than one"), "{text}");
    }
}
