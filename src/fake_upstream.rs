//! A fast, scriptable stand-in for an OpenAI-compatible API, for tests and benchmarks.
//!
//! In: HTTP requests. Out: a fixed chat completion (with `usage`), an SSE stream when
//! the body asks for `"stream": true`, or a model list; and a record of every request
//! (method, path, headers, body length, and when each stream chunk was sent) that tests
//! read to check what really went upstream.
//!
//! Request headers steer it: `x-fake-chunks` (stream chunks, default 5),
//! `x-fake-chunk-delay-ms` (pause between chunks, default 0), `x-fake-break-after`
//! (drop the connection after this many chunks), `x-fake-status` (answer with this
//! status), `x-fake-delay-ms` (pause before answering), `x-fake-timestamps: 1` (each
//! stream chunk carries `"sent_us"`, when it was sent in Unix microseconds, for the
//! streams benchmark to measure each chunk's delay).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::proxy::{Body, full, server};

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// Body length in bytes.
    pub body_len: usize,
    /// When each stream chunk was handed to the connection (empty when not streamed).
    pub chunks_sent_at: Arc<Mutex<Vec<SystemTime>>>,
}

impl Recorded {
    /// A header as text, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }
}

/// A running fake upstream.
#[derive(Clone)]
pub struct FakeUpstream {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl FakeUpstream {
    /// Starts one on a free loopback port, recording requests.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::serve(listener, true))
    }

    /// A listener on `addr` (the first address it names) with the proxy's own backlog
    /// ([`server::LISTEN_BACKLOG`]). A provider's API takes a burst of new connections,
    /// and so must its stand-in: with the standard 128, its accept queue overflowed at
    /// 9,750 streams, and the benchmarks measured the stand-in's SYN retries.
    pub fn listen(addr: impl std::net::ToSocketAddrs) -> std::io::Result<std::net::TcpListener> {
        let addr = addr.to_socket_addrs()?.next().ok_or_else(|| std::io::Error::other("the address names no host"))?;
        server::listen(addr)
    }

    /// Serves on `listener`; `record: false` skips the request log (benchmarks).
    pub fn serve(listener: TcpListener, record: bool) -> Self {
        let url = format!("http://{}", listener.local_addr().expect("bound listener has an address"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let handler = move |request: Request<Incoming>| {
            let log = log.clone();
            Box::pin(async move { Ok::<_, Infallible>(answer(request, record.then_some(log)).await) })
                as std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Infallible>> + Send>>
        };
        // A stand-in for a provider's API: it takes whatever a benchmark opens.
        let limits =
            server::ConnectionLimits { max_connections: 1 << 20, max_per_client: 1 << 20, ..Default::default() };
        let connections = server::Connections::new(limits);
        tokio::spawn(server::serve(listener, handler, std::future::pending(), Duration::ZERO, connections));
        Self { url, requests }
    }

    /// Serves HTTPS on `listener` with `tls` (HTTP/1.1 and HTTP/2 by ALPN); `record` as
    /// in [`FakeUpstream::serve`]. Its URL names `localhost`, which the certificate
    /// must.
    pub fn serve_tls(listener: TcpListener, tls: std::sync::Arc<rustls::ServerConfig>, record: bool) -> Self {
        let port = listener.local_addr().expect("bound listener has an address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                // As HTTP servers do (ours, nginx): without it, the first answer on a
                // connection, written after TLS 1.3's session tickets, waits for the
                // client's delayed ACK of them (40 ms).
                let _ = stream.set_nodelay(true);
                let (acceptor, log) = (acceptor.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else { return };
                    let service = hyper::service::service_fn(move |request| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(answer(request, record.then_some(log)).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                });
            }
        });
        Self { url: format!("https://localhost:{port}"), requests }
    }

    /// A server TLS config from PEM files: the certificate chain and its private key.
    pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> std::io::Result<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let invalid = |e: &dyn std::fmt::Display| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| invalid(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&e))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(&e))?;
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid(&e))?
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .map_err(|e| invalid(&e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The latest request: one clone, however many came before.
    pub fn last_request(&self) -> Option<Recorded> {
        self.requests.lock().expect("request log poisoned").last().cloned()
    }

    /// Every request recorded so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("request log poisoned").clone()
    }
}

