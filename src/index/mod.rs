//! Watch events in, routing table out.
//!
//! `[ Project ] <- [ ProxyToken ] -> [ Secret ]`, the labels of Namespaces (for
//! projects that grant namespaces by selector), and the PriceLists of cost budgets.
//!
//! [`Index`] is plain and synchronous: [`Index::apply`] takes one watch event of any of
//! the five kinds, [`Index::snapshot`] builds an immutable [`RouteTable`]. Relists
//! (`Init` … `InitDone`) replace a kind's state whole, so objects deleted while the
//! watch was down disappear. [`watch`] wires it to the API server.

mod table;
mod token_map;
pub mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use zeroize::Zeroizing;

pub use table::{
    Denial, DigestHasher, NameHasher, NamespaceLabels, ProjectMap, ProjectRoute, Route, RouteTable, TokenMap, TokenRef,
    TokenRoute, UpstreamUrl,
};

use crate::api::{AllowedNamespaces, PriceList, Project, ProxyToken, TokenPhase};
use crate::apikey::{ApiKey, KeyProblem};
use crate::duration::parse_go_duration;
use crate::models::ModelAllowlist;
use crate::pricing::Prices;
use crate::token::TokenHash;

/// One watch event of any kind the index follows.
#[derive(Debug)]
pub enum Change {
    /// A Project event.
    Project(Event<Project>),
    /// A ProxyToken event.
    Token(Event<ProxyToken>),
    /// A Secret event (operator namespace only).
    Secret(Event<Secret>),
    /// A Namespace event (its labels decide `allowedNamespaces` selectors).
    Namespace(Event<Namespace>),
    /// A PriceList event (the prices of cost budgets).
    PriceList(Event<PriceList>),
}

/// Which watch a resource version belongs to (namespaces are not reported: a label
/// change reaches every replica like any other event, but nothing waits on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Projects.
    Project,
    /// ProxyTokens.
    Token,
    /// Secrets.
    Secret,
}

#[derive(Clone)]
struct ProjectEntry {
    uid: Arc<str>,
    created_at_us: i64,
    active: bool,
    tokens_not_before_us: Option<i64>,
    upstream: Arc<str>,
    upstream_url: Option<UpstreamUrl>,
    secret_name: String,
    secret_key: String,
    grant: Option<AllowedNamespaces>,
    models: Option<ModelAllowlist>,
    window_limits: crate::windows::WindowLimits,
    requests_per_minute: Option<u64>,
    price_list: Arc<str>,
}

/// A key Secret as the index keeps it: which projects it is bound to, and its data.
struct KeySecret {
    binding: crate::apikey::KeyBinding,
    data: BTreeMap<String, Zeroizing<Vec<u8>>>,
}

/// A ProxyToken's (namespace, name).
type TokenKey = (String, String);

/// A minted token's hash and route.
type MintedRoute = (TokenHash, TokenRoute);

/// The highest `metadata.resourceVersion` of each kind whose events an index has
/// applied: every change of that kind up to it is in the routing table. Resource versions
/// of one API server are etcd revisions, and one kind's watch delivers them in order, so
/// "this replica enforces the change that produced version V" is `applied >= V`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Every kind has been listed once: before that the table enforces nothing.
    pub synced: bool,
    /// Projects.
    pub projects: u64,
    /// ProxyTokens.
    pub tokens: u64,
    /// Key Secrets.
    pub secrets: u64,
}

impl Applied {
    /// The version of `kind`.
    pub fn of(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Project => self.projects,
            Kind::Token => self.tokens,
            Kind::Secret => self.secrets,
        }
    }

    fn slot(&mut self, kind: Kind) -> &mut u64 {
        match kind {
            Kind::Project => &mut self.projects,
            Kind::Token => &mut self.tokens,
            Kind::Secret => &mut self.secrets,
        }
    }

    fn raise(&mut self, kind: Kind, version: u64) {
        let slot = self.slot(kind);
        *slot = (*slot).max(version);
    }

    fn reset(&mut self, kind: Kind) {
        *self.slot(kind) = 0;
    }
}

