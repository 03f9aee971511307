//! `POST /v1/responses` through real HTTP (docs/protocol.md §4.1): served
//! as chat completions by the mock neuron, answered as a Responses object
//! or event stream; fields cortex does not honour refused by name; client
//! keys' `tpm` settled from a translated stream's usage.

mod common;
use common::*;
use cortex_gateway::keys::digest;
use futures_util::StreamExt;
use helexa_testkit::{MockModel, MockNeuron};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// `(event line, data)` of every SSE event of a response.
async fn named_events(resp: reqwest::Response) -> Vec<(String, Value)> {
    let mut text = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(text).unwrap();
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let name = block
            .lines()
            .find_map(|l| l.strip_prefix("event: "))
            .unwrap_or_else(|| panic!("no event line in {block:?}"));
        let data = block
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("no data in {block:?}"));
        out.push((name.to_string(), serde_json::from_str(data).unwrap()));
    }
    out
}

#[tokio::test]
async fn a_text_answer_is_a_response_object() {
    let (a, h) = one_neuron(|c| {
        c.aliases.insert("fast".into(), "m".into());
    })
    .await;
    let r = h
        .client
        .post(h.url("/v1/responses"))
        .header("x-request-id", "rid-1")
        .json(
            &json!({"model": "fast", "instructions": "be brief", "input": "hi",
            "max_output_tokens": 20, "metadata": {"team": "a"}, "user": "u1"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "rid-1");
    assert_eq!(r.headers()["x-helexa-node"], "node-a");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: Value = r.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("resp_"), "{v}");
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["model"], "m");
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(v["output"][0]["content"][0]["text"], "Hello, world!");
    assert_eq!(v["metadata"], json!({"team": "a"}));
    assert_eq!(v["user"], "u1");
    assert_eq!(v["instructions"], "be brief");
    assert_eq!(v["max_output_tokens"], 20);
    assert_eq!(v["usage"]["output_tokens"], 4);
    let input = v["usage"]["input_tokens"].as_u64().unwrap();
    assert!(input > 0);
    assert_eq!(v["usage"]["total_tokens"], input + 4);
    // The neuron was asked for chat completions, alias resolved.
    let rec = a.recorded();
    let sent = &rec.requests[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.headers["x-request-id"], "rid-1");
    assert_eq!(
        sent.json(),
        json!({"model": "m", "stream": false, "max_tokens": 20, "user": "u1",
            "messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "hi"}]})
    );
}

#[tokio::test]
async fn tools_and_structured_output_are_mapped() {
    let (a, h) = one_neuron(|_| {}).await;
    a.set(|b| {
        b.chunks = vec![];
        b.tool_calls = vec![("get_weather".into(), "{\"city\":\"Paris\"}".into())];
    });
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
    let r = h
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": [{"role": "user", "content": "weather?"}],
                "tools": [{"type": "function", "name": "get_weather", "parameters": schema,
                           "strict": true}],
                "tool_choice": "required", "parallel_tool_calls": false,
                "text": {"format": {"type": "json_schema", "name": "w", "schema": schema}}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["output"].as_array().unwrap().len(), 1, "{v}");
    let call = &v["output"][0];
    assert_eq!(call["type"], "function_call");
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["call_id"], "call_mock_0");
    assert_eq!(call["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(call["status"], "completed");
    assert!(call["id"].as_str().unwrap().starts_with("fc_"));
    assert_eq!(v["tool_choice"], "required");
    assert_eq!(v["parallel_tool_calls"], false);
    let sent = a.recorded().requests[0].json();
    assert_eq!(
        sent["tools"],
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": schema,
            "strict": true}}])
    );
    assert_eq!(sent["tool_choice"], "required");
    assert_eq!(sent["parallel_tool_calls"], false);
    assert_eq!(
        sent["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
    );

    // The call's result goes back as a function_call_output item.
    let r = h
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": [
                {"role": "user", "content": "weather?"},
                call,
                {"type": "function_call_output", "call_id": "call_mock_0", "output": "sunny"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let sent = a.recorded().requests[1].json();
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_mock_0",
                "type": "function", "function": {"name": "get_weather",
                "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_mock_0", "content": "sunny"}])
    );
}

