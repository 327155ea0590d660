//! Spec validation with one clear message per problem. The CRD schema carries
//! what OpenAPI can express; this covers the rest (and repeats the schema's
//! bounds, so a job read from a file meets them too), and is enforced by the
//! operator (old API servers ignore CEL rules) and by local mode. The limits
//! themselves live in [`crate::limits`]. [`validate_plan`] checks a plan
//! that arrives in a task, which a runner cannot assume was validated.

use std::fmt;
use std::path::{Component, Path};

use kube::ResourceExt;

use crate::limits::{self, check_text};
use crate::plan::{Plan, normalise_frames, parse_resolution};
use crate::quantity::memory_bytes;
use crate::spec::{ComputeDevice, TravelJob, TravelJobSpec, VolumeSource};

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

/// Checks a whole manifest as the API server and the operator would: the
/// object's name and namespace, then its spec ([`validate`]).
pub fn validate_job(job: &TravelJob) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    let name = job.name_any();
    if let Err(why) = check_dns_name(&name, limits::MAX_NAME_BYTES, true) {
        errors.push(FieldError {
            field: "metadata.name".into(),
            message: format!("{name:?} {why}"),
        });
    }
    if let Some(namespace) = job.metadata.namespace.as_deref()
        && let Err(why) = check_dns_name(namespace, limits::MAX_NAMESPACE_BYTES, false)
    {
        errors.push(FieldError {
            field: "metadata.namespace".into(),
            message: format!("{namespace:?} {why}"),
        });
    }
    if let Err(ValidationErrors(spec_errors)) = validate(&job.spec) {
        errors.extend(spec_errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errors))
    }
}

/// A Kubernetes name: lower-case letters, digits and '-' (and '.' in a DNS
/// subdomain), starting and ending with a letter or digit.
pub(crate) fn check_dns_name(name: &str, max: usize, dots: bool) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if name.is_empty() || name.len() > max {
        return Err(format!("must be 1 to {max} characters long"));
    }
    let allowed = |c: char| alnum(c) || c == '-' || (dots && c == '.');
    if !name.chars().all(allowed)
        || !name.starts_with(alnum)
        || !name.ends_with(alnum)
        || (dots && name.split('.').any(str::is_empty))
    {
        return Err(format!(
            "must be lower-case letters, digits{} and '-', starting and ending with a letter or digit",
            if dots { ", '.'" } else { "" }
        ));
    }
    Ok(())
}

