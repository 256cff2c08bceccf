//! LLM-token limits (`limits.tokensPerMinute`, `tokensPerDay`, `tokensPerMonth`,
//! `lifetimeTokens`) on one proxy replica: shares of each window, reservations per
//! request, and the usage waiting to be written.
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
use std::sync::atomic::{AtomicI64, Ordering};

use crate::api::TokenWindowKind;
use crate::windows;

/// One window's share on this replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Share {
    /// The window's first instant, Unix microseconds.
    start_us: i64,
    /// Tokens of the claimed share not reserved yet; below 0 when requests used more
    /// than they reserved (claimed back with the next share).
    left: i64,
    /// Nothing more can be claimed in this window: what is left is the last of it.
    full: bool,
}

/// Usage to add to a window in the next flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Charge {
    /// Which window.
    pub(super) kind: TokenWindowKind,
    /// Its first instant, Unix microseconds: usage of a window that is over by the time
    /// it is written is dropped (except `Lifetime`, which never ends).
    pub(super) start_us: i64,
    /// Prompt + completion tokens.
    pub(super) tokens: i64,
}

/// What [`TokenShares::reserve`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reserve {
    /// Reserved in the window starting then.
    Taken { start_us: i64 },
    /// The window is spent on this replica and nothing more can be claimed.
    Spent { start_us: i64 },
    /// The share is short by `need` tokens: claim that many (or a whole share).
    Short { start_us: i64, need: i64 },
}

/// One token's shares of its windows on this replica.
#[derive(Default)]
pub(super) struct TokenShares {
    shares: std::sync::Mutex<[Share; 4]>,
    /// Serialises claims: one API round trip per short share, not one per request.
    pub(super) claiming: tokio::sync::Mutex<()>,
    /// The most tokens one request has used (the estimate each request reserves).
    largest: AtomicI64,
    /// Usage not yet written.
    pending: std::sync::Mutex<Vec<Charge>>,
}

impl TokenShares {
    /// Tokens a request reserves in a window of `limit`: the most one request has used
    /// on this replica; before any answer reported usage, a share's worth (a sixteenth
    /// of the limit), so that at most sixteen requests, plus one per replica, are in
    /// flight on a token whose requests' size nobody knows yet.
    pub(super) fn estimate(&self, limit: u64) -> i64 {
        match self.largest.load(Ordering::Relaxed) {
            0 => share_size(i64::try_from(limit).unwrap_or(i64::MAX)),
            largest => largest,
        }
    }

    /// Reserves `estimate` in the `kind` window holding `start_us` (or a later one this
    /// replica already counts in). A share with less than that left is short, unless
    /// nothing more can be claimed: then whatever is left admits one more request.
    pub(super) fn reserve(&self, kind: TokenWindowKind, start_us: i64, estimate: i64) -> Reserve {
        let mut shares = self.shares.lock().expect("token shares poisoned");
        let share = roll(&mut shares[windows::index(kind)], start_us);
        let start_us = share.start_us;
        if share.left >= estimate || (share.full && share.left > 0) {
            share.left -= estimate;
            Reserve::Taken { start_us }
        } else if share.full {
            Reserve::Spent { start_us }
        } else {
            Reserve::Short { start_us, need: estimate - share.left }
        }
    }

    /// Adds a claimed share of `granted` tokens; `last` when it was all that was left.
    pub(super) fn grant(&self, kind: TokenWindowKind, start_us: i64, granted: i64, last: bool) {
        let mut shares = self.shares.lock().expect("token shares poisoned");
        let share = roll(&mut shares[windows::index(kind)], start_us);
        if share.start_us == start_us {
            share.left += granted;
            share.full |= last;
        }
    }

    /// Marks the window spent: nothing more can be claimed in it.
    pub(super) fn mark_spent(&self, kind: TokenWindowKind, start_us: i64) {
        self.grant(kind, start_us, 0, true);
    }

    /// Ends `reservation`'s claim on the shares: `used` tokens, if the upstream said,
    /// replace the estimates and are charged. Without it the estimates go back, or are
    /// charged as they are when the answer should have reported usage.
    fn settle(&self, reservation: &Reservation, used: Option<i64>) {
        let used = match used {
            Some(used) => Some(used),
            None if reservation.charge_unreported => None,
            None => Some(0),
        };
        let mut shares = self.shares.lock().expect("token shares poisoned");
        let mut pending = self.pending.lock().expect("token usage poisoned");
        for &(kind, start_us, estimate) in &reservation.parts {
            let share = &mut shares[windows::index(kind)];
            // Unreported usage is charged as what was reserved.
            let used = used.unwrap_or(estimate);
            if share.start_us == start_us {
                share.left += estimate - used;
            }
            if used > 0 {
                pending.push(Charge { kind, start_us, tokens: used });
            }
        }
        if let Some(used) = used.filter(|_| reservation.settled) {
            self.largest.fetch_max(used, Ordering::Relaxed);
        }
    }

    /// The usage not yet written, merged by window.
    pub(super) fn take_pending(&self) -> Vec<Charge> {
        let charges = std::mem::take(&mut *self.pending.lock().expect("token usage poisoned"));
        let mut merged: Vec<Charge> = Vec::with_capacity(charges.len().min(8));
        for charge in charges {
            match merged.iter_mut().find(|c| c.kind == charge.kind && c.start_us == charge.start_us) {
                Some(c) => c.tokens += charge.tokens,
                None => merged.push(charge),
            }
        }
        merged
    }
}

