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

/// The parts of any `/v1/*` body cortex reads.
#[derive(Debug, Deserialize)]
pub struct RequestHead {
    pub model: String,
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
    pub messages: Option<Vec<MessageHead>>,
    /// Completions.
    #[serde(default)]
    pub prompt: Option<Value>,
    /// Responses (and embeddings, which are not checked).
    #[serde(default)]
    pub input: Option<Value>,
    #[serde(default)]
    pub instructions: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct MessageHead {
    #[serde(default)]
    pub content: Option<Value>,
    #[serde(default)]
    pub tool_calls: Option<Value>,
}

impl RequestHead {
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
pub fn count_prompt(head: &RequestHead, counter: &Counter, cfg: &PrevalidationConfig) -> u64 {
    let mut total = 0u64;
    let mut buf = String::new();
    if let Some(msgs) = &head.messages {
        total += cfg.per_request_tokens;
        for m in msgs {
            total += cfg.per_message_tokens;
            buf.clear();
            if let Some(c) = &m.content {
                content_text(c, &mut buf);
            }
            if let Some(tc) = &m.tool_calls {
                buf.push_str(&tc.to_string());
            }
            total += counter.count(&buf);
        }
    }
    if let Some(p) = &head.prompt {
        match p {
            Value::String(s) => total += counter.count(s),
            Value::Array(items) => {
                for it in items {
                    match it {
                        Value::String(s) => total += counter.count(s),
                        Value::Number(_) => total += 1,
                        Value::Array(ids) => total += ids.len() as u64,
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
                        total += cfg.per_message_tokens;
                        content_text(it, &mut buf);
                    }
                }
                other => content_text(other, &mut buf),
            }
            total += counter.count(&buf);
        }
        if let Some(s) = &head.instructions {
            total += cfg.per_message_tokens + counter.count(s);
        }
    }
    total
}

/// `Err(400 context_length_exceeded)` when the prompt (plus the requested
/// output) cannot fit `context`; `context == 0` means unknown: never refuse.
pub fn check(
    head: &RequestHead,
    context: u64,
    counter: &Counter,
    cfg: &PrevalidationConfig,
) -> Result<(), ApiError> {
    if !cfg.enabled || context == 0 {
        return Ok(());
    }
    let prompt = count_prompt(head, counter, cfg);
    let output = head.requested_output();
    if prompt > context || prompt + output > context {
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

    fn head(v: Value) -> RequestHead {
        serde_json::from_value(v).unwrap()
    }

    const EST: Counter = Counter::Estimate {
        chars_per_token: 4.0,
    };

    #[test]
    fn chat_counts_messages_with_allowance() {
        let cfg = PrevalidationConfig::default();
        let h = head(serde_json::json!({"model": "m", "messages": [
            {"role": "user", "content": "abcdefgh"},
            {"role": "user", "content": [{"type": "text", "text": "abcd"}]}
        ]}));
        // 3 + (4 + 2) + (4 + ceil(5/4)=2)
        assert_eq!(count_prompt(&h, &EST, &cfg), 15);
    }

    #[test]
    fn output_request_counts_against_window() {
        let cfg = PrevalidationConfig::default();
        let h = head(serde_json::json!({"model": "m", "prompt": "abcdefgh", "max_tokens": 10}));
        assert!(check(&h, 12, &EST, &cfg).is_ok());
        let e = check(&h, 11, &EST, &cfg).unwrap_err();
        assert!(e
            .message
            .starts_with("This model's maximum context length is 11 tokens."));
        assert_eq!(e.extras["estimated_prompt_tokens"], 2);
        assert!(check(&h, 0, &EST, &cfg).is_ok());
    }
}
