//! Project reconciliation: protection finalizer, key check, token counts, status and
//! the lifecycle Events (created, activated, deactivated, key rotated, key invalid,
//! bulk revoke, deletion attempted).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{Audit, Context, Error};
use crate::api::{
    CONTROLLER_MANAGER, ConditionStatus, Conditions, PROJECT_FINALIZER, Project, ProjectPhase, ProjectStatus,
    ProxyToken, TokenCounts, TokenPhase, TokenSummary, project_conditions as cond,
};
use crate::apikey::{self, ApiKey, KeyProblem};
use crate::controller::proxytoken::bound_project;
use crate::enforcement::Check;
use crate::index::Kind;

/// How many tokens `status.recentTokens` lists.
pub(crate) const RECENT_TOKENS: usize = 5;

/// What the reconciler saw.
pub(crate) struct Observed<'a> {
    /// The Project.
    pub project: &'a Project,
    /// Its key, or why it has none.
    pub key: Result<ApiKey, KeyProblem>,
    /// Every ProxyToken that names it.
    pub tokens: &'a [ProxyToken],
    /// The operator's namespace, for messages.
    pub namespace: &'a str,
    /// Now.
    pub now: Time,
    /// What the proxy replicas enforce of the Project and its key Secret as observed.
    pub check: Check,
}

/// What the reconciler should write.
#[derive(Debug)]
pub(crate) struct Decision {
    /// The new status.
    pub status: ProjectStatus,
    /// Events to record.
    pub events: Vec<Audit>,
    /// Some live proxy replica does not enforce the latest change yet.
    pub waiting: bool,
}

/// Computes status and Events from what was observed. Pure.
pub(crate) fn decide(o: &Observed) -> Decision {
    let p = o.project;
    let old = p.status.clone().unwrap_or_default();
    let first_time = p.status.is_none();
    let deleting = p.metadata.deletion_timestamp.is_some();
    let phase = if p.spec.active && !deleting { ProjectPhase::Active } else { ProjectPhase::Inactive };
    let secret = &p.spec.api_key_secret_ref;

    let mut conditions = Conditions::new(&old.conditions, p.metadata.generation, o.now.clone());
    match &o.key {
        Ok(_) => conditions.set(cond::API_KEY_VALID, ConditionStatus::True, "Valid", "API key is well-formed"),
        Err(problem) => conditions.set(
            cond::API_KEY_VALID,
            ConditionStatus::False,
            problem.reason(),
            problem.message(&p.name_any(), &secret.name, &secret.key, o.namespace),
        ),
    }
    let (ready, ready_reason, ready_message) = match (phase, &o.key) {
        (ProjectPhase::Active, Ok(_)) => {
            (true, "Active", "Requests with this project's tokens are forwarded".to_string())
        }
        (ProjectPhase::Active, Err(problem)) => (
            false,
            problem.reason(),
            format!(
                "{}: requests with this project's tokens get 503 project_key_invalid until it is fixed",
                problem.message(&p.name_any(), &secret.name, &secret.key, o.namespace)
            ),
        ),
        (ProjectPhase::Inactive, _) if deleting => {
            (false, "DeletionRequested", "Deletion was requested; the project is inactive".to_string())
        }
        (ProjectPhase::Inactive, _) => {
            (false, "Deactivated", "spec.active is false; requests with its tokens are refused".to_string())
        }
    };
    conditions.set(cond::READY, ConditionStatus::from_bool(ready), ready_reason, ready_message);
    if deleting {
        conditions.set(
            cond::DELETION_BLOCKED,
            ConditionStatus::True,
            "ProjectsAreNeverDeleted",
            "Projects keep their audit trail and cannot be deleted: set spec.active=false instead. To remove it anyway, remove the finalizer llmproxy.io/project-protection by hand.",
        );
    } else {
        conditions.set(cond::DELETION_BLOCKED, ConditionStatus::False, "NotRequested", "No deletion requested");
    }

    let mut recent: Vec<&ProxyToken> = o.tokens.iter().filter(|t| issued_at(t).is_some()).collect();
    recent.sort_by(|a, b| issued_at(b).cmp(&issued_at(a)).then_with(|| a.name_any().cmp(&b.name_any())));
    let recent_tokens = recent
        .into_iter()
        .take(RECENT_TOKENS)
        .map(|t| TokenSummary {
            namespace: t.namespace().unwrap_or_default(),
            name: t.name_any(),
            phase: t.status.as_ref().and_then(|s| s.phase).map(|ph| ph.as_str().to_string()),
            issued_at: t.status.as_ref().and_then(|s| s.issued_at.clone()),
        })
        .collect();
    let counts = TokenCounts {
        total: o.tokens.len() as u32,
        active: o.tokens.iter().filter(|t| token_phase(t) == Some(TokenPhase::Active)).count() as u32,
    };

    let fingerprint = o.key.as_ref().ok().map(ApiKey::fingerprint);
    // What the proxies route by: the spec (generation, deletion included) and the key.
    let changed = old.observed_generation != p.metadata.generation
        || old.api_key_fingerprint != fingerprint
        || old.phase != Some(phase);
    let waiting = super::set_enforced(&mut conditions, cond::ENFORCED, changed, &o.check);
    let status = ProjectStatus {
        phase: Some(phase),
        api_key_hint: o.key.as_ref().ok().map(ApiKey::hint),
        api_key_fingerprint: fingerprint,
        tokens: Some(counts),
        recent_tokens,
        tokens_not_before: p.spec.tokens_not_before.as_ref().map(|t| crate::api::micros(t.0)),
        conditions: conditions.finish(),
        observed_generation: p.metadata.generation,
        // Usage: the proxies write it, the controller never owns it.
        token_windows: Vec::new(),
        cost_windows: Vec::new(),
        usage_flushes: Vec::new(),
        current_minute: None,
    };
    let events = events(&old, &status, first_time, o);
    Decision { status, events, waiting }
}

