//! Finding the model a request names, for the model allowlists and the prices of cost
//! budgets, without reading more of the body than that and without keeping it in memory.
//!
//! `body → scanner (JSON object or multipart form) → model`: the proxy holds the bytes
//! it has read until the scanner finds the model (at most `lookahead` bytes), checks the
//! model, then forwards those bytes followed by the rest of the body as it streams. The
//! rest is still scanned: a body that names its model twice (most JSON parsers take the
//! last) is cut before its end, so the upstream never gets a complete request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Method, Request};

use super::error::{ProxyError, Refused};
use crate::index::Route;
use crate::pricing::Price;

/// Endpoints whose POST body names the model the request uses.
const NAMING_A_MODEL: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/fine_tuning/jobs",
];

/// Whether `method path` uses a model at a cost its answer does not report (audio,
/// image variations, fine-tuning): refused under a cost budget, which could not charge
/// it. Moderations are free.
fn unmetered(method: &Method, path: &str) -> bool {
    method == Method::POST
        && NAMING_A_MODEL.contains(&path)
        && path != "/v1/moderations"
        && !super::paths::reports_usage(method, path)
}

/// Endpoints that use models the proxy cannot see (a batch's models are in its input
/// file): refused while a model allowlist applies.
const HIDING_THE_MODEL: &[&str] = &["/v1/batches"];

/// Longest model name the proxy reads.
const MAX_MODEL_BYTES: usize = 256;

/// Where a request names its model.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// It names none: nothing to check.
    Nothing,
    /// In its path (`/v1/models/{model}`).
    Path(String),
    /// In its body, read by this scanner.
    Body(Scanner),
    /// In its body, in a format the proxy does not read.
    UnknownFormat,
    /// Somewhere the proxy cannot see.
    Hidden,
}

/// Where `method path` with body type `content_type` names its model.
pub(crate) fn source(method: &Method, path: &str, content_type: Option<&[u8]>) -> Source {
    if let Some(model) = path.strip_prefix("/v1/models/") {
        return Source::Path(model.to_string());
    }
    if method != Method::POST {
        return Source::Nothing;
    }
    if HIDING_THE_MODEL.contains(&path) {
        return Source::Hidden;
    }
    if !NAMING_A_MODEL.contains(&path) {
        return Source::Nothing;
    }
    let content_type = content_type.and_then(|v| std::str::from_utf8(v).ok()).unwrap_or("");
    let (media, params) = content_type.split_once(';').unwrap_or((content_type, ""));
    match media.trim().to_ascii_lowercase().as_str() {
        "application/json" => Source::Body(Scanner::Json(JsonScanner::default())),
        "multipart/form-data" => match boundary(params) {
            Some(boundary) => Source::Body(Scanner::Multipart(MultipartScanner::new(&boundary))),
            None => Source::UnknownFormat,
        },
        _ => Source::UnknownFormat,
    }
}

/// The `boundary` parameter of a multipart Content-Type; none when it is given twice
/// (parsers disagree on which one counts).
fn boundary(text: &str) -> Option<String> {
    let mut boundaries = parameters(text).into_iter().filter(|(name, _)| name == "boundary");
    match (boundaries.next(), boundaries.next()) {
        (Some((_, value)), None) if !value.is_empty() && value.len() <= 70 => Some(value),
        _ => None,
    }
}

/// `name=value` parameters separated by `;` outside quotes; names lowercased, values
/// unquoted.
fn parameters(text: &str) -> Vec<(String, String)> {
    let mut pieces = vec![String::new()];
    let (mut quoted, mut escaped) = (false, false);
    for c in text.chars() {
        let piece = pieces.last_mut().expect("never empty");
        match c {
            _ if escaped => {
                piece.push(c);
                escaped = false;
            }
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => pieces.push(String::new()),
            _ => piece.push(c),
        }
    }
    pieces
        .iter()
        .filter_map(|piece| piece.split_once('='))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect()
}

/// What a scan has found so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scan {
    /// Nothing yet: feed more.
    More,
    /// The model the body names.
    Model(String),
    /// The body is complete and names no model.
    NoModel,
    /// Not what the endpoint takes; says why.
    Malformed(&'static str),
}

/// What either scanner has learnt: the model, the end of the body, or why it stopped.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    found: Option<String>,
    ended: bool,
    error: Option<&'static str>,
}

impl Outcome {
    fn scan(&self) -> Scan {
        if let Some(error) = self.error {
            Scan::Malformed(error)
        } else if let Some(model) = &self.found {
            Scan::Model(model.clone())
        } else if self.ended {
            Scan::NoModel
        } else {
            Scan::More
        }
    }

