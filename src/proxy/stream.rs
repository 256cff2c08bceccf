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
///
/// The timer is armed only when the upstream makes the body wait (most JSON answers
/// arrive whole with their head and never do), and a frame does not move it: it records
/// when it came, and the timer, when it fires, is set again from there. A stream pays
/// for one timer update per idle period instead of one per chunk.
pub(crate) struct Guarded<B> {
    inner: B,
    idle: Duration,
    /// Armed at the first wait; fires `idle` after the last frame (or that wait).
    deadline: Option<Pin<Box<Sleep>>>,
    /// When the last frame came, once the timer is armed.
    last_frame: Option<Instant>,
    event_stream: bool,
    done: bool,
}

impl<B> Guarded<B> {
    /// Guards `inner`; `event_stream` when the response is `text/event-stream`.
    pub(crate) fn new(inner: B, idle: Duration, event_stream: bool) -> Self {
        Self { inner, idle, deadline: None, last_frame: None, event_stream, done: false }
    }

    /// Whether the upstream has been silent for `idle`, when the timer says so; if a frame
    /// came since it was set, it is set again from that frame and polled.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let idle = self.idle;
        let deadline = self.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        loop {
            if deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            match self.last_frame.take() {
                Some(last) if last + idle > Instant::now() => deadline.as_mut().reset(last + idle),
                _ => return Poll::Ready(()),
            }
        }
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
                if this.deadline.is_some() {
                    this.last_frame = Some(Instant::now());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => this.broken(error.into()),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.poll_idle(cx) {
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures::StreamExt;
    use futures::channel::mpsc;
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    const IDLE: Duration = Duration::from_millis(150);

    /// A body whose frames the test sends, and that waits when none is sent.
    fn channel() -> (mpsc::UnboundedSender<&'static str>, impl Body<Data = Bytes, Error = Infallible> + Unpin) {
        let (sender, receiver) = mpsc::unbounded();
        (sender, StreamBody::new(receiver.map(|chunk: &str| Ok(Frame::data(Bytes::from_static(chunk.as_bytes()))))))
    }

    #[tokio::test]
    async fn a_body_that_arrives_whole_never_arms_the_timer() {
        let mut body = Guarded::new(Full::new(Bytes::from_static(b"{}")), IDLE, false);
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "{}");
        assert!(body.frame().await.is_none());
        assert!(body.deadline.is_none());
    }

    #[tokio::test]
    async fn a_stream_that_keeps_sending_is_never_cut_however_long_it_runs() {
        let (sender, inner) = channel();
        let mut body = Guarded::new(inner, IDLE, true);
        let producer = tokio::spawn(async move {
            // Six idle periods in all, never more than half of one without a chunk.
            for _ in 0..18 {
                tokio::time::sleep(IDLE / 3).await;
                sender.unbounded_send("data: {}\n\n").unwrap();
            }
        });
        let mut chunks = 0;
        while let Some(frame) = body.frame().await {
            assert_eq!(frame.unwrap().into_data().unwrap(), "data: {}\n\n", "no error event");
            chunks += 1;
        }
        producer.await.unwrap();
        assert_eq!(chunks, 18);
    }

    #[tokio::test]
    async fn a_stream_silent_for_the_idle_time_ends_with_an_error_event() {
        let (sender, inner) = channel();
        let mut body = Guarded::new(inner, IDLE, true);
        sender.unbounded_send("data: 1\n\n").unwrap();
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "data: 1\n\n");
        let waiting = Instant::now();
        // A chunk inside the idle time moves the deadline on.
        let late = sender.clone();
        tokio::spawn(async move {
            tokio::time::sleep(IDLE / 2).await;
            late.unbounded_send("data: 2\n\n").unwrap();
        });
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "data: 2\n\n");
        let last = Instant::now();
        let event = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(event.starts_with(b"event: error\n"), "{event:?}");
        let silent = last.elapsed();
        // (The deadline counts from inside the poll that handed the chunk over.)
        assert!(silent >= IDLE - Duration::from_millis(5), "cut after {silent:?} of silence, before the idle time");
        assert!(waiting.elapsed() >= IDLE + IDLE / 2, "the second chunk moved the deadline");
        assert!(body.frame().await.is_none());
        drop(sender);
    }

    #[tokio::test]
    async fn a_json_answer_that_stalls_fails_with_the_idle_timeout() {
        let (sender, inner) = channel();
        let mut body = Guarded::new(inner, IDLE, false);
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<IdleTimeout>(), "{error}");
        drop(sender);
    }
}
