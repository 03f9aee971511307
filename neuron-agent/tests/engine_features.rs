//! The engine's OpenAI server in-process on 127.0.0.1:0 with the real default
//! model (SmolLM2-135M-Instruct Q4_1): structured outputs, tool calls,
//! logprobs, `n`, `logit_bias`, and the refusals of what it cannot do.
//! A 135M model writes poor JSON on its own; these tests check that the
//! grammar makes it parse and validate anyway.

use helexa_engine::{Engine, EngineConfig};
use neuron_agent::engine_server::{router, EngineState};
use serde_json::{json, Value};
use std::path::PathBuf;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    let dir = std::env::var_os("HELEXA_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/helexa/models")
        });
    let p = dir.join(MODEL_FILE);
    assert!(
        p.is_file(),
        "test model {} not found: run scripts/fetch-model (or set HELEXA_MODEL_DIR)",
        p.display()
    );
    p
}

struct Server {
    base: String,
    http: reqwest::Client,
    engine: Engine,
}

impl Server {
    async fn start() -> Server {
        let mut cfg = EngineConfig::new(model_path());
        cfg.max_batch = 4;
        cfg.max_context = Some(2048);
        let engine = tokio::task::spawn_blocking(move || Engine::load(cfg))
            .await
            .unwrap()
            .expect("model loads");
        let app = router(EngineState::loaded("smollm2", engine.clone()), 1 << 20);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        Server {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            engine,
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// The `data:` events of a stream, parsed, up to `[DONE]`.
    async fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let text = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut done = false;
        for line in text.lines() {
            if let Some(data) = line.strip_prefix("data: ") {
                if data == "[DONE]" {
                    done = true;
                    break;
                }
                out.push(serde_json::from_str(data).unwrap());
            }
        }
        assert!(done, "stream without [DONE]: {text}");
        out
    }
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "temperature": 0})
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "color": {"enum": ["red", "green", "blue"]}
        },
        "required": ["name", "age", "color"],
        "additionalProperties": false
    })
}

/// Checks a person object against `person_schema` by hand.
fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.len(), 3, "{text}");
    let name = obj["name"].as_str().expect("name is a string");
    assert!((1..=24).contains(&name.chars().count()), "{text}");
    let age = obj["age"].as_i64().expect("age is an integer");
    assert!((0..=150).contains(&age), "{text}");
    assert!(
        ["red", "green", "blue"].contains(&obj["color"].as_str().expect("color is a string")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_parse_and_validate() {
    let s = Server::start().await;
    let format = json!({"type": "json_schema",
        "json_schema": {"name": "person", "schema": person_schema(), "strict": true}});

    // Greedy, whole.
    let mut body = chat("Describe a fictional person.", 120);
    body["response_format"] = format.clone();
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    check_person(text);
    // The grammar ended the answer, not the token cap.
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");

    // Streamed: the same text.
    body["stream"] = json!(true);
    let events = s.stream("/v1/chat/completions", &body).await;
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);

    // Sampled, n = 3, each choice on its own grammar state.
    let mut body = chat("Describe a fictional person.", 120);
    body["response_format"] = format;
    body["temperature"] = json!(1.0);
    body["seed"] = json!(11);
    body["n"] = json!(3);
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        check_person(c["message"]["content"].as_str().unwrap());
    }

    // json_object: any object, parsed.
    let mut body = chat("Give me a JSON object about cats.", 80);
    body["response_format"] = json!({"type": "json_object"});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    if v["choices"][0]["finish_reason"] == "stop" {
        let parsed: Value =
            serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
        assert!(parsed.is_object());
    } else {
        // Cut by max_tokens: still a valid prefix of an object.
        assert!(v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with('{'));
    }

    // Unsupported schema features are named in a 400.
    for (schema, word) in [
        (
            json!({"type": "array", "items": {"type": "string"}, "uniqueItems": true}),
            "uniqueItems",
        ),
        (json!({"type": "string", "not": {"const": "x"}}), "not"),
    ] {
        let mut body = chat("x", 5);
        body["response_format"] =
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}});
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 400, "{v}");
        assert_eq!(v["error"]["code"], "invalid_request");
        assert_eq!(v["error"]["param"], "response_format");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(word),
            "{v}"
        );
    }
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30},
                               "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
            "parameters": {"type": "object",
                "properties": {"timezone": {"type": "string", "maxLength": 30}},
                "required": ["timezone"], "additionalProperties": false}}}
    ])
}

