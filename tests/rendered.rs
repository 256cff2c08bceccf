//! The controller and the proxy started exactly as the chart's Deployments start them:
//! the rendered args and environment (the Downward API filled in as the kubelet would),
//! nothing added — so the chart's default, unfiltered watches of every namespace run
//! too; the proxy with two values set, to see them reach it. A control plane of its own, since unfiltered processes would act on every other
//! test's objects. What differs from a pod: the listen addresses move to free ports, and
//! the credentials are the admin's (tests/chart.rs runs the chart's RBAC identities).

mod support;

use std::time::Duration;

use llm_proxy::api::TokenPhase;
use serde_json::Value;
use support::{Env, eventually};

/// The args and environment of the first container of the Deployment in `template`
/// rendered with `set`, with the Downward API fields of pod `pod` in namespace
/// `namespace` and `ports` replacing the listen addresses (variable name → port). In
/// order: of two variables with one name, the later wins, in the process as in a pod.
fn rendered(
    env: &Env,
    template: &str,
    set: &[String],
    pod: &str,
    namespace: &str,
    ports: &[(&str, u16)],
) -> (Vec<String>, Vec<(String, String)>) {
    let docs = env.render_chart("llm-proxy", template, set);
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("a Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    let vars = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|var| {
            let name = var["name"].as_str().unwrap().to_string();
            let value = match (&var["value"], var["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                (Value::String(value), _) => value.clone(),
                (_, Some("metadata.namespace")) => namespace.to_string(),
                (_, Some("metadata.name")) => pod.to_string(),
                (_, Some("metadata.uid")) => "00000000-0000-0000-0000-000000000001".to_string(),
                other => panic!("{name}: no test value for {other:?}"),
            };
            let moved = ports.iter().find(|(var, _)| *var == name).map(|(_, port)| format!("127.0.0.1:{port}"));
            (name, moved.unwrap_or(value))
        })
        .collect();
    (args, vars)
}

fn borrowed(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test]
async fn controller_and_proxy_run_as_the_chart_renders_them() {
    support::use_private_cluster(&[]);
    let mut env = Env::new("rendered").await;
    let (ops, kubeconfig) = (env.ops.clone(), support::kubeconfig());
    let (port, admin, controller_admin) = (env.proxy_port, env.proxy_admin_port, support::free_port());

    let set = ["proxy.maxRequestBodyBytes=65536", "proxy.extraEnv[0].name=RUST_LOG", "proxy.extraEnv[0].value=debug"];
    let (args, vars) = rendered(
        &env,
        "templates/proxy.yaml",
        &set.map(String::from),
        "llm-proxy-proxy-7d4b9-x2x5q",
        &ops,
        &[("LLMPROXY_LISTEN_ADDR", port), ("LLMPROXY_ADMIN_ADDR", admin)],
    );
    assert!(!vars.iter().any(|(name, _)| name == "LLMPROXY_LABEL_SELECTOR"), "the chart's default watches everything");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.spawn_with_env("proxy", &args, &borrowed(&vars), &kubeconfig);

    let (args, vars) = rendered(
        &env,
        "templates/controller.yaml",
        &[],
        "llm-proxy-controller-5f6c7-abcde",
        &ops,
        &[("LLMPROXY_ADMIN_ADDR", controller_admin)],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.spawn_with_env("controller", &args, &borrowed(&vars), &kubeconfig);

    // Both pass the probes the chart gives them.
    for (role, admin) in [("proxy", admin), ("controller", controller_admin)] {
        for probe in ["healthz", "readyz"] {
            let url = format!("http://127.0.0.1:{admin}/{probe}");
            eventually(Duration::from_secs(30), || async {
                (support::http_get_status(&url).await == Some(200)).then_some(())
            })
            .await;
            println!("{role} answers /{probe}");
        }
    }
    // And do their job: a token minted by the controller, served by the proxy.
    env.create_project("p").await;
    let token = env.minted("p", "app").await;
    assert_eq!(env.wait_token("app", TokenPhase::Active).await.status.unwrap().phase, Some(TokenPhase::Active));
    let secret = env.token_secret("app").await;
    assert_eq!(secret["OPENAI_BASE_URL"], "http://llm-proxy-proxy.".to_string() + &ops + ".svc:8080/v1");
    eventually(Duration::from_secs(30), || async { support::chat_on(port, &token).await.is_empty().then_some(()) })
        .await;

    // proxy.maxRequestBodyBytes reached the proxy: a body over it is refused.
    let padded = format!(r#"{{"model":"m","messages":[],"user":"{}"}}"#, "x".repeat(70_000));
    let (url, auth) = (format!("http://127.0.0.1:{port}/v1/chat/completions"), format!("Bearer {token}"));
    let refused = support::curl("POST", &url, &[("authorization", &auth)], Some(&padded)).await;
    assert_eq!((refused.status, refused.error_code().as_str()), (413, "payload_too_large"));
    // proxy.extraEnv comes after the chart's variables, so its RUST_LOG=debug wins.
    let log = std::fs::read_to_string(env.log_path("proxy")).unwrap();
    assert!(log.contains(r#""level":"DEBUG""#), "no debug line in the proxy's log");
}
