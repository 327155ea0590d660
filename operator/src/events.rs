//! The Kubernetes events a reconcile emits: what they say ([`EventSpec`]) and
//! which changes between the previous status and the new one deserve one
//! (those a user acts on; progress is in the status).

use kubewan_crds::status::{JobPhase, StepPhase, TravelJobStatus};

use crate::step::StepState;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSpec {
    pub warning: bool,
    pub reason: String,
    pub action: String,
    pub note: String,
    /// The pod the event is about, if any (the event's `related` object; it
    /// also keeps events about different pods from being merged into one series).
    pub pod: Option<String>,
}

impl EventSpec {
    pub fn normal(reason: &str, note: String) -> Self {
        EventSpec {
            warning: false,
            reason: reason.into(),
            action: "Reconcile".into(),
            note,
            pod: None,
        }
    }

    pub fn warning(reason: &str, note: String) -> Self {
        EventSpec {
            warning: true,
            ..EventSpec::normal(reason, note)
        }
    }

    /// The same event, about `pod`.
    pub fn about(mut self, pod: Option<String>) -> Self {
        self.pod = pod;
        self
    }

    /// The same event, for `action` instead of "Reconcile".
    pub fn for_action(mut self, action: &str) -> Self {
        self.action = action.into();
        self
    }
}

/// Events for the changes a user acts on, between the previous status and
/// the new one: a step that backs off or fails, and the job finishing,
/// suspending or resuming. Progress (a step that succeeds, a pod created, the
/// job moving from generating to stitching) is in the status and gets no
/// event: each would be one more API write per pod (issue 14's budget is 3).
pub fn transitions(
    prev: &TravelJobStatus,
    new: &TravelJobStatus,
    steps: &[StepState],
) -> Vec<EventSpec> {
    let mut events: Vec<EventSpec> = steps
        .iter()
        .filter_map(|s| step_transition(prev, s))
        .collect();
    events.extend(phase_transition(prev, new));
    events
}

/// The event of the job's phase change, if a user acts on it.
fn phase_transition(prev: &TravelJobStatus, new: &TravelJobStatus) -> Option<EventSpec> {
    if prev.phase == new.phase {
        return None;
    }
    let note = new.message.clone().unwrap_or_default();
    Some(match new.phase {
        JobPhase::Failed => EventSpec::warning("Failed", note),
        JobPhase::Succeeded => EventSpec::normal("Succeeded", note),
        JobPhase::Suspended => EventSpec::normal("Suspended", note),
        _ if prev.phase == JobPhase::Suspended => {
            EventSpec::normal("Resumed", format!("resumed: {note}"))
        }
        _ => return None,
    })
}

/// The event of one step that backs off or fails, once per attempt.
fn step_transition(prev: &TravelJobStatus, s: &StepState) -> Option<EventSpec> {
    let before = prev.step(s.step);
    if before.map(|b| (b.phase, b.attempts)) == Some((s.phase, s.status.attempts)) {
        return None;
    }
    let msg = s.status.message.clone().unwrap_or_default();
    let event = match s.phase {
        StepPhase::Retrying => EventSpec::warning("BackOff", format!("{} {msg}", s.step)),
        StepPhase::Failed => EventSpec::warning("StepFailed", format!("{} {msg}", s.step)),
        _ => return None,
    };
    Some(event.about(s.status.pod.clone()))
}
