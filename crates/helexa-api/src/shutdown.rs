//! Waiting for SIGTERM or SIGINT, shared by `cortex`, the `neuron` agent and
//! `neuron engine`.
//!
//! Install the handlers before binding: a signal that arrives during
//! start-up then drains the process instead of killing it (the default
//! action), which a supervisor's quick stop-after-start would otherwise hit.

/// Installed SIGTERM/SIGINT handlers. Each [`Signals::recv`] waits for the
/// next signal: the first starts a drain, a second may cut it short.
pub struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Installs the handlers now. Needs a running tokio runtime.
    pub fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Signals {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Resolves on the next SIGTERM or SIGINT (logged).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = next(&mut self.int) => tracing::info!("SIGINT received"),
                _ = next(&mut self.term) => tracing::info!("SIGTERM received"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C received");
        }
    }

    /// Installs the handlers now and resolves on the first signal.
    pub fn first() -> impl std::future::Future<Output = ()> {
        let mut s = Signals::install();
        async move { s.recv().await }
    }
}
