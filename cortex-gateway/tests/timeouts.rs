//! Upstream timeouts: first byte (504 before anything is sent) and idle
//! (an SSE error event mid-stream). There is no total stream timeout.

mod common;
use common::*;
use helexa_testkit::{MockModel, MockNeuron};
use std::time::Duration;

#[tokio::test]
async fn first_byte_timeout_is_504() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    a.set(|bh| bh.latency = Duration::from_secs(3));
    let mut cfg = config(&[("node-a", &a)]);
    cfg.upstream.first_byte_timeout_ms = 300;
    let h = start(cfg).await;
    h.wait_replicas("m", 1).await;
    let resp = h.chat("m", false).await;
    assert_eq!(resp.status(), 504);
    assert_eq!(envelope(resp).await["code"], "upstream_timeout");
}

#[tokio::test]
async fn idle_timeout_ends_stream_with_error_but_slow_steady_streams_live() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    a.set(|bh| bh.chunk_delay = Duration::from_millis(1500));
    let mut cfg = config(&[("node-a", &a)]);
    cfg.upstream.idle_timeout_ms = 500;
    let h = start(cfg).await;
    h.wait_replicas("m", 1).await;
    let data = sse_data(h.chat("m", true).await).await;
    let n = data.len();
    assert!(n >= 2, "{data:?}");
    assert!(data[n - 2].contains("upstream_timeout"), "{data:?}");
    assert_eq!(data[n - 1], "[DONE]");
    // Chunks 200 ms apart over a stream longer than the idle timeout: fine.
    a.set(|bh| {
        bh.chunk_delay = Duration::from_millis(200);
        bh.chunks = (0..6).map(|i| format!("t{i}")).collect();
    });
    let data = sse_data(h.chat("m", true).await).await;
    assert_eq!(data.len(), 7, "{data:?}");
    assert_eq!(data.last().unwrap(), "[DONE]");
}

/// A neuron that accepts connections and never answers (not even its
/// polls) costs one client one first-byte timeout: that request gets `504`,
/// the neuron is unhealthy from then on (its polls time out too), and the
/// next requests go straight to the healthy replica. A good poll heals it.
#[tokio::test]
async fn a_hung_neuron_costs_one_first_byte_timeout_once() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let b = MockNeuron::start("b", vec![MockModel::loaded("m", 0)]).await;
    let mut cfg = config(&[("node-a", &a), ("node-b", &b)]);
    cfg.upstream.first_byte_timeout_ms = 800;
    cfg.poll.timeout_ms = 400;
    let h = start(cfg).await;
    h.wait_replicas("m", 2).await;
    // One answered request caches node-a's endpoint (a hung endpoint
    // lookup is a refusal after the poll timeout, tried elsewhere).
    assert_eq!(node_of(&h.chat("m", false).await), "node-a");
    a.set(|bh| bh.hang = true);
    // Ties go to node-a: this one waits out the timeout.
    let t = std::time::Instant::now();
    let resp = h.chat("m", false).await;
    assert_eq!(resp.status(), 504);
    assert!(t.elapsed() >= Duration::from_millis(800));
    assert_eq!(envelope(resp).await["code"], "upstream_timeout");
    // The following ones do not wait for node-a at all.
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let resp = h.chat("m", false).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(node_of(&resp), "node-b");
        assert!(
            t.elapsed() < Duration::from_millis(700),
            "{:?}",
            t.elapsed()
        );
    }
    // Its polls time out, so it stays unhealthy.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(h
        .metrics()
        .await
        .contains(r#"cortex_neuron_up{node="node-a"} 0"#));
    assert_eq!(node_of(&h.chat("m", false).await), "node-b");
    // Answering again, it heals at the next good poll.
    a.set(|bh| bh.hang = false);
    wait_until("node-a is healthy again", 10, || async {
        h.metrics()
            .await
            .contains(r#"cortex_neuron_up{node="node-a"} 1"#)
    })
    .await;
}
