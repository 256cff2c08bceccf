//! ProxyToken reconciliation: admission (project, namespace grant, Secret name),
//! minting into the token Secret, and the lifecycle phase with its Events.
//!
//! A token is minted at most once: once `status.tokenHash` is set nothing mints again.
//! The hash is written to status before the Secret, so a Secret found before the hash
//! is never this token's: it is not adopted (a tenant could otherwise choose the token
//! value by creating the Secret first), the name is refused as taken.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{Audit, Context, Error, MINT_PROPAGATION_TIMEOUT};
use crate::api::{
    CONTROLLER_MANAGER, ConditionStatus, Conditions, MANAGED_BY_LABEL, Project, ProxyToken, ProxyTokenStatus,
    TOKEN_HASH_ANNOTATION, TokenPhase, token_conditions as cond, token_secret_keys as keys,
};
use crate::duration::parse_go_duration;
use crate::enforcement::Check;
use crate::fate::{Facts, Fate};
use crate::grant;
use crate::index::Kind;
use crate::token::{Token, TokenHash};

/// How often a token that cannot be minted yet is looked at again.
pub(crate) const RETRY_BLOCKED: Duration = Duration::from_secs(10);

/// Label on a token Secret naming its ProxyToken.
pub(crate) const TOKEN_LABEL: &str = "llmproxy.io/proxytoken";

/// Why a token is not (or no longer) usable, and what to tell the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// The phase.
    pub phase: TokenPhase,
    /// Whether requests with the token are served now (`Ready`): an `Active` token is
    /// not while its Project has no usable key.
    pub ready: bool,
    /// Condition and Event reason.
    pub reason: &'static str,
    /// What a human reads.
    pub message: String,
}

impl Verdict {
    fn new(phase: TokenPhase, reason: &'static str, message: impl Into<String>) -> Self {
        Self { phase, ready: phase == TokenPhase::Active, reason, message: message.into() }
    }
}

/// The `Ready` reason of an `Active` token whose Project has no usable API key.
pub(crate) const PROJECT_KEY_INVALID: &str = "ProjectKeyInvalid";

/// The message the product shows when a token is requested for an inactive project.
pub(crate) const INACTIVE_PROJECT_MESSAGE: &str = "Cannot generate tokens for inactive project";

/// Decides whether a token that has not been minted may be. Pure.
pub(crate) fn admit(token: &ProxyToken, project: Option<&Project>, namespace_allowed: bool) -> Result<(), Verdict> {
    let project_name = &token.spec.project_ref.name;
    let namespace = token.namespace().unwrap_or_default();
    if token.spec.revoked {
        return Err(Verdict::new(TokenPhase::Revoked, "Revoked", "Revoked before it was issued; nothing was minted"));
    }
    let Some(project) = project else {
        return Err(Verdict::new(
            TokenPhase::Pending,
            "ProjectNotFound",
            format!("Project {project_name} not found: create it or fix spec.projectRef.name"),
        ));
    };
    if !namespace_allowed {
        return Err(Verdict::new(
            TokenPhase::Rejected,
            "NamespaceNotAllowed",
            format!(
                "Project {project_name} does not allow ProxyTokens from namespace {namespace}: a cluster admin must add it to the Project's spec.allowedNamespaces"
            ),
        ));
    }
    if !project.spec.active || project.metadata.deletion_timestamp.is_some() {
        return Err(Verdict::new(TokenPhase::ProjectInactive, "ProjectInactive", INACTIVE_PROJECT_MESSAGE));
    }
    Ok(())
}

/// `project` if it is the very object `token` was minted for ([`crate::binding`]).
pub(crate) fn bound_project<'a>(token: &ProxyToken, project: Option<&'a Project>) -> Option<&'a Project> {
    let status = token.status.as_ref()?;
    let issued_us = status.issued_at.as_ref()?.0.as_microsecond();
    project.filter(|p| {
        let created_us = p.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_microsecond());
        let uid = p.metadata.uid.as_deref().unwrap_or_default();
        crate::fate::is_bound(status.project_uid.as_deref(), issued_us, uid, created_us)
    })
}

