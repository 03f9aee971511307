//! The streaming proxy: no buffering, death mid-stream, client going away,
//! headers kept and added.

mod common;
use common::*;
use futures_util::StreamExt;
use helexa_testkit::{MockModel, MockNeuron};
use std::time::{Duration, Instant};

#[tokio::test]
async fn chunk_timing_is_preserved() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    a.set(|bh| {
        bh.chunk_delay = Duration::from_millis(400);
        bh.chunks = vec!["one".into(), "two".into(), "three".into()];
    });
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    let t0 = Instant::now();
    let resp = h.chat("m", true).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    // Streams tell caches and buffering proxies in front to pass them on.
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    assert_eq!(resp.headers()["x-helexa-node"], "node-a");
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    let mut body = resp.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        if String::from_utf8_lossy(&chunk).contains("data: {") {
            arrivals.push(t0.elapsed());
        }
        text.extend_from_slice(&chunk);
    }
    let total = t0.elapsed();
    // Three content chunks, 400 ms apart: the first must arrive long before
    // the stream ends, and consecutive ones with visible gaps between them.
    assert!(arrivals.len() >= 3, "arrivals {arrivals:?}");
    assert!(total >= Duration::from_millis(1100), "total {total:?}");
    assert!(
        arrivals[0] + Duration::from_millis(600) < total,
        "first chunk at {:?}, end at {total:?}: buffered",
        arrivals[0]
    );
    for w in arrivals.windows(2).take(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(200),
            "gaps {arrivals:?}"
        );
    }
    assert!(String::from_utf8_lossy(&text).ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn upstream_death_mid_stream_becomes_error_event() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    a.set(|bh| {
        bh.die_after_chunks = Some(2);
        // Let the head and first chunks go out before the death.
        bh.chunk_delay = Duration::from_millis(50);
    });
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    let resp = h.chat("m", true).await;
    assert_eq!(resp.status(), 200);
    let data = sse_data(resp).await;
    // Content first (the mock's last chunk may die unflushed with it), then
    // exactly one error event and [DONE].
    assert!((3..=4).contains(&data.len()), "{data:?}");
    assert!(data[0].contains("Hello"));
    let n = data.len();
    let err: serde_json::Value = serde_json::from_str(&data[n - 2]).expect("error event is JSON");
    assert_eq!(err["error"]["code"], "upstream_error", "{data:?}");
    assert_eq!(data[n - 1], "[DONE]");
    assert_eq!(data.iter().filter(|d| d.contains("\"error\"")).count(), 1);
}

#[tokio::test]
async fn client_going_away_closes_upstream() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    a.set(|bh| {
        bh.chunk_delay = Duration::from_millis(200);
        bh.chunks = (0..50).map(|i| format!("t{i}")).collect();
    });
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    let resp = h.chat("m", true).await;
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    assert_eq!(a.active(), 1);
    drop(body);
    // The mock must see its stream dropped long before its 10 s would end.
    wait_until("upstream closed", 5, || async {
        a.recorded().closed_early == 1
    })
    .await;
    assert_eq!(a.active(), 0);
    assert_eq!(a.recorded().completed, 0);
}

#[tokio::test]
async fn headers_request_id_node_and_status_pass_through() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    let resp = h
        .client
        .post(h.url("/v1/chat/completions"))
        .header("x-request-id", "client-id-42")
        .json(&chat_body("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-id-42");
    assert_eq!(resp.headers()["x-helexa-node"], "node-a");
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello, world!");
    // The neuron got the same id and the body unchanged.
    let rec = a.recorded();
    assert_eq!(rec.requests[0].headers["x-request-id"], "client-id-42");
    assert_eq!(rec.requests[0].json(), chat_body("m", false));
    // Without a client id, cortex makes one.
    let resp = h.chat("m", false).await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(id.len() >= 16, "{id}");
    // Other routes are proxied too (`/v1/responses` is translated to chat:
    // tests/responses.rs).
    for path in ["/v1/completions", "/v1/embeddings"] {
        let resp = h
            .post(
                path,
                &serde_json::json!({"model": "m", "prompt": "hi", "input": "hi"}),
            )
            .await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(node_of(&resp), "node-a");
    }
    assert_eq!(a.recorded().requests[3].path, "/v1/embeddings");
}

#[tokio::test]
async fn auth_token_is_sent_to_neurons() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let mut cfg = config(&[("node-a", &a)]);
    cfg.auth.token = Some("s3cret".into());
    let h = start(cfg).await;
    h.wait_replicas("m", 1).await;
    assert_eq!(h.chat("m", false).await.status(), 200);
    let rec = a.recorded();
    assert!(!rec.authorization.is_empty());
    assert!(
        rec.authorization.iter().all(|v| v == "Bearer s3cret"),
        "{:?}",
        rec.authorization
    );
    assert_eq!(rec.requests[0].headers["authorization"], "Bearer s3cret");
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    // One serving worker, so every request draws on the same pool.
    let (a, h) = one_neuron(|c| c.gateway.workers = 1).await;
    // Warm: the first request opens the connection.
    assert_eq!(h.chat("m", false).await.status(), 200);
    let before = a.connections();
    for i in 0..20 {
        let resp = h.chat("m", i % 2 == 0).await;
        assert_eq!(resp.status(), 200);
        let body = resp.text().await.unwrap();
        assert!(body.contains("Hello"), "{body}");
    }
    // The poller's control client may open one or two of its own meanwhile;
    // without keep-alive it would be 20 or more.
    let opened = a.connections() - before;
    assert!(
        opened <= 3,
        "{opened} new connections for 20 sequential requests"
    );
    assert_eq!(a.recorded().completed, 21);
}