/// A resource version as a number; `0` for one that is not (never "enforced").
pub fn resource_version(meta: &kube::api::ObjectMeta) -> u64 {
    meta.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The proxy's view of the cluster, updated one event at a time.
#[derive(Default)]
pub struct Index {
    projects: HashMap<Arc<str>, ProjectEntry>,
    /// ProxyToken (namespace, name) → the hash it was indexed under.
    token_keys: HashMap<(String, String), TokenHash>,
    tokens: TokenMap,
    secrets: HashMap<String, KeySecret>,
    /// Namespace labels, shared with the snapshots until the next change.
    namespaces: Arc<NamespaceLabels>,
    /// PriceLists by name.
    price_lists: HashMap<String, Arc<Prices>>,
    /// One copy of each project name and uid and each namespace name, shared by the
    /// projects and all their tokens: a lookup then reads strings already in cache
    /// instead of one copy per token (two cache misses per request at 100,000 tokens).
    strings: HashSet<Arc<str>>,
    relisting: Relists,
    applied: Applied,
    /// Highest version seen in each kind's relist in progress, applied at its end.
    relist_versions: Applied,
    synced: [bool; 3],
    namespaces_synced: bool,
    price_lists_synced: bool,
    generation: u64,
    /// Something a snapshot shows changed since the last [`Index::take_changed`].
    changed: bool,
}

/// Objects buffered during a relist, applied whole at `InitDone`.
#[derive(Default)]
struct Relists {
    projects: Option<Vec<Project>>,
    /// Tokens are reduced to their routes as they arrive: a relist of 100,000 full
    /// objects (managedFields and all) would otherwise sit in memory until `InitDone`.
    tokens: Option<Vec<(TokenKey, Option<MintedRoute>)>>,
    secrets: Option<Vec<Secret>>,
    namespaces: Option<NamespaceLabels>,
    price_lists: Option<HashMap<String, Arc<Prices>>>,
}

impl Index {
    /// An empty, unsynced index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether anything a snapshot shows changed since the last call. Events of a
    /// relist in progress change nothing until its end: while 100,000 tokens stream in,
    /// no snapshot needs building.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The versions this index has applied, kind by kind.
    pub fn applied(&self) -> Applied {
        Applied { synced: self.is_synced(), ..self.applied }
    }

    /// Applies one watch event.
    pub fn apply(&mut self, change: Change) {
        let relist_item = matches!(
            &change,
            Change::Project(Event::Init | Event::InitApply(_))
                | Change::Token(Event::Init | Event::InitApply(_))
                | Change::Secret(Event::Init | Event::InitApply(_))
                | Change::Namespace(Event::Init | Event::InitApply(_))
                | Change::PriceList(Event::Init | Event::InitApply(_))
        );
        self.changed |= !relist_item;
        self.track_version(&change);
        match change {
            Change::Project(event) => self.apply_project(event),
            Change::Token(event) => self.apply_token(event),
            Change::Secret(event) => self.apply_secret(event),
            Change::Namespace(event) => self.apply_namespace(event),
            Change::PriceList(event) => self.apply_price_list(event),
        }
    }

    /// Whether every kind has been listed at least once.
    pub fn is_synced(&self) -> bool {
        self.synced.iter().all(|s| *s) && self.namespaces_synced && self.price_lists_synced
    }

    /// Builds the routing table for the current state.
    pub fn snapshot(&mut self) -> RouteTable {
        self.generation += 1;
        let projects = self
            .projects
            .iter()
            .map(|(name, p)| {
                let key = self.resolve_key(name, &p.secret_name, &p.secret_key).map(Arc::new);
                let route = ProjectRoute {
                    name: name.clone(),
                    uid: p.uid.clone(),
                    created_at_us: p.created_at_us,
                    active: p.active,
                    tokens_not_before_us: p.tokens_not_before_us,
                    upstream: p.upstream.clone(),
                    upstream_url: p.upstream_url.clone(),
                    key,
                    grant: p.grant.clone(),
                    models: p.models.clone(),
                    window_limits: p.window_limits.clone(),
                    requests_per_minute: p.requests_per_minute,
                    prices: self.price_lists.get(&*p.price_list).cloned(),
                    price_list: p.price_list.clone(),
                };
                (name.clone(), Arc::new(route))
            })
            .collect();
        RouteTable {
            generation: self.generation,
            ready: self.is_synced(),
            tokens: self.tokens.clone(),
            projects,
            namespaces: self.namespaces.clone(),
        }
    }

    fn track_version(&mut self, change: &Change) {
        fn step<K: kube::Resource>(event: &Event<K>) -> Step {
            match event {
                Event::Apply(o) | Event::Delete(o) => Step::Applied(resource_version(o.meta())),
                Event::Init => Step::RelistStarts,
                Event::InitApply(o) => Step::Listed(resource_version(o.meta())),
                Event::InitDone => Step::RelistDone,
            }
        }
        enum Step {
            Applied(u64),
            RelistStarts,
            Listed(u64),
            RelistDone,
        }
        let (kind, step) = match change {
            Change::Project(e) => (Kind::Project, step(e)),
            Change::Token(e) => (Kind::Token, step(e)),
            Change::Secret(e) => (Kind::Secret, step(e)),
            Change::Namespace(_) | Change::PriceList(_) => return,
        };
        match step {
            Step::Applied(version) => self.applied.raise(kind, version),
            Step::RelistStarts => self.relist_versions.reset(kind),
            Step::Listed(version) => self.relist_versions.raise(kind, version),
            // A relist's objects are in the table from its end on.
            Step::RelistDone => self.applied.raise(kind, self.relist_versions.of(kind)),
        }
    }

    fn resolve_key(&self, project: &str, secret: &str, key: &str) -> Result<ApiKey, KeyProblem> {
        let secret = self.secrets.get(secret).ok_or(KeyProblem::SecretNotFound)?;
        if !secret.binding.admits(project) {
            return Err(KeyProblem::NotBound);
        }
        let raw = secret.data.get(key).ok_or(KeyProblem::KeyNotFound)?;
        ApiKey::parse(raw)
    }

    fn apply_project(&mut self, event: Event<Project>) {
        match event {
            Event::Apply(p) => self.upsert_project(&p),
            Event::Delete(p) => {
                self.projects.remove(p.name_any().as_str());
            }
            Event::Init => self.relisting.projects = Some(Vec::new()),
            Event::InitApply(p) => self.relisting.projects.get_or_insert_with(Vec::new).push(p),
            Event::InitDone => {
                let listed = self.relisting.projects.take().unwrap_or_default();
                self.projects.clear();
                listed.iter().for_each(|p| self.upsert_project(p));
                self.strings.retain(|s| Arc::strong_count(s) > 1);
                self.mark_synced(Kind::Project);
            }
        }
    }

    fn upsert_project(&mut self, p: &Project) {
        let entry = ProjectEntry {
            uid: intern(&mut self.strings, p.metadata.uid.as_deref().unwrap_or_default()),
            created_at_us: p.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_microsecond()),
            active: p.spec.active && p.metadata.deletion_timestamp.is_none(),
            tokens_not_before_us: p.spec.tokens_not_before.as_ref().map(|t| t.0.as_microsecond()),
            upstream: Arc::from(p.spec.upstream.url.trim_end_matches('/')),
            upstream_url: UpstreamUrl::parse(&p.spec.upstream.url),
            secret_name: p.spec.api_key_secret_ref.name.clone(),
            secret_key: p.spec.api_key_secret_ref.key.clone(),
            grant: p.spec.allowed_namespaces.clone(),
            models: allowlist(p.spec.limits.as_ref()),
            window_limits: crate::windows::WindowLimits::of(p.spec.limits.as_ref()),
            requests_per_minute: p.spec.limits.as_ref().and_then(|l| l.requests_per_minute).map(|r| r.max(1) as u64),
            price_list: Arc::from(p.spec.price_list.as_deref().unwrap_or(crate::api::DEFAULT_PRICE_LIST)),
        };
        self.projects.insert(intern(&mut self.strings, &p.name_any()), entry);
    }

    fn apply_token(&mut self, event: Event<ProxyToken>) {
        match event {
            Event::Apply(t) => self.upsert_token(&t),
            Event::Delete(t) => self.remove_token(&token_key(&t)),
            Event::Init => self.relisting.tokens = Some(Vec::new()),
            Event::InitApply(t) => {
                let route = token_route(&t, &mut self.strings);
                self.relisting.tokens.get_or_insert_with(Vec::new).push((token_key(&t), route))
            }
            Event::InitDone => {
                let listed = self.relisting.tokens.take().unwrap_or_default();
                self.token_keys.clear();
                let mut routes = Vec::with_capacity(listed.len());
                for (key, route) in listed {
                    if let Some((hash, route)) = route {
                        self.token_keys.insert(key, hash);
                        routes.push((hash, route));
                    }
                }
                self.tokens = TokenMap::from_entries(routes);
                self.strings.retain(|s| Arc::strong_count(s) > 1);
                self.mark_synced(Kind::Token);
            }
        }
    }

    fn upsert_token(&mut self, t: &ProxyToken) {
        let route = token_route(t, &mut self.strings);
        self.upsert_route(token_key(t), route);
    }

    fn upsert_route(&mut self, key: TokenKey, route: Option<MintedRoute>) {
        let Some((hash, route)) = route else {
            // Not minted (yet): nothing to route. Drop any stale entry.
            self.remove_token(&key);
            return;
        };
        if let Some(old) = self.token_keys.insert(key, hash)
            && old != hash
        {
            self.tokens.remove(&old);
        }
        self.tokens.insert(hash, route);
    }

    fn remove_token(&mut self, key: &(String, String)) {
        if let Some(hash) = self.token_keys.remove(key) {
            self.tokens.remove(&hash);
        }
    }

    fn apply_secret(&mut self, event: Event<Secret>) {
        match event {
            Event::Apply(s) => self.upsert_secret(s),
            Event::Delete(s) => {
                self.secrets.remove(&s.name_any());
            }
            Event::Init => self.relisting.secrets = Some(Vec::new()),
            Event::InitApply(s) => self.relisting.secrets.get_or_insert_with(Vec::new).push(s),
            Event::InitDone => {
                let listed = self.relisting.secrets.take().unwrap_or_default();
                self.secrets.clear();
                listed.into_iter().for_each(|s| self.upsert_secret(s));
                self.mark_synced(Kind::Secret);
            }
        }
    }

    fn upsert_secret(&mut self, s: Secret) {
        let name = s.name_any();
        let data = s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, Zeroizing::new(v.0))).collect();
        let secret = KeySecret { binding: crate::apikey::KeyBinding::of(&s.metadata), data };
        self.secrets.insert(name, secret);
    }

    fn apply_namespace(&mut self, event: Event<Namespace>) {
        let labels = |ns: Namespace| (ns.name_any(), ns.metadata.labels.unwrap_or_default());
        match event {
            Event::Apply(ns) => {
                let (name, labels) = labels(ns);
                Arc::make_mut(&mut self.namespaces).insert(name, labels);
            }
            Event::Delete(ns) => {
                Arc::make_mut(&mut self.namespaces).remove(&ns.name_any());
            }
            Event::Init => self.relisting.namespaces = Some(NamespaceLabels::new()),
            Event::InitApply(ns) => {
                let (name, labels) = labels(ns);
                self.relisting.namespaces.get_or_insert_with(NamespaceLabels::new).insert(name, labels);
            }
            Event::InitDone => {
                self.namespaces = Arc::new(self.relisting.namespaces.take().unwrap_or_default());
                self.namespaces_synced = true;
            }
        }
    }

    fn apply_price_list(&mut self, event: Event<PriceList>) {
        let prices = |list: &PriceList| (list.name_any(), Arc::new(Prices::of(&list.spec)));
        match event {
            Event::Apply(list) => {
                let (name, prices) = prices(&list);
                self.price_lists.insert(name, prices);
            }
            Event::Delete(list) => {
                self.price_lists.remove(&list.name_any());
            }
            Event::Init => self.relisting.price_lists = Some(HashMap::new()),
            Event::InitApply(list) => {
                let (name, prices) = prices(&list);
                self.relisting.price_lists.get_or_insert_with(HashMap::new).insert(name, prices);
            }
            Event::InitDone => {
                self.price_lists = self.relisting.price_lists.take().unwrap_or_default();
                self.price_lists_synced = true;
            }
        }
    }

    fn mark_synced(&mut self, kind: Kind) {
        self.synced[kind as usize] = true;
    }
}

