//! Loading a llama-family GGUF: hyper-parameters from the metadata, weights
//! memory-mapped in place (the file's pages are shared with the page cache;
//! only norms and biases are copied out as f32).

use super::device::{gguf_weights, inv_freq, DeviceLlama};
use super::llama::{Layer, LlamaConfig, LlamaModel, RopeStyle, Weights};
use crate::kernels::matmul::{Mapped, QMatrix};
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// What loading a GGUF yields besides the model.
pub struct GgufLoaded<M = LlamaModel> {
    pub model: M,
    pub vocab_size: usize,
    pub metadata: HashMap<String, Value>,
    pub architecture: String,
    pub name: Option<String>,
    pub trained_context: usize,
    pub weights_bytes: u64,
}

struct Reader<'a> {
    ct: &'a Content,
    map: Arc<memmap2::Mmap>,
}

impl Reader<'_> {
    fn has(&self, name: &str) -> bool {
        self.ct.tensor_infos.contains_key(name)
    }

    fn matrix(&self, name: &str) -> Result<QMatrix, String> {
        let info = self
            .ct
            .tensor_infos
            .get(name)
            .ok_or_else(|| format!("tensor {name} is missing"))?;
        let dims = info.shape.dims();
        let (rows, cols) = match dims {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => {
                return Err(format!(
                    "tensor {name} has shape {dims:?}, expected 1 or 2 dims"
                ))
            }
        };
        let dt = info.ggml_dtype;
        let elems = rows * cols;
        if elems % dt.block_size() != 0 {
            return Err(format!(
                "tensor {name}: {elems} elements is not a whole number of blocks"
            ));
        }
        let len = elems / dt.block_size() * dt.type_size();
        let off = (self.ct.tensor_data_offset + info.offset) as usize;
        let bytes = Mapped::new(self.map.clone(), off, len)
            .ok_or_else(|| format!("tensor {name} lies outside the file (truncated download?)"))?;
        QMatrix::new(dt, rows, cols, bytes).map_err(|e| format!("tensor {name}: {e}"))
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>, String> {
        let m = self.matrix(name)?;
        if m.rows != 1 {
            return Err(format!("tensor {name} should be a vector"));
        }
        let mut v = vec![0f32; m.cols];
        m.row_f32(0, &mut v);
        Ok(v)
    }

    fn opt_vector(&self, name: &str) -> Result<Option<Vec<f32>>, String> {
        if self.has(name) {
            self.vector(name).map(Some)
        } else {
            Ok(None)
        }
    }
}

fn md_u(md: &HashMap<String, Value>, key: &str) -> Option<usize> {
    md.get(key).and_then(|v| match v {
        Value::U8(x) => Some(*x as usize),
        Value::U16(x) => Some(*x as usize),
        Value::U32(x) => Some(*x as usize),
        Value::U64(x) => Some(*x as usize),
        Value::I32(x) if *x >= 0 => Some(*x as usize),
        Value::I64(x) if *x >= 0 => Some(*x as usize),
        _ => None,
    })
}

fn md_f(md: &HashMap<String, Value>, key: &str) -> Option<f32> {
    md.get(key).and_then(|v| match v {
        Value::F32(x) => Some(*x),
        Value::F64(x) => Some(*x as f32),
        _ => None,
    })
}

