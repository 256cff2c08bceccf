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
//! LLM-token limits claim shares of each window in `status.tokenWindows` the same way;
//! requests reserve from them and settle with the upstream's reported usage (see
//! `budget`). The request that finds a budget spent writes `spentAt` and an Event.
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
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::budget::{Charge, Reservation, Reserve, TokenShares};
use super::{ProxyError, Refused};
use crate::api::{ProxyToken, TokenWindow, TokenWindowKind, UsageFlush};
use crate::index::DigestHasher;
use crate::index::Route;
use crate::metrics::{BudgetLabels, Metrics, Name, ResultLabels};
use crate::token::TokenHash;
use crate::windows::{self, TokenLimits};

/// Field manager of the proxies' status writes.
pub(crate) const PROXY_MANAGER: &str = "llm-proxy-proxy";

/// How many optimistic-concurrency retries a claim or flush gets before giving up.
const MAX_ATTEMPTS: usize = 20;

/// How long a process's last flush stays in `status.usageFlushes` (a retry comes
/// within seconds; a stopped process's entry goes with the next flush after this).
const FLUSH_RECORD_TTL: jiff::SignedDuration = jiff::SignedDuration::from_hours(24);

/// A flush of one token's counts: what is written, under which sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Flush {
    sequence: i64,
    delta: i64,
    /// LLM tokens used, by limited window.
    tokens: Vec<Charge>,
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
    /// This replica's shares of the token's LLM-token windows.
    tokens: Arc<TokenShares>,
    /// A flush that failed without saying whether it was written: retried as it is.
    in_doubt: std::sync::Mutex<Option<Flush>>,
}

impl Counter {
    /// Sets the remaining-budget gauges from `windows` as stored.
    fn report_remaining(&self, metrics: &Metrics, windows: &[TokenWindow]) {
        for window in windows {
            let labels = BudgetLabels {
                token_namespace: Name(Arc::from(self.namespace.as_str())),
                token_name: Name(Arc::from(self.name.as_str())),
                window: window_label(window.window),
            };
            metrics.token_budget_remaining.get_or_create(&labels).set(window.remaining_tokens);
        }
    }
}

fn window_label(kind: TokenWindowKind) -> &'static str {
    match kind {
        TokenWindowKind::Minute => "Minute",
        TokenWindowKind::Day => "Day",
        TokenWindowKind::Month => "Month",
        TokenWindowKind::Lifetime => "Lifetime",
    }
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

/// What claiming a share of an LLM-token window found.
#[derive(Debug, PartialEq, Eq)]
enum TokenClaim {
    /// A share of `tokens`; `last` when it was all the window had left.
    Granted { tokens: i64, last: bool },
    /// Nothing is left; `first` when this claim marked the window spent.
    Spent { first: bool },
    /// The API server could not be written.
    Unavailable,
}

/// Request counting and budget claims shared by every connection of a proxy replica.
pub(crate) struct Quota {
    client: Client,
    /// Events when a token budget is spent.
    recorder: Recorder,
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
        let reporter = Reporter { controller: PROXY_MANAGER.into(), instance: Some(replica.clone()) };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
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
    /// With token limits, the reservation to settle with the response's usage.
    pub(crate) async fn admit(
        &self,
        hash: TokenHash,
        route: &Route,
        now_us: i64,
    ) -> Result<Option<Reservation>, Refused> {
        let counter = self.counter(hash, route);
        // Token windows first: a refusal there spends no request slot. A refusal after
        // them drops the reservation, which gives it back.
        let reservation = match route.token.token_limits {
            limits if limits.is_empty() => None,
            limits => Some(self.reserve_tokens(&counter, limits, now_us).await?),
        };
        // The minute next: a refusal there spends none of the lifetime cap.
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
        Ok(reservation)
    }

