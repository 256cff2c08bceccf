//! The Helm chart against the real API server: it lints, renders, every object is
//! accepted by `kubectl apply --server-side`, and its two identities get exactly the
//! rights the design gives them.

mod support;

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use llm_proxy::api::{Project, ProxyToken};
use serde_json::json;
use std::time::Duration;
use support::Env;

fn helm() -> std::path::PathBuf {
    support::cache().join("bin/helm")
}

/// The chart as `helm template t` renders it with `set` (only `template`, unless empty),
/// as parsed YAML documents.
fn render(template: &str, set: &[&str]) -> Vec<serde_json::Value> {
    let mut command = std::process::Command::new(helm());
    command.args(["template", "t"]).arg(support::repo().join("charts/llm-proxy"));
    command.args(["--kube-version", &support::kubernetes_version()]);
    if !template.is_empty() {
        command.args(["--show-only", template]);
    }
    for value in set {
        command.args(["--set", value]);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|doc| <Option<serde_json::Value> as serde::Deserialize>::deserialize(doc).unwrap())
        .collect()
}

/// A client that acts as `user` (impersonation by the cluster admin).
async fn client_as(user: &str) -> Client {
    let mut config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(support::kubeconfig()).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    config.auth_info.impersonate = Some(user.to_string());
    Client::try_from(config).unwrap()
}

/// Whether `client`'s identity may `verb` `resource` (optionally a subresource) in `namespace`.
async fn can(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    subresource: Option<&str>,
    namespace: Option<&str>,
) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource: subresource.map(Into::into),
                namespace: namespace.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer =
        Api::<SelfSubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await.unwrap();
    answer.status.unwrap().allowed
}

#[tokio::test]
async fn the_chart_lints_renders_applies_and_grants_least_privilege() {
    let env = Env::new("chart").await;
    let chart = support::repo().join("charts/llm-proxy");
    let lint = std::process::Command::new(helm()).arg("lint").arg(&chart).output().expect("helm (run hack/setup.sh)");
    assert!(lint.status.success(), "{}", String::from_utf8_lossy(&lint.stdout));

    // The admission policies are cluster-wide: keep them to this test's (absent) objects
    // so parallel tests can still delete their Projects and write status.
    let release = format!("r-{}", env.id);
    let rendered = std::process::Command::new(helm())
        .args(["template", &release])
        .arg(&chart)
        .args(["--namespace", &env.ops, "--kube-version", &support::kubernetes_version()])
        .args(["--set", &format!("projectDeletionPolicy.objectSelector.matchLabels.llmproxy\\.io/test={}", env.id)])
        .args(["--set", &format!("statusPolicy.objectSelector.matchLabels.llmproxy\\.io/test={}", env.id)])
        .args(["--set", &format!("upstreamPolicy.objectSelector.matchLabels.llmproxy\\.io/test={}", env.id)])
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let manifest = support::repo().join(format!("target/test-logs/{}-chart.yaml", env.id));
    std::fs::write(&manifest, &rendered.stdout).unwrap();
    let applied = support::run_kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager",
        "helm-test",
        "-n",
        &env.ops,
        "-f",
        manifest.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&applied.stdout);
    assert!(applied.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&applied.stderr));
    for kind in [
        "customresourcedefinition.apiextensions.k8s.io/projects.llmproxy.io",
        "customresourcedefinition.apiextensions.k8s.io/pricelists.llmproxy.io",
        "deployment.apps/",
        "validatingadmissionpolicy.admissionregistration.k8s.io/",
        "networkpolicy.networking.k8s.io/",
        "poddisruptionbudget.policy/",
        "clusterrole.rbac.authorization.k8s.io/",
    ] {
        assert!(stdout.contains(kind), "{kind} not applied:\n{stdout}");
    }

    let name = format!("{release}-llm-proxy");
    let proxy = client_as(&format!("system:serviceaccount:{}:{name}-proxy", env.ops)).await;
    let controller = client_as(&format!("system:serviceaccount:{}:{name}-controller", env.ops)).await;
    let (ops, apps) = (Some(env.ops.as_str()), Some(env.apps.as_str()));

    // The proxy reads what it routes by and writes only usage.
    assert!(can(&proxy, "watch", "llmproxy.io", "projects", None, None).await);
    assert!(can(&proxy, "watch", "llmproxy.io", "proxytokens", None, None).await);
    assert!(can(&proxy, "watch", "", "namespaces", None, None).await);
    assert!(can(&controller, "watch", "", "namespaces", None, None).await);
    assert!(can(&proxy, "patch", "llmproxy.io", "proxytokens", Some("status"), apps).await);
    assert!(can(&proxy, "watch", "", "secrets", None, ops).await);
    assert!(
        !can(&proxy, "get", "", "secrets", None, apps).await,
        "the proxy must not read Secrets outside its namespace"
    );
    assert!(!can(&proxy, "create", "", "secrets", None, ops).await, "the proxy must not write Secrets");
    assert!(!can(&proxy, "patch", "llmproxy.io", "proxytokens", None, apps).await);
    // Project status for the usage of limits its tokens share; the status policy holds
    // the proxy to the usage fields (controller_and_proxy_do_their_whole_job_…).
    assert!(can(&proxy, "patch", "llmproxy.io", "projects", Some("status"), None).await);
    assert!(!can(&proxy, "patch", "llmproxy.io", "projects", None, None).await);

    // The controller writes what it must and nothing else.
    assert!(can(&controller, "create", "", "secrets", None, apps).await);
    assert!(can(&controller, "patch", "llmproxy.io", "proxytokens", Some("status"), apps).await);
    assert!(can(&controller, "patch", "llmproxy.io", "projects", Some("status"), None).await);
    assert!(can(&controller, "update", "coordination.k8s.io", "leases", None, ops).await);
    assert!(!can(&controller, "list", "", "secrets", None, apps).await, "no cluster-wide Secret listing");
    assert!(!can(&controller, "delete", "", "secrets", None, apps).await);
    assert!(!can(&controller, "update", "coordination.k8s.io", "leases", None, apps).await);
    assert!(!can(&controller, "delete", "llmproxy.io", "projects", None, None).await);
}

