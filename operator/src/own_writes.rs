//! The statuses this process wrote that its TravelJob cache may not show yet.
//!
//! A reconcile that writes a job's status is often followed at once by another
//! (its new pod's watch event queued one while it ran), and the job cache gets
//! the status write's own watch event a moment later. Deciding from that stale
//! copy would write the same status again and repeat its events. The operator
//! is the only writer of a TravelJob's status (one leader; a replica that loses
//! the lease exits, and this memory with it), so the status it wrote last is
//! the newest one until the cache shows it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use kubewan_crds::TravelJob;
use kubewan_crds::status::TravelJobStatus;

/// Written statuses by job uid, until the job cache shows each of them.
#[derive(Default)]
pub struct OwnWrites(Mutex<HashMap<String, TravelJobStatus>>);

impl OwnWrites {
    /// `status` was just written for `job`.
    pub fn record(&self, job: &TravelJob, status: &TravelJobStatus) {
        if let Some(uid) = job.uid() {
            self.entries().insert(uid, status.clone());
        }
    }

    /// `job` as the cache holds it, with the status written last when the
    /// cache does not show that one yet.
    pub fn newest(&self, job: Arc<TravelJob>) -> Arc<TravelJob> {
        let Some(uid) = job.uid() else {
            return job;
        };
        let mut entries = self.entries();
        match entries.get(&uid) {
            Some(written) if job.status.as_ref() != Some(written) => {
                let mut newer = (*job).clone();
                newer.status = Some(written.clone());
                Arc::new(newer)
            }
            Some(_) => {
                entries.remove(&uid);
                job
            }
            None => job,
        }
    }

    /// Forgets what the cache shows by now, and the jobs it no longer holds
    /// (a finished job may never be reconciled again to do it).
    pub fn forget_seen(&self, cache: &Store<TravelJob>) {
        let shown: HashMap<String, Option<TravelJobStatus>> = cache
            .state()
            .iter()
            .filter_map(|job| Some((job.uid()?, job.status.clone())))
            .collect();
        self.entries()
            .retain(|uid, written| shown.get(uid).is_some_and(|s| s.as_ref() != Some(written)));
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, TravelJobStatus>> {
        // A panic while holding the lock cannot leave the map half-updated.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{SPEC, job};
    use kube::runtime::reflector::store;
    use kube::runtime::watcher::Event;
    use kubewan_crds::status::JobPhase;

    fn status(phase: JobPhase) -> TravelJobStatus {
        TravelJobStatus {
            phase,
            ..Default::default()
        }
    }

    fn with_status(phase: JobPhase) -> Arc<TravelJob> {
        let mut j = job(SPEC);
        j.status = Some(status(phase));
        Arc::new(j)
    }

    #[test]
    fn a_stale_cached_job_gets_the_status_written_last() {
        let writes = OwnWrites::default();
        let cached = with_status(JobPhase::Pending);
        writes.record(&cached, &status(JobPhase::Generating));
        let newest = writes.newest(cached.clone());
        assert_eq!(newest.status, Some(status(JobPhase::Generating)));
        assert_eq!(writes.entries().len(), 1, "kept until the cache shows it");
        // The cache caught up: its copy is used and the entry goes.
        let caught_up = with_status(JobPhase::Generating);
        assert!(Arc::ptr_eq(&writes.newest(caught_up.clone()), &caught_up));
        assert!(writes.entries().is_empty());
    }

    #[test]
    fn jobs_never_written_are_taken_as_cached() {
        let writes = OwnWrites::default();
        let cached = with_status(JobPhase::Pending);
        assert!(Arc::ptr_eq(&writes.newest(cached.clone()), &cached));
    }

    #[test]
    fn forget_seen_drops_shown_and_deleted_jobs_only() {
        let writes = OwnWrites::default();
        let (reader, mut writer) = store::<TravelJob>();
        let shown = with_status(JobPhase::Succeeded);
        writes.record(&shown, &status(JobPhase::Succeeded));
        writer.apply_watcher_event(&Event::Apply((*shown).clone()));
        writes.forget_seen(&reader);
        assert!(writes.entries().is_empty(), "the cache shows it");

        writes.record(&shown, &status(JobPhase::Failed));
        writes.forget_seen(&reader);
        assert_eq!(writes.entries().len(), 1, "the cache is behind");

        writer.apply_watcher_event(&Event::Delete((*shown).clone()));
        writes.forget_seen(&reader);
        assert!(writes.entries().is_empty(), "the job is gone");
    }
}
