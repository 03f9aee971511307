//! Dense safetensors + `config.json` directories (the GPU path): the llama
//! family (`llama`, `mistral`, `qwen2`, `qwen3`) on the device-generic
//! decoder ([`DeviceLlama`]), bf16 (or the checkpoint's f16) on CUDA and f32
//! on the CPU.

use super::device::{DeviceLayer, DeviceLlama, DeviceWeights, Embedding, Lin};
use super::llama::{LlamaConfig, RopeStyle};
use crate::api::{DeviceSpec, Dtype};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The `model_type`s a safetensors directory may have.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// A llama-family model with dense weights on a candle device.
pub type DenseLlama = DeviceLlama;

/// What `load` read from a model directory.
pub struct DenseLoaded {
    pub model: DenseLlama,
    /// `model_type`.
    pub architecture: String,
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

/// A number in `config.json`.
fn num(raw: &Value, key: &str) -> Option<f64> {
    raw.get(key).and_then(Value::as_f64)
}

fn count(raw: &Value, key: &str) -> Option<usize> {
    raw.get(key).and_then(Value::as_u64).map(|v| v as usize)
}

/// RoPE frequencies, with `rope_scaling` applied (`linear`, `llama3`); any
/// other scaling is refused rather than served wrongly.
fn rope_frequencies(raw: &Value, theta: f64, dim: usize) -> Result<Vec<f64>, String> {
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / dim as f64))
        .collect();
    let Some(sc) = raw.get("rope_scaling").filter(|v| !v.is_null()) else {
        return Ok(base);
    };
    let kind = sc
        .get("rope_type")
        .or_else(|| sc.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = num(sc, "factor").unwrap_or(1.0);
    match kind {
        "default" => Ok(base),
        "linear" => Ok(base.iter().map(|f| f / factor).collect()),
        "llama3" => {
            let low = num(sc, "low_freq_factor").unwrap_or(1.0);
            let high = num(sc, "high_freq_factor").unwrap_or(4.0);
            let orig = num(sc, "original_max_position_embeddings").unwrap_or(8192.0);
            let (low_wavelen, high_wavelen) = (orig / low, orig / high);
            Ok(base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (orig / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect())
        }
        other => Err(format!(
            "rope_scaling type {other:?} is not supported (supported: linear, llama3)"
        )),
    }
}

/// Loads `dir/config.json` and every `dir/*.safetensors`.
pub fn load(
    dir: &Path,
    spec: DeviceSpec,
    want: Dtype,
    max_context: Option<usize>,
    slots: usize,
) -> Result<DenseLoaded, String> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(format!("{} is missing", config_path.display()));
    }
    let raw = read_json(&config_path)?;
    let model_type = raw
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("llama")
        .to_string();
    if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
        return Err(format!(
            "model_type {model_type:?} is not supported for safetensors directories (supported: {})",
            SUPPORTED_MODEL_TYPES.join(", ")
        ));
    }
    let need = |k: &str| {
        count(&raw, k).ok_or_else(|| format!("{}: {k} is missing", config_path.display()))
    };
    let n_embd = need("hidden_size")?;
    let n_head = need("num_attention_heads")?;
    let n_kv_head = count(&raw, "num_key_value_heads").unwrap_or(n_head);
    let head_dim = count(&raw, "head_dim").unwrap_or(n_embd / n_head.max(1));
    let rope_dim =
        num(&raw, "partial_rotary_factor").map_or(head_dim, |f| (head_dim as f64 * f) as usize);
    let trained_context = count(&raw, "max_position_embeddings").unwrap_or(4096);
    // A sliding-window model is served within its window: beyond it,
    // full attention would not be what it was trained for.
    let window = count(&raw, "sliding_window").filter(|_| {
        model_type == "mistral"
            || raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true)
    });
    let context = max_context
        .filter(|&c| c > 0)
        .map_or(trained_context, |c| c.min(trained_context))
        .min(window.unwrap_or(usize::MAX))
        .max(1);
    let cfg = LlamaConfig {
        n_layer: need("num_hidden_layers")?,
        n_embd,
        n_ff: need("intermediate_size")?,
        n_head,
        n_kv_head,
        head_dim,
        rope_dim,
        rope_theta: num(&raw, "rope_theta").unwrap_or(10000.0) as f32,
        rope_style: RopeStyle::Neox,
        rms_eps: num(&raw, "rms_norm_eps").unwrap_or(1e-6) as f32,
        vocab_size: need("vocab_size")?,
        context,
    };
    if n_kv_head == 0
        || !n_head.is_multiple_of(n_kv_head)
        || rope_dim > head_dim
        || !rope_dim.is_multiple_of(2)
    {
        return Err(format!(
            "inconsistent attention shape: {n_head} heads, {n_kv_head} kv heads, head dim {head_dim}, rope dim {rope_dim}"
        ));
    }
    let inv_freq = rope_frequencies(&raw, cfg.rope_theta as f64, rope_dim)?;

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

    let (device, auto) = device(spec)?;
    // `torch_dtype` (transformers 4), `dtype` (transformers 5).
    let stored = raw.get("dtype").or_else(|| raw.get("torch_dtype"));
    let dtype = match want {
        Dtype::Auto if !device.is_cpu() && stored.and_then(Value::as_str) == Some("float16") => {
            DType::F16
        }
        Dtype::Auto => auto,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    };
    // SAFETY: the files are mapped read-only; like every mmap loader we rely on
    // them not being modified while the model is loaded.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, &device) }
        .map_err(|e| format!("cannot map the safetensors files: {e}"))?;
    let tied = raw
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let weights = dense_weights(&vb, &cfg, tied)?;
    let model = DeviceLlama::new(cfg, weights, &inv_freq, slots, device, dtype)?;

    let tok_cfg_path = dir.join("tokenizer_config.json");
    let tok_cfg = if tok_cfg_path.is_file() {
        Some(read_json(&tok_cfg_path)?)
    } else {
        None
    };
    let tc = |key: &str| tok_cfg.as_ref().and_then(|c| c.get(key));

    let eos_token_ids = match raw.get("eos_token_id") {
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        Some(v) => v.as_u64().map(|v| v as u32).into_iter().collect(),
        None => Vec::new(),
    };
    let name = raw
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    Ok(DenseLoaded {
        architecture: model_type,
        name,
        trained_context,
        vocab_size: model.config().vocab_size,
        bos_token_id: raw
            .get("bos_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32),
        eos_token_ids,
        bos_token: token_string(tc("bos_token")),
        eos_token: token_string(tc("eos_token")),
        chat_template: chat_template(tc("chat_template")),
        add_bos_token: tc("add_bos_token").and_then(|v| v.as_bool()),
        weights_bytes,
        model,
    })
}

