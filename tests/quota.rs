//! Token limits and usage across proxy replicas, with Kubernetes as the only store
//! (issue 5): an exact `maxRequests` over two real proxy processes, a replica killed
//! mid-burst, expiry without the controller, and counts that survive restarts.

mod support;

use std::time::{Duration, Instant};

use kube::Api;
use llm_proxy::api::{ProxyToken, TokenPhase};
use support::{Env, WAIT, burst, eventually, free_port, token_spec};

/// Flush usage often so the tests need not wait for the production default.
const FAST_FLUSH: &[&str] = &["--usage-flush-millis", "200"];

async fn capped(env: &Env, name: &str, max: i64) -> String {
    let mut spec = token_spec(&env.scoped("p"));
    spec.max_requests = Some(max);
    env.create_token(name, spec).await;
    env.wait_token(name, TokenPhase::Active).await;
    env.token_secret(name).await["token"].clone()
}

async fn two_proxies(env: &mut Env) -> [u16; 2] {
    let ports = [free_port(), free_port()];
    env.start_proxy_as("proxy-a", ports[0], free_port(), FAST_FLUSH).await;
    env.start_proxy_as("proxy-b", ports[1], free_port(), FAST_FLUSH).await;
    ports
}

fn count(results: &[(u16, String)], status: u16) -> usize {
    results.iter().filter(|(s, _)| *s == status).count()
}

async fn token(env: &Env, name: &str) -> ProxyToken {
    Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps).get(name).await.unwrap()
}

#[tokio::test]
async fn the_cap_is_exact_across_two_replicas() {
    let mut env = Env::new("cap").await;
    env.start_controller();
    let ports = two_proxies(&mut env).await;
    env.create_project("p").await;
    let secret = capped(&env, "shared", 50).await;

    let results = burst(&ports, &secret, 200).await;
    assert_eq!(count(&results, 200), 50, "{results:?}");
    assert_eq!(count(&results, 429), 150);
    assert!(results.iter().filter(|(s, _)| *s == 429).all(|(_, code)| code == "token_exhausted"));
    assert_eq!(env.upstream.requests().len(), 50, "exactly the cap reached the upstream");

    let exhausted = env.wait_token("shared", TokenPhase::Exhausted).await;
    let status = exhausted.status.unwrap();
    assert_eq!(status.request_count, Some(50));
    assert_eq!(status.claimed_requests, Some(50));
    assert!(status.last_used_at.is_some());
}

#[tokio::test]
async fn a_replica_killed_mid_burst_never_makes_the_proxies_overspend() {
    let mut env = Env::new("sigkill").await;
    env.start_controller();
    let ports = two_proxies(&mut env).await;
    env.create_project("p").await;
    let secret = capped(&env, "shared", 50).await;

    // 60 requests at once, each taking the upstream 300 ms: proxy-b is killed while
    // requests it forwarded are still waiting for their answers.
    let first = tokio::spawn({
        let (ports, secret) = (ports, secret.clone());
        async move { support::slow_burst(&ports, &secret, 60, 300).await }
    });
    eventually(WAIT, || async { (env.upstream.requests().len() >= 10).then_some(()) }).await;
    env.signal("proxy-b", "KILL");
    let first = first.await.unwrap();
    assert!(count(&first, 0) > 0, "proxy-b died with requests in flight: {first:?}");
    let second = burst(&ports[..1], &secret, 160).await;
    let answered = count(&first, 200) + count(&second, 200);
    // What the upstream received includes what proxy-b forwarded and never answered.
    let forwarded = env.upstream.requests().len();
    assert!(forwarded <= 50, "forwarded {forwarded}");
    assert!(forwarded >= answered, "forwarded {forwarded}, answered {answered}");
    assert!(second.iter().filter(|(s, _)| *s != 200).all(|(s, code)| *s == 429 && code == "token_exhausted"));
    // Claims are durable before a request is forwarded, so they cover everything the
    // dead replica sent too; its unflushed count and unused block are what is lost.
    let status = eventually(WAIT, || async {
        let status = token(&env, "shared").await.status?;
        (status.request_count? >= count(&second, 200) as i64).then_some(status)
    })
    .await;
    let claimed = status.claimed_requests.unwrap();
    assert!(claimed >= forwarded as i64 && claimed <= 50, "claimed {claimed}, forwarded {forwarded}");
    assert!(status.request_count.unwrap() <= forwarded as i64);
}

