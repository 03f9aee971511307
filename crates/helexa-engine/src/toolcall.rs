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
//!
//! A `<tool_call>` block that starts `{"name": "…", "arguments": {` (the
//! shape our prompt and grammars ask for, and Hermes/Qwen's) streams: the
//! call is announced once its name is known (`CallBegin`) and its arguments
//! follow as they are generated (`CallArgs`, whitespace outside strings
//! dropped, so they read as compact JSON), up to `CallEnd`. The answer that
//! is not streamed is assembled from the same events, so both carry the same
//! arguments byte for byte. Arguments cut short (the token limit) end the
//! call where they stop, as OpenAI's do. Other shapes (arguments before the
//! name, arguments as a JSON string, arrays, Mistral, bare JSON) are parsed
//! whole when they end and arrive as one `Call`.

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
    /// A whole call.
    Call(ToolCall),
    /// A call whose arguments follow as `CallArgs` pieces until `CallEnd`.
    CallBegin {
        name: String,
    },
    CallArgs(String),
    CallEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet: the answer may still be a bare JSON call.
    Start,
    /// Plain text; watching for a marker.
    Text,
    /// Inside `<tool_call>`, until `</tool_call>` (or until a streamable head).
    Tag,
    /// Inside `<tool_call>`, streaming a call's arguments object.
    TagArgs(Scan),
    /// After the streamed arguments, until `</tool_call>`.
    TagTail,
    /// After `[TOOL_CALLS]`, or an answer that began with `{` / `[`: held to the end.
    Rest { mistral: bool },
}

/// Where the arguments scanner is inside the JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Scan {
    depth: usize,
    in_str: bool,
    esc: bool,
}

/// What the start of a `<tool_call>` body says.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// Could still become a streamable head.
    Need,
    /// Not `{"name": "…", "arguments"|"parameters": {`: parse it whole.
    No,
    /// The name, and the length up to (not including) the arguments' `{`.
    Yes(String, usize),
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Matches `lit` at `i`: `Ok(end)`, or `Err(Need)` if `b` ends inside it.
fn literal(b: &[u8], i: usize, lit: &str) -> Result<usize, Head> {
    let l = lit.as_bytes();
    let rest = &b[i.min(b.len())..];
    let n = l.len().min(rest.len());
    if rest[..n] != l[..n] {
        return Err(Head::No);
    }
    if n < l.len() {
        return Err(Head::Need);
    }
    Ok(i + l.len())
}

/// The end of the JSON string literal starting at `i` (a `"`).
fn string_end(b: &[u8], i: usize) -> Result<usize, Head> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Ok(j + 1),
            c if c < 0x20 => return Err(Head::No),
            _ => j += 1,
        }
    }
    Err(Head::Need)
}

