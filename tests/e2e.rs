//! The first complete path through the system against the real local API server:
//! Secret + Project + ProxyToken → minted token Secret → real client → proxy → fake
//! upstream (issue 3's "done when").

mod support;

use std::time::{Duration, Instant, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use llm_proxy::api::{AllowedNamespaces, NamespacesFrom, Project, ProxyToken, TokenPhase, token_conditions};
use llm_proxy::token::TokenHash;
use serde_json::json;
use support::{Env, TEST_KEY, TEST_LABEL, WAIT, curl, eventually, token_spec};

#[tokio::test]
async fn crds_show_useful_columns_and_reject_invalid_objects() {
    let env = Env::new("crd").await;
    env.create_project("p").await;
    let kubectl = |args: &[&str]| {
        let output = support::run_kubectl(args);
        (String::from_utf8_lossy(&output.stdout).to_string(), String::from_utf8_lossy(&output.stderr).to_string())
    };
    let (out, err) = kubectl(&["get", "projects", &env.scoped("p")]);
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_else(|| panic!("{err}"))
        .split("  ")
        .filter(|s| !s.is_empty())
        .map(str::trim)
        .collect();
    assert_eq!(header, ["NAME", "DISPLAY NAME", "STATUS", "READY", "REASON", "TOKENS", "AGE"]);

    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    let mut negative = ProxyToken::new("negative", token_spec(&env.scoped("p")));
    negative.spec.max_requests = Some(-1);
    let error = tokens.create(&PostParams::default(), &negative).await.unwrap_err().to_string();
    assert!(error.contains("spec.maxRequests") && error.contains("greater than or equal to 1"), "{error}");

    let mut too_long = ProxyToken::new("too-long", token_spec(&env.scoped("p")));
    too_long.spec.duration = "9000h".into();
    let error = tokens.create(&PostParams::default(), &too_long).await.unwrap_err().to_string();
    assert!(error.contains("at most 8760h"), "{error}");

    let mut revoked = ProxyToken::new("revoked", token_spec(&env.scoped("p")));
    revoked.spec.revoked = true;
    tokens.create(&PostParams::default(), &revoked).await.unwrap();
    let undo = Patch::Merge(json!({ "spec": { "revoked": false } }));
    let error = tokens.patch("revoked", &PatchParams::default(), &undo).await.unwrap_err().to_string();
    assert!(error.contains("revocation cannot be undone"), "{error}");

    // A cap can be lowered by whoever may edit the token, never raised or removed.
    let mut capped = ProxyToken::new("capped", token_spec(&env.scoped("p")));
    capped.spec.max_requests = Some(10);
    tokens.create(&PostParams::default(), &capped).await.unwrap();
    let cap = |max: serde_json::Value| Patch::Merge(json!({ "spec": { "maxRequests": max } }));
    for (change, max) in [("raise", json!(11)), ("remove", serde_json::Value::Null)] {
        let error = tokens.patch("capped", &PatchParams::default(), &cap(max)).await.unwrap_err().to_string();
        assert!(error.contains("maxRequests can be lowered, never raised or removed"), "{change}: {error}");
    }
    tokens.patch("capped", &PatchParams::default(), &cap(json!(5))).await.unwrap();
    tokens.patch("revoked", &PatchParams::default(), &cap(json!(3))).await.unwrap();

    // The columns people read: ProxyTokens, and both kinds with -o wide.
    let header = |args: &[&str]| -> Vec<String> {
        let (out, err) = kubectl(args);
        let first = out.lines().next().unwrap_or_else(|| panic!("{err}")).to_string();
        first.split("  ").map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
    };
    assert_eq!(
        header(&["get", "proxytokens", "-n", &env.apps]),
        ["NAME", "PROJECT", "STATUS", "REQUESTS", "MAX", "EXPIRES", "AGE"]
    );
    assert_eq!(
        header(&["get", "proxytokens", "-n", &env.apps, "-o", "wide"]),
        [
            "NAME",
            "PROJECT",
            "STATUS",
            "REQUESTS",
            "MAX",
            "RPM",
            "MINUTE",
            "IN MINUTE",
            "TOKENS TODAY",
            "LEFT TODAY",
            "LEFT MONTH",
            "SPENT MONTH",
            "BUDGET LEFT",
            "EXPIRES",
            "REASON",
            "LAST USED",
            "ENFORCED",
            "SECRET",
            "AGE"
        ]
    );
    assert_eq!(
        header(&["get", "projects", &env.scoped("p"), "-o", "wide"]),
        [
            "NAME",
            "DISPLAY NAME",
            "STATUS",
            "READY",
            "REASON",
            "TOKENS",
            "ACTIVE TOKENS",
            "KEY",
            "TOKENS TODAY",
            "LEFT MONTH",
            "SPENT MONTH",
            "BUDGET LEFT",
            "UPSTREAM",
            "ENFORCED",
            "MESSAGE",
            "AGE"
        ]
    );

    let moved = Patch::Merge(json!({ "spec": { "projectRef": { "name": "elsewhere" } } }));
    let error = tokens.patch("revoked", &PatchParams::default(), &moved).await.unwrap_err().to_string();
    assert!(error.contains("projectRef is immutable"), "{error}");

    let projects: Api<Project> = Api::all(env.client.clone());
    let mut bad_url = env.project("bad-url");
    bad_url.spec.upstream.url = "ftp://example.com".into();
    let error = projects.create(&PostParams::default(), &bad_url).await.unwrap_err().to_string();
    assert!(error.contains("upstream.url must be an absolute http:// or https:// URL"), "{error}");

    // Where the key goes is never implied: no upstream, no Project.
    let mut no_upstream = serde_json::to_value(env.project("no-upstream")).unwrap();
    no_upstream["spec"].as_object_mut().unwrap().remove("upstream");
    let file = env.log_path("no-upstream.json");
    std::fs::write(&file, no_upstream.to_string()).unwrap();
    let (_, err) = kubectl(&["create", "-f", &file.display().to_string()]);
    assert!(err.contains("spec.upstream: Required value"), "{err}");
}

#[tokio::test]
async fn a_proxytoken_is_minted_into_its_secret() {
    let mut env = Env::new("mint").await;
    env.start_controller();
    env.create_project("p").await;
    let started = Instant::now();
    env.create_token("web", token_spec(&env.scoped("p"))).await;
    let token = env.wait_token("web", TokenPhase::Active).await;
    let took = started.elapsed();
    println!("minted in {took:?}");

    let status = token.status.unwrap();
    let (issued, expires) = (status.issued_at.unwrap().0, status.expires_at.unwrap().0);
    assert_eq!(expires.duration_since(issued), jiff::SignedDuration::from_hours(720));
    assert!(status.conditions.iter().any(|c| c.type_ == token_conditions::ISSUED && c.status == "True"));

    let data = env.token_secret("web").await;
    assert_eq!(status.token_hash.as_deref(), Some(TokenHash::of(&data["token"]).to_string().as_str()));
    assert_eq!(data["OPENAI_API_KEY"], data["token"]);
    assert_eq!(data["OPENAI_BASE_URL"], format!("{}/v1", env.proxy_url()));
    assert!(data["token"].starts_with("llmp_"));
    let secret = Api::<Secret>::namespaced(env.client.clone(), &env.apps).get("web").await.unwrap();
    let owner = &secret.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("ProxyToken", "web", Some(true)));
}

