//! Anthropic Messages (`POST /v1/messages`) as chat completions: the
//! request translation, the answer's state machine (the whole `message`
//! and the stream's `message_start` … `message_stop` events), and errors
//! in Anthropic's shape. docs/protocol.md §4.2.

use super::chat::{ChatEvent, StreamError, Usage};
use super::check::{self, bad, get, known_keys};
use super::{new_id, put_event};
use axum::body::Body;
use axum::response::Response;
use helexa_api::error::{ApiError, ErrorCode, ErrorEnvelope};
use http::{header, HeaderValue, StatusCode};
use serde_json::{json, Map, Value};

/// Top-level request fields this translation reads.
const KNOWN: &[&str] = &[
    "model",
    "max_tokens",
    "messages",
    "system",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "metadata",
    "stream",
    "thinking",
];

/// What the answer's translation needs from the request.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// `stop_sequences`, to say which one ended the answer when the
    /// engine reports the matched string.
    pub stop_sequences: Vec<String>,
}

/// Translates a Messages request into a chat completions request.
pub fn translate(req: Map<String, Value>) -> Result<(Value, Plan), ApiError> {
    let model = check::model(&req)?;
    known_keys(&req, KNOWN, "")?;
    let max_tokens =
        check::count(&req, "max_tokens", "")?.ok_or_else(|| bad("max_tokens", "is required"))?;
    let mut messages = Vec::new();
    match get(&req, "system") {
        None => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(Value::Array(blocks)) => {
            let mut text = Vec::with_capacity(blocks.len());
            for (i, b) in blocks.iter().enumerate() {
                let at = format!("system[{i}]");
                let o = check::object(b, &at)?;
                if check::string(o, "type", &at)?.as_deref() != Some("text") {
                    return Err(bad(&format!("{at}.type"), "must be \"text\""));
                }
                known_keys(o, &["type", "text", "cache_control", "citations"], &at)?;
                text.push(required_string(o, "text", &at)?);
            }
            messages.push(json!({"role": "system", "content": text.join("\n")}));
        }
        Some(_) => return Err(bad("system", "must be a string or an array of text blocks")),
    }
    let list = match get(&req, "messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(bad("messages", "must not be empty")),
        Some(_) => return Err(bad("messages", "must be an array")),
        None => return Err(bad("messages", "is required")),
    };
    for (i, m) in list.iter().enumerate() {
        message(m, &format!("messages[{i}]"), &mut messages)?;
    }
    // Anthropic continues a last assistant message (a "prefill"); a chat
    // engine starts a new turn after it, so the answer would not continue it.
    let last = list.len() - 1;
    if list[last].get("role").and_then(Value::as_str) == Some("assistant") {
        return Err(bad(
            &format!("messages[{last}].role"),
            "is \"assistant\": a last assistant message (prefill) is not supported, since the answer would not continue it",
        ));
    }

    let stream = check::boolean(&req, "stream", "")?.unwrap_or(false);
    let mut chat = json!({"model": model, "messages": messages, "stream": stream,
        "max_tokens": max_tokens});
    if let Some(on) = thinking(&req, max_tokens)? {
        chat["chat_template_kwargs"] = json!({"enable_thinking": on});
    }
    if stream {
        // Usage ends every answer (and settles a key's `tpm`).
        chat["stream_options"] = json!({"include_usage": true});
    }
    let mut plan = Plan::default();
    match get(&req, "stop_sequences") {
        None => {}
        Some(Value::Array(seqs)) => {
            for (i, s) in seqs.iter().enumerate() {
                match s.as_str() {
                    Some(s) => plan.stop_sequences.push(s.to_string()),
                    None => return Err(bad(&format!("stop_sequences[{i}]"), "must be a string")),
                }
            }
            if !plan.stop_sequences.is_empty() {
                chat["stop"] = json!(plan.stop_sequences);
            }
        }
        Some(_) => return Err(bad("stop_sequences", "must be an array of strings")),
    }
    for key in ["temperature", "top_p"] {
        if let Some(x) = check::number(&req, key, "")? {
            chat[key] = json!(x);
        }
    }
    match get(&req, "top_k") {
        None => {}
        Some(v) => match v.as_u64() {
            Some(k) => chat["top_k"] = json!(k),
            None => return Err(bad("top_k", "must be a whole number")),
        },
    }
    if let Some(m) = get(&req, "metadata") {
        let o = check::object(m, "metadata")?;
        known_keys(o, &["user_id"], "metadata")?;
        if let Some(u) = check::string(o, "user_id", "metadata")? {
            chat["user"] = json!(u);
        }
    }
    let tools = match get(&req, "tools") {
        None => Vec::new(),
        Some(Value::Array(t)) => t.clone(),
        Some(_) => return Err(bad("tools", "must be an array")),
    };
    if !tools.is_empty() {
        let mut out = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            out.push(tool(t, &format!("tools[{i}]"))?);
        }
        chat["tools"] = Value::Array(out);
    }
    if let Some(tc) = get(&req, "tool_choice") {
        let o = check::object(tc, "tool_choice")?;
        known_keys(
            o,
            &["type", "name", "disable_parallel_tool_use"],
            "tool_choice",
        )?;
        let choice = match check::string(o, "type", "tool_choice")?.as_deref() {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => {
                let name = required_string(o, "name", "tool_choice")?;
                json!({"type": "function", "function": {"name": name}})
            }
            _ => {
                return Err(bad(
                    "tool_choice.type",
                    "must be \"auto\", \"any\", \"tool\" or \"none\"",
                ))
            }
        };
        chat["tool_choice"] = choice;
        if let Some(off) = check::boolean(o, "disable_parallel_tool_use", "tool_choice")? {
            chat["parallel_tool_calls"] = json!(!off);
        }
    }
    Ok((chat, plan))
}

