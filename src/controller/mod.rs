//! The control plane: reconciles Projects and ProxyTokens.
//!
//! In: watch events on Projects, ProxyTokens, the key Secrets (operator namespace) and
//! the token Secrets. Out: finalizers, status (server-side apply under one field
//! manager), token Secrets, and Events as the audit trail. Decisions are pure functions
//! ([`project::decide`], [`proxytoken::decide`]); the reconcilers only fetch and write.

pub(crate) mod lease;
pub(crate) mod project;
pub(crate) mod proxytoken;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Secret};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};

use crate::api::{API_KEY_LABEL, CONTROLLER_MANAGER, ConditionStatus, Conditions, Project, ProxyToken};
use crate::enforcement::{Check, ROLE_LABEL};
use crate::metrics::{Metrics, ReconcileLabels};

/// Settings of the controller.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// Namespace of the API-key Secrets (the operator's namespace).
    pub namespace: String,
    /// The proxy's base URL as workloads reach it; `/v1` is appended for `OPENAI_BASE_URL`.
    pub proxy_url: String,
    /// Only Projects and ProxyTokens with these labels (an instance shard); `None`: all.
    pub label_selector: Option<String>,
}

/// Shared by every reconcile.
pub(crate) struct Context {
    /// API client.
    pub client: Client,
    /// Event recorder (the audit trail).
    pub recorder: Recorder,
    /// Settings.
    pub settings: Settings,
    /// Every ProxyToken the controller follows, from the token controller's cache.
    pub tokens: kube::runtime::reflector::Store<ProxyToken>,
    /// The proxy replicas' reports (Leases in the operator namespace).
    pub replicas: kube::runtime::reflector::Store<Lease>,
    /// Objects whose latest change some live replica does not enforce yet: a new
    /// report reconciles them again.
    pub awaiting: Arc<Awaiting>,
    /// Tokens minted (hash in status) whose Secret waits until every replica accepts
    /// them: the plaintext lives only here until then. Lost with the process, in which
    /// case the next leader mints afresh (nobody has seen the lost token).
    pub mints: Mutex<HashMap<String, crate::token::Token>>,
}

/// Objects waiting for the proxy replicas, by kind.
#[derive(Default)]
pub(crate) struct Awaiting {
    /// ProxyTokens.
    pub tokens: Mutex<HashSet<ObjectRef<ProxyToken>>>,
    /// Projects.
    pub projects: Mutex<HashSet<ObjectRef<Project>>>,
}

/// Adds or removes `object` from `set`.
pub(crate) fn mark<K: Resource<DynamicType = ()>>(set: &Mutex<HashSet<ObjectRef<K>>>, object: &K, waiting: bool) {
    let key = ObjectRef::from_obj(object);
    let mut set = set.lock().expect("awaiting set poisoned");
    if waiting {
        set.insert(key);
    } else {
        set.remove(&key);
    }
}

/// Sets the `Enforced` condition: `False` (Propagating) when this status write carries a
/// change the proxies route by and replicas are running, since none can have applied a
/// write that has not happened yet; otherwise `True` once `check` passes. Returns
/// whether it is still waiting. Pure.
pub(crate) fn set_enforced(conditions: &mut Conditions, type_: &str, changed: bool, check: &Check) -> bool {
    // With no replica running there is nobody to wait for, now or after this write.
    if changed && check.live > 0 {
        conditions.set(
            type_,
            ConditionStatus::False,
            "Propagating",
            "Waiting for the proxy replicas to apply this change",
        );
        true
    } else if !changed && conditions.was_true(type_) {
        // Enforced, and nothing the proxies route by changed since: later versions of
        // the object (usage counts, these very conditions) need no new check.
        conditions.keep(type_);
        false
    } else if check.is_enforced() {
        let reason = if check.live == 0 { "NoReplicas" } else { "Enforced" };
        conditions.set(type_, ConditionStatus::True, reason, check.message());
        false
    } else if conditions.held_for(type_).is_some_and(|held| held < NAME_LAGGARDS_AFTER) {
        // Rewriting the condition now would be one more change for the replicas to apply,
        // moving the target: keep it as it is while they catch up.
        conditions.keep(type_);
        true
    } else {
        // Still behind after a while: name the replicas that lag (once; sorted, so the
        // message stays the same while the same replicas lag).
        conditions.set(type_, ConditionStatus::False, "Propagating", check.message());
        true
    }
}

/// How long `Enforced` stays `False` before its message names the lagging replicas.
const NAME_LAGGARDS_AFTER: jiff::SignedDuration = jiff::SignedDuration::from_secs(10);

