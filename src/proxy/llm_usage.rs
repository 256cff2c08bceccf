//! Reads the upstream's token usage (`usage.prompt_tokens`, `usage.completion_tokens`)
//! from a response body as it streams past, without buffering it.
//!
//! In: the upstream body's frames. Out: the same frames, unchanged and undelayed, and at
//! the end of the body one call of the `on_usage` callback, with the usage if the body
//! had one (a body cut short calls nothing). Only a bounded tail of the
//! body is kept — its last frames, shared with the response rather than copied: a JSON
//! response's usage object and a stream's final chunk are both at the end.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use serde::Deserialize;

/// How much of the end of a body is kept to find the usage object.
const TAIL: usize = 16 * 1024;

/// Prompt and completion tokens of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct TokenUsage {
    /// `usage.prompt_tokens`.
    pub prompt: u64,
    /// `usage.completion_tokens`.
    pub completion: u64,
}

/// A body that passes frames through and reports usage at its end.
pub(crate) struct UsageTap<B, F: FnOnce(Option<TokenUsage>)> {
    inner: B,
    /// The last frames; all but the oldest fit in [`TAIL`] bytes.
    tail: VecDeque<Bytes>,
    /// Bytes in `tail` after its oldest frame.
    newer_len: usize,
    on_usage: Option<F>,
}

impl<B, F: FnOnce(Option<TokenUsage>)> UsageTap<B, F> {
    /// Wraps `inner`; `on_usage` runs once, when the body ends, with its usage object if
    /// it has one.
    pub(crate) fn new(inner: B, on_usage: F) -> Self {
        Self { inner, tail: VecDeque::new(), newer_len: 0, on_usage: Some(on_usage) }
    }

    fn keep(&mut self, data: &Bytes) {
        if data.is_empty() {
            return;
        }
        if !self.tail.is_empty() {
            self.newer_len += data.len();
        }
        self.tail.push_back(data.clone());
        while self.newer_len > TAIL {
            self.tail.pop_front();
            self.newer_len -= self.tail.front().map_or(0, Bytes::len);
        }
    }

    fn finish(&mut self) {
        let tail = std::mem::take(&mut self.tail);
        let Some(report) = self.on_usage.take() else { return };
        let usage = match tail.len() {
            0 => None,
            // Most answers are one frame: search it where it lies.
            1 => find_usage(&tail[0]),
            _ => find_usage(&tail.iter().flat_map(|frame| frame.iter().copied()).collect::<Vec<u8>>()),
        };
        report(usage);
    }
}

impl<B, F> Body for UsageTap<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    F: FnOnce(Option<TokenUsage>) + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.keep(data);
                }
                // A body of known length ends with its last frame: hyper does not poll again.
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The last `"usage": {…}` object in the tail of a JSON body or an SSE stream. Text
/// inside JSON strings cannot match: its quotes are escaped.
pub(crate) fn find_usage(tail: &[u8]) -> Option<TokenUsage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(at) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = at;
        let rest = &tail[at + KEY.len()..];
        let Some(colon) = rest.iter().position(|b| !b.is_ascii_whitespace()) else { continue };
        if rest[colon] != b':' {
            continue;
        }
        let mut values = serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<UsageObject>();
        let Some(Ok(usage)) = values.next() else { continue };
        // Chat and completions say prompt/completion; the Responses API input/output.
        if let Some(prompt) = usage.prompt_tokens.or(usage.input_tokens) {
            return Some(TokenUsage {
                prompt,
                completion: usage.completion_tokens.or(usage.output_tokens).unwrap_or(0),
            });
        }
    }
    None
}

/// The fields of a usage object that are counted; the rest are skipped unread.
#[derive(Deserialize)]
struct UsageObject {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_usage_in_a_json_response() {
        let body = br#"{"id":"x","usage":{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16}}"#;
        assert_eq!(find_usage(body), Some(TokenUsage { prompt: 9, completion: 7 }));
    }

    #[test]
    fn finds_usage_in_the_last_chunk_of_a_stream() {
        let stream = b"data: {\"choices\":[]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\ndata: [DONE]\n\n";
        assert_eq!(find_usage(stream), Some(TokenUsage { prompt: 3, completion: 5 }));
        assert_eq!(find_usage(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n"), None);
    }

    #[test]
    fn a_large_body_keeps_only_its_tail_and_still_finds_usage() {
        let mut body = br#"{"data":[{"embedding":["#.to_vec();
        body.extend(std::iter::repeat_n(b"0.125,".as_slice(), 10_000).flatten());
        body.extend_from_slice(br#"1]}],"content":"the \"usage\": {\"prompt_tokens\": 99}","usage":{"prompt_tokens":12,"total_tokens":12}}"#);
        let tail = &body[body.len() - TAIL..];
        assert_eq!(find_usage(tail), Some(TokenUsage { prompt: 12, completion: 0 }));
    }

    #[tokio::test]
    async fn usage_split_across_many_frames_is_found_and_the_tail_stays_bounded() {
        use http_body_util::{BodyExt, StreamBody};
        let mut body = br#"{"data":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', 100_000));
        body.extend_from_slice(br#"","usage":{"prompt_tokens":21,"completion_tokens":4}}"#);
        // 7-byte frames split the key, the object and the numbers across frames.
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            body.chunks(7).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
        let (found, report) = std::sync::mpsc::channel();
        let mut tap = UsageTap::new(StreamBody::new(futures::stream::iter(frames)), move |usage| {
            found.send(usage).unwrap();
        });
        let mut forwarded = Vec::new();
        while let Some(frame) = tap.frame().await {
            forwarded.extend_from_slice(frame.unwrap().data_ref().unwrap());
            assert!(tap.newer_len <= TAIL, "the kept tail grew to {} bytes", tap.newer_len);
        }
        assert_eq!(forwarded, body, "frames pass through unchanged");
        assert_eq!(report.try_recv(), Ok(Some(TokenUsage { prompt: 21, completion: 4 })));
    }

    #[test]
    fn responses_api_names_are_understood() {
        let body = br#"{"usage":{"input_tokens":4,"output_tokens":2}}"#;
        assert_eq!(find_usage(body), Some(TokenUsage { prompt: 4, completion: 2 }));
    }
}
