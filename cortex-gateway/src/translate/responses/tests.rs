use super::super::testutil::{cuts, events, normal, run, whole, Answer};
use super::super::{translate as translate_api, Api, Plan as AnyPlan};
use serde_json::{json, Value};

fn chat_of(req: Value) -> Value {
    let (bytes, _) = translate_api(Api::Responses, req.to_string().as_bytes()).expect("translates");
    serde_json::from_slice(&bytes).unwrap()
}

fn refused(req: Value) -> (String, Option<String>) {
    let e = translate_api(Api::Responses, req.to_string().as_bytes()).expect_err("refused");
    (e.code.as_str().to_string(), e.param)
}

fn plan_of(req: Value) -> AnyPlan {
    translate_api(Api::Responses, req.to_string().as_bytes())
        .expect("translates")
        .1
}

#[test]
fn a_full_request_maps_field_by_field() {
    let chat = chat_of(json!({
        "model": "m", "instructions": "be brief", "input": "hi",
        "max_output_tokens": 50, "temperature": 0.5, "top_p": 0.9,
        "tools": [{"type": "function", "name": "f", "description": "does f",
                   "parameters": {"type": "object", "properties": {}}, "strict": true}],
        "tool_choice": {"type": "function", "name": "f"},
        "parallel_tool_calls": false, "user": "u1", "store": false, "background": false,
        "metadata": {"k": "v"}, "truncation": "disabled", "include": [], "stream": true,
    }));
    assert_eq!(
        chat,
        json!({
            "model": "m",
            "messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "hi"}],
            "stream": true, "stream_options": {"include_usage": true},
            "max_tokens": 50, "temperature": 0.5, "top_p": 0.9,
            "tools": [{"type": "function", "function": {"name": "f", "description": "does f",
                "parameters": {"type": "object", "properties": {}}, "strict": true}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "parallel_tool_calls": false, "user": "u1",
        })
    );
}

#[test]
fn input_items_become_chat_turns() {
    let chat = chat_of(json!({"model": "m", "input": [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "what is "}, {"type": "input_text", "text": "2+2?"}]},
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "add",
         "arguments": "{\"a\":2,\"b\":2}", "status": "completed"},
        {"type": "function_call", "call_id": "c2", "name": "add", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "4"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "0"}]},
        {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AA"}]},
    ]}));
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "system", "content": "rules"},
            {"role": "user", "content": "what is 2+2?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\":2,\"b\":2}"}},
                {"id": "c2", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "4"},
            {"role": "tool", "tool_call_id": "c2", "content": "0"},
            {"role": "user", "content": [{"type": "image_url",
                "image_url": {"url": "data:image/png;base64,AA"}}]},
        ])
    );
    assert_eq!(chat["stream"], false);
    assert!(chat.get("stream_options").is_none());
    // A function call with no assistant turn before it opens one.
    let chat = chat_of(json!({"model": "m", "input": [
        {"role": "user", "content": "x"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}));
    assert_eq!(chat["messages"][1]["content"], Value::Null);
    assert_eq!(chat["messages"][1]["tool_calls"][0]["id"], "c");
}

#[test]
fn text_format_maps_to_response_format() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let chat = chat_of(json!({"model": "m", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "thing", "schema": schema, "strict": true}}}));
    assert_eq!(
        chat["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": true}})
    );
    let chat =
        chat_of(json!({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}}));
    assert_eq!(chat["response_format"], json!({"type": "json_object"}));
    let chat = chat_of(json!({"model": "m", "input": "x", "text": {"format": {"type": "text"}}}));
    assert!(chat.get("response_format").is_none());
    for choice in ["auto", "none", "required"] {
        let chat = chat_of(json!({"model": "m", "input": "x", "tool_choice": choice}));
        assert_eq!(chat["tool_choice"], choice);
    }
}

