//! Pipes an upstream body to the client chunk by chunk, never buffering.
//!
//! On the side it watches the stream (SSE via the `sse-parse` crate) for the
//! first content token and usage, turns an upstream death or idle timeout
//! into an SSE error event + `[DONE]`, and records metrics when it ends or
//! when the client goes away (dropping it drops the upstream connection).

use crate::fleet::{Replica, Series};
use crate::state::Gateway;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use helexa_api::error::{ApiError, ErrorCode};
use hyper::body::Body as _;
use memchr::memmem::{Finder, FinderRev};
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

type Upstream = crate::upstream::UpstreamBody;

/// One of cortex's open requests to a replica: counted while it lives.
pub struct InFlight(Arc<Replica>);

impl InFlight {
    pub fn new(replica: Arc<Replica>) -> Self {
        replica.in_flight().fetch_add(1, Ordering::Relaxed);
        InFlight(replica)
    }

    pub fn replica(&self) -> &Replica {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight().fetch_sub(1, Ordering::Relaxed);
    }
}

/// What is known about the request for the metrics recorded at the end.
pub struct Accounting {
    /// The gateway, for its metrics (one reference count, where cloning
    /// `Metrics` was a dozen).
    pub gw: Arc<Gateway>,
    /// The replica answering (its model, metric series and open count).
    pub in_flight: InFlight,
    /// Index of its neuron in `Fleet::neurons`.
    pub node: usize,
    pub status: u16,
    pub started: Instant,
    pub request_id: http::HeaderValue,
    /// The client key's admission: settled from the answer's usage at the
    /// end (and its open-request slot released).
    pub permit: Option<crate::keys::Permit>,
}

impl Accounting {
    fn model(&self) -> &str {
        &self.in_flight.replica().model
    }

    fn node_name(&self) -> &str {
        &self.gw.fleet.neurons[self.node].name
    }

    fn series(&self) -> &Series {
        self.in_flight
            .replica()
            .series(&self.gw.metrics, self.node_name())
    }
}

/// Searchers built once: making one per search was a visible share of the
/// relay's CPU.
static DONE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"[DONE]"));
static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
/// `usage` comes at the end of an answer: searched for from the end.
static USAGE_REV: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(b"\"usage\""));

/// What the relay reads from an SSE stream: the first content token, the
/// usage, and whether `[DONE]` came.
struct SseWatch {
    parser: sse_parse::SseParser,
    /// `[DONE]` is expected (chat/completions), not for `/v1/responses`.
    expects_done: bool,
    saw_done: bool,
    first_token: bool,
    usage: Option<(u64, u64)>,
    /// Everything fed so far ended with a blank line: the parser holds no
    /// partial event.
    at_boundary: bool,
}

impl SseWatch {
    fn new(expects_done: bool) -> SseWatch {
        SseWatch {
            parser: sse_parse::SseParser::new().max_buffer(SSE_EVENT_LIMIT),
            expects_done,
            saw_done: false,
            first_token: false,
            usage: None,
            at_boundary: true,
        }
    }

    /// Reads one piece of the stream; true when it held the first token.
    ///
    /// After the first token only `[DONE]` and `usage` matter. A piece that
    /// starts and ends on an event boundary and contains neither string
    /// holds no event that could change anything, so it is not parsed: in
    /// a token stream that is every event but the last two, and parsing
    /// each one was most of the relay's CPU.
    fn watch(&mut self, chunk: &[u8]) -> bool {
        let ends_event = chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\n\r\n");
        if self.first_token
            && self.at_boundary
            && ends_event
            && DONE.find(chunk).is_none()
            && USAGE.find(chunk).is_none()
        {
            return false;
        }
        self.at_boundary = ends_event;
        self.parser.feed(chunk);
        let mut first = false;
        while let Some(ev) = self.parser.next_event() {
            let data = ev.data.as_str();
            if data == "[DONE]" {
                self.saw_done = true;
                continue;
            }
            if !self.first_token && event_has_content(data) {
                self.first_token = true;
                first = true;
            }
            if data.contains("\"usage\"") {
                if let Some(u) = usage_of(data.as_bytes()) {
                    self.usage = Some(u);
                }
            }
        }
        first
    }
}

