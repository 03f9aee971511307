//! cortex's configuration: TOML file, then `CORTEX_…` environment overrides
//! (the layer shared with the neuron, `helexa-config`).
//!
//! Key names are a contract (docs/cortex.md); a missing file means defaults,
//! an invalid one is an error naming the file, the line and the key.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub poll: PollConfig,
    pub neurons: Vec<NeuronConfig>,
    pub upstream: UpstreamConfig,
    pub prevalidation: PrevalidationConfig,
    pub loading: LoadingConfig,
    pub translate: TranslateConfig,
    pub auth: AuthConfig,
    /// Client-facing model names mapped to fleet model ids.
    pub aliases: BTreeMap<String, String>,
    /// Client API keys and their limits (docs/protocol.md §7).
    pub keys: Vec<KeyConfig>,
    /// Per-model fleet policy (docs/protocol.md §6); a model without an
    /// entry gets `ModelPolicy::default()`.
    pub models: Vec<ModelPolicy>,
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            gateway: GatewayConfig::default(),
            poll: PollConfig::default(),
            neurons: vec![NeuronConfig {
                name: "local".into(),
                endpoint: "http://127.0.0.1:13131".into(),
            }],
            upstream: UpstreamConfig::default(),
            prevalidation: PrevalidationConfig::default(),
            loading: LoadingConfig::default(),
            translate: TranslateConfig::default(),
            auth: AuthConfig::default(),
            aliases: BTreeMap::new(),
            keys: Vec::new(),
            models: Vec::new(),
            admin: AdminConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: String,
    pub metrics_listen: String,
    pub max_body_bytes: usize,
    /// After SIGTERM/SIGINT, how long open requests may run before exit.
    pub drain_timeout_ms: u64,
    /// Threads serving the API, each with its own event loop, listener
    /// handle and upstream connection pool (as nginx's worker processes);
    /// 0 = one per core.
    pub workers: usize,
    /// Largest request head (request line and header fields); over it, `431`.
    pub max_header_bytes: usize,
    /// Once a request has begun, its head and body must arrive within this;
    /// and no write to the client may block longer (a client that stopped
    /// reading is given up, freeing its upstream).
    pub client_timeout_ms: u64,
    /// How long a client connection may idle between requests.
    pub keepalive_timeout_ms: u64,
    /// Client connections open at once, over every worker; at the cap no
    /// more are accepted until one closes (they wait in the backlog).
    pub max_connections: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:8080".into(),
            metrics_listen: "127.0.0.1:9464".into(),
            max_body_bytes: 32 * 1024 * 1024,
            drain_timeout_ms: 30_000,
            workers: 0,
            max_header_bytes: 64 * 1024,
            client_timeout_ms: 60_000,
            keepalive_timeout_ms: 75_000,
            max_connections: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PollConfig {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub unhealthy_after: u32,
    /// `/discovery` is re-read every this many polls once cached.
    pub discovery_every: u32,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            interval_ms: 1000,
            timeout_ms: 2000,
            unhealthy_after: 3,
            discovery_every: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NeuronConfig {
    pub name: String,
    pub endpoint: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// TCP connect to a neuron.
    pub connect_timeout_ms: u64,
    /// From sending the request to the response head.
    pub first_byte_timeout_ms: u64,
    /// Longest silence between two body chunks; no total stream timeout.
    pub idle_timeout_ms: u64,
    /// Idle keep-alive connections kept per neuron.
    pub pool_max_idle_per_host: usize,
    pub pool_idle_timeout_ms: u64,
    /// Largest refusal body kept to pass on when every replica refused.
    pub max_refusal_body_bytes: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout_ms: 2000,
            first_byte_timeout_ms: 300_000,
            idle_timeout_ms: 120_000,
            pool_max_idle_per_host: 256,
            pool_idle_timeout_ms: 90_000,
            max_refusal_body_bytes: 65_536,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PrevalidationConfig {
    pub enabled: bool,
    /// Estimate used when no tokenizer is available.
    pub chars_per_token: f64,
    /// Tokens added per chat message (role and template markers).
    pub per_message_tokens: u64,
    /// Tokens added once per request (assistant priming).
    pub per_request_tokens: u64,
    /// Fetch tokenizers from neurons for exact counts.
    pub fetch_tokenizer: bool,
    pub tokenizer_fetch_timeout_ms: u64,
    /// Largest tokenizer.json accepted.
    pub max_tokenizer_bytes: usize,
}

impl Default for PrevalidationConfig {
    fn default() -> Self {
        PrevalidationConfig {
            enabled: true,
            chars_per_token: 4.0,
            per_message_tokens: 4,
            per_request_tokens: 3,
            fetch_tokenizer: true,
            tokenizer_fetch_timeout_ms: 10_000,
            max_tokenizer_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoadingConfig {
    /// Load a catalogued-but-unloaded model on demand (docs/protocol.md §5.5).
    pub enabled: bool,
    /// How long a request is held while its model loads.
    pub timeout_ms: u64,
    /// SSE keep-alive comment interval for held streaming requests.
    pub keepalive_interval_ms: u64,
    /// Requests held for one model's load at once; beyond it `503
    /// model_loading` at once.
    pub max_waiters: usize,
    /// How long cortex waits for a neuron to answer `POST /models/load` or
    /// `/models/unload` (a held request gives up after `timeout_ms`, the
    /// load itself goes on until this).
    pub load_timeout_ms: u64,
}

impl Default for LoadingConfig {
    fn default() -> Self {
        LoadingConfig {
            enabled: true,
            timeout_ms: 600_000,
            keepalive_interval_ms: 5_000,
            max_waiters: 1024,
            load_timeout_ms: 900_000,
        }
    }
}

/// One `[[models]]` entry: how the fleet keeps a model (docs/protocol.md §6).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelPolicy {
    pub id: String,
    /// More client-facing names for it (beside the `[aliases]` table).
    pub aliases: Vec<String>,
    /// A load may evict models of equal or lower priority only.
    pub residency_priority: i32,
    /// Replicas kept loaded: loaded at start-up and whenever a node returns.
    pub min_replicas: u32,
    /// Autoscale ceiling.
    pub max_replicas: u32,
    /// Node names it may be loaded on; empty = any.
    pub pinned_on: Vec<String>,
    /// Replicas above `min_replicas` unused this long are unloaded; 0 = never.
    pub idle_unload_secs: u64,
    /// Every replica queued this long gets the model one more replica.
    pub scale_up_after_secs: u64,
}

impl Default for ModelPolicy {
    fn default() -> Self {
        ModelPolicy {
            id: String::new(),
            aliases: Vec::new(),
            residency_priority: 0,
            min_replicas: 0,
            max_replicas: 1,
            pinned_on: Vec::new(),
            idle_unload_secs: 0,
            scale_up_after_secs: 10,
        }
    }
}

/// The `/v1/responses` and `/v1/messages` translations (docs/protocol.md §4).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TranslateConfig {
    /// Largest single SSE event of an engine's chat stream that a
    /// translation reads. One event holds one piece of text or one tool
    /// call's arguments, far below this with any sane output limit; a
    /// bigger one ends the translated stream with an error (cortex must hold
    /// an event whole to translate it, so this bounds its memory per stream).
    pub max_event_bytes: usize,
}

impl Default for TranslateConfig {
    fn default() -> Self {
        TranslateConfig {
            max_event_bytes: 16 * 1024 * 1024,
        }
    }
}

impl ModelPolicy {
    /// Whether it may be loaded on the node called `node`.
    pub fn allows_node(&self, node: &str) -> bool {
        self.pinned_on.is_empty() || self.pinned_on.iter().any(|n| n == node)
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Enables `/admin/*` on the API listener; callers send
    /// `Authorization: Bearer <token>`. Unset = no admin API.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Shared secret sent to neurons as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Every `/v1` and `/admin` route needs a client key (`[[keys]]`).
    pub require_keys: bool,
}

/// One client API key (`[[keys]]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Appears in logs and metrics, never the key itself.
    pub name: String,
    /// Hex SHA-256 of the key.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Or: the environment variable holding the key.
    #[serde(default)]
    pub key_env: Option<String>,
    /// Globs over model ids and aliases this key may use; empty = all.
    #[serde(default)]
    pub models: Vec<String>,
    /// Requests per minute; 0 = unlimited.
    #[serde(default)]
    pub rpm: u64,
    /// Prompt + completion tokens per minute; 0 = unlimited.
    #[serde(default)]
    pub tpm: u64,
    /// Requests open at once; 0 = unlimited.
    #[serde(default)]
    pub max_concurrent: u32,
}

pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

pub use helexa_config::ConfigError;

/// cortex's configuration layer: `CORTEX_A__B` overrides key `a.b`;
/// `CORTEX_CONFIG`, `CORTEX_LOG_FORMAT` and `CORTEX_WORKER_THREADS` are flags.
pub const LAYER: helexa_config::Layer = helexa_config::Layer {
    prefix: "CORTEX_",
    not_keys: &["CONFIG", "LOG", "LOG_FORMAT", "WORKER_THREADS"],
};

impl Config {
    /// Loads `path` (missing = defaults) and applies `CORTEX_…` overrides
    /// from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = helexa_config::read_file(path)?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// As [`Config::load`] for file text `text` shown as `path` in errors.
    pub fn from_toml(text: &str, path: &str) -> Result<Config, ConfigError> {
        let config: Config = LAYER.load(None::<()>, text, path)?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.into(),
                line: helexa_config::find_key_line(text, &key),
                key,
                message,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if self.gateway.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err((
                "gateway.listen".into(),
                "not an address like 127.0.0.1:8080".into(),
            ));
        }
        if self
            .gateway
            .metrics_listen
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return Err((
                "gateway.metrics_listen".into(),
                "not an address like 127.0.0.1:9464".into(),
            ));
        }
        if self.gateway.max_connections == 0 {
            return Err((
                "gateway.max_connections".into(),
                "must be at least 1".into(),
            ));
        }
        if self.translate.max_event_bytes < 1024 {
            return Err((
                "translate.max_event_bytes".into(),
                "must be at least 1024".into(),
            ));
        }
        if self.poll.interval_ms == 0 {
            return Err(("poll.interval_ms".into(), "must be above 0".into()));
        }
        if self.poll.unhealthy_after == 0 {
            return Err(("poll.unhealthy_after".into(), "must be at least 1".into()));
        }
        let cpt = self.prevalidation.chars_per_token;
        if cpt.is_nan() || cpt <= 0.0 {
            return Err((
                "prevalidation.chars_per_token".into(),
                "must be above 0".into(),
            ));
        }
        if self.loading.max_waiters == 0 {
            return Err(("loading.max_waiters".into(), "must be at least 1".into()));
        }
        let mut ids = std::collections::HashSet::new();
        for m in &self.models {
            if m.id.trim().is_empty() {
                return Err((
                    "models.id".into(),
                    "every [[models]] entry needs an id".into(),
                ));
            }
            if !ids.insert(m.id.as_str()) {
                return Err(("models.id".into(), format!("duplicate model id `{}`", m.id)));
            }
            if m.max_replicas == 0 || m.max_replicas < m.min_replicas {
                return Err((
                    "models.max_replicas".into(),
                    format!(
                        "`{}`: max_replicas ({}) must be at least 1 and at least min_replicas ({})",
                        m.id, m.max_replicas, m.min_replicas
                    ),
                ));
            }
            for a in &m.aliases {
                if let Some(other) = self.aliases.get(a).filter(|t| *t != &m.id) {
                    return Err((
                        "models.aliases".into(),
                        format!(
                            "alias `{a}` names `{}` here and `{other}` in [aliases]",
                            m.id
                        ),
                    ));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for n in &self.neurons {
            if !names.insert(n.name.as_str()) {
                return Err((
                    "neurons.name".into(),
                    format!("duplicate neuron name `{}`", n.name),
                ));
            }
            // cortex speaks plain HTTP/1.1 to neurons (put TLS in a
            // tunnel or sidecar); an https:// endpoint would only fail at
            // request time, so it is refused here.
            if !n.endpoint.starts_with("http://") {
                return Err((
                    "neurons.endpoint".into(),
                    format!(
                        "`{}` must start with http:// (cortex does not speak TLS to neurons)",
                        n.endpoint
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
// figment::Jail's closures return figment::Error, which is large.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn empty_means_defaults() {
        let c = Config::from_toml("", "x").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.gateway.listen, "127.0.0.1:8080");
        assert_eq!(c.neurons[0].name, "local");
        assert_eq!(c.neurons[0].endpoint, "http://127.0.0.1:13131");
        assert_eq!(c.gateway.max_body_bytes, 33_554_432);
        assert_eq!(c.translate.max_event_bytes, 16 << 20);
    }

    #[test]
    fn translate_event_limit_is_read_and_checked() {
        let c = Config::from_toml(
            "[translate]
max_event_bytes = 4096
",
            "x",
        )
        .unwrap();
        assert_eq!(c.translate.max_event_bytes, 4096);
        let e = Config::from_toml(
            "[translate]
max_event_bytes = 10
",
            "x",
        )
        .unwrap_err();
        assert!(e.to_string().contains("translate.max_event_bytes"), "{e}");
    }

    #[test]
    fn file_and_env_overrides() {
        figment::Jail::expect_with(|jail| {
            let text = "[poll]\ninterval_ms = 250\n\n[[neurons]]\nname = \"node-a\"\nendpoint = \"http://10.0.0.5:13131\"\n";
            jail.set_env("CORTEX_GATEWAY__LISTEN", "0.0.0.0:9000");
            jail.set_env("CORTEX_POLL__TIMEOUT_MS", "700");
            jail.set_env("CORTEX_CONFIG", "/x.toml");
            jail.set_env("CORTEX_LOG_FORMAT", "json");
            jail.set_env("CORTEX_AUTH__TOKEN", "s3cret");
            jail.set_env("CORTEX_AUTH__REQUIRE_KEYS", "false");
            let c = Config::from_toml(text, "x").unwrap();
            assert_eq!(c.poll.interval_ms, 250);
            assert_eq!(c.poll.timeout_ms, 700);
            assert_eq!(c.gateway.listen, "0.0.0.0:9000");
            assert_eq!(c.neurons.len(), 1);
            assert_eq!(c.neurons[0].name, "node-a");
            assert_eq!(c.auth.token.as_deref(), Some("s3cret"));
            jail.set_env(
                "CORTEX_NEURONS",
                r#"[{name = "b", endpoint = "http://10.0.0.6:13131"}]"#,
            );
            let c = Config::from_toml(text, "x").unwrap();
            assert_eq!(c.neurons[0].name, "b");
            Ok(())
        });
    }

    #[test]
    fn invalid_file_names_line_and_key() {
        let text = "[gateway]\nlisten = \"127.0.0.1:1\"\n\n[poll]\ninterval_ms = \"fast\"\n";
        let e = Config::from_toml(text, "/etc/c.toml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/etc/c.toml"), "{msg}");
        assert!(msg.contains("line 5"), "{msg}");
        assert!(msg.contains("poll.interval_ms"), "{msg}");
        let e = Config::from_toml("[poll]\nbogus = 1\n", "c").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::from_toml("[poll\n", "c").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = Config::from_toml(
            "[[neurons]]\nname = \"a\"\nendpoint = \"https://x:1\"\n",
            "c",
        )
        .unwrap_err();
        assert!(e.to_string().contains("neurons.endpoint"), "{e}");
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    #[test]
    fn bad_env_override_names_variable() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CORTEX_POLL__INTERVAL_MS", "soon");
            let e = Config::from_toml("", "c").unwrap_err();
            assert!(e.to_string().contains("CORTEX_POLL__INTERVAL_MS"), "{e}");
            assert!(e.to_string().contains("poll.interval_ms"), "{e}");
            Ok(())
        });
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The documented example shows every default, so it must equal them.
    #[test]
    fn example_config_is_the_defaults() {
        let text = include_str!("../../config/cortex.toml");
        let c = Config::from_toml(text, "config/cortex.toml").unwrap();
        assert_eq!(c, Config::default());
    }
}
