//! `kubectl llmproxy`: every command, run as a real kubectl plugin (found on PATH by
//! the kubectl of the local control plane) against a real controller and proxy.

mod support;

use std::process::Command;

use kube::Api;
use llm_proxy::api::{Project, ProjectPhase, ProxyToken, TokenPhase};
use support::{Env, WAIT, eventually};

/// Runs `kubectl llmproxy ARGS` with the plugin's folder first on PATH.
fn plugin(args: &[&str]) -> (bool, String, String) {
    let binary = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kubectl-llmproxy"));
    let path = format!("{}:{}", binary.parent().unwrap().display(), std::env::var("PATH").unwrap());
    let output = Command::new(support::kubectl())
        .arg("llmproxy")
        .args(args)
        .env("KUBECONFIG", support::kubeconfig())
        .env("PATH", path)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

#[tokio::test]
async fn every_plugin_command_does_what_it_says() {
    let env = Env::running("plugin").await;
    env.create_project("alpha").await;
    env.create_project("beta").await;
    let projects: Api<Project> = Api::all(env.client.clone());
    let phase = |name: String| {
        let projects = projects.clone();
        async move { projects.get(&name).await.ok()?.status?.phase }
    };
    eventually(WAIT, || async { (phase(env.scoped("beta")).await == Some(ProjectPhase::Active)).then_some(()) }).await;

    // deactivate / list with a status filter and a name search
    let (ok, out, err) = plugin(&["deactivate", &env.scoped("beta")]);
    assert!(ok, "{err}");
    assert!(out.contains("deactivated"));
    eventually(WAIT, || async { (phase(env.scoped("beta")).await == Some(ProjectPhase::Inactive)).then_some(()) })
        .await;
    let (ok, out, _) = plugin(&["list", "--status", "Inactive", "--search", &env.id]);
    assert!(ok);
    assert!(out.contains(&env.scoped("beta")) && !out.contains(&env.scoped("alpha")), "{out}");
    assert!(out.lines().next().unwrap().starts_with("NAME"));
    let (_, out, _) = plugin(&["list", "--search", "Test alpha"]);
    assert!(out.contains(&env.scoped("alpha")), "{out}");

    // A project that cannot serve says so in the list and in show, with the fix.
    let nokey = env.project("nokey");
    projects.create(&Default::default(), &nokey).await.unwrap();
    let row = eventually(WAIT, || async {
        let (_, out, _) = plugin(&["list", "--search", &env.scoped("nokey")]);
        out.lines().find(|l| l.contains("SecretNotFound")).map(str::to_string)
    })
    .await;
    assert!(
        row.split_whitespace().collect::<Vec<_>>().windows(3).any(|w| w == ["Active", "False", "SecretNotFound"]),
        "{row}"
    );
    let (_, out, _) = plugin(&["show", &env.scoped("nokey")]);
    assert!(out.contains("Serving:       no (SecretNotFound: Secret") && out.contains("not found: create it"), "{out}");

    // activate
    let (ok, _, err) = plugin(&["activate", &env.scoped("beta")]);
    assert!(ok, "{err}");
    eventually(WAIT, || async { (phase(env.scoped("beta")).await == Some(ProjectPhase::Active)).then_some(()) }).await;

    // create-token prints the token once with snippets, and it works
    let label = format!("{}={}", support::TEST_LABEL, env.id);
    let (ok, out, err) = plugin(&[
        "create-token",
        &env.scoped("alpha"),
        "cli-token",
        "-n",
        &env.apps,
        "--max-requests",
        "10",
        "-l",
        &label,
    ]);
    assert!(ok, "{err}");
    let token = env.token_secret("cli-token").await["token"].clone();
    assert_eq!(out.matches(&token).count(), 4, "the token, then curl, Python and Node snippets:\n{out}");
    assert!(out.contains("from openai import OpenAI") && out.contains("new OpenAI(") && out.contains("curl "));
    assert_eq!(env.chat(&token).await.status, 200);

    // show: masked key, counts, recent tokens, events; never the token
    eventually(WAIT, || async {
        let (_, out, _) = plugin(&["show", &env.scoped("alpha")]);
        (out.contains("cli-token") && out.contains("TokenIssued")).then_some(())
    })
    .await;
    let (ok, out, _) = plugin(&["show", &env.scoped("alpha")]);
    assert!(ok);
    for expected in [
        "Display name:  Test alpha",
        "Status:        Active",
        "API key:       sk-…Ab12",
        "Tokens:        1 total, 1 active",
        "Created",
    ] {
        assert!(out.contains(expected), "missing {expected:?}:\n{out}");
    }
    assert!(!out.contains(&token[..12]));

    // revoke-token
    let (ok, _, err) = plugin(&["revoke-token", "cli-token", "-n", &env.apps]);
    assert!(ok, "{err}");
    env.wait_token("cli-token", TokenPhase::Revoked).await;

    // revoke-all
    let other = env.minted("alpha", "other").await;
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    let (ok, _, err) = plugin(&["revoke-all", &env.scoped("alpha")]);
    assert!(ok, "{err}");
    env.wait_token("other", TokenPhase::Revoked).await;
    assert_eq!(env.chat(&other).await.error_code(), "token_revoked");

    // A token for an inactive project fails with the product's message.
    plugin(&["deactivate", &env.scoped("beta")]);
    eventually(WAIT, || async { (phase(env.scoped("beta")).await == Some(ProjectPhase::Inactive)).then_some(()) })
        .await;
    let (ok, _, err) = plugin(&[
        "create-token",
        &env.scoped("beta"),
        "refused",
        "-n",
        &env.apps,
        "--wait-seconds",
        "10",
        "-l",
        &label,
    ]);
    assert!(!ok);
    assert!(err.contains("Cannot generate tokens for inactive project"), "{err}");
    let refused = Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps).get("refused").await.unwrap();
    assert!(refused.status.unwrap().token_hash.is_none());
}

