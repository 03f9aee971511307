//! Chat templates: the model's Jinja template turns OpenAI messages into the
//! prompt text the model was trained on.
//!
//! The template is compiled once (minijinja, with Python string methods from
//! minijinja-contrib and the `trim_blocks`/`lstrip_blocks` settings Hugging Face
//! uses) and rendered for every request; `ChatTemplate` is `Send + Sync`.

use std::cell::RefCell;

use helexa_api::chat::ChatMessage;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::{Map, Value as Json};

use crate::api::EngineError;

const TEMPLATE_NAME: &str = "chat";

/// A plain ChatML template, used when a model ships none.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

thread_local! {
    /// The message of the last `raise_exception` on this thread; rendering is
    /// synchronous, so `render` takes it back on the same thread.
    static RAISED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    uses_tools: bool,
    tool_call_tags: bool,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported here, not at render time.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| {
                EngineError::Template(format!("cannot compile the chat template: {e:#}"))
            })?;
        Ok(ChatTemplate {
            uses_tools: mentions_tools(source),
            tool_call_tags: source.contains("<tool_call>"),
            env,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    /// Whether the template renders the `tools` variable itself (else the
    /// server describes the tools in a system message of its own).
    pub fn uses_tools(&self) -> bool {
        self.uses_tools
    }

    /// Whether the template writes calls as `<tool_call>` blocks (Hermes, Qwen).
    pub fn uses_tool_call_tags(&self) -> bool {
        self.tool_call_tags
    }

    /// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), for models without a template.
    pub fn chatml_default() -> Self {
        ChatTemplate::new(CHATML, None, Some("<|im_end|>".to_string()))
            .expect("the built-in ChatML template compiles")
    }

    /// Renders a conversation. `tools` are passed to the template as given
    /// (OpenAI tool objects); `add_generation_prompt` opens the assistant turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.render_with(messages, tools, add_generation_prompt, None)
    }

    /// `render`, with extra template variables (a request's
    /// `chat_template_kwargs`, e.g. `enable_thinking`); they cannot replace
    /// the variables above.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        kwargs: Option<&Map<String, Json>>,
    ) -> Result<String, EngineError> {
        let msgs: Vec<Json> = messages.iter().map(message_json).collect();
        let fixed = minijinja::context! {
            messages => Value::from_serialize(&msgs),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let ctx = match kwargs {
            Some(k) if !k.is_empty() => {
                minijinja::value::merge_maps([fixed, Value::from_serialize(k)])
            }
            _ => fixed,
        };
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        RAISED.with(|r| r.borrow_mut().take());
        tmpl.render(ctx)
            .map_err(|e| match RAISED.with(|r| r.borrow_mut().take()) {
                Some(msg) => EngineError::Template(msg),
                None => EngineError::Template(format!("cannot render the chat template: {e:#}")),
            })
    }
}

/// One message as the template sees it: `role`, `content` (always a string,
/// text parts joined), and `name`, `tool_calls`, `tool_call_id` when present;
/// unknown fields (e.g. `reasoning_content`) are passed through.
fn message_json(m: &ChatMessage) -> Json {
    let mut obj: Map<String, Json> = m.extra.clone();
    obj.insert("role".into(), Json::String(m.role.clone()));
    obj.insert("content".into(), Json::String(m.text()));
    if let Some(name) = &m.name {
        obj.insert("name".into(), Json::String(name.clone()));
    }
    if let Some(calls) = &m.tool_calls {
        // OpenAI sends `function.arguments` as JSON text; templates (Qwen,
        // Llama 3, Hermes) expect an object they can `tojson` or iterate.
        let calls = calls
            .iter()
            .map(|c| {
                let mut c = c.clone();
                if let Some(args) = c.pointer_mut("/function/arguments") {
                    if let Some(parsed) = args
                        .as_str()
                        .and_then(|s| serde_json::from_str::<Json>(s).ok())
                    {
                        *args = parsed;
                    }
                }
                c
            })
            .collect();
        obj.insert("tool_calls".into(), Json::Array(calls));
    }
    if let Some(id) = &m.tool_call_id {
        obj.insert("tool_call_id".into(), Json::String(id.clone()));
    }
    Json::Object(obj)
}

