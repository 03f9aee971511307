//! The relay of one engine answer to the client: the engine's body, passed
//! on chunk by chunk, holding what must live exactly as long as the answer
//! (the admission permit, the engine's count of answers in progress) and
//! measuring it on the way (time to first token, gaps between tokens, usage,
//! status and duration) for the agent's metrics.
//!
//! A stream that breaks after its first byte ends, for SSE, with an error
//! event and `[DONE]` (docs/protocol.md §2), never a silent cut. When the agent
//! itself asked the engine for usage (`stream_options.include_usage`, so that
//! token counters see every stream), the usage-only chunk is taken out again
//! before the client sees it. Reading SSE is `sse-parse`'s job; the only
//! framing done here is splitting on the blank line that ends every event
//! the engine writes (`helexa_api::sse`).

use crate::admission::Permit;
use crate::metrics::Metrics;
use crate::supervisor::BodyGuard;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{BoxStream, Stream, StreamExt};
use helexa_api::{ApiError, ErrorCode};
use serde::Deserialize;
use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// Bytes of a non-streamed answer kept to read its `usage` (which the
/// engine writes last) once the answer is complete.
const USAGE_TAIL_BYTES: usize = 8 * 1024;

/// What the request's metrics need, recorded once when the answer ends
/// (completely, broken, or dropped because the client left).
pub struct Measure {
    pub metrics: Arc<Metrics>,
    /// The `model` label (a catalogue id, or `metrics::UNKNOWN_MODEL`).
    pub model: String,
    pub started: Instant,
    pub status: u16,
    usage: Option<(u64, u64, u64)>,
}

impl Measure {
    pub fn new(metrics: Arc<Metrics>, model: String, started: Instant, status: u16) -> Measure {
        Measure {
            metrics,
            model,
            started,
            status,
            usage: None,
        }
    }
}

impl Drop for Measure {
    fn drop(&mut self) {
        self.metrics
            .answered(&self.model, self.status, self.started.elapsed());
        if let Some((prompt, generated, cached)) = self.usage {
            self.metrics.usage(&self.model, prompt, generated, cached);
        }
    }
}

/// How the relay treats the body.
pub enum Kind {
    /// An SSE stream; `strip_usage`: the agent added `include_usage`.
    Sse { strip_usage: bool },
    /// Anything else (a JSON answer or error).
    Plain,
}

/// The engine's body on its way to the client.
pub struct Relay {
    inner: BoxStream<'static, reqwest::Result<Bytes>>,
    _permit: Permit,
    body: BodyGuard,
    measure: Measure,
    sse: Option<SseWatch>,
    tail: Option<BytesMut>,
    done: bool,
}

impl Relay {
    pub fn new(
        inner: BoxStream<'static, reqwest::Result<Bytes>>,
        permit: Permit,
        body: BodyGuard,
        measure: Measure,
        kind: Kind,
    ) -> Relay {
        let (sse, tail) = match kind {
            Kind::Sse { strip_usage } => (Some(SseWatch::new(strip_usage)), None),
            Kind::Plain => (None, Some(BytesMut::new())),
        };
        Relay {
            inner,
            _permit: permit,
            body,
            measure,
            sse,
            tail,
            done: false,
        }
    }

    fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        self.body.touch();
        if let Some(sse) = &mut self.sse {
            let now = Instant::now();
            match sse.watch(&chunk) {
                Seen::FirstToken => self
                    .measure
                    .metrics
                    .first_token(&self.measure.model, now - self.measure.started),
                Seen::Token(gap) => self.measure.metrics.inter_token(&self.measure.model, gap),
                Seen::Nothing => {}
            }
            if let Some(u) = sse.usage {
                self.measure.usage = Some(u);
            }
            if sse.strip_usage {
                return sse.strip(chunk);
            }
            return chunk;
        }
        if let Some(tail) = &mut self.tail {
            tail.extend_from_slice(&chunk);
            if tail.len() > USAGE_TAIL_BYTES {
                let excess = tail.len() - USAGE_TAIL_BYTES;
                let _ = tail.split_to(excess);
            }
        }
        chunk
    }

    fn on_end(&mut self) -> Option<Bytes> {
        if let Some(tail) = &self.tail {
            self.measure.usage = usage_in_json_tail(tail);
        }
        self.sse
            .as_mut()
            .map(|s| s.pending.split().freeze())
            .filter(|b| !b.is_empty())
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            return match self.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(b))) => {
                    let out = self.on_chunk(b);
                    if out.is_empty() {
                        continue;
                    }
                    Poll::Ready(Some(Ok(out)))
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    let model = self.measure.model.clone();
                    tracing::warn!(model = %model, error = %e, "engine stream broke");
                    if self.sse.is_some() {
                        let err = ApiError::new(
                            ErrorCode::UpstreamError,
                            format!("The engine of `{model}` stopped mid-stream: {e}"),
                        );
                        Poll::Ready(Some(Ok(helexa_api::sse::error_events(&err))))
                    } else {
                        Poll::Ready(Some(Err(std::io::Error::other(e))))
                    }
                }
                Poll::Ready(None) => {
                    self.done = true;
                    match self.on_end() {
                        Some(rest) => Poll::Ready(Some(Ok(rest))),
                        None => Poll::Ready(None),
                    }
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

enum Seen {
    Nothing,
    FirstToken,
    /// A later content chunk, this long after the previous one.
    Token(std::time::Duration),
}

/// What the relay reads from an SSE stream.
struct SseWatch {
    parser: sse_parse::SseParser,
    last_token: Option<Instant>,
    usage: Option<(u64, u64, u64)>,
    strip_usage: bool,
    /// Output held back until its event is complete (only when stripping).
    pending: BytesMut,
}

impl SseWatch {
    fn new(strip_usage: bool) -> SseWatch {
        SseWatch {
            parser: sse_parse::SseParser::new(),
            last_token: None,
            usage: None,
            strip_usage,
            pending: BytesMut::new(),
        }
    }

    /// Reads one chunk; whether it held content (a token).
    fn watch(&mut self, chunk: &[u8]) -> Seen {
        self.parser.feed(chunk);
        let mut content = false;
        while let Some(ev) = self.parser.next_event() {
            if ev.data == "[DONE]" {
                continue;
            }
            let Ok(parsed) = serde_json::from_str::<Chunk<'_>>(&ev.data) else {
                continue;
            };
            if let Some(u) = parsed.usage {
                self.usage = Some(u.counts());
            }
            content |= parsed.has_content();
        }
        if !content {
            return Seen::Nothing;
        }
        let now = Instant::now();
        match self.last_token.replace(now) {
            None => Seen::FirstToken,
            Some(prev) => Seen::Token(now - prev),
        }
    }

    /// Passes on complete events, without the usage-only one.
    fn strip(&mut self, chunk: Bytes) -> Bytes {
        self.pending.extend_from_slice(&chunk);
        let Some(end) = last_event_end(&self.pending) else {
            return Bytes::new();
        };
        let ready = self.pending.split_to(end).freeze();
        if find(&ready, b"\"usage\"").is_none() {
            return ready;
        }
        let mut out = BytesMut::with_capacity(ready.len());
        let mut rest = &ready[..];
        while let Some(i) = find(rest, b"\n\n") {
            let (event, after) = rest.split_at(i + 2);
            if !is_usage_only(event) {
                out.extend_from_slice(event);
            }
            rest = after;
        }
        out.extend_from_slice(rest);
        out.freeze()
    }
}

/// Index just past the last `\n\n` (the end of the last complete event).
fn last_event_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The final chunk of `include_usage`: no choices, only usage.
fn is_usage_only(event: &[u8]) -> bool {
    let mut parser = sse_parse::SseParser::new();
    parser.feed(event);
    let Some(ev) = parser.next_event() else {
        return false;
    };
    serde_json::from_str::<Chunk<'_>>(&ev.data)
        .is_ok_and(|c| c.usage.is_some() && c.choices.as_ref().is_none_or(|ch| ch.is_empty()))
}

#[derive(Deserialize, Clone, Copy)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize, Clone, Copy)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: u64,
}

impl Usage {
    /// (prompt, completion, cached prompt) tokens.
    fn counts(&self) -> (u64, u64, u64) {
        let cached = self.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
        (self.prompt_tokens, self.completion_tokens, cached)
    }
}

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

/// The parts of a chat or completions chunk the relay reads.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<Usage>,
}

impl Chunk<'_> {
    fn has_content(&self) -> bool {
        let nonempty = |s: &Option<Cow<'_, str>>| s.as_deref().is_some_and(|s| !s.is_empty());
        self.choices.iter().flatten().any(|c| {
            nonempty(&c.text)
                || c.delta.as_ref().is_some_and(|d| {
                    nonempty(&d.content) || nonempty(&d.reasoning_content) || d.tool_calls.is_some()
                })
        })
    }
}

/// `usage` of a JSON answer from its last bytes: the object after the last
/// `"usage":` key.
fn usage_in_json_tail(tail: &[u8]) -> Option<(u64, u64, u64)> {
    let key = b"\"usage\"";
    let at = tail.windows(key.len()).rposition(|w| w == key)?;
    let rest = &tail[at + key.len()..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let value = &rest[colon + 1..];
    let mut values = serde_json::Deserializer::from_slice(value).into_iter::<Option<Usage>>();
    let usage = values.next()?.ok()??;
    Some(usage.counts())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_the_end_of_an_answer() {
        let body = br#"{"choices":[{"message":{"content":"usage"}}],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        assert_eq!(usage_in_json_tail(body), Some((3, 5, 0)));
        assert_eq!(usage_in_json_tail(br#"{"usage":null}"#), None);
        assert_eq!(usage_in_json_tail(br#"{"error":{}}"#), None);
    }

    #[test]
    fn tokens_are_seen_and_the_added_usage_chunk_is_stripped() {
        let mut w = SseWatch::new(true);
        assert!(matches!(
            w.watch(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n"),
            Seen::Nothing
        ));
        assert!(matches!(
            w.watch(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"),
            Seen::FirstToken
        ));
        assert!(matches!(w.watch(b": keep-alive\n\n"), Seen::Nothing));
        let last = b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        // Split in two pieces mid-event: nothing is lost or duplicated.
        let (a, b) = last.split_at(70);
        w.watch(a);
        w.watch(b);
        assert_eq!(w.usage, Some((4, 2, 0)));
        let mut out = w.strip(Bytes::from_static(a)).to_vec();
        out.extend_from_slice(&w.strip(Bytes::from_static(b)));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n"
        );
        assert!(w.pending.is_empty());
    }
}
