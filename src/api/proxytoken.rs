//! The namespaced `ProxyToken`: a credential the controller mints for a workload.
// Repeated `printcolumn`/`selectable` keys are how kube-derive lists columns, not mistakes.
#![allow(clippy::duplicated_attributes)]
// The schema derives generate items at these spans that the lint takes for unreachable.
#![allow(unreachable_pub)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a ProxyToken.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "llmproxy.io",
    version = "v1alpha1",
    kind = "ProxyToken",
    namespaced,
    status = "ProxyTokenStatus",
    shortname = "ptok",
    category = "llmproxy",
    doc = "A credential for one workload, minted by the controller into a Secret",
    printcolumn(name = "Project", type_ = "string", json_path = ".spec.projectRef.name"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Requests", type_ = "integer", json_path = ".status.requestCount"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxRequests"),
    printcolumn(name = "RPM", type_ = "integer", json_path = ".spec.limits.requestsPerMinute", priority = 1),
    printcolumn(
        name = "Minute",
        type_ = "date",
        json_path = ".status.currentMinute.start",
        priority = 1
    ),
    printcolumn(name = "In Minute", type_ = "integer", json_path = ".status.currentMinute.claimedRequests", priority = 1),
    printcolumn(
        name = "Tokens Today",
        type_ = "integer",
        json_path = r#".status.tokenWindows[?(@.window=="Day")].usedTokens"#,
        priority = 1
    ),
    printcolumn(
        name = "Left Today",
        type_ = "integer",
        json_path = r#".status.tokenWindows[?(@.window=="Day")].remainingTokens"#,
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
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].reason"#,
        priority = 1
    ),
    printcolumn(name = "Last Used", type_ = "date", json_path = ".status.lastUsedAt", priority = 1),
    printcolumn(
        name = "Enforced",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Enforced")].status"#,
        priority = 1
    ),
    printcolumn(name = "Secret", type_ = "string", json_path = ".status.secretName", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    selectable = ".spec.projectRef.name",
    selectable = ".status.phase",
    // The binding in status, for every writer (rules on the whole object, so that
    // removing status or a field in one write and setting it in the next gets nowhere):
    // once the token's Secret is written, Issued=True stays and the hash and issue time
    // are fixed (before that a lost mint may be minted again); projectUid is set once;
    // requestCount never goes down.
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.conditions) || !oldSelf.status.conditions.exists(c, c.type == 'Issued' && c.status == 'True') || \
         (has(self.status) && has(self.status.conditions) && self.status.conditions.exists(c, c.type == 'Issued' && c.status == 'True') && \
          has(self.status.tokenHash) && has(oldSelf.status.tokenHash) && self.status.tokenHash == oldSelf.status.tokenHash && \
          has(self.status.issuedAt) && has(oldSelf.status.issuedAt) && self.status.issuedAt == oldSelf.status.issuedAt)"
    ).message("a token whose Secret is written keeps Issued=True, its status.tokenHash and its status.issuedAt: create a new ProxyToken"),
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.projectUid) || (has(self.status) && has(self.status.projectUid) && self.status.projectUid == oldSelf.status.projectUid)"
    ).message("status.projectUid is set once: a token stays bound to the Project it was minted for"),
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.requestCount) || (has(self.status) && has(self.status.requestCount) && self.status.requestCount >= oldSelf.status.requestCount)"
    ).message("status.requestCount never goes down: it counts requests already forwarded")
)]
#[x_kube(validation = Rule::new(
    "has(self.secretName) == has(oldSelf.secretName) && (!has(self.secretName) || self.secretName == oldSelf.secretName)"
).message("secretName is immutable: create a new ProxyToken to use another Secret"))]
#[x_kube(validation = Rule::new(
    "!has(oldSelf.maxRequests) || (has(self.maxRequests) && self.maxRequests <= oldSelf.maxRequests)"
).message("maxRequests can be lowered, never raised or removed: create a new ProxyToken for a larger cap"))]
#[serde(rename_all = "camelCase")]
pub struct ProxyTokenSpec {
    /// The Project whose upstream key this token uses. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("projectRef is immutable: create a new ProxyToken for another project"))]
    pub project_ref: ProjectRef,