#[tokio::test]
async fn controller_and_proxy_do_their_whole_job_as_their_chart_identities() {
    let mut env = Env::new("identity").await;
    let release = format!("r-{}", env.id);
    // The status policy too, kept to this test's objects so parallel tests (whose
    // processes run as the cluster admin) can still write theirs.
    let only_ours = format!("statusPolicy.objectSelector.matchLabels.llmproxy\\.io/test={}", env.id);
    let mut docs = env.render_chart(&release, "templates/serviceaccounts.yaml", &[]);
    docs.extend(env.render_chart(&release, "templates/rbac.yaml", &[]));
    docs.extend(env.render_chart(&release, "templates/status-policy.yaml", &[only_ours]));
    docs.extend(env.render_chart(&release, "templates/tenant-roles.yaml", &[]));
    let manifest = support::repo().join(format!("target/test-logs/{}-rbac.yaml", env.id));
    std::fs::write(
        &manifest,
        docs.iter().map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap())).collect::<String>(),
    )
    .unwrap();
    let applied = support::run_kubectl(&["apply", "--server-side", "-n", &env.ops, "-f", manifest.to_str().unwrap()]);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));

    let name = format!("{release}-llm-proxy");
    let controller_user = format!("system:serviceaccount:{}:{name}-controller", env.ops);
    let proxy_user = format!("system:serviceaccount:{}:{name}-proxy", env.ops);
    let controller_kubeconfig = env.kubeconfig_as(&controller_user);
    let proxy_kubeconfig = env.kubeconfig_as(&proxy_user);
    env.start_controller_as("controller", &[], &controller_kubeconfig);
    let (port, admin) = (env.proxy_port, env.proxy_admin_port);
    env.start_proxy_with("proxy", port, admin, &["--usage-flush-millis", "200"], &proxy_kubeconfig).await;

    // The whole job: finalizer, status, minting, Events, routing, budget claims, usage,
    // all through the status policy.
    wait_for_status_policy(&env).await;
    let mut project = env.project("p");
    env.put_key("p-key", support::TEST_KEY, "p").await;
    // Token limits on the Project and on the token: the proxy writes both statuses.
    project.spec.limits = Some(llm_proxy::api::Limits { tokens_per_day: Some(1000), ..Default::default() });
    Api::<llm_proxy::api::Project>::all(env.client.clone()).create(&PostParams::default(), &project).await.unwrap();
    let mut spec = support::token_spec(&env.scoped("p"));
    spec.max_requests = Some(3);
    spec.limits = Some(llm_proxy::api::Limits { lifetime_tokens: Some(1000), ..Default::default() });
    env.create_token("capped", spec).await;
    env.wait_token("capped", llm_proxy::api::TokenPhase::Active).await;
    let token = env.token_secret("capped").await["token"].clone();
    let results = support::burst(&[port], &token, 4).await;
    assert_eq!(results.iter().filter(|(s, _)| *s == 200).count(), 3, "{results:?}");
    let exhausted = env.wait_token("capped", llm_proxy::api::TokenPhase::Exhausted).await;
    assert_eq!(exhausted.status.as_ref().unwrap().request_count, Some(3));
    let used = |windows: &[llm_proxy::api::TokenWindow]| windows.first().map(|w| w.used_tokens);
    let token_windows = support::eventually(Duration::from_secs(10), || async {
        let token = Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps).get("capped").await.unwrap();
        Some(token.status.unwrap_or_default().token_windows).filter(|w| used(w) == Some(3 * 16))
    })
    .await;
    assert_eq!(token_windows.len(), 1);
    let project = support::eventually(Duration::from_secs(10), || async {
        let project = Api::<llm_proxy::api::Project>::all(env.client.clone()).get(&env.scoped("p")).await.unwrap();
        (used(&project.status.clone().unwrap_or_default().token_windows) == Some(3 * 16)).then_some(project)
    })
    .await;
    assert!(project.metadata.finalizers.unwrap_or_default().contains(&"llmproxy.io/project-protection".to_string()));
    assert!(!env.logs().contains("Forbidden"), "a process was refused something it needs:\n{}", env.logs());

    // The proxy's identity cannot write Secrets, nor read them outside its namespace.
    let proxy = client_as(&proxy_user).await;
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": "stolen" }, "stringData": { "k": "v" } }))
            .unwrap();
    let denied = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(proxy.clone(), &env.ops)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_err();
    assert!(matches!(denied, kube::Error::Api(ref s) if s.code == 403), "{denied}");
    let denied = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(proxy.clone(), &env.apps)
        .get("capped")
        .await
        .unwrap_err();
    assert!(matches!(denied, kube::Error::Api(ref s) if s.code == 403), "{denied}");

    // The proxy's identity writes usage, never a token's binding or verdict: the policy
    // lists what it may change, so fields the CRD's own rules leave open (the expiry,
    // observedGeneration) are refused too.
    let proxy_tokens = Api::<ProxyToken>::namespaced(proxy, &env.apps);
    let later = json!({ "expiresAt": "2099-01-01T00:00:00.000000Z" });
    for forged in [json!({ "phase": "Active" }), later, json!({ "observedGeneration": 99 })] {
        let write = Patch::Merge(json!({ "status": forged }));
        let denied = proxy_tokens.patch_status("capped", &PatchParams::default(), &write).await.unwrap_err();
        assert_refused(&denied, "The proxy may write only a token's usage");
    }
    let denied = Api::<llm_proxy::api::Project>::all(client_as(&proxy_user).await)
        .patch_status(
            &env.scoped("p"),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "phase": "Inactive" } })),
        )
        .await
        .unwrap_err();
    assert_refused(&denied, "The proxy may write only a Project's usage");

    tenants_manage_tokens_but_cannot_forge_their_status(&env, &format!("{release}-llm-proxy")).await;

    // Cluster-scoped objects outlive the test's namespaces: remove them.
    let deleted = support::run_kubectl(&["delete", "--wait=false", "-f", manifest.to_str().unwrap()]);
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
}

