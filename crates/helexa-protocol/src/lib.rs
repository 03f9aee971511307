//! The cortex <-> neuron wire types (docs/protocol.md §3).
//!
//! Both sides serialise and parse exactly these structs. Every field carries
//! `#[serde(default)]` so that a newer cortex can poll an older neuron and the
//! other way round: a missing field is never a parse failure.

use serde::{Deserialize, Serialize};

/// Protocol revision spoken by this build; `Discovery::protocol`.
pub const PROTOCOL_VERSION: u32 = 1;

/// `GET /discovery`: what a node is. Changes rarely.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Discovery {
    pub node: String,
    pub version: String,
    pub protocol: u32,
    pub hostname: String,
    pub cpu: CpuInfo,
    pub memory_mb: MemoryMb,
    pub devices: Vec<DeviceInfo>,
    pub runtimes: Vec<String>,
    pub catalogue: Vec<CatalogueEntry>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CpuInfo {
    pub model: String,
    pub cores: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MemoryMb {
    pub total: u64,
    pub available: u64,
}

/// One accelerator as discovery reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DeviceInfo {
    pub index: u32,
    /// `cuda` (the only kind so far).
    pub kind: String,
    pub name: String,
    pub memory_total_mb: u64,
    pub memory_free_mb: u64,
    pub compute_capability: String,
}

/// A model this node can load, loaded or not.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CatalogueEntry {
    pub id: String,
    pub loaded: bool,
    /// What the model needs loaded on this node, MiB (docs/protocol.md §6):
    /// the estimate from its files (weights + KV cache at the configured
    /// context) while unloaded, the real figure once loaded; 0 = unknown.
    pub memory_mb: u64,
}

/// `GET /health`: how busy a node is. Polled every poll interval.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Health {
    pub status: NodeStatus,
    pub uptime_secs: u64,
    pub activation: Activation,
    pub devices: Vec<DeviceHealth>,
    pub models: Vec<ModelHealth>,
    /// The memory this node may give to models (docs/protocol.md §6);
    /// absent from older neurons.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<MemoryBudget>,
}

/// `/health` `memory_mb`: `budget` is what the node may give to models,
/// `used` what its loaded (and loading) models take, `free` the rest.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MemoryBudget {
    pub budget: u64,
    pub used: u64,
    pub free: u64,
}

impl MemoryBudget {
    /// `used` out of `budget`, `free` saturating at 0 (an over-committed
    /// node has no room, never negative room).
    pub fn new(budget: u64, used: u64) -> Self {
        MemoryBudget {
            budget,
            used,
            free: budget.saturating_sub(used),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    #[default]
    Starting,
    Ready,
    Draining,
}

/// Pre-warming progress: which preloaded models are pending, loading, done.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Activation {
    pub state: ActivationState,
    pub pending: Vec<String>,
    pub in_progress: Option<String>,
    pub completed: Vec<String>,
    pub failed: Vec<String>,
    /// Files being fetched from a model source (docs/protocol.md §9), one
    /// entry per model that is downloading; absent when none is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub downloads: Vec<DownloadProgress>,
}

/// Progress of one model's download from a hub source.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DownloadProgress {
    /// The model id.
    pub model: String,
    pub repo: String,
    /// The source name it is fetched from.
    pub source: String,
    /// The file being fetched now.
    pub file: String,
    /// Bytes present of all the files this load needs.
    pub bytes_done: u64,
    /// Bytes of all the files this load needs.
    pub bytes_total: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ActivationState {
    #[default]
    PreWarming,
    Ready,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DeviceHealth {
    pub index: u32,
    pub memory_used_mb: u64,
    pub memory_free_mb: u64,
    pub utilization_pct: u32,
}

/// Lifecycle of one model on one node.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    Loading,
    #[default]
    Loaded,
    /// Its engine died and is being restarted.
    Recovering,
    Failed,
}

/// Per-model load as `/health` reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModelHealth {
    pub id: String,
    pub status: ModelStatus,
    pub in_flight: u32,
    pub queue_depth: u32,
    pub max_in_flight: u32,
    pub max_queue_depth: u32,
    pub rejected_total: u64,
    pub tokens_generated_total: u64,
    pub tok_s_prefill: f64,
    pub tok_s_decode: f64,
    /// Something the load fell back on, e.g. a `repo` model served with its
    /// GGUF's own tokenizer or template because its base repo could not be
    /// found or fetched (docs/protocol.md §9); absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `GET /models`: one loaded model and what it can do.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModelInfo {
    pub id: String,
    pub status: ModelStatus,
    pub runtime: String,
    /// Device indexes the model runs on; empty means CPU.
    pub devices: Vec<u32>,
    pub memory_mb: u64,
    pub limit: ModelLimit,
    pub capabilities: Vec<String>,
    pub tool_call: bool,
    /// A reasoning model (its answers may carry `reasoning_content`).
    pub reasoning: bool,
    /// The model's own sampling defaults (`generation_config.json`, GGUF
    /// metadata), applied to fields a request omits; absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_defaults: Option<serde_json::Value>,
    /// Where the tokenizer lives on the node (informational); cortex fetches
    /// it through `GET /models/{id}/tokenizer`.
    pub tokenizer: Option<String>,
}

