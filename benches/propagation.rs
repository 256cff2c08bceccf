//! Propagation benchmark, with two proxy replicas: time from an API write (revoke a
//! token, deactivate a project, rotate a key in place or by pointing the project at a new
//! Secret) to (a) the first request through replica A
//! that sees the new state and (b) every replica reporting that it enforces the write
//! (its report Lease names a resource version at least the write's).
//!
//! Needs the local control plane (KUBECONFIG) and the release `llm-proxy` binary
//! (`BENCH_PROXY_BIN`, default `target/release/llm-proxy`). Prints p50/p99/max per
//! kind of change as Markdown table rows. Run by `benches/harness.sh`.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use llm_proxy::api::ProxyToken;
use llm_proxy::enforcement::Check;
use llm_proxy::fake_upstream::FakeUpstream;
use llm_proxy::index::Kind;
use llm_proxy::token::Token;
use serde_json::json;

const LABEL: &str = "llmproxy.io/bench-propagation";
const NS: &str = "bench-propagation";

type HttpClient = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

#[tokio::main]
async fn main() {
    // Trials of each change (100; `just bench --quick` runs 20).
    let trials: usize = std::env::var("BENCH_PROPAGATION_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let client = Client::try_default().await.expect("KUBECONFIG must point at the local control plane");
    let upstream = FakeUpstream::start().await.unwrap();
    let apply = PatchParams::apply("bench").force();
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": NS } })).unwrap();
    let _ = Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await;
    let put_key = |value: String| {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
        let secret = json!({ "apiVersion": "v1", "kind": "Secret", "metadata": key_metadata("key"), "stringData": { "apiKey": value } });
        let apply = apply.clone();
        async move { secrets.patch("key", &apply, &Patch::Apply(&secret)).await.unwrap() }
    };
    put_key(key(0)).await;
    let projects: Api<llm_proxy::api::Project> = Api::all(client.clone());
    let project = json!({
        "apiVersion": "llmproxy.io/v1alpha1", "kind": "Project",
        "metadata": { "name": "bench-propagation", "labels": { LABEL: "1" } },
        "spec": { "apiKeySecretRef": { "name": "key" }, "upstream": { "url": upstream.url }, "allowedNamespaces": { "from": "All" }, "active": true }
    });
    projects.patch("bench-propagation", &apply, &Patch::Apply(&project)).await.unwrap();

    // Tokens written straight into status (as a controller would): this measures the proxy.
    let tokens: Api<ProxyToken> = Api::namespaced(client.clone(), NS);
    let mut secrets = Vec::new();
    for i in 0..trials + 1 {
        let name = format!("t{i}");
        let token = Token::mint().unwrap();
        let object = json!({
            "apiVersion": "llmproxy.io/v1alpha1", "kind": "ProxyToken",
            "metadata": { "name": name, "labels": { LABEL: "1" } },
            "spec": { "projectRef": { "name": "bench-propagation" }, "duration": "720h" }
        });
        let _ = tokens.delete(&name, &Default::default()).await;
        tokens.create(&PostParams::default(), &serde_json::from_value(object).unwrap()).await.unwrap();
        let status = json!({ "status": { "phase": "Active", "tokenHash": token.hash().to_string(), "issuedAt": llm_proxy::api::micros(jiff::Timestamp::now()) } });
        tokens.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
        secrets.push(token);
    }

    let (mut proxy, port, _admin) = support::spawn_proxy(NS, LABEL);
    let (mut proxy_b, _port_b, _admin_b) = support::spawn_proxy(NS, LABEL);
    let http: HttpClient = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let url = format!("http://127.0.0.1:{port}/v1/models");
    let status_of = |token: &Token| {
        let request = hyper::Request::get(&url)
            .header("authorization", format!("Bearer {}", token.expose()))
            .body(Empty::new())
            .unwrap();
        let http = http.clone();
        async move {
            match http.request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let _ = response.into_body().collect().await;
                    status
                }
                Err(_) => 0,
            }
        }
    };
    // Wait until every token routes.
    let started = Instant::now();
    while status_of(&secrets[trials]).await != 200 {
        assert!(started.elapsed() < Duration::from_secs(30), "proxy never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Both replicas have synced and reported before the first trial.
    let started = Instant::now();
    while !enforced_by(&client, 2, Kind::Project, 0).await {
        assert!(started.elapsed() < Duration::from_secs(30), "the replicas never reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (mut revoke, mut revoke_all) = (Vec::new(), Vec::new());
    for (i, token) in secrets.iter().take(trials).enumerate() {
        assert_eq!(status_of(token).await, 200);
        let t0 = Instant::now();
        let changed = tokens
            .patch(&format!("t{i}"), &PatchParams::default(), &Patch::Merge(json!({ "spec": { "revoked": true } })))
            .await
            .unwrap();
        let first = async {
            while status_of(token).await != 401 {}
            t0.elapsed()
        };
        let (first, all) = tokio::join!(first, until_enforced(&client, Kind::Token, &changed.metadata, t0));
        revoke.push(first);
        revoke_all.push(all);
        settle().await;
    }

    let probe = &secrets[trials];
    let (mut deactivate, mut deactivate_all) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        let t0 = Instant::now();
        let changed = projects
            .patch("bench-propagation", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "active": false } })))
            .await
            .unwrap();
        let first = async {
            while status_of(probe).await != 403 {}
            t0.elapsed()
        };
        let (first, all) = tokio::join!(first, until_enforced(&client, Kind::Project, &changed.metadata, t0));
        deactivate.push(first);
        deactivate_all.push(all);
        let back = projects
            .patch("bench-propagation", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "active": true } })))
            .await
            .unwrap();
        while status_of(probe).await != 200 {}
        // The reactivation is a change too: let its report go out before the next trial.
        until_enforced(&client, Kind::Project, &back.metadata, Instant::now()).await;
        settle().await;
    }

    // One request through replica A; whether the upstream received it with `expected`.
    let upstream_got = |expected: &str| {
        let expected = expected.to_string();
        let (request, upstream) = (status_of(probe), upstream.clone());
        async move {
            assert_eq!(request.await, 200);
            upstream.last_request().and_then(|r| r.header("authorization")).as_deref() == Some(expected.as_str())
        }
    };
    let (mut rotate, mut rotate_all) = (Vec::new(), Vec::new());
    for i in 1..=trials {
        let expected = format!("Bearer {}", key(i));
        let t0 = Instant::now();
        let changed = put_key(key(i)).await;
        let first = async {
            while !upstream_got(&expected).await {}
            t0.elapsed()
        };
        let (first, all) = tokio::join!(first, until_enforced(&client, Kind::Secret, &changed.metadata, t0));
        rotate.push(first);
        rotate_all.push(all);
        settle().await;
    }
    // The same key change made the other way: the Project pointed at a new, existing
    // Secret. Measured like the rotation, so the two rows compare the two paths.
    let key_secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    for i in 1..=trials {
        let name = format!("key-{i}");
        let secret = json!({ "apiVersion": "v1", "kind": "Secret", "metadata": key_metadata(&name), "stringData": { "apiKey": key(trials + i) } });
        key_secrets.patch(&name, &apply, &Patch::Apply(&secret)).await.unwrap();
    }
    let (mut repoint, mut repoint_all) = (Vec::new(), Vec::new());
    for i in 1..=trials {
        let expected = format!("Bearer {}", key(trials + i));
        let t0 = Instant::now();
        let to = json!({ "spec": { "apiKeySecretRef": { "name": format!("key-{i}") } } });
        let changed = projects.patch("bench-propagation", &PatchParams::default(), &Patch::Merge(&to)).await.unwrap();
        let first = async {
            while !upstream_got(&expected).await {}
            t0.elapsed()
        };
        let (first, all) = tokio::join!(first, until_enforced(&client, Kind::Project, &changed.metadata, t0));
        repoint.push(first);
        repoint_all.push(all);
        settle().await;
    }
    for child in [&mut proxy, &mut proxy_b] {
        let _ = child.kill();
        let _ = child.wait();
    }

    for (what, first, all) in [
        ("revoke a token", revoke, revoke_all),
        ("deactivate a project", deactivate, deactivate_all),
        ("rotate the key in place", rotate, rotate_all),
        ("point the project at a new Secret", repoint, repoint_all),
    ] {
        let (p50, p99, max) = summary(first);
        let (all_p50, all_p99, all_max) = summary(all);
        println!("| {what} | {trials} | {p50:.1} | {p99:.1} | {max:.1} | {all_p50:.1} | {all_p99:.1} | {all_max:.1} |");
    }
}

