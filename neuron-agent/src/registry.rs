//! The model registry: which catalogue models are loaded, and the lifecycle
//! of each (load, supervise and restart, unload).
//!
//! Each model has one slot whose state sits behind a plain mutex that is
//! only ever held for a few field reads or writes, never across I/O, so that
//! control routes answer at once whatever the engines are doing. Lifecycle
//! operations run in spawned tasks (a client that gives up does not cancel a
//! half-done load) and are single-flight: a second `load` of the same id
//! subscribes to the first one's outcome.
//!
//! A loaded model is one supervisor task owning one engine process. The
//! supervisor restarts a dead engine with exponential backoff (status
//! `recovering`, then `loaded`; `failed` after `restart_max_attempts` failed
//! restarts) and stops it on unload or agent exit.

use crate::admission::{Admission, Limits};
use crate::config::{Config, ModelSpec};
use crate::engine::{EngineHealth, EngineInfo, EngineProcess, StartError};
use bytes::Bytes;
use helexa_api::{ApiError, ErrorCode};
use helexa_protocol::{Activation, ActivationState, ModelHealth, ModelStatus};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where a slot is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Unloaded,
    Loading,
    Loaded,
    Recovering,
    Failed,
    Unloading,
}

impl Phase {
    /// The wire status, `None` for phases not reported (`unloaded`,
    /// `unloading`).
    pub fn wire(self) -> Option<ModelStatus> {
        match self {
            Phase::Loading => Some(ModelStatus::Loading),
            Phase::Loaded => Some(ModelStatus::Loaded),
            Phase::Recovering => Some(ModelStatus::Recovering),
            Phase::Failed => Some(ModelStatus::Failed),
            Phase::Unloaded | Phase::Unloading => None,
        }
    }
}

/// The outcome of a lifecycle operation, shared by every caller waiting on it.
pub type OpResult = Result<(), LifecycleError>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    #[error("model `{0}` is not in this node's catalogue")]
    NotInCatalogue(String),
    #[error("model `{id}` failed to load: {reason}")]
    LoadFailed { id: String, reason: String },
    #[error("loading model `{0}` was cancelled (unloaded or shutting down)")]
    Cancelled(String),
    #[error("the agent is shutting down")]
    ShuttingDown,
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        match &e {
            LifecycleError::NotInCatalogue(id) => ApiError::new(
                ErrorCode::ModelNotFound,
                format!("The model `{id}` is not in this node's catalogue"),
            )
            .with_param("model"),
            LifecycleError::LoadFailed { .. } => {
                ApiError::new(ErrorCode::UpstreamError, e.to_string())
            }
            LifecycleError::Cancelled(_) => ApiError::new(ErrorCode::ModelLoading, e.to_string()),
            LifecycleError::ShuttingDown => ApiError::new(ErrorCode::ShuttingDown, e.to_string()),
        }
    }
}

/// A ready engine as the request path sees it.
#[derive(Debug)]
pub struct EngineConn {
    pub base_url: String,
    pub pid: u32,
    pub info: EngineInfo,
    stats: Mutex<EngineHealth>,
}

impl EngineConn {
    pub fn stats(&self) -> EngineHealth {
        self.stats.lock().expect("stats lock").clone()
    }
}

#[derive(Debug)]
struct SlotState {
    phase: Phase,
    error: Option<String>,
    admission: Option<Arc<Admission>>,
    engine: Option<Arc<EngineConn>>,
    /// The running lifecycle operation, if any.
    op: Option<watch::Receiver<Option<OpResult>>>,
    /// Cancels the supervisor (stops the engine).
    stop: Option<CancellationToken>,
    /// Cancelled by the supervisor when it has finished (engine reaped).
    finished: Option<CancellationToken>,
    /// Counters carried over from earlier engines / admissions.
    rejected_base: u64,
    tokens_base: u64,
    last_info: Option<EngineInfo>,
    restarts: u64,
}

#[derive(Debug)]
struct Slot {
    spec: ModelSpec,
    state: Mutex<SlotState>,
    tokenizer: Mutex<Option<Bytes>>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().expect("slot lock")
    }
}

struct Inner {
    config: Arc<Config>,
    client: reqwest::Client,
    slots: Vec<Arc<Slot>>,
    by_id: HashMap<String, usize>,
    shutting_down: AtomicBool,
    tasks: TaskTracker,
    activation: Mutex<Activation>,
}

