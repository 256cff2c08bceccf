//! Project lifecycle as the product promises it (issue 4), driven through the kube
//! client, kubectl and curl against a real controller and proxy: the four common
//! workflows, then one test per behaviour they do not cover.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use llm_proxy::api::{Project, ProjectPhase, ProxyToken, TokenPhase, project_conditions as cond};
use serde_json::json;
use support::{Env, TEST_KEY, TEST_LABEL, WAIT, eventually, token_spec};

const ROTATED_KEY: &str = "sk-test-ROTATED0123456789abcdefZZ99";

async fn merge(env: &Env, project: &str, patch: serde_json::Value) -> Result<Project, kube::Error> {
    Api::<Project>::all(env.client.clone())
        .patch(&env.scoped(project), &PatchParams::default(), &Patch::Merge(patch))
        .await
}

/// Waits until ProxyToken `name`'s `Ready` condition has `status`; its phase and that condition.
async fn token_ready(
    env: &Env,
    name: &str,
    status: &str,
) -> (Option<TokenPhase>, k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition) {
    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    eventually(WAIT, || async {
        let token_status = tokens.get(name).await.ok()?.status?;
        let ready = token_status.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == status)?;
        Some((token_status.phase, ready))
    })
    .await
}

async fn project(env: &Env, name: &str) -> Project {
    Api::<Project>::all(env.client.clone()).get(&env.scoped(name)).await.unwrap()
}

/// Waits until the proxy answers a chat request with `token` by `code` ("" for success).
async fn until_chat(env: &Env, token: &str, code: &str) -> support::CurlResponse {
    eventually(WAIT, || async {
        let response = env.chat(token).await;
        let got = if response.status == 200 { String::new() } else { response.error_code() };
        (got == code).then_some(response)
    })
    .await
}

/// Reasons of the Events recorded about the object named `name` (a ProxyToken in the
/// test's apps namespace, or a cluster-scoped Project), oldest first.
async fn event_reasons(env: &Env, name: &str) -> Vec<String> {
    let namespace = if name.starts_with(&env.id) { None } else { Some(env.apps.as_str()) };
    let events: Api<Event> = Api::all(env.client.clone());
    let mut found: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            let regarding = e.regarding.as_ref();
            regarding.and_then(|r| r.name.as_deref()) == Some(name)
                && regarding.and_then(|r| r.namespace.as_deref()).filter(|ns| !ns.is_empty()) == namespace
        })
        .collect();
    found.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    found.into_iter().filter_map(|e| e.reason).collect()
}

