//! `spec.limits` of Projects and ProxyTokens: what a request may do besides being
//! authorised. A request must pass the limits of its token and of its Project.
// The schema derives generate items at these spans that the lint takes for unreachable.
#![allow(unreachable_pub)]

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Limits on what requests may do.
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
    /// headers and `Retry-After` (the SDKs wait and retry). On ProxyTokens only, so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub requests_per_minute: Option<i64>,
}

/// One entry of [`Limits::models`].
pub type ModelPattern = String;