/// A non-streamed answer kept aside to read its `usage` at the end: the
/// usual single piece by reference, several pieces copied together.
enum Kept {
    Empty,
    One(Bytes),
    Many(Vec<u8>),
}

impl Kept {
    /// None once the answer is over [`USAGE_COPY_LIMIT`].
    fn push(self, chunk: &Bytes) -> Option<Kept> {
        let next = match self {
            Kept::Empty => Kept::One(chunk.clone()),
            Kept::One(first) => {
                let mut all = Vec::with_capacity(first.len() + chunk.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(chunk);
                Kept::Many(all)
            }
            Kept::Many(mut all) => {
                all.extend_from_slice(chunk);
                Kept::Many(all)
            }
        };
        (next.bytes().len() <= USAGE_COPY_LIMIT).then_some(next)
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Kept::Empty => &[],
            Kept::One(b) => b,
            Kept::Many(v) => v,
        }
    }
}

/// Largest non-streamed body copied aside to read its `usage`.
const USAGE_COPY_LIMIT: usize = 1 << 20;
/// Largest SSE event the watcher holds to inspect; a bigger one is passed
/// on but not looked into.
const SSE_EVENT_LIMIT: usize = 1 << 20;

pub struct Relay {
    upstream: Upstream,
    idle: Duration,
    /// Made the first time the upstream has nothing ready (a whole answer
    /// that is already there never needs one).
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the last chunk came (or the relay began): the timer is only
    /// moved when it fires (re-armed from here), not on every chunk. Read
    /// from the clock when the upstream has nothing ready, not per chunk;
    /// an answer that is all there never reads the clock.
    last_chunk: Option<tokio::time::Instant>,
    /// A chunk came since `last_chunk` was set.
    fresh: bool,
    /// Bytes still expected when upstream sent a `Content-Length`: the
    /// server stops polling once that many are written, so the relay
    /// counts the response complete as soon as the last byte is out.
    remaining: Option<u64>,
    sse: Option<SseWatch>,
    json_copy: Option<Kept>,
    finished: bool,
    outcome: Option<u16>,
    acct: Accounting,
    /// Set when cortex asked for the stream's `usage` and the client did
    /// not: whole events are held here and a usage-only event is dropped.
    strip: Option<BytesMut>,
}

impl Relay {
    pub fn new(
        upstream: Upstream,
        is_sse: bool,
        expects_done: bool,
        idle: Duration,
        acct: Accounting,
    ) -> Self {
        let sse = is_sse.then(|| SseWatch::new(expects_done));
        Relay {
            upstream,
            idle,
            idle_timer: None,
            last_chunk: None,
            fresh: false,
            remaining: None,
            json_copy: (!is_sse).then_some(Kept::Empty),
            sse,
            finished: false,
            outcome: None,
            acct,
            strip: None,
        }
    }

    /// Drops the usage-only event (`"choices": []` and `usage`) from the
    /// stream the client sees; the relay still reads it.
    pub fn stripping_usage(mut self, on: bool) -> Self {
        self.strip = on.then(BytesMut::new);
        self
    }

    /// What of `chunk` goes to the client in strip mode: the whole events
    /// held so far, less any usage-only one; `None` when nothing is ready.
    fn strip_events(&mut self, chunk: &Bytes) -> Option<Bytes> {
        strip_usage_events(self.strip.as_mut()?, chunk)
    }

    /// The upstream body's length (from `Content-Length`), if known.
    pub fn with_length(mut self, len: Option<u64>) -> Self {
        self.remaining = len;
        self
    }