/// Replicas report what changed at most every 100 ms (their default): trials are spaced
/// so that each measures one change on its own, as a revocation in real life is.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

/// Whether `replicas` live replicas report, and all enforce `kind` at `version`.
async fn enforced_by(client: &Client, replicas: usize, kind: Kind, version: u64) -> bool {
    let reports = llm_proxy::enforcement::list(client, NS).await.unwrap();
    let check = Check::of(&reports, &[(kind, version)]);
    check.live == replicas && check.is_enforced()
}

/// Time from `t0` until both replicas report the write that returned `meta`.
async fn until_enforced(client: &Client, kind: Kind, meta: &kube::api::ObjectMeta, t0: Instant) -> Duration {
    let version = llm_proxy::index::resource_version(meta);
    while !enforced_by(client, 2, kind, version).await {
        assert!(t0.elapsed() < Duration::from_secs(30), "the replicas never reported version {version}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t0.elapsed()
}

fn key(i: usize) -> String {
    format!("sk-bench-propagation-0123456789-{i:06}")
}

/// p50, p99 and max in milliseconds.
fn summary(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).saturating_sub(1)].as_secs_f64() * 1000.0;
    (at(0.5), at(0.99), at(1.0))
}

/// Metadata of a key Secret bound to the bench's Project.
fn key_metadata(name: &str) -> serde_json::Value {
    json!({
        "name": name,
        "labels": { "llmproxy.io/api-key": "true" },
        "annotations": { "llmproxy.io/projects": "bench-propagation" },
    })
}
