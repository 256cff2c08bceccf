//! Cost budgets (`spec.limits.costPerMonth`): amounts of US dollars as our specs spell
//! them, the prices of a `PriceList`, and what an answer costs. Plain data: the routing
//! table holds [`Prices`], the proxy asks them.
//!
//! Amounts are whole micro-dollars (millionths of a dollar) inside: exact sums, and
//! six decimal places are what a price list or a budget may state.

use std::collections::HashMap;

use crate::api::PriceListSpec;

/// Micro-dollars in a dollar.
const MICROS: i64 = 1_000_000;

/// `text` ("50", "2.50", "0.075") as micro-dollars; `None` unless it is a decimal with
/// at most six places (the API server has checked that much of specs, which have at most
/// nine whole digits; a status may say more, after an overrun).
pub(crate) fn parse_usd(text: &str) -> Option<i64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| !s.is_empty() && s.len() <= 12 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (text.contains('.') && !digits(fraction)) || fraction.len() > 6 {
        return None;
    }
    let fraction = format!("{fraction:0<6}").parse::<i64>().ok()?;
    Some(whole.parse::<i64>().ok()? * MICROS + fraction)
}

/// `micros` as dollars with at least two places and no trailing zeros beyond them:
/// `50.00`, `1.50`, `0.000015`.
pub(crate) fn format_usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let (whole, fraction) = (micros.unsigned_abs() / MICROS as u64, micros.unsigned_abs() % MICROS as u64);
    let fraction = format!("{fraction:06}");
    let kept = fraction.trim_end_matches('0').len().max(2);
    format!("{sign}{whole}.{}", &fraction[..kept])
}

/// One model's prices, in micro-dollars per million LLM tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    /// Per million prompt (input) tokens.
    pub input: i64,
    /// Per million completion (output) tokens.
    pub output: i64,
}

impl Price {
    /// What an answer with `prompt` and `completion` tokens costs, in micro-dollars,
    /// rounded up: a budget is never charged less than the list says.
    pub fn cost(&self, prompt: u64, completion: u64) -> i64 {
        let millionths =
            u128::from(prompt) * self.input.max(0) as u128 + u128::from(completion) * self.output.max(0) as u128;
        i64::try_from(millionths.div_ceil(1_000_000)).unwrap_or(i64::MAX)
    }
}

/// The prices of one `PriceList`, ready for lookups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prices {
    exact: HashMap<Box<str>, Price>,
    /// Longest prefix first: the most specific entry wins.
    prefixes: Vec<(Box<str>, Price)>,
}

impl Prices {
    /// The prices `spec` lists; entries whose amounts do not parse are left out (the
    /// API server refuses them).
    pub fn of(spec: &PriceListSpec) -> Self {
        let mut prices = Self::default();
        for entry in &spec.models {
            let (Some(input), Some(output)) =
                (parse_usd(&entry.input_per_million), parse_usd(&entry.output_per_million))
            else {
                continue;
            };
            let price = Price { input, output };
            match entry.model.strip_suffix('*') {
                Some(prefix) => prices.prefixes.push((Box::from(prefix), price)),
                None => {
                    prices.exact.insert(Box::from(entry.model.as_str()), price);
                }
            }
        }
        prices.prefixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        prices
    }

    /// The price of `model`: its exact entry, else its longest matching prefix entry.
    pub fn price(&self, model: &str) -> Option<Price> {
        if let Some(price) = self.exact.get(model) {
            return Some(*price);
        }
        self.prefixes.iter().find(|(prefix, _)| model.starts_with(&**prefix)).map(|(_, price)| *price)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ModelPrice;

    #[test]
    fn dollars_parse_exactly_and_print_readably() {
        assert_eq!(parse_usd("50"), Some(50_000_000));
        assert_eq!(parse_usd("2.50"), Some(2_500_000));
        assert_eq!(parse_usd("0.075"), Some(75_000));
        assert_eq!(parse_usd("0.000001"), Some(1));
        for bad in ["", ".5", "5.", "1.0000001", "-1", "1e3", "1,5", "1234567890123"] {
            assert_eq!(parse_usd(bad), None, "{bad:?}");
        }
        assert_eq!(format_usd(50_000_000), "50.00");
        assert_eq!(format_usd(1_500_000), "1.50");
        assert_eq!(format_usd(15), "0.000015");
        assert_eq!(format_usd(0), "0.00");
        assert_eq!(format_usd(-2_340_000), "-2.34");
    }

    #[test]
    fn an_answer_costs_its_prompt_and_completion_at_their_prices_rounded_up() {
        // gpt-4o-mini's list price: $0.15 and $0.60 per million.
        let price = Price { input: 150_000, output: 600_000 };
        assert_eq!(price.cost(1_000_000, 0), 150_000);
        assert_eq!(price.cost(10, 20), 14, "1.5 + 12 micro-dollars, rounded up");
        assert_eq!(price.cost(0, 0), 0);
        assert_eq!(Price { input: 2_500_000, output: 10_000_000 }.cost(1000, 500), 7_500);
    }

    #[test]
    fn the_exact_entry_wins_then_the_longest_prefix() {
        let entry = |model: &str, input: &str| ModelPrice {
            model: model.into(),
            input_per_million: input.into(),
            output_per_million: "1".into(),
        };
        let spec = PriceListSpec {
            source: None,
            models: vec![entry("gpt-4o*", "2.50"), entry("gpt-4o-mini*", "0.15"), entry("gpt-4o-mini-tts", "0.60")],
        };
        let prices = Prices::of(&spec);
        assert_eq!(prices.price("gpt-4o-2024-08-06").map(|p| p.input), Some(2_500_000));
        assert_eq!(prices.price("gpt-4o-mini").map(|p| p.input), Some(150_000));
        assert_eq!(prices.price("gpt-4o-mini-tts").map(|p| p.input), Some(600_000));
        assert_eq!(prices.price("o3"), None);
    }
}
