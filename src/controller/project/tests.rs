//! Project decisions: status and audit Events from what was observed. No cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;
use crate::api::ProjectStatus;

const KEY: &str = "sk-test-0123456789abcdefghijAb12";

fn at(secs: i64) -> Time {
    Time(jiff::Timestamp::from_second(secs).unwrap())
}

fn project(active: bool) -> Project {
    let mut p = crate::fixtures::project("prod");
    p.spec.active = active;
    p
}

fn token(name: &str, phase: TokenPhase, issued: i64) -> ProxyToken {
    let mut t = crate::fixtures::minted(crate::fixtures::token(name, "apps", "prod"), "", at(issued).0);
    let status = t.status.as_mut().unwrap();
    (status.phase, status.token_hash, status.secret_name) = (Some(phase), None, None);
    t
}

fn decide_at(project: &Project, key: Result<ApiKey, KeyProblem>, tokens: &[ProxyToken], now: i64) -> Decision {
    let check = crate::enforcement::Check { live: 0, behind: Vec::new() };
    decide(&Observed { project, key, tokens, namespace: "ops", now: at(now), check })
}

fn key() -> Result<ApiKey, KeyProblem> {
    ApiKey::parse(KEY.as_bytes())
}

fn reasons(decision: &Decision) -> Vec<&str> {
    decision.events.iter().map(|e| e.reason.as_str()).collect()
}

fn condition<'a>(
    status: &'a ProjectStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

/// The project as it reads after `decision` was written.
fn written(mut project: Project, decision: &Decision) -> Project {
    project.status = Some(decision.status.clone());
    project
}

#[test]
fn a_new_project_is_active_ready_and_recorded() {
    let d = decide_at(&project(true), key(), &[], 10);
    assert_eq!(d.status.phase, Some(ProjectPhase::Active));
    assert_eq!(d.status.api_key_hint.as_deref(), Some("sk-…Ab12"));
    assert_eq!(condition(&d.status, cond::READY).status, "True");
    assert_eq!(condition(&d.status, cond::DELETION_BLOCKED).status, "False");
    assert_eq!(reasons(&d), ["Created"]);
}

#[test]
fn reconciling_again_changes_nothing_and_records_nothing() {
    let first = decide_at(&project(true), key(), &[], 10);
    let again = decide_at(&written(project(true), &first), key(), &[], 20);
    assert_eq!(again.status, first.status);
    assert!(again.events.is_empty());
}

#[test]
fn deactivation_and_reactivation_are_recorded() {
    let first = decide_at(&project(true), key(), &[], 10);
    let mut off = written(project(false), &first);
    let deactivated = decide_at(&off, key(), &[], 20);
    assert_eq!(deactivated.status.phase, Some(ProjectPhase::Inactive));
    assert_eq!(condition(&deactivated.status, cond::READY).reason, "Deactivated");
    assert_eq!(reasons(&deactivated), ["Deactivated"]);
    off.status = Some(deactivated.status);
    let mut on = off.clone();
    on.spec.active = true;
    assert_eq!(reasons(&decide_at(&on, key(), &[], 30)), ["Activated"]);
}

#[test]
fn an_invalid_key_is_reported_once_with_the_products_message() {
    let first = decide_at(&project(true), key(), &[], 10);
    let bad = decide_at(&written(project(true), &first), Err(KeyProblem::InvalidFormat), &[], 20);
    let valid = condition(&bad.status, cond::API_KEY_VALID);
    assert_eq!(
        (valid.status.as_str(), valid.reason.as_str(), valid.message.as_str()),
        ("False", "InvalidAPIKeyFormat", "Invalid API key format")
    );
    assert_eq!(condition(&bad.status, cond::READY).status, "False");
    assert_eq!(bad.status.api_key_hint, None);
    assert_eq!(reasons(&bad), ["InvalidAPIKeyFormat"]);
    let still_bad = decide_at(&written(project(true), &bad), Err(KeyProblem::InvalidFormat), &[], 30);
    assert!(still_bad.events.is_empty());
    let missing = decide_at(&written(project(true), &bad), Err(KeyProblem::SecretNotFound), &[], 40);
    assert_eq!(reasons(&missing), ["SecretNotFound"]);
    assert!(condition(&missing.status, cond::API_KEY_VALID).message.contains("ops/prod-key"));
}

#[test]
fn a_rotated_key_is_recorded_without_showing_it() {
    let first = decide_at(&project(true), key(), &[], 10);
    let rotated = ApiKey::parse(b"sk-test-rotated-0123456789abcdZZ99");
    let d = decide_at(&written(project(true), &first), rotated, &[], 20);
    assert_eq!(reasons(&d), ["APIKeyRotated"]);
    assert!(d.events[0].note.contains("sk-…ZZ99"));
    assert!(!d.events[0].note.contains("rotated-0123"));
}

#[test]
fn deletion_is_blocked_and_the_project_turns_inactive() {
    let first = decide_at(&project(true), key(), &[], 10);
    let mut deleting = written(project(true), &first);
    deleting.metadata.deletion_timestamp = Some(at(15));
    let d = decide_at(&deleting, key(), &[], 20);
    assert_eq!(d.status.phase, Some(ProjectPhase::Inactive));
    let blocked = condition(&d.status, cond::DELETION_BLOCKED);
    assert_eq!(blocked.status, "True");
    assert!(blocked.message.contains("spec.active=false"));
    assert_eq!(reasons(&d), ["Deactivated", "DeletionBlocked"]);
}

#[test]
fn tokens_are_counted_and_the_most_recent_listed() {
    let tokens: Vec<ProxyToken> = (0..7)
        .map(|i| token(&format!("t{i}"), if i % 2 == 0 { TokenPhase::Active } else { TokenPhase::Revoked }, 100 + i))
        .collect();
    let d = decide_at(&project(true), key(), &tokens, 200);
    assert_eq!(d.status.tokens, Some(TokenCounts { total: 7, active: 4 }));
    let names: Vec<&str> = d.status.recent_tokens.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["t6", "t5", "t4", "t3", "t2"]);
}

#[test]
fn bulk_revocation_is_recorded_when_tokens_not_before_moves() {
    let first = decide_at(&project(true), key(), &[], 10);
    let mut revoking = written(project(true), &first);
    revoking.spec.tokens_not_before = Some(at(15));
    let d = decide_at(&revoking, key(), &[], 20);
    assert_eq!(reasons(&d), ["TokensRevoked"]);
    assert_eq!(d.status.tokens_not_before, Some(crate::api::micros(at(15).0)));
    let again = decide_at(&written(revoking, &d), key(), &[], 30);
    assert!(again.events.is_empty());
}
