//! OpenAI Responses (`POST /v1/responses`, stateless) as chat completions:
//! the request translation and the answer's state machine (the whole
//! `response` object and the `response.*` stream events).
//!
//! cortex stores nothing, so what needs a stored response or conversation
//! (`previous_response_id`, `conversation`, `store: true`, `background:
//! true`) is refused by name, as is every field the translation does not
//! carry over. docs/protocol.md §4.1.

use super::chat::{ChatEvent, StreamError, Usage};
use super::check::{self, bad, get, known_keys, unsupported};
use super::{new_id, put_event, unix_now};
use helexa_api::error::{ApiError, ErrorCode};
use serde_json::{json, Map, Value};

/// Top-level request fields this translation reads.
const KNOWN: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "stream",
    "metadata",
    "user",
    "store",
    "background",
    "truncation",
    "include",
    "previous_response_id",
    "conversation",
    "reasoning",
];

/// `metadata` limits, as OpenAI documents them.
const METADATA_MAX_KEYS: usize = 16;
const METADATA_MAX_KEY_CHARS: usize = 64;
const METADATA_MAX_VALUE_CHARS: usize = 512;

/// The request fields the response object echoes back.
#[derive(Debug, Clone)]
pub struct Plan {
    pub instructions: Value,
    pub max_output_tokens: Value,
    pub metadata: Value,
    pub parallel_tool_calls: bool,
    pub temperature: Value,
    pub top_p: Value,
    pub text: Value,
    pub tool_choice: Value,
    pub tools: Value,
    pub user: Value,
    pub reasoning: Value,
}

/// Translates a Responses request into a chat completions request.
pub fn translate(req: Map<String, Value>) -> Result<(Value, Plan), ApiError> {
    let model = check::model(&req)?;
    known_keys(&req, KNOWN, "")?;
    // What needs state cortex does not keep.
    for field in ["previous_response_id", "conversation"] {
        if get(&req, field).is_some() {
            return Err(bad(
                field,
                "is not supported: this server keeps no responses or conversations (send the whole input each time)",
            ));
        }
    }
    if check::boolean(&req, "store", "")? == Some(true) {
        return Err(bad(
            "store",
            "must be false or absent: this server stores no responses",
        ));
    }
    if check::boolean(&req, "background", "")? == Some(true) {
        return Err(bad(
            "background",
            "must be false or absent: this server runs no background responses",
        ));
    }
    match check::string(&req, "truncation", "")?.as_deref() {
        None | Some("disabled") => {}
        Some(_) => {
            return Err(bad(
                "truncation",
                "must be \"disabled\": an input that does not fit is refused, never truncated",
            ))
        }
    }
    match get(&req, "include") {
        None => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => return Err(unsupported("include")),
    }

    let instructions = check::string(&req, "instructions", "")?;
    let mut messages = Vec::new();
    if let Some(text) = &instructions {
        messages.push(json!({"role": "system", "content": text}));
    }
    match get(&req, "input") {
        None => return Err(bad("input", "is required")),
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                input_item(item, &format!("input[{i}]"), &mut messages)?;
            }
        }
        Some(_) => return Err(bad("input", "must be a string or an array of items")),
    }
    if messages.is_empty() {
        return Err(bad("input", "must not be empty"));
    }

    let stream = check::boolean(&req, "stream", "")?.unwrap_or(false);
    let mut chat = json!({"model": model, "messages": messages, "stream": stream});
    if stream {
        // Usage ends every answer (and settles a key's `tpm`).
        chat["stream_options"] = json!({"include_usage": true});
    }
    let max_output_tokens = check::count(&req, "max_output_tokens", "")?;
    if let Some(n) = max_output_tokens {
        chat["max_tokens"] = json!(n);
    }
    let temperature = check::number(&req, "temperature", "")?;
    if let Some(t) = temperature {
        chat["temperature"] = json!(t);
    }
    let top_p = check::number(&req, "top_p", "")?;
    if let Some(p) = top_p {
        chat["top_p"] = json!(p);
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
    let tool_choice = get(&req, "tool_choice").cloned();
    if let Some(tc) = &tool_choice {
        chat["tool_choice"] = choice(tc)?;
    }
    let parallel = check::boolean(&req, "parallel_tool_calls", "")?;
    if let Some(p) = parallel {
        chat["parallel_tool_calls"] = json!(p);
    }
    let text = get(&req, "text").cloned();
    if let Some(t) = &text {
        if let Some(format) = response_format(t)? {
            chat["response_format"] = format;
        }
    }
    let metadata = get(&req, "metadata").cloned();
    if let Some(m) = &metadata {
        check_metadata(m)?;
    }
    let user = check::string(&req, "user", "")?;
    if let Some(u) = &user {
        chat["user"] = json!(u);
    }
    let reasoning = get(&req, "reasoning").cloned();
    if let Some(r) = &reasoning {
        if let Some(on) = thinking(r)? {
            chat["chat_template_kwargs"] = json!({"enable_thinking": on});
        }
    }
    let plan = Plan {
        reasoning: reasoning.unwrap_or(Value::Null),
        instructions: instructions.map_or(Value::Null, Value::String),
        max_output_tokens: max_output_tokens.map_or(Value::Null, |n| json!(n)),
        metadata: metadata.unwrap_or_else(|| json!({})),
        parallel_tool_calls: parallel.unwrap_or(true),
        temperature: json!(temperature.unwrap_or(1.0)),
        top_p: json!(top_p.unwrap_or(1.0)),
        text: text.unwrap_or_else(|| json!({"format": {"type": "text"}})),
        tool_choice: tool_choice.unwrap_or_else(|| json!("auto")),
        tools: Value::Array(tools),
        user: user.map_or(Value::Null, Value::String),
    };
    Ok((chat, plan))
}

