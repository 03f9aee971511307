//! End-to-end: real `neuron` + `cortex` binaries serving the real default
//! model. Answers, streams, usage, limits, determinism and concurrency.

use helexa_e2e::*;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_and_completions_through_cortex() {
    let c = Cluster::start(ClusterOptions::default()).await;
    let api = c.api().to_string();

    // Non-streamed chat: a real answer with exact usage.
    let prompt = "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog.";
    let r = c
        .http
        .post(format!("{api}/v1/chat/completions"))
        .json(&chat_body(prompt, 24))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-helexa-node"], "e2e-node");
    assert!(r.headers().contains_key("x-request-id"));
    let whole: Value = r.json().await.unwrap();
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.contains("quick brown fox"),
        "unexpected answer: {text:?}"
    );
    let usage = &whole["usage"];
    let (pt, ct) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(pt > 10 && ct > 0 && ct <= 24, "usage {usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), pt + ct);

    // The same request streamed: incremental chunks whose text is the same
    // greedy answer, a finish chunk, then the usage chunk with choices [].
    let mut body = chat_body(prompt, 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = stream(&c.http, &format!("{api}/v1/chat/completions"), &body).await;
    assert_eq!(s.status, 200);
    assert!(s.done, "stream must end with [DONE]");
    assert!(s.content_chunks() >= 3, "expected incremental chunks");
    assert_eq!(s.content(), text);
    let (first_t, _) = s.events.first().unwrap();
    let (last_t, last) = s.events.last().unwrap();
    assert!(last_t > first_t, "chunks must arrive over time");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"].as_u64(), Some(pt));
    assert_eq!(last["usage"]["completion_tokens"].as_u64(), Some(ct));
    let finish = &s.events[s.events.len() - 2].1;
    assert!(finish["choices"][0]["finish_reason"].is_string());

    // Legacy completions.
    let (st, v) = c
        .post(
            &api,
            "/v1/completions",
            &json!({"model": MODEL_ID, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty());
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1);

    // cortex counted the requests and tokens.
    let m = c
        .http
        .get(format!("{}/metrics", c.metrics_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("cortex_requests_total"), "{m}");
    assert!(m.contains("e2e-node"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_max_tokens_and_determinism() {
    let c = Cluster::start(ClusterOptions::default()).await;
    let api = c.api().to_string();
    let url = "/v1/chat/completions";
    let prompt = "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog.";

    // max_tokens caps the answer with finish_reason length.
    let (st, v) = c.post(&api, url, &chat_body(prompt, 3)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Greedy answers are identical run to run.
    let (_, a) = c.post(&api, url, &chat_body(prompt, 20)).await;
    let (_, b) = c.post(&api, url, &chat_body(prompt, 20)).await;
    let greedy = a["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        greedy,
        b["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(greedy.contains("fox"), "{greedy:?}");

    // A stop string ends the answer before it, and is never emitted.
    let mut body = chat_body(prompt, 20);
    body["stop"] = json!(["fox"]);
    let (_, s) = c.post(&api, url, &body).await;
    let stopped = s["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(s["choices"][0]["finish_reason"], "stop");
    // The engine names the stop string that matched (vLLM's `stop_reason`).
    assert_eq!(s["choices"][0]["stop_reason"], "fox", "{s}");
    assert!(!stopped.contains("fox"));
    assert_eq!(stopped, &greedy[..greedy.find("fox").unwrap()]);

    // The same stop string when streaming.
    body["stream"] = json!(true);
    let st = stream(&c.http, &format!("{api}{url}"), &body).await;
    assert_eq!(st.content(), stopped);

    // Through the Anthropic translation the match is a stop_sequence.
    let msg = json!({"model": MODEL_ID, "max_tokens": 20, "temperature": 0,
                     "stop_sequences": ["dog", "fox"],
                     "messages": [{"role": "user", "content": prompt}]});
    let (st, m) = c.post(&api, "/v1/messages", &msg).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["stop_reason"], "stop_sequence", "{m}");
    assert_eq!(m["stop_sequence"], "fox", "{m}");
    assert_eq!(m["content"][0]["text"], stopped, "{m}");

    // Seeded sampling reproduces itself.
    let seeded = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
                        "max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 1234});
    let (_, x) = c.post(&api, url, &seeded).await;
    let (_, y) = c.post(&api, url, &seeded).await;
    assert_eq!(
        x["choices"][0]["message"]["content"],
        y["choices"][0]["message"]["content"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_concurrent_requests_all_answer() {
    let c = Cluster::start(ClusterOptions::default()).await;
    let api = c.api().to_string();
    let mut tasks = vec![];
    for i in 0..6 {
        let http = c.http.clone();
        let url = format!("{api}/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let mut body = chat_body(&format!("Count from {i} to {}.", i + 5), 16);
            if i % 2 == 0 {
                body["stream"] = json!(true);
                let s = stream(&http, &url, &body).await;
                assert_eq!(s.status, 200);
                assert!(s.done);
                s.content()
            } else {
                let r = http.post(&url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let v: Value = r.json().await.unwrap();
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        }));
    }
    for t in tasks {
        let text = t.await.unwrap();
        assert!(!text.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_exceeded_is_refused_at_both_hops() {
    let c = Cluster::start(ClusterOptions::default()).await;
    let long = "word ".repeat(12_000);
    // Through cortex: refused before dispatch, with an estimate.
    let (st, v) = c
        .post(&c.cortex_url, "/v1/chat/completions", &chat_body(&long, 16))
        .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("This model's maximum context length is 8192 tokens."));
    // Straight to the neuron: the engine counts exactly.
    let (st, v) = c
        .post(&c.neuron_url, "/v1/chat/completions", &chat_body(&long, 16))
        .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(v["error"]["prompt_tokens"].as_u64().unwrap() > 8192);
    // A short prompt with an impossible output budget.
    let (st, v) = c
        .post(
            &c.neuron_url,
            "/v1/chat/completions",
            &chat_body("hi", 9000),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Prompts past 4096 tokens are covered by helexa-engine's model tests.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_frees_the_slot() {
    let c = Cluster::start(ClusterOptions::default()).await;
    let mut body = chat_body("Tell me a very long story about a dragon.", 2000);
    body["stream"] = json!(true);
    let r = c
        .http
        .post(format!("{}/v1/chat/completions", c.cortex_url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut bytes = r.bytes_stream();
    use futures_util::StreamExt;
    // Read until the answer is flowing, then hang up.
    let mut seen = 0;
    while seen < 400 {
        let chunk = bytes.next().await.expect("stream open").unwrap();
        seen += chunk.len();
    }
    let busy = model_health(&c.neuron_health().await.unwrap());
    assert!(busy["in_flight"].as_u64().unwrap() >= 1, "{busy}");
    drop(bytes);
    let start = std::time::Instant::now();
    loop {
        let h = model_health(&c.neuron_health().await.unwrap());
        if h["in_flight"] == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "slot not freed within 3 s: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
