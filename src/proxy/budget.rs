//! Budgets on one proxy replica — LLM-token limits (`limits.tokensPerMinute`,
//! `tokensPerDay`, `tokensPerMonth`, `lifetimeTokens`) and cost budgets
//! (`costPerMonth`, in micro-dollars): shares of each window, reservations per request,
//! and the usage waiting to be written.
//!
//! In: admissions (a window, its start, the estimate) and the usage the upstream
//! reports at the end of each response. Out: go/no-go per request, the size of the
//! share to claim next, and [`Charge`]s for the next usage flush.
//!
//! Usage is known only after the response, so a request *reserves* an estimate from
//! its replica's share of every window when it is admitted: the most tokens one
//! request of the token has used on this replica (at least 1). The response then
//! settles the reservation with what the upstream reported. A replica claims shares
//! from `status.tokenWindows` (see `quota`) so that their sum never exceeds the limit;
//! a window can be overrun only by requests already in flight when it ran out, by what
//! each used beyond its reservation, plus the last request a replica admits into what
//! is left of its share.

use std::sync::Arc;

use crate::pricing::Price;
use crate::windows::{self, Meter};

/// One window's share on this replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Share {
    /// The window's first instant, Unix microseconds.
    start_us: i64,
    /// Tokens of the claimed share not reserved yet; below 0 when requests used more
    /// than they reserved (claimed back with the next share).
    left: i64,
    /// This replica took the last share of the window: what is left is the last of it.
    full: bool,
    /// Until then (Unix microseconds) the window is spent, as the API server said:
    /// refused without asking again (then asked again: a share given back, or a
    /// raised limit, may have made room).
    spent_until_us: i64,
    /// The limit the share was claimed under: a changed limit may have room again.
    limit: u64,
    /// Until then (Unix microseconds) the rest of the window is held by requests in
    /// flight, as the API server said: refused without asking again.
    held_until_us: i64,
}

/// Usage to add to a window in the next flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Charge {
    /// Which window.
    pub(super) meter: Meter,
    /// Its first instant, Unix microseconds: usage of a window that is over by the time
    /// it is written is dropped (except `Lifetime`, which never ends).
    pub(super) start_us: i64,
    /// Prompt + completion tokens, or micro-dollars.
    pub(super) amount: i64,
}

/// What is left of a share: its window, the window's start, the tokens.
pub(super) type Unused = (Meter, i64, i64);

/// What [`TokenShares::reserve`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reserve {
    /// Reserved in the window starting then.
    Taken { start_us: i64 },
    /// The window is spent on this replica and nothing more can be claimed.
    Spent { start_us: i64 },
    /// Nothing can be claimed while requests in flight hold the rest of the window.
    Held { start_us: i64 },
    /// The share is short by `need` tokens: claim that many (or a whole share).
    Short { start_us: i64, need: i64 },
}

/// One token's shares of its windows on this replica.
#[derive(Default)]
pub(super) struct TokenShares {
    shares: std::sync::Mutex<[Share; windows::SLOTS]>,
    /// Serialises claims: one API round trip per short share, not one per request.
    pub(super) claiming: tokio::sync::Mutex<()>,
    /// Usage of the latest answers (the estimate each request reserves is their most).
    recent: std::sync::Mutex<Recent>,
    /// Usage not yet written.
    pending: std::sync::Mutex<Vec<Charge>>,
    /// The latest reservation, Unix microseconds: shares of a token idle for a while go
    /// back to the other replicas.
    last_reserved_us: std::sync::atomic::AtomicI64,
}

/// How many answers the estimate remembers: enough that a usual request size is
/// known, few enough that one outsized answer stops weighing after a while.
const REMEMBERED: usize = 16;

/// Usage of the latest answers, in a ring: prompt and completion tokens.
#[derive(Default)]
struct Recent {
    usage: [(u64, u64); REMEMBERED],
    next: usize,
    seen: bool,
}

