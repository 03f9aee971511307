//! Tiny random-weight checkpoints of the architectures beyond llama —
//! Gemma 2, Gemma 3, Phi-3, Qwen3-MoE — as Hugging Face safetensors
//! directories (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`), for checking the engine's decoder against
//! candle-transformers and transformers. Fixed-seed weights: every run
//! tests the same model. Configs are complete (no key left to a default),
//! so every implementation reads the same model.

use crate::tiny_model::{safetensors, write_tokenizer};
use serde_json::{json, Value};
use std::path::Path;

pub const HIDDEN: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const VOCAB: usize = 96;

/// Which architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gemma2,
    Gemma3,
    Phi3,
    Qwen3Moe,
}

#[derive(Debug, Clone)]
pub struct TinyArch {
    pub kind: Kind,
    /// Sliding window of the sliding-window layers (Gemma; Phi-3 when
    /// `Some`, where every layer slides).
    pub window: Option<usize>,
    /// Gemma's `query_pre_attn_scalar` when not the head size.
    pub query_scalar: Option<usize>,
    /// Phi-3: rotate half of each head (as Phi-4-mini rotates three
    /// quarters) rather than all of it.
    pub partial_rotary: bool,
    /// Phi-3: longrope scaling (Phi-3.5, Phi-4-mini): an original context of
    /// 64 of the 256 trained, short and long factors per frequency.
    pub longrope: bool,
}

impl TinyArch {
    /// A model whose window exceeds every test's sequence (no position is
    /// ever outside it).
    pub fn new(kind: Kind) -> TinyArch {
        let window = match kind {
            Kind::Gemma2 | Kind::Gemma3 => Some(4096),
            Kind::Phi3 | Kind::Qwen3Moe => None,
        };
        TinyArch {
            kind,
            window,
            query_scalar: None,
            partial_rotary: kind == Kind::Phi3,
            longrope: false,
        }
    }

    pub fn head_dim(&self) -> usize {
        match self.kind {
            // Wider than hidden / heads, as Gemma's are.
            Kind::Gemma2 | Kind::Gemma3 => 32,
            Kind::Phi3 | Kind::Qwen3Moe => HIDDEN / HEADS,
        }
    }

    pub fn layers(&self) -> usize {
        4
    }

    pub fn intermediate(&self) -> usize {
        128
    }

    fn longrope_scaling(&self) -> Value {
        if !self.longrope {
            return Value::Null;
        }
        let rope_dim = if self.partial_rotary {
            self.head_dim() / 2
        } else {
            self.head_dim()
        };
        let factors =
            |base: f64| -> Vec<f64> { (0..rope_dim / 2).map(|i| base + 0.75 * i as f64).collect() };
        json!({"type": "longrope", "short_factor": factors(1.0), "long_factor": factors(2.0)})
    }

    pub fn config(&self) -> Value {
        let common = json!({
            "hidden_size": HIDDEN,
            "intermediate_size": self.intermediate(),
            "num_hidden_layers": self.layers(),
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "head_dim": self.head_dim(),
            "vocab_size": VOCAB,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
        });
        let specific = match self.kind {
            Kind::Gemma2 => json!({
                "architectures": ["Gemma2ForCausalLM"],
                "model_type": "gemma2",
                "hidden_activation": "gelu_pytorch_tanh",
                "hidden_act": "gelu_pytorch_tanh",
                "rope_theta": 10000.0,
                // candle-transformers scales by the head size whatever
                // this says; transformers reads it (see `query_scalar`).
                "query_pre_attn_scalar": self.query_scalar.unwrap_or(self.head_dim()),
                // Small caps, so that they change the logits.
                "attn_logit_softcapping": 1.5,
                "final_logit_softcapping": 3.0,
                "sliding_window": self.window,
                "tie_word_embeddings": true,
            }),
            Kind::Gemma3 => json!({
                "architectures": ["Gemma3ForCausalLM"],
                "model_type": "gemma3_text",
                "hidden_activation": "gelu_pytorch_tanh",
                "hidden_act": "gelu_pytorch_tanh",
                "rope_theta": 1_000_000.0,
                "rope_local_base_freq": 10000.0,
                "rope_scaling": null,
                "query_pre_attn_scalar": self.query_scalar.unwrap_or(self.head_dim()),
                "attn_logit_softcapping": null,
                "final_logit_softcapping": null,
                "sliding_window": self.window,
                // Layers 0, 1 and 3 slide; layer 2 is global.
                "sliding_window_pattern": 3,
                "layer_types": ["sliding_attention", "sliding_attention",
                                "full_attention", "sliding_attention"],
                "tie_word_embeddings": true,
            }),
            Kind::Phi3 => json!({
                "architectures": ["Phi3ForCausalLM"],
                "model_type": "phi3",
                "hidden_act": "silu",
                "rope_theta": 10000.0,
                "rope_scaling": self.longrope_scaling(),
                "partial_rotary_factor": if self.partial_rotary { 0.5 } else { 1.0 },
                "original_max_position_embeddings": if self.longrope { 64 } else { 256 },
                "sliding_window": self.window,
                "tie_word_embeddings": false,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
            }),
            Kind::Qwen3Moe => json!({
                "architectures": ["Qwen3MoeForCausalLM"],
                "model_type": "qwen3_moe",
                "hidden_act": "silu",
                "rope_theta": 10000.0,
                "rope_scaling": null,
                "sliding_window": null,
                "use_sliding_window": false,
                "max_window_layers": 4,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "moe_intermediate_size": 32,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "norm_topk_prob": true,
                "output_router_logits": false,
                "router_aux_loss_coef": 0.0,
                "tie_word_embeddings": false,
            }),
        };
        let mut c = common;
        let o = c.as_object_mut().expect("object");
        for (k, v) in specific.as_object().expect("object") {
            o.insert(k.clone(), v.clone());
        }
        c
    }

