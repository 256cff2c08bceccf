//! Upstream API keys: format checks, the masked hint, and a redacting holder.
//!
//! In: the bytes of a Secret's key. Out: an [`ApiKey`] (zeroised on drop, never
//! printed) or a [`KeyProblem`] a human can act on.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use hyper::header::HeaderValue;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Shortest key accepted as complete (`sk-` plus 17 characters).
const MIN_KEY_LEN: usize = 20;
/// Longest key accepted.
const MAX_KEY_LEN: usize = 512;

/// An upstream API key, and the `Authorization` value that sends it, made once per key
/// rather than per request. `Debug` and `Display` show only the masked hint.
#[derive(Clone)]
pub struct ApiKey {
    key: Zeroizing<String>,
    /// `Bearer <key>`, marked sensitive; its bytes are wiped when the last request
    /// holding a copy of the value is done with it.
    authorization: HeaderValue,
}

impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for ApiKey {}

/// Bytes wiped on drop, as the owner of a shared [`Bytes`].
struct Wiped(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for Wiped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Why a project has no usable key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyProblem {
    /// The referenced Secret does not exist.
    SecretNotFound,
    /// The Secret is not marked as a key for this Project ([`bound_to`]).
    NotBound,
    /// The Secret exists but lacks the key.
    KeyNotFound,
    /// The value does not look like an OpenAI-style key.
    InvalidFormat,
}

impl KeyProblem {
    /// Condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            KeyProblem::SecretNotFound => "SecretNotFound",
            KeyProblem::NotBound => "SecretNotBound",
            KeyProblem::KeyNotFound => "KeyNotFound",
            KeyProblem::InvalidFormat => "InvalidAPIKeyFormat",
        }
    }

    /// What a human reads, about the key of `project` in `namespace`/`secret`.
    pub fn message(self, project: &str, secret: &str, key: &str, namespace: &str) -> String {
        let (label, value) = crate::api::API_KEY_LABEL;
        let annotation = crate::api::KEY_PROJECTS_ANNOTATION;
        match self {
            KeyProblem::SecretNotFound => format!(
                "Secret {namespace}/{secret} not found: create it with the API key under '{key}', the label {label}={value} and the annotation {annotation}={project}"
            ),
            KeyProblem::NotBound => format!(
                "Secret {namespace}/{secret} is not bound to Project {project}: whoever manages Secrets in {namespace} must label it {label}={value} and name the Project in its annotation {annotation} (kubectl annotate secret -n {namespace} {secret} {annotation}={project})"
            ),
            KeyProblem::KeyNotFound => {
                format!(
                    "Secret {namespace}/{secret} has no key '{key}': add the API key under that key or fix apiKeySecretRef.key"
                )
            }
            KeyProblem::InvalidFormat => "Invalid API key format".to_string(),
        }
    }
}

/// Which Projects a key Secret gives its key to: the rule the controller and the proxy
/// share. Only what the rule reads is kept (never the other annotations: one written by
/// `kubectl apply` holds the whole Secret, key included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct KeyBinding {
    /// It carries [`crate::api::API_KEY_LABEL`].
    marked: bool,
    /// [`crate::api::KEY_PROJECTS_ANNOTATION`], as written.
    projects: Option<String>,
}

impl KeyBinding {
    /// The binding a Secret's metadata declares.
    pub(crate) fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::from_parts(meta.labels.as_ref(), meta.annotations.as_ref())
    }

    fn from_parts(labels: Option<&BTreeMap<String, String>>, annotations: Option<&BTreeMap<String, String>>) -> Self {
        let (label, value) = crate::api::API_KEY_LABEL;
        Self {
            marked: labels.and_then(|l| l.get(label)).is_some_and(|v| v == value),
            projects: annotations.and_then(|a| a.get(crate::api::KEY_PROJECTS_ANNOTATION)).cloned(),
        }
    }

    /// Whether the key may go to `project`: the Secret is labelled a key and names the
    /// project (or `*`) in its annotation, as whole comma-separated names.
    pub(crate) fn admits(&self, project: &str) -> bool {
        let named = |list: &String| list.split(',').map(str::trim).any(|p| p == project || p == "*");
        self.marked && self.projects.as_ref().is_some_and(named)
    }
}