/// The phase of a minted token at `now`: its [`Fate`](crate::fate::Fate), the rule the
/// proxy applies too, with the words for status and Events. Pure; final phases stay final.
/// `namespace_allowed`: the project's `allowedNamespaces` grants the token's namespace now.
pub(crate) fn lifecycle(
    token: &ProxyToken,
    project: Option<&Project>,
    namespace_allowed: bool,
    now: jiff::Timestamp,
) -> Verdict {
    let status = token.status.clone().unwrap_or_default();
    let issued_at = status.issued_at.as_ref().map(|t| t.0);
    let project_name = &token.spec.project_ref.name;
    let bound = bound_project(token, project);
    let not_before = bound.and_then(|p| p.spec.tokens_not_before.as_ref()).map(|t| t.0);
    let facts = Facts {
        bound: bound.is_some(),
        revoked: token.spec.revoked || status.phase == Some(TokenPhase::Revoked),
        // Both sides at the microsecond precision the status stores, like the proxy.
        bulk_revoked: match (issued_at, not_before) {
            (Some(issued), Some(cut)) => issued.as_microsecond() < cut.as_microsecond(),
            _ => false,
        },
        expired: status.phase == Some(TokenPhase::Expired) || expires_at(token).is_some_and(|at| now >= at),
        exhausted: token.spec.max_requests.is_some_and(|max| status.request_count.unwrap_or(0) >= max),
        namespace_allowed,
        project_active: bound.is_some_and(|p| p.spec.active && p.metadata.deletion_timestamp.is_none()),
    };
    match facts.fate() {
        Fate::ProjectDeleted => {
            let replaced =
                if project.is_some() { " (a new Project of that name exists; it is another object)" } else { "" };
            Verdict::new(
                TokenPhase::Revoked,
                "ProjectDeleted",
                format!(
                    "Project {project_name} this token was minted for was deleted{replaced}: the token can never be used again; create a new ProxyToken"
                ),
            )
        }
        Fate::Revoked => {
            Verdict::new(TokenPhase::Revoked, "Revoked", "Revoked: requests with this token are refused for good")
        }
        Fate::BulkRevoked => Verdict::new(
            TokenPhase::Revoked,
            "BulkRevoked",
            format!(
                "Revoked with every token of Project {project_name} issued before {}",
                not_before.map(|t| t.to_string()).unwrap_or_default()
            ),
        ),
        Fate::Expired => Verdict::new(TokenPhase::Expired, "Expired", "Expired: create a new ProxyToken"),
        Fate::Exhausted => Verdict::new(
            TokenPhase::Exhausted,
            "Exhausted",
            format!("All {} requests allowed by maxRequests are used", token.spec.max_requests.unwrap_or_default()),
        ),
        Fate::NamespaceNotAllowed => Verdict::new(
            TokenPhase::Rejected,
            "NamespaceNotAllowed",
            format!(
                "Project {project_name} no longer allows ProxyTokens from namespace {}: requests are refused until a cluster admin grants it again in spec.allowedNamespaces (the token is kept)",
                token.namespace().unwrap_or_default()
            ),
        ),
        Fate::ProjectInactive => Verdict::new(
            TokenPhase::ProjectInactive,
            "ProjectInactive",
            format!("Project {project_name} is inactive: requests are refused until a cluster admin reactivates it"),
        ),
        Fate::Usable => match bound.and_then(key_refusal) {
            // Not a fate of the token (it stays Active and works again with a good key),
            // but what its users must know: the proxy answers 503 meanwhile.
            Some(why) => Verdict {
                ready: false,
                ..Verdict::new(
                    TokenPhase::Active,
                    PROJECT_KEY_INVALID,
                    format!(
                        "Project {project_name} has no usable API key ({why}): requests get 503 project_key_invalid until a cluster admin fixes it; the token itself needs nothing"
                    ),
                )
            },
            None => Verdict::new(TokenPhase::Active, "Active", "Usable"),
        },
    }
}

