use super::super::testutil::{cuts, events, normal, run, whole, Answer};
use super::super::{translate as translate_api, Api, Plan as AnyPlan};
use serde_json::{json, Value};

fn chat_of(req: Value) -> Value {
    let (bytes, _) = translate_api(Api::Messages, req.to_string().as_bytes()).expect("translates");
    serde_json::from_slice(&bytes).unwrap()
}

fn refused(req: Value) -> (String, Option<String>) {
    let e = translate_api(Api::Messages, req.to_string().as_bytes()).expect_err("refused");
    (e.code.as_str().to_string(), e.param)
}

fn plan_of(req: Value) -> AnyPlan {
    translate_api(Api::Messages, req.to_string().as_bytes())
        .expect("translates")
        .1
}

#[test]
fn a_full_request_maps_field_by_field() {
    let chat = chat_of(json!({
        "model": "m", "max_tokens": 100,
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "be kind"}],
        "messages": [{"role": "user", "content": "hi"}],
        "stop_sequences": ["END"], "temperature": 0.3, "top_p": 0.8, "top_k": 40,
        "metadata": {"user_id": "u1"}, "stream": true,
        "tools": [{"name": "f", "description": "does f",
                   "input_schema": {"type": "object", "properties": {}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "thinking": {"type": "disabled"},
    }));
    assert_eq!(
        chat,
        json!({
            "model": "m", "max_tokens": 100,
            "messages": [{"role": "system", "content": "be brief\nbe kind"},
                         {"role": "user", "content": "hi"}],
            "stream": true, "stream_options": {"include_usage": true},
            "stop": ["END"], "temperature": 0.3, "top_p": 0.8, "top_k": 40, "user": "u1",
            "tools": [{"type": "function", "function": {"name": "f", "description": "does f",
                "parameters": {"type": "object", "properties": {}}}}],
            "tool_choice": "required", "parallel_tool_calls": false,
            "chat_template_kwargs": {"enable_thinking": false},
        })
    );
    let choice = |tc: Value| {
        chat_of(json!({"model": "m", "max_tokens": 1, "tool_choice": tc,
            "messages": [{"role": "user", "content": "x"}]}))["tool_choice"]
            .clone()
    };
    assert_eq!(choice(json!({"type": "auto"})), "auto");
    assert_eq!(choice(json!({"type": "none"})), "none");
    assert_eq!(
        choice(json!({"type": "tool", "name": "f"})),
        json!({"type": "function", "function": {"name": "f"}})
    );
}

#[test]
fn thinking_maps_to_the_templates_enable_thinking() {
    let kwargs = |t: Value| {
        chat_of(json!({"model": "m", "max_tokens": 4096, "thinking": t,
            "messages": [{"role": "user", "content": "x"}]}))["chat_template_kwargs"]
            .clone()
    };
    assert_eq!(
        kwargs(json!({"type": "enabled", "budget_tokens": 2048, "display": "summarized"})),
        json!({"enable_thinking": true})
    );
    assert_eq!(
        kwargs(json!({"type": "disabled"})),
        json!({"enable_thinking": false})
    );
    // Adaptive: the model decides, as its template does by default.
    assert_eq!(kwargs(json!({"type": "adaptive"})), Value::Null);
    assert_eq!(kwargs(Value::Null), Value::Null);
    // An earlier answer's thinking block is accepted and left out.
    let chat = chat_of(json!({"model": "m", "max_tokens": 10, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": ""},
            {"type": "text", "text": "y"}]},
        {"role": "user", "content": "z"}]}));
    assert_eq!(
        chat["messages"][1],
        json!({"role": "assistant", "content": "y"})
    );
}

