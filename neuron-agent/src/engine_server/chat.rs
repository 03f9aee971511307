//! `POST /v1/chat/completions` on the engine: check the request, render the
//! model's chat template (with tools), count the prompt exactly, generate
//! `n` choices (under a grammar for structured outputs and forced tool
//! calls), answer whole or streamed, with tool calls parsed out of the text.

use super::logprobs;
use super::params::{
    check_n, choice_params, engine_error, output_budget, refuse_unsupported, sampling_params,
    stop_strings, MAX_TOP_LOGPROBS_CHAT,
};
use super::stream::{collect, sse_body, sse_response, ChunkFormat};
use super::tools::{call_id, call_json, generic_messages, Tools};
use super::{structured, EngineState};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use helexa_api::chat::{
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage,
    ChunkChoice, CompletionTokensDetails, Delta, MessageContent, ResponseMessage, Usage,
    CHAT_CHUNK_OBJECT, CHAT_OBJECT,
};
use helexa_api::{sse, ApiError, ApiJson};
use helexa_engine::reasoning::{self, Markers, Piece, ReasoningParser};
use helexa_engine::toolcall::{self, ToolCallParser, ToolEvent};
use helexa_engine::{Engine, GenerationRequest, TokenLogprob};
use serde_json::{json, Value};
use std::sync::Arc;

/// OpenAI chat fields this engine does not implement: refused by name.
const UNSUPPORTED: &[&str] = &[
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
];

