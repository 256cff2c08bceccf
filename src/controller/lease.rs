//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several controller
//! replicas only one writes.
//!
//! In: the Lease (read, created, renewed with a resourceVersion precondition). Out:
//! whether this replica leads. A lease counts as expired when its record has not
//! changed for `lease_duration` *as measured on this replica's monotonic clock*, so
//! clock skew between replicas does not matter (the client-go rule).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// Timing of the election.
#[derive(Clone, Debug)]
pub(crate) struct LeaseSettings {
    /// Lease object name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews and the others retry.
    pub retry_period: Duration,
}

/// Failed to talk to the API server about the Lease.
#[derive(Debug, thiserror::Error)]
#[error("reading or writing Lease {namespace}/{name}")]
pub(crate) struct LeaseError {
    namespace: String,
    name: String,
    source: kube::Error,
}

/// One replica's view of the election.
pub(crate) struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The last record seen (holder, resourceVersion) and when this replica saw it change.
    observed: Option<(Option<String>, Option<String>, Instant)>,
}

impl Elector {
    /// An elector for `settings`.
    pub(crate) fn new(client: Client, settings: LeaseSettings) -> Self {
        Self { api: Api::namespaced(client, &settings.namespace), settings, observed: None }
    }

    /// Tries once to acquire or renew; `Ok(true)` while this replica leads.
    pub(crate) async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let err = |source| LeaseError {
            namespace: self.settings.namespace.clone(),
            name: self.settings.name.clone(),
            source,
        };
        let now = MicroTime(jiff::Timestamp::now());
        let me = self.settings.identity.clone();
        let duration_secs = self.settings.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await.map_err(err)? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.settings.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(source) => Err(err(source)),
            };
        };

        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone();
        let version = lease.metadata.resource_version.clone();
        let changed = self.observed.as_ref().is_none_or(|(h, v, _)| *h != holder || *v != version);
        if changed {
            self.observed = Some((holder.clone(), version, Instant::now()));
        }
        let held_by_me = holder.as_deref() == Some(me.as_str());
        let free = holder.as_deref().is_none_or(str::is_empty);
        let expired = self.observed.as_ref().is_some_and(|(_, _, seen)| seen.elapsed() >= self.settings.lease_duration);
        if !(held_by_me || free || expired) {
            return Ok(false);
        }
        if !held_by_me {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(me);
        spec.lease_duration_seconds = Some(duration_secs);
        spec.renew_time = Some(now);
        // `replace` carries the resourceVersion we read: if another replica wrote in
        // between, ours fails with 409 and we are not the leader.
        match self.api.replace(&self.settings.name, &PostParams::default(), &lease).await {
            Ok(updated) => {
                self.observed = Some((
                    updated.spec.and_then(|s| s.holder_identity),
                    updated.metadata.resource_version,
                    Instant::now(),
                ));
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(source) => Err(err(source)),
        }
    }

    /// Waits until this replica leads; returns when the winning attempt began, the
    /// instant the lease's term is counted from.
    pub(crate) async fn acquire(&mut self) -> tokio::time::Instant {
        loop {
            let started = tokio::time::Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => return started,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(error = %crate::telemetry::Chain(&error), "leader election attempt failed")
                }
            }
            tokio::time::sleep(self.settings.retry_period).await;
        }
    }

    /// Gives the lease up if this replica holds it (on a clean stop), so that another
    /// replica takes over on its next try instead of waiting a whole lease duration.
    pub(crate) async fn release(&mut self) -> Result<(), LeaseError> {
        let err = |source| LeaseError {
            namespace: self.settings.namespace.clone(),
            name: self.settings.name.clone(),
            source,
        };
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await.map_err(err)? else { return Ok(()) };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        // As client-go does: no holder, and a lease that would lapse at once anyway.
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        match self.api.replace(&self.settings.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            // Someone else wrote in between: then it is not ours to release.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(source) => Err(err(source)),
        }
    }

    /// Renews until the lease is lost, or is not renewed within the lease duration less a
    /// retry period of the last renewal that began at `renewed` (as [`Self::acquire`]
    /// returns it), then returns: the caller must stop writing at once. Counted from when
    /// a renewal began, not when its answer came, and an attempt still waiting for its
    /// answer at that deadline is abandoned: a request stuck on a dead connection must
    /// not keep this replica leading while another one, seeing no renewal, takes over.
    pub(crate) async fn hold(&mut self, mut renewed: tokio::time::Instant) {
        let term = self.settings.lease_duration.saturating_sub(self.settings.retry_period);
        loop {
            let deadline = renewed + term;
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + self.settings.retry_period)).await;
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("the leader lease was not renewed in time");
                return;
            }
            let started = tokio::time::Instant::now();
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => renewed = started,
                Ok(Ok(false)) => return,
                Ok(Err(error)) => tracing::warn!(error = %crate::telemetry::Chain(&error), "lease renewal failed"),
                Err(_) => {
                    tracing::warn!("lease renewal got no answer before the lease could lapse");
                    return;
                }
            }
        }
    }
}
