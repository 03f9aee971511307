//! On-demand load (docs/protocol.md §5.5): hold the request, single-flight per model,
//! SSE keep-alives while a streaming request waits.

mod common;
use common::*;
use futures_util::StreamExt;
use helexa_testkit::{MockModel, MockNeuron};
use std::time::Duration;

#[tokio::test]
async fn unloaded_model_is_loaded_once_and_served() {
    let a = MockNeuron::start("a", vec![MockModel::available("m", 0)]).await;
    a.set(|bh| bh.load_delay = Duration::from_millis(400));
    let h = start(config(&[("node-a", &a)])).await;
    wait_until("catalogue seen", 20, || async {
        h.models().await["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "m" && m["status"] == "available")
    })
    .await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let c = h.client.clone();
        let url = h.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            c.post(url)
                .json(&chat_body("m", false))
                .send()
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        // A held request's answer is relayed like any other: the neuron's
        // status, type and body, and the node it came from.
        let resp = t.await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-helexa-node"], "node-a");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion", "{body}");
    }
    assert_eq!(
        a.recorded().loads,
        vec!["m".to_string()],
        "single-flight load"
    );
    assert_eq!(a.recorded().v1_count, 4);
}

#[tokio::test]
async fn load_goes_to_the_best_fit_neuron() {
    // docs/protocol.md §6: the node left with the least free memory after
    // the load, among those where it fits.
    let a = MockNeuron::start("a", vec![MockModel::available("m", 0)]).await;
    let b = MockNeuron::start("b", vec![MockModel::available("m", 0)]).await;
    a.set(|bh| bh.memory_budget_mb = Some(9000));
    b.set(|bh| bh.memory_budget_mb = Some(1000));
    let h = start(config(&[("node-a", &a), ("node-b", &b)])).await;
    wait_until("memory polled", 20, || async {
        h.cortex
            .gateway
            .fleet
            .snapshot()
            .nodes
            .iter()
            .all(|v| v.memory.is_some() && v.discovery.is_some())
    })
    .await;
    let resp = h.chat("m", false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(node_of(&resp), "node-b");
    assert!(a.recorded().loads.is_empty());
    assert_eq!(b.recorded().loads.len(), 1);
}

#[tokio::test]
async fn streaming_request_gets_keepalives_while_loading() {
    let a = MockNeuron::start("a", vec![MockModel::available("m", 0)]).await;
    a.set(|bh| bh.load_delay = Duration::from_millis(900));
    let mut cfg = config(&[("node-a", &a)]);
    cfg.loading.keepalive_interval_ms = 200;
    let h = start(cfg).await;
    wait_until("catalogue seen", 20, || async {
        h.models().await["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "m")
    })
    .await;
    let resp = h.chat("m", true).await;
    assert_eq!(resp.status(), 200);
    let mut raw = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(c) = body.next().await {
        raw.extend_from_slice(&c.unwrap());
    }
    let text = String::from_utf8(raw).unwrap();
    let first_data = text.find("data: ").expect("data arrived");
    let keepalives = text[..first_data].matches(": keep-alive\n\n").count();
    assert!(
        keepalives >= 2,
        "keep-alives before data: {keepalives}\n{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn failed_load_is_503_with_retry_after() {
    let a = MockNeuron::start("a", vec![MockModel::available("m", 0)]).await;
    a.set(|bh| bh.load_fails = true);
    let h = start(config(&[("node-a", &a)])).await;
    wait_until("catalogue seen", 20, || async {
        h.models().await["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "m")
    })
    .await;
    let resp = h.chat("m", false).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    assert_eq!(envelope(resp).await["code"], "no_capacity");
    // Streaming: the head is already sent, so the failure is an SSE error event.
    let data = sse_data(h.chat("m", true).await).await;
    assert!(data[0].contains("no_capacity"), "{data:?}");
    assert_eq!(data.last().unwrap(), "[DONE]");
}
