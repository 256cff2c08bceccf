//! The example manifests and every documented workflow, started from each way users
//! create objects — `kubectl apply` (client-side), `kubectl apply --server-side`, Flux
//! (server-side apply under `kustomize-controller`), Argo CD (client-side apply under
//! `argocd-controller`) — changed with the workflow files, `kubectl edit` and the plugin,
//! then synced again by whoever created them.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use kube::Api;
use llm_proxy::api::{Project, ProxyToken, TokenPhase};
use serde_json::{Value, json};
use support::{Env, TEST_LABEL, WAIT, eventually, run_kubectl};

fn path(relative: &str) -> String {
    support::repo().join("examples").join(relative).display().to_string()
}

/// How the objects were first created.
#[derive(Clone, Copy, Debug)]
enum Start {
    ClientSide,
    ServerSide,
    Flux,
    ArgoCd,
}

impl Start {
    const ALL: [Start; 4] = [Start::ClientSide, Start::ServerSide, Start::Flux, Start::ArgoCd];

    fn name(self) -> &'static str {
        match self {
            Start::ClientSide => "csa",
            Start::ServerSide => "ssa",
            Start::Flux => "flux",
            Start::ArgoCd => "argo",
        }
    }

    /// `kubectl apply` as this starting point runs it; `resync` is a later sync, which
    /// takes back fields someone else changed, as GitOps tools do (`--force-conflicts`).
    fn apply(self, file: &str, resync: bool) -> Output {
        let mut args = vec!["apply"];
        match self {
            Start::ClientSide => {}
            Start::ServerSide if resync => args.extend(["--server-side", "--force-conflicts"]),
            Start::ServerSide => args.push("--server-side"),
            Start::Flux => args.extend(["--server-side", "--force-conflicts", "--field-manager=kustomize-controller"]),
            Start::ArgoCd => args.push("--field-manager=argocd-controller"),
        }
        args.extend(["-f", file]);
        run_kubectl(&args)
    }
}

fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The quickstart's Secret, Project and ProxyToken, made this test's own: names and
/// namespaces scoped, the test label on the Project and the token, the fake upstream.
/// Everything else is the example as users copy it.
fn quickstart(env: &Env, project: &str, tokens_namespace: &str) -> String {
    let mut docs = Vec::new();
    for file in ["quickstart/10-project.yaml", "quickstart/20-proxytoken.yaml"] {
        let text = std::fs::read_to_string(path(file)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut value: Value = serde::Deserialize::deserialize(doc).unwrap();
            match value["kind"].as_str().unwrap() {
                "Secret" => {
                    value["metadata"]["namespace"] = json!(env.ops);
                    value["metadata"]["annotations"]["llmproxy.io/projects"] = json!(project);
                }
                "Project" => {
                    value["metadata"]["name"] = json!(project);
                    value["metadata"]["labels"] = json!({ TEST_LABEL: env.id });
                    value["spec"]["upstream"]["url"] = json!(env.upstream.url);
                }
                "ProxyToken" => {
                    value["metadata"]["namespace"] = json!(tokens_namespace);
                    value["metadata"]["labels"] = json!({ TEST_LABEL: env.id });
                    value["spec"]["projectRef"]["name"] = json!(project);
                }
                other => panic!("unexpected {other} in the quickstart"),
            }
            docs.push(serde_yaml::to_string(&value).unwrap());
        }
    }
    write(env, &format!("{project}.yaml"), &docs.join("---\n"))
}

/// Writes `text` to a file of this test named `name` (kubectl reads it by its extension).
fn write(env: &Env, name: &str, text: &str) -> String {
    let dir = support::repo().join("target/test-logs");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}-{name}", env.id));
    std::fs::write(&file, text).unwrap();
    file.display().to_string()
}

