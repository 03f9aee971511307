//! The one shared object of a running cortex: config, fleet, clients, metrics.
//!
//! Built once at start-up and handed to handlers, the poller and the loader
//! as `Arc<Gateway>`, so tests build exactly what the binary builds.

use crate::config::{ms, Config};
use crate::fleet::{Fleet, Neuron};
use crate::keys::{KeyTable, Keys};
use crate::loader::Loader;
use crate::metrics::Metrics;
use crate::tokens::Tokenizers;
use crate::upstream::Upstream;
use http::{header, HeaderMap, HeaderValue};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct Gateway {
    pub config: Config,
    pub fleet: Fleet,
    pub metrics: Metrics,
    /// Control routes (`/health`, `/models`, ...): short timeouts.
    pub control: reqwest::Client,
    /// `/v1/*` forwarding: pooled keep-alive connections per serving
    /// worker, no total timeout.
    pub upstream: Upstream,
    pub tokenizers: Tokenizers,
    pub loader: Loader,
    /// Set once shutdown has begun: `/ready` turns 503.
    pub draining: AtomicBool,
    /// Client API keys and their live limits (replaced on reload).
    pub keys: KeyTable,
    /// One permit per open client connection (`gateway.max_connections`),
    /// shared by every worker.
    pub connections: Arc<tokio::sync::Semaphore>,
    /// The runtime the poller runs on: control-plane work started from an
    /// API worker (tokenizer fetches, loads) runs here, so the `control`
    /// client and its pooled connections live on one runtime only.
    pub main: tokio::runtime::Handle,
    /// Exact token counts run off the API workers, this many at once.
    pub counting: tokio::sync::Semaphore,
    /// `[[models]]` and aliases in force (replaced whole on reload).
    policy: std::sync::RwLock<Arc<crate::policy::Policy>>,
    /// The file reloads re-read (`SIGHUP`, `POST /admin/reload`); set by
    /// the binary, or by a test.
    pub config_path: std::sync::OnceLock<std::path::PathBuf>,
}

/// Why a gateway could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("invalid configuration: key `{0}`: {1}")]
    Config(String, String),
}

/// `Authorization: Bearer <token>` for the neurons, when `[auth] token` is set.
pub fn bearer(config: &Config) -> Option<HeaderValue> {
    let token = config.auth.token.as_deref().filter(|t| !t.is_empty())?;
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// The key table of `config`, reading `key_env` variables from the process.
pub fn keys_of(config: &Config) -> Result<Keys, BuildError> {
    Keys::from_config(config, |var| {
        std::env::var_os(var).and_then(|v| v.into_string().ok())
    })
    .map_err(|(k, m)| BuildError::Config(k, m))
}

impl Gateway {
    /// The fleet policy in force.
    pub fn policy(&self) -> Arc<crate::policy::Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `policy` in force (a reload).
    pub fn set_policy(&self, policy: crate::policy::Policy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    /// Runs `fut` on the main runtime and waits for it (from any runtime).
    pub async fn on_main<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.main.spawn(fut).await {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => std::future::pending().await, // the runtime is shutting down
        }
    }

    /// Builds the gateway; must be called inside the runtime that will run
    /// the poller (its handle is kept as [`Gateway::main`]).
    pub fn new(config: Config) -> Result<Gateway, BuildError> {
        let keys = keys_of(&config)?;
        let mut headers = HeaderMap::new();
        if let Some(v) = bearer(&config) {
            headers.insert(header::AUTHORIZATION, v);
        }
        let control = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(ms(config.poll.timeout_ms))
            .timeout(ms(config.poll.timeout_ms))
            .pool_max_idle_per_host(4)
            .build()?;
        let fleet = Fleet::new(
            config
                .neurons
                .iter()
                .map(|n| Neuron::new(&n.name, &n.endpoint))
                .collect(),
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Gateway {
            keys: KeyTable::new(keys),
            connections: Arc::new(tokio::sync::Semaphore::new(config.gateway.max_connections)),
            main: tokio::runtime::Handle::current(),
            counting: tokio::sync::Semaphore::new(cores),
            fleet,
            metrics: Metrics::new(),
            control,
            upstream: Upstream::new(&config),
            tokenizers: Tokenizers::default(),
            loader: Loader::default(),
            draining: AtomicBool::new(false),
            policy: std::sync::RwLock::new(Arc::new(crate::policy::Policy::from_config(&config))),
            config_path: std::sync::OnceLock::new(),
            config,
        })
    }
}
