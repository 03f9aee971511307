//! Dense safetensors + `config.json` directories (the GPU path): the llama
//! family (`llama`, `mistral`, `qwen2`, `qwen3`), Gemma 2/3, Phi-3/4 and
//! Qwen3-MoE on the device-generic decoder ([`DeviceLlama`]), bf16 (or the
//! checkpoint's f16) on CUDA and f32 on the CPU.

use super::device::{
    Act, Arch, DeviceLayer, DeviceLlama, DeviceWeights, Embedding, Expert, Ffn, Lin, Qkv,
};
use super::llama::{LlamaConfig, RopeStyle};
use crate::api::{DeviceSpec, Dtype};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The `model_type`s a safetensors directory may have.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "phi3",
    "qwen3_moe",
];

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

/// `rope_scaling`, or transformers 5's `rope_parameters` (which also holds
/// `rope_theta`).
fn rope_scaling(raw: &Value) -> Option<&Value> {
    raw.get("rope_scaling")
        .filter(|v| !v.is_null())
        .or_else(|| {
            raw.get("rope_parameters")
                .filter(|v| v.get("rope_type").is_some())
        })
}

fn rope_theta(raw: &Value) -> Option<f64> {
    num(raw, "rope_theta").or_else(|| {
        raw.get("rope_parameters")
            .and_then(|p| num(p, "rope_theta"))
    })
}

/// RoPE frequencies, with a scaling applied (`linear`, `llama3`,
/// `longrope`), and the factor cos and sin are multiplied by (longrope's
/// attention factor, else 1); any other scaling is refused rather than
/// served wrongly. `context` is the served context (longrope uses its long
/// factors beyond the original context, as llama.cpp does).
fn rope_frequencies(
    raw: &Value,
    scaling: Option<&Value>,
    theta: f64,
    dim: usize,
    context: usize,
) -> Result<(Vec<f64>, f64), String> {
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / dim as f64))
        .collect();
    let Some(sc) = scaling.filter(|v| !v.is_null()) else {
        return Ok((base, 1.0));
    };
    let kind = sc
        .get("rope_type")
        .or_else(|| sc.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = num(sc, "factor").unwrap_or(1.0);
    match kind {
        "default" => Ok((base, 1.0)),
        "linear" => Ok((base.iter().map(|f| f / factor).collect(), 1.0)),
        "llama3" => {
            let low = num(sc, "low_freq_factor").unwrap_or(1.0);
            let high = num(sc, "high_freq_factor").unwrap_or(4.0);
            let orig = num(sc, "original_max_position_embeddings").unwrap_or(8192.0);
            let (low_wavelen, high_wavelen) = (orig / low, orig / high);
            Ok((
                base.iter()
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
                    .collect(),
                1.0,
            ))
        }
        "longrope" => {
            let trained = count(raw, "max_position_embeddings").unwrap_or(4096);
            let orig = count(raw, "original_max_position_embeddings")
                .or_else(|| count(sc, "original_max_position_embeddings"))
                .unwrap_or(trained);
            let key = if context > orig {
                "long_factor"
            } else {
                "short_factor"
            };
            let f: Vec<f64> = sc
                .get(key)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            if f.len() != base.len() {
                return Err(format!(
                    "longrope {key} has {} entries, expected {}",
                    f.len(),
                    base.len()
                ));
            }
            let mscale = num(sc, "attention_factor")
                .unwrap_or_else(|| super::gguf::longrope_mscale(trained, orig));
            Ok((base.iter().zip(&f).map(|(b, s)| b / s).collect(), mscale))
        }
        other => Err(format!(
            "rope_scaling type {other:?} is not supported (supported: linear, llama3, longrope)"
        )),
    }
}

