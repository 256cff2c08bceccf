//! `spec.limits` of Projects and ProxyTokens: what a request may do besides being
//! authorised. A request must pass the limits of its token and of its Project.
// The schema derives generate items at these spans that the lint takes for unreachable.
#![allow(unreachable_pub)]

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Limits on what requests may do. On a Project they hold for all its tokens together.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Models requests may name: exact names (`gpt-4o-mini`) or prefixes ending in `*`
    /// (`gpt-4o*`, `ft:gpt-4o-mini:acme:*`). Absent: every model. Checked before
    /// anything is forwarded, in JSON bodies, multipart forms (audio, image edits) and
    /// `/v1/models/{model}`; creating a batch is refused while a list applies, since
    /// its models sit in a file the proxy does not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    #[x_kube(
        validation = Rule::new("size(self) > 0")
            .message("an empty models list allows no model: remove limits.models to allow every model"),
        validation = Rule::new("self.all(m, m.matches('^[A-Za-z0-9][-A-Za-z0-9._:/@]*[*]?$'))")
            .message("each models entry is a model name (gpt-4o-mini) or a prefix ending in * (gpt-4o*); * may only end an entry"),
    )]
    pub models: Option<Vec<ModelPattern>>,

    /// Most requests in one calendar minute (UTC), over every proxy replica together:
    /// never more. Beyond it, 429 `rate_limit_exceeded` with OpenAI's rate-limit
    /// headers and `Retry-After` (the SDKs wait and retry). On a Project, for all its
    /// tokens together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub requests_per_minute: Option<i64>,

    /// Most LLM tokens (prompt + completion, as the upstream reports them) in one
    /// calendar minute (UTC). Beyond it, 429 `rate_limit_exceeded` with OpenAI's
    /// `x-ratelimit-*-tokens` headers and `Retry-After` (the SDKs wait and retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000_000_i64))]
    pub tokens_per_minute: Option<i64>,

    /// A budget of LLM tokens per calendar day (UTC). Once spent, 429
    /// `insufficient_quota` (the SDKs do not retry) until the next day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000_000_i64))]
    pub tokens_per_day: Option<i64>,

    /// A budget of LLM tokens per calendar month (UTC). Once spent, 429
    /// `insufficient_quota` until the next month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000_000_i64))]
    pub tokens_per_month: Option<i64>,

    /// A budget of LLM tokens for the token's whole life. Once spent, 429
    /// `insufficient_quota` for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000_000_i64))]
    pub lifetime_tokens: Option<i64>,

    /// A budget in US dollars per calendar month (UTC), as a decimal string ("50.00"):
    /// each answer costs its prompt and completion tokens at the prices of the
    /// Project's PriceList (`spec.priceList`). Once spent, 429 `insufficient_quota`
    /// until the next month. A request for a model the list does not price is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 20))]
    #[x_kube(
        validation = Rule::new(super::pricelist::USD_RULE)
            .message("costPerMonth is US dollars as a decimal string with at most 6 places, e.g. \"50\" or \"12.50\""),
        validation = Rule::new("self.matches('[1-9]')")
            .message("costPerMonth must be more than 0: remove it for no cost budget"),
    )]
    pub cost_per_month: Option<String>,
}

impl Limits {
    /// The LLM-token limits, each with its window.
    pub fn token_windows(&self) -> impl Iterator<Item = (TokenWindowKind, i64)> + '_ {
        [
            (TokenWindowKind::Minute, self.tokens_per_minute),
            (TokenWindowKind::Day, self.tokens_per_day),
            (TokenWindowKind::Month, self.tokens_per_month),
            (TokenWindowKind::Lifetime, self.lifetime_tokens),
        ]
        .into_iter()
        .filter_map(|(kind, limit)| Some((kind, limit?)))
    }

    /// The cost budgets, in micro-dollars, each with its window.
    pub fn cost_windows(&self) -> impl Iterator<Item = (TokenWindowKind, i64)> + '_ {
        let month = self.cost_per_month.as_deref().and_then(crate::pricing::parse_usd);
        month.map(|limit| (TokenWindowKind::Month, limit)).into_iter()
    }
}

/// The window a limit on LLM tokens counts in. Calendar windows are UTC.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenWindowKind {
    /// `tokensPerMinute`.
    Minute,
    /// `tokensPerDay`.
    Day,
    /// `tokensPerMonth`.
    Month,
    /// `lifetimeTokens`.
    Lifetime,
}

impl TokenWindowKind {
    /// The `spec.limits` field that sets it.
    pub fn field(self) -> &'static str {
        match self {
            Self::Minute => "tokensPerMinute",
            Self::Day => "tokensPerDay",
            Self::Month => "tokensPerMonth",
            Self::Lifetime => "lifetimeTokens",
        }
    }
}

/// One entry of [`Limits::models`].
pub type ModelPattern = String;