/// `thinking` as the chat template's `enable_thinking` (`None`: the
/// model's default). The engine has no separate reasoning budget: reasoning
/// and answer share `max_tokens`, which Anthropic requires to exceed
/// `budget_tokens`, so the total stays within what the client allowed.
fn thinking(req: &Map<String, Value>, max_tokens: u64) -> Result<Option<bool>, ApiError> {
    let Some(t) = get(req, "thinking") else {
        return Ok(None);
    };
    let o = check::object(t, "thinking")?;
    match check::string(o, "type", "thinking")?.as_deref() {
        Some("enabled") => {
            known_keys(o, &["type", "budget_tokens", "display"], "thinking")?;
            let budget = check::count(o, "budget_tokens", "thinking")?
                .ok_or_else(|| bad("thinking.budget_tokens", "is required"))?;
            if budget < 1024 || budget >= max_tokens {
                return Err(bad(
                    "thinking.budget_tokens",
                    "must be at least 1024 and less than `max_tokens`",
                ));
            }
            display(o)?;
            Ok(Some(true))
        }
        Some("adaptive") => {
            known_keys(o, &["type", "display"], "thinking")?;
            display(o)?;
            Ok(None)
        }
        Some("disabled") => {
            known_keys(o, &["type"], "thinking")?;
            Ok(Some(false))
        }
        _ => Err(bad(
            "thinking.type",
            "must be \"enabled\", \"adaptive\" or \"disabled\"",
        )),
    }
}

/// `thinking.display`: the reasoning is always returned as it is.
fn display(o: &Map<String, Value>) -> Result<(), ApiError> {
    match check::string(o, "display", "thinking")?.as_deref() {
        None | Some("summarized") => Ok(()),
        Some(_) => Err(bad(
            "thinking.display",
            "must be \"summarized\": the engine's reasoning is returned as it is, never omitted",
        )),
    }
}

fn required_string(obj: &Map<String, Value>, key: &str, at: &str) -> Result<String, ApiError> {
    check::string(obj, key, at)?.ok_or_else(|| bad(&check::join(at, key), "is required"))
}