    fn watch(&mut self, chunk: &Bytes) {
        if let Some(sse) = &mut self.sse {
            if sse.watch(chunk) {
                self.acct
                    .series()
                    .ttft
                    .observe(self.acct.started.elapsed().as_secs_f64());
            }
        } else if let Some(copy) = self.json_copy.take() {
            self.json_copy = copy.push(chunk);
        }
    }

    /// Ends the stream: an SSE error event for SSE, an aborted body otherwise.
    fn fail(&mut self, err: ApiError) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        self.finished = true;
        self.outcome = Some(err.status().as_u16());
        tracing::warn!(request_id = ?self.acct.request_id, model = %self.acct.model(),
            node = %self.acct.node_name(), error = %err.message, "upstream stream failed");
        if self.sse.is_some() {
            Poll::Ready(Some(Ok(helexa_api::sse::error_events(&err))))
        } else {
            Poll::Ready(Some(Err(std::io::Error::other(err.message))))
        }
    }
}

/// Whether an SSE event's data carries generated output (the first token
/// for `cortex_time_to_first_token_seconds`). The usual shapes are read
/// into borrowed structs; anything else falls back to a `Value`.
fn event_has_content(data: &str) -> bool {
    use serde::Deserialize;
    use std::borrow::Cow;
    #[derive(Deserialize)]
    struct Delta<'a> {
        #[serde(default, borrow)]
        content: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        reasoning_content: Option<Cow<'a, str>>,
        #[serde(default)]
        tool_calls: Option<serde::de::IgnoredAny>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(default, borrow)]
        delta: Option<Delta<'a>>,
        #[serde(default, borrow)]
        text: Option<Cow<'a, str>>,
    }
    #[derive(Deserialize)]
    struct Chunk<'a> {
        #[serde(default, borrow)]
        choices: Option<Vec<Choice<'a>>>,
    }
    let nonempty = |s: &Option<Cow<'_, str>>| s.as_deref().is_some_and(|s| !s.is_empty());
    match serde_json::from_str::<Chunk<'_>>(data) {
        Ok(Chunk {
            choices: Some(choices),
        }) => choices.iter().any(|c| {
            nonempty(&c.text)
                || c.delta.as_ref().is_some_and(|d| {
                    nonempty(&d.content) || nonempty(&d.reasoning_content) || d.tool_calls.is_some()
                })
        }),
        _ => serde_json::from_str::<Value>(data).is_ok_and(|v| has_content(&v)),
    }
}

fn has_content(v: &Value) -> bool {
    let nonempty = |x: &Value| x.as_str().is_some_and(|s| !s.is_empty());
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        return choices.iter().any(|c| {
            let d = &c["delta"];
            nonempty(&d["content"])
                || nonempty(&d["reasoning_content"])
                || d.get("tool_calls").is_some_and(|t| !t.is_null())
                || nonempty(&c["text"])
        });
    }
    v["type"].as_str().is_some_and(|t| t.ends_with(".delta")) && nonempty(&v["delta"])
}

/// `usage` of a JSON answer or SSE event (`usage`, or `response.usage` in
/// `/v1/responses` events), reading only that field (the rest is skipped,
/// not built into a `Value`).
fn usage_of(body: &[u8]) -> Option<(u64, u64)> {
    last_usage_field(body).or_else(|| whole_answer_usage(body))
}

#[derive(serde::Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    input_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl Usage {
    fn counts(self) -> Option<(u64, u64)> {
        let p = self.prompt_tokens.or(self.input_tokens)?;
        Some((
            p,
            self.completion_tokens.or(self.output_tokens).unwrap_or(0),
        ))
    }
}

/// The quick way: `usage` comes last in an answer, so parse just the object
/// after the last `"usage":` key (one `Usage`, nothing else read). None when
/// that does not work out (no such key, or the text was inside a string);
/// the caller then parses the whole answer.
fn last_usage_field(body: &[u8]) -> Option<(u64, u64)> {
    let at = USAGE_REV.rfind(body)?;
    if at > 0 && body[at - 1] == b'\\' {
        return None; // an escaped quote: inside a string
    }
    let rest = body[at + 7..].trim_ascii_start().strip_prefix(b":")?;
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Usage>();
    values.next()?.ok()?.counts()
}

