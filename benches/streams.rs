//! Many concurrent SSE streams through one path (direct to the upstream, nginx, or
//! llm-proxy), the way long streamed completions load a proxy: each stream its own
//! HTTP/1.1 connection, held open for the whole run, a chunk every few tens of
//! milliseconds. Used by `benches/streams.sh`; prints one JSON line.
//!
//! Usage: `streams URL TOKEN STREAMS SECONDS INTERVAL_MS RAMP_PER_SECOND`
//!
//! The fake upstream stamps each chunk with the instant it sent it (`"sent_us"`, asked
//! for with `x-fake-timestamps: 1`); a chunk's delay is when it arrived here minus that,
//! on the same clock. Every stream is checked whole: each chunk in order, the last one
//! and `[DONE]` received.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// What one stream saw.
#[derive(Default)]
struct Seen {
    /// Time to the first body byte, microseconds; `None` if it never came.
    first_byte_us: Option<u64>,
    /// Each chunk's delay, microseconds.
    delays_us: Vec<u32>,
    /// Chunks that arrived out of order (or twice).
    out_of_order: u64,
    /// The whole stream arrived, ending in `[DONE]`.
    complete: bool,
    /// Why it failed, if it did.
    error: Option<String>,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The number after `key` in `event`.
fn number_after(event: &[u8], key: &[u8]) -> Option<u64> {
    let at = event.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = event[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&event[at..at + digits]).ok()?.parse().ok()
}

async fn one_stream(url: hyper::Uri, token: String, chunks: u64, interval_ms: u64) -> Seen {
    let mut seen = Seen { delays_us: Vec::with_capacity(chunks as usize), ..Seen::default() };
    let address = format!("{}:{}", url.host().unwrap_or("127.0.0.1"), url.port_u16().unwrap_or(80));
    let stream = match tokio::net::TcpStream::connect(&address).await {
        Ok(stream) => stream,
        Err(error) => return Seen { error: Some(format!("connect: {error}")), ..seen },
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(error) => return Seen { error: Some(format!("handshake: {error}")), ..seen },
    };
    tokio::spawn(connection);
    let request = hyper::Request::post(url.clone())
        .header("host", &address)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("x-fake-chunks", chunks.to_string())
        .header("x-fake-chunk-delay-ms", interval_ms.to_string())
        .header("x-fake-timestamps", "1")
        .body(Full::new(Bytes::from_static(br#"{"model":"m","messages":[],"stream":true}"#)))
        .expect("a valid request");
    let sent = Instant::now();
    let response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(error) => return Seen { error: Some(format!("request: {error}")), ..seen },
    };
    if response.status() != 200 {
        return Seen { error: Some(format!("status {}", response.status())), ..seen };
    }
    let mut body = response.into_body();
    let (mut pending, mut next) = (Vec::<u8>::new(), 0u64);
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Err(error) => return Seen { error: Some(format!("body: {error}")), ..seen },
        };
        let arrived = now_us();
        seen.first_byte_us.get_or_insert(sent.elapsed().as_micros() as u64);
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            if let Some(sent_us) = number_after(&event, br#""sent_us":"#) {
                seen.delays_us.push(arrived.saturating_sub(sent_us).min(u64::from(u32::MAX)) as u32);
                // A chunk out of place counts once; the next in place counts none.
                let i = number_after(&event, br#""content":"chunk"#).unwrap_or(u64::MAX);
                if i != next {
                    seen.out_of_order += 1;
                }
                next = next.max(i.saturating_add(1)).min(chunks);
            } else if event.windows(6).any(|w| w == b"[DONE]") {
                seen.complete = next == chunks;
            }
        }
    }
    if !seen.complete && seen.error.is_none() {
        seen.error = Some(format!("ended after {next} of {chunks} chunks"));
    }
    seen
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[at]) / 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, token, streams, seconds, interval_ms, ramp] = &args[..] else {
        eprintln!("usage: streams URL TOKEN STREAMS SECONDS INTERVAL_MS RAMP_PER_SECOND");
        std::process::exit(2);
    };
    let url: hyper::Uri = format!("{url}/v1/chat/completions").parse().expect("a valid URL");
    let (streams, seconds, interval_ms, ramp): (u64, u64, u64, u64) =
        (streams.parse().unwrap(), seconds.parse().unwrap(), interval_ms.parse().unwrap(), ramp.parse().unwrap());
    let chunks = seconds * 1000 / interval_ms.max(1);
    // One thread: the proxy under test and the upstream need the other cores.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let results: Vec<Seen> = runtime.block_on(async {
        let started = Instant::now();
        let tasks: Vec<_> = (0..streams)
            .map(|i| {
                let (url, token) = (url.clone(), token.clone());
                let start_at = started + Duration::from_micros(i * 1_000_000 / ramp.max(1));
                tokio::spawn(async move {
                    tokio::time::sleep_until(start_at.into()).await;
                    one_stream(url, token, chunks, interval_ms).await
                })
            })
            .collect();
        let mut results = Vec::with_capacity(tasks.len());
        for task in tasks {
            results.push(
                task.await.unwrap_or_else(|_| Seen { error: Some("client task panicked".into()), ..Seen::default() }),
            );
        }
        results
    });
    let complete = results.iter().filter(|s| s.complete).count();
    let errors: std::collections::BTreeMap<String, usize> =
        results.iter().filter_map(|s| s.error.as_deref()).fold(Default::default(), |mut counts, e| {
            // By cause: "ended after 12 of 1200 chunks" and "ended after 13 …" are one.
            let cause = e.split(|c: char| c == ':' || c.is_ascii_digit()).next().unwrap_or(e).trim();
            *counts.entry(cause.to_string()).or_default() += 1;
            counts
        });
    let out_of_order: u64 = results.iter().map(|s| s.out_of_order).sum();
    let mut first_bytes: Vec<u32> = results.iter().filter_map(|s| s.first_byte_us).map(|us| us as u32).collect();
    first_bytes.sort_unstable();
    let mut delays: Vec<u32> = results.into_iter().flat_map(|s| s.delays_us).collect();
    let received = delays.len();
    delays.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "streams": streams, "complete": complete, "errors": errors,
            "chunks_expected": streams * chunks, "chunks_received": received, "out_of_order": out_of_order,
            "ttfb_p50_ms": percentile(&first_bytes, 0.5), "ttfb_p99_ms": percentile(&first_bytes, 0.99),
            "delay_p50_ms": percentile(&delays, 0.5), "delay_p99_ms": percentile(&delays, 0.99),
            "delay_p999_ms": percentile(&delays, 0.999), "delay_max_ms": percentile(&delays, 1.0),
        })
    );
}
