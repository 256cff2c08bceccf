//! Two controller replicas: exactly one holds the Lease and writes; killing it hands
//! over within the lease duration, and nothing is minted twice (also when it dies in
//! the middle of a batch of mints); stopping it cleanly hands over at once (the Lease
//! is released); a leader cut off from the API server stops before another can lead.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use llm_proxy::api::{ProxyToken, TokenPhase};
use support::{Env, eventually, token_spec};

const LEASE: &[&str] = &["--lease-duration-seconds", "3"];

#[tokio::test]
async fn one_leader_writes_and_a_killed_leader_is_replaced() {
    let mut env = Env::new("ha").await;
    let admin = support::kubeconfig();
    env.start_controller_as("controller-a", LEASE, &admin);
    env.start_controller_as("controller-b", LEASE, &admin);
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ops);
    let lease_name = format!("llm-proxy-{}", env.id);
    let holder = |lease: &Lease| lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
    let leader =
        eventually(Duration::from_secs(20), || async { holder(&leases.get_opt(&lease_name).await.ok()??) }).await;
    let follower = if leader == "controller-a" { "controller-b" } else { "controller-a" };

    env.create_project("p").await;
    env.create_token("first", token_spec(&env.scoped("p"))).await;
    let first = env.wait_token("first", TokenPhase::Active).await;
    let follower_log = std::fs::read_to_string(env.log_path(follower)).unwrap();
    assert!(!follower_log.contains("leading"), "the follower must not reconcile:\n{follower_log}");
    assert!(std::fs::read_to_string(env.log_path(&leader)).unwrap().contains("leading: reconciling"));

    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    env.create_token("revoked", token_spec(&env.scoped("p"))).await;
    env.wait_token("revoked", TokenPhase::Active).await;
    let revoke = kube::api::Patch::Merge(serde_json::json!({ "spec": { "revoked": true } }));
    tokens.patch("revoked", &Default::default(), &revoke).await.unwrap();
    env.wait_token("revoked", TokenPhase::Revoked).await;

    env.signal(&leader, "KILL");
    let killed = Instant::now();
    env.create_token("second", token_spec(&env.scoped("p"))).await;
    env.wait_token("second", TokenPhase::Active).await;
    let handover = killed.elapsed();
    println!("handed over and minted in {handover:?}");
    assert!(handover < Duration::from_secs(3 + 5), "took {handover:?} with a 3 s lease");
    let lease = leases.get(&lease_name).await.unwrap();
    assert_eq!(holder(&lease).as_deref(), Some(follower));
    assert!(lease.spec.unwrap().lease_transitions.unwrap_or(0) >= 1);

    // No revoked token comes back, no Secret is lost.
    assert_eq!(tokens.get("revoked").await.unwrap().status.unwrap().phase, Some(TokenPhase::Revoked));
    for name in ["first", "revoked", "second"] {
        assert!(!env.token_secret(name).await["token"].is_empty(), "Secret {name}");
    }
    // The first token kept its one and only mint: same hash, same Secret.
    let again = Api::<ProxyToken>::namespaced(env.client.clone(), &env.apps).get("first").await.unwrap();
    let minted = first.status.unwrap().token_hash.unwrap();
    assert_eq!(again.status.unwrap().token_hash.as_deref(), Some(minted.as_str()));
    let secret = env.token_secret("first").await;
    assert_eq!(llm_proxy::token::TokenHash::of(&secret["token"]).to_string(), minted);

    // A clean stop (SIGTERM, as in a rolling update) hands the Lease over at once
    // instead of letting it lapse.
    let c_admin = env.start_controller_as("controller-c", LEASE, &admin);
    // Running (and so looking for the Lease) before the leader stops.
    let healthz = format!("http://127.0.0.1:{c_admin}/healthz");
    eventually(Duration::from_secs(20), || async {
        (support::http_get_status(&healthz).await == Some(200)).then_some(())
    })
    .await;
    env.signal(follower, "TERM");
    let stopped = Instant::now();
    let released = leases.get(&lease_name).await.unwrap();
    assert!(
        matches!(holder(&released).as_deref(), None | Some("") | Some("controller-c")),
        "the stopped leader still holds the Lease: {:?}",
        released.spec
    );
    eventually(Duration::from_secs(10), || async {
        (holder(&leases.get(&lease_name).await.ok()?).as_deref() == Some("controller-c")).then_some(())
    })
    .await;
    let handover = stopped.elapsed();
    println!("clean stop handed over in {handover:?} (lease 3 s, followers retry every 1 s)");
    env.create_token("third", token_spec(&env.scoped("p"))).await;
    env.wait_token("third", TokenPhase::Active).await;
}

/// The timestamp of the first JSON log line of `role` whose message is `message`.
fn logged_at(env: &Env, role: &str, message: &str) -> Option<jiff::Timestamp> {
    let log = std::fs::read_to_string(env.log_path(role)).ok()?;
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|line| (line["message"] == message).then(|| line["timestamp"].as_str()?.parse().ok()).flatten())
}

