//! TravelJob conditions shared by the operator and local mode: setting one
//! ([`set_condition`]) and the conditions that show how the VLM policies of
//! `spec.enhancePrompt` came out ([`vlm_conditions`], [`policy_failure_reason`]),
//! so a user can `kubectl wait --for=condition=PromptsFellBack` instead of
//! reading a report.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::report::{RunReport, VlmIssue};
use crate::status::{TravelJobStatus, human_bytes};

/// True when at least one prompt fell back to the segment's own prompt
/// (`onFailure: Fallback`); its reason is the cause (VlmRefused, VlmFailed,
/// EmptyPrompt). False with reason VlmWrotePrompts when the VLM wrote them all.
pub const COND_PROMPTS_FELL_BACK: &str = "PromptsFellBack";
/// Whether the VLM's memory came back after it was dropped: reason
/// MemoryReturned (True) or MemoryNotReturned (False).
pub const COND_VLM_RELEASED: &str = "VlmReleased";
pub const REASON_VLM_WROTE_PROMPTS: &str = "VlmWrotePrompts";
pub const REASON_MEMORY_RETURNED: &str = "MemoryReturned";
pub const REASON_MEMORY_NOT_RETURNED: &str = "MemoryNotReturned";

/// One condition to set: its type, whether it holds, its reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionRow {
    pub type_: &'static str,
    pub holds: bool,
    pub reason: String,
    pub message: String,
}

/// Sets a condition, keeping its transition time when its status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    row: &ConditionRow,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if row.holds { "True" } else { "False" };
    let previous = conditions.iter().position(|c| c.type_ == row.type_);
    let last_transition_time = match previous.map(|i| &conditions[i]) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: row.type_.into(),
        status: status.into(),
        reason: row.reason.clone(),
        message: row.message.clone(),
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

/// The VLM policies' conditions, from the prompts step's latest report: none
/// before it reported (or without the VLM); PromptsFellBack once it wrote the
/// prompts; VlmReleased once the release was measured.
pub fn vlm_conditions(status: &TravelJobStatus) -> Vec<ConditionRow> {
    let Some(report) = status.prompts.as_ref().and_then(|p| p.report.as_ref()) else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    if report.ok && !report.prompts.is_empty() {
        rows.push(fell_back_row(report));
    }
    if let Some(release) = &report.release {
        let returned = release.warning.is_none();
        rows.push(ConditionRow {
            type_: COND_VLM_RELEASED,
            holds: returned,
            reason: if returned {
                REASON_MEMORY_RETURNED
            } else {
                REASON_MEMORY_NOT_RETURNED
            }
            .into(),
            message: release.warning.clone().unwrap_or_else(|| {
                format!(
                    "{} freed {} of the {} it added ({:.0}%)",
                    release.what,
                    human_bytes(release.freed_bytes),
                    human_bytes(release.loaded_bytes),
                    100.0 * release.freed_ratio
                )
            }),
        });
    }
    rows
}

fn fell_back_row(report: &RunReport) -> ConditionRow {
    let total = report.prompts.len();
    let fell: Vec<_> = report.prompts.iter().filter(|p| p.fell_back).collect();
    match fell.first() {
        None => ConditionRow {
            type_: COND_PROMPTS_FELL_BACK,
            holds: false,
            reason: REASON_VLM_WROTE_PROMPTS.into(),
            message: format!("the VLM wrote all {total} prompts"),
        },
        Some(first) => ConditionRow {
            type_: COND_PROMPTS_FELL_BACK,
            holds: true,
            reason: first.cause.unwrap_or(VlmIssue::VlmFailed).reason().into(),
            message: format!(
                "{} of {total} prompts fell back to the segment's own prompt: {}",
                fell.len(),
                first.reason.as_deref().unwrap_or("no reason given")
            ),
        },
    }
}

/// The reason of the job's Failed condition when the step that ran out of
/// retries was failed by a VLM policy (`onFailure` / `releaseCheck: Fail`).
pub fn policy_failure_reason(report: Option<&RunReport>) -> Option<&'static str> {
    report
        .filter(|r| !r.ok)
        .and_then(|r| r.policy_failure)
        .map(VlmIssue::reason)
}

