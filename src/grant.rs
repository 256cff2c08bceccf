//! Which namespaces may hold a project's tokens: the rule the controller (before
//! minting, and in status for the token's whole life) and the proxy (on every request)
//! both apply, so that a namespace that loses its grant loses its tokens' use at once,
//! and gets it back if the grant returns (it is not a revocation).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::api::{AllowedNamespaces, NamespacesFrom};

/// Whether a namespace with `labels` may hold tokens under `grant` (a Project's
/// `spec.allowedNamespaces`; absent: none may). Pure.
pub(crate) fn admits(grant: Option<&AllowedNamespaces>, labels: &BTreeMap<String, String>) -> bool {
    match grant {
        None => false,
        Some(grant) => match grant.from {
            NamespacesFrom::All => true,
            NamespacesFrom::Selector => grant.selector.as_ref().is_some_and(|s| matches(s, labels)),
        },
    }
}

/// Whether deciding `grant` needs the namespace's labels.
pub(crate) fn needs_labels(grant: Option<&AllowedNamespaces>) -> bool {
    grant.is_some_and(|g| g.from == NamespacesFrom::Selector)
}

/// Whether `labels` match `selector`, with Kubernetes' semantics. An empty selector
/// matches everything.
fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // The API server rejects other operators; refuse rather than grant.
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn match_labels_and_expressions_all_have_to_hold() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("team", "ml")])),
            match_expressions: Some(vec![expr("env", "In", &["prod", "staging"]), expr("frozen", "DoesNotExist", &[])]),
        };
        assert!(matches(&selector, &labels(&[("team", "ml"), ("env", "prod")])));
        assert!(!matches(&selector, &labels(&[("team", "ml"), ("env", "dev")])));
        assert!(!matches(&selector, &labels(&[("team", "web"), ("env", "prod")])));
        assert!(!matches(&selector, &labels(&[("team", "ml"), ("env", "prod"), ("frozen", "")])));
    }

    #[test]
    fn a_grant_admits_all_namespaces_those_it_selects_or_none() {
        let team = labels(&[("team", "ml")]);
        assert!(!admits(None, &team), "no grant: no namespace");
        assert!(admits(Some(&AllowedNamespaces { from: NamespacesFrom::All, selector: None }), &labels(&[])));
        let selected = |key: &str| AllowedNamespaces {
            from: NamespacesFrom::Selector,
            selector: Some(LabelSelector { match_labels: Some(labels(&[(key, "ml")])), match_expressions: None }),
        };
        assert!(admits(Some(&selected("team")), &team));
        assert!(!admits(Some(&selected("owner")), &team));
        // A Selector grant without a selector (the API server refuses it) admits nobody.
        assert!(!admits(Some(&AllowedNamespaces { from: NamespacesFrom::Selector, selector: None }), &team));
    }

    #[test]
    fn not_in_and_exists() {
        let selector = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("tier", "NotIn", &["public"]), expr("owner", "Exists", &[])]),
        };
        assert!(matches(&selector, &labels(&[("owner", "a")])));
        assert!(!matches(&selector, &labels(&[("owner", "a"), ("tier", "public")])));
        assert!(!matches(&selector, &labels(&[])));
        assert!(matches(&LabelSelector::default(), &labels(&[])));
    }
}
