//! Least-busy routing (docs/protocol.md §5): choice, flip, spread of a burst, ties.

mod common;
use common::*;
use helexa_testkit::{MockModel, MockNeuron};
use std::collections::HashMap;
use std::time::Duration;

#[tokio::test]
async fn least_busy_choice_and_flip() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let b = MockNeuron::start("b", vec![MockModel::loaded("m", 0)]).await;
    a.set_model("m", |m| m.in_flight = 5);
    let h = start(config(&[("node-a", &a), ("node-b", &b)])).await;
    h.wait_replicas("m", 2).await;
    // b is idle, a reports 5 in flight: b must win, every time.
    wait_until("b chosen", 20, || async {
        node_of(&h.chat("m", false).await) == "node-b"
    })
    .await;
    for _ in 0..5 {
        assert_eq!(node_of(&h.chat("m", false).await), "node-b");
    }
    // Flip: now b is busy (queue) and a is idle.
    a.set_model("m", |m| m.in_flight = 0);
    b.set_model("m", |m| m.queue_depth = 7);
    wait_until("a chosen after flip", 20, || async {
        node_of(&h.chat("m", false).await) == "node-a"
    })
    .await;
    for _ in 0..5 {
        assert_eq!(node_of(&h.chat("m", false).await), "node-a");
    }
    assert!(a.recorded().v1_count >= 5 && b.recorded().v1_count >= 5);
}

#[tokio::test]
async fn ties_break_by_node_name() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let b = MockNeuron::start("b", vec![MockModel::loaded("m", 0)]).await;
    // Config order is b first; the name decides, not the order.
    let h = start(config(&[("zeta", &b), ("alpha", &a)])).await;
    h.wait_replicas("m", 2).await;
    for _ in 0..3 {
        assert_eq!(node_of(&h.chat("m", false).await), "alpha");
    }
}

#[tokio::test]
async fn eight_concurrent_streams_split_evenly() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let b = MockNeuron::start("b", vec![MockModel::loaded("m", 0)]).await;
    for n in [&a, &b] {
        n.set(|bh| bh.chunk_delay = Duration::from_millis(150));
    }
    let mut cfg = config(&[("node-a", &a), ("node-b", &b)]);
    // Slow polls: the split must come from cortex's own count, not polling.
    cfg.poll.interval_ms = 60_000;
    let h = start(cfg).await;
    h.wait_replicas("m", 2).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = h.client.clone();
        let url = h.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .json(&chat_body("m", true))
                .send()
                .await
                .unwrap();
            let node = node_of(&resp);
            let data = sse_data(resp).await;
            (node, data)
        }));
        // Each request reaches cortex before the next starts.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let (node, data) = t.await.unwrap();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        *per_node.entry(node).or_default() += 1;
    }
    let ca = per_node.get("node-a").copied().unwrap_or(0);
    let cb = per_node.get("node-b").copied().unwrap_or(0);
    assert_eq!(ca + cb, 8);
    assert!((3..=5).contains(&ca), "uneven split: {per_node:?}");
}

#[tokio::test]
async fn unhealthy_neuron_is_skipped_and_pruned() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let b = MockNeuron::start("b", vec![MockModel::loaded("m", 0)]).await;
    let h = start(config(&[("node-a", &a), ("node-b", &b)])).await;
    h.wait_replicas("m", 2).await;
    a.set(|bh| bh.healthy = false);
    h.wait_replicas("m", 1).await;
    for _ in 0..4 {
        assert_eq!(node_of(&h.chat("m", false).await), "node-b");
    }
    // Healthy again on its first good poll: the tie goes to node-a again.
    a.set(|bh| bh.healthy = true);
    wait_until("a back", 20, || async {
        node_of(&h.chat("m", false).await) == "node-a"
    })
    .await;
}

#[tokio::test]
async fn models_a_neuron_stops_reporting_are_pruned() {
    let b = MockNeuron::start("b", vec![MockModel::loaded("m", 0)]).await;
    let mut cfg = config(&[("node-b", &b)]);
    cfg.poll.discovery_every = 1;
    let h = start(cfg).await;
    h.wait_replicas("m", 1).await;
    assert_eq!(h.chat("m", false).await.status(), 200);
    b.remove_model("m");
    wait_until("m pruned", 20, || async {
        h.chat("m", false).await.status() == 404
    })
    .await;
    let err = envelope(h.chat("m", false).await).await;
    assert_eq!(err["code"], "model_not_found");
}