/// Why `project`'s API key is refused, as its `APIKeyValid` condition says; `None` while
/// the key is valid (or not yet checked).
fn key_refusal(project: &Project) -> Option<String> {
    let status = project.status.as_ref()?;
    let valid = status.conditions.iter().find(|c| c.type_ == crate::api::project_conditions::API_KEY_VALID)?;
    (valid.status == "False").then(|| format!("APIKeyValid=False, {}: {}", valid.reason, valid.message))
}

/// `issuedAt + duration`.
pub(crate) fn expires_at(token: &ProxyToken) -> Option<jiff::Timestamp> {
    let issued = token.status.as_ref()?.issued_at.as_ref()?.0;
    let lifetime = parse_go_duration(&token.spec.duration).ok()?;
    issued.checked_add(jiff::SignedDuration::try_from(lifetime).ok()?).ok()
}

/// Whether the token's Secret has been written (`Issued=True`).
pub(crate) fn issued(token: &ProxyToken) -> bool {
    token.status.as_ref().is_some_and(|s| crate::api::is_true(&s.conditions, cond::ISSUED))
}

/// Minted (its hash is in status) but its Secret not written yet: it waits until every
/// proxy replica accepts the hash, so that a workload never reads a token some replica
/// would still refuse.
pub(crate) fn awaiting_secret(token: &ProxyToken) -> bool {
    token.status.as_ref().is_some_and(|s| s.token_hash.is_some()) && !issued(token)
}

/// Whether a token minted at `issuedAt` has waited for the replicas long enough.
fn mint_timed_out(token: &ProxyToken, now: jiff::Timestamp) -> bool {
    let issued_at = token.status.as_ref().and_then(|s| s.issued_at.as_ref()).map(|t| t.0);
    let limit = jiff::SignedDuration::try_from(MINT_PROPAGATION_TIMEOUT).unwrap_or_default();
    issued_at.and_then(|t| t.checked_add(limit).ok()).is_none_or(|deadline| now >= deadline)
}

/// Reason of a token whose Secret waits for the replicas.
const PROPAGATING: &str = "Propagating";

/// What the proxies route a token by changed between `old` and `new` (spec included).
fn routing_changed(token: &ProxyToken, old: &ProxyTokenStatus, new: &ProxyTokenStatus) -> bool {
    let revoked = |s: &ProxyTokenStatus| s.phase == Some(TokenPhase::Revoked);
    old.token_hash != new.token_hash
        || old.issued_at != new.issued_at
        || old.project_uid != new.project_uid
        || revoked(old) != revoked(new)
        || old.observed_generation != token.metadata.generation
}

/// The status for `verdict`, keeping what minting recorded; `issued`: the Secret is
/// written; `check`: what the replicas enforce of the token as observed. Returns the
/// status and whether it still waits for the replicas. Pure.
pub(crate) fn status_for(
    token: &ProxyToken,
    verdict: &Verdict,
    now: Time,
    issued: bool,
    check: &Check,
) -> (ProxyTokenStatus, bool) {
    let old = token.status.clone().unwrap_or_default();
    let mut conditions = Conditions::new(&old.conditions, token.metadata.generation, now);
    let secret = old.secret_name.clone().unwrap_or_default();
    let awaiting = old.token_hash.is_some() && !issued && verdict.phase == TokenPhase::Active;
    let verdict = if awaiting {
        &Verdict::new(
            TokenPhase::Pending,
            PROPAGATING,
            format!("Minted; Secret {secret} is written once every proxy replica accepts the token"),
        )
    } else {
        verdict
    };
    if issued {
        conditions.set(cond::ISSUED, ConditionStatus::True, "Minted", format!("Token minted into Secret {secret}"));
    } else {
        conditions.set(cond::ISSUED, ConditionStatus::False, verdict.reason, verdict.message.clone());
    }
    conditions.set(cond::READY, ConditionStatus::from_bool(verdict.ready), verdict.reason, verdict.message.clone());
    let mut status = ProxyTokenStatus {
        phase: Some(verdict.phase),
        expires_at: expires_at(token).map(crate::api::micros),
        observed_generation: token.metadata.generation,
        // The proxies own the usage fields; they are not part of the controller's apply.
        request_count: None,
        claimed_requests: None,
        last_used_at: None,
        usage_flushes: Vec::new(),
        current_minute: None,
        token_windows: Vec::new(),
        cost_windows: Vec::new(),
        ..old.clone()
    };
    let waiting = if status.token_hash.is_some() {
        super::set_enforced(&mut conditions, cond::ENFORCED, routing_changed(token, &old, &status), check)
    } else {
        false
    };
    status.conditions = conditions.finish();
    (status, waiting)
}

