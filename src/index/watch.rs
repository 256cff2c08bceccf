//! Wires the [`Index`] to the API server: five watches in, a published
//! [`RouteTable`] out.
//!
//! Readers load the current table from an [`ArcSwap`] (no lock a writer holds); a
//! `tokio::sync::watch` channel announces each new generation to whoever waits for one.
//!
//! The first list of each kind is a streaming list (`sendInitialEvents`, the WatchList
//! feature: objects arrive as watch events from the API server's cache instead of
//! pages read from etcd) — 100,000 ProxyTokens sync in about a third of the time.
//! API servers that refuse it (WatchList is off by default in Kubernetes 1.27–1.31 and
//! 1.33) answer 422, and the watch falls back to paginated lists for good.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use tokio::sync::watch;

use super::{Applied, Change, Index, RouteTable};
use crate::api::{PriceList, Project, ProxyToken, ProxyTokenSpec, ProxyTokenStatus};
use crate::metrics::Metrics;

/// What to watch.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// Namespace of the API-key Secrets (the operator's namespace).
    pub secrets_namespace: String,
    /// Only Projects and ProxyTokens with these labels (an instance shard); `None`: all.
    pub label_selector: Option<String>,
}

/// The routing table as it is published.
#[derive(Clone)]
pub struct SharedTable {
    table: Arc<ArcSwap<RouteTable>>,
    generations: watch::Receiver<u64>,
    applied: watch::Receiver<Applied>,
}

impl SharedTable {
    /// The current snapshot: a lock-free load.
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    /// A receiver that changes each time a new generation is published.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generations.clone()
    }

    /// The resource versions the published table has applied, kind by kind.
    pub fn applied(&self) -> watch::Receiver<Applied> {
        self.applied.clone()
    }
}

/// Starts the watches and the index task; the table is `ready` after every kind listed.
pub fn spawn(client: Client, metrics: Arc<Metrics>, config: WatchConfig) -> SharedTable {
    let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let (tx, generations) = watch::channel(0);
    let (applied_tx, applied) = watch::channel(Applied::default());
    let shared = SharedTable { table: table.clone(), generations, applied };
    tokio::spawn(run(client, config, table, tx, applied_tx, metrics));
    shared
}

async fn run(
    client: Client,
    config: WatchConfig,
    table: Arc<ArcSwap<RouteTable>>,
    tx: watch::Sender<u64>,
    applied: watch::Sender<Applied>,
    metrics: Arc<Metrics>,
) {
    let labelled = match &config.label_selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    let projects = watch_kind(Api::<Project>::all(client.clone()), labelled.clone()).map(|r| r.map(Change::Project));
    let tokens = watch_kind(Api::<WatchedToken>::all(client.clone()), labelled)
        .map(|r| r.map(|event| Change::Token(into_proxy_token(event))));
    // Only Secrets labelled as API keys: the proxy never sees (let alone keeps) the
    // other Secrets of its namespace.
    let (label, value) = crate::api::API_KEY_LABEL;
    let keys = watcher::Config::default().labels(&format!("{label}={value}"));
    let secrets = watch_kind(Api::<Secret>::namespaced(client.clone(), &config.secrets_namespace), keys)
        .map(|r| r.map(Change::Secret));
    // Every namespace, whatever the shard: a token's namespace labels decide whether a
    // project that grants namespaces by selector still serves it.
    let namespaces =
        watch_kind(Api::<Namespace>::all(client.clone()), watcher::Config::default()).map(|r| r.map(Change::Namespace));
    let price_lists =
        watch_kind(Api::<PriceList>::all(client), watcher::Config::default()).map(|r| r.map(Change::PriceList));
    let mut changes = futures::stream::select_all([
        projects.boxed(),
        tokens.boxed(),
        secrets.boxed(),
        namespaces.boxed(),
        price_lists.boxed(),
    ]);

    let mut index = Index::new();
    while let Some(first) = changes.next().await {
        apply(&mut index, first, &metrics);
        // Fold everything already queued into one snapshot: a burst of events costs one
        // rebuild, and the first event of the burst is never delayed by a timer.
        while let Some(Some(more)) = changes.next().now_or_never() {
            apply(&mut index, more, &metrics);
        }
        if index.take_changed() {
            let snapshot = index.snapshot();
            let generation = snapshot.generation;
            metrics.table_tokens.set(snapshot.token_count() as i64);
            metrics.table_projects.set(snapshot.project_count() as i64);
            metrics.table_generation.set(generation as i64);
            metrics.table_updated.set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
            table.store(Arc::new(snapshot));
            tx.send_replace(generation);
        }
        // Only once the table that holds them is published.
        let now_applied = index.applied();
        applied.send_if_modified(|old| std::mem::replace(old, now_applied) != now_applied);
    }
}

