//! The API side of budgets: shares claimed from, and usage written into,
//! `status.tokenWindows` (LLM tokens) and `status.costWindows` (US dollars) of a
//! ProxyToken (its own limits) or of a Project (the limits all its tokens share), and
//! the Event when a window is spent.
//!
//! In: a claim (whose window, how much is needed) or a flush of settled usage. Out: the
//! share granted, or that nothing is left; the windows as stored, for the metrics.
//! Every write is a read-modify-write with a resourceVersion precondition, so the
//! shares of a window never add up to more than its limit, whatever the replicas do.

use std::fmt::Debug;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Patch;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::budget::{Charge, share_size};
use super::quota::{params, retry_on_conflict};
use crate::api::{CostWindow, Limits, Project, ProxyToken, RequestWindow, TokenWindow, TokenWindowKind, UsageFlush};
use crate::pricing::{format_usd, parse_usd};
use crate::windows::{self, Meter};

/// Whose windows: a ProxyToken's own, or a Project's, shared by all its tokens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Owner {
    /// A ProxyToken.
    Token { namespace: String, name: String },
    /// A Project.
    Project { name: String },
}

/// What claiming a share of a window found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum TokenClaim {
    /// A share of `tokens`; `last` when it was all the window had left.
    Granted { tokens: i64, last: bool },
    /// Nothing is left; `first` when this claim marked the window spent.
    Spent { first: bool },
    /// Nothing can be claimed, but less than the limit is used: requests in flight
    /// hold the rest, and their usage decides.
    Held,
    /// The API server could not be written.
    Unavailable,
}

/// A flush of settled usage into an owner's windows, under a sequence number of this
/// process (see `quota` for why flushes are numbered).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct WindowFlush {
    pub(super) sequence: i64,
    pub(super) tokens: Vec<Charge>,
}

/// Why a block of a minute's requests could not be claimed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum WindowClaim {
    /// The minute's requests are all claimed.
    Full,
    /// The API server could not be written.
    Unavailable,
}

/// What the window accounting reads of a ProxyToken or a Project.
pub(super) trait Budgeted:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    /// `spec.limits`.
    fn limits(&self) -> Option<&Limits>;
    /// `status.tokenWindows`.
    fn token_windows(&self) -> &[TokenWindow];
    /// `status.costWindows`.
    fn cost_windows(&self) -> &[CostWindow];
    /// `status.usageFlushes`.
    fn usage_flushes(&self) -> &[UsageFlush];
    /// `status.currentMinute`.
    fn current_minute(&self) -> Option<&RequestWindow>;
}

/// Both kinds keep the fields under the same names.
macro_rules! budgeted {
    ($kind:ty) => {
        impl Budgeted for $kind {
            fn limits(&self) -> Option<&Limits> {
                self.spec.limits.as_ref()
            }
            fn token_windows(&self) -> &[TokenWindow] {
                self.status.as_ref().map_or(&[], |s| &s.token_windows)
            }
            fn cost_windows(&self) -> &[CostWindow] {
                self.status.as_ref().map_or(&[], |s| &s.cost_windows)
            }
            fn usage_flushes(&self) -> &[UsageFlush] {
                self.status.as_ref().map_or(&[], |s| &s.usage_flushes)
            }
            fn current_minute(&self) -> Option<&RequestWindow> {
                self.status.as_ref()?.current_minute.as_ref()
            }
        }
    };
}

budgeted!(ProxyToken);
budgeted!(Project);

/// How long a window whose claims reach its limit, with less of it used, waits for
/// the usage of the requests in flight before it counts as spent: long enough for
/// their answers and the next flushes, short enough that a share a stopped replica
/// never gave back does not keep clients retrying.
const HOLD_GRACE: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);

/// What a claim left behind: the object's reference (for the Event) and its windows
/// as stored (for the metrics).
pub(super) struct Stored {
    pub(super) object: ObjectReference,
    pub(super) windows: Windows,
}