/// The Events for a phase change from `old` to `verdict`. Pure.
pub(crate) fn transition_events(
    old: Option<TokenPhase>,
    verdict: &Verdict,
    secret_name: &str,
    minted_now: bool,
) -> Vec<Audit> {
    if (old == Some(verdict.phase) && !minted_now) || verdict.reason == PROPAGATING {
        return Vec::new();
    }
    let issued = Audit::normal("Issued", "Mint", format!("Token minted into Secret {secret_name}"));
    let audit = match verdict.phase {
        // A token can end while its Secret waits for the replicas (a short duration, a
        // revocation): both are part of its history.
        TokenPhase::Revoked => Audit::normal("Revoked", "Revoke", verdict.message.clone()),
        TokenPhase::Expired => Audit::normal("Expired", "Expire", verdict.message.clone()),
        TokenPhase::Exhausted => Audit::warning("Exhausted", "Count", verdict.message.clone()),
        _ if minted_now => return vec![issued],
        TokenPhase::Active => Audit::normal("Usable", "Reconcile", "Token usable again"),
        TokenPhase::ProjectInactive | TokenPhase::Rejected | TokenPhase::Pending => {
            Audit::warning(verdict.reason, "Reconcile", verdict.message.clone())
        }
    };
    if minted_now { vec![issued, audit] } else { vec![audit] }
}

/// How often a token waiting for the replicas is looked at without a new report.
const RETRY_PROPAGATION: Duration = Duration::from_secs(1);