fn check_weather_args(args: &str) {
    let a: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{e}: {args:?}"));
    assert!(a["city"].is_string(), "{args}");
    assert!(
        ["celsius", "fahrenheit"].contains(&a["unit"].as_str().unwrap()),
        "{args}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tool_calls_parse_validate_and_stream_identically() {
    let s = Server::start().await;
    let question = "What is the weather in Paris?";
    // The engine says what it can do (the agent's /models and cortex's
    // /v1/models pass it on, `tool_call` true with "tools").
    let info: Value = s
        .http
        .get(format!("{}/info", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let caps = info["capabilities"].as_array().unwrap();
    for c in ["chat", "tools", "structured_outputs"] {
        assert!(caps.iter().any(|x| x == c), "{info}");
    }

    // Named choice: exactly that function, valid arguments.
    let mut body = chat(question, 80);
    body["tools"] = weather_tools();
    body["tool_choice"] = json!({"type": "function", "function": {"name": "get_weather"}});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    assert!(c["message"]["content"].is_null(), "{v}");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args = calls[0]["function"]["arguments"].as_str().unwrap();
    check_weather_args(args);

    // The same streamed: header (id, type, name) first, then arguments that
    // reassemble to exactly the non-streamed string; no markup in content.
    body["stream"] = json!(true);
    let events = s.stream("/v1/chat/completions", &body).await;
    let mut name = None;
    let mut streamed_args = String::new();
    let mut content = String::new();
    let mut finish = None;
    for e in &events {
        let d = &e["choices"][0]["delta"];
        content.push_str(d["content"].as_str().unwrap_or(""));
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(tc["index"], 0);
            if let Some(n) = tc["function"]["name"].as_str() {
                assert!(name.is_none(), "name sent twice");
                assert!(tc["id"].as_str().unwrap().starts_with("call_"));
                assert_eq!(tc["type"], "function");
                name = Some(n.to_string());
            } else {
                assert!(name.is_some(), "arguments before the name");
            }
            streamed_args.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = e["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(name.as_deref(), Some("get_weather"));
    assert_eq!(streamed_args, args);
    assert_eq!(content, "");
    assert_eq!(finish.as_deref(), Some("tool_calls"));

    // `required`, one call: one of the tools, arguments valid for it.
    let mut body = chat("What time is it in Tokyo?", 80);
    body["tools"] = weather_tools();
    body["tool_choice"] = json!("required");
    body["parallel_tool_calls"] = json!(false);
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    let args = calls[0]["function"]["arguments"].as_str().unwrap();
    match calls[0]["function"]["name"].as_str().unwrap() {
        "get_weather" => check_weather_args(args),
        "get_time" => {
            let a: Value = serde_json::from_str(args).unwrap();
            assert!(a["timezone"].is_string(), "{args}");
        }
        other => panic!("unknown function {other}"),
    }

    // A conversation with an earlier call and its result renders and answers.
    let body = json!({"model": "smollm2", "max_tokens": 20, "temperature": 0,
    "tools": weather_tools(),
    "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}
    ]});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 50);

    // Refusals name the field.
    for (patch, param) in [
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": weather_tools(), "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"functions": [{"name": "f"}]}), "functions"),
    ] {
        let mut body = chat(question, 5);
        for (k, val) in patch.as_object().unwrap() {
            body[k] = val.clone();
        }
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 400, "{patch}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_n_logit_bias_and_content_parts() {
    let s = Server::start().await;

    // Chat logprobs: one entry per token, top alternatives sorted, the chosen
    // greedy token is the best alternative, and the tokens spell the text.
    let mut body = chat("Say hello.", 8);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let entries = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!entries.is_empty());
    let mut spelled = Vec::new();
    for e in entries {
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], e["token"], "greedy takes the best");
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        spelled.extend(
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    assert_eq!(String::from_utf8(spelled).unwrap(), text);

    // Completions logprobs: the legacy shape, offsets follow the text.
    let body = json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 5,
        "temperature": 0, "logprobs": 2});
    let (st, v) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), lp["token_logprobs"].as_array().unwrap().len());
    assert_eq!(tokens.len(), lp["text_offset"].as_array().unwrap().len());
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap());

    // logit_bias: -100 bans the greedy token, +100 forces another one.
    let body = json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 1,
        "temperature": 0});
    let (_, plain) = s.post("/v1/completions", &body).await;
    let first = plain["choices"][0]["text"].as_str().unwrap().to_string();
    let ids = s.engine.tokenize(&first, false).unwrap();
    assert_eq!(ids.len(), 1, "{first:?}");
    let mut banned = body.clone();
    banned["logit_bias"] = json!({ids[0].to_string(): -100});
    let (st, v) = s.post("/v1/completions", &banned).await;
    assert_eq!(st, 200, "{v}");
    assert_ne!(v["choices"][0]["text"].as_str().unwrap(), first);
    let forced_id = s.engine.tokenize(" banana", false).unwrap()[0];
    let mut forced = body.clone();
    forced["logit_bias"] = json!({forced_id.to_string(): 100});
    let (_, v) = s.post("/v1/completions", &forced).await;
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap(),
        s.engine.decode(&[forced_id]).unwrap()
    );

    // n = 2 on completions, streamed: both indices, each ends, one [DONE].
    let body = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 6,
        "temperature": 1.0, "seed": 5, "n": 2, "stream": true});
    let events = s.stream("/v1/completions", &body).await;
    let mut ends = [0, 0];
    for e in &events {
        if let Some(c) = e["choices"].as_array().and_then(|c| c.first()) {
            if c["finish_reason"].is_string() {
                ends[c["index"].as_u64().unwrap() as usize] += 1;
            }
        }
    }
    assert_eq!(ends, [1, 1]);

    // Content parts a text-only model cannot read: 400 naming the part.
    for kind in ["image_url", "input_audio", "file"] {
        let body = json!({"model": "smollm2", "messages": [
            {"role": "system", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": kind, kind: {}}]}]});
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 400, "{v}");
        assert_eq!(v["error"]["param"], "messages[1].content[1]", "{v}");
    }

    // Range edges through HTTP: accepted at the edge, refused just outside.
    for (field, ok, bad) in [
        ("top_logprobs", json!(20), json!(21)),
        ("n", json!(16), json!(17)),
        ("presence_penalty", json!(-2.0), json!(-2.01)),
        ("frequency_penalty", json!(2.0), json!(2.01)),
    ] {
        let mut body = chat("hi", 1);
        body["logprobs"] = json!(true);
        body[field] = ok.clone();
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 200, "{field}={ok}: {v}");
        body[field] = bad.clone();
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 400, "{field}={bad}: {v}");
        assert_eq!(v["error"]["param"], field);
    }
    for (ok, bad) in [(json!(5), json!(6))] {
        let body = json!({"model": "smollm2", "prompt": "a", "max_tokens": 1, "logprobs": ok});
        assert_eq!(s.post("/v1/completions", &body).await.0, 200);
        let body = json!({"model": "smollm2", "prompt": "a", "max_tokens": 1, "logprobs": bad});
        let (st, v) = s.post("/v1/completions", &body).await;
        assert_eq!(st, 400);
        assert_eq!(v["error"]["param"], "logprobs");
    }
    for (bias, status) in [(json!(100), 200), (json!(-100), 200), (json!(100.5), 400)] {
        let mut body = chat("hi", 1);
        body["logit_bias"] = json!({"42": bias});
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, status, "{bias}: {v}");
    }
    let mut body = chat("hi", 1);
    body["logit_bias"] = json!({"49152": 1});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "logit_bias");
}

