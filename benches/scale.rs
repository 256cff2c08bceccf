//! Scale benchmark: the routing table with many projects and tokens.
//!
//! 1. Hot-path lookup cost (`RouteTable::authorize`, SHA-256 included) with 10 and with
//!    100,000 tokens, in process, and the floor a scattered lookup cannot go below on
//!    this machine (one cache miss to memory).
//! 2. With the local control plane (KUBECONFIG): create `BENCH_SCALE_PROJECTS` Projects
//!    (default 1,000) and `BENCH_SCALE_TOKENS` ProxyTokens (default 100,000) with minted
//!    status, start the release proxy, and measure its initial sync time and resident
//!    memory.
//!
//! Prints Markdown lines. Run by `benches/harness.sh`.

mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher::Event;
use kube::{Api, Client};
use llm_proxy::api::{Project, ProxyToken};
use llm_proxy::index::{Change, Index};
use llm_proxy::token::{Token, TokenHash};
use serde_json::json;

const LABEL: &str = "llmproxy.io/bench-scale";
const NS: &str = "bench-scale";

fn project(name: &str) -> Project {
    serde_json::from_value(json!({
        "apiVersion": "llmproxy.io/v1alpha1", "kind": "Project",
        "metadata": { "name": name, "labels": { LABEL: "1" } },
        "spec": { "apiKeySecretRef": { "name": "key" }, "upstream": { "url": "http://127.0.0.1:9" }, "allowedNamespaces": { "from": "All" } }
    }))
    .unwrap()
}

fn token(name: &str, project: &str, hash: &TokenHash) -> ProxyToken {
    serde_json::from_value(json!({
        "apiVersion": "llmproxy.io/v1alpha1", "kind": "ProxyToken",
        "metadata": { "name": name, "namespace": NS, "labels": { LABEL: "1" } },
        "spec": { "projectRef": { "name": project }, "duration": "720h" },
        "status": { "phase": "Active", "tokenHash": hash.to_string(), "issuedAt": llm_proxy::api::micros(jiff::Timestamp::now()) }
    }))
    .unwrap()
}

/// Mean nanoseconds per `authorize` (hashing the plaintext included) with `n` tokens in
/// the table, for three traffic patterns: 16 tokens recur (their entries stay in
/// cache); 4,096 distinct tokens in use (a busy cluster's working set); every token of
/// the table in turn, in scattered order (the entry is a cache miss each time).
fn lookup_cost(n: usize) -> [f64; 3] {
    let mut index = Index::new();
    let key: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {
            "name": "key", "namespace": NS,
            "labels": { "llmproxy.io/api-key": "true" }, "annotations": { "llmproxy.io/projects": "*" },
        },
        "data": { "apiKey": "c2stYmVuY2gtMDEyMzQ1Njc4OWFiY2RlZmdoaWo=" }
    }))
    .unwrap();
    let plaintexts: Vec<[u8; llm_proxy::token::TOKEN_LEN]> =
        (0..n).map(|_| Token::mint().unwrap().expose().as_bytes().try_into().unwrap()).collect();
    index.apply(Change::Project(Event::Init));
    for p in 0..10 {
        index.apply(Change::Project(Event::InitApply(project(&format!("p{p}")))));
    }
    index.apply(Change::Project(Event::InitDone));
    index.apply(Change::Secret(Event::Init));
    index.apply(Change::Secret(Event::InitApply(key)));
    index.apply(Change::Secret(Event::InitDone));
    index.apply(Change::Token(Event::Init));
    for (i, t) in plaintexts.iter().enumerate() {
        let hash = TokenHash::of(std::str::from_utf8(t).unwrap());
        index.apply(Change::Token(Event::InitApply(token(&format!("t{i}"), &format!("p{}", i % 10), &hash))));
    }
    index.apply(Change::Token(Event::InitDone));
    let table = index.snapshot();
    let now = jiff::Timestamp::now().as_microsecond();
    let rounds = 2_000_000;
    // The requests' tokens in arrival order, read front to back: in the proxy a token
    // comes from the request just read, already in cache, so only the table's own memory
    // accesses should count, not fetching the plaintext from a scattered array.
    // The least of three runs: the machine's other tenants only ever add time.
    let measure = |distinct: usize| {
        let arrivals: Vec<_> = (0..distinct.min(n)).map(|i| plaintexts[(i * 7919) % n]).collect();
        (0..3)
            .map(|_| {
                let started = Instant::now();
                for token in arrivals.iter().cycle().take(rounds) {
                    let token = std::str::from_utf8(token).unwrap();
                    black_box(table.authorize(&TokenHash::of(black_box(token)), now).unwrap());
                }
                started.elapsed().as_nanos() as f64 / rounds as f64
            })
            .fold(f64::INFINITY, f64::min)
    };
    [measure(16), measure(4096), measure(n)]
}

