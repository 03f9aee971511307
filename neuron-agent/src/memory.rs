//! How much memory a model needs and how much this node may give
//! (docs/protocol.md §6), so that cortex can place models and a load that
//! cannot fit is refused before anything is allocated.
//!
//! The estimate is read from the model's files without loading them: the
//! weights as stored (GGUF tensors are used as stored; safetensors are
//! widened to f32 on CPU) plus the KV cache the engine allocates at its
//! configured context for every batch slot (16-bit on CUDA and for GGUFs the
//! native CPU kernels run; f32 on the CPU's device-generic decoder).

use crate::config::{expand_tilde, ModelSpec};
use std::path::Path;

const MIB: u64 = 1024 * 1024;

/// Batch slots an engine runs when `max_batch` is unset (`neuron engine
/// --max-batch`'s default); each slot gets a whole-context KV cache.
const DEFAULT_SLOTS: u64 = 8;

/// What a model needs loaded, split so that the weights part can be
/// replaced by the engine's real figure once it is loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    pub weights_bytes: u64,
    pub kv_bytes: u64,
}

impl Estimate {
    /// 0 when unknown.
    pub fn total_mb(&self) -> u64 {
        (self.weights_bytes + self.kv_bytes).div_ceil(MIB)
    }

    /// The figure once loaded: the engine's real weight bytes (when it
    /// reports them) plus the KV cache it allocates.
    pub fn loaded_mb(&self, engine_weights_bytes: u64) -> u64 {
        if engine_weights_bytes == 0 {
            return self.total_mb();
        }
        (engine_weights_bytes + self.kv_bytes).div_ceil(MIB)
    }
}

/// `estimate`, and for a `repo` model already in the hub cache, the
/// estimate of its cached files (so that its load is checked against the
/// budget before anything starts, like a local model's).
pub fn estimate_cached(config: &crate::config::Config, spec: &ModelSpec) -> Estimate {
    if spec.repo.is_none() {
        return estimate(spec);
    }
    match crate::hub::Hub::cached_model(&config.hub_cache_dir(), spec) {
        Some(path) => estimate(&local(spec, path)),
        None => Estimate::default(),
    }
}

/// `spec` as a local model at `path` (what a resolved `repo` model is).
pub fn local(spec: &ModelSpec, path: std::path::PathBuf) -> ModelSpec {
    let mut s = spec.clone();
    s.repo = None;
    s.path = path;
    s
}

/// The memory `spec` needs loaded; zero when its files are not on this
/// machine yet (a `repo` model not yet fetched) or cannot be read.
pub fn estimate(spec: &ModelSpec) -> Estimate {
    if spec.repo.is_some() || spec.path.as_os_str().is_empty() {
        return Estimate::default();
    }
    let path = expand_tilde(&spec.path);
    let cuda = spec
        .device
        .as_deref()
        .is_some_and(|d| d.starts_with("cuda"));
    let slots = spec
        .max_batch
        .map_or(DEFAULT_SLOTS, |b| u64::from(b.max(1)));
    let shape = if path.is_dir() {
        safetensors_shape(&path, cuda).map(|s| (s, false))
    } else {
        gguf_shape(&path)
    };
    match shape {
        Ok((s, native)) => s.estimate(spec.max_context, slots, if cuda || native { 2 } else { 4 }),
        Err(e) => {
            tracing::debug!(model = %spec.id, error = %e, "no memory estimate");
            Estimate::default()
        }
    }
}

/// What the estimate needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shape {
    weights_bytes: u64,
    layers: u64,
    kv_heads: u64,
    head_dim: u64,
    trained_context: u64,
}

impl Shape {
    /// Weights + KV cache for `slots` sequences of the served context
    /// (`max_context` capped by the trained one, as the engine does).
    fn estimate(&self, max_context: Option<u32>, slots: u64, kv_bytes: u64) -> Estimate {
        let context = max_context.map_or(self.trained_context, |c| {
            u64::from(c).min(self.trained_context)
        });
        Estimate {
            weights_bytes: self.weights_bytes,
            kv_bytes: 2 * self.layers * self.kv_heads * self.head_dim * context * kv_bytes * slots,
        }
    }
}

