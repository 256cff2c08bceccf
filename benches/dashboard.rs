//! Dashboard benchmark: how long each page of `kubectl llmproxy dashboard` takes on the
//! local control plane with 1,000 Projects and 10,000 ProxyTokens.
//!
//! Creates (once; later runs reuse them) `BENCH_DASHBOARD_PROJECTS` Projects (default
//! 1,000) with a status like the controller writes, and 10 ProxyTokens for each in 10
//! namespaces; starts the release dashboard; signs in like a browser; then requests each
//! page `BENCH_DASHBOARD_ROUNDS` times (default 30) in turn, one at a time, reading the
//! whole answer. Beside each page, the baseline: the API call(s) the page makes, timed
//! from this process with the same kubeconfig, in the same run.
//!
//! Prints a Markdown table. Run by `just bench-dashboard` (needs the control plane:
//! `just cluster-up`); `benches/dashboard.md` holds the last full run.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use llm_proxy::api::{Project, ProxyToken};
use serde_json::json;

const LABEL: &str = "llmproxy.io/bench-dashboard";
const TOKENS_PER_PROJECT: usize = 10;
const NAMESPACES: usize = 10;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn project_name(i: usize) -> String {
    format!("dash-{i:04}")
}

fn namespace(i: usize) -> String {
    format!("bench-dash-{:02}", i % NAMESPACES)
}

fn token_name(project: usize, j: usize) -> String {
    format!("t-{project:04}-{j}")
}

fn now() -> serde_json::Value {
    json!(llm_proxy::api::micros(jiff::Timestamp::now()))
}

/// The status the controller writes on a serving project with ten tokens.
fn project_status(i: usize) -> serde_json::Value {
    let condition = |type_: &str, reason: &str, message: &str| {
        json!({ "type": type_, "status": if type_ == "DeletionBlocked" { "False" } else { "True" }, "reason": reason,
                "message": message, "lastTransitionTime": jiff::Timestamp::now().to_string(), "observedGeneration": 1 })
    };
    let recent: Vec<_> = (0..5)
        .map(|j| json!({ "namespace": namespace(i), "name": token_name(i, j), "phase": "Active", "issuedAt": now() }))
        .collect();
    json!({
        "phase": "Active", "apiKeyHint": "sk-…Ab12", "apiKeyFingerprint": "0123456789ab",
        "tokens": { "total": TOKENS_PER_PROJECT, "active": TOKENS_PER_PROJECT }, "recentTokens": recent,
        "observedGeneration": 1,
        "conditions": [
            condition("APIKeyValid", "Valid", "API key is well-formed"),
            condition("Ready", "Ready", "Project is active and its key is valid"),
            condition("DeletionBlocked", "NotRequested", "No deletion requested"),
            condition("Enforced", "Enforced", "Enforced by 2/2 live proxy replicas"),
        ],
    })
}