#[test]
fn what_is_not_honoured_is_refused_by_name() {
    let base = || json!({"model": "m", "input": "x"});
    let with = |k: &str, v: Value| {
        let mut r = base();
        r[k] = v;
        r
    };
    let cases = [
        (
            with("previous_response_id", json!("resp_1")),
            "previous_response_id",
        ),
        (with("conversation", json!("conv_1")), "conversation"),
        (with("store", json!(true)), "store"),
        (with("background", json!(true)), "background"),
        (with("truncation", json!("auto")), "truncation"),
        (
            with("include", json!(["reasoning.encrypted_content"])),
            "include",
        ),
        (
            with("reasoning", json!({"effort": "extreme"})),
            "reasoning.effort",
        ),
        (
            with("reasoning", json!({"effort": "low", "summary": "detailed"})),
            "reasoning.summary",
        ),
        (
            with("reasoning", json!({"effort": "low", "budget": 5})),
            "reasoning.budget",
        ),
        (with("frobnicate", json!(1)), "frobnicate"),
        (
            with("tools", json!([{"type": "web_search"}])),
            "tools[0].type",
        ),
        (
            with(
                "tools",
                json!([{"type": "function", "name": "f", "extra": 1}]),
            ),
            "tools[0].extra",
        ),
        (
            with("tool_choice", json!({"type": "file_search"})),
            "tool_choice.type",
        ),
        (with("tool_choice", json!("sometimes")), "tool_choice"),
        (
            with("text", json!({"format": {"type": "yaml"}})),
            "text.format.type",
        ),
        (with("text", json!({"verbosity": "low"})), "text.verbosity"),
        (
            with(
                "input",
                json!([{"type": "reasoning", "summary": [], "extra": 1}]),
            ),
            "input[0].extra",
        ),
        (
            with("input", json!([{"type": "item_reference", "id": "x"}])),
            "input[0].type",
        ),
        (
            with("input", json!([{"role": "tool", "content": "x"}])),
            "input[0].role",
        ),
        (
            with(
                "input",
                json!([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]),
            ),
            "input[0].content[0].type",
        ),
        (
            with(
                "input",
                json!([{"type": "function_call_output", "output": "x"}]),
            ),
            "input[0].call_id",
        ),
        (with("input", json!(5)), "input"),
        (with("input", json!([])), "input"),
        (with("max_output_tokens", json!(0)), "max_output_tokens"),
        (with("temperature", json!("hot")), "temperature"),
        (with("metadata", json!({"k": 1})), "metadata.k"),
        (json!({"model": "m"}), "input"),
    ];
    for (req, param) in cases {
        let (code, p) = refused(req.clone());
        assert_eq!(code, "invalid_request", "{req}");
        assert_eq!(p.as_deref(), Some(param), "{req}");
    }
    assert_eq!(refused(json!({"input": "x"})).0, "missing_model");
    // `null` is absent, and `store: false` is what cortex does anyway.
    chat_of(
        json!({"model": "m", "input": "x", "previous_response_id": null,
        "store": false, "reasoning": null}),
    );
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

fn plan() -> AnyPlan {
    plan_of(
        json!({"model": "m", "input": "x", "metadata": {"k": "v"}, "user": "u",
        "tools": [{"type": "function", "name": "get_weather"}], "temperature": 0.2}),
    )
}

#[test]
fn reasoning_maps_to_the_templates_enable_thinking() {
    let of = |r: Value| {
        let req = json!({"model": "m", "input": "x", "reasoning": r});
        (
            chat_of(req.clone())["chat_template_kwargs"].clone(),
            whole(&plan_of(req), &text_answer().whole()).unwrap()["reasoning"].clone(),
        )
    };
    let off = json!({"enable_thinking": false});
    let on = json!({"enable_thinking": true});
    assert_eq!(of(json!({"effort": "none"})).0, off);
    assert_eq!(of(json!({"effort": "minimal"})).0, off);
    for effort in ["low", "medium", "high", "xhigh"] {
        assert_eq!(of(json!({"effort": effort, "summary": "auto"})).0, on);
    }
    // The response echoes the request's `reasoning`.
    assert_eq!(of(json!({"effort": "high"})).1, json!({"effort": "high"}));
    assert_eq!(of(json!({"summary": "auto"})).0, Value::Null);
    // An earlier answer's reasoning item is accepted and left out.
    let chat = chat_of(json!({"model": "m", "input": [
        {"role": "user", "content": "x"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"role": "assistant", "content": "y"},
        {"role": "user", "content": "z"}]}));
    assert_eq!(chat["messages"].as_array().unwrap().len(), 3, "{chat}");
}

fn reasoning_answer() -> Answer<'static> {
    Answer {
        reasoning: &["Let me ", "think."],
        text: &["Hel", "lo"],
        calls: &[("get_time", &["{}"])],
        finish: "tool_calls",
        usage: (7, 6),
    }
}