pub async fn chat_completions(
    State(st): State<Arc<EngineState>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Response {
    super::respond(handle(st, req).await, "chat")
}

/// Text-only model: every content part must be text.
fn check_contents(messages: &[ChatMessage]) -> Result<(), ApiError> {
    for (i, m) in messages.iter().enumerate() {
        if let Some(MessageContent::Parts(parts)) = &m.content {
            for (j, p) in parts.iter().enumerate() {
                let ok = p.kind == "text" && p.text.is_some();
                if !ok {
                    return Err(ApiError::invalid_request(
                        format!(
                            "content parts of type {:?} cannot be read by this text-only model; only `text` parts are supported",
                            p.kind
                        ),
                        format!("messages[{i}].content[{j}]"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `logprobs` / `top_logprobs` → alternatives per token, if asked.
fn logprobs_request(req: &ChatCompletionRequest) -> Result<Option<usize>, ApiError> {
    let top = req.top_logprobs;
    if let Some(k) = top {
        if k > MAX_TOP_LOGPROBS_CHAT {
            return Err(ApiError::invalid_request(
                format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS_CHAT}, got {k}"),
                "top_logprobs",
            ));
        }
    }
    match (req.logprobs.unwrap_or(false), top) {
        (true, k) => Ok(Some(k.unwrap_or(0) as usize)),
        (false, Some(_)) => Err(ApiError::invalid_request(
            "`top_logprobs` needs `logprobs: true`",
            "top_logprobs",
        )),
        (false, None) => Ok(None),
    }
}

async fn handle(st: Arc<EngineState>, req: ChatCompletionRequest) -> Result<Response, ApiError> {
    let engine = st.engine("chat", "/v1/chat/completions")?.clone();
    let n = check_n(req.n)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_request(
            "`messages` must contain at least one message",
            "messages",
        ));
    }
    refuse_unsupported(&req.extra, UNSUPPORTED)?;
    check_contents(&req.messages)?;
    let params = sampling_params(
        &req.sampling,
        engine.meta().vocab_size,
        &engine.meta().generation_defaults,
    )?;
    let stop = stop_strings(&req.sampling)?;
    let logprobs = logprobs_request(&req)?;
    let tools = Tools::from_request(
        req.tools.as_deref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    let format_grammar = structured::grammar(req.response_format.as_ref())?;
    if format_grammar.is_some() && tools.active() {
        return Err(ApiError::invalid_request(
            "`response_format` cannot be combined with `tools` (use `tool_choice: \"none\"`, or drop one)",
            "response_format",
        ));
    }
    let native_tools = engine.template_handles_tools();
    let tool_grammar = tools.grammar(!native_tools || engine.template_uses_tool_call_tags());
    let grammar = match (format_grammar, tool_grammar) {
        (Some(g), _) => Some((g, "response_format")),
        (None, Some(g)) => Some((g, "tools")),
        (None, None) => None,
    };
    let constraint = match grammar {
        Some((g, param)) => Some(structured::compile(&engine, g, param).await?),
        None => None,
    };

    // Rendering and tokenizing a long prompt takes milliseconds: off the runtime.
    let history_has_tools = req
        .messages
        .iter()
        .any(|m| m.role == "tool" || m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()));
    let (messages, template_tools) = if native_tools {
        let t = tools.active().then(|| tools.tools.clone());
        (req.messages.clone(), t)
    } else if tools.active() || history_has_tools {
        (generic_messages(&req.messages, Some(&tools)), None)
    } else {
        (req.messages.clone(), None)
    };
    let kwargs = match req.extra.get("chat_template_kwargs") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => {
            return Err(ApiError::invalid_request(
                "`chat_template_kwargs` must be an object of template variables",
                "chat_template_kwargs",
            ))
        }
    };
    let tok_engine = engine.clone();
    let (prompt, opened) = tokio::task::spawn_blocking(move || {
        let text = tok_engine.render_chat_with(
            &messages,
            template_tools.as_deref(),
            true,
            kwargs.as_ref(),
        )?;
        let opened = tok_engine
            .reasoning_markers()
            .is_some_and(|m| m.open_at_end(&text));
        Ok::<_, helexa_engine::EngineError>((
            tok_engine.tokenize(&text, add_bos(&tok_engine, &text))?,
            opened,
        ))
    })
    .await
    .map_err(|e| ApiError::new(helexa_api::ErrorCode::InternalError, e.to_string()))?
    .map_err(engine_error)?;
    // Reasoning is split out unless a grammar decides the output from its
    // first token (then there is no reasoning to split).
    let reasoning = engine
        .reasoning_markers()
        .filter(|_| constraint.is_none())
        .cloned()
        .map(|m| Reasoning {
            parsers: (0..n)
                .map(|_| ReasoningParser::new(m.clone(), opened))
                .collect(),
            text: vec![String::new(); n],
            markers: m,
            opened,
        });
    let max_new_tokens = output_budget(
        engine.meta().context_length,
        prompt.len(),
        req.requested_output(),
        st.default_max_output(),
    )?;
    let mut gens = Vec::with_capacity(n);
    for i in 0..n {
        gens.push(
            engine
                .submit(GenerationRequest {
                    prompt: prompt.clone(),
                    params: choice_params(&params, i),
                    max_new_tokens,
                    stop: stop.clone(),
                    constraint: constraint.clone(),
                    logprobs,
                })
                .map_err(engine_error)?,
        );
    }
    let format = ChatFormat {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: super::unix_now(),
        model: req.model.clone(),
        engine: engine.clone(),
        logprobs: logprobs.is_some(),
        tools: tools.active(),
        parsers: (0..n).map(|_| ToolCallParser::new()).collect(),
        calls: vec![0; n],
        pending_logprobs: vec![Vec::new(); n],
        reasoning,
    };
    if req.stream {
        let include_usage = req
            .stream_options
            .as_ref()
            .map(|o| o.include_usage)
            .unwrap_or(false);
        return Ok(sse_response(sse_body(
            gens,
            format,
            include_usage,
            st.keep_alive,
        )));
    }
    let mut done = collect(gens).await?;
    let mut reasoning_tokens = 0;
    let choices = done
        .choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let (thought, text) = match &format.reasoning {
                Some(r) => reasoning::split_all(&r.markers, r.opened, &c.text),
                None => (String::new(), c.text),
            };
            reasoning_tokens += engine.count_tokens(&thought);
            let (content, calls) = if format.tools {
                toolcall::parse_all(&text)
            } else {
                (text, Vec::new())
            };
            let tool_calls: Vec<Value> = calls.iter().map(|k| call_json(k, &call_id())).collect();
            let finish = if !tool_calls.is_empty() && c.finish_reason == "stop" {
                "tool_calls"
            } else {
                c.finish_reason
            };
            ChatChoice {
                index: i as u32,
                message: ResponseMessage {
                    role: "assistant".into(),
                    content: (tool_calls.is_empty() || !content.is_empty()).then_some(content),
                    reasoning_content: (!thought.is_empty()).then_some(thought),
                    tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                },
                finish_reason: Some(finish.into()),
                // A parsed tool call, not the stop string, ended the answer.
                stop_reason: c.stop_reason.filter(|_| finish != "tool_calls"),
                logprobs: format
                    .logprobs
                    .then(|| logprobs::chat_object(logprobs::chat_entries(&engine, &c.logprobs))),
            }
        })
        .collect();
    if format.reasoning.is_some() {
        done.usage.completion_tokens_details = Some(CompletionTokensDetails {
            reasoning_tokens: reasoning_tokens as u32,
        });
    }
    Ok(axum::Json(ChatCompletionResponse {
        id: format.id,
        object: CHAT_OBJECT.into(),
        created: format.created,
        model: format.model,
        choices,
        usage: done.usage,
        system_fingerprint: None,
    })
    .into_response())
}

/// Add BOS only when the model wants one and the template did not write it.
fn add_bos(engine: &Engine, text: &str) -> bool {
    match engine.meta().bos_token.as_deref() {
        Some(bos) if !bos.is_empty() => !text.starts_with(bos),
        _ => true,
    }
}

struct ChatFormat {
    id: String,
    created: u64,
    model: String,
    engine: Engine,
    logprobs: bool,
    /// Parse tool calls out of the text.
    tools: bool,
    parsers: Vec<ToolCallParser>,
    /// Calls sent so far, per choice (the next call's `index`).
    calls: Vec<usize>,
    /// Log-probabilities not yet sent with a content chunk, per choice.
    pending_logprobs: Vec<Vec<Value>>,
    /// Splits reasoning from the answer (reasoning models only).
    reasoning: Option<Reasoning>,
}

struct Reasoning {
    markers: Markers,
    /// The prompt left a reasoning block open.
    opened: bool,
    parsers: Vec<ReasoningParser>,
    /// Reasoning streamed so far, per choice (counted for `usage`).
    text: Vec<String>,
}

impl ChatFormat {
    fn chunk(
        &self,
        choice: usize,
        delta: Delta,
        finish: Option<&str>,
        lps: Option<Value>,
    ) -> Bytes {
        self.chunk_with(choice, delta, finish, lps, None)
    }

    fn chunk_with(
        &self,
        choice: usize,
        delta: Delta,
        finish: Option<&str>,
        lps: Option<Value>,
        stop: Option<&str>,
    ) -> Bytes {
        sse::data_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: CHAT_CHUNK_OBJECT.into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: choice as u32,
                delta,
                finish_reason: finish.map(str::to_string),
                stop_reason: stop.map(str::to_string),
                logprobs: lps,
            }],
            usage: None,
        })
    }

    fn content(&mut self, choice: usize, text: String) -> Bytes {
        let lps = self.take_logprobs(choice);
        self.chunk(
            choice,
            Delta {
                content: Some(text),
                ..Default::default()
            },
            None,
            lps,
        )
    }

    fn take_logprobs(&mut self, choice: usize) -> Option<Value> {
        self.logprobs
            .then(|| logprobs::chat_object(std::mem::take(&mut self.pending_logprobs[choice])))
    }

    fn tool_delta(&self, choice: usize, piece: Value) -> Bytes {
        let delta = Delta {
            tool_calls: serde_json::from_value(piece).ok(),
            ..Default::default()
        };
        self.chunk(choice, delta, None, None)
    }

    /// A call's first chunk: id, type, name and empty arguments.
    fn call_head(&self, choice: usize, index: usize, name: &str) -> Bytes {
        self.tool_delta(
            choice,
            json!([{"index": index, "id": call_id(), "type": "function",
                "function": {"name": name, "arguments": ""}}]),
        )
    }

    fn call_args(&self, choice: usize, index: usize, args: String) -> Bytes {
        self.tool_delta(
            choice,
            json!([{"index": index, "function": {"arguments": args}}]),
        )
    }

    /// Chunks of reasoning and answer pieces; the answer goes through the
    /// tool-call parser when the request has tools.
    fn pieces(&mut self, choice: usize, pieces: Vec<Piece>) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces {
            match p {
                Piece::Reasoning(s) if s.is_empty() => {}
                Piece::Reasoning(s) => {
                    if let Some(r) = self.reasoning.as_mut() {
                        r.text[choice].push_str(&s);
                    }
                    let delta = Delta {
                        reasoning_content: Some(s),
                        ..Default::default()
                    };
                    out.extend_from_slice(&self.chunk(choice, delta, None, None));
                }
                Piece::Content(s) if self.tools => {
                    let events = self.parsers[choice].push(&s);
                    out.extend(self.events(choice, events));
                }
                Piece::Content(s) if s.is_empty() => {}
                Piece::Content(s) => out.extend_from_slice(&self.content(choice, s)),
            }
        }
        out
    }

    /// Chunks of parsed events: content, or a call as its header (id, type,
    /// name, empty arguments) then its arguments, in one piece or as they
    /// are generated.
    fn events(&mut self, choice: usize, events: Vec<ToolEvent>) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            match e {
                ToolEvent::Content(text) if text.is_empty() => {}
                ToolEvent::Content(text) => out.extend_from_slice(&self.content(choice, text)),
                ToolEvent::Call(call) => {
                    let index = self.calls[choice];
                    self.calls[choice] += 1;
                    out.extend(self.call_head(choice, index, &call.name));
                    out.extend(self.call_args(choice, index, call.arguments));
                }
                ToolEvent::CallBegin { name } => {
                    let index = self.calls[choice];
                    self.calls[choice] += 1;
                    out.extend(self.call_head(choice, index, &name));
                }
                ToolEvent::CallArgs(args) => {
                    let index = self.calls[choice].saturating_sub(1);
                    out.extend(self.call_args(choice, index, args));
                }
                ToolEvent::CallEnd => {}
            }
        }
        out
    }
}

