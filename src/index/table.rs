//! The routing table: an immutable snapshot the proxy reads on every request.
//!
//! Plain data, no kube types; upstream URLs and keys are kept parsed as `http` types,
//! ready for the request. `authorize` is the whole hot-path decision:
//! token hash in, a [`Route`] (owned `Arc`s, no copies) or a [`Denial`] out.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use hyper::Uri;
use hyper::header::HeaderValue;
use hyper::http::uri::{self, Authority, PathAndQuery, Scheme};

use crate::api::AllowedNamespaces;
use crate::apikey::{ApiKey, KeyProblem};
use crate::fate::{Facts, Fate};
use crate::models::ModelAllowlist;
use crate::pricing::Prices;
use crate::token::TokenHash;
use crate::windows::WindowLimits;

pub use super::token_map::{TokenMap, TokenRef};

/// A token the proxy knows, as of the last watch event.
///
/// `repr(C)` keeps the fields [`RouteTable::authorize`] reads first, right after the
/// token's hash in its slot of the map, so a token not used recently costs the cache
/// lines of one slot, not one miss per field.
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub struct TokenRoute {
    /// Name of its Project.
    pub project: Arc<str>,
    /// `metadata.uid` of the Project it was minted for (`None`: minted before tokens
    /// recorded it); see [`crate::binding`].
    pub project_uid: Option<Arc<str>>,
    /// When it was issued, in Unix microseconds.
    pub issued_at_us: i64,
    /// When it expires, in Unix microseconds.
    pub expires_at_us: i64,
    /// Lifetime cap on forwarded requests.
    pub max_requests: Option<u64>,
    /// Requests already counted in its status.
    pub request_count: u64,
    /// `spec.revoked`, or the controller already marked it `Revoked`.
    pub revoked: bool,
    /// Namespace of the ProxyToken.
    pub namespace: Arc<str>,
    /// Name of the ProxyToken.
    pub name: Arc<str>,
    /// `spec.limits.models`: the models its requests may name (`None`: any).
    pub models: Option<ModelAllowlist>,
    /// `spec.limits.requestsPerMinute`, over every replica.
    pub requests_per_minute: Option<u64>,
    /// `spec.limits.tokensPer*`, `lifetimeTokens` and `costPerMonth`, over every replica.
    pub window_limits: WindowLimits,
}

/// A project the proxy knows, with its key resolved from the Secret.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectRoute {
    /// Name of the Project.
    pub name: Arc<str>,
    /// `metadata.uid`: tokens minted for another object of the same name are refused.
    pub uid: Arc<str>,
    /// `metadata.creationTimestamp`, in Unix microseconds.
    pub created_at_us: i64,
    /// Active and not being deleted.
    pub active: bool,
    /// Tokens issued before this (Unix microseconds) are revoked.
    pub tokens_not_before_us: Option<i64>,
    /// Upstream base URL, without a trailing slash.
    pub upstream: Arc<str>,
    /// The same, parsed (`None`: not a URL the proxy can send to).
    pub upstream_url: Option<UpstreamUrl>,
    /// The upstream key, or why there is none.
    pub key: Result<Arc<ApiKey>, KeyProblem>,
    /// `spec.allowedNamespaces`: which namespaces' tokens it serves ([`crate::grant`]).
    pub grant: Option<AllowedNamespaces>,
    /// `spec.limits.models`: the models its tokens' requests may name (`None`: any).
    pub models: Option<ModelAllowlist>,
    /// `spec.limits.tokensPer*`, `lifetimeTokens` and `costPerMonth`, for all its tokens together.
    pub window_limits: WindowLimits,
    /// `spec.limits.requestsPerMinute`, for all its tokens together.
    pub requests_per_minute: Option<u64>,
    /// The PriceList its cost budgets are priced from (`spec.priceList`, or `default`).
    pub price_list: Arc<str>,
    /// That list's prices; `None` while it does not exist.
    pub prices: Option<Arc<Prices>>,
}

impl ProjectRoute {
    /// Whether it limits its tokens' requests together (windows the proxies account).
    pub fn has_limits(&self) -> bool {
        !self.window_limits.is_empty() || self.requests_per_minute.is_some()
    }
}

/// An upstream base URL, parsed once: each request's path and query are joined to it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamUrl {
    scheme: Scheme,
    authority: Authority,
    /// The URL's own path, without a trailing slash (empty for none).
    path: Arc<str>,
    /// The `Host` header of an HTTP/1.1 request to it: the authority without a default port.
    host: HeaderValue,
}

impl UpstreamUrl {
    /// Parses `url`: a scheme, a host and an optional path (a trailing slash is ignored).
    pub fn parse(url: &str) -> Option<Self> {
        let parts = url.parse::<Uri>().ok()?.into_parts();
        let path = parts.path_and_query.as_ref().map_or("", |pq| pq.as_str()).trim_end_matches('/');
        let (scheme, authority) = (parts.scheme?, parts.authority?);
        let default_port = match scheme.as_str() {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        };
        let host = match authority.port_u16() {
            Some(port) if Some(port) == default_port => HeaderValue::from_str(authority.host()),
            _ => HeaderValue::from_str(authority.as_str()),
        }
        .ok()?;
        Some(Self { scheme, authority, path: Arc::from(path), host })
    }

    /// Where a request for `path_and_query` goes: the request's own path and query
    /// after the URL's path.
    pub fn join(&self, path_and_query: Option<&PathAndQuery>) -> Option<Uri> {
        let mut parts = uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(self.path_and_query(path_and_query)?);
        Uri::from_parts(parts).ok()
    }

