//! Windows of budgets the proxies account across replicas: LLM-token limits
//! (`spec.limits.tokensPer*`, `lifetimeTokens`) and cost budgets (`costPerMonth`):
//! which window an instant falls in and when it ends. Calendar windows are UTC. Plain
//! data: the routing table holds [`WindowLimits`], the proxy's accounting asks the rest.

use crate::api::{Limits, TokenWindowKind};

const MINUTE_US: i64 = 60_000_000;
const DAY_US: i64 = 86_400_000_000;

/// What a budget counts, and in which window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Meter {
    /// LLM tokens (prompt + completion).
    Tokens(TokenWindowKind),
    /// Micro-dollars, at the prices of the Project's PriceList.
    Usd(TokenWindowKind),
}

impl Meter {
    /// The window it counts in.
    pub fn kind(self) -> TokenWindowKind {
        match self {
            Self::Tokens(kind) | Self::Usd(kind) => kind,
        }
    }

    /// Whether it counts dollars.
    pub fn is_cost(self) -> bool {
        matches!(self, Self::Usd(_))
    }

    /// The `spec.limits` field that sets it.
    pub fn field(self) -> &'static str {
        match self {
            Self::Tokens(kind) => kind.field(),
            Self::Usd(_) => "costPerMonth",
        }
    }
}

/// Every budget the proxies account, in the order limits are checked: the shortest
/// window first, so that a refusal for a window that reopens soon is preferred to one
/// for a spent budget.
pub(crate) const METERS: [Meter; 5] = [
    Meter::Tokens(TokenWindowKind::Minute),
    Meter::Tokens(TokenWindowKind::Day),
    Meter::Tokens(TokenWindowKind::Month),
    Meter::Tokens(TokenWindowKind::Lifetime),
    Meter::Usd(TokenWindowKind::Month),
];

/// Slots of per-meter arrays: four windows for each of the two units.
pub(crate) const SLOTS: usize = 8;

/// The budgets of one ProxyToken or Project, by meter: tokens, or micro-dollars.
///
/// One pointer, null when no budget applies (most tokens): every token's route holds
/// one, and the eight slots inline made a route 128 bytes larger, a third of the
/// memory of 100,000 tokens and more cache lines per lookup (BENCHMARKS.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowLimits(Option<std::sync::Arc<[Option<u64>; SLOTS]>>);

impl WindowLimits {
    /// The limits `spec.limits` sets.
    pub fn of(limits: Option<&Limits>) -> Self {
        let mut by_meter = [None; SLOTS];
        if let Some(limits) = limits {
            for (kind, limit) in limits.token_windows() {
                by_meter[index(Meter::Tokens(kind))] = Some(limit.max(1) as u64);
            }
            for (kind, limit) in limits.cost_windows() {
                by_meter[index(Meter::Usd(kind))] = Some(limit.max(1) as u64);
            }
        }
        Self(by_meter.iter().any(Option::is_some).then(|| std::sync::Arc::new(by_meter)))
    }

    /// Whether any budget applies.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Whether a cost budget applies.
    pub fn has_cost(&self) -> bool {
        self.iter().any(|(meter, _)| meter.is_cost())
    }

    /// The limits that apply, in the order of [`METERS`].
    pub fn iter(&self) -> impl Iterator<Item = (Meter, u64)> + '_ {
        let slots = self.0.as_deref();
        METERS.into_iter().filter_map(move |meter| Some((meter, slots?[index(meter)]?)))
    }
}

/// Position of `meter` in per-meter arrays.
pub(crate) fn index(meter: Meter) -> usize {
    let (unit, kind) = match meter {
        Meter::Tokens(kind) => (0, kind),
        Meter::Usd(kind) => (4, kind),
    };
    unit + match kind {
        TokenWindowKind::Minute => 0,
        TokenWindowKind::Day => 1,
        TokenWindowKind::Month => 2,
        TokenWindowKind::Lifetime => 3,
    }
}