/// Creates what is missing of the objects (a rerun finds them and skips ahead).
async fn populate(client: &Client, projects: usize) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let text = std::fs::read_to_string("crds/llmproxy.io.yaml").unwrap();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let crd: CustomResourceDefinition = serde::Deserialize::deserialize(document).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &PatchParams::apply("bench-dashboard").force(), &Patch::Apply(&crd)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for n in 0..NAMESPACES {
        let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": namespace(n) } })).unwrap();
        let _ = namespaces.create(&PostParams::default(), &ns).await;
    }
    let api: Api<Project> = Api::all(client.clone());
    let have = api.list_metadata(&ListParams::default().labels(&format!("{LABEL}=1"))).await.unwrap().items.len();
    if have >= projects {
        return;
    }
    let started = Instant::now();
    futures::stream::iter(0..projects)
        .for_each_concurrent(32, |i| {
            let (api, client) = (api.clone(), client.clone());
            async move {
                let name = project_name(i);
                let project: Project = serde_json::from_value(json!({
                    "apiVersion": "llmproxy.io/v1alpha1", "kind": "Project",
                    "metadata": { "name": name, "labels": { LABEL: "1" } },
                    "spec": {
                        "displayName": format!("Bench project {i}"), "apiKeySecretRef": { "name": "key" },
                        "upstream": { "url": "http://127.0.0.1:9" },
                        "allowedNamespaces": { "from": "All" },
                    }
                }))
                .unwrap();
                let _ = api.create(&PostParams::default(), &project).await;
                let status = json!({ "status": project_status(i) });
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
                let tokens: Api<ProxyToken> = Api::namespaced(client, &namespace(i));
                for j in 0..TOKENS_PER_PROJECT {
                    let token: ProxyToken = serde_json::from_value(json!({
                        "apiVersion": "llmproxy.io/v1alpha1", "kind": "ProxyToken",
                        "metadata": { "name": token_name(i, j), "labels": { LABEL: "1" } },
                        "spec": { "projectRef": { "name": name }, "duration": "720h", "maxRequests": 1000 },
                    }))
                    .unwrap();
                    let _ = tokens.create(&PostParams::default(), &token).await;
                }
            }
        })
        .await;
    eprintln!(
        "created {projects} projects and {} tokens in {:.1} s",
        projects * TOKENS_PER_PROJECT,
        started.elapsed().as_secs_f64()
    );
}

/// The projects as `kubectl get` asks for them (the dashboard's list pages do the same):
/// the printer columns' Table, without the objects.
async fn table(api: &Api<Project>, field_selector: Option<&str>) {
    let selector = field_selector.map(|s| format!("&fieldSelector={s}")).unwrap_or_default();
    let request = hyper::Request::get(format!("{}?includeObject=None{selector}", api.resource_url()))
        .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .unwrap();
    let table: serde_json::Value = api.clone().into_client().request(request).await.unwrap();
    assert!(table["rows"].as_array().is_some_and(|rows| !rows.is_empty()));
}

/// Milliseconds: median, 95th percentile, largest.
fn summary(mut samples: Vec<Duration>) -> [f64; 3] {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    [at(0.5), at(0.95), at(1.0)]
}

