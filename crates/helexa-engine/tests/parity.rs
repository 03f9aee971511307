//! Parity with llama.cpp on SmolLM2-135M-Instruct (Q4_1 GGUF).
//!
//! The fixtures under `tests/fixtures/` were produced by llama.cpp (through
//! llama-cpp-python) with `scripts/gen-parity-fixtures`; see
//! `tests/fixtures/README.md` for their format. The model comes from
//! `scripts/fetch-model` (into `$HELEXA_MODEL_DIR`, default
//! `~/.cache/helexa/models`).
//!
//! - tokens: `Engine::tokenize` gives llama.cpp's ids for every string.
//! - chats: `Engine::render_chat` renders the GGUF's chat template exactly as
//!   llama-cpp-python's Jinja2 formatter does, and its tokens match.
//! - greedy: greedy generation agrees with llama.cpp token for token up to the
//!   first step where llama.cpp's two best candidates are within 0.5 nats.
//!   `GenEvent::Text` carries text, not ids, so the check is on text: the
//!   generated text must start with llama.cpp's text of its agreed ids (and
//!   `Engine::decode` of those ids must give that text).

use helexa_api::chat::ChatMessage;
use helexa_engine::{
    Engine, EngineConfig, FinishReason, GenEvent, GenerationRequest, Kernels, SamplingParams,
};
use serde_json::Value;
use std::path::PathBuf;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    let dir = match std::env::var_os("HELEXA_MODEL_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            PathBuf::from(home).join(".cache/helexa/models")
        }
    };
    let path = dir.join(MODEL_FILE);
    assert!(
        path.is_file(),
        "parity test model missing: {} — run scripts/fetch-model (it downloads \
         {MODEL_FILE} into $HELEXA_MODEL_DIR, default ~/.cache/helexa/models)",
        path.display()
    );
    path
}

fn load_engine() -> Engine {
    load_engine_with(Kernels::Native)
}

fn load_engine_with(kernels: Kernels) -> Engine {
    let path = model_path();
    let mut cfg = EngineConfig::new(&path);
    cfg.kernels = kernels;
    match Engine::load(cfg) {
        Ok(e) => e,
        Err(e) => panic!("Engine::load({}) failed: {e}", path.display()),
    }
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("bad fixture {}: {e}", path.display()));
    assert_eq!(
        v["model_file"].as_str(),
        Some(MODEL_FILE),
        "fixture {name} was made from another model"
    );
    v
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).expect("id fits u32"))
        .collect()
}

fn cases(v: &Value) -> &Vec<Value> {
    v["cases"].as_array().expect("cases array")
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .expect("messages array")
        .iter()
        .map(|m| {
            ChatMessage::new(
                m["role"].as_str().expect("role"),
                m["content"].as_str().expect("content"),
            )
        })
        .collect()
}

/// Drops a trailing replacement character left by decoding a token prefix
/// that ends inside a multi-byte UTF-8 sequence.
fn complete_utf8_prefix(s: &str) -> &str {
    s.trim_end_matches('\u{FFFD}')
}

#[test]
fn tokenize_matches_llama_cpp() {
    let fx = fixture("tokens.json");
    let engine = load_engine();
    let mut failures = Vec::new();
    for case in cases(&fx) {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        for (field, add_special) in [("ids", false), ("ids_add_special", true)] {
            let want = ids(&case[field]);
            match engine.tokenize(text, add_special) {
                Ok(got) if got == want => {}
                Ok(got) => failures.push(format!(
                    "{name} (add_special_tokens={add_special}) {text:?}\n  llama.cpp: {want:?}\n  helexa:    {got:?}"
                )),
                Err(e) => failures.push(format!("{name} (add_special_tokens={add_special}): error {e}")),
            }
        }
    }
    engine.shutdown();
    assert!(
        failures.is_empty(),
        "{} of {} tokenizations differ from llama.cpp:\n{}",
        failures.len(),
        2 * cases(&fx).len(),
        failures.join("\n")
    );
}

#[test]
fn chat_template_matches_llama_cpp() {
    let fx = fixture("chats.json");
    let engine = load_engine();
    let mut failures = Vec::new();
    for case in cases(&fx) {
        let name = case["name"].as_str().unwrap();
        let msgs = messages(&case["messages"]);
        let want_prompt = case["prompt"].as_str().unwrap();
        let want_ids = ids(&case["ids"]);
        let prompt = match engine.render_chat(&msgs, None, true) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{name}: render_chat error {e}"));
                continue;
            }
        };
        if prompt != want_prompt {
            failures.push(format!(
                "{name}: rendered prompt differs\n  llama.cpp: {want_prompt:?}\n  helexa:    {prompt:?}"
            ));
            continue;
        }
        match engine.tokenize(&prompt, false) {
            Ok(got) if got == want_ids => {}
            Ok(got) => failures.push(format!(
                "{name}: prompt tokens differ\n  llama.cpp: {want_ids:?}\n  helexa:    {got:?}"
            )),
            Err(e) => failures.push(format!("{name}: tokenize error {e}")),
        }
    }
    engine.shutdown();
    assert!(
        failures.is_empty(),
        "chat template parity failures:\n{}",
        failures.join("\n")
    );
}