/// One Anthropic message onto the chat messages: a user message's
/// `tool_result` blocks become `tool` messages (before its other blocks,
/// where Anthropic requires them), an assistant's `tool_use` blocks its
/// `tool_calls`.
fn message(m: &Value, at: &str, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let o = check::object(m, at)?;
    known_keys(o, &["role", "content"], at)?;
    let role = match check::string(o, "role", at)?.as_deref() {
        Some("user") => "user",
        Some("assistant") => "assistant",
        _ => {
            return Err(bad(
                &format!("{at}.role"),
                "must be \"user\" or \"assistant\"",
            ))
        }
    };
    let blocks = match get(o, "content") {
        Some(Value::String(s)) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Some(Value::Array(b)) => b,
        _ => {
            return Err(bad(
                &format!("{at}.content"),
                "must be a string or an array of content blocks",
            ))
        }
    };
    let mut parts: Vec<Value> = Vec::new();
    let mut calls: Vec<Value> = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bat = format!("{at}.content[{j}]");
        let bo = check::object(b, &bat)?;
        let kind = check::string(bo, "type", &bat)?;
        match (role, kind.as_deref()) {
            (_, Some("text")) => {
                known_keys(bo, &["type", "text", "cache_control", "citations"], &bat)?;
                parts.push(json!({"type": "text", "text": required_string(bo, "text", &bat)?}));
            }
            // An earlier answer's reasoning, which clients send back with
            // thinking on. Not passed on: reasoning models' chat templates
            // (Qwen3's, DeepSeek's) leave earlier turns' reasoning out of
            // the prompt, and the engine signs nothing to verify.
            ("assistant", Some("thinking")) => {
                known_keys(bo, &["type", "thinking", "signature"], &bat)?;
                required_string(bo, "thinking", &bat)?;
            }
            ("user", Some("image")) => {
                known_keys(bo, &["type", "source", "cache_control"], &bat)?;
                parts.push(image(bo, &bat)?);
            }
            ("assistant", Some("tool_use")) => {
                known_keys(bo, &["type", "id", "name", "input", "cache_control"], &bat)?;
                let input = get(bo, "input").cloned().unwrap_or_else(|| json!({}));
                check::object(&input, &format!("{bat}.input"))?;
                calls.push(
                    json!({"id": required_string(bo, "id", &bat)?, "type": "function",
                    "function": {"name": required_string(bo, "name", &bat)?,
                                 "arguments": input.to_string()}}),
                );
            }
            ("user", Some("tool_result")) => {
                known_keys(
                    bo,
                    &[
                        "type",
                        "tool_use_id",
                        "content",
                        "is_error",
                        "cache_control",
                    ],
                    &bat,
                )?;
                let id = required_string(bo, "tool_use_id", &bat)?;
                let mut text = match get(bo, "content") {
                    None => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(items)) => {
                        let mut t = Vec::new();
                        for (k, item) in items.iter().enumerate() {
                            let iat = format!("{bat}.content[{k}]");
                            let io = check::object(item, &iat)?;
                            if check::string(io, "type", &iat)?.as_deref() != Some("text") {
                                return Err(bad(
                                    &format!("{iat}.type"),
                                    "must be \"text\" (tool results are read as text)",
                                ));
                            }
                            known_keys(io, &["type", "text", "cache_control", "citations"], &iat)?;
                            t.push(required_string(io, "text", &iat)?);
                        }
                        t.join("\n")
                    }
                    Some(_) => {
                        return Err(bad(
                            &format!("{bat}.content"),
                            "must be a string or an array of text blocks",
                        ))
                    }
                };
                // Chat has no error flag on a tool message: the model is
                // told in the text.
                if check::boolean(bo, "is_error", &bat)? == Some(true) {
                    text = format!("Error: {text}");
                }
                out.push(json!({"role": "tool", "tool_call_id": id, "content": text}));
            }
            _ => {
                return Err(bad(
                    &format!("{bat}.type"),
                    format!(
                        "{:?} is not supported in a{} {role} message",
                        kind.unwrap_or_default(),
                        if role == "user" { "" } else { "n" }
                    ),
                ))
            }
        }
    }
    if parts.is_empty() && calls.is_empty() {
        return Ok(());
    }
    let all_text = parts.iter().all(|p| p["type"] == "text");
    let content = if parts.is_empty() {
        Value::Null
    } else if all_text {
        let text: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
        json!(text.join("\n"))
    } else {
        Value::Array(parts)
    };
    let mut msg = json!({"role": role, "content": content});
    if !calls.is_empty() {
        msg["tool_calls"] = Value::Array(calls);
    }
    out.push(msg);
    Ok(())
}