/// An example file with the operator namespace and project name of this test.
fn scoped_example(env: &Env, relative: &str, project: &str) -> String {
    let text = std::fs::read_to_string(path(relative)).unwrap();
    let text = text
        .replace("namespace: llm-proxy", &format!("namespace: {}", env.ops))
        .replace("name: demo\n", &format!("name: {project}\n"))
        .replace("llmproxy.io/projects: demo ", &format!("llmproxy.io/projects: {project} "));
    write(env, &format!("{project}-{}", relative.replace('/', "-")), &text)
}

fn spec(name: &str) -> Value {
    let out = run_kubectl(&["get", "project", name, "-o", "json"]);
    serde_json::from_str::<Value>(&ok(&out, "get project")).unwrap()["spec"].take()
}

fn token_spec(namespace: &str, name: &str) -> Value {
    let out = run_kubectl(&["-n", namespace, "get", "proxytoken", name, "-o", "json"]);
    serde_json::from_str::<Value>(&ok(&out, "get proxytoken")).unwrap()["spec"].take()
}

/// `before` with `changes` merged in (a JSON merge patch, as kubectl sends).
fn merged(before: &Value, changes: Value) -> Value {
    let mut after = before.clone();
    fn merge(into: &mut Value, patch: Value) {
        match patch {
            Value::Object(fields) => {
                for (key, value) in fields {
                    merge(into.as_object_mut().unwrap().entry(key).or_insert(json!({})), value);
                }
            }
            value => *into = value,
        }
    }
    merge(&mut after, changes);
    after
}

fn plugin(args: &[&str]) -> Output {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_kubectl-llmproxy"));
    let path = format!("{}:{}", binary.parent().unwrap().display(), std::env::var("PATH").unwrap());
    Command::new(support::kubectl())
        .arg("llmproxy")
        .args(args)
        .env("KUBECONFIG", support::kubeconfig())
        .env("PATH", path)
        .output()
        .unwrap()
}

/// `kubectl edit` with an editor that runs `sed -i EXPRESSION` on the file.
fn edit(args: &[&str], sed: &str) -> Output {
    Command::new(support::kubectl())
        .arg("edit")
        .args(args)
        .env("KUBECONFIG", support::kubeconfig())
        .env("KUBE_EDITOR", format!("sed -i -e '{sed}'"))
        .output()
        .unwrap()
}

/// The workflow scripts call `kubectl` from PATH.
fn script(relative: &str, args: &[&str]) -> Output {
    let kubectl_dir = support::kubectl().parent().unwrap().to_path_buf();
    Command::new("bash")
        .arg(path(relative))
        .args(args)
        .env("KUBECONFIG", support::kubeconfig())
        .env("PATH", format!("{}:{}", kubectl_dir.display(), std::env::var("PATH").unwrap()))
        .output()
        .unwrap()
}

