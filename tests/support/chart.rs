//! The Helm chart, rendered by the helm `hack/setup.sh` builds.

use std::process::Command;
use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use llm_proxy::api::Project;

use super::{Env, eventually, kubernetes_version, repo};

/// The chart's pieces, rendered by the helm that `hack/setup.sh` builds.
impl Env {
    /// Renders `template` of the chart with `--set` values, as parsed YAML documents.
    pub fn render_chart(&self, release: &str, template: &str, set: &[String]) -> Vec<serde_json::Value> {
        let helm = super::cache().join("bin/helm");
        let mut command = Command::new(&helm);
        command.args(["template", release]).arg(repo().join("charts/llm-proxy"));
        command.args(["--namespace", &self.ops, "--kube-version", &kubernetes_version(), "--show-only", template]);
        for value in set {
            command.args(["--set", value]);
        }
        let output = command.output().unwrap_or_else(|e| panic!("running {} (run hack/setup.sh): {e}", helm.display()));
        assert!(output.status.success(), "helm template failed: {}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8(output.stdout).unwrap();
        serde_yaml::Deserializer::from_str(&text)
            .filter_map(|doc| <Option<serde_json::Value> as serde::Deserialize>::deserialize(doc).unwrap())
            .collect()
    }

    /// Installs the chart's Project-deletion policy, limited to this test's Projects, and
    /// waits until it denies deleting `project` (checked with dry-run deletes).
    pub async fn install_deletion_policy(&self, project: &str) {
        let selector = format!("projectDeletionPolicy.objectSelector.matchLabels.llmproxy\\.io/test={}", self.id);
        let docs = self.render_chart(&format!("t-{}", self.id), "templates/project-deletion-policy.yaml", &[selector]);
        assert_eq!(docs.len(), 2, "a policy and its binding");
        let vap: Api<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy> =
            Api::all(self.client.clone());
        let binding: Api<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding> =
            Api::all(self.client.clone());
        let apply = PatchParams::apply("llm-proxy-tests").force();
        for doc in docs {
            let name = doc["metadata"]["name"].as_str().unwrap().to_string();
            match doc["kind"].as_str() {
                Some("ValidatingAdmissionPolicy") => vap.patch(&name, &apply, &Patch::Apply(&doc)).await.map(drop),
                Some("ValidatingAdmissionPolicyBinding") => {
                    binding.patch(&name, &apply, &Patch::Apply(&doc)).await.map(drop)
                }
                other => panic!("unexpected {other:?}"),
            }
            .unwrap();
        }
        let projects: Api<Project> = Api::all(self.client.clone());
        let dry_run = kube::api::DeleteParams { dry_run: true, ..Default::default() };
        let name = self.scoped(project);
        eventually(Duration::from_secs(20), || async { projects.delete(&name, &dry_run).await.is_err().then_some(()) })
            .await;
    }
}
