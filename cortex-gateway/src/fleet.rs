//! What cortex knows about the fleet: an immutable snapshot per poll plus
//! per-replica counters that live across snapshots.
//!
//! Request handlers clone an `Arc<Snapshot>` under a read lock held for a
//! pointer copy only; the poller swaps in a new snapshot. Nobody waits on I/O.

use helexa_protocol::{Discovery, ModelHealth, ModelInfo, NodeStatus};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// cortex's own state for one model on one neuron, kept across snapshots:
/// its open requests there, the cached `/v1` endpoint, and the metric
/// series its requests update (looked up once, not per request).
#[derive(Debug)]
pub struct Replica {
    pub model: String,
    in_flight: AtomicU32,
    /// `GET /models/{id}/endpoint`'s answer, trailing `/` trimmed.
    endpoint: Mutex<Option<Arc<str>>>,
    series: OnceLock<Series>,
    /// [`now_ms`] when a request last went here (or the replica appeared):
    /// the LRU order of eviction and the idle clock of autoscaling.
    last_used_ms: AtomicU64,
    /// [`now_ms`] since which every poll saw queued work here; 0 = none.
    queued_since_ms: AtomicU64,
}

/// Milliseconds since this process first asked, never 0 (0 means "never"
/// in the replica clocks).
pub fn now_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// The labelled series a replica's requests update most.
#[derive(Debug)]
pub struct Series {
    /// `cortex_requests_total{model,node,status="200",key="-"}`.
    pub ok: prometheus::IntCounter,
    /// `cortex_request_duration_seconds{model}`.
    pub duration: prometheus::Histogram,
    /// `cortex_time_to_first_token_seconds{model}`.
    pub ttft: prometheus::Histogram,
}

impl Replica {
    fn new(model: &str) -> Self {
        Replica {
            model: model.to_string(),
            in_flight: AtomicU32::new(0),
            endpoint: Mutex::new(None),
            series: OnceLock::new(),
            last_used_ms: AtomicU64::new(now_ms()),
            queued_since_ms: AtomicU64::new(0),
        }
    }

