//! Harness for the end-to-end tests: starts the real `neuron` and `cortex`
//! binaries (built by the same `cargo test`/`nextest` run) with the real
//! default model, on free loopback ports, and tears them down on drop.

use futures_util::StreamExt;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MODEL_ID: &str = "smollm2-135m-instruct";
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The embedding model's id in the e2e configs, and its folder
/// (scripts/fetch-embedding-model).
pub const EMBED_MODEL_ID: &str = "all-minilm-l6-v2";
pub const EMBED_MODEL_DIR: &str = "all-MiniLM-L6-v2";

/// The folder holding this build's binaries (`target/<profile>`), found from
/// the test executable (`target/<profile>/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("deps dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("profile dir")
    } else {
        dir
    };
    dir.to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace (`cargo test --workspace` builds it)",
        p.display()
    );
    p
}

fn model_dir() -> PathBuf {
    std::env::var_os("HELEXA_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/helexa/models")
        })
}

/// The embedding model's folder, or `None` when it is absent.
pub fn embedding_model_path() -> Option<PathBuf> {
    let p = model_dir().join(EMBED_MODEL_DIR);
    p.join("model.safetensors").is_file().then_some(p)
}

/// The default model; a missing file fails the test with what to run.
pub fn model_path() -> PathBuf {
    let p = model_dir().join(MODEL_FILE);
    assert!(
        p.exists(),
        "the default model {} is missing: run scripts/fetch-model",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (TERM, then KILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(15)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Whether a process id is alive (not gone, not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // state is the field after the parenthesised command name
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// Direct children of `pid` (from /proc).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = vec![];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) {
            let rest = stat.rsplit(')').next().unwrap_or("");
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(pid) {
                out.push(child);
            }
        }
    }
    out
}

pub struct ClusterOptions {
    pub with_cortex: bool,
    pub max_in_flight: u32,
    /// Also serve this embedding model folder as `EMBED_MODEL_ID`.
    pub embedding_model: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            with_cortex: true,
            max_in_flight: 4,
            embedding_model: None,
        }
    }
}

