//! Index tests: feed objects in, read the table. No cluster, no mock.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, MicroTime, Time};
use kube::api::ObjectMeta;

use super::*;
use crate::api::{AllowedNamespaces, NamespacesFrom};
use crate::token::Token;

const KEY: &str = "sk-test-0123456789abcdefghijAb12";
const HOUR_US: i64 = 3_600_000_000;
const ISSUED_US: i64 = 1_700_000_000_000_000;

/// A project open to every namespace.
fn project(name: &str, active: bool) -> Project {
    let mut p = crate::fixtures::project(name);
    p.spec.active = active;
    p.spec.allowed_namespaces = Some(AllowedNamespaces { from: NamespacesFrom::All, selector: None });
    p
}

/// A key Secret bound to the project `prod`.
fn secret(name: &str, value: &str) -> Secret {
    let (label, marked) = crate::api::API_KEY_LABEL;
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ops".into()),
            labels: Some([(label.to_string(), marked.to_string())].into()),
            annotations: Some([(crate::api::KEY_PROJECTS_ANNOTATION.to_string(), "prod".to_string())].into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("apiKey".to_string(), ByteString(value.as_bytes().to_vec()))])),
        ..Default::default()
    }
}

fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn at(us: i64) -> Time {
    Time(jiff::Timestamp::from_microsecond(us).unwrap())
}

fn micro(us: i64) -> MicroTime {
    MicroTime(jiff::Timestamp::from_microsecond(us).unwrap())
}

fn token(name: &str, project: &str, minted: &Token) -> ProxyToken {
    let issued = jiff::Timestamp::from_microsecond(ISSUED_US).unwrap();
    crate::fixtures::minted(crate::fixtures::token(name, "apps", project), &minted.hash().to_string(), issued)
}

/// An index that has listed one project, its key Secret and one token.
fn synced(minted: &Token) -> Index {
    let mut index = Index::new();
    for change in [
        Change::Project(Event::Init),
        Change::Project(Event::InitApply(project("prod", true))),
        Change::Project(Event::InitDone),
        Change::Secret(Event::Init),
        Change::Secret(Event::InitApply(secret("prod-key", KEY))),
        Change::Secret(Event::InitDone),
        Change::Token(Event::Init),
        Change::Token(Event::InitApply(token("web", "prod", minted))),
        Change::Token(Event::InitDone),
        Change::Namespace(Event::Init),
        Change::Namespace(Event::InitApply(namespace("apps", &[("team", "ml")]))),
        Change::Namespace(Event::InitDone),
        Change::PriceList(Event::Init),
        Change::PriceList(Event::InitDone),
    ] {
        index.apply(change);
    }
    index
}

#[test]
fn not_ready_until_every_kind_has_listed() {
    let mut index = Index::new();
    index.apply(Change::Project(Event::Init));
    index.apply(Change::Project(Event::InitDone));
    index.apply(Change::Secret(Event::Init));
    index.apply(Change::Secret(Event::InitDone));
    assert!(!index.snapshot().ready);
    index.apply(Change::Token(Event::Init));
    index.apply(Change::Token(Event::InitDone));
    assert!(!index.snapshot().ready, "namespace labels decide selector grants");
    index.apply(Change::Namespace(Event::Init));
    index.apply(Change::Namespace(Event::InitDone));
    assert!(!index.snapshot().ready, "PriceLists price the cost budgets");
    index.apply(Change::PriceList(Event::Init));
    index.apply(Change::PriceList(Event::InitDone));
    assert!(index.snapshot().ready);
}

#[test]
fn a_namespace_that_loses_its_grant_loses_its_tokens_until_the_grant_returns() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    let by_team = |team: &str| {
        let mut p = project("prod", true);
        p.spec.allowed_namespaces = Some(AllowedNamespaces {
            from: NamespacesFrom::Selector,
            selector: Some(LabelSelector {
                match_labels: Some([("team".to_string(), team.to_string())].into()),
                match_expressions: None,
            }),
        });
        p
    };
    let authorize = |index: &mut Index| index.snapshot().authorize(&minted.hash(), ISSUED_US).map(drop);
    index.apply(Change::Project(Event::Apply(by_team("ml"))));
    assert_eq!(authorize(&mut index), Ok(()));
    // The namespace's labels change: refused on the next request.
    index.apply(Change::Namespace(Event::Apply(namespace("apps", &[("team", "web")]))));
    assert_eq!(authorize(&mut index), Err(Denial::NamespaceNotAllowed));
    index.apply(Change::Namespace(Event::Apply(namespace("apps", &[("team", "ml")]))));
    assert_eq!(authorize(&mut index), Ok(()), "a lost grant is not a revocation");
    // The project narrows its grant: the same.
    index.apply(Change::Project(Event::Apply(by_team("web"))));
    assert_eq!(authorize(&mut index), Err(Denial::NamespaceNotAllowed));
    let mut closed = project("prod", true);
    closed.spec.allowed_namespaces = None;
    index.apply(Change::Project(Event::Apply(closed)));
    assert_eq!(authorize(&mut index), Err(Denial::NamespaceNotAllowed));
    index.apply(Change::Project(Event::Apply(project("prod", true))));
    assert_eq!(authorize(&mut index), Ok(()));
    // A namespace the watch does not know has no labels: a selector grant refuses it.
    index.apply(Change::Project(Event::Apply(by_team("ml"))));
    index.apply(Change::Namespace(Event::Delete(namespace("apps", &[("team", "ml")]))));
    assert_eq!(authorize(&mut index), Err(Denial::NamespaceNotAllowed));
}

