//! Request counting and the exact `maxRequests` cap across proxy replicas, with the
//! ProxyToken's status as the only shared state.
//!
//! In: every authorised request. Out: a go/no-go for capped tokens, and batched status
//! writes (`requestCount`, `lastUsedAt`, `claimedRequests`).
//!
//! A replica forwards a capped token's request only from a *block* of the budget it has
//! claimed by raising `status.claimedRequests` with a resourceVersion precondition, so
//! two replicas can never claim the same requests, and the sum of all blocks never
//! exceeds `maxRequests`. A replica that dies loses its unused block (under-use, never
//! over-spend); one that shuts down cleanly gives it back. Unlimited tokens cost no
//! write per request: counts are flushed per token every `flush_interval`.
//!
//! `limits.requestsPerMinute` works the same way per calendar minute: a replica claims
//! blocks of the minute's budget in `status.currentMinute` (a new minute starts from
//! nothing), serves only from them, and drops what is left when the minute ends. No
//! minute ever admits more than the limit, over every replica.
//!
//! Flushes are exact: each carries this process's next sequence number, written with
//! the count into `status.usageFlushes`. A flush whose answer is lost (the write may or
//! may not have happened) is retried with the same number, and the retry finds it there
//! when it did: counted once, never twice, never lost.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::{ProxyError, Refused};
use crate::api::{ProxyToken, UsageFlush};
use crate::index::DigestHasher;
use crate::index::Route;
use crate::metrics::{Metrics, ResultLabels};
use crate::token::TokenHash;

/// Field manager of the proxies' status writes.
pub(crate) const PROXY_MANAGER: &str = "llm-proxy-proxy";

/// How many optimistic-concurrency retries a claim or flush gets before giving up.
const MAX_ATTEMPTS: usize = 20;

/// How long a process's last flush stays in `status.usageFlushes` (a retry comes
/// within seconds; a stopped process's entry goes with the next flush after this).
const FLUSH_RECORD_TTL: jiff::SignedDuration = jiff::SignedDuration::from_hours(24);

/// A flush of one token's count: what is written, under which sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flush {
    sequence: i64,
    delta: i64,
}

/// One token's counters on this replica.
struct Counter {
    namespace: String,
    name: String,
    /// Requests forwarded and not yet written to `status.requestCount`.
    unflushed: AtomicU64,
    /// Latest use, Unix microseconds.
    last_used_us: AtomicI64,
    /// Requests left in this replica's claimed block; the lock serialises claims.
    block: tokio::sync::Mutex<i64>,
    /// This replica's share of the current minute's requests.
    window: tokio::sync::Mutex<Window>,
    /// A flush that failed without saying whether it was written: retried as it is.
    in_doubt: std::sync::Mutex<Option<Flush>>,
}

/// Requests left to this replica in one minute of a rate limit.
#[derive(Default)]
struct Window {
    /// The minute's first instant, Unix microseconds.
    start_us: i64,
    left: i64,
    /// Every request of the minute is claimed: claims only grow within a minute, so
    /// the rest of it is refused here, without asking the API server again.
    full: bool,
}

const MINUTE_US: i64 = 60_000_000;

/// Why a minute's block could not be claimed.
#[derive(Debug, PartialEq, Eq)]
enum WindowClaim {
    /// The minute's requests are all claimed.
    Full,
    /// The API server could not be written.
    Unavailable,
}

/// Request counting and budget claims shared by every connection of a proxy replica.
pub(crate) struct Quota {
    client: Client,
    /// The runtime every API call runs on (see [`Quota::claim`]).
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    counters: RwLock<HashMap<TokenHash, Arc<Counter>, BuildHasherDefault<DigestHasher>>>,
    /// One flush at a time: the final flush at shutdown must not return while a
    /// periodic one still holds counts it took.
    flushing: tokio::sync::Mutex<()>,
    /// This process in `status.usageFlushes`.
    replica: String,
    /// The last flush sequence number used.
    sequence: AtomicI64,
}