#[test]
fn blocks_become_chat_turns() {
    let chat = chat_of(json!({"model": "m", "max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "weather?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "t", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
             "content": [{"type": "text", "text": "no clock"}]},
            {"type": "text", "text": "thanks"}]},
    ]}));
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "weather?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "w", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "toolu_2", "type": "function", "function": {"name": "t", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no clock"},
            {"role": "user", "content": "thanks"},
        ])
    );
    // Tool use alone: no text content.
    let chat = chat_of(json!({"model": "m", "max_tokens": 10, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a"}]}]}));
    assert_eq!(chat["messages"][1]["content"], Value::Null);
    assert_eq!(
        chat["messages"][2],
        json!({"role": "tool", "tool_call_id": "a", "content": ""})
    );
}

#[test]
fn what_is_not_honoured_is_refused_by_name() {
    let base =
        || json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]});
    let with = |k: &str, v: Value| {
        let mut r = base();
        r[k] = v;
        r
    };
    let cases = [
        (
            with(
                "thinking",
                json!({"type": "enabled", "budget_tokens": 1024}),
            ),
            "thinking.budget_tokens",
        ),
        (
            with("thinking", json!({"type": "enabled", "budget_tokens": 10})),
            "thinking.budget_tokens",
        ),
        (
            with("thinking", json!({"type": "between_tools"})),
            "thinking.type",
        ),
        (
            with(
                "thinking",
                json!({"type": "adaptive", "display": "omitted"}),
            ),
            "thinking.display",
        ),
        (
            with("thinking", json!({"type": "disabled", "budget_tokens": 1})),
            "thinking.budget_tokens",
        ),
        (with("service_tier", json!("auto")), "service_tier"),
        (with("max_tokens", json!(0)), "max_tokens"),
        (
            with(
                "tools",
                json!([{"type": "web_search_20250305", "name": "web_search"}]),
            ),
            "tools[0].type",
        ),
        (
            with("tools", json!([{"name": "f"}])),
            "tools[0].input_schema",
        ),
        (
            with("tool_choice", json!({"type": "sometimes"})),
            "tool_choice.type",
        ),
        (
            with("metadata", json!({"user_id": "u", "team": "x"})),
            "metadata.team",
        ),
        (with("stop_sequences", json!([1])), "stop_sequences[0]"),
        (with("top_k", json!(-1)), "top_k"),
        (with("messages", json!([])), "messages"),
        (
            with("messages", json!([{"role": "system", "content": "x"}])),
            "messages[0].role",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "document", "source": {}}]}]),
            ),
            "messages[0].content[0].type",
        ),
        (
            with(
                "messages",
                json!([{"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]}]),
            ),
            "messages[0].content[0].type",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]),
            ),
            "messages[0].content[0].type",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
            "content": [{"type": "image", "source": {}}]}]}]),
            ),
            "messages[0].content[0].content[0].type",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image",
            "source": {"type": "file", "file_id": "f"}}]}]),
            ),
            "messages[0].content[0].source.type",
        ),
        (with("system", json!([{"type": "image"}])), "system[0].type"),
        (
            with(
                "messages",
                json!([{"role": "user", "content": "x"},
            {"role": "assistant", "content": "The answer is"}]),
            ),
            "messages[1].role",
        ),
    ];
    for (req, param) in cases {
        let (code, p) = refused(req.clone());
        assert_eq!(code, "invalid_request", "{req}");
        assert_eq!(p.as_deref(), Some(param), "{req}");
    }
    let mut r = base();
    r.as_object_mut().unwrap().remove("max_tokens");
    assert_eq!(refused(r).1.as_deref(), Some("max_tokens"));
    let mut r = base();
    r.as_object_mut().unwrap().remove("model");
    assert_eq!(refused(r).0, "missing_model");
}

fn plan() -> AnyPlan {
    plan_of(
        json!({"model": "m", "max_tokens": 10, "stop_sequences": ["END"],
        "messages": [{"role": "user", "content": "x"}]}),
    )
}

fn text_answer() -> Answer<'static> {
    Answer {
        reasoning: &[],
        text: &["Hel", "lo", " wörld"],
        calls: &[],
        finish: "stop",
        usage: (7, 3),
    }
}

fn tool_answer() -> Answer<'static> {
    Answer {
        reasoning: &[],
        text: &["Calling."],
        calls: &[
            ("get_weather", &["{\"city\":", "\"Paris\"}"]),
            ("get_time", &["{}"]),
        ],
        finish: "tool_calls",
        usage: (20, 9),
    }
}