fn token_key(t: &ProxyToken) -> (String, String) {
    (t.namespace().unwrap_or_default(), t.name_any())
}

/// The shared copy of `s`.
fn intern(strings: &mut HashSet<Arc<str>>, s: &str) -> Arc<str> {
    if let Some(shared) = strings.get(s) {
        return shared.clone();
    }
    let shared: Arc<str> = Arc::from(s);
    strings.insert(shared.clone());
    shared
}

/// The route of a minted token, or `None` when it has not been minted.
fn token_route(t: &ProxyToken, strings: &mut HashSet<Arc<str>>) -> Option<MintedRoute> {
    let status = t.status.as_ref()?;
    let hash = TokenHash::parse(status.token_hash.as_deref()?)?;
    let issued_at_us = status.issued_at.as_ref()?.0.as_microsecond();
    // Expiry follows from the spec, so the proxy refuses on time even before the
    // controller has written `expiresAt`.
    let lifetime_us = parse_go_duration(&t.spec.duration).ok()?.as_micros();
    let expires_at_us = issued_at_us.saturating_add(i64::try_from(lifetime_us).unwrap_or(i64::MAX));
    let route = TokenRoute {
        namespace: intern(strings, t.metadata.namespace.as_deref().unwrap_or_default()),
        name: Arc::from(t.name_any()),
        project: intern(strings, &t.spec.project_ref.name),
        project_uid: status.project_uid.as_deref().map(|uid| intern(strings, uid)),
        issued_at_us,
        expires_at_us,
        revoked: t.spec.revoked || status.phase == Some(TokenPhase::Revoked),
        max_requests: t.spec.max_requests.map(|m| m.max(0) as u64),
        request_count: status.request_count.unwrap_or(0).max(0) as u64,
        models: allowlist(t.spec.limits.as_ref()),
        requests_per_minute: t.spec.limits.as_ref().and_then(|l| l.requests_per_minute).map(|r| r.max(1) as u64),
        window_limits: crate::windows::WindowLimits::of(t.spec.limits.as_ref()),
    };
    Some((hash, route))
}

/// The model allowlist of `limits`, if it has one.
fn allowlist(limits: Option<&crate::api::Limits>) -> Option<ModelAllowlist> {
    limits?.models.as_deref().map(ModelAllowlist::new)
}

#[cfg(test)]
mod tests;
