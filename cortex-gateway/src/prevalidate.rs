//! Edge pre-validation: refuse a prompt that cannot fit the model's window
//! before any neuron sees it (`400 context_length_exceeded`).
//!
//! Reads only the fields it needs from the request (`RequestHead`), which is
//! parsed once; the original bytes are what gets forwarded.

use crate::config::PrevalidationConfig;
use crate::tokens::Counter;
use helexa_api::ApiError;
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;

/// The parts of any `/v1/*` body cortex reads, borrowed from the body
/// where it can be (no allocation for a message's plain text).
#[derive(Debug, Deserialize)]
pub struct RequestHead<'a> {
    #[serde(borrow)]
    pub model: Cow<'a, str>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// Chat.
    #[serde(default)]
    #[serde(borrow)]
    pub messages: Option<Vec<MessageHead<'a>>>,
    /// Completions.
    #[serde(default)]
    pub prompt: Option<Value>,
    /// Responses (and embeddings, which are not checked).
    #[serde(default)]
    pub input: Option<Value>,
    #[serde(default, borrow)]
    pub instructions: Option<Cow<'a, str>>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Tool definitions: the engine renders them into the prompt.
    #[serde(default)]
    pub tools: Option<Value>,
}

/// `stream_options` (chat and completions streams).
#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct MessageHead<'a> {
    #[serde(default, borrow)]
    pub content: Option<Content<'a>>,
    #[serde(default)]
    pub tool_calls: Option<Value>,
}

