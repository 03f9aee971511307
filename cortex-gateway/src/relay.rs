//! Pipes an upstream body to the client chunk by chunk, never buffering.
//!
//! On the side it watches the stream (SSE via eventsource-stream) for the
//! first content token and usage, turns an upstream death or idle timeout
//! into an SSE error event + `[DONE]`, and records metrics when it ends or
//! when the client goes away (dropping it drops the upstream connection).

use crate::metrics::Metrics;
use bytes::Bytes;
use eventsource_stream::{EventStream, Eventsource};
use futures_util::{Stream, StreamExt};
use helexa_api::error::{ApiError, ErrorCode};
use hyper::body::Body as _;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

type Upstream = crate::upstream::UpstreamBody;

/// The chunks handed to the SSE parser: a queue the relay pushes into and
/// the parser drains; `Pending` (never woken) when empty, since the relay
/// polls the parser itself right after each push.
#[derive(Clone, Default)]
struct Feed(Arc<std::sync::Mutex<std::collections::VecDeque<Bytes>>>);

impl Stream for Feed {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).pop_front() {
            Some(b) => Poll::Ready(Some(Ok(b))),
            None => Poll::Pending,
        }
    }
}

/// Decrements cortex's open-request count for a replica when dropped.
pub struct InFlight(Arc<AtomicU32>);