/// Nanoseconds per step of a random walk through `bytes` of memory, one 64-byte line per
/// step, each address read from the line before: what a cache miss costs on this machine
/// when nothing overlaps it. A scattered lookup must read its token's record from memory
/// at least once, so the lookup among 10 plus one such miss is the least a lookup among
/// 100,000 can cost, whatever the table's layout.
fn dependent_miss_ns(bytes: usize) -> f64 {
    let lines = bytes / 64;
    // Sattolo's shuffle: a single cycle through every line, so the walk never settles
    // into a short loop that would stay in cache.
    let mut order: Vec<usize> = (0..lines).collect();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for i in (1..lines).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        order.swap(i, (state % i as u64) as usize);
    }
    let mut next = vec![[0usize; 8]; lines];
    for (i, &to) in order.iter().enumerate() {
        next[i][0] = to;
    }
    let steps = 4_000_000;
    (0..3)
        .map(|_| {
            let mut at = 0;
            let started = Instant::now();
            for _ in 0..steps {
                at = black_box(next[at][0]);
            }
            started.elapsed().as_nanos() as f64 / steps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Mean microseconds to apply one batch of `changed` token events to an index of `n`
/// tokens and publish its snapshot, while the previous snapshot is still held (as the
/// proxy's readers hold it). The objects are built beforehand: only the index counts.
fn update_cost(n: usize, changed: usize) -> f64 {
    let mut index = Index::new();
    let hashes: Vec<TokenHash> = (0..n).map(|_| Token::mint().unwrap().hash()).collect();
    index.apply(Change::Token(Event::Init));
    for (i, hash) in hashes.iter().enumerate() {
        index.apply(Change::Token(Event::InitApply(token(&format!("t{i}"), "p0", hash))));
    }
    index.apply(Change::Token(Event::InitDone));
    let batches = 400;
    let events: Vec<Vec<ProxyToken>> = (0..batches)
        .map(|b| {
            (0..changed)
                .map(|c| {
                    let i = (b * changed + c) * 7919 % n;
                    let mut object = token(&format!("t{i}"), "p0", &hashes[i]);
                    object.status.as_mut().unwrap().request_count = Some(b as i64);
                    object
                })
                .collect()
        })
        .collect();
    let mut published = index.snapshot();
    let started = Instant::now();
    for batch in events {
        for object in batch {
            index.apply(Change::Token(Event::Apply(object)));
        }
        let next = index.snapshot();
        black_box(std::mem::replace(&mut published, next));
    }
    started.elapsed().as_secs_f64() * 1e6 / batches as f64
}

#[tokio::main]
async fn main() {
    let small = lookup_cost(10);
    let large = lookup_cost(100_000);
    println!(
        "- Hot-path lookup (SHA-256 + table){}, 10 tokens vs 100,000: {:.0} vs {:.0} ns when 16 tokens recur (ratio {:.2}); {:.0} vs {:.0} ns with 4,096 tokens in use (ratio {:.2}); {:.0} vs {:.0} ns when each request uses the next of all 100,000 in scattered order (ratio {:.2}: cache misses per lookup).",
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("hugetlb=1")) {
            ", malloc on huge pages as in the image"
        } else {
            ""
        },
        small[0],
        large[0],
        large[0] / small[0],
        small[1],
        large[1],
        large[1] / small[1],
        small[2],
        large[2],
        large[2] / small[2],
    );
    // Larger than the leaves of 100,000 tokens (~50 MB) and than any cache here.
    let miss = dependent_miss_ns(128 << 20);
    println!(
        "- Memory floor for that last pattern: one dependent load that misses every cache costs {miss:.0} ns here (random walk over 128 MB), so a lookup among 100,000 that must read one record from memory costs at least {:.0} ns, ratio {:.2}.",
        small[2] + miss,
        (small[2] + miss) / small[2],
    );
    let update = [10, 10_000, 100_000].map(|n| update_cost(n, 1));
    let update_many = [10, 10_000, 100_000].map(|n| update_cost(n, 10));
    println!(
        "- Index update (token events applied, snapshot published while the last is held), 10 / 10,000 / 100,000 tokens: {:.1} / {:.1} / {:.1} µs per batch of 1 event; {:.1} / {:.1} / {:.1} µs per batch of 10.",
        update[0], update[1], update[2], update_many[0], update_many[1], update_many[2],
    );
    if std::env::var_os("BENCH_SCALE_IN_PROCESS_ONLY").is_some() {
        return;
    }

    let projects_n: usize = std::env::var("BENCH_SCALE_PROJECTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let tokens_n: usize = std::env::var("BENCH_SCALE_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let client = Client::try_default().await.expect("KUBECONFIG must point at the local control plane");
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": NS } })).unwrap();
    let _ = Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await;
    let projects: Api<Project> = Api::all(client.clone());
    let tokens: Api<ProxyToken> = Api::namespaced(client.clone(), NS);
    let apply = PatchParams::apply("bench-scale").force();

    let created = Instant::now();
    futures::stream::iter(0..projects_n)
        .for_each_concurrent(32, |p| {
            let (projects, apply) = (projects.clone(), apply.clone());
            async move {
                let name = format!("scale-{p}");
                projects.patch(&name, &apply, &Patch::Apply(&project(&name))).await.unwrap();
            }
        })
        .await;
    let existing = tokens.list_metadata(&Default::default()).await.unwrap().items.len();
    let tokens_arc = Arc::new(tokens.clone());
    futures::stream::iter(existing..tokens_n)
        .for_each_concurrent(64, |i| {
            let tokens = tokens_arc.clone();
            async move {
                let name = format!("t{i}");
                let object = token(&name, &format!("scale-{}", i % projects_n), &Token::mint().unwrap().hash());
                // A create and a merge patch: server-side apply costs the API server more
                // per object, and these objects have one writer.
                let mut spec_only = object.clone();
                spec_only.status = None;
                if let Err(error) = tokens.create(&PostParams::default(), &spec_only).await {
                    assert!(matches!(&error, kube::Error::Api(s) if s.code == 409), "{error}");
                }
                let status = json!({ "status": object.status });
                tokens.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
            }
        })
        .await;
    println!(
        "- Created {projects_n} Projects and {} ProxyTokens (with status) in {:.0} s.",
        tokens_n.saturating_sub(existing),
        created.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let (mut proxy, _port, admin) = support::spawn_proxy(NS, LABEL);
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    loop {
        let ok =
            tokio::process::Command::new("curl").args(["-sf", &ready]).output().await.is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "proxy never synced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sync = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.id())).unwrap();
    let rss_kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap();
    let _ = proxy.kill();
    let _ = proxy.wait();
    println!(
        "- Proxy with {projects_n} Projects and {tokens_n} ProxyTokens: initial sync {:.2} s, resident memory {:.0} MB.",
        sync.as_secs_f64(),
        rss_kb / 1024.0
    );
}
