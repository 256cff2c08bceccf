//! The cluster-scoped `PriceList`: what each model costs, per million LLM tokens, for
//! the cost budgets of `spec.limits.costPerMonth`. Kept by a cluster admin; a Project
//! prices from the list its `spec.priceList` names (`default` unless it says otherwise).
// Repeated `printcolumn` keys are how kube-derive lists columns, not mistakes.
#![allow(clippy::duplicated_attributes)]
// The schema derives generate items at these spans that the lint takes for unreachable.
#![allow(unreachable_pub)]

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Prices of the models an upstream serves, in US dollars per million LLM tokens.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[kube(
    group = "llmproxy.io",
    version = "v1alpha1",
    kind = "PriceList",
    shortname = "prices",
    category = "llmproxy",
    doc = "Prices of models per million LLM tokens, for the cost budgets of Projects and ProxyTokens",
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct PriceListSpec {
    /// Where the prices come from and when they were read, for whoever updates them
    /// next, e.g. "https://openai.com/api/pricing, 2026-11-01".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub source: Option<String>,

    /// One price per model. A request is priced by the entry that names its model
    /// exactly, else by the longest prefix entry (`gpt-4o*`) that matches it.
    /// Each model once: the API server refuses a list that prices one twice.
    #[schemars(length(min = 1, max = 1024))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["model"]))]
    pub models: Vec<ModelPrice>,
}

/// The price of one model (or of every model with a prefix).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ModelPrice {
    /// A model name (`gpt-4o-mini`) or a prefix ending in `*` (`gpt-4o*`).
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][-A-Za-z0-9._:/@]*[*]?$')")
        .message("model is a model name (gpt-4o-mini) or a prefix ending in * (gpt-4o*); * may only end it"))]
    pub model: String,

    /// US dollars per million prompt (input) tokens, as a decimal: "2.50".
    #[schemars(length(min = 1, max = 20))]
    #[x_kube(validation = Rule::new(USD_RULE).message(USD_MESSAGE))]
    pub input_per_million: String,

    /// US dollars per million completion (output) tokens, as a decimal: "10.00".
    #[schemars(length(min = 1, max = 20))]
    #[x_kube(validation = Rule::new(USD_RULE).message(USD_MESSAGE))]
    pub output_per_million: String,
}

/// An amount of US dollars as our specs spell it: a decimal with at most six places.
pub(crate) const USD_RULE: &str = "self.matches('^[0-9]{1,9}([.][0-9]{1,6})?$')";
const USD_MESSAGE: &str = "a price is US dollars as a decimal string with at most 6 places, e.g. \"2.50\" or \"0.075\"";
