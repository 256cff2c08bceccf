//! The CustomResourceDefinitions as YAML: what `llm-proxy crd` prints and `crds/` holds.

use kube::CustomResourceExt;

use crate::api::{PriceList, Project, ProxyToken};

/// Every CRD, as one multi-document YAML stream.
pub(crate) fn all_yaml() -> String {
    [Project::crd(), ProxyToken::crd(), PriceList::crd()]
        .map(|crd| format!("---\n{}", serde_yaml::to_string(&crd).expect("CRDs serialize to YAML")))
        .concat()
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