#[tokio::test]
async fn a_stream_is_the_response_event_sequence() {
    let (a, h) = one_neuron(|_| {}).await;
    a.set(|b| {
        b.chunks = vec!["Let me ".into(), "check.".into()];
        b.tool_calls = vec![("f".into(), "{\"x\":1}".into())];
    });
    let r = h
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "hi", "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(r.headers()["x-helexa-node"], "node-a");
    let evs = named_events(r).await;
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (name, d)) in evs.iter().enumerate() {
        assert_eq!(d["type"], name.as_str());
        assert_eq!(d["sequence_number"], i as u64);
    }
    let done = &evs.last().unwrap().1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "Let me check.");
    assert_eq!(done["output"][1]["arguments"], "{\"x\":1}");
    assert_eq!(done["usage"]["output_tokens"], 2);
    // Usage was asked of the engine so the answer can carry it.
    let sent = a.recorded().requests[0].json();
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn a_stream_that_dies_ends_with_response_failed() {
    let (a, h) = one_neuron(|_| {}).await;
    a.set(|b| {
        b.die_after_chunks = Some(2);
        b.chunk_delay = Duration::from_millis(30);
    });
    let r = h
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "hi", "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let evs = named_events(r).await;
    let (name, last) = evs.last().unwrap();
    assert_eq!(name, "response.failed", "{evs:?}");
    assert_eq!(last["response"]["status"], "failed");
    assert_eq!(last["response"]["error"]["code"], "server_error");
    assert_eq!(
        evs.iter()
            .filter(|(n, _)| n.starts_with("response.completed"))
            .count(),
        0
    );
}

#[tokio::test]
async fn fields_cortex_does_not_honour_are_refused_by_name() {
    let (a, h) = one_neuron(|_| {}).await;
    for (body, param) in [
        (
            json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"model": "m", "input": "x", "store": true}), "store"),
        (
            json!({"model": "m", "input": "x", "background": true}),
            "background",
        ),
        (
            json!({"model": "m", "input": "x", "conversation": "c"}),
            "conversation",
        ),
        (json!({"model": "m", "input": "x", "seed": 1}), "seed"),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0].type",
        ),
        (json!({"model": "m"}), "input"),
    ] {
        let r = h.post("/v1/responses", &body).await;
        assert_eq!(r.status(), 400, "{body}");
        let e = envelope(r).await;
        assert_eq!(e["code"], "invalid_request", "{body}");
        assert_eq!(e["param"], param, "{body}");
        assert!(e["message"].as_str().unwrap().contains(param), "{e}");
    }
    let r = h.post("/v1/responses", &json!({"input": "x"})).await;
    assert_eq!(envelope(r).await["code"], "missing_model");
    let r = h
        .post("/v1/responses", &json!({"model": "nope", "input": "x"}))
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(envelope(r).await["code"], "model_not_found");
    assert_eq!(a.recorded().v1_count, 0, "nothing reached the neuron");
}

#[tokio::test]
async fn a_prompt_over_the_window_is_refused_before_the_neuron() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 64)]).await;
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    let r = h
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "word ".repeat(2000)}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let e = envelope(r).await;
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(a.recorded().v1_count, 0);
}