/// An image block as a chat `image_url` part (a data URL for base64).
fn image(bo: &Map<String, Value>, at: &str) -> Result<Value, ApiError> {
    let sat = format!("{at}.source");
    let src = check::object(
        get(bo, "source").ok_or_else(|| bad(&sat, "is required"))?,
        &sat,
    )?;
    let url = match check::string(src, "type", &sat)?.as_deref() {
        Some("base64") => {
            known_keys(src, &["type", "media_type", "data"], &sat)?;
            format!(
                "data:{};base64,{}",
                required_string(src, "media_type", &sat)?,
                required_string(src, "data", &sat)?
            )
        }
        Some("url") => {
            known_keys(src, &["type", "url"], &sat)?;
            required_string(src, "url", &sat)?
        }
        _ => return Err(bad(&format!("{sat}.type"), "must be \"base64\" or \"url\"")),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn tool(t: &Value, at: &str) -> Result<Value, ApiError> {
    let o = check::object(t, at)?;
    match check::string(o, "type", at)?.as_deref() {
        None | Some("custom") => {}
        Some(other) => {
            return Err(bad(
                &format!("{at}.type"),
                format!("{other:?} is not supported: only client tools (name, description, input_schema) are"),
            ))
        }
    }
    known_keys(
        o,
        &[
            "type",
            "name",
            "description",
            "input_schema",
            "cache_control",
        ],
        at,
    )?;
    let schema =
        get(o, "input_schema").ok_or_else(|| bad(&format!("{at}.input_schema"), "is required"))?;
    check::object(schema, &format!("{at}.input_schema"))?;
    let mut function = json!({"name": required_string(o, "name", at)?, "parameters": schema});
    if let Some(d) = check::string(o, "description", at)? {
        function["description"] = json!(d);
    }
    Ok(json!({"type": "function", "function": function}))
}

/// One content block as it builds up.
#[derive(Debug, Clone)]
enum Block {
    /// A reasoning model's reasoning, as Anthropic's extended thinking.
    Thinking(String),
    Text(String),
    Tool {
        /// chat's index of the call.
        index: u64,
        id: String,
        name: String,
        json: String,
    },
}

/// The answer's state machine.
pub struct Machine {
    plan: Plan,
    id: String,
    model: String,
    started: bool,
    blocks: Vec<Block>,
    open: Option<usize>,
    finish: Option<(String, Option<String>)>,
    usage: Usage,
    error: Option<StreamError>,
    ended: bool,
}

impl Machine {
    pub fn new(plan: Plan) -> Machine {
        Machine {
            plan,
            id: new_id("msg_"),
            model: String::new(),
            started: false,
            blocks: Vec::new(),
            open: None,
            finish: None,
            usage: Usage::default(),
            error: None,
            ended: false,
        }
    }

    /// `stop_reason` and `stop_sequence`.
    fn stop(&self) -> (Value, Value) {
        let Some((reason, matched)) = &self.finish else {
            return (Value::Null, Value::Null);
        };
        let reason = match reason.as_str() {
            "length" => "max_tokens",
            "tool_calls" | "function_call" => "tool_use",
            "content_filter" => "refusal",
            _ => match matched {
                Some(s) if self.plan.stop_sequences.contains(s) => {
                    return (json!("stop_sequence"), json!(s));
                }
                _ => "end_turn",
            },
        };
        (json!(reason), Value::Null)
    }

    fn open(&mut self, block: Block, out: &mut Vec<u8>) -> usize {
        self.close(out);
        let index = self.blocks.len();
        let start = match &block {
            // The engine signs nothing: the SDKs' models require the field,
            // and an empty one is what they accumulate to without a
            // `signature_delta`.
            Block::Thinking(_) => json!({"type": "thinking", "thinking": "", "signature": ""}),
            Block::Text(_) => json!({"type": "text", "text": ""}),
            Block::Tool { id, name, .. } => {
                json!({"type": "tool_use", "id": id, "name": name, "input": {}})
            }
        };
        self.blocks.push(block);
        self.open = Some(index);
        put_event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        );
        index
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some(index) = self.open.take() {
            put_event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        // Prompt tokens are known only at the end: `message_delta` carries
        // them (the SDKs take `input_tokens` from there too).
        let message = json!({"id": self.id, "type": "message", "role": "assistant",
            "content": [], "model": self.model, "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0}});
        put_event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": message}),
        );
        put_event(out, "ping", &json!({"type": "ping"}));
    }

    fn block_json(b: &Block) -> Result<Value, ApiError> {
        Ok(match b {
            Block::Thinking(t) => json!({"type": "thinking", "thinking": t, "signature": ""}),
            Block::Text(t) => json!({"type": "text", "text": t}),
            Block::Tool { id, name, json, .. } => {
                let input: Value = if json.trim().is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(json).map_err(|e| {
                        ApiError::new(
                            ErrorCode::UpstreamError,
                            format!("the engine's arguments for tool `{name}` are not JSON: {e}"),
                        )
                    })?
                };
                if !input.is_object() {
                    return Err(ApiError::new(
                        ErrorCode::UpstreamError,
                        format!("the engine's arguments for tool `{name}` are not a JSON object"),
                    ));
                }
                json!({"type": "tool_use", "id": id, "name": name, "input": input})
            }
        })
    }
}

impl super::Machine for Machine {
    fn on(&mut self, ev: ChatEvent, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        match ev {
            ChatEvent::Start { model } => {
                self.model = model;
                self.start(out);
            }
            ChatEvent::Reasoning(t) => {
                self.start(out);
                let index = match self.open {
                    Some(i) if matches!(self.blocks[i], Block::Thinking(_)) => i,
                    _ => self.open(Block::Thinking(String::new()), out),
                };
                if let Block::Thinking(text) = &mut self.blocks[index] {
                    text.push_str(&t);
                }
                put_event(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "thinking_delta", "thinking": t}}),
                );
            }
            ChatEvent::Text(t) => {
                self.start(out);
                let index = match self.open {
                    Some(i) if matches!(self.blocks[i], Block::Text(_)) => i,
                    _ => self.open(Block::Text(String::new()), out),
                };
                if let Block::Text(text) = &mut self.blocks[index] {
                    text.push_str(&t);
                }
                put_event(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": t}}),
                );
            }
            ChatEvent::ToolStart { index, id, name } => {
                self.start(out);
                self.open(
                    Block::Tool {
                        index,
                        id,
                        name,
                        json: String::new(),
                    },
                    out,
                );
            }
            ChatEvent::ToolArgs { index, delta } => {
                let Some(pos) = self
                    .blocks
                    .iter()
                    .position(|b| matches!(b, Block::Tool { index: k, .. } if *k == index))
                else {
                    return; // arguments for a call never opened
                };
                if let Block::Tool { json, .. } = &mut self.blocks[pos] {
                    json.push_str(&delta);
                }
                put_event(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": pos,
                        "delta": {"type": "input_json_delta", "partial_json": delta}}),
                );
            }
            ChatEvent::Finish { reason, stop } => {
                self.finish = Some((reason, stop));
                self.close(out);
            }
            ChatEvent::Usage(u) => self.usage = u,
            ChatEvent::Error(e) => {
                self.ended = true;
                let status = status_of_code(&e.code);
                put_event(
                    out,
                    "error",
                    &json!({"type": "error", "error": {"type": anthropic_type(status),
                        "message": e.message}}),
                );
                self.error = Some(e);
            }
            ChatEvent::Done => {
                self.start(out);
                self.close(out);
                self.ended = true;
                if self.finish.is_none() {
                    self.finish = Some(("stop".into(), None));
                }
                let (reason, seq) = self.stop();
                put_event(
                    out,
                    "message_delta",
                    &json!({"type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": seq},
                        "usage": {"input_tokens": self.usage.input,
                                  "output_tokens": self.usage.output}}),
                );
                put_event(out, "message_stop", &json!({"type": "message_stop"}));
            }
        }
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        if !self.ended {
            self.on(
                ChatEvent::Error(StreamError {
                    code: "upstream_error".into(),
                    kind: "api_error".into(),
                    message: "the upstream stream ended before the answer was complete".into(),
                }),
                out,
            );
        }
    }

    fn object(&self) -> Result<Value, ApiError> {
        if let Some(e) = &self.error {
            return Err(ApiError::new(ErrorCode::UpstreamError, e.message.clone()));
        }
        let content = self
            .blocks
            .iter()
            .map(Machine::block_json)
            .collect::<Result<Vec<_>, _>>()?;
        let (reason, seq) = self.stop();
        Ok(
            json!({"id": self.id, "type": "message", "role": "assistant",
            "content": content, "model": self.model,
            "stop_reason": reason, "stop_sequence": seq,
            "usage": {"input_tokens": self.usage.input, "output_tokens": self.usage.output}}),
        )
    }
}