fn whole_answer_usage(body: &[u8]) -> Option<(u64, u64)> {
    #[derive(serde::Deserialize)]
    struct Inner {
        usage: Option<Usage>,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        usage: Option<Usage>,
        /// `/v1/responses` puts it in `response.usage` when wrapped.
        response: Option<Inner>,
    }
    let a: Answer = serde_json::from_slice(body).ok()?;
    a.usage.or(a.response.and_then(|r| r.usage))?.counts()
}

impl Relay {
    /// Ready once nothing has come for `idle` since the last chunk. Called
    /// when the upstream has nothing ready: a chunk that came since the
    /// last call came (within this poll's work) just now.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.fresh || self.last_chunk.is_none() {
            self.last_chunk = Some(tokio::time::Instant::now());
            self.fresh = false;
        }
        let last = self.last_chunk.expect("set above");
        let timer = self
            .idle_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(last + self.idle)));
        loop {
            match timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let due = last + self.idle;
                    if tokio::time::Instant::now() >= due {
                        return Poll::Ready(());
                    }
                    timer.as_mut().reset(due);
                }
            }
        }
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, std::io::Error>;

    /// Passes on each piece as it is decoded; the server gathers whatever
    /// is ready into one write (see `front.rs`).
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(chunk) = frame.into_data() else {
                        continue; // trailers: nothing to pass on
                    };
                    this.fresh = true;
                    this.watch(&chunk);
                    let chunk = if this.strip.is_some() {
                        match this.strip_events(&chunk) {
                            Some(c) => c,
                            None => continue,
                        }
                    } else {
                        chunk
                    };
                    if let Some(left) = &mut this.remaining {
                        *left = left.saturating_sub(chunk.len() as u64);
                        if *left == 0 {
                            // The whole declared length is here: the answer
                            // is complete even if nobody polls again.
                            this.finished = true;
                            this.outcome = Some(this.acct.status);
                        }
                    }
                    return Poll::Ready(Some(Ok(chunk)));
                }
                Poll::Ready(Some(Err(e))) => {
                    return this.end(End::Failed(format!(
                        "the upstream neuron failed mid-stream: {e}"
                    )))
                }
                Poll::Ready(None) => return this.end(End::Eof),
                Poll::Pending => {
                    return match this.poll_idle(cx) {
                        Poll::Ready(()) => this.fail(ApiError::new(
                            ErrorCode::UpstreamTimeout,
                            format!(
                                "the upstream neuron sent nothing for {} ms",
                                this.idle.as_millis()
                            ),
                        )),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

/// How the upstream body ended.
enum End {
    Eof,
    Failed(String),
}

impl Relay {
    fn end(&mut self, end: End) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        match end {
            End::Failed(msg) => self.fail(ApiError::new(ErrorCode::UpstreamError, msg)),
            End::Eof => {
                let cut = self
                    .sse
                    .as_ref()
                    .is_some_and(|s| s.expects_done && !s.saw_done);
                if cut {
                    return self.fail(ApiError::new(
                        ErrorCode::UpstreamError,
                        "the upstream neuron ended the stream without [DONE]",
                    ));
                }
                self.finished = true;
                self.outcome = Some(self.acct.status);
                // An unterminated last event held back is passed on as is.
                match self.strip.take().filter(|h| !h.is_empty()) {
                    Some(held) => Poll::Ready(Some(Ok(held.freeze()))),
                    None => Poll::Ready(None),
                }
            }
        }
    }
}

/// Adds `chunk` to `held` and takes out the whole events in it, less any
/// usage-only one; `None` when none is complete (or all were dropped).
fn strip_usage_events(held: &mut BytesMut, chunk: &[u8]) -> Option<Bytes> {
    held.extend_from_slice(chunk);
    let end = last_event_end(held)?;
    let events = held.split_to(end).freeze();
    let mut out = BytesMut::with_capacity(events.len());
    let mut rest = &events[..];
    while let Some(n) = first_event_end(rest) {
        let (event, tail) = rest.split_at(n);
        if !is_usage_only(event) {
            out.extend_from_slice(event);
        }
        rest = tail;
    }
    out.extend_from_slice(rest);
    (!out.is_empty()).then(|| out.freeze())
}

/// End of the first SSE event in `b` (after its blank line).
fn first_event_end(b: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::find(b, b"\n\n").map(|i| i + 2);
    let crlf = memchr::memmem::find(b, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// End of the last complete SSE event in `b`.
fn last_event_end(b: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::rfind(b, b"\n\n").map(|i| i + 2);
    let crlf = memchr::memmem::rfind(b, b"\r\n\r\n").map(|i| i + 4);
    lf.max(crlf)
}

/// Whether an SSE event is the usage-only chunk `include_usage` adds:
/// `usage` set and `choices` empty.
fn is_usage_only(event: &[u8]) -> bool {
    if memchr::memmem::find(event, b"\"usage\"").is_none() {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Vec<serde::de::IgnoredAny>,
        usage: Option<serde::de::IgnoredAny>,
    }
    let text = String::from_utf8_lossy(event);
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::from_str::<Chunk>(&data).is_ok_and(|c| c.choices.is_empty() && c.usage.is_some())
}

impl Drop for Relay {
    fn drop(&mut self) {
        let permit = self.acct.permit.take();
        let a = &self.acct;
        let m = &a.gw.metrics;
        let series = a.series();
        // 499: the client went away before the end (nginx's convention).
        let status = self.outcome.unwrap_or(499);
        let elapsed = a.started.elapsed().as_secs_f64();
        let mut usage = self.sse.as_ref().and_then(|s| s.usage);
        if self.outcome == Some(a.status) {
            if let Some(copy) = self.json_copy.take() {
                usage = usage_of(copy.bytes());
                if (200..300).contains(&a.status) {
                    series.ttft.observe(elapsed);
                }
            }
        }
        if let Some((p, c)) = usage {
            m.prompt_tokens.inc_by(p);
            m.completion_tokens.inc_by(c);
        }
        series.duration.observe(elapsed);
        match &permit {
            None if status == 200 => series.ok.inc(),
            None => m
                .requests_total
                .with_label_values(&[a.model(), a.node_name(), status_str(status), "-"])
                .inc(),
            Some(p) => m
                .requests_total
                .with_label_values(&[a.model(), a.node_name(), status_str(status), &p.key().name])
                .inc(),
        }
        if let Some(p) = permit {
            p.settle(usage);
        }
    }
}

/// Status label without allocating for the common codes.
pub fn status_str(code: u16) -> &'static str {
    match code {
        200 => "200",
        400 => "400",
        404 => "404",
        413 => "413",
        415 => "415",
        429 => "429",
        499 => "499",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ if (200..300).contains(&code) => "2xx",
        _ if (400..500).contains(&code) => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::{event_has_content, usage_of, SseWatch};

    /// A token stream cut into pieces every way: the watcher (which skips
    /// pieces it need not parse) reads the same first token, usage and
    /// `[DONE]` as a parse of the whole.
    #[test]
    fn the_watcher_reads_the_same_whatever_the_pieces() {
        let mut events =
            vec![r#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#.to_string()];
        for i in 0..6 {
            events.push(format!(
                r#"data: {{"choices":[{{"delta":{{"content":"t{i}"}}}}]}}"#
            ));
        }
        events.push(
            r#"data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":6}}"#.into(),
        );
        events.push("data: [DONE]".into());
        for sep in ["\n\n", "\r\n\r\n"] {
            let stream: String = events.iter().map(|e| format!("{e}{sep}")).collect();
            let bytes = stream.as_bytes();
            // One event per piece, as engines send them.
            let mut w = SseWatch::new(true);
            let firsts: Vec<bool> = events
                .iter()
                .map(|e| w.watch(format!("{e}{sep}").as_bytes()))
                .collect();
            assert_eq!(firsts.iter().filter(|f| **f).count(), 1);
            assert!(firsts[1], "the first content is the second event");
            assert_eq!((w.usage, w.saw_done), (Some((11, 6)), true));
            // Arbitrary cuts.
            for size in [1, 2, 3, 7, 40, 97, bytes.len()] {
                let mut w = SseWatch::new(true);
                let firsts = bytes.chunks(size).filter(|c| w.watch(c)).count();
                assert_eq!(firsts, 1, "size {size}");
                assert_eq!((w.usage, w.saw_done), (Some((11, 6)), true), "size {size}");
            }
        }
        // A stream cut before [DONE] is seen as cut.
        let mut w = SseWatch::new(true);
        w.watch(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
        w.watch(b"data: {\"choices\":[{\"delta\":{\"content\":\"y\"}}]}\n\n");
        assert!(!w.saw_done);
    }

    #[test]
    fn first_content_is_recognised_in_every_event_shape() {
        let yes = [
            r#"{"choices":[{"delta":{"content":"Hi","role":"assistant"},"index":0}]}"#,
            r#"{"choices":[{"delta":{"reasoning_content":"hmm"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#,
            r#"{"choices":[{"text":"once","index":0}]}"#,
            r#"{"choices":[{"delta":{"content":"esc\"aped"}}]}"#,
            r#"{"type":"response.output_text.delta","delta":"Hi"}"#,
        ];
        for e in yes {
            assert!(event_has_content(e), "{e}");
        }
        let no = [
            r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":null,"content":null}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
            r#"{"type":"response.created"}"#,
            "not json",
        ];
        for e in no {
            assert!(!event_has_content(e), "{e}");
        }
    }

    #[test]
    fn the_usage_only_event_is_dropped_whatever_the_pieces() {
        use super::strip_usage_events;
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
            "data: [DONE]\n\n"
        );
        let want = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        for size in 1..=stream.len() {
            let mut held = bytes::BytesMut::new();
            let mut out = Vec::new();
            for piece in stream.as_bytes().chunks(size) {
                if let Some(b) = strip_usage_events(&mut held, piece) {
                    out.extend_from_slice(&b);
                }
            }
            assert!(held.is_empty(), "size {size}");
            assert_eq!(String::from_utf8(out).unwrap(), want, "size {size}");
        }
        // CRLF framing too.
        let crlf = stream.replace("\n\n", "\r\n\r\n");
        let mut held = bytes::BytesMut::new();
        let out = strip_usage_events(&mut held, crlf.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            want.replace("\n\n", "\r\n\r\n")
        );
    }

    #[test]
    fn usage_is_read_from_answers_and_events() {
        let chat = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
        assert_eq!(usage_of(chat), Some((7, 3)));
        let responses = br#"{"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":2}}}"#;
        assert_eq!(usage_of(responses), Some((5, 2)));
        // The word in the generated text does not fool it.
        let quoted = br#"{"choices":[{"message":{"content":"say \"usage\": {}"}}],"usage":{"prompt_tokens":1,"completion_tokens":9}}"#;
        assert_eq!(usage_of(quoted), Some((1, 9)));
        let tail_in_text = br#"{"usage":{"prompt_tokens":4,"completion_tokens":4},"note":"\"usage\": {\"prompt_tokens\": 99}"}"#;
        assert_eq!(usage_of(tail_in_text), Some((4, 4)));
        assert_eq!(usage_of(br#"{"choices":[],"usage":null}"#), None);
        assert_eq!(usage_of(b"not json"), None);
    }
}