    /// The checkpoint's tensors: `(name, shape, f32 data)`, in HF names.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d ^ (self.kind as u64 + 1);
        let mut tensors = Vec::new();
        let mut put = |name: String, shape: Vec<usize>, scale: f32, bias: f32| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    bias + scale * ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                })
                .collect();
            tensors.push((name, shape, data));
        };
        let gemma = matches!(self.kind, Kind::Gemma2 | Kind::Gemma3);
        // Gemma scales by `1 + w`: weights near 0; the others near 1.
        let norm_bias = if gemma { 0.0 } else { 1.0 };
        let (hd, ff) = (self.head_dim(), self.intermediate());
        let (qd, kvd) = (HEADS * hd, KV_HEADS * hd);
        put(
            "model.embed_tokens.weight".into(),
            vec![VOCAB, HIDDEN],
            1.0,
            0.0,
        );
        if !gemma {
            put("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.5, 0.0);
        }
        for l in 0..self.layers() {
            let p = format!("model.layers.{l}");
            let mut mats: Vec<(String, usize, usize)> = Vec::new();
            match self.kind {
                Kind::Phi3 => {
                    mats.push(("self_attn.qkv_proj".into(), qd + 2 * kvd, HIDDEN));
                    mats.push(("self_attn.o_proj".into(), HIDDEN, qd));
                    mats.push(("mlp.gate_up_proj".into(), 2 * ff, HIDDEN));
                    mats.push(("mlp.down_proj".into(), HIDDEN, ff));
                }
                _ => {
                    mats.push(("self_attn.q_proj".into(), qd, HIDDEN));
                    mats.push(("self_attn.k_proj".into(), kvd, HIDDEN));
                    mats.push(("self_attn.v_proj".into(), kvd, HIDDEN));
                    mats.push(("self_attn.o_proj".into(), HIDDEN, qd));
                }
            }
            match self.kind {
                Kind::Gemma2 | Kind::Gemma3 => {
                    mats.push(("mlp.gate_proj".into(), ff, HIDDEN));
                    mats.push(("mlp.up_proj".into(), ff, HIDDEN));
                    mats.push(("mlp.down_proj".into(), HIDDEN, ff));
                }
                Kind::Qwen3Moe => {
                    mats.push(("mlp.gate".into(), 8, HIDDEN));
                    for e in 0..8 {
                        mats.push((format!("mlp.experts.{e}.gate_proj"), 32, HIDDEN));
                        mats.push((format!("mlp.experts.{e}.up_proj"), 32, HIDDEN));
                        mats.push((format!("mlp.experts.{e}.down_proj"), HIDDEN, 32));
                    }
                }
                Kind::Phi3 => {}
            }
            for (w, rows, cols) in mats {
                // The router's scale spreads its scores, so the experts
                // chosen differ from row to row.
                let scale = if w == "mlp.gate" { 2.0 } else { 0.5 };
                put(format!("{p}.{w}.weight"), vec![rows, cols], scale, 0.0);
            }
            let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
            if gemma {
                norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
            }
            for norm in norms {
                put(format!("{p}.{norm}.weight"), vec![HIDDEN], 0.2, norm_bias);
            }
            if matches!(self.kind, Kind::Gemma3 | Kind::Qwen3Moe) {
                for n in ["q_norm", "k_norm"] {
                    put(
                        format!("{p}.self_attn.{n}.weight"),
                        vec![hd],
                        0.2,
                        norm_bias,
                    );
                }
            }
        }
        put("model.norm.weight".into(), vec![HIDDEN], 0.2, norm_bias);
        tensors
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join("config.json"), self.config().to_string())?;
        std::fs::write(dir.join("model.safetensors"), safetensors(&self.tensors()))?;
        let specials: Vec<String> = ["<pad>", "<s>", "</s>", "<unk>"].map(String::from).to_vec();
        write_tokenizer(dir, &specials, VOCAB)?;
        let tok_cfg = json!({
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "add_bos_token": true,
        });
        std::fs::write(dir.join("tokenizer_config.json"), tok_cfg.to_string())
    }
}
