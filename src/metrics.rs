//! Prometheus metrics of the proxy and the controller, served as text on the admin
//! port's `/metrics`.
//!
//! In: counts and timings from the request path, the index, the usage accounting and
//! the reconcilers. Out: the text exposition format. Label values are fixed strings
//! (error codes, kinds) or names of Kubernetes objects, never anything a client sends.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::index::NameHasher;

mod process;

/// A label value shared with the routing table without copying it per request.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, &self.0)
    }
}

/// Labels of `llmproxy_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Project name, empty when the request was refused before a token was known.
    pub project: Name,
    /// `upstream_2xx`/`upstream_4xx`/`upstream_5xx`, or the proxy's error code.
    pub outcome: &'static str,
}

/// Labels of `llmproxy_upstream_tokens_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenUsageLabels {
    /// Project name.
    pub project: Name,
    /// ProxyToken namespace.
    pub token_namespace: Name,
    /// ProxyToken name.
    pub token_name: Name,
    /// `prompt` or `completion`.
    pub kind: &'static str,
}

/// Labels of `llmproxy_upstream_cost_usd_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpendLabels {
    /// Project name.
    pub project: Name,
    /// ProxyToken namespace.
    pub token_namespace: Name,
    /// ProxyToken name.
    pub token_name: Name,
}

/// The `window` label values of the budget gauges.
pub(crate) const BUDGET_WINDOWS: [&str; 4] = ["Minute", "Day", "Month", "Lifetime"];

/// Labels of `llmproxy_token_budget_remaining` and `llmproxy_token_cost_remaining_usd`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    /// ProxyToken namespace.
    pub token_namespace: Name,
    /// ProxyToken name.
    pub token_name: Name,
    /// `Minute`, `Day`, `Month` or `Lifetime`.
    pub window: &'static str,
}

/// Labels of `llmproxy_project_budget_remaining` and `llmproxy_project_cost_remaining_usd`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectBudgetLabels {
    /// Project name.
    pub project: Name,
    /// `Minute`, `Day`, `Month` or `Lifetime`.
    pub window: &'static str,
}

/// Labels with one fixed string.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// What happened.
    pub result: &'static str,
}

/// Labels with a resource kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `Project`, `ProxyToken` or `Secret`.
    pub kind: &'static str,
}

