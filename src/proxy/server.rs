//! Serving: the API listener (HTTP/1.1 and h2c) and the admin listener (`/healthz`,
//! `/readyz`, `/metrics`), both with graceful shutdown and a bounded drain.
//!
//! The API is served by [`serve_threads`]: one single-threaded runtime per core, all
//! accepting from the same socket, each with its own handler and so its own upstream
//! connection pool. A request, its upstream exchange and its response stay on the
//! thread that accepted the connection: no task hops threads, no worker is woken to
//! steal work. On a work-stealing runtime those wake-ups cost a third of the proxy's
//! CPU per request.
//!
//! Any pod can connect without a token, so what a connection may hold is bounded
//! ([`ConnectionLimits`]): how many are open at once (over every thread), how long one
//! may wait for a request (while none is in flight), how much of a request head is
//! buffered, how many HTTP/2 streams run at once, and dead HTTP/2 peers are found by
//! pings. A request in flight, however long its answer or stream, is never cut here.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::{Body, BoxError, Proxy, full};
use crate::metrics::Metrics;

/// Headers hyper parses per HTTP/1 request before it answers a bare 431 itself. Well
/// above [`super::MAX_HEADERS`], so that a header flood up to this size gets the proxy's
/// own OpenAI-shaped 431; only floods past it (or past [`MAX_REQUEST_HEAD`]) get
/// hyper's empty one. (Setting it moves hyper's header slots from the stack to one
/// small heap allocation per request.)
const HTTP1_HEADER_SLOTS: usize = 512;

/// Bytes of one request head a connection may buffer (HTTP/1 read buffer, HTTP/2
/// header list). Twice [`super::MAX_HEADER_BYTES`], so that every head the proxy could
/// accept, and a flood a little past it, reach the proxy's own 431; hyper's default
/// HTTP/1 buffer is ~400 KiB per connection.
const MAX_REQUEST_HEAD: usize = 2 * super::MAX_HEADER_BYTES;

/// Connections the kernel completes for the API listener before a serving thread
/// accepts them. The standard library asks for 128, which a burst of new clients fills
/// while the threads are busy (one thread saturated for 50 ms by 2,000 new streams a
/// second, in `just bench-streams`), and a connection past it waits for its SYN to be
/// sent again, a second or more. The kernel caps it at `net.core.somaxconn`.
pub(crate) const LISTEN_BACKLOG: u32 = 4096;

/// A listener for the API on `addr`, with a backlog of [`LISTEN_BACKLOG`]. Needs a
/// runtime (tokio builds the socket); the listener returned is free of it.
pub(crate) fn listen(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As the standard library's listeners: a restarted process can bind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// Streams one HTTP/2 connection may run at once (hyper's default is 200).
const HTTP2_MAX_STREAMS: u32 = 100;

/// How often an HTTP/2 connection is pinged, and how long the answer may take before
/// the peer counts as dead and the connection is closed (in flight or not).
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Connections of the admin listener: probes and scrapers need few, and an API flood
/// never takes them, since each listener has its own cap.
const ADMIN_MAX_CONNECTIONS: usize = 128;

/// How many connections a listener holds, and how long one may wait for a request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionLimits {
    /// Most connections open at once, over every serving thread of the listener.
    pub max_connections: usize,
    /// Most of those from one client address (further ones are closed at once).
    pub max_per_client: usize,
    /// How long a new connection may take to deliver its first request's headers.
    pub header_timeout: Duration,
    /// How long a connection may wait for its next request after the last response.
    pub idle_timeout: Duration,
}

/// The `proxy` command's defaults (its flags say the same).
impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_per_client: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

impl ConnectionLimits {
    /// The limits of an admin listener: the default timeouts, a cap of its own.
    pub(crate) fn admin() -> Self {
        Self { max_connections: ADMIN_MAX_CONNECTIONS, max_per_client: ADMIN_MAX_CONNECTIONS, ..Self::default() }
    }
}

/// The connections of one listener: its limits, the places under its cap (shared by
/// every thread serving it) and their metrics.
#[derive(Clone, Debug)]
pub(crate) struct Connections {
    limits: ConnectionLimits,
    places: Arc<Semaphore>,
    /// Open connections by client address (addresses with none are removed).
    per_client: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    open: Gauge,
    timed_out: Counter,
    refused: Counter,
}