    /// Reserves this request's estimate in every limited window of the token, claiming
    /// shares where this replica's are short.
    async fn reserve_tokens(
        &self,
        counter: &Arc<Counter>,
        limits: TokenLimits,
        now_us: i64,
    ) -> Result<Reservation, Refused> {
        let shares = &counter.tokens;
        let mut reservation = Reservation::new(shares.clone());
        for (kind, limit) in limits.iter() {
            let estimate = shares.estimate(limit);
            let mut claimed_once = false;
            loop {
                let start_us = match shares.reserve(kind, windows::start(kind, now_us), estimate) {
                    Reserve::Taken { start_us } => {
                        reservation.add(kind, start_us, estimate);
                        break;
                    }
                    Reserve::Spent { start_us } => return Err(Refused::tokens_spent(kind, limit, start_us, now_us)),
                    Reserve::Short { start_us, .. } => start_us,
                };
                let _one_claim_at_a_time = shares.claiming.lock().await;
                // Another request may have claimed while this one waited.
                let need = match shares.reserve(kind, start_us, estimate) {
                    Reserve::Taken { start_us } => {
                        reservation.add(kind, start_us, estimate);
                        break;
                    }
                    Reserve::Spent { start_us } => return Err(Refused::tokens_spent(kind, limit, start_us, now_us)),
                    Reserve::Short { need, .. } if claimed_once => need.max(estimate),
                    Reserve::Short { need, .. } => need,
                };
                claimed_once = true;
                let claimed = self.claim_tokens(counter, kind, limit, start_us, need).await;
                let result = match &claimed {
                    TokenClaim::Granted { .. } => "tokens_claimed",
                    TokenClaim::Spent { .. } => "tokens_spent",
                    TokenClaim::Unavailable => "tokens_failed",
                };
                self.metrics.quota_claims.get_or_create(&ResultLabels { result }).inc();
                match claimed {
                    TokenClaim::Granted { tokens, last } => shares.grant(kind, start_us, tokens, last),
                    TokenClaim::Spent { .. } => shares.mark_spent(kind, start_us),
                    TokenClaim::Unavailable => return Err(ProxyError::QuotaUnavailable.into()),
                }
            }
        }
        Ok(reservation)
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
                    tokens: Arc::default(),
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

    /// Claims a share of `need` tokens or more of the `kind` window starting at
    /// `start_us` (on the main runtime, as [`Quota::claim`]); publishes the Event when
    /// this claim finds the window spent first.
    async fn claim_tokens(
        &self,
        counter: &Arc<Counter>,
        kind: TokenWindowKind,
        limit: u64,
        start_us: i64,
        need: i64,
    ) -> TokenClaim {
        let (client, counter, recorder) = (self.client.clone(), counter.clone(), self.recorder.clone());
        let metrics = self.metrics.clone();
        self.runtime
            .spawn(async move {
                let (claimed, token) = claim_token_block(client, &counter, kind, limit, start_us, need).await;
                if let Some(token) = &token {
                    counter.report_remaining(&metrics, &token.status.clone().unwrap_or_default().token_windows);
                }
                if let (TokenClaim::Spent { first: true }, Some(token)) = (&claimed, &token) {
                    publish_spent(&recorder, token, kind, limit).await;
                }
                claimed
            })
            .await
            .unwrap_or(TokenClaim::Unavailable)
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
                None => {
                    let delta = counter.unflushed.swap(0, Ordering::Relaxed) as i64;
                    let tokens = counter.tokens.take_pending();
                    if delta == 0 && tokens.is_empty() {
                        continue;
                    }
                    Flush { sequence: self.sequence.fetch_add(1, Ordering::Relaxed) + 1, delta, tokens }
                }
            };
            let last_used = counter.last_used_us.load(Ordering::Relaxed);
            match add_usage(client, &counter, &self.replica, &flush, last_used).await {
                Ok(windows) => counter.report_remaining(&self.metrics, &windows),
                Err(error) => {
                    // Written or not, nobody can tell yet: the retry finds out.
                    *counter.in_doubt.lock().expect("flush state poisoned") = Some(flush);
                    tracing::warn!(%error, namespace = %counter.namespace, name = %counter.name, "writing usage failed; will retry");
                }
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

/// Claims a share of at least `need` tokens (a block of the limit when larger) of the
/// `kind` window starting at `start_us`, with a resourceVersion precondition. When
/// nothing is left, the first claim to find it so writes `spentAt`. Returns what it
/// found, and the token as written or read.
async fn claim_token_block(
    client: Client,
    counter: &Counter,
    kind: TokenWindowKind,
    limit_hint: u64,
    start_us: i64,
    need: i64,
) -> (TokenClaim, Option<ProxyToken>) {
    let api = Api::<ProxyToken>::namespaced(client, &counter.namespace);
    let Ok(start) = jiff::Timestamp::from_microsecond(start_us) else { return (TokenClaim::Unavailable, None) };
    let claimed = retry_on_conflict(|| async {
        let token = api.get_status(&counter.name).await?;
        let status = token.status.clone().unwrap_or_default();
        let limit = limit_of(&token, kind).unwrap_or(limit_hint as i64);
        let mut windows = status.token_windows.clone();
        let at = windows.iter().position(|w| w.window == kind);
        let mut window = match at.map(|i| &windows[i]) {
            Some(w) if w.start.0.as_microsecond() == start_us => w.clone(),
            // A later window is stored: this one is over for the cluster (as for minutes).
            Some(w) if w.start.0.as_microsecond() > start_us => return Ok((TokenClaim::Spent { first: false }, token)),
            _ => TokenWindow {
                window: kind,
                start: Time(start),
                limit,
                used_tokens: 0,
                remaining_tokens: limit,
                claimed_tokens: 0,
                spent_at: None,
            },
        };
        window.limit = limit;
        window.remaining_tokens = (limit - window.used_tokens).max(0);
        let left = limit - window.claimed_tokens;
        let outcome = if left > 0 {
            let tokens = need.max(super::budget::share_size(limit)).min(left);
            window.claimed_tokens += tokens;
            TokenClaim::Granted { tokens, last: tokens == left }
        } else if window.spent_at.is_none() {
            window.spent_at = Some(crate::api::micros(jiff::Timestamp::now()));
            TokenClaim::Spent { first: true }
        } else {
            return Ok((TokenClaim::Spent { first: false }, token));
        };
        match at {
            Some(i) => windows[i] = window.clone(),
            None => windows.push(window.clone()),
        }
        let patch = json!({
            "metadata": { "resourceVersion": token.resource_version() },
            "status": { "tokenWindows": windows },
        });
        let patched = api.patch_status(&counter.name, &params(), &Patch::Merge(&patch)).await?;
        let stored = patched.status.as_ref().and_then(|s| s.token_windows.iter().find(|w| w.window == kind));
        if stored != Some(&window) {
            tracing::error!("status.tokenWindows was not stored: update the CRDs (crds/llmproxy.io.yaml)");
            return Ok((TokenClaim::Unavailable, patched));
        }
        Ok((outcome, patched))
    })
    .await;
    match claimed {
        Ok((outcome, token)) => (outcome, Some(token)),
        Err(error) => {
            tracing::warn!(%error, namespace = %counter.namespace, name = %counter.name, "claiming a share of a token limit failed");
            (TokenClaim::Unavailable, None)
        }
    }
}

/// The `kind` limit `token`'s spec sets now.
fn limit_of(token: &ProxyToken, kind: TokenWindowKind) -> Option<i64> {
    token.spec.limits.as_ref()?.token_windows().find(|(k, _)| *k == kind).map(|(_, limit)| limit)
}

/// The Event on a token whose `kind` budget is spent: once per window, from the replica
/// whose claim found it so.
async fn publish_spent(recorder: &Recorder, token: &ProxyToken, kind: TokenWindowKind, limit: u64) {
    let retry = match kind {
        TokenWindowKind::Lifetime => "for good: create a new ProxyToken for more".to_string(),
        _ => format!("until the window resets ({} {})", kind.field(), windows::per(kind)),
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "TokenBudgetSpent".into(),
        note: Some(format!(
            "limits.{} of {limit} tokens {} is used up or held by requests in flight; further requests are refused {retry}",
            kind.field(),
            windows::per(kind),
        )),
        action: "RefuseRequests".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &token.object_ref(&())).await {
        tracing::warn!(%error, "could not publish event");
    }
}

/// Writes `flush` into `requestCount` and `tokenWindows` unless `status.usageFlushes`
/// shows it already was (its answer was lost), recording it there in the same write.
/// Returns the token windows as written.
async fn add_usage(
    client: &Client,
    counter: &Counter,
    replica: &str,
    flush: &Flush,
    last_used_us: i64,
) -> Result<Vec<TokenWindow>, kube::Error> {
    let api = Api::<ProxyToken>::namespaced(client.clone(), &counter.namespace);
    let last_used = jiff::Timestamp::from_microsecond(last_used_us).map(crate::api::micros).ok();
    retry_on_conflict(|| async {
        let token = api.get_status(&counter.name).await?;
        let status = token.status.clone().unwrap_or_default();
        if status.usage_flushes.iter().any(|f| f.replica == replica && f.sequence >= flush.sequence) {
            return Ok(status.token_windows);
        }
        let windows = charge(&token, status.token_windows.clone(), &flush.tokens);
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
                "tokenWindows": windows,
            },
        });
        api.patch_status(&counter.name, &params(), &Patch::Merge(&patch)).await?;
        Ok(windows)
    })
    .await
}

/// `windows` with `charges` added to the windows they were made in (usage of a window
/// already replaced by a later one is dropped) and `limit`/`remainingTokens` as the
/// token's spec sets them now.
fn charge(token: &ProxyToken, mut windows: Vec<TokenWindow>, charges: &[Charge]) -> Vec<TokenWindow> {
    for charge in charges {
        let window =
            windows.iter_mut().find(|w| w.window == charge.kind && w.start.0.as_microsecond() == charge.start_us);
        if let Some(window) = window {
            window.used_tokens += charge.tokens;
        }
    }
    for window in &mut windows {
        window.limit = limit_of(token, window.window).unwrap_or(window.limit);
        window.remaining_tokens = (window.limit - window.used_tokens).max(0);
    }
    windows
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
            tokens: Arc::default(),
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
        assert!(
            add_usage(&client, &counter(), "r", &Flush { sequence: 1, delta: 1, tokens: Vec::new() }, 0).await.is_err()
        );
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
