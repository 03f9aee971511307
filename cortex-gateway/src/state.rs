//! The one shared object of a running cortex: config, fleet, clients, metrics.
//!
//! Built once at start-up and handed to handlers, the poller and the loader
//! as `Arc<Gateway>`, so tests build exactly what the binary builds.

use crate::config::{ms, Config};
use crate::fleet::{Fleet, Neuron};
use crate::loader::Loader;
use crate::metrics::Metrics;
use crate::tokens::Tokenizers;
use http::{header, HeaderMap, HeaderValue};
use std::sync::atomic::AtomicBool;

pub struct Gateway {
    pub config: Config,
    pub fleet: Fleet,
    pub metrics: Metrics,
    /// Control routes (`/health`, `/models`, ...): short timeouts.
    pub control: reqwest::Client,
    /// `/v1/*` forwarding: pooled keep-alive connections, no total timeout.
    pub upstream: reqwest::Client,
    pub tokenizers: Tokenizers,
    pub loader: Loader,
    /// Set once shutdown has begun: `/ready` turns 503.
    pub draining: AtomicBool,
}

impl Gateway {
    pub fn new(config: Config) -> Result<Gateway, reqwest::Error> {
        let mut headers = HeaderMap::new();
        if let Some(token) = config.auth.token.as_deref().filter(|t| !t.is_empty()) {
            if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {token}")) {
                v.set_sensitive(true);
                headers.insert(header::AUTHORIZATION, v);
            }
        }
        let up = &config.upstream;
        let control = reqwest::Client::builder()
            .default_headers(headers.clone())
            .connect_timeout(ms(config.poll.timeout_ms))
            .timeout(ms(config.poll.timeout_ms))
            .pool_max_idle_per_host(4)
            .build()?;
        let upstream = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(ms(up.connect_timeout_ms))
            .pool_max_idle_per_host(up.pool_max_idle_per_host)
            .pool_idle_timeout(ms(up.pool_idle_timeout_ms))
            .tcp_nodelay(true)
            .http1_only()
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
            upstream,
            tokenizers: Tokenizers::default(),
            loader: Loader::default(),
            draining: AtomicBool::new(false),
            config,
        })
    }
}