impl Connections {
    /// Connections counted in `metrics` (the API listener).
    pub(crate) fn counted(limits: ConnectionLimits, metrics: &Metrics) -> Self {
        Self {
            open: metrics.connections_open.clone(),
            timed_out: metrics.connections_timed_out.clone(),
            refused: metrics.connections_refused.clone(),
            ..Self::new(limits)
        }
    }

    /// Connections counted nowhere (admin listeners, the fake upstream).
    pub(crate) fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            places: Arc::new(Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS))),
            per_client: Arc::default(),
            open: Gauge::default(),
            timed_out: Counter::default(),
            refused: Counter::default(),
        }
    }

    /// Counts a connection from `client`, unless that client holds its share already.
    fn admit(&self, client: IpAddr) -> Option<ClientShare> {
        let mut per_client = self.per_client.lock().expect("connection counts poisoned");
        let held = per_client.entry(client).or_insert(0);
        if *held >= self.limits.max_per_client {
            return None;
        }
        *held += 1;
        Some(ClientShare { client, counts: self.per_client.clone() })
    }
}

/// One connection of a client address; uncounted on drop.
struct ClientShare {
    client: IpAddr,
    counts: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for ClientShare {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("connection counts poisoned");
        if let Some(held) = counts.get_mut(&self.client) {
            *held -= 1;
            if *held == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

/// One connection's place under the cap and in its client's share; given back (and
/// uncounted) on drop.
struct Place {
    _permit: OwnedSemaphorePermit,
    _share: ClientShare,
    open: Gauge,
}

impl Place {
    fn new(permit: OwnedSemaphorePermit, share: ClientShare, open: &Gauge) -> Self {
        open.inc();
        Self { _permit: permit, _share: share, open: open.clone() }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Requests in flight on one connection, from their headers to the end of their
/// response body, and a wake-up whenever that number changes.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    changed: Notify,
}

impl Activity {
    /// Counts a request in flight until the returned guard is dropped.
    fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
        Busy(self.clone())
    }

    /// Resolves once the connection has waited longer than allowed for a request with
    /// none in flight: `first` for its first request, `idle` for each later one. Waiting
    /// for a request covers a peer that sends nothing, a partial HTTP/2 preface, partial
    /// request headers and an idle keep-alive connection alike, whatever the protocol.
    async fn waited_too_long(&self, first: Duration, idle: Duration) {
        let mut allowed = first;
        loop {
            if self.in_flight.load(Ordering::Relaxed) == 0 {
                if tokio::time::timeout(allowed, self.changed.notified()).await.is_err() {
                    return;
                }
            } else {
                self.changed.notified().await;
            }
            // Something changed, so a request has come.
            allowed = idle;
        }
    }
}

/// A request in flight (see [`Activity::busy`]).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_one();
    }
}

/// A response body that keeps its request in flight until it is done (or dropped).
struct BusyBody {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for BusyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves `handler` on `listener` until `shutdown` resolves, then drains open
/// connections for at most `drain`.
pub(crate) async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    connections: Connections,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No HTTP/1 header timer of hyper's own: it would also end keep-alive at the header
    // timeout, and `Activity::waited_too_long` bounds the wait for both protocols.
    builder.http1().header_read_timeout(None).max_headers(HTTP1_HEADER_SLOTS).max_buf_size(MAX_REQUEST_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(HTTP2_MAX_STREAMS)
        .max_header_list_size(MAX_REQUEST_HEAD as u32)
        .keep_alive_interval(HTTP2_PING_INTERVAL)
        .keep_alive_timeout(HTTP2_PING_TIMEOUT);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.header_read_timeout(None).max_headers(HTTP1_HEADER_SLOTS).max_buf_size(MAX_REQUEST_HEAD);
    let builders = Arc::new(Builders { http1, http2: builder.clone().http2_only(), either: builder });
    let ConnectionLimits { header_timeout, idle_timeout, .. } = connections.limits;
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // At the cap, stop accepting until a connection ends, rather than accept and
        // close: the connections beyond it wait in the kernel's accept queue at no cost
        // here, and a real client among them is served as soon as a place frees (flood
        // connections free theirs after the header timeout), with no retry of its own.
        // Past the kernel's backlog, new connections wait in SYN retries.
        let permit = tokio::select! {
            permit = connections.places.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // A client that holds its share already is closed at once (its place under the
        // cap goes back): one address cannot fill the proxy while others wait.
        let Some(share) = connections.admit(peer.ip()) else {
            connections.refused.inc();
            drop((stream, permit));
            continue;
        };
        let place = Place::new(permit, share, &connections.open);
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let service = service_fn({
            let (handler, activity) = (handler.clone(), activity.clone());
            move |request| {
                let busy = activity.busy();
                let response = handler(request);
                async move {
                    let response = response.await?;
                    Ok::<_, Infallible>(response.map(|body| BusyBody { body, _busy: busy }))
                }
            }
        });
        let (builders, watcher) = (builders.clone(), graceful.watcher());
        let connection = async move {
            let protocol = sniff(&stream).await?;
            let io = TokioIo::new(stream);
            match protocol {
                Protocol::Http1 => {
                    watcher.watch(builders.http1.serve_connection(io, service)).await.map_err(Into::into)
                }
                // Boxed: inline, an HTTP/2 connection's state would make the task of every
                // connection, HTTP/1 ones included, that much larger (see `Builders`).
                Protocol::Http2 => Box::pin(watcher.watch(builders.http2.serve_connection(io, service))).await,
                Protocol::Unknown => Box::pin(watcher.watch(builders.either.serve_connection(io, service))).await,
            }
        };
        let timed_out = connections.timed_out.clone();
        tokio::spawn(async move {
            let _place = place;
            tokio::select! {
                ended = connection => if let Err(error) = ended {
                    tracing::debug!(error = %error, "connection ended with an error");
                },
                // Nothing in flight, so closing loses nothing.
                () = activity.waited_too_long(header_timeout, idle_timeout) => {
                    timed_out.inc();
                    tracing::debug!("closed a connection that sent no request in time");
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(drain_secs = drain.as_secs(), "connections still open after the drain time; closing them");
    }
}

/// The connection builders of one listener: HTTP/1 only, HTTP/2 only, and either (hyper-util
/// reads the first bytes to choose).
///
/// HTTP/1 is hyper's own connection rather than hyper-util's automatic one, an enum as
/// large as its largest case, HTTP/2's: each open HTTP/1 connection (a long stream's, say)
/// holds about 2 KiB less (its future is 888 bytes; 1,000 open streams, 33.5 → 31.4 KiB
/// of resident memory per stream).
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: auto::Builder<TokioExecutor>,
    either: auto::Builder<TokioExecutor>,
}

/// What a client speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c): it opens with the connection preface.
    Http2,
    /// A part of the preface so far; hyper-util reads on to decide.
    Unknown,
}

/// The first bytes of every HTTP/2 connection (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells the protocol of `stream` by peeking at its first bytes, leaving them unread.
///
/// hyper-util can tell it too, by reading up to 24 bytes and handing them back in front
/// of the stream; hyper's HTTP/1 connection then reads those few bytes alone, finds the
/// head incomplete, and doubles its read buffer to 16 KiB for every connection (heaptrack,
/// 1,000 open streams). Peeking costs the same one system call as that first read.
async fn sniff(stream: &tokio::net::TcpStream) -> std::io::Result<Protocol> {
    let mut first = [0; HTTP2_PREFACE.len()];
    let peeked = stream.peek(&mut first).await?;
    Ok(match &first[..peeked] {
        // Closed before a byte: HTTP/1 ends it quietly.
        [] => Protocol::Http1,
        bytes if !HTTP2_PREFACE.starts_with(bytes) => Protocol::Http1,
        bytes if bytes.len() == HTTP2_PREFACE.len() => Protocol::Http2,
        _ => Protocol::Unknown,
    })
}

/// Serves on `threads` threads a handler made per thread by `make_handler`, until
/// `shutdown` turns `true`; returns once every thread has drained (at most `drain`).
/// The threads share `connections`: its cap is the process's, not each thread's.
pub(crate) async fn serve_threads<M, H, F>(
    listener: std::net::TcpListener,
    threads: usize,
    make_handler: M,
    shutdown: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
    connections: Connections,
) -> std::io::Result<()>
where
    M: Fn() -> H,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    listener.set_nonblocking(true)?;
    let mut finished = Vec::with_capacity(threads);
    for index in 0..threads.max(1) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = listener.try_clone()?;
        let handler = make_handler();
        let connections = connections.clone();
        let mut shutdown = shutdown.clone();
        let (done, thread_done) = tokio::sync::oneshot::channel::<()>();
        finished.push(thread_done);
        std::thread::Builder::new().name(format!("proxy-{index}")).spawn(move || {
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::error!(%error, thread = index, "registering the listener failed");
                        return;
                    }
                };
                let stop = async move {
                    let _ = shutdown.wait_for(|stop| *stop).await;
                };
                serve(listener, handler, stop, drain, connections).await;
            });
            // Connections cut at the drain deadline live in this runtime: dropping it
            // settles their reservations before the final flush, which waits for this.
            drop(runtime);
            let _ = done.send(());
        })?;
    }
    drop(listener);
    for thread_done in finished {
        // An error means the thread ended without sending, which is an end too.
        let _ = thread_done.await;
    }
    Ok(())
}