fn events(old: &ProjectStatus, new: &ProjectStatus, first_time: bool, o: &Observed) -> Vec<Audit> {
    let mut events = Vec::new();
    let phase = new.phase.map_or("Unknown", ProjectPhase::as_str);
    if first_time {
        events.push(Audit::normal("Created", "Reconcile", format!("Project registered; status {phase}")));
    } else if old.phase != new.phase {
        match new.phase {
            Some(ProjectPhase::Active) => {
                events.push(Audit::normal("Activated", "Activate", "Project activated: its tokens work again"))
            }
            _ => events.push(Audit::normal(
                "Deactivated",
                "Deactivate",
                "Project deactivated: requests with its tokens are refused; tokens are kept",
            )),
        }
    }
    if let (Some(before), Some(after)) = (&old.api_key_fingerprint, &new.api_key_fingerprint)
        && before != after
    {
        let hint = new.api_key_hint.as_deref().unwrap_or_default();
        events.push(Audit::normal(
            "APIKeyRotated",
            "RotateKey",
            format!("API key changed (now {hint}); tokens unchanged"),
        ));
    }
    let key_condition = |s: &ProjectStatus| {
        s.conditions.iter().find(|c| c.type_ == cond::API_KEY_VALID).map(|c| (c.status.clone(), c.reason.clone()))
    };
    if let Err(problem) = &o.key
        && key_condition(old) != key_condition(new)
    {
        let secret = &o.project.spec.api_key_secret_ref;
        events.push(Audit::warning(
            problem.reason(),
            "CheckKey",
            problem.message(&o.project.name_any(), &secret.name, &secret.key, o.namespace),
        ));
    }
    if new.tokens_not_before.is_some() && old.tokens_not_before != new.tokens_not_before {
        let at = new.tokens_not_before.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
        events.push(Audit::normal("TokensRevoked", "RevokeAll", format!("Every token issued before {at} is revoked")));
    }
    let blocked = |s: &ProjectStatus| crate::api::is_true(&s.conditions, cond::DELETION_BLOCKED);
    if blocked(new) && !blocked(old) {
        events.push(Audit::warning(
            "DeletionBlocked",
            "Delete",
            "Deletion requested, but projects are never deleted: the project is now inactive and keeps its record. Set spec.active=false instead of deleting.",
        ));
    }
    events
}