fn reasoning_answer() -> Answer<'static> {
    Answer {
        reasoning: &["Let me ", "think."],
        text: &["Hel", "lo"],
        calls: &[("f", &["{}"])],
        finish: "tool_calls",
        usage: (7, 6),
    }
}

#[test]
fn reasoning_streams_as_a_thinking_block_first() {
    let evs = events(&run(&plan(), &[reasoning_answer().stream().as_bytes()]));
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
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(
        evs[2].1,
        json!({"type": "content_block_start", "index": 0,
               "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
    );
    assert_eq!(
        evs[3].1,
        json!({"type": "content_block_delta", "index": 0,
               "delta": {"type": "thinking_delta", "thinking": "Let me "}})
    );
    assert_eq!(evs[6].1["content_block"]["type"], "text");
    assert_eq!(evs[6].1["index"], 1);
    let v = whole(&plan(), &reasoning_answer().whole()).unwrap();
    assert_eq!(
        v["content"][0],
        json!({"type": "thinking", "thinking": "Let me think.", "signature": ""})
    );
    assert_eq!(v["content"][1], json!({"type": "text", "text": "Hello"}));
    assert_eq!(v["content"][2]["type"], "tool_use");
}

#[test]
fn a_text_stream_gives_the_documented_event_sequence() {
    let evs = events(&run(&plan(), &[text_answer().stream().as_bytes()]));
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let start = &evs[0].1["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["model"], "m1");
    assert_eq!(start["content"], json!([]));
    assert_eq!(
        evs[2].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    assert_eq!(
        evs[3].1["delta"],
        json!({"type": "text_delta", "text": "Hel"})
    );
    assert_eq!(
        evs[7].1,
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"input_tokens": 7, "output_tokens": 3}})
    );
}

#[test]
fn tool_calls_stream_as_tool_use_blocks() {
    let evs = events(&run(&plan(), &[tool_answer().stream().as_bytes()]));
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(
        evs[5].1,
        json!({"type": "content_block_start", "index": 1, "content_block":
            {"type": "tool_use", "id": "call_0", "name": "get_weather", "input": {}}})
    );
    assert_eq!(
        evs[6].1["delta"],
        json!({"type": "input_json_delta", "partial_json": "{\"city\":"})
    );
    assert_eq!(evs[12].1["delta"]["stop_reason"], "tool_use");
}

/// A message rebuilt from the events the way the SDKs do.
fn reassemble(evs: &[(String, Value)]) -> Value {
    let mut msg = Value::Null;
    let mut json_acc: Vec<String> = Vec::new();
    for (name, d) in evs {
        match name.as_str() {
            "message_start" => msg = d["message"].clone(),
            "content_block_start" => {
                let i = d["index"].as_u64().unwrap() as usize;
                assert_eq!(i, msg["content"].as_array().unwrap().len());
                msg["content"]
                    .as_array_mut()
                    .unwrap()
                    .push(d["content_block"].clone());
                json_acc.push(String::new());
            }
            "content_block_delta" => {
                let i = d["index"].as_u64().unwrap() as usize;
                match d["delta"]["type"].as_str().unwrap() {
                    "thinking_delta" => {
                        let t = msg["content"][i]["thinking"].as_str().unwrap().to_string();
                        msg["content"][i]["thinking"] =
                            json!(t + d["delta"]["thinking"].as_str().unwrap());
                    }
                    "text_delta" => {
                        let t = msg["content"][i]["text"].as_str().unwrap().to_string();
                        msg["content"][i]["text"] = json!(t + d["delta"]["text"].as_str().unwrap());
                    }
                    _ => json_acc[i].push_str(d["delta"]["partial_json"].as_str().unwrap()),
                }
            }
            "content_block_stop" => {
                let i = d["index"].as_u64().unwrap() as usize;
                if msg["content"][i]["type"] == "tool_use" {
                    msg["content"][i]["input"] = serde_json::from_str(&json_acc[i]).unwrap();
                }
            }
            "message_delta" => {
                msg["stop_reason"] = d["delta"]["stop_reason"].clone();
                msg["stop_sequence"] = d["delta"]["stop_sequence"].clone();
                msg["usage"]["output_tokens"] = d["usage"]["output_tokens"].clone();
                msg["usage"]["input_tokens"] = d["usage"]["input_tokens"].clone();
            }
            _ => {}
        }
    }
    msg
}

#[test]
fn streams_cut_anywhere_reassemble_to_the_whole_answer() {
    for answer in [text_answer(), tool_answer(), reasoning_answer()] {
        let plan = plan();
        let stream = answer.stream();
        let object = normal(&whole(&plan, &answer.whole()).unwrap());
        let reference = run(&plan, &[stream.as_bytes()]);
        let reference = normal(&Value::Array(
            events(&reference).into_iter().map(|(_, d)| d).collect(),
        ));
        for pieces in cuts(&stream) {
            let evs = events(&run(&plan, &pieces));
            let data = normal(&Value::Array(evs.iter().map(|(_, d)| d.clone()).collect()));
            assert_eq!(data, reference, "cut into {} pieces", pieces.len());
            assert_eq!(normal(&reassemble(&evs)), object);
        }
    }
}

#[test]
fn stop_reasons_map() {
    let stop = |finish: &str, matched: Option<&str>| {
        let mut chat: Value = serde_json::from_slice(
            &Answer {
                reasoning: &[],
                text: &["x"],
                calls: &[],
                finish,
                usage: (1, 1),
            }
            .whole(),
        )
        .unwrap();
        if let Some(m) = matched {
            chat["choices"][0]["stop_reason"] = json!(m);
        }
        let v = whole(&plan(), chat.to_string().as_bytes()).unwrap();
        (v["stop_reason"].clone(), v["stop_sequence"].clone())
    };
    assert_eq!(stop("stop", None), (json!("end_turn"), Value::Null));
    assert_eq!(stop("length", None), (json!("max_tokens"), Value::Null));
    assert_eq!(stop("tool_calls", None), (json!("tool_use"), Value::Null));
    assert_eq!(
        stop("content_filter", None),
        (json!("refusal"), Value::Null)
    );
    // The engine says which stop string matched (vLLM-style `stop_reason`).
    assert_eq!(
        stop("stop", Some("END")),
        (json!("stop_sequence"), json!("END"))
    );
    assert_eq!(
        stop("stop", Some("other")),
        (json!("end_turn"), Value::Null)
    );
}

#[test]
fn errors_become_error_events() {
    let plan = plan();
    let text = "data: {\"model\":\"m1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n\
        data: {\"error\":{\"message\":\"gone\",\"type\":\"api_error\",\"code\":\"upstream_error\"}}\n\n\
        data: [DONE]\n\n";
    let evs = events(&run(&plan, &[text.as_bytes()]));
    let (name, last) = evs.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(
        *last,
        json!({"type": "error", "error": {"type": "api_error", "message": "gone"}})
    );
    let text = "data: {\"error\":{\"message\":\"busy\",\"type\":\"rate_limit_error\",\"code\":\"model_busy\"}}\n\ndata: [DONE]\n\n";
    let evs = events(&run(&plan, &[text.as_bytes()]));
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].1["error"]["type"], "overloaded_error");
    // Cut off without [DONE].
    let stream = text_answer().stream();
    let evs = events(&run(&plan, &[&stream.as_bytes()[..stream.len() / 2]]));
    assert_eq!(evs.last().unwrap().0, "error");
    // Unparseable tool arguments in a whole answer: an upstream error.
    let bad = Answer {
        reasoning: &[],
        text: &[],
        calls: &[("f", &["{not json"])],
        finish: "tool_calls",
        usage: (1, 1),
    };
    let e = whole(&plan, &bad.whole()).unwrap_err();
    assert_eq!(e.code.as_str(), "upstream_error");
}

#[test]
fn error_types_follow_the_status() {
    use super::anthropic_type;
    use http::StatusCode;
    for (status, kind) in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "api_error"),
    ] {
        assert_eq!(anthropic_type(StatusCode::from_u16(status).unwrap()), kind);
    }
}
