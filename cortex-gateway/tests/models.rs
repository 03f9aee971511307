//! `GET /v1/models`: OpenAI list merged over healthy neurons.

mod common;
use common::*;
use helexa_testkit::{MockModel, MockNeuron};

#[tokio::test]
async fn list_is_merged_with_helexa_fields() {
    let a = MockNeuron::start(
        "a",
        vec![
            MockModel::loaded("m", 8192),
            MockModel::available("cold", 0),
        ],
    )
    .await;
    let b = MockNeuron::start("b", vec![MockModel::loaded("m", 4096)]).await;
    a.set_model("m", |m| m.output = 2048);
    a.set(|bh| bh.generation_defaults = Some(serde_json::json!({"temperature": 0.6, "top_k": 20})));
    let mut cfg = config(&[("node-a", &a), ("node-b", &b)]);
    cfg.aliases.insert("gpt-4o".into(), "m".into());
    let h = start(cfg).await;
    h.wait_replicas("m", 2).await;
    let v = h.models().await;
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    let m = data.iter().find(|x| x["id"] == "m").unwrap();
    assert_eq!(m["object"], "model");
    assert_eq!(m["owned_by"], "helexa");
    assert_eq!(
        m["context_length"], 4096,
        "the smaller window is the safe one"
    );
    assert_eq!(m["max_model_len"], 4096);
    assert_eq!(m["max_output_tokens"], 2048);
    assert_eq!(m["status"], "loaded");
    assert_eq!(m["replicas"], 2);
    // The model's own sampling defaults, as its neuron reports them.
    assert_eq!(
        m["generation_defaults"],
        serde_json::json!({"temperature": 0.6, "top_k": 20})
    );
    assert!(m["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "chat"));
    let cold = data.iter().find(|x| x["id"] == "cold").unwrap();
    assert_eq!(cold["status"], "available");
    assert_eq!(cold["replicas"], 0);
    assert!(data.iter().any(|x| x["id"] == "gpt-4o"));
    // The alias routes to the real model, and the neuron sees the real id.
    let resp = h.chat("gpt-4o", false).await;
    assert_eq!(resp.status(), 200);
    let rec = a
        .recorded()
        .requests
        .into_iter()
        .chain(b.recorded().requests)
        .next()
        .unwrap();
    assert_eq!(rec.json()["model"], "m");
    // A neuron going unhealthy leaves the list.
    b.set(|bh| bh.healthy = false);
    h.wait_replicas("m", 1).await;
}