impl Quota {
    /// Accounting that writes to the API server through `client`, from the runtime it
    /// is created on (the process's main runtime, which outlives the serving threads).
    /// `replica` names this process in `status.usageFlushes`: unique per process start
    /// (a restarted process numbers its flushes from 1 again).
    pub(crate) fn new(client: Client, metrics: Arc<Metrics>, replica: String) -> Self {
        Self {
            client,
            runtime: tokio::runtime::Handle::current(),
            metrics,
            counters: RwLock::default(),
            flushing: tokio::sync::Mutex::default(),
            replica,
            sequence: AtomicI64::new(0),
        }
    }

    /// Admits one request with `route`'s token: always for unlimited tokens, from the
    /// replica's blocks (claiming new ones when empty) for rate-limited and capped ones.
    pub(crate) async fn admit(&self, hash: TokenHash, route: &Route, now_us: i64) -> Result<(), Refused> {
        let counter = self.counter(hash, route);
        // The minute first: a refusal there spends none of the lifetime cap.
        if let Some(limit) = route.token.requests_per_minute {
            let minute = now_us - now_us.rem_euclid(MINUTE_US);
            let mut window = counter.window.lock().await;
            if window.start_us != minute {
                *window = Window { start_us: minute, left: 0, full: false };
            }
            let retry_in = ((minute + MINUTE_US - now_us) as u64).div_ceil(1_000_000);
            if window.full {
                return Err(Refused::rate_limited(limit, retry_in));
            }
            if window.left == 0 {
                let claimed = self.claim_minute(&counter, limit, minute).await;
                let result = match &claimed {
                    Ok(_) => "minute_claimed",
                    Err(WindowClaim::Full) => "minute_full",
                    Err(WindowClaim::Unavailable) => "minute_failed",
                };
                self.metrics.quota_claims.get_or_create(&ResultLabels { result }).inc();
                window.left = match claimed {
                    Ok(block) => block,
                    Err(WindowClaim::Full) => {
                        window.full = true;
                        return Err(Refused::rate_limited(limit, retry_in));
                    }
                    Err(WindowClaim::Unavailable) => return Err(ProxyError::QuotaUnavailable.into()),
                };
            }
            window.left -= 1;
        }
        if let Some(max) = route.token.max_requests {
            let mut block = counter.block.lock().await;
            if *block == 0 {
                let claimed = self.claim(&counter, max).await;
                let result = match &claimed {
                    Ok(_) => "claimed",
                    Err(ProxyError::TokenExhausted) => "exhausted",
                    Err(_) => "failed",
                };
                self.metrics.quota_claims.get_or_create(&ResultLabels { result }).inc();
                *block = claimed?;
            }
            *block -= 1;
        }
        counter.unflushed.fetch_add(1, Ordering::Relaxed);
        counter.last_used_us.fetch_max(now_us, Ordering::Relaxed);
        Ok(())
    }

    fn counter(&self, hash: TokenHash, route: &Route) -> Arc<Counter> {
        if let Some(counter) = self.counters.read().expect("usage map poisoned").get(&hash) {
            return counter.clone();
        }
        let mut counters = self.counters.write().expect("usage map poisoned");
        counters
            .entry(hash)
            .or_insert_with(|| {
                Arc::new(Counter {
                    namespace: route.token.namespace.to_string(),
                    name: route.token.name.to_string(),
                    unflushed: AtomicU64::new(0),
                    last_used_us: AtomicI64::new(0),
                    block: tokio::sync::Mutex::new(0),
                    window: tokio::sync::Mutex::default(),
                    in_doubt: std::sync::Mutex::new(None),
                })
            })
            .clone()
    }

    /// Raises `claimedRequests` by one block; returns the block's size. Runs on the main
    /// runtime: the API client opens connections where a request first needs one, and a
    /// connection opened from a serving thread would die with that thread's runtime at
    /// shutdown — possibly in the middle of a usage flush, whose count would then be
    /// written again by the final flush.
    async fn claim(&self, counter: &Arc<Counter>, max_hint: u64) -> Result<i64, ProxyError> {
        let (client, counter) = (self.client.clone(), counter.clone());
        self.runtime
            .spawn(async move { claim_block(client, &counter, max_hint).await })
            .await
            .unwrap_or(Err(ProxyError::QuotaUnavailable))
    }

