//! Keep-alive connections to the upstreams, held by one serving thread.
//!
//! Every serving thread has a handler, and so a pool, of its own
//! (`server::serve_threads`): taking a connection is a lock no other thread contends
//! for and a pop from a short list, and handing it back is a push when its response
//! body ends. No shared map, no channel, no task per request, as in hyper-util's
//! pooled client, which this replaces.
//!
//! - An HTTP/1.1 connection carries one exchange at a time. It goes back to the pool
//!   when its response body has been read to the end; a body dropped before its end
//!   drops the connection, which closes it (HTTP/1 cannot reuse it).
//! - An HTTP/1.1 connection has no task of its own: the request sending on it drives it
//!   until the response head has come, then the response body does, as the server polls
//!   it for its next frame. A chunk goes from the upstream's socket to the client's in
//!   one task, with no hand-off between two; and when chunks have piled up (the thread
//!   was busy), every one of them is decoded in that one poll, so hyper's server writes
//!   them to the client together instead of one system call (and one wake-up of the
//!   client) per chunk, as nginx does when it reads a backlog in one go. In the pool it
//!   is not polled: taking it lets it notice first whether its upstream closed it, and
//!   one its upstream closed keeps its socket until then or the next sweep.
//! - An HTTP/2 connection (negotiated by ALPN, `--upstream-http2`) is shared by all
//!   requests of the thread while it is open.
//! - A request that a reused connection never took (the upstream closed it in between)
//!   is sent again on a new one; a request that reached the upstream is never sent twice.
//! - An idle connection is closed after [`IDLE_TIMEOUT`] (checked while the thread has
//!   traffic; an upstream closes connections idle longer than it likes anyway), and at
//!   most [`MAX_IDLE`] are kept per upstream.
//!
//! In: an upstream URL and a request for it. Out: the response, whose body hands its
//! connection back at its end.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::hash::BuildHasherDefault;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::TrySendError;
use hyper::client::conn::{http1, http2};
use hyper::header;
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Response, Uri, Version};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower_service::Service;

use super::BoxError;
use crate::index::{NameHasher, UpstreamUrl};

/// How long a connection may wait in the pool for its next request.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Most idle HTTP/1.1 connections kept per upstream (and serving thread); more are closed
/// as their exchanges end.
pub(crate) const MAX_IDLE: usize = 1024;

/// How often, at most, idle connections past [`IDLE_TIMEOUT`] are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error("connecting to the upstream failed")]
    Connect(#[source] BoxError),
    #[error("the HTTP handshake with the upstream failed")]
    Handshake(#[source] hyper::Error),
    #[error("the exchange with the upstream failed")]
    Exchange(#[source] hyper::Error),
}

/// Connections to upstreams, for requests with bodies of type `B`.
pub(crate) struct Pool<B: Body + 'static> {
    connector: HttpsConnector<HttpConnector>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    idle: Arc<Mutex<Idle<B>>>,
}

/// An upstream as connections see it: where they go, not the URL's path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl Origin {
    fn of(url: &UpstreamUrl) -> Self {
        Self { scheme: url.scheme().clone(), authority: url.authority().clone() }
    }
}

type ByOrigin<T> = HashMap<Origin, T, BuildHasherDefault<NameHasher>>;

/// What the pool holds between requests.
struct Idle<B: Body + 'static> {
    /// Idle HTTP/1.1 connections per upstream, each with the time it was handed back;
    /// the most recent last.
    http1: ByOrigin<Vec<(Box<Http1<B>>, Instant)>>,
    /// The open HTTP/2 connection to an upstream, if one was negotiated.
    http2: ByOrigin<http2::SendRequest<B>>,
    swept: Instant,
}

/// A connection taken for one request.
enum Sender<B: Body + 'static> {
    /// Boxed: it is about 1.8 KiB, moved from the pool to a request's future to its
    /// response body and back.
    Http1 {
        connection: Box<Http1<B>>,
        reused: bool,
    },
    Http2(http2::SendRequest<B>),
}

/// What an HTTP/1.1 connection runs on: TCP, with TLS when the upstream is HTTPS.
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// An HTTP/1.1 connection: the handle a request goes in by, and the connection itself,
/// which moves only when it is polled (see the module's notes).
struct Http1<B: Body + 'static> {
    sender: http1::SendRequest<B>,
    /// `None` once it has ended; never polled again then.
    connection: Option<http1::Connection<Io, B>>,
}

