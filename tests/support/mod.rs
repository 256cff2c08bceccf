//! Shared by the integration tests: the real local API server, one namespace pair per
//! test, the operator's real processes, and polling helpers.
//!
//! The control plane is the one `tests/cluster/cluster.sh up` started (or
//! `LLMPROXY_KUBECONFIG`); when none runs, one is started for this test binary and
//! stops with it (`--exit-with-parent`).
//!
//! - `cluster`: the control plane, kubectl, the CRDs, an admin client;
//! - `env`: one test's world ([`Env`]): namespaces, processes, objects;
//! - `http`: real clients over real sockets (curl, hyper, the Python SDK);
//! - `chart`: the Helm chart rendered by the helm `hack/setup.sh` builds;
//! - `relay`: a cuttable TCP relay in front of the API server;
//! - `browser`: the dashboard process and headless Chromium to use it.
#![allow(dead_code)] // each test binary uses a different part of this module

mod browser;
mod chart;
mod cluster;
mod env;
mod http;
mod relay;

use std::future::Future;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use llm_proxy::api::{ProjectRef, ProxyTokenSpec};

#[allow(unused_imports)] // only the dashboard tests use it
pub use browser::*;
pub use cluster::*;
pub use env::*;
pub use http::*;
pub use relay::*;

/// Label that ties a test's Projects and ProxyTokens to its own controller and proxy.
pub const TEST_LABEL: &str = "llmproxy.io/test";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `hack/setup.sh` puts what it builds and fetches: `$LLMPROXY_CACHE`, by default
/// `~/.cache/llm-proxy`.
pub fn cache() -> PathBuf {
    std::env::var("LLMPROXY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/llm-proxy"))
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < timeout, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port for a child process to bind. Picked below Linux's ephemeral
/// range (32768–60999): a port the kernel hands out for `:0` is also where outgoing
/// connections take their source ports, and with dozens of processes talking to the API
/// server one of them took a port between our check and the child's bind (a proxy then
/// failed with "Address already in use"). Never the same port twice in one test binary.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let mut random = [0u8; 2];
        getrandom::fill(&mut random).unwrap();
        let port = 20_000 + u16::from_le_bytes(random) % 12_000;
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) && StdListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

fn short_id() -> String {
    let mut bytes = [0u8; 3];
    getrandom::fill(&mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The API key every test project starts with: recognisable, so leak checks can find it.
pub const TEST_KEY: &str = "sk-test-LEAKCHECK0123456789abcdefAb12";

/// How long tests wait for the system to converge.
pub const WAIT: Duration = Duration::from_secs(10);

/// A 720h token for `project`.
pub fn token_spec(project: &str) -> ProxyTokenSpec {
    ProxyTokenSpec {
        project_ref: ProjectRef { name: project.into() },
        duration: "720h".into(),
        max_requests: None,
        revoked: false,
        secret_name: None,
        limits: None,
    }
}