impl TokenShares {
    /// What a request reserves in a `meter` window of `limit`: the most one of the last
    /// 16 answers on this replica used, in tokens, or cost at `price` (that of this
    /// request's model, so a costlier model reserves more); before any answer has
    /// reported usage, a share (a sixteenth of the limit), so that at most sixteen
    /// requests, plus one per replica, are in flight on a token whose requests' size
    /// nobody knows yet.
    pub(super) fn estimate(&self, meter: Meter, limit: u64, price: Option<Price>) -> i64 {
        let recent = self.recent.lock().expect("token usage poisoned");
        let cold = share_size(i64::try_from(limit).unwrap_or(i64::MAX));
        if !recent.seen {
            return cold;
        }
        let answers = recent.usage.iter().copied();
        let most = match (meter, price) {
            (Meter::Tokens(_), _) => answers.map(|(prompt, completion)| (prompt + completion) as i64).max(),
            (Meter::Usd(_), Some(price)) => answers.map(|(prompt, completion)| price.cost(prompt, completion)).max(),
            (Meter::Usd(_), None) => Some(cold),
        };
        most.unwrap_or(1).max(1)
    }

    /// Remembers what one answer used.
    fn learn(&self, prompt: u64, completion: u64) {
        let mut recent = self.recent.lock().expect("token usage poisoned");
        let at = recent.next;
        recent.usage[at] = (prompt, completion);
        recent.next = (at + 1) % REMEMBERED;
        recent.seen = true;
    }

    /// Reserves `estimate` in the `meter` window holding `start_us` (or a later one this
    /// replica already counts in). A share with less than that left is short, unless
    /// it was the window's last or the rest is held: then whatever is left admits one
    /// more request, and after that the API server says whether the rest is spent or
    /// only held by requests in flight.
    pub(super) fn reserve(&self, meter: Meter, start_us: i64, estimate: i64, limit: u64, now_us: i64) -> Reserve {
        self.last_reserved_us.fetch_max(now_us, std::sync::atomic::Ordering::Relaxed);
        let mut shares = self.shares.lock().expect("token shares poisoned");
        let share = roll(&mut shares[windows::index(meter)], start_us);
        if share.limit != limit {
            // Raised (or lowered): the API server decides whether there is room.
            if share.limit != 0 {
                (share.full, share.spent_until_us) = (false, 0);
            }
            share.limit = limit;
        }
        let start_us = share.start_us;
        // The last of a window: nothing more to claim, so what is left admits one more.
        let last = share.full || now_us < share.held_until_us;
        if share.left >= estimate || (last && share.left > 0) {
            share.left -= estimate;
            Reserve::Taken { start_us }
        } else if now_us < share.spent_until_us {
            Reserve::Spent { start_us }
        } else if now_us < share.held_until_us {
            Reserve::Held { start_us }
        } else {
            Reserve::Short { start_us, need: estimate - share.left }
        }
    }

    /// Adds a claimed share of `granted` tokens; `last` when it was all that was left.
    pub(super) fn grant(&self, meter: Meter, start_us: i64, granted: i64, last: bool) {
        let mut shares = self.shares.lock().expect("token shares poisoned");
        let share = roll(&mut shares[windows::index(meter)], start_us);
        if share.start_us == start_us {
            share.left = share.left.saturating_add(granted);
            share.full |= last;
        }
    }

    /// Takes what is left of every share, to give back when the replica stops:
    /// `(window, start, tokens)`.
    pub(super) fn take_unused(&self) -> Vec<Unused> {
        self.take_left(true)
    }

    /// Takes what is left of every share if nothing was reserved since `idle_since_us`:
    /// other replicas may need it more.
    pub(super) fn take_idle_since(&self, idle_since_us: i64) -> Vec<Unused> {
        if self.last_reserved_us.load(std::sync::atomic::Ordering::Relaxed) >= idle_since_us {
            return Vec::new();
        }
        self.take_left(false)
    }