/// Labels of controller reconciles.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `Project` or `ProxyToken`.
    pub kind: &'static str,
    /// `ok` or the error's metric label.
    pub result: &'static str,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// Requests by project and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Time until the upstream's response headers.
    pub upstream_latency: Histogram,
    /// Time the proxy adds before the response headers (total minus upstream).
    pub added_latency: Histogram,
    /// Prompt and completion tokens reported by the upstream.
    pub upstream_tokens: Family<TokenUsageLabels, Counter>,
    /// What those tokens cost, in US dollars, where the request's model has a price.
    pub upstream_cost: Family<SpendLabels, Counter<f64, AtomicU64>>,
    /// Tokens in the routing table.
    pub table_tokens: Gauge,
    /// Projects in the routing table.
    pub table_projects: Gauge,
    /// Generation of the routing table.
    pub table_generation: Gauge,
    /// Unix time of the last routing-table update (watch lag = now − this).
    pub table_updated: Gauge<f64, AtomicU64>,
    /// Watch errors (the last known table keeps serving meanwhile).
    pub watch_errors: Counter,
    /// Full relists, by kind (start-up, and after a watch could not resume).
    pub relists: Family<KindLabels, Counter>,
    /// Budget claims for capped tokens, by result.
    pub quota_claims: Family<ResultLabels, Counter>,
    /// LLM tokens left in each limited window of each token, as last written to its
    /// status by this replica.
    pub token_budget_remaining: Family<BudgetLabels, Gauge>,
    /// The same for the windows a Project's tokens share.
    pub project_budget_remaining: Family<ProjectBudgetLabels, Gauge>,
    /// US dollars left in each cost budget of each token, as last written by this replica.
    pub token_cost_remaining: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    /// The same for the cost budgets a Project's tokens share.
    pub project_cost_remaining: Family<ProjectBudgetLabels, Gauge<f64, AtomicU64>>,
    /// Reconciles by kind and result.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// Open connections of the API listener.
    pub connections_open: Gauge,
    /// API connections closed for waiting too long for a request.
    pub connections_timed_out: Counter,
    /// API connections closed at once: their client already held its share.
    pub connections_refused: Counter,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        // The process's own figures under their standard names, ours under `llmproxy_`.
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        let registry = root.sub_registry_with_prefix("llmproxy");
        let latency = || Histogram::new(exponential_buckets(0.000_05, 2.0, 20));
        let metrics = Self {
            requests: Family::default(),
            upstream_latency: latency(),
            added_latency: latency(),
            upstream_tokens: Family::default(),
            upstream_cost: Family::default(),
            table_tokens: Gauge::default(),
            table_projects: Gauge::default(),
            table_generation: Gauge::default(),
            table_updated: Gauge::default(),
            watch_errors: Counter::default(),
            relists: Family::default(),
            quota_claims: Family::default(),
            token_budget_remaining: Family::default(),
            project_budget_remaining: Family::default(),
            token_cost_remaining: Family::default(),
            project_cost_remaining: Family::default(),
            reconciles: Family::default(),
            connections_open: Gauge::default(),
            connections_timed_out: Counter::default(),
            connections_refused: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests by project and outcome", metrics.requests.clone());
        registry.register(
            "upstream_latency_seconds",
            "Time until the upstream's response headers",
            metrics.upstream_latency.clone(),
        );
        registry.register(
            "added_latency_seconds",
            "Time the proxy adds before the response headers",
            metrics.added_latency.clone(),
        );
        registry.register(
            "upstream_tokens",
            "Prompt and completion tokens reported by the upstream",
            metrics.upstream_tokens.clone(),
        );
        registry.register(
            "upstream_cost_usd",
            "What the upstream's reported tokens cost at the Project's PriceList, in US dollars, for requests whose model it prices",
            metrics.upstream_cost.clone(),
        );
        registry.register("routing_table_tokens", "Tokens in the routing table", metrics.table_tokens.clone());
        registry.register("routing_table_projects", "Projects in the routing table", metrics.table_projects.clone());
        registry.register(
            "routing_table_generation",
            "Generation of the routing table",
            metrics.table_generation.clone(),
        );
        registry.register(
            "routing_table_updated_timestamp_seconds",
            "Unix time of the last routing-table update",
            metrics.table_updated.clone(),
        );
        registry.register(
            "watch_errors",
            "Watch errors; the last known table keeps serving",
            metrics.watch_errors.clone(),
        );
        registry.register("watch_relists", "Full relists by kind", metrics.relists.clone());
        registry.register("quota_claims", "Budget claims for limited tokens, by result", metrics.quota_claims.clone());
        registry.register(
            "token_budget_remaining",
            "LLM tokens left in each limited window of a ProxyToken, as this replica last wrote them",
            metrics.token_budget_remaining.clone(),
        );
        registry.register(
            "project_budget_remaining",
            "LLM tokens left in each limited window a Project's tokens share, as this replica last wrote them",
            metrics.project_budget_remaining.clone(),
        );
        registry.register(
            "token_cost_remaining_usd",
            "US dollars left in each cost budget of a ProxyToken, as this replica last wrote them",
            metrics.token_cost_remaining.clone(),
        );
        registry.register(
            "project_cost_remaining_usd",
            "US dollars left in each cost budget a Project's tokens share, as this replica last wrote them",
            metrics.project_cost_remaining.clone(),
        );
        registry.register("controller_reconciles", "Reconciles by kind and result", metrics.reconciles.clone());
        registry.register("connections_open", "Open connections of the API listener", metrics.connections_open.clone());
        registry.register(
            "connections_timed_out",
            "API connections closed for sending no request in time",
            metrics.connections_timed_out.clone(),
        );
        registry.register(
            "connections_refused",
            "API connections closed at once because their client address held its share already",
            metrics.connections_refused.clone(),
        );
        Self { registry: root, ..metrics }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// Drops every series of one ProxyToken (its usage, spend and remaining budgets):
    /// called once the token is gone, or `/metrics` and the process would grow with
    /// every token ever used.
    pub fn forget_token(&self, project: &Arc<str>, namespace: &Arc<str>, name: &Arc<str>) {
        let (project, token_namespace, token_name) =
            (Name(project.clone()), Name(namespace.clone()), Name(name.clone()));
        for kind in ["prompt", "completion"] {
            let (project, token_namespace, token_name) = (project.clone(), token_namespace.clone(), token_name.clone());
            self.upstream_tokens.remove(&TokenUsageLabels { project, token_namespace, token_name, kind });
        }
        let spend = SpendLabels { project, token_namespace: token_namespace.clone(), token_name: token_name.clone() };
        self.upstream_cost.remove(&spend);
        for window in BUDGET_WINDOWS {
            let labels =
                BudgetLabels { token_namespace: token_namespace.clone(), token_name: token_name.clone(), window };
            self.token_budget_remaining.remove(&labels);
            self.token_cost_remaining.remove(&labels);
        }
    }

    /// Records one forwarded request's timings.
    pub fn latencies(&self, total: Duration, upstream: Option<Duration>) {
        if let Some(upstream) = upstream {
            self.upstream_latency.observe(upstream.as_secs_f64());
            self.added_latency.observe(total.saturating_sub(upstream).as_secs_f64());
        }
    }
}