fn header_num(headers: &HeaderMap, name: &str, default: u64) -> u64 {
    headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn answer(request: Request<Incoming>, log: Option<Arc<Mutex<Vec<Recorded>>>>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let chunks_sent_at = Arc::new(Mutex::new(Vec::new()));
    // Only recorded requests keep their chunks' times: a benchmark's streams would grow
    // the lists without end.
    let chunk_log = log.is_some().then(|| chunks_sent_at.clone());
    if let Some(log) = log {
        log.lock().expect("request log poisoned").push(Recorded {
            method: parts.method.to_string(),
            path: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
            headers: parts.headers.clone(),
            body_len: body.len(),
            chunks_sent_at: chunks_sent_at.clone(),
        });
    }
    let delay = header_num(&parts.headers, "x-fake-delay-ms", 0);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut response = respond(&parts, &body, chunk_log);
    // `x-fake-response-header: name: value`, repeatable: headers the answer carries.
    for line in parts.headers.get_all("x-fake-response-header") {
        let Some((name, value)) = line.to_str().ok().and_then(|l| l.split_once(':')) else { continue };
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.trim()), HeaderValue::try_from(value.trim())) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

fn respond(
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    chunks_sent_at: Option<Arc<Mutex<Vec<SystemTime>>>>,
) -> Response<Body> {
    let status = header_num(&parts.headers, "x-fake-status", 200);
    if status != 200 {
        let code = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return json(code, r#"{"error":{"message":"fake upstream error","type":"server_error","code":"fake"}}"#);
    }
    match parts.uri.path() {
        "/v1/models" => json(
            StatusCode::OK,
            r#"{"object":"list","data":[{"id":"fake-model","object":"model","created":0,"owned_by":"fake"},{"id":"gpt-4o-mini","object":"model","created":0,"owned_by":"fake"},{"id":"gpt-4o","object":"model","created":0,"owned_by":"fake"},{"id":"text-embedding-3-large","object":"model","created":0,"owned_by":"fake"}]}"#,
        ),
        _ if is_stream(body) => stream(
            header_num(&parts.headers, "x-fake-chunks", 5),
            Duration::from_millis(header_num(&parts.headers, "x-fake-chunk-delay-ms", 0)),
            header_num(&parts.headers, "x-fake-break-after", u64::MAX),
            header_num(&parts.headers, "x-fake-timestamps", 0) == 1,
            chunks_sent_at,
        ),
        _ => json(StatusCode::OK, COMPLETION),
    }
}

const COMPLETION: &str = r#"{"id":"chatcmpl-fake","object":"chat.completion","created":0,"model":"fake-model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the fake upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16}}"#;

fn is_stream(body: &Bytes) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("stream").and_then(serde_json::Value::as_bool))
        .unwrap_or(false)
}

fn json(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body))
        .expect("static response is valid")
}

fn stream(
    chunks: u64,
    delay: Duration,
    break_after: u64,
    stamped: bool,
    sent_at: Option<Arc<Mutex<Vec<SystemTime>>>>,
) -> Response<Body> {
    let events = futures::stream::iter(0..=chunks).then(move |i| {
        let sent_at = sent_at.clone();
        async move {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if i >= break_after {
                return Err::<Frame<Bytes>, crate::proxy::BoxError>("fake upstream breaks the stream".into());
            }
            let data = if i == chunks {
                "data: {\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"fake-model\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":5,\"total_tokens\":14}}\n\ndata: [DONE]\n\n".to_string()
            } else if stamped {
                let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_micros();
                format!(
                    "data: {{\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"fake-model\",\"sent_us\":{now},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"chunk{i} \"}},\"finish_reason\":null}}]}}\n\n"
                )
            } else {
                format!(
                    "data: {{\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"fake-model\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"chunk{i} \"}},\"finish_reason\":null}}]}}\n\n"
                )
            };
            if let Some(sent_at) = &sent_at {
                sent_at.lock().expect("chunk log poisoned").push(SystemTime::now());
            }
            Ok::<_, crate::proxy::BoxError>(Frame::data(Bytes::from(data)))
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(events)))
        .expect("static response is valid")
}