    fn take_left(&self, last: bool) -> Vec<Unused> {
        let mut shares = self.shares.lock().expect("token shares poisoned");
        let mut unused = Vec::new();
        for meter in windows::METERS {
            let share = &mut shares[windows::index(meter)];
            if share.left > 0 {
                unused.push((meter, share.start_us, share.left));
                share.left = 0;
                share.full |= last;
            }
        }
        unused
    }

    /// Marks the rest of the window held by requests in flight until `until_us`.
    pub(super) fn mark_held(&self, meter: Meter, start_us: i64, until_us: i64) {
        let mut shares = self.shares.lock().expect("token shares poisoned");
        let share = roll(&mut shares[windows::index(meter)], start_us);
        if share.start_us == start_us {
            share.held_until_us = until_us;
        }
    }

    /// Marks the window spent until `until_us`, as the API server said.
    pub(super) fn mark_spent(&self, meter: Meter, start_us: i64, until_us: i64) {
        let mut shares = self.shares.lock().expect("token shares poisoned");
        let share = roll(&mut shares[windows::index(meter)], start_us);
        if share.start_us == start_us {
            (share.full, share.spent_until_us) = (true, until_us);
        }
    }

    /// Takes what is left of this replica's share of the `meter` window starting at
    /// `start_us`, to give back while the window is held (other replicas wait for it).
    pub(super) fn take_idle(&self, meter: Meter, start_us: i64) -> i64 {
        let mut shares = self.shares.lock().expect("token shares poisoned");
        let share = &mut shares[windows::index(meter)];
        if share.start_us != start_us || share.left <= 0 {
            return 0;
        }
        std::mem::take(&mut share.left)
    }

    /// Ends one part of a reservation: `used` tokens replace the `estimate` reserved
    /// in the `meter` window starting at `start_us`, and are charged.
    fn settle(&self, meter: Meter, start_us: i64, estimate: i64, used: i64) {
        {
            let mut shares = self.shares.lock().expect("token shares poisoned");
            let share = &mut shares[windows::index(meter)];
            if share.start_us == start_us {
                share.left = share.left.saturating_add(estimate).saturating_sub(used);
            }
        }
        if used > 0 {
            // Merged as they come: a flush in doubt may hold the rest back for a while.
            let mut pending = self.pending.lock().expect("token usage poisoned");
            match pending.iter_mut().find(|c| c.meter == meter && c.start_us == start_us) {
                Some(charge) => charge.amount = charge.amount.saturating_add(used),
                None => pending.push(Charge { meter, start_us, amount: used }),
            }
        }
    }

    /// The usage not yet written, one charge per window.
    pub(super) fn take_pending(&self) -> Vec<Charge> {
        std::mem::take(&mut *self.pending.lock().expect("token usage poisoned"))
    }
}

/// The most tokens one answer is believed to use.
const MAX_USAGE: u64 = 1_000_000_000_000;

/// Share size for a token limit of `limit`: a sixteenth, so a few replicas each hold
/// one and a window costs about sixteen claims.
pub(super) fn share_size(limit: i64) -> i64 {
    (limit / 16).max(1)
}

/// The share of `start_us`'s window: a new window starts with nothing; an earlier one
/// (a request admitted just before another moved on) counts in the later.
fn roll(share: &mut Share, start_us: i64) -> &mut Share {
    if start_us > share.start_us {
        *share = Share { start_us, limit: share.limit, ..Share::default() };
    }
    share
}

/// A request's reservations in the windows of its token and of its Project, settled
/// when its response ends: with the usage it reported; with a whole share when it
/// should have reported usage and did not (a stream without
/// `stream_options.include_usage`), so leaving usage out never pays; with its
/// estimate when it was cut short (the client went away). Dropped before any of that
/// (refused, or an answer that reports no usage), it gives the estimates back.
#[derive(Default)]
pub(crate) struct Reservation {
    parts: Vec<Part>,
    /// The price of the request's model, for cost budgets.
    price: Option<Price>,
    settled: bool,
    charge_cut: bool,
}