/// Reconciles one ProxyToken: fetch, decide, mint if admitted, publish the Secret once
/// every replica accepts the token, write.
pub(crate) async fn reconcile(token: Arc<ProxyToken>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = token.name_any();
    let namespace = token.namespace().unwrap_or_default();
    let project_name = &token.spec.project_ref.name;
    let now = jiff::Timestamp::now();
    let check = ctx.check(&[(Kind::Token, crate::index::resource_version(&token.metadata))]);
    // Waiting for the replicas costs no API call until a report or the deadline moves it.
    if awaiting_secret(&token) && !check.is_enforced() && !mint_timed_out(&token, now) {
        super::mark(&ctx.awaiting.tokens, &*token, true);
        return Ok(Action::requeue(RETRY_PROPAGATION));
    }
    // Read, not taken from the project controller's cache: a Project change triggers
    // this reconcile through another watch, and the cache may not hold that change yet
    // (a bulk revocation was then missed until the next requeue).
    let project = Api::<Project>::all(ctx.client.clone())
        .get_opt(project_name)
        .await
        .map_err(|source| Error::GetProject { name: project_name.clone(), source })?;

    // Checked on every reconcile, not only before minting: a namespace that loses its
    // grant loses its tokens' use (and gets it back with the grant).
    let allowed = match &project {
        Some(p) => grant::admits(p.spec.allowed_namespaces.as_ref(), &namespace_labels(&ctx, p, &namespace).await?),
        None => false,
    };
    let mut current = (*token).clone();
    let mut minted_now = false;
    if current.status.as_ref().and_then(|s| s.token_hash.as_ref()).is_none() {
        if let Err(verdict) = admit(&current, project.as_ref(), allowed) {
            return write(&ctx, &current, &verdict, project.as_ref(), false, &check).await;
        }
        // The cache may not show a mint written moments ago (by this replica, or by the
        // leader before it): read the token itself before minting, never mint twice.
        let fresh = Api::<ProxyToken>::namespaced(ctx.client.clone(), &namespace)
            .get(&name)
            .await
            .map_err(|source| Error::GetToken { name: format!("{namespace}/{name}"), source })?;
        if fresh.status.as_ref().is_some_and(|s| s.token_hash.is_some()) {
            return Ok(Action::requeue(RETRY_PROPAGATION));
        }
        match mint_if_free(&ctx, &current).await? {
            Mint::Conflict(verdict) => return write(&ctx, &current, &verdict, project.as_ref(), false, &check).await,
            Mint::New(plaintext) => return mint(&ctx, current, plaintext, project.as_ref(), allowed, &check).await,
        }
    } else if !issued(&current) {
        match publish(&ctx, &current).await? {
            Published::Written => minted_now = true,
            Published::Conflict(verdict) => {
                return write(&ctx, &current, &verdict, project.as_ref(), false, &check).await;
            }
            // The plaintext died with an earlier leader: nobody has seen it, mint afresh.
            Published::Lost => {
                return mint(&ctx, current, Token::mint()?, project.as_ref(), allowed, &check).await;
            }
        }
    }
    // Tokens minted before `projectUid` was recorded: bind them to their Project once.
    if let Some(bound) = bound_project(&current, project.as_ref())
        && let Some(status) = current.status.as_mut()
        && status.project_uid.is_none()
    {
        status.project_uid = bound.metadata.uid.clone();
    }
    let verdict = lifecycle(&current, project.as_ref(), allowed, now);
    let action = write(&ctx, &current, &verdict, project.as_ref(), minted_now, &check).await?;
    if minted_now {
        tracing::info!(namespace, name, project = %project_name, "token minted");
    }
    Ok(action)
}

/// Records a mint in `token`'s status. A re-mint (the plaintext of an earlier one died
/// with its leader before the Secret was written) keeps the Project uid, which the API
/// server holds fixed once set: the token stays bound to the Project it was minted for.
fn record(
    token: &mut ProxyToken,
    hash: TokenHash,
    secret_name: String,
    issued_at: jiff::Timestamp,
    project: Option<&Project>,
) {
    let status = token.status.get_or_insert_with(Default::default);
    status.token_hash = Some(hash.to_string());
    status.secret_name = Some(secret_name);
    status.issued_at = Some(crate::api::micros(issued_at));
    if status.project_uid.is_none() {
        status.project_uid = project.and_then(|p| p.metadata.uid.clone());
    }
}

/// Writes a fresh token's hash to status and keeps the plaintext until every replica
/// accepts the hash; the Secret follows then.
async fn mint(
    ctx: &Context,
    mut token: ProxyToken,
    plaintext: Token,
    project: Option<&Project>,
    namespace_allowed: bool,
    check: &Check,
) -> Result<Action, Error> {
    let secret_name = token.spec.secret_name.clone().unwrap_or_else(|| token.name_any());
    record(&mut token, plaintext.hash(), secret_name, jiff::Timestamp::now(), project);
    let uid = token.uid().unwrap_or_default();
    ctx.mints.lock().expect("mints poisoned").insert(uid.clone(), plaintext);
    let verdict = lifecycle(&token, project, namespace_allowed, jiff::Timestamp::now());
    match write(ctx, &token, &verdict, project, false, check).await {
        Ok(_) => Ok(Action::requeue(RETRY_PROPAGATION)),
        Err(error) => {
            ctx.mints.lock().expect("mints poisoned").remove(&uid);
            Err(error)
        }
    }
}

async fn namespace_labels(
    ctx: &Context,
    project: &Project,
    namespace: &str,
) -> Result<BTreeMap<String, String>, Error> {
    if !grant::needs_labels(project.spec.allowed_namespaces.as_ref()) {
        return Ok(BTreeMap::new());
    }
    let ns = Api::<Namespace>::all(ctx.client.clone())
        .get(namespace)
        .await
        .map_err(|source| Error::GetNamespace { name: namespace.to_string(), source })?;
    Ok(ns.metadata.labels.unwrap_or_default())
}