/// A hash no token has.
const FORGED: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn assert_refused(error: &kube::Error, message: &str) {
    assert!(
        matches!(error, kube::Error::Api(s) if s.code == 403 && s.message.contains(message)),
        "expected a refusal saying {message:?}, got {error}"
    );
}

/// Waits until the status policy is in force: it refuses (in a server-side dry run, so
/// nothing is written) the cluster admin's write to the status of a probe token.
async fn wait_for_status_policy(env: &Env) {
    let mut probe = ProxyToken::new("policy-probe", support::token_spec("no-such-project"));
    probe.metadata.labels = Some([(support::TEST_LABEL.to_string(), env.id.clone())].into());
    let tokens = Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps);
    tokens.create(&PostParams::default(), &probe).await.unwrap();
    let dry_run = PatchParams { dry_run: true, ..Default::default() };
    let write = json!({ "status": { "requestCount": 0 } });
    support::eventually(Duration::from_secs(30), || async {
        tokens.patch_status("policy-probe", &dry_run, &Patch::Merge(&write)).await.is_err().then_some(())
    })
    .await;
}

/// Namespace admins (wildcard roles, as many GitOps service accounts have) and editors
/// manage their ProxyTokens; none of them can write the status that binds a token to
/// its project, counts its use and decides when it expires.
async fn tenants_manage_tokens_but_cannot_forge_their_status(env: &Env, name: &str) {
    let rbac = json!([
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
          "metadata": { "name": "namespace-admin", "namespace": env.apps },
          "rules": [{ "apiGroups": ["*"], "resources": ["*"], "verbs": ["*"] }] },
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
          "metadata": { "name": "alice-admin", "namespace": env.apps },
          "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "namespace-admin" },
          "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice" }] },
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
          "metadata": { "name": "bob-edit", "namespace": env.apps },
          "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit" },
          "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob" }] },
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
          "metadata": { "name": "carol-tokens", "namespace": env.apps },
          "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("{name}-token-editor") },
          "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "carol" }] },
    ]);
    let manifest = support::repo().join(format!("target/test-logs/{}-tenants.json", env.id));
    std::fs::write(&manifest, json!({ "apiVersion": "v1", "kind": "List", "items": rbac }).to_string()).unwrap();
    let applied = support::run_kubectl(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));

    // Alice may do anything in her namespace, status included, as far as RBAC goes.
    let alice = client_as("alice").await;
    let apps = Some(env.apps.as_str());
    assert!(can(&alice, "patch", "llmproxy.io", "proxytokens", Some("status"), apps).await);
    let mut own = ProxyToken::new("alices", support::token_spec(&env.scoped("p")));
    own.metadata.labels = Some([(support::TEST_LABEL.to_string(), env.id.clone())].into());
    let tokens = Api::<ProxyToken>::namespaced(alice, &env.apps);
    tokens.create(&PostParams::default(), &own).await.unwrap();
    env.wait_token("alices", llm_proxy::api::TokenPhase::Active).await;
    let other = env.wait_token("capped", llm_proxy::api::TokenPhase::Exhausted).await.status.unwrap();
    // A token of hers that was never minted (its Project does not exist).
    let unminted = ProxyToken::new("unminted", support::token_spec("no-such-project"));
    let unminted = ProxyToken {
        metadata: kube::api::ObjectMeta { labels: own.metadata.labels.clone(), ..unminted.metadata },
        ..unminted
    };
    tokens.create(&PostParams::default(), &unminted).await.unwrap();
    env.wait_token("unminted", llm_proxy::api::TokenPhase::Pending).await;
    let project_uid = Api::<Project>::all(env.client.clone()).get(&env.scoped("p")).await.unwrap().metadata.uid;
    // What only the policy stops (the API server's own rules allow these writes): reset
    // the budget claimed, declare an exhausted token active, bind an unminted token to a
    // hash and a Project of her choosing.
    for (token, forged) in [
        ("capped", json!({ "status": { "claimedRequests": 0 } })),
        ("capped", json!({ "status": { "phase": "Active" } })),
        (
            "unminted",
            json!({ "status": { "tokenHash": FORGED, "issuedAt": "2026-01-01T00:00:00.000000Z", "projectUid": project_uid } }),
        ),
    ] {
        let denied = tokens.patch_status(token, &PatchParams::default(), &Patch::Merge(&forged)).await.unwrap_err();
        assert_refused(&denied, "alice may not write the status of proxytokens");
    }
    // What the CRD's rules refuse first, for every writer: lower the count, copy another
    // token's hash, move the issue time, rebind the Project.
    for (token, forged) in [
        ("capped", json!({ "status": { "requestCount": 0 } })),
        ("alices", json!({ "status": { "tokenHash": other.token_hash } })),
        ("alices", json!({ "status": { "issuedAt": "2099-01-01T00:00:00.000000Z" } })),
        ("alices", json!({ "status": { "projectUid": "another-project" } })),
    ] {
        let denied = tokens.patch_status(token, &PatchParams::default(), &Patch::Merge(&forged)).await.unwrap_err();
        assert!(matches!(&denied, kube::Error::Api(s) if s.code == 422 || s.code == 403), "{forged}: {denied}");
    }
    let capped = env.wait_token("capped", llm_proxy::api::TokenPhase::Exhausted).await.status.unwrap();
    assert_eq!(capped.request_count, Some(3), "the count stays");
    // Revoking is hers to do, in spec.
    tokens
        .patch("alices", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "revoked": true } })))
        .await
        .unwrap();
    env.wait_token("alices", llm_proxy::api::TokenPhase::Revoked).await;

    // Editors (the default `edit` role, through aggregation) and holders of the chart's
    // token role manage ProxyTokens and nothing of their status.
    for user in ["bob", "carol"] {
        let client = client_as(user).await;
        support::eventually(Duration::from_secs(30), || async {
            can(&client, "create", "llmproxy.io", "proxytokens", None, apps).await.then_some(())
        })
        .await;
        assert!(can(&client, "delete", "llmproxy.io", "proxytokens", None, apps).await, "{user}");
        assert!(!can(&client, "patch", "llmproxy.io", "proxytokens", Some("status"), apps).await, "{user}");
        assert!(!can(&client, "create", "llmproxy.io", "projects", None, None).await, "{user}");
    }
}

