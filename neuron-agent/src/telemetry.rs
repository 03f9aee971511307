//! Logging set-up shared by the agent and the engine subcommand.
//!
//! Logs go to stderr in both modes: the engine's stdout carries the
//! `HELEXA_ENGINE_LISTEN` line the agent waits for, and nothing else.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (`RUST_LOG`, default `info`); `format` is
/// `text` or `json`. A second call is a no-op.
pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
