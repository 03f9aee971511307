//! The Prometheus exposition on `metrics_listen`.

mod common;
use common::*;
use helexa_testkit::{MockModel, MockNeuron};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn exposition_has_every_family_with_real_values() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 1000)]).await;
    a.set_model("m", |m| {
        m.in_flight = 3;
        m.queue_depth = 2;
    });
    a.set(|bh| bh.latency = Duration::from_millis(120));
    let h = start(config(&[("node-a", &a)])).await;
    h.wait_replicas("m", 1).await;
    // One streamed request with usage, one plain, one refused at the edge.
    let mut b = chat_body("m", true);
    b["stream_options"] = json!({"include_usage": true});
    let data = sse_data(h.post("/v1/chat/completions", &b).await).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    assert_eq!(h.chat("m", false).await.status(), 200);
    let long = json!({"model": "m", "prompt": "x".repeat(8000)});
    assert_eq!(h.post("/v1/completions", &long).await.status(), 400);

    // The mock adds its open requests to the reported in_flight: wait for a
    // poll that saw none open.
    wait_until("polled gauges", 20, || async {
        h.metrics()
            .await
            .contains("cortex_model_in_flight{model=\"m\",node=\"node-a\"} 3")
    })
    .await;
    let resp = h.client.get(&h.metrics_url).send().await.unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    for needle in [
        "cortex_requests_total{key=\"-\",model=\"m\",node=\"node-a\",status=\"200\"} 2",
        "cortex_requests_total{key=\"-\",model=\"m\",node=\"-\",status=\"400\"} 1",
        "cortex_prevalidation_rejections_total{model=\"m\"} 1",
        "cortex_neuron_up{node=\"node-a\"} 1",
        "cortex_model_in_flight{model=\"m\",node=\"node-a\"} 3",
        "cortex_model_queue_depth{model=\"m\",node=\"node-a\"} 2",
        "cortex_upstream_retries_total 0",
        "# TYPE cortex_request_duration_seconds histogram",
        "# TYPE cortex_time_to_first_token_seconds histogram",
        "cortex_time_to_first_token_seconds_count{model=\"m\"} 2",
        "cortex_request_duration_seconds_count{model=\"m\"} 3",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    // Latency is 120 ms: TTFT and duration land above the 0.1 s bucket.
    assert!(
        text.contains("cortex_time_to_first_token_seconds_bucket{model=\"m\",le=\"0.1\"} 0"),
        "{text}"
    );
    // Tokens come from upstream usage: 4 completion tokens per answer.
    assert!(
        text.contains("cortex_tokens_total{kind=\"completion\"} 8"),
        "{text}"
    );
    assert!(
        text.contains("cortex_tokens_total{kind=\"prompt\"}"),
        "{text}"
    );
    // A neuron going down shows as 0.
    a.set(|bh| bh.healthy = false);
    wait_until("neuron_up 0", 20, || async {
        h.metrics()
            .await
            .contains("cortex_neuron_up{node=\"node-a\"} 0")
    })
    .await;
}