fn apply(index: &mut Index, change: Result<Change, watcher::Error>, metrics: &Metrics) {
    match change {
        Ok(change) => {
            let relisting = match &change {
                Change::Project(watcher::Event::Init) => Some("Project"),
                Change::Token(watcher::Event::Init) => Some("ProxyToken"),
                Change::Secret(watcher::Event::Init) => Some("Secret"),
                Change::Namespace(watcher::Event::Init) => Some("Namespace"),
                Change::PriceList(watcher::Event::Init) => Some("PriceList"),
                _ => None,
            };
            if let Some(kind) = relisting {
                metrics.relists.get_or_create(&crate::metrics::KindLabels { kind }).inc();
            }
            index.apply(change)
        }
        // The watcher retries with backoff and relists when it must; until then the
        // last known table keeps serving.
        Err(error) => {
            metrics.watch_errors.inc();
            tracing::warn!(%error, "watch failed; serving the last known routing table");
        }
    }
}

/// A ProxyToken as the proxy reads it off the watch: metadata without `managedFields`
/// (the bulk of every object: building it as JSON values was most of the proxy's CPU
/// while it synced 100,000 tokens), spec and status as they are.
#[derive(Clone, Debug, Deserialize)]
struct WatchedToken {
    #[serde(deserialize_with = "lean_metadata")]
    metadata: ObjectMeta,
    spec: ProxyTokenSpec,
    #[serde(default)]
    status: Option<ProxyTokenStatus>,
}