#[tokio::test]
async fn every_workflow_changes_only_what_it_names_from_every_starting_point() {
    // No controller: this is about what the API server stores.
    let env = Env::new("workflows").await;
    let patch_file = |kind: &str, name: &str, file: &str, namespace: Option<&str>| {
        let mut args = Vec::new();
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        let file = path(file);
        args.extend(["patch", kind, name, "--type", "merge", "--patch-file", &file]);
        run_kubectl(&args)
    };
    for start in Start::ALL {
        let project = env.scoped(start.name());
        let token = "chat-app";
        let tokens_ns = format!("{}-{}", env.apps, start.name());
        ok(&run_kubectl(&["create", "namespace", &tokens_ns]), "namespace");
        let manifest = quickstart(&env, &project, &tokens_ns);
        ok(&start.apply(&manifest, false), &format!("{start:?}: create"));
        let created = spec(&project);
        assert_eq!(created["upstream"]["url"], json!(env.upstream.url), "{start:?}");
        let at = |what: &str| format!("{start:?}, {what}");

        ok(&patch_file("project", &project, "workflows/deactivate.patch.yaml", None), &at("deactivate"));
        assert_eq!(spec(&project), merged(&created, json!({ "active": false })), "{}", at("deactivate"));
        ok(&patch_file("project", &project, "workflows/reactivate.patch.yaml", None), &at("reactivate"));
        assert_eq!(spec(&project), merged(&created, json!({ "active": true })), "{}", at("reactivate"));

        ok(&plugin(&["deactivate", &project]), &at("plugin deactivate"));
        assert_eq!(spec(&project), merged(&created, json!({ "active": false })), "{}", at("plugin deactivate"));
        ok(&plugin(&["activate", &project]), &at("plugin activate"));
        assert_eq!(spec(&project), merged(&created, json!({ "active": true })), "{}", at("plugin activate"));

        ok(&edit(&["project", &project], "s/^  active: true$/  active: false/"), &at("kubectl edit"));
        assert_eq!(spec(&project), merged(&created, json!({ "active": false })), "{}", at("kubectl edit"));
        ok(&edit(&["project", &project], "s/^  active: false$/  active: true/"), &at("kubectl edit back"));

        // Rotation onto a new Secret: only the Secret's name changes, never the upstream.
        ok(
            &run_kubectl(&["apply", "-f", &scoped_example(&env, "workflows/rotate-key-new-secret.yaml", &project)]),
            &at("new Secret"),
        );
        ok(&patch_file("project", &project, "workflows/use-new-key-secret.patch.yaml", None), &at("use new Secret"));
        let rotated = merged(&created, json!({ "apiKeySecretRef": { "name": "demo-openai-key-2026-12" } }));
        assert_eq!(spec(&project), rotated, "{}", at("rotate"));
        ok(
            &run_kubectl(&["apply", "-f", &scoped_example(&env, "workflows/rotate-key.yaml", &project)]),
            &at("rotate in place"),
        );

        ok(&script("workflows/revoke-all.sh", &[&project]), &at("revoke-all"));
        let not_before = spec(&project)["tokensNotBefore"].as_str().unwrap().to_string();
        assert!(not_before.contains('.'), "tokensNotBefore must carry microseconds: {not_before}");

        ok(
            &patch_file("proxytoken", token, "workflows/revoke-token.patch.yaml", Some(&tokens_ns)),
            &at("revoke-token"),
        );
        let token_before = token_spec(&tokens_ns, token);
        assert_eq!(token_before["revoked"], true);
        assert_eq!(token_before["projectRef"]["name"], json!(project));

        // The old way: a partial server-side apply under a manager that ends up owning
        // every field. It must never drop the upstream silently: refused, or harmless.
        let partial = write(
            &env,
            &format!("{project}-partial.yaml"),
            &format!(
                "apiVersion: llmproxy.io/v1alpha1\nkind: Project\nmetadata:\n  name: {project}\nspec:\n  active: false\n"
            ),
        );
        let before_partial = spec(&project);
        let out =
            run_kubectl(&["apply", "--server-side", "--force-conflicts", "--field-manager=lifecycle", "-f", &partial]);
        let after_partial = spec(&project);
        assert_eq!(after_partial["upstream"], before_partial["upstream"], "{}", at("partial apply"));
        assert_eq!(after_partial["apiKeySecretRef"], before_partial["apiKeySecretRef"], "{}", at("partial apply"));
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("Required value"), "{}: {stderr}", at("partial apply refusal"));
        } else {
            ok(&patch_file("project", &project, "workflows/reactivate.patch.yaml", None), &at("reactivate"));
        }

        // The creator syncs its manifest again: it takes back the fields it names (the
        // key Secret), keeps the upstream, and cannot undo either revocation.
        ok(&start.apply(&manifest, true), &at("resync"));
        let synced = spec(&project);
        assert_eq!(synced["upstream"]["url"], json!(env.upstream.url), "{}", at("resync"));
        assert_eq!(synced["apiKeySecretRef"]["name"], "demo-openai-key", "{}", at("resync"));
        assert_eq!(synced["displayName"], created["displayName"], "{}", at("resync"));
        assert_eq!(synced["allowedNamespaces"], created["allowedNamespaces"], "{}", at("resync"));
        assert_eq!(synced["tokensNotBefore"], json!(not_before), "{}", at("resync"));
        assert_eq!(token_spec(&tokens_ns, token)["revoked"], true, "{}", at("resync"));

        // A GitOps manifest that drops the upstream is refused, not defaulted.
        let mut dropped: Vec<Value> = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&std::fs::read_to_string(&manifest).unwrap()) {
            let mut value: Value = serde::Deserialize::deserialize(doc).unwrap();
            if value["kind"] == "Project" {
                value["spec"].as_object_mut().unwrap().remove("upstream");
                dropped.push(value);
            }
        }
        let dropped = write(&env, &format!("{project}-no-upstream.yaml"), &serde_yaml::to_string(&dropped[0]).unwrap());
        let out = start.apply(&dropped, true);
        assert!(!out.status.success(), "{}: dropping the upstream was accepted", at("drop upstream"));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("spec.upstream"),
            "{}: {}",
            at("drop upstream"),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(spec(&project)["upstream"]["url"], json!(env.upstream.url), "{}", at("drop upstream"));
        ok(&run_kubectl(&["delete", "namespace", &tokens_ns, "--wait=false"]), "cleanup");
    }
}

