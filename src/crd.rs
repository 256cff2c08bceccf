//! The CustomResourceDefinitions as YAML: what `llm-proxy crd` prints and `crds/` holds.

use kube::CustomResourceExt;

use crate::api::{Project, ProxyToken};

/// Both CRDs as one multi-document YAML stream.
pub fn all_yaml() -> String {
    let docs = [Project::crd(), ProxyToken::crd()]
        .map(|crd| serde_yaml::to_string(&crd).expect("CRDs serialize to YAML"));
    format!("---\n{}---\n{}", docs[0], docs[1])
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_crds_match_the_code() {
        let committed = include_str!("../crds/llmproxy.io.yaml");
        assert!(
            committed == super::all_yaml(),
            "crds/llmproxy.io.yaml is stale: run `cargo run -- crd > crds/llmproxy.io.yaml`"
        );
    }
}
