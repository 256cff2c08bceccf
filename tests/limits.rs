//! `spec.limits` against the real API server and a real proxy: model allowlists on a
//! Project and a narrower one on its token, refused before anything is forwarded.

mod support;

use std::time::Duration;

use kube::Api;
use kube::api::PostParams;
use llm_proxy::api::{Limits, Project, ProxyToken, TokenPhase, TokenWindow, TokenWindowKind};
use support::{CurlResponse, Env, curl};

fn models(list: &[&str]) -> Option<Limits> {
    Some(Limits {
        models: Some(list.iter().map(|m| m.to_string()).collect()),
        requests_per_minute: None,
        ..Limits::default()
    })
}

/// Creates the ProxyToken `name` of Project `p` with `limits`; its token once minted.
async fn limited_token(env: &Env, name: &str, limits: Option<Limits>) -> String {
    let mut spec = support::token_spec(&env.scoped("p"));
    spec.limits = limits;
    env.create_token(name, spec).await;
    env.wait_token(name, TokenPhase::Active).await;
    env.token_secret(name).await["token"].clone()
}

/// A chat completion naming `model`, with `token`.
async fn chat(env: &Env, token: &str, model: &str) -> CurlResponse {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    post(env, token, "/v1/chat/completions", &body).await
}

async fn post(env: &Env, token: &str, path: &str, body: &str) -> CurlResponse {
    let auth = format!("Bearer {token}");
    curl("POST", &format!("{}{path}", env.proxy_url()), &[("authorization", &auth)], Some(body)).await
}

/// Sends `body` (a file, so it may be large) with curl; returns the status and answer.
async fn post_file(env: &Env, token: &str, path: &str, body: &[u8], content_type: &str) -> CurlResponse {
    let file = support::repo().join(format!("target/test-logs/{}-body", env.id));
    std::fs::write(&file, body).unwrap();
    let output = tokio::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--max-time", "20", "-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", &format!("content-type: {content_type}"), "--data-binary"])
        .arg(format!("@{}", file.display()))
        .arg(format!("{}{path}", env.proxy_url()))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    CurlResponse { status: status.trim().parse().unwrap_or(0), body: body.to_string() }
}