fn issued_at(t: &ProxyToken) -> Option<jiff::Timestamp> {
    t.status.as_ref()?.issued_at.as_ref().map(|time| time.0)
}

fn token_phase(t: &ProxyToken) -> Option<TokenPhase> {
    t.status.as_ref()?.phase
}

/// Reconciles one Project: fetch, [`decide`], write.
pub(crate) async fn reconcile(project: Arc<Project>, ctx: Arc<Context>) -> Result<Action, Error> {
    let client = &ctx.client;
    let name = project.name_any();
    let projects = Api::<Project>::all(client.clone());

    if project.metadata.deletion_timestamp.is_none() && !project.finalizers().iter().any(|f| f == PROJECT_FINALIZER) {
        let mut finalizers = project.finalizers().to_vec();
        finalizers.push(PROJECT_FINALIZER.to_string());
        // The resourceVersion makes this a compare-and-swap: never drop someone else's finalizer.
        let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": project.resource_version() } });
        projects
            .patch(
                &name,
                &PatchParams { field_manager: Some(CONTROLLER_MANAGER.into()), ..PatchParams::default() },
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|source| Error::AddFinalizer { name: name.clone(), source })?;
    }

    let secret_ref = &project.spec.api_key_secret_ref;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ctx.settings.namespace);
    let mut changes = vec![(Kind::Project, crate::index::resource_version(&project.metadata))];
    let key = match secrets.get_opt(&secret_ref.name).await {
        Ok(None) => Err(KeyProblem::SecretNotFound),
        Ok(Some(secret)) => {
            changes.push((Kind::Secret, crate::index::resource_version(&secret.metadata)));
            let meta = &secret.metadata;
            match secret.data.as_ref().and_then(|d| d.get(&secret_ref.key)) {
                _ if !apikey::KeyBinding::of(meta).admits(&name) => Err(KeyProblem::NotBound),
                None => Err(KeyProblem::KeyNotFound),
                Some(raw) => ApiKey::parse(&raw.0),
            }
        }
        Err(source) => {
            return Err(Error::GetKeySecret {
                namespace: ctx.settings.namespace.clone(),
                name: secret_ref.name.clone(),
                source,
            });
        }
    };

    // Tokens of an earlier Project of the same name (deleted by force) are not this one's.
    let tokens: Vec<ProxyToken> = ctx
        .tokens
        .state()
        .iter()
        .filter(|t| t.spec.project_ref.name == name)
        .filter(|t| {
            t.status.as_ref().and_then(|s| s.issued_at.as_ref()).is_none()
                || bound_project(t, Some(&*project)).is_some()
        })
        .map(|t| (**t).clone())
        .collect();

    let observed = Observed {
        project: &project,
        key,
        tokens: &tokens,
        namespace: &ctx.settings.namespace,
        now: Time(jiff::Timestamp::now()),
        check: ctx.check(&changes),
    };
    let decision = decide(&observed);
    // Usage is the proxies' to write: compare without it.
    let comparable = project.status.clone().map(|s| ProjectStatus {
        token_windows: Vec::new(),
        cost_windows: Vec::new(),
        usage_flushes: Vec::new(),
        current_minute: None,
        ..s
    });
    if comparable.as_ref() != Some(&decision.status) {
        let patch = json!({
            "apiVersion": Project::api_version(&()),
            "kind": Project::kind(&()),
            "status": decision.status,
        });
        projects
            .patch_status(&name, &PatchParams::apply(CONTROLLER_MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(|source| Error::PatchStatus { kind: "Project", name: name.clone(), source })?;
    }
    for event in decision.events {
        ctx.publish(&*project, event).await;
    }
    super::mark(&ctx.awaiting.projects, &*project, decision.waiting);
    // A new report reconciles waiting projects at once; this is the fallback.
    Ok(if decision.waiting { Action::requeue(std::time::Duration::from_secs(5)) } else { Action::await_change() })
}

#[cfg(test)]
mod tests;
