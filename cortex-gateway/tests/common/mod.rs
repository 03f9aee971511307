//! Shared helpers: a real cortex in-process on 127.0.0.1:0 in front of mock
//! neurons, plus bounded waiting (the test machine is small and busy).
#![allow(dead_code)]

use cortex_gateway::config::NeuronConfig;
use cortex_gateway::{Config, Running};
use futures_util::StreamExt;
use helexa_testkit::MockNeuron;
use serde_json::{json, Value};
use std::future::Future;
use std::time::{Duration, Instant};

pub struct Harness {
    pub cortex: Running,
    pub client: reqwest::Client,
    pub base: String,
    pub metrics_url: String,
}

/// A test config: ephemeral ports, fast polls, the given neurons.
pub fn config(neurons: &[(&str, &MockNeuron)]) -> Config {
    let mut c = Config::default();
    c.gateway.listen = "127.0.0.1:0".into();
    c.gateway.metrics_listen = "127.0.0.1:0".into();
    c.poll.interval_ms = 50;
    c.poll.timeout_ms = 2000;
    c.neurons = neurons
        .iter()
        .map(|(name, m)| NeuronConfig {
            name: name.to_string(),
            endpoint: m.url(),
        })
        .collect();
    c
}

pub async fn start(config: Config) -> Harness {
    let cortex = cortex_gateway::start(config).await.expect("cortex starts");
    Harness {
        base: format!("http://{}", cortex.addr),
        metrics_url: format!("http://{}/metrics", cortex.metrics_addr),
        cortex,
        client: reqwest::Client::new(),
    }
}

/// One mock neuron `a` serving `m` (context unknown) behind a cortex whose
/// config `tune` adjusts; returns once `m` has its replica.
pub async fn one_neuron(tune: impl FnOnce(&mut Config)) -> (MockNeuron, Harness) {
    let a = MockNeuron::start("a", vec![helexa_testkit::MockModel::loaded("m", 0)]).await;
    let mut cfg = config(&[("node-a", &a)]);
    tune(&mut cfg);
    let h = start(cfg).await;
    h.wait_replicas("m", 1).await;
    (a, h)
}

/// Polls `f` until it is true, failing the test after `secs` seconds.
pub async fn wait_until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

impl Harness {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn models(&self) -> Value {
        self.client
            .get(self.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until `/v1/models` shows `model` with `replicas` loaded replicas.
    pub async fn wait_replicas(&self, model: &str, replicas: u64) {
        wait_until(&format!("{model} has {replicas} replicas"), 20, || async {
            let v = self.models().await;
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"] == model && m["replicas"] == replicas)
        })
        .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("cortex answers")
    }

    pub async fn chat(&self, model: &str, stream: bool) -> reqwest::Response {
        self.post("/v1/chat/completions", &chat_body(model, stream))
            .await
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(&self.metrics_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Whether a tpm bucket read `spent` tokens lower than at `since`, after
/// an answer that used `used`: the bucket refills at tpm/60 a second, so
/// the allowance grows with the time since (plus one for flooring).
#[allow(dead_code)]
pub fn charged(spent: i64, used: i64, tpm: u64, since: Instant) -> bool {
    let refilled = (since.elapsed().as_secs_f64() * tpm as f64 / 60.0).ceil() as i64;
    spent <= used + 1 && spent >= used - refilled - 1
}

pub fn chat_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream,
           "messages": [{"role": "user", "content": "hello world"}]})
}

pub fn node_of(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-helexa-node")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// SSE events (data fields) of a whole response, parsed by eventsource-stream.
pub async fn sse_data(resp: reqwest::Response) -> Vec<String> {
    use eventsource_stream::Eventsource;
    let mut out = Vec::new();
    let mut events = resp.bytes_stream().eventsource();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(ev) => out.push(ev.data),
            Err(e) => {
                out.push(format!("<transport error: {e}>"));
                break;
            }
        }
    }
    out
}

/// The `error` object of an envelope body.
pub async fn envelope(resp: reqwest::Response) -> Value {
    let v: Value = resp.json().await.expect("JSON error envelope");
    assert!(v["error"].is_object(), "not an envelope: {v}");
    assert!(v["error"]["message"].is_string(), "no message: {v}");
    assert!(v["error"]["type"].is_string(), "no type: {v}");
    v["error"].clone()
}