/// An owner's windows of both units in one shape: amounts in LLM tokens
/// (`status.tokenWindows`) or in micro-dollars (`status.costWindows`, whose dollar
/// strings are exact to the micro-dollar).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Windows {
    tokens: Vec<TokenWindow>,
    cost: Vec<TokenWindow>,
}

impl Windows {
    /// `object`'s windows as stored.
    pub(super) fn of<K: Budgeted>(object: &K) -> Self {
        Self { tokens: object.token_windows().to_vec(), cost: object.cost_windows().iter().map(from_cost).collect() }
    }

    fn list_mut(&mut self, meter: Meter) -> &mut Vec<TokenWindow> {
        match meter {
            Meter::Tokens(_) => &mut self.tokens,
            Meter::Usd(_) => &mut self.cost,
        }
    }

    /// The `meter` window, whichever its start.
    fn get(&self, meter: Meter) -> Option<&TokenWindow> {
        let list = if meter.is_cost() { &self.cost } else { &self.tokens };
        list.iter().find(|w| w.window == meter.kind())
    }

    /// Every window with its meter.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Meter, &TokenWindow)> {
        let tokens = self.tokens.iter().map(|w| (Meter::Tokens(w.window), w));
        tokens.chain(self.cost.iter().map(|w| (Meter::Usd(w.window), w)))
    }

    /// The status field holding `meter`'s unit, as a merge patch writes it.
    fn patch_of(&self, meter: Meter) -> serde_json::Value {
        match meter {
            Meter::Tokens(_) => json!({ "tokenWindows": self.tokens }),
            Meter::Usd(_) => json!({ "costWindows": self.cost.iter().map(to_cost).collect::<Vec<_>>() }),
        }
    }

    /// Both fields; an empty one is removed rather than written as `[]`.
    pub(super) fn patch(&self) -> serde_json::Value {
        let list = |empty: bool, value: serde_json::Value| if empty { serde_json::Value::Null } else { value };
        json!({
            "tokenWindows": list(self.tokens.is_empty(), json!(self.tokens)),
            "costWindows": list(self.cost.is_empty(), json!(self.cost.iter().map(to_cost).collect::<Vec<_>>())),
        })
    }
}

/// A stored cost window in micro-dollars (an amount that does not parse counts as 0:
/// the schema lets only well-formed ones in).
fn from_cost(window: &CostWindow) -> TokenWindow {
    let micros = |text: &str| parse_usd(text).unwrap_or(0);
    TokenWindow {
        window: window.window,
        start: window.start.clone(),
        limit: micros(&window.limit_usd),
        used_tokens: micros(&window.used_usd),
        remaining_tokens: micros(&window.remaining_usd),
        claimed_tokens: micros(&window.claimed_usd),
        held_since: window.held_since.clone(),
        spent_at: window.spent_at.clone(),
    }
}

fn to_cost(window: &TokenWindow) -> CostWindow {
    CostWindow {
        window: window.window,
        start: window.start.clone(),
        limit_usd: format_usd(window.limit),
        used_usd: format_usd(window.used_tokens),
        remaining_usd: format_usd(window.remaining_tokens),
        claimed_usd: format_usd(window.claimed_tokens),
        held_since: window.held_since.clone(),
        spent_at: window.spent_at.clone(),
    }
}

/// Claims a share of at least `need` tokens or micro-dollars (a sixteenth of the limit
/// when larger) of `owner`'s `meter` window starting at `start_us`. When nothing is
/// left, the first claim to find it so writes `spentAt`.
pub(super) async fn claim(
    client: Client,
    owner: &Owner,
    meter: Meter,
    limit_hint: u64,
    start_us: i64,
    need: i64,
) -> (TokenClaim, Option<Stored>) {
    match owner {
        Owner::Token { namespace, name } => {
            claim_in(Api::<ProxyToken>::namespaced(client, namespace), name, meter, limit_hint, start_us, need).await
        }
        Owner::Project { name } => claim_in(Api::<Project>::all(client), name, meter, limit_hint, start_us, need).await,
    }
}

