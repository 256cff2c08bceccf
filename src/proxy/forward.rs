//! Sends an authorised request upstream with the project's key and returns the
//! upstream's response, streaming both bodies.
//!
//! In: the client's request and its [`Route`]. Out: the upstream response with
//! hop-by-hop headers removed, or a [`ProxyError`] (502/504).

use std::sync::Arc;
use std::time::Duration;

use hyper::header::{self, HeaderMap, HeaderName};
use hyper::{Request, Response, Version};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use super::ProxySettings;
use super::error::ProxyError;
use super::model::{Replayed, SecondModel};
use super::pool::{Pool, Pooled};
use crate::index::Route;
use http_body_util::{LengthLimitError, Limited};

/// Client headers that could steer the upstream account or leak proxy state: the
/// upstream key alone decides which organisation and project pay.
const STRIPPED_REQUEST_HEADERS: &[&str] = &["openai-organization", "openai-project"];

/// Response headers that belong to the upstream account, not to the client: which
/// organization and project the real key belongs to, and its cookies.
const STRIPPED_RESPONSE_HEADERS: &[&str] = &["openai-organization", "openai-project", "set-cookie"];

/// A request body on its way upstream: cut off at the size limit. Boxed: hyper's
/// channel to each upstream connection allocates 32 request slots up front, and a slot
/// holds the whole `Request<Outgoing>` — 17.7 KiB per connection with the body inline
/// (heaptrack, 1,000 open streams), about half of that with a pointer to it.
type Outgoing = Box<Limited<Replayed>>;

/// A response body from the upstream.
pub(crate) type UpstreamBody = Pooled<Outgoing>;

/// The upstream client of one serving thread, with its connections.
pub(crate) struct Upstream {
    pool: Pool<Outgoing>,
    response_timeout: Duration,
    max_request_body: u64,
}

/// Most bytes buffered from one upstream connection before the response reads them.
pub(crate) const UPSTREAM_READ_BUFFER: usize = 16 * 1024;

impl Upstream {
    /// Builds the client: TLS (the public web roots and `settings.upstream_ca`) or plain
    /// HTTP; HTTP/1.1, or HTTP/2 where ALPN offers it if `settings.upstream_http2`.
    pub(crate) fn new(settings: &ProxySettings) -> Self {
        // hyper grows a connection's read buffer while reads fill it, up to 400 KiB:
        // with thousands of streams and a proxy behind on CPU, every upstream
        // connection got there (2.7 GB for 9,750 streams, `just bench-streams`).
        // 16 KiB bounds a response head more generously than nginx's 4–8 KiB.
        let pool = Pool::new(connector(settings), UPSTREAM_READ_BUFFER);
        Self { pool, response_timeout: settings.response_timeout, max_request_body: settings.max_request_body }
    }

    /// Forwards `request` to the route's upstream. The response body is not read here.
    pub(crate) async fn forward(
        &self,
        mut request: Request<Replayed>,
        route: &Route,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_request_body) {
            return Err(ProxyError::PayloadTooLarge);
        }
        let upstream = route.project.upstream_url.as_ref().ok_or(ProxyError::UpstreamError)?;
        *request.uri_mut() = upstream.join(request.uri().path_and_query()).ok_or(ProxyError::UpstreamError)?;
        // The connection decides the wire version (ALPN); the client's own version
        // (h2c, HTTP/1.0) has nothing to do with it.
        *request.version_mut() = Version::HTTP_11;

        let headers = request.headers_mut();
        strip_hop_by_hop(headers);
        headers.remove(header::HOST);
        for name in STRIPPED_REQUEST_HEADERS {
            headers.remove(*name);
        }
        headers.insert(header::AUTHORIZATION, route.key.authorization());

        // Bodies without a declared length are cut off at the limit while they stream.
        let request = request.map(|body| Box::new(Limited::new(body, self.max_request_body as usize)));
        let mut response = match tokio::time::timeout(self.response_timeout, self.pool.send(upstream, request)).await {
            Err(_elapsed) => return Err(ProxyError::UpstreamTimeout),
            Ok(Err(error)) if caused_by::<LengthLimitError>(&error) => return Err(ProxyError::PayloadTooLarge),
            // Cut before its end: the upstream never got a complete request.
            Ok(Err(error)) if caused_by::<SecondModel>(&error) => return Err(ProxyError::ModelAmbiguous),
            Ok(Err(error)) => {
                tracing::warn!(project = %route.project.name, error = %crate::telemetry::Chain(&error), "upstream request failed");
                return Err(ProxyError::UpstreamError);
            }
            Ok(Ok(response)) => response,
        };
        let headers = response.headers_mut();
        strip_hop_by_hop(headers);
        for name in STRIPPED_RESPONSE_HEADERS {
            headers.remove(*name);
        }
        Ok(response)
    }
}

/// How the proxy connects to upstreams: TCP with `settings.connect_timeout`, then TLS
/// (the public web roots and `settings.upstream_ca`) for `https`; ALPN offers HTTP/2
/// only if `settings.upstream_http2`.
pub(crate) fn connector(settings: &ProxySettings) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_nodelay(true);
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let (_, ignored) = roots.add_parsable_certificates(settings.upstream_ca.iter().cloned());
    if ignored > 0 {
        tracing::warn!(ignored, "some upstream CA certificates are not usable trust anchors and are ignored");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1();
    // HTTP/1.1 unless asked: with one connection per concurrent request it measured
    // about 1.25× the throughput of HTTP/2, at a lower p50 (benches/tls.md).
    match settings.upstream_http2 {
        true => https.enable_http2().wrap_connector(http),
        false => https.wrap_connector(http),
    }
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, including those the
/// `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, no removals.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name == header::PROXY_AUTHENTICATE
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// Whether `error` or one of its sources is an `E`.
fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<E>() {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }
}

#[cfg(test)]
mod fuzz {
    use hyper::header::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Every header the Connection header names is removed, whatever the spacing
        /// and case; headers it does not name stay.
        #[test]
        fn headers_named_in_connection_are_removed(
            names in prop::collection::vec("[a-z][a-z0-9-]{0,15}", 1..6),
            spaces in prop::collection::vec(" {0,2}", 6),
        ) {
            prop_assume!(!names.iter().any(|n| n == "x-kept"));
            let mut headers = HeaderMap::new();
            for name in &names {
                headers.insert(HeaderName::try_from(name.as_str()).unwrap(), HeaderValue::from_static("v"));
            }
            headers.insert("x-kept", HeaderValue::from_static("v"));
            let listed: Vec<String> =
                names.iter().zip(&spaces).map(|(n, s)| format!("{s}{}{s}", n.to_ascii_uppercase())).collect();
            headers.insert(header::CONNECTION, HeaderValue::from_str(&listed.join(",")).unwrap());
            strip_hop_by_hop(&mut headers);
            for name in &names {
                prop_assert!(!headers.contains_key(name.as_str()), "{} named in Connection was kept", name);
            }
            prop_assert!(headers.contains_key("x-kept"));
        }

        /// Arbitrary Connection header values never panic the hop-by-hop stripper, and
        /// the hop-by-hop headers themselves are always gone.
        #[test]
        fn stripping_survives_any_connection_header(value in "[ -~]{0,200}") {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(header::CONNECTION, value);
            }
            headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            strip_hop_by_hop(&mut headers);
            prop_assert!(!headers.contains_key(header::CONNECTION));
            prop_assert!(!headers.contains_key(header::TRANSFER_ENCODING));
        }
    }
}
