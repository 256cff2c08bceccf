//! Serving: the API listener (HTTP/1.1 and h2c) and the admin listener (`/healthz`,
//! `/readyz`, `/metrics`), both with graceful shutdown and a bounded drain.
//!
//! The API is served by [`serve_threads`]: one single-threaded runtime per core, all
//! accepting from the same socket, each with its own handler and so its own upstream
//! connection pool. A request, its upstream exchange and its response stay on the
//! thread that accepted the connection: no task hops threads, no worker is woken to
//! steal work. On a work-stealing runtime those wake-ups cost a third of the proxy's
//! CPU per request.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::{Body, Proxy, full};
use crate::metrics::Metrics;

/// Headers hyper parses per HTTP/1 request before it answers a bare 431 itself. Well
/// above [`super::MAX_HEADERS`], so that a header flood up to this size gets the proxy's
/// own OpenAI-shaped 431; only floods past it (or past hyper's ~400 KiB read buffer)
/// get hyper's empty one. (Setting it moves hyper's header slots from the stack to one
/// small heap allocation per request.)
const HTTP1_HEADER_SLOTS: usize = 512;

/// Serves `handler` on `listener` until `shutdown` resolves, then drains open
/// connections for at most `drain`.
pub(crate) async fn serve<H, F>(listener: TcpListener, handler: H, shutdown: impl Future<Output = ()>, drain: Duration)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_headers(HTTP1_HEADER_SLOTS);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service_fn(handler));
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(error = %error, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(drain_secs = drain.as_secs(), "connections still open after the drain time; closing them");
    }
}

/// Serves on `threads` threads a handler made per thread by `make_handler`, until
/// `shutdown` turns `true`; returns once every thread has drained (at most `drain`).
pub(crate) async fn serve_threads<M, H, F>(
    listener: std::net::TcpListener,
    threads: usize,
    make_handler: M,
    shutdown: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
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
                serve(listener, handler, stop, drain).await;
            });
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
