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