/// A token works until its expiry and is refused from then on, by the proxy on its own
/// clock: the controller is stopped before the token expires and has no part in it.
#[tokio::test]
async fn expiry_is_enforced_by_the_proxy_on_time() {
    let mut env = Env::new("expiry").await;
    env.start_controller();
    env.start_proxy().await;
    env.create_project("p").await;
    let mut spec = token_spec(&env.scoped("p"));
    spec.duration = "4s".into();
    env.create_token("brief", spec).await;
    let issued = env.wait_token("brief", TokenPhase::Active).await;
    let expires_at = issued.status.unwrap().expires_at.unwrap().0;
    let secret = env.token_secret("brief").await["token"].clone();
    // Stopped (it releases its Lease, so the restart below leads at once).
    env.signal("controller", "TERM");

    // Ask every 100 ms: the last answer served and the first refused bracket the expiry.
    // The proxy decides between sending and receiving: a request served was decided at
    // or after it was sent, one refused at or before its answer arrived.
    let mut last_served = None;
    let refused_at = loop {
        let sent = jiff::Timestamp::now();
        let response = env.chat(&secret).await;
        let received = jiff::Timestamp::now();
        match (response.status, response.error_code().as_str()) {
            (200, _) => last_served = Some(sent),
            (401, "token_expired") => break received,
            other => panic!("unexpected answer {other:?}: {}", response.body),
        }
        assert!(sent < expires_at + jiff::SignedDuration::from_secs(10), "still served 10 s after expiresAt");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last_served = last_served.expect("never served");
    assert!(last_served < expires_at, "served at {last_served} after expiresAt {expires_at}");
    let early = expires_at.duration_since(last_served);
    assert!(early < jiff::SignedDuration::from_secs(2), "last served {early:?} before expiresAt: refused early");
    assert!(refused_at >= expires_at, "refused at {refused_at}, before expiresAt {expires_at}");
    let late = refused_at.duration_since(expires_at);
    assert!(late < jiff::SignedDuration::from_secs(2), "refused {late:?} after expiresAt");
    assert_eq!(env.chat(&secret).await.status, 401);

    // The controller, back, records what the proxy already enforced.
    env.start_controller();
    env.wait_token("brief", TokenPhase::Expired).await;
}

#[tokio::test]
async fn counts_survive_a_restart_of_every_proxy() {
    let mut env = Env::new("restart").await;
    env.start_controller();
    let port = free_port();
    env.start_proxy_as("proxy-1", port, free_port(), FAST_FLUSH).await;
    env.create_project("p").await;
    let capped_secret = capped(&env, "capped", 5).await;
    let unlimited = env.minted("p", "unlimited").await;

    let results = burst(&[port], &capped_secret, 8).await;
    assert_eq!((count(&results, 200), count(&results, 429)), (5, 3));
    for _ in 0..3 {
        assert_eq!(burst(&[port], &unlimited, 1).await[0].0, 200);
    }
    // A graceful stop flushes the counts.
    env.signal("proxy-1", "TERM");
    let status = token(&env, "capped").await.status.unwrap();
    assert_eq!(status.request_count, Some(5));
    assert_eq!(token(&env, "unlimited").await.status.unwrap().request_count, Some(3));

    let started = Instant::now();
    env.start_proxy_as("proxy-2", port, free_port(), FAST_FLUSH).await;
    println!("restarted and synced in {:?}", started.elapsed());
    let after = burst(&[port], &capped_secret, 2).await;
    assert!(after.iter().all(|(s, code)| *s == 429 && code == "token_exhausted"), "{after:?}");
    assert_eq!(burst(&[port], &unlimited, 1).await[0].0, 200);
    eventually(WAIT, || async { (token(&env, "unlimited").await.status?.request_count? == 4).then_some(()) }).await;
    assert_eq!(env.upstream.requests().len(), 5 + 4);
}

#[tokio::test]
async fn metrics_count_requests_upstream_tokens_and_claims() {
    let mut env = Env::new("metrics").await;
    let controller_admin = env.start_controller();
    env.start_proxy().await;
    env.create_project("p").await;
    let unlimited = env.minted("p", "free").await;
    let capped_secret = capped(&env, "capped", 2).await;
    for _ in 0..2 {
        assert_eq!(env.chat(&unlimited).await.status, 200);
    }
    let streamed = support::curl(
        "POST",
        &format!("{}/v1/chat/completions", env.proxy_url()),
        &[("authorization", &format!("Bearer {unlimited}"))],
        Some(r#"{"model":"m","messages":[],"stream":true}"#),
    )
    .await;
    assert!(streamed.body.contains("data: [DONE]"));
    let results = burst(&[env.proxy_port], &capped_secret, 3).await;
    assert_eq!((count(&results, 200), count(&results, 429)), (2, 1));
    assert_eq!(env.chat("llmp_bogus").await.status, 401);
    // A file's content that holds the bytes of a usage object (the fake upstream answers
    // with a completion) is not an answer that reports usage: it counts nothing.
    let download = support::curl(
        "GET",
        &format!("{}/v1/files/file-abc/content", env.proxy_url()),
        &[("authorization", &format!("Bearer {unlimited}"))],
        None,
    )
    .await;
    assert!(download.status == 200 && download.body.contains(r#""usage""#), "{}", download.body);

    let text = reqwest_text(&format!("http://127.0.0.1:{}/metrics", env.proxy_admin_port)).await;
    let project = env.scoped("p");
    let ns = &env.apps;
    for expected in [
        format!(r#"llmproxy_requests_total{{project="{project}",outcome="upstream_2xx"}} 6"#),
        format!(r#"llmproxy_requests_total{{project="{project}",outcome="token_exhausted"}} 1"#),
        r#"llmproxy_requests_total{project="",outcome="invalid_token"} 1"#.to_string(),
        // Two plain completions (9 + 7 each) and one stream (9 + 5 in its last chunk).
        format!(
            r#"llmproxy_upstream_tokens_total{{project="{project}",token_namespace="{ns}",token_name="free",kind="prompt"}} 27"#
        ),
        format!(
            r#"llmproxy_upstream_tokens_total{{project="{project}",token_namespace="{ns}",token_name="free",kind="completion"}} 19"#
        ),
        r#"llmproxy_quota_claims_total{result="exhausted"} 1"#.to_string(),
        "llmproxy_routing_table_tokens 2".to_string(),
        "llmproxy_routing_table_projects 1".to_string(),
        "llmproxy_upstream_latency_seconds_count 6".to_string(),
        "llmproxy_added_latency_seconds_count 6".to_string(),
    ] {
        assert!(text.contains(&expected), "missing {expected}\n{text}");
    }
    assert!(text.contains(r#"llmproxy_quota_claims_total{result="claimed"}"#));
    let value = |name: &str| -> f64 {
        let prefix = format!("{name} ");
        let line = text.lines().find_map(|l| l.strip_prefix(&prefix));
        line.and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert!(value("llmproxy_routing_table_generation") >= 1.0);
    let updated = value("llmproxy_routing_table_updated_timestamp_seconds");
    let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
    assert!(updated <= now && now - updated < 600.0, "updated at {updated}, now {now}");
    for kind in ["Project", "ProxyToken", "Secret", "Namespace"] {
        assert!(value(&format!(r#"llmproxy_watch_relists_total{{kind="{kind}"}}"#)) >= 1.0, "the first list of {kind}");
    }

    // The controller's own: reconciles by kind and result.
    let text = reqwest_text(&format!("http://127.0.0.1:{controller_admin}/metrics")).await;
    for kind in ["Project", "ProxyToken"] {
        let ok = format!(r#"llmproxy_controller_reconciles_total{{kind="{kind}",result="ok"}} "#);
        let count: f64 =
            text.lines().find_map(|l| l.strip_prefix(&ok)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0);
        assert!(count >= 1.0, "no successful {kind} reconcile counted:\n{text}");
    }
}

/// A GET's body, with curl.
/// A spent cap is final, and the refusal says so in OpenAI's terms: type
/// `insufficient_quota` and `x-should-retry: false`. The official SDK retries a 429
/// twice by default; here it gives up at once, so one refusal reaches the proxy.
#[tokio::test]
async fn the_official_sdk_does_not_retry_a_spent_cap() {
    let mut env = Env::new("spent").await;
    env.start_controller();
    env.start_proxy().await;
    env.create_project("p").await;
    let secret = capped(&env, "once", 1).await;
    let script = r#"
import openai
client = openai.OpenAI(max_retries=2)
client.chat.completions.create(model="m", messages=[])
try:
    client.chat.completions.create(model="m", messages=[])
except openai.RateLimitError as e:
    print(e.status_code, e.type, e.code)
"#;
    let (said, stderr) = env.sdk(script, &secret).await;
    assert_eq!(said.trim(), "429 insufficient_quota token_exhausted", "{stderr}");
    let metrics = reqwest_text(&format!("http://127.0.0.1:{}/metrics", env.proxy_admin_port)).await;
    let refused = format!(r#"llmproxy_requests_total{{project="{}",outcome="token_exhausted"}} 1"#, env.scoped("p"));
    assert!(metrics.contains(&refused), "one refusal, no retry:\n{metrics}");
    let auth = format!("Bearer {secret}");
    let (answer, headers) = support::curl_with_headers(
        "POST",
        &format!("{}/v1/chat/completions", env.proxy_url()),
        &[("authorization", &auth)],
        Some(r#"{"model":"m","messages":[]}"#),
    )
    .await;
    assert_eq!(answer.status, 429);
    assert!(headers.contains(&("x-should-retry".into(), "false".into())), "{headers:?}");
}

/// Deleting a ProxyToken (`kubectl delete`) takes its series off the proxies' `/metrics` (a cluster that
/// mints and deletes tokens all day must not grow them), and requests counted but not
/// yet written when it went are dropped with a note, not retried on every flush.
#[tokio::test]
async fn a_deleted_token_leaves_the_metrics_and_is_not_retried() {
    let mut env = Env::new("deleted").await;
    env.start_controller();
    let (fast, fast_admin, slow) = (free_port(), free_port(), free_port());
    env.start_proxy_as("proxy-fast", fast, fast_admin, FAST_FLUSH).await;
    // Flushes at start and then every ten minutes: its count of the token waits for the
    // last flush, at shutdown.
    env.start_proxy_as("proxy-slow", slow, free_port(), &["--usage-flush-millis", "600000"]).await;
    env.create_project("p").await;
    let gone = env.minted("p", "gone").await;
    let kept = env.minted("p", "kept").await;
    for token in [&gone, &kept] {
        assert_eq!(burst(&[fast, slow], token, 2).await.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [200, 200]);
    }
    let metrics = format!("http://127.0.0.1:{fast_admin}/metrics");
    let series = |name: &str| format!(r#"token_name="{name}""#);
    assert!(reqwest_text(&metrics).await.contains(&series("gone")));
    // A stream that outlives its token (5 s, past the deletion and many flushes)
    // reports its usage at its end: that must not bring the series back for good.
    let auth = format!("Bearer {gone}");
    let url = format!("http://127.0.0.1:{fast}/v1/chat/completions");
    let sent = env.upstream.requests().len();
    let stream = tokio::spawn(async move {
        let headers = [("authorization", auth.as_str()), ("x-fake-chunks", "50"), ("x-fake-chunk-delay-ms", "100")];
        support::curl("POST", &url, &headers, Some(r#"{"model":"m","messages":[],"stream":true}"#)).await
    });
    eventually(WAIT, || async { (env.upstream.requests().len() > sent).then_some(()) }).await;

    // As an admin does it; kubectl returns once the object is marked for deletion.
    let deleted = support::run_kubectl(&["delete", "proxytoken", "gone", "-n", &env.apps, "--wait=false"]);
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    let tokens = Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps);
    eventually(WAIT, || async { tokens.get_opt("gone").await.unwrap().is_none().then_some(()) }).await;
    assert_eq!(burst(&[fast], &gone, 1).await[0].0, 401);
    assert!(!stream.is_finished(), "the stream must outlive its token here; lengthen it");
    let streamed = stream.await.unwrap();
    assert!(streamed.status == 200 && streamed.body.contains(r#""prompt_tokens":9"#), "{}", streamed.body);
    let text = eventually(WAIT, || async {
        let text = reqwest_text(&metrics).await;
        (!text.contains(&series("gone"))).then_some(text)
    })
    .await;
    assert!(text.contains(&series("kept")), "{text}");
    // Five flushes later, still gone.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = reqwest_text(&metrics).await;
    assert!(!text.contains(&series("gone")), "{text}");

    env.signal("proxy-slow", "TERM");
    let log = std::fs::read_to_string(env.log_path("proxy-slow")).unwrap();
    assert!(log.contains("the ProxyToken is gone; its last usage is not recorded"), "{log}");
    assert!(!log.contains("writing usage failed"), "{log}");
    // The kept token's count from that replica was written at its shutdown.
    eventually(WAIT, || async { (token(&env, "kept").await.status?.request_count? == 2).then_some(()) }).await;
}

async fn reqwest_text(url: &str) -> String {
    support::curl("GET", url, &[], None).await.body
}
