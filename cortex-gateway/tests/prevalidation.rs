//! Edge pre-validation: over-long prompts refused before any neuron sees
//! them, exactly with a served tokenizer, by estimate without; advice header.

mod common;
use common::*;
use helexa_testkit::{MockModel, MockNeuron};
use serde_json::json;

/// 90 known words: exactly 90 tokens for the tiny tokenizer, but 539 chars,
/// which the 4-chars-per-token estimate makes 135.
fn ninety_words() -> String {
    vec!["hello"; 90].join(" ")
}

fn body(text: &str, max_tokens: Option<u64>) -> serde_json::Value {
    let mut b = json!({"model": "m", "messages": [{"role": "user", "content": text}]});
    if let Some(n) = max_tokens {
        b["max_tokens"] = json!(n);
    }
    b
}

#[tokio::test]
async fn estimate_without_tokenizer_refuses_before_dispatch() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 120)]).await;
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    let resp = h
        .client
        .post(h.url("/v1/chat/completions"))
        .header("user-agent", "litellm/1.55.0")
        .json(&body(&ninety_words(), None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let advice = resp.headers().get("x-helexa-advice").cloned();
    let raw = resp.text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let err = &v["error"];
    assert_eq!(err["code"], "context_length_exceeded");
    assert_eq!(err["type"], "invalid_request_error");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .starts_with("This model's maximum context length is 120 tokens."));
    assert_eq!(err["max"], 120);
    // 3 + 4 + ceil(539 / 4) = 142
    assert_eq!(err["estimated_prompt_tokens"], 142);
    let advice = advice.expect("litellm gets advice");
    assert!(advice.to_str().unwrap().contains("max_input_tokens=120"));
    assert!(
        !raw.contains("max_input_tokens"),
        "advice leaked into the body"
    );
    assert_eq!(a.recorded().v1_count, 0, "nothing may reach the neuron");
    // A short prompt passes.
    assert_eq!(
        h.post("/v1/chat/completions", &body("hello", None))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn exact_count_with_served_tokenizer() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 120)]).await;
    a.set(|bh| bh.serve_tokenizer = true);
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    // Exactly: 3 + 4 + 90 = 97 <= 120, so the estimate's refusal is wrong here.
    let resp = h
        .post("/v1/chat/completions", &body(&ninety_words(), None))
        .await;
    assert_eq!(resp.status(), 200);
    // 97 + 30 requested > 120: refused with the exact count.
    let resp = h
        .post("/v1/chat/completions", &body(&ninety_words(), Some(30)))
        .await;
    assert_eq!(resp.status(), 400);
    let err = envelope(resp).await;
    assert_eq!(err["estimated_prompt_tokens"], 97);
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("30 in the completion"));
    assert_eq!(a.recorded().v1_count, 1);
    // Fetched once and cached.
    assert_eq!(a.recorded().control.get("/tokenizer").copied(), Some(1));
    let m = h.metrics().await;
    assert!(
        m.contains("cortex_prevalidation_rejections_total{model=\"m\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn completions_prompt_and_no_limit() {
    let a = MockNeuron::start(
        "a",
        vec![MockModel::loaded("m", 50), MockModel::loaded("free", 0)],
    )
    .await;
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    h.wait_replicas("free", 1).await;
    let long = "x".repeat(400);
    let resp = h
        .post("/v1/completions", &json!({"model": "m", "prompt": long}))
        .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(envelope(resp).await["estimated_prompt_tokens"], 100);
    // No advertised limit: never refused at the edge.
    let resp = h
        .post("/v1/completions", &json!({"model": "free", "prompt": long}))
        .await;
    assert_eq!(resp.status(), 200);
    // Unknown clients get no advice header.
    let resp = h
        .client
        .post(h.url("/v1/completions"))
        .header("user-agent", "curl/8.5")
        .json(&json!({"model": "m", "prompt": long}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.headers().get("x-helexa-advice").is_none());
    // Zed is fingerprinted too; the body is the same either way.
    let resp = h
        .client
        .post(h.url("/v1/completions"))
        .header("user-agent", "Zed/0.170.4 (linux; x86_64)")
        .json(&json!({"model": "m", "prompt": long}))
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["x-helexa-advice"]
        .to_str()
        .unwrap()
        .starts_with("Zed"));
    assert_eq!(a.recorded().v1_count, 1);
}

/// With an exact tokenizer, a prompt far over the window is refused from a
/// cheap lower bound (never tokenized on the API worker), and one whose
/// byte count fits is let through uncounted; the count reported is a true
/// lower bound. A huge prompt does not hold up other requests, and
/// `max_tokens` near u64::MAX is simply too many (no overflow).
#[tokio::test]
async fn bounds_decide_before_exact_counting_and_client_numbers_saturate() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 120)]).await;
    a.set(|bh| bh.serve_tokenizer = true);
    let mut cfg = config(&[("node-a", &a)]);
    cfg.gateway.workers = 1;
    let h = start(cfg).await;
    h.wait_replicas("m", 1).await;
    // Fetch the tokenizer once.
    assert_eq!(
        h.post("/v1/chat/completions", &body("hello", None))
            .await
            .status(),
        200
    );
    let words = 400_000;
    let huge = vec!["hello"; words].join(" ");
    let big_body = body(&huge, None);
    let big = h.post("/v1/chat/completions", &big_body);
    let small = async {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        h.post("/v1/chat/completions", &body("hello", None)).await
    };
    let (big, small) = tokio::join!(big, small);
    assert_eq!(small.status(), 200);
    assert_eq!(big.status(), 400);
    let err = envelope(big).await;
    assert_eq!(err["code"], "context_length_exceeded");
    let shown = err["estimated_prompt_tokens"].as_u64().unwrap();
    assert!(
        shown > 120 && shown <= words as u64,
        "a lower bound over the window: {shown}"
    );
    let resp = h
        .post("/v1/chat/completions", &body("hello", Some(u64::MAX)))
        .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(envelope(resp).await["code"], "context_length_exceeded");
    assert_eq!(
        a.recorded().v1_count,
        2,
        "only the two small ones reached the neuron"
    );
}