enum Mint {
    /// The Secret name is taken.
    Conflict(Verdict),
    /// A new token, not written anywhere yet.
    New(Token),
}

enum Published {
    Written,
    Conflict(Verdict),
    Lost,
}

fn secret_conflict(namespace: &str, secret_name: &str) -> Verdict {
    Verdict::new(
        TokenPhase::Rejected,
        "SecretConflict",
        format!(
            "Secret {namespace}/{secret_name} already exists and is not this token's: set spec.secretName to a free name"
        ),
    )
}

/// Mints a new token if the Secret name is free. A Secret that exists before the hash is
/// in status was not written by a mint of this token, whatever it holds or claims.
async fn mint_if_free(ctx: &Context, token: &ProxyToken) -> Result<Mint, Error> {
    let namespace = token.namespace().unwrap_or_default();
    let secret_name = token.spec.secret_name.clone().unwrap_or_else(|| token.name_any());
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &namespace);
    let existing = secrets.get_opt(&secret_name).await.map_err(|source| Error::TokenSecret {
        namespace: namespace.clone(),
        name: secret_name.clone(),
        source,
    })?;
    Ok(match existing {
        None => Mint::New(Token::mint()?),
        Some(_) => Mint::Conflict(secret_conflict(&namespace, &secret_name)),
    })
}

/// Writes the Secret of a token whose hash every replica accepts.
async fn publish(ctx: &Context, token: &ProxyToken) -> Result<Published, Error> {
    let namespace = token.namespace().unwrap_or_default();
    let status = token.status.clone().unwrap_or_default();
    let secret_name = status.secret_name.clone().unwrap_or_else(|| token.name_any());
    let hash = status.token_hash.as_deref().and_then(TokenHash::parse);
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &namespace);
    let err = |source| Error::TokenSecret { namespace: namespace.clone(), name: secret_name.clone(), source };

    if let Some(existing) = secrets.get_opt(&secret_name).await.map_err(err)? {
        // Written before the status said so (the status write was lost): keep it.
        let ours = existing.owner_references().iter().any(|o| Some(&o.uid) == token.uid().as_ref());
        return Ok(match ours.then(|| adoptable(&existing)).flatten() {
            Some(found) if Some(found) == hash => Published::Written,
            _ => Published::Conflict(secret_conflict(&namespace, &secret_name)),
        });
    }
    let uid = token.uid().unwrap_or_default();
    let plaintext = ctx.mints.lock().expect("mints poisoned").remove(&uid);
    let Some(plaintext) = plaintext.filter(|t| Some(t.hash()) == hash) else { return Ok(Published::Lost) };

    let base_url = format!("{}/v1", ctx.settings.proxy_url.trim_end_matches('/'));
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.0.to_string(), MANAGED_BY_LABEL.1.to_string()),
                (TOKEN_LABEL.to_string(), token.name_any()),
            ])),
            annotations: Some(BTreeMap::from([(TOKEN_HASH_ANNOTATION.to_string(), plaintext.hash().to_string())])),
            owner_references: token.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([
            (keys::OPENAI_API_KEY.to_string(), plaintext.expose().to_string()),
            (keys::OPENAI_BASE_URL.to_string(), base_url),
            (keys::TOKEN.to_string(), plaintext.expose().to_string()),
        ])),
        ..Default::default()
    };
    let params = PostParams { field_manager: Some(CONTROLLER_MANAGER.into()), ..PostParams::default() };
    match secrets.create(&params, &secret).await {
        Ok(_) => Ok(Published::Written),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Ok(Published::Conflict(secret_conflict(&namespace, &secret_name)))
        }
        Err(source) => {
            // Keep the plaintext for the next try.
            ctx.mints.lock().expect("mints poisoned").insert(uid, plaintext);
            Err(err(source))
        }
    }
}

