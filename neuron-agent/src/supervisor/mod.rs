//! The supervisor: the manager of each loaded model's engine child process.
//!
//! One supervisor task per loaded model owns its engine from first start to
//! stop (`process.rs`: spawning, readiness, stopping, no orphans). It
//! publishes the ready engine for the request path (`conn.rs`), watches it
//! (`watchdog.rs`: health polls with a timeout, stalled answers), and
//! restarts it when it dies or is killed as hung: status `recovering`, then
//! `loaded`, with exponential backoff; `failed` after `restart_max_attempts`
//! failed restarts. It stops the engine on unload or agent exit.

mod conn;
pub mod process;
mod watchdog;

pub use conn::{BodyGuard, EngineConn};
pub use process::{EngineHealth, EngineInfo, EngineProcess, StartError};

use crate::admission::{Admission, Limits};
use crate::config::ModelSpec;
use crate::registry::{LifecycleError, OpResult, Phase, Registry, Slot};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use watchdog::Watchdog;

impl Registry {
    /// Owns the engine of one model from first start to stop.
    pub(crate) async fn supervise(
        &self,
        slot: Arc<Slot>,
        tx: watch::Sender<Option<OpResult>>,
        stop: CancellationToken,
    ) {
        let config = self.inner.config.clone();
        let id = slot.spec.id.clone();
        let began = Instant::now();
        // A `repo` model: its file from the hub cache, fetched if need be.
        let spec = match self.resolve_spec(&slot, &stop).await {
            Ok(spec) => spec,
            Err(e) => {
                return self.load_failed(&slot, &tx, e, "model could not be fetched");
            }
        };
        if slot.spec.repo.is_some() {
            // Now that its files are here, the budget check a local model
            // had before its load began.
            let estimate = crate::memory::estimate(&crate::memory::local(&spec, spec.path.clone()));
            if let Err(e) = self.check_fetched(self.inner.by_id[&id], estimate) {
                tracing::error!(model = %id, error = %e, "fetched model does not fit the memory budget");
                let result = Err(e);
                self.finish_failed_load(&slot, &result);
                let _ = tx.send(Some(result));
                return;
            }
        }
        let first = EngineProcess::start(&config, &spec, &self.inner.client, &stop).await;
        if first.is_ok() {
            self.inner.metrics.loaded_in(&id, began.elapsed());
        }
        let (mut proc, info) = match first {
            Ok(p) => p,
            Err(e) => {
                return self.load_failed(&slot, &tx, e, "engine failed to load");
            }
        };
        let admission = Arc::new(Admission::new(Limits {
            max_in_flight: slot.spec.max_in_flight,
            max_queue_depth: slot.spec.max_queue_depth,
            max_wait: Duration::from_secs(slot.spec.max_wait_secs),
        }));
        let (mut poll_stop, mut hung) = self.install_engine(&slot, &proc, info, Some(admission));
        let result = {
            let mut st = slot.lock();
            if st.phase == Phase::Loaded {
                st.op = None;
                Ok(())
            } else {
                Err(LifecycleError::Cancelled(id.clone()))
            }
        };
        let _ = tx.send(Some(result));
        drop(tx);

        // Supervise: restart on death until stopped.
        loop {
            let died = tokio::select! {
                status = proc.wait() => status,
                Ok(reason) = &mut hung => {
                    tracing::error!(model = %id, pid = proc.pid(), %reason, "engine hung; killing its process group");
                    proc.kill().await;
                    format!("killed as hung: {reason}")
                }
                _ = stop.cancelled() => {
                    poll_stop.cancel();
                    proc.stop(config.engine_stop_timeout()).await;
                    tracing::info!(model = %id, pid = proc.pid(), "engine stopped");
                    return;
                }
            };
            poll_stop.cancel();
            let tail = proc.stderr_tail();
            tracing::warn!(model = %id, pid = proc.pid(), status = %died, stderr = %tail, "engine died; restarting");
            {
                let mut st = slot.lock();
                if st.phase == Phase::Loaded {
                    st.phase = Phase::Recovering;
                }
                st.error = Some(format!("engine died ({died})"));
                if let Some(e) = st.engine.take() {
                    st.tokens_base = st
                        .tokens_base
                        .saturating_add(e.stats().tokens_generated_total);
                }
            }
            proc.stop(config.engine_stop_timeout()).await; // reap the group
            let mut attempt: u32 = 0;
            let mut delay = Duration::from_millis(config.restart_backoff_initial_ms);
            let max_delay = Duration::from_secs(config.restart_backoff_max_secs.max(1));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
                let began = Instant::now();
                match EngineProcess::start(&config, &spec, &self.inner.client, &stop).await {
                    Ok((p, info)) => {
                        self.inner.metrics.loaded_in(&id, began.elapsed());
                        self.inner.metrics.restarted(&id);
                        proc = p;
                        (poll_stop, hung) = self.install_engine(&slot, &proc, info, None);
                        {
                            let mut st = slot.lock();
                            st.restarts = st.restarts.saturating_add(1);
                        }
                        tracing::info!(model = %id, pid = proc.pid(), "engine restarted");
                        break;
                    }
                    Err(StartError::Cancelled) => return,
                    Err(e) => {
                        attempt = attempt.saturating_add(1);
                        tracing::error!(model = %id, attempt, error = %e, "engine restart failed");
                        if attempt >= config.restart_max_attempts.max(1) {
                            let mut st = slot.lock();
                            if st.phase != Phase::Recovering {
                                return;
                            }
                            st.phase = Phase::Failed;
                            st.error = Some(format!(
                                "engine died and {attempt} restarts failed; last: {e}"
                            ));
                            if let Some(a) = st.admission.take() {
                                a.close();
                                st.rejected_base =
                                    st.rejected_base.saturating_add(a.rejected_total());
                            }
                            st.stop = None;
                            return;
                        }
                        delay = delay.saturating_mul(2).min(max_delay);
                    }
                }
            }
        }
    }

    /// Marks a load that ended without an engine (failed or cancelled).
    /// A first start that did not get as far as a running engine: the
    /// load's outcome (cancelled, or failed with `what` logged), told to
    /// every waiter.
    fn load_failed(
        &self,
        slot: &Arc<Slot>,
        tx: &watch::Sender<Option<OpResult>>,
        e: StartError,
        what: &str,
    ) {
        let id = slot.spec.id.clone();
        let result = match e {
            StartError::Cancelled => Err(LifecycleError::Cancelled(id)),
            e => {
                tracing::error!(model = %id, error = %e, "{what}");
                Err(LifecycleError::LoadFailed {
                    id,
                    reason: e.to_string(),
                })
            }
        };
        self.finish_failed_load(slot, &result);
        let _ = tx.send(Some(result));
    }

    fn finish_failed_load(&self, slot: &Arc<Slot>, result: &OpResult) {
        // An unload that cancelled us owns the slot's state.
        let mut st = slot.lock();
        if st.phase == Phase::Loading {
            if let Err(LifecycleError::LoadFailed { reason, .. }) = result {
                st.phase = Phase::Failed;
                st.error = Some(reason.clone());
            } else {
                st.phase = Phase::Unloaded;
            }
            st.op = None;
            st.stop = None;
        }
    }

    /// `spec` with `path` set: itself for a local model; for a `repo` model,
    /// the file in the hub cache, fetched first if it is not there
    /// (progress in `/health` `activation.downloads`).
    /// What the load falls back on goes to the slot's `warning`.
    async fn resolve_spec(
        &self,
        slot: &Slot,
        stop: &CancellationToken,
    ) -> Result<ModelSpec, StartError> {
        let spec = &slot.spec;
        slot.lock().warning = None;
        if spec.repo.is_none() {
            return Ok(spec.clone());
        }
        let hub = crate::hub::Hub::new(&self.inner.config);
        let downloads = &self.inner.downloads;
        let progress = |p: helexa_protocol::DownloadProgress| {
            downloads
                .lock()
                .expect("downloads lock")
                .insert(p.model.clone(), p);
        };
        let outcome = tokio::select! {
            r = hub.resolve(spec, &progress) => r,
            _ = stop.cancelled() => {
                downloads.lock().expect("downloads lock").remove(&spec.id);
                return Err(StartError::Cancelled);
            }
        };
        downloads.lock().expect("downloads lock").remove(&spec.id);
        let got = outcome.map_err(|e| StartError::Fetch(e.to_string()))?;
        let mut resolved = spec.clone();
        resolved.path = got.path;
        // From the base repo of a GGUF repo without them (`hub`): they
        // never replace what the entry sets itself.
        if resolved.tokenizer.is_none() {
            resolved.tokenizer = got.tokenizer;
        }
        if resolved.chat_template.is_none() {
            resolved.chat_template = got.chat_template;
            resolved.tokenizer_config = got.tokenizer_config;
        }
        slot.lock().warning = got.warning;
        Ok(resolved)
    }

    /// Publishes a ready engine in the slot and starts its watchdog.
    /// Returns the watchdog's stop token and the channel on which it says
    /// why the engine must be killed, if it must.
    fn install_engine(
        &self,
        slot: &Arc<Slot>,
        proc: &EngineProcess,
        info: EngineInfo,
        admission: Option<Arc<Admission>>,
    ) -> (CancellationToken, oneshot::Receiver<String>) {
        let conn = EngineConn::new(proc.base_url(), proc.pid(), info.clone());
        {
            let mut st = slot.lock();
            if matches!(st.phase, Phase::Loading | Phase::Recovering) {
                st.phase = Phase::Loaded;
                st.error = None;
            }
            st.engine = Some(conn.clone());
            st.last_info = Some(info);
            if let Some(a) = admission {
                st.admission = Some(a);
            }
        }
        let stop = CancellationToken::new();
        // Fetch the tokenizer once per load, in the background.
        if slot.tokenizer.lock().expect("tokenizer lock").is_none() {
            let this = self.clone();
            let slot = slot.clone();
            let conn = conn.clone();
            let token = stop.clone();
            self.inner.tasks.spawn(async move {
                tokio::select! {
                    _ = this.fetch_tokenizer(&slot, &conn) => {}
                    _ = token.cancelled() => {}
                }
            });
        }
        let config = &self.inner.config;
        let dog = Watchdog {
            id: slot.spec.id.clone(),
            conn,
            client: self.inner.client.clone(),
            metrics: self.inner.metrics.clone(),
            interval: config.engine_poll_interval(),
            timeout: config.engine_health_timeout(),
            max_failures: config.engine_health_failures.max(1),
            stall: config.engine_stall_timeout(),
        };
        let (tx, rx) = oneshot::channel();
        let token = stop.clone();
        self.inner.tasks.spawn(async move {
            if let Some(reason) = dog.run(token).await {
                let _ = tx.send(reason);
            }
        });
        (stop, rx)
    }
}