/// How long a token waits for every replica before its Secret is written anyway (with
/// `Enforced=False` naming the replicas that lag).
pub(crate) const MINT_PROPAGATION_TIMEOUT: Duration = Duration::from_secs(10);

impl Context {
    /// Checks `changes` against the replicas' latest reports.
    pub(crate) fn check(&self, changes: &[(crate::index::Kind, u64)]) -> Check {
        let now = jiff::Timestamp::now();
        let reports: Vec<_> = self.replicas.state().iter().map(|lease| crate::enforcement::read(lease, now)).collect();
        Check::of(&reports, changes)
    }

    /// Publishes an Event about `object`. A failed Event is logged, never fatal: the
    /// status already says what happened.
    pub(crate) async fn publish<K: Resource<DynamicType = ()>>(&self, object: &K, event: Audit) {
        let reason = event.reason.clone();
        let event = Event {
            type_: if event.warning { EventType::Warning } else { EventType::Normal },
            reason: event.reason,
            note: Some(event.note),
            action: event.action.into(),
            secondary: event.related,
        };
        let regarding = object.object_ref(&());
        // Named here: the reconcile's span names the object reconciled, and a token's
        // reconcile records events about its Project too.
        let (kind, name) =
            (regarding.kind.as_deref().unwrap_or_default(), regarding.name.as_deref().unwrap_or_default());
        let namespace = regarding.namespace.as_deref().unwrap_or_default();
        match self.recorder.publish(&event, &regarding).await {
            Ok(()) => tracing::info!(%reason, kind, name, namespace, "event recorded"),
            Err(error) => tracing::warn!(%error, %reason, kind, name, namespace, "could not publish event"),
        }
    }
}

/// One entry of the audit trail, recorded as a Kubernetes Event on the object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Audit {
    /// `Warning` rather than `Normal`.
    pub warning: bool,
    /// Short CamelCase reason (`Issued`, `Deactivated`, …).
    pub reason: String,
    /// What the controller did (`Mint`, `Revoke`, …).
    pub action: &'static str,
    /// What a human reads; never a secret.
    pub note: String,
    /// A second object involved (the ProxyToken, on a Project's token Events).
    pub related: Option<ObjectReference>,
}

impl Audit {
    /// A `Normal` entry.
    pub(crate) fn normal(reason: &str, action: &'static str, note: impl Into<String>) -> Self {
        Self { warning: false, reason: reason.into(), action, note: note.into(), related: None }
    }

    /// A `Warning` entry.
    pub(crate) fn warning(reason: &str, action: &'static str, note: impl Into<String>) -> Self {
        Self { warning: true, reason: reason.into(), action, note: note.into(), related: None }
    }
}

/// Everything a reconcile can fail on, named for the operation.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Reading the Secret that holds a project's key.
    #[error("reading Secret {namespace}/{name}")]
    GetKeySecret { namespace: String, name: String, source: kube::Error },
    /// Reading the project of a token.
    #[error("reading Project {name}")]
    GetProject { name: String, source: kube::Error },
    /// Reading a token before minting it.
    #[error("reading ProxyToken {name}")]
    GetToken { name: String, source: kube::Error },
    /// Reading a namespace's labels for `allowedNamespaces`.
    #[error("reading Namespace {name}")]
    GetNamespace { name: String, source: kube::Error },
    /// Adding the protection finalizer.
    #[error("adding the finalizer to Project {name}")]
    AddFinalizer { name: String, source: kube::Error },
    /// Writing status.
    #[error("writing the status of {kind} {name}")]
    PatchStatus { kind: &'static str, name: String, source: kube::Error },
    /// Creating or reading the token Secret.
    #[error("writing token Secret {namespace}/{name}")]
    TokenSecret { namespace: String, name: String, source: kube::Error },
    /// The OS random number generator failed.
    #[error("minting a token")]
    Mint(#[from] crate::token::MintError),
}

impl Error {
    /// Fixed label for metrics and logs.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::GetKeySecret { .. } => "get_key_secret",
            Error::GetProject { .. } => "get_project",
            Error::GetToken { .. } => "get_token",
            Error::GetNamespace { .. } => "get_namespace",
            Error::AddFinalizer { .. } => "add_finalizer",
            Error::PatchStatus { .. } => "patch_status",
            Error::TokenSecret { .. } => "token_secret",
            Error::Mint(_) => "mint",
        }
    }
}