#[tokio::test]
async fn the_openai_python_sdk_works_through_the_proxy_streamed_or_not() {
    let env = Env::running("sdk").await;
    env.create_project("p").await;
    env.minted("p", "app").await;
    let data = env.token_secret("app").await;

    let output = tokio::process::Command::new(support::sdk_python())
        .arg(support::repo().join("tests/sdk/chat.py"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("OPENAI_API_KEY", &data["OPENAI_API_KEY"])
        .env("OPENAI_BASE_URL", &data["OPENAI_BASE_URL"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "SDK script failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["content"], "Hello from the fake upstream.");
    assert_eq!(result["usage"], 16);
    assert_eq!(result["pieces"], json!(["chunk0 ", "chunk1 ", "chunk2 ", "chunk3 ", "chunk4 "]));
    assert_eq!(result["error"]["status"], 401);
    assert_eq!(result["error"]["code"], "invalid_token");

    assert_eq!(result["surface"], json!([200, 200, 200]));

    let seen = env.upstream.requests();
    assert_eq!(seen.len(), 5, "the bad token must not reach the upstream");
    let calls: Vec<_> = seen[2..].iter().map(|r| format!("{} {}", r.method, r.path)).collect();
    assert_eq!(
        calls,
        [
            "POST /v1/vector_stores/vs_abc/search",
            "DELETE /v1/vector_stores/vs_abc/files/file-abc",
            "GET /v1/conversations/conv_abc/items"
        ]
    );
    for request in &seen {
        assert_eq!(request.header("authorization").as_deref(), Some(format!("Bearer {TEST_KEY}").as_str()));
        assert!(
            request
                .headers
                .iter()
                .all(|(_, v)| { !v.as_bytes().windows(10).any(|w| data["token"].as_bytes().starts_with(w)) })
        );
    }
    // Streaming is not buffered: the client had the first chunk before the upstream sent the last.
    let sent = seen[1].chunks_sent_at.lock().unwrap().clone();
    let last_sent = sent.last().unwrap().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let first_received = result["first_chunk_at"].as_f64().unwrap();
    assert!(first_received < last_sent - 0.5, "first chunk at {first_received}, last sent at {last_sent}");
}

/// Every request is one access line, written once its answer has been sent: the token
/// and project it used (a refused token the proxy knows too), the time to the headers
/// and to the answer's end, and the usage the upstream reported; never a token.
#[tokio::test]
async fn every_request_is_one_access_line_with_its_token_and_usage() {
    let env = Env::running("access").await;
    env.create_project("p").await;
    let token = env.minted("p", "app").await;
    let revoked = env.minted("p", "gone").await;
    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    let revoke = json!({ "spec": { "revoked": true } });
    tokens.patch("gone", &PatchParams::default(), &Patch::Merge(revoke)).await.unwrap();
    eventually(WAIT, || async { (env.chat(&revoked).await.error_code() == "token_revoked").then_some(()) }).await;

    assert_eq!(env.chat(&token).await.status, 200);
    let chat = format!("{}/v1/chat/completions", env.proxy_url());
    let auth = format!("Bearer {token}");
    let headers = [("authorization", auth.as_str()), ("x-fake-chunks", "5"), ("x-fake-chunk-delay-ms", "60")];
    let body = r#"{"model":"fake-model","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#;
    assert_eq!(curl("POST", &chat, &headers, Some(body)).await.status, 200);
    let bad = llm_proxy::token::Token::mint().unwrap();
    assert_eq!(env.chat(bad.expose()).await.error_code(), "token_not_found");

    // The log is written in batches, every 100 ms.
    let lines: Vec<serde_json::Value> = eventually(WAIT, || async {
        let log = std::fs::read_to_string(env.log_path("proxy")).ok()?;
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["target"] == "access")
            .collect();
        let refused = lines.iter().filter(|l| l["status"] == 401).count();
        (lines.iter().filter(|l| l["status"] == 200).count() == 2 && refused >= 2).then_some(lines)
    })
    .await;
    let log = std::fs::read_to_string(env.log_path("proxy")).unwrap();
    for secret in [token.as_str(), revoked.as_str(), bad.expose(), TEST_KEY] {
        assert!(!log.contains(secret), "a token or key in the log");
    }
    let ok: Vec<_> = lines.iter().filter(|l| l["status"] == 200).collect();
    let (plain, streamed) = (ok[0], ok[1]);
    for line in &ok {
        assert_eq!((&line["token_name"], &line["project"]), (&json!("app"), &json!(env.scoped("p"))), "{line}");
        assert_eq!(line["token_namespace"], json!(env.apps));
        assert_eq!(line["prompt_tokens"], 9, "{line}");
    }
    assert_eq!(plain["completion_tokens"], 7, "{plain}");
    assert_eq!(streamed["completion_tokens"], 5, "{streamed}");
    // The stream's line came at its end: five chunks 60 ms apart after the headers.
    let (latency, duration) = (streamed["latency_us"].as_u64().unwrap(), streamed["duration_us"].as_u64().unwrap());
    assert!(duration >= latency + 250_000, "headers after {latency} µs, the answer's end after {duration} µs");
    // A refused token the proxy knows is named; one it does not know cannot be.
    let (known, unknown): (Vec<_>, Vec<_>) =
        lines.iter().filter(|l| l["status"] == 401).partition(|l| l["token_name"] == "gone");
    assert!(!known.is_empty() && !unknown.is_empty(), "{lines:?}");
    assert!(known.iter().all(|l| l["project"] == json!(env.scoped("p")) && l.get("prompt_tokens").is_none()));
    assert!(unknown.iter().all(|l| l["token_name"] == "" && l["project"] == ""), "{unknown:?}");
}

#[tokio::test]
async fn refusals_follow_the_error_table() {
    let env = Env::running("errors").await;
    env.create_project("p").await;
    let good = env.minted("p", "good").await;
    let url = |path: &str| format!("{}{path}", env.proxy_url());
    let bearer = |t: &str| format!("Bearer {t}");

    let missing = curl("GET", &url("/v1/models"), &[], None).await;
    assert_eq!((missing.status, missing.error_code().as_str()), (401, "invalid_token"));
    assert_eq!(missing.json()["error"]["type"], "authentication_error");
    let wrong_scheme = curl("GET", &url("/v1/models"), &[("authorization", &format!("Basic {good}"))], None).await;
    assert_eq!((wrong_scheme.status, wrong_scheme.error_code().as_str()), (401, "invalid_token"));
    let mut typo = good.clone();
    typo.replace_range(10..11, if &good[10..11] == "a" { "b" } else { "a" });
    let bad_checksum = curl("GET", &url("/v1/models"), &[("authorization", &bearer(&typo))], None).await;
    assert_eq!((bad_checksum.status, bad_checksum.error_code().as_str()), (401, "invalid_token"));
    let unknown = llm_proxy::token::Token::mint().unwrap();
    let not_found = curl("GET", &url("/v1/models"), &[("authorization", &bearer(unknown.expose()))], None).await;
    assert_eq!((not_found.status, not_found.error_code().as_str()), (401, "token_not_found"));

    let no_path = curl("GET", &url("/v1/secrets"), &[("authorization", &bearer(&good))], None).await;
    assert_eq!((no_path.status, no_path.error_code().as_str()), (404, "endpoint_not_found"));
    let no_method = curl("PUT", &url("/v1/chat/completions"), &[("authorization", &bearer(&good))], None).await;
    assert_eq!((no_method.status, no_method.error_code().as_str()), (405, "method_not_allowed"));

    let ok = env.chat(&good).await;
    assert_eq!(ok.status, 200, "{}", ok.body);

    // Revoked.
    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    let revoked = env.minted("p", "revoked").await;
    tokens
        .patch("revoked", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "revoked": true } })))
        .await
        .unwrap();
    eventually(WAIT, || async { (env.chat(&revoked).await.error_code() == "token_revoked").then_some(()) }).await;
    assert_eq!(env.chat(&revoked).await.status, 401);
    env.wait_token("revoked", TokenPhase::Revoked).await;

    // Expired.
    let mut short = token_spec(&env.scoped("p"));
    short.duration = "2s".into();
    env.create_token("short", short).await;
    env.wait_token("short", TokenPhase::Active).await;
    let short_token = env.token_secret("short").await["token"].clone();
    eventually(WAIT, || async { (env.chat(&short_token).await.error_code() == "token_expired").then_some(()) }).await;
    env.wait_token("short", TokenPhase::Expired).await;

    // Project inactive: refused, not revoked.
    let projects: Api<Project> = Api::all(env.client.clone());
    projects
        .patch(&env.scoped("p"), &PatchParams::default(), &Patch::Merge(json!({ "spec": { "active": false } })))
        .await
        .unwrap();
    let inactive = eventually(WAIT, || async {
        let r = env.chat(&good).await;
        (r.error_code() == "project_inactive").then_some(r)
    })
    .await;
    assert_eq!(inactive.status, 403);
    assert_eq!(inactive.json()["error"]["type"], "permission_error");

    // Upstream unreachable.
    let closed_port = support::free_port();
    projects
        .patch(
            &env.scoped("p"),
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": {
        "active": true, "upstream": { "url": format!("http://127.0.0.1:{closed_port}") }
    } })),
        )
        .await
        .unwrap();
    let unreachable = eventually(WAIT, || async {
        let r = env.chat(&good).await;
        (r.status == 502).then_some(r)
    })
    .await;
    assert_eq!(unreachable.error_code(), "upstream_error");

    // No error body ever carries the token or the key.
    for body in [&missing.body, &bad_checksum.body, &not_found.body, &inactive.body, &unreachable.body] {
        assert!(!body.contains(&good[..12]) && !body.contains(&TEST_KEY[..12]), "{body}");
    }
}