#[test]
fn values_are_validated_by_the_schema() {
    let chart = support::repo().join("charts/llm-proxy");
    let render = |set: &str| {
        std::process::Command::new(helm())
            .args(["template", "t"])
            .arg(&chart)
            .args(["--kube-version", &support::kubernetes_version(), "--set", set])
            .output()
            .unwrap()
    };
    let typo = render("proxy.replica=3");
    assert!(!typo.status.success());
    assert!(String::from_utf8_lossy(&typo.stderr).contains("additional properties 'replica' not allowed"));
    let wrong_type = render("controller.replicas=two");
    assert!(String::from_utf8_lossy(&wrong_type.stderr).contains("/controller/replicas"));
    assert!(render("proxy.replicas=3").status.success());
}

#[test]
fn the_dockerfile_is_pinned_non_root_and_ships_binaries_that_run() {
    let dockerfile = std::fs::read_to_string(support::repo().join("Dockerfile")).unwrap();
    let froms: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage");
    for from in &froms {
        let image = from.split_whitespace().nth(1).unwrap();
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(!tag.is_empty() && tag != "latest", "{image} is not pinned");
    }
    assert!(dockerfile.contains("--locked"));
    // The chart runs the pods as this user with a read-only root filesystem.
    assert!(dockerfile.contains("USER 65532:65532"));
    let helpers = std::fs::read_to_string(support::repo().join("charts/llm-proxy/templates/_helpers.tpl")).unwrap();
    assert!(helpers.contains("runAsUser: 65532") && helpers.contains("readOnlyRootFilesystem: true"));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/llm-proxy"]"#));
    // The binaries it copies are the ones this crate builds, and they run.
    for (binary, name) in
        [(env!("CARGO_BIN_EXE_llm-proxy"), "llm-proxy"), (env!("CARGO_BIN_EXE_kubectl-llmproxy"), "kubectl-llmproxy")]
    {
        assert!(dockerfile.contains(&format!("--bin {name}")));
        let out = std::process::Command::new(binary).arg("--version").output().unwrap();
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("0.1.0"), "{name}");
    }
}