/// A stop string taken from the middle of `text` (whatever the model says,
/// so the test does not depend on the model's wording).
fn stop_from(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 12, "answer too short to cut: {text:?}");
    chars[chars.len() / 2..chars.len() / 2 + 4].iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reason_names_the_matched_stop_string() {
    let s = Server::start().await;
    let decoy = "\u{1}never generated";

    // Chat, whole and streamed.
    let body = chat("Name three colours.", 24);
    let (st, full) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{full}");
    assert_eq!(full["choices"][0]["stop_reason"], Value::Null, "{full}");
    let text = full["choices"][0]["message"]["content"].as_str().unwrap();
    let stop = stop_from(text);
    let mut body = chat("Name three colours.", 24);
    body["stop"] = json!([decoy, stop]);
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_eq!(v["choices"][0]["stop_reason"], stop.as_str(), "{v}");
    let cut = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(cut, &text[..text.find(&stop).unwrap()]);
    body["stream"] = json!(true);
    let events = s.stream("/v1/chat/completions", &body).await;
    let last = events.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop", "{last}");
    assert_eq!(last["choices"][0]["stop_reason"], stop.as_str(), "{last}");
    for e in &events[..events.len() - 1] {
        assert_eq!(e["choices"][0]["stop_reason"], Value::Null, "{e}");
    }

    // Completions, whole and streamed.
    let prompt = "The colours of the rainbow are";
    let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 24, "temperature": 0});
    let (st, full) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{full}");
    assert_eq!(full["choices"][0]["stop_reason"], Value::Null, "{full}");
    let text = full["choices"][0]["text"].as_str().unwrap();
    let stop = stop_from(text);
    let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 24,
                      "temperature": 0, "stop": [stop, decoy]});
    let (st, v) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_eq!(v["choices"][0]["stop_reason"], stop.as_str(), "{v}");
    let mut body = body;
    body["stream"] = json!(true);
    let events = s.stream("/v1/completions", &body).await;
    let last = events.last().unwrap();
    assert_eq!(last["choices"][0]["stop_reason"], stop.as_str(), "{last}");
}
