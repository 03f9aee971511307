//! The agent's configuration: `neuron.toml`, then `NEURON_…` environment
//! overrides, then command-line flags (docs/protocol.md §1).
//!
//! Every key has a sane default, so a missing file is a working node that
//! serves the embedded default model. An invalid file is a start-up error
//! that names the file, the line and the key (toml's error carries the span);
//! unknown keys are refused rather than silently ignored, so typos show.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default listen address of the agent.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:13131";
/// Default address of the Prometheus listener.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9465";
/// Id of the embedded default model.
pub const DEFAULT_MODEL_ID: &str = "smollm2-135m-instruct";
/// File name of the embedded default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Folder of the default model when `$HELEXA_MODEL_DIR` is unset.
pub const DEFAULT_MODEL_DIR: &str = "~/.cache/helexa/models";
/// The configuration layer shared with cortex (`helexa-config`):
/// `NEURON_A__B` overrides key `a.b` (`NEURON_MODELS__0__MAX_QUEUE_DEPTH`
/// indexes `[[models]]`); `NEURON_CONFIG`, `NEURON_LOG` and
/// `NEURON_LOG_FORMAT` are read by the command line instead.
pub const LAYER: helexa_config::Layer = helexa_config::Layer {
    prefix: "NEURON_",
    not_keys: &["CONFIG", "LOG", "LOG_FORMAT"],
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an override: names the file, line and key, or the
    /// variable and key.
    #[error(transparent)]
    Layer(#[from] helexa_config::ConfigError),
    #[error("invalid configuration{}: {message}", .origin.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default())]
    Invalid {
        origin: Option<PathBuf>,
        message: String,
    },
}

/// The whole agent configuration. Field names are a contract: they are the
/// keys of `neuron.toml` and the `NEURON_…` variables.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the agent's HTTP API binds to.
    pub listen: String,
    /// Address of the Prometheus listener (`GET /metrics`).
    pub metrics_listen: String,
    /// Name of this node in the fleet (default: the hostname).
    pub node: Option<String>,
    /// Base URL cortex should use for this agent (`/models/{id}/endpoint`);
    /// default derived from `listen` (an unspecified address becomes the hostname).
    pub advertise_url: Option<String>,
    /// Program started for each engine (`<program> engine --model …`);
    /// default: this very executable.
    pub engine_program: Option<PathBuf>,
    /// How long an engine may take from spawn to `/health` 200.
    pub engine_ready_timeout_secs: u64,
    /// After SIGTERM, how long an engine gets before SIGKILL.
    pub engine_stop_timeout_secs: u64,
    /// How often each engine's `/health` is polled for `/health` figures.
    pub engine_poll_interval_ms: u64,
    /// How long one poll of a running engine's `/health` may take before it
    /// counts as a failed health check.
    pub engine_health_timeout_ms: u64,
    /// Consecutive failed health checks after which the engine is killed
    /// (SIGKILL to its process group) and restarted.
    pub engine_health_failures: u32,
    /// While requests stream from an engine: seconds without any response
    /// byte from it after which it is killed as stalled and restarted.
    pub engine_stall_timeout_secs: u64,
    /// Seconds an engine may take to send a request's response head; then
    /// the client gets `504 upstream_timeout`.
    pub engine_first_byte_timeout_secs: u64,
    /// On SIGTERM/SIGINT, how long running requests may take to finish.
    pub drain_timeout_secs: u64,
    /// On unload, how long in-flight requests of that model may take.
    pub unload_drain_secs: u64,
    /// First delay before restarting an engine that died; doubles per failure.
    pub restart_backoff_initial_ms: u64,
    /// Cap on the restart delay.
    pub restart_backoff_max_secs: u64,
    /// Consecutive failed restarts after which the model is marked `failed`.
    pub restart_max_attempts: u32,
    /// Largest request body accepted, bytes (`413 request_too_large` above).
    pub max_body_bytes: usize,
    /// `Retry-After` seconds sent with `503 model_busy`.
    pub busy_retry_after_secs: u64,
    /// `Retry-After` seconds sent with `503 model_loading` / `shutting_down`.
    pub loading_retry_after_secs: u64,
    /// Log format: `text` or `json`.
    pub log_format: String,
    /// MiB this node may give to loaded models (docs/protocol.md §6); a
    /// load whose estimate does not fit beside the loaded ones is refused
    /// with `507 insufficient_memory`. Unset: the free GPU memory (GPU
    /// nodes) or available host memory (CPU nodes) at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget_mb: Option<u64>,
    pub auth: AuthConfig,
    /// The models this node can serve (its catalogue).
    pub models: Vec<ModelSpec>,
    /// Registries speaking the Hugging Face hub HTTP API that `repo` models
    /// are fetched from, tried in order (docs/protocol.md §9).
    pub sources: Vec<SourceConfig>,
    /// The hub cache folder; default `$HF_HUB_CACHE`, else `$HF_HOME/hub`,
    /// else `~/.cache/huggingface/hub` (shared with other hub tools).
    pub hub_cache: Option<PathBuf>,
    /// How long a load keeps retrying (exponential back-off, 1 s doubling
    /// to 30 s) while every source is unreachable or failing transiently.
    pub download_retry_secs: u64,
    /// A download with no byte received for this long is dropped and resumed.
    pub download_stall_secs: u64,
}

