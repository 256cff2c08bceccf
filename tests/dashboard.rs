//! The dashboard (`kubectl llmproxy dashboard`) in a real headless browser: every workflow
//! of the admin guide clicked through against a real controller and proxy, and the
//! local web server's defences tried from outside.
//!
//! The control plane is this binary's own: the controller and the proxy handle every
//! object, so Projects are made the way a person makes them here (through the form,
//! unlabelled), not the way the other tests label theirs.

mod support;

use std::sync::Once;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use llm_proxy::api::{Project, ProjectPhase, TokenPhase};
use support::{Browser, Dashboard, Env, TEST_KEY, WAIT, curl_with_headers, eventually};

/// The key the project's key is rotated to.
const NEW_KEY: &str = "sk-test-ROTATED0123456789abcdefXy98";

fn own_cluster() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| support::use_private_cluster(&[]));
}

async fn phase(projects: &Api<Project>, name: &str) -> Option<ProjectPhase> {
    projects.get(name).await.ok()?.status?.phase
}

#[tokio::test]
async fn every_workflow_of_the_admin_guide_in_a_browser() {
    own_cluster();
    let mut env = Env::new("dashboard").await;
    env.handle_every_object();
    env.start_controller();
    env.start_proxy().await;
    let dashboard = Dashboard::start(&env);
    let browser = Browser::start().await;
    let projects: Api<Project> = Api::all(env.client.clone());
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ops);
    let name = format!("{}-production", env.id);

    // Signing in: the printed address sets the session and leaves no code in the address bar.
    browser.go(&dashboard.login_url).await;
    assert_eq!(browser.url().await, format!("{}/", dashboard.base));
    assert!(browser.text().await.contains("New Project"));

    // New Project with a bad key: the guide's message, and nothing is created.
    browser.click("New Project").await;
    browser.fill("#name", &name).await;
    browser.fill("#display_name", "Production API").await;
    browser.fill("#api_key", "not-a-key").await;
    browser.fill("#upstream", &env.upstream.url).await;
    browser.choose("#allowed", "all").await;
    browser.click("Create project").await;
    assert_eq!(browser.text_of(".field-error").await, "Invalid API key format");
    browser.screenshot("new-project-invalid-key").await;
    assert!(projects.get_opt(&name).await.unwrap().is_none());
    assert!(secrets.get_opt(&format!("{name}-api-key")).await.unwrap().is_none());

    // ...and with a good one: the Project and its key Secret, bound to it.
    browser.fill("#api_key", TEST_KEY).await;
    browser.click("Create project").await;
    assert_eq!(browser.url().await, format!("{}/projects/{name}?done=created", dashboard.base));
    browser.wait_for("dl.facts", "Serving\nyes").await;
    let page = browser.text().await;
    assert!(page.contains("Production API") && page.contains("sk-…Ab12") && page.contains("all namespaces"), "{page}");
    assert!(!browser.source().await.contains(TEST_KEY), "the key is never shown");
    let project = projects.get(&name).await.unwrap();
    assert_eq!(project.spec.display_name.as_deref(), Some("Production API"));
    let secret = secrets.get(&project.spec.api_key_secret_ref.name).await.unwrap();
    assert_eq!(secret.metadata.annotations.unwrap()[llm_proxy::api::KEY_PROJECTS_ANNOTATION], name);
    let managers: Vec<_> = project.metadata.managed_fields.unwrap().into_iter().filter_map(|f| f.manager).collect();
    assert!(managers.contains(&"kubectl-llmproxy-dashboard".to_string()), "{managers:?}");
    browser.screenshot("project").await;

    // Generate token: shown once, the same value as the Secret, never in an address.
    browser.click("Generate token").await;
    browser.screenshot("generate-token").await;
    browser.fill("#namespace", &env.apps).await;
    browser.fill("#token_name", "web").await;
    browser.fill("#max_requests", "100").await;
    browser.click("Generate token").await;
    let token = browser.text_of("#token").await;
    assert!(token.starts_with(llm_proxy::token::PREFIX) && token.len() == llm_proxy::token::TOKEN_LEN, "{token}");
    assert_eq!(env.token_secret("web").await["token"], token);
    let page = browser.text().await;
    assert!(page.contains("from openai import OpenAI") && page.contains("curl ") && page.contains("new OpenAI("));
    assert!(!browser.url().await.contains(&token));
    browser.screenshot("token-generated").await;
    assert_eq!(env.chat(&token).await.status, 200);
    let seen = env.upstream.last_request().unwrap();
    assert_eq!(seen.header("authorization"), Some(format!("Bearer {TEST_KEY}")));

    // The API server's refusal reaches the page verbatim (the CRD's CEL rule).
    browser.go(&format!("{}/projects/{name}/tokens/new", dashboard.base)).await;
    browser.fill("#namespace", &env.apps).await;
    browser.fill("#token_name", "too-long").await;
    browser.fill("#duration", "9000h").await;
    browser.click("Generate token").await;
    let page = browser.text().await;
    assert!(page.contains("duration must be more than 0s and at most 8760h (one year), e.g. 720h"), "{page}");
    browser.screenshot("token-refused").await;

    // Rotate the key: a bad one is refused; a good one reaches the upstream, tokens untouched.
    let hash_before = env.wait_token("web", TokenPhase::Active).await.status.unwrap().token_hash;
    browser.go(&format!("{}/projects/{name}", dashboard.base)).await;
    browser.click("Rotate key").await;
    browser.screenshot("rotate-key").await;
    browser.fill("#api_key", "sk-nope").await;
    browser.click("Rotate key").await;
    assert_eq!(browser.text_of(".field-error").await, "Invalid API key format");
    browser.fill("#api_key", NEW_KEY).await;
    browser.click("Rotate key").await;
    assert!(browser.text().await.contains("Key rotated. Tokens are unchanged"));
    browser.wait_for("dl.facts", "sk-…Xy98").await;
    eventually(WAIT, || async {
        (env.chat(&token).await.status == 200).then_some(())?;
        let seen = env.upstream.last_request()?;
        (seen.header("authorization") == Some(format!("Bearer {NEW_KEY}"))).then_some(())
    })
    .await;
    assert_eq!(env.token_secret("web").await["token"], token);
    assert_eq!(env.wait_token("web", TokenPhase::Active).await.status.unwrap().token_hash, hash_before);

    // Deactivate: refused at the proxy, not revoked; no new tokens; the audit log says why.
    browser.click("Deactivate").await;
    assert!(browser.text().await.contains("Project deactivated"));
    eventually(WAIT, || async { (phase(&projects, &name).await == Some(ProjectPhase::Inactive)).then_some(()) }).await;
    eventually(WAIT, || async { (env.chat(&token).await.error_code() == "project_inactive").then_some(()) }).await;
    let audit = browser.wait_for("table.events", "Deactivated").await;
    assert!(audit.contains("Project deactivated"), "{audit}");
    browser.screenshot("project-inactive").await;
    browser.click("Generate token").await;
    browser.fill("#namespace", &env.apps).await;
    browser.fill("#token_name", "while-inactive").await;
    browser.click("Generate token").await;
    let page = browser.text().await;
    assert!(page.contains("Cannot generate tokens for inactive project"), "{page}");

    // Activate: the same token works again.
    browser.go(&format!("{}/projects/{name}", dashboard.base)).await;
    browser.click("Activate").await;
    eventually(WAIT, || async { (env.chat(&token).await.status == 200).then_some(()) }).await;

    // Edit the display name.
    browser.click("Edit").await;
    browser.screenshot("edit-project").await;
    browser.fill("#display_name", "Production API (EU)").await;
    browser.click("Save").await;
    assert!(browser.text().await.contains("Production API (EU)"));
    assert_eq!(projects.get(&name).await.unwrap().spec.display_name.as_deref(), Some("Production API (EU)"));

    // The list: search by name, filter by status.
    browser.go(&format!("{}/?q={}", dashboard.base, env.id)).await;
    let page = browser.text_of("#projects").await;
    assert!(page.contains(&name) && page.contains("Production API (EU)") && page.contains("Active"), "{page}");
    browser.screenshot("projects").await;
    browser.go(&format!("{}/?q={}&status=Inactive", dashboard.base, env.id)).await;
    assert!(!browser.text_of("#projects").await.contains(&name));

    // Revoke one token, after a confirmation.
    browser.go(&format!("{}/projects/{name}/tokens", dashboard.base)).await;
    assert!(browser.text_of("#tokens").await.contains(&format!("{}/web", env.apps)));
    browser.screenshot("tokens").await;
    browser.click("Revoke").await;
    assert!(browser.text().await.contains("This cannot be undone"));
    browser.screenshot("confirm-revoke-token").await;
    browser.click("Revoke token").await;
    assert!(browser.text().await.contains("Token revoked"));
    eventually(WAIT, || async { (env.chat(&token).await.error_code() == "token_revoked").then_some(()) }).await;
    browser.wait_for("h1", "Revoked").await;
    browser.screenshot("token").await;

    // Revoke all: a second token ends too, after the warning that it cannot be undone.
    browser.go(&format!("{}/projects/{name}/tokens/new", dashboard.base)).await;
    browser.fill("#namespace", &env.apps).await;
    browser.fill("#token_name", "worker").await;
    browser.click("Generate token").await;
    let worker = browser.text_of("#token").await;
    assert_eq!(env.chat(&worker).await.status, 200);
    browser.click(&format!("Back to {name}")).await;
    browser.click("Revoke all tokens").await;
    assert!(browser.text().await.contains("cannot be undone"));
    browser.screenshot("confirm-revoke-all").await;
    browser.click("Revoke all tokens").await;
    assert!(browser.text().await.contains("Every token of this project issued until now is revoked"));
    assert!(projects.get(&name).await.unwrap().spec.tokens_not_before.is_some());
    eventually(WAIT, || async { (env.chat(&worker).await.error_code() == "token_revoked").then_some(()) }).await;
    env.wait_token("worker", TokenPhase::Revoked).await;

    // No delete button: the page explains deactivation instead.
    let page = browser.text().await;
    assert!(page.contains("Projects are never deleted") && page.contains("deactivate it"), "{page}");
    assert!(!page.lines().any(|line| line.trim() == "Delete"), "{page}");

    // A Project that Argo CD manages is marked, and the page warns that edits are reverted.
    let gitops = format!("{}-gitops", env.id);
    let mut applied = env.project("gitops");
    applied.metadata.name = Some(gitops.clone());
    applied.metadata.labels = None;
    applied.metadata.managed_fields = None;
    applied.status = None;
    let applied = serde_json::to_value(&applied).unwrap();
    let argo = PatchParams::apply("argocd-controller").force();
    projects.patch(&gitops, &argo, &Patch::Apply(&applied)).await.unwrap();
    browser.go(&format!("{}/projects/{gitops}", dashboard.base)).await;
    let page = browser.text().await;
    assert!(page.contains("Managed by Argo CD: a change made here is reverted by its next sync"), "{page}");
    browser.screenshot("project-gitops").await;

    // Nothing secret in the dashboard's log: no key, no token.
    let logged = dashboard.logged();
    assert!(logged.contains("POST /projects/new"), "{logged}");
    for secret in [TEST_KEY, NEW_KEY, token.as_str(), worker.as_str()] {
        assert!(!logged.contains(secret), "the log holds a secret:\n{logged}");
    }
}

