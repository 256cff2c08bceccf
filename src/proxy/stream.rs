//! Keeps a streamed upstream response from hanging or breaking the client.
//!
//! In: the upstream response body. Out: the same frames, unchanged, plus two rules:
//! if no frame arrives for `idle` the stream ends (a long generation keeps going as
//! long as chunks keep coming: this is not a total timeout), and if the upstream breaks
//! the connection mid-stream an event stream gets a final OpenAI-style `error` event and
//! ends cleanly, so SDKs raise instead of waiting.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::BoxError;

/// The last event of a stream the upstream broke off.
const BROKEN_STREAM_EVENT: &str = "event: error\ndata: {\"error\":{\"message\":\"The upstream API closed the stream early: retry the request.\",\"type\":\"server_error\",\"code\":\"upstream_error\"}}\n\n";

/// The upstream stalled for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?}")]
pub(crate) struct IdleTimeout(Duration);

/// An upstream body with an idle timeout and a clean end on upstream failure.
pub(crate) struct Guarded<B> {
    inner: B,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    event_stream: bool,
    done: bool,
}

impl<B> Guarded<B> {
    /// Guards `inner`; `event_stream` when the response is `text/event-stream`.
    pub(crate) fn new(inner: B, idle: Duration, event_stream: bool) -> Self {
        Self { inner, idle, deadline: Box::pin(tokio::time::sleep(idle)), event_stream, done: false }
    }

    fn broken(&mut self, error: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        tracing::warn!(%error, "upstream stream broke off");
        if self.event_stream {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(BROKEN_STREAM_EVENT.as_bytes())))))
        } else {
            Poll::Ready(Some(Err(error)))
        }
    }
}

impl<B> Body for Guarded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = Instant::now() + this.idle;
                this.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => this.broken(error.into()),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => this.broken(Box::new(IdleTimeout(this.idle))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