impl<B> Http1<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Lets the connection read, decode and write what it can now; when it cannot go on,
    /// `cx` is woken once it can. Whether it is still open.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(connection) = self.connection.as_mut() else { return false };
        match Pin::new(connection).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                if let Err(error) = result {
                    tracing::debug!(error = %crate::telemetry::Chain(&error), "upstream connection ended");
                }
                self.connection = None;
                false
            }
        }
    }

    /// Lets an idle connection take in what happened while nobody polled it (its last
    /// exchange ending, its upstream closing it), without waiting. Whether it is open.
    fn settle(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && !self.sender.is_closed()
    }

    /// Sends `request`, driving the connection until the response head has come.
    async fn send(&mut self, request: Request<B>) -> Result<Response<Incoming>, TrySendError<Request<B>>> {
        let mut response = pin!(self.sender.try_send_request(request));
        poll_fn(|cx| {
            // The response comes from the connection, driven here: its socket wakes this
            // task, its answer need not (that would only poll the task once more).
            let quiet = &mut Context::from_waker(Waker::noop());
            if let Poll::Ready(response) = response.as_mut().poll(quiet) {
                return Poll::Ready(response);
            }
            if self.drive(cx) {
                response.as_mut().poll(quiet)
            } else {
                // Ended: it has answered the request, with an error if with nothing else.
                response.as_mut().poll(cx)
            }
        })
        .await
    }
}

impl<B> Pool<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A pool connecting through `connector` (which decides TLS and ALPN), reading at most
    /// `max_buf_size` bytes ahead on an HTTP/1.1 connection.
    pub(crate) fn new(connector: HttpsConnector<HttpConnector>, max_buf_size: usize) -> Self {
        let mut http1 = http1::Builder::new();
        http1.max_buf_size(max_buf_size);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        let idle = Idle { http1: ByOrigin::default(), http2: ByOrigin::default(), swept: Instant::now() };
        Self { connector, http1, http2, idle: Arc::new(Mutex::new(idle)) }
    }

    /// Sends `request` to `url`'s upstream, whose path and query its URI already carries
    /// (an absolute URI); the response's body hands the connection back at its end.
    pub(crate) async fn send(&self, url: &UpstreamUrl, request: Request<B>) -> Result<Response<Pooled<B>>, Failure> {
        let origin = Origin::of(url);
        let mut request = request;
        loop {
            let sender = match self.take(&origin) {
                Some(sender) => sender,
                // Boxed: a connection attempt (TCP, TLS) is a large future, and inline it
                // would make every request's future as large, to be copied at each move.
                None => Box::pin(self.connect(url, &origin)).await?,
            };
            match sender {
                Sender::Http2(mut sender) => {
                    *request.version_mut() = Version::HTTP_2;
                    let response = sender.send_request(request).await.map_err(Failure::Exchange)?;
                    return Ok(response.map(|body| Pooled::new(body, None)));
                }
                Sender::Http1 { mut connection, reused } => {
                    to_origin_form(request.uri_mut());
                    request.headers_mut().insert(header::HOST, url.host_header().clone());
                    match connection.send(request).await {
                        Ok(response) => {
                            let lease = Lease { connection, origin, idle: self.idle.clone() };
                            return Ok(response.map(|body| Pooled::new(body, Some(lease))));
                        }
                        Err(mut error) => match error.take_message() {
                            // Closed before it took the request: a new connection gets it.
                            Some(unsent) if reused => {
                                tracing::debug!(error = %error.error(), "an idle upstream connection had closed; sending again");
                                request = unsent;
                                to_absolute_form(request.uri_mut(), &origin);
                            }
                            _ => return Err(Failure::Exchange(error.into_error())),
                        },
                    }
                }
            }
        }
    }

    /// An idle connection to `origin` that is ready for a request, if one is open.
    fn take(&self, origin: &Origin) -> Option<Sender<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(idle.swept) >= SWEEP_INTERVAL {
            idle.sweep(now);
        }
        if let Some(sender) = idle.http2.get(origin) {
            if !sender.is_closed() {
                return Some(Sender::Http2(sender.clone()));
            }
            idle.http2.remove(origin);
        }
        let list = idle.http1.get_mut(origin)?;
        // The newest first. One not ready yet (its last exchange still ending) waits
        // for the next request; closed or stale ones go.
        let mut waiting = None;
        let mut taken = None;
        while let Some((mut connection, since)) = list.pop() {
            if now.duration_since(since) >= IDLE_TIMEOUT || !connection.settle() {
                continue;
            }
            if connection.sender.is_ready() {
                taken = Some(connection);
                break;
            }
            waiting.get_or_insert_with(Vec::new).push((connection, since));
        }
        list.extend(waiting.into_iter().flatten().rev());
        taken.map(|connection| Sender::Http1 { connection, reused: true })
    }

    /// A new connection to `url`'s upstream, HTTP/2 if ALPN chose it (its connection task
    /// runs on this thread's runtime; an HTTP/1.1 connection has none).
    async fn connect(&self, url: &UpstreamUrl, origin: &Origin) -> Result<Sender<B>, Failure> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await.map_err(Failure::Connect)?;
        let base = url.join(None).ok_or_else(|| Failure::Connect("the upstream URL has no host".into()))?;
        let io = connector.call(base).await.map_err(Failure::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = self.http2.handshake(io).await.map_err(Failure::Handshake)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(error = %crate::telemetry::Chain(&error), "HTTP/2 upstream connection ended");
                }
            });
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.http2.insert(origin.clone(), sender.clone());
            return Ok(Sender::Http2(sender));
        }
        let (sender, connection) = self.http1.handshake(io).await.map_err(Failure::Handshake)?;
        Ok(Sender::Http1 { connection: Box::new(Http1 { sender, connection: Some(connection) }), reused: false })
    }

    /// Idle HTTP/1.1 connections (over every upstream), for tests.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().http1.values().map(Vec::len).sum()
    }
}