#[tokio::test]
async fn the_local_server_refuses_other_sites_and_strangers() {
    own_cluster();
    let env = Env::new("dashboard-guard").await;
    let dashboard = Dashboard::start(&env);
    let projects: Api<Project> = Api::all(env.client.clone());
    let name = env.scoped("guarded");
    let mut project = env.project("guarded");
    project.metadata.name = Some(name.clone());
    projects.create(&Default::default(), &project).await.unwrap();
    let page = format!("{}/projects/{name}", dashboard.base);

    // Without the session: nothing, however the request is made.
    let (response, headers) = curl_with_headers("GET", &page, &[], None).await;
    assert_eq!(response.status, 401);
    assert!(response.body.contains("open the address that `kubectl llmproxy dashboard` printed"));
    assert!(!response.body.contains(&name));
    // The headers a careful web app sets, on every answer.
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_default();
    assert!(header("content-security-policy").contains("frame-ancestors 'none'"));
    assert!(header("content-security-policy").contains("default-src 'none'"));
    assert_eq!(header("x-frame-options"), "DENY");
    assert_eq!(header("x-content-type-options"), "nosniff");
    assert_eq!(header("cache-control"), "no-store");
    assert_eq!(header("referrer-policy"), "same-origin");

    // A browser signs in once; the sign-in address does not work twice.
    let browser = Browser::start().await;
    browser.go(&dashboard.login_url).await;
    let (again, _) = curl_with_headers("GET", &dashboard.login_url, &[], None).await;
    assert_eq!(again.status, 403, "{}", again.body);

    // DNS rebinding: a page of evil.example (resolving to 127.0.0.1) reaches the port with
    // its own Host name, and is refused.
    let host = format!("evil.example:{}", dashboard.port);
    let (rebound, _) = curl_with_headers("GET", &page, &[("host", &host)], None).await;
    assert_eq!(rebound.status, 421);

    // Cross-site request forgery, from a page of another origin (127.0.0.1 on another
    // port: the same site for cookies) in the signed-in browser: a form that would
    // deactivate the project, clicked. The dashboard refuses; the project stays active.
    let attacker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let attacker_url = format!("http://127.0.0.1:{}/", attacker.local_addr().unwrap().port());
    let form = format!(
        "<!DOCTYPE html><title>win a prize</title><form method=post action='{page}/active'>\
         <input type=hidden name=active value=false><input type=hidden name=csrf value=guess>\
         <button>Claim</button></form>"
    );
    let frame =
        format!("<!DOCTYPE html><title>framed</title><iframe id=victim src='{page}' width=800 height=600></iframe>");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut stream, _)) = attacker.accept().await else { return };
            let mut buffer = [0u8; 4096];
            let read = stream.read(&mut buffer).await.unwrap_or(0);
            let html = if buffer[..read].starts_with(b"GET /frame") { &frame } else { &form };
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
                html.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    browser.go(&attacker_url).await;
    browser.click("Claim").await;
    let refused = browser.text().await;
    assert!(refused.contains("Refused: this change was sent from another site"), "{refused}");
    assert!(projects.get(&name).await.unwrap().spec.active, "the forged form changed nothing");

    // The page itself works in that browser (so the refusal above was the guard's).
    browser.go(&page).await;
    assert!(browser.text().await.contains(&name));
    assert!(!browser.source().await.contains("<script"), "pages have no scripts");

    // Framing (clickjacking): another site's page embeds the dashboard; the browser
    // shows nothing of it, since the dashboard forbids being framed.
    browser.go(&format!("{attacker_url}frame")).await;
    let victim = browser.client.find(fantoccini::Locator::Css("#victim")).await.unwrap();
    victim.enter_frame().await.unwrap();
    let framed = browser.client.source().await.unwrap();
    assert!(!framed.contains(&name) && !framed.contains("Deactivate"), "the framed dashboard rendered:\n{framed}");
    browser.client.enter_parent_frame().await.unwrap();

    // Kubernetes RBAC decides: a person who may read Projects but not change them sees
    // the project, and the API server's refusal, verbatim, when they try.
    let viewer = format!("viewer-{}", env.id);
    grant_read_only(&env, &viewer).await;
    let theirs = Dashboard::start_as(&env, "viewer-dashboard", &env.kubeconfig_as(&viewer));
    browser.go(&theirs.login_url).await;
    browser.go(&format!("{}/projects/{name}", theirs.base)).await;
    assert!(browser.text().await.contains(&name));
    browser.click("Deactivate").await;
    let refused = browser.text().await;
    let verbatim =
        format!("projects.llmproxy.io \"{name}\" is forbidden: User \"{viewer}\" cannot patch resource \"projects\"");
    assert!(refused.contains(&verbatim), "{refused}");
    assert!(projects.get(&name).await.unwrap().spec.active);
    browser.go(&format!("{}/projects/{name}/tokens", theirs.base)).await;
    assert!(browser.text().await.contains("cannot list resource \"proxytokens\""));
    browser.screenshot("refused-by-rbac").await;
}

/// Lets `user` read Projects and Events, and nothing else.
async fn grant_read_only(env: &Env, user: &str) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": { "name": user },
        "rules": [
            { "apiGroups": ["llmproxy.io"], "resources": ["projects"], "verbs": ["get", "list", "watch"] },
            { "apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["get", "list", "watch"] },
        ],
    }))
    .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": user },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user }],
    }))
    .unwrap();
    Api::<ClusterRole>::all(env.client.clone()).create(&Default::default(), &role).await.unwrap();
    Api::<ClusterRoleBinding>::all(env.client.clone()).create(&Default::default(), &binding).await.unwrap();
}