    /// Claims a block of the minute starting at `minute_us` (on the main runtime, as
    /// [`Quota::claim`]).
    async fn claim_minute(&self, counter: &Arc<Counter>, limit: u64, minute_us: i64) -> Result<i64, WindowClaim> {
        let (client, counter) = (self.client.clone(), counter.clone());
        self.runtime
            .spawn(async move { claim_minute_block(client, &counter, limit, minute_us).await })
            .await
            .unwrap_or(Err(WindowClaim::Unavailable))
    }

    /// Writes every token's unflushed count and last use into its status.
    pub(crate) async fn flush(&self) {
        let client = &self.client;
        let _one_at_a_time = self.flushing.lock().await;
        let counters: Vec<Arc<Counter>> = self.counters.read().expect("usage map poisoned").values().cloned().collect();
        for counter in counters {
            // A flush in doubt goes again as it was; new counts wait for the next one.
            let in_doubt = counter.in_doubt.lock().expect("flush state poisoned").take();
            let flush = match in_doubt {
                Some(flush) => flush,
                None => match counter.unflushed.swap(0, Ordering::Relaxed) {
                    0 => continue,
                    delta => Flush { sequence: self.sequence.fetch_add(1, Ordering::Relaxed) + 1, delta: delta as i64 },
                },
            };
            let last_used = counter.last_used_us.load(Ordering::Relaxed);
            if let Err(error) = add_usage(client, &counter, &self.replica, flush, last_used).await {
                // Written or not, nobody can tell yet: the retry finds out.
                *counter.in_doubt.lock().expect("flush state poisoned") = Some(flush);
                tracing::warn!(%error, namespace = %counter.namespace, name = %counter.name, "writing usage failed; will retry");
            }
        }
    }

    /// Flushes, then gives unused blocks back so other replicas can spend them.
    pub(crate) async fn shutdown(&self) {
        self.flush().await;
        let client = &self.client;
        let counters: Vec<Arc<Counter>> = self.counters.read().expect("usage map poisoned").values().cloned().collect();
        for counter in counters {
            let mut block = counter.block.lock().await;
            if *block > 0 && give_back(client, &counter, *block).await.is_ok() {
                *block = 0;
            }
        }
    }
}

/// Raises `claimedRequests` by one block with a resourceVersion precondition.
async fn claim_block(client: Client, counter: &Counter, max_hint: u64) -> Result<i64, ProxyError> {
    let api = Api::<ProxyToken>::namespaced(client, &counter.namespace);
    let claimed = retry_on_conflict(|| async {
        let token = api.get_status(&counter.name).await?;
        let status = token.status.clone().unwrap_or_default();
        let max = token.spec.max_requests.unwrap_or(max_hint as i64);
        let claimed = status.claimed_requests.unwrap_or(0).max(status.request_count.unwrap_or(0));
        let remaining = max - claimed;
        if remaining <= 0 {
            return Ok(Err(ProxyError::TokenExhausted));
        }
        let block = block_size(max).min(remaining);
        let patch = json!({
            "metadata": { "resourceVersion": token.resource_version() },
            "status": { "claimedRequests": claimed + block },
        });
        let patched = api.patch_status(&counter.name, &params(), &Patch::Merge(&patch)).await?;
        // A CRD older than this proxy would silently prune the field: spend nothing then.
        if patched.status.as_ref().and_then(|s| s.claimed_requests) != Some(claimed + block) {
            tracing::error!("status.claimedRequests was not stored: update the CRDs (crds/llmproxy.io.yaml)");
            return Ok(Err(ProxyError::QuotaUnavailable));
        }
        Ok(Ok(block))
    })
    .await;
    claimed.unwrap_or_else(|error| {
        tracing::warn!(%error, namespace = %counter.namespace, name = %counter.name, "claiming budget failed");
        Err(ProxyError::QuotaUnavailable)
    })
}