#[tokio::test]
async fn a_tpm_key_settles_from_a_translated_stream() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let mut cfg = config(&[("node-a", &a)]);
    cfg.auth.require_keys = true;
    let hex: String = digest(b"sk-t").iter().map(|b| format!("{b:02x}")).collect();
    cfg.keys = vec![cortex_gateway::config::KeyConfig {
        name: "tok".into(),
        key_sha256: Some(hex),
        key_env: None,
        models: Vec::new(),
        rpm: 0,
        tpm: 100_000,
        max_concurrent: 0,
    }];
    let h = start(cfg).await;
    let remaining = || async {
        let r = h
            .client
            .get(h.url("/v1/models"))
            .bearer_auth("sk-t")
            .send()
            .await
            .unwrap();
        r.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
    };
    wait_until("m is listed", 20, || async {
        let r = h
            .client
            .get(h.url("/v1/models"))
            .bearer_auth("sk-t")
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        v["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == "m"))
    })
    .await;
    let r = h
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "hi", "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 401, "a key is required here too");
    let since_before = Instant::now();
    let before = remaining().await;
    let r = h
        .client
        .post(h.url("/v1/responses"))
        .bearer_auth("sk-t")
        .json(&json!({"model": "m", "input": "x".repeat(400), "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-ratelimit-remaining-tokens").is_some());
    let evs = named_events(r).await;
    let usage = &evs.last().unwrap().1["response"]["usage"];
    let used = usage["total_tokens"].as_i64().unwrap();
    // Charged what the answer's usage says, not the admission estimate.
    let sent = a.recorded().requests.last().unwrap().body.len() as i64;
    assert_eq!(used, sent / 4 + 4);
    // The relay settles just after the client reads the last event.
    wait_until("the stream is charged what it used", 10, || async {
        charged(before - remaining().await, used, 100_000, since_before)
    })
    .await;
}

#[tokio::test]
async fn a_request_held_for_a_load_is_translated() {
    let a = MockNeuron::start("a", vec![MockModel::available("m", 0)]).await;
    let h = start(config(&[("node-a", &a)])).await;
    wait_until("m is in the catalogue", 20, || async {
        let v = h.models().await;
        v["data"].as_array().unwrap().iter().any(|m| m["id"] == "m")
    })
    .await;
    let r = h
        .post("/v1/responses", &json!({"model": "m", "input": "hi"}))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["content"][0]["text"], "Hello, world!");
    assert_eq!(a.recorded().loads, vec!["m".to_string()]);
}

#[tokio::test]
async fn reasoning_is_a_reasoning_item_whole_and_streamed() {
    let (a, h) = one_neuron(|_| {}).await;
    a.set(|b| {
        b.reasoning = vec!["Hmm, ".into(), "a greeting.".into()];
        b.chunks = vec!["Hi".into(), "!".into()];
    });
    let body = json!({"model": "m", "input": "hi", "reasoning": {"effort": "high"}});
    let r = h.post("/v1/responses", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let out = &v["output"];
    assert_eq!(out[0]["type"], "reasoning", "{v}");
    assert!(out[0]["id"].as_str().unwrap().starts_with("rs_"), "{v}");
    assert_eq!(
        out[0]["content"],
        json!([{"type": "reasoning_text", "text": "Hmm, a greeting."}])
    );
    assert_eq!(out[0]["summary"], json!([]));
    assert_eq!(out[1]["content"][0]["text"], "Hi!");
    assert_eq!(v["usage"]["output_tokens_details"]["reasoning_tokens"], 2);
    assert_eq!(v["usage"]["output_tokens"], 4);
    assert_eq!(v["reasoning"], json!({"effort": "high"}));
    let sent = a.recorded().requests[0].json();
    assert_eq!(
        sent["chat_template_kwargs"],
        json!({"enable_thinking": true})
    );

    let mut body = json!({"model": "m", "input": "hi", "stream": true,
                          "reasoning": {"effort": "none"}});
    let evs = named_events(h.post("/v1/responses", &body).await).await;
    let deltas: Vec<&str> = evs
        .iter()
        .filter(|(n, _)| n == "response.reasoning_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    // The model reasoned although asked not to: passed on, never dropped.
    assert_eq!(deltas, ["Hmm, ", "a greeting."]);
    let done = &evs.last().unwrap().1["response"];
    assert_eq!(done["output"][0]["type"], "reasoning");
    assert_eq!(
        done["usage"]["output_tokens_details"]["reasoning_tokens"],
        2
    );
    let sent = a.recorded().requests[1].json();
    assert_eq!(
        sent["chat_template_kwargs"],
        json!({"enable_thinking": false})
    );
    body["reasoning"] = json!({"effort": "low", "summary": "concise"});
    let r = h.post("/v1/responses", &body).await;
    assert_eq!(r.status(), 400);
    assert_eq!(envelope(r).await["param"], "reasoning.summary");
}
