//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas are
//! safe: only the holder reconciles. The lease is taken with optimistic
//! concurrency (the update carries the resourceVersion it read), and expiry is
//! judged by this process's own clock since it last saw the lease change (as
//! client-go does), so clock skew between replicas does not matter.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the holder renews (and a candidate retries).
    pub retry: Duration,
    /// The holder gives up leadership when it could not renew for this long.
    pub renew_deadline: Duration,
}

/// What a candidate remembers of the lease between tries.
#[derive(Debug, Default)]
struct Observed {
    record: Option<(Option<String>, Option<MicroTime>)>,
    since: Option<Instant>,
}

pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Observed,
}

/// Whether a lease seen unchanged for `unchanged_for` may be taken.
pub fn expired(holder: Option<&str>, duration: Duration, unchanged_for: Duration) -> bool {
    holder.is_none_or(str::is_empty) || unchanged_for >= duration
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, settings: LeaseSettings) -> Self {
        LeaderElector {
            api,
            settings,
            observed: Observed::default(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.settings.identity
    }

    fn spec(&self, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(self.settings.duration.as_secs().max(1) as i32),
            acquire_time: acquire,
            renew_time: Some(MicroTime(Timestamp::now())),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One try: returns whether this process holds the lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let name = &self.settings.name;
        let Some(mut lease) = self.api.get_opt(name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(Some(MicroTime(Timestamp::now())), 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone();
        let record = (holder.clone(), spec.renew_time.clone());
        if self.observed.record.as_ref() != Some(&record) {
            self.observed.record = Some(record);
            self.observed.since = Some(Instant::now());
        }
        let mine = holder.as_deref() == Some(self.settings.identity.as_str());
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(1) as u64))
            .unwrap_or(self.settings.duration);
        let unchanged_for = self.observed.since.map(|s| s.elapsed()).unwrap_or_default();
        if !mine && !expired(holder.as_deref(), duration, unchanged_for) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(if mine {
            self.spec(spec.acquire_time.clone(), transitions)
        } else {
            self.spec(Some(MicroTime(Timestamp::now())), transitions + 1)
        });
        // replace() sends the resourceVersion read above: if another replica
        // changed the lease in between, this fails with a conflict.
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => {
                if !mine {
                    tracing::info!(identity = %self.settings.identity, previous = ?holder, "acquired the leader lease");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this process holds the lease.
    pub async fn acquire(&mut self) -> Result<()> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election: trying again"),
            }
            tokio::time::sleep(self.settings.retry).await;
        }
    }

    /// Renews the lease until it cannot be renewed within the deadline; returns
    /// the error that lost it. A failed renewal is tried again until then; a
    /// renewal the API server does not answer is given up at the deadline, so
    /// this process stops acting before another replica may take the lease
    /// (waiting for the request's own timeout, minutes, would let two lead).
    pub async fn keep(&mut self) -> Error {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.settings.retry).await;
            let left = self
                .settings
                .renew_deadline
                .saturating_sub(last_ok.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_ok = Instant::now(),
                Ok(Ok(false)) => return Error::Leader("another replica took the lease".into()),
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election: renewal failed"),
                Err(_) => tracing::warn!("leader election: renewal unanswered"),
            }
            if last_ok.elapsed() >= self.settings.renew_deadline {
                return Error::Leader(format!(
                    "could not renew the lease for {:?}",
                    self.settings.renew_deadline
                ));
            }
        }
    }

    /// Gives the lease up (on shutdown), so a successor need not wait for expiry.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        self.api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await?;
        tracing::info!("released the leader lease");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_free_when_unheld_or_stale() {
        let d = Duration::from_secs(15);
        assert!(expired(None, d, Duration::ZERO));
        assert!(expired(Some(""), d, Duration::ZERO));
        assert!(!expired(Some("a"), d, Duration::from_secs(14)));
        assert!(expired(Some("a"), d, Duration::from_secs(15)));
    }

    /// An API server that accepts connections and never answers (overloaded,
    /// or cut off mid-request): the holder gives leadership up at its renew
    /// deadline, not when the request times out minutes later.
    #[tokio::test]
    async fn an_unanswered_renewal_loses_the_lease_at_the_renew_deadline() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let config = kube::Config::new(url.parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let mut elector = LeaderElector::new(
            Api::namespaced(client, "default"),
            LeaseSettings {
                name: "kubewan-leader".into(),
                identity: "a".into(),
                duration: Duration::from_millis(600),
                retry: Duration::from_millis(50),
                renew_deadline: Duration::from_millis(400),
            },
        );
        let started = Instant::now();
        let lost = tokio::time::timeout(Duration::from_secs(10), elector.keep())
            .await
            .expect("leadership kept while the API server did not answer");
        assert!(matches!(lost, Error::Leader(_)), "{lost}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
