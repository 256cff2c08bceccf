//! ProxyToken decisions: admission, lifecycle phases and their Events. No cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};

use super::*;
use crate::api::{AllowedNamespaces, NamespacesFrom};

fn at(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(secs).unwrap()
}

fn project(active: bool, from: Option<NamespacesFrom>) -> Project {
    let mut p = crate::fixtures::project("prod");
    p.spec.active = active;
    p.spec.allowed_namespaces = from.map(|from| AllowedNamespaces {
        from,
        selector: Some(LabelSelector {
            match_labels: Some([("team".to_string(), "ml".to_string())].into()),
            match_expressions: None,
        }),
    });
    p
}

fn token() -> ProxyToken {
    crate::fixtures::token("web", "apps", "prod")
}

fn issued(issued_at: i64) -> ProxyToken {
    crate::fixtures::minted(token(), &crate::token::Token::mint().unwrap().hash().to_string(), at(issued_at))
}

#[test]
fn admission_needs_a_project_a_grant_and_an_active_project() {
    let open = project(true, Some(NamespacesFrom::All));
    assert_eq!(admit(&token(), Some(&open), true), Ok(()));
    assert_eq!(admit(&token(), None, false).unwrap_err().reason, "ProjectNotFound");
    let refused = admit(&token(), Some(&open), false).unwrap_err();
    assert_eq!(refused.phase, TokenPhase::Rejected);
    assert!(refused.message.contains("namespace apps") && refused.message.contains("spec.allowedNamespaces"));
    let inactive = admit(&token(), Some(&project(false, Some(NamespacesFrom::All))), true).unwrap_err();
    assert_eq!((inactive.phase, inactive.message.as_str()), (TokenPhase::ProjectInactive, INACTIVE_PROJECT_MESSAGE));
    let mut revoked = token();
    revoked.spec.revoked = true;
    assert_eq!(admit(&revoked, Some(&open), true).unwrap_err().phase, TokenPhase::Revoked);
}

#[test]
fn lifecycle_phases_in_order_of_precedence() {
    let open = project(true, Some(NamespacesFrom::All));
    assert_eq!(lifecycle(&issued(0), Some(&open), true, at(10)).phase, TokenPhase::Active);
    assert_eq!(lifecycle(&issued(0), Some(&open), true, at(3600)).phase, TokenPhase::Expired);
    assert_eq!(lifecycle(&issued(0), Some(&project(false, None)), true, at(10)).phase, TokenPhase::ProjectInactive);
    // A minted token whose Project is gone can never work again (see the binding test).
    let orphaned = lifecycle(&issued(0), None, true, at(10));
    assert_eq!((orphaned.phase, orphaned.reason), (TokenPhase::Revoked, "ProjectDeleted"));

    let mut capped = issued(0);
    capped.spec.max_requests = Some(5);
    capped.status.as_mut().unwrap().request_count = Some(5);
    assert_eq!(lifecycle(&capped, Some(&open), true, at(10)).phase, TokenPhase::Exhausted);

    let mut revoked = issued(0);
    revoked.spec.revoked = true;
    assert_eq!(lifecycle(&revoked, Some(&open), true, at(3600)).phase, TokenPhase::Revoked);

    // A namespace that lost its grant: refused, kept, and usable again with the grant.
    let ungranted = lifecycle(&issued(0), Some(&open), false, at(10));
    assert_eq!((ungranted.phase, ungranted.reason), (TokenPhase::Rejected, "NamespaceNotAllowed"));
    assert!(ungranted.message.contains("spec.allowedNamespaces"), "{}", ungranted.message);
    assert_eq!(lifecycle(&capped, Some(&open), false, at(10)).phase, TokenPhase::Exhausted);
    assert_eq!(lifecycle(&issued(0), Some(&open), false, at(3600)).phase, TokenPhase::Expired);
}