#[test]
fn reasoning_streams_as_a_reasoning_item_first() {
    let evs = events(&run(&plan(), &[reasoning_answer().stream().as_bytes()]));
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names[..10],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.reasoning_text.delta",
            "response.reasoning_text.delta",
            "response.reasoning_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
        ]
    );
    let added = &evs[2].1["item"];
    assert!(added["id"].as_str().unwrap().starts_with("rs_"), "{added}");
    assert_eq!(
        normal(added),
        json!({"id": "rs_X", "type": "reasoning", "status": "in_progress", "summary": [],
               "content": []})
    );
    assert_eq!(
        evs[3].1["part"],
        json!({"type": "reasoning_text", "text": ""})
    );
    assert_eq!(evs[4].1["delta"], "Let me ");
    assert_eq!(evs[4].1["item_id"], added["id"]);
    assert_eq!(evs[4].1["content_index"], 0);
    assert_eq!(evs[6].1["text"], "Let me think.");
    assert_eq!(
        normal(&evs[8].1["item"]),
        json!({"id": "rs_X", "type": "reasoning", "status": "completed", "summary": [],
               "content": [{"type": "reasoning_text", "text": "Let me think."}]})
    );
    assert_eq!(evs[9].1["item"]["type"], "message");
    assert_eq!(evs[9].1["output_index"], 1);
    let done = &evs.last().unwrap().1["response"];
    assert_eq!(done["output"][0]["type"], "reasoning");
    assert_eq!(done["output"][2]["type"], "function_call");
    assert_eq!(
        done["usage"]["output_tokens_details"]["reasoning_tokens"],
        2
    );
}

