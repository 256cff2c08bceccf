//! `spec.limits` against the real API server and a real proxy: model allowlists on a
//! Project and a narrower one on its token, refused before anything is forwarded.

mod support;

use kube::Api;
use kube::api::PostParams;
use llm_proxy::api::{Limits, Project, TokenPhase};
use support::{CurlResponse, Env, curl};

fn models(list: &[&str]) -> Option<Limits> {
    Some(Limits { models: Some(list.iter().map(|m| m.to_string()).collect()) })
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
    let out = std::process::Command::new(support::sdk_python())
        .args(["-c", script])
        .env("OPENAI_API_KEY", &narrow)
        .env("OPENAI_BASE_URL", format!("{}/v1", env.proxy_url()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("403 model_not_allowed") && said.contains(r#""gpt-4o""#),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