/// One model registry speaking the Hugging Face hub HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Name used in logs, errors and a model's `source`.
    pub name: String,
    /// Base URL, e.g. `https://huggingface.co`.
    pub endpoint: String,
    /// Environment variable holding the bearer token sent to this source
    /// only (unset or empty: no token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

impl SourceConfig {
    /// The public hub, token from `$HF_TOKEN`.
    pub fn huggingface() -> Self {
        SourceConfig {
            name: "huggingface".into(),
            endpoint: "https://huggingface.co".into(),
            token_env: Some("HF_TOKEN".into()),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Shared secret: when set, every route but `GET /health` needs
    /// `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// One model this node can load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The model id clients send in `model`.
    pub id: String,
    /// A `.gguf` file or a safetensors directory; `~` expands. Exactly one
    /// of `path` and `repo` is set.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub path: PathBuf,
    /// A hub repository (`org/name`) fetched from `sources` instead of `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Branch, tag or commit of `repo` (default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Picks the GGUF file of `repo` whose name contains it (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<String>,
    /// Only this source (a `[[sources]]` name); default: each in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The repo (`org/name`) a GGUF `repo` lacking `tokenizer.json` /
    /// `tokenizer_config.json` takes them from; default: the base model its
    /// model card or its GGUF metadata names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_repo: Option<String>,
    /// Load at start-up.
    #[serde(default)]
    pub preload: bool,
    /// Requests running in the engine at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Requests waiting for a slot; beyond it `503 model_busy`.
    #[serde(default = "default_max_queue_depth")]
    pub max_queue_depth: u32,
    /// How long a request may wait for a slot before `503 model_busy`.
    #[serde(default = "default_max_wait_secs")]
    pub max_wait_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// The engine's prefix cache budget, MiB (engine default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache_mb: Option<u32>,
    /// Embedding models: padded tokens of one forward pass (engine default 8192).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<u32>,
    /// Embedding models: inputs one request may carry (engine default 2048).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inputs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<PathBuf>,
    /// Not a key: a `tokenizer_config.json` whose `chat_template` the
    /// engine takes (`--tokenizer-config`), set when a `repo` model's
    /// template comes from its base repo.
    #[serde(skip)]
    pub tokenizer_config: Option<PathBuf>,
    /// `cpu` or `cuda:N` (engine default: cpu).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Extra arguments appended to the engine's command line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

fn default_max_in_flight() -> u32 {
    4
}
fn default_max_queue_depth() -> u32 {
    32
}
fn default_max_wait_secs() -> u64 {
    30
}

impl ModelSpec {
    /// A spec with every optional key at its default.
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        ModelSpec {
            id: id.into(),
            path: path.into(),
            repo: None,
            revision: None,
            quant: None,
            source: None,
            base_repo: None,
            preload: false,
            max_in_flight: default_max_in_flight(),
            max_queue_depth: default_max_queue_depth(),
            max_wait_secs: default_max_wait_secs(),
            max_context: None,
            max_batch: None,
            max_output: None,
            threads: None,
            prefix_cache_mb: None,
            max_batch_tokens: None,
            max_inputs: None,
            tokenizer: None,
            chat_template: None,
            tokenizer_config: None,
            device: None,
            extra_args: Vec::new(),
        }
    }

    /// The embedded default model, preloaded. `$HELEXA_MODEL_DIR` replaces
    /// its folder.
    pub fn default_model() -> Self {
        Self::default_model_in(std::env::var_os("HELEXA_MODEL_DIR").map(PathBuf::from))
    }

    /// The default model with its folder given (`None`: the default folder).
    pub fn default_model_in(dir: Option<PathBuf>) -> Self {
        let dir = dir
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL_DIR));
        let mut spec = ModelSpec::new(DEFAULT_MODEL_ID, dir.join(DEFAULT_MODEL_FILE));
        spec.preload = true;
        spec
    }

