//! Model allowlists (`spec.limits.models` of Projects and ProxyTokens): which models a
//! request may name. Plain data: the routing table holds them, the proxy asks them.

use std::sync::Arc;

/// A list of exact model names and prefixes ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelAllowlist(Arc<[Box<str>]>);

impl ModelAllowlist {
    /// The list of `entries`, as `spec.limits.models` holds them (the API server has
    /// checked their shape).
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Self {
        Self(entries.iter().map(|e| Box::from(e.as_ref())).collect())
    }

    /// Whether `model` is on the list: equal to an entry, or starting with the prefix
    /// of an entry ending in `*`.
    pub fn allows(&self, model: &str) -> bool {
        self.0.iter().any(|entry| match entry.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => model == &**entry,
        })
    }

    /// The entries, comma-separated, for error messages.
    pub fn describe(&self) -> String {
        self.0.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_and_prefixes() {
        let list = ModelAllowlist::new(&["gpt-4o-mini", "ft:gpt-4o-mini:acme:*", "text-embedding-3*"]);
        assert!(list.allows("gpt-4o-mini"));
        assert!(!list.allows("gpt-4o-mini-2024-07-18"), "an exact entry is not a prefix");
        assert!(!list.allows("gpt-4o"));
        assert!(list.allows("ft:gpt-4o-mini:acme:custom:abc123"));
        assert!(!list.allows("ft:gpt-4o-mini:other:custom:abc123"));
        assert!(list.allows("text-embedding-3-large"));
        assert!(!list.allows(""));
        assert_eq!(list.describe(), "gpt-4o-mini, ft:gpt-4o-mini:acme:*, text-embedding-3*");
    }
}
