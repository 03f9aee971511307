//! Dense safetensors + `config.json` directories (the GPU path): llama
//! architecture, through candle-transformers' llama with one KV cache per slot.

use super::{Chunk, Model};
use crate::api::DeviceSpec;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig, LlamaEosToks};
use std::path::{Path, PathBuf};

/// A llama model with dense weights on a candle device.
pub struct DenseLlama {
    llama: Llama,
    config: Config,
    device: Device,
    dtype: DType,
    context_length: usize,
    /// One KV cache per slot, created on first use.
    caches: Vec<Option<Cache>>,
}

/// What `load` read from a model directory.
pub struct DenseLoaded {
    pub model: DenseLlama,
    pub name: Option<String>,
    pub trained_context: usize,
    pub vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// From `tokenizer_config.json`.
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
    pub add_bos_token: Option<bool>,
    pub weights_bytes: u64,
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("cannot parse {}: {e}", path.display()))
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template`: a string, or a list of `{name, template}` (the `default` one).
pub(crate) fn chat_template(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

pub(crate) fn device(spec: DeviceSpec) -> Result<(Device, DType), String> {
    match spec {
        DeviceSpec::Cpu => Ok((Device::Cpu, DType::F32)),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            let dev = Device::new_cuda(i).map_err(|e| format!("CUDA device {i}: {e}"))?;
            Ok((dev, DType::BF16))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(i) => Err(format!(
            "CUDA device {i} requested, but helexa-engine was built without the `cuda` feature"
        )),
    }
}

/// Loads `dir/config.json` and every `dir/*.safetensors`.
pub fn load(
    dir: &Path,
    spec: DeviceSpec,
    max_context: Option<usize>,
    slots: usize,
) -> Result<DenseLoaded, String> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(format!("{} is missing", config_path.display()));
    }
    let raw = read_json(&config_path)?;
    if let Some(t) = raw.get("model_type").and_then(|v| v.as_str()) {
        if t != "llama" {
            return Err(format!(
                "model_type {t:?} is not supported for safetensors directories (only llama)"
            ));
        }
    }
    let llama_config: LlamaConfig = serde_json::from_value(raw.clone())
        .map_err(|e| format!("{}: not a llama config: {e}", config_path.display()))?;
    let config = llama_config.into_config(false);

    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no *.safetensors files in {}", dir.display()));
    }
    let weights_bytes = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();

    let (device, dtype) = device(spec)?;
    // SAFETY: the files are mapped read-only; like every mmap loader we rely on
    // them not being modified while the model is loaded.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, &device) }
        .map_err(|e| format!("cannot map the safetensors files: {e}"))?;
    // candle's `Llama::load` unwraps per-layer errors; turn a panic into an error.
    let llama = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Llama::load(vb, &config)))
        .map_err(|_| "cannot load the llama weights (missing or misshapen tensor)".to_string())?
        .map_err(|e| format!("cannot load the llama weights: {e}"))?;

    let trained_context = config.max_position_embeddings;
    let context_length = max_context
        .filter(|&c| c > 0)
        .map_or(trained_context, |c| c.min(trained_context));

    let tok_cfg_path = dir.join("tokenizer_config.json");
    let tok_cfg = if tok_cfg_path.is_file() {
        Some(read_json(&tok_cfg_path)?)
    } else {
        None
    };
    let tc = |key: &str| tok_cfg.as_ref().and_then(|c| c.get(key));

    let eos_token_ids = match &config.eos_token_id {
        Some(LlamaEosToks::Single(id)) => vec![*id],
        Some(LlamaEosToks::Multiple(ids)) => ids.clone(),
        None => Vec::new(),
    };
    let name = raw
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    Ok(DenseLoaded {
        name,
        trained_context,
        vocab_size: config.vocab_size,
        bos_token_id: config.bos_token_id,
        eos_token_ids,
        bos_token: token_string(tc("bos_token")),
        eos_token: token_string(tc("eos_token")),
        chat_template: chat_template(tc("chat_template")),
        add_bos_token: tc("add_bos_token").and_then(|v| v.as_bool()),
        weights_bytes,
        model: DenseLlama {
            llama,
            config,
            device,
            dtype,
            context_length,
            caches: (0..slots.max(1)).map(|_| None).collect(),
        },
    })
}

impl DenseLlama {
    fn run(&mut self, chunk: &Chunk) -> candle_core::Result<Vec<f32>> {
        let cache = match &mut self.caches[chunk.slot] {
            Some(c) => c,
            slot @ None => slot.insert(Cache::new(true, self.dtype, &self.config, &self.device)?),
        };
        let input = Tensor::new(chunk.tokens, &self.device)?.unsqueeze(0)?;
        let logits = self.llama.forward(&input, chunk.pos, cache)?;
        logits.squeeze(0)?.to_vec1::<f32>()
    }
}

impl Model for DenseLlama {
    fn context_length(&self) -> usize {
        self.context_length
    }

    fn slots(&self) -> usize {
        self.caches.len()
    }

    fn forward(&mut self, chunks: &[Chunk]) -> Result<Vec<Vec<f32>>, String> {
        chunks
            .iter()
            .map(|c| {
                if c.slot >= self.caches.len() {
                    return Err(format!("slot {} out of range", c.slot));
                }
                if c.tokens.is_empty() || c.pos + c.tokens.len() > self.context_length {
                    return Err(format!(
                        "chunk of {} tokens at {} does not fit the context of {}",
                        c.tokens.len(),
                        c.pos,
                        self.context_length
                    ));
                }
                if c.pos == 0 {
                    // A new sequence in this slot: start from an empty cache.
                    self.caches[c.slot] = None;
                }
                self.run(c).map_err(|e| e.to_string())
            })
            .collect()
    }

    fn release(&mut self, slot: usize) {
        if let Some(c) = self.caches.get_mut(slot) {
            *c = None;
        }
    }
}