#[tokio::test]
async fn model_allowlists_refuse_before_forwarding_and_name_the_model() {
    let mut env = Env::new("models").await;
    env.start_controller();
    env.start_proxy().await;
    env.put_key("p-key", support::TEST_KEY, "p").await;
    let mut project = env.project("p");
    project.spec.limits = models(&["gpt-4o-mini", "text-embedding-3*", "whisper-1"]);
    Api::<Project>::all(env.client.clone()).create(&PostParams::default(), &project).await.unwrap();
    let open = env.minted("p", "open").await;
    let narrow = limited_token(&env, "narrow", models(&["gpt-4o-mini"])).await;

    // Allowed: forwarded as sent.
    assert_eq!(chat(&env, &narrow, "gpt-4o-mini").await.status, 200);
    let embedding = post(&env, &open, "/v1/embeddings", r#"{"input":"x","model":"text-embedding-3-large"}"#).await;
    assert_eq!(embedding.status, 200, "{}", embedding.body);
    let forwarded = env.upstream.requests().len();

    // Refused, naming the model and the list that refused it; nothing forwarded.
    let refused = chat(&env, &narrow, "text-embedding-3-small").await;
    assert_eq!((refused.status, refused.error_code().as_str()), (403, "model_not_allowed"));
    let message = refused.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains(r#""text-embedding-3-small""#) && message.contains("ProxyToken allows only gpt-4o-mini"),
        "{message}"
    );
    assert_eq!(refused.json()["error"]["param"], "model");
    let refused = chat(&env, &open, "gpt-4o").await;
    assert_eq!(refused.status, 403);
    assert!(
        refused.body.contains("its Project allows only gpt-4o-mini, text-embedding-3*, whisper-1"),
        "{}",
        refused.body
    );

    // Multipart (audio), the model in the path, batches, bodies naming no model or two.
    let boundary = "----llmproxy";
    let form = |model: &str| {
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\nContent-Type: audio/mpeg\r\n\r\nID3\u{1}\u{2}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--{boundary}--\r\n"
        )
    };
    let multipart = format!("multipart/form-data; boundary={boundary}");
    let audio = post_file(&env, &narrow, "/v1/audio/transcriptions", form("whisper-1").as_bytes(), &multipart).await;
    assert_eq!(audio.status, 403, "the token's list has no whisper-1: {}", audio.body);
    assert!(audio.body.contains(r#"\"whisper-1\""#), "{}", audio.body);
    let audio = post_file(&env, &open, "/v1/audio/transcriptions", form("whisper-1").as_bytes(), &multipart).await;
    assert_eq!(audio.status, 200, "{}", audio.body);
    let models_url = format!("{}/v1/models/gpt-4o", env.proxy_url());
    let bearer = format!("Bearer {narrow}");
    assert_eq!(curl("GET", &models_url, &[("authorization", &bearer)], None).await.status, 403);
    let batch =
        post(&env, &open, "/v1/batches", r#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions"}"#).await;
    assert_eq!((batch.status, batch.error_code().as_str()), (403, "model_not_allowed"));
    assert!(batch.body.contains("input file"), "{}", batch.body);
    let none = post(&env, &narrow, "/v1/chat/completions", r#"{"messages":[]}"#).await;
    assert_eq!((none.status, none.error_code().as_str()), (400, "model_required"));
    let twice = post(&env, &narrow, "/v1/chat/completions", r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#).await;
    assert_eq!((twice.status, twice.error_code().as_str()), (400, "model_ambiguous"));
    let text = post_file(&env, &narrow, "/v1/chat/completions", b"model=gpt-4o-mini", "text/plain").await;
    assert_eq!((text.status, text.error_code().as_str()), (400, "model_required"));
    assert_eq!(env.upstream.requests().len(), forwarded + 1, "only the allowed transcription went upstream");

    // A large body streams through after its model; a second model at its end cuts it,
    // so the upstream never gets a complete request.
    let filler = "x".repeat(3 * 1024 * 1024);
    let large = format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{filler}"}}]}}"#);
    let answer = post_file(&env, &narrow, "/v1/chat/completions", large.as_bytes(), "application/json").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(env.upstream.last_request().unwrap().body_len, large.len(), "forwarded whole");
    let smuggled =
        format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{filler}"}}],"model":"gpt-4o"}}"#);
    let answer = post_file(&env, &narrow, "/v1/chat/completions", smuggled.as_bytes(), "application/json").await;
    assert_eq!((answer.status, answer.error_code().as_str()), (400, "model_ambiguous"), "{}", answer.body);
    let last = env.upstream.last_request().unwrap();
    assert!(last.body_len < smuggled.len(), "the upstream got {} of {} bytes", last.body_len, smuggled.len());

    // The official SDK shows the refusal as it is.
    let script = r#"
import openai
try:
    openai.OpenAI().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
except openai.PermissionDeniedError as e:
    print(e.status_code, e.code, e.message)
"#;
    let (said, stderr) = env.sdk(script, &narrow).await;
    assert!(said.starts_with("403 model_not_allowed") && said.contains(r#""gpt-4o""#), "{said}{stderr}");

    // Listings offer only what both lists allow (the upstream lists four models); the
    // SDK asks for a compressed answer and still gets the narrowed one.
    let listed = |token: String| {
        let url = format!("{}/v1/models", env.proxy_url());
        async move {
            let answer = curl("GET", &url, &[("authorization", &format!("Bearer {token}"))], None).await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            let ids: Vec<String> = answer.json()["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect();
            ids
        }
    };
    assert_eq!(listed(narrow.clone()).await, ["gpt-4o-mini"]);
    assert_eq!(listed(open.clone()).await, ["gpt-4o-mini", "text-embedding-3-large"]);
    let script = "import openai\nprint([m.id for m in openai.OpenAI().models.list()])\n";
    let (said, stderr) = env.sdk(script, &narrow).await;
    assert_eq!(said.trim(), "['gpt-4o-mini']", "{stderr}");
    let forwarded = env.upstream.last_request().unwrap();
    assert_eq!(forwarded.header("accept-encoding"), None, "asked uncompressed, to be read");
}

#[tokio::test]
async fn invalid_model_lists_are_refused_with_what_to_fix() {
    let env = Env::new("models-invalid").await;
    env.put_key("p-key", support::TEST_KEY, "p").await;
    let projects: Api<Project> = Api::all(env.client.clone());
    for (list, says) in [
        (vec![], "an empty models list allows no model: remove limits.models to allow every model"),
        (vec!["gpt-4o", "*"], "a prefix ending in *"),
        (vec!["gpt-*-mini"], "* may only end an entry"),
        (vec![" gpt-4o"], "each models entry is a model name"),
    ] {
        let mut project = env.project(&format!("p{}", list.len()));
        project.spec.limits = models(&list);
        let error = projects.create(&PostParams::default(), &project).await.unwrap_err().to_string();
        assert!(error.contains(says), "{list:?}: {error}");
    }
    let mut spec = support::token_spec(&env.scoped("p"));
    spec.limits = models(&["gpt-4o mini"]);
    let mut token = llm_proxy::api::ProxyToken::new("t", spec);
    token.metadata.namespace = Some(env.apps.clone());
    let error = Api::<llm_proxy::api::ProxyToken>::namespaced(env.client.clone(), &env.apps)
        .create(&PostParams::default(), &token)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("each models entry is a model name (gpt-4o-mini) or a prefix ending in *"), "{error}");
}

/// The official SDK, refused by a rate limit, waits and retries: the request that is
/// answered in the end is marked as a retry.
async fn the_sdk_waits_out_the_rate_limit(env: &Env, secret: &str) {
    let script = r#"
import openai
answer = openai.OpenAI(max_retries=3).chat.completions.create(model="m", messages=[])
print(answer.choices[0].message.content)
"#;
    let (said, stderr) = env.sdk(script, secret).await;
    assert_eq!(said.trim(), "Hello from the fake upstream.", "{stderr}");
    let forwarded = env.upstream.last_request().unwrap();
    let retries = forwarded.header("x-stainless-retry-count").unwrap_or_default();
    assert!(retries.parse::<u32>().unwrap_or(0) >= 1, "the answered request was a retry: {retries:?}");
}

/// Sleeps until the wall clock's second of the minute is in `seconds`.
async fn wait_for_second(seconds: std::ops::Range<u64>) {
    loop {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let second = now.as_secs() % 60;
        if seconds.contains(&second) {
            return;
        }
        let until = (seconds.start + 60 - second) % 60;
        tokio::time::sleep(Duration::from_millis(until.max(1) * 1000 - u64::from(now.subsec_millis()).min(999))).await;
    }
}

/// `requestsPerMinute` over two proxy processes: a minute never admits more, whatever
/// replica the requests reach; beyond it, 429 `rate_limit_exceeded` with OpenAI's
/// rate-limit headers; and the official SDK waits out `Retry-After` and gets its answer
/// in the next minute (the forwarded request says it is a retry).
#[tokio::test]
async fn a_minute_never_admits_more_than_requests_per_minute_across_replicas() {
    let mut env = Env::new("rpm").await;
    env.start_controller();
    // proxy-a is the Env's own proxy, where env.sdk sends the SDK.
    let (ports, _) = env.start_proxies::<2>().await;
    env.create_project("p").await;
    let secret = limited_token(&env, "rpm", Some(Limits { requests_per_minute: Some(20), ..Limits::default() })).await;

    // 60 at once over both replicas, well inside one minute.
    wait_for_second(0..45).await;
    let results = support::burst(&ports, &secret, 60).await;
    let served = results.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(served, 20, "{results:?}");
    assert!(results.iter().filter(|(s, _)| *s != 200).all(|(s, code)| *s == 429 && code == "rate_limit_exceeded"));
    assert_eq!(env.upstream.requests().len(), 20, "exactly the limit reached the upstream");
    let auth = format!("Bearer {secret}");
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", ports[1]);
    let (answer, headers) =
        support::curl_with_headers("POST", &url, &[("authorization", &auth)], Some(r#"{"model":"m","messages":[]}"#))
            .await;
    assert_eq!((answer.status, answer.json()["error"]["type"].as_str()), (429, Some("requests")));
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let retry_after: u64 = header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{headers:?}");
    assert_eq!(header("x-ratelimit-limit-requests"), "20");
    assert_eq!(header("x-ratelimit-remaining-requests"), "0");
    assert_eq!(header("x-ratelimit-reset-requests"), format!("{retry_after}s"));
    assert!(header("x-should-retry").is_empty(), "the SDKs retry a rate limit");
    let token = Api::<llm_proxy::api::ProxyToken>::namespaced(env.client.clone(), &env.apps).get("rpm").await.unwrap();
    assert_eq!(token.status.unwrap().current_minute.map(|w| w.claimed_requests), Some(20));
    // A full minute is asked about once per replica: the rest of it is refused locally.
    let metrics =
        support::curl("GET", &format!("http://127.0.0.1:{}/metrics", env.proxy_admin_port), &[], None).await.body;
    assert!(metrics.contains(r#"llmproxy_quota_claims_total{result="minute_full"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"llmproxy_quota_claims_total{result="minute_claimed"}"#), "{metrics}");

    // Near a minute's end, with the minute used up: the SDK waits for the next one.
    wait_for_second(50..54).await;
    support::burst(&ports, &secret, 30).await;
    the_sdk_waits_out_the_rate_limit(&env, &secret).await;
}

/// The value of header `name` in `headers`, or "".
fn header(headers: &[(String, String)], name: &str) -> String {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_default()
}

/// Reasons of the Events about the ProxyToken `name` of the test's apps namespace.
async fn token_event_reasons(env: &Env, name: &str) -> Vec<String> {
    use k8s_openapi::api::events::v1::Event;
    let events = Api::<Event>::namespaced(env.client.clone(), &env.apps);
    let list = events.list(&kube::api::ListParams::default()).await.unwrap();
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect()
}

/// The `window` entry of the ProxyToken `name`'s `status.tokenWindows`.
async fn token_window(env: &Env, name: &str, window: TokenWindowKind) -> Option<TokenWindow> {
    let token = Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps).get_status(name).await.unwrap();
    token.status.unwrap_or_default().token_windows.into_iter().find(|w| w.window == window)
}

/// A daily token budget over three proxy processes, with every request in flight at
/// once: the upstream's reported usage is charged exactly, the budget is overrun by at
/// most one request per replica (the stated bound when requests use what they
/// reserve); while requests in flight hold the rest, refusals are retryable, and once
/// their usage spends it the refusal is `insufficient_quota`, which the official SDK
/// does not retry; the spent budget shows in status, `kubectl get`, one Event and the
/// metrics.
#[tokio::test]
async fn a_daily_token_budget_holds_across_three_replicas_and_is_charged_from_reported_usage() {
    const BUDGET: i64 = 800;
    const PER_REQUEST: i64 = 16; // the fake upstream's usage: 9 prompt + 7 completion
    let mut env = Env::new("tpd").await;
    env.start_controller();
    let (ports, admin) = env.start_proxies::<3>().await;
    env.create_project("p").await;
    let secret = limited_token(&env, "tpd", Some(Limits { tokens_per_day: Some(BUDGET), ..Limits::default() })).await;

    // One request through each replica, so each knows what a request uses.
    for port in ports {
        assert_eq!(support::burst(&[port], &secret, 1).await, [(200, String::new())]);
    }
    // 120 requests at once, each held 300 ms by the upstream: all in flight together.
    let results = support::slow_burst(&ports, &secret, 120, 300).await;
    let served = results.iter().filter(|(s, _)| *s == 200).count() as i64;
    let held = results.iter().filter(|(_, code)| code == "rate_limit_exceeded").count();
    let spent = results.iter().filter(|(_, code)| code == "token_budget_exceeded").count();
    assert_eq!(served as usize + held + spent, results.len(), "only 429s: {results:?}");
    assert!(results.iter().all(|(s, _)| *s == 200 || *s == 429), "{results:?}");
    let used = (served + 3) * PER_REQUEST;
    let overrun = used - BUDGET;
    println!(
        "daily budget {BUDGET}: {} requests answered, {used} tokens used, overrun {overrun}; refused {held} as held, {spent} as spent",
        served + 3
    );
    assert!(overrun <= 3 * PER_REQUEST, "overrun {overrun} is over one request per replica");
    // Under-use: at most what one request lacks per replica (a share's last tokens).
    assert!(overrun > -3 * PER_REQUEST, "only {used} of {BUDGET} were spent");
    assert_eq!(env.upstream.requests().len() as i64, served + 3);

    // Cold: before any answer of a token, a request reserves a sixteenth of the limit
    // (here more than it uses), so the same bound holds.
    let cold = limited_token(&env, "cold", Some(Limits { tokens_per_day: Some(BUDGET), ..Limits::default() })).await;
    let results = support::slow_burst(&ports, &cold, 120, 300).await;
    let cold_served = results.iter().filter(|(s, _)| *s == 200).count() as i64;
    let cold_overrun = cold_served * PER_REQUEST - BUDGET;
    println!("cold: {cold_served} requests answered, overrun {cold_overrun}");
    assert!(cold_overrun <= 3 * PER_REQUEST, "cold overrun {cold_overrun}");
    assert!(cold_served >= 16, "at least a sixteenth each: {cold_served}");
    // Most of it was only reserved: the refusals say retry, and no Event says spent.
    let retryable = results.iter().filter(|(s, c)| *s == 429 && c == "rate_limit_exceeded").count() as i64;
    assert_eq!(retryable, 120 - cold_served, "{results:?}");
    assert!(!token_event_reasons(&env, "cold").await.contains(&"TokenBudgetSpent".to_string()));

    // Status is charged what the upstream reported, exactly, once the replicas flush.
    let window = support::eventually(Duration::from_secs(15), || async {
        token_window(&env, "tpd", TokenWindowKind::Day).await.filter(|w| w.used_tokens == used)
    })
    .await;
    assert_eq!((window.limit, window.remaining_tokens), (BUDGET, (BUDGET - used).max(0)));
    assert!(window.claimed_tokens <= used.max(BUDGET), "{window:?}");
    let today = jiff::Timestamp::now().as_microsecond() / 86_400_000_000 * 86_400_000_000;
    assert_eq!(window.start.0.as_microsecond(), today, "the window is today's, from 00:00 UTC");
    let listed = support::run_kubectl(&["get", "ptok", "tpd", "-n", &env.apps, "-o", "wide"]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(listed.contains("TOKENS TODAY") && listed.contains("LEFT TODAY"), "{listed}");
    let row = listed.lines().nth(1).unwrap_or_default();
    assert!(row.split_whitespace().any(|cell| cell == used.to_string()), "{listed}");

    // The refusal, once what is left in the replicas' shares is used and the usage is
    // in: a spent budget, which OpenAI calls insufficient_quota.
    let auth = format!("Bearer {secret}");
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (answer, headers) = support::eventually(Duration::from_secs(15), || async {
        let port = ports[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % ports.len()];
        let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
        let body = Some(r#"{"model":"m","messages":[]}"#);
        let (answer, headers) = support::curl_with_headers("POST", &url, &[("authorization", &auth)], body).await;
        (answer.json()["error"]["type"] == "insufficient_quota").then_some((answer, headers))
    })
    .await;
    let used = env.upstream.requests().len() as i64 * PER_REQUEST - cold_served * PER_REQUEST;
    assert!(used - BUDGET <= 3 * PER_REQUEST, "{used}");
    let error = &answer.json()["error"];
    assert_eq!((answer.status, error["type"].as_str()), (429, Some("insufficient_quota")), "{}", answer.body);
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("800 LLM tokens per day (UTC) (spec.limits.tokensPerDay)"), "{message}");
    assert!(message.contains("It resets at") && message.contains("T00:00:00Z"), "{message}");
    assert_eq!(header(&headers, "x-should-retry"), "false");
    assert_eq!(header(&headers, "x-ratelimit-limit-tokens"), "800");
    assert_eq!(header(&headers, "x-ratelimit-remaining-tokens"), "0");
    let retry_after: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!((1..=86_400).contains(&retry_after), "{headers:?}");
    assert!(token_window(&env, "tpd", TokenWindowKind::Day).await.unwrap().spent_at.is_some());
    let events = support::eventually(Duration::from_secs(5), || async {
        let reasons = token_event_reasons(&env, "tpd").await;
        reasons.contains(&"TokenBudgetSpent".to_string()).then_some(reasons)
    })
    .await;
    assert_eq!(events.iter().filter(|r| *r == "TokenBudgetSpent").count(), 1, "one Event, from one replica");

    // The official SDK takes it as final: one attempt, no retries.
    let refused_before = refusals(&env).await;
    let (said, stderr) = sdk_rate_limit_error(&env, &secret).await;
    assert_eq!(said.trim(), "429 token_budget_exceeded", "{stderr}");
    assert_eq!(refusals(&env).await - refused_before, 1, "the SDK did not retry");

    // Metrics: what is left, per token and window, as each replica last wrote it; the
    // replica that wrote last says nothing is.
    let gauge =
        format!(r#"llmproxy_token_budget_remaining{{token_namespace="{}",token_name="tpd",window="Day"}} 0"#, env.apps);
    let mut said = Vec::new();
    for port in admin {
        said.push(support::curl("GET", &format!("http://127.0.0.1:{port}/metrics"), &[], None).await.body);
    }
    assert!(said.iter().any(|metrics| metrics.contains(&gauge)), "{said:?}");
}

/// What the official SDK, allowed three retries, raises for one chat request with
/// `secret`: the status and code of its `RateLimitError` (nothing if none), and stderr.
async fn sdk_rate_limit_error(env: &Env, secret: &str) -> (String, String) {
    let script = r#"
import openai
try:
    openai.OpenAI(max_retries=3).chat.completions.create(model="m", messages=[])
except openai.RateLimitError as e:
    print(e.status_code, e.code)
"#;
    env.sdk(script, secret).await
}

/// `token_budget_exceeded` refusals proxy-a has answered.
async fn refusals(env: &Env) -> u64 {
    let metrics = support::curl("GET", &format!("http://127.0.0.1:{}/metrics", env.proxy_admin_port), &[], None).await;
    metrics
        .body
        .lines()
        .filter(|l| l.starts_with("llmproxy_requests_total") && l.contains(r#"outcome="token_budget_exceeded""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `tokensPerMinute` is a rate limit: 429 `rate_limit_exceeded` of type `tokens` with
/// OpenAI's token headers, which the official SDK waits out and retries into the next
/// minute.
#[tokio::test]
async fn tokens_per_minute_is_a_rate_limit_the_sdk_waits_out() {
    let mut env = Env::new("tpm").await;
    env.start_controller();
    env.start_proxy().await;
    env.create_project("p").await;
    let secret = limited_token(&env, "tpm", Some(Limits { tokens_per_minute: Some(64), ..Limits::default() })).await;

    wait_for_second(48..53).await;
    let ports = [env.proxy_port];
    assert_eq!(support::burst(&ports, &secret, 1).await[0].0, 200);
    let results = support::slow_burst(&ports, &secret, 10, 200).await;
    assert_eq!(results.iter().filter(|(s, _)| *s == 200).count(), 3, "64 tokens: four requests of 16 {results:?}");
    let auth = format!("Bearer {secret}");
    let url = format!("{}/v1/chat/completions", env.proxy_url());
    let (answer, headers) =
        support::curl_with_headers("POST", &url, &[("authorization", &auth)], Some(r#"{"model":"m","messages":[]}"#))
            .await;
    let error = &answer.json()["error"];
    assert_eq!(
        (answer.status, error["code"].as_str(), error["type"].as_str()),
        (429, Some("rate_limit_exceeded"), Some("tokens"))
    );
    assert_eq!(header(&headers, "x-ratelimit-limit-tokens"), "64");
    let retry_after: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!((1..=12).contains(&retry_after), "{headers:?}");
    assert_eq!(header(&headers, "x-ratelimit-reset-tokens"), format!("{retry_after}s"));
    assert!(header(&headers, "x-should-retry").is_empty(), "the SDKs retry a rate limit");

    the_sdk_waits_out_the_rate_limit(&env, &secret).await;
}

#[tokio::test]
async fn invalid_window_limits_are_refused_with_what_to_fix() {
    let env = Env::new("tokens-invalid").await;
    env.put_key("p-key", support::TEST_KEY, "p").await;
    let mut project = env.project("p");
    project.spec.limits = Some(Limits { tokens_per_month: Some(0), ..Limits::default() });
    let error = Api::<Project>::all(env.client.clone()).create(&PostParams::default(), &project).await.unwrap_err();
    assert!(
        error.to_string().contains("spec.limits.tokensPerMonth")
            && error.to_string().contains("greater than or equal to 1"),
        "{error}"
    );
    let mut spec = support::token_spec(&env.scoped("p"));
    spec.limits = Some(Limits { tokens_per_day: Some(0), ..Limits::default() });
    let mut token = ProxyToken::new("t", spec);
    token.metadata.namespace = Some(env.apps.clone());
    let error = Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps)
        .create(&PostParams::default(), &token)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("spec.limits.tokensPerDay") && error.contains("greater than or equal to 1"), "{error}");

    // Dollars are decimal strings: the API server says how to write one.
    for (budget, says) in [
        ("12,50", r#"costPerMonth is US dollars as a decimal string with at most 6 places, e.g. \"50\" or \"12.50\""#),
        ("0.00", "costPerMonth must be more than 0: remove it for no cost budget"),
    ] {
        project.spec.limits = Some(Limits { cost_per_month: Some(budget.into()), ..Limits::default() });
        let error = Api::<Project>::all(env.client.clone()).create(&PostParams::default(), &project).await.unwrap_err();
        assert!(error.to_string().contains("spec.limits.costPerMonth") && error.to_string().contains(says), "{error}");
    }
    let prices = serde_json::json!({
        "apiVersion": "llmproxy.io/v1alpha1", "kind": "PriceList",
        "metadata": { "name": env.scoped("bad-prices") },
        "spec": { "models": [
            { "model": "gpt-4o", "inputPerMillion": "$2.50", "outputPerMillion": "10" },
            { "model": "gpt-4o", "inputPerMillion": "2.50", "outputPerMillion": "10" },
        ] },
    });
    let prices: llm_proxy::api::PriceList = serde_json::from_value(prices).unwrap();
    let error = Api::<llm_proxy::api::PriceList>::all(env.client.clone())
        .create(&PostParams::default(), &prices)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("spec.models[0].inputPerMillion") && error.contains("a price is US dollars"), "{error}");
    assert!(error.contains("spec.models[1]: Duplicate value"), "{error}");
}

/// A daily budget on a Project, added later by a GitOps tool's server-side apply, is
/// shared by all its tokens over two proxy processes: the same bound, the Project's
/// status and columns show the usage, the refusal names the Project's limit, and the
/// Event is on the Project.
#[tokio::test]
async fn a_project_budget_is_shared_by_all_its_tokens_across_replicas() {
    const BUDGET: i64 = 640;
    const PER_REQUEST: i64 = 16;
    let mut env = Env::new("ptpd").await;
    env.start_controller();
    let (ports, admin) = env.start_proxies::<2>().await;
    env.create_project("p").await;
    let name = env.scoped("p");
    let gitops = serde_json::json!({
        "apiVersion": "llmproxy.io/v1alpha1", "kind": "Project",
        "metadata": { "name": name },
        "spec": { "limits": { "tokensPerDay": BUDGET } },
    });
    Api::<Project>::all(env.client.clone())
        .patch(&name, &kube::api::PatchParams::apply("kustomize-controller"), &kube::api::Patch::Apply(&gitops))
        .await
        .unwrap();
    let mut secrets = Vec::new();
    for token in ["a", "b"] {
        env.create_token(token, support::token_spec(&name)).await;
        env.wait_token(token, TokenPhase::Active).await;
        secrets.push(env.token_secret(token).await["token"].clone());
    }
    // The proxies have the limit once a request of each token is refused or counted in
    // the Project's status: wait for the first answer through each replica.
    support::eventually(Duration::from_secs(10), || async {
        for port in ports {
            assert_eq!(support::burst(&[port], &secrets[0], 1).await[0].0, 200);
        }
        let project = Api::<Project>::all(env.client.clone()).get_status(&name).await.unwrap();
        (!project.status.unwrap_or_default().token_windows.is_empty()).then_some(())
    })
    .await;
    let warmed = env.upstream.requests().len() as i64;

    // Both tokens at once over both replicas, every request in flight together.
    let (a, b) = tokio::join!(
        support::slow_burst(&ports, &secrets[0], 40, 300),
        support::slow_burst(&ports, &secrets[1], 40, 300)
    );
    let results: Vec<_> = a.into_iter().chain(b).collect();
    let served = results.iter().filter(|(s, _)| *s == 200).count() as i64;
    let refused = |code: &str| results.iter().filter(|(s, c)| *s == 429 && c == code).count() as i64;
    assert_eq!(served + refused("rate_limit_exceeded") + refused("token_budget_exceeded"), 80, "{results:?}");
    let used = (served + warmed) * PER_REQUEST;
    println!("project budget {BUDGET}: {} requests answered, {used} tokens used", served + warmed);
    assert!(used - BUDGET <= 2 * PER_REQUEST, "overrun {} is over one request per replica", used - BUDGET);
    assert!(used - BUDGET > -2 * PER_REQUEST, "only {used} of {BUDGET} were spent");

    let window = support::eventually(Duration::from_secs(15), || async {
        let project = Api::<Project>::all(env.client.clone()).get_status(&name).await.unwrap();
        let status = project.status.unwrap_or_default();
        status.token_windows.into_iter().find(|w| w.window == TokenWindowKind::Day && w.used_tokens == used)
    })
    .await;
    assert_eq!((window.limit, window.remaining_tokens), (BUDGET, 0));
    let listed = support::run_kubectl(&["get", "project", &name, "-o", "wide"]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(listed.contains("TOKENS TODAY"), "{listed}");
    assert!(listed.lines().nth(1).unwrap_or_default().split_whitespace().any(|c| c == used.to_string()), "{listed}");
    // The GitOps tool still owns the limit; the proxies own only the usage.
    let project = Api::<Project>::all(env.client.clone()).get(&name).await.unwrap();
    let managers: Vec<_> =
        project.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|m| m.manager).collect();
    assert!(managers.iter().any(|m| m == "kustomize-controller") && managers.iter().any(|m| m == "llm-proxy-proxy"));

    let auth = format!("Bearer {}", secrets[1]);
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", ports[1]);
    let answer = support::eventually(Duration::from_secs(10), || async {
        let answer =
            support::curl("POST", &url, &[("authorization", &auth)], Some(r#"{"model":"m","messages":[]}"#)).await;
        (answer.error_code() == "token_budget_exceeded").then_some(answer)
    })
    .await;
    let message = answer.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert!(message.contains("the Project of this token may use, for all its tokens together, 640 LLM tokens per day (UTC) (the Project's spec.limits.tokensPerDay)"), "{message}");

    let spent = support::eventually(Duration::from_secs(5), || async {
        let events = Api::<k8s_openapi::api::events::v1::Event>::all(env.client.clone())
            .list(&kube::api::ListParams::default())
            .await
            .unwrap();
        let spent: Vec<_> = events
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str()))
            .filter(|e| e.reason.as_deref() == Some("TokenBudgetSpent"))
            .collect();
        (!spent.is_empty()).then_some(spent)
    })
    .await;
    assert_eq!(spent.len(), 1, "{spent:?}");
    assert!(spent[0].note.as_deref().unwrap_or_default().contains("for all tokens of this Project together"));
    let mut said = Vec::new();
    for port in admin {
        said.push(support::curl("GET", &format!("http://127.0.0.1:{port}/metrics"), &[], None).await.body);
    }
    let gauge = format!(r#"llmproxy_project_budget_remaining{{project="{name}",window="Day"}} 0"#);
    assert!(said.iter().any(|metrics| metrics.contains(&gauge)), "{said:?}");
}

/// A share a replica no longer uses is not lost: a replica idle for 10 s gives its
/// shares back, so the replica still serving the token can spend the whole budget;
/// while they are out, its refusals are retryable, and only a budget really used up
/// is final.
#[tokio::test]
async fn an_idle_replica_gives_its_share_back_and_the_budget_is_spent_whole() {
    const BUDGET: i64 = 1600;
    const PER_REQUEST: i64 = 16;
    let mut env = Env::new("idle-share").await;
    env.start_controller();
    let (ports, _) = env.start_proxies::<2>().await;
    env.create_project("p").await;
    let secret = limited_token(&env, "idle", Some(Limits { tokens_per_day: Some(BUDGET), ..Limits::default() })).await;

    // proxy-a claims a share of 100 and uses 16 of it, then serves nothing more.
    assert_eq!(support::burst(&ports[..1], &secret, 1).await[0].0, 200);
    // proxy-b gets everything else; when the rest is only held, it says retry.
    let results = support::slow_burst(&ports[1..], &secret, 120, 300).await;
    let refused: Vec<_> = results.iter().filter(|(s, _)| *s != 200).collect();
    assert!(!refused.is_empty() && refused.iter().all(|(s, c)| *s == 429 && c == "rate_limit_exceeded"), "{results:?}");

    // Once proxy-a has been idle a while, its share comes back and proxy-b spends it.
    let (answer, _) = support::eventually(Duration::from_secs(30), || async {
        let url = format!("http://127.0.0.1:{}/v1/chat/completions", ports[1]);
        let auth = format!("Bearer {secret}");
        let body = Some(r#"{"model":"m","messages":[]}"#);
        let (answer, headers) = support::curl_with_headers("POST", &url, &[("authorization", &auth)], body).await;
        (answer.error_code() == "token_budget_exceeded").then_some((answer, headers))
    })
    .await;
    assert_eq!(answer.status, 429);
    let used = env.upstream.requests().len() as i64 * PER_REQUEST;
    println!("budget {BUDGET}: {used} used after the idle share came back");
    assert!(used >= BUDGET, "{used} of {BUDGET}: a share was stranded");
    assert!(used - BUDGET <= 2 * PER_REQUEST, "overrun {}", used - BUDGET);
}

/// `requestsPerMinute` on a Project holds for all its tokens together, over two proxy
/// processes: never more in a minute, and the refusal names the Project's limit.
#[tokio::test]
async fn a_project_minute_is_shared_by_all_its_tokens_across_replicas() {
    let mut env = Env::new("prpm").await;
    env.start_controller();
    env.start_proxy().await;
    let ports = env.start_second_proxy().await;
    let mut project = env.project("p");
    env.put_key("p-key", support::TEST_KEY, "p").await;
    project.spec.limits = Some(Limits { requests_per_minute: Some(20), ..Limits::default() });
    Api::<Project>::all(env.client.clone()).create(&PostParams::default(), &project).await.unwrap();
    let mut secrets = Vec::new();
    for token in ["a", "b"] {
        env.create_token(token, support::token_spec(&env.scoped("p"))).await;
        env.wait_token(token, TokenPhase::Active).await;
        secrets.push(env.token_secret(token).await["token"].clone());
    }
    wait_for_second(0..45).await;
    let (a, b) = tokio::join!(support::burst(&ports, &secrets[0], 30), support::burst(&ports, &secrets[1], 30));
    let results: Vec<_> = a.into_iter().chain(b).collect();
    assert_eq!(results.iter().filter(|(s, _)| *s == 200).count(), 20, "{results:?}");
    assert!(
        results.iter().filter(|(s, _)| *s != 200).all(|(s, c)| *s == 429 && c == "rate_limit_exceeded"),
        "{results:?}"
    );
    let auth = format!("Bearer {}", secrets[1]);
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", ports[0]);
    let answer = curl("POST", &url, &[("authorization", &auth)], Some(r#"{"model":"m","messages":[]}"#)).await;
    assert!(
        answer
            .body
            .contains("the Project of this token may receive 20 requests per minute from all its tokens together"),
        "{}",
        answer.body
    );
    let stored = Api::<Project>::all(env.client.clone()).get_status(&env.scoped("p")).await.unwrap();
    assert_eq!(stored.status.unwrap().current_minute.map(|w| w.claimed_requests), Some(20));
}

/// US dollars as status writes them ("0.529", "12.50") in micro-dollars.
fn micros(usd: &str) -> i64 {
    let (whole, fraction) = usd.split_once('.').unwrap_or((usd, ""));
    whole.parse::<i64>().unwrap() * 1_000_000 + format!("{fraction:0<6}").parse::<i64>().unwrap()
}

/// Writes `yaml` to a file and applies it with `kubectl apply`, as an admin would.
fn kubectl_apply(env: &Env, yaml: &str) {
    let file = support::repo().join(format!("target/test-logs/{}-apply.yaml", env.id));
    std::fs::write(&file, yaml).unwrap();
    let applied = support::run_kubectl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
}

/// A monthly budget in US dollars on a token, over two proxy processes, priced from a
/// PriceList an admin applies with kubectl: a model the list does not price is refused
/// before anything is forwarded; each answer costs its reported prompt and completion
/// tokens at the list's prices; the budget is overrun by at most one request per
/// replica; the spend shows in the token's and the Project's status, in `kubectl get`,
/// in one Event and in the metrics; and the official SDK takes the spent budget as
/// final.
#[tokio::test]
async fn a_monthly_cost_budget_is_priced_from_the_price_list_and_holds_across_replicas() {
    // The fake upstream reports 9 prompt and 7 completion tokens: at $1,000 and $2,000
    // per million, $0.009 + $0.014.
    const PER_REQUEST: i64 = 23_000; // micro-dollars
    const BUDGET: i64 = 500_000; // "0.50"
    let mut env = Env::new("cost").await;
    env.start_controller();
    let (ports, admin) = env.start_proxies::<2>().await;
    env.create_project("p").await;
    let (project, prices) = (env.scoped("p"), env.scoped("prices"));
    // The Project prices from its own list, and shares a larger budget among its tokens.
    let gitops = serde_json::json!({
        "apiVersion": "llmproxy.io/v1alpha1", "kind": "Project",
        "metadata": { "name": project },
        "spec": { "priceList": prices, "limits": { "costPerMonth": "100" } },
    });
    Api::<Project>::all(env.client.clone())
        .patch(&project, &kube::api::PatchParams::apply("argocd-controller"), &kube::api::Patch::Apply(&gitops))
        .await
        .unwrap();
    let limits = Limits { cost_per_month: Some("0.50".into()), ..Limits::default() };
    let secret = limited_token(&env, "cost", Some(limits)).await;

    // No PriceList yet: nothing can be priced, so nothing is forwarded.
    let refused = support::eventually(Duration::from_secs(10), || async {
        let answer = chat(&env, &secret, "m").await;
        (answer.error_code() == "model_not_priced").then_some(answer)
    })
    .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let message = refused.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    let missing =
        format!(r#"The model "m" cannot be priced: the PriceList "{prices}" the Project prices from does not exist"#);
    assert!(message.contains(&missing), "{message}");
    assert!(env.upstream.requests().is_empty());

    kubectl_apply(
        &env,
        &format!(
            r#"apiVersion: llmproxy.io/v1alpha1
kind: PriceList
metadata:
  name: {prices}
spec:
  source: test prices
  models:
    - model: m
      inputPerMillion: "1000"
      outputPerMillion: "2000"
    - model: gpt-4o-mini*
      inputPerMillion: "0.15"
      outputPerMillion: "0.60"
"#
        ),
    );
    // Priced on every replica once they see the list; another model still is not.
    support::eventually(Duration::from_secs(10), || async {
        let codes = [support::chat_on(ports[0], &secret).await, support::chat_on(ports[1], &secret).await];
        (codes == ["", ""]).then_some(())
    })
    .await;
    let unpriced = chat(&env, &secret, "gpt-4o").await;
    assert_eq!((unpriced.status, unpriced.error_code()), (403, "model_not_priced".to_string()), "{}", unpriced.body);
    let message = unpriced.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains(&format!(r#"The model "gpt-4o" has no price in the PriceList "{prices}""#)), "{message}");
    // An answer that reports no usage could not be charged: refused, not free.
    let speech = post(&env, &secret, "/v1/audio/speech", r#"{"model":"m","input":"hi","voice":"alloy"}"#).await;
    assert_eq!((speech.status, speech.error_code()), (403, "model_not_allowed".to_string()), "{}", speech.body);
    assert!(speech.body.contains("its answer reports no token usage"), "{}", speech.body);
    let warmed = env.upstream.requests().len() as i64;

    let results = support::slow_burst(&ports, &secret, 60, 300).await;
    let served = results.iter().filter(|(s, _)| *s == 200).count() as i64;
    let refused = |code: &str| results.iter().filter(|(s, c)| *s == 429 && c == code).count() as i64;
    assert_eq!(served + refused("rate_limit_exceeded") + refused("cost_budget_exceeded"), 60, "{results:?}");
    let used = (served + warmed) * PER_REQUEST;
    println!("cost budget $0.50: {} requests answered, ${} spent", served + warmed, used as f64 / 1e6);
    assert!(used - BUDGET <= 2 * PER_REQUEST, "overrun {} is over one request per replica", used - BUDGET);
    assert!(used - BUDGET > -2 * PER_REQUEST, "only {used} of {BUDGET} were spent");

    // Status in dollars, exactly what the answers cost, on the token and its Project.
    let window = support::eventually(Duration::from_secs(15), || async {
        let token = Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps).get_status("cost").await.unwrap();
        let windows = token.status.unwrap_or_default().cost_windows;
        windows.into_iter().find(|w| w.window == TokenWindowKind::Month && micros(&w.used_usd) == used)
    })
    .await;
    assert_eq!((window.limit_usd.as_str(), window.remaining_usd.as_str()), ("0.50", "0.00"), "{window:?}");
    let month = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC).date().first_of_month();
    assert_eq!(window.start.0.to_string(), format!("{month}T00:00:00Z"), "the window is this month's, UTC");
    let project_window = support::eventually(Duration::from_secs(15), || async {
        let status = Api::<Project>::all(env.client.clone()).get_status(&project).await.unwrap().status;
        let windows = status.unwrap_or_default().cost_windows;
        windows.into_iter().find(|w| micros(&w.used_usd) == used)
    })
    .await;
    assert_eq!(project_window.limit_usd, "100.00");
    let spent = &window.used_usd;
    let listed = support::run_kubectl(&["get", "ptok", "cost", "-n", &env.apps, "-o", "wide"]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(listed.contains("SPENT MONTH") && listed.contains("BUDGET LEFT"), "{listed}");
    assert!(listed.lines().nth(1).unwrap_or_default().split_whitespace().any(|cell| cell == spent), "{listed}");

    // Once the usage is in: a spent budget, final for the SDKs.
    let auth = format!("Bearer {secret}");
    let (answer, headers) = support::eventually(Duration::from_secs(15), || async {
        let url = format!("http://127.0.0.1:{}/v1/chat/completions", ports[0]);
        let body = Some(r#"{"model":"m","messages":[]}"#);
        let (answer, headers) = support::curl_with_headers("POST", &url, &[("authorization", &auth)], body).await;
        (answer.error_code() == "cost_budget_exceeded").then_some((answer, headers))
    })
    .await;
    let error = &answer.json()["error"];
    assert_eq!((answer.status, error["type"].as_str()), (429, Some("insufficient_quota")), "{}", answer.body);
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("this token may use $0.50 per month (UTC) (spec.limits.costPerMonth)"), "{message}");
    assert_eq!(header(&headers, "x-should-retry"), "false");
    let events = support::eventually(Duration::from_secs(5), || async {
        let reasons = token_event_reasons(&env, "cost").await;
        reasons.contains(&"CostBudgetSpent".to_string()).then_some(reasons)
    })
    .await;
    assert_eq!(events.iter().filter(|r| *r == "CostBudgetSpent").count(), 1, "one Event, from one replica");
    let (said, stderr) = sdk_rate_limit_error(&env, &secret).await;
    assert_eq!(said.trim(), "429 cost_budget_exceeded", "{stderr}");

    // Metrics: the spend per token, and what is left of its budget.
    let mut said = String::new();
    for port in admin {
        said += &support::curl("GET", &format!("http://127.0.0.1:{port}/metrics"), &[], None).await.body;
    }
    let left = format!(
        r#"llmproxy_token_cost_remaining_usd{{token_namespace="{}",token_name="cost",window="Month"}} 0"#,
        env.apps
    );
    assert!(said.contains(&left), "{said}");
    let spend: f64 = said
        .lines()
        .filter(|l| l.starts_with("llmproxy_upstream_cost_usd_total") && l.contains(r#"token_name="cost""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!((spend - used as f64 / 1e6).abs() < 1e-9, "{spend} spent by the metrics, {used} by status");
}
