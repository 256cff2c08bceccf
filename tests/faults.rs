//! Keep serving, lose nothing, let no one in (issue 8): bad requests, upstream faults,
//! a graceful stop, and floods of connections without a token (issue 14), against real
//! processes.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::Env;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs curl with raw `args` against the proxy; returns (status, body).
async fn raw_curl(args: &[&str]) -> (u16, String) {
    let output = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

fn code(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .map(|v| v["error"]["code"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

async fn started(name: &str, extra: &[&str]) -> (Env, String, u16) {
    let mut env = Env::new(name).await;
    env.start_controller();
    let (port, admin) = (env.proxy_port, env.proxy_admin_port);
    env.start_proxy_as("proxy", port, admin, extra).await;
    env.create_project("p").await;
    let token = env.minted("p", "t").await;
    (env, token, port)
}

#[tokio::test]
async fn bad_requests_get_the_documented_error_and_the_proxy_stays_healthy() {
    let (env, token, port) = started("badreq", &["--max-request-body-bytes", "1024"]).await;
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let models = url("/v1/models");
    let bearer = format!("Authorization: Bearer {token}");

    let oversized = format!("Authorization: Bearer llmp_{}", "a".repeat(10_000));
    let mut typo = token.clone();
    typo.replace_range(20..21, if &token[20..21] == "x" { "y" } else { "x" });
    let typo = format!("Authorization: Bearer {typo}");
    let lowercase_scheme = format!("Authorization: bearer {token}");
    for (what, header) in [
        ("missing", "X-Nothing: 1"),
        ("empty", "Authorization;"),
        ("scheme only", "Authorization: Bearer"),
        ("wrong scheme", "Authorization: Basic dXNlcjpwYXNz"),
        ("oversized", oversized.as_str()),
        ("non-ASCII", "Authorization: Bearer llmp_caf\u{e9}"),
        ("bad checksum", typo.as_str()),
    ] {
        let (status, body) = raw_curl(&["-H", header, &models]).await;
        assert_eq!((status, code(&body).as_str()), (401, "invalid_token"), "{what}: {body}");
    }
    // The scheme is case-insensitive (RFC 9110 §11.1).
    assert_eq!(raw_curl(&["-H", &lowercase_scheme, &models]).await.0, 200);

    for path in
        ["/v1/../v1/models", "/v1/%2e%2e/v1/models", "//v1/models", "/v1//models", "/v1/models/", "/v1/models/%2Fx"]
    {
        let (status, body) = raw_curl(&["--path-as-is", "-H", &bearer, &url(path)]).await;
        assert_eq!((status, code(&body).as_str()), (404, "endpoint_not_found"), "{path}");
    }
    // An absolute-form request target cannot redirect the proxy: it goes to the project's upstream.
    let (status, _) = raw_curl(&["--request-target", "http://evil.example/v1/models", "-H", &bearer, &url("/")]).await;
    assert_eq!(status, 200);
    let seen = env.upstream.requests().pop().unwrap();
    assert_eq!(seen.path, "/v1/models");
    assert!(!seen.header("host").unwrap_or_default().contains("evil"));

    for method in ["PUT", "PATCH", "OPTIONS", "TRACE"] {
        let (status, body) = raw_curl(&["-X", method, "-H", &bearer, &url("/v1/chat/completions")]).await;
        assert_eq!((status, code(&body).as_str()), (405, "method_not_allowed"), "{method}");
    }

    let big = "x".repeat(2048);
    let chat = url("/v1/chat/completions");
    let (status, body) = raw_curl(&["-H", &bearer, "--data-binary", &big, &chat]).await;
    assert_eq!((status, code(&body).as_str()), (413, "payload_too_large"), "declared length");
    let (status, body) =
        raw_curl(&["-H", &bearer, "-H", "Transfer-Encoding: chunked", "--data-binary", &big, &chat]).await;
    assert_eq!((status, code(&body).as_str()), (413, "payload_too_large"), "chunked");

    let mut flood = Vec::new();
    for i in 0..300 {
        flood.push("-H".to_string());
        flood.push(format!("X-Flood-{i}: {}", "v".repeat(100)));
    }
    let mut args: Vec<&str> = flood.iter().map(String::as_str).collect();
    args.push(&models);
    let (status, body) = raw_curl(&args).await;
    assert_eq!((status, code(&body).as_str()), (431, "headers_too_large"), "header flood: {body}");
    // A head past what a connection may buffer (64 KiB) is refused with 431: by hyper,
    // bare, when it overflows the connection's read buffer, or with the documented error
    // when hyper's buffer had grown enough to hold it (which depends on how its reads
    // fell) and the proxy's own 32 KiB check refuses it.
    let huge = format!("X-Huge: {}", "v".repeat(80 * 1024));
    let (status, body) = raw_curl(&["-H", &huge, &models]).await;
    assert_eq!(status, 431, "header buffer: {body}");
    assert!(body.is_empty() || code(&body) == "headers_too_large", "header buffer: {body}");

    // Still healthy and serving.
    assert_eq!(
        support::http_get_status(&format!("http://127.0.0.1:{}/healthz", env.proxy_admin_port)).await,
        Some(200)
    );
    assert_eq!(raw_curl(&["-H", &bearer, &models]).await.0, 200);
    assert!(env.logs().lines().all(|l| !l.contains(&token[..12])));
}

#[tokio::test]
async fn upstream_faults_end_client_streams_cleanly_and_never_hang() {
    let (_env, token, port) = started("upstream", &["--upstream-idle-timeout-seconds", "1"]).await;
    let chat = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let bearer = format!("Authorization: Bearer {token}");
    let body = r#"{"model":"m","messages":[],"stream":true}"#;

    // The upstream drops the connection after two chunks: the client gets them, then an
    // OpenAI-style error event, and a well-formed end of stream (curl exits 0).
    let output = tokio::process::Command::new("curl")
        .args(["-sN", "--max-time", "10", "-H", &bearer, "-H", "x-fake-break-after: 2"])
        .args(["-H", "x-fake-chunk-delay-ms: 100", "--data-binary", body, &chat])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "curl exit {:?}: {text}", output.status.code());
    assert!(text.contains("chunk0") && text.contains("chunk1") && !text.contains("chunk2"), "{text}");
    assert!(text.trim_end().ends_with(r#""code":"upstream_error"}}"#), "{text}");

    // A stalled stream is ended by the idle timeout, not left hanging; a slow but steady
    // one is not cut (chunks every 500 ms, idle timeout 1 s, 4 s in total).
    let started = Instant::now();
    let (_, stalled) =
        raw_curl(&["-N", "-H", &bearer, "-H", "x-fake-chunk-delay-ms: 5000", "--data-binary", body, &chat]).await;
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    assert!(stalled.contains("chunk0") && stalled.contains("upstream_error"), "{stalled}");
    let (status, steady) = raw_curl(&[
        "-N",
        "-H",
        &bearer,
        "-H",
        "x-fake-chunks: 8",
        "-H",
        "x-fake-chunk-delay-ms: 500",
        "--data-binary",
        body,
        &chat,
    ])
    .await;
    assert_eq!(status, 200);
    assert!(steady.contains("chunk7") && steady.contains("[DONE]"), "{steady}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_streams_and_refuses_new_connections() {
    let (mut env, token, port) = started("drain", &[]).await;
    let chat = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let stream = tokio::process::Command::new("curl")
        .args(["-sN", "--max-time", "20", "-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", "x-fake-chunks: 10", "-H", "x-fake-chunk-delay-ms: 200"])
        .args(["--data-binary", r#"{"model":"m","messages":[],"stream":true}"#, &chat])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // In flight once the upstream has it.
    support::eventually(support::WAIT, || async { (!env.upstream.requests().is_empty()).then_some(()) }).await;
    let stopping = tokio::task::spawn_blocking(move || {
        env.signal("proxy", "TERM");
        env
    });
    // Draining (the stream has ~2 s to go): new connections are refused.
    let refused = support::eventually(Duration::from_secs(5), || async {
        let (status, _) = raw_curl(&["-H", "Authorization: Bearer x", &chat]).await;
        (status == 0).then_some(status)
    })
    .await;
    let output = stream.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("chunk9") && text.contains("[DONE]"), "the in-flight stream finished: {text}");
    let _env = stopping.await.unwrap();
    assert_eq!(refused, 0, "no new connection is accepted while draining");
}

/// `--shutdown-delay-seconds` (the chart sets 5): after SIGTERM the proxy reports not
/// ready at once, so the Service drops it, yet serves new connections for the delay, so
/// the clients kube-proxy still sends it meanwhile are answered; then it drains.
#[tokio::test]
async fn during_the_shutdown_delay_new_connections_are_served_while_not_ready() {
    let (mut env, token, port) = started("delay", &["--shutdown-delay-seconds", "5"]).await;
    let readyz = format!("http://127.0.0.1:{}/readyz", env.proxy_admin_port);
    assert_eq!(support::http_get_status(&readyz).await, Some(200));
    let stopping = tokio::task::spawn_blocking(move || {
        env.signal("proxy", "TERM");
        env
    });
    // The signal has arrived once readiness fails...
    support::eventually(support::WAIT, || async {
        (support::http_get_status(&readyz).await == Some(503)).then_some(())
    })
    .await;
    // ...and a new connection after it is still answered by the upstream.
    assert_eq!(support::chat_on(port, &token).await, "", "served during the delay");
    // After the delay, the drain: new connections are refused.
    let chat = format!("http://127.0.0.1:{port}/v1/chat/completions");
    support::eventually(Duration::from_secs(15), || async {
        let (status, _) = raw_curl(&["-H", "Authorization: Bearer x", &chat]).await;
        (status == 0).then_some(())
    })
    .await;
    let _env = stopping.await.unwrap();
}

/// A second SIGTERM (or Ctrl-C) during the shutdown delay ends the delay: an admin who
/// stops a replica by hand need not wait it out.
#[tokio::test]
async fn a_second_signal_cuts_the_shutdown_delay_short() {
    let (mut env, _token, _port) = started("delay-twice", &["--shutdown-delay-seconds", "120"]).await;
    let readyz = format!("http://127.0.0.1:{}/readyz", env.proxy_admin_port);
    env.send_signal("proxy", "TERM");
    support::eventually(support::WAIT, || async {
        (support::http_get_status(&readyz).await == Some(503)).then_some(())
    })
    .await;
    env.send_signal("proxy", "TERM");
    let status = env.wait_for_exit("proxy", Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(env.log_path("proxy")).unwrap();
    assert!(log.contains("signalled again during the delay"), "{log}");
}

/// `--drain-seconds` is a cut-off: a stream that outlasts it is ended when it runs out
/// and the process exits, not kept open for the stream's whole length. On the way out
/// the proxy gives its unused budget block back.
#[tokio::test]
async fn the_drain_ends_at_its_cut_off_and_unused_budget_goes_back() {
    let (mut env, token, port) = started("drain-cut", &["--drain-seconds", "1"]).await;
    let mut spec = support::token_spec(&env.scoped("p"));
    spec.max_requests = Some(64);
    spec.limits = Some(llm_proxy::api::Limits { lifetime_tokens: Some(1600), ..Default::default() });
    env.create_token("capped", spec).await;
    env.wait_token("capped", llm_proxy::api::TokenPhase::Active).await;
    let capped = env.token_secret("capped").await["token"].clone();
    assert_eq!(
        support::chat_on(port, &capped).await,
        "",
        "claims a block of 4, spends 1; a share of 100 tokens, uses 16"
    );

    // A stream of 30 chunks 300 ms apart (9 s), stopped 0.5 s in with a 1 s drain.
    let chat = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let stream = tokio::process::Command::new("curl")
        .args(["-sN", "--max-time", "20", "-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", "x-fake-chunks: 30", "-H", "x-fake-chunk-delay-ms: 300"])
        .args(["--data-binary", r#"{"model":"m","messages":[],"stream":true}"#, &chat])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    support::eventually(support::WAIT, || async { (env.upstream.requests().len() >= 2).then_some(()) }).await;
    let started = std::time::Instant::now();
    let stopping = tokio::task::spawn_blocking(move || {
        env.signal("proxy", "TERM");
        env
    });
    let output = stream.wait_with_output().await.unwrap();
    let env = stopping.await.unwrap();
    let stopped = started.elapsed();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("chunk0") && !text.contains("[DONE]"), "the stream was cut, not finished: {text}");
    println!("stopped {stopped:?} after SIGTERM with --drain-seconds 1 and a 9 s stream");
    assert!(stopped < Duration::from_secs(8), "the process waited for the stream ({stopped:?}), not the cut-off");

    let tokens: kube::Api<llm_proxy::api::ProxyToken> = kube::Api::namespaced(env.client.clone(), &env.apps);
    let status = tokens.get("capped").await.unwrap().status.unwrap();
    assert_eq!((status.request_count, status.claimed_requests), (Some(1), Some(1)), "the 3 unused went back");
    let lifetime = &status.token_windows[0];
    assert_eq!((lifetime.used_tokens, lifetime.claimed_tokens), (16, 16), "the 84 unused tokens went back");
}

#[tokio::test]
async fn the_proxy_keeps_serving_while_the_api_server_is_away() {
    let mut env = Env::new("apidown").await;
    env.start_controller();
    let relay = env.start_proxy_behind_relay(&[]).await;
    let admin = env.proxy_admin_port;
    env.create_project("p").await;
    let kept = env.minted("p", "kept").await;
    let doomed = env.minted("p", "doomed").await;
    let deleted = env.minted("p", "deleted").await;
    let revoked_before = env.minted("p", "revoked-before").await;
    let tokens: kube::Api<llm_proxy::api::ProxyToken> = kube::Api::namespaced(env.client.clone(), &env.apps);
    let revoke = kube::api::Patch::Merge(serde_json::json!({ "spec": { "revoked": true } }));
    tokens.patch("revoked-before", &Default::default(), &revoke).await.unwrap();
    support::eventually(support::WAIT, || async {
        (env.chat(&revoked_before).await.error_code() == "token_revoked").then_some(())
    })
    .await;
    for token in [&kept, &doomed, &deleted] {
        assert_eq!(env.chat(token).await.status, 200);
    }

    relay.cut();
    // Changes the proxy cannot see while it is cut off.
    tokens.patch("doomed", &Default::default(), &revoke).await.unwrap();
    tokens.delete("deleted", &Default::default()).await.unwrap();
    // The outage shows in the metrics once the watches notice it.
    support::eventually(Duration::from_secs(30), || async {
        (metric(admin, "llmproxy_watch_errors_total").await > 0.0).then_some(())
    })
    .await;
    // It keeps serving with the last table it had, and keeps refusing what it knew was revoked.
    assert_eq!(env.chat(&kept).await.status, 200);
    assert_eq!(env.chat(&revoked_before).await.error_code(), "token_revoked");
    // Logs are written in batches (at most 100 ms apart).
    support::eventually(support::WAIT, || async {
        env.logs().contains("serving the last known routing table").then_some(())
    })
    .await;
    assert_eq!(support::http_get_status(&format!("http://127.0.0.1:{admin}/readyz")).await, Some(200));

    relay.restore();
    // After the watches come back, what changed meanwhile takes effect.
    support::eventually(Duration::from_secs(60), || async {
        let revoked = env.chat(&doomed).await.error_code() == "token_revoked";
        let gone = env.chat(&deleted).await.error_code() == "token_not_found";
        (revoked && gone).then_some(())
    })
    .await;
    assert_eq!(env.chat(&kept).await.status, 200);
}

/// While the API server is away a capped token is served only from the budget block
/// its replica already claimed, then refused with 503 `quota_unavailable` (never
/// overspent on trust); an uncapped token is served throughout.
#[tokio::test]
async fn a_capped_token_is_refused_not_overspent_while_the_api_server_is_away() {
    let mut env = Env::new("quota-away").await;
    env.start_controller();
    let relay = env.start_proxy_behind_relay(&["--usage-flush-millis", "200"]).await;
    env.create_project("p").await;
    let free = env.minted("p", "free").await;
    // A cap of 32 is claimed in blocks of 2 (maxRequests / 16).
    let mut spec = support::token_spec(&env.scoped("p"));
    spec.max_requests = Some(32);
    env.create_token("capped", spec).await;
    env.wait_token("capped", llm_proxy::api::TokenPhase::Active).await;
    let capped = env.token_secret("capped").await["token"].clone();
    assert_eq!(env.chat(&capped).await.status, 200, "claims a block of 2, spends 1");

    relay.cut();
    let mut codes = Vec::new();
    for _ in 0..4 {
        let response = env.chat(&capped).await;
        codes.push(if response.status == 200 { "ok".to_string() } else { response.error_code() });
    }
    assert_eq!(codes, ["ok", "quota_unavailable", "quota_unavailable", "quota_unavailable"]);
    let refused = env.chat(&capped).await;
    assert_eq!(refused.status, 503);
    assert!(refused.body.contains("retry"), "{}", refused.body);
    assert_eq!(env.chat(&free).await.status, 200, "uncapped tokens need no budget");

    relay.restore();
    support::eventually(Duration::from_secs(60), || async { (env.chat(&capped).await.status == 200).then_some(()) })
        .await;
    // Every request served was counted once the proxy could write again: 1 + 1 + 1.
    let tokens: kube::Api<llm_proxy::api::ProxyToken> = kube::Api::namespaced(env.client.clone(), &env.apps);
    support::eventually(Duration::from_secs(30), || async {
        let count = tokens.get("capped").await.ok()?.status?.request_count?;
        (count == 3).then_some(())
    })
    .await;
}

/// The value of the unlabelled metric `name` on the admin port `admin`.
async fn metric(admin: u16, name: &str) -> f64 {
    let text = support::curl("GET", &format!("http://127.0.0.1:{admin}/metrics"), &[], None).await.body;
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// A connection that sends `opening`, then one byte of `trickle` every 200 ms, never a
/// whole request; returns once the proxy has closed it (EOF or a reset).
async fn flood_connection(port: u16, opening: &'static [u8], trickle: &'static [u8]) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(opening).await.unwrap();
    let mut trickle = trickle.iter().cycle();
    let mut buffer = [0u8; 1024];
    loop {
        tokio::select! {
            read = stream.read(&mut buffer) => if matches!(read, Ok(0) | Err(_)) {
                return;
            },
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(byte) = trickle.next() && stream.write_all(&[*byte]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_connection_flood_is_capped_and_closed_and_a_client_with_a_token_is_still_served() {
    let (env, token, port) =
        started("flood", &["--max-connections", "50", "--client-header-timeout-seconds", "2", "--worker-threads", "2"])
            .await;
    let admin = env.proxy_admin_port;
    // 70 connections without a token, 20 more than the cap: silent, stuck in the HTTP/2
    // preface, and slowloris (request headers a byte at a time, never finished).
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..70 {
        let (opening, trickle): (&[u8], &[u8]) = match i % 3 {
            0 => (b"", b""),
            1 => (b"PRI * HTTP/2.0\r\n", b""),
            _ => (b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n", b"X-Slow: 1\r\n"),
        };
        flood.spawn(flood_connection(port, opening, trickle));
    }
    // The proxy holds exactly its cap, never more.
    support::eventually(Duration::from_secs(30), || async {
        let open = metric(admin, "llmproxy_connections_open").await;
        assert!(open <= 50.0, "{open} connections open, over the cap of 50");
        (open == 50.0).then_some(())
    })
    .await;

    // A real client is served: it waits in the accept queue until flood connections time out.
    let waited = Instant::now();
    support::eventually(Duration::from_secs(30), || async { (env.chat(&token).await.status == 200).then_some(()) })
        .await;
    eprintln!("the client was served after {:?}", waited.elapsed());

    // Every flood connection is closed by the proxy, and counted.
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ended) = flood.join_next().await {
            ended.unwrap();
        }
    })
    .await;
    assert!(closed.is_ok(), "{} flood connections still open after 30 s", flood.len());
    assert!(metric(admin, "llmproxy_connections_timed_out_total").await >= 70.0);
    support::eventually(Duration::from_secs(30), || async {
        (metric(admin, "llmproxy_connections_open").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(env.chat(&token).await.status, 200);
}

/// One client address cannot fill the proxy: past its share its connections are closed
/// at once, and a client from another address is served without waiting for any timeout.
#[tokio::test]
async fn one_client_address_holds_at_most_its_share_of_connections() {
    let args =
        ["--max-connections", "50", "--max-connections-per-client", "10", "--client-header-timeout-seconds", "60"];
    let (env, token, port) = started("share", &args).await;
    let admin = env.proxy_admin_port;
    // 40 silent connections from 127.0.0.2 (loopback too, another address).
    let mut held = Vec::new();
    let mut closed = 0;
    for _ in 0..40 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        // Closed at once, or held (the proxy answers nothing to a silent connection).
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => closed += 1,
            Ok(Ok(_)) => panic!("a silent connection got an answer"),
            Err(_still_open) => held.push(stream),
        }
    }
    assert_eq!((held.len(), closed), (10, 30), "10 held, the other 30 closed at once");
    assert_eq!(metric(admin, "llmproxy_connections_open").await, 10.0);
    assert!(metric(admin, "llmproxy_connections_refused_total").await >= 30.0);
    // Another address is served at once: no timeout had to free a place.
    assert_eq!(env.chat(&token).await.status, 200);
    drop(held);
}

#[tokio::test]
async fn idle_connections_are_closed_but_slow_answers_and_streams_are_not_cut() {
    let (_env, token, port) =
        started("idle", &["--client-header-timeout-seconds", "1", "--client-idle-timeout-seconds", "1"]).await;
    let chat = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let bearer = format!("Authorization: Bearer {token}");
    let body = r#"{"model":"m","messages":[]}"#;

    // No byte for 3 s while the upstream thinks, over HTTP/1.1 and HTTP/2: not cut.
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let (status, answer) =
            raw_curl(&[version, "-H", &bearer, "-H", "x-fake-delay-ms: 3000", "--data-binary", body, &chat]).await;
        assert_eq!(status, 200, "{version}: {answer}");
    }
    // A stream with 2.5 s between chunks: not cut.
    let (status, stream) = raw_curl(&[
        "-N",
        "-H",
        &bearer,
        "-H",
        "x-fake-chunks: 3",
        "-H",
        "x-fake-chunk-delay-ms: 2500",
        "--data-binary",
        r#"{"model":"m","messages":[],"stream":true}"#,
        &chat,
    ])
    .await;
    assert_eq!(status, 200);
    assert!(stream.contains("chunk2") && stream.contains("[DONE]"), "{stream}");

    // An HTTP/1.1 keep-alive connection is closed once idle after its response.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "HTTP/1.1 connection still open after 15 s");
    assert!(answer.starts_with(b"HTTP/1.1 401"), "{}", String::from_utf8_lossy(&answer));

    // So is an HTTP/2 connection.
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get(format!("http://127.0.0.1:{port}/v1/models"))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(15), connection).await.is_ok(),
        "HTTP/2 connection still open after 15 s"
    );
}