/// Hugging Face's defaults for the Gemma keys its configs may omit
/// (`Gemma2Config`, `Gemma3TextConfig`).
fn gemma_defaults(model_type: &str, raw: &mut Value) {
    let defaults = if model_type == "gemma2" {
        serde_json::json!({
            "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
            "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "query_pre_attn_scalar": 256, "sliding_window": 4096,
            "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": true,
        })
    } else {
        serde_json::json!({
            "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
            "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "max_position_embeddings": 131072,
            "tie_word_embeddings": true,
        })
    };
    if let (Some(o), Value::Object(d)) = (raw.as_object_mut(), defaults) {
        for (k, v) in d {
            if o.get(&k).is_none_or(Value::is_null) {
                o.insert(k, v);
            }
        }
    }
}

/// Which layers are sliding-window ones: `layer_types`, else every
/// `pattern`-th layer is global (the others sliding).
fn sliding_layers(raw: &Value, n_layer: usize, pattern: usize) -> Vec<bool> {
    match raw.get("layer_types").and_then(Value::as_array) {
        Some(t) => t
            .iter()
            .map(|v| v.as_str() == Some("sliding_attention"))
            .collect(),
        None => (0..n_layer).map(|i| (i + 1) % pattern != 0).collect(),
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
    let top = read_json(&config_path)?;
    let model_type = top
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
    // Gemma 3 with its vision tower: the text model's config is nested, its
    // tensors are under `language_model` (the vision tower is not loaded).
    let mut raw = match model_type.as_str() {
        "gemma3" => top
            .get("text_config")
            .cloned()
            .ok_or_else(|| format!("{}: text_config is missing", config_path.display()))?,
        _ => top.clone(),
    };
    let family = match model_type.as_str() {
        "gemma3" | "gemma3_text" => "gemma3",
        t => t,
    };
    if family.starts_with("gemma") {
        gemma_defaults(family, &mut raw);
    }
    let raw = raw;
    let need = |k: &str| {
        count(&raw, k).ok_or_else(|| format!("{}: {k} is missing", config_path.display()))
    };
    let n_layer = need("num_hidden_layers")?;
    let n_embd = need("hidden_size")?;
    let n_head = need("num_attention_heads")?;
    let n_kv_head = count(&raw, "num_key_value_heads").unwrap_or(n_head);
    let head_dim = count(&raw, "head_dim").unwrap_or(n_embd / n_head.max(1));
    let rope_dim =
        num(&raw, "partial_rotary_factor").map_or(head_dim, |f| (head_dim as f64 * f) as usize);
    let trained_context = count(&raw, "max_position_embeddings").unwrap_or(4096);
    // A llama-family sliding-window model (Mistral) is served within its
    // window: beyond it, full attention would not be what it was trained
    // for. Gemma and Phi-3 mask their sliding-window layers instead.
    let window = count(&raw, "sliding_window").filter(|_| {
        model_type == "mistral"
            || (["llama", "qwen2", "qwen3"].contains(&model_type.as_str())
                && raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true))
    });
    let context = max_context
        .filter(|&c| c > 0)
        .map_or(trained_context, |c| c.min(trained_context))
        .min(window.unwrap_or(usize::MAX))
        .max(1);
    let theta_default = if family == "gemma3" {
        1_000_000.0
    } else {
        10000.0
    };
    let cfg = LlamaConfig {
        n_layer,
        n_embd,
        n_ff: need("intermediate_size")?,
        n_head,
        n_kv_head,
        head_dim,
        rope_dim,
        rope_theta: rope_theta(&raw).unwrap_or(theta_default) as f32,
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
    let (arch, inv_freq) = arch_config(family, &raw, &cfg)?;

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
    let stored = top.get("dtype").or_else(|| top.get("torch_dtype"));
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
        .or_else(|| top.get("tie_word_embeddings"))
        .and_then(Value::as_bool)
        .unwrap_or(family.starts_with("gemma"));
    // Gemma 3 with a vision tower: transformers 5 (`model.language_model`)
    // or 4 (`language_model.model`) names.
    let prefix = if model_type == "gemma3" {
        if vb.contains_tensor("model.language_model.embed_tokens.weight") {
            "model.language_model"
        } else {
            "language_model.model"
        }
    } else {
        "model"
    };
    let weights = dense_weights(&vb, &cfg, &raw, family, prefix, tied)?;
    let model = DeviceLlama::with_arch(cfg, arch, weights, &inv_freq, slots, device, dtype)?;
    let raw = top;

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

/// What the architecture changes in the decoder, and its (global) RoPE
/// frequencies, from `config.json` (transformers' names and defaults).
fn arch_config(family: &str, raw: &Value, cfg: &LlamaConfig) -> Result<(Arch, Vec<f64>), String> {
    let mut a = Arch::default();
    let n = cfg.n_layer;
    let params = |kind: &str| raw.get("rope_parameters").and_then(|p| p.get(kind));
    let (scaling, theta) = match (family, params("full_attention")) {
        ("gemma3", Some(p)) => (
            Some(p),
            num(p, "rope_theta").unwrap_or(cfg.rope_theta as f64),
        ),
        _ => (rope_scaling(raw), cfg.rope_theta as f64),
    };
    let (inv, mscale) = rope_frequencies(raw, scaling, theta, cfg.rope_dim, cfg.context)?;
    a.rope_mscale = mscale;
    let sliding_window = count(raw, "sliding_window").filter(|&w| w > 0);
    match family {
        "gemma2" | "gemma3" => {
            a.act = Act::GeluTanh;
            a.embed_scale = Some((cfg.n_embd as f64).sqrt());
            let scalar = num(raw, "query_pre_attn_scalar").unwrap_or(cfg.head_dim as f64);
            a.attn_scale = Some(1.0 / scalar.sqrt());
            a.attn_softcap = num(raw, "attn_logit_softcapping");
            a.final_softcap = num(raw, "final_logit_softcapping");
            if let Some(w) = sliding_window {
                a.window = Some(w);
                let pattern = if family == "gemma2" {
                    2
                } else {
                    count(raw, "sliding_window_pattern").unwrap_or(6)
                };
                a.sliding = sliding_layers(raw, n, pattern.max(1));
                if a.sliding.len() != n {
                    return Err(format!(
                        "layer_types has {} entries for {n} layers",
                        a.sliding.len()
                    ));
                }
            }
            if family == "gemma3" {
                let (local_scaling, local_theta) = match params("sliding_attention") {
                    Some(p) => (Some(p), num(p, "rope_theta").unwrap_or(10000.0)),
                    None => (None, num(raw, "rope_local_base_freq").unwrap_or(10000.0)),
                };
                let (local, _) =
                    rope_frequencies(raw, local_scaling, local_theta, cfg.rope_dim, cfg.context)?;
                a.local_inv_freq = Some(local);
            }
        }
        "phi3" => {
            if let Some(w) = sliding_window {
                a.window = Some(w);
                a.sliding = vec![true; n];
            }
        }
        "qwen3_moe" => {
            a.moe_top_k = count(raw, "num_experts_per_tok").unwrap_or(8);
            a.moe_norm_topk = raw
                .get("norm_topk_prob")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        }
        _ => {}
    }
    Ok((a, inv))
}

/// The tensors of a Hugging Face checkpoint: the llama family's, with
/// Gemma's extra norms (stored as `w` for `1 + w`), Phi-3's fused
/// projections and Qwen3-MoE's experts.
fn dense_weights(
    vb: &VarBuilder,
    cfg: &LlamaConfig,
    raw: &Value,
    family: &str,
    prefix: &str,
    tied: bool,
) -> Result<DeviceWeights, String> {
    let (d, ff) = (cfg.n_embd, cfg.n_ff);
    let (qd, kvd) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
    let gemma = family.starts_with("gemma");
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
    // An RMS norm weight: Gemma's scale by `1 + w` (added in f32).
    let norm = |dim: usize, name: &str| -> Result<Tensor, String> {
        if !gemma {
            return get(&[dim], name);
        }
        vb.get_with_hints_dtype(dim, name, Default::default(), DType::F32)
            .and_then(|t| (t + 1.0)?.to_dtype(vb.dtype()))
            .map_err(|e| format!("tensor {name}: {e}"))
    };
    let opt_norm = |dim: usize, name: &str| -> Result<Option<Tensor>, String> {
        if vb.contains_tensor(name) {
            norm(dim, name).map(Some)
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
    let embed = get(
        &[cfg.vocab_size, d],
        &format!("{prefix}.embed_tokens.weight"),
    )?;
    let lm_head = if tied || !vb.contains_tensor("lm_head.weight") {
        Lin::Dense {
            w: embed.clone(),
            b: None,
        }
    } else {
        lin(cfg.vocab_size, d, "lm_head")?
    };
    // Qwen3-MoE: which layers route to experts.
    // `num_experts` (transformers 4, the hub's Qwen3-MoE configs),
    // `num_local_experts` (what transformers 5 saves).
    let experts = count(raw, "num_experts")
        .or_else(|| count(raw, "num_local_experts"))
        .unwrap_or(0);
    let step = count(raw, "decoder_sparse_step").unwrap_or(1).max(1);
    let dense_only: Vec<usize> = raw
        .get("mlp_only_layers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|v| v as usize))
                .collect()
        })
        .unwrap_or_default();
    let moe_ff = count(raw, "moe_intermediate_size").unwrap_or(ff);
    let mut layers = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("{prefix}.layers.{i}.{s}");
        let qkv = if family == "phi3" {
            Qkv::Fused(lin(qd + 2 * kvd, d, &p("self_attn.qkv_proj"))?)
        } else {
            Qkv::Split {
                q: lin(qd, d, &p("self_attn.q_proj"))?,
                k: lin(kvd, d, &p("self_attn.k_proj"))?,
                v: lin(kvd, d, &p("self_attn.v_proj"))?,
            }
        };
        let moe = family == "qwen3_moe"
            && experts > 0
            && !dense_only.contains(&i)
            && (i + 1).is_multiple_of(step);
        let ffn = if moe {
            Ffn::Moe {
                router: lin(experts, d, &p("mlp.gate"))?,
                experts: (0..experts)
                    .map(|e| {
                        let x = |s: &str| p(&format!("mlp.experts.{e}.{s}"));
                        Ok(Expert {
                            gate: lin(moe_ff, d, &x("gate_proj"))?,
                            up: lin(moe_ff, d, &x("up_proj"))?,
                            down: lin(d, moe_ff, &x("down_proj"))?,
                        })
                    })
                    .collect::<Result<_, String>>()?,
            }
        } else if family == "phi3" {
            Ffn::FusedGateUp {
                gate_up: lin(2 * ff, d, &p("mlp.gate_up_proj"))?,
                down: lin(d, ff, &p("mlp.down_proj"))?,
                ff,
            }
        } else {
            Ffn::Gated {
                gate: lin(ff, d, &p("mlp.gate_proj"))?,
                up: lin(ff, d, &p("mlp.up_proj"))?,
                down: lin(d, ff, &p("mlp.down_proj"))?,
            }
        };
        // Gemma: `post_attention_layernorm` normalises the attention output;
        // `pre_feedforward_layernorm` is the feed-forward's input norm.
        let (post_attn_norm, ffn_norm, post_ffn_norm) = if gemma {
            (
                Some(norm(d, &p("post_attention_layernorm.weight"))?),
                norm(d, &p("pre_feedforward_layernorm.weight"))?,
                Some(norm(d, &p("post_feedforward_layernorm.weight"))?),
            )
        } else {
            (None, norm(d, &p("post_attention_layernorm.weight"))?, None)
        };
        layers.push(DeviceLayer {
            attn_norm: norm(d, &p("input_layernorm.weight"))?,
            qkv,
            o: lin(d, qd, &p("self_attn.o_proj"))?,
            q_norm: opt_norm(cfg.head_dim, &p("self_attn.q_norm.weight"))?,
            k_norm: opt_norm(cfg.head_dim, &p("self_attn.k_norm.weight"))?,
            post_attn_norm,
            ffn_norm,
            ffn,
            post_ffn_norm,
        });
    }
    Ok(DeviceWeights {
        embed: Embedding::Dense(embed),
        layers,
        norm: norm(d, &format!("{prefix}.norm.weight"))?,
        lm_head,
    })
}
