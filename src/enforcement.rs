//! What each proxy replica enforces, made visible.
//!
//! In: the resource versions a replica's routing table has applied ([`Applied`]). Out:
//! one Lease per replica in the operator's namespace (`llm-proxy-replica-<identity>`,
//! label `llmproxy.io/role=proxy-replica`), renewed while the replica lives and deleted
//! when it stops, whose annotations carry those versions. Whoever changed an object
//! (the plugin's `--wait`, the benchmark) reads the Leases back: a change whose write
//! returned resource version V is enforced everywhere once every live replica reports at
//! least V for that kind.
//!
//! Resource versions are compared as numbers: on one API server they are etcd revisions,
//! and each kind's watch delivers them in order. A Lease is the Kubernetes heartbeat
//! object (nodes and API servers report through Leases too): `renewTime +
//! leaseDurationSeconds` says whether its replica is alive.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};

use crate::api::MANAGED_BY_LABEL;
use crate::index::watch::SharedTable;
use crate::index::{Applied, Kind};

/// Label that marks a replica report.
pub const ROLE_LABEL: (&str, &str) = ("llmproxy.io/role", "proxy-replica");
/// Prefix of a report's name; the replica's identity follows.
pub const LEASE_PREFIX: &str = "llm-proxy-replica-";
/// Field manager of the reports.
pub const FIELD_MANAGER: &str = "llm-proxy-proxy";

const SYNCED: &str = "llmproxy.io/synced";
const PROJECTS: &str = "llmproxy.io/applied-projects";
const TOKENS: &str = "llmproxy.io/applied-proxytokens";
const SECRETS: &str = "llmproxy.io/applied-secrets";

/// How a replica reports.
#[derive(Clone, Debug)]
pub struct ReportSettings {
    /// Namespace of the Leases (the operator's namespace).
    pub namespace: String,
    /// This replica's identity (the pod name in a cluster).
    pub identity: String,
    /// How long a report stays valid without renewal.
    pub lease_duration: Duration,
    /// Least time between two writes: a burst of changes costs one write.
    pub min_interval: Duration,
    /// The replica's Pod (name, uid), which then owns the Lease.
    pub owner: Option<(String, String)>,
}

/// One replica's report, as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The replica's identity.
    pub identity: String,
    /// Renewed within its lease duration.
    pub live: bool,
    /// What its routing table has applied (and whether it has synced).
    pub applied: Applied,
}

impl Report {
    /// Whether this replica enforces the change of `kind` that produced `version`.
    pub fn enforces(&self, kind: Kind, version: u64) -> bool {
        self.applied.synced && self.applied.of(kind) >= version
    }
}

/// Whether every live replica enforces a set of changes, each a kind and the resource
/// version its write produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Live replicas.
    pub live: usize,
    /// Identities of the live replicas that do not enforce every change yet.
    pub behind: Vec<String>,
}

impl Check {
    /// Checks `changes` against `reports` (dead replicas do not count). Pure.
    pub fn of(reports: &[Report], changes: &[(Kind, u64)]) -> Self {
        let live: Vec<&Report> = reports.iter().filter(|r| r.live).collect();
        let mut behind: Vec<String> = live
            .iter()
            .filter(|r| !changes.iter().all(|(kind, version)| r.enforces(*kind, *version)))
            .map(|r| r.identity.clone())
            .collect();
        behind.sort();
        Self { live: live.len(), behind }
    }

    /// No live replica lags (also when none is running: each loads the current state
    /// when it starts).
    pub fn is_enforced(&self) -> bool {
        self.behind.is_empty()
    }

    /// What a human reads in a condition.
    pub fn message(&self) -> String {
        match (self.live, self.behind.len()) {
            (0, _) => "No proxy replica reports; each one that starts serves the current state".to_string(),
            (live, 0) => format!("Enforced by {live}/{live} live proxy replicas"),
            (live, behind) => format!(
                "Waiting for {behind} of {live} live proxy replicas: {} (kubectl llmproxy replicas)",
                self.behind.join(", ")
            ),
        }
    }
}

/// The Lease that reports `applied` for `settings.identity` at `now`.
pub fn lease(settings: &ReportSettings, applied: Applied, now: jiff::Timestamp) -> Lease {
    let annotations = BTreeMap::from([
        (SYNCED.to_string(), applied.synced.to_string()),
        (PROJECTS.to_string(), applied.projects.to_string()),
        (TOKENS.to_string(), applied.tokens.to_string()),
        (SECRETS.to_string(), applied.secrets.to_string()),
    ]);
    Lease {
        metadata: ObjectMeta {
            name: Some(lease_name(&settings.identity)),
            namespace: Some(settings.namespace.clone()),
            labels: Some(BTreeMap::from([
                (ROLE_LABEL.0.to_string(), ROLE_LABEL.1.to_string()),
                (MANAGED_BY_LABEL.0.to_string(), MANAGED_BY_LABEL.1.to_string()),
            ])),
            annotations: Some(annotations),
            owner_references: settings.owner.as_ref().map(|(name, uid)| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                    name: name.clone(),
                    uid: uid.clone(),
                    ..OwnerReference::default()
                }]
            }),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(settings.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(settings.lease_duration.as_secs()).unwrap_or(i32::MAX)),
            renew_time: Some(crate::api::micros(now)),
            ..LeaseSpec::default()
        }),
    }
}

