//! A real 410 Gone: the proxy's watches resume after etcd compacted the resource
//! version they stopped at, the API server answers 410, the proxy relists, and what
//! changed meanwhile takes effect. A control plane of its own: its API server serves
//! watches from etcd (no watch cache, which would keep serving old versions) and
//! compacts every few seconds.

mod support;

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams, WatchEvent, WatchParams};
use llm_proxy::api::ProxyToken;
use support::{Env, eventually};

#[tokio::test]
async fn a_watch_resumed_after_compaction_gets_410_and_the_proxy_relists() {
    support::use_private_cluster(&["--watch-cache=false", "--etcd-compaction-interval=2s"]);
    let mut env = Env::new("relist").await;
    env.start_controller();
    let relay = env.start_proxy_behind_relay(&[]).await;
    let admin = env.proxy_admin_port;
    env.create_project("p").await;
    let kept = env.minted("p", "kept").await;
    let revoked = env.minted("p", "revoked").await;
    let deleted = env.minted("p", "deleted").await;
    for token in [&kept, &revoked, &deleted] {
        assert_eq!(env.chat(token).await.status, 200);
    }
    let tokens: Api<ProxyToken> = Api::namespaced(env.client.clone(), &env.apps);
    let seen = tokens.get("kept").await.unwrap().metadata.resource_version.unwrap();
    let relists_before = relists(admin).await;

    relay.cut();
    let revoke = Patch::Merge(serde_json::json!({ "spec": { "revoked": true } }));
    tokens.patch("revoked", &PatchParams::default(), &revoke).await.unwrap();
    tokens.delete("deleted", &Default::default()).await.unwrap();
    // Until the version the proxy saw last is compacted away: a watch from it is 410.
    eventually(Duration::from_secs(60), || async {
        let gone = match tokens.watch(&WatchParams::default().timeout(1), &seen).await {
            Err(kube::Error::Api(status)) => status.code == 410,
            Err(_) => false,
            Ok(stream) => {
                let first = futures::StreamExt::next(&mut Box::pin(stream)).await;
                matches!(first, Some(Ok(WatchEvent::Error(ref e))) if e.code == 410)
            }
        };
        gone.then_some(())
    })
    .await;

    relay.restore();
    eventually(Duration::from_secs(60), || async {
        let gone = env.chat(&deleted).await.error_code() == "token_not_found";
        let refused = env.chat(&revoked).await.error_code() == "token_revoked";
        (gone && refused).then_some(())
    })
    .await;
    assert_eq!(env.chat(&kept).await.status, 200);
    assert!(relists(admin).await > relists_before, "the proxy relisted");
}

/// `llmproxy_watch_relists_total{kind="ProxyToken"}` of the proxy on `admin`.
async fn relists(admin: u16) -> f64 {
    let text = support::curl("GET", &format!("http://127.0.0.1:{admin}/metrics"), &[], None).await.body;
    text.lines()
        .find_map(|l| l.strip_prefix(r#"llmproxy_watch_relists_total{kind="ProxyToken"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