impl ApiKey {
    /// Validates raw Secret bytes as an API key: `sk-` prefix, complete, printable.
    pub fn parse(raw: &[u8]) -> Result<Self, KeyProblem> {
        let text = std::str::from_utf8(raw).map_err(|_| KeyProblem::InvalidFormat)?;
        // A trailing newline from `echo … | kubectl create secret` is a common slip; forgive it.
        let text = text.trim_end_matches(['\n', '\r']);
        let well_formed = text.starts_with("sk-")
            && (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !well_formed {
            return Err(KeyProblem::InvalidFormat);
        }
        let bearer = Wiped(Zeroizing::new(format!("Bearer {text}").into_bytes()));
        let mut authorization =
            HeaderValue::from_maybe_shared(Bytes::from_owner(bearer)).map_err(|_| KeyProblem::InvalidFormat)?;
        authorization.set_sensitive(true);
        Ok(Self { key: Zeroizing::new(text.to_string()), authorization })
    }

    /// The key itself.
    pub fn expose(&self) -> &str {
        &self.key
    }

    /// The upstream `Authorization` header value, `Bearer <key>` (a shared copy).
    pub fn authorization(&self) -> HeaderValue {
        self.authorization.clone()
    }

    /// `sk-…Ab12`: the prefix and the last four characters.
    pub fn hint(&self) -> String {
        let tail = &self.key[self.key.len() - 4..];
        format!("sk-…{tail}")
    }

    /// A short, one-way fingerprint that tells rotations apart without revealing the key.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.key.as_bytes());
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a form that takes a Project's key says when the controller would refuse `raw`
/// ("Invalid API key format"), or `None` when its format is accepted: the same rule the
/// controller applies, checked before the key is stored.
pub fn key_format_problem(raw: &str) -> Option<String> {
    ApiKey::parse(raw.as_bytes()).err().map(|problem| problem.message("", "", "", ""))
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.hint())
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-test-0123456789abcdefghijAb12";

    #[test]
    fn accepts_openai_style_keys_and_masks_them() {
        let key = ApiKey::parse(KEY.as_bytes()).unwrap();
        assert_eq!(key.hint(), "sk-…Ab12");
        assert_eq!(format!("{key:?}"), "ApiKey(sk-…Ab12)");
        assert_eq!(key.to_string(), "sk-…Ab12");
        assert_eq!(ApiKey::parse(format!("{KEY}\n").as_bytes()).unwrap(), key);
    }

    #[test]
    fn forms_check_a_key_with_the_controllers_rule() {
        assert_eq!(key_format_problem(KEY), None);
        assert_eq!(key_format_problem("not-a-key").as_deref(), Some("Invalid API key format"));
        assert_eq!(key_format_problem("sk-short").as_deref(), Some("Invalid API key format"));
    }

    #[test]
    fn the_authorization_value_is_made_once_and_marked_sensitive() {
        let key = ApiKey::parse(format!("{KEY}\n").as_bytes()).unwrap();
        let value = key.authorization();
        assert_eq!(value, format!("Bearer {KEY}").as_str());
        assert!(value.is_sensitive());
        assert_eq!(format!("{value:?}"), "Sensitive");
        assert_eq!(key.authorization().as_bytes().as_ptr(), value.as_bytes().as_ptr(), "a shared copy, not a new one");
    }

    #[test]
    fn a_key_secret_gives_its_key_only_to_the_projects_it_names() {
        let bound_to = |labels: Option<&BTreeMap<String, String>>,
                        annotations: Option<&BTreeMap<String, String>>,
                        project| { KeyBinding::from_parts(labels, annotations).admits(project) };
        let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let marked: BTreeMap<String, String> = map(&[("llmproxy.io/api-key", "true")]);
        let naming = |list: &str| -> BTreeMap<String, String> { map(&[("llmproxy.io/projects", list)]) };
        assert!(bound_to(Some(&marked), Some(&naming("prod")), "prod"));
        assert!(bound_to(Some(&marked), Some(&naming("staging, prod")), "prod"));
        assert!(bound_to(Some(&marked), Some(&naming("*")), "prod"));
        assert!(!bound_to(Some(&marked), Some(&naming("production")), "prod"), "whole names only");
        assert!(!bound_to(Some(&marked), Some(&naming("")), "prod"));
        assert!(!bound_to(Some(&marked), None, "prod"), "no annotation: no project");
        assert!(!bound_to(None, Some(&naming("prod")), "prod"), "not labelled a key");
        assert!(!bound_to(Some(&map(&[("llmproxy.io/api-key", "false")])), Some(&naming("prod")), "prod"));
    }

    #[test]
    fn refuses_keys_of_the_wrong_shape() {
        for bad in ["", "sk-", "sk-short", "pk-0123456789abcdefghijklmn", "sk-0123456789 abcdefghijkl"] {
            assert_eq!(ApiKey::parse(bad.as_bytes()), Err(KeyProblem::InvalidFormat), "{bad:?}");
        }
        assert_eq!(ApiKey::parse(&[0xff, 0xfe]), Err(KeyProblem::InvalidFormat));
    }

    #[test]
    fn fingerprint_tells_keys_apart_and_hides_them() {
        let a = ApiKey::parse(KEY.as_bytes()).unwrap();
        let b = ApiKey::parse(b"sk-test-0123456789abcdefghijZZ99").unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert!(!a.fingerprint().contains("sk-"));
        assert_eq!(a.fingerprint().len(), 12);
    }
}
