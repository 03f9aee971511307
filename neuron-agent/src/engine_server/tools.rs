//! Tool calling on the engine: checks `tools` / `tool_choice` /
//! `parallel_tool_calls`, puts the tools in the prompt, builds the grammar
//! that makes `required` and named choices always produce a parseable call,
//! and turns parsed calls into OpenAI `tool_calls`.
//!
//! Prompt: a chat template that reads `tools` renders them itself. Otherwise
//! (as llama.cpp does for templates without tool support) a system message
//! describes the functions and asks for `<tool_call>{"name", "arguments"}</tool_call>`
//! blocks, earlier calls are written back into the assistant turns in that
//! form, and `tool` turns become `<tool_response>` user turns, so that any
//! template can render the conversation.

use helexa_api::chat::{ChatMessage, MessageContent};
use helexa_api::ApiError;
use helexa_engine::toolcall::ToolCall;
use helexa_engine::Grammar;
use serde_json::{json, Value};

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// No tools, or `"none"`: plain text, no parsing.
    None,
    /// The model decides; calls are parsed out of its text.
    Auto,
    /// At least one call, forced by a grammar.
    Required,
    /// A call of this function, forced by a grammar.
    Named(String),
}

/// A checked tool setup of one request.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The request's tool objects (for the template).
    pub tools: Vec<Value>,
    pub choice: Choice,
    pub parallel: bool,
}

fn bad(msg: impl Into<String>, param: impl Into<String>) -> ApiError {
    ApiError::invalid_request(msg, param)
}

fn function_name(t: &Value) -> Option<&str> {
    t.pointer("/function/name").and_then(Value::as_str)
}