/// The upstream account's identity and cookies stay between the proxy and the upstream:
/// a tenant never learns which organization or project the real key belongs to.
#[tokio::test]
async fn upstream_account_headers_never_reach_clients() {
    let env = Env::running("resp-headers").await;
    env.create_project("p").await;
    let token = env.minted("p", "app").await;
    let auth = format!("Bearer {token}");
    let (response, headers) = support::curl_with_headers(
        "POST",
        &format!("{}/v1/chat/completions", env.proxy_url()),
        &[
            ("authorization", &auth),
            ("x-fake-response-header", "openai-organization: org-upstream-secret"),
            ("x-fake-response-header", "openai-project: proj_upstream"),
            ("x-fake-response-header", "set-cookie: __cf_bm=upstream; path=/"),
            ("x-fake-response-header", "x-request-id: req_123"),
        ],
        Some(r#"{"model":"fake-model","messages":[]}"#),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    let names: Vec<&str> = headers.iter().map(|(name, _)| name.as_str()).collect();
    assert!(names.contains(&"x-request-id"), "the fake upstream sent its headers: {names:?}");
    for stripped in ["openai-organization", "openai-project", "set-cookie"] {
        assert!(!names.contains(&stripped), "{stripped} reached the client: {headers:?}");
    }
}

#[tokio::test]
async fn slow_upstreams_time_out_with_504() {
    let mut env = Env::new("timeout").await;
    env.start_controller();
    env.create_project("p").await;
    let token = env.minted("p", "t").await;
    // A proxy with a 1 s response timeout.
    let selector = format!("{TEST_LABEL}={}", env.id);
    let port = support::free_port();
    let admin = support::free_port();
    let mut proxy = std::process::Command::new(env!("CARGO_BIN_EXE_llm-proxy"))
        .args(["proxy", "--namespace", &env.ops, "--label-selector", &selector, "--upstream-timeout-seconds", "1"])
        .args(["--listen-addr", &format!("127.0.0.1:{port}"), "--admin-addr", &format!("127.0.0.1:{admin}")])
        .env("KUBECONFIG", support::kubeconfig())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    eventually(WAIT, || async { (support::http_get_status(&ready).await? == 200).then_some(()) }).await;
    let started = Instant::now();
    let slow = curl(
        "GET",
        &format!("http://127.0.0.1:{port}/v1/models"),
        &[("authorization", &format!("Bearer {token}")), ("x-fake-delay-ms", "5000")],
        None,
    )
    .await;
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert_eq!((slow.status, slow.error_code().as_str()), (504, "upstream_timeout"));
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
}

/// A kubeconfig pointing at nothing: a proxy given it can never finish its first sync.
fn dead_kubeconfig(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("llmproxy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let dead = support::free_port();
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: 'http://127.0.0.1:{dead}'}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    kubeconfig
}

#[tokio::test]
async fn a_proxy_that_has_not_synced_answers_503() {
    let kubeconfig = dead_kubeconfig("unsynced");
    let (port, admin) = (support::free_port(), support::free_port());
    let mut proxy = std::process::Command::new(env!("CARGO_BIN_EXE_llm-proxy"))
        .args(["proxy", "--namespace", "nowhere", "--listen-addr", &format!("127.0.0.1:{port}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let token = llm_proxy::token::Token::mint().unwrap();
    let response = eventually(WAIT, || async {
        let r = curl(
            "GET",
            &format!("http://127.0.0.1:{port}/v1/models"),
            &[("authorization", &format!("Bearer {}", token.expose()))],
            None,
        )
        .await;
        (r.status != 0).then_some(r)
    })
    .await;
    let readiness = support::http_get_status(&format!("http://127.0.0.1:{admin}/readyz")).await;
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert_eq!((response.status, response.error_code().as_str()), (503, "proxy_not_ready"));
    assert_eq!(readiness, Some(503));
}

/// A proxy started under `ulimit` settings (`sh -c 'ulimit …; exec llm-proxy proxy …'`, as
/// a container runtime would set them), given `--max-connections`, once it has logged
/// about its open files.
async fn proxy_under_ulimit(ulimit: &str, max_connections: &str) -> UnderUlimit {
    use tokio::io::AsyncBufReadExt;
    let kubeconfig = dead_kubeconfig("ulimit");
    let (port, admin) = (support::free_port(), support::free_port());
    let mut proxy = tokio::process::Command::new("sh")
        .args(["-c", &format!("{ulimit} && exec \"$0\" \"$@\""), env!("CARGO_BIN_EXE_llm-proxy")])
        .args(["proxy", "--namespace", "nowhere", "--max-connections", max_connections])
        .args(["--listen-addr", &format!("127.0.0.1:{port}"), "--admin-addr", &format!("127.0.0.1:{admin}")])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(proxy.stdout.take().unwrap()).lines();
    // Logged before the runtime starts, written out within 100 ms (the log's flush).
    let line = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("open-files limit") {
                return line;
            }
        }
        panic!("the proxy ended without a word about its open files")
    })
    .await
    .expect("no log line about open files");
    let proc = format!("/proc/{}", proxy.id().unwrap());
    UnderUlimit { _proxy: proxy, line, proc, port, admin }
}

/// A proxy started by [`proxy_under_ulimit`], killed when dropped.
struct UnderUlimit {
    _proxy: tokio::process::Child,
    /// Its log line about the open-files limit.
    line: String,
    /// Its `/proc/PID`.
    proc: String,
    port: u16,
    admin: u16,
}

impl UnderUlimit {
    /// The `Max open files` line of its limits.
    fn open_files(&self) -> String {
        let limits = std::fs::read_to_string(format!("{}/limits", self.proc)).unwrap();
        limits.lines().find(|line| line.starts_with("Max open files")).unwrap().to_string()
    }

    /// A line of its `/proc/PID/status`, as a number.
    fn status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("{}/status", self.proc)).unwrap();
        let value = status.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':')).unwrap();
        value.trim().trim_end_matches(" kB").parse().unwrap()
    }

    /// One of the figures on its `/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        let text = curl("GET", &format!("http://127.0.0.1:{}/metrics", self.admin), &[], None).await.body;
        let prefix = format!("{name} ");
        let value = text.lines().find_map(|line| line.strip_prefix(&prefix));
        value.and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }
}