/// `reasoning` as the chat template's `enable_thinking` (`None`: the
/// model's default). The engine has one effort level, the model's own: any
/// effort above `minimal` turns thinking on, `none` and `minimal` turn it
/// off. Reasoning is returned whole as `reasoning_text`, never summarised,
/// so only `summary: "auto"` (which promises no particular summary) is
/// accepted.
fn thinking(r: &Value) -> Result<Option<bool>, ApiError> {
    let o = check::object(r, "reasoning")?;
    known_keys(o, &["effort", "summary", "generate_summary"], "reasoning")?;
    for key in ["summary", "generate_summary"] {
        match check::string(o, key, "reasoning")?.as_deref() {
            None | Some("auto") => {}
            Some(_) => {
                return Err(bad(
                    &format!("reasoning.{key}"),
                    "must be \"auto\" or absent: this server returns the model's reasoning whole, not a summary",
                ))
            }
        }
    }
    match check::string(o, "effort", "reasoning")?.as_deref() {
        None => Ok(None),
        Some("none" | "minimal") => Ok(Some(false)),
        Some("low" | "medium" | "high" | "xhigh") => Ok(Some(true)),
        Some(_) => Err(bad(
            "reasoning.effort",
            "must be \"none\", \"minimal\", \"low\", \"medium\", \"high\" or \"xhigh\"",
        )),
    }
}

