//! `spec.limits` against the real API server and a real proxy: model allowlists on a
//! Project and a narrower one on its token, refused before anything is forwarded.

mod support;

use std::time::Duration;

use kube::Api;
use kube::api::PostParams;
use llm_proxy::api::{Limits, Project, TokenPhase};
use support::{CurlResponse, Env, curl};

fn models(list: &[&str]) -> Option<Limits> {
    Some(Limits { models: Some(list.iter().map(|m| m.to_string()).collect()), requests_per_minute: None })
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
    let mut spec = support::token_spec(&env.scoped("p"));
    spec.limits = models(&["gpt-4o-mini"]);
    env.create_token("narrow", spec).await;
    env.wait_token("narrow", TokenPhase::Active).await;
    let narrow = env.token_secret("narrow").await["token"].clone();

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
    let ports = [env.proxy_port, support::free_port()];
    env.start_proxy_as("proxy-a", ports[0], env.proxy_admin_port, &[]).await;
    env.start_proxy_as("proxy-b", ports[1], support::free_port(), &[]).await;
    env.create_project("p").await;
    let mut spec = support::token_spec(&env.scoped("p"));
    spec.limits = Some(Limits { models: None, requests_per_minute: Some(20) });
    env.create_token("rpm", spec).await;
    env.wait_token("rpm", TokenPhase::Active).await;
    let secret = env.token_secret("rpm").await["token"].clone();

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
    let script = r#"
import openai
answer = openai.OpenAI(max_retries=3).chat.completions.create(model="m", messages=[])
print(answer.choices[0].message.content)
"#;
    let (said, stderr) = env.sdk(script, &secret).await;
    assert_eq!(said.trim(), "Hello from the fake upstream.", "{stderr}");
    let forwarded = env.upstream.last_request().unwrap();
    let retries = forwarded.header("x-stainless-retry-count").unwrap_or_default();
    assert!(retries.parse::<u32>().unwrap_or(0) >= 1, "the answered request was a retry: {retries:?}");
}