/// A leader cut off from the API server stops before its Lease can lapse, so another
/// replica never leads while it still writes; the other then takes over and mints.
#[tokio::test]
async fn a_leader_that_cannot_renew_stops_before_another_can_lead() {
    let mut env = Env::new("no-renew").await;
    let relay = support::Relay::start(support::api_server_address()).await;
    let via_relay = env.kubeconfig_via(&relay);
    env.start_controller_as("cut-off", LEASE, &via_relay);
    eventually(Duration::from_secs(20), || async { logged_at(&env, "cut-off", "leading: reconciling") }).await;
    env.start_controller_as("standby", LEASE, &support::kubeconfig());
    env.create_project("p").await;
    env.create_token("before", token_spec(&env.scoped("p"))).await;
    env.wait_token("before", TokenPhase::Active).await;

    relay.cut();
    let cut = Instant::now();
    let status = env.wait_for_exit("cut-off", Duration::from_secs(10)).await;
    let stopped_after = cut.elapsed();
    println!("a leader cut off stopped {stopped_after:?} after the cut (lease 3 s)");
    assert!(!status.success(), "it exits with an error so its pod restarts: {status}");
    let exited = logged_at(&env, "cut-off", "lost the leader lease; exiting").expect("no exit line");
    env.create_token("after", token_spec(&env.scoped("p"))).await;
    env.wait_token("after", TokenPhase::Active).await;
    // The log is written in batches (every 100 ms): the line may trail the token it minted.
    let led = eventually(Duration::from_secs(5), || async { logged_at(&env, "standby", "leading: reconciling") }).await;
    assert!(exited < led, "the standby led at {led} while the cut-off leader ran until {exited}");
}

/// A leader whose connections to the API server stay open but carry nothing (a dead
/// network path: no error, no answer) stops before its Lease can lapse too: a renewal
/// still waiting for its answer is abandoned at the deadline, not awaited.
#[tokio::test]
async fn a_leader_whose_renewal_hangs_stops_before_another_can_lead() {
    let mut env = Env::new("hung-renew").await;
    let relay = support::Relay::start(support::api_server_address()).await;
    let via_relay = env.kubeconfig_via(&relay);
    env.start_controller_as("stalled", LEASE, &via_relay);
    eventually(Duration::from_secs(20), || async { logged_at(&env, "stalled", "leading: reconciling") }).await;
    env.start_controller_as("standby", LEASE, &support::kubeconfig());

    relay.stall();
    let stalled = Instant::now();
    let status = env.wait_for_exit("stalled", Duration::from_secs(10)).await;
    println!("a leader whose requests hang stopped {:?} after the stall (lease 3 s)", stalled.elapsed());
    assert!(!status.success(), "it exits with an error so its pod restarts: {status}");
    let exited = logged_at(&env, "stalled", "lost the leader lease; exiting").expect("no exit line");
    env.create_project("p").await;
    env.create_token("after", token_spec(&env.scoped("p"))).await;
    env.wait_token("after", TokenPhase::Active).await;
    let led = eventually(Duration::from_secs(5), || async { logged_at(&env, "standby", "leading: reconciling") }).await;
    assert!(exited < led, "the standby led at {led} while the stalled leader ran until {exited}");
}

/// A leader killed in the middle of minting a batch of tokens: every token is minted,
/// and no token whose Secret was already written gets another value.
#[tokio::test]
async fn a_leader_killed_while_minting_loses_no_token_and_changes_no_secret() {
    let mut env = Env::new("busy-leader").await;
    let admin = support::kubeconfig();
    env.start_controller_as("controller-a", LEASE, &admin);
    env.start_controller_as("controller-b", LEASE, &admin);
    env.create_project("p").await;
    let names: Vec<String> = (0..30).map(|i| format!("t{i}")).collect();
    for name in &names {
        env.create_token(name, token_spec(&env.scoped("p"))).await;
    }
    // Kill whichever leads as soon as some, not all, Secrets exist.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.client.clone(), &env.apps);
    let written = eventually(Duration::from_secs(20), || async {
        let list = secrets.list(&Default::default()).await.ok()?;
        let minted: Vec<(String, String)> = list
            .items
            .into_iter()
            .filter_map(|s| {
                let token = String::from_utf8(s.data?.get("token")?.0.clone()).ok()?;
                Some((s.metadata.name?, token))
            })
            .collect();
        (!minted.is_empty()).then_some(minted)
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ops);
    let lease = leases.get(&format!("llm-proxy-{}", env.id)).await.unwrap();
    let leader = lease.spec.and_then(|s| s.holder_identity).unwrap();
    env.signal(&leader, "KILL");
    println!("killed {leader} with {} of {} Secrets written", written.len(), names.len());

    for name in &names {
        let token = env.wait_token(name, TokenPhase::Active).await;
        let value = env.token_secret(name).await["token"].clone();
        let hash = token.status.unwrap().token_hash.unwrap();
        assert_eq!(llm_proxy::token::TokenHash::of(&value).to_string(), hash, "{name}: Secret and status disagree");
    }
    for (name, value) in written {
        assert_eq!(env.token_secret(&name).await["token"], value, "{name}'s Secret changed after the kill");
    }
}
