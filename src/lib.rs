//! llm-proxy: a Kubernetes-native credential proxy for OpenAI-style APIs.
//!
//! `[ Project ] <- [ ProxyToken ] -> [ Secret ]`
//!
//! - [`api`]: the custom resources (plain data).
//! - `controller`: reconciles them (finalizers, status, Events, token minting).
//! - [`index`]: watch events → an immutable routing table.
//! - `proxy`: the HTTP data plane (auth, key swap, streaming forward).
//! - `fate`, `grant`: a minted token's fate and which namespaces may use a project, the
//!   rules controller and proxy share.
//! - [`enforcement`]: what each proxy replica enforces, reported and checked.
//! - [`token`], `apikey`: the two secrets, with redacting `Debug`.
//!
//! Public: what the binaries, the integration tests and the benches use. The rest is
//! crate-private, and `unreachable_pub` keeps it so: the compiler reports what nothing
//! uses.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod api;
mod apikey;
pub use apikey::key_format_problem;
#[cfg(feature = "fake-upstream")]
pub mod bare_forwarder;
pub mod cli;
mod controller;
mod crd;
pub mod descriptors;
mod duration;
pub mod enforcement;
#[cfg(feature = "fake-upstream")]
pub mod fake_upstream;
mod fate;
#[cfg(test)]
mod fixtures;
mod grant;
pub mod index;
mod metrics;
mod models;
mod pricing;
mod proxy;
pub mod telemetry;
pub mod token;
mod windows;