/// One `input` item onto the chat messages.
fn input_item(item: &Value, at: &str, messages: &mut Vec<Value>) -> Result<(), ApiError> {
    let obj = check::object(item, at)?;
    let kind = check::string(obj, "type", at)?;
    match kind.as_deref() {
        // An "easy" input message has no `type`.
        None | Some("message") => {
            known_keys(obj, &["type", "role", "content", "id", "status"], at)?;
            let role = match check::string(obj, "role", at)?.as_deref() {
                Some("user") => "user",
                Some("assistant") => "assistant",
                // Chat templates know `system`; `developer` is OpenAI's new
                // name for the same thing.
                Some("system") | Some("developer") => "system",
                Some(other) => {
                    return Err(bad(
                        &format!("{at}.role"),
                        format!("must be user, assistant, system or developer, not {other:?}"),
                    ))
                }
                None => return Err(bad(&format!("{at}.role"), "is required")),
            };
            let content = message_content(obj.get("content"), &format!("{at}.content"))?;
            messages.push(json!({"role": role, "content": content}));
        }
        Some("function_call") => {
            known_keys(
                obj,
                &["type", "call_id", "name", "arguments", "id", "status"],
                at,
            )?;
            let call_id = required_string(obj, "call_id", at)?;
            let name = required_string(obj, "name", at)?;
            let arguments = required_string(obj, "arguments", at)?;
            let call = json!({"id": call_id, "type": "function",
                "function": {"name": name, "arguments": arguments}});
            // Calls made in one turn belong to one assistant message.
            match messages.last_mut() {
                Some(last) if last["role"] == "assistant" => {
                    if !last["tool_calls"].is_array() {
                        last["tool_calls"] = json!([]);
                    }
                    last["tool_calls"].as_array_mut().expect("array").push(call);
                }
                _ => messages
                    .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        Some("function_call_output") => {
            known_keys(obj, &["type", "call_id", "output", "id", "status"], at)?;
            let call_id = required_string(obj, "call_id", at)?;
            let output = match get(obj, "output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        let pat = format!("{at}.output[{j}]");
                        let po = check::object(p, &pat)?;
                        match check::string(po, "type", &pat)?.as_deref() {
                            Some("input_text") | Some("output_text") => {
                                text.push_str(&required_string(po, "text", &pat)?)
                            }
                            _ => return Err(unsupported(&format!("{pat}.type"))),
                        }
                    }
                    text
                }
                _ => {
                    return Err(bad(
                        &format!("{at}.output"),
                        "must be a string or an array of text parts",
                    ))
                }
            };
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        // An earlier answer's reasoning, which clients send back. Not passed
        // on: reasoning models' chat templates (Qwen3's, DeepSeek's) leave
        // earlier turns' reasoning out of the prompt.
        Some("reasoning") => {
            known_keys(
                obj,
                &[
                    "type",
                    "id",
                    "summary",
                    "content",
                    "encrypted_content",
                    "status",
                ],
                at,
            )?;
        }
        Some(_) => return Err(unsupported(&format!("{at}.type"))),
    }
    Ok(())
}

fn required_string(obj: &Map<String, Value>, key: &str, at: &str) -> Result<String, ApiError> {
    check::string(obj, key, at)?.ok_or_else(|| bad(&check::join(at, key), "is required"))
}

/// A message's content: a string, or parts (text, and images for models
/// that read them: the engine refuses images for a text-only model).
fn message_content(v: Option<&Value>, at: &str) -> Result<Value, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(json!(s)),
        Some(Value::Array(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            let mut all_text = true;
            for (j, p) in parts.iter().enumerate() {
                let pat = format!("{at}[{j}]");
                let po = check::object(p, &pat)?;
                match check::string(po, "type", &pat)?.as_deref() {
                    Some("input_text") | Some("output_text") => {
                        known_keys(po, &["type", "text", "annotations", "logprobs"], &pat)?;
                        out.push(
                            json!({"type": "text", "text": required_string(po, "text", &pat)?}),
                        );
                    }
                    Some("refusal") => {
                        known_keys(po, &["type", "refusal"], &pat)?;
                        out.push(
                            json!({"type": "text", "text": required_string(po, "refusal", &pat)?}),
                        );
                    }
                    Some("input_image") => {
                        known_keys(po, &["type", "image_url", "detail"], &pat)?;
                        let url = check::string(po, "image_url", &pat)?.ok_or_else(|| {
                            bad(
                                &format!("{pat}.image_url"),
                                "is required (`file_id` images are not supported)",
                            )
                        })?;
                        let mut image = json!({"url": url});
                        if let Some(d) = check::string(po, "detail", &pat)? {
                            image["detail"] = json!(d);
                        }
                        all_text = false;
                        out.push(json!({"type": "image_url", "image_url": image}));
                    }
                    _ => return Err(unsupported(&format!("{pat}.type"))),
                }
            }
            // Text alone is sent as one string: every chat template reads
            // that, not every one reads parts.
            if all_text {
                let text: Vec<&str> = out.iter().filter_map(|p| p["text"].as_str()).collect();
                return Ok(json!(text.concat()));
            }
            Ok(Value::Array(out))
        }
        _ => Err(bad(at, "must be a string or an array of content parts")),
    }
}

/// A Responses function tool (flat) as a chat tool (nested).
fn tool(t: &Value, at: &str) -> Result<Value, ApiError> {
    let obj = check::object(t, at)?;
    match check::string(obj, "type", at)?.as_deref() {
        Some("function") => {}
        Some(other) => {
            return Err(bad(
                &format!("{at}.type"),
                format!("{other:?} is not supported: only `function` tools are"),
            ))
        }
        None => return Err(bad(&format!("{at}.type"), "is required")),
    }
    known_keys(
        obj,
        &["type", "name", "description", "parameters", "strict"],
        at,
    )?;
    let mut function = json!({"name": required_string(obj, "name", at)?});
    if let Some(d) = check::string(obj, "description", at)? {
        function["description"] = json!(d);
    }
    if let Some(p) = get(obj, "parameters") {
        check::object(p, &format!("{at}.parameters"))?;
        function["parameters"] = p.clone();
    }
    if let Some(s) = check::boolean(obj, "strict", at)? {
        function["strict"] = json!(s);
    }
    Ok(json!({"type": "function", "function": function}))
}

