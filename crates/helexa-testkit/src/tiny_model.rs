//! A tiny random-weight Llama saved as a Hugging Face safetensors directory
//! (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, optionally `generation_config.json`), for tests
//! of what the engine does around the weights: templates, reasoning,
//! sampling defaults. The weights come from a fixed-seed generator, so every
//! run tests the same model.
//!
//! The tokenizer is word-level: the specials, then `w<i>` for every other id,
//! split on whitespace.

use serde_json::{json, Value};
use std::path::Path;

pub const HIDDEN: usize = 32;
pub const INTER: usize = 64;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const VOCAB: usize = 64;

/// What varies between the tiny models of different tests.
#[derive(Debug, Clone)]
pub struct TinyLlama {
    /// Special tokens, ids 0.. in order (`<unk>`, `<s>`, `</s>` first: the
    /// config names ids 1 and 2 as BOS and EOS).
    pub specials: Vec<String>,
    pub chat_template: String,
    pub generation_config: Option<Value>,
}

impl Default for TinyLlama {
    fn default() -> Self {
        TinyLlama {
            specials: ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
                .map(String::from)
                .to_vec(),
            chat_template: "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}".into(),
            generation_config: None,
        }
    }
}

/// A safetensors file of f32 tensors, in the order given.
pub fn safetensors(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let end = offset + data.len() * 4;
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, _, data) in tensors {
        for x in data {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

impl TinyLlama {
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "intermediate_size": INTER,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "vocab_size": VOCAB,
            "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2
        });
        std::fs::write(dir.join("config.json"), config.to_string())?;

        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
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
        let kv = KV_HEADS * (HIDDEN / HEADS);
        put(
            "model.embed_tokens.weight".into(),
            vec![VOCAB, HIDDEN],
            1.0,
            0.0,
        );
        put("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.5, 0.0);
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            for (w, rows, cols) in [
                ("self_attn.q_proj", HIDDEN, HIDDEN),
                ("self_attn.k_proj", kv, HIDDEN),
                ("self_attn.v_proj", kv, HIDDEN),
                ("self_attn.o_proj", HIDDEN, HIDDEN),
                ("mlp.gate_proj", INTER, HIDDEN),
                ("mlp.up_proj", INTER, HIDDEN),
                ("mlp.down_proj", HIDDEN, INTER),
            ] {
                put(format!("{p}.{w}.weight"), vec![rows, cols], 0.5, 0.0);
            }
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                put(format!("{p}.{norm}.weight"), vec![HIDDEN], 0.2, 1.0);
            }
        }
        put("model.norm.weight".into(), vec![HIDDEN], 0.2, 1.0);
        std::fs::write(dir.join("model.safetensors"), safetensors(&tensors))?;

        write_tokenizer(dir, &self.specials, VOCAB)?;
        let tok_cfg = json!({
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
            "add_bos_token": true,
            "chat_template": self.chat_template,
        });
        std::fs::write(dir.join("tokenizer_config.json"), tok_cfg.to_string())?;
        if let Some(g) = &self.generation_config {
            std::fs::write(dir.join("generation_config.json"), g.to_string())?;
        }
        Ok(())
    }
}

/// A word-level `tokenizer.json`: the specials, then `w<i>` for every other
/// id below `vocab`, split on whitespace.
pub fn write_tokenizer(dir: &Path, specials: &[String], vocab_size: usize) -> std::io::Result<()> {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, t) in specials.iter().enumerate() {
        vocab.insert(t.clone(), i.into());
        added.push(json!({
            "id": i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    for i in specials.len()..vocab_size {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string())
}
