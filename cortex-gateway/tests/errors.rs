//! Every error path answers with the docs/protocol.md §2 envelope, right status and
//! code, and the process keeps serving.

mod common;
use common::*;
use helexa_testkit::{MockModel, MockNeuron};
use serde_json::json;

#[tokio::test]
async fn every_error_is_an_envelope() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let mut cfg = config(&[("node-a", &a)]);
    cfg.gateway.max_body_bytes = 4096;
    let h = start(cfg).await;
    h.wait_replicas("m", 1).await;
    let url = h.url("/v1/chat/completions");
    let c = &h.client;

    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e = envelope(r).await;
    assert_eq!(e["code"], "invalid_json");
    assert!(e["message"].as_str().unwrap().contains("line 1"), "{e}");

    let r = c
        .post(&url)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(envelope(r).await["code"], "unsupported_media_type");

    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let r = c.post(&url).json(&big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(envelope(r).await["code"], "request_too_large");

    let r = c
        .post(&url)
        .json(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e = envelope(r).await;
    assert_eq!(e["code"], "missing_model");
    assert_eq!(e["param"], "model");

    let r = c
        .post(&url)
        .json(&json!({"model": "m", "max_tokens": "many"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e = envelope(r).await;
    assert_eq!(e["code"], "invalid_request");
    assert_eq!(e["param"], "max_tokens");

    let r = c
        .post(&url)
        .json(&json!({"model": "m", "messages": "not a list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(envelope(r).await["param"], "messages");

    let r = c
        .post(&url)
        .json(&chat_body("nope", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().get("retry-after").is_none());
    assert_eq!(envelope(r).await["code"], "model_not_found");

    let r = c.get(h.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(envelope(r).await["code"], "not_found");

    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(envelope(r).await["code"], "method_not_allowed");

    // Every answer carries a request id, errors included, and cortex lives on.
    let r = c.post(&url).body("garbage").send().await.unwrap();
    assert!(r.headers().get("x-request-id").is_some());
    assert_eq!(h.chat("m", false).await.status(), 200);
    assert_eq!(
        a.recorded().v1_count,
        1,
        "no bad request reached the neuron"
    );
}

#[tokio::test]
async fn health_and_ready() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    a.set(|bh| bh.healthy = false);
    let h = start(config(&[("node-a", &a)])).await;
    assert_eq!(
        h.client
            .get(h.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Give the poller several rounds: still not ready.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let r = h.client.get(h.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(envelope(r).await["code"], "no_capacity");
    a.set(|bh| bh.healthy = true);
    wait_until("ready", 20, || async {
        h.client.get(h.url("/ready")).send().await.unwrap().status() == 200
    })
    .await;
}

#[tokio::test]
async fn no_healthy_replica_is_503_no_capacity() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let mut cfg = config(&[("node-a", &a)]);
    cfg.poll.unhealthy_after = 2;
    cfg.loading.enabled = false;
    let h = start(cfg).await;
    h.wait_replicas("m", 1).await;
    a.set(|bh| bh.healthy = false);
    wait_until("no capacity", 20, || async {
        h.chat("m", false).await.status() == 503
    })
    .await;
    let r = h.chat("m", false).await;
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(envelope(r).await["code"], "no_capacity");
}
