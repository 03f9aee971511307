//! Reading a chat completions answer as a sequence of [`ChatEvent`]s, the
//! one vocabulary both translations speak: a stream is read event by event
//! as its bytes arrive ([`ChatReader`]), a whole answer is turned into the
//! same events ([`whole_events`]), so a streamed and a whole answer go
//! through the same translation code and cannot drift apart.

use helexa_api::error::{ApiError, ErrorCode};
use serde_json::Value;

/// Default largest single SSE event read from the upstream chat stream
/// (`translate.max_event_bytes`). One event holds at most one chunk of text
/// or one tool call's arguments, which an engine's output limit keeps far
/// below this; a bigger one ends the translated stream with an error rather
/// than being dropped unseen.
pub const EVENT_LIMIT: usize = 16 << 20;

/// Token counts of a chat answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    /// `prompt_tokens_details.cached_tokens`, when the engine reports it.
    pub cached: u64,
    /// Of `output`, `completion_tokens_details.reasoning_tokens`, when the
    /// engine reports it.
    pub reasoning: u64,
}

/// An error the upstream stream (or cortex's relay) reported in-band.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamError {
    /// The §2 `code` (e.g. `upstream_error`), when given.
    pub code: String,
    /// The §2 `type` (e.g. `api_error`).
    pub kind: String,
    pub message: String,
}

impl StreamError {
    pub fn from_api(e: &ApiError) -> StreamError {
        StreamError {
            code: e.code.as_str().to_string(),
            kind: e.code.error_type().to_string(),
            message: e.message.clone(),
        }
    }

    fn from_value(v: &Value) -> StreamError {
        StreamError {
            code: v["code"].as_str().unwrap_or("upstream_error").to_string(),
            kind: v["type"].as_str().unwrap_or("api_error").to_string(),
            message: v["message"]
                .as_str()
                .unwrap_or("the upstream reported an error")
                .to_string(),
        }
    }
}

/// What happened in a chat answer, in order. Only choice 0 is read: the
/// translated request never asks for more than one.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// The first chunk: the model id the engine answered as.
    Start {
        model: String,
    },
    /// A reasoning model's reasoning (`reasoning_content`), split from the
    /// answer by the engine; it comes before the answer's text.
    Reasoning(String),
    /// Assistant text.
    Text(String),
    /// A tool call begins (chat's `index` of the call, its id and name).
    ToolStart {
        index: u64,
        id: String,
        name: String,
    },
    /// A piece of a tool call's JSON arguments.
    ToolArgs {
        index: u64,
        delta: String,
    },
    /// chat's `finish_reason`, and the stop string that matched when the
    /// engine says (vLLM-style `stop_reason` string).
    Finish {
        reason: String,
        stop: Option<String>,
    },
    Usage(Usage),
    Error(StreamError),
    /// `data: [DONE]`, or the end of a whole answer.
    Done,
}

/// Reads a chat SSE stream piece by piece.
pub struct ChatReader {
    parser: sse_parse::SseParser,
    /// Largest event read (bytes).
    limit: usize,
    started: bool,
    /// chat tool-call indexes already opened.
    tools: Vec<u64>,
    /// Everything fed so far ended on an event boundary.
    at_boundary: bool,
}

impl Default for ChatReader {
    fn default() -> Self {
        ChatReader::with_limit(EVENT_LIMIT)
    }
}