#[test]
fn a_text_stream_gives_the_documented_event_sequence() {
    let out = run(&plan(), &[text_answer().stream().as_bytes()]);
    let evs = events(&out);
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
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (_, d)) in evs.iter().enumerate() {
        assert_eq!(d["sequence_number"], i as u64);
    }
    assert_eq!(evs[0].1["response"]["status"], "in_progress");
    assert_eq!(evs[0].1["response"]["output"], json!([]));
    assert_eq!(evs[7].1["text"], "Hello wörld");
    let done = &evs[10].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["model"], "m1");
    assert_eq!(done["metadata"], json!({"k": "v"}));
    assert_eq!(done["user"], "u");
    assert_eq!(done["temperature"], 0.2);
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello wörld");
    assert_eq!(
        done["usage"],
        json!({"input_tokens": 7, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
               "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 10})
    );
}

#[test]
fn tool_calls_stream_as_function_call_items() {
    let out = run(&plan(), &[tool_answer().stream().as_bytes()]);
    let evs = events(&out);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(evs[8].1["item"]["call_id"], "call_0");
    assert_eq!(evs[8].1["item"]["name"], "get_weather");
    assert_eq!(evs[8].1["output_index"], 1);
    assert_eq!(evs[11].1["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(evs[13].1["output_index"], 2);
    let out = &evs[17].1["response"]["output"];
    assert_eq!(out[1]["type"], "function_call");
    assert_eq!(out[2]["name"], "get_time");
    assert_eq!(out[2]["status"], "completed");
}

/// What a client rebuilds from the deltas alone: per output index, the
/// item of `output_item.done` with its text / arguments replaced by the
/// concatenated deltas.
fn reassemble(evs: &[(String, Value)]) -> Vec<Value> {
    let mut items: Vec<Value> = Vec::new();
    let mut acc: Vec<String> = Vec::new();
    for (name, d) in evs {
        let i = d["output_index"].as_u64().unwrap_or(0) as usize;
        match name.as_str() {
            "response.output_item.added" => {
                assert_eq!(i, items.len(), "items are added in order");
                items.push(d["item"].clone());
                acc.push(String::new());
            }
            "response.output_text.delta"
            | "response.reasoning_text.delta"
            | "response.function_call_arguments.delta" => {
                acc[i].push_str(d["delta"].as_str().unwrap())
            }
            "response.output_item.done" => {
                let mut item = d["item"].clone();
                match item["type"].as_str().unwrap() {
                    "message" | "reasoning" => item["content"][0]["text"] = json!(acc[i]),
                    _ => item["arguments"] = json!(acc[i]),
                }
                items[i] = item;
            }
            _ => {}
        }
    }
    items
}

#[test]
fn streams_cut_anywhere_reassemble_to_the_whole_answer() {
    for answer in [text_answer(), tool_answer(), reasoning_answer()] {
        let plan = plan();
        let stream = answer.stream();
        let reference = normal(&Value::Array(
            events(&run(&plan, &[stream.as_bytes()]))
                .into_iter()
                .map(|(_, d)| d)
                .collect(),
        ));
        let object = normal(&whole(&plan, &answer.whole()).unwrap());
        for pieces in cuts(&stream) {
            let evs = events(&run(&plan, &pieces));
            let data = normal(&Value::Array(evs.iter().map(|(_, d)| d.clone()).collect()));
            assert_eq!(data, reference, "cut into {} pieces", pieces.len());
            // The deltas rebuild the output, and the last event carries the
            // same response as the whole answer.
            assert_eq!(normal(&Value::Array(reassemble(&evs))), object["output"]);
            assert_eq!(normal(&evs.last().unwrap().1["response"]), object);
        }
    }
}

#[test]
fn a_length_stop_is_incomplete() {
    let answer = Answer {
        reasoning: &[],
        text: &["Hel"],
        calls: &[],
        finish: "length",
        usage: (1, 1),
    };
    let plan = plan();
    let evs = events(&run(&plan, &[answer.stream().as_bytes()]));
    let (name, last) = evs.last().unwrap();
    assert_eq!(name, "response.incomplete");
    assert_eq!(last["response"]["status"], "incomplete");
    assert_eq!(
        last["response"]["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(last["response"]["output"][0]["status"], "incomplete");
    let object = whole(&plan, &answer.whole()).unwrap();
    assert_eq!(object["status"], "incomplete");
    assert_eq!(normal(&object), normal(&last["response"]));
}

#[test]
fn errors_end_the_stream_with_response_failed() {
    let plan = plan();
    // Mid-stream, as cortex's relay reports an upstream death.
    let text = "data: {\"model\":\"m1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n\
        data: {\"error\":{\"message\":\"gone\",\"type\":\"api_error\",\"code\":\"upstream_error\"}}\n\n\
        data: [DONE]\n\n";
    let evs = events(&run(&plan, &[text.as_bytes()]));
    let (name, last) = evs.last().unwrap();
    assert_eq!(name, "response.failed");
    assert_eq!(last["response"]["status"], "failed");
    assert_eq!(
        last["response"]["error"],
        json!({"code": "server_error", "message": "gone"})
    );
    assert_eq!(last["response"]["output"][0]["content"][0]["text"], "Hi");
    // Before anything (a held request whose load failed).
    let text = "data: {\"error\":{\"message\":\"no\",\"type\":\"api_error\",\"code\":\"no_capacity\"}}\n\ndata: [DONE]\n\n";
    let names: Vec<String> = events(&run(&plan, &[text.as_bytes()]))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.failed"
        ]
    );
    // A stream cut off without [DONE].
    let stream = text_answer().stream();
    let cut = &stream[..stream.len() / 2];
    let evs = events(&run(&plan, &[cut.as_bytes()]));
    assert_eq!(evs.last().unwrap().0, "response.failed");
    // Keep-alive comments pass through.
    let out = run(&plan, &[b": keep-alive\n\n", stream.as_bytes()]);
    assert!(out.starts_with(": keep-alive\n\n"), "{out}");
}

#[test]
fn the_whole_object_has_what_the_sdk_requires() {
    let plan = plan();
    let v = whole(&plan, &tool_answer().whole()).unwrap();
    for key in [
        "id",
        "object",
        "created_at",
        "model",
        "output",
        "parallel_tool_calls",
        "tool_choice",
        "tools",
        "status",
        "usage",
    ] {
        assert!(!v[key].is_null(), "{key} missing: {v}");
    }
    assert!(v["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["role"], "assistant");
    assert_eq!(v["output"][0]["content"][0]["annotations"], json!([]));
    assert!(v["output"][1]["id"].as_str().unwrap().starts_with("fc_"));
    assert_eq!(v["output"][1]["call_id"], "call_0");
    assert_eq!(v["output"][1]["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(
        v["tools"],
        json!([{"type": "function", "name": "get_weather"}])
    );
    assert_eq!(v["tool_choice"], "auto");
    assert_eq!(v["text"], json!({"format": {"type": "text"}}));
}