/// Whether a template reads the `tools` variable: `tools` as a whole word
/// inside a `{{ … }}` or `{% … %}` block.
fn mentions_tools(source: &str) -> bool {
    let mut rest = source;
    while let Some(open) = rest.find(['{']) {
        let after = &rest[open + 1..];
        let close = match after.chars().next() {
            Some('{') => "}}",
            Some('%') => "%}",
            _ => {
                rest = after;
                continue;
            }
        };
        let Some(end) = after.find(close) else { break };
        let block = &after[1..end];
        let word = |c: char| c.is_alphanumeric() || c == '_';
        if block.match_indices("tools").any(|(i, m)| {
            !block[..i].chars().next_back().is_some_and(word)
                && !block[i + m.len()..].chars().next().is_some_and(word)
        }) {
            return true;
        }
        rest = &after[end + close.len()..];
    }
    false
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    RAISED.with(|r| *r.borrow_mut() = Some(msg.clone()));
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(format)`: the current UTC time; supports %Y %y %m %d %e %H %M %S
/// %b %B %a %A %j %%.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(format_unix_time(secs, &format)))
}

fn format_unix_time(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(role: &str, text: &str) -> ChatMessage {
        ChatMessage::new(role, text)
    }

    fn smollm_template() -> ChatTemplate {
        let md = crate::tokenizer::tests::gguf_metadata();
        let src = md["tokenizer.chat_template"].to_string().unwrap().clone();
        ChatTemplate::new(&src, Some("<|im_start|>".into()), Some("<|im_end|>".into())).unwrap()
    }

    #[test]
    fn smollm_template_inserts_default_system_prompt() {
        let t = smollm_template();
        let out = t.render(&[msg("user", "Hi there")], None, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm_template_two_messages() {
        let t = smollm_template();
        let out = t
            .render(
                &[msg("system", "Be brief."), msg("user", "What is 2+2?")],
                None,
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[msg("system", "Be brief."), msg("user", "What is 2+2?")],
                None,
                false,
            )
            .unwrap();
        assert!(out.ends_with("<|im_end|>\n"), "{out}");
    }

    /// Renders every case of tests/fixtures/chats.json (llama-cpp-python's
    /// Jinja2 rendering of the GGUF template) identically.
    #[test]
    fn matches_llama_cpp_chat_fixtures() {
        let path =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chats.json");
        let v: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let t = smollm_template();
        let cases = v["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(case["messages"].clone()).unwrap();
            let add = case["add_generation_prompt"].as_bool().unwrap();
            assert_eq!(
                t.render(&messages, None, add).unwrap(),
                case["prompt"].as_str().unwrap(),
                "case {}",
                case["name"]
            );
        }
    }

    #[test]
    fn chatml_multi_turn() {
        let t = ChatTemplate::chatml_default();
        let out = t
            .render(
                &[
                    msg("system", "S"),
                    msg("user", "U1"),
                    msg("assistant", "A1"),
                    msg("user", "U2"),
                ],
                None,
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n\
             <|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&[msg("user", "U")], None, false).unwrap();
        assert_eq!(out, "<|im_start|>user\nU<|im_end|>\n");
    }

    #[test]
    fn content_parts_are_joined() {
        let t = ChatTemplate::new("{{ messages[0].content }}", None, None).unwrap();
        let m: ChatMessage = serde_json::from_value(json!({
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
        }))
        .unwrap();
        assert_eq!(t.render(&[m], None, false).unwrap(), "a\nb");
    }

    #[test]
    fn tools_and_tool_messages() {
        let src = "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}\
            {% for m in messages %}\
            {% if m.tool_calls %}{{ m.role }} calls {{ m.tool_calls[0].function.name }}\n\
            {% elif m.role == 'tool' %}tool[{{ m.tool_call_id }}]: {{ m.content }}\n\
            {% else %}{{ m.role }}: {{ m.content }}\n{% endif %}\
            {% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let tools = vec![json!({"type": "function", "function": {"name": "get_weather"}})];
        let mut call = msg("assistant", "");
        call.tool_calls = Some(vec![json!({
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}
        })]);
        let mut result = msg("tool", "sunny");
        result.tool_call_id = Some("c1".into());
        let out = t
            .render(
                &[msg("user", "weather?"), call, result],
                Some(&tools),
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "TOOLS:[{\"function\":{\"name\":\"get_weather\"},\"type\":\"function\"}]\n\
             user: weather?\nassistant calls get_weather\ntool[c1]: sunny\n"
        );
        // No tools: `tools` is none, not undefined.
        let t = ChatTemplate::new("{{ tools is none }}", None, None).unwrap();
        assert_eq!(t.render(&[], None, false).unwrap(), "True");
    }

    #[test]
    fn raise_exception_is_a_clear_error() {
        let src = "{% for m in messages %}{% if m.role == 'system' %}\
                   {{ raise_exception('System role not supported') }}{% endif %}{% endfor %}ok";
        let t = ChatTemplate::new(src, None, None).unwrap();
        match t.render(&[msg("system", "x")], None, false) {
            Err(EngineError::Template(m)) => assert_eq!(m, "System role not supported"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(t.render(&[msg("user", "x")], None, false).unwrap(), "ok");
    }

    #[test]
    fn syntax_error_at_compile_time() {
        let err = ChatTemplate::new("{% for %}", None, None).unwrap_err();
        assert!(matches!(err, EngineError::Template(_)), "{err}");
    }

    #[test]
    fn python_methods_special_tokens_and_whitespace_control() {
        let src = "{{ bos_token }}{% for m in messages %}\n  {% if m.content.strip().startswith('x') %}{{ m.content.strip().upper() }}{% endif %}\n{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())).unwrap();
        assert_eq!(
            t.render(&[msg("user", "  xy "), msg("user", "no")], None, false)
                .unwrap(),
            "<s>XY</s>"
        );
    }

    #[test]
    fn strftime() {
        // 2024-07-26 13:25:09 UTC, a Friday.
        let t = 1_722_000_309;
        assert_eq!(
            format_unix_time(t, "%d %b %Y %H:%M:%S %A %j %%"),
            "26 Jul 2024 13:25:09 Friday 208 %"
        );
        let tmpl = ChatTemplate::new("{{ strftime_now('%Y') | length }}", None, None).unwrap();
        assert_eq!(tmpl.render(&[], None, false).unwrap(), "4");
    }

    #[test]
    fn is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }

    #[test]
    fn detects_templates_that_render_tools() {
        assert!(mentions_tools(
            "{% if tools %}{{ tools | tojson }}{% endif %}"
        ));
        assert!(mentions_tools("{%- for t in tools -%}x{%- endfor %}"));
        assert!(!mentions_tools("{{ message['content'] }} tools are nice"));
        assert!(!mentions_tools("{% if has_tools_x %}{% endif %}"));
        assert!(!ChatTemplate::chatml_default().uses_tools());
    }

    /// The official Gemma 2, Gemma 3, Phi-3 and Qwen3 chat templates
    /// (tests/fixtures/templates/*.jinja) render every conversation of
    /// tests/fixtures/templates/expected.json exactly as transformers'
    /// `apply_chat_template` does (scripts/gen-template-fixtures), and fail
    /// where it fails, with the template's message.
    #[test]
    fn official_templates_render_as_transformers_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates");
        let fixture: Json =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for case in cases {
            let name = case["template"].as_str().unwrap();
            seen.insert(name.to_string());
            let what = format!("{name}/{}", case["case"].as_str().unwrap());
            let src = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
            let token = |k: &str| case[k].as_str().map(str::to_string);
            let t = ChatTemplate::new(&src, token("bos_token"), token("eos_token")).unwrap();
            let messages: Vec<ChatMessage> =
                serde_json::from_value(case["messages"].clone()).unwrap();
            let kwargs = case["kwargs"].as_object();
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let out = t.render_with(&messages, None, gen, kwargs);
            match (case.get("expected"), case.get("error")) {
                (Some(e), _) => assert_eq!(out.unwrap(), e.as_str().unwrap(), "{what}"),
                (None, Some(e)) => {
                    let err = out.err().unwrap().to_string();
                    assert!(err.contains(e.as_str().unwrap()), "{what}: {err}");
                }
                _ => panic!("{what}: neither expected nor error"),
            }
        }
        let all: Vec<&str> = seen.iter().map(String::as_str).collect();
        assert_eq!(all, ["gemma2", "gemma3", "phi3", "qwen3"]);
    }
}
