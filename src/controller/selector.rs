//! Label-selector matching for `allowedNamespaces`, with Kubernetes' semantics.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` match `selector`. An empty selector matches everything.
pub(crate) fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
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
