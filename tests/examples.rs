//! The example manifests are accepted by the real API server, and the partial ones of
//! `examples/workflows/` change only what they mention when applied as documented.

mod support;

use support::{install_crds, run_kubectl};

fn path(relative: &str) -> String {
    support::repo().join("examples").join(relative).display().to_string()
}

#[tokio::test]
async fn examples_apply_and_partial_workflow_steps_keep_the_rest() {
    let client = support::client().await;
    install_crds(&client).await;
    for file in ["quickstart/00-namespaces.yaml", "quickstart/10-project.yaml", "quickstart/20-proxytoken.yaml"] {
        let out = run_kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &path(file)]);
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let dry = |file: &str| {
        let out = run_kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=lifecycle",
            "--dry-run=server",
            "-o",
            "json",
            "-f",
            &path(file),
        ]);
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let deactivated = dry("workflows/deactivate.yaml");
    assert_eq!(deactivated["spec"]["active"], false);
    assert_eq!(deactivated["spec"]["apiKeySecretRef"]["name"], "demo-openai-key", "the rest of the spec is kept");
    assert_eq!(dry("workflows/reactivate.yaml")["spec"]["active"], true);
    let revoked = dry("workflows/revoke-token.yaml");
    assert_eq!(revoked["spec"]["revoked"], true);
    let rotated = dry("workflows/rotate-key-new-secret.yaml");
    let items = rotated["items"].as_array().map(|i| i.to_vec()).unwrap_or_else(|| vec![rotated.clone()]);
    assert!(items.iter().any(|o| o["spec"]["apiKeySecretRef"]["name"] == "demo-openai-key-2026-12"), "{rotated}");
    dry("workflows/rotate-key.yaml");
    dry("workflows/namespace-grant.yaml");
}