    /// Lifetime from issue, as a Go duration (`720h`, `90m`); at most one year. Immutable.
    #[schemars(length(min = 2, max = 64), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(
        validation = Rule::new("duration(self) > duration('0s') && duration(self) <= duration('8760h')")
            .message("duration must be more than 0s and at most 8760h (one year), e.g. 720h"),
        validation = Rule::new("self == oldSelf").message("duration is immutable: create a new ProxyToken for another lifetime")
    )]
    pub duration: String,

    /// Lifetime cap on forwarded requests. Absent: unlimited. Once set it can be lowered,
    /// never raised or removed: a larger cap takes a new ProxyToken (a new value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests: Option<i64>,

    /// `true` revokes the token for good.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self || !oldSelf").message("revocation cannot be undone: create a new ProxyToken instead"))]
    pub revoked: bool,

    /// Secret (in this namespace) that receives the token. Default: the ProxyToken's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub secret_name: Option<String>,

    /// Limits for this token's requests, on top of its Project's: a request must pass
    /// both (so a token can only narrow what its Project allows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<super::Limits>,
}

/// A reference to a Project by name.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProjectRef {
    /// Name of the Project.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Observed state of a ProxyToken. Its binding holds for whoever writes status, with or
/// without the chart's status policy: see the rules on [`ProxyToken`].
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyTokenStatus {
    /// Where the token is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TokenPhase>,
    /// `sha256:<hex>` of the token; the plaintext is only in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hash: Option<String>,
    /// The Secret that holds the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// `metadata.uid` of the Project the token was minted for. The token is bound to
    /// that object for life: a Project deleted and created again under the same name is
    /// another object, and does not inherit the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_uid: Option<String>,
    /// When the token was minted, to the microsecond: bulk revocation compares it with
    /// `tokensNotBefore`, and a second's rounding would revoke tokens minted just after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<MicroTime>,
    /// `issuedAt + duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<MicroTime>,
    /// Requests forwarded with this token (written by the proxies every few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_count: Option<i64>,
    /// With `maxRequests`: requests proxy replicas have reserved in blocks (never more
    /// than `maxRequests`; at least `requestCount`). A crashed replica's unused block is
    /// lost, never spent twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_requests: Option<i64>,
    /// Last time a request was forwarded with this token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<MicroTime>,
    /// With `limits.requestsPerMinute`: the latest minute a request was admitted in, and
    /// the requests proxy replicas reserved in it (at least those they forwarded in it,
    /// never more than the limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_minute: Option<RequestWindow>,
    /// With token limits (`limits.tokensPerMinute`, `tokensPerDay`, `tokensPerMonth`,
    /// `lifetimeTokens`): each window's usage, what is left, and the shares proxy
    /// replicas reserved. One entry per limit, for its current window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_windows: Vec<TokenWindow>,
    /// With `limits.costPerMonth`: the month's spend in US dollars, what is left, and
    /// the shares proxy replicas reserved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cost_windows: Vec<CostWindow>,
    /// The last usage flush each proxy process wrote into `requestCount` (written by the
    /// proxies, with the count): a flush whose answer was lost is retried with the same
    /// sequence number and found here instead of being counted twice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage_flushes: Vec<UsageFlush>,
    /// `Issued`, `Ready`, `Enforced`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Where a token is in its life.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenPhase {
    /// Not minted yet.
    Pending,
    /// Minted and usable.
    Active,
    /// Past `expiresAt`. Final.
    Expired,
    /// Revoked by `spec.revoked` or the project's `tokensNotBefore`. Final.
    Revoked,
    /// `maxRequests` used up.
    Exhausted,
    /// Its project is inactive: refused (or not minted) until it is active again.
    ProjectInactive,
    /// Refused as written: its namespace is not (or no longer) allowed by the project,
    /// its Secret name is taken, …
    Rejected,
}

/// One calendar minute's reservations of a rate limit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RequestWindow {
    /// The minute's first instant (UTC).
    pub start: Time,
    /// Requests reserved by proxy replicas in it.
    pub claimed_requests: i64,
}