/// What a boxed request handler returns.
pub(crate) type HandlerFuture = std::pin::Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// The API handler for [`serve`].
pub(crate) fn api_handler(
    proxy: Arc<Proxy>,
) -> impl Fn(Request<Incoming>) -> HandlerFuture + Clone + Send + Sync + 'static {
    move |request| {
        let proxy = proxy.clone();
        Box::pin(async move { proxy.handle(request).await })
    }
}

/// The admin handler for [`serve`]: liveness, readiness as `ready` says (`Err` carries
/// the reason), and metrics.
pub(crate) fn admin_handler(
    ready: impl Fn() -> Result<(), &'static str> + Clone + Send + Sync + 'static,
    metrics: Arc<Metrics>,
) -> impl Fn(Request<Incoming>) -> std::future::Ready<Result<Response<Body>, Infallible>> + Clone + Send + Sync + 'static
{
    move |request| {
        let (status, text) = match request.uri().path() {
            "/healthz" | "/livez" => (StatusCode::OK, "ok\n".to_string()),
            "/readyz" => match ready() {
                Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
            },
            "/metrics" => (StatusCode::OK, metrics.encode()),
            _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
        };
        let mut response = Response::new(full(text));
        *response.status_mut() = status;
        if request.uri().path() == "/metrics" {
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
        }
        std::future::ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::{HTTP2_PREFACE, Protocol, listen, sniff};

    /// 500 clients connect at once to a listener nobody accepts from yet: all of them
    /// are let in by the kernel (with the standard library's backlog of 128, those past
    /// it wait for SYN retries and time out here).
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog_not_in_syn_retries() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects =
            (0..500).map(|_| tokio::time::timeout(std::time::Duration::from_millis(700), TcpStream::connect(addr)));
        let results = futures::future::join_all(connects).await;
        let connected = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(connected, 500);
        drop(listener);
    }

    /// What `sniff` says of a connection whose client sent `sent` (then closed it, if
    /// `close`), and that the bytes were left for the server to read.
    async fn sniffed(sent: &[u8], close: bool) -> Protocol {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(sent).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        let protocol = sniff(&server).await.unwrap();
        let mut unread = vec![0; sent.len() + 1];
        let peeked = server.peek(&mut unread).await.unwrap();
        assert_eq!(&unread[..peeked], sent, "sniffing must not consume bytes");
        protocol
    }

    #[tokio::test]
    async fn http1_is_told_from_its_first_byte() {
        assert_eq!(sniffed(b"POST /v1/chat/completions HTTP/1.1\r\n", false).await, Protocol::Http1);
        // "P" alone could still become the preface; "PO" cannot.
        assert_eq!(sniffed(b"PO", false).await, Protocol::Http1);
        assert_eq!(sniffed(b"GET / HTTP/1.0\r\n\r\n", true).await, Protocol::Http1);
    }

    #[tokio::test]
    async fn the_http2_preface_is_http2_and_a_part_of_it_undecided() {
        let mut opening = HTTP2_PREFACE.to_vec();
        opening.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
        assert_eq!(sniffed(&opening, false).await, Protocol::Http2);
        assert_eq!(sniffed(&HTTP2_PREFACE[..10], false).await, Protocol::Unknown);
    }

    #[tokio::test]
    async fn a_client_that_closes_without_a_byte_is_left_to_http1() {
        assert_eq!(sniffed(b"", true).await, Protocol::Http1);
    }
}