impl Resource for WatchedToken {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        ProxyToken::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        ProxyToken::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        ProxyToken::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        ProxyToken::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The metadata fields the index and the watcher read; the rest is skipped unbuilt.
fn lean_metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Lean {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        generation: Option<i64>,
        labels: Option<BTreeMap<String, String>>,
        deletion_timestamp: Option<Time>,
    }
    let lean = Lean::deserialize(deserializer)?;
    Ok(ObjectMeta {
        name: lean.name,
        namespace: lean.namespace,
        uid: lean.uid,
        resource_version: lean.resource_version,
        generation: lean.generation,
        labels: lean.labels,
        deletion_timestamp: lean.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

fn into_proxy_token(event: watcher::Event<WatchedToken>) -> watcher::Event<ProxyToken> {
    let convert = |t: WatchedToken| ProxyToken { metadata: t.metadata, spec: t.spec, status: t.status };
    match event {
        watcher::Event::Apply(t) => watcher::Event::Apply(convert(t)),
        watcher::Event::Delete(t) => watcher::Event::Delete(convert(t)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(t) => watcher::Event::InitApply(convert(t)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// A watch of one kind whose lists are streamed when the API server allows it.
fn watch_kind<K>(api: Api<K>, config: watcher::Config) -> BoxStream<'static, watcher::Result<watcher::Event<K>>>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    let streaming = watcher(api.clone(), config.clone().streaming_lists()).default_backoff();
    with_fallback(streaming, move || {
        tracing::info!(
            kind = %K::kind(&K::DynamicType::default()),
            "the API server refuses streaming lists (WatchList feature off); using paginated lists"
        );
        watcher(api, config).default_backoff()
    })
    .boxed()
}

/// `first`'s items until it fails because the server refused a streaming list; from
/// then on (that error swallowed) the items of `fallback()`.
fn with_fallback<T, S1, S2>(
    first: S1,
    fallback: impl FnOnce() -> S2 + Send + 'static,
) -> impl Stream<Item = watcher::Result<T>> + Send
where
    T: Send + 'static,
    S1: Stream<Item = watcher::Result<T>> + Send + 'static,
    S2: Stream<Item = watcher::Result<T>> + Send + 'static,
{
    let state = (first.boxed(), Some(fallback));
    futures::stream::unfold(state, |(mut current, mut fallback)| async move {
        let item = current.next().await?;
        if let Err(error) = &item
            && streaming_refused(error)
            && let Some(fallback) = fallback.take()
        {
            return Some((None, (fallback().boxed(), None)));
        }
        Some((Some(item), (current, fallback)))
    })
    .filter_map(std::future::ready)
}

/// Whether `error` is an API server refusing `sendInitialEvents`: 422 where WatchList
/// is off, 400 from servers that predate it.
fn streaming_refused(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 422 || status.code == 400)
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn refused(code: u16) -> watcher::Error {
        let mut status = Status::failure(
            "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
            "Invalid",
        );
        status.code = code;
        watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(status)))
    }

    async fn items(first: Vec<watcher::Result<u32>>, second: Vec<watcher::Result<u32>>) -> Vec<Result<u32, String>> {
        with_fallback(futures::stream::iter(first), move || futures::stream::iter(second))
            .map(|item| item.map_err(|e| e.to_string()))
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_refused_streaming_list_falls_back_to_paginated_lists_once() {
        let seen = items(vec![Err(refused(422)), Ok(99)], vec![Ok(1), Err(refused(422)), Ok(2)]).await;
        // The refusal is swallowed and the first stream dropped; the fallback's own
        // errors pass through (its backoff retries them), it is never replaced.
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[0], Ok(1));
        assert!(seen[1].is_err());
        assert_eq!(seen[2], Ok(2));
    }

    #[test]
    fn a_watched_token_keeps_what_the_index_reads_and_drops_managed_fields() {
        let json = serde_json::json!({
            "apiVersion": "llmproxy.io/v1alpha1", "kind": "ProxyToken",
            "metadata": {
                "name": "web", "namespace": "apps", "uid": "u-1", "resourceVersion": "42", "generation": 3,
                "labels": { "team": "a" }, "deletionTimestamp": "2026-11-26T00:00:00Z",
                "managedFields": [{ "manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1",
                                    "fieldsV1": { "f:spec": { "f:duration": {} } } }],
                "annotations": { "note": "x" }
            },
            "spec": { "projectRef": { "name": "p" }, "duration": "720h" },
            "status": { "phase": "Active", "requestCount": 7 }
        });
        let full: ProxyToken = serde_json::from_value(json.clone()).unwrap();
        let watched: WatchedToken = serde_json::from_value(json).unwrap();
        let event = into_proxy_token(watcher::Event::Apply(watched));
        let watcher::Event::Apply(lean) = event else { panic!("the event kind changed") };
        assert_eq!((&lean.spec, &lean.status), (&full.spec, &full.status));
        let (m, f) = (&lean.metadata, &full.metadata);
        assert_eq!(
            (&m.name, &m.namespace, &m.uid, &m.resource_version),
            (&f.name, &f.namespace, &f.uid, &f.resource_version)
        );
        assert_eq!(
            (&m.generation, &m.labels, &m.deletion_timestamp),
            (&f.generation, &f.labels, &f.deletion_timestamp)
        );
        assert!(m.managed_fields.is_none() && f.managed_fields.is_some());
        assert_eq!(WatchedToken::url_path(&(), None), ProxyToken::url_path(&(), None));
    }

    #[tokio::test]
    async fn other_errors_do_not_switch_to_paginated_lists() {
        let mut unavailable = Status::failure("etcd is down", "ServiceUnavailable");
        unavailable.code = 503;
        let first = vec![Ok(1), Err(watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(unavailable)))), Ok(2)];
        let seen = items(first, vec![Ok(99)]).await;
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!((&seen[0], &seen[2]), (&Ok(1), &Ok(2)));
        assert!(streaming_refused(&refused(400)) && streaming_refused(&refused(422)));
    }
}