/// One window of a limit on LLM tokens (of a ProxyToken, or of a Project's tokens
/// together), as the proxy replicas together account it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenWindow {
    /// Which limit: `Minute`, `Day`, `Month` or `Lifetime`.
    pub window: super::TokenWindowKind,
    /// The window's first instant (UTC); the Unix epoch for `Lifetime`.
    pub start: Time,
    /// The limit it was last accounted against.
    pub limit: i64,
    /// LLM tokens the upstream reported for requests admitted in it (written by the
    /// proxies every few seconds).
    pub used_tokens: i64,
    /// `limit − usedTokens`, never below 0.
    pub remaining_tokens: i64,
    /// Tokens proxy replicas reserved in shares (never more than the limit; a share
    /// can be overspent only by requests already in flight when it ran out).
    pub claimed_tokens: i64,
    /// When a replica first found all of the limit claimed while less of it was used:
    /// requests in flight hold the rest, and new ones get a retryable 429 meanwhile. A
    /// minute later without the usage arriving (a replica stopped without giving its
    /// share back), the window counts as spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_since: Option<MicroTime>,
    /// When the first request was refused for it: the window is spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_at: Option<MicroTime>,
}

/// The current window of a cost budget. Amounts are US dollars as decimal strings
/// (`"12.345678"`): exact to the millionth of a dollar each answer is rounded up to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CostWindow {
    /// Which budget: `Month` (`limits.costPerMonth`).
    pub window: super::TokenWindowKind,
    /// The window's first instant (UTC).
    pub start: Time,
    /// The budget it was last accounted against.
    #[serde(rename = "limitUSD")]
    pub limit_usd: String,
    /// What the answers to requests admitted in it cost, at the PriceList's prices
    /// (written by the proxies every few seconds).
    #[serde(rename = "usedUSD")]
    pub used_usd: String,
    /// `limitUSD − usedUSD`, never below 0.
    #[serde(rename = "remainingUSD")]
    pub remaining_usd: String,
    /// What proxy replicas reserved in shares (never more than the budget).
    #[serde(rename = "claimedUSD")]
    pub claimed_usd: String,
    /// As in `tokenWindows`: when all of the budget was first found claimed while less
    /// of it was spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_since: Option<MicroTime>,
    /// When the first request was refused for it: the budget is spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_at: Option<MicroTime>,
}

/// One proxy process's last usage flush into a token's `requestCount`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UsageFlush {
    /// The proxy process (its pod, and a random suffix per start).
    pub replica: String,
    /// Its flushes are numbered from 1; this one is included in `requestCount`.
    pub sequence: i64,
    /// When it was written; entries older than a day are dropped by the next flush.
    pub at: MicroTime,
}

impl TokenPhase {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenPhase::Pending => "Pending",
            TokenPhase::Active => "Active",
            TokenPhase::Expired => "Expired",
            TokenPhase::Revoked => "Revoked",
            TokenPhase::Exhausted => "Exhausted",
            TokenPhase::ProjectInactive => "ProjectInactive",
            TokenPhase::Rejected => "Rejected",
        }
    }
}

/// Condition types of a ProxyToken.
pub mod token_conditions {
    /// The token has been minted into its Secret.
    pub const ISSUED: &str = "Issued";
    /// The token can be used right now.
    pub const READY: &str = "Ready";
    /// Every live proxy replica enforces the token's latest change (its mint, a
    /// revocation, its project's verdict); `lastTransitionTime` says since when.
    pub const ENFORCED: &str = "Enforced";
}

/// Keys of the token Secret, ready for `envFrom`.
pub mod token_secret_keys {
    /// The token, for SDKs that read `OPENAI_API_KEY`.
    pub const OPENAI_API_KEY: &str = "OPENAI_API_KEY";
    /// The proxy's `/v1` URL, for SDKs that read `OPENAI_BASE_URL`.
    pub const OPENAI_BASE_URL: &str = "OPENAI_BASE_URL";
    /// The token again, under a neutral name.
    pub const TOKEN: &str = "token";
}

/// Annotation on the token Secret with the token's hash: a Secret left by a mint whose
/// status write was lost is recognised as that mint's.
pub const TOKEN_HASH_ANNOTATION: &str = "llmproxy.io/token-hash";