/// One serving thread's handles on `llmproxy_requests_total`, by project and outcome.
/// The family's own lookup — a lock all threads share, SipHash over the labels, and a
/// clone of the project's name whose count every thread then writes — cost more than
/// the count; a thread finds its handle here by the name's address, in a map only it
/// locks.
#[derive(Default)]
pub(crate) struct RequestCounters {
    handles: Mutex<RequestHandles>,
}

/// Handles by the address of the project's (interned) name and the outcome; the name is
/// held, so its address cannot be reused for another while its entry exists.
type RequestHandles = HashMap<(usize, &'static str), (Arc<str>, Counter), BuildHasherDefault<NameHasher>>;

impl RequestCounters {
    /// Counts one request of `project` with `outcome` in `metrics`.
    pub(crate) fn count(&self, metrics: &Metrics, project: &Arc<str>, outcome: &'static str) {
        let key = (Arc::as_ptr(project).cast::<u8>() as usize, outcome);
        let mut handles = self.handles.lock().expect("request counters poisoned");
        let (_, counter) = handles.entry(key).or_insert_with(|| {
            let labels = RequestLabels { project: Name(project.clone()), outcome };
            (project.clone(), metrics.requests.get_or_create_owned(&labels))
        });
        counter.inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threads_request_counters_count_into_the_shared_series() {
        let metrics = Metrics::new();
        let (one, two) = (RequestCounters::default(), RequestCounters::default());
        // The same name in two allocations (before and after a re-intern) is one series.
        let (name, same_name, other) = (Arc::from("p"), Arc::from("p"), Arc::from("q"));
        one.count(&metrics, &name, "upstream_2xx");
        one.count(&metrics, &name, "upstream_2xx");
        two.count(&metrics, &same_name, "upstream_2xx");
        two.count(&metrics, &name, "token_expired");
        one.count(&metrics, &other, "upstream_2xx");
        let text = metrics.encode();
        for expected in [
            r#"llmproxy_requests_total{project="p",outcome="upstream_2xx"} 3"#,
            r#"llmproxy_requests_total{project="p",outcome="token_expired"} 1"#,
            r#"llmproxy_requests_total{project="q",outcome="upstream_2xx"} 1"#,
        ] {
            assert!(text.contains(expected), "missing {expected}\n{text}");
        }
    }

    #[test]
    fn forgetting_a_token_drops_its_series_and_nobody_elses() {
        let metrics = Metrics::new();
        let name = |s: &str| Name(Arc::from(s));
        for token in ["web", "batch"] {
            let usage = |kind| TokenUsageLabels {
                project: name("p"),
                token_namespace: name("apps"),
                token_name: name(token),
                kind,
            };
            metrics.upstream_tokens.get_or_create(&usage("prompt")).inc_by(9);
            metrics.upstream_tokens.get_or_create(&usage("completion")).inc_by(7);
            let spend = SpendLabels { project: name("p"), token_namespace: name("apps"), token_name: name(token) };
            metrics.upstream_cost.get_or_create(&spend).inc_by(0.5);
            for window in BUDGET_WINDOWS {
                let budget = BudgetLabels { token_namespace: name("apps"), token_name: name(token), window };
                metrics.token_budget_remaining.get_or_create(&budget).set(10);
                metrics.token_cost_remaining.get_or_create(&budget).set(1.0);
            }
        }
        metrics.forget_token(&Arc::from("p"), &Arc::from("apps"), &Arc::from("web"));
        let text = metrics.encode();
        assert!(!text.contains(r#"token_name="web""#), "{text}");
        // Two usage kinds, the spend and four windows of two gauges.
        assert_eq!(text.matches(r#"token_name="batch""#).count(), 2 + 1 + 2 * BUDGET_WINDOWS.len(), "{text}");
    }
}