/// The HTTP status cortex uses for a §2 `code` (502 for codes it does not
/// know).
fn status_of_code(code: &str) -> StatusCode {
    use ErrorCode::*;
    [
        InvalidJson,
        InvalidRequest,
        MissingModel,
        ContextLengthExceeded,
        InvalidApiKey,
        ModelNotAllowed,
        ModelNotFound,
        RequestTooLarge,
        UnsupportedMediaType,
        RateLimitExceeded,
        UpstreamError,
        ModelBusy,
        ModelLoading,
        NoCapacity,
        ShuttingDown,
        UpstreamTimeout,
        InternalError,
    ]
    .into_iter()
    .find(|c| c.as_str() == code)
    .map_or(StatusCode::BAD_GATEWAY, ErrorCode::status)
}

/// Anthropic's error `type` for an HTTP status.
pub fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// Anthropic's error body; helexa's `code` (and `param`) ride along so a
/// client can tell e.g. `model_busy` from `no_capacity`.
fn anthropic_body(
    status: StatusCode,
    message: &str,
    code: Option<&str>,
    param: Option<&str>,
) -> Vec<u8> {
    let mut error = json!({"type": anthropic_type(status), "message": message});
    if let Some(c) = code {
        error["code"] = json!(c);
    }
    if let Some(p) = param {
        error["param"] = json!(p);
    }
    serde_json::to_vec(&json!({"type": "error", "error": error})).expect("json serialises")
}

