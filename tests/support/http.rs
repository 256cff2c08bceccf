//! Real clients over real sockets: curl, hyper, and the official Python SDK.

use std::path::PathBuf;

/// Status of a plain GET, or `None` when nothing answers.
pub async fn http_get_status(url: &str) -> Option<u16> {
    let output = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url])
        .output()
        .await
        .ok()?;
    String::from_utf8(output.stdout).ok()?.parse().ok().filter(|s| *s != 0)
}

/// A response as curl saw it.
pub struct CurlResponse {
    pub status: u16,
    pub body: String,
}

impl CurlResponse {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// `error.code` of an OpenAI-style error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

/// Sends a request with curl (a real client over a real socket).
pub async fn curl(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> CurlResponse {
    curl_with_headers(method, url, headers, body).await.0
}

/// Like [`curl`], and the response's headers (names lowercased), as curl received them.
pub async fn curl_with_headers(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (CurlResponse, Vec<(String, String)>) {
    let mut command = tokio::process::Command::new("curl");
    command.args(["-s", "-D", "/dev/stderr", "-X", method, "-w", "\n%{http_code}", "--max-time", "10", url]);
    for (name, value) in headers {
        command.arg("-H").arg(format!("{name}: {value}"));
    }
    if let Some(body) = body {
        command.args(["-H", "content-type: application/json", "--data-binary", body]);
    }
    let output = command.output().await.expect("running curl");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let received = String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    (CurlResponse { status: status.trim().parse().unwrap_or(0), body: body.to_string() }, received)
}

/// The Python with the official `openai` SDK, from `just setup` (or `LLMPROXY_PYTHON`).
pub fn sdk_python() -> PathBuf {
    if let Ok(path) = std::env::var("LLMPROXY_PYTHON") {
        return path.into();
    }
    let python = super::cache().join("venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `just setup` (or tests/setup.sh) to install the openai SDK",
        python.display()
    );
    python
}

/// A chat request on the proxy at `port`: the error code, or "" for 200.
pub async fn chat_on(port: u16, token: &str) -> String {
    let auth = format!("Bearer {token}");
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let response = curl("POST", &url, &[("authorization", &auth)], Some(r#"{"model":"m","messages":[]}"#)).await;
    if response.status == 200 { String::new() } else { response.error_code() }
}

/// Sends `count` chat requests with `token` at once, round-robin over `ports`, with a
/// real HTTP client; returns each response's status and `error.code`.
pub async fn burst(ports: &[u16], token: &str, count: usize) -> Vec<(u16, String)> {
    slow_burst(ports, token, count, 0).await
}

/// Like [`burst`], with the fake upstream taking `upstream_ms` to answer each request,
/// so that requests are still in flight a while after they were forwarded.
pub async fn slow_burst(ports: &[u16], token: &str, count: usize, upstream_ms: u64) -> Vec<(u16, String)> {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let requests = (0..count).map(|i| {
        let client = client.clone();
        let request = hyper::Request::post(format!("http://127.0.0.1:{}/v1/chat/completions", ports[i % ports.len()]))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .header("x-fake-delay-ms", upstream_ms.to_string())
            .body(http_body_util::Full::new(bytes::Bytes::from_static(br#"{"model":"m","messages":[]}"#)))
            .unwrap();
        async move {
            match client.request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let code = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    (status, code)
                }
                Err(_) => (0, "connection_failed".to_string()),
            }
        }
    });
    futures::future::join_all(requests).await
}
