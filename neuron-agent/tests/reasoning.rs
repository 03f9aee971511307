//! Reasoning models and generation defaults through the engine's OpenAI
//! server, on tiny random-weight models (helexa_testkit::tiny_model) whose
//! vocabulary has `<think>` / `</think>` and whose template opens the
//! reasoning block in the generation prompt, as DeepSeek-R1 distills do.
//! Random weights write arbitrary words; `logit_bias` steers where a test
//! needs a particular token.

use helexa_engine::{Engine, EngineConfig};
use helexa_testkit::tiny_model::TinyLlama;
use neuron_agent::engine_server::{router, EngineState};
use serde_json::{json, Value};

const THINK: &str = "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% if enable_thinking is defined and not enable_thinking %}<think> </think> {% else %}<think> {% endif %}{% endif %}";
/// Token ids of the reasoning model's markers.
const OPEN_ID: u32 = 5;
const CLOSE_ID: u32 = 6;

fn reasoning_model(generation_config: Option<Value>) -> TinyLlama {
    TinyLlama {
        specials: [
            "<unk>",
            "<s>",
            "</s>",
            "<|im_start|>",
            "<|im_end|>",
            "<think>",
            "</think>",
        ]
        .map(String::from)
        .to_vec(),
        chat_template: THINK.into(),
        generation_config,
    }
}

struct Server {
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(model: TinyLlama) -> Server {
        let dir = tempfile::tempdir().unwrap();
        model.write(dir.path()).unwrap();
        let path = dir.path().to_path_buf();
        let engine = tokio::task::spawn_blocking(move || Engine::load(EngineConfig::new(path)))
            .await
            .unwrap()
            .expect("model loads");
        let app = router(EngineState::loaded("tiny", engine), 1 << 20);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        Server {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    async fn post(&self, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn stream(&self, body: &Value) -> Vec<Value> {
        let mut body = body.clone();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let text = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let events: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .take_while(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert!(text.contains("data: [DONE]"), "{text}");
        events
    }

    async fn info(&self) -> Value {
        self.http
            .get(format!("{}/info", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn models(&self) -> Value {
        self.http
            .get(format!("{}/v1/models", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn ask(max_tokens: u32) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "w10 w11"}],
           "max_tokens": max_tokens, "temperature": 0,
           // No markers and no end of text: the output is exactly `max_tokens` words.
           "logit_bias": {CLOSE_ID.to_string(): -100, OPEN_ID.to_string(): -100,
                          "2": -100, "4": -100}})
}

/// Concatenated `delta.<field>` of a stream's chunks.
fn deltas(events: &[Value], field: &str) -> String {
    events
        .iter()
        .filter_map(|e| e.pointer(&format!("/choices/0/delta/{field}")))
        .filter_map(Value::as_str)
        .collect()
}

#[tokio::test]
async fn a_prompt_that_opens_the_block_makes_the_output_reasoning() {
    let s = Server::start(reasoning_model(None)).await;
    assert_eq!(s.info().await["reasoning"], true);
    let (status, r) = s.post(&ask(6)).await;
    assert_eq!(status, 200, "{r}");
    let msg = &r["choices"][0]["message"];
    let reasoning = msg["reasoning_content"]
        .as_str()
        .expect("reasoning_content");
    assert_eq!(reasoning.split_whitespace().count(), 6, "{r}");
    assert!(msg["content"].as_str().unwrap_or("").is_empty(), "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 6);
    assert_eq!(
        r["usage"]["completion_tokens_details"]["reasoning_tokens"],
        6
    );
    // Streamed: the same reasoning as `delta.reasoning_content`, no content.
    let ev = s.stream(&ask(6)).await;
    assert_eq!(deltas(&ev, "reasoning_content"), reasoning);
    assert_eq!(deltas(&ev, "content"), "");
    let usage = ev.last().unwrap();
    assert_eq!(
        usage["usage"]["completion_tokens_details"]["reasoning_tokens"],
        6
    );
}

#[tokio::test]
async fn chat_template_kwargs_reach_the_template() {
    let s = Server::start(reasoning_model(None)).await;
    let mut body = ask(5);
    body["chat_template_kwargs"] = json!({"enable_thinking": false});
    let (status, r) = s.post(&body).await;
    assert_eq!(status, 200, "{r}");
    let msg = &r["choices"][0]["message"];
    assert!(msg.get("reasoning_content").is_none(), "{r}");
    assert_eq!(
        msg["content"].as_str().unwrap().split_whitespace().count(),
        5,
        "{r}"
    );
    assert_eq!(
        r["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
    let ev = s.stream(&body).await;
    assert_eq!(deltas(&ev, "content"), msg["content"].as_str().unwrap());
    assert_eq!(deltas(&ev, "reasoning_content"), "");

    body["chat_template_kwargs"] = json!(["enable_thinking"]);
    let (status, r) = s.post(&body).await;
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "chat_template_kwargs");
}

#[tokio::test]
async fn a_model_without_markers_has_no_reasoning() {
    let s = Server::start(TinyLlama::default()).await;
    assert_eq!(s.info().await["reasoning"], false);
    let (status, r) = s.post(&ask(4)).await;
    assert_eq!(status, 200, "{r}");
    assert!(r["choices"][0]["message"]
        .get("reasoning_content")
        .is_none());
    assert!(r["usage"].get("completion_tokens_details").is_none(), "{r}");
}

#[tokio::test]
async fn generation_config_supplies_defaults_and_end_tokens() {
    let cfg = json!({"temperature": 0.0, "top_k": 1, "top_p": 0.9, "eos_token_id": [2, 30]});
    let s = Server::start(reasoning_model(Some(cfg))).await;
    let m = s.models().await;
    assert_eq!(
        m["data"][0]["generation_defaults"],
        json!({"temperature": 0.0, "top_k": 1, "top_p": 0.9}),
        "{m}"
    );
    // No temperature in the request: the model's 0 applies, so the answer
    // is the greedy one.
    let mut implicit = ask(8);
    implicit.as_object_mut().unwrap().remove("temperature");
    let (_, a) = s.post(&implicit).await;
    let (_, b) = s.post(&ask(8)).await;
    assert_eq!(
        a["choices"][0]["message"], b["choices"][0]["message"],
        "{a} {b}"
    );
    // Token 30 ends generation here (`eos_token_id`), not on a model
    // without that file.
    let mut forced = ask(8);
    forced["logit_bias"]["30"] = json!(100);
    let (_, r) = s.post(&forced).await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 1, "{r}");
    let plain = Server::start(reasoning_model(None)).await;
    assert_eq!(
        plain.models().await["data"][0]["generation_defaults"],
        json!({})
    );
    let (_, r) = plain.post(&forced).await;
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 8, "{r}");
}
