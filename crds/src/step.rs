//! A step's identity, in one place: the node of the stage graph ([`StepId`])
//! with its stage, its names (for people, for files, for pods) and its JSON
//! form, and one attempt of it ([`StepAttempt`]) with the labels of its pod,
//! written and read back by the same code.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::hash::fnv1a;
use crate::limits::MAX_NAME_BYTES;

/// The TravelJob a runner pod belongs to (see [`job_label_value`]).
pub const LABEL_JOB: &str = "kubewan.dev/job";
/// The pod's [`Stage`].
pub const LABEL_STAGE: &str = "kubewan.dev/stage";
/// The segment index, on segment pods only.
pub const LABEL_SEGMENT: &str = "kubewan.dev/segment";
/// The attempt number (1 = first try).
pub const LABEL_ATTEMPT: &str = "kubewan.dev/attempt";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_APP_NAME: &str = "app.kubernetes.io/name";
/// The `managed-by` value of every runner pod: the operator watches only these.
pub const MANAGER: &str = "kubewan-operator";
/// The `app.kubernetes.io/name` value of every runner pod.
pub const RUNNER_APP: &str = "kubewan-runner";

/// What kind of work a step does (the runner dispatches on it).
#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    /// Write every segment's prompt with the VLM (one load for all pairs).
    #[default]
    Prompts,
    /// Generate one segment.
    Segment,
    /// Crossfade-stitch all segments into the final video.
    Stitch,
}

impl Stage {
    const ALL: [Stage; 3] = [Stage::Prompts, Stage::Segment, Stage::Stitch];

    /// The stage as labels, metrics and JSON spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Prompts => "prompts",
            Stage::Segment => "segment",
            Stage::Stitch => "stitch",
        }
    }

    fn parse(text: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// One node of the stage graph. In JSON (tasks, reports) it is the pair
/// `"stage": "segment", "segment": 3`, flattened into the enclosing object.
#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
#[serde(into = "StepJson", try_from = "StepJson")]
pub enum StepId {
    #[default]
    Prompts,
    Segment(u32),
    Stitch,
}

impl StepId {
    pub fn stage(self) -> Stage {
        match self {
            StepId::Prompts => Stage::Prompts,
            StepId::Segment(_) => Stage::Segment,
            StepId::Stitch => Stage::Stitch,
        }
    }

    /// The segment index of a segment step.
    pub fn segment(self) -> Option<u32> {
        match self {
            StepId::Segment(i) => Some(i),
            StepId::Prompts | StepId::Stitch => None,
        }
    }

    /// The step from its stage and segment index, refusing pairs that do not
    /// make a step (a segment without an index, an index on another stage).
    pub fn from_parts(stage: Stage, segment: Option<u32>) -> Result<StepId, String> {
        match (stage, segment) {
            (Stage::Prompts, None) => Ok(StepId::Prompts),
            (Stage::Segment, Some(i)) => Ok(StepId::Segment(i)),
            (Stage::Stitch, None) => Ok(StepId::Stitch),
            (Stage::Segment, None) => Err("stage segment needs a segment index".into()),
            (stage, Some(i)) => Err(format!(
                "stage {} takes no segment index, got {i}",
                stage.as_str()
            )),
        }
    }

    /// The step's name in file names: `prompts`, `segment-3`, `stitch`.
    pub fn run_name(self) -> String {
        match self {
            StepId::Segment(i) => format!("segment-{i}"),
            StepId::Prompts | StepId::Stitch => self.stage().as_str().to_owned(),
        }
    }

    /// The file of the runner's full report, in the job's output folder (the
    /// status keeps a summary of it and names it).
    pub fn report_file_name(self) -> String {
        format!("report-{}.json", self.run_name())
    }

    /// Attempt `attempt` (1-based) of this step.
    pub fn attempt(self, attempt: u32) -> StepAttempt {
        StepAttempt {
            step: self,
            attempt,
        }
    }
}

/// The step as messages and events name it: `prompts`, `segment 3`, `stitch`.
impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepId::Segment(i) => write!(f, "segment {i}"),
            StepId::Prompts | StepId::Stitch => f.write_str(self.stage().as_str()),
        }
    }
}