/// Waits for an Event `reason` about `name`; if it never comes, says which came instead
/// and what the controller logged.
async fn wait_event(env: &Env, name: &str, reason: &str) {
    let started = std::time::Instant::now();
    loop {
        let seen = event_reasons(env, name).await;
        if seen.iter().any(|r| r == reason) {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "no {reason} event about {name} within {WAIT:?}; its events: {seen:?}; the operator's logs:\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

// ---- The product's four common workflows -------------------------------------------

#[tokio::test]
async fn workflow_set_up_a_new_integration() {
    let env = Env::running("integrate").await;
    env.create_project("p").await;
    let token = env.minted("p", "app").await;
    let response = until_chat(&env, &token, "").await;
    assert_eq!(response.json()["choices"][0]["message"]["content"], "Hello from the fake upstream.");
    assert_eq!(env.upstream.requests()[0].header("authorization").unwrap(), format!("Bearer {TEST_KEY}"));
}

#[tokio::test]
async fn workflow_rotate_the_api_key() {
    let env = Env::running("rotate").await;
    env.create_project("p").await;
    let token = env.minted("p", "app").await;
    until_chat(&env, &token, "").await;

    env.put_key("p-key", ROTATED_KEY, "p").await;
    // The next requests carry the new key; the token did not change.
    eventually(WAIT, || async {
        assert_eq!(env.chat(&token).await.status, 200);
        let last = env.upstream.requests().pop()?;
        (last.header("authorization")? == format!("Bearer {ROTATED_KEY}")).then_some(())
    })
    .await;
    eventually(WAIT, || async {
        (project(&env, "p").await.status?.api_key_hint.as_deref() == Some("sk-…ZZ99")).then_some(())
    })
    .await;
    wait_event(&env, &env.scoped("p"), "APIKeyRotated").await;

    // Pointing the Project at another Secret works the same way.
    env.put_key("other-key", TEST_KEY, "p").await;
    merge(&env, "p", json!({ "spec": { "apiKeySecretRef": { "name": "other-key" } } })).await.unwrap();
    eventually(WAIT, || async {
        assert_eq!(env.chat(&token).await.status, 200);
        let last = env.upstream.requests().pop()?;
        (last.header("authorization")? == format!("Bearer {TEST_KEY}")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn workflow_decommission() {
    let env = Env::running("decommission").await;
    env.create_project("p").await;
    env.install_deletion_policy("p").await;
    let token = env.minted("p", "app").await;

    merge(&env, "p", json!({ "spec": { "active": false } })).await.unwrap();
    until_chat(&env, &token, "project_inactive").await;
    merge(&env, "p", json!({ "spec": { "tokensNotBefore": now_rfc3339() } })).await.unwrap();
    env.wait_token("app", TokenPhase::Revoked).await;

    let output = support::run_kubectl(&["delete", "project", &env.scoped("p")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("Projects cannot be deleted") && stderr.contains("\"active\":false"), "{stderr}");

    let listed = project(&env, "p").await;
    assert!(listed.metadata.deletion_timestamp.is_none());
    assert_eq!(listed.status.unwrap().phase, Some(ProjectPhase::Inactive));
}

#[tokio::test]
async fn workflow_respond_to_a_security_incident() {
    let env = Env::running("incident").await;
    env.create_project("p").await;
    let old = env.minted("p", "old").await;
    until_chat(&env, &old, "").await;

    merge(&env, "p", json!({ "spec": { "active": false } })).await.unwrap();
    until_chat(&env, &old, "project_inactive").await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // tokensNotBefore has second precision
    merge(&env, "p", json!({ "spec": { "tokensNotBefore": now_rfc3339() } })).await.unwrap();
    env.put_key("p-key", ROTATED_KEY, "p").await;
    merge(&env, "p", json!({ "spec": { "active": true } })).await.unwrap();

    // The old token stays refused; a new one works with the new key.
    until_chat(&env, &old, "token_revoked").await;
    env.wait_token("old", TokenPhase::Revoked).await;
    let fresh = env.minted("p", "fresh").await;
    until_chat(&env, &fresh, "").await;
    let last = env.upstream.requests().pop().unwrap();
    assert_eq!(last.header("authorization").unwrap(), format!("Bearer {ROTATED_KEY}"));
    assert_eq!(env.chat(&old).await.error_code(), "token_revoked");

    // Nothing secret went anywhere it should not: logs, Events, statuses.
    let mut haystack = env.logs();
    for event in Api::<Event>::all(env.client.clone()).list(&ListParams::default()).await.unwrap() {
        haystack.push_str(&serde_json::to_string(&event).unwrap());
    }
    haystack.push_str(&serde_json::to_string(&project(&env, "p").await).unwrap());
    for token in
        Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps).list(&ListParams::default()).await.unwrap()
    {
        haystack.push_str(&serde_json::to_string(&token).unwrap());
    }
    assert!(haystack.contains("\"path\":\"/v1/chat/completions\""), "the access log was searched");
    for secret in [TEST_KEY, ROTATED_KEY, old.as_str(), fresh.as_str()] {
        assert!(!haystack.contains(secret), "a secret leaked");
        assert!(!haystack.contains(&secret[..12]), "the first 12 characters of a secret leaked");
    }
}

// ---- Behaviours the workflows do not cover -------------------------------------------

#[tokio::test]
async fn projects_start_active_and_kubectl_filters_by_status_and_name() {
    let env = Env::running("filter").await;
    env.create_project("on").await;
    env.create_project("off").await;
    merge(&env, "off", json!({ "spec": { "active": false } })).await.unwrap();
    eventually(WAIT, || async {
        (project(&env, "off").await.status?.phase == Some(ProjectPhase::Inactive)).then_some(())
    })
    .await;
    assert!(project(&env, "on").await.spec.active);

    let kubectl = |args: &[&str]| String::from_utf8(support::run_kubectl(args).stdout).unwrap();
    let selector = format!("{TEST_LABEL}={}", env.id);
    let names = |phase: &str| -> BTreeSet<String> {
        kubectl(&[
            "get",
            "projects",
            "-l",
            &selector,
            "--field-selector",
            &format!("status.phase={phase}"),
            "-o",
            "name",
        ])
        .lines()
        .map(str::to_string)
        .collect()
    };
    assert_eq!(names("Active"), BTreeSet::from([format!("project.llmproxy.io/{}", env.scoped("on"))]));
    assert_eq!(names("Inactive"), BTreeSet::from([format!("project.llmproxy.io/{}", env.scoped("off"))]));
    assert!(kubectl(&["get", "project", &env.scoped("on")]).contains("Active"));
}

#[tokio::test]
async fn deactivation_refuses_and_stops_minting_without_revoking() {
    let env = Env::running("deactivate").await;
    env.create_project("p").await;
    let token = env.minted("p", "existing").await;
    merge(&env, "p", json!({ "spec": { "active": false } })).await.unwrap();
    let refused = until_chat(&env, &token, "project_inactive").await;
    assert_eq!(refused.status, 403);

    env.create_token("new", token_spec(&env.scoped("p"))).await;
    let new = env.wait_token("new", TokenPhase::ProjectInactive).await;
    let issued = new.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Issued").unwrap();
    assert_eq!(
        (issued.status.as_str(), issued.message.as_str()),
        ("False", "Cannot generate tokens for inactive project")
    );
    assert!(Api::<Secret>::namespaced(env.client.clone(), &env.apps).get_opt("new").await.unwrap().is_none());
    wait_event(&env, "new", "ProjectInactive").await;
    let existing = env.wait_token("existing", TokenPhase::ProjectInactive).await;
    assert!(!existing.spec.revoked);

    merge(&env, "p", json!({ "spec": { "active": true } })).await.unwrap();
    until_chat(&env, &token, "").await;
    env.wait_token("existing", TokenPhase::Active).await;
    env.wait_token("new", TokenPhase::Active).await;
    wait_event(&env, &env.scoped("p"), "Activated").await;
}

/// A grant is checked for the token's whole life, not only when it is minted: the
/// namespace that loses it (its labels change, or the Project narrows its selector) is
/// refused on its next request and its tokens say why in status; the grant coming back
/// makes them usable again (it is not a revocation).
#[tokio::test]
async fn a_namespace_that_loses_its_grant_loses_its_tokens_until_the_grant_returns() {
    let env = Env::running("grant").await;
    let label = |value: Option<&'static str>| {
        let apps = Api::<k8s_openapi::api::core::v1::Namespace>::all(env.client.clone());
        let name = env.apps.clone();
        async move {
            let patch = json!({ "metadata": { "labels": { "team": value } } });
            apps.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        }
    };
    label(Some("ml")).await;
    env.create_project("p").await;
    let by_team = |team: &str| {
        json!({ "spec": { "allowedNamespaces": {
        "from": "Selector", "selector": { "matchLabels": { "team": team } } } } })
    };
    merge(&env, "p", by_team("ml")).await.unwrap();
    let token = env.minted("p", "web").await;
    until_chat(&env, &token, "").await;

    // The namespace loses its label.
    label(None).await;
    let refused = until_chat(&env, &token, "namespace_not_allowed").await;
    assert_eq!(refused.status, 403);
    assert!(refused.body.contains("spec.allowedNamespaces"), "{}", refused.body);
    let web = env.wait_token("web", TokenPhase::Rejected).await;
    let ready = web.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap().clone();
    assert_eq!(ready.reason, "NamespaceNotAllowed");
    assert!(ready.message.contains(&env.apps) && ready.message.contains("the token is kept"), "{}", ready.message);
    assert!(!web.spec.revoked);
    wait_event(&env, "web", "NamespaceNotAllowed").await;

    // It comes back: the same token works again.
    label(Some("ml")).await;
    until_chat(&env, &token, "").await;
    env.wait_token("web", TokenPhase::Active).await;

    // The Project narrows its grant, then restores it.
    merge(&env, "p", by_team("web")).await.unwrap();
    until_chat(&env, &token, "namespace_not_allowed").await;
    env.wait_token("web", TokenPhase::Rejected).await;
    merge(&env, "p", by_team("ml")).await.unwrap();
    until_chat(&env, &token, "").await;
    env.wait_token("web", TokenPhase::Active).await;
}

/// Whoever may write Projects cannot send a key anywhere: a key goes only to the Projects
/// its Secret names, and the Secret is written by whoever manages the operator's namespace.
#[tokio::test]
async fn a_project_gets_only_a_key_whose_secret_names_it() {
    let env = Env::running("keybind").await;
    env.create_project("p").await;
    let token = env.minted("p", "app").await;
    until_chat(&env, &token, "").await;

    // Another Project names p's Secret: refused, and nothing is forwarded with that key.
    env.create_project("q").await;
    let q_token = env.minted("q", "q-app").await;
    until_chat(&env, &q_token, "").await;
    merge(&env, "q", json!({ "spec": { "apiKeySecretRef": { "name": "p-key" } } })).await.unwrap();
    let refused = until_chat(&env, &q_token, "project_key_invalid").await;
    assert_eq!(refused.status, 503);
    let ready = eventually(WAIT, || async {
        let status = project(&env, "q").await.status?;
        let ready = status.conditions.iter().find(|c| c.type_ == cond::READY)?.clone();
        (ready.reason == "SecretNotBound").then_some(ready)
    })
    .await;
    assert!(
        ready.message.contains("kubectl annotate secret") && ready.message.contains("llmproxy.io/projects"),
        "{}",
        ready.message
    );
    wait_event(&env, &env.scoped("q"), "SecretNotBound").await;
    let forwarded = env.upstream.requests().len();
    assert_eq!(env.chat(&q_token).await.error_code(), "project_key_invalid");
    assert_eq!(env.upstream.requests().len(), forwarded, "nothing went upstream with p's key for q");
    until_chat(&env, &token, "").await;

    // The Secret's manager names q too: q is served with it.
    env.put_key("p-key", TEST_KEY, "p").await;
    let secrets = Api::<Secret>::namespaced(env.client.clone(), &env.ops);
    let both = format!("{}, {}", env.scoped("p"), env.scoped("q"));
    let patch = json!({ "metadata": { "annotations": { "llmproxy.io/projects": both } } });
    secrets.patch("p-key", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    until_chat(&env, &q_token, "").await;

    // A Secret without the key label is not a key Secret, whatever it names.
    let patch = json!({ "metadata": { "labels": { "llmproxy.io/api-key": null } } });
    secrets.patch("p-key", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    until_chat(&env, &token, "project_key_invalid").await;
}

#[tokio::test]
async fn an_invalid_or_missing_key_is_reported_and_never_forwarded() {
    let env = Env::running("badkey").await;
    env.create_project("p").await;
    let token = env.minted("p", "app").await;
    until_chat(&env, &token, "").await;
    let before = env.upstream.requests().len();

    env.put_key("p-key", "sk-short", "p").await;
    let refused = until_chat(&env, &token, "project_key_invalid").await;
    assert_eq!(refused.status, 503);
    let status = eventually(WAIT, || async {
        let status = project(&env, "p").await.status?;
        let valid = status.conditions.iter().find(|c| c.type_ == cond::API_KEY_VALID)?.clone();
        (valid.status == "False").then_some(valid)
    })
    .await;
    assert_eq!((status.reason.as_str(), status.message.as_str()), ("InvalidAPIKeyFormat", "Invalid API key format"));
    wait_event(&env, &env.scoped("p"), "InvalidAPIKeyFormat").await;
    assert_eq!(env.upstream.requests().len(), before, "nothing was forwarded with the bad key");
    // The token is not Ready meanwhile (`kubectl wait --for=condition=Ready` holds), and
    // says why; it stays Active: nothing about it needs changing.
    let (phase, ready) = token_ready(&env, "app", "False").await;
    assert_eq!((phase, ready.reason.as_str()), (Some(TokenPhase::Active), "ProjectKeyInvalid"));
    assert!(ready.message.contains("InvalidAPIKeyFormat") && ready.message.contains("503"), "{}", ready.message);
    env.put_key("p-key", TEST_KEY, "p").await;
    until_chat(&env, &token, "").await;
    token_ready(&env, "app", "True").await;

    Api::<Secret>::namespaced(env.client.clone(), &env.ops).delete("p-key", &DeleteParams::default()).await.unwrap();
    until_chat(&env, &token, "project_key_invalid").await;
    eventually(WAIT, || async {
        let status = project(&env, "p").await.status?;
        status.conditions.iter().any(|c| c.type_ == cond::API_KEY_VALID && c.reason == "SecretNotFound").then_some(())
    })
    .await;

    // Every listing shows at a glance that it does not serve, and why.
    let name = env.scoped("p");
    let row = |args: &[&str]| {
        let out = support::run_kubectl(args);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let header: Vec<String> = text
            .lines()
            .next()
            .unwrap_or_default()
            .split("  ")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let line = text.lines().find(|l| l.starts_with(&name)).unwrap_or_else(|| panic!("{text}")).to_string();
        (header, line)
    };
    let (header, line) = row(&["get", "projects", &name]);
    assert_eq!(header, ["NAME", "DISPLAY NAME", "STATUS", "READY", "REASON", "TOKENS", "AGE"]);
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert!(cells.windows(3).any(|w| w == ["Active", "False", "SecretNotFound"]), "{line}");
    let (_, wide) = row(&["get", "projects", &name, "-o", "wide"]);
    assert!(wide.contains(&format!("Secret {}/p-key not found: create it", env.ops)), "{wide}");
    assert!(wide.contains("503 project_key_invalid"), "{wide}");
}

#[tokio::test]
async fn bulk_revocation_is_immediate_and_cannot_be_undone() {
    let env = Env::running("bulk").await;
    env.create_project("p").await;
    let a = env.minted("p", "a").await;
    let b = env.minted("p", "b").await;
    until_chat(&env, &a, "").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cut = now_rfc3339();
    merge(&env, "p", json!({ "spec": { "tokensNotBefore": cut } })).await.unwrap();
    until_chat(&env, &a, "token_revoked").await;
    assert_eq!(env.chat(&b).await.error_code(), "token_revoked");
    env.wait_token("a", TokenPhase::Revoked).await;
    env.wait_token("b", TokenPhase::Revoked).await;
    wait_event(&env, &env.scoped("p"), "TokensRevoked").await;

    let back = jiff::Timestamp::now().checked_sub(jiff::SignedDuration::from_hours(1)).unwrap().to_string();
    let error = merge(&env, "p", json!({ "spec": { "tokensNotBefore": back } })).await.unwrap_err().to_string();
    assert!(error.contains("tokensNotBefore cannot be removed or moved back"), "{error}");
    let error = merge(&env, "p", json!({ "spec": { "tokensNotBefore": null } })).await.unwrap_err().to_string();
    assert!(error.contains("tokensNotBefore cannot be removed or moved back"), "{error}");
}

#[tokio::test]
async fn without_the_policy_the_finalizer_keeps_a_deleted_project() {
    let env = Env::running("finalizer").await;
    env.create_project("p").await;
    let token = env.minted("p", "app").await;
    until_chat(&env, &token, "").await;
    eventually(WAIT, || async { (!project(&env, "p").await.finalizers().is_empty()).then_some(()) }).await;

    let projects: Api<Project> = Api::all(env.client.clone());
    projects.delete(&env.scoped("p"), &DeleteParams::default()).await.unwrap();
    until_chat(&env, &token, "project_inactive").await;
    let kept = eventually(WAIT, || async {
        let p = project(&env, "p").await;
        let status = p.status.clone()?;
        status.conditions.iter().any(|c| c.type_ == cond::DELETION_BLOCKED && c.status == "True").then_some(p)
    })
    .await;
    let status = kept.status.unwrap();
    assert_eq!(status.phase, Some(ProjectPhase::Inactive));
    assert_eq!(status.tokens.unwrap().total, 1, "its tokens stay on record");
    wait_event(&env, &env.scoped("p"), "DeletionBlocked").await;
    // The token itself is not revoked: only refused while the project is inactive.
    assert!(!Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps).get("app").await.unwrap().spec.revoked);

    // The documented escape hatch for a cluster admin: remove the finalizer by hand.
    projects
        .patch(&env.scoped("p"), &PatchParams::default(), &Patch::Merge(json!({ "metadata": { "finalizers": null } })))
        .await
        .unwrap();
    eventually(WAIT, || async { projects.get_opt(&env.scoped("p")).await.unwrap().is_none().then_some(()) }).await;

    // Gone: its tokens can never be used again, and say so.
    let refused = until_chat(&env, &token, "project_deleted").await;
    assert_eq!(refused.status, 401);
    assert!(
        refused.json()["error"]["message"].as_str().unwrap().contains("Create a new ProxyToken"),
        "{:?}",
        refused.json()
    );
    let revoked = env.wait_token("app", TokenPhase::Revoked).await;
    let ready = revoked.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason, "ProjectDeleted");

    // Created again under the same name, with the same key: a new object, which does not
    // inherit the old token. Its own tokens work.
    env.create_project("p").await;
    let fresh = env.minted("p", "fresh").await;
    until_chat(&env, &fresh, "").await;
    assert_eq!(env.chat(&token).await.error_code(), "project_deleted");
    let counted = eventually(WAIT, || async {
        let tokens = project(&env, "p").await.status?.tokens?;
        (tokens.active == 1).then_some(tokens)
    })
    .await;
    assert_eq!(counted.total, 1, "the old project's token is not this project's");
    assert_eq!(env.wait_token("app", TokenPhase::Revoked).await.status.unwrap().phase, Some(TokenPhase::Revoked));
}

#[tokio::test]
async fn kubectl_describe_shows_the_details_view() {
    let env = Env::running("describe").await;
    env.create_project("p").await;
    env.minted("p", "one").await;
    env.minted("p", "two").await;
    eventually(WAIT, || async { (project(&env, "p").await.status?.tokens?.total == 2).then_some(()) }).await;
    wait_event(&env, &env.scoped("p"), "TokenIssued").await;
    let output = support::run_kubectl(&["describe", "project", &env.scoped("p")]);
    let text = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "Display Name:  Test p",
        "Creation Timestamp:",
        "API Key Hint:",
        "sk-…Ab12",
        "Phase:",
        "Active",
        "Recent Tokens:",
        "Total:",
        "Events:",
        "Created",
        "TokenIssued",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(!text.contains(&TEST_KEY[..12]));
}

#[tokio::test]
async fn audit_events_name_what_changed() {
    let env = Env::running("audit").await;
    env.create_project("p").await;
    env.minted("p", "app").await;
    merge(&env, "p", json!({ "spec": { "active": false } })).await.unwrap();
    wait_event(&env, &env.scoped("p"), "Deactivated").await;
    merge(&env, "p", json!({ "spec": { "active": true } })).await.unwrap();
    wait_event(&env, &env.scoped("p"), "Activated").await;
    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    tokens.patch("app", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "revoked": true } }))).await.unwrap();
    wait_event(&env, "app", "Revoked").await;
    let mut short = token_spec(&env.scoped("p"));
    short.duration = "1s".into();
    env.create_token("short", short).await;
    wait_event(&env, "short", "Expired").await;

    let project_history = event_reasons(&env, &env.scoped("p")).await;
    for reason in ["Created", "TokenIssued", "Deactivated", "Activated", "TokenRevoked", "TokenExpired"] {
        assert!(project_history.iter().any(|r| r == reason), "{reason} missing from {project_history:?}");
    }
    assert_eq!(event_reasons(&env, "app").await, ["Issued", "ProjectInactive", "Usable", "Revoked"]);
}
