//! Logging: JSON lines on stdout via `tracing`, filtered by `RUST_LOG` (default `info`).
//!
//! In: every event of the process (one access-log line per proxied request among
//! them). Out: one JSON object per line — `timestamp`, `level`, the event's fields
//! (`message` first), `target` — written to stdout in batches: one `write` per 64 KiB
//! or per 100 ms instead of one per line, as nginx's `access_log … buffer=`. At tens
//! of thousands of requests a second a system call per line was an eighth of the
//! proxy's CPU time, and the general-purpose JSON formatter a fifth of its
//! instructions; [`JsonLines`] writes the same shape directly.
//! [`flush`] writes what is pending; `main` calls it before the process exits.
//! Fields of the spans an event happens in are written too (kube-runtime's
//! `reconciling object` span gives every reconcile's line its `object.ref`), and
//! [`Chain`] writes an error with each of its causes once.

use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// Pending bytes are written once there are this many.
const BATCH_BYTES: usize = 64 * 1024;

/// Pending bytes are written at least this often.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Lines not yet written to stdout.
static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Installs the global JSON subscriber and the flushing thread. Call once, from `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .event_format(JsonLines)
        .fmt_fields(JsonSpanFields)
        .with_env_filter(filter)
        .with_writer(Batched)
        .init();
    // A plain thread, not a task: it must run whatever the runtimes are doing.
    let _ = std::thread::Builder::new().name("log-flush".into()).spawn(|| {
        loop {
            std::thread::sleep(FLUSH_INTERVAL);
            flush();
        }
    });
}

/// Writes every pending log line to stdout.
pub fn flush() {
    write_out(&mut pending());
}

fn pending() -> MutexGuard<'static, Vec<u8>> {
    // A panic while holding the lock leaves whole lines behind: keep logging.
    PENDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes `buffer` out while its lock is held, so batches keep their order.
fn write_out(buffer: &mut Vec<u8>) {
    if buffer.is_empty() {
        return;
    }
    // Nowhere to report a failed log write; the lines are dropped rather than kept forever.
    let _ = io::stdout().lock().write_all(buffer);
    buffer.clear();
}

/// The subscriber's writer: appends each formatted event to the pending batch.
#[derive(Clone, Copy)]
struct Batched;

impl Write for Batched {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut buffer = pending();
        buffer.extend_from_slice(bytes);
        if buffer.len() >= BATCH_BYTES {
            write_out(&mut buffer);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = Batched;

    fn make_writer(&'a self) -> Self::Writer {
        Batched
    }
}

/// Formats each event as one JSON object: `timestamp` (RFC 3339, UTC, microseconds),
/// `level`, the event's fields in order, the fields of the spans it is in (outermost
/// first), `target`.
pub struct JsonLines;

/// Formats a span's fields once, when it is created, as `,"name":value` pairs that
/// [`JsonLines`] appends to every event inside it.
pub struct JsonSpanFields;

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = JsonFields { writer: &mut writer, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// An error and each of its causes, `outer: inner: innermost`: error types here name
/// the operation that failed and leave the cause to `source()`, so it is printed once.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, context: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let metadata = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, SystemTime::now())?;
        write!(writer, "\",\"level\":\"{}\"", metadata.level())?;
        let mut fields = JsonFields { writer: &mut writer, result: Ok(()) };
        event.record(&mut fields);
        fields.result?;
        if let Some(scope) = context.event_scope() {
            for span in scope.from_root() {
                if let Some(formatted) = span.extensions().get::<FormattedFields<N>>() {
                    writer.write_str(formatted.as_str())?;
                }
            }
        }
        writer.write_str(",\"target\":")?;
        write_json_str(&mut writer, metadata.target())?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct JsonFields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                self.writer.write_char(',')?;
                write_json_str(self.writer, field.name())?;
                self.writer.write_char(':')?;
                value(self.writer)
            })();
        }
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |w| write_json_str(w, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        self.field(field, |w| if value.is_finite() { write!(w, "{value}") } else { w.write_str("null") });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |w| {
            w.write_char('"')?;
            write!(Escaped(&mut *w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// Writes `text` as a JSON string.
fn write_json_str(writer: &mut impl fmt::Write, text: &str) -> fmt::Result {
    writer.write_char('"')?;
    Escaped(&mut *writer).write_str(text)?;
    writer.write_char('"')
}

/// Escapes what it is given for the inside of a JSON string.
struct Escaped<W>(W);

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // Nearly every value needs no escaping; a scan without early exit vectorises.
        let special = |b: u8| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f;
        if !text.bytes().fold(false, |found, b| found | special(b)) {
            return self.0.write_str(text);
        }
        let mut plain = 0;
        for (at, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..0x20 | 0x7f => "",
                _ => continue,
            };
            self.0.write_str(&text[plain..at])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = at + 1;
        }
        self.0.write_str(&text[plain..])
    }
}

/// Writes `time` as `2026-11-26T23:18:17.554230Z`.
fn write_timestamp(writer: &mut impl fmt::Write, time: SystemTime) -> fmt::Result {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    write!(
        writer,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        since_epoch.subsec_micros()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines_of(log: impl FnOnce()) -> Vec<serde_json::Value> {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .fmt_fields(JsonSpanFields)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))).collect()
    }

    #[test]
    fn events_are_one_json_object_per_line_with_every_field() {
        let lines = lines_of(|| {
            tracing::info!(target: "access", path = "/v1/chat/completions", status = 200u64, delta = -3i64, ok = true, ratio = 0.5, "request");
            tracing::warn!(error = %"upstream \"x\" failed\nbadly\u{1}", "upstream request failed");
        });
        assert_eq!(lines.len(), 2);
        let access = &lines[0];
        assert_eq!(access["level"], "INFO");
        assert_eq!(access["target"], "access");
        assert_eq!(access["message"], "request");
        assert_eq!(access["path"], "/v1/chat/completions");
        assert_eq!(access["status"], 200);
        assert_eq!(access["delta"], -3);
        assert_eq!(access["ok"], true);
        assert_eq!(access["ratio"], 0.5);
        let timestamp = access["timestamp"].as_str().unwrap();
        assert_eq!(timestamp.len(), "2026-11-26T23:18:17.554230Z".len(), "{timestamp}");
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["error"], "upstream \"x\" failed\nbadly\u{1}", "quotes and control characters survive");
    }

    #[test]
    fn lines_carry_the_fields_of_their_spans_and_errors_their_causes_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("writing the status of ProxyToken apps/web")]
        struct PatchStatus {
            source: std::io::Error,
        }
        let error = PatchStatus { source: std::io::Error::other("connection refused") };
        let lines = lines_of(|| {
            let span =
                tracing::info_span!("reconciling object", object.r#ref = "ProxyToken.v1alpha1.llmproxy.io/web.apps");
            let _entered = span.enter();
            tracing::warn!(error = %Chain(&error), "reconcile failed");
        });
        assert_eq!(lines[0]["object.ref"], "ProxyToken.v1alpha1.llmproxy.io/web.apps", "{:?}", lines[0]);
        assert_eq!(lines[0]["error"], "writing the status of ProxyToken apps/web: connection refused");
        assert_eq!(lines[0]["message"], "reconcile failed");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u64| {
            let mut text = String::new();
            write_timestamp(&mut text, UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)).unwrap();
            text
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_795_734_297, 554_230), "2026-11-26T23:04:57.554230Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
    }
}
