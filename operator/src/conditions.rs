//! The job's four standard conditions (Running, Suspended, Succeeded, Failed),
//! derived from its phase, each keeping its transition time while it holds,
//! and the conditions of its VLM policies ([`kubewan_crds::conditions`]).

use k8s_openapi::jiff::Timestamp;
use kubewan_crds::conditions::{ConditionRow, set_condition, set_vlm_conditions};
use kubewan_crds::status::{JobPhase, TravelJobStatus};

pub const COND_RUNNING: &str = "Running";
pub const COND_SUSPENDED: &str = "Suspended";
pub const COND_SUCCEEDED: &str = "Succeeded";
pub const COND_FAILED: &str = "Failed";
/// Reasons of the Failed condition: the spec did not validate, the cluster's
/// policy forbids it ([`crate::policy`]), a step ran out of retries, the API
/// server refused a pod.
pub const REASON_INVALID: &str = "InvalidSpec";
pub const REASON_FORBIDDEN: &str = "ForbiddenBySpecPolicy";
pub const REASON_BACKOFF_LIMIT: &str = "BackoffLimitExceeded";
pub const REASON_POD_REJECTED: &str = "PodRejected";

/// Sets the four conditions from the job's phase (`failed_reason` is the
/// Failed condition's reason when the job failed), then the VLM policies'.
pub fn set_conditions(
    status: &mut TravelJobStatus,
    failed_reason: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let phase = status.phase;
    let message = status.message.clone().unwrap_or_default();
    let running = matches!(
        phase,
        JobPhase::Pending | JobPhase::Prompting | JobPhase::Generating | JobPhase::Stitching
    );
    let phase_reason = format!("{phase:?}");
    let (suspended, succeeded, failed) = (
        phase == JobPhase::Suspended,
        phase == JobPhase::Succeeded,
        phase == JobPhase::Failed,
    );
    // (type, true?, reason, message): the message goes with the condition that holds.
    let rows: [(&'static str, bool, &str, &str); 4] = [
        (
            COND_RUNNING,
            running && phase != JobPhase::Pending,
            &phase_reason,
            if running { &message } else { "" },
        ),
        (
            COND_SUSPENDED,
            suspended,
            if suspended {
                "JobSuspended"
            } else {
                "JobNotSuspended"
            },
            if suspended { &message } else { "" },
        ),
        (
            COND_SUCCEEDED,
            succeeded,
            if succeeded {
                "Completed"
            } else {
                &phase_reason
            },
            if succeeded { &message } else { "" },
        ),
        (
            COND_FAILED,
            failed,
            if failed { failed_reason } else { "NotFailed" },
            if failed { &message } else { "" },
        ),
    ];
    for (type_, holds, reason, message) in rows {
        let row = ConditionRow {
            type_,
            holds,
            reason: reason.into(),
            message: message.into(),
        };
        set_condition(&mut status.conditions, &row, generation, now);
    }
    set_vlm_conditions(status, generation, now);
}

/// The reason of the job's Failed condition, when it failed.
pub fn failed_reason(status: &TravelJobStatus) -> Option<&str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == COND_FAILED && c.status == "True")
        .map(|c| c.reason.as_str())
}

/// Whether the job failed because of its spec (invalid or forbidden): a
/// changed spec is looked at again.
pub fn spec_rejected(status: &TravelJobStatus) -> bool {
    matches!(
        failed_reason(status),
        Some(REASON_INVALID | REASON_FORBIDDEN)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::t;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn condition<'a>(status: &'a TravelJobStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn conditions_keep_their_transition_time() {
        let mut status = TravelJobStatus {
            phase: JobPhase::Generating,
            ..Default::default()
        };
        set_conditions(&mut status, "", Some(1), t(0));
        set_conditions(&mut status, "", Some(2), t(50));
        let running = condition(&status, COND_RUNNING);
        assert_eq!(
            (running.status.as_str(), running.last_transition_time.0),
            ("True", t(0))
        );
        assert_eq!(running.observed_generation, Some(2));
        status.phase = JobPhase::Failed;
        status.message = Some("boom".into());
        set_conditions(&mut status, "StepFailed", Some(2), t(60));
        let failed = condition(&status, COND_FAILED);
        assert_eq!(
            (
                failed.status.as_str(),
                failed.reason.as_str(),
                failed.message.as_str()
            ),
            ("True", "StepFailed", "boom")
        );
        assert_eq!(failed_reason(&status), Some("StepFailed"));
        let running = condition(&status, COND_RUNNING);
        assert_eq!(
            (running.status.as_str(), running.last_transition_time.0),
            ("False", t(60))
        );
    }
}