#[test]
fn a_minted_token_routes_to_its_project_with_the_real_key() {
    let minted = Token::mint().unwrap();
    let table = synced(&minted).snapshot();
    let route = table.authorize(&minted.hash(), ISSUED_US + 1).unwrap();
    assert_eq!(route.key.expose(), KEY);
    assert_eq!(&*route.project.upstream, "http://127.0.0.1:9");
    assert_eq!((&*route.token.namespace, &*route.token.name), ("apps", "web"));
}

#[test]
fn unknown_expired_and_revoked_tokens_are_denied() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    let table = index.snapshot();
    assert_eq!(table.authorize(&Token::mint().unwrap().hash(), ISSUED_US).unwrap_err(), Denial::TokenNotFound);
    assert_eq!(table.authorize(&minted.hash(), ISSUED_US + HOUR_US).unwrap_err(), Denial::TokenExpired);

    let mut revoked = token("web", "prod", &minted);
    revoked.spec.revoked = true;
    index.apply(Change::Token(Event::Apply(revoked)));
    assert_eq!(index.snapshot().authorize(&minted.hash(), ISSUED_US).unwrap_err(), Denial::TokenRevoked);
}

#[test]
fn deactivation_and_deletion_refuse_without_revoking() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    index.apply(Change::Project(Event::Apply(project("prod", false))));
    assert_eq!(index.snapshot().authorize(&minted.hash(), ISSUED_US).unwrap_err(), Denial::ProjectInactive);

    let mut deleting = project("prod", true);
    deleting.metadata.deletion_timestamp = Some(at(ISSUED_US));
    index.apply(Change::Project(Event::Apply(deleting)));
    assert_eq!(index.snapshot().authorize(&minted.hash(), ISSUED_US).unwrap_err(), Denial::ProjectInactive);

    index.apply(Change::Project(Event::Apply(project("prod", true))));
    assert!(index.snapshot().authorize(&minted.hash(), ISSUED_US).is_ok());
}

#[test]
fn bulk_revocation_compares_issue_time_with_tokens_not_before() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    let mut p = project("prod", true);
    p.spec.tokens_not_before = Some(at(ISSUED_US + 1));
    index.apply(Change::Project(Event::Apply(p.clone())));
    assert_eq!(index.snapshot().authorize(&minted.hash(), ISSUED_US + 2).unwrap_err(), Denial::TokenRevoked);

    // A token issued after the cut-off still works.
    let fresh = Token::mint().unwrap();
    let mut later = token("later", "prod", &fresh);
    later.status.as_mut().unwrap().issued_at = Some(micro(ISSUED_US + 5));
    index.apply(Change::Token(Event::Apply(later)));
    assert!(index.snapshot().authorize(&fresh.hash(), ISSUED_US + 6).is_ok());
}

#[test]
fn key_rotation_and_bad_keys_follow_the_secret() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    let rotated = "sk-test-rotated-0123456789abcdefZZ99";
    index.apply(Change::Secret(Event::Apply(secret("prod-key", rotated))));
    assert_eq!(index.snapshot().authorize(&minted.hash(), ISSUED_US).unwrap().key.expose(), rotated);

    index.apply(Change::Secret(Event::Apply(secret("prod-key", "not-a-key"))));
    let table = index.snapshot();
    assert_eq!(table.authorize(&minted.hash(), ISSUED_US).unwrap_err(), Denial::ProjectKeyInvalid);
    assert_eq!(table.project("prod").unwrap().key.as_ref().unwrap_err(), &KeyProblem::InvalidFormat);

    index.apply(Change::Secret(Event::Delete(secret("prod-key", rotated))));
    assert_eq!(index.snapshot().project("prod").unwrap().key.as_ref().unwrap_err(), &KeyProblem::SecretNotFound);
}

#[test]
fn deleting_a_token_removes_it() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    index.apply(Change::Token(Event::Delete(token("web", "prod", &minted))));
    let table = index.snapshot();
    assert_eq!(table.token_count(), 0);
    assert_eq!(table.authorize(&minted.hash(), ISSUED_US).unwrap_err(), Denial::TokenNotFound);
}

