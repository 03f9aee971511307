//! The watchdog of one running engine: an engine can hang without exiting
//! (a deadlock, a stopped process), and then only looking at it tells.
//!
//! It polls the engine's `/health` every `engine_poll_interval_ms` (keeping
//! the figures reported in the agent's `/health`), each poll bounded by
//! `engine_health_timeout_ms`; after `engine_health_failures` consecutive
//! failures it says the engine must be killed. Between and during polls it
//! checks for a stall: answers in progress but no response byte from the
//! engine for `engine_stall_timeout_secs`. The supervisor does the killing.

use super::{EngineConn, EngineHealth};
use crate::metrics::{HealthFailure, Metrics};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub(super) struct Watchdog {
    pub id: String,
    pub conn: Arc<EngineConn>,
    pub client: reqwest::Client,
    pub metrics: Arc<Metrics>,
    pub interval: Duration,
    pub timeout: Duration,
    pub max_failures: u32,
    pub stall: Duration,
}

impl Watchdog {
    /// Watches until `stop` (`None`) or until the engine must be killed
    /// (`Some(why)`).
    pub async fn run(self, stop: CancellationToken) -> Option<String> {
        let check_every =
            (self.stall / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        // One ticker for the whole watch, so that stall checks keep their
        // pace whatever the polls do (a fresh sleep per select would lose
        // every race to a shorter poll interval or a quick poll).
        let mut stall_tick = tokio::time::interval(check_every);
        stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures: u32 = 0;
        loop {
            let probe = self.probe();
            tokio::pin!(probe);
            let outcome = loop {
                tokio::select! {
                    r = &mut probe => break r,
                    _ = stall_tick.tick() => {
                        if let Some(why) = self.stalled() {
                            return Some(why);
                        }
                    }
                    _ = stop.cancelled() => return None,
                }
            };
            match outcome {
                Ok(h) => {
                    failures = 0;
                    self.conn.set_stats(h);
                }
                Err(why) => {
                    failures = failures.saturating_add(1);
                    self.metrics.health_failure(&self.id, why);
                    tracing::warn!(
                        model = %self.id, pid = self.conn.pid, reason = why.as_str(),
                        failures, engine_health_failures = self.max_failures,
                        timeout_ms = self.timeout.as_millis() as u64,
                        "engine health check failed"
                    );
                    if failures >= self.max_failures {
                        return Some(format!(
                            "{failures} consecutive failed health checks (last: {})",
                            why.as_str()
                        ));
                    }
                }
            }
            let next = tokio::time::sleep(self.interval);
            tokio::pin!(next);
            loop {
                tokio::select! {
                    _ = &mut next => break,
                    _ = stall_tick.tick() => {
                        if let Some(why) = self.stalled() {
                            return Some(why);
                        }
                    }
                    _ = stop.cancelled() => return None,
                }
            }
        }
    }

    /// One `/health` poll within the timeout.
    async fn probe(&self) -> Result<EngineHealth, HealthFailure> {
        let url = format!("{}/health", self.conn.base_url);
        let attempt = async {
            let resp = self
                .client
                .get(&url)
                .send()
                .await
                .map_err(|_| HealthFailure::Error)?;
            if !resp.status().is_success() {
                return Err(HealthFailure::Error);
            }
            resp.json::<EngineHealth>()
                .await
                .map_err(|_| HealthFailure::Error)
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or(Err(HealthFailure::Timeout))
    }

    /// Why the engine counts as stalled, if it does (counted once).
    fn stalled(&self) -> Option<String> {
        let silent = self.conn.silent_for()?;
        if silent < self.stall {
            return None;
        }
        self.metrics
            .health_failure(&self.id, HealthFailure::Stalled);
        tracing::warn!(model = %self.id, pid = self.conn.pid, silent_ms = silent.as_millis() as u64, "engine stalled: answers in progress, no response byte");
        Some(format!(
            "answers in progress but no response byte for {:.1}s (engine_stall_timeout_secs {})",
            silent.as_secs_f64(),
            self.stall.as_secs()
        ))
    }
}
