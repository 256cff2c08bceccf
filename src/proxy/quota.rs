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
//! LLM-token limits and cost budgets claim shares of each window in
//! `status.tokenWindows` and `status.costWindows` the same way; requests reserve from
//! them and settle with the upstream's reported usage (see `budget`). The request that
//! finds a budget spent writes `spentAt` and an Event.
//!
//! Flushes are exact: each carries this process's next sequence number, written with
//! the count into `status.usageFlushes`. A flush whose answer is lost (the write may or
//! may not have happened) is retried with the same number, and the retry finds it there
//! when it did: counted once, never twice, never lost.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use kube::runtime::events::{Recorder, Reporter};

use super::budget::{Charge, Reservation, Reserve, TokenShares, Unused};
use super::budget_claims::{self, Owner, TokenClaim, WindowClaim, WindowFlush, Windows};
use super::error::Whose;
use super::{ProxyError, Refused};
use crate::api::{ProxyToken, TokenWindowKind};
use crate::index::DigestHasher;
use crate::index::watch::SharedTable;
use crate::index::{Route, RouteTable};
use crate::metrics::{BUDGET_WINDOWS, BudgetLabels, Metrics, Name, ProjectBudgetLabels, ResultLabels};
use crate::pricing::Price;
use crate::token::TokenHash;
use crate::windows::{self, Meter, WindowLimits};

/// Field manager of the proxies' status writes.
pub(crate) const PROXY_MANAGER: &str = "llm-proxy-proxy";

/// How many optimistic-concurrency retries a claim or flush gets before giving up.
const MAX_ATTEMPTS: usize = 20;

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
    /// Its Project's name, a label of its metric series.
    project: Arc<str>,
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
    /// Its requests being answered (see [`Answering`]).
    answering: AtomicU64,
}

/// One admitted request of a token, until its answer ends: while any is held, the
/// token's counter and metric series stay. The usage a stream reports at its end is
/// then counted before the series can go, never after, where it would bring them back
/// for a token long deleted.
pub(crate) struct Answering(Arc<Counter>);

impl Answering {
    fn new(counter: Arc<Counter>) -> Self {
        counter.answering.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        // Release: what the answer counted is seen by `forget_gone` once it sees zero.
        self.0.answering.fetch_sub(1, Ordering::Release);
    }
}

/// Sets `owner`'s remaining-budget gauges from its `windows` as stored.
fn report_remaining(metrics: &Metrics, owner: &Owner, windows: &Windows) {
    for (meter, window) in windows.iter() {
        let window_label = window_label(window.window);
        let token_labels = |namespace: &str, name: &str| BudgetLabels {
            token_namespace: Name(Arc::from(namespace)),
            token_name: Name(Arc::from(name)),
            window: window_label,
        };
        let project_labels = |name: &str| ProjectBudgetLabels { project: Name(Arc::from(name)), window: window_label };
        let (remaining, dollars) = (window.remaining_tokens, window.remaining_tokens as f64 / 1e6);
        match (owner, meter) {
            (Owner::Token { namespace, name }, Meter::Tokens(_)) => {
                metrics.token_budget_remaining.get_or_create(&token_labels(namespace, name)).set(remaining);
            }
            (Owner::Token { namespace, name }, Meter::Usd(_)) => {
                metrics.token_cost_remaining.get_or_create(&token_labels(namespace, name)).set(dollars);
            }
            (Owner::Project { name }, Meter::Tokens(_)) => {
                metrics.project_budget_remaining.get_or_create(&project_labels(name)).set(remaining);
            }
            (Owner::Project { name }, Meter::Usd(_)) => {
                metrics.project_cost_remaining.get_or_create(&project_labels(name)).set(dollars);
            }
        }
    }
}