/// The JSON form of a [`StepId`].
#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct StepJson {
    stage: Stage,
    /// The segment index, for the segment stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    segment: Option<u32>,
}

impl From<StepId> for StepJson {
    fn from(step: StepId) -> StepJson {
        StepJson {
            stage: step.stage(),
            segment: step.segment(),
        }
    }
}

impl TryFrom<StepJson> for StepId {
    type Error = String;
    fn try_from(json: StepJson) -> Result<StepId, String> {
        StepId::from_parts(json.stage, json.segment)
    }
}

/// One attempt of a step: what one runner pod runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepAttempt {
    pub step: StepId,
    /// 1 = first try.
    pub attempt: u32,
}

impl StepAttempt {
    /// The pod's name: `<job>-prompts-<attempt>`, `<job>-seg-<i>-<attempt>`,
    /// `<job>-stitch-<attempt>`. Deterministic, so creating it twice is a
    /// conflict, never a duplicate. A job name too long to leave room for the
    /// suffix within a pod name's 253 characters is shortened as
    /// [`fit_name`] does (job names may have 253 characters too).
    pub fn pod_name(self, job_name: &str) -> String {
        let attempt = self.attempt;
        let suffix = match self.step {
            StepId::Segment(i) => format!("seg-{i}-{attempt}"),
            StepId::Prompts | StepId::Stitch => {
                format!("{}-{attempt}", self.step.stage().as_str())
            }
        };
        let job = fit_name(job_name, MAX_NAME_BYTES - 1 - suffix.len());
        format!("{job}-{suffix}")
    }

    /// The labels of its pod, in job `job_name`.
    pub fn labels(self, job_name: &str) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            (LABEL_JOB.to_owned(), job_label_value(job_name)),
            (
                LABEL_STAGE.to_owned(),
                self.step.stage().as_str().to_owned(),
            ),
            (LABEL_ATTEMPT.to_owned(), self.attempt.to_string()),
            (LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned()),
            (LABEL_APP_NAME.to_owned(), RUNNER_APP.to_owned()),
        ]);
        if let Some(i) = self.step.segment() {
            labels.insert(LABEL_SEGMENT.to_owned(), i.to_string());
        }
        labels
    }

    /// Reads [`StepAttempt::labels`] back; None for pods without them.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<StepAttempt> {
        let stage = Stage::parse(labels.get(LABEL_STAGE)?)?;
        let segment = match labels.get(LABEL_SEGMENT) {
            Some(i) => Some(i.parse().ok()?),
            None => None,
        };
        Some(StepAttempt {
            step: StepId::from_parts(stage, segment).ok()?,
            attempt: labels.get(LABEL_ATTEMPT)?.parse().ok()?,
        })
    }
}

/// A label value for the job name: the name itself when it fits the 63-character
/// limit of label values, otherwise shortened by [`fit_name`].
pub fn job_label_value(job_name: &str) -> String {
    fit_name(job_name, 63)
}

/// `name` itself when it has at most `max` bytes, otherwise its start and a
/// stable hash of all of it, `max` bytes at most: long names that differ
/// stay different, and the same name always gives the same result. `name` is
/// a Kubernetes name (ASCII), and so is the result.
fn fit_name(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let hash = format!("{:016x}", fnv1a(name.as_bytes()));
    let prefix: String = name.chars().take(max - hash.len() - 1).collect();
    format!("{}-{hash}", prefix.trim_end_matches(['-', '.']))
}

/// The label selector of the pods of job `job_name`.
pub fn job_selector(job_name: &str) -> String {
    format!("{LABEL_JOB}={}", job_label_value(job_name))
}

