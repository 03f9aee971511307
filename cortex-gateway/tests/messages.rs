//! `POST /v1/messages` (Anthropic Messages) through real HTTP
//! (docs/protocol.md §4.2): served as chat completions by the mock neuron,
//! answered as a Message or Anthropic's event stream, and every error in
//! Anthropic's shape with cortex's statuses and `Retry-After`.

mod common;
use common::*;
use cortex_gateway::keys::digest;
use futures_util::StreamExt;
use helexa_testkit::mock_neuron::Refusal;
use helexa_testkit::{MockModel, MockNeuron};
use serde_json::{json, Value};
use std::time::Duration;

fn ask(text: &str) -> Value {
    json!({"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": text}]})
}

async fn named_events(resp: reqwest::Response) -> Vec<(String, Value)> {
    let mut text = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(text).unwrap();
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let name = block
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or_else(|| panic!("no event line in {block:?}"));
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or_else(|| panic!("no data in {block:?}"));
            (name.to_string(), serde_json::from_str(data).unwrap())
        })
        .collect()
}

/// The `error` of an Anthropic error body, checking the shape.
async fn anthropic_error(r: reqwest::Response) -> Value {
    let v: Value = r.json().await.expect("JSON error body");
    assert_eq!(v["type"], "error", "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    v["error"].clone()
}

#[tokio::test]
async fn a_text_answer_is_a_message() {
    let (a, h) = one_neuron(|_| {}).await;
    let r = h
        .client
        .post(h.url("/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "tools-2024-04-04")
        .json(
            &json!({"model": "m", "max_tokens": 64, "system": "be brief",
            "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["END"],
            "top_k": 5, "metadata": {"user_id": "u1"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-helexa-node"], "node-a");
    let v: Value = r.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("msg_"), "{v}");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "m");
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "Hello, world!"}])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["stop_sequence"], Value::Null);
    assert_eq!(v["usage"]["output_tokens"], 4);
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 0);
    let sent = &a.recorded().requests[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(
        sent.json(),
        json!({"model": "m", "max_tokens": 64, "stream": false, "stop": ["END"], "top_k": 5,
            "user": "u1", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "hi"}]})
    );
}

#[tokio::test]
async fn tool_use_round_trips() {
    let (a, h) = one_neuron(|_| {}).await;
    a.set(|b| {
        b.chunks = vec!["Checking.".into()];
        b.tool_calls = vec![("get_weather".into(), "{\"city\":\"Paris\"}".into())];
    });
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
    let r = h
        .post(
            "/v1/messages",
            &json!({"model": "m", "max_tokens": 64,
                "messages": [{"role": "user", "content": "weather?"}],
                "tools": [{"name": "get_weather", "description": "weather", "input_schema": schema}],
                "tool_choice": {"type": "tool", "name": "get_weather"}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "Checking."},
               {"type": "tool_use", "id": "call_mock_0", "name": "get_weather",
                "input": {"city": "Paris"}}])
    );
    assert_eq!(v["stop_reason"], "tool_use");
    let sent = a.recorded().requests[0].json();
    assert_eq!(
        sent["tools"],
        json!([{"type": "function", "function": {"name": "get_weather",
            "description": "weather", "parameters": schema}}])
    );
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );

    // The result goes back as a tool_result block.
    let r = h
        .post(
            "/v1/messages",
            &json!({"model": "m", "max_tokens": 64, "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": v["content"]},
                {"role": "user", "content": [{"type": "tool_result",
                    "tool_use_id": "call_mock_0", "content": "sunny"}]}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let sent = a.recorded().requests[1].json();
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "call_mock_0",
                "type": "function", "function": {"name": "get_weather",
                "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_mock_0", "content": "sunny"}])
    );
}