/// Whoever may write Projects chooses their upstream only among those the cluster admin
/// allows (the chart's upstream policy): https, and the hosts listed.
#[tokio::test]
async fn project_upstreams_are_fenced_at_admission() {
    let env = Env::new("upstreams").await;
    let release = format!("r-{}", env.id);
    let set = [
        format!("upstreamPolicy.objectSelector.matchLabels.llmproxy\\.io/test={}", env.id),
        "upstreamPolicy.hosts={api.openai.com,*.openai.azure.com}".to_string(),
    ];
    let docs = env.render_chart(&release, "templates/upstream-policy.yaml", &set);
    let manifest = support::repo().join(format!("target/test-logs/{}-upstream-policy.json", env.id));
    std::fs::write(&manifest, json!({ "apiVersion": "v1", "kind": "List", "items": docs }).to_string()).unwrap();
    let applied = support::run_kubectl(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));

    let projects = Api::<Project>::all(env.client.clone());
    let with_url = |name: &str, url: &str| {
        let mut project = env.project(name);
        project.spec.upstream.url = url.to_string();
        project
    };
    let create = |project: Project| {
        let projects = projects.clone();
        async move { projects.create(&PostParams::default(), &project).await }
    };
    // In force once it refuses a plain-http upstream (a server-side dry run writes nothing).
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    support::eventually(Duration::from_secs(30), || async {
        projects.create(&dry_run, &with_url("probe", "http://api.openai.com")).await.is_err().then_some(())
    })
    .await;

    let refused = create(with_url("plain", "http://api.openai.com")).await.unwrap_err();
    assert_refused(&refused, "uses http, which this cluster does not allow for upstreams (allowed: https)");
    for url in ["https://evil.example.com", "https://api.openai.com.evil.example.com", "https://openai.azure.com"] {
        let refused = create(with_url("elsewhere", url)).await.unwrap_err();
        assert_refused(&refused, "is not an allowed upstream (allowed: api.openai.com, *.openai.azure.com)");
    }
    create(with_url("openai", "https://api.openai.com")).await.unwrap();
    create(with_url("azure", "https://eastus.openai.azure.com/")).await.unwrap();

    // Moving an existing Project's upstream is checked the same way; other edits are not.
    let move_to = |url: &str| Patch::Merge(json!({ "spec": { "upstream": { "url": url } } }));
    let name = env.scoped("openai");
    let refused = projects.patch(&name, &PatchParams::default(), &move_to("https://evil.example.com")).await;
    assert_refused(&refused.unwrap_err(), "is not an allowed upstream");
    let deactivate = Patch::Merge(json!({ "spec": { "active": false } }));
    projects.patch(&name, &PatchParams::default(), &deactivate).await.unwrap();
    let unchanged = projects.get(&name).await.unwrap();
    assert_eq!(unchanged.spec.upstream.url, "https://api.openai.com");

    let deleted = support::run_kubectl(&["delete", "--wait=false", "-f", manifest.to_str().unwrap()]);
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
}

