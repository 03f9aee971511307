//! Tool calls in generated text: an incremental parser that splits a
//! model's output into plain content and function calls, whichever of the
//! common formats the model writes:
//!
//! - Hermes / Qwen / our generic prompt: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`
//!   blocks anywhere in the text;
//! - Mistral: `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`;
//! - Llama 3 JSON and grammar-constrained output: the whole answer is one
//!   JSON object `{"name": …, "parameters"|"arguments": {…}}` or an array of them.
//!
//! The parser holds back only what could still become a marker, so text fed
//! in pieces cut anywhere yields the same content and the same calls as the
//! whole text at once (tested for every cut). Anything that looks like a
//! call but does not parse is given back as content, never dropped.

use serde_json::Value;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const MISTRAL: &str = "[TOOL_CALLS]";

/// One parsed call: the function's name and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// What the parser found in the text so far, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    Content(String),
    Call(ToolCall),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet: the answer may still be a bare JSON call.
    Start,
    /// Plain text; watching for a marker.
    Text,
    /// Inside `<tool_call>`, until `</tool_call>`.
    Tag,
    /// After `[TOOL_CALLS]`, or an answer that began with `{` / `[`: held to the end.
    Rest { mistral: bool },
}

/// The incremental parser of one choice.
#[derive(Debug)]
pub struct ToolCallParser {
    state: State,
    buf: String,
}

impl Default for ToolCallParser {
    fn default() -> Self {
        ToolCallParser::new()
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of a marker.
fn partial_marker(s: &str) -> usize {
    let mut best = 0;
    for m in [OPEN, MISTRAL] {
        for k in (1..m.len()).rev() {
            if k <= s.len() && s.is_char_boundary(s.len() - k) && s.ends_with(&m[..k]) {
                best = best.max(k);
                break;
            }
        }
    }
    best
}

/// `{"name", "arguments"|"parameters"}` → a call.
fn call_from(v: &Value) -> Option<ToolCall> {
    let obj = v.as_object()?;
    let name = obj.get("name")?.as_str()?.to_string();
    let args = obj
        .get("arguments")
        .or_else(|| obj.get("parameters"))
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    let arguments = match args {
        // Some models write the arguments as a JSON string already.
        Value::String(s) if serde_json::from_str::<Value>(&s).is_ok() => s,
        other => serde_json::to_string(&other).ok()?,
    };
    Some(ToolCall { name, arguments })
}

/// One call, or an array of calls; `None` unless every element is a call.
fn calls_from(text: &str) -> Option<Vec<ToolCall>> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    match &v {
        Value::Array(items) if !items.is_empty() => items.iter().map(call_from).collect(),
        Value::Object(_) => call_from(&v).map(|c| vec![c]),
        _ => None,
    }
}

impl ToolCallParser {
    pub fn new() -> Self {
        ToolCallParser {
            state: State::Start,
            buf: String::new(),
        }
    }

    /// Feeds generated text; returns what is certain so far.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let t = self.buf.trim_start();
                    if t.is_empty() {
                        return out;
                    }
                    if t.starts_with(MISTRAL) || t.starts_with('{') {
                        // `{`: a bare JSON call (checked at the end).
                        self.state = State::Text;
                        if t.starts_with('{') {
                            self.state = State::Rest { mistral: false };
                        }
                        continue;
                    }
                    if t.starts_with('[') {
                        if MISTRAL.starts_with(t) {
                            return out; // may still become the marker
                        }
                        self.state = State::Rest { mistral: false };
                        continue;
                    }
                    self.state = State::Text;
                }
                State::Text => {
                    let open = self.buf.find(OPEN).map(|i| (i, OPEN));
                    let mistral = self.buf.find(MISTRAL).map(|i| (i, MISTRAL));
                    let first = match (open, mistral) {
                        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
                        (a, b) => a.or(b),
                    };
                    match first {
                        Some((i, marker)) => {
                            if i > 0 {
                                out.push(ToolEvent::Content(self.buf[..i].to_string()));
                            }
                            self.buf.drain(..i + marker.len());
                            self.state = if marker == OPEN {
                                State::Tag
                            } else {
                                State::Rest { mistral: true }
                            };
                        }
                        None => {
                            let keep = partial_marker(&self.buf);
                            let emit = self.buf.len() - keep;
                            if emit > 0 {
                                out.push(ToolEvent::Content(self.buf[..emit].to_string()));
                                self.buf.drain(..emit);
                            }
                            return out;
                        }
                    }
                }
                State::Tag => match self.buf.find(CLOSE) {
                    Some(i) => {
                        let inner = self.buf[..i].to_string();
                        self.buf.drain(..i + CLOSE.len());
                        out.extend(Self::tagged(&inner, true));
                        self.state = State::Text;
                    }
                    None => return out,
                },
                State::Rest { .. } => return out,
            }
        }
    }

    /// Ends the text: whatever was held is resolved.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let buf = std::mem::take(&mut self.buf);
        let state = std::mem::replace(&mut self.state, State::Text);
        let mut out = Vec::new();
        match state {
            State::Start | State::Text => {
                if !buf.is_empty() {
                    out.push(ToolEvent::Content(buf));
                }
            }
            // No closing tag (the model stopped right after the JSON).
            State::Tag => out.extend(Self::tagged(&buf, false)),
            State::Rest { mistral } => match calls_from(&buf) {
                Some(calls) => out.extend(calls.into_iter().map(ToolEvent::Call)),
                None => {
                    let text = if mistral {
                        format!("{MISTRAL}{buf}")
                    } else {
                        buf
                    };
                    if !text.is_empty() {
                        out.push(ToolEvent::Content(text));
                    }
                }
            },
        }
        out
    }

    /// The body of a `<tool_call>` block: calls, or the block back as text.
    fn tagged(inner: &str, closed: bool) -> Vec<ToolEvent> {
        match calls_from(inner) {
            Some(calls) => calls.into_iter().map(ToolEvent::Call).collect(),
            None => vec![ToolEvent::Content(format!(
                "{OPEN}{inner}{}",
                if closed { CLOSE } else { "" }
            ))],
        }
    }
}

