//! Custom resource types of the `llmproxy.io/v1alpha1` API. Plain data, no behaviour.
//!
//! `[ Project ] <- [ ProxyToken ] -> [ Secret ]`: a ProxyToken names its Project; the
//! Project names the Secret (in the operator's namespace) that holds the upstream key;
//! the controller writes the minted token into a Secret next to the ProxyToken. A
//! Project prices its cost budgets from a `PriceList`.

mod condition;
mod limits;
mod pricelist;
mod project;
mod proxytoken;

pub use condition::{ConditionStatus, Conditions, is_true};
pub use limits::*;
pub use pricelist::*;
pub use project::*;
pub use proxytoken::*;

/// Field manager for everything the controller writes.
pub const CONTROLLER_MANAGER: &str = "llm-proxy-controller";

/// Label that marks a Secret of the operator's namespace as an upstream API key: the
/// controller and the proxies watch only Secrets that carry it.
pub const API_KEY_LABEL: (&str, &str) = ("llmproxy.io/api-key", "true");

/// Annotation on a key Secret naming the Projects that may use its key (comma-separated
/// names, or `*` for every Project). Whoever may write Secrets in the operator's
/// namespace decides where a key may go, not whoever may write Projects.
pub const KEY_PROJECTS_ANNOTATION: &str = "llmproxy.io/projects";

/// Label on every object the controller creates.
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "llm-proxy");

/// `t` cut to whole microseconds: the precision every time in our status has, so a
/// value written and read back compares equal.
pub fn micros(t: jiff::Timestamp) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime {
    let truncated = jiff::Timestamp::from_microsecond(t.as_microsecond()).unwrap_or(t);
    k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(truncated)
}
