//! The data plane: client request in, upstream response out.
//!
//! `request → path allowlist → bearer token (shape, checksum) → routing table →
//! key swap → upstream → streamed response`. Every refusal is a [`ProxyError`] in
//! OpenAI's JSON shape; every request is one JSON access-log line without secrets.

mod budget;
mod budget_claims;
mod error;
pub(crate) mod forward;
mod listing;
pub(crate) mod llm_usage;
mod model;
pub(crate) mod paths;
pub(crate) mod pool;
pub(crate) mod quota;
pub(crate) mod server;
pub(crate) mod stream;

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, header};

pub(crate) use error::{ProxyError, Refused};
pub(crate) use forward::{Upstream, UpstreamBody};

use crate::index::{Route, TokenRef, watch::SharedTable};
use crate::metrics::{Metrics, Name, RequestCounters, SpendLabels, TokenUsageLabels};
use crate::pricing::Price;
use crate::proxy::quota::Quota;
use crate::token::{self, TokenHash};

/// Response body: streamed from upstream or a small JSON error.
pub(crate) type Body = BoxBody<Bytes, BoxError>;

/// Any body or handler error.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A complete body from bytes.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed()
}

/// Settings of the data plane.
#[derive(Clone, Debug)]
pub(crate) struct ProxySettings {
    /// How long to wait for the upstream's TCP/TLS connection.
    pub connect_timeout: Duration,
    /// How long to wait for the upstream's response headers.
    pub response_timeout: Duration,
    /// How long a streamed response may go without a chunk before it is ended.
    pub idle_timeout: Duration,
    /// Largest request body forwarded; larger ones get 413.
    pub max_request_body: u64,
    /// Most body bytes read to find the model when a model allowlist applies.
    pub model_lookahead: usize,
    /// CA certificates trusted for upstream TLS besides the public web roots.
    pub upstream_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Offer HTTP/2 to HTTPS upstreams; otherwise HTTP/1.1 only.
    pub upstream_http2: bool,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(300),
            max_request_body: 32 * 1024 * 1024,
            model_lookahead: 1024 * 1024,
            upstream_ca: Vec::new(),
            upstream_http2: false,
        }
    }
}

/// Most request headers the proxy accepts (each value of a repeated header counts).
pub(crate) const MAX_HEADERS: usize = 100;

/// Most bytes of header names and values the proxy accepts.
pub(crate) const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The request handler shared by every connection.
pub(crate) struct Proxy {
    table: SharedTable,
    upstream: Upstream,
    quota: std::sync::Arc<Quota>,
    metrics: std::sync::Arc<Metrics>,
    /// This thread's handles on the request counter (a handler serves one thread).
    requests: RequestCounters,
    idle_timeout: Duration,
    model_lookahead: usize,
}

impl Proxy {
    /// A proxy over `table`.
    pub(crate) fn new(
        table: SharedTable,
        quota: std::sync::Arc<Quota>,
        metrics: std::sync::Arc<Metrics>,
        settings: &ProxySettings,
    ) -> Self {
        Self {
            table,
            upstream: Upstream::new(settings),
            quota,
            metrics,
            requests: RequestCounters::default(),
            idle_timeout: settings.idle_timeout,
            model_lookahead: settings.model_lookahead,
        }
    }

    /// Handles one request; never fails (errors become JSON responses). Its access line
    /// is written once the answer's body has been sent (or dropped), with the usage the
    /// upstream reported; at once for an answer of the proxy's own.
    pub(crate) async fn handle(&self, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let (response, token, outcome, upstream_time) = match self.route_and_forward(request).await {
            Ok((response, admitted, upstream_time)) => {
                let route = &admitted.route;
                let outcome = match response.status().as_u16() {
                    200..=399 => "upstream_2xx",
                    400..=499 => "upstream_4xx",
                    _ => "upstream_5xx",
                };
                let counted = paths::reports_usage(&method, &path) && response.status().is_success();
                if method == hyper::Method::GET && path == "/v1/models" && listing::limited(route) {
                    let (response, outcome) = match listing::narrow(response, route).await {
                        Ok(response) => (response, outcome),
                        Err(refused) => {
                            let code = refused.error.code();
                            (refused.into_response(), code)
                        }
                    };
                    AccessLine::new(method, path, response.status().as_u16(), started, Some(&route.token)).write();
                    (response, Some(admitted.route.token), outcome, Some(upstream_time))
                } else {
                    let status = response.status().as_u16();
                    let (token, pending) =
                        (route.token.clone(), AccessLine::new(method, path, status, started, Some(&route.token)));
                    (self.tap_usage(response, admitted, counted, pending), Some(token), outcome, Some(upstream_time))
                }
            }
            Err((refused, token)) => {
                let code = refused.error.code();
                let response = refused.into_response();
                AccessLine::new(method, path, response.status().as_u16(), started, token.as_ref()).write();
                (response, token, code, None)
            }
        };
        static NO_PROJECT: std::sync::LazyLock<std::sync::Arc<str>> =
            std::sync::LazyLock::new(|| std::sync::Arc::from(""));
        let project = token.as_ref().map_or(&*NO_PROJECT, |t| &t.project);
        self.requests.count(&self.metrics, project, outcome);
        self.metrics.latencies(started.elapsed(), upstream_time);
        Ok(response)
    }