#[tokio::test]
async fn wait_returns_once_every_live_replica_enforces_the_change() {
    let mut env = Env::running("wait").await;
    let ports = env.start_second_proxy().await;
    env.create_project("p").await;
    let project = env.scoped("p");
    let ops = env.ops.clone();
    let with_ns = |args: &[&str]| {
        let mut all = vec!["--operator-namespace", ops.as_str()];
        all.extend_from_slice(args);
        plugin(&all)
    };

    // Both replicas report what they enforce.
    let out = eventually(WAIT, || async {
        let (ok, out, _) = with_ns(&["replicas"]);
        (ok && out.lines().skip(1).filter(|l| l.contains(" yes   yes ")).count() == 2).then_some(out)
    })
    .await;
    assert!(out.starts_with("REPLICA"), "{out}");

    // create-token --wait prints a token that every replica accepts at once: no retries.
    let label = format!("{}={}", support::TEST_LABEL, env.id);
    let (ok, out, err) = with_ns(&["create-token", &project, "app", "-n", &env.apps, "-l", &label, "--wait"]);
    assert!(ok, "{err}");
    assert!(out.contains("enforced by 2/2 live proxy replicas after"), "{out}");
    let token = env.token_secret("app").await["token"].clone();
    for port in ports {
        assert_eq!(support::chat_on(port, &token).await, "", "replica on {port}");
    }

    for (args, refused) in [
        (vec!["deactivate", project.as_str()], "project_inactive"),
        (vec!["activate", project.as_str()], ""),
        (vec!["revoke-token", "app", "-n", env.apps.as_str()], "token_revoked"),
    ] {
        let mut args = args.clone();
        args.push("--wait");
        let (ok, out, err) = with_ns(&args);
        assert!(ok, "{args:?}: {err}");
        assert!(out.contains("enforced by 2/2 live proxy replicas after"), "{args:?}: {out}");
        for port in ports {
            assert_eq!(support::chat_on(port, &token).await, refused, "{args:?} on {port}");
        }
    }

    let other = env.minted("p", "other").await;
    eventually(WAIT, || async {
        let all = [support::chat_on(ports[0], &other).await, support::chat_on(ports[1], &other).await];
        (all == ["", ""]).then_some(())
    })
    .await;
    let (ok, out, err) = with_ns(&["revoke-all", &project, "--wait"]);
    assert!(ok && out.contains("enforced by 2/2"), "{out}{err}");
    for port in ports {
        assert_eq!(support::chat_on(port, &other).await, "token_revoked", "revoke-all on {port}");
    }

    // A replica that stops takes its report with it: nobody waits for it.
    env.signal("proxy-2", "TERM");
    let (ok, out, _) = with_ns(&["replicas"]);
    assert!(ok && out.lines().count() == 2, "{out}");
    let (ok, out, err) = with_ns(&["deactivate", &project, "--wait"]);
    assert!(ok && out.contains("enforced by 1/1"), "{out}{err}");
}