/// A message's `content`: usually text (borrowed unless it has escapes),
/// else parts or anything else, as a `Value`.
#[derive(Debug)]
pub enum Content<'a> {
    Text(Cow<'a, str>),
    Other(Value),
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Content<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("message content")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Content<'a>, E> {
                Ok(Content::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Content<'a>, E> {
                Ok(Content::Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Content<'a>, E> {
                Ok(Content::Text(Cow::Owned(v)))
            }
            fn visit_unit<E>(self) -> Result<Content<'a>, E> {
                Ok(Content::Other(Value::Null))
            }
            fn visit_none<E>(self) -> Result<Content<'a>, E> {
                Ok(Content::Other(Value::Null))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Content<'a>, E> {
                Ok(Content::Other(Value::from(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Content<'a>, E> {
                Ok(Content::Other(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Content<'a>, E> {
                Ok(Content::Other(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Content<'a>, E> {
                Ok(Content::Other(Value::from(v)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                a: A,
            ) -> Result<Content<'a>, A::Error> {
                Value::deserialize(SeqAccessDeserializer::new(a)).map(Content::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                a: A,
            ) -> Result<Content<'a>, A::Error> {
                Value::deserialize(MapAccessDeserializer::new(a)).map(Content::Other)
            }
        }
        d.deserialize_any(Visit(std::marker::PhantomData))
    }
}

impl RequestHead<'_> {
    pub fn requested_output(&self) -> u64 {
        self.max_completion_tokens
            .or(self.max_tokens)
            .or(self.max_output_tokens)
            .unwrap_or(0)
    }
}

/// Text of a content value: a string, or the `text` of each part.
fn content_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for p in parts {
                match p {
                    Value::String(s) => out.push_str(s),
                    Value::Object(o) => {
                        if let Some(Value::String(t)) = o.get("text") {
                            out.push_str(t);
                            out.push('\n');
                        } else if let Some(c) = o.get("content") {
                            content_text(c, out);
                        }
                    }
                    _ => {}
                }
            }
        }
        Value::Object(o) => {
            if let Some(c) = o.get("content") {
                content_text(c, out);
            } else if let Some(Value::String(t)) = o.get("text") {
                out.push_str(t);
            }
        }
        _ => {}
    }
}

/// Prompt tokens of a request as `counter` counts them.
pub fn count_prompt(head: &RequestHead<'_>, counter: &Counter, cfg: &PrevalidationConfig) -> u64 {
    let mut total = 0u64;
    let mut buf = String::new();
    if let Some(msgs) = &head.messages {
        total = total.saturating_add(cfg.per_request_tokens);
        for m in msgs {
            total = total.saturating_add(cfg.per_message_tokens);
            // Plain text alone is counted where it lies, without a copy.
            if let (Some(Content::Text(t)), None) = (&m.content, &m.tool_calls) {
                total = total.saturating_add(counter.count(t));
                continue;
            }
            buf.clear();
            match &m.content {
                Some(Content::Text(t)) => buf.push_str(t),
                Some(Content::Other(c)) => content_text(c, &mut buf),
                None => {}
            }
            if let Some(tc) = &m.tool_calls {
                buf.push_str(&tc.to_string());
            }
            total = total.saturating_add(counter.count(&buf));
        }
    }
    // Tool definitions are rendered into the prompt (by the template or the
    // engine's generic tool prompt): their JSON text is a fair count.
    if let Some(tools) = head.tools.as_ref().filter(|t| !t.is_null()) {
        total = total.saturating_add(counter.count(&tools.to_string()));
    }
    if let Some(p) = &head.prompt {
        match p {
            Value::String(s) => total = total.saturating_add(counter.count(s)),
            Value::Array(items) => {
                for it in items {
                    match it {
                        Value::String(s) => total = total.saturating_add(counter.count(s)),
                        Value::Number(_) => total = total.saturating_add(1),
                        Value::Array(ids) => total = total.saturating_add(ids.len() as u64),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if head.messages.is_none() {
        if let Some(i) = &head.input {
            buf.clear();
            match i {
                Value::Array(items) => {
                    for it in items {
                        match it {
                            // Embeddings' token ids: one token each.
                            Value::Number(_) => total = total.saturating_add(1),
                            Value::Array(ids) if ids.first().is_some_and(Value::is_number) => {
                                total = total.saturating_add(ids.len() as u64)
                            }
                            _ => {
                                total = total.saturating_add(cfg.per_message_tokens);
                                content_text(it, &mut buf);
                            }
                        }
                    }
                }
                other => content_text(other, &mut buf),
            }
            total = total.saturating_add(counter.count(&buf));
        }
        if let Some(s) = &head.instructions {
            total = total.saturating_add(cfg.per_message_tokens.saturating_add(counter.count(s)));
        }
    }
    total
}

/// `Err(400 context_length_exceeded)` when the prompt (plus the requested
/// output) cannot fit `context`; `context == 0` means unknown: never refuse.
pub fn check(
    head: &RequestHead<'_>,
    context: u64,
    counter: &Counter,
    cfg: &PrevalidationConfig,
) -> Result<(), ApiError> {
    if !cfg.enabled || context == 0 {
        return Ok(());
    }
    decide(
        count_prompt(head, counter, cfg),
        head.requested_output(),
        context,
    )
}

/// Whether `prompt` tokens plus `output` requested fit `context`. The
/// client's numbers never overflow the sum (a `max_tokens` near u64::MAX is
/// simply too many).
pub fn decide(prompt: u64, output: u64, context: u64) -> Result<(), ApiError> {
    if prompt > context || prompt.saturating_add(output) > context {
        let shown_output = if prompt > context { 0 } else { output };
        return Err(ApiError::context_length_exceeded(
            context,
            prompt,
            shown_output,
            "estimated_prompt_tokens",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parsed from text, as cortex does (borrowing where it can).
    fn parse(text: &str) -> RequestHead<'_> {
        serde_json::from_str(text).unwrap()
    }

    const EST: Counter = Counter::Estimate {
        chars_per_token: 4.0,
    };

    #[test]
    fn chat_counts_messages_with_allowance() {
        let cfg = PrevalidationConfig::default();
        let h = parse(
            r#"{"model": "m", "messages": [
            {"role": "user", "content": "abcdefgh"},
            {"role": "user", "content": [{"type": "text", "text": "abcd"}]}
        ]}"#,
        );
        // 3 + (4 + 2) + (4 + ceil(5/4)=2)
        assert_eq!(count_prompt(&h, &EST, &cfg), 15);
        assert!(matches!(
            &h.messages.as_ref().unwrap()[0].content,
            Some(Content::Text(Cow::Borrowed("abcdefgh")))
        ));
        // Escaped text (owned once unescaped: 8 characters), and a tool
        // call with no content (its JSON, 12 characters, is counted).
        let h = parse(
            r#"{"model": "m", "messages": [
            {"role": "user", "content": "ab\"cd\"ef"},
            {"role": "assistant", "content": null, "tool_calls": [{"id":"x"}]}
        ]}"#,
        );
        // 3 + (4 + 2) + (4 + 3)
        assert_eq!(count_prompt(&h, &EST, &cfg), 16);
    }

    #[test]
    fn tool_definitions_count_toward_the_prompt() {
        let cfg = PrevalidationConfig::default();
        let c = Counter::Estimate {
            chars_per_token: 4.0,
        };
        let plain = parse(r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#);
        let tools = parse(
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "get_weather",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]}"#,
        );
        let extra = count_prompt(&tools, &c, &cfg) - count_prompt(&plain, &c, &cfg);
        assert!(extra >= 20, "{extra}");
    }

    #[test]
    fn embeddings_token_ids_count_one_each() {
        let cfg = PrevalidationConfig::default();
        let ids = parse(r#"{"model": "m", "input": [101, 7592, 102]}"#);
        assert_eq!(count_prompt(&ids, &EST, &cfg), 3);
        let lists = parse(r#"{"model": "m", "input": [[101, 102], [101, 7, 8, 102]]}"#);
        assert_eq!(count_prompt(&lists, &EST, &cfg), 6);
        // Texts: an allowance per input plus the text (8 characters = 2).
        let texts = parse(r#"{"model": "m", "input": ["abcd", "efgh"]}"#);
        assert_eq!(
            count_prompt(&texts, &EST, &cfg),
            2 * cfg.per_message_tokens + 2
        );
    }

    #[test]
    fn output_request_counts_against_window() {
        let cfg = PrevalidationConfig::default();
        let h = parse(r#"{"model": "m", "prompt": "abcdefgh", "max_tokens": 10}"#);
        assert!(check(&h, 12, &EST, &cfg).is_ok());
        let e = check(&h, 11, &EST, &cfg).unwrap_err();
        assert!(e
            .message
            .starts_with("This model's maximum context length is 11 tokens."));
        assert_eq!(e.extras["estimated_prompt_tokens"], 2);
        assert!(check(&h, 0, &EST, &cfg).is_ok());
    }
}