/// The first instant (Unix microseconds) of the `kind` window holding `now_us`; 0 for
/// `Lifetime`, whose one window never ends.
pub(crate) fn start(kind: TokenWindowKind, now_us: i64) -> i64 {
    match kind {
        TokenWindowKind::Minute => now_us - now_us.rem_euclid(MINUTE_US),
        TokenWindowKind::Day => now_us - now_us.rem_euclid(DAY_US),
        TokenWindowKind::Month => {
            let Ok(now) = jiff::Timestamp::from_microsecond(now_us) else { return 0 };
            let date = now.to_zoned(jiff::tz::TimeZone::UTC).date().first_of_month();
            date.to_zoned(jiff::tz::TimeZone::UTC).map_or(0, |z| z.timestamp().as_microsecond())
        }
        TokenWindowKind::Lifetime => 0,
    }
}

/// The first instant after the window starting at `start_us`; `None` for `Lifetime`.
pub(crate) fn end(kind: TokenWindowKind, start_us: i64) -> Option<i64> {
    match kind {
        TokenWindowKind::Minute => Some(start_us + MINUTE_US),
        TokenWindowKind::Day => Some(start_us + DAY_US),
        TokenWindowKind::Month => {
            let start = jiff::Timestamp::from_microsecond(start_us).ok()?.to_zoned(jiff::tz::TimeZone::UTC);
            let next = start.date().first_of_month().checked_add(jiff::Span::new().months(1)).ok()?;
            Some(next.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp().as_microsecond())
        }
        TokenWindowKind::Lifetime => None,
    }
}

/// How the window reads in messages: "per minute", "per day (UTC)", …
pub(crate) fn per(kind: TokenWindowKind) -> &'static str {
    match kind {
        TokenWindowKind::Minute => "per minute",
        TokenWindowKind::Day => "per day (UTC)",
        TokenWindowKind::Month => "per month (UTC)",
        TokenWindowKind::Lifetime => "for its lifetime",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(text: &str) -> i64 {
        text.parse::<jiff::Timestamp>().unwrap().as_microsecond()
    }

    #[test]
    fn calendar_windows_start_and_end_on_utc_boundaries() {
        let now = us("2026-02-28T23:59:59.5Z");
        assert_eq!(start(TokenWindowKind::Minute, now), us("2026-02-28T23:59:00Z"));
        assert_eq!(start(TokenWindowKind::Day, now), us("2026-02-28T00:00:00Z"));
        assert_eq!(start(TokenWindowKind::Month, now), us("2026-02-01T00:00:00Z"));
        assert_eq!(start(TokenWindowKind::Lifetime, now), 0);
        assert_eq!(end(TokenWindowKind::Minute, us("2026-02-28T23:59:00Z")), Some(us("2026-03-01T00:00:00Z")));
        assert_eq!(end(TokenWindowKind::Day, us("2026-02-28T00:00:00Z")), Some(us("2026-03-01T00:00:00Z")));
        // February has 28 days in 2026; December rolls into the next year.
        assert_eq!(end(TokenWindowKind::Month, us("2026-02-01T00:00:00Z")), Some(us("2026-03-01T00:00:00Z")));
        assert_eq!(end(TokenWindowKind::Month, us("2026-12-01T00:00:00Z")), Some(us("2027-01-01T00:00:00Z")));
        assert_eq!(end(TokenWindowKind::Lifetime, 0), None);
        // The first instant of a window is in it.
        assert_eq!(start(TokenWindowKind::Month, us("2026-03-01T00:00:00Z")), us("2026-03-01T00:00:00Z"));
    }

    #[test]
    fn limits_are_listed_shortest_window_first() {
        let limits = Limits { lifetime_tokens: Some(9), tokens_per_minute: Some(3), ..Limits::default() };
        let limits = Limits { cost_per_month: Some("2.50".into()), ..limits };
        let limits = WindowLimits::of(Some(&limits));
        assert_eq!(
            limits.iter().collect::<Vec<_>>(),
            [
                (Meter::Tokens(TokenWindowKind::Minute), 3),
                (Meter::Tokens(TokenWindowKind::Lifetime), 9),
                (Meter::Usd(TokenWindowKind::Month), 2_500_000)
            ]
        );
        assert!(limits.has_cost());
        assert!(WindowLimits::of(None).is_empty());
    }
}