/// Checks a spec; every problem found is reported, not just the first.
pub fn validate(spec: &TravelJobSpec) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    let mut fail = |field: String, message: String| errors.push(FieldError { field, message });

    if spec.keyframes.len() < 2 || spec.keyframes.len() > limits::MAX_KEYFRAMES {
        fail(
            "spec.keyframes".into(),
            format!(
                "needs 2 to {} keyframes, got {}",
                limits::MAX_KEYFRAMES,
                spec.keyframes.len()
            ),
        );
    }
    for (i, keyframe) in spec.keyframes.iter().enumerate() {
        if let Err(why) = check_input_path(keyframe) {
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
    if let Err(why) = check_text(&spec.prompt, limits::MAX_PROMPT_BYTES) {
        fail("spec.prompt".into(), why);
    }
    for (i, prompt) in spec.prompts.iter().enumerate() {
        if let Err(why) = check_text(prompt, limits::MAX_PROMPT_BYTES) {
            fail(format!("spec.prompts[{i}]"), why);
        }
    }
    if let Some(negative) = &spec.negative_prompt
        && let Err(why) = check_text(negative, limits::MAX_NEGATIVE_PROMPT_BYTES)
    {
        fail("spec.negativePrompt".into(), why);
    }
    if let Err(why) = limits::check_frames(spec.frames) {
        fail("spec.frames".into(), why);
    }
    let frames = normalise_frames(spec.frames.min(limits::MAX_FRAMES));
    if spec.overlap >= frames {
        fail(
            "spec.overlap".into(),
            format!(
                "{} must be smaller than the segment's {frames} frames",
                spec.overlap
            ),
        );
    }
    if !(1..=limits::MAX_FPS).contains(&spec.fps) {
        fail(
            "spec.fps".into(),
            format!(
                "must be between 1 and {}, got {}",
                limits::MAX_FPS,
                spec.fps
            ),
        );
    }
    if let Err(why) = limits::check_steps(spec.steps) {
        fail("spec.steps".into(), why);
    }
    match parse_resolution(&spec.resolution) {
        None => fail(
            "spec.resolution".into(),
            format!(
                "{:?} is not WIDTHxHEIGHT (2 to 4 digits a side, each at least 16)",
                spec.resolution
            ),
        ),
        Some((width, height)) => {
            if let Err(why) = limits::check_size(width, height) {
                fail("spec.resolution".into(), why);
            }
        }
    }
    for (field, guidance) in [
        ("spec.guidanceScale", Some(spec.guidance_scale)),
        ("spec.guidanceScale2", spec.guidance_scale_2),
    ] {
        if let Some(g) = guidance
            && let Err(why) = limits::check_guidance(g)
        {
            fail(field.into(), why);
        }
    }
    if let Some(shift) = spec.flow_shift
        && !(shift.is_finite() && shift > 0.0)
    {
        fail(
            "spec.flowShift".into(),
            format!("must be positive, got {shift}"),
        );
    }
    if !(1..=limits::MAX_KEYFRAMES as u32).contains(&spec.parallelism) {
        fail(
            "spec.parallelism".into(),
            format!(
                "must be between 1 and {}, got {}",
                limits::MAX_KEYFRAMES,
                spec.parallelism
            ),
        );
    }
    if let Err(why) = check_input_path(&spec.model.name) {
        fail(
            "spec.model.name".into(),
            format!(
                "{:?} {why} (model folders are relative to the checkpoints volume)",
                spec.model.name
            ),
        );
    }
    for (i, lora) in spec.model.loras.iter().enumerate() {
        if let Err(why) = check_relative_path(&lora.path) {
            fail(
                format!("spec.model.loras[{i}].path"),
                format!(
                    "{:?} {why} (LoRA files are relative to the checkpoints volume)",
                    lora.path
                ),
            );
        }
        if !lora.scale.is_finite() {
            fail(
                format!("spec.model.loras[{i}].scale"),
                format!("must be a finite number, got {}", lora.scale),
            );
        }
    }
    if spec.enhance_prompt.enabled {
        if let Err(why) = check_input_path(&spec.enhance_prompt.model) {
            fail(
                "spec.enhancePrompt.model".into(),
                format!(
                    "{:?} {why} (model folders are relative to the checkpoints volume)",
                    spec.enhance_prompt.model
                ),
            );
        }
        if !(1..=limits::MAX_NEW_TOKENS).contains(&spec.enhance_prompt.max_new_tokens) {
            fail(
                "spec.enhancePrompt.maxNewTokens".into(),
                format!(
                    "must be between 1 and {}, got {}",
                    limits::MAX_NEW_TOKENS,
                    spec.enhance_prompt.max_new_tokens
                ),
            );
        }
    }
    if !spec.output.path_prefix.is_empty()
        && let Err(why) = check_input_path(&spec.output.path_prefix)
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
    if spec.runner.device == ComputeDevice::Gpu && spec.runner.gpus == 0 {
        fail(
            "spec.runner.gpus".into(),
            "is 0 but spec.runner.device is gpu: request at least one GPU, or set \
             spec.runner.device: cpu to compute on the CPU on purpose"
                .into(),
        );
    }
    if spec.runner.gpu_resource.trim().is_empty() {
        fail(
            "spec.runner.gpuResource".into(),
            "must name an extended resource such as nvidia.com/gpu".into(),
        );
    }
    for (field, quantity) in [
        ("spec.runner.memoryRequest", &spec.runner.memory_request),
        ("spec.runner.memoryLimit", &spec.runner.memory_limit),
    ] {
        if let Some(q) = quantity
            && memory_bytes(q).is_none()
        {
            fail(
                field.into(),
                format!("{q:?} is not a memory quantity (e.g. \"32Gi\", \"512M\")"),
            );
        }
    }
    if spec.backoff_limit > limits::MAX_BACKOFF_LIMIT {
        fail(
            "spec.backoffLimit".into(),
            format!(
                "must be at most {}, got {}",
                limits::MAX_BACKOFF_LIMIT,
                spec.backoff_limit
            ),
        );
    }
    if spec.active_deadline_seconds.is_some_and(|s| s < 1) {
        fail(
            "spec.activeDeadlineSeconds".into(),
            "must be at least 1".into(),
        );
    }
    if spec.ttl_seconds_after_finished.is_some_and(|s| s < 0) {
        fail(
            "spec.ttlSecondsAfterFinished".into(),
            "must not be negative".into(),
        );
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errors))
    }
}

/// A path of the spec: relative, inside its volume, at most
/// [`limits::MAX_PATH_BYTES`] bytes, printable.
fn check_input_path(path: &str) -> Result<(), String> {
    check_relative_path(path)?;
    check_text(path, limits::MAX_PATH_BYTES)?;
    if path.contains(['\n', '\t']) {
        return Err("contains a newline or tab".into());
    }
    Ok(())
}