fn choice(tc: &Value) -> Result<Value, ApiError> {
    match tc {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => Ok(tc.clone()),
        Value::Object(o) => {
            if o.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad(
                    "tool_choice.type",
                    "must be \"function\" (other forced tool types are not supported)",
                ));
            }
            known_keys(o, &["type", "name"], "tool_choice")?;
            let name = required_string(o, "name", "tool_choice")?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(bad(
            "tool_choice",
            "must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"name\": …}",
        )),
    }
}

/// `text.format` as chat's `response_format` (`None` for plain text).
fn response_format(text: &Value) -> Result<Option<Value>, ApiError> {
    let obj = check::object(text, "text")?;
    known_keys(obj, &["format"], "text")?;
    let Some(format) = get(obj, "format") else {
        return Ok(None);
    };
    let f = check::object(format, "text.format")?;
    match check::string(f, "type", "text.format")?.as_deref() {
        Some("text") => {
            known_keys(f, &["type"], "text.format")?;
            Ok(None)
        }
        Some("json_object") => {
            known_keys(f, &["type"], "text.format")?;
            Ok(Some(json!({"type": "json_object"})))
        }
        Some("json_schema") => {
            known_keys(
                f,
                &["type", "name", "schema", "strict", "description"],
                "text.format",
            )?;
            let name = required_string(f, "name", "text.format")?;
            let schema =
                get(f, "schema").ok_or_else(|| bad("text.format.schema", "is required"))?;
            check::object(schema, "text.format.schema")?;
            let mut js = json!({"name": name, "schema": schema});
            if let Some(s) = check::boolean(f, "strict", "text.format")? {
                js["strict"] = json!(s);
            }
            if let Some(d) = check::string(f, "description", "text.format")? {
                js["description"] = json!(d);
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": js})))
        }
        _ => Err(bad(
            "text.format.type",
            "must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

fn check_metadata(m: &Value) -> Result<(), ApiError> {
    let obj = check::object(m, "metadata")?;
    if obj.len() > METADATA_MAX_KEYS {
        return Err(bad(
            "metadata",
            format!("may hold at most {METADATA_MAX_KEYS} pairs"),
        ));
    }
    for (k, v) in obj {
        if k.chars().count() > METADATA_MAX_KEY_CHARS {
            return Err(bad(
                "metadata",
                format!("keys are at most {METADATA_MAX_KEY_CHARS} characters"),
            ));
        }
        match v.as_str() {
            Some(s) if s.chars().count() <= METADATA_MAX_VALUE_CHARS => {}
            Some(_) => {
                return Err(bad(
                    &format!("metadata.{k}"),
                    format!("is longer than {METADATA_MAX_VALUE_CHARS} characters"),
                ))
            }
            None => return Err(bad(&format!("metadata.{k}"), "must be a string")),
        }
    }
    Ok(())
}

/// One output item as it builds up.
#[derive(Debug, Clone)]
enum Item {
    /// A reasoning model's reasoning, as a `reasoning` item with its text
    /// (`reasoning_text`) and no summary.
    Reasoning {
        id: String,
        text: String,
    },
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        /// chat's index of the call.
        index: u64,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// The answer's state machine: the events of a stream, and the whole
/// response at the end.
pub struct Machine {
    plan: Plan,
    id: String,
    created_at: u64,
    model: String,
    seq: u64,
    started: bool,
    items: Vec<Item>,
    /// Each item's status: `in_progress` until it is closed.
    statuses: Vec<&'static str>,
    /// The item being streamed (an index into `items`).
    open: Option<usize>,
    finish: Option<String>,
    usage: Option<Usage>,
    error: Option<StreamError>,
    ended: bool,
    /// Building a whole answer: no stream events are wanted, so the
    /// response snapshots they carry are not built.
    quiet: bool,
}

impl Machine {
    /// A machine for a whole (non-streamed) answer.
    pub fn whole(plan: Plan) -> Machine {
        Machine {
            quiet: true,
            ..Machine::new(plan)
        }
    }

    pub fn new(plan: Plan) -> Machine {
        Machine {
            plan,
            id: new_id("resp_"),
            created_at: unix_now(),
            model: String::new(),
            seq: 0,
            started: false,
            items: Vec::new(),
            statuses: Vec::new(),
            open: None,
            finish: None,
            usage: None,
            error: None,
            ended: false,
            quiet: false,
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        put_event(out, kind, &data);
    }

    /// `completed`, `incomplete` (with its reason) or `failed`.
    fn status(&self) -> (&'static str, Value) {
        if self.error.is_some() {
            return ("failed", Value::Null);
        }
        match self.finish.as_deref() {
            Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
            Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
            Some(_) => ("completed", Value::Null),
            None => ("in_progress", Value::Null),
        }
    }

    fn item_status(&self) -> &'static str {
        match self.status().0 {
            "in_progress" => "in_progress",
            "completed" => "completed",
            _ => "incomplete",
        }
    }

    fn item_json(&self, item: &Item, status: &str) -> Value {
        match item {
            Item::Reasoning { id, text } => json!({"id": id, "type": "reasoning",
                "status": status, "summary": [], "content": [reasoning_text(text)]}),
            Item::Message { id, text } => json!({"id": id, "type": "message", "status": status,
                "role": "assistant", "content": [output_text(text)]}),
            Item::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } => json!({"id": id, "type": "function_call", "status": status,
                "call_id": call_id, "name": name, "arguments": arguments}),
        }
    }

    /// The `response` object as it stands.
    fn response(&self) -> Value {
        let (status, incomplete) = self.status();
        let item_status = self.item_status();
        let output: Vec<Value> = self
            .items
            .iter()
            .zip(&self.statuses)
            .map(|(i, s)| match *s {
                "in_progress" => self.item_json(i, item_status),
                closed => self.item_json(i, closed),
            })
            .collect();
        let p = &self.plan;
        let error = self.error.as_ref().map(|e| {
            // The SDK's `ResponseError.code` is a closed list.
            let code = match e.code.as_str() {
                "rate_limit_exceeded" => "rate_limit_exceeded",
                _ => "server_error",
            };
            json!({"code": code, "message": e.message})
        });
        let mut r = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": false,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": p.instructions,
            "max_output_tokens": p.max_output_tokens,
            "metadata": p.metadata,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": p.parallel_tool_calls,
            "previous_response_id": null,
            "reasoning": p.reasoning,
            "store": false,
            "temperature": p.temperature,
            "text": p.text,
            "tool_choice": p.tool_choice,
            "tools": p.tools,
            "top_p": p.top_p,
            "truncation": "disabled",
            "usage": self.usage.map(usage_json),
            "user": p.user,
        });
        if status == "completed" {
            r["completed_at"] = json!(unix_now());
        }
        r
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        if self.quiet {
            return;
        }
        let r = self.response();
        self.emit(out, "response.created", json!({"response": r}));
        let r = self.response();
        self.emit(out, "response.in_progress", json!({"response": r}));
    }

    /// Opens a new output item (closing the open one).
    fn open(&mut self, item: Item, out: &mut Vec<u8>) -> usize {
        self.close(out);
        let index = self.items.len();
        let added = self.item_json(&item, "in_progress");
        let added = match &item {
            // The message is announced empty; its text comes as deltas.
            Item::Message { .. } | Item::Reasoning { .. } => {
                let mut a = added;
                a["content"] = json!([]);
                a
            }
            Item::Call { .. } => {
                let mut a = added;
                a["arguments"] = json!("");
                a
            }
        };
        self.items.push(item);
        self.statuses.push("in_progress");
        self.open = Some(index);
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": added}),
        );
        let part = match &self.items[index] {
            Item::Message { id, .. } => Some((id.clone(), output_text(""))),
            Item::Reasoning { id, .. } => Some((id.clone(), reasoning_text(""))),
            Item::Call { .. } => None,
        };
        if let Some((id, part)) = part {
            self.emit(
                out,
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                    "part": part}),
            );
        }
        index
    }

    /// Closes the open item with its `…done` events.
    fn close(&mut self, out: &mut Vec<u8>) {
        let Some(index) = self.open.take() else {
            return;
        };
        let status = match self.item_status() {
            "in_progress" => "completed",
            s => s,
        };
        self.statuses[index] = status;
        let item = self.items[index].clone();
        match &item {
            Item::Reasoning { id, text } => {
                self.emit(
                    out,
                    "response.reasoning_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                        "text": text}),
                );
                self.emit(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                        "part": reasoning_text(text)}),
                );
            }
            Item::Message { id, text } => {
                self.emit(
                    out,
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                        "text": text, "logprobs": []}),
                );
                self.emit(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                        "part": output_text(text)}),
                );
            }
            Item::Call { id, arguments, .. } => {
                self.emit(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "arguments": arguments}),
                );
            }
        }
        let done = self.item_json(&item, status);
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": done}),
        );
    }

    fn conclude(&mut self, out: &mut Vec<u8>) {
        self.close(out);
        self.ended = true;
        let kind = match self.status().0 {
            "failed" => "response.failed",
            "incomplete" => "response.incomplete",
            _ => "response.completed",
        };
        if !self.quiet {
            let r = self.response();
            self.emit(out, kind, json!({"response": r}));
        }
    }
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn reasoning_text(text: &str) -> Value {
    json!({"type": "reasoning_text", "text": text})
}

fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.input,
        "input_tokens_details": {"cached_tokens": u.cached, "cache_write_tokens": 0},
        "output_tokens": u.output,
        "output_tokens_details": {"reasoning_tokens": u.reasoning},
        "total_tokens": u.input + u.output,
    })
}

impl super::Machine for Machine {
    fn on(&mut self, ev: ChatEvent, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        if let ChatEvent::Start { model } = &ev {
            self.model = model.clone();
        }
        self.start(out);
        match ev {
            ChatEvent::Start { .. } => {}
            ChatEvent::Reasoning(t) => {
                let index = match self.open {
                    Some(i) if matches!(self.items[i], Item::Reasoning { .. }) => i,
                    _ => self.open(
                        Item::Reasoning {
                            id: new_id("rs_"),
                            text: String::new(),
                        },
                        out,
                    ),
                };
                let Item::Reasoning { id, text } = &mut self.items[index] else {
                    unreachable!("a reasoning item is open");
                };
                text.push_str(&t);
                let id = id.clone();
                self.emit(
                    out,
                    "response.reasoning_text.delta",
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                        "delta": t}),
                );
            }
            ChatEvent::Text(t) => {
                let index = match self.open {
                    Some(i) if matches!(self.items[i], Item::Message { .. }) => i,
                    _ => self.open(
                        Item::Message {
                            id: new_id("msg_"),
                            text: String::new(),
                        },
                        out,
                    ),
                };
                let Item::Message { id, text } = &mut self.items[index] else {
                    unreachable!("a message is open");
                };
                text.push_str(&t);
                let id = id.clone();
                self.emit(
                    out,
                    "response.output_text.delta",
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                        "delta": t, "logprobs": []}),
                );
            }
            ChatEvent::ToolStart { index, id, name } => {
                self.open(
                    Item::Call {
                        id: new_id("fc_"),
                        index,
                        call_id: id,
                        name,
                        arguments: String::new(),
                    },
                    out,
                );
            }
            ChatEvent::ToolArgs { index, delta } => {
                let Some(pos) = self
                    .items
                    .iter()
                    .position(|i| matches!(i, Item::Call { index: k, .. } if *k == index))
                else {
                    return; // arguments for a call never opened: nothing to attach them to
                };
                let Item::Call { id, arguments, .. } = &mut self.items[pos] else {
                    unreachable!("a call");
                };
                arguments.push_str(&delta);
                let id = id.clone();
                self.emit(
                    out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": pos, "delta": delta}),
                );
            }
            ChatEvent::Finish { reason, .. } => {
                self.finish = Some(reason);
                self.close(out);
            }
            ChatEvent::Usage(u) => self.usage = Some(u),
            ChatEvent::Error(e) => {
                self.error = Some(e);
                self.conclude(out);
            }
            ChatEvent::Done => {
                if self.finish.is_none() {
                    self.finish = Some("stop".into());
                }
                self.conclude(out);
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
        match &self.error {
            Some(e) => Err(ApiError::new(ErrorCode::UpstreamError, e.message.clone())),
            None => Ok(self.response()),
        }
    }
}

#[cfg(test)]
mod tests;