#[test]
fn a_relist_drops_what_disappeared_while_the_watch_was_down() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    let before = index.snapshot();
    let other = Token::mint().unwrap();
    index.apply(Change::Token(Event::Init));
    index.apply(Change::Token(Event::InitApply(token("other", "prod", &other))));
    // Until InitDone the old state keeps serving.
    assert!(index.snapshot().authorize(&minted.hash(), ISSUED_US).is_ok());
    index.apply(Change::Token(Event::InitDone));
    let after = index.snapshot();
    assert_eq!(after.authorize(&minted.hash(), ISSUED_US).unwrap_err(), Denial::TokenNotFound);
    assert!(after.authorize(&other.hash(), ISSUED_US).is_ok());
    assert!(after.generation > before.generation);
    // The earlier snapshot is immutable: readers holding it are unaffected.
    assert!(before.authorize(&minted.hash(), ISSUED_US).is_ok());
}

#[test]
fn unminted_tokens_and_exhausted_caps() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    let mut pending = token("pending", "prod", &Token::mint().unwrap());
    pending.status = None;
    index.apply(Change::Token(Event::Apply(pending)));
    assert_eq!(index.snapshot().token_count(), 1);

    let mut capped = token("web", "prod", &minted);
    capped.spec.max_requests = Some(3);
    capped.status.as_mut().unwrap().request_count = Some(3);
    index.apply(Change::Token(Event::Apply(capped)));
    assert_eq!(index.snapshot().authorize(&minted.hash(), ISSUED_US).unwrap_err(), Denial::TokenExhausted);
}

#[test]
fn a_relist_in_progress_changes_nothing_until_it_ends() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    assert!(index.take_changed(), "the initial lists changed the table");
    assert!(!index.take_changed(), "taking the flag clears it");
    index.apply(Change::Token(Event::Init));
    index.apply(Change::Token(Event::InitApply(token("other", "prod", &Token::mint().unwrap()))));
    assert!(!index.take_changed(), "relisted objects are not visible before InitDone");
    index.apply(Change::Token(Event::InitDone));
    assert!(index.take_changed());
}

#[test]
fn tokens_stay_bound_to_the_project_object_they_were_minted_for() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    let with_uid = |uid: &str, created_us: i64| {
        let mut p = project("prod", true);
        p.metadata.uid = Some(uid.into());
        p.metadata.creation_timestamp = Some(at(created_us));
        p
    };
    let mut bound = token("web", "prod", &minted);
    bound.status.as_mut().unwrap().project_uid = Some("uid-1".into());
    index.apply(Change::Project(Event::Apply(with_uid("uid-1", ISSUED_US - HOUR_US))));
    index.apply(Change::Token(Event::Apply(bound)));
    assert!(index.snapshot().authorize(&minted.hash(), ISSUED_US).is_ok());

    // Force-deleted: the token's project is gone.
    index.apply(Change::Project(Event::Delete(with_uid("uid-1", ISSUED_US - HOUR_US))));
    assert_eq!(index.snapshot().authorize(&minted.hash(), ISSUED_US).unwrap_err(), Denial::ProjectDeleted);
    // Created again under the same name, with the same key: still not the token's project.
    index.apply(Change::Project(Event::Apply(with_uid("uid-2", ISSUED_US + 1))));
    assert_eq!(index.snapshot().authorize(&minted.hash(), ISSUED_US + 2).unwrap_err(), Denial::ProjectDeleted);

    // A token minted before uids were recorded is bound to a project that predates it.
    let legacy = Token::mint().unwrap();
    index.apply(Change::Token(Event::Apply(token("old", "prod", &legacy))));
    assert_eq!(index.snapshot().authorize(&legacy.hash(), ISSUED_US).unwrap_err(), Denial::ProjectDeleted);
    index.apply(Change::Project(Event::Apply(with_uid("uid-2", ISSUED_US - 1))));
    assert!(index.snapshot().authorize(&legacy.hash(), ISSUED_US).is_ok());
}

#[test]
fn applied_versions_follow_the_events_in_the_table_and_a_relist_only_at_its_end() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    // The fixtures list at version 1; the token has none (0).
    assert_eq!(index.applied(), Applied { synced: true, projects: 1, tokens: 0, secrets: 0 });

    let mut revoked = token("web", "prod", &minted);
    revoked.spec.revoked = true;
    revoked.metadata.resource_version = Some("40".into());
    index.apply(Change::Token(Event::Apply(revoked)));
    assert_eq!(index.applied().tokens, 40);

    // A relist in progress is not in the table yet: its versions wait for InitDone.
    let mut relisted = project("prod", false);
    relisted.metadata.resource_version = Some("55".into());
    index.apply(Change::Project(Event::Init));
    index.apply(Change::Project(Event::InitApply(relisted)));
    assert_eq!(index.applied().projects, 1);
    index.apply(Change::Project(Event::InitDone));
    assert_eq!(index.applied().projects, 55);

    let mut gone = secret("prod-key", KEY);
    gone.metadata.resource_version = Some("60".into());
    index.apply(Change::Secret(Event::Delete(gone)));
    assert_eq!(index.applied(), Applied { synced: true, projects: 55, tokens: 40, secrets: 60 });
}