    /// Nothing more to learn from further bytes.
    fn done_reading(&self) -> bool {
        self.error.is_some() || self.ended
    }
}

/// A scanner for one body format.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scanner {
    Json(JsonScanner),
    Multipart(MultipartScanner),
}

impl Scanner {
    /// Reads the next bytes of the body; returns what is known after them.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Scan {
        match self {
            Self::Json(s) => s.feed(bytes),
            Self::Multipart(s) => s.feed(bytes),
        }
    }

    /// What is known once the body has ended.
    pub(crate) fn finish(&mut self) -> Scan {
        let scan = match self {
            Self::Json(s) => s.outcome.scan(),
            Self::Multipart(s) => s.finish(),
        };
        if scan == Scan::More { Scan::NoModel } else { scan }
    }
}

/// Finds the top-level `"model"` string of a JSON object, one byte at a time, keeping
/// only the bytes of top-level keys and of the model's value.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct JsonScanner {
    started: bool,
    depth: u32,
    string: Option<Role>,
    escape: bool,
    captured: Vec<u8>,
    /// At depth 1, the next string is a key.
    expect_key: bool,
    after_model: AfterModel,
    outcome: Outcome,
}

/// What the string being read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Key,
    ModelValue,
    Other,
}

/// Where the scanner is after a top-level `"model"` key.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum AfterModel {
    #[default]
    No,
    Key,
    Colon,
}

/// A key longer than this (escaped) cannot spell `model`.
const MAX_KEY_BYTES: usize = 64;

impl JsonScanner {
    fn feed(&mut self, bytes: &[u8]) -> Scan {
        for &b in bytes {
            if self.outcome.done_reading() {
                break;
            }
            self.step(b);
        }
        self.outcome.scan()
    }

    fn step(&mut self, b: u8) {
        if let Some(role) = self.string {
            if self.escape {
                self.escape = false;
                self.capture(role, b);
            } else if b == b'\\' {
                self.escape = true;
                self.capture(role, b);
            } else if b == b'"' {
                self.string = None;
                self.end_string(role);
            } else {
                self.capture(role, b);
            }
            return;
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            return;
        }
        if !self.started {
            self.started = true;
            if b == b'{' {
                self.depth = 1;
                self.expect_key = true;
            } else {
                self.outcome.error = Some("the body is not a JSON object");
            }
            return;
        }
        let value_of_model = self.depth == 1 && self.after_model == AfterModel::Colon;
        match b {
            b'"' => {
                self.captured.clear();
                self.string = Some(if self.depth == 1 && self.expect_key {
                    Role::Key
                } else if value_of_model {
                    Role::ModelValue
                } else {
                    Role::Other
                });
            }
            b':' if self.depth == 1 && self.after_model == AfterModel::Key => self.after_model = AfterModel::Colon,
            b',' if self.depth == 1 => {
                self.expect_key = true;
                self.after_model = AfterModel::No;
            }
            b'{' | b'[' if value_of_model => self.outcome.error = Some("model is not a string"),
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                self.outcome.ended = self.depth == 0;
            }
            _ if value_of_model => self.outcome.error = Some("model is not a string"),
            // Numbers and literals; any other byte (NUL, UTF-16, …) makes this not
            // the UTF-8 JSON the proxy reads, and another parser might read it otherwise.
            b':'
            | b','
            | b'0'..=b'9'
            | b'-'
            | b'+'
            | b'.'
            | b'e'
            | b'E'
            | b't'
            | b'r'
            | b'u'
            | b'f'
            | b'a'
            | b'l'
            | b's'
            | b'n' => {}
            _ => self.outcome.error = Some("the body is not the UTF-8 JSON the proxy reads"),
        }
    }

    fn capture(&mut self, role: Role, b: u8) {
        let limit = match role {
            Role::Key => MAX_KEY_BYTES + 1,
            Role::ModelValue => MAX_MODEL_BYTES * 6 + 1,
            Role::Other => return,
        };
        if self.captured.len() < limit {
            self.captured.push(b);
        }
    }

    fn end_string(&mut self, role: Role) {
        match role {
            Role::Key => {
                self.expect_key = false;
                // Keys are compared decoded: "mod\u0065l" is a second `model` too.
                let is_model =
                    self.captured.len() <= MAX_KEY_BYTES && decode(&self.captured).as_deref() == Some("model");
                if is_model && self.outcome.found.is_some() {
                    self.outcome.error = Some("the body names its model twice");
                }
                self.after_model = if is_model { AfterModel::Key } else { AfterModel::No };
            }
            Role::ModelValue => {
                self.after_model = AfterModel::No;
                match decode(&self.captured) {
                    Some(model) if model.len() <= MAX_MODEL_BYTES => self.outcome.found = Some(model),
                    Some(_) => self.outcome.error = Some("model is longer than 256 bytes"),
                    None => self.outcome.error = Some("model is not a valid JSON string"),
                }
            }
            Role::Other => {}
        }
    }
}