/// A Project without a usable key: its tokens stay Active (nothing about them is
/// wrong) but are not Ready, and say why and what the proxy answers meanwhile.
#[test]
fn a_token_of_a_project_without_a_usable_key_is_active_but_not_ready() {
    let mut keyless = project(true, Some(NamespacesFrom::All));
    let mut conditions = crate::api::Conditions::new(&[], None, Time(at(0)));
    let (reason, message) = ("SecretNotFound", "Secret ops/k not found: create it");
    conditions.set(crate::api::project_conditions::API_KEY_VALID, ConditionStatus::False, reason, message);
    keyless.status = Some(crate::api::ProjectStatus { conditions: conditions.finish(), ..Default::default() });
    let verdict = lifecycle(&issued(0), Some(&keyless), true, at(10));
    assert_eq!((verdict.phase, verdict.ready, verdict.reason), (TokenPhase::Active, false, PROJECT_KEY_INVALID));
    assert!(verdict.message.contains("503 project_key_invalid") && verdict.message.contains("SecretNotFound"));
    let (status, _) = status_for(&issued(0), &verdict, Time(at(10)), true, &no_replicas());
    let ready = status.conditions.iter().find(|c| c.type_ == cond::READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", PROJECT_KEY_INVALID));
    assert_eq!(status.phase, Some(TokenPhase::Active));
    // A lasting fate still comes first.
    assert_eq!(lifecycle(&issued(0), Some(&keyless), true, at(3600)).phase, TokenPhase::Expired);
    // Valid again, or never checked: Ready.
    keyless.status.as_mut().unwrap().conditions[0].status = "True".into();
    assert!(lifecycle(&issued(0), Some(&keyless), true, at(10)).ready);
    assert!(lifecycle(&issued(0), Some(&project(true, Some(NamespacesFrom::All))), true, at(10)).ready);
}

#[test]
fn a_token_is_bound_to_the_project_object_it_was_minted_for() {
    let mut original = project(true, Some(NamespacesFrom::All));
    original.metadata.uid = Some("uid-1".into());
    original.metadata.creation_timestamp = Some(Time(at(0)));
    let mut t = issued(10);
    t.status.as_mut().unwrap().project_uid = Some("uid-1".into());
    assert_eq!(lifecycle(&t, Some(&original), true, at(20)).phase, TokenPhase::Active);

    // Force-deleted and created again under the same name: another object.
    let mut replacement = original.clone();
    replacement.metadata.uid = Some("uid-2".into());
    replacement.metadata.creation_timestamp = Some(Time(at(15)));
    let verdict = lifecycle(&t, Some(&replacement), true, at(20));
    assert_eq!((verdict.phase, verdict.reason), (TokenPhase::Revoked, "ProjectDeleted"));
    assert!(verdict.message.contains("create a new ProxyToken"), "{}", verdict.message);

    // Minted before the uid was recorded: bound while the Project predates the token.
    t.status.as_mut().unwrap().project_uid = None;
    assert_eq!(bound_project(&t, Some(&original)).map(|p| p.metadata.uid.clone()), Some(Some("uid-1".into())));
    assert!(bound_project(&t, Some(&replacement)).is_none());
}

#[test]
fn bulk_revocation_catches_tokens_issued_before_the_cut_off_only() {
    let mut cut = project(true, Some(NamespacesFrom::All));
    cut.spec.tokens_not_before = Some(Time(at(100)));
    let old = lifecycle(&issued(99), Some(&cut), true, at(150));
    assert_eq!((old.phase, old.reason), (TokenPhase::Revoked, "BulkRevoked"));
    assert_eq!(lifecycle(&issued(100), Some(&cut), true, at(150)).phase, TokenPhase::Active);
}

#[test]
fn final_phases_stay_final() {
    let open = project(true, Some(NamespacesFrom::All));
    for phase in [TokenPhase::Revoked, TokenPhase::Expired] {
        let mut t = issued(0);
        t.status.as_mut().unwrap().phase = Some(phase);
        assert_eq!(lifecycle(&t, Some(&open), true, at(10)).phase, phase);
    }
}

#[test]
fn status_keeps_the_mint_and_leaves_usage_to_the_proxy() {
    let mut t = issued(0);
    t.status.as_mut().unwrap().request_count = Some(7);
    t.status.as_mut().unwrap().token_windows = vec![crate::api::TokenWindow {
        window: crate::api::TokenWindowKind::Day,
        start: Time(at(0)),
        limit: 100,
        used_tokens: 40,
        remaining_tokens: 60,
        claimed_tokens: 50,
        held_since: None,
        spent_at: None,
    }];
    let verdict = lifecycle(&t, None, true, at(10));
    let (status, _) = status_for(&t, &verdict, Time(at(10)), true, &no_replicas());
    // An apply of the cached windows would roll the replicas' claims back.
    assert!(status.token_windows.is_empty());
    assert_eq!(status.token_hash, t.status.as_ref().unwrap().token_hash);
    assert_eq!(status.expires_at, Some(crate::api::micros(at(3600))));
    assert_eq!(status.request_count, None);
    let issued_condition = status.conditions.iter().find(|c| c.type_ == cond::ISSUED).unwrap();
    assert_eq!(issued_condition.status, "True");
}

fn no_replicas() -> crate::enforcement::Check {
    crate::enforcement::Check { live: 0, behind: Vec::new() }
}

#[test]
fn a_minted_token_stays_pending_until_its_secret_is_written_and_enforced_follows_the_replicas() {
    let open = project(true, Some(NamespacesFrom::All));
    let mut t = issued(0);
    t.metadata.generation = Some(1);
    t.status.as_mut().unwrap().phase = None;
    let verdict = lifecycle(&t, Some(&open), true, at(10));
    assert_eq!(verdict.phase, TokenPhase::Active);
    let lagging = crate::enforcement::Check { live: 2, behind: vec!["proxy-b".into()] };
    let caught_up = crate::enforcement::Check { live: 2, behind: Vec::new() };

    // The mint itself: hash written, no Secret yet. No replica can have applied a write
    // that has not happened, whatever the reports say.
    let (minted, waiting) = status_for(&t, &verdict, Time(at(10)), false, &caught_up);
    assert_eq!(minted.phase, Some(TokenPhase::Pending));
    let condition = |s: &ProxyTokenStatus, type_: &str| s.conditions.iter().find(|c| c.type_ == type_).unwrap().clone();
    assert_eq!(condition(&minted, cond::ISSUED).reason, "Propagating");
    assert_eq!((condition(&minted, cond::ENFORCED).status.as_str(), waiting), ("False", true));
    assert!(transition_events(None, &Verdict::new(TokenPhase::Pending, PROPAGATING, "x"), "web", false).is_empty());

    // Observed again while a replica lags: still waiting, the condition untouched (a
    // rewrite would be one more change to wait for)...
    t.status = Some(minted.clone());
    let (lag, waiting) = status_for(&t, &verdict, Time(at(11)), false, &lagging);
    assert!(waiting);
    assert_eq!(condition(&lag, cond::ENFORCED), condition(&minted, cond::ENFORCED));
    // ...until it has lagged a while: then it names the replica.
    let (late, waiting) = status_for(&t, &verdict, Time(at(25)), false, &lagging);
    assert!(waiting && condition(&late, cond::ENFORCED).message.contains("proxy-b"));

    // Every replica caught up and the Secret is written: Active and Enforced.
    let (done, waiting) = status_for(&t, &verdict, Time(at(12)), true, &caught_up);
    assert_eq!((done.phase, waiting), (Some(TokenPhase::Active), false));
    let enforced = condition(&done, cond::ENFORCED);
    assert_eq!((enforced.status.as_str(), enforced.message.as_str()), ("True", "Enforced by 2/2 live proxy replicas"));
    assert_eq!(enforced.last_transition_time, Time(at(12)));

    // A revocation is a new change: Enforced goes back to False until the replicas report.
    t.status = Some(done);
    t.spec.revoked = true;
    t.metadata.generation = Some(2);
    let revoked = lifecycle(&t, Some(&open), true, at(13));
    let (after, waiting) = status_for(&t, &revoked, Time(at(13)), true, &caught_up);
    assert_eq!((after.phase, waiting), (Some(TokenPhase::Revoked), true));
    assert_eq!(condition(&after, cond::ENFORCED).status, "False");
}

#[test]
fn events_follow_phase_changes() {
    let active = Verdict::new(TokenPhase::Active, "Active", "Usable");
    assert_eq!(transition_events(None, &active, "web", true)[0].reason, "Issued");
    assert!(transition_events(Some(TokenPhase::Active), &active, "web", false).is_empty());
    assert_eq!(transition_events(Some(TokenPhase::ProjectInactive), &active, "web", false)[0].reason, "Usable");
    let revoked = Verdict::new(TokenPhase::Revoked, "BulkRevoked", "gone");
    assert_eq!(transition_events(Some(TokenPhase::Active), &revoked, "web", false)[0].reason, "Revoked");
    let refused = Verdict::new(TokenPhase::ProjectInactive, "ProjectInactive", INACTIVE_PROJECT_MESSAGE);
    let events = transition_events(None, &refused, "web", false);
    assert!(events[0].warning && events[0].note == INACTIVE_PROJECT_MESSAGE);
    // A short token that expired while its Secret waited for the replicas: both show.
    let expired = Verdict::new(TokenPhase::Expired, "Expired", "past expiresAt");
    let reasons: Vec<_> =
        transition_events(Some(TokenPhase::Pending), &expired, "web", true).into_iter().map(|e| e.reason).collect();
    assert_eq!(reasons, ["Issued", "Expired"]);
}

#[test]
fn expiry_is_issue_time_plus_duration() {
    let mut t = issued(1000);
    t.spec.duration = "1h30m".into();
    assert_eq!(expires_at(&t), Some(at(1000 + 5400)));
    assert_eq!(expires_at(&token()), None);
}