/// The registry of every catalogue model; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// What the request path gets for a routable model.
pub struct Route {
    pub admission: Arc<Admission>,
    pub engine: Arc<EngineConn>,
}

impl Registry {
    pub fn new(config: Arc<Config>) -> Self {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("HTTP client builds");
        let slots: Vec<Arc<Slot>> = config
            .models
            .iter()
            .map(|spec| {
                Arc::new(Slot {
                    spec: spec.clone(),
                    state: Mutex::new(SlotState {
                        phase: Phase::Unloaded,
                        error: None,
                        admission: None,
                        engine: None,
                        op: None,
                        stop: None,
                        finished: None,
                        rejected_base: 0,
                        tokens_base: 0,
                        last_info: None,
                        restarts: 0,
                    }),
                    tokenizer: Mutex::new(None),
                })
            })
            .collect();
        let by_id = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.spec.id.clone(), i))
            .collect();
        let preload: Vec<String> = config
            .models
            .iter()
            .filter(|m| m.preload)
            .map(|m| m.id.clone())
            .collect();
        let activation = Activation {
            state: if preload.is_empty() {
                ActivationState::Ready
            } else {
                ActivationState::PreWarming
            },
            pending: preload,
            ..Activation::default()
        };
        Registry {
            inner: Arc::new(Inner {
                config,
                client,
                slots,
                by_id,
                shutting_down: AtomicBool::new(false),
                tasks: TaskTracker::new(),
                activation: Mutex::new(activation),
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The HTTP client used to talk to engines (no proxy, short connect).
    pub fn client(&self) -> &reqwest::Client {
        &self.inner.client
    }

    fn slot(&self, id: &str) -> Option<&Arc<Slot>> {
        self.inner.by_id.get(id).map(|&i| &self.inner.slots[i])
    }

    pub fn in_catalogue(&self, id: &str) -> bool {
        self.inner.by_id.contains_key(id)
    }

    /// Catalogue ids in configuration order with their phase.
    pub fn phases(&self) -> Vec<(String, Phase)> {
        self.inner
            .slots
            .iter()
            .map(|s| (s.spec.id.clone(), s.lock().phase))
            .collect()
    }

    pub fn phase(&self, id: &str) -> Option<Phase> {
        self.slot(id).map(|s| s.lock().phase)
    }

    /// The last load or restart error of a model.
    pub fn last_error(&self, id: &str) -> Option<String> {
        self.slot(id).and_then(|s| s.lock().error.clone())
    }

    /// Pid of the model's current engine (tests use it to check for orphans).
    pub fn engine_pid(&self, id: &str) -> Option<u32> {
        self.slot(id)
            .and_then(|s| s.lock().engine.as_ref().map(|e| e.pid))
    }

    /// The engine and admission gate for a request, or the error to answer.
    pub fn route(&self, id: &str) -> Result<Route, ApiError> {
        let retry = self.inner.config.loading_retry_after_secs;
        let Some(slot) = self.slot(id) else {
            return Err(ApiError::model_not_found(id));
        };
        let st = slot.lock();
        match st.phase {
            Phase::Loaded => match (&st.admission, &st.engine) {
                (Some(a), Some(e)) => Ok(Route {
                    admission: a.clone(),
                    engine: e.clone(),
                }),
                _ => Err(loading(id, retry)),
            },
            Phase::Loading | Phase::Recovering => Err(loading(id, retry)),
            Phase::Unloaded => Err(ApiError::new(
                ErrorCode::ModelNotFound,
                format!("The model `{id}` is not loaded on this node (POST /models/load loads it)"),
            )
            .with_param("model")),
            Phase::Unloading => Err(ApiError::new(
                ErrorCode::ModelBusy,
                format!("The model `{id}` is being unloaded from this node"),
            )
            .with_retry_after(self.inner.config.busy_retry_after_secs)),
            Phase::Failed => Err(ApiError::new(
                ErrorCode::UpstreamError,
                format!(
                    "The model `{id}` failed on this node: {}",
                    st.error.as_deref().unwrap_or("unknown error")
                ),
            )),
        }
    }

    /// The current engine of a loaded model (re-checked after admission).
    pub fn current_engine(&self, id: &str) -> Result<Arc<EngineConn>, ApiError> {
        let retry = self.inner.config.loading_retry_after_secs;
        let slot = self.slot(id).ok_or_else(|| ApiError::model_not_found(id))?;
        let st = slot.lock();
        match (&st.phase, &st.engine) {
            (Phase::Loaded, Some(e)) => Ok(e.clone()),
            _ => Err(loading(id, retry)),
        }
    }

    /// `/health` figures for every model that is not unloaded.
    pub fn model_health(&self) -> Vec<ModelHealth> {
        let mut out = Vec::new();
        for slot in &self.inner.slots {
            let st = slot.lock();
            let Some(status) = st.phase.wire() else {
                continue;
            };
            let stats = st.engine.as_ref().map(|e| e.stats()).unwrap_or_default();
            let (in_flight, queue_depth, rejected) = st
                .admission
                .as_ref()
                .map(|a| (a.in_flight(), a.queue_depth(), a.rejected_total()))
                .unwrap_or((0, 0, 0));
            out.push(ModelHealth {
                id: slot.spec.id.clone(),
                status,
                in_flight,
                queue_depth,
                max_in_flight: slot.spec.max_in_flight,
                max_queue_depth: slot.spec.max_queue_depth,
                rejected_total: st.rejected_base + rejected,
                tokens_generated_total: st.tokens_base + stats.tokens_generated_total,
                tok_s_prefill: stats.tok_s_prefill,
                tok_s_decode: stats.tok_s_decode,
            });
        }
        out
    }

    /// `/models` entries: loading, loaded and recovering models.
    pub fn model_infos(&self) -> Vec<helexa_protocol::ModelInfo> {
        let mut out = Vec::new();
        for slot in &self.inner.slots {
            let st = slot.lock();
            let status = match st.phase {
                Phase::Loading => ModelStatus::Loading,
                Phase::Loaded => ModelStatus::Loaded,
                Phase::Recovering => ModelStatus::Recovering,
                _ => continue,
            };
            let info = st
                .engine
                .as_ref()
                .map(|e| e.info.clone())
                .or_else(|| st.last_info.clone())
                .unwrap_or_default();
            let memory_mb = if info.weights_bytes > 0 {
                info.weights_bytes.div_ceil(1024 * 1024)
            } else {
                st.engine
                    .as_ref()
                    .map(|e| process_rss_mb(e.pid))
                    .unwrap_or(0)
            };
            let capabilities = if info.capabilities.is_empty() {
                vec!["chat".to_string(), "completions".to_string()]
            } else {
                info.capabilities.clone()
            };
            out.push(helexa_protocol::ModelInfo {
                id: slot.spec.id.clone(),
                status,
                runtime: "candle".to_string(),
                devices: slot.spec.device_indexes(),
                memory_mb,
                limit: helexa_protocol::ModelLimit {
                    context: info.context_length,
                    output: info.max_output_tokens,
                },
                capabilities,
                tool_call: false,
                reasoning: false,
                tokenizer: Some(format!("/models/{}/tokenizer", slot.spec.id)),
            });
        }
        out
    }

    pub fn activation(&self) -> Activation {
        self.inner
            .activation
            .lock()
            .expect("activation lock")
            .clone()
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

    /// Owns the engine of one model from first start to stop.
    async fn supervise(
        &self,
        slot: Arc<Slot>,
        tx: watch::Sender<Option<OpResult>>,
        stop: CancellationToken,
    ) {
        let config = self.inner.config.clone();
        let id = slot.spec.id.clone();
        let first = EngineProcess::start(&config, &slot.spec, &self.inner.client, &stop).await;
        let (mut proc, info) = match first {
            Ok(p) => p,
            Err(e) => {
                let result = match e {
                    StartError::Cancelled => Err(LifecycleError::Cancelled(id.clone())),
                    e => {
                        tracing::error!(model = %id, error = %e, "engine failed to load");
                        Err(LifecycleError::LoadFailed {
                            id: id.clone(),
                            reason: e.to_string(),
                        })
                    }
                };
                {
                    // An unload that cancelled us owns the slot's state.
                    let mut st = slot.lock();
                    if st.phase == Phase::Loading {
                        if let Err(LifecycleError::LoadFailed { reason, .. }) = &result {
                            st.phase = Phase::Failed;
                            st.error = Some(reason.clone());
                        } else {
                            st.phase = Phase::Unloaded;
                        }
                        st.op = None;
                        st.stop = None;
                    }
                }
                let _ = tx.send(Some(result));
                return;
            }
        };
        let admission = Arc::new(Admission::new(Limits {
            max_in_flight: slot.spec.max_in_flight,
            max_queue_depth: slot.spec.max_queue_depth,
            max_wait: Duration::from_secs(slot.spec.max_wait_secs),
        }));
        let mut poll_stop = self.install_engine(&slot, &proc, info, Some(admission));
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
                    st.tokens_base += e.stats().tokens_generated_total;
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
                match EngineProcess::start(&config, &slot.spec, &self.inner.client, &stop).await {
                    Ok((p, info)) => {
                        proc = p;
                        poll_stop = self.install_engine(&slot, &proc, info, None);
                        {
                            let mut st = slot.lock();
                            st.restarts += 1;
                        }
                        tracing::info!(model = %id, pid = proc.pid(), "engine restarted");
                        break;
                    }
                    Err(StartError::Cancelled) => return,
                    Err(e) => {
                        attempt += 1;
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
                                st.rejected_base += a.rejected_total();
                            }
                            st.stop = None;
                            return;
                        }
                        delay = (delay * 2).min(max_delay);
                    }
                }
            }
        }
    }

    /// Publishes a ready engine in the slot and starts its health poller.
    /// Returns the poller's stop token.
    fn install_engine(
        &self,
        slot: &Arc<Slot>,
        proc: &EngineProcess,
        info: EngineInfo,
        admission: Option<Arc<Admission>>,
    ) -> CancellationToken {
        let conn = Arc::new(EngineConn {
            base_url: proc.base_url(),
            pid: proc.pid(),
            info: info.clone(),
            stats: Mutex::new(EngineHealth::default()),
        });
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
        let poll_stop = CancellationToken::new();
        let client = self.inner.client.clone();
        let interval = self.inner.config.engine_poll_interval();
        let token = poll_stop.clone();
        let this = self.clone();
        let slot = slot.clone();
        self.inner.tasks.spawn(async move {
            // Fetch the tokenizer once per load, in the background.
            if slot.tokenizer.lock().expect("tokenizer lock").is_none() {
                let _ = this.fetch_tokenizer(&slot, &conn).await;
            }
            loop {
                let poll = client
                    .get(format!("{}/health", conn.base_url))
                    .timeout(Duration::from_secs(2))
                    .send();
                let resp = tokio::select! {
                    r = poll => r,
                    _ = token.cancelled() => return,
                };
                if let Ok(resp) = resp {
                    if let Ok(h) = resp.json::<EngineHealth>().await {
                        *conn.stats.lock().expect("stats lock") = h;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = token.cancelled() => return,
                }
            }
        });
        poll_stop
    }

    async fn fetch_tokenizer(&self, slot: &Slot, conn: &EngineConn) -> Option<Bytes> {
        let resp = self
            .inner
            .client
            .get(format!("{}/tokenizer", conn.base_url))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let bytes = resp.bytes().await.ok()?;
        *slot.tokenizer.lock().expect("tokenizer lock") = Some(bytes.clone());
        Some(bytes)
    }

    /// The model's `tokenizer.json`, from cache or fetched from its engine.
    pub async fn tokenizer(&self, id: &str) -> Result<Bytes, ApiError> {
        let slot = self.slot(id).ok_or_else(|| ApiError::model_not_found(id))?;
        if let Some(b) = slot.tokenizer.lock().expect("tokenizer lock").clone() {
            return Ok(b);
        }
        let engine = self.current_engine(id).map_err(|_| {
            ApiError::new(
                ErrorCode::ModelNotFound,
                format!("The model `{id}` is not loaded on this node"),
            )
            .with_param("model")
        })?;
        self.fetch_tokenizer(slot, &engine).await.ok_or_else(|| {
            ApiError::new(
                ErrorCode::ModelNotFound,
                format!("The engine of `{id}` provides no tokenizer"),
            )
            .with_param("model")
        })
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
                                st.tokens_base += e.stats().tokens_generated_total;
                            }
                            if let Some(a) = st.admission.take() {
                                st.rejected_base += a.rejected_total();
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

    /// Running requests across all models.
    pub fn total_in_flight(&self) -> u32 {
        self.inner
            .slots
            .iter()
            .filter_map(|s| s.lock().admission.clone())
            .map(|a| a.in_flight())
            .sum()
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
        let deadline = tokio::time::Instant::now() + drain;
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

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
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

fn loading(id: &str, retry: u64) -> ApiError {
    ApiError::new(
        ErrorCode::ModelLoading,
        format!("The model `{id}` is loading on this node; retry shortly"),
    )
    .with_retry_after(retry)
}

/// Resident memory of a process, MiB (0 if unknown).
fn process_rss_mb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}
