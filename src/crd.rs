//! The CustomResourceDefinitions as YAML: what `llm-proxy crd` prints and `crds/` holds.

use kube::CustomResourceExt;

use crate::api::{Project, ProxyToken};

/// Both CRDs as one multi-document YAML stream.
pub(crate) fn all_yaml() -> String {
    let docs =
        [Project::crd(), ProxyToken::crd()].map(|crd| serde_yaml::to_string(&crd).expect("CRDs serialize to YAML"));
    format!("---\n{}---\n{}", docs[0], docs[1])
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_crds_match_the_code() {
        for (path, committed) in [
            ("crds/llmproxy.io.yaml", include_str!("../crds/llmproxy.io.yaml")),
            ("charts/llm-proxy/files/crds.yaml", include_str!("../charts/llm-proxy/files/crds.yaml")),
        ] {
            assert!(committed == super::all_yaml(), "{path} is stale: run `just crds`");
        }
    }
}