#[tokio::main]
async fn main() {
    let projects = env_or("BENCH_DASHBOARD_PROJECTS", 1000);
    let rounds = env_or("BENCH_DASHBOARD_ROUNDS", 30);
    let client = Client::try_default().await.expect("KUBECONFIG: the local control plane (just cluster-up)");
    populate(&client, projects).await;
    let all_projects =
        Api::<Project>::all(client.clone()).list_metadata(&ListParams::default()).await.unwrap().items.len();
    let all_tokens =
        Api::<ProxyToken>::all(client.clone()).list_metadata(&ListParams::default()).await.unwrap().items.len();

    let mut dashboard = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-llmproxy"))
        .args(["dashboard", "--operator-namespace", "bench-dash-00"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(dashboard.stdout.take().unwrap()), &mut line).unwrap();
    let login = line.trim().to_string();
    let base = login.split("/login").next().unwrap().to_string();

    let http: HttpClient<HttpConnector, Empty<Bytes>> = HttpClient::builder(TokioExecutor::new()).build_http();
    let signed_in = http.get(login.parse().unwrap()).await.unwrap();
    let cookie = signed_in.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let host = base.trim_start_matches("http://").to_string();
    let fetch = |path: String| {
        let (http, cookie, host, base) = (http.clone(), cookie.clone(), host.clone(), base.clone());
        async move {
            let request = hyper::Request::get(format!("{base}{path}"))
                .header("host", host)
                .header("cookie", cookie)
                .body(Empty::new())
                .unwrap();
            let started = Instant::now();
            let response = http.request(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
            (started.elapsed(), body.len())
        }
    };

    let middle = projects / 2;
    let (project, ns, token) = (project_name(middle), namespace(middle), token_name(middle, 3));
    let pages = [
        ("Projects list (first 100 rows)", "/".to_string()),
        ("Projects list, search by name", "/?q=dash-05".to_string()),
        ("Projects list, status Active", "/?status=Active".to_string()),
        ("Project page (and its Events)", format!("/projects/{project}")),
        ("Tokens of a project", format!("/projects/{project}/tokens")),
        ("Token page (and its Events)", format!("/tokens/{ns}/{token}")),
        ("Generate-token form (no API call)", format!("/projects/{project}/tokens/new")),
    ];
    let projects_api: Api<Project> = Api::all(client.clone());
    let tokens_api: Api<ProxyToken> = Api::all(client.clone());
    let events_all: Api<Event> = Api::all(client.clone());
    let events_ns: Api<Event> = Api::namespaced(client.clone(), &ns);
    let token_api: Api<ProxyToken> = Api::namespaced(client.clone(), &ns);
    let baseline = |i: usize| {
        let (projects_api, tokens_api, events_all, events_ns, token_api) =
            (projects_api.clone(), tokens_api.clone(), events_all.clone(), events_ns.clone(), token_api.clone());
        let (project, token) = (project.clone(), token.clone());
        async move {
            let started = Instant::now();
            let events = |name: &str| ListParams::default().fields(&format!("regarding.name={name}"));
            match i {
                0 | 1 => table(&projects_api, None).await,
                2 => table(&projects_api, Some("status.phase=Active")).await,
                // The whole objects, for comparison: what the list page read before it
                // asked for the Table.
                7 => drop(projects_api.list(&ListParams::default()).await.unwrap()),
                3 => {
                    projects_api.get(&project).await.unwrap();
                    events_all.list(&events(&project)).await.unwrap();
                }
                4 => drop(
                    tokens_api
                        .list(&ListParams::default().fields(&format!("spec.projectRef.name={project}")))
                        .await
                        .unwrap(),
                ),
                5 => {
                    token_api.get(&token).await.unwrap();
                    events_ns.list(&events(&token)).await.unwrap();
                }
                _ => {}
            }
            started.elapsed()
        }
    };

    // One warm-up pass, then the rounds, pages interleaved so drift hits them alike.
    for (i, (_, path)) in pages.iter().enumerate() {
        fetch(path.clone()).await;
        baseline(i).await;
    }
    let mut objects_times = Vec::new();
    let mut page_times = vec![Vec::new(); pages.len()];
    let mut api_times = vec![Vec::new(); pages.len()];
    let mut sizes = vec![0; pages.len()];
    for _ in 0..rounds {
        for (i, (_, path)) in pages.iter().enumerate() {
            let (elapsed, size) = fetch(path.clone()).await;
            page_times[i].push(elapsed);
            sizes[i] = size;
            api_times[i].push(baseline(i).await);
        }
        objects_times.push(baseline(7).await);
    }
    let _ = dashboard.kill();
    let _ = dashboard.wait();

    println!(
        "With {all_projects} Projects and {all_tokens} ProxyTokens in the cluster ({projects} of them and {} tokens made by this bench); {rounds} requests per page, one at a time, release build.\n",
        projects * TOKENS_PER_PROJECT
    );
    println!("| page | p50 ms | p95 ms | max ms | size KiB | its API calls alone, p50 ms | page / API p50 |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (i, (title, path)) in pages.iter().enumerate() {
        let [p50, p95, max] = summary(page_times[i].clone());
        let [api50, _, _] = summary(api_times[i].clone());
        let ratio = if api50 > 0.01 { format!("{:.2}", p50 / api50) } else { "-".into() };
        println!(
            "| {title} (`{path}`) | {p50:.1} | {p95:.1} | {max:.1} | {:.0} | {api50:.1} | {ratio} |",
            sizes[i] as f64 / 1024.0
        );
    }
    let [objects50, _, _] = summary(objects_times);
    println!(
        "\nFor comparison, the whole Project objects (`GET projects`, what `kubectl get -o json` reads): p50 {objects50:.1} ms; the list pages ask for kubectl's Table instead."
    );
}