/// Retries a failed reconcile with a short delay: these are API hiccups, and the
/// controller's own backoff on top keeps a persistent failure from spinning.
fn error_policy<K>(_object: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %crate::telemetry::Chain(error), kind = error.metric_label(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Which Project events concern its tokens: a change of which object it is, of its spec,
/// of how far its deletion has gone, or of whether its key is valid (its tokens' `Ready`
/// shows it); never the rest of its status (token counts), which would re-reconcile every
/// token of a project on each of its status writes, O(n²) work for n tokens. Remembers
/// one hash per Project and forgets it when the Project goes.
#[derive(Default)]
pub(crate) struct ProjectChanges {
    seen: HashMap<String, u64>,
}

impl ProjectChanges {
    /// Whether `project`, as a watch event shows it, changed what its tokens depend on.
    pub(crate) fn changed(&mut self, project: &Project) -> bool {
        let name = project.name_any();
        // Deleted (the update that removes the last finalizer deletes the object, and
        // the delete event follows): always a change, and nothing left to remember.
        if project.metadata.deletion_timestamp.is_some() && project.finalizers().is_empty() {
            self.seen.remove(&name);
            return true;
        }
        self.seen.insert(name, Self::hash(project)) != Some(Self::hash(project))
    }

    /// Projects remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether none is remembered.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn hash(project: &Project) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(&project.spec).unwrap_or_default().hash(&mut hasher);
        project.metadata.deletion_timestamp.is_some().hash(&mut hasher);
        // A Project deleted and created again is another object: its old tokens must learn.
        project.metadata.uid.hash(&mut hasher);
        project.finalizers().hash(&mut hasher);
        let key = project
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == crate::api::project_conditions::API_KEY_VALID));
        key.map(|c| (&c.status, &c.reason)).hash(&mut hasher);
        hasher.finish()
    }
}

/// Counts one reconcile's result.
fn count<T, Q: std::error::Error + 'static>(
    metrics: &Metrics,
    kind: &'static str,
    result: &Result<T, kube::runtime::controller::Error<Error, Q>>,
) {
    let result = match result {
        Ok(_) => "ok",
        Err(kube::runtime::controller::Error::ReconcilerFailed(error, _)) => error.metric_label(),
        // A trigger for an object the cache no longer holds: expected, nothing to do.
        Err(error @ kube::runtime::controller::Error::ObjectNotFound(_)) => {
            tracing::debug!(%error, kind, "reconcile did not run");
            "not_run"
        }
        // A watch failed: until it is back (with backoff), changes to these objects
        // reach this controller late. An operator must see that.
        Err(error) => {
            tracing::warn!(error = %crate::telemetry::Chain(error), kind, "a watch failed; retrying");
            "not_run"
        }
    };
    metrics.reconciles.get_or_create(&ReconcileLabels { kind, result }).inc();
}

