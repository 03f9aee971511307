//! The model registry: which catalogue models are loaded, and what the
//! request path gets for each (`route`).
//!
//! Each model has one slot whose state sits behind a plain mutex that is
//! only ever held for a few field reads or writes, never across I/O, so that
//! control routes answer at once whatever the engines are doing. The rest is
//! split by concern: `lifecycle.rs` (load, unload, pre-warming, shutdown),
//! `wire.rs` (the slots projected onto `/health`, `/models` and the metrics
//! gauges), `tokenizer.rs` (the tokenizer cache). The engine processes
//! themselves are the `supervisor`'s.

mod budget;
mod lifecycle;
mod tokenizer;
mod wire;

use crate::admission::Admission;
use crate::config::{Config, ModelSpec};
use crate::metrics::Metrics;
use crate::supervisor::{EngineConn, EngineInfo};
use bytes::Bytes;
use helexa_api::{ApiError, ErrorCode};
use helexa_protocol::{Activation, ActivationState, ModelStatus};
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
    #[error("model `{id}` needs {need} MiB but this node has {free} MiB free of its {budget} MiB budget (memory_budget_mb)")]
    InsufficientMemory {
        id: String,
        need: u64,
        free: u64,
        budget: u64,
    },
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
            LifecycleError::InsufficientMemory {
                need, free, budget, ..
            } => ApiError::new(ErrorCode::InsufficientMemory, e.to_string())
                .with_extra("need_mb", *need)
                .with_extra("free_mb", *free)
                .with_extra("budget_mb", *budget),
        }
    }
}

#[derive(Debug)]
pub(crate) struct SlotState {
    pub(crate) phase: Phase,
    pub(crate) error: Option<String>,
    /// What the last load fell back on (`/health` `warning`).
    pub(crate) warning: Option<String>,
    pub(crate) admission: Option<Arc<Admission>>,
    pub(crate) engine: Option<Arc<EngineConn>>,
    /// The running lifecycle operation, if any.
    pub(crate) op: Option<watch::Receiver<Option<OpResult>>>,
    /// Cancels the supervisor (stops the engine).
    pub(crate) stop: Option<CancellationToken>,
    /// Cancelled by the supervisor when it has finished (engine reaped).
    pub(crate) finished: Option<CancellationToken>,
    /// Counters carried over from earlier engines / admissions.
    pub(crate) rejected_base: u64,
    pub(crate) tokens_base: u64,
    pub(crate) last_info: Option<EngineInfo>,
    pub(crate) restarts: u64,
}

#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) spec: ModelSpec,
    pub(crate) state: Mutex<SlotState>,
    pub(crate) tokenizer: Mutex<Option<Bytes>>,
}

impl Slot {
    pub(crate) fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().expect("slot lock")
    }
}

pub(crate) struct Inner {
    pub(crate) config: Arc<Config>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) client: reqwest::Client,
    pub(crate) slots: Vec<Arc<Slot>>,
    pub(crate) by_id: HashMap<String, usize>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) tasks: TaskTracker,
    pub(crate) activation: Mutex<Activation>,
    /// Per slot: what its files say it needs (`memory::estimate`).
    /// Per slot: from the file, and for a `repo` model once it is in the
    /// hub cache (at start-up, or after its download).
    pub(crate) estimates: Vec<Mutex<crate::memory::Estimate>>,
    /// MiB this node may give to models (`memory_budget_mb`, else what the
    /// machine had free at start-up).
    pub(crate) budget_mb: u64,
    /// Held (never across I/O) while a load checks the budget and marks
    /// its slot loading, so that two loads cannot share the last free MiB.
    pub(crate) admit: Mutex<()>,
    /// Models being fetched from a hub source, by id (`activation.downloads`).
    pub(crate) downloads:
        Mutex<std::collections::BTreeMap<String, helexa_protocol::DownloadProgress>>,
}

/// The registry of every catalogue model; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    pub(crate) inner: Arc<Inner>,
}

/// What the request path gets for a routable model.
pub struct Route {
    pub admission: Arc<Admission>,
    pub engine: Arc<EngineConn>,
}

impl Registry {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Self {
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
                        warning: None,
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
        let estimates = config
            .models
            .iter()
            .map(|spec| Mutex::new(crate::memory::estimate_cached(&config, spec)))
            .collect();
        let budget_mb = config.memory_budget_mb.unwrap_or_else(|| {
            crate::memory::default_budget_mb(
                &crate::discovery::devices(),
                &crate::discovery::memory(),
            )
        });
        Registry {
            inner: Arc::new(Inner {
                estimates,
                budget_mb,
                admit: Mutex::new(()),
                config,
                metrics,
                client,
                slots,
                by_id,
                shutting_down: AtomicBool::new(false),
                tasks: TaskTracker::new(),
                activation: Mutex::new(activation),
                downloads: Mutex::new(Default::default()),
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The HTTP client used to talk to engines (no proxy, short connect).
    pub fn client(&self) -> &reqwest::Client {
        &self.inner.client
    }

    pub(crate) fn slot(&self, id: &str) -> Option<&Arc<Slot>> {
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

    /// Running requests across all models.
    pub fn total_in_flight(&self) -> u32 {
        self.inner
            .slots
            .iter()
            .filter_map(|s| s.lock().admission.clone())
            .map(|a| a.in_flight())
            .sum()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }
}

fn loading(id: &str, retry: u64) -> ApiError {
    ApiError::new(
        ErrorCode::ModelLoading,
        format!("The model `{id}` is loading on this node; retry shortly"),
    )
    .with_retry_after(retry)
}