/// The architecture, hyper-parameters (`vocab_size` 0: it comes from the
/// tensors) and trained context in a llama-family GGUF's metadata.
pub(crate) fn hyper(
    md: &HashMap<String, Value>,
    max_context: Option<usize>,
) -> Result<(String, LlamaConfig, usize), String> {
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "llama".into());
    let rope_style = match arch.as_str() {
        "llama" | "mistral" => RopeStyle::Interleaved,
        "qwen2" | "qwen3" => RopeStyle::Neox,
        other => {
            return Err(format!(
                "architecture {other:?} is not supported (supported: llama, mistral, qwen2, qwen3)"
            ))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| md_u(md, &key(k)).ok_or_else(|| format!("metadata {} is missing", key(k)));
    if md_u(md, &key("expert_count")).unwrap_or(0) > 1 {
        return Err("mixture-of-experts models are not supported".into());
    }
    let n_layer = need("block_count")?;
    let n_embd = need("embedding_length")?;
    let n_ff = need("feed_forward_length")?;
    let n_head = need("attention.head_count")?;
    let n_kv_head = md_u(md, &key("attention.head_count_kv")).unwrap_or(n_head);
    let head_dim = md_u(md, &key("attention.key_length")).unwrap_or(n_embd / n_head);
    let rope_dim = md_u(md, &key("rope.dimension_count")).unwrap_or(head_dim);
    let rope_theta = md_f(md, &key("rope.freq_base")).unwrap_or(10000.0);
    let rms_eps = md_f(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5);
    let trained_context = md_u(md, &key("context_length")).unwrap_or(4096);
    let context = max_context
        .map_or(trained_context, |c| c.min(trained_context))
        .max(1);
    if n_kv_head == 0
        || !n_head.is_multiple_of(n_kv_head)
        || rope_dim > head_dim
        || !rope_dim.is_multiple_of(2)
    {
        return Err(format!(
            "inconsistent attention shape: {n_head} heads, {n_kv_head} kv heads, head dim {head_dim}, rope dim {rope_dim}"
        ));
    }

    let cfg = LlamaConfig {
        n_layer,
        n_embd,
        n_ff,
        n_head,
        n_kv_head,
        head_dim,
        rope_dim,
        rope_theta,
        rope_style,
        rms_eps,
        vocab_size: 0,
        context,
    };
    Ok((arch, cfg, trained_context))
}

/// Loads `path`. `max_context` caps the served context; `slots` is the number
/// of sequences cached at once.
pub fn load(
    path: &Path,
    max_context: Option<usize>,
    slots: usize,
    threads: usize,
) -> Result<GgufLoaded, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("open: {e}"))?;
    let ct = Content::read(&mut file).map_err(|e| format!("not a readable GGUF file: {e}"))?;
    // SAFETY: the file is opened read-only and not modified while mapped (model
    // files are immutable once fetched; truncation would be an operator error).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("mmap: {e}"))?;
    let map = Arc::new(map);
    let (arch, mut cfg, trained_context) = hyper(&ct.metadata, max_context)?;
    let md = &ct.metadata;
    let LlamaConfig {
        n_layer,
        n_embd,
        n_ff,
        n_head,
        n_kv_head,
        head_dim,
        ..
    } = cfg.clone();

    let rd = Reader {
        ct: &ct,
        map: map.clone(),
    };
    let tok_embd = rd.matrix("token_embd.weight")?;
    let output = if rd.has("output.weight") {
        Some(rd.matrix("output.weight")?)
    } else {
        None
    };
    let vocab_size = output.as_ref().unwrap_or(&tok_embd).rows;
    let mut layers = Vec::with_capacity(n_layer);
    for i in 0..n_layer {
        let p = |s: &str| format!("blk.{i}.{s}");
        let layer = Layer {
            attn_norm: rd.vector(&p("attn_norm.weight"))?,
            wq: rd.matrix(&p("attn_q.weight"))?,
            wk: rd.matrix(&p("attn_k.weight"))?,
            wv: rd.matrix(&p("attn_v.weight"))?,
            wo: rd.matrix(&p("attn_output.weight"))?,
            bq: rd.opt_vector(&p("attn_q.bias"))?,
            bk: rd.opt_vector(&p("attn_k.bias"))?,
            bv: rd.opt_vector(&p("attn_v.bias"))?,
            q_norm: rd.opt_vector(&p("attn_q_norm.weight"))?,
            k_norm: rd.opt_vector(&p("attn_k_norm.weight"))?,
            ffn_norm: rd.vector(&p("ffn_norm.weight"))?,
            w_gate: rd.matrix(&p("ffn_gate.weight"))?,
            w_up: rd.matrix(&p("ffn_up.weight"))?,
            w_down: rd.matrix(&p("ffn_down.weight"))?,
        };
        let shape_ok = layer.wq.rows == n_head * head_dim
            && layer.wk.rows == n_kv_head * head_dim
            && layer.wv.rows == n_kv_head * head_dim
            && layer.wq.cols == n_embd
            && layer.wo.rows == n_embd
            && layer.wo.cols == n_head * head_dim
            && layer.w_gate.rows == n_ff
            && layer.w_up.rows == n_ff
            && layer.w_down.rows == n_embd
            && layer.w_down.cols == n_ff
            && layer.attn_norm.len() == n_embd
            && layer.ffn_norm.len() == n_embd
            && layer.q_norm.as_ref().is_none_or(|v| v.len() == head_dim)
            && layer.k_norm.as_ref().is_none_or(|v| v.len() == head_dim);
        if !shape_ok {
            return Err(format!(
                "block {i}: tensor shapes do not match the metadata"
            ));
        }
        layers.push(layer);
    }
    let output_norm = rd.vector("output_norm.weight")?;
    let rope_freqs = rd.opt_vector("rope_freqs.weight")?;
    if tok_embd.cols != n_embd || output_norm.len() != n_embd {
        return Err("embedding shapes do not match the metadata".into());
    }
    let weights_bytes = map.len() as u64;
    cfg.vocab_size = vocab_size;
    let w = Weights {
        tok_embd,
        output,
        output_norm,
        layers,
        rope_freqs,
    };
    let model = LlamaModel::new(cfg, w, slots, threads)?;
    let name = md
        .get("general.name")
        .and_then(|v| v.to_string().ok())
        .cloned();
    drop(rd);
    Ok(GgufLoaded {
        model,
        vocab_size,
        metadata: ct.metadata,
        architecture: arch,
        name,
        trained_context,
        weights_bytes,
    })
}