#[tokio::test]
async fn a_stream_is_anthropic_s_event_sequence() {
    let (a, h) = one_neuron(|_| {}).await;
    a.set(|b| {
        b.chunks = vec!["Hel".into(), "lo".into()];
        b.tool_calls = vec![("f".into(), "{\"x\":1}".into())];
    });
    let mut body = ask("hi");
    body["stream"] = json!(true);
    let r = h.post("/v1/messages", &body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let evs = named_events(r).await;
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    for (name, d) in &evs {
        assert_eq!(d["type"], name.as_str());
    }
    assert_eq!(
        evs[3].1["delta"],
        json!({"type": "text_delta", "text": "Hel"})
    );
    assert_eq!(evs[6].1["content_block"]["type"], "tool_use");
    let json: String = evs[7..9]
        .iter()
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert_eq!(json, "{\"x\":1}");
    assert_eq!(evs[10].1["delta"]["stop_reason"], "tool_use");
    assert_eq!(evs[10].1["usage"]["output_tokens"], 2);
    let sent = a.recorded().requests[0].json();
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn a_stream_that_dies_ends_with_an_error_event() {
    let (a, h) = one_neuron(|_| {}).await;
    a.set(|b| {
        b.die_after_chunks = Some(2);
        b.chunk_delay = Duration::from_millis(30);
    });
    let mut body = ask("hi");
    body["stream"] = json!(true);
    let r = h.post("/v1/messages", &body).await;
    assert_eq!(r.status(), 200);
    let evs = named_events(r).await;
    assert_eq!(evs[0].0, "message_start");
    let (name, last) = evs.last().unwrap();
    assert_eq!(name, "error", "{evs:?}");
    assert_eq!(last["error"]["type"], "api_error");
    assert!(!evs.iter().any(|(n, _)| n == "message_stop"));
}

#[tokio::test]
async fn errors_are_in_anthropic_s_shape_with_cortex_s_statuses() {
    let (a, h) = one_neuron(|_| {}).await;
    // Refused at the door, by name.
    let mut body = ask("x");
    body["thinking"] = json!({"type": "enabled", "budget_tokens": 1000});
    let r = h.post("/v1/messages", &body).await;
    assert_eq!(r.status(), 400);
    let e = anthropic_error(r).await;
    assert_eq!(e["type"], "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("thinking"), "{e}");
    let mut body = ask("x");
    body.as_object_mut().unwrap().remove("max_tokens");
    let e = anthropic_error(h.post("/v1/messages", &body).await).await;
    assert!(e["message"].as_str().unwrap().contains("max_tokens"), "{e}");
    // Not JSON.
    let r = h
        .client
        .post(h.url("/v1/messages"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(anthropic_error(r).await["type"], "invalid_request_error");
    // No such model.
    let mut body = ask("x");
    body["model"] = json!("nope");
    let r = h.post("/v1/messages", &body).await;
    assert_eq!(r.status(), 404);
    assert_eq!(anthropic_error(r).await["type"], "not_found_error");
    assert_eq!(a.recorded().v1_count, 0);
    // A neuron that is busy: 503 with Retry-After, overloaded.
    a.set(|b| b.refuse = Some(Refusal::busy(7)));
    let r = h.post("/v1/messages", &ask("x")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "7");
    let e = anthropic_error(r).await;
    assert_eq!(e["type"], "overloaded_error");
    assert_eq!(e["code"], "model_busy");
    // The engine refusing the request (an image for a text-only model):
    // its 400 is passed on, reshaped.
    a.set(|b| {
        b.refuse = Some(Refusal {
            status: 400,
            retry_after: None,
            body: helexa_api::ApiError::invalid_request(
                "content parts of type \"image_url\" cannot be read by this text-only model",
                "messages[0].content[0]",
            )
            .to_json(),
        })
    });
    let r = h
        .post(
            "/v1/messages",
            &json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}]}]}),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("retry-after").is_none());
    let e = anthropic_error(r).await;
    assert_eq!(e["type"], "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("text-only"), "{e}");
    let sent = a.recorded().requests.last().unwrap().json();
    assert_eq!(
        sent["messages"][0]["content"][0],
        json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}})
    );
}

#[tokio::test]
async fn an_over_long_prompt_is_context_length_exceeded() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 64)]).await;
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    let r = h.post("/v1/messages", &ask(&"word ".repeat(2000))).await;
    assert_eq!(r.status(), 400);
    let e = anthropic_error(r).await;
    assert_eq!(e["type"], "invalid_request_error");
    assert_eq!(e["code"], "context_length_exceeded");
    assert!(e["message"]
        .as_str()
        .unwrap()
        .starts_with("This model's maximum context length is 64 tokens."));
    assert_eq!(a.recorded().v1_count, 0);
}