    /// Streams the upstream body back, counting the tokens it reports when `counted`
    /// (a successful answer of an endpoint that reports usage) and it is JSON or an
    /// event stream: a file download whose bytes contain `"usage"` counts nothing. The
    /// budgets' `reservation` is settled with that usage when the body ends, and its
    /// cost at `price` (that of the request's model, where one is known) is counted.
    /// `answering` is held until then: the token's series cannot go before it counted.
    /// `line` is written when the body has ended or is dropped, with the usage if any.
    fn tap_usage(
        &self,
        response: Response<UpstreamBody>,
        admitted: Admitted,
        counted: bool,
        mut line: AccessLine,
    ) -> Response<Body> {
        let Admitted { route, reservation, price, answering } = admitted;
        let metrics = self.metrics.clone();
        let token = route.token;
        let content_type = response.headers().get(header::CONTENT_TYPE).map(|v| v.as_bytes());
        let event_stream = content_type.is_some_and(|v| v.starts_with(b"text/event-stream"));
        let counted = counted && (event_stream || content_type.is_some_and(|v| v.starts_with(b"application/json")));
        let idle = self.idle_timeout;
        response.map(move |body| {
            let guarded = stream::Guarded::new(body, idle, event_stream);
            if !counted {
                // Dropped with the request: an answer that reports no usage costs none.
                drop((reservation, answering));
                return Holding { inner: guarded, _held: line }.boxed();
            }
            // A body cut short (the client went away) is charged what it reserved.
            let mut reservation = reservation;
            if let Some(reservation) = &mut reservation {
                reservation.charge_if_cut();
            }
            // Written when the tap reports, or dropped with it when the body is cut short.
            llm_usage::UsageTap::new(guarded, move |usage: Option<llm_usage::TokenUsage>| {
                let _answering = answering;
                line.record(usage);
                let Some(usage) = usage else {
                    // Ended without usage: a stream without `include_usage`.
                    if let Some(reservation) = reservation {
                        reservation.settle_unreported();
                    }
                    return;
                };
                if let Some(reservation) = reservation {
                    reservation.settle(budget::Used { prompt: usage.prompt, completion: usage.completion });
                }
                if let Some(price) = price {
                    let labels = SpendLabels {
                        project: Name(token.project.clone()),
                        token_namespace: Name(token.namespace.clone()),
                        token_name: Name(token.name.clone()),
                    };
                    let dollars = price.cost(usage.prompt, usage.completion) as f64 / 1e6;
                    metrics.upstream_cost.get_or_create(&labels).inc_by(dollars);
                }
                for (kind, count) in [("prompt", usage.prompt), ("completion", usage.completion)] {
                    let labels = TokenUsageLabels {
                        project: Name(token.project.clone()),
                        token_namespace: Name(token.namespace.clone()),
                        token_name: Name(token.name.clone()),
                        kind,
                    };
                    metrics.upstream_tokens.get_or_create(&labels).inc_by(count);
                }
            })
            .boxed()
        })
    }