/// What an answer used, as the upstream reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Used {
    /// Prompt (input) tokens.
    pub(crate) prompt: u64,
    /// Completion (output) tokens.
    pub(crate) completion: u64,
}

/// Tokens reserved in one window.
struct Part {
    shares: Arc<TokenShares>,
    meter: Meter,
    start_us: i64,
    estimate: i64,
    /// What an answer that should have reported usage and did not is charged: a whole
    /// share.
    unreported: i64,
}

impl Reservation {
    /// Records `estimate` tokens reserved in `shares`' `meter` window of `limit` starting
    /// at `start_us`.
    pub(super) fn add(&mut self, shares: &Arc<TokenShares>, meter: Meter, start_us: i64, estimate: i64, limit: u64) {
        let unreported = share_size(i64::try_from(limit).unwrap_or(i64::MAX)).max(estimate);
        self.parts.push(Part { shares: shares.clone(), meter, start_us, estimate, unreported });
    }

    /// Prices the request's cost budgets at `price` (that of the model it names).
    pub(super) fn price_at(&mut self, price: Option<Price>) {
        self.price = price;
    }

    /// The price of the request's model, where a cost budget needed it.
    pub(super) fn price(&self) -> Option<Price> {
        self.price
    }

    /// Whether nothing is reserved.
    pub(super) fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// From now on, dropped unsettled (the body was cut short) charges the estimates.
    pub(crate) fn charge_if_cut(&mut self) {
        self.charge_cut = true;
    }

    /// Settles an answer that ended without the usage it should have reported.
    pub(crate) fn settle_unreported(mut self) {
        self.settled = true;
        for part in &self.parts {
            part.shares.settle(part.meter, part.start_us, part.estimate, part.unreported);
        }
    }