/// The whole text at once: its content (pieces joined) and its calls.
pub fn parse_all(text: &str) -> (String, Vec<ToolCall>) {
    let mut p = ToolCallParser::new();
    let mut events = p.push(text);
    events.extend(p.finish());
    split(events)
}

/// Content joined, calls in order.
pub fn split(events: Vec<ToolEvent>) -> (String, Vec<ToolCall>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    for e in events {
        match e {
            ToolEvent::Content(c) => content.push_str(&c),
            ToolEvent::Call(c) => calls.push(c),
        }
    }
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: args.into(),
        }
    }

    /// Every cut into two pieces, and char by char, gives the whole-text result.
    fn check_cuts(text: &str, content: &str, calls: &[ToolCall]) {
        let whole = parse_all(text);
        assert_eq!(whole.0, content, "content of {text:?}");
        assert_eq!(whole.1, calls, "calls of {text:?}");
        let bounds: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &cut in &bounds {
            let mut p = ToolCallParser::new();
            let mut ev = p.push(&text[..cut]);
            ev.extend(p.push(&text[cut..]));
            ev.extend(p.finish());
            assert_eq!(split(ev), whole, "cut at {cut} of {text:?}");
        }
        let mut p = ToolCallParser::new();
        let mut ev = Vec::new();
        for w in bounds.windows(2) {
            ev.extend(p.push(&text[w[0]..w[1]]));
        }
        ev.extend(p.finish());
        assert_eq!(split(ev), whole, "char by char: {text:?}");
    }

    #[test]
    fn hermes_blocks_with_text_around_every_cut() {
        check_cuts(
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>",
            "Let me look.\n",
            &[call("get_weather", r#"{"city":"Zürich"}"#)],
        );
        check_cuts(
            "<tool_call>{\"name\":\"a\",\"arguments\":{}}</tool_call>\n<tool_call>{\"name\":\"b\",\"arguments\":{\"x\":[1,2]}}</tool_call>",
            "\n",
            &[call("a", "{}"), call("b", r#"{"x":[1,2]}"#)],
        );
        // No closing tag at the end: still a call.
        check_cuts(
            "<tool_call>{\"name\":\"a\",\"arguments\":{\"q\":1}}",
            "",
            &[call("a", r#"{"q":1}"#)],
        );
    }

    #[test]
    fn bare_json_llama3_and_arrays_every_cut() {
        check_cuts(
            " {\"name\": \"search\", \"parameters\": {\"q\": \"rust\"}}",
            "",
            &[call("search", r#"{"q":"rust"}"#)],
        );
        check_cuts(
            "[{\"name\":\"a\",\"arguments\":{}},{\"name\":\"b\",\"arguments\":{\"n\":2}}]",
            "",
            &[call("a", "{}"), call("b", r#"{"n":2}"#)],
        );
        // Arguments given as a JSON string are kept as that string.
        check_cuts(
            r#"{"name":"a","arguments":"{\"k\": 1}"}"#,
            "",
            &[call("a", r#"{"k": 1}"#)],
        );
    }

    #[test]
    fn mistral_every_cut() {
        check_cuts(
            "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": true}}]",
            "",
            &[call("f", r#"{"a":true}"#)],
        );
        check_cuts(
            "Sure. [TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}]",
            "Sure. ",
            &[call("f", "{}")],
        );
    }

    #[test]
    fn text_that_only_resembles_a_call_is_content_every_cut() {
        for text in [
            "Plain answer, no tools.",
            "a < b and <tool and [TOOL but not a call",
            "{\"not\": \"a call\"}",
            "[1, 2, 3]",
            "[TOOL",
            "<tool_call>not json</tool_call> after",
            "<tool_call>{\"name\": 3}",
            "ends with <tool_ca",
            "   ",
            "",
        ] {
            check_cuts(text, text, &[]);
        }
    }
}