/// Metrics name every tenant's tokens and their usage: by default only pods of the
/// release's namespace reach the admin ports; the API port stays open to the cluster.
#[test]
fn metrics_are_closed_to_other_namespaces_unless_selected() {
    let render = |set: &[&str]| render("templates/networkpolicy.yaml", set);
    let admin_sources = |policies: &[serde_json::Value]| -> Vec<serde_json::Value> {
        policies
            .iter()
            .flat_map(|p| p["spec"]["ingress"].as_array().unwrap().clone())
            .filter(|rule| rule["ports"][0]["port"] == 9090)
            .flat_map(|rule| rule["from"].as_array().unwrap().clone())
            .collect()
    };
    let default = render(&[]);
    assert_eq!(default.len(), 2, "proxy and controller");
    assert!(admin_sources(&default).iter().all(|from| *from == json!({ "podSelector": {} })), "{default:?}");
    let api = &default[0]["spec"]["ingress"][0];
    assert_eq!(
        (api["ports"][0]["port"].clone(), api["from"][0].clone()),
        (json!(8080), json!({ "namespaceSelector": {} }))
    );

    let monitored = render(&["networkPolicy.metricsNamespaceSelector.matchLabels.team=monitoring"]);
    let selected = json!({ "namespaceSelector": { "matchLabels": { "team": "monitoring" } } });
    assert_eq!(admin_sources(&monitored).iter().filter(|from| **from == selected).count(), 2);
}