/// [`vlm_conditions`] set on the status (local mode and the operator both call it).
pub fn set_vlm_conditions(status: &mut TravelJobStatus, generation: Option<i64>, now: Timestamp) {
    for row in vlm_conditions(status) {
        set_condition(&mut status.conditions, &row, generation, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{PromptOutcome, ReleaseReport};
    use crate::status::{StepPhase, StepStatus};
    use crate::step::StepId;

    fn with_prompts_report(report: RunReport) -> TravelJobStatus {
        TravelJobStatus {
            prompts: Some(StepStatus {
                phase: if report.ok {
                    StepPhase::Succeeded
                } else {
                    StepPhase::Failed
                },
                report: Some(report),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn outcome(segment: u32, cause: Option<VlmIssue>) -> PromptOutcome {
        PromptOutcome {
            segment,
            prompt: "p".into(),
            fell_back: cause.is_some(),
            reason: cause.map(|_| "refusing phase vlm_generate: needs 1.0GiB".into()),
            cause,
            tokens: cause.is_none().then_some(12),
        }
    }

    #[test]
    fn a_refused_vlm_shows_as_prompts_fell_back_with_its_cause() {
        let status = with_prompts_report(RunReport {
            step: StepId::Prompts,
            ok: true,
            prompts: vec![
                outcome(0, Some(VlmIssue::VlmRefused)),
                outcome(1, Some(VlmIssue::VlmRefused)),
            ],
            ..Default::default()
        });
        let rows = vlm_conditions(&status);
        assert_eq!(rows.len(), 1, "no release was measured: {rows:?}");
        assert_eq!(
            (rows[0].type_, rows[0].holds, rows[0].reason.as_str()),
            (COND_PROMPTS_FELL_BACK, true, "VlmRefused")
        );
        assert!(
            rows[0].message.starts_with("2 of 2 prompts fell back")
                && rows[0].message.contains("1.0GiB"),
            "{}",
            rows[0].message
        );
    }

    #[test]
    fn prompts_by_the_vlm_and_a_leak_are_both_conditions() {
        let mut status = with_prompts_report(RunReport {
            step: StepId::Prompts,
            ok: true,
            prompts: vec![outcome(0, None), outcome(1, None)],
            release: Some(ReleaseReport {
                what: "tiny/vlm".into(),
                loaded_bytes: 100 << 20,
                freed_bytes: 10 << 20,
                freed_ratio: 0.1,
                warning: Some(
                    "tiny/vlm was not released: RAM: only 10.0MiB of 100.0MiB came back".into(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        });
        set_vlm_conditions(&mut status, Some(4), Timestamp::UNIX_EPOCH);
        let get = |t: &str| status.conditions.iter().find(|c| c.type_ == t).unwrap();
        let fell = get(COND_PROMPTS_FELL_BACK);
        assert_eq!(
            (fell.status.as_str(), fell.reason.as_str()),
            ("False", REASON_VLM_WROTE_PROMPTS)
        );
        let released = get(COND_VLM_RELEASED);
        assert_eq!(
            (released.status.as_str(), released.reason.as_str()),
            ("False", REASON_MEMORY_NOT_RETURNED)
        );
        assert!(
            released.message.contains("only 10.0MiB"),
            "{}",
            released.message
        );
        assert_eq!(released.observed_generation, Some(4));
    }

    #[test]
    fn a_policy_failure_names_the_failed_reason() {
        let failed = RunReport {
            step: StepId::Prompts,
            ok: false,
            policy_failure: Some(VlmIssue::VlmRefused),
            ..Default::default()
        };
        assert_eq!(policy_failure_reason(Some(&failed)), Some("VlmRefused"));
        let status = with_prompts_report(failed);
        assert!(vlm_conditions(&status).is_empty(), "nothing fell back");
        let other = RunReport {
            ok: false,
            ..Default::default()
        };
        assert_eq!(policy_failure_reason(Some(&other)), None);
        assert_eq!(policy_failure_reason(None), None);
    }

    #[test]
    fn set_condition_keeps_the_transition_time_while_the_status_holds() {
        let mut conditions = Vec::new();
        let row = |holds| ConditionRow {
            type_: COND_VLM_RELEASED,
            holds,
            reason: "R".into(),
            message: String::new(),
        };
        let t = |s| Timestamp::from_second(s).unwrap();
        set_condition(&mut conditions, &row(true), None, t(10));
        set_condition(&mut conditions, &row(true), None, t(20));
        assert_eq!(conditions[0].last_transition_time.0, t(10));
        set_condition(&mut conditions, &row(false), None, t(30));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time.0, t(30));
    }
}