/// Checks a plan as a runner receives it in its task: the same limits as
/// [`validate`], and the plan's own invariants (4N+1 frames, sides in
/// multiples of 16, overlaps shorter than the segments, the frame total), so
/// a hand-written or corrupted task cannot ask for what no valid job would.
pub fn validate_plan(plan: &Plan) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    let mut fail = |field: String, message: String| errors.push(FieldError { field, message });
    if let Err(why) = limits::check_size(plan.width, plan.height) {
        fail("plan.width/height".into(), why);
    } else if !plan.width.is_multiple_of(16) || !plan.height.is_multiple_of(16) {
        fail(
            "plan.width/height".into(),
            format!(
                "{}x{}: sides must be multiples of 16",
                plan.width, plan.height
            ),
        );
    }
    if !(1..=limits::MAX_FPS).contains(&plan.fps) {
        fail(
            "plan.fps".into(),
            format!("must be between 1 and {}", limits::MAX_FPS),
        );
    }
    if let Err(why) = limits::check_steps(plan.steps) {
        fail("plan.steps".into(), why);
    }
    if let Err(why) = limits::check_guidance(plan.guidance_scale) {
        fail("plan.guidanceScale".into(), why);
    }
    if plan.flow_shift.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
        fail("plan.flowShift".into(), "must be positive".into());
    }
    for (field, text, max) in [
        (
            "plan.prompt",
            plan.prompt.as_str(),
            limits::MAX_PROMPT_BYTES,
        ),
        (
            "plan.negativePrompt",
            plan.negative_prompt.as_deref().unwrap_or(""),
            limits::MAX_NEGATIVE_PROMPT_BYTES,
        ),
    ] {
        if let Err(why) = check_text(text, max) {
            fail(field.into(), why);
        }
    }
    if plan.video_model != crate::PREVIEW_MODEL
        && let Err(why) = check_input_path(&plan.video_model)
    {
        fail("plan.videoModel".into(), why);
    }
    if let Some(vlm) = &plan.vlm {
        if let Err(why) = check_input_path(&vlm.model) {
            fail("plan.vlm.model".into(), why);
        }
        if !(1..=limits::MAX_NEW_TOKENS).contains(&vlm.max_new_tokens) {
            fail(
                "plan.vlm.maxNewTokens".into(),
                format!("must be between 1 and {}", limits::MAX_NEW_TOKENS),
            );
        }
    }
    if plan.segments.is_empty() || plan.segments.len() >= limits::MAX_KEYFRAMES {
        fail(
            "plan.segments".into(),
            format!(
                "needs 1 to {} segments, got {}",
                limits::MAX_KEYFRAMES - 1,
                plan.segments.len()
            ),
        );
    }
    let mut total: u64 = 0;
    for (i, seg) in plan.segments.iter().enumerate() {
        let field = |name: &str| format!("plan.segments[{i}].{name}");
        if seg.index as usize != i {
            fail(field("index"), format!("is {}, expected {i}", seg.index));
        }
        if let Err(why) = limits::check_frames(seg.frames) {
            fail(field("frames"), why);
        } else if normalise_frames(seg.frames) != seg.frames {
            fail(field("frames"), format!("{} is not 4N+1", seg.frames));
        }
        if seg.overlap_before >= seg.frames || (i == 0 && seg.overlap_before != 0) {
            fail(
                field("overlapBefore"),
                format!(
                    "{} does not fit a {}-frame segment{}",
                    seg.overlap_before,
                    seg.frames,
                    if i == 0 { " (the first has none)" } else { "" }
                ),
            );
        }
        for (name, path) in [
            ("startKeyframe", &seg.start_keyframe),
            ("endKeyframe", &seg.end_keyframe),
        ] {
            if let Err(why) = check_input_path(path) {
                fail(field(name), format!("{path:?} {why}"));
            }
        }
        if let Err(why) = check_text(&seg.prompt, limits::MAX_PROMPT_BYTES) {
            fail(field("prompt"), why);
        }
        total += u64::from(seg.frames.saturating_sub(seg.overlap_before));
    }
    if u64::from(plan.total_frames) != total {
        fail(
            "plan.totalFrames".into(),
            format!("is {}, the segments add up to {total}", plan.total_frames),
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
    fn a_gpu_job_needs_a_gpu_and_a_cpu_job_none() {
        let zero = validate(&spec(&format!(
            "keyframes: [a.png, b.png]\nrunner: {{gpus: 0}}\n{VOLUMES}"
        )))
        .unwrap_err()
        .to_string();
        assert!(
            zero.contains("spec.runner.gpus: is 0 but spec.runner.device is gpu"),
            "{zero}"
        );
        let cpu = spec(&format!(
            "keyframes: [a.png, b.png]\nrunner: {{device: cpu}}\n{VOLUMES}"
        ));
        validate(&cpu).unwrap();
        assert!(!cpu.runner.gpu_for(crate::Stage::Segment));
        let gpu = spec(&format!("keyframes: [a.png, b.png]\n{VOLUMES}"));
        assert!(gpu.runner.gpu_for(crate::Stage::Prompts));
        assert!(!gpu.runner.gpu_for(crate::Stage::Stitch));
    }

    #[test]
    fn loras_and_the_second_guidance_are_checked() {
        let errors = validate(&spec(&format!(
            "keyframes: [a, b]\nguidanceScale2: -1\nmodel: {{loras: [{{path: ok.safetensors}}, {{path: ../x.safetensors, scale: .inf}}]}}\n{VOLUMES}"
        )))
        .unwrap_err()
        .0;
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.guidanceScale2",
                "spec.model.loras[1].path",
                "spec.model.loras[1].scale"
            ]
        );
        let good = spec(&format!(
            "keyframes: [a, b]\nmodel: {{scheduler: euler, loras: [{{path: l.safetensors, expert: low}}]}}\n{VOLUMES}"
        ));
        validate(&good).unwrap();
        assert_eq!(good.model.loras[0].scale, 1.0);
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

    #[test]
    fn memory_quantities_must_parse() {
        let errors = validate(&spec(&format!(
            "keyframes: [a, b]\nrunner: {{memoryRequest: 2GB, memoryLimit: 4Gi}}\n{VOLUMES}"
        )))
        .unwrap_err()
        .to_string();
        assert!(
            errors.contains("spec.runner.memoryRequest: \"2GB\" is not a memory quantity"),
            "{errors}"
        );
        assert!(!errors.contains("memoryLimit"), "{errors}");
    }

    #[test]
    fn limits_are_enforced_with_the_field_named() {
        let errors = validate(&spec(&format!(
            "keyframes: [a, b]\nframes: 4000000001\nresolution: 100000x100000\nprompt: \"{}\"\nguidanceScale: .nan\n{VOLUMES}",
            "x".repeat(limits::MAX_PROMPT_BYTES + 1)
        )));
        let text = errors.unwrap_err().to_string();
        for needle in [
            "spec.prompt: is 1025 bytes",
            "spec.frames: must be between 5 and 241",
            "spec.resolution: \"100000x100000\" is not",
            "spec.guidanceScale",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        let many: Vec<String> = (0..=limits::MAX_KEYFRAMES)
            .map(|i| format!("k{i}"))
            .collect();
        let text = validate(&spec(&format!(
            "keyframes: [{}]\n{VOLUMES}",
            many.join(",")
        )))
        .unwrap_err()
        .to_string();
        assert!(text.contains("needs 2 to 32 keyframes, got 33"), "{text}");
    }

    #[test]
    fn names_follow_the_api_servers_rules() {
        let mut job = TravelJob::new("../escape", spec(&format!("keyframes: [a, b]\n{VOLUMES}")));
        let text = validate_job(&job).unwrap_err().to_string();
        assert!(text.contains("metadata.name: \"../escape\""), "{text}");
        job.metadata.name = Some("trip.v2".into());
        job.metadata.namespace = Some("Studio".into());
        let text = validate_job(&job).unwrap_err().to_string();
        assert!(text.contains("metadata.namespace"), "{text}");
        job.metadata.namespace = Some("studio".into());
        validate_job(&job).unwrap();
    }

    #[test]
    fn a_plan_from_a_task_is_checked_against_the_same_limits() {
        let good = Plan::from_spec(&spec(&format!(
            "keyframes: [a, b, c]\nframes: 9\noverlap: 4\nresolution: 64x48\n{VOLUMES}"
        )));
        validate_plan(&good).unwrap();
        let mut bad = good.clone();
        bad.width = 0;
        bad.segments[1].frames = 4_000_000_001u64 as u32;
        bad.segments[0].start_keyframe = "/etc/passwd".into();
        bad.total_frames = u32::MAX;
        let text = validate_plan(&bad).unwrap_err().to_string();
        for needle in [
            "plan.width/height",
            "plan.segments[1].frames",
            "plan.segments[0].startKeyframe",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        let mut total = good.clone();
        total.total_frames += 1;
        let text = validate_plan(&total).unwrap_err().to_string();
        assert!(text.contains("plan.totalFrames"), "{text}");
    }
}
