//! Waiting for SIGTERM or SIGINT: the one place that knows about signals.
//!
//! The server's drain (stop accepting, let open streams finish up to
//! `gateway.drain_timeout_ms`) is in `server.rs`; this only says "now".

use std::future::Future;

/// Installs the SIGTERM/SIGINT handlers at once (call it before binding, so
/// a signal that arrives during start-up drains instead of killing the
/// process) and returns a future that resolves on the first of them.
/// Needs a running tokio runtime.
pub fn signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(int) => tracing::info!("SIGINT received; draining"),
                _ = wait(term) => tracing::info!("SIGTERM received; draining"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("Ctrl-C received; draining");
    }
}