struct Generated {
    text: String,
    text_tokens: usize,
    reason: FinishReason,
    completion_tokens: usize,
}

fn generate_greedy(
    engine: &Engine,
    prompt: Vec<u32>,
    max_new_tokens: usize,
) -> Result<Generated, String> {
    let req = GenerationRequest {
        prompt,
        params: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        max_new_tokens,
        stop: vec![],
        constraint: None,
        logprobs: None,
    };
    let mut stream = engine.submit(req).map_err(|e| format!("submit: {e}"))?;
    let mut text = String::new();
    let mut text_tokens = 0;
    loop {
        match stream.blocking_next() {
            Some(GenEvent::Prefilled { .. }) => {}
            Some(GenEvent::Text {
                text: t, tokens, ..
            }) => {
                text.push_str(&t);
                text_tokens += tokens;
            }
            Some(GenEvent::Finished {
                reason,
                completion_tokens,
                ..
            }) => {
                return Ok(Generated {
                    text,
                    text_tokens,
                    reason,
                    completion_tokens,
                })
            }
            Some(GenEvent::Failed { message }) => {
                return Err(format!("generation failed: {message}"))
            }
            None => return Err("event stream ended without Finished".into()),
        }
    }
}

#[test]
fn greedy_generation_matches_llama_cpp() {
    greedy_parity(Kernels::Native);
}

/// The device-generic decoder (what CUDA runs), here on candle's CPU device.
#[test]
fn greedy_generation_on_the_candle_decoder_matches_llama_cpp() {
    greedy_parity(Kernels::Candle);
}

fn greedy_parity(kernels: Kernels) {
    let fx = fixture("greedy.json");
    let max_new_tokens = fx["max_new_tokens"].as_u64().unwrap() as usize;
    let eog = ids(&fx["eog_token_ids"]);

    // The fixture itself must be strong enough to mean something.
    let long_prefixes = cases(&fx)
        .iter()
        .filter(|c| c["agreed_prefix_len"].as_u64().unwrap() >= 16)
        .count();
    assert!(
        long_prefixes >= 3,
        "greedy.json: fewer than 3 cases with an agreed prefix of 16+ tokens"
    );

    let engine = load_engine_with(kernels);
    let mut failures = Vec::new();
    for case in cases(&fx) {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_ids"]);
        let want_ids = ids(&case["ids"]);
        let agreed = case["agreed_prefix_len"].as_u64().unwrap() as usize;
        let ended_with_eog = case["ended_with_eog"].as_bool().unwrap();

        let agreed_ids: Vec<u32> = want_ids[..agreed]
            .iter()
            .copied()
            .filter(|t| !eog.contains(t))
            .collect();
        // llama.cpp's own text of the agreed ids.
        let want_prefix = case["agreed_text"].as_str().unwrap();
        match engine.decode(&agreed_ids) {
            Ok(s) if complete_utf8_prefix(&s) == want_prefix => {}
            Ok(s) => failures.push(format!(
                "{name}: decode of llama.cpp's ids differs\n  llama.cpp: {want_prefix:?}\n  helexa:    {s:?}"
            )),
            Err(e) => failures.push(format!("{name}: decode error {e}")),
        }

        let got = match generate_greedy(&engine, prompt, max_new_tokens) {
            Ok(g) => g,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        eprintln!(
            "{name}: llama.cpp agreed prefix {agreed} tokens; helexa {} tokens, {:?}: {:?}",
            got.completion_tokens, got.reason, got.text
        );
        if !got.text.starts_with(want_prefix) {
            failures.push(format!(
                "{name}: greedy output diverges within llama.cpp's confident prefix ({agreed} tokens)\n  \
                 llama.cpp: {want_prefix:?}\n  helexa:    {:?}",
                got.text
            ));
            continue;
        }
        if got.text_tokens < agreed_ids.len() || got.completion_tokens < agreed_ids.len() {
            failures.push(format!(
                "{name}: text covers {} tokens, completion_tokens {}, expected at least {}",
                got.text_tokens,
                got.completion_tokens,
                agreed_ids.len()
            ));
        }
        // No near-tie anywhere: the whole generation, and how it ended, must match.
        if agreed == want_ids.len() {
            let want_reason = if ended_with_eog {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            if got.text != want_prefix || got.reason != want_reason {
                failures.push(format!(
                    "{name}: llama.cpp had no near-tie; expected exactly {want_prefix:?} ending {:?}, \
                     got {:?} ending {:?}",
                    want_reason, got.text, got.reason
                ));
            }
        }
    }
    engine.shutdown();
    assert!(
        failures.is_empty(),
        "greedy parity failures:\n{}",
        failures.join("\n\n")
    );
}
