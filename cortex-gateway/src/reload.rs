//! `SIGHUP` and `POST /admin/reload`: re-read `cortex.toml` (and the
//! `CORTEX_…` environment) and put in force what can change while running:
//! the client keys (`[[keys]]`, `[auth] require_keys`), the fleet policy
//! (`[[models]]`) and the aliases. An invalid file keeps the running
//! configuration and says which line and key are wrong; changes to other
//! sections are reported as needing a restart, never half-applied.

use crate::config::Config;
use crate::state::{keys_of, Gateway};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// The new client keys, policy and aliases are in force;
    /// `restart_needed` lists the sections that changed but only take
    /// effect after a restart.
    Applied { restart_needed: Vec<&'static str> },
}

/// Reloads from the gateway's config file (see [`Gateway::config_path`]).
pub fn reload_configured(gw: &Gateway) -> Result<Reloaded, String> {
    match gw.config_path.get() {
        Some(p) => reload(gw, p),
        None => Err("cortex was started without a configuration file to re-read".into()),
    }
}

/// Reloads from `path`; on error the running configuration stays.
pub fn reload(gw: &Gateway, path: &Path) -> Result<Reloaded, String> {
    let new = Config::load(path).map_err(|e| e.to_string())?;
    let keys = keys_of(&new).map_err(|e| format!("{}: {e}", path.display()))?;
    gw.keys.replace(keys);
    gw.set_policy(crate::policy::Policy::from_config(&new));
    let old = &gw.config;
    let mut restart_needed = Vec::new();
    let changed: [(&'static str, bool); 8] = [
        ("admin", old.admin != new.admin),
        ("gateway", old.gateway != new.gateway),
        ("poll", old.poll != new.poll),
        ("neurons", old.neurons != new.neurons),
        ("upstream", old.upstream != new.upstream),
        ("prevalidation", old.prevalidation != new.prevalidation),
        ("loading", old.loading != new.loading),
        ("auth.token", old.auth.token != new.auth.token),
    ];
    for (section, differs) in changed {
        if differs {
            restart_needed.push(section);
        }
    }
    Ok(Reloaded::Applied { restart_needed })
}

/// The `SIGHUP` handler, installed before the listeners bind so that a
/// `SIGHUP` never ends cortex (its default action).
pub struct Hangups(tokio::signal::unix::Signal);

impl Hangups {
    pub fn install() -> std::io::Result<Hangups> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Hangups(signal(SignalKind::hangup())?))
    }

    /// Reloads from `path` on every `SIGHUP` until the process ends.
    pub fn spawn(self, gw: Arc<Gateway>, path: PathBuf) -> tokio::task::JoinHandle<()> {
        let mut hup = self.0;
        let _ = gw.config_path.set(path.clone());
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match reload(&gw, &path) {
                    Ok(Reloaded::Applied { restart_needed }) if restart_needed.is_empty() => {
                        tracing::info!(path = %path.display(), "configuration reloaded: client keys, models and aliases in force")
                    }
                    Ok(Reloaded::Applied { restart_needed }) => tracing::warn!(
                        path = %path.display(),
                        sections = ?restart_needed,
                        "configuration reloaded: client keys, models and aliases in force; the other changed sections take effect after a restart"
                    ),
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused; the running configuration stays")
                    }
                }
            }
        })
    }
}
