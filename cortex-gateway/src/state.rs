//! The one shared object of a running cortex: config, fleet, clients, metrics.
//!
//! Built once at start-up and handed to handlers, the poller and the loader
//! as `Arc<Gateway>`, so tests build exactly what the binary builds.

use crate::config::{ms, Config};
use crate::fleet::{Fleet, Neuron};
use crate::loader::Loader;
use crate::metrics::Metrics;
use crate::tokens::Tokenizers;
use crate::upstream::Upstream;
use http::{header, HeaderMap, HeaderValue};
use std::sync::atomic::AtomicBool;

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
}

/// `Authorization: Bearer <token>` for the neurons, when `[auth] token` is set.
pub fn bearer(config: &Config) -> Option<HeaderValue> {
    let token = config.auth.token.as_deref().filter(|t| !t.is_empty())?;
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

impl Gateway {
    pub fn new(config: Config) -> Result<Gateway, reqwest::Error> {
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
        Ok(Gateway {
            fleet,
            metrics: Metrics::new(),
            control,
            upstream: Upstream::new(&config),
            tokenizers: Tokenizers::default(),
            loader: Loader::default(),
            draining: AtomicBool::new(false),
            config,
        })
    }
}
