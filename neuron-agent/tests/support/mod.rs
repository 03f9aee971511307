//! Helpers for the agent's integration tests: a real agent in-process on
//! 127.0.0.1:0 whose engines are the `fake_engine` example.

#![allow(dead_code)]

use neuron_agent::config::{Config, ModelSpec};
use neuron_agent::Agent;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `target/<profile>/examples/fake_engine`, built by `cargo test`.
pub fn fake_engine() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join("fake_engine");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test -p neuron-agent` (which builds examples) or `cargo build -p neuron-agent --example fake_engine`",
        path.display()
    );
    path
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A model spec whose "weights" file tells the fake engine how to behave.
    /// Its event log is `log_path(id)`.
    pub fn model(&self, id: &str, mut behaviour: Value) -> ModelSpec {
        behaviour["log"] = Value::String(self.log_path(id).display().to_string());
        let path = self.dir.path().join(format!("{id}.json"));
        std::fs::write(&path, behaviour.to_string()).unwrap();
        ModelSpec::new(id, path)
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("{id}.log"))
    }

    pub fn log(&self, id: &str) -> Vec<String> {
        std::fs::read_to_string(self.log_path(id))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Pids the fake engine of `id` has logged (one per start).
    pub fn pids(&self, id: &str) -> Vec<u32> {
        self.log(id)
            .iter()
            .filter_map(|l| l.strip_prefix("pid ")?.parse().ok())
            .collect()
    }
}

/// A test configuration: fast timeouts, the fake engine, port 0.
pub fn config(models: Vec<ModelSpec>) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".into(),
        metrics_listen: "127.0.0.1:0".into(),
        node: Some("test-node".into()),
        engine_program: Some(fake_engine()),
        engine_ready_timeout_secs: 20,
        engine_stop_timeout_secs: 2,
        engine_poll_interval_ms: 50,
        drain_timeout_secs: 5,
        unload_drain_secs: 5,
        restart_backoff_initial_ms: 50,
        restart_backoff_max_secs: 1,
        restart_max_attempts: 3,
        models,
        ..Config::default()
    };
    c.finish().unwrap();
    c
}

pub async fn start(config: Config) -> Agent {
    Agent::start(config).await.expect("agent starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub async fn get(agent: &Agent, path: &str) -> (u16, Value) {
    let r = client()
        .get(format!("{}{path}", agent.url()))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v = r.json().await.unwrap_or(Value::Null);
    (status, v)
}

pub async fn post(agent: &Agent, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", agent.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
}

pub async fn post_json(agent: &Agent, path: &str, body: Value) -> (u16, Value) {
    let r = post(agent, path, body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The agent's `/metrics` text.
pub async fn scrape(agent: &Agent) -> String {
    let r = client()
        .get(format!("{}/metrics", agent.metrics_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    r.text().await.unwrap()
}

/// The value of one sample (`name{labels}` exactly as exposed, labels in
/// name order), 0 when the series is absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

/// Polls `f` every 20 ms until it is true or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The `/health` entry of one model (Null if absent).
pub async fn model_health(agent: &Agent, id: &str) -> Value {
    let (_, h) = get(agent, "/health").await;
    h["models"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"] == id).cloned())
        .unwrap_or(Value::Null)
}

/// True while a process with this pid exists (zombies included).
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

pub fn chat(model: &str, fake: Value, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        "fake": fake,
    })
}