#[tokio::test]
async fn the_quickstart_and_the_workflows_work_end_to_end_from_kubectl_apply() {
    let env = Env::running("quickstart").await;
    // The quickstart grants namespaces labelled team=demo.
    ok(&run_kubectl(&["label", "namespace", &env.apps, "team=demo"]), "label");
    let project = env.scoped("demo");
    ok(&run_kubectl(&["apply", "-f", &quickstart(&env, &project, &env.apps)]), "quickstart");
    let minted = env.wait_token("chat-app", TokenPhase::Active).await;
    assert_eq!(
        minted.status.unwrap().project_uid,
        Api::<Project>::all(env.client.clone()).get(&project).await.unwrap().metadata.uid
    );
    let token = env.token_secret("chat-app").await["token"].clone();
    let chat = |code: &'static str| {
        let token = token.clone();
        let env = &env;
        async move {
            eventually(WAIT, || async {
                let response = env.chat(&token).await;
                let got = if response.status == 200 { String::new() } else { response.error_code() };
                (got == code).then_some(())
            })
            .await
        }
    };
    chat("").await;

    let patch =
        |file: &str| run_kubectl(&["patch", "project", &project, "--type", "merge", "--patch-file", &path(file)]);
    // Budgets: the project's, shared by its tokens, and one token's own; both counted.
    ok(&patch("workflows/project-budget.patch.yaml"), "project budget");
    let file = path("workflows/token-limits.patch.yaml");
    let limited =
        run_kubectl(&["-n", &env.apps, "patch", "proxytoken", "chat-app", "--type", "merge", "--patch-file", &file]);
    ok(&limited, "token limits");
    eventually(WAIT, || async {
        env.chat(&token).await;
        let project = Api::<Project>::all(env.client.clone()).get_status(&project).await.ok()?;
        let windows = project.status?.token_windows;
        let day = windows.iter().find(|w| w.limit == 2_000_000 && w.used_tokens > 0)?;
        let chat_app =
            Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps).get_status("chat-app").await.ok()?;
        let own = chat_app.status?.token_windows;
        (own.len() == 2 && own.iter().any(|w| w.limit == 500_000 && w.used_tokens == day.used_tokens)).then_some(())
    })
    .await;

    // Dollars: the example PriceList and budget are what the API server accepts (the
    // list under this test's name: PriceLists are cluster-wide). Priced requests are
    // tested in `limits`; the budget itself is only checked here, not applied, since the
    // example prices OpenAI's models and the fake upstream answers for any.
    let prices = env.scoped("prices");
    let text = std::fs::read_to_string(path("prices/openai.yaml"))
        .unwrap()
        .replace("name: default\n", &format!("name: {prices}\n"));
    ok(&run_kubectl(&["apply", "-f", &write(&env, &format!("{project}-prices.yaml"), &text)]), "price list");
    let listed = ok(&run_kubectl(&["get", "pricelist", &prices, "-o", "json"]), "get price list");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["spec"]["models"].as_array().map(Vec::len), Some(20), "{listed}");
    let budget = path("workflows/cost-budget.patch.yaml");
    let dry_run =
        ["patch", "project", &project, "--type", "merge", "--patch-file", &budget, "--dry-run=server", "-o", "json"];
    let budgeted: Value = serde_json::from_str(&ok(&run_kubectl(&dry_run), "cost budget")).unwrap();
    assert_eq!(budgeted["spec"]["limits"]["costPerMonth"], json!("500.00"));

    ok(&patch("workflows/deactivate.patch.yaml"), "deactivate");
    chat("project_inactive").await;
    ok(&patch("workflows/reactivate.patch.yaml"), "reactivate");
    chat("").await;

    ok(&run_kubectl(&["apply", "-f", &scoped_example(&env, "workflows/rotate-key.yaml", &project)]), "rotate");
    eventually(WAIT, || async {
        env.chat(&token).await;
        let sent = env.upstream.requests().last()?.header("authorization")?;
        (sent == "Bearer sk-demo-ROTATED-0123456789abcdefghijklmnopqrstuvwxyz").then_some(())
    })
    .await;

    // A token minted a moment ago — almost always within the same second — is revoked
    // by the documented command too.
    env.create_token("fresh", support::token_spec(&project)).await;
    env.wait_token("fresh", TokenPhase::Active).await;
    let fresh = env.token_secret("fresh").await["token"].clone();
    ok(&script("workflows/revoke-all.sh", &[&project]), "revoke-all");
    chat("token_revoked").await;
    eventually(WAIT, || async { (env.chat(&fresh).await.error_code() == "token_revoked").then_some(()) }).await;
    env.wait_token("fresh", TokenPhase::Revoked).await;

    // New tokens work after a bulk revocation; revoking one takes the patch file.
    let newer = env.minted("demo", "newer").await;
    eventually(WAIT, || async { (env.chat(&newer).await.status == 200).then_some(()) }).await;
    let file = path("workflows/revoke-token.patch.yaml");
    ok(
        &run_kubectl(&["-n", &env.apps, "patch", "proxytoken", "newer", "--type", "merge", "--patch-file", &file]),
        "revoke",
    );
    eventually(WAIT, || async { (env.chat(&newer).await.error_code() == "token_revoked").then_some(()) }).await;
    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    assert!(tokens.get("newer").await.unwrap().spec.revoked);
}