/// The llama-family tensors of a Hugging Face checkpoint.
fn dense_weights(vb: &VarBuilder, cfg: &LlamaConfig, tied: bool) -> Result<DeviceWeights, String> {
    let (d, ff) = (cfg.n_embd, cfg.n_ff);
    let (qd, kvd) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
    let get = |shape: &[usize], name: &str| -> Result<Tensor, String> {
        vb.get(shape, name)
            .map_err(|e| format!("tensor {name}: {e}"))
    };
    let opt = |shape: &[usize], name: &str| -> Result<Option<Tensor>, String> {
        if vb.contains_tensor(name) {
            get(shape, name).map(Some)
        } else {
            Ok(None)
        }
    };
    let lin = |out: usize, inp: usize, name: &str| -> Result<Lin, String> {
        Ok(Lin::Dense {
            w: get(&[out, inp], &format!("{name}.weight"))?,
            b: opt(&[out], &format!("{name}.bias"))?,
        })
    };
    let embed = get(&[cfg.vocab_size, d], "model.embed_tokens.weight")?;
    let lm_head = if tied || !vb.contains_tensor("lm_head.weight") {
        Lin::Dense {
            w: embed.clone(),
            b: None,
        }
    } else {
        lin(cfg.vocab_size, d, "lm_head")?
    };
    let mut layers = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        layers.push(DeviceLayer {
            attn_norm: get(&[d], &p("input_layernorm.weight"))?,
            q: lin(qd, d, &p("self_attn.q_proj"))?,
            k: lin(kvd, d, &p("self_attn.k_proj"))?,
            v: lin(kvd, d, &p("self_attn.v_proj"))?,
            o: lin(d, qd, &p("self_attn.o_proj"))?,
            q_norm: opt(&[cfg.head_dim], &p("self_attn.q_norm.weight"))?,
            k_norm: opt(&[cfg.head_dim], &p("self_attn.k_norm.weight"))?,
            ffn_norm: get(&[d], &p("post_attention_layernorm.weight"))?,
            gate: lin(ff, d, &p("mlp.gate_proj"))?,
            up: lin(ff, d, &p("mlp.up_proj"))?,
            down: lin(d, ff, &p("mlp.down_proj"))?,
        });
    }
    Ok(DeviceWeights {
        embed: Embedding::Dense(embed),
        layers,
        norm: get(&[d], "model.norm.weight")?,
        lm_head,
    })
}