/// Loads `path` onto a candle device for the device-generic decoder
/// ([`DeviceLlama`]): CUDA, or candle's CPU device (`--kernels candle`).
/// Quantized matrices stay quantized (candle's `QMatMul` kernels).
pub fn load_on_device(
    path: &Path,
    spec: crate::api::DeviceSpec,
    max_context: Option<usize>,
    slots: usize,
) -> Result<GgufLoaded<DeviceLlama>, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("open: {e}"))?;
    let ct = Content::read(&mut file).map_err(|e| format!("not a readable GGUF file: {e}"))?;
    let (arch, mut cfg, trained_context) = hyper(&ct.metadata, max_context)?;
    let rows = |name: &str| {
        ct.tensor_infos
            .get(name)
            .and_then(|i| i.shape.dims().first().copied())
    };
    cfg.vocab_size = rows("output.weight")
        .or_else(|| rows("token_embd.weight"))
        .ok_or("tensor token_embd.weight is missing")?;
    let (device, _) = super::safetensors::device(spec)?;
    // candle's quantized kernels take f32 activations.
    let dtype = candle_core::DType::F32;
    let (weights, rope_freqs) = gguf_weights(&ct, &mut file, &cfg, &device, dtype)?;
    let inv = inv_freq(&cfg, rope_freqs.as_deref());
    let weights_bytes = file.metadata().map_or(0, |m| m.len());
    let vocab_size = cfg.vocab_size;
    let model = DeviceLlama::new(cfg, weights, &inv, slots, device, dtype)?;
    let name = ct
        .metadata
        .get("general.name")
        .and_then(|v| v.to_string().ok())
        .cloned();
    Ok(GgufLoaded {
        model,
        vocab_size,
        metadata: ct.metadata,
        architecture: arch,
        name,
        trained_context,
        weights_bytes,
    })
}
