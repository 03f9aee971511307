//! Retry before the first byte: refusals skip to the next replica; when all
//! refuse the client gets the last refusal intact.

mod common;
use common::*;
use helexa_testkit::{MockModel, MockNeuron, Refusal};

fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn busy_replica_is_skipped() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let b = MockNeuron::start("b", vec![MockModel::loaded("m", 0)]).await;
    // a is the best by name, but refuses with 503 model_busy.
    a.set(|bh| bh.refuse = Some(Refusal::busy(3)));
    let h = start(config(&[("node-a", &a), ("node-b", &b)])).await;
    h.wait_replicas("m", 2).await;
    let resp = h.chat("m", false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(node_of(&resp), "node-b");
    assert_eq!(a.recorded().v1_count, 1, "a was tried first");
    assert_eq!(b.recorded().v1_count, 1);
    let m = h.metrics().await;
    assert_eq!(
        metric_value(&m, "cortex_upstream_retries_total"),
        1.0,
        "{m}"
    );
    // 429 is a refusal too, and streams retry the same way.
    a.set(|bh| bh.refuse = Some(Refusal::rate_limited(2)));
    let resp = h.chat("m", true).await;
    assert_eq!(node_of(&resp), "node-b");
    assert_eq!(sse_data(resp).await.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn connection_refused_is_skipped() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let b = MockNeuron::start("b", vec![MockModel::loaded("m", 0)]).await;
    // a's control routes answer, but its inference endpoint is a dead port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    a.set(|bh| bh.endpoint_override = Some(dead_url));
    let h = start(config(&[("node-a", &a), ("node-b", &b)])).await;
    h.wait_replicas("m", 2).await;
    let resp = h.chat("m", false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(node_of(&resp), "node-b");
    assert_eq!(b.recorded().v1_count, 1);
}

#[tokio::test]
async fn all_busy_passes_last_refusal_intact() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let b = MockNeuron::start("b", vec![MockModel::loaded("m", 0)]).await;
    a.set(|bh| bh.refuse = Some(Refusal::busy(4)));
    b.set(|bh| bh.refuse = Some(Refusal::busy(9)));
    let h = start(config(&[("node-a", &a), ("node-b", &b)])).await;
    h.wait_replicas("m", 2).await;
    let resp = h.chat("m", true).await;
    assert_eq!(resp.status(), 503);
    // b is tried last (name order), so its Retry-After and body come back.
    assert_eq!(resp.headers()["retry-after"], "9");
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let err = envelope(resp).await;
    assert_eq!(err["code"], "model_busy");
    assert_eq!(err["message"], "mock neuron is busy");
    assert_eq!(a.recorded().v1_count, 1);
    assert_eq!(b.recorded().v1_count, 1);
}

#[tokio::test]
async fn all_unreachable_is_502_upstream_error() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    a.set(|bh| bh.endpoint_override = Some(dead_url));
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    let resp = h.chat("m", false).await;
    assert_eq!(resp.status(), 502);
    assert!(resp.headers().get("retry-after").is_none());
    assert_eq!(envelope(resp).await["code"], "upstream_error");
}