/// The hash of a Secret an earlier mint of this token wrote, if it is intact.
fn adoptable(secret: &Secret) -> Option<TokenHash> {
    let recorded = TokenHash::parse(secret.annotations().get(TOKEN_HASH_ANNOTATION)?)?;
    let token = secret.data.as_ref()?.get(keys::TOKEN)?;
    let token = Token::parse(std::str::from_utf8(&token.0).ok()?).ok()?;
    (token.hash() == recorded).then_some(recorded)
}

/// Writes the status for `verdict` (when it changed), records Events, and says when
/// to look again (at expiry for a token that is still usable; soon while the replicas
/// catch up).
async fn write(
    ctx: &Context,
    token: &ProxyToken,
    verdict: &Verdict,
    project: Option<&Project>,
    minted_now: bool,
    check: &Check,
) -> Result<Action, Error> {
    let name = token.name_any();
    let namespace = token.namespace().unwrap_or_default();
    let is_issued = minted_now || issued(token);
    let (status, waiting) = status_for(token, verdict, Time(jiff::Timestamp::now()), is_issued, check);
    let old_phase = token.status.as_ref().and_then(|s| s.phase);
    let mut comparable = token.status.clone().unwrap_or_default();
    comparable.request_count = None;
    comparable.claimed_requests = None;
    comparable.current_minute = None;
    comparable.last_used_at = None;
    comparable.usage_flushes = Vec::new();
    comparable.token_windows = Vec::new();
    comparable.cost_windows = Vec::new();
    if comparable != status || token.status.is_none() {
        let patch = json!({
            "apiVersion": ProxyToken::api_version(&()),
            "kind": ProxyToken::kind(&()),
            "status": status,
        });
        Api::<ProxyToken>::namespaced(ctx.client.clone(), &namespace)
            .patch_status(&name, &PatchParams::apply(CONTROLLER_MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(|source| Error::PatchStatus { kind: "ProxyToken", name: format!("{namespace}/{name}"), source })?;
    }
    super::mark(&ctx.awaiting.tokens, token, waiting);
    let secret_name = status.secret_name.clone().unwrap_or_default();
    let written = Verdict::new(
        status.phase.unwrap_or(verdict.phase),
        if status.phase == Some(TokenPhase::Pending) && status.token_hash.is_some() {
            PROPAGATING
        } else {
            verdict.reason
        },
        verdict.message.clone(),
    );
    for event in transition_events(old_phase, &written, &secret_name, minted_now) {
        if let Some(project) = project
            && matches!(
                written.phase,
                TokenPhase::Active | TokenPhase::Revoked | TokenPhase::Expired | TokenPhase::Exhausted
            )
        {
            // The project's history lists its tokens' lives too (`kubectl describe project`).
            let mut on_project = event.clone();
            on_project.reason = format!("Token{}", event.reason);
            on_project.note = format!("{namespace}/{name}: {}", event.note);
            // Naming the token as the related object keeps each token's Events apart.
            on_project.related = Some(token.object_ref(&()));
            ctx.publish(project, on_project).await;
        }
        ctx.publish(token, event).await;
    }
    Ok(match (written.phase, status.expires_at) {
        _ if waiting => Action::requeue(RETRY_PROPAGATION.max(Duration::from_secs(5))),
        (TokenPhase::Active | TokenPhase::ProjectInactive | TokenPhase::Exhausted, Some(at)) => {
            let wait = at.0.duration_since(jiff::Timestamp::now()).unsigned_abs();
            Action::requeue(wait.min(Duration::from_secs(3600)) + Duration::from_millis(100))
        }
        // What blocks these can change without an event the controller watches (a
        // Secret freed by the garbage collector, a Namespace relabelled): look again.
        (TokenPhase::Pending | TokenPhase::Rejected, _) => Action::requeue(RETRY_BLOCKED),
        _ => Action::await_change(),
    })
}

#[cfg(test)]
mod tests;