    /// Marks the replica used now.
    pub fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    /// Records whether the last poll saw queued work here.
    pub fn note_queue(&self, queued: bool) {
        if !queued {
            self.queued_since_ms.store(0, Ordering::Relaxed);
        } else if self.queued_since_ms.load(Ordering::Relaxed) == 0 {
            self.queued_since_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// How long work has been queued here without a break, ms; 0 = none now.
    pub fn queued_for_ms(&self) -> u64 {
        match self.queued_since_ms.load(Ordering::Relaxed) {
            0 => 0,
            since => now_ms().saturating_sub(since),
        }
    }

    /// cortex's open requests here.
    pub fn in_flight(&self) -> &AtomicU32 {
        &self.in_flight
    }

    pub fn endpoint(&self) -> Option<Arc<str>> {
        self.endpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_endpoint(&self, url: Option<Arc<str>>) {
        *self.endpoint.lock().unwrap_or_else(|p| p.into_inner()) = url;
    }

    /// The series for this replica, resolved on first use.
    pub fn series(&self, metrics: &crate::metrics::Metrics, node: &str) -> &Series {
        self.series.get_or_init(|| Series {
            ok: metrics
                .requests_total
                .with_label_values(&[&self.model, node, "200", "-"]),
            duration: metrics.request_duration.with_label_values(&[&self.model]),
            ttft: metrics.ttft.with_label_values(&[&self.model]),
        })
    }
}

/// One configured neuron; lives as long as cortex.
#[derive(Debug)]
pub struct Neuron {
    pub name: String,
    /// Base URL without a trailing slash.
    pub endpoint: String,
    /// `x-helexa-node` value, built once.
    pub header: http::HeaderValue,
    /// Per model: cortex's own state for its replica here.
    replicas: RwLock<HashMap<String, Arc<Replica>>>,
    /// Set when a request here got no response head within
    /// `upstream.first_byte_timeout_ms`: the neuron is unhealthy until a
    /// poll succeeds again, so one hung neuron costs one client one timeout.
    suspect: std::sync::atomic::AtomicBool,
}

impl Neuron {
    pub fn new(name: &str, endpoint: &str) -> Self {
        Neuron {
            name: name.to_string(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            header: http::HeaderValue::from_str(name)
                .unwrap_or(http::HeaderValue::from_static("invalid-node-name")),
            replicas: RwLock::default(),
            suspect: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }

    pub fn set_suspect(&self, v: bool) {
        self.suspect.store(v, Ordering::Relaxed);
    }

    fn existing(&self, model: &str) -> Option<Arc<Replica>> {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .cloned()
    }

    /// cortex's state for `model` here (made on first use).
    pub fn replica(&self, model: &str) -> Arc<Replica> {
        if let Some(r) = self.existing(model) {
            return r;
        }
        self.replicas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(model.to_string())
            .or_insert_with(|| Arc::new(Replica::new(model)))
            .clone()
    }

    pub fn local_in_flight(&self, model: &str) -> u32 {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .map(|r| r.in_flight.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Drops cached endpoints of models this neuron no longer reports.
    pub fn retain_endpoints(&self, keep: impl Fn(&str) -> bool) {
        for (model, r) in self
            .replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if !keep(model) {
                r.set_endpoint(None);
            }
        }
    }
}

/// One neuron as the last polls saw it.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    pub healthy: bool,
    pub consecutive_failures: u32,
    pub status: Option<NodeStatus>,
    pub discovery: Option<Discovery>,
    /// Loaded models from `/models`, by id.
    pub models: HashMap<String, ModelInfo>,
    /// Load from `/health`, by model id.
    pub load: HashMap<String, ModelHealth>,
    /// Polls since `/discovery` was last read.
    pub polls_since_discovery: u32,
    /// `/health` `memory_mb`; `None` from neurons that do not report it.
    pub memory: Option<helexa_protocol::MemoryBudget>,
}

impl NodeView {
    /// Whether requests for `model` may go here now.
    pub fn serves(&self, model: &str) -> bool {
        use helexa_protocol::ModelStatus;
        if !self.healthy || self.status == Some(NodeStatus::Draining) {
            return false;
        }
        let Some(info) = self.models.get(model) else {
            return false;
        };
        let status = self
            .load
            .get(model)
            .map(|h| h.status)
            .unwrap_or(info.status);
        info.status == ModelStatus::Loaded && status == ModelStatus::Loaded
    }

    /// The node's estimate of what `model` needs, MiB; 0 = unknown.
    pub fn need_mb(&self, model: &str) -> u64 {
        self.discovery
            .as_ref()
            .and_then(|d| d.catalogue.iter().find(|c| c.id == model))
            .map_or(0, |c| c.memory_mb)
    }

    /// What loaded `model` takes here, MiB: its `/models` figure, else the
    /// catalogue's.
    pub fn taken_mb(&self, model: &str) -> u64 {
        match self.models.get(model).map_or(0, |m| m.memory_mb) {
            0 => self.need_mb(model),
            n => n,
        }
    }

    /// Whether `model` is loading here now.
    pub fn loading(&self, model: &str) -> bool {
        use helexa_protocol::ModelStatus;
        self.models
            .get(model)
            .is_some_and(|m| m.status == ModelStatus::Loading)
            || self
                .load
                .get(model)
                .is_some_and(|h| h.status == ModelStatus::Loading)
    }

    /// Whether this node takes loads at all (healthy, not draining).
    pub fn accepts_loads(&self) -> bool {
        self.healthy && self.status != Some(NodeStatus::Draining)
    }

    /// Whether this node could load `model` (its catalogue lists it).
    pub fn can_load(&self, model: &str) -> bool {
        self.healthy
            && self.status != Some(NodeStatus::Draining)
            && self
                .discovery
                .as_ref()
                .is_some_and(|d| d.catalogue.iter().any(|c| c.id == model))
    }
}

/// The fleet at one instant; index `i` of `nodes` is `Fleet::neurons[i]`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub nodes: Vec<NodeView>,
    /// Per model: the indexes of the nodes that serve it now, ascending.
    /// Built once per snapshot so that routing looks at a model's replicas
    /// only, not at every node of a large fleet.
    serving: HashMap<String, Vec<usize>>,
    /// Per model: the nodes whose last `/discovery` lists it, with their
    /// estimate of its need (MiB), ascending by node; placement's index.
    catalogued: HashMap<String, Vec<(usize, u64)>>,
}

impl Snapshot {
    pub fn new(nodes: Vec<NodeView>) -> Self {
        let mut serving: HashMap<String, Vec<usize>> = HashMap::new();
        let mut catalogued: HashMap<String, Vec<(usize, u64)>> = HashMap::new();
        for (i, v) in nodes.iter().enumerate() {
            for id in v.models.keys() {
                if v.serves(id) {
                    serving.entry(id.clone()).or_default().push(i);
                }
            }
            for c in v.discovery.iter().flat_map(|d| &d.catalogue) {
                catalogued
                    .entry(c.id.clone())
                    .or_default()
                    .push((i, c.memory_mb));
            }
        }
        Snapshot {
            nodes,
            serving,
            catalogued,
        }
    }

    /// The nodes whose catalogue lists `model` (healthy or not), each with
    /// its estimate of the model's need.
    pub fn catalogued(&self, model: &str) -> &[(usize, u64)] {
        self.catalogued.get(model).map_or(&[], Vec::as_slice)
    }

    /// The nodes serving `model` now.
    pub fn serving(&self, model: &str) -> &[usize] {
        self.serving.get(model).map_or(&[], Vec::as_slice)
    }

    pub fn any_healthy(&self) -> bool {
        self.nodes.iter().any(|n| n.healthy)
    }
}

/// The configured neurons and the current snapshot.
#[derive(Debug)]
pub struct Fleet {
    pub neurons: Vec<Arc<Neuron>>,
    snapshot: RwLock<Arc<Snapshot>>,
}

impl Fleet {
    pub fn new(neurons: Vec<Neuron>) -> Self {
        let n = neurons.len();
        Fleet {
            neurons: neurons.into_iter().map(Arc::new).collect(),
            snapshot: RwLock::new(Arc::new(Snapshot::new(vec![NodeView::default(); n]))),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts in a snapshot made of `nodes` (and its replica index).
    pub fn store(&self, nodes: Vec<NodeView>) {
        let snap = Arc::new(Snapshot::new(nodes));
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = snap;
    }
}