/// Raises the claims of the minute starting at `minute_us` by one block, with a
/// resourceVersion precondition; a status still on an earlier minute starts the new
/// one from nothing, and one already on a later minute refuses (windows never go back).
async fn claim_minute_block(client: Client, counter: &Counter, limit: u64, minute_us: i64) -> Result<i64, WindowClaim> {
    let api = Api::<ProxyToken>::namespaced(client, &counter.namespace);
    let start = jiff::Timestamp::from_microsecond(minute_us).map_err(|_| WindowClaim::Unavailable)?;
    let claimed = retry_on_conflict(|| async {
        let token = api.get_status(&counter.name).await?;
        let status = token.status.clone().unwrap_or_default();
        let limit = token.spec.limits.as_ref().and_then(|l| l.requests_per_minute).unwrap_or(limit as i64);
        // A later minute is stored: this request's minute is over for the cluster (a
        // slow request, or this replica's clock behind another's). Never move it back.
        let claimed = match status.current_minute {
            Some(w) if w.start.0.as_microsecond() > minute_us => return Ok(Err(WindowClaim::Full)),
            Some(w) if w.start.0.as_microsecond() == minute_us => w.claimed_requests,
            _ => 0,
        };
        let remaining = limit - claimed;
        if remaining <= 0 {
            return Ok(Err(WindowClaim::Full));
        }
        let block = block_size(limit).min(remaining);
        let window = json!({ "start": start.to_string(), "claimedRequests": claimed + block });
        let patch = json!({
            "metadata": { "resourceVersion": token.resource_version() },
            "status": { "currentMinute": window },
        });
        let patched = api.patch_status(&counter.name, &params(), &Patch::Merge(&patch)).await?;
        if patched.status.as_ref().and_then(|s| s.current_minute.as_ref()).map(|w| w.claimed_requests)
            != Some(claimed + block)
        {
            tracing::error!("status.currentMinute was not stored: update the CRDs (crds/llmproxy.io.yaml)");
            return Ok(Err(WindowClaim::Unavailable));
        }
        Ok(Ok(block))
    })
    .await;
    claimed.unwrap_or_else(|error| {
        tracing::warn!(%error, namespace = %counter.namespace, name = %counter.name, "claiming a minute's requests failed");
        Err(WindowClaim::Unavailable)
    })
}

/// Runs `attempt`, a read-modify-write with a resourceVersion precondition, again while
/// the API server refuses it with 409 Conflict (another replica wrote in between), at
/// most [`MAX_ATTEMPTS`] times in all; then that conflict is the error.
async fn retry_on_conflict<T, F, Fut>(mut attempt: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Err(kube::Error::Api(status)) if status.code == 409 && tries < MAX_ATTEMPTS => continue,
            other => return other,
        }
    }
}

fn params() -> PatchParams {
    PatchParams { field_manager: Some(PROXY_MANAGER.to_string()), ..Default::default() }
}

/// Block size for a cap of `max`: small enough that one replica cannot starve the
/// others of a small budget, large enough that big budgets cost few writes.
pub(crate) fn block_size(max: i64) -> i64 {
    (max / 16).clamp(1, 1000)
}

