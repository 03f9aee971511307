//! Loading a llama-family GGUF: hyper-parameters from the metadata, weights
//! memory-mapped in place (the file's pages are shared with the page cache;
//! only norms and biases are copied out as f32).

use super::device::{gguf_weights, inv_freq, Act, Arch, DeviceLlama};
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

/// The `general.architecture`s the native CPU kernels (`llama.rs`) run.
pub const NATIVE_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// The `general.architecture`s a GGUF may have: the native ones, and those
/// only the device-generic decoder runs (on candle's CPU device or CUDA).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen3moe",
];

/// `general.architecture` of the GGUF at `path` (reads the header only).
pub fn architecture(path: &Path) -> Result<String, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("open: {e}"))?;
    let ct = Content::read(&mut file).map_err(|e| format!("not a readable GGUF file: {e}"))?;
    Ok(arch_of(&ct.metadata))
}

fn arch_of(md: &HashMap<String, Value>) -> String {
    md.get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "llama".into())
}

/// The architecture, hyper-parameters (`vocab_size` 0: it comes from the
/// tensors) and trained context in a llama-family GGUF's metadata.
pub(crate) fn hyper(
    md: &HashMap<String, Value>,
    max_context: Option<usize>,
) -> Result<(String, LlamaConfig, usize), String> {
    let arch = arch_of(md);
    let rope_style = match arch.as_str() {
        "llama" | "mistral" => RopeStyle::Interleaved,
        a if SUPPORTED_ARCHITECTURES.contains(&a) => RopeStyle::Neox,
        other => {
            return Err(format!(
                "architecture {other:?} is not supported (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            ))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| md_u(md, &key(k)).ok_or_else(|| format!("metadata {} is missing", key(k)));
    let n_layer = need("block_count")?;
    let n_embd = need("embedding_length")?;
    // Mixture of experts: the experts' width (a model's dense layers, if
    // any, would need the other; Qwen3-MoE GGUFs have none).
    let n_ff = match md_u(md, &key("expert_feed_forward_length")) {
        Some(f) if md_u(md, &key("expert_count")).unwrap_or(0) > 0 => f,
        _ => need("feed_forward_length")?,
    };
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
    if !NATIVE_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(format!(
            "architecture {arch:?} runs on the device-generic decoder only (native kernels: {})",
            NATIVE_ARCHITECTURES.join(", ")
        ));
    }
    if md_u(md, &format!("{arch}.expert_count")).unwrap_or(0) > 1 {
        return Err("mixture-of-experts models are not supported by the native kernels".into());
    }
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
    if arch != "qwen3moe" && md_u(&ct.metadata, &format!("{arch}.expert_count")).unwrap_or(0) > 1 {
        return Err(format!(
            "mixture-of-experts {arch:?} models are not supported (qwen3moe is)"
        ));
    }
    // candle's quantized kernels take f32 activations.
    let dtype = candle_core::DType::F32;
    let (weights, rope_freqs) = gguf_weights(&ct, &mut file, &cfg, &device, dtype)?;
    let mut factors = |name: &str| -> Result<Option<Vec<f32>>, String> {
        if !ct.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        ct.tensor(&mut file, name, &candle_core::Device::Cpu)
            .and_then(|t| t.dequantize(&candle_core::Device::Cpu))
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map(Some)
            .map_err(|e| format!("tensor {name}: {e}"))
    };
    let longrope = (
        factors("rope_factors_short.weight")?,
        factors("rope_factors_long.weight")?,
    );
    let (arch_cfg, inv) = device_arch(&ct.metadata, &arch, &cfg, rope_freqs.as_deref(), longrope)?;
    let weights_bytes = file.metadata().map_or(0, |m| m.len());
    let vocab_size = cfg.vocab_size;
    let model = DeviceLlama::with_arch(cfg, arch_cfg, weights, &inv, slots, device, dtype)?;
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

/// What the architecture changes in the device decoder, and its global
/// RoPE frequencies, from a GGUF's metadata (llama.cpp's keys and defaults).
fn device_arch(
    md: &HashMap<String, Value>,
    arch: &str,
    cfg: &LlamaConfig,
    rope_freqs: Option<&[f32]>,
    (short, long): (Option<Vec<f32>>, Option<Vec<f32>>),
) -> Result<(Arch, Vec<f64>), String> {
    let key = |k: &str| format!("{arch}.{k}");
    let mut a = Arch::default();
    let mut inv = inv_freq(cfg, rope_freqs);
    let n = cfg.n_layer;
    match arch {
        "gemma2" | "gemma3" => {
            // The converter stored the norms as `1 + w` already.
            a.act = Act::GeluTanh;
            a.embed_scale = Some((cfg.n_embd as f64).sqrt());
            // llama.cpp: `query_pre_attn_scalar` is not in the metadata; it
            // is `hidden / heads` for the 27B models, the head size otherwise.
            let big = (arch == "gemma2" && n == 46) || (arch == "gemma3" && n == 62);
            let scalar = if big {
                cfg.n_embd / cfg.n_head
            } else {
                cfg.head_dim
            };
            a.attn_scale = Some(1.0 / (scalar as f64).sqrt());
            a.attn_softcap = md_f(md, &key("attn_logit_softcapping")).map(f64::from);
            a.final_softcap = md_f(md, &key("final_logit_softcapping")).map(f64::from);
            a.window = md_u(md, &key("attention.sliding_window"));
            let pattern = if arch == "gemma2" {
                2
            } else {
                md_u(md, &key("attention.sliding_window_pattern")).unwrap_or(6)
            };
            if a.window.is_some() {
                a.sliding = (0..n).map(|i| (i + 1) % pattern != 0).collect();
            }
            if arch == "gemma3" {
                // Local layers: base 10000, never scaled; linear scaling
                // applies to the global layers.
                let local = LlamaConfig {
                    rope_theta: 10000.0,
                    ..cfg.clone()
                };
                a.local_inv_freq = Some(inv_freq(&local, None));
                let linear = md
                    .get(&key("rope.scaling.type"))
                    .and_then(|v| v.to_string().ok())
                    .is_some_and(|t| t == "linear");
                let factor = md_f(md, &key("rope.scaling.factor")).unwrap_or(1.0) as f64;
                if linear && factor > 0.0 {
                    inv.iter_mut().for_each(|f| *f /= factor);
                }
            }
        }
        "phi3" => {
            a.window = md_u(md, &key("attention.sliding_window")).filter(|&w| w > 0);
            if a.window.is_some() {
                a.sliding = vec![true; n];
            }
            if let (Some(short), Some(long)) = (short, long) {
                let orig = md_u(md, &key("rope.scaling.original_context_length"))
                    .ok_or("longrope factors without rope.scaling.original_context_length")?;
                // llama.cpp: the long factors when the served context
                // exceeds the original one.
                let f = if cfg.context > orig { long } else { short };
                if f.len() != inv.len() {
                    return Err("longrope factors do not match the rope dimension".into());
                }
                let base = inv_freq(cfg, None);
                inv = base.iter().zip(&f).map(|(b, &s)| b / s as f64).collect();
                let trained = md_u(md, &key("context_length")).unwrap_or(orig);
                a.rope_mscale = md_f(md, &key("rope.scaling.attn_factor"))
                    .map(f64::from)
                    .unwrap_or_else(|| longrope_mscale(trained, orig));
            }
        }
        "qwen3moe" => {
            a.moe_top_k = md_u(md, &key("expert_used_count"))
                .ok_or_else(|| format!("metadata {} is missing", key("expert_used_count")))?;
            a.moe_norm_topk = md
                .get(&key("expert_weights_norm"))
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(true);
        }
        _ => {}
    }
    Ok((a, inv))
}

/// Longrope's attention factor: `sqrt(1 + ln(s) / ln(orig))` for a context
/// scaled by `s = trained / orig`, 1 when not scaled.
pub(crate) fn longrope_mscale(trained: usize, orig: usize) -> f64 {
    let s = trained as f64 / orig as f64;
    if s <= 1.0 {
        1.0
    } else {
        (1.0 + s.ln() / (orig as f64).ln()).sqrt()
    }
}