/// Token limits a model really serves. `0` means unknown.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ModelLimit {
    pub context: u32,
    pub output: u32,
}

/// `POST /models/load` and `POST /models/unload` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModelRequest {
    pub model: String,
}

/// Answer to load/unload: `{"status": "loaded"}` or `{"status": "unloaded"}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LifecycleResponse {
    pub status: String,
}

/// `GET /models/{id}/endpoint`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct EndpointResponse {
    pub url: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_parses_protocol_example() {
        let text = r#"{
          "status": "ready", "uptime_secs": 812,
          "activation": {"state": "ready", "pending": [], "in_progress": null,
                         "completed": ["smollm2-135m-instruct"], "failed": []},
          "devices": [{"index": 0, "memory_used_mb": 1200, "memory_free_mb": 80359, "utilization_pct": 37}],
          "models": [{"id": "smollm2-135m-instruct", "status": "loaded",
             "in_flight": 2, "queue_depth": 0, "max_in_flight": 8, "max_queue_depth": 32,
             "rejected_total": 0, "tokens_generated_total": 91234,
             "tok_s_prefill": 1650.0, "tok_s_decode": 71.5}]
        }"#;
        let h: Health = serde_json::from_str(text).unwrap();
        assert_eq!(h.status, NodeStatus::Ready);
        assert_eq!(h.activation.state, ActivationState::Ready);
        assert_eq!(h.models[0].in_flight, 2);
        assert_eq!(h.models[0].status, ModelStatus::Loaded);
        assert_eq!(h.devices[0].memory_free_mb, 80359);
        assert_eq!(h.memory_mb, None);
        let h: Health = serde_json::from_str(
            r#"{"status":"ready","memory_mb":{"budget":1000,"used":400,"free":600}}"#,
        )
        .unwrap();
        assert_eq!(h.memory_mb, Some(MemoryBudget::new(1000, 400)));
        assert_eq!(MemoryBudget::new(100, 400).free, 0);
    }

    #[test]
    fn older_and_newer_peers_parse() {
        // An older neuron that omits most fields still parses.
        let h: Health = serde_json::from_str(r#"{"status":"draining"}"#).unwrap();
        assert_eq!(h.status, NodeStatus::Draining);
        assert!(h.models.is_empty());
        // A newer one with unknown fields parses too.
        let m: ModelInfo =
            serde_json::from_str(r#"{"id":"x","limit":{"context":8192},"future":1}"#).unwrap();
        assert_eq!(m.limit.context, 8192);
        assert_eq!(m.limit.output, 0);
    }

    #[test]
    fn model_info_round_trips() {
        let m = ModelInfo {
            id: "smollm2-135m-instruct".into(),
            status: ModelStatus::Recovering,
            runtime: "candle".into(),
            limit: ModelLimit {
                context: 8192,
                output: 2048,
            },
            capabilities: vec!["chat".into(), "completions".into()],
            ..Default::default()
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["status"], "recovering");
        let back: ModelInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
    }
}