async fn claim_in<K: Budgeted>(
    api: Api<K>,
    name: &str,
    meter: Meter,
    limit_hint: u64,
    start_us: i64,
    need: i64,
) -> (TokenClaim, Option<Stored>) {
    let Ok(start) = jiff::Timestamp::from_microsecond(start_us) else { return (TokenClaim::Unavailable, None) };
    let stored = |object: &K| Stored { object: object.object_ref(&()), windows: Windows::of(object) };
    let claimed = retry_on_conflict(|| async {
        let object = api.get_status(name).await?;
        let limit = limit_of(&object, meter).unwrap_or(limit_hint as i64);
        let mut all = Windows::of(&object);
        let windows = all.list_mut(meter);
        let at = windows.iter().position(|w| w.window == meter.kind());
        let mut window = match at.map(|i| &windows[i]) {
            Some(w) if w.start.0.as_microsecond() == start_us => w.clone(),
            // A later window is stored: this request's is over for the cluster (it came
            // slowly, or this replica's clock is behind). Never moved back; the request
            // is asked to retry, and counts in the new window then.
            Some(w) if w.start.0.as_microsecond() > start_us => return Ok((TokenClaim::Held, stored(&object))),
            _ => TokenWindow {
                window: meter.kind(),
                start: Time(start),
                limit,
                used_tokens: 0,
                remaining_tokens: limit,
                claimed_tokens: 0,
                held_since: None,
                spent_at: None,
            },
        };
        window.limit = limit;
        window.remaining_tokens = (limit - window.used_tokens).max(0);
        // Usage beyond a replica's shares (requests in flight when they ran out) is
        // spent too, whether or not that replica ever claims again.
        let left = limit - window.claimed_tokens.max(window.used_tokens);
        let now = jiff::Timestamp::now();
        let held_too_long = window.held_since.as_ref().is_some_and(|since| now.duration_since(since.0) >= HOLD_GRACE);
        let outcome = if left > 0 {
            let tokens = need.max(share_size(limit)).min(left);
            window.claimed_tokens += tokens;
            // Room again (a share given back, a raised limit): neither held nor spent.
            (window.held_since, window.spent_at) = (None, None);
            TokenClaim::Granted { tokens, last: tokens == left }
        } else if window.used_tokens < limit && !held_too_long {
            if window.held_since.is_some() {
                return Ok((TokenClaim::Held, stored(&object)));
            }
            window.held_since = Some(crate::api::micros(now));
            TokenClaim::Held
        } else if window.spent_at.is_none() {
            window.spent_at = Some(crate::api::micros(now));
            TokenClaim::Spent { first: true }
        } else {
            return Ok((TokenClaim::Spent { first: false }, stored(&object)));
        };
        match at {
            Some(i) => windows[i] = window.clone(),
            None => windows.push(window.clone()),
        }
        let patch = json!({
            "metadata": { "resourceVersion": object.resource_version() },
            "status": all.patch_of(meter),
        });
        let patched = api.patch_status(name, &params(), &Patch::Merge(&patch)).await?;
        if Windows::of(&patched).get(meter) != Some(&window) {
            tracing::error!(
                field = meter.field(),
                "a budget window was not stored: update the CRDs (crds/llmproxy.io.yaml)"
            );
            return Ok((TokenClaim::Unavailable, stored(&patched)));
        }
        Ok((outcome, stored(&patched)))
    })
    .await;
    claimed.map_or_else(
        |error| {
            tracing::warn!(%error, name, "claiming a share of a token limit failed");
            (TokenClaim::Unavailable, None)
        },
        |(outcome, stored)| (outcome, Some(stored)),
    )
}

/// Raises `owner`'s claims of the minute starting at `minute_us` by one block, with a
/// resourceVersion precondition; a status still on an earlier minute starts the new
/// one from nothing, and one already on a later minute refuses (minutes never go back).
pub(super) async fn claim_minute(
    client: Client,
    owner: &Owner,
    limit: u64,
    minute_us: i64,
) -> Result<i64, WindowClaim> {
    match owner {
        Owner::Token { namespace, name } => {
            claim_minute_in(Api::<ProxyToken>::namespaced(client, namespace), name, limit, minute_us).await
        }
        Owner::Project { name } => claim_minute_in(Api::<Project>::all(client), name, limit, minute_us).await,
    }
}