/// The value of the JSON string whose escaped contents are `raw`.
fn decode(raw: &[u8]) -> Option<String> {
    if !raw.contains(&b'\\') {
        return String::from_utf8(raw.to_vec()).ok();
    }
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    serde_json::from_slice(&quoted).ok()
}

/// Finds the `model` field of a `multipart/form-data` body, keeping only part headers,
/// the field's value and a delimiter's length of the bytes in between.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MultipartScanner {
    /// `\r\n--boundary`; the first delimiter may also start the body without `\r\n`.
    delimiter: Vec<u8>,
    state: PartState,
    pending: Vec<u8>,
    value: Vec<u8>,
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartState {
    /// Before the first delimiter.
    Preamble,
    /// Just after a delimiter: `--` ends the body, `\r\n` starts a part.
    AfterDelimiter,
    /// Reading a part's headers.
    Headers,
    /// In a part's content; `true`: the `model` field's.
    Content(bool),
}

/// Most bytes of one part's headers.
const MAX_PART_HEADERS: usize = 8 * 1024;

impl MultipartScanner {
    fn new(boundary: &str) -> Self {
        Self {
            delimiter: [b"\r\n--", boundary.as_bytes()].concat(),
            // The body starts as if after a line break, so its first delimiter matches.
            pending: b"\r\n".to_vec(),
            state: PartState::Preamble,
            value: Vec::new(),
            outcome: Outcome::default(),
        }
    }

    fn feed(&mut self, bytes: &[u8]) -> Scan {
        if !self.outcome.done_reading() && !bytes.is_empty() {
            self.pending.extend_from_slice(bytes);
            self.advance(false);
        }
        self.outcome.scan()
    }

    fn finish(&mut self) -> Scan {
        if !self.outcome.done_reading() {
            self.advance(true);
        }
        self.outcome.scan()
    }

    /// Consumes what `pending` allows; `at_end`: no more bytes will come.
    fn advance(&mut self, at_end: bool) {
        loop {
            match self.state {
                PartState::Preamble | PartState::Content(_) => {
                    let in_model = self.state == PartState::Content(true);
                    match find(&self.pending, &self.delimiter) {
                        Some(at) => {
                            if in_model {
                                self.value.extend_from_slice(&self.pending[..at]);
                                self.end_model_value();
                            }
                            self.pending.drain(..at + self.delimiter.len());
                            self.state = PartState::AfterDelimiter;
                        }
                        None => {
                            // Keep what could be the start of a delimiter.
                            let keep = self.delimiter.len() - 1;
                            let cut = self.pending.len().saturating_sub(keep);
                            if in_model {
                                self.value.extend_from_slice(&self.pending[..cut]);
                                if self.value.len() > MAX_MODEL_BYTES {
                                    self.outcome.error = Some("model is longer than 256 bytes");
                                }
                            }
                            self.pending.drain(..cut);
                            if at_end {
                                self.outcome.error = Some("the multipart body ends without its closing delimiter");
                            }
                            return;
                        }
                    }
                }
                PartState::AfterDelimiter => {
                    if self.pending.len() < 2 {
                        if at_end {
                            self.outcome.error = Some("the multipart body ends without its closing delimiter");
                        }
                        return;
                    }
                    let closing = self.pending.starts_with(b"--");
                    // Only transport padding (spaces, tabs) may follow a delimiter on its
                    // line: parsers disagree on lines like `--boundary--x`, so they are refused.
                    let rest = &self.pending[if closing { 2 } else { 0 }..];
                    let padding = rest.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
                    match rest.get(padding) {
                        None if closing && at_end => {
                            self.outcome.ended = true;
                            return;
                        }
                        Some(b'\r') if rest.get(padding + 1) == Some(&b'\n') => {
                            if closing {
                                self.outcome.ended = true;
                                return;
                            }
                            let line = padding + 2;
                            self.pending.drain(..line);
                            self.state = PartState::Headers;
                        }
                        Some(b'\r') | None if self.pending.len() <= 256 && !at_end => return,
                        Some(_) | None => {
                            self.outcome.error = Some("a multipart delimiter line holds more than the delimiter");
                        }
                    }
                    if self.outcome.error.is_some() {
                        return;
                    }
                }
                PartState::Headers => match find(&self.pending, b"\r\n\r\n") {
                    Some(at) => {
                        let Ok(name) = field_name(&self.pending[..at]) else {
                            self.outcome.error = Some("a multipart part names its field more than once");
                            return;
                        };
                        let is_model = name.as_deref() == Some("model");
                        if is_model && self.outcome.found.is_some() {
                            self.outcome.error = Some("the body names its model twice");
                            return;
                        }
                        self.pending.drain(..at + 4);
                        self.value.clear();
                        self.state = PartState::Content(is_model);
                    }
                    None if self.pending.len() > MAX_PART_HEADERS => {
                        self.outcome.error = Some("a multipart part's headers are over 8 KiB");
                        return;
                    }
                    None => {
                        if at_end {
                            self.outcome.error = Some("the multipart body ends inside a part's headers");
                        }
                        return;
                    }
                },
            }
            if self.outcome.error.is_some() {
                return;
            }
        }
    }