impl Tools {
    /// Checks the request's tool fields.
    pub fn from_request(
        tools: Option<&[Value]>,
        tool_choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Tools, ApiError> {
        let tools = tools.unwrap_or_default().to_vec();
        for (i, t) in tools.iter().enumerate() {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad(
                    "only tools of `type: \"function\"` are supported",
                    format!("tools[{i}].type"),
                ));
            }
            let name = function_name(t).ok_or_else(|| {
                bad(
                    "each tool needs `function.name`",
                    format!("tools[{i}].function.name"),
                )
            })?;
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(bad(
                    format!("function names must be 1-64 characters of a-z, A-Z, 0-9, _ and -, got {name:?}"),
                    format!("tools[{i}].function.name"),
                ));
            }
            if tools[..i].iter().any(|o| function_name(o) == Some(name)) {
                return Err(bad(
                    format!("two tools are named {name:?}"),
                    format!("tools[{i}].function.name"),
                ));
            }
            match t.pointer("/function/parameters") {
                None | Some(Value::Object(_)) => {}
                Some(_) => {
                    return Err(bad(
                        "`function.parameters` must be a JSON Schema object",
                        format!("tools[{i}].function.parameters"),
                    ))
                }
            }
        }
        let choice = match tool_choice {
            None | Some(Value::Null) => {
                if tools.is_empty() {
                    Choice::None
                } else {
                    Choice::Auto
                }
            }
            Some(Value::String(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(bad(
                        format!("`tool_choice` must be `none`, `auto`, `required` or a function, got {other:?}"),
                        "tool_choice",
                    ))
                }
            },
            Some(v @ Value::Object(_)) => {
                let name = (v.get("type").and_then(Value::as_str) == Some("function"))
                    .then(|| function_name(v))
                    .flatten()
                    .ok_or_else(|| {
                        bad(
                            "`tool_choice` must be {\"type\": \"function\", \"function\": {\"name\": …}}",
                            "tool_choice",
                        )
                    })?;
                Choice::Named(name.to_string())
            }
            Some(_) => return Err(bad("`tool_choice` must be a string or an object", "tool_choice")),
        };
        match &choice {
            Choice::Auto | Choice::Required if tools.is_empty() => {
                return Err(bad("`tool_choice` needs `tools`", "tool_choice"))
            }
            Choice::Named(name) if !tools.iter().any(|t| function_name(t) == Some(name)) => {
                return Err(bad(
                    format!("`tool_choice` names {name:?}, which is not in `tools`"),
                    "tool_choice",
                ))
            }
            _ => {}
        }
        Ok(Tools {
            tools,
            choice,
            parallel: parallel.unwrap_or(true),
        })
    }

    /// Whether the output is parsed for calls.
    pub fn active(&self) -> bool {
        self.choice != Choice::None
    }

    /// The functions the model may call now.
    fn callable(&self) -> Vec<&Value> {
        match &self.choice {
            Choice::Named(n) => self
                .tools
                .iter()
                .filter(|t| function_name(t) == Some(n))
                .collect(),
            Choice::None => Vec::new(),
            _ => self.tools.iter().collect(),
        }
    }

    /// `required` / named: the grammar of the answer. With `tagged`, the call
    /// is written as a `<tool_call>` block (the form our prompt and Hermes /
    /// Qwen templates ask for), else as bare JSON (Llama 3 style). Several
    /// calls only for `required` with `parallel_tool_calls`.
    pub fn grammar(&self, tagged: bool) -> Option<Grammar> {
        if !matches!(self.choice, Choice::Required | Choice::Named(_)) {
            return None;
        }
        let calls: Vec<Value> = self
            .callable()
            .into_iter()
            .map(|t| {
                let params = t
                    .pointer("/function/parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object"}));
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": function_name(t)},
                        "arguments": params,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let one = if calls.len() == 1 {
            calls.into_iter().next().expect("one")
        } else {
            json!({"anyOf": calls})
        };
        let many = self.parallel && self.choice == Choice::Required;
        let opts =
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        let mut schema = one;
        schema["x-guidance"] = opts;
        if tagged {
            let call = format!("call: %json {schema}");
            let start = if many {
                r#"start: block ("\n" block)*"#
            } else {
                "start: block"
            };
            Some(Grammar::Lark(format!(
                "{start}\nblock: \"<tool_call>\\n\" call \"\\n</tool_call>\"\n{call}\n"
            )))
        } else if many {
            let mut arr = json!({"type": "array", "items": schema, "minItems": 1});
            arr["x-guidance"] = schema["x-guidance"].clone();
            Some(Grammar::JsonSchema(arr))
        } else {
            Some(Grammar::JsonSchema(schema))
        }
    }

    /// The system text that describes the tools to a template without tool
    /// support.
    pub fn system_prompt(&self) -> String {
        let mut s =
            String::from("You can call functions. These are the available functions, as JSON:\n");
        for t in self.callable() {
            s.push_str(&t.get("function").unwrap_or(t).to_string());
            s.push('\n');
        }
        s.push_str(
            "\nTo call a function, answer with a block of this form:\n<tool_call>\n{\"name\": \"<function name>\", \"arguments\": {<the arguments as JSON>}}\n</tool_call>\n",
        );
        match &self.choice {
            Choice::Required => s.push_str("You must call at least one function.\n"),
            Choice::Named(n) => s.push_str(&format!("You must call the function `{n}`.\n")),
            _ => s.push_str("If no function is needed, answer normally.\n"),
        }
        if self.parallel && !matches!(self.choice, Choice::Named(_)) {
            s.push_str("You may call several functions, one block each.");
        } else {
            s.push_str("Call at most one function.");
        }
        s
    }
}