impl ChunkFormat for ChatFormat {
    fn opening(&mut self, choice: usize) -> Option<Bytes> {
        Some(self.chunk(
            choice,
            Delta {
                role: Some("assistant".into()),
                content: Some(String::new()),
                ..Default::default()
            },
            None,
            None,
        ))
    }

    fn text(&mut self, choice: usize, text: &str, lps: &[TokenLogprob]) -> Option<Bytes> {
        if self.logprobs {
            let entries = logprobs::chat_entries(&self.engine, lps);
            self.pending_logprobs[choice].extend(entries);
        }
        let pieces = match self.reasoning.as_mut() {
            Some(r) => r.parsers[choice].push(text),
            None => vec![Piece::Content(text.to_string())],
        };
        let out = self.pieces(choice, pieces);
        (!out.is_empty()).then(|| Bytes::from(out))
    }

    fn finish(&mut self, choice: usize, reason: &str, stop: Option<&str>) -> Bytes {
        let mut out = Vec::new();
        if let Some(r) = self.reasoning.as_mut() {
            let pieces = r.parsers[choice].finish();
            out = self.pieces(choice, pieces);
        }
        if self.tools {
            let events = self.parsers[choice].finish();
            out.extend(self.events(choice, events));
        }
        let (reason, stop) = if self.calls[choice] > 0 && reason == "stop" {
            ("tool_calls", None)
        } else {
            (reason, stop)
        };
        let lps = self
            .pending_logprobs
            .get(choice)
            .is_some_and(|p| !p.is_empty())
            .then(|| self.take_logprobs(choice))
            .flatten();
        out.extend_from_slice(&self.chunk_with(choice, Delta::default(), Some(reason), lps, stop));
        Bytes::from(out)
    }

    fn usage(&self, mut usage: Usage) -> Bytes {
        if let Some(r) = &self.reasoning {
            let tokens: usize = r.text.iter().map(|t| self.engine.count_tokens(t)).sum();
            usage.completion_tokens_details = Some(CompletionTokensDetails {
                reasoning_tokens: tokens as u32,
            });
        }
        sse::data_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: CHAT_CHUNK_OBJECT.into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![],
            usage: Some(usage),
        })
    }
}
