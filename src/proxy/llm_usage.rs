//! Reads the upstream's token usage (`usage.prompt_tokens`, `usage.completion_tokens`)
//! from a response body as it streams past, without buffering it.
//!
//! In: the upstream body's frames. Out: the same frames, unchanged and undelayed, and at
//! the end of the body one call of the `on_usage` callback, with the usage if the body
//! had one (a body cut short calls nothing). What is kept is a bounded copy of the body
//! from its latest `"usage"` key on: a JSON response's usage object and a stream's final
//! chunk are both at the end. A copy, not the frames themselves: a frame shares the
//! connection's read buffer, and keeping a stream's last frames kept a read buffer each
//! (400 KiB a stream, measured by `just bench-streams`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use serde::Deserialize;

/// Most bytes kept from the latest `"usage"` key on: the object and what follows it.
const TAIL: usize = 16 * 1024;

/// Bytes of the body kept from before the current frame, to find a key that a frame
/// boundary splits (with the colon and brace after it).
const CARRY: usize = 32;

/// The key a usage object follows.
const KEY: &[u8] = b"\"usage\"";

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
    /// The body from its latest `"usage"` key that may open an object, at most [`TAIL`]
    /// bytes; empty before one.
    tail: Vec<u8>,
    /// The body's last bytes so far (up to [`CARRY`]).
    carry: Vec<u8>,
    on_usage: Option<F>,
}

impl<B, F: FnOnce(Option<TokenUsage>)> UsageTap<B, F> {
    /// Wraps `inner`; `on_usage` runs once, when the body ends, with its usage object if
    /// it has one.
    pub(crate) fn new(inner: B, on_usage: F) -> Self {
        Self { inner, tail: Vec::new(), carry: Vec::new(), on_usage: Some(on_usage) }
    }

    fn keep(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // The latest key in this frame that opens an object, or else one that began in
        // the carried bytes and opens one in this frame. A key whose value the frame
        // cuts off is decided by the next frame, from the carried bytes.
        let carried = self.carry.len();
        let in_carry = || {
            let mut joined = [0u8; 2 * CARRY];
            let prefix = &data[..data.len().min(CARRY)];
            joined[..carried].copy_from_slice(&self.carry);
            joined[carried..carried + prefix.len()].copy_from_slice(prefix);
            latest_object_key(&joined[..carried + prefix.len()], carried)
        };
        match latest_object_key(data, data.len()) {
            Some(at) => {
                self.tail.clear();
                self.extend_tail(&data[at..]);
            }
            None => match in_carry() {
                Some(at) => {
                    let kept = self.carry[at..].to_vec();
                    self.tail.clear();
                    self.extend_tail(&kept);
                    self.extend_tail(data);
                }
                None if !self.tail.is_empty() => self.extend_tail(data),
                None => {}
            },
        }
        let from = data.len().saturating_sub(CARRY);
        self.carry.extend_from_slice(&data[from..]);
        let excess = self.carry.len().saturating_sub(CARRY);
        self.carry.drain(..excess);
    }

    fn extend_tail(&mut self, data: &[u8]) {
        let room = TAIL.saturating_sub(self.tail.len());
        self.tail.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn finish(&mut self) {
        let tail = std::mem::take(&mut self.tail);
        let Some(report) = self.on_usage.take() else { return };
        report(find_usage(&tail));
    }
}

/// Where the last `"usage"` key in `bytes` that begins before `before` begins, of
/// those whose value is seen to open an object: a `"usage": null` does not count, nor
/// does a key whose value `bytes` ends before.
fn latest_object_key(bytes: &[u8], before: usize) -> Option<usize> {
    memchr::memmem::rfind_iter(bytes, KEY).filter(|&at| at < before).find(|&at| {
        let mut rest = bytes[at + KEY.len()..].iter().copied().filter(|b| !b.is_ascii_whitespace());
        rest.next() == Some(b':') && rest.next() == Some(b'{')
    })
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
                    let data: &Bytes = data;
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
            assert!(tap.tail.len() <= TAIL, "the kept tail grew to {} bytes", tap.tail.len());
        }
        assert_eq!(forwarded, body, "frames pass through unchanged");
        assert_eq!(report.try_recv(), Ok(Some(TokenUsage { prompt: 21, completion: 4 })));
    }

    #[test]
    fn responses_api_names_are_understood() {
        let body = br#"{"usage":{"input_tokens":4,"output_tokens":2}}"#;
        assert_eq!(find_usage(body), Some(TokenUsage { prompt: 4, completion: 2 }));
    }

    /// Runs `frames` through a tap; returns the usage it reported and the most it kept.
    async fn tap(frames: Vec<&[u8]>) -> (Option<TokenUsage>, usize) {
        use http_body_util::{BodyExt, StreamBody};
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            frames.into_iter().map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
        let (found, report) = std::sync::mpsc::channel();
        let mut tap = UsageTap::new(StreamBody::new(futures::stream::iter(frames)), move |usage| {
            found.send(usage).unwrap();
        });
        let mut most = 0;
        while let Some(frame) = tap.frame().await {
            frame.unwrap();
            most = most.max(tap.tail.len() + tap.carry.len());
        }
        (report.try_recv().unwrap(), most)
    }

    #[tokio::test]
    async fn a_long_stream_keeps_only_its_last_bytes_and_a_null_usage_resets_nothing() {
        let chunk =
            b"data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"delta\":{\"content\":\"hello\"}}]}\n\n";
        let with_null = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        let last = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":5}}\n\n";
        let mut frames: Vec<&[u8]> = std::iter::repeat_n(chunk.as_slice(), 1000).collect();
        frames.push(last);
        frames.push(with_null);
        frames.push(b"data: [DONE]\n\n");
        let (usage, most) = tap(frames).await;
        assert_eq!(usage, Some(TokenUsage { prompt: 9, completion: 5 }));
        // Nothing kept before the usage object: the bytes carried, then the object on.
        assert!(most < 200, "kept {most} bytes");
        // A key split by a frame boundary, with its colon and brace.
        let (usage, _) =
            tap(vec![b"data: {\"choices\":[],\"us", b"age\"", b" : ", b"{\"prompt_tokens\":2}}\n\n"]).await;
        assert_eq!(usage, Some(TokenUsage { prompt: 2, completion: 0 }));
        let (usage, _) = tap(vec![chunk, with_null, b"data: [DONE]\n\n"]).await;
        assert_eq!(usage, None);
        // A later key whose value a frame boundary cuts off, then `null`: the earlier
        // object still counts.
        let (usage, _) = tap(vec![last, b"data: {\"choices\":[],\"usage\":", b"null}\n\n", b"data: [DONE]\n\n"]).await;
        assert_eq!(usage, Some(TokenUsage { prompt: 9, completion: 5 }));
    }
}