    /// A spec fetched from a hub repository instead of a local path.
    pub fn from_repo(id: impl Into<String>, repo: impl Into<String>) -> Self {
        let mut spec = ModelSpec::new(id, PathBuf::new());
        spec.repo = Some(repo.into());
        spec
    }

    /// The revision of `repo` to fetch (`main` unless set).
    pub fn revision(&self) -> &str {
        self.revision
            .as_deref()
            .filter(|r| !r.is_empty())
            .unwrap_or("main")
    }

    /// The device indexes this spec runs on (`cuda:N` → `[N]`; CPU → `[]`).
    pub fn device_indexes(&self) -> Vec<u32> {
        match self.device.as_deref() {
            Some(d) => d
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| vec![n])
                .unwrap_or_else(|| if d == "cuda" { vec![0] } else { vec![] }),
            None => vec![],
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.to_string(),
            metrics_listen: DEFAULT_METRICS_LISTEN.to_string(),
            node: None,
            advertise_url: None,
            engine_program: None,
            engine_ready_timeout_secs: 300,
            engine_stop_timeout_secs: 10,
            engine_poll_interval_ms: 1000,
            engine_health_timeout_ms: 5000,
            engine_health_failures: 3,
            engine_stall_timeout_secs: 60,
            engine_first_byte_timeout_secs: 300,
            drain_timeout_secs: 30,
            unload_drain_secs: 30,
            restart_backoff_initial_ms: 500,
            restart_backoff_max_secs: 30,
            restart_max_attempts: 5,
            max_body_bytes: 16 * 1024 * 1024,
            busy_retry_after_secs: 1,
            loading_retry_after_secs: 2,
            log_format: "text".to_string(),
            memory_budget_mb: None,
            auth: AuthConfig::default(),
            models: vec![ModelSpec::default_model()],
            sources: vec![SourceConfig::huggingface()],
            hub_cache: None,
            download_retry_secs: 300,
            download_stall_secs: 60,
        }
    }
}

/// Expands a leading `~` to `$HOME`.
pub fn expand_tilde(path: &Path) -> PathBuf {
    let Ok(rest) = path.strip_prefix("~") else {
        return path.to_path_buf();
    };
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(rest),
        None => path.to_path_buf(),
    }
}