/// With the Prometheus Operator, one ServiceMonitor per component, each selecting exactly
/// one Service, whose named port leads to that component's pods' admin port; labels from
/// `serviceMonitor.labels` are added, never in place of the chart's. Off by default. (The
/// node test installs them against the operator's CRD and scrapes their targets.)
#[test]
fn service_monitors_select_each_components_admin_port() {
    let render = |set: &[&str]| render("", set);
    let of_kind = |docs: &[serde_json::Value], kind: &str| -> Vec<serde_json::Value> {
        docs.iter().filter(|doc| doc["kind"] == kind).cloned().collect()
    };
    let subset = |labels: &serde_json::Value, of: &serde_json::Value| {
        labels.as_object().unwrap().iter().all(|(key, value)| of[key] == *value)
    };
    assert!(of_kind(&render(&[]), "ServiceMonitor").is_empty());

    let docs = render(&[
        "serviceMonitor.enabled=true",
        "serviceMonitor.labels.release=kube-prometheus-stack",
        "serviceMonitor.labels.app\\.kubernetes\\.io/component=clash",
    ]);
    let monitors = of_kind(&docs, "ServiceMonitor");
    let components: Vec<&str> =
        monitors.iter().map(|m| m["metadata"]["labels"]["app.kubernetes.io/component"].as_str().unwrap()).collect();
    assert_eq!(components, ["proxy", "controller"], "the chart's component label wins the clash");
    for (monitor, component) in monitors.iter().zip(components) {
        assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus-stack");
        let services: Vec<_> = of_kind(&docs, "Service")
            .into_iter()
            .filter(|service| subset(&monitor["spec"]["selector"]["matchLabels"], &service["metadata"]["labels"]))
            .collect();
        assert_eq!(services.len(), 1, "{component}: {services:?}");
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!((endpoint["path"].as_str(), endpoint["interval"].as_str()), (Some("/metrics"), Some("30s")));
        let port = services[0]["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == endpoint["port"]);
        assert_eq!(port.map(|p| p["targetPort"].clone()), Some(json!("admin")), "{component}");
        let deployment = of_kind(&docs, "Deployment")
            .into_iter()
            .find(|d| d["metadata"]["name"] == format!("t-llm-proxy-{component}"))
            .unwrap();
        let pod = &deployment["spec"]["template"];
        assert!(subset(&services[0]["spec"]["selector"], &pod["metadata"]["labels"]), "{component}");
        let ports = pod["spec"]["containers"][0]["ports"].as_array().unwrap();
        assert!(ports.iter().any(|p| p["name"] == "admin" && p["containerPort"] == 9090), "{component}");
    }
}
