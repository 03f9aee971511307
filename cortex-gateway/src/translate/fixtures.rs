//! Recorded translations, kept in `tests/fixtures/translate/`: this test
//! fails when an answer's shape changes (re-record with
//! `HELEXA_RECORD=1`), and `check_sdks.py` beside the files parses each one
//! with the real openai and anthropic Python SDKs' models.

use super::testutil::{events, normal, run, whole, Answer};
use super::{translate, Api};
use serde_json::{json, Value};

const TEXT: Answer<'static> = Answer {
    reasoning: &[],
    text: &["Hel", "lo", " wörld"],
    calls: &[],
    finish: "stop",
    usage: (7, 3),
};
const TOOLS: Answer<'static> = Answer {
    reasoning: &[],
    text: &["Calling."],
    calls: &[
        ("get_weather", &["{\"city\":", "\"Paris\"}"]),
        ("get_time", &["{}"]),
    ],
    finish: "tool_calls",
    usage: (20, 9),
};
const LENGTH: Answer<'static> = Answer {
    reasoning: &[],
    text: &["Hel"],
    calls: &[],
    finish: "length",
    usage: (1, 1),
};
const REASONING: Answer<'static> = Answer {
    reasoning: &["Let me ", "think."],
    text: &["Hel", "lo"],
    calls: &[("get_time", &["{}"])],
    finish: "tool_calls",
    usage: (7, 6),
};
const BROKEN: &str =
    "data: {\"model\":\"m1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n\
    data: {\"error\":{\"message\":\"gone\",\"type\":\"api_error\",\"code\":\"upstream_error\"}}\n\n\
    data: [DONE]\n\n";

fn dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/translate")
}

/// A stream's events, ids and clocks fixed, one SSE event each.
fn sse(text: &str) -> String {
    let mut out = String::new();
    for (name, data) in events(text) {
        out += &format!("event: {name}\ndata: {}\n\n", normal(&data));
    }
    out
}

/// Compares as JSON values (key order differs with serde_json's
/// `preserve_order`, which a workspace build may turn on).
fn check(name: &str, got: String) {
    let path = dir().join(name);
    if std::env::var_os("HELEXA_RECORD").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (record with HELEXA_RECORD=1)", path.display()));
    let parse = |text: &str| -> Vec<(String, Value)> {
        if name.ends_with(".sse") {
            events(text)
        } else {
            vec![(String::new(), serde_json::from_str(text).unwrap())]
        }
    };
    assert_eq!(
        parse(&got),
        parse(&want),
        "{name} changed (re-record with HELEXA_RECORD=1 if meant)"
    );
}

#[test]
fn translations_match_the_recorded_fixtures() {
    let responses = translate(
        Api::Responses,
        json!({"model": "m", "input": "hi", "instructions": "be brief", "metadata": {"k": "v"},
            "user": "u", "temperature": 0.2, "max_output_tokens": 50,
            "tools": [{"type": "function", "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
                {"type": "function", "name": "get_time"}]})
        .to_string()
        .as_bytes(),
    )
    .unwrap()
    .1;
    let messages = translate(
        Api::Messages,
        json!({"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap()
    .1;
    let pretty = |v: Value| serde_json::to_string_pretty(&normal(&v)).unwrap() + "\n";
    for (plan, api) in [(&responses, "responses"), (&messages, "messages")] {
        for (answer, case) in [
            (&TEXT, "text"),
            (&TOOLS, "tools"),
            (&LENGTH, "length"),
            (&REASONING, "reasoning"),
        ] {
            check(
                &format!("{api}_{case}.json"),
                pretty(whole(plan, &answer.whole()).unwrap()),
            );
            check(
                &format!("{api}_{case}.sse"),
                sse(&run(plan, &[answer.stream().as_bytes()])),
            );
        }
        check(
            &format!("{api}_failed.sse"),
            sse(&run(plan, &[BROKEN.as_bytes()])),
        );
    }
}