/// The messages as a template without tool support can render them: the
/// tool description merged into (or placed before) the first system turn,
/// assistant calls written as `<tool_call>` blocks, tool results as
/// `<tool_response>` user turns (consecutive results in one turn).
pub fn generic_messages(messages: &[ChatMessage], tools: Option<&Tools>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if let Some(t) = tools.filter(|t| t.active()) {
        let prompt = t.system_prompt();
        match messages.first() {
            Some(m) if m.role == "system" || m.role == "developer" => {
                let text = format!("{}\n\n{prompt}", m.text());
                let mut first = m.clone();
                first.content = Some(MessageContent::Text(text));
                out.push(first);
            }
            _ => out.push(ChatMessage::new("system", &prompt)),
        }
    }
    let skip = usize::from(
        !out.is_empty()
            && matches!(messages.first(), Some(m) if m.role == "system" || m.role == "developer"),
    );
    for m in &messages[skip..] {
        match m.role.as_str() {
            "assistant" if m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) => {
                let mut text = m.text();
                for c in m.tool_calls.as_deref().unwrap_or_default() {
                    let name = c.pointer("/function/name").cloned().unwrap_or(Value::Null);
                    let args = c
                        .pointer("/function/arguments")
                        .map(|a| match a.as_str() {
                            Some(s) => serde_json::from_str(s).unwrap_or_else(|_| a.clone()),
                            None => a.clone(),
                        })
                        .unwrap_or_else(|| json!({}));
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!(
                        "<tool_call>\n{{\"name\": {name}, \"arguments\": {args}}}\n</tool_call>"
                    ));
                }
                let mut a = ChatMessage::new("assistant", &text);
                a.name = m.name.clone();
                out.push(a);
            }
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.text());
                match out.last_mut() {
                    Some(prev)
                        if prev.role == "user" && prev.text().ends_with("</tool_response>") =>
                    {
                        let text = format!("{}\n{block}", prev.text());
                        prev.content = Some(MessageContent::Text(text));
                    }
                    _ => out.push(ChatMessage::new("user", &block)),
                }
            }
            _ => out.push(m.clone()),
        }
    }
    out
}

/// An OpenAI `tool_calls` entry for a parsed call.
pub fn call_json(call: &ToolCall, id: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
}

/// A fresh call id.
pub fn call_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &u[..24])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    #[test]
    fn choices_and_refusals() {
        let tools = [weather()];
        let t = Tools::from_request(Some(&tools[..]), None, None).unwrap();
        assert_eq!(t.choice, Choice::Auto);
        assert!(t.parallel);
        assert!(t.grammar(true).is_none());
        let t = Tools::from_request(None, None, None).unwrap();
        assert_eq!(t.choice, Choice::None);
        let t =
            Tools::from_request(Some(&tools[..]), Some(&json!("required")), Some(false)).unwrap();
        assert!(matches!(t.grammar(false), Some(Grammar::JsonSchema(_))));
        assert!(matches!(t.grammar(true), Some(Grammar::Lark(_))));
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = Tools::from_request(Some(&tools[..]), Some(&named), None).unwrap();
        assert_eq!(t.choice, Choice::Named("get_weather".into()));
        for (tools, choice, param) in [
            (vec![weather()], json!("sometimes"), "tool_choice"),
            (
                vec![weather()],
                json!({"type": "function", "function": {"name": "nope"}}),
                "tool_choice",
            ),
            (vec![], json!("required"), "tool_choice"),
            (
                vec![json!({"type": "retrieval"})],
                json!("auto"),
                "tools[0].type",
            ),
            (
                vec![json!({"type": "function", "function": {}})],
                json!("auto"),
                "tools[0].function.name",
            ),
            (
                vec![json!({"type": "function", "function": {"name": "a b"}})],
                json!("auto"),
                "tools[0].function.name",
            ),
            (
                vec![weather(), weather()],
                json!("auto"),
                "tools[1].function.name",
            ),
            (
                vec![json!({"type": "function", "function": {"name": "f", "parameters": 3}})],
                json!("auto"),
                "tools[0].function.parameters",
            ),
        ] {
            let e = Tools::from_request(Some(&tools[..]), Some(&choice), None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{tools:?} {choice}");
        }
    }

    #[test]
    fn generic_history_renders_calls_and_results() {
        let tools = Tools::from_request(Some(&[weather()][..]), None, None).unwrap();
        let mut call = ChatMessage::new("assistant", "");
        call.content = None;
        call.tool_calls = Some(vec![json!({"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}})]);
        let mut result = ChatMessage::new("tool", "18C");
        result.tool_call_id = Some("call_1".into());
        let msgs = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Weather in Paris?"),
            call,
            result.clone(),
            result,
        ];
        let out = generic_messages(&msgs, Some(&tools));
        assert_eq!(out.len(), 4);
        assert!(out[0]
            .text()
            .starts_with("Be brief.\n\nYou can call functions."));
        assert!(out[0].text().contains("\"get_weather\""));
        assert_eq!(
            out[2].text(),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call>"
        );
        assert_eq!(out[3].role, "user");
        assert_eq!(
            out[3].text(),
            "<tool_response>\n18C\n</tool_response>\n<tool_response>\n18C\n</tool_response>"
        );
    }
}
