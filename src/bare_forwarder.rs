//! The floor under the proxy's request path, for `benches/ab.sh`: the proxy's own HTTP
//! server (`server::serve_threads`, one single-threaded runtime per thread) and its own
//! upstream connection pool, with nothing in between: no token check, no key swap, no
//! usage count, no metrics, no access log. What a request costs here is what hyper and
//! the kernel cost; what `llm-proxy proxy` costs beyond it is the proxy's own work.
//!
//! In: any request. Out: the same request sent to the upstream URL (its path joined to
//! the URL's, `Host` replaced), its answer streamed back; 502 when the upstream fails.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Version, header};

use crate::index::UpstreamUrl;
use crate::proxy::forward::{UPSTREAM_READ_BUFFER, connector};
use crate::proxy::pool::Pool;
use crate::proxy::{Body, ProxySettings, full, server};

/// Forwards every request arriving on `listener` to `upstream` on `threads` serving
/// threads, until the process ends.
pub async fn serve(listener: std::net::TcpListener, upstream: &str, threads: usize) -> std::io::Result<()> {
    let url = UpstreamUrl::parse(upstream)
        .ok_or_else(|| std::io::Error::other(format!("{upstream:?} is not an http:// or https:// URL")))?;
    let make_handler = || {
        let pool = Arc::new(Pool::<Outgoing>::new(connector(&ProxySettings::default()), UPSTREAM_READ_BUFFER));
        let url = url.clone();
        move |request: Request<Incoming>| {
            let (pool, url) = (pool.clone(), url.clone());
            async move { Ok::<_, Infallible>(forward(&pool, &url, request).await) }
        }
    };
    let (_keep_running, running) = tokio::sync::watch::channel(false);
    // No caps: `benches/streams.sh` holds thousands of streams from one client here.
    let limits =
        server::ConnectionLimits { max_connections: usize::MAX, max_per_client: usize::MAX, ..Default::default() };
    let connections = server::Connections::new(limits);
    server::serve_threads(listener, threads, make_handler, running, Duration::ZERO, connections).await
}

/// The request body boxed, as the proxy's (`forward::Outgoing`): inline, it would make
/// each of the 32 slots hyper's channel to an upstream connection allocates at once as
/// large, and this floor larger than the proxy in memory per connection.
type Outgoing = Box<Incoming>;

async fn forward(pool: &Pool<Outgoing>, url: &UpstreamUrl, request: Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let Some(uri) = url.join(parts.uri.path_and_query()) else {
        return bad_gateway();
    };
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers.remove(header::HOST);
    match pool.send(url, Request::from_parts(parts, Box::new(body))).await {
        Ok(response) => response.map(|body| body.map_err(Into::into).boxed()),
        Err(_) => bad_gateway(),
    }
}

fn bad_gateway() -> Response<Body> {
    let mut response = Response::new(full("upstream failed\n"));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
