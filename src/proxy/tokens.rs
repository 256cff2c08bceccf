//! Reads the upstream's token usage (`usage.prompt_tokens`, `usage.completion_tokens`)
//! from a response body as it streams past, without buffering it.
//!
//! In: the upstream body's frames. Out: the same frames, unchanged and undelayed, and at
//! the end of the body one call of the `on_usage` callback. Only a bounded tail of the
//! body is kept: a JSON response's usage object and a stream's final chunk are both at
//! the end.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// How much of the end of a body is kept to find the usage object.
const TAIL: usize = 16 * 1024;

/// Prompt and completion tokens of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    /// `usage.prompt_tokens`.
    pub prompt: u64,
    /// `usage.completion_tokens`.
    pub completion: u64,
}

/// A body that passes frames through and reports usage at its end.
pub struct UsageTap<B, F: FnOnce(TokenUsage)> {
    inner: B,
    tail: Vec<u8>,
    on_usage: Option<F>,
}

impl<B, F: FnOnce(TokenUsage)> UsageTap<B, F> {
    /// Wraps `inner`; `on_usage` runs once, when the body ends with a usage object.
    pub fn new(inner: B, on_usage: F) -> Self {
        Self { inner, tail: Vec::new(), on_usage: Some(on_usage) }
    }
}

impl<B, F: FnOnce(TokenUsage)> UsageTap<B, F> {
    fn finish(&mut self) {
        if let Some(report) = self.on_usage.take()
            && let Some(usage) = find_usage(&self.tail)
        {
            report(usage);
        }
        self.tail = Vec::new();
    }
}

impl<B, F> Body for UsageTap<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    F: FnOnce(TokenUsage) + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.tail.extend_from_slice(data);
                    if this.tail.len() > 2 * TAIL {
                        this.tail.drain(..this.tail.len() - TAIL);
                    }
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
pub fn find_usage(tail: &[u8]) -> Option<TokenUsage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(at) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = at;
        let rest = &tail[at + KEY.len()..];
        let Some(colon) = rest.iter().position(|b| !b.is_ascii_whitespace()) else { continue };
        if rest[colon] != b':' {
            continue;
        }
        let mut values = serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<serde_json::Value>();
        let Some(Ok(usage)) = values.next() else { continue };
        let field = |names: &[&str]| names.iter().find_map(|n| usage.get(*n).and_then(serde_json::Value::as_u64));
        // Chat and completions say prompt/completion; the Responses API input/output.
        if let Some(prompt) = field(&["prompt_tokens", "input_tokens"]) {
            return Some(TokenUsage {
                prompt,
                completion: field(&["completion_tokens", "output_tokens"]).unwrap_or(0),
            });
        }
    }
    None
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

    #[test]
    fn responses_api_names_are_understood() {
        let body = br#"{"usage":{"input_tokens":4,"output_tokens":2}}"#;
        assert_eq!(find_usage(body), Some(TokenUsage { prompt: 4, completion: 2 }));
    }
}