/// Share size for a token limit of `limit`: a sixteenth, so a few replicas each hold
/// one and a window costs about sixteen claims.
pub(super) fn share_size(limit: i64) -> i64 {
    (limit / 16).max(1)
}

/// The share of `start_us`'s window: a new window starts with nothing; an earlier one
/// (a request admitted just before another moved on) counts in the later.
fn roll(share: &mut Share, start_us: i64) -> &mut Share {
    if start_us > share.start_us {
        *share = Share { start_us, left: 0, full: false };
    }
    share
}

/// A request's reservations in its token's windows, settled when its response ends.
/// Dropped unsettled, it gives the estimate back, or charges it when the response was
/// one that should have reported usage and did not (a stream without
/// `stream_options.include_usage`): such a request is never free.
pub(crate) struct Reservation {
    shares: Arc<TokenShares>,
    /// Window, its start, the tokens reserved in it.
    parts: Vec<(TokenWindowKind, i64, i64)>,
    settled: bool,
    charge_unreported: bool,
}

impl Reservation {
    /// A reservation in no window yet.
    pub(super) fn new(shares: Arc<TokenShares>) -> Self {
        Self { shares, parts: Vec::with_capacity(4), settled: false, charge_unreported: false }
    }

    /// Records `estimate` tokens reserved in the `kind` window starting at `start_us`.
    pub(super) fn add(&mut self, kind: TokenWindowKind, start_us: i64, estimate: i64) {
        self.parts.push((kind, start_us, estimate));
    }

    /// From now on, ending without [`Reservation::settle`] charges the estimate.
    pub(crate) fn charge_if_unreported(&mut self) {
        self.charge_unreported = true;
    }

    /// Settles with the `used` tokens the upstream reported.
    pub(crate) fn settle(mut self, used: u64) {
        self.settled = true;
        self.shares.settle(&self, Some(i64::try_from(used).unwrap_or(i64::MAX)));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.shares.settle(self, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: TokenWindowKind = TokenWindowKind::Day;

    fn reserve_all(shares: &Arc<TokenShares>, estimate: i64) -> Reservation {
        let mut reservation = Reservation::new(shares.clone());
        let Reserve::Taken { start_us } = shares.reserve(DAY, 100, estimate) else { panic!("not taken") };
        reservation.add(DAY, start_us, estimate);
        reservation
    }

    #[test]
    fn a_share_is_reserved_then_settled_with_the_reported_usage() {
        let shares = Arc::new(TokenShares::default());
        assert_eq!(shares.reserve(DAY, 100, 1), Reserve::Short { start_us: 100, need: 1 });
        shares.grant(DAY, 100, 40, false);
        let first = reserve_all(&shares, 1);
        // Before any answer: a sixteenth of the limit.
        assert_eq!(shares.estimate(800), 50);
        first.settle(16);
        // Then the largest request seen.
        assert_eq!(shares.estimate(800), 16);
        assert_eq!(shares.shares.lock().unwrap()[1].left, 40 - 16);
        let second = reserve_all(&shares, 16);
        assert_eq!(shares.shares.lock().unwrap()[1].left, 8);
        // 8 left is short of 16: claim what is missing.
        assert_eq!(shares.reserve(DAY, 100, 16), Reserve::Short { start_us: 100, need: 8 });
        drop(second);
        assert_eq!(shares.shares.lock().unwrap()[1].left, 24, "an unsettled reservation goes back");
        assert_eq!(shares.take_pending(), [Charge { kind: DAY, start_us: 100, tokens: 16 }]);
        assert!(shares.take_pending().is_empty());
    }

    #[test]
    fn a_spent_window_admits_one_last_request_into_what_is_left_then_refuses() {
        let shares = Arc::new(TokenShares::default());
        shares.grant(DAY, 100, 5, true);
        let last = reserve_all(&shares, 16);
        assert_eq!(shares.reserve(DAY, 100, 16), Reserve::Spent { start_us: 100 });
        last.settle(16);
        assert_eq!(shares.shares.lock().unwrap()[1].left, -11, "overrun by what the share lacked");
        // A new window starts from nothing.
        assert_eq!(shares.reserve(DAY, 200, 16), Reserve::Short { start_us: 200, need: 16 });
    }

    #[test]
    fn a_response_that_should_report_usage_and_does_not_is_charged_its_estimate() {
        let shares = Arc::new(TokenShares::default());
        shares.grant(DAY, 100, 100, false);
        reserve_all(&shares, 1).settle(30);
        let mut stream = reserve_all(&shares, 30);
        stream.charge_if_unreported();
        drop(stream);
        assert_eq!(shares.take_pending(), [Charge { kind: DAY, start_us: 100, tokens: 60 }]);
        assert_eq!(shares.shares.lock().unwrap()[1].left, 40);
    }

    #[test]
    fn usage_of_a_window_that_moved_on_is_charged_to_it_not_to_the_new_one() {
        let shares = Arc::new(TokenShares::default());
        shares.grant(DAY, 100, 50, false);
        let slow = reserve_all(&shares, 1);
        shares.grant(DAY, 200, 50, false);
        slow.settle(20);
        assert_eq!(shares.shares.lock().unwrap()[1], Share { start_us: 200, left: 50, full: false });
        assert_eq!(shares.take_pending(), [Charge { kind: DAY, start_us: 100, tokens: 20 }]);
        // An admission computed before the move counts in the later window.
        assert_eq!(shares.reserve(DAY, 100, 1), Reserve::Taken { start_us: 200 });
    }
}