/// Writes `flush` into `requestCount` unless `status.usageFlushes` shows it already
/// was (its answer was lost), recording it there in the same write.
async fn add_usage(
    client: &Client,
    counter: &Counter,
    replica: &str,
    flush: Flush,
    last_used_us: i64,
) -> Result<(), kube::Error> {
    let api = Api::<ProxyToken>::namespaced(client.clone(), &counter.namespace);
    let last_used = jiff::Timestamp::from_microsecond(last_used_us).map(crate::api::micros).ok();
    retry_on_conflict(|| async {
        let token = api.get_status(&counter.name).await?;
        let status = token.status.clone().unwrap_or_default();
        if status.usage_flushes.iter().any(|f| f.replica == replica && f.sequence >= flush.sequence) {
            return Ok(());
        }
        let newer = match (&status.last_used_at, &last_used) {
            (Some(old), Some(new)) => new.0 > old.0,
            _ => true,
        };
        let now = jiff::Timestamp::now();
        let mut flushes: Vec<UsageFlush> = status
            .usage_flushes
            .into_iter()
            .filter(|f| f.replica != replica && now.duration_since(f.at.0) < FLUSH_RECORD_TTL)
            .collect();
        flushes.push(UsageFlush {
            replica: replica.to_string(),
            sequence: flush.sequence,
            at: crate::api::micros(now),
        });
        let patch = json!({
            "metadata": { "resourceVersion": token.resource_version() },
            "status": {
                "requestCount": status.request_count.unwrap_or(0) + flush.delta,
                "lastUsedAt": if newer { last_used.clone() } else { status.last_used_at.clone() },
                "usageFlushes": flushes,
            },
        });
        api.patch_status(&counter.name, &params(), &Patch::Merge(&patch)).await.map(drop)
    })
    .await
}

async fn give_back(client: &Client, counter: &Counter, unused: i64) -> Result<(), kube::Error> {
    let api = Api::<ProxyToken>::namespaced(client.clone(), &counter.namespace);
    retry_on_conflict(|| async {
        let token = api.get_status(&counter.name).await?;
        let status = token.status.clone().unwrap_or_default();
        let used = status.request_count.unwrap_or(0);
        let claimed = (status.claimed_requests.unwrap_or(0) - unused).max(used);
        let patch = json!({
            "metadata": { "resourceVersion": token.resource_version() },
            "status": { "claimedRequests": claimed },
        });
        api.patch_status(&counter.name, &params(), &Patch::Merge(&patch)).await.map(drop)
    })
    .await
}

