//! End-to-end: real `neuron` + `cortex` binaries with the embedding model
//! (all-MiniLM-L6-v2) configured as a `[[models]]` entry beside the chat
//! model. `/v1/embeddings` through cortex and the agent's relay, the
//! capability each model is listed with, and the refusals of a request
//! sent to the wrong kind of model, at cortex and at the agent.
//!
//! Skipped, with a message, only when the embedding model is absent
//! (scripts/test fetches it).

use base64::Engine as _;
use helexa_e2e::*;
use serde_json::{json, Value};

/// Reference vector of "The quick brown fox jumps over the lazy dog."
/// (numpy forward pass, scripts/gen-embedding-fixtures).
fn reference() -> (String, Vec<f32>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../neuron-agent/tests/fixtures/embeddings.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let s = &doc["sentences"][0];
    (
        s["text"].as_str().unwrap().to_string(),
        serde_json::from_value(s["embedding"].clone()).unwrap(),
    )
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn caps_of(list: &Value, id: &str) -> Vec<String> {
    let entry = list
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == id))
        .unwrap_or_else(|| panic!("{id} not listed in {list}"));
    serde_json::from_value(entry["capabilities"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_through_cortex_and_neuron() {
    let Some(embed) = embedding_model_path() else {
        eprintln!("SKIPPED: the embedding model is absent; run scripts/fetch-embedding-model");
        return;
    };
    let c = Cluster::start(ClusterOptions {
        embedding_model: Some(embed),
        ..Default::default()
    })
    .await;
    let api = c.api().to_string();
    let (text, want) = reference();

    // A list in one request through cortex → neuron → engine.
    let r = c
        .http
        .post(format!("{api}/v1/embeddings"))
        .json(&json!({"model": EMBED_MODEL_ID, "input": [text, "A second, different sentence."]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-helexa-node"], "e2e-node");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], EMBED_MODEL_ID);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let first: Vec<f32> = serde_json::from_value(data[0]["embedding"].clone()).unwrap();
    assert!(cosine(&first, &want) >= 0.999);
    let pt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(pt > 12, "{v}");
    assert_eq!(v["usage"]["total_tokens"].as_u64(), Some(pt));

    // base64 through both hops decodes to the same numbers.
    let (st, b) = c
        .post(
            &api,
            "/v1/embeddings",
            &json!({"model": EMBED_MODEL_ID, "input": text, "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, first);

    // Capabilities: cortex's /v1/models, the agent's /models and /v1/models.
    let (_, models) = get(&c, &format!("{api}/v1/models")).await;
    assert_eq!(caps_of(&models["data"], EMBED_MODEL_ID), vec!["embeddings"]);
    let chat_caps = caps_of(&models["data"], MODEL_ID);
    assert!(chat_caps.iter().any(|c| c == "chat"));
    assert!(!chat_caps.iter().any(|c| c == "embeddings"));
    let (_, agent) = get(&c, &format!("{}/models", c.neuron_url)).await;
    assert_eq!(caps_of(&agent, EMBED_MODEL_ID), vec!["embeddings"]);
    let (_, agent_v1) = get(&c, &format!("{}/v1/models", c.neuron_url)).await;
    assert_eq!(
        caps_of(&agent_v1["data"], EMBED_MODEL_ID),
        vec!["embeddings"]
    );

    // The wrong kind of request is refused at cortex, naming the capability.
    let chat = json!({"model": EMBED_MODEL_ID, "messages": [{"role": "user", "content": "hi"}]});
    let (st, e) = c.post(&api, "/v1/chat/completions", &chat).await;
    assert_eq!(st, 400, "{e}");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`chat` capability"));
    let (st, e) = c
        .post(
            &api,
            "/v1/embeddings",
            &json!({"model": MODEL_ID, "input": "hi"}),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`embeddings` capability"));

    // ... and by the engine behind the agent when cortex is bypassed.
    let (st, e) = c.post(&c.neuron_url, "/v1/chat/completions", &chat).await;
    assert_eq!(st, 400, "{e}");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`chat` capability"));

    // An over-long input through both hops: 400 context_length_exceeded.
    let (st, e) = c
        .post(
            &api,
            "/v1/embeddings",
            &json!({"model": EMBED_MODEL_ID, "input": ["ok", "word ".repeat(600)]}),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert_eq!(e["error"]["param"], "input[1]");

    // The chat model still answers beside it.
    let (st, v) = c
        .post(&api, "/v1/chat/completions", &chat_body("Say hi.", 4))
        .await;
    assert_eq!(st, 200, "{v}");

    // The agent reports the embedding model loaded beside the chat model.
    let (_, h) = get(&c, &format!("{}/health", c.neuron_url)).await;
    assert_eq!(model_health_of(&h, EMBED_MODEL_ID)["status"], "loaded");
}

async fn get(c: &Cluster, url: &str) -> (u16, Value) {
    let r = c.http.get(url).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}