#[tokio::test]
async fn keys_are_read_from_x_api_key_and_refusals_are_anthropic_errors() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let mut cfg = config(&[("node-a", &a)]);
    cfg.auth.require_keys = true;
    let hex: String = digest(b"sk-ant")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    cfg.keys = vec![cortex_gateway::config::KeyConfig {
        name: "claude".into(),
        key_sha256: Some(hex),
        key_env: None,
        models: vec!["m".into()],
        rpm: 2,
        tpm: 0,
        max_concurrent: 0,
    }];
    let h = start(cfg).await;
    wait_until("m is loaded", 20, || async {
        let r = h
            .client
            .get(h.url("/v1/models"))
            .header("x-api-key", "sk-ant")
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        v["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == "m"))
    })
    .await;
    // No key, a wrong key: 401 authentication_error.
    let r = h.post("/v1/messages", &ask("x")).await;
    assert_eq!(r.status(), 401);
    assert_eq!(anthropic_error(r).await["type"], "authentication_error");
    let send = |key: &'static str, body: Value| {
        let req = h
            .client
            .post(h.url("/v1/messages"))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .json(&body);
        async move { req.send().await.unwrap() }
    };
    let r = send("sk-wrong", ask("x")).await;
    assert_eq!(r.status(), 401);
    assert_eq!(anthropic_error(r).await["type"], "authentication_error");
    // A model the key may not use: 403 permission_error.
    let mut body = ask("x");
    body["model"] = json!("other");
    let r = send("sk-ant", body).await;
    assert_eq!(r.status(), 403);
    assert_eq!(anthropic_error(r).await["type"], "permission_error");
    // The right key works, with the rate headers.
    let r = send("sk-ant", ask("x")).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-ratelimit-remaining-requests").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "message");
    // Over rpm: 429 rate_limit_error with Retry-After.
    let mut last = send("sk-ant", ask("x")).await;
    for _ in 0..3 {
        if last.status() == 429 {
            break;
        }
        last = send("sk-ant", ask("x")).await;
    }
    assert_eq!(last.status(), 429);
    assert!(last.headers().get("retry-after").is_some());
    assert_eq!(anthropic_error(last).await["type"], "rate_limit_error");
}

#[tokio::test]
async fn count_tokens_counts_at_cortex() {
    let (a, h) = one_neuron(|_| {}).await;
    let count = |body: Value| {
        let req = h
            .client
            .post(h.url("/v1/messages/count_tokens"))
            .header("anthropic-version", "2023-06-01")
            .json(&body);
        async move { req.send().await.unwrap() }
    };
    // The mock serves no tokenizer: the estimate, 4 characters a token,
    // plus 3 per request and 4 per message (the prevalidation defaults).
    let r = count(json!({"model": "m", "messages": [{"role": "user", "content": "hello world"}]}))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"input_tokens": 3 + 4 + 3}));
    let r = count(json!({"model": "m", "system": "be brief",
        "messages": [{"role": "user", "content": "hello world"}]}))
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"input_tokens": 3 + 4 + 2 + 4 + 3}));
    // 90 known words: 90 tokens for the tiny tokenizer, 135 by estimate.
    let words = vec!["hello"; 90].join(" ");
    let r = count(json!({"model": "m", "messages": [{"role": "user", "content": words}]})).await;
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"input_tokens": 3 + 4 + 135})
    );
    // With the model's tokenizer the count is exact.
    a.set(|b| b.serve_tokenizer = true);
    let h2 = start(config(&[("node-a", &a)])).await;
    h2.wait_replicas("m", 1).await;
    let r = h2
        .post(
            "/v1/messages/count_tokens",
            &json!({"model": "m", "messages": [{"role": "user", "content": words}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"input_tokens": 3 + 4 + 90})
    );
    // Errors in Anthropic's shape; nothing reached the neuron.
    let r = count(json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(r.status(), 404);
    assert_eq!(anthropic_error(r).await["type"], "not_found_error");
    let r =
        count(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "k": 1})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(anthropic_error(r).await["param"], "k");
    assert_eq!(a.recorded().v1_count, 0);
}