impl InFlight {
    pub fn new(counter: Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What is known about the request for the metrics recorded at the end.
pub struct Accounting {
    pub metrics: Metrics,
    pub model: String,
    pub node: String,
    pub status: u16,
    pub started: Instant,
    pub request_id: String,
}

struct SseWatch {
    feed: Feed,
    events: EventStream<Feed>,
    /// `[DONE]` is expected (chat/completions), not for `/v1/responses`.
    expects_done: bool,
    saw_done: bool,
}

/// Largest non-streamed body copied aside to read its `usage`.
const USAGE_COPY_LIMIT: usize = 1 << 20;

pub struct Relay {
    upstream: Upstream,
    idle: Duration,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    /// When the last chunk came; the timer is only moved when it fires
    /// (re-armed from here), not on every chunk.
    last_chunk: tokio::time::Instant,
    /// Bytes still expected when upstream sent a `Content-Length`: the
    /// server stops polling once that many are written, so the relay
    /// counts the response complete as soon as the last byte is out.
    remaining: Option<u64>,
    /// Length of the chunk just received (for `remaining`).
    chunk_len: usize,
    /// Bytes gathered from the chunks upstream had ready (see poll_next).
    held: Option<Held>,
    /// The upstream end, seen while bytes were still held.
    ended: Option<End>,
    sse: Option<SseWatch>,
    json_copy: Option<Vec<u8>>,
    first_token: bool,
    usage: Option<(u64, u64)>,
    finished: bool,
    outcome: Option<u16>,
    acct: Accounting,
    _in_flight: InFlight,
}

impl Relay {
    pub fn new(
        upstream: Upstream,
        is_sse: bool,
        expects_done: bool,
        idle: Duration,
        acct: Accounting,
        in_flight: InFlight,
    ) -> Self {
        let sse = is_sse.then(|| {
            let feed = Feed::default();
            SseWatch {
                events: feed.clone().eventsource(),
                feed,
                expects_done,
                saw_done: false,
            }
        });
        Relay {
            upstream,
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            last_chunk: tokio::time::Instant::now(),
            remaining: None,
            chunk_len: 0,
            held: None,
            ended: None,
            json_copy: (!is_sse).then(Vec::new),
            sse,
            first_token: false,
            usage: None,
            finished: false,
            outcome: None,
            acct,
            _in_flight: in_flight,
        }
    }

    /// The upstream body's length (from `Content-Length`), if known.
    pub fn with_length(mut self, len: Option<u64>) -> Self {
        self.remaining = len;
        self
    }

    fn watch(&mut self, chunk: &Bytes) {
        if let Some(sse) = &mut self.sse {
            sse.feed
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back(chunk.clone());
            let waker = futures_util::task::noop_waker_ref();
            let mut cx = Context::from_waker(waker);
            while let Poll::Ready(Some(Ok(ev))) = sse.events.poll_next_unpin(&mut cx) {
                let data = ev.data.as_str();
                if data == "[DONE]" {
                    sse.saw_done = true;
                    continue;
                }
                if !self.first_token
                    && serde_json::from_str::<Value>(data).is_ok_and(|v| has_content(&v))
                {
                    self.first_token = true;
                    self.acct
                        .metrics
                        .ttft
                        .with_label_values(&[self.acct.model.as_str()])
                        .observe(self.acct.started.elapsed().as_secs_f64());
                }
                if data.contains("\"usage\"") {
                    if let Some(u) = usage_of(data.as_bytes()) {
                        self.usage = Some(u);
                    }
                }
            }
        } else if let Some(copy) = &mut self.json_copy {
            if copy.len() + chunk.len() <= USAGE_COPY_LIMIT {
                copy.extend_from_slice(chunk);
            } else {
                self.json_copy = None;
            }
        }
    }

    /// Ends the stream: an SSE error event for SSE, an aborted body otherwise.
    fn fail(&mut self, err: ApiError) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        self.finished = true;
        self.outcome = Some(err.status().as_u16());
        tracing::warn!(request_id = %self.acct.request_id, model = %self.acct.model,
            node = %self.acct.node, error = %err.message, "upstream stream failed");
        if self.sse.is_some() {
            Poll::Ready(Some(Ok(helexa_api::sse::error_events(&err))))
        } else {
            Poll::Ready(Some(Err(std::io::Error::other(err.message))))
        }
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
    #[derive(serde::Deserialize)]
    struct Usage {
        prompt_tokens: Option<u64>,
        input_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        output_tokens: Option<u64>,
    }
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
    let u = a.usage.or(a.response.and_then(|r| r.usage))?;
    let p = u.prompt_tokens.or(u.input_tokens)?;
    Some((p, u.completion_tokens.or(u.output_tokens).unwrap_or(0)))
}

impl Relay {
    /// Ready once nothing has come for `idle` since the last chunk.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.idle_timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let due = self.last_chunk + self.idle;
                    if tokio::time::Instant::now() >= due {
                        return Poll::Ready(());
                    }
                    self.idle_timer.as_mut().reset(due);
                }
            }
        }
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if let Some(end) = this.ended.take() {
            return this.end(end);
        }
        loop {
            match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(chunk) = frame.into_data() else {
                        continue; // trailers: nothing to pass on
                    };
                    this.last_chunk = tokio::time::Instant::now();
                    this.watch(&chunk);
                    this.hold(chunk);
                    if let Some(left) = &mut this.remaining {
                        *left = left.saturating_sub(this.chunk_len as u64);
                        this.chunk_len = 0;
                        if *left == 0 {
                            // The server may drop the body without polling
                            // it again once the declared length is written.
                            this.finished = true;
                            this.outcome = Some(this.acct.status);
                            return Poll::Ready(this.release().map(Ok));
                        }
                    }
                    if this.held_len() >= COALESCE_LIMIT {
                        return Poll::Ready(this.release().map(Ok));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let end = End::Failed(format!("the upstream neuron failed mid-stream: {e}"));
                    return this.end_after_held(end);
                }
                Poll::Ready(None) => return this.end_after_held(End::Eof),
                Poll::Pending => {
                    // Polling the body drives the upstream connection in
                    // this task (see upstream.rs): Pending means the socket
                    // has nothing more now, so what was gathered goes out
                    // in one write.
                    if this.held.is_some() {
                        return Poll::Ready(this.release().map(Ok));
                    }
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

/// How the upstream body ended, kept while held bytes go out first.
enum End {
    Eof,
    Failed(String),
}

/// Most bytes gathered from upstream before they are passed on.
const COALESCE_LIMIT: usize = 64 * 1024;

impl Relay {
    fn hold(&mut self, chunk: Bytes) {
        self.chunk_len = chunk.len();
        self.held = Some(match self.held.take() {
            None => Held::One(chunk),
            Some(Held::One(first)) => {
                let mut buf = bytes::BytesMut::with_capacity((first.len() + chunk.len()) * 2);
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&chunk);
                Held::Many(buf)
            }
            Some(Held::Many(mut buf)) => {
                buf.extend_from_slice(&chunk);
                Held::Many(buf)
            }
        });
    }

    fn held_len(&self) -> usize {
        match &self.held {
            None => 0,
            Some(Held::One(b)) => b.len(),
            Some(Held::Many(b)) => b.len(),
        }
    }

    fn release(&mut self) -> Option<Bytes> {
        self.held.take().map(|h| match h {
            Held::One(b) => b,
            Held::Many(b) => b.freeze(),
        })
    }

    fn end_after_held(&mut self, end: End) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        match self.release() {
            Some(b) => {
                self.ended = Some(end);
                Poll::Ready(Some(Ok(b)))
            }
            None => self.end(end),
        }
    }

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
                Poll::Ready(None)
            }
        }
    }
}

/// Upstream bytes received but not yet passed on.
enum Held {
    One(Bytes),
    Many(bytes::BytesMut),
}

impl Drop for Relay {
    fn drop(&mut self) {
        let a = &self.acct;
        let m = &a.metrics;
        let model = a.model.as_str();
        // 499: the client went away before the end (nginx's convention).
        let status = self.outcome.unwrap_or(499);
        if self.json_copy.is_some() && self.outcome == Some(a.status) {
            if let Some(copy) = self.json_copy.take() {
                self.usage = usage_of(&copy);
                if (200..300).contains(&a.status) {
                    m.ttft
                        .with_label_values(&[model])
                        .observe(a.started.elapsed().as_secs_f64());
                }
            }
        }
        if let Some((p, c)) = self.usage {
            m.tokens_total.with_label_values(&["prompt"]).inc_by(p);
            m.tokens_total.with_label_values(&["completion"]).inc_by(c);
        }
        m.request_duration
            .with_label_values(&[model])
            .observe(a.started.elapsed().as_secs_f64());
        m.requests_total
            .with_label_values(&[model, a.node.as_str(), status_str(status)])
            .inc();
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