#[test]
fn an_exhausted_token_of_an_inactive_project_is_exhausted_as_its_status_says() {
    let minted = Token::mint().unwrap();
    let mut index = synced(&minted);
    let mut capped = token("web", "prod", &minted);
    capped.spec.max_requests = Some(5);
    capped.status.as_mut().unwrap().request_count = Some(5);
    index.apply(Change::Token(Event::Apply(capped.clone())));
    index.apply(Change::Project(Event::Apply(project("prod", false))));
    // The controller's lifecycle says Exhausted for the same objects; so must the proxy
    // (it used to answer 403 project_inactive).
    assert_eq!(index.snapshot().authorize(&minted.hash(), ISSUED_US).unwrap_err(), Denial::TokenExhausted);
    let verdict =
        crate::controller::proxytoken::lifecycle(&capped, Some(&project("prod", false)), true, at(ISSUED_US).0);
    assert_eq!(verdict.phase, TokenPhase::Exhausted);
}

#[test]
fn tokens_share_one_copy_of_their_project_and_namespace_names() {
    let (first, second) = (Token::mint().unwrap(), Token::mint().unwrap());
    let mut index = synced(&first);
    index.apply(Change::Token(Event::Apply(token("api", "prod", &second))));
    let table = index.snapshot();
    let a = table.authorize(&first.hash(), ISSUED_US + 1).unwrap();
    let b = table.authorize(&second.hash(), ISSUED_US + 1).unwrap();
    assert!(Arc::ptr_eq(&a.token.project, &b.token.project));
    assert!(Arc::ptr_eq(&a.token.project, &a.project.name), "the project's own name is the same copy");
    assert!(Arc::ptr_eq(&a.token.namespace, &b.token.namespace));
    // A relist frees the copies nothing uses any more.
    index.apply(Change::Token(Event::Init));
    index.apply(Change::Token(Event::InitDone));
    drop((a, b, table));
    index.apply(Change::Token(Event::Init));
    index.apply(Change::Token(Event::InitDone));
    assert!(!index.strings.contains("apps"), "no token left in namespace apps");
    assert!(index.strings.contains("prod"), "the project still uses its name");
}

#[test]
fn a_request_path_is_joined_to_the_upstream_url_and_its_own_path() {
    let join = |base: &str, path: &str| {
        let pq: hyper::http::uri::PathAndQuery = path.parse().unwrap();
        UpstreamUrl::parse(base).unwrap().join(Some(&pq)).unwrap().to_string()
    };
    assert_eq!(join("https://api.openai.com", "/v1/models?limit=2"), "https://api.openai.com/v1/models?limit=2");
    assert_eq!(join("https://api.openai.com/", "/v1/models"), "https://api.openai.com/v1/models");
    assert_eq!(
        join("http://10.0.0.7:8080/openai/", "/v1/chat/completions"),
        "http://10.0.0.7:8080/openai/v1/chat/completions"
    );
    assert_eq!(
        UpstreamUrl::parse("https://api.openai.com").unwrap().join(None).unwrap().to_string(),
        "https://api.openai.com/"
    );
    let host = |base: &str| UpstreamUrl::parse(base).unwrap().host_header().to_str().unwrap().to_owned();
    assert_eq!(host("https://api.openai.com/v1"), "api.openai.com");
    assert_eq!(host("https://api.openai.com:443"), "api.openai.com", "the default port is left out");
    assert_eq!(host("http://10.0.0.7:80/openai"), "10.0.0.7");
    assert_eq!(host("http://10.0.0.7:8080/openai"), "10.0.0.7:8080");
    assert_eq!(host("https://[::1]:8443"), "[::1]:8443");
    assert_eq!(UpstreamUrl::parse("not a url"), None);
    assert_eq!(UpstreamUrl::parse("/just/a/path"), None, "no scheme or host");
}

#[test]
fn a_token_route_stays_small() {
    // Every token's route sits in a slot of the map, at most half full: its size is the
    // memory of 100,000 tokens. Budgets are one pointer (most tokens have none).
    assert!(std::mem::size_of::<TokenRoute>() <= 168, "{}", std::mem::size_of::<TokenRoute>());
    assert_eq!(std::mem::size_of::<crate::windows::WindowLimits>(), 8);
}
