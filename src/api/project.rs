//! The cluster-scoped `Project`: an upstream API key (held in a Secret) and who may use it.
// Repeated `printcolumn`/`selectable` keys are how kube-derive lists columns, not mistakes.
#![allow(clippy::duplicated_attributes)]
// The schema derives generate items at these spans that the lint takes for unreachable.
#![allow(unreachable_pub)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Finalizer that keeps a Project (and its audit trail) when someone deletes it.
pub const PROJECT_FINALIZER: &str = "llmproxy.io/project-protection";

/// Desired state of a Project.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "llmproxy.io",
    version = "v1alpha1",
    kind = "Project",
    status = "ProjectStatus",
    shortname = "proj",
    category = "llmproxy",
    doc = "An upstream LLM API key and the namespaces whose ProxyTokens may use it",
    printcolumn(name = "Display Name", type_ = "string", json_path = ".spec.displayName"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Reason", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].reason"#),
    printcolumn(name = "Tokens", type_ = "integer", json_path = ".status.tokens.total"),
    printcolumn(name = "Active Tokens", type_ = "integer", json_path = ".status.tokens.active", priority = 1),
    printcolumn(name = "Key", type_ = "string", json_path = ".status.apiKeyHint", priority = 1),
    printcolumn(
        name = "Tokens Today",
        type_ = "integer",
        json_path = r#".status.tokenWindows[?(@.window=="Day")].usedTokens"#,
        priority = 1
    ),
    printcolumn(
        name = "Left Month",
        type_ = "integer",
        json_path = r#".status.tokenWindows[?(@.window=="Month")].remainingTokens"#,
        priority = 1
    ),
    printcolumn(
        name = "Spent Month",
        type_ = "string",
        json_path = r#".status.costWindows[?(@.window=="Month")].usedUSD"#,
        priority = 1
    ),
    printcolumn(
        name = "Budget Left",
        type_ = "string",
        json_path = r#".status.costWindows[?(@.window=="Month")].remainingUSD"#,
        priority = 1
    ),
    printcolumn(name = "Upstream", type_ = "string", json_path = ".spec.upstream.url", priority = 1),
    printcolumn(
        name = "Enforced",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Enforced")].status"#,
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].message"#,
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    selectable = ".status.phase",
    selectable = ".spec.active"
)]
#[x_kube(validation = Rule::new(
    "!has(oldSelf.tokensNotBefore) || (has(self.tokensNotBefore) && self.tokensNotBefore >= oldSelf.tokensNotBefore)"
).message("tokensNotBefore cannot be removed or moved back: a bulk revocation is permanent"))]
#[serde(rename_all = "camelCase")]
pub struct ProjectSpec {
    /// Human name shown in listings, e.g. "Production API".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub display_name: Option<String>,

    /// `false` deactivates the project: its tokens are refused (not revoked) and no new
    /// tokens are minted until it is active again.
    #[serde(default = "default_true")]
    pub active: bool,

    /// The Secret, in the operator's namespace, that holds the upstream API key.
    pub api_key_secret_ref: SecretKeyRef,

    /// Where requests are forwarded, and so where the key is sent. Required, with no
    /// default: an edit that drops it is refused instead of silently sending the key to
    /// another upstream.
    pub upstream: Upstream,

    /// Namespaces whose ProxyTokens may use this project. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<AllowedNamespaces>,

    /// Every token issued before this time is revoked for good (bulk revocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_not_before: Option<Time>,

    /// Limits for every request with this project's tokens (each token may narrow them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<super::Limits>,

    /// The PriceList that prices the cost budgets (`limits.costPerMonth`) of this
    /// project and its tokens. Absent: the PriceList named `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub price_list: Option<String>,
}

/// The PriceList a Project prices from unless its `spec.priceList` names another.
pub const DEFAULT_PRICE_LIST: &str = "default";

fn default_true() -> bool {
    true
}