fn window_label(kind: TokenWindowKind) -> &'static str {
    // One list of the labels: `Metrics::forget_token` removes a series of each.
    let [minute, day, month, lifetime] = BUDGET_WINDOWS;
    match kind {
        TokenWindowKind::Minute => minute,
        TokenWindowKind::Day => day,
        TokenWindowKind::Month => month,
        TokenWindowKind::Lifetime => lifetime,
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

/// How long a token (or Project) may go without a request on a replica before the
/// replica gives its unused shares back, for the replicas that still serve it.
const IDLE_RELEASE_US: i64 = 10_000_000;

/// How long a replica refuses a spent window before asking the API server again (a
/// share given back or a raised limit may have made room).
const SPENT_RECHECK_US: i64 = 10_000_000;

/// A Project's LLM-token windows on this replica: the limits all its tokens share.
struct ProjectCounter {
    name: String,
    /// This replica's share of the current minute's requests (`requestsPerMinute`).
    window: tokio::sync::Mutex<Window>,
    tokens: Arc<TokenShares>,
    /// A flush that failed without saying whether it was written: retried as it is.
    in_doubt: std::sync::Mutex<Option<WindowFlush>>,
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
    /// Projects with token limits, by `metadata.uid`.
    projects: RwLock<HashMap<Arc<str>, Arc<ProjectCounter>>>,
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
            projects: RwLock::default(),
            flushing: tokio::sync::Mutex::default(),
            replica,
            sequence: AtomicI64::new(0),
        }
    }

    /// Admits one request with `route`'s token: always for unlimited tokens, from the
    /// replica's blocks (claiming new ones when empty) for rate-limited and capped ones.
    /// With token limits or cost budgets, the reservation to settle with the response's
    /// usage, priced at `price` (that of the request's model); and the [`Answering`] to
    /// hold until the answer ends.
    pub(crate) async fn admit(
        &self,
        hash: TokenHash,
        route: &Route,
        now_us: i64,
        price: Option<Price>,
    ) -> Result<(Option<Reservation>, Answering), Refused> {
        let counter = self.counter(hash, route);
        // Token windows first, the token's then its Project's: a refusal there spends no
        // request slot. A refusal after them drops the reservation, which gives it back.
        let mut reservation = Reservation::default();
        reservation.price_at(price);
        if !route.token.window_limits.is_empty() {
            let owner = Owner::Token { namespace: counter.namespace.clone(), name: counter.name.clone() };
            let (shares, limits) = (&counter.tokens, &route.token.window_limits);
            self.reserve_tokens(&owner, shares, limits, now_us, Whose::Token, &mut reservation).await?;
        }
        let project = route.project.has_limits().then(|| self.project_counter(&route.project.uid, &route.project.name));
        if let Some(project) = project.as_ref().filter(|_| !route.project.window_limits.is_empty()) {
            let owner = Owner::Project { name: project.name.clone() };
            let (shares, limits) = (&project.tokens, &route.project.window_limits);
            self.reserve_tokens(&owner, shares, limits, now_us, Whose::Project, &mut reservation).await?;
        }
        let reservation = (!reservation.is_empty()).then_some(reservation);
        // The minutes next, the token's then its Project's: a refusal there spends none
        // of the lifetime cap.
        if let Some(limit) = route.token.requests_per_minute {
            let owner = Owner::Token { namespace: counter.namespace.clone(), name: counter.name.clone() };
            self.admit_minute(&owner, &counter.window, limit, now_us, Whose::Token).await?;
        }
        if let (Some(limit), Some(project)) = (route.project.requests_per_minute, &project) {
            let owner = Owner::Project { name: project.name.clone() };
            self.admit_minute(&owner, &project.window, limit, now_us, Whose::Project).await?;
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
        Ok((reservation, Answering::new(counter)))
    }

    /// Admits one request into `owner`'s share of the minute holding `now_us` (`window`),
    /// claiming a block of the minute's `limit` when the share is empty.
    async fn admit_minute(
        &self,
        owner: &Owner,
        window: &tokio::sync::Mutex<Window>,
        limit: u64,
        now_us: i64,
        whose: Whose,
    ) -> Result<(), Refused> {
        let minute = now_us - now_us.rem_euclid(MINUTE_US);
        let mut window = window.lock().await;
        if window.start_us != minute {
            *window = Window { start_us: minute, left: 0, full: false };
        }
        let retry_in = ((minute + MINUTE_US - now_us) as u64).div_ceil(1_000_000);
        if window.full {
            return Err(Refused::rate_limited(whose, limit, retry_in));
        }
        if window.left == 0 {
            let claimed = self.claim_minute(owner, limit, minute).await;
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
                    return Err(Refused::rate_limited(whose, limit, retry_in));
                }
                Err(WindowClaim::Unavailable) => return Err(ProxyError::QuotaUnavailable.into()),
            };
        }
        window.left -= 1;
        Ok(())
    }

    /// Reserves this request's estimate in every limited window of `owner` (into
    /// `reservation`, priced at its price), claiming shares where this replica's are short.
    async fn reserve_tokens(
        &self,
        owner: &Owner,
        shares: &Arc<TokenShares>,
        limits: &WindowLimits,
        now_us: i64,
        whose: Whose,
        reservation: &mut Reservation,
    ) -> Result<(), Refused> {
        let spent = |meter, limit, start_us| Refused::budget_spent(whose, meter, limit, start_us, now_us);
        for (meter, limit) in limits.iter() {
            let (kind, estimate) = (meter.kind(), shares.estimate(meter, limit, reservation.price()));
            let mut claimed_once = false;
            loop {
                let start_us = match shares.reserve(meter, windows::start(kind, now_us), estimate, limit, now_us) {
                    Reserve::Taken { start_us } => {
                        reservation.add(shares, meter, start_us, estimate, limit);
                        break;
                    }
                    Reserve::Spent { start_us } => return Err(spent(meter, limit, start_us)),
                    Reserve::Held { .. } => return Err(Refused::budget_held(whose, meter, limit)),
                    Reserve::Short { start_us, .. } => start_us,
                };
                let _one_claim_at_a_time = shares.claiming.lock().await;
                // Another request may have claimed while this one waited.
                let need = match shares.reserve(meter, start_us, estimate, limit, now_us) {
                    Reserve::Taken { start_us } => {
                        reservation.add(shares, meter, start_us, estimate, limit);
                        break;
                    }
                    Reserve::Spent { start_us } => return Err(spent(meter, limit, start_us)),
                    Reserve::Held { .. } => return Err(Refused::budget_held(whose, meter, limit)),
                    Reserve::Short { need, .. } if claimed_once => need.max(estimate),
                    Reserve::Short { need, .. } => need,
                };
                claimed_once = true;
                let claimed = self.claim_tokens(owner, shares, meter, limit, start_us, need).await;
                let result = match (&claimed, meter.is_cost()) {
                    (TokenClaim::Granted { .. }, false) => "tokens_claimed",
                    (TokenClaim::Spent { .. }, false) => "tokens_spent",
                    (TokenClaim::Held, false) => "tokens_held",
                    (TokenClaim::Unavailable, false) => "tokens_failed",
                    (TokenClaim::Granted { .. }, true) => "cost_claimed",
                    (TokenClaim::Spent { .. }, true) => "cost_spent",
                    (TokenClaim::Held, true) => "cost_held",
                    (TokenClaim::Unavailable, true) => "cost_failed",
                };
                self.metrics.quota_claims.get_or_create(&ResultLabels { result }).inc();
                if claimed == TokenClaim::Unavailable {
                    return Err(ProxyError::QuotaUnavailable.into());
                }
            }
        }
        Ok(())
    }

    /// The counter of the Project object `uid` (a Project deleted and created again
    /// under its name is another object, with windows of its own).
    fn project_counter(&self, uid: &Arc<str>, name: &str) -> Arc<ProjectCounter> {
        if let Some(project) = self.projects.read().expect("usage map poisoned").get(uid) {
            return project.clone();
        }
        let mut projects = self.projects.write().expect("usage map poisoned");
        let new = || {
            Arc::new(ProjectCounter {
                name: name.to_string(),
                window: tokio::sync::Mutex::default(),
                tokens: Arc::default(),
                in_doubt: std::sync::Mutex::new(None),
            })
        };
        projects.entry(uid.clone()).or_insert_with(new).clone()
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
                    project: route.token.project.clone(),
                    unflushed: AtomicU64::new(0),
                    last_used_us: AtomicI64::new(0),
                    block: tokio::sync::Mutex::new(0),
                    window: tokio::sync::Mutex::default(),
                    tokens: Arc::default(),
                    in_doubt: std::sync::Mutex::new(None),
                    answering: AtomicU64::new(0),
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
    async fn claim_minute(&self, owner: &Owner, limit: u64, minute_us: i64) -> Result<i64, WindowClaim> {
        let (client, owner) = (self.client.clone(), owner.clone());
        self.runtime
            .spawn(async move { budget_claims::claim_minute(client, &owner, limit, minute_us).await })
            .await
            .unwrap_or(Err(WindowClaim::Unavailable))
    }

    /// Claims a share of `need` tokens (or micro-dollars) or more of `owner`'s `meter` window starting at
    /// `start_us` and adds it to `shares` (on the main runtime, as [`Quota::claim`]:
    /// a share written is a share used, even if the request waiting for it goes away).
    /// Publishes the Event when this claim finds the window spent first.
    async fn claim_tokens(
        &self,
        owner: &Owner,
        shares: &Arc<TokenShares>,
        meter: Meter,
        limit: u64,
        start_us: i64,
        need: i64,
    ) -> TokenClaim {
        let (client, owner, shares) = (self.client.clone(), owner.clone(), shares.clone());
        let (recorder, metrics) = (self.recorder.clone(), self.metrics.clone());
        self.runtime
            .spawn(async move {
                let (claimed, stored) = budget_claims::claim(client, &owner, meter, limit, start_us, need).await;
                match claimed {
                    TokenClaim::Granted { tokens, last } => shares.grant(meter, start_us, tokens, last),
                    TokenClaim::Spent { .. } => {
                        let until_us = jiff::Timestamp::now().as_microsecond() + SPENT_RECHECK_US;
                        shares.mark_spent(meter, start_us, until_us);
                    }
                    // Asked again after a second, not on every request meanwhile.
                    TokenClaim::Held => {
                        let until_us = jiff::Timestamp::now().as_microsecond() + 1_000_000;
                        shares.mark_held(meter, start_us, until_us);
                    }
                    TokenClaim::Unavailable => {}
                }
                if let Some(stored) = stored {
                    report_remaining(&metrics, &owner, &stored.windows);
                    if claimed == (TokenClaim::Spent { first: true }) {
                        // Not awaited: the requests queued behind this claim need not wait.
                        tokio::spawn(async move {
                            budget_claims::publish_spent(&recorder, &stored.object, meter, limit).await;
                        });
                    }
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
                Ok(windows) => {
                    let owner = Owner::Token { namespace: counter.namespace.clone(), name: counter.name.clone() };
                    report_remaining(&self.metrics, &owner, &windows);
                    self.release_held(&owner, &counter.tokens, &windows).await;
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    // Deleted: its last counts have nowhere to go. Retrying would fail
                    // on every flush from now on, and a new token of the same name must
                    // not inherit them.
                    tracing::info!(namespace = %counter.namespace, name = %counter.name, requests = flush.delta, "the ProxyToken is gone; its last usage is not recorded");
                }
                Err(error) => {
                    // Written or not, nobody can tell yet: the retry finds out.
                    *counter.in_doubt.lock().expect("flush state poisoned") = Some(flush);
                    tracing::warn!(%error, namespace = %counter.namespace, name = %counter.name, "writing usage failed; will retry");
                }
            }
        }
        let projects: Vec<Arc<ProjectCounter>> =
            self.projects.read().expect("usage map poisoned").values().cloned().collect();
        for project in projects {
            let in_doubt = project.in_doubt.lock().expect("flush state poisoned").take();
            let flush = match in_doubt {
                Some(flush) => flush,
                None => match project.tokens.take_pending() {
                    tokens if tokens.is_empty() => continue,
                    tokens => WindowFlush { sequence: self.sequence.fetch_add(1, Ordering::Relaxed) + 1, tokens },
                },
            };
            match budget_claims::flush_project(client.clone(), &project.name, &self.replica, &flush).await {
                Ok(windows) => {
                    let owner = Owner::Project { name: project.name.clone() };
                    report_remaining(&self.metrics, &owner, &windows);
                    self.release_held(&owner, &project.tokens, &windows).await;
                }
                Err(error) => {
                    *project.in_doubt.lock().expect("flush state poisoned") = Some(flush);
                    tracing::warn!(%error, project = %project.name, "writing usage failed; will retry");
                }
            }
        }
    }

    /// Forgets the tokens that left the routing table (their ProxyToken was deleted)
    /// once nothing of theirs is left to write or being answered: their counters and
    /// their metric series. Without it both grew with every token this replica ever
    /// served, and every flush walked them all.
    pub(crate) fn forget_gone(&self, table: &RouteTable) {
        if !table.ready {
            return;
        }
        let done = |counter: &Counter| {
            counter.answering.load(Ordering::Acquire) == 0
                && counter.unflushed.load(Ordering::Relaxed) == 0
                && counter.in_doubt.lock().expect("flush state poisoned").is_none()
        };
        // Found under the read lock, which requests share: at 100,000 counters the walk
        // takes milliseconds, and the write lock would hold every request up meanwhile.
        let gone: Vec<TokenHash> = {
            let counters = self.counters.read().expect("usage map poisoned");
            counters.iter().filter(|(hash, counter)| !table.has_token(hash) && done(counter)).map(|(h, _)| *h).collect()
        };
        if gone.is_empty() {
            return;
        }
        let mut counters = self.counters.write().expect("usage map poisoned");
        // Checked again: a request still in flight may have counted since.
        let mut forgotten: Vec<Arc<Counter>> = Vec::new();
        for hash in gone {
            if counters.get(&hash).is_some_and(|counter| done(counter)) {
                forgotten.extend(counters.remove(&hash));
            }
        }
        drop(counters);
        // A token minted again under a new hash is the same object: its series stay.
        let counters = self.counters.read().expect("usage map poisoned");
        let live: HashSet<(&str, &str)> = counters.values().map(|c| (c.namespace.as_str(), c.name.as_str())).collect();
        for counter in forgotten.iter().filter(|c| !live.contains(&(c.namespace.as_str(), c.name.as_str()))) {
            let (namespace, name) = (Arc::from(counter.namespace.as_str()), Arc::from(counter.name.as_str()));
            self.metrics.forget_token(&counter.project, &namespace, &name);
        }
    }

    /// Gives back the shares of tokens and Projects this replica has not served for
    /// [`IDLE_RELEASE_US`]: without it, a replica that stopped getting a token's
    /// requests would keep part of its windows from the replicas that still do.
    async fn release_idle(&self) {
        let idle_since = jiff::Timestamp::now().as_microsecond() - IDLE_RELEASE_US;
        let mut idle: Vec<(Owner, Vec<Unused>)> = Vec::new();
        for counter in self.counters.read().expect("usage map poisoned").values() {
            let owner = || Owner::Token { namespace: counter.namespace.clone(), name: counter.name.clone() };
            match counter.tokens.take_idle_since(idle_since) {
                unused if unused.is_empty() => {}
                unused => idle.push((owner(), unused)),
            }
        }
        for project in self.projects.read().expect("usage map poisoned").values() {
            match project.tokens.take_idle_since(idle_since) {
                unused if unused.is_empty() => {}
                unused => idle.push((Owner::Project { name: project.name.clone() }, unused)),
            }
        }
        self.give_back_shares(idle).await;
    }

    /// Gives each owner's unused shares back.
    async fn give_back_shares(&self, unused: Vec<(Owner, Vec<Unused>)>) {
        for (owner, shares) in unused {
            for (meter, start_us, amount) in shares {
                if let Err(error) = budget_claims::give_back(self.client.clone(), &owner, meter, start_us, amount).await
                {
                    tracing::warn!(%error, ?owner, "giving an unused share back failed");
                }
            }
        }
    }

    /// Gives back this replica's idle share of every window in `windows` that is held:
    /// other replicas are refusing for want of it.
    async fn release_held(&self, owner: &Owner, shares: &TokenShares, windows: &Windows) {
        for (meter, window) in windows.iter().filter(|(_, w)| w.held_since.is_some()) {
            let start_us = window.start.0.as_microsecond();
            let idle = shares.take_idle(meter, start_us);
            if idle > 0 {
                let given = budget_claims::give_back(self.client.clone(), owner, meter, start_us, idle).await;
                if let Err(error) = given {
                    tracing::warn!(%error, ?owner, "giving an idle share back failed");
                }
            }
        }
    }

    /// Flushes, then gives unused blocks and shares back so other replicas can spend
    /// them.
    pub(crate) async fn shutdown(&self) {
        self.flush().await;
        let client = &self.client;
        let counters: Vec<Arc<Counter>> = self.counters.read().expect("usage map poisoned").values().cloned().collect();
        let mut unused_shares = Vec::new();
        for counter in counters {
            let mut block = counter.block.lock().await;
            if *block > 0 && give_back(client, &counter, *block).await.is_ok() {
                *block = 0;
            }
            let owner = Owner::Token { namespace: counter.namespace.clone(), name: counter.name.clone() };
            unused_shares.push((owner, counter.tokens.take_unused()));
        }
        let projects: Vec<Arc<ProjectCounter>> =
            self.projects.read().expect("usage map poisoned").values().cloned().collect();
        for project in projects {
            unused_shares.push((Owner::Project { name: project.name.clone() }, project.tokens.take_unused()));
        }
        self.give_back_shares(unused_shares).await;
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

/// Runs `attempt`, a read-modify-write with a resourceVersion precondition, again while
/// the API server refuses it with 409 Conflict (another replica wrote in between), at
/// most [`MAX_ATTEMPTS`] times in all; then that conflict is the error.
pub(super) async fn retry_on_conflict<T, F, Fut>(mut attempt: F) -> Result<T, kube::Error>
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

pub(super) fn params() -> PatchParams {
    PatchParams { field_manager: Some(PROXY_MANAGER.to_string()), ..Default::default() }
}

/// Block size for a cap of `max`: small enough that one replica cannot starve the
/// others of a small budget, large enough that big budgets cost few writes.
pub(crate) fn block_size(max: i64) -> i64 {
    (max / 16).clamp(1, 1000)
}

/// Writes `flush` into `requestCount`, `tokenWindows` and `costWindows` unless `status.usageFlushes`
/// shows it already was (its answer was lost), recording it there in the same write.
/// Returns the token windows as written.
async fn add_usage(
    client: &Client,
    counter: &Counter,
    replica: &str,
    flush: &Flush,
    last_used_us: i64,
) -> Result<Windows, kube::Error> {
    let api = Api::<ProxyToken>::namespaced(client.clone(), &counter.namespace);
    let last_used = jiff::Timestamp::from_microsecond(last_used_us).map(crate::api::micros).ok();
    retry_on_conflict(|| async {
        let token = api.get_status(&counter.name).await?;
        let status = token.status.clone().unwrap_or_default();
        if status.usage_flushes.iter().any(|f| f.replica == replica && f.sequence >= flush.sequence) {
            return Ok(Windows::of(&token));
        }
        let windows = budget_claims::charge(&token, &flush.tokens);
        let newer = match (&status.last_used_at, &last_used) {
            (Some(old), Some(new)) => new.0 > old.0,
            _ => true,
        };
        let flushes = budget_claims::flushes_with(&status.usage_flushes, replica, flush.sequence);
        let mut fields = windows.patch();
        fields["requestCount"] = json!(status.request_count.unwrap_or(0) + flush.delta);
        fields["lastUsedAt"] = json!(if newer { last_used.clone() } else { status.last_used_at.clone() });
        fields["usageFlushes"] = json!(flushes);
        let patch = json!({
            "metadata": { "resourceVersion": token.resource_version() },
            "status": fields,
        });
        api.patch_status(&counter.name, &params(), &Patch::Merge(&patch)).await?;
        Ok(windows)
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

/// Flushes `usage` every `interval` until the process ends, gives idle shares back and
/// forgets the tokens that left `table`.
pub(crate) fn spawn_flusher(quota: Arc<Quota>, table: SharedTable, interval: Duration) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            quota.flush().await;
            quota.release_idle().await;
            quota.forget_gone(&table.load());
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
            project: Arc::from("p"),
            unflushed: AtomicU64::new(0),
            last_used_us: AtomicI64::new(0),
            block: tokio::sync::Mutex::new(6),
            window: tokio::sync::Mutex::default(),
            tokens: Arc::default(),
            in_doubt: std::sync::Mutex::new(None),
            answering: AtomicU64::new(0),
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
                    // A merge patch: null removes the field.
                    for (field, value) in patch["status"].as_object().unwrap() {
                        match value {
                            serde_json::Value::Null => drop(held.as_object_mut().unwrap().remove(field)),
                            value => held[field] = value.clone(),
                        }
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

    /// A client whose API server knows no token any more: every request gets 404.
    fn token_deleted() -> Client {
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<hyper::Request<Body>, hyper::Response<Body>>();
        tokio::spawn(async move {
            while let Some((_, respond)) = handle.next_request().await {
                let body = json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                    "message": "proxytokens.llmproxy.io \"web\" not found",
                });
                let response = hyper::Response::builder().status(404).body(Body::from(body.to_string().into_bytes()));
                respond.send_response(response.unwrap());
            }
        });
        Client::new(service, "apps")
    }

    /// A synced routing table that holds the token `apps/web` under `hash`, or no token.
    fn table(hash: Option<TokenHash>) -> RouteTable {
        use crate::index::{Change, Index};
        use kube::runtime::watcher::Event;
        let mut index = Index::new();
        index.apply(Change::Project(Event::Init));
        index.apply(Change::Project(Event::InitDone));
        index.apply(Change::Secret(Event::Init));
        index.apply(Change::Secret(Event::InitDone));
        index.apply(Change::Namespace(Event::Init));
        index.apply(Change::Namespace(Event::InitDone));
        index.apply(Change::PriceList(Event::Init));
        index.apply(Change::PriceList(Event::InitDone));
        index.apply(Change::Token(Event::Init));
        if let Some(hash) = hash {
            let token = crate::fixtures::token("web", "apps", "p");
            let minted = crate::fixtures::minted(token, &hash.to_string(), jiff::Timestamp::now());
            index.apply(Change::Token(Event::InitApply(minted)));
        }
        index.apply(Change::Token(Event::InitDone));
        let table = index.snapshot();
        assert!(table.ready && table.token_count() == usize::from(hash.is_some()));
        table
    }

    #[tokio::test]
    async fn a_token_that_left_the_table_is_forgotten_with_its_series_once_written() {
        let metrics = Arc::new(Metrics::new());
        let quota = Quota::new(token_deleted(), metrics.clone(), "proxy-a-1f2e3d4c".into());
        let hash = TokenHash([7; 32]);
        let web = Arc::new(counter());
        quota.counters.write().unwrap().insert(hash, web.clone());
        let labels = |name: &str| crate::metrics::TokenUsageLabels {
            project: Name(Arc::from("p")),
            token_namespace: Name(Arc::from("apps")),
            token_name: Name(Arc::from(name)),
            kind: "prompt",
        };
        metrics.upstream_tokens.get_or_create(&labels("web")).inc_by(9);
        metrics.upstream_tokens.get_or_create(&labels("other")).inc_by(9);
        let known = |quota: &Quota| quota.counters.read().unwrap().contains_key(&hash);

        quota.forget_gone(&table(Some(hash)));
        assert!(known(&quota), "still in the table");
        quota.forget_gone(&RouteTable::default());
        assert!(known(&quota), "a table not yet synced knows nothing");
        web.unflushed.store(1, Ordering::SeqCst);
        quota.forget_gone(&table(None));
        assert!(known(&quota), "a count not yet written");
        web.unflushed.store(0, Ordering::SeqCst);
        let streaming = Answering::new(web.clone());
        quota.forget_gone(&table(None));
        assert!(known(&quota), "a stream still being answered reports its usage at its end");
        drop(streaming);
        quota.forget_gone(&table(None));
        assert!(!known(&quota));
        let text = metrics.encode();
        assert!(!text.contains(r#"token_name="web""#) && text.contains(r#"token_name="other""#), "{text}");
    }

    #[tokio::test]
    async fn a_deleted_tokens_last_counts_are_dropped_not_retried_forever() {
        let quota = Quota::new(token_deleted(), Arc::new(Metrics::new()), "proxy-a-1f2e3d4c".into());
        let web = Arc::new(counter());
        quota.counters.write().unwrap().insert(TokenHash([7; 32]), web.clone());
        web.unflushed.store(3, Ordering::SeqCst);
        quota.flush().await;
        // It used to be kept in doubt and tried again on every flush, for ever.
        assert!(web.in_doubt.lock().unwrap().is_none());
        assert_eq!(web.unflushed.load(Ordering::SeqCst), 0);
        quota.forget_gone(&table(None));
        assert!(quota.counters.read().unwrap().is_empty());
    }

    #[test]
    fn blocks_scale_with_the_cap_and_never_exceed_it() {
        assert_eq!(block_size(1), 1);
        assert_eq!(block_size(50), 3);
        assert_eq!(block_size(16_000), 1000);
        assert_eq!(block_size(10_000_000), 1000);
    }
}