impl Config {
    /// Loads `path` (a missing file means defaults), applies `NEURON_…`
    /// overrides from the process environment, validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, utf8_env(std::env::vars_os()))
    }

    /// As [`Config::load`] with an explicit environment (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => (t, Some(p.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::info!(path = %p.display(), "config file not found; using defaults");
                    (String::new(), None)
                }
                Err(e) => {
                    return Err(ConfigError::Layer(helexa_config::ConfigError::Read {
                        path: p.to_path_buf(),
                        source: e,
                    }))
                }
            },
            None => (String::new(), None),
        };
        let shown = origin
            .clone()
            .unwrap_or_else(|| PathBuf::from("<defaults>"));
        let env: Vec<(String, String)> = env.into_iter().collect();
        let model_dir = env
            .iter()
            .find(|(k, _)| k == "HELEXA_MODEL_DIR")
            .map(|(_, v)| PathBuf::from(v));
        /// What a file without `[[models]]` gets: the default model.
        #[derive(Serialize)]
        struct Base {
            models: Vec<ModelSpec>,
        }
        let base = Base {
            models: vec![ModelSpec::default_model_in(model_dir)],
        };
        let mut config: Config =
            LAYER.load_with_env(Some(base), &text, &shown.display().to_string(), env)?;
        config
            .finish()
            .map_err(|message| ConfigError::Invalid { origin, message })?;
        Ok(config)
    }

    /// Expands paths and checks cross-field rules.
    pub fn finish(&mut self) -> Result<(), String> {
        self.listen_addr()?;
        self.metrics_addr()?;
        if self.engine_health_failures == 0 {
            return Err("engine_health_failures must be at least 1".into());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(format!(
                "log_format must be \"text\" or \"json\", got {:?}",
                self.log_format
            ));
        }
        if self.max_body_bytes == 0 {
            return Err("max_body_bytes must be at least 1".into());
        }
        if let Some(p) = &self.engine_program {
            self.engine_program = Some(expand_tilde(p));
        }
        if let Some(t) = &self.auth.token {
            if t.is_empty() {
                self.auth.token = None;
            }
        }
        if let Some(url) = &self.advertise_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "advertise_url must start with http:// or https://, got {url:?}"
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            if s.name.trim().is_empty() {
                return Err(format!("sources[{i}].name is empty"));
            }
            if !names.insert(s.name.clone()) {
                return Err(format!("sources[{i}].name {:?} appears twice", s.name));
            }
            if !(s.endpoint.starts_with("http://") || s.endpoint.starts_with("https://")) {
                return Err(format!(
                    "sources[{i}] ({}): endpoint must start with http:// or https://, got {:?}",
                    s.name, s.endpoint
                ));
            }
        }
        if let Some(p) = &self.hub_cache {
            self.hub_cache = Some(expand_tilde(p));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.models.iter_mut().enumerate() {
            if m.id.trim().is_empty() {
                return Err(format!("models[{i}].id is empty"));
            }
            if !seen.insert(m.id.clone()) {
                return Err(format!("models[{i}].id {:?} appears twice", m.id));
            }
            if m.max_in_flight == 0 {
                return Err(format!(
                    "models[{i}] ({}): max_in_flight must be at least 1",
                    m.id
                ));
            }
            if let Some(d) = &m.device {
                if d != "cpu" && !d.starts_with("cuda") {
                    return Err(format!(
                        "models[{i}] ({}): device must be \"cpu\" or \"cuda:N\", got {d:?}",
                        m.id
                    ));
                }
            }
            match (&m.repo, m.path.as_os_str().is_empty()) {
                (Some(_), false) => {
                    return Err(format!(
                        "models[{i}] ({}): set either path or repo, not both",
                        m.id
                    ))
                }
                (None, true) => {
                    return Err(format!("models[{i}] ({}): needs a path or a repo", m.id))
                }
                (Some(r), true) => {
                    if r.is_empty()
                        || r.starts_with('/')
                        || r.ends_with('/')
                        || r.split('/').count() > 2
                        || r.split('/').any(|p| p == "." || p == "..")
                    {
                        return Err(format!(
                            "models[{i}] ({}): repo must look like \"org/name\", got {r:?}",
                            m.id
                        ));
                    }
                    if let Some(b) = &m.base_repo {
                        if b.split('/').count() != 2
                            || b.split('/').any(|p| p.is_empty() || p == "." || p == "..")
                        {
                            return Err(format!(
                                "models[{i}] ({}): base_repo must look like \"org/name\", got {b:?}",
                                m.id
                            ));
                        }
                    }
                    if let Some(src) = &m.source {
                        if !names.contains(src) {
                            return Err(format!(
                                "models[{i}] ({}): source {src:?} is not in [[sources]]",
                                m.id
                            ));
                        }
                    }
                }
                (None, false) => {
                    if m.revision.is_some()
                        || m.quant.is_some()
                        || m.source.is_some()
                        || m.base_repo.is_some()
                    {
                        return Err(format!(
                            "models[{i}] ({}): revision, quant, source and base_repo need a repo",
                            m.id
                        ));
                    }
                }
            }
            m.path = expand_tilde(&m.path);
            m.tokenizer = m.tokenizer.as_deref().map(expand_tilde);
            m.chat_template = m.chat_template.as_deref().map(expand_tilde);
        }
        Ok(())
    }

    pub fn metrics_addr(&self) -> Result<SocketAddr, String> {
        self.metrics_listen.parse().map_err(|e| {
            format!(
                "metrics_listen {:?} is not an address: {e}",
                self.metrics_listen
            )
        })
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen
            .parse()
            .map_err(|e| format!("listen {:?} is not an address: {e}", self.listen))
    }

    /// The node name: `node`, else the hostname.
    pub fn node_name(&self) -> String {
        self.node
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(crate::discovery::hostname)
    }

    pub fn model(&self, id: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.id == id)
    }

    pub fn engine_ready_timeout(&self) -> Duration {
        Duration::from_secs(self.engine_ready_timeout_secs)
    }
    pub fn engine_stop_timeout(&self) -> Duration {
        Duration::from_secs(self.engine_stop_timeout_secs)
    }
    pub fn engine_poll_interval(&self) -> Duration {
        Duration::from_millis(self.engine_poll_interval_ms.max(10))
    }
    pub fn engine_health_timeout(&self) -> Duration {
        Duration::from_millis(self.engine_health_timeout_ms.max(1))
    }
    pub fn engine_stall_timeout(&self) -> Duration {
        Duration::from_secs(self.engine_stall_timeout_secs.max(1))
    }
    pub fn engine_first_byte_timeout(&self) -> Duration {
        Duration::from_secs(self.engine_first_byte_timeout_secs.max(1))
    }
    /// The hub cache folder: `hub_cache`, else `$HF_HUB_CACHE`, else
    /// `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub fn hub_cache_dir(&self) -> PathBuf {
        if let Some(p) = &self.hub_cache {
            return p.clone();
        }
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(p) = var("HF_HUB_CACHE") {
            return expand_tilde(Path::new(&p));
        }
        if let Some(p) = var("HF_HOME") {
            return expand_tilde(Path::new(&p)).join("hub");
        }
        expand_tilde(Path::new("~/.cache/huggingface/hub"))
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
    pub fn unload_drain(&self) -> Duration {
        Duration::from_secs(self.unload_drain_secs)
    }
}

