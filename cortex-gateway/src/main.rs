//! `cortex`: parses flags, loads the config, starts the gateway, waits for a
//! signal and drains. All behaviour lives in the library.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "cortex",
    version,
    about = "OpenAI-compatible gateway for a fleet of helexa neurons"
)]
struct Args {
    /// TOML config file; a missing file means defaults.
    #[arg(long, env = "CORTEX_CONFIG", default_value = "/etc/helexa/cortex.toml")]
    config: PathBuf,
    /// API listen address (overrides gateway.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Metrics listen address (overrides gateway.metrics_listen).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "CORTEX_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Threads serving the API (overrides gateway.workers; 0 = one per core).
    #[arg(long, env = "CORTEX_WORKER_THREADS")]
    worker_threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORTEX_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let mut config = cortex_gateway::Config::load(&args.config)?;
    if let Some(l) = args.listen {
        l.parse::<std::net::SocketAddr>()
            .with_context(|| format!("--listen {l}: not an address like 127.0.0.1:8080"))?;
        config.gateway.listen = l;
    }
    if let Some(l) = args.metrics_listen {
        l.parse::<std::net::SocketAddr>()
            .with_context(|| format!("--metrics-listen {l}: not an address"))?;
        config.gateway.metrics_listen = l;
    }
    if let Some(n) = args.worker_threads {
        config.gateway.workers = n;
    }
    // The poller, loader and metrics run here; the API's serving threads
    // each run their own event loop (see server::start).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        // Handlers first: a SIGTERM during start-up must drain, not kill,
        // and a SIGHUP must not end the process.
        let stop = helexa_api::shutdown::Signals::first();
        let hangups = cortex_gateway::reload::Hangups::install().context("SIGHUP handler")?;
        let running = cortex_gateway::start(config).await?;
        hangups.spawn(running.gateway.clone(), args.config.clone());
        stop.await;
        running.shutdown();
        running.wait().await;
        Ok(())
    })
}