fn head(text: &str) -> Head {
    let b = text.as_bytes();
    let step = || -> Result<Head, Head> {
        let mut i = skip_ws(b, 0);
        i = literal(b, i, "{")?;
        i = skip_ws(b, i);
        i = literal(b, i, "\"name\"")?;
        i = skip_ws(b, i);
        i = literal(b, i, ":")?;
        i = skip_ws(b, i);
        literal(b, i, "\"")?;
        let end = string_end(b, i)?;
        let name: String = serde_json::from_str(&text[i..end]).map_err(|_| Head::No)?;
        i = skip_ws(b, end);
        i = literal(b, i, ",")?;
        i = skip_ws(b, i);
        i = match literal(b, i, "\"arguments\"") {
            Ok(e) => e,
            Err(Head::Need) => return Err(Head::Need),
            Err(_) => literal(b, i, "\"parameters\"")?,
        };
        i = skip_ws(b, i);
        i = literal(b, i, ":")?;
        i = skip_ws(b, i);
        literal(b, i, "{")?;
        Ok(Head::Yes(name, i))
    };
    match step() {
        Ok(h) | Err(h) => h,
    }
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
                State::Tag => {
                    // Only the text before a closing tag can be the head, so
                    // that where the text was cut never changes the outcome.
                    let close = self.buf.find(CLOSE);
                    match head(&self.buf[..close.unwrap_or(self.buf.len())]) {
                        Head::Yes(name, len) => {
                            self.buf.drain(..len);
                            out.push(ToolEvent::CallBegin { name });
                            self.state = State::TagArgs(Scan::default());
                        }
                        Head::Need | Head::No => match close {
                            Some(i) => {
                                let inner = self.buf[..i].to_string();
                                self.buf.drain(..i + CLOSE.len());
                                out.extend(Self::tagged(&inner, true));
                                self.state = State::Text;
                            }
                            None => return out,
                        },
                    }
                }
                State::TagArgs(mut scan) => {
                    let (args, used, done) = Self::scan_args(&self.buf, &mut scan);
                    self.buf.drain(..used);
                    if !args.is_empty() {
                        out.push(ToolEvent::CallArgs(args));
                    }
                    if !done {
                        self.state = State::TagArgs(scan);
                        return out;
                    }
                    out.push(ToolEvent::CallEnd);
                    self.state = State::TagTail;
                }
                State::TagTail => match self.buf.find(CLOSE) {
                    Some(i) => {
                        let tail = self.buf[..i].to_string();
                        self.buf.drain(..i + CLOSE.len());
                        out.extend(Self::tail(tail));
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
            // Cut short: the call ends with the arguments it has.
            State::TagArgs(_) => out.push(ToolEvent::CallEnd),
            State::TagTail => out.extend(Self::tail(buf)),
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

    /// Scans arguments text from `scan`: the compact text to send, the bytes
    /// consumed, and whether the value has ended (its closing brace, or a
    /// character JSON cannot have there, which is left unconsumed).
    fn scan_args(buf: &str, scan: &mut Scan) -> (String, usize, bool) {
        let mut out = String::new();
        for (i, c) in buf.char_indices() {
            if scan.in_str {
                out.push(c);
                if scan.esc {
                    scan.esc = false;
                } else if c == '\\' {
                    scan.esc = true;
                } else if c == '"' {
                    scan.in_str = false;
                }
                continue;
            }
            match c {
                c if c.is_whitespace() => {}
                '"' => {
                    scan.in_str = true;
                    out.push(c);
                }
                '{' | '[' => {
                    scan.depth += 1;
                    out.push(c);
                }
                '}' | ']' => {
                    out.push(c);
                    scan.depth = scan.depth.saturating_sub(1);
                    if scan.depth == 0 {
                        return (out, i + 1, true);
                    }
                }
                c if c.is_ascii_alphanumeric() || matches!(c, ',' | ':' | '.' | '+' | '-') => {
                    out.push(c)
                }
                _ => return (out, i, true),
            }
        }
        (out, buf.len(), false)
    }

    /// What follows streamed arguments inside the block: the object's
    /// closing brace is expected; anything else is given back as text.
    fn tail(tail: String) -> Vec<ToolEvent> {
        // Further keys after the arguments (`, "id": 3}`) are not an error.
        let t = tail.trim();
        let rest_of_object = serde_json::from_str::<Value>(&format!("{{\"_\":0{t}")).is_ok();
        if t.is_empty() || rest_of_object {
            Vec::new()
        } else {
            vec![ToolEvent::Content(tail)]
        }
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
    let mut open: Option<ToolCall> = None;
    for e in events {
        match e {
            ToolEvent::Content(c) => content.push_str(&c),
            ToolEvent::Call(c) => calls.push(c),
            ToolEvent::CallBegin { name } => {
                calls.extend(open.take());
                open = Some(ToolCall {
                    name,
                    arguments: String::new(),
                });
            }
            ToolEvent::CallArgs(a) => {
                if let Some(c) = open.as_mut() {
                    c.arguments.push_str(&a);
                }
            }
            ToolEvent::CallEnd => calls.extend(open.take()),
        }
    }
    calls.extend(open);
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
    fn tagged_calls_stream_their_arguments() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par is\", \"n\": [1, 2]}}\n</tool_call>";
        let mut p = ToolCallParser::new();
        let mut ev = Vec::new();
        let mut begun_at = None;
        for (i, c) in text.char_indices() {
            let got = p.push(&text[i..i + c.len_utf8()]);
            if begun_at.is_none() && got.iter().any(|e| matches!(e, ToolEvent::CallBegin { .. })) {
                begun_at = Some(i);
            }
            ev.extend(got);
        }
        ev.extend(p.finish());
        // Announced as soon as the arguments open, long before the block ends.
        assert_eq!(begun_at, text.find("{\"city"));
        let pieces = ev
            .iter()
            .filter(|e| matches!(e, ToolEvent::CallArgs(_)))
            .count();
        assert!(pieces > 10, "{ev:?}");
        assert_eq!(ev.last(), Some(&ToolEvent::CallEnd));
        assert_eq!(
            split(ev).1,
            vec![call("get_weather", r#"{"city":"Par is","n":[1,2]}"#)]
        );
    }

    #[test]
    fn streamed_calls_cut_short_or_odd_every_cut() {
        // The token limit hit inside the arguments: the call keeps what it has.
        check_cuts(
            "<tool_call>{\"name\": \"a\", \"parameters\": {\"q\": \"ab",
            "",
            &[call("a", r#"{"q":"ab"#)],
        );
        // Extra keys after the arguments are fine.
        check_cuts(
            "<tool_call>{\"name\": \"a\", \"arguments\": {}, \"id\": 7}</tool_call>ok",
            "ok",
            &[call("a", "{}")],
        );
        // Something JSON cannot have ends the arguments; the rest is text.
        check_cuts(
            "<tool_call>{\"name\": \"a\", \"arguments\": {\"q\": <x>}}</tool_call>",
            "<x>}}",
            &[call("a", r#"{"q":"#)],
        );
        // Escapes and braces inside strings do not end the arguments.
        check_cuts(
            r#"<tool_call>{"name": "a", "arguments": {"s": "x\"}{]\\"}}</tool_call>"#,
            "",
            &[call("a", r#"{"s":"x\"}{]\\"}"#)],
        );
        // Name after the arguments: parsed whole.
        check_cuts(
            "<tool_call>{\"arguments\": {\"q\": 1}, \"name\": \"a\"}</tool_call>",
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