/// The label selector of every runner pod.
pub fn runner_pods_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGER}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: [StepId; 3] = [StepId::Prompts, StepId::Segment(3), StepId::Stitch];

    #[test]
    fn names_for_people_files_and_pods() {
        let shown: Vec<String> = STEPS.iter().map(|s| s.to_string()).collect();
        assert_eq!(shown, ["prompts", "segment 3", "stitch"]);
        let files: Vec<String> = STEPS.iter().map(|s| s.run_name()).collect();
        assert_eq!(files, ["prompts", "segment-3", "stitch"]);
        let pods: Vec<String> = STEPS
            .iter()
            .map(|s| s.attempt(2).pod_name("trip"))
            .collect();
        assert_eq!(pods, ["trip-prompts-2", "trip-seg-3-2", "trip-stitch-2"]);
    }

    #[test]
    fn labels_read_back_what_they_wrote() {
        for step in STEPS {
            let attempt = step.attempt(4);
            let labels = attempt.labels("trip");
            assert_eq!(labels[LABEL_JOB], "trip");
            assert_eq!(labels[LABEL_MANAGED_BY], MANAGER);
            assert_eq!(labels.contains_key(LABEL_SEGMENT), step.segment().is_some());
            assert_eq!(StepAttempt::from_labels(&labels), Some(attempt));
        }
    }

    #[test]
    fn foreign_or_broken_labels_are_no_step() {
        let mut labels = StepId::Segment(1).attempt(1).labels("trip");
        labels.remove(LABEL_SEGMENT);
        assert_eq!(StepAttempt::from_labels(&labels), None);
        let mut labels = StepId::Stitch.attempt(1).labels("trip");
        labels.insert(LABEL_STAGE.into(), "upscale".into());
        assert_eq!(StepAttempt::from_labels(&labels), None);
        assert_eq!(StepAttempt::from_labels(&BTreeMap::new()), None);
    }

    #[test]
    fn json_is_the_stage_and_the_segment_index() {
        let json = serde_json::to_value(StepId::Segment(3)).unwrap();
        assert_eq!(json, serde_json::json!({"stage": "segment", "segment": 3}));
        let json = serde_json::to_value(StepId::Stitch).unwrap();
        assert_eq!(json, serde_json::json!({"stage": "stitch"}));
        for step in STEPS {
            let back: StepId = serde_json::from_value(serde_json::to_value(step).unwrap()).unwrap();
            assert_eq!(back, step);
        }
        let err = serde_json::from_str::<StepId>(r#"{"stage": "segment"}"#).unwrap_err();
        assert!(err.to_string().contains("needs a segment index"), "{err}");
        let err =
            serde_json::from_str::<StepId>(r#"{"stage": "stitch", "segment": 1}"#).unwrap_err();
        assert!(err.to_string().contains("takes no segment index"), "{err}");
    }

    #[test]
    fn long_job_names_get_a_valid_label() {
        let name = "x".repeat(100);
        let v = job_label_value(&name);
        assert!(v.len() <= 63, "{v}");
        assert_eq!(v, job_label_value(&name));
        assert_ne!(v, job_label_value(&"y".repeat(100)));
        assert_eq!(job_selector("trip"), "kubewan.dev/job=trip");
    }

    #[test]
    fn pods_of_the_longest_job_names_have_valid_names() {
        let name = "x".repeat(MAX_NAME_BYTES);
        let mut pods = std::collections::BTreeSet::new();
        for step in STEPS {
            for attempt in [1, 21, u32::MAX] {
                let pod = step.attempt(attempt).pod_name(&name);
                assert!(pod.len() <= MAX_NAME_BYTES, "{} bytes: {pod}", pod.len());
                assert!(pod.starts_with("xxx") && !pod.contains("--"), "{pod}");
                assert_eq!(pod, step.attempt(attempt).pod_name(&name));
                pods.insert(pod);
            }
        }
        assert_eq!(
            pods.len(),
            STEPS.len() * 3,
            "every attempt has its own name"
        );
        let other = "y".repeat(MAX_NAME_BYTES);
        assert_ne!(
            StepId::Stitch.attempt(1).pod_name(&name),
            StepId::Stitch.attempt(1).pod_name(&other)
        );
        // names that fit are kept as they are
        let fits = "x".repeat(MAX_NAME_BYTES - "-stitch-1".len());
        assert_eq!(
            StepId::Stitch.attempt(1).pod_name(&fits),
            format!("{fits}-stitch-1")
        );
    }
}