/// A key in a Secret of the operator's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// Key inside the Secret's data.
    #[serde(default = "default_api_key_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The key under which a Secret holds the API key unless `apiKeySecretRef.key` says otherwise.
pub const DEFAULT_API_KEY_KEY: &str = "apiKey";

fn default_api_key_key() -> String {
    DEFAULT_API_KEY_KEY.to_string()
}

/// The upstream API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// Base URL of an OpenAI-compatible API, without the `/v1` suffix, e.g.
    /// `https://api.openai.com`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(
        "isURL(self) && (self.startsWith('https://') || self.startsWith('http://'))"
    ).message("upstream.url must be an absolute http:// or https:// URL, e.g. https://api.openai.com"))]
    pub url: String,
}

/// Which namespaces may hold ProxyTokens for a project.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.from != 'Selector' || has(self.selector)")
    .message("allowedNamespaces.selector is required when from is Selector"))]
pub struct AllowedNamespaces {
    /// `All` namespaces, or those matching `selector`.
    pub from: NamespacesFrom,
    /// Label selector on Namespaces, used when `from` is `Selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// How `allowedNamespaces` picks namespaces.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamespacesFrom {
    /// Every namespace.
    All,
    /// Namespaces whose labels match the selector.
    Selector,
}

/// Observed state of a Project, written by the controller.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProjectStatus {
    /// `Active` or `Inactive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ProjectPhase>,
    /// The API key, masked (`sk-…Ab12`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_hint: Option<String>,
    /// A one-way fingerprint of the key, so rotations can be told apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_fingerprint: Option<String>,
    /// Token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenCounts>,
    /// The most recently issued tokens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_tokens: Vec<TokenSummary>,
    /// The `spec.tokensNotBefore` the controller has acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_not_before: Option<MicroTime>,
    /// With `limits.requestsPerMinute`: the latest minute a request was admitted in, for
    /// all the Project's tokens together, and the requests proxy replicas reserved in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_minute: Option<super::RequestWindow>,
    /// With token limits in `spec.limits`: each window's usage by all the Project's
    /// tokens together, what is left, and the shares proxy replicas reserved (written
    /// by the proxies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_windows: Vec<super::TokenWindow>,
    /// With `limits.costPerMonth`: the month's spend by all the Project's tokens
    /// together, what is left, and the shares proxy replicas reserved (written by the
    /// proxies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cost_windows: Vec<super::CostWindow>,
    /// The last usage flush each proxy process wrote into `tokenWindows` (see the
    /// ProxyToken field of the same name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage_flushes: Vec<super::UsageFlush>,
    /// `Ready`, `APIKeyValid`, `DeletionBlocked`, `Enforced`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Whether a project routes requests.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectPhase {
    /// Requests with its tokens are forwarded.
    Active,
    /// Deactivated (or deletion requested): requests are refused, tokens are kept.
    Inactive,
}

impl ProjectPhase {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectPhase::Active => "Active",
            ProjectPhase::Inactive => "Inactive",
        }
    }
}

/// How many tokens a project has.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// Every ProxyToken that names the project.
    pub total: u32,
    /// Those in phase `Active`.
    pub active: u32,
}

/// One line of `status.recentTokens`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TokenSummary {
    /// Namespace of the ProxyToken.
    pub namespace: String,
    /// Name of the ProxyToken.
    pub name: String,
    /// Its phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// When it was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<MicroTime>,
}

/// Condition types of a Project.
pub mod project_conditions {
    /// The project routes requests: active and with a valid key.
    pub const READY: &str = "Ready";
    /// The referenced Secret holds a well-formed API key.
    pub const API_KEY_VALID: &str = "APIKeyValid";
    /// Someone asked to delete the project; the finalizer keeps it.
    pub const DELETION_BLOCKED: &str = "DeletionBlocked";
    /// Every live proxy replica enforces the project's latest change (spec, key);
    /// `lastTransitionTime` says since when.
    pub const ENFORCED: &str = "Enforced";
}
