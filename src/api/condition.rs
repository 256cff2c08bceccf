//! Helpers for `status.conditions`: a closed set of types whose `lastTransitionTime`
//! moves only when the status really changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The status of a condition, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
}

impl ConditionStatus {
    /// The wire spelling: `True` or `False`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
        }
    }

    /// `True` when `holds`, else `False`.
    pub fn from_bool(holds: bool) -> Self {
        if holds { Self::True } else { Self::False }
    }
}

/// Builds a new `status.conditions` list from the previous one.
pub struct Conditions<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: Time,
    out: Vec<Condition>,
}

impl<'a> Conditions<'a> {
    /// Starts a list for an object at `generation`, observed at `now`.
    pub fn new(previous: &'a [Condition], generation: Option<i64>, now: Time) -> Self {
        Self { previous, generation, now, out: Vec::new() }
    }

    /// Sets condition `type_`, keeping the old `lastTransitionTime` when its status did not change.
    pub fn set(&mut self, type_: &str, status: ConditionStatus, reason: &str, message: impl Into<String>) {
        let last_transition_time = self
            .previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status.as_str())
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| self.now.clone());
        self.out.retain(|c| c.type_ != type_);
        self.out.push(Condition {
            type_: type_.to_string(),
            status: status.as_str().to_string(),
            reason: reason.to_string(),
            message: message.into(),
            observed_generation: self.generation,
            last_transition_time,
        });
    }

    /// Whether condition `type_` was `True` in the previous list.
    pub fn was_true(&self, type_: &str) -> bool {
        is_true(self.previous, type_)
    }

    /// How long condition `type_` has had its previous status, as of now.
    pub fn held_for(&self, type_: &str) -> Option<jiff::SignedDuration> {
        let previous = self.previous.iter().find(|c| c.type_ == type_)?;
        Some(self.now.0.duration_since(previous.last_transition_time.0))
    }

    /// Carries condition `type_` over from the previous list unchanged, if it was there.
    pub fn keep(&mut self, type_: &str) {
        if let Some(previous) = self.previous.iter().find(|c| c.type_ == type_) {
            self.out.retain(|c| c.type_ != type_);
            self.out.push(previous.clone());
        }
    }

    /// The finished list.
    pub fn finish(self) -> Vec<Condition> {
        self.out
    }
}

/// Whether condition `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    fn ready(previous: &[Condition], status: ConditionStatus, now: i64) -> Vec<Condition> {
        let mut c = Conditions::new(previous, Some(1), at(now));
        c.set("Ready", status, "Reason", "message");
        c.finish()
    }

    #[test]
    fn transition_time_moves_only_on_a_status_change() {
        let first = ready(&[], ConditionStatus::True, 10);
        let second = ready(&first, ConditionStatus::True, 20);
        assert_eq!(second[0].last_transition_time, at(10));
        let third = ready(&second, ConditionStatus::False, 30);
        assert_eq!(third[0].last_transition_time, at(30));
        assert!(!is_true(&third, "Ready"));
    }
}