async fn claim_minute_in<K: Budgeted>(api: Api<K>, name: &str, limit: u64, minute_us: i64) -> Result<i64, WindowClaim> {
    let start = jiff::Timestamp::from_microsecond(minute_us).map_err(|_| WindowClaim::Unavailable)?;
    let claimed = retry_on_conflict(|| async {
        let object = api.get_status(name).await?;
        let limit = object.limits().and_then(|l| l.requests_per_minute).unwrap_or(limit as i64);
        // A later minute is stored: this request's minute is over for the cluster (a
        // slow request, or this replica's clock behind another's). Never move it back.
        let claimed = match object.current_minute() {
            Some(w) if w.start.0.as_microsecond() > minute_us => return Ok(Err(WindowClaim::Full)),
            Some(w) if w.start.0.as_microsecond() == minute_us => w.claimed_requests,
            _ => 0,
        };
        let remaining = limit - claimed;
        if remaining <= 0 {
            return Ok(Err(WindowClaim::Full));
        }
        let block = super::quota::block_size(limit).min(remaining);
        let window = RequestWindow { start: Time(start), claimed_requests: claimed + block };
        let patch = json!({
            "metadata": { "resourceVersion": object.resource_version() },
            "status": { "currentMinute": window },
        });
        let patched = api.patch_status(name, &params(), &Patch::Merge(&patch)).await?;
        if patched.current_minute() != Some(&window) {
            tracing::error!("status.currentMinute was not stored: update the CRDs (crds/llmproxy.io.yaml)");
            return Ok(Err(WindowClaim::Unavailable));
        }
        Ok(Ok(block))
    })
    .await;
    claimed.unwrap_or_else(|error| {
        tracing::warn!(%error, name, "claiming a minute's requests failed");
        Err(WindowClaim::Unavailable)
    })
}

/// Lowers `owner`'s claims in the `meter` window starting at `start_us` by `unused`
/// tokens (or micro-dollars) of this replica's share (never below what was used), so that other replicas
/// can spend them. A window that has moved on is left as it is.
pub(super) async fn give_back(
    client: Client,
    owner: &Owner,
    meter: Meter,
    start_us: i64,
    unused: i64,
) -> Result<(), kube::Error> {
    match owner {
        Owner::Token { namespace, name } => {
            give_back_in(Api::<ProxyToken>::namespaced(client, namespace), name, meter, start_us, unused).await
        }
        Owner::Project { name } => give_back_in(Api::<Project>::all(client), name, meter, start_us, unused).await,
    }
}

async fn give_back_in<K: Budgeted>(
    api: Api<K>,
    name: &str,
    meter: Meter,
    start_us: i64,
    unused: i64,
) -> Result<(), kube::Error> {
    retry_on_conflict(|| async {
        let object = api.get_status(name).await?;
        let mut all = Windows::of(&object);
        let windows = all.list_mut(meter);
        let at = |w: &&mut TokenWindow| w.window == meter.kind() && w.start.0.as_microsecond() == start_us;
        let Some(window) = windows.iter_mut().find(at) else {
            return Ok(());
        };
        window.claimed_tokens = (window.claimed_tokens - unused).max(window.used_tokens).max(0);
        let patch = json!({
            "metadata": { "resourceVersion": object.resource_version() },
            "status": all.patch_of(meter),
        });
        api.patch_status(name, &params(), &Patch::Merge(&patch)).await.map(drop)
    })
    .await
}