    async fn route_and_forward(
        &self,
        request: Request<Incoming>,
    ) -> Result<(Response<UpstreamBody>, Admitted, Duration), (Refused, Option<TokenRef>)> {
        let refused = |error: ProxyError| (Refused::from(error), None);
        check_header_size(request.headers()).map_err(refused)?;
        paths::check(request.method(), request.uri().path()).map_err(|e| refused(e.into()))?;
        let hash = bearer_token_hash(&request).map_err(refused)?;
        let table = self.table.load();
        if !table.ready {
            return Err(refused(ProxyError::NotReady));
        }
        let now = now_us();
        // A refused token the table knows is named in the access line and the metrics.
        let route =
            table.authorize(&hash, now).map_err(|d| (Refused::from(ProxyError::from(d)), table.token(&hash)))?;
        drop(table);
        // Before the quota: a refused model spends none of the token's budget.
        let (request, price) = match model::admit(request, &route, self.model_lookahead).await {
            Ok(admitted) => admitted,
            Err(refusal) => return Err((refusal, Some(route.token))),
        };
        // Now, not when the headers came: the model check may have waited for the body.
        let mut request = request;
        if request.method() == hyper::Method::GET && request.uri().path() == "/v1/models" && listing::limited(&route) {
            listing::prepare(&mut request);
        }
        let (reservation, answering) = match self.quota.admit(hash, &route, now_us(), price).await {
            Ok(admitted) => admitted,
            Err(error) => return Err((error, Some(route.token))),
        };
        let sent = Instant::now();
        match self.upstream.forward(request, &route).await {
            Ok(response) => Ok((response, Admitted { route, reservation, price, answering }, sent.elapsed())),
            Err(error) => Err((error.into(), Some(route.token))),
        }
    }
}

/// A request on its way upstream: its route, its reservations in the budgets, the
/// price of its model where a cost budget needed it, and its token's hold on its
/// counters until the answer ends.
struct Admitted {
    route: Route,
    reservation: Option<budget::Reservation>,
    price: Option<Price>,
    answering: quota::Answering,
}

/// Refuses more than [`MAX_HEADERS`] headers or [`MAX_HEADER_BYTES`] of them.
fn check_header_size(headers: &header::HeaderMap) -> Result<(), ProxyError> {
    if headers.len() > MAX_HEADERS {
        return Err(ProxyError::HeadersTooLarge);
    }
    let bytes: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    if bytes > MAX_HEADER_BYTES {
        return Err(ProxyError::HeadersTooLarge);
    }
    Ok(())
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

/// One request's access line, written when it is dropped: with the request (an answer
/// of the proxy's own), or with the answer's body once it has been sent, cut short, or
/// its usage read.
struct AccessLine {
    method: hyper::Method,
    path: String,
    status: u16,
    started: Instant,
    /// Until the answer's headers.
    headers_after: Duration,
    /// The token, when the request named one the proxy knows (refused ones too).
    token: Option<TokenRef>,
    /// What the upstream reported it used, where the answer says.
    usage: Option<llm_usage::TokenUsage>,
}

impl AccessLine {
    /// The line of a request that began at `started`, its answer's headers ready now.
    fn new(method: hyper::Method, path: String, status: u16, started: Instant, token: Option<&TokenRef>) -> Self {
        let headers_after = started.elapsed();
        Self { method, path, status, started, headers_after, token: token.cloned(), usage: None }
    }

    /// Writes it now.
    fn write(self) {
        drop(self);
    }

    /// Adds what the upstream reported it used.
    fn record(&mut self, usage: Option<llm_usage::TokenUsage>) {
        self.usage = usage;
    }
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let (namespace, name, project) =
            self.token.as_ref().map_or(("", "", ""), |t| (&*t.namespace, &*t.name, &*t.project));
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let (method, path, status) = (self.method.as_str(), self.path.as_str(), self.status);
        let (latency_us, duration_us) = (micros(self.headers_after), micros(self.started.elapsed()));
        // An absent usage leaves its fields out of the line (tracing skips a `None`).
        tracing::info!(
            target: "access",
            token_namespace = namespace,
            token_name = name,
            project,
            method,
            path,
            status,
            latency_us,
            duration_us,
            prompt_tokens = self.usage.map(|u| u.prompt),
            completion_tokens = self.usage.map(|u| u.completion),
            "request"
        );
    }
}

/// A body that holds `_held` until it is dropped.
struct Holding<B, T> {
    inner: B,
    _held: T,
}

impl<B: hyper::body::Body + Unpin, T: Unpin> hyper::body::Body for Holding<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