/// An error cortex answers itself, in Anthropic's shape.
pub fn error_response(e: &ApiError) -> Response {
    let mut resp = Response::new(Body::from(anthropic_body(
        e.status(),
        &e.message,
        Some(e.code.as_str()),
        e.param.as_deref(),
    )));
    *resp.status_mut() = e.status();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = e.effective_retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// A §2 refusal (cortex's or a neuron's, passed on) rewritten into
/// Anthropic's shape: same status and header fields (`Retry-After`, rate
/// limits, node).
///
/// A body over `limit` bytes is not read; its status's reason stands in
/// for the message.
pub async fn reshape_error(mut parts: http::response::Parts, body: Body, limit: usize) -> Response {
    let text = axum::body::to_bytes(body, limit).await.unwrap_or_default();
    let (message, code, param) = match serde_json::from_slice::<ErrorEnvelope>(&text) {
        Ok(env) => (env.error.message, env.error.code, env.error.param),
        Err(_) if text.is_empty() => (
            parts
                .status
                .canonical_reason()
                .unwrap_or("error")
                .to_string(),
            None,
            None,
        ),
        Err(_) => (String::from_utf8_lossy(&text).into_owned(), None, None),
    };
    let body = anthropic_body(parts.status, &message, code.as_deref(), param.as_deref());
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests;