    fn end_model_value(&mut self) {
        match String::from_utf8(std::mem::take(&mut self.value)) {
            Ok(model) if model.len() <= MAX_MODEL_BYTES => self.outcome.found = Some(model),
            Ok(_) => self.outcome.error = Some("model is longer than 256 bytes"),
            Err(_) => self.outcome.error = Some("model is not UTF-8"),
        }
    }
}

/// The `name` of a part whose headers are `headers`, from its Content-Disposition;
/// an error when it has two of those or two names (parsers disagree on which counts).
fn field_name(headers: &[u8]) -> Result<Option<String>, ()> {
    let Ok(text) = std::str::from_utf8(headers) else { return Ok(None) };
    let dispositions: Vec<&str> = text
        .split("\r\n")
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim().eq_ignore_ascii_case("content-disposition").then_some(value)
        })
        .collect();
    let [disposition] = dispositions[..] else {
        return if dispositions.is_empty() { Ok(None) } else { Err(()) };
    };
    let mut names = parameters(disposition).into_iter().filter(|(key, _)| key == "name");
    match (names.next(), names.next()) {
        (None, _) => Ok(None),
        (Some((_, name)), None) => Ok(Some(name)),
        (Some(_), Some(_)) => Err(()),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Why the model could not be read from a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// The body broke off.
    Body,
    /// Over `lookahead` bytes without finding the model.
    TooFar,
}

/// Reads `body` until `scanner` has found the model (or the body ends, or `lookahead`
/// bytes are read). Returns what it found and the body to forward: the bytes read,
/// then the rest, still scanned for a second model.
pub(crate) async fn read_model(
    mut body: Incoming,
    mut scanner: Scanner,
    lookahead: usize,
) -> Result<(Scan, Replayed), ReadError> {
    let mut read = BytesMut::new();
    let mut trailers = None;
    let scan = loop {
        match body.frame().await {
            None => break scanner.finish(),
            Some(Err(_)) => return Err(ReadError::Body),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    read.extend_from_slice(&data);
                    match scanner.feed(&data) {
                        Scan::More if read.len() > lookahead => return Err(ReadError::TooFar),
                        Scan::More => {}
                        scan => break scan,
                    }
                }
                Err(frame) => {
                    trailers = Some(frame);
                    break scanner.finish();
                }
            },
        }
    };
    let replayed = Replayed { read: Some(read.freeze()), trailers, rest: Some(body), scanner: Some(scanner) };
    Ok((scan, replayed))
}

/// A request body whose first bytes were read already: those, then the rest, which is
/// scanned on (a second model cuts the body short with [`SecondModel`]).
pub(crate) struct Replayed {
    read: Option<Bytes>,
    trailers: Option<Frame<Bytes>>,
    rest: Option<Incoming>,
    scanner: Option<Scanner>,
}

impl Replayed {
    /// `body` as it is: nothing read, nothing to scan.
    pub(crate) fn whole(body: Incoming) -> Self {
        Self { read: None, trailers: None, rest: Some(body), scanner: None }
    }
}

/// A body cut short: it named its model a second time.
#[derive(Debug, thiserror::Error)]
#[error("the request body names its model twice")]
pub(crate) struct SecondModel;

