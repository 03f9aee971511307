//! cortex's configuration: TOML file, then `CORTEX_…` environment overrides.
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
    pub auth: AuthConfig,
    /// Client-facing model names mapped to fleet model ids.
    pub aliases: BTreeMap<String, String>,
    /// Client API keys and their limits (docs/protocol.md §7).
    pub keys: Vec<KeyConfig>,
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
            auth: AuthConfig::default(),
            aliases: BTreeMap::new(),
            keys: Vec::new(),
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
    /// Load a catalogued-but-unloaded model on demand (PROTOCOL §5.5).
    pub enabled: bool,
    /// How long a request is held while its model loads.
    pub timeout_ms: u64,
    /// SSE keep-alive comment interval for held streaming requests.
    pub keepalive_interval_ms: u64,
}

impl Default for LoadingConfig {
    fn default() -> Self {
        LoadingConfig {
            enabled: true,
            timeout_ms: 600_000,
            keepalive_interval_ms: 5_000,
        }
    }
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: line {line}, key `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
    #[error("invalid environment override {var}: key `{key}`: {message}")]
    Env {
        var: String,
        key: String,
        message: String,
    },
}

impl Config {
    /// Loads `path` (missing = defaults) and applies `CORTEX_…` overrides
    /// from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(ConfigError::Read {
                    path: display,
                    source: e,
                })
            }
        };
        Self::from_toml_with_env(&text, &display, env)
    }

    pub fn from_toml_with_env(
        text: &str,
        path: &str,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        // The file alone first, so an error can name its line and key.
        let mut table: toml::Table = match text.parse::<toml::Table>() {
            Ok(t) => t,
            Err(e) => {
                return Err(ConfigError::Invalid {
                    path: path.into(),
                    line: line_of(text, e.span()),
                    key: "-".into(),
                    message: e.message().to_string(),
                })
            }
        };
        if let Err((key, message)) = typed(&table) {
            let line = toml::from_str::<Config>(text)
                .err()
                .map(|e| line_of(text, e.span()))
                .unwrap_or_else(|| find_key_line(text, &key));
            return Err(ConfigError::Invalid {
                path: path.into(),
                line,
                key,
                message,
            });
        }
        for (var, value) in env {
            let Some(rest) = var.strip_prefix("CORTEX_") else {
                continue;
            };
            // Only nested keys (`__`) and the neuron list are overrides, so
            // that CORTEX_CONFIG / CORTEX_LOG stay free for flags.
            let keys: Vec<String> = rest.split("__").map(|k| k.to_ascii_lowercase()).collect();
            if keys.len() < 2 && rest != "NEURONS" && rest != "ALIASES" {
                continue;
            }
            set_path(&mut table, &keys, parse_env_value(value));
            if let Err((key, message)) = typed(&table) {
                return Err(ConfigError::Env {
                    var: var.clone(),
                    key,
                    message,
                });
            }
        }
        let config = typed(&table).map_err(|(key, message)| ConfigError::Env {
            var: "CORTEX_*".into(),
            key,
            message,
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.into(),
                line: find_key_line(text, &key),
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

fn typed(table: &toml::Table) -> Result<Config, (String, String)> {
    let value = toml::Value::Table(table.clone());
    serde_path_to_error::deserialize::<_, Config>(value).map_err(|e| {
        let key = e.path().to_string();
        (key, e.into_inner().to_string())
    })
}

fn parse_env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) {
    let (last, parents) = keys.split_last().expect("at least one key");
    let mut cur = table;
    for k in parents {
        let entry = cur
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        cur = entry.as_table_mut().expect("table");
    }
    cur.insert(last.clone(), value);
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> usize {
    match span {
        Some(r) => text[..r.start.min(text.len())].matches('\n').count() + 1,
        None => 0,
    }
}

/// Best-effort line of `a.b.key` in the file: the last segment at a line start.
fn find_key_line(text: &str, key: &str) -> usize {
    let last = key.rsplit('.').next().unwrap_or(key);
    text.lines()
        .position(|l| {
            let t = l.trim_start();
            t.starts_with(last) && t[last.len()..].trim_start().starts_with('=')
        })
        .map(|i| i + 1)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_means_defaults() {
        let c = Config::from_toml_with_env("", "x", &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.gateway.listen, "127.0.0.1:8080");
        assert_eq!(c.neurons[0].name, "local");
        assert_eq!(c.neurons[0].endpoint, "http://127.0.0.1:13131");
        assert_eq!(c.gateway.max_body_bytes, 33_554_432);
    }

    #[test]
    fn file_and_env_overrides() {
        let text = "[poll]\ninterval_ms = 250\n\n[[neurons]]\nname = \"node-a\"\nendpoint = \"http://10.0.0.5:13131\"\n";
        let env = vec![
            (
                "CORTEX_GATEWAY__LISTEN".to_string(),
                "0.0.0.0:9000".to_string(),
            ),
            ("CORTEX_POLL__TIMEOUT_MS".to_string(), "700".to_string()),
            ("CORTEX_CONFIG".to_string(), "/x.toml".to_string()),
            ("CORTEX_AUTH__TOKEN".to_string(), "s3cret".to_string()),
        ];
        let c = Config::from_toml_with_env(text, "x", &env).unwrap();
        assert_eq!(c.poll.interval_ms, 250);
        assert_eq!(c.poll.timeout_ms, 700);
        assert_eq!(c.gateway.listen, "0.0.0.0:9000");
        assert_eq!(c.neurons.len(), 1);
        assert_eq!(c.neurons[0].name, "node-a");
        assert_eq!(c.auth.token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn invalid_file_names_line_and_key() {
        let text = "[gateway]\nlisten = \"127.0.0.1:1\"\n\n[poll]\ninterval_ms = \"fast\"\n";
        let e = Config::from_toml_with_env(text, "/etc/c.toml", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/etc/c.toml"), "{msg}");
        assert!(msg.contains("line 5"), "{msg}");
        assert!(msg.contains("poll.interval_ms"), "{msg}");
        let e = Config::from_toml_with_env("[poll]\nbogus = 1\n", "c", &[]).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::from_toml_with_env("[poll\n", "c", &[]).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn bad_env_override_names_variable() {
        let env = vec![("CORTEX_POLL__INTERVAL_MS".to_string(), "soon".to_string())];
        let e = Config::from_toml_with_env("", "c", &env).unwrap_err();
        assert!(e.to_string().contains("CORTEX_POLL__INTERVAL_MS"), "{e}");
        assert!(e.to_string().contains("poll.interval_ms"), "{e}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The documented example shows every default, so it must equal them.
    #[test]
    fn example_config_is_the_defaults() {
        let text = include_str!("../../config/cortex.toml");
        let c = Config::from_toml_with_env(text, "config/cortex.toml", &[]).unwrap();
        assert_eq!(c, Config::default());
    }
}
