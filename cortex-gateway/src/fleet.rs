//! What cortex knows about the fleet: an immutable snapshot per poll plus
//! per-replica counters that live across snapshots.
//!
//! Request handlers clone an `Arc<Snapshot>` under a read lock held for a
//! pointer copy only; the poller swaps in a new snapshot. Nobody waits on I/O.

use helexa_protocol::{Discovery, ModelHealth, ModelInfo, NodeStatus};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

/// One configured neuron; lives as long as cortex.
#[derive(Debug)]
pub struct Neuron {
    pub name: String,
    /// Base URL without a trailing slash.
    pub endpoint: String,
    /// `x-helexa-node` value, built once.
    pub header: http::HeaderValue,
    /// cortex's own open requests per model on this neuron.
    local: RwLock<HashMap<String, Arc<AtomicU32>>>,
    /// `GET /models/{id}/endpoint` answers, per model.
    endpoints: RwLock<HashMap<String, Arc<str>>>,
}

impl Neuron {
    pub fn new(name: &str, endpoint: &str) -> Self {
        Neuron {
            name: name.to_string(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            header: http::HeaderValue::from_str(name)
                .unwrap_or(http::HeaderValue::from_static("invalid-node-name")),
            local: RwLock::default(),
            endpoints: RwLock::default(),
        }
    }

    /// The counter of cortex's open requests to `model` here.
    pub fn local_counter(&self, model: &str) -> Arc<AtomicU32> {
        if let Some(c) = self
            .local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
        {
            return c.clone();
        }
        self.local
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(model.to_string())
            .or_default()
            .clone()
    }

    pub fn local_in_flight(&self, model: &str) -> u32 {
        self.local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub fn cached_endpoint(&self, model: &str) -> Option<Arc<str>> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .cloned()
    }

    pub fn cache_endpoint(&self, model: &str, url: &str) -> Arc<str> {
        let url: Arc<str> = Arc::from(url.trim_end_matches('/'));
        self.endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(model.to_string(), url.clone());
        url
    }

    pub fn forget_endpoint(&self, model: &str) {
        self.endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(model);
    }

    /// Drops cached endpoints of models this neuron no longer reports.
    pub fn retain_endpoints(&self, keep: impl Fn(&str) -> bool) {
        self.endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep(k));
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