/// Writes `flush` into the Project `name`'s windows unless its `status.usageFlushes`
/// shows it already was (its answer was lost), recording it there in the same write.
/// Returns the windows as written. (A ProxyToken's flush also writes its request
/// count: see `quota`.)
pub(super) async fn flush_project(
    client: Client,
    name: &str,
    replica: &str,
    flush: &WindowFlush,
) -> Result<Windows, kube::Error> {
    let api = Api::<Project>::all(client);
    retry_on_conflict(|| async {
        let project = api.get_status(name).await?;
        if project.usage_flushes().iter().any(|f| f.replica == replica && f.sequence >= flush.sequence) {
            return Ok(Windows::of(&project));
        }
        let windows = charge(&project, &flush.tokens);
        let mut status = windows.patch();
        status["usageFlushes"] = json!(flushes_with(project.usage_flushes(), replica, flush.sequence));
        let patch = json!({
            "metadata": { "resourceVersion": project.resource_version() },
            "status": status,
        });
        api.patch_status(name, &params(), &Patch::Merge(&patch)).await?;
        Ok(windows)
    })
    .await
}

/// `flushes` with this replica's entry replaced by `sequence`, and entries older than a
/// day dropped.
pub(super) fn flushes_with(flushes: &[UsageFlush], replica: &str, sequence: i64) -> Vec<UsageFlush> {
    const FLUSH_RECORD_TTL: jiff::SignedDuration = jiff::SignedDuration::from_hours(24);
    let now = jiff::Timestamp::now();
    let mut kept: Vec<UsageFlush> = flushes
        .iter()
        .filter(|f| f.replica != replica && now.duration_since(f.at.0) < FLUSH_RECORD_TTL)
        .cloned()
        .collect();
    kept.push(UsageFlush { replica: replica.to_string(), sequence, at: crate::api::micros(now) });
    kept
}

/// `object`'s windows with `charges` added to the windows they were made in (usage of
/// a window already replaced by a later one is dropped), and `limit` and what remains
/// as its spec sets them now.
pub(super) fn charge<K: Budgeted>(object: &K, charges: &[Charge]) -> Windows {
    let mut windows = Windows::of(object);
    for charge in charges {
        let (kind, start_us) = (charge.meter.kind(), charge.start_us);
        let list = windows.list_mut(charge.meter);
        if let Some(window) = list.iter_mut().find(|w| w.window == kind && w.start.0.as_microsecond() == start_us) {
            window.used_tokens = window.used_tokens.saturating_add(charge.amount);
        }
    }
    let as_specified = |list: &mut Vec<TokenWindow>, unit: fn(TokenWindowKind) -> Meter| {
        for window in list {
            window.limit = limit_of(object, unit(window.window)).unwrap_or(window.limit);
            window.remaining_tokens = (window.limit - window.used_tokens).max(0);
        }
    };
    as_specified(&mut windows.tokens, Meter::Tokens);
    as_specified(&mut windows.cost, Meter::Usd);
    windows
}

/// The `meter` limit `object`'s spec sets now.
fn limit_of<K: Budgeted>(object: &K, meter: Meter) -> Option<i64> {
    let limits = object.limits()?;
    match meter {
        Meter::Tokens(kind) => limits.token_windows().find(|(k, _)| *k == kind).map(|(_, limit)| limit),
        Meter::Usd(kind) => limits.cost_windows().find(|(k, _)| *k == kind).map(|(_, limit)| limit),
    }
}

/// The Event on the object whose `meter` window is spent: once per window, from the
/// replica whose claim found it so.
pub(super) async fn publish_spent(recorder: &Recorder, object: &ObjectReference, meter: Meter, limit: u64) {
    let whose =
        if object.kind.as_deref() == Some("Project") { "all tokens of this Project together" } else { "this token" };
    let retry = match meter.kind() {
        TokenWindowKind::Lifetime => "for good".to_string(),
        _ => "until the window resets".to_string(),
    };
    let (reason, amount) = match meter {
        Meter::Tokens(_) => ("TokenBudgetSpent", format!("{limit} LLM tokens")),
        Meter::Usd(_) => ("CostBudgetSpent", format!("${}", format_usd(i64::try_from(limit).unwrap_or(i64::MAX)))),
    };
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(format!(
            "limits.{} ({amount} {}, for {whose}) is used up or held by requests in flight; requests are refused {retry}",
            meter.field(),
            windows::per(meter.kind()),
        )),
        action: "RefuseRequests".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, object).await {
        tracing::warn!(%error, "could not publish event");
    }
}
