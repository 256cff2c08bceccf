//! The data plane: client request in, upstream response out.
//!
//! `request → path allowlist → bearer token (shape, checksum) → routing table →
//! key swap → upstream → streamed response`. Every refusal is a [`ProxyError`] in
//! OpenAI's JSON shape; every request is one JSON access-log line without secrets.

mod error;
mod forward;
pub mod paths;
pub mod server;
pub mod usage;

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, header};

pub use error::ProxyError;
pub use forward::{Upstream, strip_hop_by_hop};

use crate::index::{Route, watch::SharedTable};
use crate::proxy::usage::Usage;
use crate::token::{self, TokenHash};

/// Response body: streamed from upstream or a small JSON error.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed()
}

/// Settings of the data plane.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// How long to wait for the upstream's TCP/TLS connection.
    pub connect_timeout: Duration,
    /// How long to wait for the upstream's response headers.
    pub response_timeout: Duration,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self { connect_timeout: Duration::from_secs(10), response_timeout: Duration::from_secs(600) }
    }
}

/// The request handler shared by every connection.
pub struct Proxy {
    table: SharedTable,
    upstream: Upstream,
    usage: std::sync::Arc<Usage>,
}

impl Proxy {
    /// A proxy over `table`.
    pub fn new(table: SharedTable, usage: std::sync::Arc<Usage>, settings: &ProxySettings) -> Self {
        Self { table, upstream: Upstream::new(settings.connect_timeout, settings.response_timeout), usage }
    }

    /// The routing table this proxy reads.
    pub fn table(&self) -> &SharedTable {
        &self.table
    }

    /// Handles one request; never fails (errors become JSON responses).
    pub async fn handle(&self, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let (response, route) = match self.route_and_forward(request).await {
            Ok((response, route)) => (response.map(BodyExt::boxed), Some(route)),
            Err((error, route)) => (error.into_response(), route),
        };
        access_log(&method, &path, response.status().as_u16(), started.elapsed(), route.as_ref());
        Ok(response)
    }

    async fn route_and_forward(
        &self,
        request: Request<Incoming>,
    ) -> Result<(Response<Incoming>, Route), (ProxyError, Option<Route>)> {
        paths::check(request.method(), request.uri().path()).map_err(|e| (e.into(), None))?;
        let hash = bearer_token_hash(&request).map_err(|e| (e, None))?;
        let table = self.table.load();
        if !table.ready {
            return Err((ProxyError::NotReady, None));
        }
        let now = now_us();
        let route = table.authorize(&hash, now).map_err(|d| (d.into(), None))?;
        drop(table);
        if let Err(error) = self.usage.admit(hash, &route, now).await {
            return Err((error, Some(route)));
        }
        match self.upstream.forward(request, &route).await {
            Ok(response) => Ok((response, route)),
            Err(error) => Err((error, Some(route))),
        }
    }
}

/// Hashes the bearer token of `request` after checking its shape and checksum.
fn bearer_token_hash(request: &Request<Incoming>) -> Result<TokenHash, ProxyError> {
    let value = request.headers().get(header::AUTHORIZATION).ok_or(ProxyError::InvalidToken)?;
    let text = value.to_str().map_err(|_| ProxyError::InvalidToken)?;
    let (scheme, token) = text.split_once(' ').ok_or(ProxyError::InvalidToken)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ProxyError::InvalidToken);
    }
    let token = token.trim();
    token::check(token).map_err(|_| ProxyError::InvalidToken)?;
    Ok(TokenHash::of(token))
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

fn access_log(method: &hyper::Method, path: &str, status: u16, latency: Duration, route: Option<&Route>) {
    let (namespace, name, project) =
        route.map_or(("", "", ""), |r| (r.token.namespace.as_str(), r.token.name.as_str(), &*r.project.name));
    tracing::info!(
        target: "access",
        token_namespace = namespace,
        token_name = name,
        project,
        method = method.as_str(),
        path,
        status,
        latency_us = latency.as_secs_f64() * 1000.0,
        "request"
    );
}