/// The GGUF's shape, and whether the native kernels run it.
fn gguf_shape(path: &Path) -> Result<(Shape, bool), String> {
    use candle_core::quantized::gguf_file::{Content, Value};
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let ct = Content::read(&mut f).map_err(|e| format!("{}: {e}", path.display()))?;
    let md = &ct.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "llama".into());
    let num = |k: &str| -> Option<u64> {
        match md.get(&format!("{arch}.{k}"))? {
            Value::U8(v) => Some(u64::from(*v)),
            Value::U16(v) => Some(u64::from(*v)),
            Value::U32(v) => Some(u64::from(*v)),
            Value::U64(v) => Some(*v),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    };
    let heads = num("attention.head_count").ok_or("no attention.head_count")?;
    let embd = num("embedding_length").ok_or("no embedding_length")?;
    let file_bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
    // Tensor data is what follows the header; the header itself is small.
    let weights_bytes = file_bytes.saturating_sub(ct.tensor_data_offset);
    let shape = Shape {
        weights_bytes,
        layers: num("block_count").ok_or("no block_count")?,
        kv_heads: num("attention.head_count_kv").unwrap_or(heads),
        head_dim: num("attention.key_length").unwrap_or(embd / heads.max(1)),
        trained_context: num("context_length").unwrap_or(4096),
    };
    // The native kernels keep an f16 KV cache.
    Ok((
        shape,
        helexa_engine::NATIVE_ARCHITECTURES.contains(&arch.as_str()),
    ))
}

fn safetensors_shape(dir: &Path, cuda: bool) -> Result<Shape, String> {
    let text = std::fs::read_to_string(dir.join("config.json"))
        .map_err(|e| format!("{}/config.json: {e}", dir.display()))?;
    let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let num = |k: &str| cfg.get(k).and_then(|v| v.as_u64());
    let heads = num("num_attention_heads").ok_or("no num_attention_heads")?;
    let hidden = num("hidden_size").ok_or("no hidden_size")?;
    let mut stored = 0u64;
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.path().extension().is_some_and(|x| x == "safetensors") {
            stored += entry.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    // 16-bit files are widened to f32 on CPU; CUDA keeps 16 bits.
    let widen = match cfg.get("torch_dtype").and_then(|v| v.as_str()) {
        Some("float32") => 1,
        _ if cuda => 1,
        _ => 2,
    };
    Ok(Shape {
        weights_bytes: stored * widen,
        layers: num("num_hidden_layers").ok_or("no num_hidden_layers")?,
        kv_heads: num("num_key_value_heads").unwrap_or(heads),
        head_dim: num("head_dim").unwrap_or(hidden / heads.max(1)),
        trained_context: num("max_position_embeddings").unwrap_or(4096),
    })
}

/// The budget at start-up when `memory_budget_mb` is unset: free device
/// memory on a GPU node, available host memory on a CPU one.
pub fn default_budget_mb(
    devices: &[helexa_protocol::DeviceInfo],
    host: &helexa_protocol::MemoryMb,
) -> u64 {
    let dev: u64 = devices.iter().map(|d| d.memory_free_mb).sum();
    if devices.is_empty() || dev == 0 {
        host.available
    } else {
        dev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_scales_with_context_and_slots() {
        let s = Shape {
            weights_bytes: 100 * MIB,
            layers: 30,
            kv_heads: 3,
            head_dim: 64,
            trained_context: 8192,
        };
        // 2 (k, v) * 30 * 3 * 64 * 1024 positions * 4 bytes = 45 MiB per slot.
        assert_eq!(s.estimate(Some(1024), 1, 4).total_mb(), 145);
        assert_eq!(s.estimate(Some(1024), 2, 4).total_mb(), 190);
        // max_context above the trained context is capped, as the engine does.
        assert_eq!(s.estimate(Some(1 << 20), 1, 4).total_mb(), 100 + 45 * 8);
        assert_eq!(s.estimate(None, 1, 2).total_mb(), 100 + 45 * 4);
        // Once loaded, the engine's own weight figure replaces the file's.
        assert_eq!(s.estimate(Some(1024), 1, 4).loaded_mb(50 * MIB), 95);
        assert_eq!(s.estimate(Some(1024), 1, 4).loaded_mb(0), 145);
    }

    #[test]
    fn unfetched_or_unreadable_models_have_no_estimate() {
        let spec = ModelSpec::from_repo("m", "org/m");
        assert_eq!(estimate(&spec).total_mb(), 0);
        let spec = ModelSpec::new("m", "/nonexistent/model.gguf");
        assert_eq!(estimate(&spec).total_mb(), 0);
    }

    #[test]
    fn default_budget_prefers_devices() {
        let host = helexa_protocol::MemoryMb {
            total: 64_000,
            available: 50_000,
        };
        assert_eq!(default_budget_mb(&[], &host), 50_000);
        let gpu = helexa_protocol::DeviceInfo {
            memory_free_mb: 80_000,
            ..Default::default()
        };
        assert_eq!(default_budget_mb(&[gpu.clone(), gpu], &host), 160_000);
    }
}