#[tokio::test]
async fn every_example_is_accepted_by_the_api_server() {
    let client = support::client().await;
    support::install_crds(&client).await;
    for file in [
        "quickstart/00-namespaces.yaml",
        "quickstart/10-project.yaml",
        "quickstart/20-proxytoken.yaml",
        "quickstart/30-workload.yaml",
        "workflows/namespace-grant.yaml",
        "workflows/rotate-key.yaml",
        "workflows/rotate-key-new-secret.yaml",
    ] {
        let out = run_kubectl(&["apply", "--dry-run=server", "-f", &path(file)]);
        // Namespaces of a dry run do not exist for the objects in them: create those first.
        if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("namespaces \"") {
            ok(&run_kubectl(&["apply", "-f", &path("quickstart/00-namespaces.yaml")]), "namespaces");
            ok(&run_kubectl(&["apply", "--dry-run=server", "-f", &path(file)]), file);
        } else {
            ok(&out, file);
        }
    }
    for file in [
        "workflows/deactivate.patch.yaml",
        "workflows/reactivate.patch.yaml",
        "workflows/use-new-key-secret.patch.yaml",
        "workflows/revoke-token.patch.yaml",
        "workflows/project-budget.patch.yaml",
        "workflows/token-limits.patch.yaml",
        "workflows/cost-budget.patch.yaml",
    ] {
        let text = std::fs::read_to_string(path(file)).unwrap();
        let patch: Value = serde_yaml::from_str(&text).unwrap();
        assert!(patch["spec"].is_object() && patch.as_object().unwrap().len() == 1, "{file} patches spec only");
    }
}
