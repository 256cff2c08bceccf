//! llm-proxy: a Kubernetes-native credential proxy for OpenAI-style APIs.
//!
//! `[ Project ] <- [ ProxyToken ] -> [ Secret ]`
//!
//! - [`api`]: the custom resources (plain data).
//! - [`controller`]: reconciles them (finalizers, status, Events, token minting).
//! - [`index`]: watch events → an immutable routing table.
//! - [`proxy`]: the HTTP data plane (auth, key swap, streaming forward).
//! - [`token`], [`apikey`]: the two secrets, with redacting `Debug`.
#![forbid(unsafe_code)]

pub mod api;
pub mod apikey;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod duration;
pub mod enforcement;
pub mod fake_upstream;
pub mod fate;
#[cfg(test)]
mod fixtures;
pub mod index;
pub mod metrics;
pub mod plugin;
pub mod proxy;
pub mod telemetry;
pub mod token;