    /// Settles with the usage the upstream reported: tokens, and their cost at the
    /// price of the request's model (with none known, a cost budget is charged a whole
    /// share, as for an answer that reported nothing).
    pub(crate) fn settle(mut self, used: Used) {
        self.settled = true;
        // No answer is this large; a broken upstream's number must not wrap the sums.
        let (prompt, completion) = (used.prompt.min(MAX_USAGE), used.completion.min(MAX_USAGE));
        let tokens = (prompt + completion) as i64;
        let cost = self.price.map(|price| price.cost(prompt, completion));
        for (i, part) in self.parts.iter().enumerate() {
            let used = match part.meter {
                Meter::Tokens(_) => tokens,
                Meter::Usd(_) => cost.unwrap_or(part.unreported),
            };
            part.shares.settle(part.meter, part.start_us, part.estimate, used);
            // Once per token or Project, however many of its windows the request is in.
            if !self.parts[..i].iter().any(|p| Arc::ptr_eq(&p.shares, &part.shares)) {
                part.shares.learn(prompt, completion);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        for part in &self.parts {
            let used = if self.charge_cut { part.estimate } else { 0 };
            part.shares.settle(part.meter, part.start_us, part.estimate, used);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Meter = Meter::Tokens(crate::api::TokenWindowKind::Day);

    fn tokens(prompt: u64) -> Used {
        Used { prompt, completion: 0 }
    }

    fn reserve_all(shares: &Arc<TokenShares>, estimate: i64) -> Reservation {
        let mut reservation = Reservation::default();
        let Reserve::Taken { start_us } = shares.reserve(DAY, 100, estimate, 800, 0) else { panic!("not taken") };
        reservation.add(shares, DAY, start_us, estimate, 800);
        reservation
    }

    #[test]
    fn a_share_is_reserved_then_settled_with_the_reported_usage() {
        let shares = Arc::new(TokenShares::default());
        assert_eq!(shares.reserve(DAY, 100, 1, 800, 0), Reserve::Short { start_us: 100, need: 1 });
        shares.grant(DAY, 100, 40, false);
        let first = reserve_all(&shares, 1);
        // Before any answer: a sixteenth of the limit.
        assert_eq!(shares.estimate(DAY, 800, None), 50);
        first.settle(tokens(16));
        // Then the most of the latest answers.
        assert_eq!(shares.estimate(DAY, 800, None), 16);
        assert_eq!(shares.shares.lock().unwrap()[1].left, 40 - 16);
        let second = reserve_all(&shares, 16);
        assert_eq!(shares.shares.lock().unwrap()[1].left, 8);
        // 8 left is short of 16: claim what is missing.
        assert_eq!(shares.reserve(DAY, 100, 16, 800, 0), Reserve::Short { start_us: 100, need: 8 });
        drop(second);
        assert_eq!(shares.shares.lock().unwrap()[1].left, 24, "an unsettled reservation goes back");
        assert_eq!(shares.take_pending(), [Charge { meter: DAY, start_us: 100, amount: 16 }]);
        assert!(shares.take_pending().is_empty());
    }

    #[test]
    fn a_spent_window_admits_one_last_request_into_what_is_left_then_refuses() {
        let shares = Arc::new(TokenShares::default());
        shares.grant(DAY, 100, 5, true);
        let last = reserve_all(&shares, 16);
        // The API server decides whether the rest is spent or held by requests in flight.
        assert_eq!(shares.reserve(DAY, 100, 16, 800, 0), Reserve::Short { start_us: 100, need: 27 });
        shares.mark_held(DAY, 100, 10);
        assert_eq!(shares.reserve(DAY, 100, 16, 800, 9), Reserve::Held { start_us: 100 });
        shares.mark_spent(DAY, 100, 20);
        assert_eq!(shares.reserve(DAY, 100, 16, 800, 11), Reserve::Spent { start_us: 100 });
        // Asked again later: a share given back may have made room.
        assert_eq!(shares.reserve(DAY, 100, 16, 800, 21), Reserve::Short { start_us: 100, need: 27 });
        last.settle(tokens(16));
        assert_eq!(shares.shares.lock().unwrap()[1].left, -11, "overrun by what the share lacked");
        // A new window starts from nothing.
        assert_eq!(shares.reserve(DAY, 200, 16, 800, 0), Reserve::Short { start_us: 200, need: 16 });
    }

    #[test]
    fn an_answer_without_usage_is_charged_a_whole_share_and_a_cut_one_its_estimate() {
        let shares = Arc::new(TokenShares::default());
        shares.grant(DAY, 100, 100, false);
        reserve_all(&shares, 1).settle(tokens(30));
        let mut stream = reserve_all(&shares, 30);
        stream.charge_if_cut();
        stream.settle_unreported();
        // 800 / 16: leaving usage out never costs less than reporting it.
        assert_eq!(shares.take_pending(), [Charge { meter: DAY, start_us: 100, amount: 30 + 50 }]);
        assert_eq!(shares.shares.lock().unwrap()[1].left, 100 - 30 - 50);
        // A body cut short (the client went away) is charged what it reserved.
        shares.grant(DAY, 100, 100, false);
        let mut cut = reserve_all(&shares, 30);
        cut.charge_if_cut();
        drop(cut);
        assert_eq!(shares.take_pending(), [Charge { meter: DAY, start_us: 100, amount: 30 }]);
    }

    #[test]
    fn one_outsized_answer_weighs_for_sixteen_answers_and_a_raised_limit_reopens_a_spent_share() {
        let shares = Arc::new(TokenShares::default());
        shares.grant(DAY, 100, 5000, false);
        reserve_all(&shares, 1).settle(tokens(5000));
        assert_eq!(shares.estimate(DAY, 800, None), 5000);
        for _ in 0..15 {
            shares.learn(10, 0);
        }
        assert_eq!(shares.estimate(DAY, 800, None), 5000);
        shares.learn(10, 0);
        assert_eq!(shares.estimate(DAY, 800, None), 10, "forgotten after sixteen more");
        shares.mark_spent(DAY, 100, 10);
        assert_eq!(shares.reserve(DAY, 100, 50, 800, 0), Reserve::Spent { start_us: 100 });
        assert_eq!(shares.reserve(DAY, 100, 50, 8000, 0), Reserve::Short { start_us: 100, need: 50 });
    }

    #[test]
    fn unused_shares_are_taken_to_be_given_back() {
        let shares = Arc::new(TokenShares::default());
        shares.grant(DAY, 100, 40, false);
        let _in_flight = reserve_all(&shares, 16);
        assert!(shares.take_idle_since(0).is_empty(), "reserved at 0: not idle since then");
        assert_eq!(shares.take_idle_since(1), [(DAY, 100, 24)]);
        assert!(shares.take_unused().is_empty());
    }

    #[test]
    fn usage_of_a_window_that_moved_on_is_charged_to_it_not_to_the_new_one() {
        let shares = Arc::new(TokenShares::default());
        shares.grant(DAY, 100, 50, false);
        let slow = reserve_all(&shares, 1);
        shares.grant(DAY, 200, 50, false);
        slow.settle(tokens(20));
        assert_eq!(shares.shares.lock().unwrap()[1], Share { start_us: 200, left: 50, limit: 800, ..Share::default() });
        assert_eq!(shares.take_pending(), [Charge { meter: DAY, start_us: 100, amount: 20 }]);
        // An admission computed before the move counts in the later window.
        assert_eq!(shares.reserve(DAY, 100, 1, 800, 0), Reserve::Taken { start_us: 200 });
    }

    #[test]
    fn a_cost_budget_is_charged_the_answer_at_its_model_s_price() {
        const COST: Meter = Meter::Usd(crate::api::TokenWindowKind::Month);
        let shares = Arc::new(TokenShares::default());
        shares.grant(DAY, 100, 1000, false);
        shares.grant(COST, 100, 1_000_000, false);
        let mut reservation = reserve_all(&shares, 1);
        let Reserve::Taken { start_us } = shares.reserve(COST, 100, 10, 16_000_000, 0) else { panic!("not taken") };
        reservation.add(&shares, COST, start_us, 10, 16_000_000);
        reservation.price_at(Some(Price { input: 2_500_000, output: 10_000_000 }));
        reservation.settle(Used { prompt: 1000, completion: 500 });
        let mut pending = shares.take_pending();
        pending.sort_by_key(|c| c.meter);
        // 1,000 × $2.50 + 500 × $10.00 per million: $0.0075.
        assert_eq!(
            pending,
            [Charge { meter: DAY, start_us: 100, amount: 1500 }, Charge { meter: COST, start_us: 100, amount: 7500 }]
        );
        // The next request reserves what the largest answer would cost at its own price:
        // a model ten times dearer reserves ten times more.
        let price = Price { input: 2_500_000, output: 10_000_000 };
        assert_eq!(shares.estimate(DAY, 800, None), 1500);
        assert_eq!(shares.estimate(COST, 16_000_000, Some(price)), 7500);
        let dearer = Price { input: 25_000_000, output: 100_000_000 };
        assert_eq!(shares.estimate(COST, 16_000_000, Some(dearer)), 75_000);
        // No price known: the cost budget is charged a whole share (a sixteenth).
        let mut unpriced = Reservation::default();
        let Reserve::Taken { start_us } = shares.reserve(COST, 100, 10, 16_000_000, 0) else { panic!("not taken") };
        unpriced.add(&shares, COST, start_us, 10, 16_000_000);
        unpriced.settle(tokens(3));
        assert_eq!(shares.take_pending(), [Charge { meter: COST, start_us: 100, amount: 1_000_000 }]);
    }
}