/// The name of the Lease of `identity` (cut to a valid object name).
pub fn lease_name(identity: &str) -> String {
    let name: String = format!("{LEASE_PREFIX}{identity}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c.to_ascii_lowercase() } else { '-' })
        .take(253)
        .collect();
    name.trim_end_matches(['-', '.']).to_string()
}

/// Reads a report back from its Lease at `now`. Pure.
pub fn read(lease: &Lease, now: jiff::Timestamp) -> Report {
    let annotations = lease.annotations();
    let version = |key: &str| annotations.get(key).and_then(|v| v.parse().ok()).unwrap_or(0);
    let spec = lease.spec.clone().unwrap_or_default();
    let live = match (spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(seconds)) => {
            renewed.0.checked_add(jiff::SignedDuration::from_secs(i64::from(seconds))).is_ok_and(|until| until > now)
        }
        _ => false,
    };
    Report {
        identity: spec.holder_identity.unwrap_or_else(|| lease.name_any()),
        live,
        applied: Applied {
            synced: annotations.get(SYNCED).is_some_and(|v| v == "true"),
            projects: version(PROJECTS),
            tokens: version(TOKENS),
            secrets: version(SECRETS),
        },
    }
}

/// Every replica report in `namespace`, live or not.
pub async fn list(client: &Client, namespace: &str) -> Result<Vec<Report>, kube::Error> {
    let selector = format!("{}={}", ROLE_LABEL.0, ROLE_LABEL.1);
    let leases =
        Api::<Lease>::namespaced(client.clone(), namespace).list(&ListParams::default().labels(&selector)).await?;
    let now = jiff::Timestamp::now();
    Ok(leases.items.iter().map(|lease| read(lease, now)).collect())
}

/// Writes this replica's report whenever what the table has applied changes (at most
/// once per `min_interval`) and at least every third of the lease duration, until
/// `shutdown` turns true; then deletes it, so nobody waits for a replica that is gone.
pub async fn report(
    client: Client,
    settings: ReportSettings,
    table: &SharedTable,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let name = lease_name(&settings.identity);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut applied = table.applied();
    let heartbeat = settings.lease_duration / 3;
    let mut written: Option<Applied> = None;
    loop {
        let current = *applied.borrow_and_update();
        if written != Some(current) {
            let lease = lease(&settings, current, jiff::Timestamp::now());
            match leases.patch(&name, &params, &Patch::Apply(&lease)).await {
                Ok(_) => written = Some(current),
                Err(error) => tracing::warn!(%error, lease = %name, "could not write the replica report"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.min_interval) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(heartbeat) => written = None,
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    if let Err(error) = leases.delete(&name, &DeleteParams::default()).await {
        tracing::warn!(%error, lease = %name, "could not delete the replica report");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ReportSettings {
        ReportSettings {
            namespace: "ops".into(),
            identity: "proxy-7f9c_A".into(),
            lease_duration: Duration::from_secs(30),
            min_interval: Duration::from_millis(100),
            owner: None,
        }
    }

    #[test]
    fn a_report_reads_back_what_was_written_while_its_lease_lasts() {
        let now = jiff::Timestamp::from_second(1_000).unwrap();
        let applied = Applied { synced: true, projects: 10, tokens: 20, secrets: 30 };
        let lease = lease(&settings(), applied, now);
        assert_eq!(lease.metadata.name.as_deref(), Some("llm-proxy-replica-proxy-7f9c-a"));
        let report = read(&lease, now.checked_add(jiff::SignedDuration::from_secs(29)).unwrap());
        assert_eq!(report, Report { identity: "proxy-7f9c_A".into(), live: true, applied });
        assert!(report.enforces(Kind::Token, 20) && !report.enforces(Kind::Token, 21));
        assert!(report.enforces(Kind::Secret, 30) && !report.enforces(Kind::Project, 11));
        assert!(!read(&lease, now.checked_add(jiff::SignedDuration::from_secs(30)).unwrap()).live);

        // In a pod, the Pod owns the report: the garbage collector deletes it with the Pod.
        let mut in_pod = settings();
        in_pod.owner = Some(("proxy-7f9c".into(), "uid-1".into()));
        let owners = super::lease(&in_pod, applied, now).metadata.owner_references.unwrap();
        assert_eq!((owners[0].kind.as_str(), owners[0].uid.as_str()), ("Pod", "uid-1"));
    }

    #[test]
    fn a_change_is_enforced_once_every_live_replica_has_applied_it() {
        let now = jiff::Timestamp::from_second(1_000).unwrap();
        let report = |identity: &str, tokens: u64, renewed_secs_ago: i64| {
            let mut s = settings();
            s.identity = identity.into();
            let at = now.checked_sub(jiff::SignedDuration::from_secs(renewed_secs_ago)).unwrap();
            read(&lease(&s, Applied { synced: true, projects: 7, tokens, secrets: 3 }, at), now)
        };
        let reports = [report("a", 50, 1), report("b", 40, 1), report("dead", 0, 60)];
        let check = Check::of(&reports, &[(Kind::Token, 45), (Kind::Project, 7)]);
        assert_eq!(check, Check { live: 2, behind: vec!["b".into()] });
        assert!(!check.is_enforced() && check.message().contains("1 of 2") && check.message().contains("b"));
        let check = Check::of(&reports, &[(Kind::Token, 40), (Kind::Secret, 3)]);
        assert!(check.is_enforced());
        assert_eq!(check.message(), "Enforced by 2/2 live proxy replicas");
        assert!(Check::of(&[], &[(Kind::Token, 1)]).is_enforced());
    }

    #[test]
    fn a_replica_that_has_not_synced_enforces_nothing() {
        let now = jiff::Timestamp::from_second(1_000).unwrap();
        let unsynced = Applied { synced: false, projects: 5, tokens: 5, secrets: 5 };
        let report = read(&lease(&settings(), unsynced, now), now);
        assert!(report.live && !report.enforces(Kind::Project, 1));
    }
}