/// Runs both controllers until `shutdown` resolves.
pub(crate) async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let reporter = Reporter { controller: CONTROLLER_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
    let labelled = match &settings.label_selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    let projects = Api::<Project>::all(client.clone());
    let tokens = Api::<ProxyToken>::all(client.clone());

    // No watch on token Secrets: that would need list/watch on every Secret in the
    // cluster. The controller only ever gets or creates the one Secret it mints.
    let token_controller = Controller::new(tokens.clone(), labelled.clone());
    let token_store = token_controller.store();

    // Project reconciles count tokens from the token controller's cache, not the API: a
    // burst of token changes no longer lists every token once per change. (No debounce:
    // usage flushes would keep postponing a busy project's reconcile.)
    let project_controller = Controller::new(projects.clone(), labelled.clone());
    let project_store = project_controller.store();
    // The replicas' reports: a store to read them, and a trigger for what waits on them.
    let leases = Api::<Lease>::namespaced(client.clone(), &settings.namespace);
    let reports = watcher::Config::default().labels(&format!("{}={}", ROLE_LABEL.0, ROLE_LABEL.1));
    let (replicas, writer) = kube::runtime::reflector::store();
    tokio::spawn(
        kube::runtime::reflector(writer, watcher(leases.clone(), reports.clone()))
            .default_backoff()
            .for_each(|_| std::future::ready(())),
    );
    let awaiting = Arc::new(Awaiting::default());
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        settings,
        tokens: token_store.clone(),
        replicas,
        awaiting: awaiting.clone(),
        mints: Mutex::new(HashMap::new()),
    });
    let waiting_projects = awaiting.clone();
    let project_controller = project_controller
        .watches(
            Api::<Secret>::namespaced(client.clone(), &ctx.settings.namespace),
            watcher::Config::default().labels(&format!("{}={}", API_KEY_LABEL.0, API_KEY_LABEL.1)),
            move |secret| {
                let name = secret.name_any();
                project_store
                    .state()
                    .into_iter()
                    .filter(|p| p.spec.api_key_secret_ref.name == name)
                    .map(|p| ObjectRef::from_obj(&*p))
                    .collect::<Vec<_>>()
            },
        )
        .watches(tokens, labelled.clone(), |t| Some(ObjectRef::new(&t.spec.project_ref.name)))
        .watches(leases.clone(), reports.clone(), move |_| {
            waiting_projects.projects.lock().expect("awaiting set poisoned").iter().cloned().collect::<Vec<_>>()
        });

    // Tokens depend on their project's spec (and deletion), never on its status: without
    // this filter every status write of a project (token counts) re-reconciled all of
    // its tokens, O(n^2) work for n tokens.
    let changes = Mutex::new(ProjectChanges::default());
    let token_controller = token_controller.watches(leases, reports, move |_| {
        awaiting.tokens.lock().expect("awaiting set poisoned").iter().cloned().collect::<Vec<_>>()
    });
    // A namespace's labels decide selector grants: its tokens follow a label change.
    let tokens_of_namespace = token_store.clone();
    let token_controller =
        token_controller.watches(Api::<Namespace>::all(client.clone()), watcher::Config::default(), move |ns| {
            let name = ns.name_any();
            tokens_of_namespace
                .state()
                .into_iter()
                .filter(|t| t.metadata.namespace.as_deref() == Some(name.as_str()))
                .map(|t| ObjectRef::from_obj(&*t))
                .collect::<Vec<_>>()
        });
    let token_controller = token_controller.watches(projects, labelled, move |p| {
        let name = p.name_any();
        if !changes.lock().expect("project changes poisoned").changed(&p) {
            return Vec::new();
        }
        token_store
            .state()
            .into_iter()
            .filter(|t| t.spec.project_ref.name == name)
            .map(|t| ObjectRef::from_obj(&*t))
            .collect::<Vec<_>>()
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let projects_done = project_controller
        .graceful_shutdown_on(stopped(stop_rx.clone()))
        .run(project::reconcile, error_policy, ctx.clone())
        .for_each(|result| {
            count(&metrics, "Project", &result);
            std::future::ready(())
        });
    let tokens_done = token_controller
        .graceful_shutdown_on(stopped(stop_rx))
        .run(proxytoken::reconcile, error_policy, ctx)
        .for_each(|result| {
            count(&metrics, "ProxyToken", &result);
            std::future::ready(())
        });
    tokio::join!(projects_done, tokens_done);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(uid: &str) -> Project {
        let mut p = crate::fixtures::project("prod");
        p.metadata.uid = Some(uid.into());
        p.metadata.finalizers = Some(vec![crate::api::PROJECT_FINALIZER.into()]);
        p
    }

    #[test]
    fn project_changes_pass_spec_and_deletion_and_forget_deleted_projects() {
        let mut changes = ProjectChanges::default();
        let mut p = project("uid-1");
        assert!(changes.changed(&p));
        p.status = Some(Default::default());
        assert!(!changes.changed(&p), "a status write is not a change");
        p.spec.active = false;
        assert!(changes.changed(&p));
        // Except the key's validity, which its tokens' Ready shows.
        let key = |valid: bool, reason: &str| {
            let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
            let mut conditions = crate::api::Conditions::new(&[], None, now);
            let status = crate::api::ConditionStatus::from_bool(valid);
            conditions.set(crate::api::project_conditions::API_KEY_VALID, status, reason, "");
            conditions.finish()
        };
        p.status.as_mut().unwrap().conditions = key(false, "InvalidAPIKeyFormat");
        assert!(changes.changed(&p));
        p.status.as_mut().unwrap().tokens = Some(Default::default());
        assert!(!changes.changed(&p), "token counts are not a change");
        p.status.as_mut().unwrap().conditions = key(true, "Valid");
        assert!(changes.changed(&p));

        // Deletion requested (the finalizer keeps it), then the finalizer removed, then
        // the delete event: the tokens hear of each step that matters, and the Project
        // is forgotten (the map used to grow with every Project ever seen).
        p.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
        assert!(changes.changed(&p));
        p.metadata.finalizers = None;
        assert!(changes.changed(&p));
        assert!(changes.changed(&p));
        assert!(changes.is_empty());

        // Created again under the same name: another object.
        assert!(changes.changed(&project("uid-2")));
        assert_eq!(changes.len(), 1);
    }
}
