//! Model lifecycle: load (single-flight, in the background), unload (drain,
//! then stop the engine), pre-warming at start-up, and agent shutdown.
//!
//! Lifecycle operations run in spawned tasks (a client that gives up does not
//! cancel a half-done load) and are single-flight: a second `load` of the
//! same id subscribes to the first one's outcome. A load hands the model to
//! the `supervisor`, which owns its engine from then until it is stopped.

use super::{LifecycleError, OpResult, Phase, Registry, Slot, SlotState};
use crate::admission::Admission;
use helexa_protocol::{Activation, ActivationState};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

impl Registry {
    pub fn activation(&self) -> Activation {
        let mut a = self
            .inner
            .activation
            .lock()
            .expect("activation lock")
            .clone();
        a.downloads = self
            .inner
            .downloads
            .lock()
            .expect("downloads lock")
            .values()
            .cloned()
            .collect();
        a
    }

    fn update_activation(&self, f: impl FnOnce(&mut Activation)) {
        let mut a = self.inner.activation.lock().expect("activation lock");
        f(&mut a);
        if a.pending.is_empty() && a.in_progress.is_none() {
            a.state = ActivationState::Ready;
        }
    }

    /// Loads the preload models one after the other, reporting progress in
    /// `activation`. Runs in the background after the listener is bound.
    pub fn spawn_preload(&self) {
        let this = self.clone();
        self.inner.tasks.spawn(async move {
            loop {
                let next = {
                    let mut a = this.inner.activation.lock().expect("activation lock");
                    if a.pending.is_empty() {
                        None
                    } else {
                        let id = a.pending.remove(0);
                        a.in_progress = Some(id.clone());
                        Some(id)
                    }
                };
                let Some(id) = next else { break };
                if this.inner.shutting_down.load(Ordering::Acquire) {
                    this.update_activation(|a| {
                        a.in_progress = None;
                        a.failed.push(id.clone());
                    });
                    continue;
                }
                let result = this.load(&id).await;
                this.update_activation(|a| {
                    a.in_progress = None;
                    match &result {
                        Ok(()) => a.completed.push(id.clone()),
                        Err(e) => {
                            tracing::error!(model = %id, error = %e, "preload failed");
                            a.failed.push(id.clone());
                        }
                    }
                });
            }
            this.update_activation(|_| {});
        });
    }

    /// Loads a model: `Ok` once its engine is ready. Single-flight per id.
    pub async fn load(&self, id: &str) -> OpResult {
        let slot = self
            .slot(id)
            .cloned()
            .ok_or_else(|| LifecycleError::NotInCatalogue(id.to_string()))?;
        loop {
            if self.inner.shutting_down.load(Ordering::Acquire) {
                return Err(LifecycleError::ShuttingDown);
            }
            let waiting_for = {
                // Budget check and the move to `loading` under one lock
                // (taken before the slot's: other slots are read inside).
                let _admit = self.inner.admit.lock().expect("admit lock");
                let phase = slot.lock().phase;
                if matches!(phase, Phase::Unloaded | Phase::Failed) {
                    self.check_fits(self.inner.by_id[id])?;
                }
                let mut st = slot.lock();
                match st.phase {
                    Phase::Loaded | Phase::Recovering => return Ok(()),
                    Phase::Loading => Wait::Load(st.op.clone()),
                    Phase::Unloading => Wait::Other(st.op.clone()),
                    Phase::Unloaded | Phase::Failed => {
                        Wait::Load(Some(self.start_supervisor(&slot, &mut st)))
                    }
                }
            };
            match waiting_for {
                Wait::Load(rx) => return wait_op(rx).await,
                // An unload is running: wait for it, then load afresh.
                Wait::Other(rx) => {
                    let _ = wait_op(rx).await;
                }
            }
        }
    }