#[tokio::test]
async fn a_stream_held_for_a_load_keeps_alive_then_is_translated() {
    let a = MockNeuron::start("a", vec![MockModel::available("m", 0)]).await;
    a.set(|b| b.load_delay = Duration::from_millis(400));
    let mut cfg = config(&[("node-a", &a)]);
    cfg.loading.keepalive_interval_ms = 50;
    let h = start(cfg).await;
    wait_until("m is in the catalogue", 20, || async {
        let v = h.models().await;
        v["data"].as_array().unwrap().iter().any(|m| m["id"] == "m")
    })
    .await;
    let mut body = ask("hi");
    body["stream"] = json!(true);
    let r = h.post("/v1/messages", &body).await;
    assert_eq!(r.status(), 200);
    let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.starts_with(": keep-alive\n\n"), "{text}");
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"message_start"), "{text}");
    assert_eq!(events.last(), Some(&"message_stop"), "{text}");
    assert!(text.contains("\"text\":\"Hello\""), "{text}");
    assert_eq!(a.recorded().loads, vec!["m".to_string()]);
}

#[tokio::test]
async fn a_matched_stop_string_is_the_stop_sequence() {
    let (a, h) = one_neuron(|_| {}).await;
    // The engine reports which stop string ended the answer (vLLM's
    // `stop_reason`), whole and on the stream's finishing chunk.
    a.set(|b| b.stop_reason = Some("END".into()));
    let mut body = ask("count");
    body["stop_sequences"] = json!(["STOP", "END"]);
    let r = h.post("/v1/messages", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["stop_reason"], "stop_sequence", "{v}");
    assert_eq!(v["stop_sequence"], "END", "{v}");

    body["stream"] = json!(true);
    let evs = named_events(h.post("/v1/messages", &body).await).await;
    let (name, delta) = &evs[evs.len() - 2];
    assert_eq!(name, "message_delta");
    assert_eq!(delta["delta"]["stop_reason"], "stop_sequence", "{delta}");
    assert_eq!(delta["delta"]["stop_sequence"], "END", "{delta}");

    // Without a matched stop string it is an ordinary end of turn.
    a.set(|b| b.stop_reason = None);
    body["stream"] = json!(false);
    let v: Value = h.post("/v1/messages", &body).await.json().await.unwrap();
    assert_eq!(v["stop_reason"], "end_turn", "{v}");
    assert_eq!(v["stop_sequence"], Value::Null, "{v}");
}

#[tokio::test]
async fn reasoning_is_a_thinking_block_whole_and_streamed() {
    let (a, h) = one_neuron(|_| {}).await;
    a.set(|b| {
        b.reasoning = vec!["Hmm, ".into(), "a greeting.".into()];
        b.chunks = vec!["Hi".into()];
    });
    let mut body = ask("hi");
    body["max_tokens"] = json!(4096);
    body["thinking"] = json!({"type": "enabled", "budget_tokens": 2048});
    let r = h.post("/v1/messages", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["content"],
        json!([{"type": "thinking", "thinking": "Hmm, a greeting.", "signature": ""},
               {"type": "text", "text": "Hi"}])
    );
    let sent = a.recorded().requests[0].json();
    assert_eq!(
        sent["chat_template_kwargs"],
        json!({"enable_thinking": true})
    );

    // Thinking not asked for, but the model reasoned: passed on.
    let mut body = ask("hi");
    body["stream"] = json!(true);
    let evs = named_events(h.post("/v1/messages", &body).await).await;
    assert_eq!(
        evs[2].1["content_block"],
        json!({"type": "thinking", "thinking": "", "signature": ""})
    );
    let thought: String = evs
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "thinking_delta")
        .map(|(_, d)| d["delta"]["thinking"].as_str().unwrap())
        .collect();
    assert_eq!(thought, "Hmm, a greeting.");
    assert!(a.recorded().requests[1].json()["chat_template_kwargs"].is_null());

    body["thinking"] = json!({"type": "disabled"});
    h.post("/v1/messages", &body).await;
    assert_eq!(
        a.recorded().requests[2].json()["chat_template_kwargs"],
        json!({"enable_thinking": false})
    );
}