#[tokio::test]
async fn the_proxy_makes_room_for_its_connections_or_says_what_to_raise() {
    // A soft limit of 1,024 under a higher hard one, as many container runtimes set it:
    // raised to the hard one, and the descriptor table sized for 3,000 connections.
    let proxy = proxy_under_ulimit("ulimit -n 8000 && ulimit -Sn 1024", "3000").await;
    let (line, open_files, table) = (&proxy.line, proxy.open_files(), proxy.status("FDSize"));
    assert_eq!(open_files.split_whitespace().collect::<Vec<_>>()[3..5], ["8000", "8000"], "{open_files}\n{line}");
    assert!(table >= 6_000, "a table of {table} slots for 3,000 connections\n{line}");
    assert!(
        line.contains(r#""message":"open-files limit and descriptor table ready","limit":8000,"raised_from":1024"#),
        "{line}"
    );
    // A hard limit below what --max-connections needs: a warning that says what to raise.
    let proxy = proxy_under_ulimit("ulimit -n 1000", "4096").await;
    let (line, open_files) = (&proxy.line, proxy.open_files());
    assert_eq!(open_files.split_whitespace().collect::<Vec<_>>()[3..5], ["1000", "1000"], "{open_files}\n{line}");
    assert!(line.contains(r#""level":"WARN""#), "{line}");
    assert!(line.contains("raise the container's nofile limit") && line.contains(r#""limit":1000"#), "{line}");
}

/// `/metrics` says how full the proxy is: the standard `process_*` figures, the open
/// descriptors against the limit first, agree with the kernel's account of the process.
#[tokio::test]
async fn the_proxy_reports_its_open_descriptors_against_its_limit() {
    let proxy = proxy_under_ulimit("ulimit -n 8000 && ulimit -Sn 1024", "3000").await;
    assert_eq!(proxy.metric("process_max_fds").await, 8000.0, "the raised limit, not the 1,024 it started with");
    let before = proxy.metric("process_open_fds").await;
    // 200 connections that say nothing yet (one address may hold 256): a descriptor each.
    let mut held = Vec::new();
    for _ in 0..200 {
        held.push(tokio::net::TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap());
    }
    eventually(WAIT, || async { (proxy.metric("llmproxy_connections_open").await == 200.0).then_some(()) }).await;
    let open = proxy.metric("process_open_fds").await;
    let listed = std::fs::read_dir(format!("{}/fd", proxy.proc)).unwrap().count() as f64;
    assert!(open >= before + 200.0, "{before} descriptors open before 200 connections, {open} with them");
    // The scrape's own connection is open while it counts; the watch's retries may
    // open and close a socket in between.
    assert!((open - listed).abs() <= 3.0, "{open} open descriptors reported, {listed} in /proc");
    drop(held);
    eventually(WAIT, || async { (proxy.metric("process_open_fds").await <= before + 3.0).then_some(()) }).await;

    let rss = proxy.metric("process_resident_memory_bytes").await / 1024.0;
    let kernel = proxy.status("VmRSS") as f64;
    assert!((rss - kernel).abs() < kernel / 5.0, "{rss} KiB resident reported, {kernel} KiB by the kernel");
    assert_eq!(proxy.metric("process_threads").await, proxy.status("Threads") as f64);
    let started = proxy.metric("process_start_time_seconds").await;
    let now = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(started <= now && now - started < 60.0, "started at {started}, now {now}");
    assert!(proxy.metric("process_cpu_seconds_total").await > 0.0);
}

#[tokio::test]
async fn deleting_a_proxytoken_deletes_its_secret_and_the_proxy_forgets_it() {
    let env = Env::running("delete").await;
    env.create_project("p").await;
    let token = env.minted("p", "gone").await;
    assert_eq!(env.chat(&token).await.status, 200);

    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    tokens.delete("gone", &DeleteParams::default()).await.unwrap();
    eventually(WAIT, || async { (env.chat(&token).await.error_code() == "token_not_found").then_some(()) }).await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.apps);
    // The garbage collector rediscovers resource types every 30 s, so on a control plane
    // whose CRDs were just installed the first cleanup can take that long.
    eventually(Duration::from_secs(60), || async { secrets.get_opt("gone").await.unwrap().is_none().then_some(()) })
        .await;
}

#[tokio::test]
async fn a_namespace_without_a_grant_is_rejected_and_nothing_is_minted() {
    let mut env = Env::new("grant").await;
    env.start_controller();
    env.put_key("p-key", TEST_KEY, "p").await;
    let mut project = env.project("p");
    project.spec.allowed_namespaces = Some(AllowedNamespaces {
        from: NamespacesFrom::Selector,
        selector: Some(serde_json::from_value(json!({ "matchLabels": { "team": "ml" } })).unwrap()),
    });
    Api::<Project>::all(env.client.clone()).create(&PostParams::default(), &project).await.unwrap();
    env.create_token("nope", token_spec(&env.scoped("p"))).await;
    let token = env.wait_token("nope", TokenPhase::Rejected).await;
    let issued = token.status.unwrap().conditions.into_iter().find(|c| c.type_ == token_conditions::ISSUED).unwrap();
    assert_eq!((issued.status.as_str(), issued.reason.as_str()), ("False", "NamespaceNotAllowed"));
    assert!(
        issued.message.contains(&env.apps) && issued.message.contains("spec.allowedNamespaces"),
        "{}",
        issued.message
    );
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.apps);
    assert!(secrets.get_opt("nope").await.unwrap().is_none());
}

#[tokio::test]
async fn the_proxy_speaks_h2c_as_well_as_http1() {
    let env = Env::running("h2c").await;
    env.create_project("p").await;
    let token = env.minted("p", "t").await;
    let output = tokio::process::Command::new("curl")
        .args(["-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("{}/v1/models", env.proxy_url()))
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "2 200");
    assert_eq!(env.upstream.requests().last().unwrap().method, "GET");
}

/// The binding in status holds for every writer, cluster admins included and with no
/// admission policy installed: the API server itself refuses to move a minted token's
/// hash or issue time, to rebind it, or to lower its count.
#[tokio::test]
async fn a_minted_tokens_binding_cannot_be_rewritten_even_without_the_policy() {
    let env = Env::running("binding").await;
    env.create_project("p").await;
    let value = env.minted("p", "app").await;
    for _ in 0..2 {
        assert_eq!(env.chat(&value).await.status, 200);
    }
    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    eventually(Duration::from_secs(30), || async {
        (tokens.get("app").await.ok()?.status?.request_count? == 2).then_some(())
    })
    .await;
    let forged = llm_proxy::token::Token::mint().unwrap().hash().to_string();
    let issued_only = tokens.get("app").await.unwrap().status.unwrap().conditions;
    let without_issued: Vec<_> = issued_only.iter().filter(|c| c.type_ != token_conditions::ISSUED).collect();
    for (forgery, message) in [
        (json!({ "tokenHash": forged }), "keeps Issued=True, its status.tokenHash and its status.issuedAt"),
        (
            json!({ "issuedAt": "2099-01-01T00:00:00.000000Z" }),
            "keeps Issued=True, its status.tokenHash and its status.issuedAt",
        ),
        (json!({ "projectUid": "another-project" }), "status.projectUid is set once"),
        (json!({ "requestCount": 0 }), "status.requestCount never goes down"),
        // The two-step ways around: forget the Secret was written, or drop status whole.
        (json!({ "conditions": without_issued }), "keeps Issued=True"),
        (serde_json::Value::Null, "keeps Issued=True"),
    ] {
        let patch = Patch::Merge(json!({ "status": forgery }));
        let error = tokens.patch_status("app", &PatchParams::default(), &patch).await.unwrap_err().to_string();
        assert!(error.contains(message), "{forgery}: {error}");
    }
    assert_eq!(env.chat(&value).await.status, 200, "the token is untouched");
}

/// Creates the Secret a mint of `token` with `value` writes: owned by the token, named
/// after it, with the value and its hash annotation.
async fn create_minted_looking_secret(env: &Env, token: &ProxyToken, value: &llm_proxy::token::Token) {
    let name = token.metadata.name.clone().unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "annotations": { llm_proxy::api::TOKEN_HASH_ANNOTATION: value.hash().to_string() },
            "ownerReferences": [{
                "apiVersion": "llmproxy.io/v1alpha1", "kind": "ProxyToken", "name": name,
                "uid": token.metadata.uid.clone().unwrap(), "controller": true,
            }],
        },
        "stringData": { "token": value.expose(), "OPENAI_API_KEY": value.expose() },
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), &env.apps).create(&PostParams::default(), &secret).await.unwrap();
}

/// A tenant who creates the token's Secret first, shaped exactly like a minted one
/// (owned by the ProxyToken, with a well-formed token and its hash), does not get to
/// choose the token's value: the controller never adopts a Secret it did not write.
#[tokio::test]
async fn a_secret_written_before_the_mint_is_never_adopted() {
    let mut env = Env::new("no-adopt").await;
    env.create_project("p").await;
    let token = env.create_token("chosen", token_spec(&env.scoped("p"))).await;
    let chosen = llm_proxy::token::Token::mint().unwrap();
    create_minted_looking_secret(&env, &token, &chosen).await;

    env.start_controller();
    env.start_proxy().await;
    let rejected = env.wait_token("chosen", TokenPhase::Rejected).await;
    let status = rejected.status.unwrap();
    assert_eq!(status.token_hash, None, "nothing was minted, nothing adopted");
    let issued = status.conditions.into_iter().find(|c| c.type_ == token_conditions::ISSUED).unwrap();
    assert_eq!(issued.reason, "SecretConflict");
    assert_eq!(env.chat(chosen.expose()).await.error_code(), "token_not_found");
}

/// A mint whose last status write was lost (the Secret is written, status still says
/// it is not): the controller recognises its own Secret by the hash in status and keeps
/// it, so the workload's token never changes.
#[tokio::test]
async fn a_mint_whose_status_write_was_lost_keeps_its_secret() {
    // The state a lost write leaves, made by hand with no controller running: the hash in
    // status (written first), the Secret written, `Issued` never recorded.
    let mut env = Env::new("lost-write").await;
    let project = env.create_project("p").await;
    let token = env.create_token("app", token_spec(&env.scoped("p"))).await;
    let value = llm_proxy::token::Token::mint().unwrap();
    let hash = value.hash().to_string();
    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    let recorded = json!({ "status": {
        "phase": "Pending", "tokenHash": hash, "secretName": "app",
        "issuedAt": llm_proxy::api::micros(jiff::Timestamp::now()), "projectUid": project.metadata.uid,
    } });
    tokens.patch_status("app", &PatchParams::default(), &Patch::Merge(recorded)).await.unwrap();
    create_minted_looking_secret(&env, &token, &value).await;

    env.start_controller();
    env.start_proxy().await;
    let again = env.wait_token("app", TokenPhase::Active).await;
    let issued = again.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == token_conditions::ISSUED);
    assert_eq!(issued.map(|c| c.status.as_str()), Some("True"));
    assert_eq!(again.status.unwrap().token_hash.unwrap(), hash, "the same mint");
    assert_eq!(env.token_secret("app").await["token"], value.expose(), "the same Secret");
    assert_eq!(env.chat(value.expose()).await.status, 200);
}