    /// The path and query of a request for `path_and_query` on this upstream (what an
    /// HTTP/1.1 request line carries).
    pub fn path_and_query(&self, path_and_query: Option<&PathAndQuery>) -> Option<PathAndQuery> {
        match path_and_query {
            Some(pq) if self.path.is_empty() => Some(pq.clone()),
            pq => PathAndQuery::try_from(format!("{}{}", self.path, pq.map_or("/", |pq| pq.as_str()))).ok(),
        }
    }

    /// The scheme: `http` or `https` (the CRD's schema admits no other).
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// Host and port, as in the URL.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The value of an HTTP/1.1 request's `Host` header for this upstream.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host
    }
}

/// Why a request is refused before it goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No token with that hash.
    TokenNotFound,
    /// Revoked, directly or in bulk.
    TokenRevoked,
    /// Past its expiry.
    TokenExpired,
    /// `maxRequests` used up.
    TokenExhausted,
    /// The project no longer grants the token's namespace (`allowedNamespaces`).
    NamespaceNotAllowed,
    /// The Project it was minted for no longer exists (deleted, or replaced by a new
    /// Project of the same name).
    ProjectDeleted,
    /// The project is inactive or being deleted.
    ProjectInactive,
    /// The project has no usable key.
    ProjectKeyInvalid,
}

/// A request that may go upstream.
#[derive(Debug, Clone)]
pub struct Route {
    /// The token used.
    pub token: TokenRef,
    /// Its project.
    pub project: Arc<ProjectRoute>,
    /// The key to send upstream.
    pub key: Arc<ApiKey>,
}

/// Token hashes are SHA-256 outputs, already uniformly distributed: their first eight
/// bytes are a perfect hash, and clients cannot choose which hashes a map holds.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (i * 8);
        }
    }
}

/// FNV-1a for project names: they are chosen by cluster admins, not by clients, so
/// nobody can flood the map, and short names hash far cheaper than with SipHash.
pub struct NameHasher(u64);

impl Default for NameHasher {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Projects by name.
pub type ProjectMap = HashMap<Arc<str>, Arc<ProjectRoute>, BuildHasherDefault<NameHasher>>;

/// Namespace labels by namespace name.
pub type NamespaceLabels = HashMap<String, BTreeMap<String, String>>;

/// One consistent view of every project and token.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    /// Increases with every published snapshot.
    pub generation: u64,
    /// All three watches have listed once; before that the proxy refuses everything.
    pub ready: bool,
    pub(crate) tokens: TokenMap,
    pub(crate) projects: ProjectMap,
    pub(crate) namespaces: Arc<NamespaceLabels>,
}

impl RouteTable {
    /// Decides whether a request with the token of hash `hash` may go upstream at `now_us`.
    pub fn authorize(&self, hash: &TokenHash, now_us: i64) -> Result<Route, Denial> {
        let token = self.tokens.get(hash).ok_or(Denial::TokenNotFound)?;
        let project = self.projects.get(&token.project).filter(|p| {
            crate::fate::is_bound(token.project_uid.as_deref(), token.issued_at_us, &p.uid, p.created_at_us)
        });
        let facts = Facts {
            bound: project.is_some(),
            revoked: token.revoked,
            bulk_revoked: project
                .and_then(|p| p.tokens_not_before_us)
                .is_some_and(|not_before| token.issued_at_us < not_before),
            expired: now_us >= token.expires_at_us,
            exhausted: token.max_requests.is_some_and(|max| token.request_count >= max),
            namespace_allowed: project.is_some_and(|p| self.grants(p, &token.namespace)),
            project_active: project.is_some_and(|p| p.active),
        };
        let denial = match facts.fate() {
            Fate::Usable => None,
            Fate::ProjectDeleted => Some(Denial::ProjectDeleted),
            Fate::Revoked | Fate::BulkRevoked => Some(Denial::TokenRevoked),
            Fate::Expired => Some(Denial::TokenExpired),
            Fate::Exhausted => Some(Denial::TokenExhausted),
            Fate::NamespaceNotAllowed => Some(Denial::NamespaceNotAllowed),
            Fate::ProjectInactive => Some(Denial::ProjectInactive),
        };
        match (denial, project) {
            (Some(denial), _) => Err(denial),
            (None, Some(project)) => {
                let key = project.key.as_ref().map_err(|_| Denial::ProjectKeyInvalid)?;
                Ok(Route { token, project: project.clone(), key: key.clone() })
            }
            (None, None) => Err(Denial::ProjectDeleted),
        }
    }

    /// Whether `project` grants `namespace` now; labels are looked up only for selectors.
    fn grants(&self, project: &ProjectRoute, namespace: &str) -> bool {
        let grant = project.grant.as_ref();
        if !crate::grant::needs_labels(grant) {
            return crate::grant::admits(grant, &BTreeMap::new());
        }
        // A namespace the watch does not know (yet, or any more) has no labels.
        self.namespaces.get(namespace).is_some_and(|labels| crate::grant::admits(grant, labels))
    }

    /// The token of hash `hash`, usable or not.
    pub fn token(&self, hash: &TokenHash) -> Option<TokenRef> {
        self.tokens.get(hash)
    }

    /// Whether the table holds a token of hash `hash`, usable or not.
    pub fn has_token(&self, hash: &TokenHash) -> bool {
        self.tokens.get(hash).is_some()
    }

    /// Number of tokens in the table.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Number of projects in the table.
    pub fn project_count(&self) -> usize {
        self.projects.len()
    }

    /// The project named `name`, if known.
    pub fn project(&self, name: &str) -> Option<&Arc<ProjectRoute>> {
        self.projects.get(name)
    }
}