impl Body for Replayed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(read) = this.read.take().filter(|r| !r.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(read))));
        }
        if let Some(trailers) = this.trailers.take() {
            this.rest = None;
            return Poll::Ready(Some(Ok(trailers)));
        }
        let Some(rest) = this.rest.as_mut() else { return Poll::Ready(None) };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(scanner)) = (frame.data_ref(), this.scanner.as_mut())
                    && let Scan::Malformed(_) = scanner.feed(data)
                {
                    this.rest = None;
                    return Poll::Ready(Some(Err(Box::new(SecondModel))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
            Poll::Ready(None) => {
                this.rest = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.as_ref().is_none_or(Bytes::is_empty)
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let read = self.read.as_ref().map_or(0, |r| r.len() as u64);
        let rest = self.rest.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + read);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + read);
        }
        hint
    }
}

/// Lets `request` through if the model it names is allowed by every list of `route`
/// (the token's and the Project's), reading at most `lookahead` bytes of its body to
/// find it. Requests with no list to pass are not looked at.
pub(crate) async fn admit(
    request: Request<Incoming>,
    route: &Route,
    lookahead: usize,
) -> Result<(Request<Replayed>, Option<Price>), Refused> {
    let lists = [(route.token.models.as_ref(), "ProxyToken"), (route.project.models.as_ref(), "Project")];
    let limited = lists.iter().any(|(list, _)| list.is_some());
    let priced = route.token.window_limits.has_cost() || route.project.window_limits.has_cost();
    if !limited && !priced {
        return Ok((request.map(Replayed::whole), None));
    }
    let check = |model: &str| -> Result<(), Refused> {
        for (list, owner) in lists {
            if let Some(list) = list.filter(|l| !l.allows(model)) {
                return Err(Refused::saying(
                    ProxyError::ModelNotAllowed,
                    format!(
                        "The model {model:?} is not allowed for this token: its {owner} allows only {}. Use one of those, or ask for the model to be added to the {owner}'s spec.limits.models.",
                        list.describe()
                    ),
                ));
            }
        }
        Ok(())
    };
    // The price its answer is charged at, where a cost budget applies.
    let price = |model: &str| -> Result<Option<Price>, Refused> {
        if !priced {
            return Ok(None);
        }
        match route.project.prices.as_ref().and_then(|prices| prices.price(model)) {
            Some(price) => Ok(Some(price)),
            None => Err(Refused::not_priced(model, &route.project.price_list, route.project.prices.is_some())),
        }
    };
    let limit = match limited {
        true => "may use only some models (spec.limits.models)",
        false => {
            "is under a budget in US dollars (spec.limits.costPerMonth of the token or its Project), priced by model"
        }
    };
    if priced && unmetered(request.method(), request.uri().path()) {
        return Err(Refused::saying(
            ProxyError::ModelNotAllowed,
            format!(
                "{} cannot be sent with a token under a budget in US dollars (spec.limits.costPerMonth of the token or its Project): its answer reports no token usage, so the proxy cannot charge it. Use a token without a cost budget for it.",
                request.uri().path()
            ),
        ));
    }
    let required = |why: &str| {
        Refused::saying(
            ProxyError::ModelRequired,
            format!("This token {limit}, so the proxy must read the request's model, and {why}."),
        )
    };
    let content_type = request.headers().get(hyper::header::CONTENT_TYPE).map(|v| v.as_bytes());
    match source(request.method(), request.uri().path(), content_type) {
        Source::Nothing => Ok((request.map(Replayed::whole), None)),
        // Reading a model's description reports no usage: nothing to price.
        Source::Path(model) => check(&model).map(|()| (request.map(Replayed::whole), None)),
        Source::Hidden => Err(Refused::saying(
            ProxyError::ModelNotAllowed,
            format!(
                "Batches cannot be created with a token that {limit}: their models are in the input file, which the proxy does not read."
            ),
        )),
        Source::UnknownFormat => {
            Err(required("its Content-Type is neither application/json nor multipart/form-data with a boundary"))
        }
        Source::Body(scanner) => {
            let (parts, body) = request.into_parts();
            let (scan, body) = read_model(body, scanner, lookahead).await.map_err(|e| match e {
                ReadError::Body => required("the request body broke off before it named one"),
                ReadError::TooFar => required(&format!(
                    "the first {lookahead} bytes of the body do not name one: send the model field first (the official SDKs do), or ask a cluster admin to raise LLMPROXY_MODEL_LOOKAHEAD_BYTES"
                )),
            })?;
            let price = match scan {
                Scan::Model(model) => check(&model).and_then(|()| price(&model))?,
                Scan::NoModel | Scan::More => return Err(required("the body names none")),
                Scan::Malformed("the body names its model twice") => return Err(ProxyError::ModelAmbiguous.into()),
                Scan::Malformed(why) => return Err(required(&format!("{why} here"))),
            };
            Ok((Request::from_parts(parts, body), price))
        }
    }
}

#[cfg(test)]
mod tests;
