//! Token log-probabilities in the two OpenAI shapes: chat's
//! `logprobs.content[{token, logprob, bytes, top_logprobs}]` and legacy
//! completions' `{tokens, token_logprobs, top_logprobs, text_offset}`.

use helexa_engine::{Engine, TokenLogprob};
use serde_json::{json, Map, Value};

fn token(engine: &Engine, id: u32) -> (String, Vec<u8>) {
    let bytes = engine.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// OpenAI writes a -inf log-probability as -9999.
fn finite(lp: f32) -> f64 {
    if lp.is_finite() {
        lp as f64
    } else {
        -9999.0
    }
}

/// Chat: the `content` entries of these tokens.
pub fn chat_entries(engine: &Engine, lps: &[TokenLogprob]) -> Vec<Value> {
    lps.iter()
        .map(|lp| {
            let (text, bytes) = token(engine, lp.token);
            let top: Vec<Value> = lp
                .top
                .iter()
                .map(|&(id, l)| {
                    let (t, b) = token(engine, id);
                    json!({"token": t, "logprob": finite(l), "bytes": b})
                })
                .collect();
            json!({"token": text, "logprob": finite(lp.logprob), "bytes": bytes, "top_logprobs": top})
        })
        .collect()
}

/// Chat: a choice's `logprobs` object.
pub fn chat_object(entries: Vec<Value>) -> Value {
    json!({"content": entries, "refusal": null})
}

/// Completions: the `logprobs` object of tokens whose text starts at
/// character `offset` of the choice's text.
pub fn completion_object(engine: &Engine, lps: &[TokenLogprob], mut offset: usize) -> Value {
    let (mut tokens, mut token_lps, mut tops, mut offsets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for lp in lps {
        let (text, _) = token(engine, lp.token);
        offsets.push(offset);
        offset += text.chars().count();
        tokens.push(Value::String(text));
        token_lps.push(json!(finite(lp.logprob)));
        let mut top = Map::new();
        for &(id, l) in &lp.top {
            top.insert(token(engine, id).0, json!(finite(l)));
        }
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets})
}