#[tokio::test]
async fn a_token_blocked_by_a_foreign_secret_is_minted_once_the_secret_is_gone() {
    let mut env = Env::new("conflict").await;
    env.start_controller();
    env.create_project("p").await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.apps);
    let foreign: Secret =
        serde_json::from_value(json!({ "metadata": { "name": "taken" }, "stringData": { "x": "y" } })).unwrap();
    secrets.create(&PostParams::default(), &foreign).await.unwrap();
    let mut spec = token_spec(&env.scoped("p"));
    spec.secret_name = Some("taken".into());
    env.create_token("blocked", spec).await;
    let rejected = env.wait_token("blocked", TokenPhase::Rejected).await;
    let issued = rejected.status.unwrap().conditions.into_iter().find(|c| c.type_ == token_conditions::ISSUED).unwrap();
    assert_eq!(issued.reason, "SecretConflict");
    assert!(issued.message.contains("spec.secretName"), "{}", issued.message);
    assert_eq!(secrets.get("taken").await.unwrap().data.unwrap().len(), 1, "the foreign Secret is left alone");

    // Deleting and recreating a token under the same name hits this while the garbage
    // collector removes the old Secret; the controller looks again on its own.
    secrets.delete("taken", &DeleteParams::default()).await.unwrap();
    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    let minted = eventually(Duration::from_secs(30), || async {
        let token = tokens.get("blocked").await.ok()?;
        (token.status.as_ref()?.phase == Some(TokenPhase::Active)).then_some(token)
    })
    .await;
    let data = env.token_secret("taken").await;
    assert_eq!(minted.status.unwrap().token_hash.unwrap(), TokenHash::of(&data["token"]).to_string());
}