impl ChatReader {
    /// A reader that refuses events over `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        ChatReader {
            parser: sse_parse::SseParser::new().max_buffer(limit),
            limit,
            started: false,
            tools: Vec::new(),
            at_boundary: true,
        }
    }

    /// A piece made only of SSE comments (keep-alives, sent while a model
    /// loads or a long prompt is read) that begins on an event boundary:
    /// passed to the client as it is, so its connection stays alive.
    pub fn comment_only(&self, chunk: &[u8]) -> bool {
        self.at_boundary
            && !chunk.is_empty()
            && chunk.ends_with(b"\n\n")
            && chunk
                .split(|b| *b == b'\n')
                .all(|line| line.is_empty() || line.starts_with(b":"))
    }

    /// Feeds one piece of the stream; the events it completed go to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<ChatEvent>) {
        self.at_boundary = chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\n\r\n");
        let dropped = self.parser.overflows();
        self.parser.feed(chunk);
        self.drain(dropped, out);
    }

    /// The stream ended (a block without its closing blank line is
    /// dropped, as the SSE standard says; the translation then reports the
    /// stream as cut short).
    pub fn finish(&mut self, out: &mut Vec<ChatEvent>) {
        let dropped = self.parser.overflows();
        self.parser.finish();
        self.drain(dropped, out);
    }

    fn drain(&mut self, dropped: u64, out: &mut Vec<ChatEvent>) {
        while let Some(ev) = self.parser.next_event() {
            self.event(&ev.data, out);
        }
        if self.parser.overflows() > dropped {
            out.push(ChatEvent::Error(StreamError {
                code: "upstream_error".into(),
                kind: "api_error".into(),
                message: format!(
                    "the engine sent a stream event over {} bytes, which cortex cannot translate",
                    self.limit
                ),
            }));
        }
    }

    fn event(&mut self, data: &str, out: &mut Vec<ChatEvent>) {
        if data.is_empty() {
            return;
        }
        if data == "[DONE]" {
            out.push(ChatEvent::Done);
            return;
        }
        let v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                out.push(ChatEvent::Error(StreamError {
                    code: "upstream_error".into(),
                    kind: "api_error".into(),
                    message: format!("the engine sent a stream event that is not JSON: {e}"),
                }));
                return;
            }
        };
        if v["error"].is_object() {
            out.push(ChatEvent::Error(StreamError::from_value(&v["error"])));
            return;
        }
        if !self.started {
            self.started = true;
            out.push(ChatEvent::Start {
                model: v["model"].as_str().unwrap_or_default().to_string(),
            });
        }
        if let Some(choice) = first_choice(&v) {
            let delta = &choice["delta"];
            if let Some(text) = delta["reasoning_content"]
                .as_str()
                .filter(|t| !t.is_empty())
            {
                out.push(ChatEvent::Reasoning(text.to_string()));
            }
            if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
                out.push(ChatEvent::Text(text.to_string()));
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = call["index"].as_u64().unwrap_or(0);
                if !self.tools.contains(&index) {
                    self.tools.push(index);
                    out.push(ChatEvent::ToolStart {
                        index,
                        id: call["id"]
                            .as_str()
                            .map_or_else(|| super::new_id("call_"), str::to_string),
                        name: call["function"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    });
                }
                if let Some(args) = call["function"]["arguments"]
                    .as_str()
                    .filter(|a| !a.is_empty())
                {
                    out.push(ChatEvent::ToolArgs {
                        index,
                        delta: args.to_string(),
                    });
                }
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                out.push(finish(reason, choice));
            }
        }
        if v["usage"].is_object() {
            out.push(ChatEvent::Usage(usage(&v["usage"])));
        }
    }
}

/// The choice with index 0 (a missing index counts as 0).
fn first_choice(v: &Value) -> Option<&Value> {
    v["choices"]
        .as_array()?
        .iter()
        .find(|c| c["index"].as_u64().unwrap_or(0) == 0)
}

fn finish(reason: &str, choice: &Value) -> ChatEvent {
    ChatEvent::Finish {
        reason: reason.to_string(),
        stop: choice["stop_reason"].as_str().map(str::to_string),
    }
}

