//! Start-up and shutdown of the agent: bind first, then pre-warm; on
//! SIGTERM/SIGINT stop admitting, let running work finish within
//! `drain_timeout_secs`, stop every engine, exit. Everything is bounded.

use crate::api::{self, AppState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::Registry;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Flags of the agent mode (`neuron [--config PATH] [--listen ADDR]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentArgs {
    /// Config file (TOML). Missing file: defaults.
    #[arg(long, env = "NEURON_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on; overrides `listen` from file and environment.
    #[arg(long)]
    pub listen: Option<String>,
}

/// How often memory and device figures are refreshed.
const FIGURES_EVERY: Duration = Duration::from_secs(5);

/// A running agent: its address, its state, and the way to stop it.
pub struct Agent {
    state: AppState,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    server: JoinHandle<()>,
    metrics_server: JoinHandle<()>,
    stop_serving: CancellationToken,
    figures: JoinHandle<()>,
}

impl Agent {
    /// Binds the listener, starts serving, then starts pre-warming.
    pub async fn start(config: Config) -> anyhow::Result<Agent> {
        let addr = config.listen_addr().map_err(anyhow::Error::msg)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let addr = listener.local_addr()?;
        let metrics_addr = config.metrics_addr().map_err(anyhow::Error::msg)?;
        let metrics_listener = TcpListener::bind(metrics_addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {metrics_addr} (metrics_listen): {e}")
        })?;
        let metrics_addr = metrics_listener.local_addr()?;
        let advertise = config
            .advertise_url
            .clone()
            .unwrap_or_else(|| default_advertise_url(addr));
        let ids: Vec<String> = config.models.iter().map(|m| m.id.clone()).collect();
        let metrics = Arc::new(Metrics::new(&ids, &api::version()));
        let registry = Registry::new(Arc::new(config), metrics);
        let state = AppState::new(
            registry.clone(),
            advertise.trim_end_matches('/').to_string(),
        );
        let app = api::router(state.clone());
        let stop_serving = CancellationToken::new();
        let stop = stop_serving.clone();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        let metrics_app = api::metrics_router(state.clone());
        let stop = stop_serving.clone();
        let metrics_server = tokio::spawn(async move {
            let served = axum::serve(metrics_listener, metrics_app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
        tracing::info!(%addr, %metrics_addr, node = %state.node, "neuron agent listening");
        registry.spawn_preload();
        let figures = tokio::spawn(state.clone().refresh_figures(FIGURES_EVERY));
        Ok(Agent {
            state,
            addr,
            metrics_addr,
            server,
            metrics_server,
            stop_serving,
            figures,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`-style base URL of this agent.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT` of the metrics listener.
    pub fn metrics_url(&self) -> String {
        format!("http://{}", self.metrics_addr)
    }

    pub fn registry(&self) -> &Registry {
        &self.state.registry
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Graceful, bounded shutdown: new requests get `503 shutting_down`,
    /// running ones may finish within `drain_timeout_secs`, engines are
    /// stopped and reaped, then the listener closes.
    pub async fn shutdown(self) {
        self.shutdown_with(std::future::pending()).await
    }

    /// As [`Agent::shutdown`], but `hurry` resolving (a second signal) cuts
    /// the drain short.
    pub async fn shutdown_with(self, hurry: impl std::future::Future<Output = ()>) {
        tracing::info!("shutting down: draining requests");
        self.state.set_draining();
        let drain = self.state.config.drain_timeout();
        tokio::select! {
            _ = self.state.registry.shutdown(drain) => {}
            _ = hurry => {
                tracing::warn!("second signal: stopping engines now");
                self.state.registry.shutdown(Duration::ZERO).await;
            }
        }
        self.stop_serving.cancel();
        self.figures.abort();
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        let mut metrics_server = self.metrics_server;
        if tokio::time::timeout(Duration::from_secs(2), &mut metrics_server)
            .await
            .is_err()
        {
            metrics_server.abort();
        }
        tracing::info!("neuron agent stopped");
    }
}

/// `http://<listen>`, with an unspecified address replaced by the hostname.
fn default_advertise_url(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("http://{}:{}", crate::discovery::hostname(), addr.port())
    } else {
        format!("http://{addr}")
    }
}

/// Loads the configuration as the command line asks (flags beat env beat file).
pub fn load_config(args: &AgentArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(listen) = &args.listen {
        config.listen = listen.clone();
        config.listen_addr().map_err(anyhow::Error::msg)?;
    }
    Ok(config)
}

/// `neuron` (agent mode): runs until SIGTERM/SIGINT, then shuts down; a
/// second signal cuts the drain short.
pub async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    crate::telemetry::init(&config.log_format);
    // Before binding: a signal during start-up drains instead of killing.
    let mut signals = helexa_api::shutdown::Signals::install();
    let agent = Agent::start(config).await?;
    signals.recv().await;
    agent.shutdown_with(signals.recv()).await;
    Ok(())
}
