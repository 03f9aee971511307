//! Shutdown: stop accepting, let open streams finish up to the drain
//! timeout, then stop.

mod common;
use common::*;
use helexa_testkit::{MockModel, MockNeuron};
use std::time::{Duration, Instant};

#[tokio::test]
async fn open_stream_finishes_during_drain() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    a.set(|bh| bh.chunk_delay = Duration::from_millis(150));
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    let resp = h.chat("m", true).await;
    let addr = h.cortex.addr;
    h.cortex.shutdown();
    let data = sse_data(resp).await;
    assert_eq!(
        data.last().unwrap(),
        "[DONE]",
        "stream cut by shutdown: {data:?}"
    );
    assert_eq!(data.len(), 5);
    tokio::time::timeout(Duration::from_secs(10), h.cortex.wait())
        .await
        .expect("cortex stops after draining");
    // No longer accepting.
    assert!(reqwest::Client::new()
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .is_err());
}

#[tokio::test]
async fn drain_is_bounded_by_its_timeout() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    a.set(|bh| {
        bh.chunk_delay = Duration::from_millis(500);
        bh.chunks = (0..100).map(|i| format!("t{i}")).collect();
    });
    let mut cfg = config(&[("node-a", &a)]);
    cfg.gateway.drain_timeout_ms = 700;
    let h = start(cfg).await;
    h.wait_replicas("m", 1).await;
    let resp = h.chat("m", true).await;
    assert_eq!(resp.status(), 200);
    let t0 = Instant::now();
    h.cortex.shutdown();
    tokio::time::timeout(Duration::from_secs(10), h.cortex.wait())
        .await
        .expect("drain timeout ends the wait");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(600),
        "stopped before the drain timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(8), "{took:?}");
    drop(resp);
}
