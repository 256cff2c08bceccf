//! The benchmark harness's load generator: HTTP/1.1 requests over a fixed set of
//! keep-alive connections, either open loop at a fixed rate (for latency) or closed loop
//! (each connection sends as soon as it has its answer, for a counted run). Prints one
//! JSON line: requests, errors, and latency percentiles in milliseconds.
//!
//! Usage: `load [--rate R] [--connections C] (--duration SECONDS | --requests N)
//! [--method M] [--header 'Name: value']... [--body B] [--cacert CA.pem]
//! [--disable-keepalive] URL`
//!
//! Open loop, request i is due at start + i / R. A scheduler issues each when it is due
//! (stamping the instant it woke), and the first free connection takes it; its latency
//! runs from that stamp to the last byte of the answer. A request that waits for a free
//! connection therefore counts its wait, as a client's would: latency corrected for
//! coordinated omission, the way oha's `--latency-correction` and wrk2 measure. It is
//! built from the crates the proxy is built from (tokio, hyper), so a cold `just bench`
//! compiles no second HTTP stack for its load (see BENCHMARKS.md).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;
use tokio::sync::{Mutex, mpsc};

#[derive(Parser)]
struct Args {
    /// Requests per second, due evenly spaced (open loop); 0 for closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Keep-alive connections, opened before the first request is due.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// How long to issue requests, in seconds ("10" or "10s").
    #[arg(long, value_parser = seconds, required_unless_present = "requests")]
    duration: Option<Duration>,
    /// How many requests to issue.
    #[arg(long, conflicts_with = "duration")]
    requests: Option<u64>,
    #[arg(long, default_value = "GET")]
    method: hyper::Method,
    /// A request header, "Name: value" (repeatable).
    #[arg(long = "header", value_parser = header)]
    headers: Vec<(HeaderName, HeaderValue)>,
    #[arg(long, default_value = "")]
    body: String,
    /// For an https:// URL: the PEM file of the CA to trust (rustls; each connection
    /// makes its handshake before the run starts, or when it reconnects).
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
    /// A new connection (and TLS handshake) for every request, within its latency.
    #[arg(long)]
    disable_keepalive: bool,
    /// An http:// or https:// URL.
    url: hyper::Uri,
}

fn seconds(text: &str) -> Result<Duration, String> {
    let number = text.strip_suffix('s').unwrap_or(text);
    number.parse::<f64>().map(Duration::from_secs_f64).map_err(|_| format!("not a number of seconds: {text:?}"))
}

fn header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text.split_once(':').ok_or_else(|| format!("not \"Name: value\": {text:?}"))?;
    let name = HeaderName::try_from(name.trim()).map_err(|e| format!("{name:?}: {e}"))?;
    let value = HeaderValue::try_from(value.trim()).map_err(|e| format!("{value:?}: {e}"))?;
    Ok((name, value))
}

/// What one connection measured.
#[derive(Default)]
struct Measured {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

impl Measured {
    fn error(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Where and how to connect: the address, and for https the TLS client and the name
/// the server's certificate must carry.
struct Target {
    address: String,
    tls: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
}

impl Target {
    fn new(url: &hyper::Uri, cacert: Option<&std::path::Path>) -> Result<Target, String> {
        let host = url.host().ok_or("a URL with a host")?;
        let https = match url.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("not an http:// or https:// URL: {url}")),
        };
        let address = format!("{host}:{}", url.port_u16().unwrap_or(if https { 443 } else { 80 }));
        if !https {
            return Ok(Target { address, tls: None });
        }
        use rustls::pki_types::pem::PemObject;
        let cacert = cacert.ok_or("an https:// URL needs --cacert")?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in rustls::pki_types::CertificateDer::pem_file_iter(cacert)
            .map_err(|e| format!("{}: {e}", cacert.display()))?
        {
            roots.add(certificate.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        Ok(Target { address, tls: Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name)) })
    }