fn condition(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition], type_: &str) -> Option<String> {
    conditions.iter().find(|c| c.type_ == type_).map(|c| c.status.clone())
}

#[tokio::test]
async fn a_token_secret_exists_only_once_every_replica_accepts_the_token() {
    let mut env = Env::running("enforced").await;
    let ports = env.start_second_proxy().await;
    env.create_project("p").await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.apps);

    for round in 0..5 {
        let name = format!("app-{round}");
        env.create_token(&name, token_spec(&env.scoped("p"))).await;
        // A script that reads the Secret the moment it appears...
        let secret = eventually(WAIT, || async { secrets.get_opt(&name).await.ok()? }).await;
        let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
        // ...is served by every replica at once: no retry.
        for port in ports {
            assert_eq!(support::chat_on(port, &token).await, "", "round {round}, replica on {port}");
        }
        let status = env.wait_token(&name, TokenPhase::Active).await.status.unwrap();
        assert_eq!(condition(&status.conditions, token_conditions::ENFORCED).as_deref(), Some("True"));
    }

    // A project's change is Enforced in its status once both replicas apply it.
    let projects: Api<Project> = Api::all(env.client.clone());
    let token = env.token_secret("app-0").await["token"].clone();
    let deactivate = Patch::Merge(json!({ "spec": { "active": false } }));
    let changed = projects.patch(&env.scoped("p"), &PatchParams::default(), &deactivate).await.unwrap();
    let generation = changed.metadata.generation;
    eventually(WAIT, || async {
        let status = projects.get(&env.scoped("p")).await.ok()?.status?;
        let enforced = status.conditions.iter().find(|c| c.type_ == "Enforced")?;
        (enforced.status == "True" && enforced.observed_generation == generation).then_some(())
    })
    .await;
    for port in ports {
        assert_eq!(support::chat_on(port, &token).await, "project_inactive", "replica on {port}");
    }

    // A replica that stops is not waited for.
    let activate = Patch::Merge(json!({ "spec": { "active": true } }));
    projects.patch(&env.scoped("p"), &PatchParams::default(), &activate).await.unwrap();
    env.signal("proxy-2", "TERM");
    env.create_token("after", token_spec(&env.scoped("p"))).await;
    let started = Instant::now();
    let _ = eventually(WAIT, || async { secrets.get_opt("after").await.ok()? }).await;
    assert!(started.elapsed() < Duration::from_secs(5), "minting waited {:?} for a stopped replica", started.elapsed());
}

