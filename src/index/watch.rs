//! Wires the [`Index`] to the API server: three watches in, a published
//! [`RouteTable`] out.
//!
//! Readers load the current table from an [`ArcSwap`] (no lock a writer holds); a
//! `tokio::sync::watch` channel announces each new generation to whoever waits for one.

use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

use super::{Change, Index, RouteTable};
use crate::api::{Project, ProxyToken};
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
}

impl SharedTable {
    /// A table that never changes: for tests and benchmarks that build one by hand.
    pub fn fixed(table: RouteTable) -> Self {
        let (_tx, generations) = watch::channel(table.generation);
        Self { table: Arc::new(ArcSwap::from_pointee(table)), generations }
    }

    /// The current snapshot: a lock-free load.
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    /// A receiver that changes each time a new generation is published.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generations.clone()
    }
}

/// Starts the watches and the index task; the table is `ready` after every kind listed.
pub fn spawn(client: Client, metrics: Arc<Metrics>, config: WatchConfig) -> SharedTable {
    let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let (tx, generations) = watch::channel(0);
    let shared = SharedTable { table: table.clone(), generations };
    tokio::spawn(run(client, config, table, tx, metrics));
    shared
}

async fn run(
    client: Client,
    config: WatchConfig,
    table: Arc<ArcSwap<RouteTable>>,
    tx: watch::Sender<u64>,
    metrics: Arc<Metrics>,
) {
    let labelled = match &config.label_selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    let projects = watcher(Api::<Project>::all(client.clone()), labelled.clone())
        .default_backoff()
        .map(|r| r.map(Change::Project));
    let tokens =
        watcher(Api::<ProxyToken>::all(client.clone()), labelled).default_backoff().map(|r| r.map(Change::Token));
    let secrets = watcher(Api::<Secret>::namespaced(client, &config.secrets_namespace), watcher::Config::default())
        .default_backoff()
        .map(|r| r.map(Change::Secret));
    let mut changes = futures::stream::select_all([projects.boxed(), tokens.boxed(), secrets.boxed()]);

    let mut index = Index::new();
    while let Some(first) = changes.next().await {
        apply(&mut index, first, &metrics);
        // Fold everything already queued into one snapshot: a burst of events costs one
        // rebuild, and the first event of the burst is never delayed by a timer.
        while let Some(Some(more)) = changes.next().now_or_never() {
            apply(&mut index, more, &metrics);
        }
        let snapshot = index.snapshot();
        let generation = snapshot.generation;
        metrics.table_tokens.set(snapshot.token_count() as i64);
        metrics.table_projects.set(snapshot.project_count() as i64);
        metrics.table_generation.set(generation as i64);
        metrics.table_updated.set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
        table.store(Arc::new(snapshot));
        tx.send_replace(generation);
    }
}

fn apply(index: &mut Index, change: Result<Change, watcher::Error>, metrics: &Metrics) {
    match change {
        Ok(change) => {
            let relisting = match &change {
                Change::Project(watcher::Event::Init) => Some("Project"),
                Change::Token(watcher::Event::Init) => Some("ProxyToken"),
                Change::Secret(watcher::Event::Init) => Some("Secret"),
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