    /// Starts the supervisor of `slot` (state must be unloaded or failed).
    fn start_supervisor(
        &self,
        slot: &Arc<Slot>,
        st: &mut SlotState,
    ) -> watch::Receiver<Option<OpResult>> {
        let (tx, rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let finished = CancellationToken::new();
        st.phase = Phase::Loading;
        st.error = None;
        st.op = Some(rx.clone());
        st.stop = Some(stop.clone());
        st.finished = Some(finished.clone());
        let this = self.clone();
        let slot = slot.clone();
        self.inner.tasks.spawn(async move {
            let _finished = finished.drop_guard();
            this.supervise(slot, tx, stop).await;
        });
        rx
    }

    /// Unloads a model: queued requests are refused, running ones may finish
    /// within `unload_drain_secs`, then the engine is stopped and reaped.
    /// Unloading a model that is not loaded is a success.
    pub async fn unload(&self, id: &str) -> OpResult {
        let slot = self
            .slot(id)
            .cloned()
            .ok_or_else(|| LifecycleError::NotInCatalogue(id.to_string()))?;
        let rx = {
            let mut st = slot.lock();
            match st.phase {
                Phase::Unloaded => return Ok(()),
                Phase::Failed => {
                    if let Some(s) = st.stop.take() {
                        s.cancel();
                    }
                    st.phase = Phase::Unloaded;
                    st.error = None;
                    return Ok(());
                }
                Phase::Unloading => st.op.clone(),
                Phase::Loading | Phase::Loaded | Phase::Recovering => {
                    let (tx, rx) = watch::channel(None);
                    st.phase = Phase::Unloading;
                    st.op = Some(rx.clone());
                    let admission = st.admission.clone();
                    let stop = st.stop.clone();
                    let finished = st.finished.clone();
                    let drain = self.inner.config.unload_drain();
                    let slot = slot.clone();
                    let id = id.to_string();
                    self.inner.tasks.spawn(async move {
                        if let Some(a) = &admission {
                            a.close();
                            if !a.drain(drain).await {
                                tracing::warn!(model = %id, in_flight = a.in_flight(), "unload drain timed out; stopping engine anyway");
                            }
                        }
                        if let Some(s) = stop {
                            s.cancel();
                        }
                        if let Some(f) = finished {
                            f.cancelled().await;
                        }
                        {
                            let mut st = slot.lock();
                            st.phase = Phase::Unloaded;
                            st.op = None;
                            st.stop = None;
                            st.finished = None;
                            if let Some(e) = st.engine.take() {
                                st.tokens_base =
                                    st.tokens_base.saturating_add(e.stats().tokens_generated_total);
                            }
                            if let Some(a) = st.admission.take() {
                                st.rejected_base = st.rejected_base.saturating_add(a.rejected_total());
                            }
                        }
                        tracing::info!(model = %id, "model unloaded");
                        let _ = tx.send(Some(Ok(())));
                    });
                    Some(rx)
                }
            }
        };
        wait_op(rx).await
    }

    /// Agent exit: refuses new work, lets running requests finish within
    /// `drain`, then stops every engine (SIGTERM, SIGKILL after
    /// `engine_stop_timeout_secs`) and waits until all are reaped.
    pub async fn shutdown(&self, drain: Duration) {
        self.inner.shutting_down.store(true, Ordering::Release);
        let admissions: Vec<Arc<Admission>> = self
            .inner
            .slots
            .iter()
            .filter_map(|s| s.lock().admission.clone())
            .collect();
        for a in &admissions {
            a.close();
        }
        let deadline = crate::admission::deadline_after(drain);
        for a in &admissions {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            a.drain(left).await;
        }
        let mut finished = Vec::new();
        for s in &self.inner.slots {
            let st = s.lock();
            if let Some(stop) = &st.stop {
                stop.cancel();
            }
            if let Some(f) = &st.finished {
                finished.push(f.clone());
            }
        }
        let bound = self.inner.config.engine_stop_timeout() + Duration::from_secs(5);
        let all = futures_util::future::join_all(finished.iter().map(|f| f.cancelled()));
        if tokio::time::timeout(bound, all).await.is_err() {
            tracing::error!("some engines did not stop in time");
        }
        self.inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.tasks.wait()).await;
    }
}

enum Wait {
    Load(Option<watch::Receiver<Option<OpResult>>>),
    Other(Option<watch::Receiver<Option<OpResult>>>),
}

/// Waits for an operation's outcome; a vanished operation counts as done.
async fn wait_op(rx: Option<watch::Receiver<Option<OpResult>>>) -> OpResult {
    let Some(mut rx) = rx else {
        return Ok(());
    };
    let outcome = match rx.wait_for(|v| v.is_some()).await {
        Ok(v) => v.clone().unwrap_or(Ok(())),
        // Sender dropped without an answer: the task ended.
        Err(_) => Ok(()),
    };
    outcome
}