pub use helexa_config::utf8_env;

/// Re-exported so that docs and tests can list defaults.
pub fn defaults_as_toml() -> String {
    toml::to_string_pretty(&Config::default()).unwrap_or_default()
}

/// A map of model id → spec, in catalogue order.
pub fn catalogue(config: &Config) -> BTreeMap<String, ModelSpec> {
    config
        .models
        .iter()
        .map(|m| (m.id.clone(), m.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn missing_file_means_defaults_with_default_model() {
        let c = Config::load_with_env(
            Some(Path::new("/nonexistent/neuron.toml")),
            env(&[("HELEXA_MODEL_DIR", "/srv/models"), ("HOME", "/home/x")]),
        )
        .unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.models.len(), 1);
        let m = &c.models[0];
        assert_eq!(m.id, DEFAULT_MODEL_ID);
        assert_eq!(
            m.path,
            PathBuf::from("/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        assert!(m.preload);
        assert_eq!(
            (m.max_in_flight, m.max_queue_depth, m.max_wait_secs),
            (4, 32, 30)
        );
        assert!(c.auth.token.is_none());
    }

    #[test]
    fn file_and_env_overrides() {
        let f = write(
            r#"
listen = "0.0.0.0:9000"
node = "box"
[auth]
token = "t"
[[models]]
id = "a"
path = "/m/a.gguf"
max_in_flight = 2
device = "cuda:1"
"#,
        );
        let c = Config::load_with_env(
            Some(f.path()),
            env(&[
                ("NEURON_LISTEN", "127.0.0.1:1"),
                ("NEURON_NODE", "other"),
                ("NEURON_MODELS__0__MAX_QUEUE_DEPTH", "7"),
                ("NEURON_AUTH__TOKEN", "sekret"),
                ("NEURON_CONFIG", "/ignored"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:1");
        assert_eq!(c.node_name(), "other");
        assert_eq!(c.auth.token.as_deref(), Some("sekret"));
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.models[0].max_in_flight, 2);
        assert_eq!(c.models[0].max_queue_depth, 7);
        assert_eq!(c.models[0].device_indexes(), vec![1]);
        assert!(!c.models[0].preload);
    }

    #[test]
    fn invalid_file_names_path_line_and_key() {
        let f = write("listen = \"127.0.0.1:1\"\n[[models]]\nid = \"a\"\npath = \"/a\"\nmax_in_flight = \"many\"\n");
        let e = Config::load_with_env(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&f.path().display().to_string()), "{e}");
        assert!(e.contains("line 5"), "{e}");
        assert!(e.contains("max_in_flight"), "{e}");
        let f = write("lisen = \"x\"\n");
        let e = Config::load_with_env(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn bad_env_and_bad_values_are_named() {
        let e = Config::load_with_env(None, env(&[("NEURON_MAX_BODY_BYTES", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("NEURON_MAX_BODY_BYTES"), "{e}");
        let e = Config::load_with_env(None, env(&[("NEURON_LISTEN", "nowhere")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
        let e = Config::load_with_env(None, env(&[("NEURON_METRICS_LISTEN", "nowhere")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics_listen"), "{e}");
        let e = Config::load_with_env(None, env(&[("NEURON_ENGINE_HEALTH_FAILURES", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("engine_health_failures"), "{e}");
        let c =
            Config::load_with_env(None, env(&[("NEURON_ENGINE_HEALTH_FAILURES", "1")])).unwrap();
        assert_eq!(c.engine_health_failures, 1);
        let f =
            write("[[models]]\nid = \"a\"\npath = \"/a\"\n[[models]]\nid = \"a\"\npath = \"/b\"\n");
        let e = Config::load_with_env(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn non_utf8_variables_are_skipped_not_fatal() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![0x66, 0xff, 0x6f]);
        let vars = vec![
            (OsString::from("NEURON_NODE"), OsString::from("n1")),
            (OsString::from("NEURON_LISTEN"), bad.clone()),
            (bad, OsString::from("x")),
        ];
        let env = utf8_env(vars);
        assert_eq!(env, vec![("NEURON_NODE".to_string(), "n1".to_string())]);
        let c = Config::load_with_env(None, env).unwrap();
        assert_eq!(c.node_name(), "n1");
        assert_eq!(c.listen, DEFAULT_LISTEN);
    }

    #[test]
    fn tilde_expands() {
        let f = write("[[models]]\nid = \"a\"\npath = \"~/m.gguf\"\n");
        let c = Config::load_with_env(Some(f.path()), env(&[])).unwrap();
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(c.models[0].path, PathBuf::from(home).join("m.gguf"));
        }
    }

    #[test]
    fn empty_models_list_is_allowed() {
        let f = write("models = []\n");
        let c = Config::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert!(c.models.is_empty());
    }

    #[test]
    fn repo_models_and_sources() {
        let f = write(
            r#"
hub_cache = "~/hub"
[[sources]]
name = "mirror"
endpoint = "http://mirror:8080"
token_env = "MIRROR_TOKEN"
[[sources]]
name = "huggingface"
endpoint = "https://huggingface.co"
[[models]]
id = "a"
repo = "org/a-GGUF"
quant = "Q4_1"
source = "mirror"
base_repo = "org/a"
"#,
        );
        let c = Config::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(c.sources.len(), 2);
        assert_eq!(c.sources[0].token_env.as_deref(), Some("MIRROR_TOKEN"));
        assert_eq!(c.sources[1].token_env, None);
        let m = &c.models[0];
        assert_eq!(m.repo.as_deref(), Some("org/a-GGUF"));
        assert_eq!(m.base_repo.as_deref(), Some("org/a"));
        assert_eq!(m.revision(), "main");
        assert_eq!(m.path, PathBuf::new());
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(c.hub_cache_dir(), PathBuf::from(home).join("hub"));
        }
        let d = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(d.sources, vec![SourceConfig::huggingface()]);
        assert_eq!((d.download_retry_secs, d.download_stall_secs), (300, 60));

        for (text, word) in [
            ("[[models]]\nid = \"a\"\n", "needs a path or a repo"),
            (
                "[[models]]\nid = \"a\"\npath = \"/a\"\nrepo = \"o/a\"\n",
                "not both",
            ),
            (
                "[[models]]\nid = \"a\"\nrepo = \"o/a\"\nsource = \"nope\"\n",
                "not in [[sources]]",
            ),
            ("[[models]]\nid = \"a\"\nrepo = \"o/a/b\"\n", "org/name"),
            (
                "[[models]]\nid = \"a\"\nrepo = \"o/a\"\nbase_repo = \"b\"\n",
                "base_repo must look like",
            ),
            (
                "[[models]]\nid = \"a\"\npath = \"/a\"\nbase_repo = \"o/b\"\n",
                "need a repo",
            ),
            (
                "[[models]]\nid = \"a\"\npath = \"/a\"\nquant = \"Q4\"\n",
                "need a repo",
            ),
            (
                "[[sources]]\nname = \"x\"\nendpoint = \"ftp://x\"\n",
                "endpoint",
            ),
        ] {
            let f = write(text);
            let e = Config::load_with_env(Some(f.path()), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(word), "{word} in {e}");
        }
    }

    #[test]
    fn example_config_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/neuron.toml");
        let c = Config::load_with_env(Some(&path), env(&[])).unwrap();
        let d = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(
            toml::to_string(&c).unwrap(),
            toml::to_string(&d).unwrap(),
            "config/neuron.toml shows every default"
        );
    }
}