impl<B> Idle<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Closes connections idle past [`IDLE_TIMEOUT`] or closed by their upstream.
    fn sweep(&mut self, now: Instant) {
        self.swept = now;
        self.http1.retain(|_, list| {
            list.retain_mut(|(connection, since)| now.duration_since(*since) < IDLE_TIMEOUT && connection.settle());
            !list.is_empty()
        });
        self.http2.retain(|_, sender| !sender.is_closed());
    }
}

/// Rewrites an absolute URI to what an HTTP/1.1 request line to an origin carries.
fn to_origin_form(uri: &mut Uri) {
    let path = uri.path_and_query().cloned().unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    *uri = Uri::from(path);
}

/// Rewrites an origin-form URI back to the absolute URI at `origin`.
fn to_absolute_form(uri: &mut Uri, origin: &Origin) {
    let mut parts = hyper::http::uri::Parts::default();
    parts.scheme = Some(origin.scheme.clone());
    parts.authority = Some(origin.authority.clone());
    parts.path_and_query = uri.path_and_query().cloned();
    if let Ok(absolute) = Uri::from_parts(parts) {
        *uri = absolute;
    }
}

/// An HTTP/1.1 connection a response is arriving on, and the right to hand it back to
/// its pool.
struct Lease<B: Body + 'static> {
    connection: Box<Http1<B>>,
    origin: Origin,
    idle: Arc<Mutex<Idle<B>>>,
}

impl<B: Body + 'static> Lease<B> {
    fn hand_back(self) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.http1.entry(self.origin).or_default();
        if list.len() < MAX_IDLE {
            list.push((self.connection, Instant::now()));
        }
    }
}

/// A response body from the upstream; over HTTP/1.1 it drives its connection, and at its
/// end the connection goes back to the pool.
pub(crate) struct Pooled<B: Body + 'static> {
    inner: Incoming,
    lease: Option<Lease<B>>,
}

impl<B: Body + 'static> Pooled<B> {
    fn new(inner: Incoming, lease: Option<Lease<B>>) -> Self {
        let mut body = Self { inner, lease };
        // No body (204, HEAD, a length of 0): the exchange is over already.
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.hand_back();
        }
    }
}

impl<B> Body for Pooled<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = match this.lease.as_mut() {
            // HTTP/2 (its connection has a task of its own), or the body has ended.
            None => ready!(Pin::new(&mut this.inner).poll_frame(cx)),
            // Only the connection, driven here, puts frames in `inner`: its socket wakes
            // this task when a frame may come, `inner` need not.
            Some(lease) => {
                let quiet = &mut Context::from_waker(Waker::noop());
                match Pin::new(&mut this.inner).poll_frame(quiet) {
                    Poll::Ready(frame) => frame,
                    // Nothing decoded yet: the connection reads and decodes the next frame
                    // (from what it has buffered, else from its socket), if it has one.
                    Poll::Pending if lease.connection.drive(cx) => ready!(Pin::new(&mut this.inner).poll_frame(quiet)),
                    Poll::Pending => {
                        // Ended (its last frames, or why it failed, are in `inner`): not
                        // reusable.
                        this.lease = None;
                        ready!(Pin::new(&mut this.inner).poll_frame(cx))
                    }
                }
            }
        };
        match &frame {
            // hyper's server stops polling a body that says it has ended, so the end is
            // also when the last byte of a known length has arrived.
            None => this.release(),
            Some(Ok(_)) if this.inner.is_end_stream() => this.release(),
            Some(Ok(_)) => {}
            // Not reusable: dropped, and so closed.
            Some(Err(_)) => this.lease = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
