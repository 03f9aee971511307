//! What cortex knows about the fleet: an immutable snapshot per poll plus
//! per-replica counters that live across snapshots.
//!
//! Request handlers clone an `Arc<Snapshot>` under a read lock held for a
//! pointer copy only; the poller swaps in a new snapshot. Nobody waits on I/O.

use helexa_protocol::{Discovery, ModelHealth, ModelInfo, NodeStatus};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
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
}

impl Snapshot {
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
            snapshot: RwLock::new(Arc::new(Snapshot {
                nodes: vec![NodeView::default(); n],
            })),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn store(&self, snap: Snapshot) {
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
    }
}