fn usage(u: &Value) -> Usage {
    Usage {
        input: u["prompt_tokens"].as_u64().unwrap_or(0),
        output: u["completion_tokens"].as_u64().unwrap_or(0),
        cached: u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        reasoning: u["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap_or(0),
    }
}

/// A whole (non-streamed) chat answer as the events a stream of it would
/// give.
pub fn whole_events(body: &[u8]) -> Result<Vec<ChatEvent>, ApiError> {
    let bad = |why: String| ApiError::new(ErrorCode::UpstreamError, why);
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the engine's chat answer is not JSON: {e}")))?;
    let choice = first_choice(&v)
        .ok_or_else(|| bad("the engine's chat answer has no choices".to_string()))?;
    let msg = &choice["message"];
    let mut out = vec![ChatEvent::Start {
        model: v["model"].as_str().unwrap_or_default().to_string(),
    }];
    if let Some(text) = msg["reasoning_content"].as_str().filter(|t| !t.is_empty()) {
        out.push(ChatEvent::Reasoning(text.to_string()));
    }
    if let Some(text) = msg["content"].as_str().filter(|t| !t.is_empty()) {
        out.push(ChatEvent::Text(text.to_string()));
    }
    for (i, call) in msg["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let index = i as u64;
        out.push(ChatEvent::ToolStart {
            index,
            id: call["id"]
                .as_str()
                .map_or_else(|| super::new_id("call_"), str::to_string),
            name: call["function"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        });
        let args = match &call["function"]["arguments"] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            // Some servers send the arguments as an object.
            other => other.to_string(),
        };
        if !args.is_empty() {
            out.push(ChatEvent::ToolArgs { index, delta: args });
        }
    }
    out.push(finish(
        choice["finish_reason"].as_str().unwrap_or("stop"),
        choice,
    ));
    if v["usage"].is_object() {
        out.push(ChatEvent::Usage(usage(&v["usage"])));
    }
    out.push(ChatEvent::Done);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"model\":\"m1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"m1\",\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Think\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"m1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"m1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"m1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":1}\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"m1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"m1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8,\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\n\n",
        "data: [DONE]\n\n",
    );

    fn expected() -> Vec<ChatEvent> {
        vec![
            ChatEvent::Start { model: "m1".into() },
            ChatEvent::Reasoning("Think".into()),
            ChatEvent::Text("Hi".into()),
            ChatEvent::ToolStart {
                index: 0,
                id: "call_1".into(),
                name: "f".into(),
            },
            ChatEvent::ToolArgs {
                index: 0,
                delta: "{\"a\":1}".into(),
            },
            ChatEvent::Finish {
                reason: "tool_calls".into(),
                stop: None,
            },
            ChatEvent::Usage(Usage {
                input: 5,
                output: 3,
                cached: 0,
                reasoning: 1,
            }),
            ChatEvent::Done,
        ]
    }

    #[test]
    fn a_stream_reads_the_same_cut_anywhere() {
        let bytes = STREAM.as_bytes();
        for cut in 0..=bytes.len() {
            let mut r = ChatReader::default();
            let mut out = Vec::new();
            r.feed(&bytes[..cut], &mut out);
            r.feed(&bytes[cut..], &mut out);
            r.finish(&mut out);
            assert_eq!(out, expected(), "cut at {cut}");
        }
    }

    #[test]
    fn a_whole_answer_gives_the_stream_events() {
        let body = serde_json::json!({"id": "c", "model": "m1", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "Hi", "reasoning_content": "Think",
            "tool_calls": [{"id": "call_1",
            "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
            "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                      "completion_tokens_details": {"reasoning_tokens": 1}}});
        let events = whole_events(body.to_string().as_bytes()).unwrap();
        assert_eq!(events, expected());
        assert!(whole_events(b"{\"choices\":[]}").is_err());
        assert!(whole_events(b"nope").is_err());
    }

    #[test]
    fn errors_and_keepalives() {
        let mut r = ChatReader::default();
        assert!(r.comment_only(b": keep-alive\n\n"));
        assert!(!r.comment_only(b"data: x\n\n"));
        let mut out = Vec::new();
        r.feed(b"data: {\"error\":{\"message\":\"gone\",\"type\":\"api_error\",\"code\":\"upstream_error\"}}\n\ndata: [DONE]\n\n", &mut out);
        assert_eq!(
            out,
            vec![
                ChatEvent::Error(StreamError {
                    code: "upstream_error".into(),
                    kind: "api_error".into(),
                    message: "gone".into()
                }),
                ChatEvent::Done
            ]
        );
        // An event over the limit is an error, not a silent gap.
        let mut r = ChatReader::with_limit(64);
        let mut out = Vec::new();
        let big = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(100)
        );
        r.feed(big.as_bytes(), &mut out);
        assert!(
            matches!(&out[..], [ChatEvent::Error(e)] if e.message.contains("over 64 bytes")),
            "{out:?}"
        );
        // Mid-event, a comment-looking piece is part of the event.
        let mut r = ChatReader::default();
        r.feed(b"data: {\"a\":", &mut Vec::new());
        assert!(!r.comment_only(b": x\n\n"));
    }
}