/// One neuron serving the default model, and optionally a cortex before it.
pub struct Cluster {
    pub neuron: Proc,
    pub cortex: Option<Proc>,
    pub neuron_url: String,
    pub cortex_url: String,
    pub metrics_url: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub async fn start(opts: ClusterOptions) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let model = model_path();
        let neuron_port = free_port();
        let neuron_url = format!("http://127.0.0.1:{neuron_port}");
        let neuron_cfg = dir.path().join("neuron.toml");
        let mut text = format!(
            "listen = \"127.0.0.1:{neuron_port}\"\nmetrics_listen = \"127.0.0.1:0\"\nnode = \"e2e-node\"\n\n[[models]]\nid = \"{MODEL_ID}\"\npath = \"{}\"\npreload = true\nmax_in_flight = {}\nmax_queue_depth = 32\nmax_wait_secs = 120\n",
            model.display(),
            opts.max_in_flight
        );
        let mut ids = vec![MODEL_ID];
        if let Some(p) = &opts.embedding_model {
            text.push_str(&format!(
                "\n[[models]]\nid = \"{EMBED_MODEL_ID}\"\npath = \"{}\"\npreload = true\nmax_in_flight = 2\nmax_queue_depth = 32\nmax_wait_secs = 120\nmax_inputs = 64\n",
                p.display()
            ));
            ids.push(EMBED_MODEL_ID);
        }
        std::fs::write(&neuron_cfg, text).unwrap();
        let mut cmd = Command::new(binary("neuron"));
        cmd.arg("--config").arg(&neuron_cfg).env("RUST_LOG", "info");
        let neuron = Proc::spawn("neuron", cmd);
        let http = reqwest::Client::new();
        let mut cluster = Cluster {
            neuron,
            cortex: None,
            neuron_url,
            cortex_url: String::new(),
            metrics_url: String::new(),
            http,
            _dir: dir,
        };
        cluster
            .wait_neuron_loaded_all(&ids, Duration::from_secs(180))
            .await;
        if opts.with_cortex {
            let port = free_port();
            let mport = free_port();
            let cfg = cluster._dir.path().join("cortex.toml");
            std::fs::write(
                &cfg,
                format!(
                    "[gateway]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{mport}\"\n\n[poll]\ninterval_ms = 200\n\n[[neurons]]\nname = \"e2e-node\"\nendpoint = \"{}\"\n",
                    cluster.neuron_url
                ),
            )
            .unwrap();
            let mut cmd = Command::new(binary("cortex"));
            cmd.arg("--config").arg(&cfg).env("RUST_LOG", "info");
            cluster.cortex = Some(Proc::spawn("cortex", cmd));
            cluster.cortex_url = format!("http://127.0.0.1:{port}");
            cluster.metrics_url = format!("http://127.0.0.1:{mport}");
            for id in &ids {
                cluster
                    .wait_cortex_routes(id, Duration::from_secs(60))
                    .await;
            }
        }
        cluster
    }

    /// Polls the neuron's /health until the model is `loaded`.
    pub async fn wait_neuron_loaded(&mut self, limit: Duration) {
        self.wait_neuron_loaded_all(&[MODEL_ID], limit).await
    }

    /// Polls the neuron's /health until every one of `ids` is `loaded`.
    pub async fn wait_neuron_loaded_all(&mut self, ids: &[&str], limit: Duration) {
        let start = Instant::now();
        loop {
            assert!(self.neuron.is_running(), "neuron exited during start-up");
            if let Some(h) = self.neuron_health().await {
                if ids
                    .iter()
                    .all(|id| model_health_of(&h, id)["status"] == "loaded")
                {
                    return;
                }
            }
            assert!(
                start.elapsed() < limit,
                "neuron did not load {ids:?} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_cortex_routes(&mut self, model: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Some(c) = self.cortex.as_mut() {
                assert!(c.is_running(), "cortex exited during start-up");
            }
            if let Ok(r) = self
                .http
                .get(format!("{}/v1/models", self.cortex_url))
                .send()
                .await
            {
                if let Ok(v) = r.json::<Value>().await {
                    let loaded = v["data"]
                        .as_array()
                        .map(|d| {
                            d.iter()
                                .any(|m| m["id"] == model && m["status"] == "loaded")
                        })
                        .unwrap_or(false);
                    if loaded {
                        return;
                    }
                }
            }
            assert!(start.elapsed() < limit, "cortex never saw the model loaded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn neuron_health(&self) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/health", self.neuron_url))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// The gateway's base URL, or the neuron's when there is no cortex.
    pub fn api(&self) -> &str {
        if self.cortex.is_some() {
            &self.cortex_url
        } else {
            &self.neuron_url
        }
    }

    pub async fn post(&self, base: &str, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{base}{path}"))
            .json(body)
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        let v = r.json::<Value>().await.unwrap_or(Value::Null);
        (status, v)
    }

    /// The engine processes the neuron runs.
    pub fn engine_pids(&self) -> Vec<i32> {
        children_of(self.neuron.pid())
            .into_iter()
            .filter(|&p| pid_alive(p))
            .collect()
    }
}

/// The default model's entry in a neuron /health document.
pub fn model_health(h: &Value) -> Value {
    model_health_of(h, MODEL_ID)
}

/// Model `id`'s entry in a neuron /health document.
pub fn model_health_of(h: &Value, id: &str) -> Value {
    h["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == id))
        .cloned()
        .unwrap_or(Value::Null)
}

/// A chat body asking for a greedy answer.
pub fn chat_body(prompt: &str, max_tokens: u32) -> Value {
    serde_json::json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// A streamed answer: the data events in order with their arrival times.
pub struct Streamed {
    pub status: u16,
    pub events: Vec<(Duration, Value)>,
    pub done: bool,
}

impl Streamed {
    pub fn content(&self) -> String {
        self.events
            .iter()
            .filter_map(|(_, e)| e["choices"][0]["delta"]["content"].as_str())
            .collect()
    }

    pub fn content_chunks(&self) -> usize {
        self.events
            .iter()
            .filter(|(_, e)| {
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty())
            })
            .count()
    }
}

/// Posts `body` and reads the SSE answer with `eventsource-stream`.
pub async fn stream(http: &reqwest::Client, url: &str, body: &Value) -> Streamed {
    use eventsource_stream::Eventsource;
    let start = Instant::now();
    let r = http.post(url).json(body).send().await.expect("sent");
    let status = r.status().as_u16();
    let mut es = r.bytes_stream().eventsource();
    let mut events = vec![];
    let mut done = false;
    while let Some(ev) = es.next().await {
        let ev = ev.expect("well-formed SSE");
        if ev.data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(&ev.data).expect("JSON event");
        events.push((start.elapsed(), v));
    }
    Streamed {
        status,
        events,
        done,
    }
}