/// A CA and a certificate for `localhost` signed by it, made with openssl in `dir`:
/// (ca.pem, server.pem, server.key).
fn private_ca(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").current_dir(dir).args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=llm-proxy test CA"],
        ]
        .concat(),
    );
    openssl(&[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]].concat());
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}

/// An upstream behind a private CA (a self-hosted model, an internal gateway) is
/// trusted only when the proxy is given the CA (`--upstream-ca-file`); without it the
/// request is refused, never sent unverified; a file that holds no certificate stops
/// the proxy with a message that names the flag.
#[tokio::test]
async fn an_upstream_behind_a_private_ca_is_trusted_only_through_the_ca_file() {
    let mut env = Env::new("private-ca").await;
    let (ca, cert, key) = private_ca(&support::repo().join(format!("target/test-logs/{}-ca", env.id)));
    let tls = llm_proxy::fake_upstream::FakeUpstream::tls_config(&cert, &key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = llm_proxy::fake_upstream::FakeUpstream::serve_tls(listener, std::sync::Arc::new(tls), true);
    env.start_controller();
    env.put_key("tls-key", TEST_KEY, "tls").await;
    let mut project = env.project("tls");
    project.spec.upstream.url = upstream.url.clone();
    Api::<Project>::all(env.client.clone()).create(&PostParams::default(), &project).await.unwrap();
    env.create_token("t", token_spec(&env.scoped("tls"))).await;
    env.wait_token("t", TokenPhase::Active).await;
    let token = env.token_secret("t").await["token"].clone();

    let (plain, trusting) =
        ([support::free_port(), support::free_port()], [support::free_port(), support::free_port()]);
    env.start_proxy_as("proxy-plain", plain[0], plain[1], &[]).await;
    env.start_proxy_as("proxy-ca", trusting[0], trusting[1], &["--upstream-ca-file", ca.to_str().unwrap()]).await;
    assert_eq!(support::chat_on(plain[0], &token).await, "upstream_error", "an unknown CA is not trusted");
    assert!(upstream.requests().is_empty(), "nothing was sent over an unverified connection");
    assert_eq!(support::chat_on(trusting[0], &token).await, "", "the given CA is trusted");
    let sent = upstream.last_request().unwrap();
    assert_eq!(sent.header("authorization"), Some(format!("Bearer {TEST_KEY}")));

    let not_pem = support::repo().join(format!("target/test-logs/{}-not-a-ca.pem", env.id));
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let (port, admin) = (support::free_port().to_string(), support::free_port().to_string());
    let (listen, admin) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{admin}"));
    let ops = env.ops.clone();
    let args = ["proxy", "--namespace", &ops, "--listen-addr", &listen, "--admin-addr", &admin];
    let bad = [&args[..], &["--upstream-ca-file", not_pem.to_str().unwrap()]].concat();
    env.spawn_with_env("proxy-bad-ca", &bad, &[("RUST_LOG", "info")], &support::kubeconfig());
    assert!(!env.wait_for_exit("proxy-bad-ca", Duration::from_secs(10)).await.success());
    let said = std::fs::read_to_string(env.log_path("proxy-bad-ca")).unwrap();
    assert!(said.contains("--upstream-ca-file") && said.contains("holds no certificate"), "{said}");
}