    async fn connect(&self) -> Result<Sender, String> {
        let address = &self.address;
        let stream = tokio::net::TcpStream::connect(address).await.map_err(|e| format!("connect {address}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let Some((tls, name)) = &self.tls else { return handshake(stream).await };
        handshake(tls.connect(name.clone(), stream).await.map_err(|e| format!("TLS handshake: {e}"))?).await
    }
}

async fn handshake<T>(io: T) -> Result<Sender, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One request on `sender`, its answer read to the end; an error for a transport
/// failure or a status other than 2xx.
async fn one(sender: &mut Sender, request: hyper::Request<Full<Bytes>>) -> Result<(), String> {
    let response = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    response.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    Ok(())
}

/// Where a connection gets its next request (the instant it was issued).
enum Source {
    /// Open loop: issued by the scheduler when due; closed when the run ends.
    Due(Mutex<mpsc::UnboundedReceiver<Instant>>),
    /// Closed loop: the next of `count` requests, issued when a connection takes it,
    /// until `end`.
    Counted { next: AtomicU64, count: u64, end: Option<Instant> },
}

impl Source {
    async fn next(&self) -> Option<Instant> {
        match self {
            Source::Due(due) => due.lock().await.recv().await,
            Source::Counted { next, count, end } => {
                let now = Instant::now();
                let more = next.fetch_add(1, Ordering::Relaxed) < *count && end.is_none_or(|end| now < end);
                more.then_some(now)
            }
        }
    }
}

/// Sends requests from `source` on this connection until it runs dry, opening a new
/// one when it was closed: by a failure, or by the server after its last answer (nginx
/// closes after `keepalive_requests`). A client would wait for that, so the wait counts.
async fn connection(
    mut sender: Sender,
    target: Arc<Target>,
    template: Arc<hyper::Request<Full<Bytes>>>,
    source: Arc<Source>,
    keepalive: bool,
) -> Measured {
    let mut measured = Measured { latencies: Vec::with_capacity(1 << 16), ..Measured::default() };
    while let Some(issued) = source.next().await {
        if !keepalive || sender.is_closed() || sender.ready().await.is_err() {
            match target.connect().await {
                Ok(fresh) => sender = fresh,
                Err(error) => {
                    measured.error(error);
                    break;
                }
            }
        }
        let mut request = hyper::Request::new(template.body().clone());
        *request.method_mut() = template.method().clone();
        *request.uri_mut() = template.uri().clone();
        *request.headers_mut() = template.headers().clone();
        match one(&mut sender, request).await {
            Ok(()) => measured.latencies.push(issued.elapsed()),
            Err(error) => measured.error(error),
        }
    }
    measured
}

/// Issues requests into `due` at their due instants, each stamped when the scheduler
/// woke for it, until the run's end; then closes it.
async fn schedule(args: &Args, due: mpsc::UnboundedSender<Instant>) {
    let start = Instant::now();
    let end = args.duration.map(|d| start + d);
    for i in 0..args.requests.unwrap_or(u64::MAX) {
        let at = start + Duration::from_secs_f64(i as f64 / args.rate);
        if end.is_some_and(|end| at >= end) {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        if due.send(Instant::now()).is_err() {
            break;
        }
    }
}

/// The `p`-quantile of `sorted` (nearest rank), in milliseconds.
fn quantile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let target = Arc::new(Target::new(&args.url, args.cacert.as_deref()).unwrap_or_else(|e| panic!("{e}")));
    let mut template = hyper::Request::new(Full::new(Bytes::from(args.body.clone())));
    *template.method_mut() = args.method.clone();
    *template.uri_mut() = args.url.path_and_query().map_or("/", |p| p.as_str()).parse().expect("a path");
    let headers = template.headers_mut();
    headers.insert(hyper::header::HOST, HeaderValue::try_from(&target.address).expect("a host header"));
    for (name, value) in &args.headers {
        headers.insert(name.clone(), value.clone());
    }
    let template = Arc::new(template);

    let mut senders = Vec::new();
    for _ in 0..args.connections {
        senders.push(target.connect().await.unwrap_or_else(|e| panic!("{e}")));
    }
    let started = Instant::now();
    let (due, source) = if args.rate > 0.0 {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Source::Due(Mutex::new(rx)))
    } else {
        let end = args.duration.map(|d| started + d);
        (None, Source::Counted { next: AtomicU64::new(0), count: args.requests.unwrap_or(u64::MAX), end })
    };
    let source = Arc::new(source);
    let workers: Vec<_> = senders
        .into_iter()
        .map(|sender| {
            tokio::spawn(connection(sender, target.clone(), template.clone(), source.clone(), !args.disable_keepalive))
        })
        .collect();
    if let Some(due) = due {
        schedule(&args, due).await;
    }
    let mut all = Measured::default();
    for worker in workers {
        let measured = worker.await.expect("a connection task");
        all.latencies.extend(measured.latencies);
        all.errors += measured.errors;
        if all.first_error.is_none() {
            all.first_error = measured.first_error;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    all.latencies.sort_unstable();
    let n = all.latencies.len();
    let report = serde_json::json!({
        "requests": n as u64 + all.errors,
        "ok": n,
        "errors": all.errors,
        "first_error": all.first_error,
        "seconds": seconds,
        "per_second": n as f64 / seconds,
        "p50_ms": quantile_ms(&all.latencies, 0.5),
        "p99_ms": quantile_ms(&all.latencies, 0.99),
        "p999_ms": quantile_ms(&all.latencies, 0.999),
        "max_ms": all.latencies.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
    });
    println!("{report}");
}
