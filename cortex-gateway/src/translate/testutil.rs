//! Helpers for the translation tests: chat answers (streamed and whole)
//! built from one description, a synchronous run of a machine over stream
//! pieces, and normalising away ids and clocks.

use super::chat::ChatReader;
use super::{Machine, Plan};
use serde_json::{json, Value};

/// A chat answer: reasoning pieces (`reasoning_content`, before the text),
/// text pieces, tool calls `(name, arguments pieces)`, the finish reason and
/// the usage (reasoning pieces count as one reasoning token each).
pub struct Answer<'a> {
    pub reasoning: &'a [&'a str],
    pub text: &'a [&'a str],
    pub calls: &'a [(&'a str, &'a [&'a str])],
    pub finish: &'a str,
    pub usage: (u64, u64),
}

impl Answer<'_> {
    /// The chat SSE stream, as an engine sends it.
    pub fn stream(&self) -> String {
        let chunk = |delta: Value, finish: Value| {
            format!(
                "data: {}\n\n",
                json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m1",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            )
        };
        let mut s = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
        for t in self.reasoning {
            s += &chunk(json!({"reasoning_content": t}), Value::Null);
        }
        for t in self.text {
            s += &chunk(json!({"content": t}), Value::Null);
        }
        for (i, (name, pieces)) in self.calls.iter().enumerate() {
            s += &chunk(
                json!({"tool_calls": [{"index": i, "id": format!("call_{i}"), "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                Value::Null,
            );
            for p in *pieces {
                s += &chunk(
                    json!({"tool_calls": [{"index": i, "function": {"arguments": p}}]}),
                    Value::Null,
                );
            }
        }
        s += &chunk(json!({}), json!(self.finish));
        s += &format!(
            "data: {}\n\n",
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m1",
                "choices": [], "usage": self.usage_json()})
        );
        s + "data: [DONE]\n\n"
    }

    /// The same answer whole.
    pub fn whole(&self) -> Vec<u8> {
        let text: String = self.text.concat();
        let calls: Vec<Value> = self
            .calls
            .iter()
            .enumerate()
            .map(|(i, (name, pieces))| {
                json!({"id": format!("call_{i}"), "type": "function",
                    "function": {"name": name, "arguments": pieces.concat()}})
            })
            .collect();
        let mut message = json!({"role": "assistant", "content": text});
        if !self.reasoning.is_empty() {
            message["reasoning_content"] = json!(self.reasoning.concat());
        }
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        json!({"id": "c1", "object": "chat.completion", "created": 1, "model": "m1",
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish}],
            "usage": self.usage_json()})
        .to_string()
        .into_bytes()
    }

    fn usage_json(&self) -> Value {
        let mut u = json!({"prompt_tokens": self.usage.0, "completion_tokens": self.usage.1,
            "total_tokens": self.usage.0 + self.usage.1});
        if !self.reasoning.is_empty() {
            u["completion_tokens_details"] = json!({"reasoning_tokens": self.reasoning.len()});
        }
        u
    }
}

/// What a client receives when the chat stream arrives in `pieces`.
pub fn run(plan: &Plan, pieces: &[&[u8]]) -> String {
    let mut m = plan.machine();
    let mut r = ChatReader::default();
    let mut out = Vec::new();
    for p in pieces {
        if r.comment_only(p) {
            out.extend_from_slice(p);
            continue;
        }
        let mut evs = Vec::new();
        r.feed(p, &mut evs);
        for e in evs {
            m.on(e, &mut out);
        }
    }
    let mut evs = Vec::new();
    r.finish(&mut evs);
    for e in evs {
        m.on(e, &mut out);
    }
    m.end(&mut out);
    String::from_utf8(out).unwrap()
}

/// The whole object for a whole chat answer.
pub fn whole(plan: &Plan, body: &[u8]) -> Result<Value, helexa_api::ApiError> {
    let mut m: Box<dyn Machine> = plan.whole_machine();
    let mut sink = Vec::new();
    for e in super::chat::whole_events(body)? {
        m.on(e, &mut sink);
    }
    m.object()
}

/// `(event name, data)` of each SSE event in `text`, checking that each
/// has both and that the name repeats the data's `type`.
pub fn events(text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.is_empty()) {
        let mut name = None;
        let mut data = None;
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str::<Value>(d).expect("event data is JSON"));
            }
        }
        let (name, data) = (name.expect("event name"), data.expect("event data"));
        assert_eq!(data["type"], name.as_str(), "event name and type differ");
        out.push((name, data));
    }
    out
}

/// `v` with generated ids (`resp_…`, `msg_…`, `fc_…`, `rs_…`) and clocks made
/// fixed, so two runs compare equal.
pub fn normal(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| {
                    let v = match k.as_str() {
                        "created_at" | "completed_at" => json!(0),
                        _ => normal(v),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normal).collect()),
        Value::String(s) => {
            for prefix in ["resp_", "msg_", "fc_", "rs_"] {
                if let Some(rest) = s.strip_prefix(prefix) {
                    if rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return json!(format!("{prefix}X"));
                    }
                }
            }
            v.clone()
        }
        _ => v.clone(),
    }
}

/// Every way of cutting `s` in two, and in pieces of one byte.
pub fn cuts(s: &str) -> Vec<Vec<&[u8]>> {
    let b = s.as_bytes();
    let mut all: Vec<Vec<&[u8]>> = (0..=b.len()).map(|i| vec![&b[..i], &b[i..]]).collect();
    all.push(b.chunks(1).collect());
    all
}