/// Flushes `usage` every `interval` until the process ends.
pub(crate) fn spawn_flusher(quota: Arc<Quota>, interval: Duration) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            quota.flush().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client whose API server answers every read of the token and refuses every
    /// write with 409 Conflict; returns it and how many writes it refused.
    fn always_conflicting() -> (Client, Arc<std::sync::atomic::AtomicUsize>) {
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<hyper::Request<Body>, hyper::Response<Body>>();
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = refused.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (code, body) = if request.method() == hyper::Method::PATCH {
                    count.fetch_add(1, Ordering::SeqCst);
                    (
                        409,
                        json!({
                            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                            "message": "Operation cannot be fulfilled: the object has been modified",
                        }),
                    )
                } else {
                    (
                        200,
                        json!({
                            "apiVersion": "llmproxy.io/v1alpha1", "kind": "ProxyToken",
                            "metadata": { "name": "web", "namespace": "apps", "resourceVersion": "7" },
                            "spec": { "projectRef": { "name": "p" }, "duration": "1h", "maxRequests": 100 },
                            "status": { "claimedRequests": 10, "requestCount": 4 },
                        }),
                    )
                };
                let response = hyper::Response::builder().status(code).body(Body::from(body.to_string().into_bytes()));
                respond.send_response(response.unwrap());
            }
        });
        (Client::new(service, "apps"), refused)
    }

    fn counter() -> Counter {
        Counter {
            namespace: "apps".into(),
            name: "web".into(),
            unflushed: AtomicU64::new(0),
            last_used_us: AtomicI64::new(0),
            block: tokio::sync::Mutex::new(6),
            window: tokio::sync::Mutex::default(),
            in_doubt: std::sync::Mutex::new(None),
        }
    }

    #[tokio::test]
    async fn giving_a_block_back_reports_failure_when_every_attempt_conflicts() {
        let (client, refused) = always_conflicting();
        let result = give_back(&client, &counter(), 6).await;
        // It used to report success after its last refused attempt, and the block was
        // forgotten as if returned.
        assert!(matches!(&result, Err(kube::Error::Api(status)) if status.code == 409), "{result:?}");
        assert_eq!(refused.load(Ordering::SeqCst), MAX_ATTEMPTS);
    }

    #[tokio::test]
    async fn claims_and_flushes_give_up_after_the_same_number_of_conflicts() {
        let (client, refused) = always_conflicting();
        assert_eq!(claim_block(client.clone(), &counter(), 100).await, Err(ProxyError::QuotaUnavailable));
        assert_eq!(refused.load(Ordering::SeqCst), MAX_ATTEMPTS);
        assert!(add_usage(&client, &counter(), "r", Flush { sequence: 1, delta: 1 }, 0).await.is_err());
        assert_eq!(refused.load(Ordering::SeqCst), 2 * MAX_ATTEMPTS);
    }

    /// An API server holding one token in memory: every write is applied (merge patch
    /// of its status, with the resourceVersion precondition), and the answers to the
    /// first `lose` writes are lost, as when the connection breaks after the write is
    /// sent. Returns the client and the token's status as the server holds it.
    fn losing_answers(lose: usize) -> (Client, Arc<std::sync::Mutex<serde_json::Value>>) {
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<hyper::Request<Body>, hyper::Response<Body>>();
        let status = Arc::new(std::sync::Mutex::new(json!({})));
        let state = status.clone();
        tokio::spawn(async move {
            let (mut version, mut lost) = (1, 0);
            while let Some((request, respond)) = handle.next_request().await {
                let is_write = request.method() == hyper::Method::PATCH;
                if is_write {
                    let body = request.into_body().collect_bytes().await.unwrap();
                    let patch: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    if patch["metadata"]["resourceVersion"] != json!(version.to_string()) {
                        let conflict = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409,
                                               "reason": "Conflict", "message": "the object has been modified" });
                        let response =
                            hyper::Response::builder().status(409).body(Body::from(conflict.to_string().into_bytes()));
                        respond.send_response(response.unwrap());
                        continue;
                    }
                    let mut held = state.lock().unwrap();
                    for (field, value) in patch["status"].as_object().unwrap() {
                        held[field] = value.clone();
                    }
                    version += 1;
                    if lost < lose {
                        lost += 1;
                        respond.send_error(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "answer lost"));
                        continue;
                    }
                }
                let token = json!({
                    "apiVersion": "llmproxy.io/v1alpha1", "kind": "ProxyToken",
                    "metadata": { "name": "web", "namespace": "apps", "resourceVersion": version.to_string() },
                    "spec": { "projectRef": { "name": "p" }, "duration": "1h" },
                    "status": state.lock().unwrap().clone(),
                });
                let response = hyper::Response::builder().status(200).body(Body::from(token.to_string().into_bytes()));
                respond.send_response(response.unwrap());
            }
        });
        (Client::new(service, "apps"), status)
    }

    #[tokio::test]
    async fn a_flush_whose_answer_is_lost_is_counted_once() {
        let (client, status) = losing_answers(1);
        let quota = Quota::new(client, Arc::new(Metrics::new()), "proxy-a-1f2e3d4c".into());
        let web = Arc::new(counter());
        quota.counters.write().unwrap().insert(TokenHash([7; 32]), web.clone());
        web.unflushed.store(5, Ordering::SeqCst);
        quota.flush().await;
        // Written, but the proxy could not know: the flush is in doubt.
        assert_eq!(status.lock().unwrap()["requestCount"], json!(5));
        assert!(web.in_doubt.lock().unwrap().is_some());
        web.unflushed.fetch_add(2, Ordering::SeqCst);
        quota.flush().await; // the retry finds itself written
        quota.flush().await; // then the two new requests
        let held = status.lock().unwrap().clone();
        assert_eq!(held["requestCount"], json!(7), "{held}");
        assert_eq!(held["usageFlushes"][0]["sequence"], json!(2));
        assert!(web.in_doubt.lock().unwrap().is_none());
    }

    #[test]
    fn blocks_scale_with_the_cap_and_never_exceed_it() {
        assert_eq!(block_size(1), 1);
        assert_eq!(block_size(50), 3);
        assert_eq!(block_size(16_000), 1000);
        assert_eq!(block_size(10_000_000), 1000);
    }
}
