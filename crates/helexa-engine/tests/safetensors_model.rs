//! The engine on a tiny random llama saved as a safetensors directory.

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use helexa_api::chat::ChatMessage;
use helexa_engine::*;
use std::path::Path;

const HIDDEN: usize = 32;
const INTER: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const VOCAB: usize = 64;
const SPECIALS: [&str; 5] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];

fn write_model(dir: &Path) {
    let config = serde_json::json!({
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
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    // Weights from a fixed-seed generator, so every run tests the same model.
    let varmap = VarMap::new();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut put = |name: &str, shape: (usize, usize), scale: f32, bias: f32| {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bias + scale * ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            })
            .collect();
        let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
        let t = if shape.0 == 1 {
            t.squeeze(0).unwrap()
        } else {
            t
        };
        varmap
            .data()
            .lock()
            .unwrap()
            .insert(name.to_string(), Var::from_tensor(&t).unwrap());
    };
    let head_dim = HIDDEN / HEADS;
    let kv = KV_HEADS * head_dim;
    put("model.embed_tokens.weight", (VOCAB, HIDDEN), 1.0, 0.0);
    put("lm_head.weight", (VOCAB, HIDDEN), 0.5, 0.0);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        put(
            &format!("{p}.self_attn.q_proj.weight"),
            (HIDDEN, HIDDEN),
            0.5,
            0.0,
        );
        put(
            &format!("{p}.self_attn.k_proj.weight"),
            (kv, HIDDEN),
            0.5,
            0.0,
        );
        put(
            &format!("{p}.self_attn.v_proj.weight"),
            (kv, HIDDEN),
            0.5,
            0.0,
        );
        put(
            &format!("{p}.self_attn.o_proj.weight"),
            (HIDDEN, HIDDEN),
            0.5,
            0.0,
        );
        put(
            &format!("{p}.mlp.gate_proj.weight"),
            (INTER, HIDDEN),
            0.5,
            0.0,
        );
        put(
            &format!("{p}.mlp.up_proj.weight"),
            (INTER, HIDDEN),
            0.5,
            0.0,
        );
        put(
            &format!("{p}.mlp.down_proj.weight"),
            (HIDDEN, INTER),
            0.5,
            0.0,
        );
        put(
            &format!("{p}.input_layernorm.weight"),
            (1, HIDDEN),
            0.2,
            1.0,
        );
        put(
            &format!("{p}.post_attention_layernorm.weight"),
            (1, HIDDEN),
            0.2,
            1.0,
        );
    }
    put("model.norm.weight", (1, HIDDEN), 0.2, 1.0);
    varmap.save(dir.join("model.safetensors")).unwrap();

    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, t) in SPECIALS.iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
        added.push(serde_json::json!({
            "id": i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    for i in SPECIALS.len()..VOCAB {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tokenizer = serde_json::json!({
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
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();

    let tok_cfg = serde_json::json!({
        "bos_token": {"content": "<s>"},
        "eos_token": "</s>",
        "add_bos_token": true,
        "chat_template": "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), tok_cfg.to_string()).unwrap();
}

fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    dir
}

fn greedy(prompt: Vec<u32>, n: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        params: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        max_new_tokens: n,
        stop: Vec::new(),
        constraint: None,
        logprobs: None,
    }
}

/// Text, (reason, prompt tokens, completion tokens), and the tokens the text covered.
fn collect(mut s: GenerationStream) -> (String, FinishReason, usize, usize, usize) {
    let mut text = String::new();
    let mut covered = 0;
    while let Some(ev) = s.blocking_next() {
        match ev {
            GenEvent::Prefilled { .. } => {}
            GenEvent::Text {
                text: t, tokens, ..
            } => {
                text.push_str(&t);
                covered += tokens;
            }
            GenEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => return (text, reason, prompt_tokens, completion_tokens, covered),
            GenEvent::Failed { message } => panic!("generation failed: {message}"),
        }
    }
    panic!("stream ended without Finished");
}

#[test]
fn loads_and_describes_the_model() {
    let dir = model_dir();
    let engine = Engine::load(EngineConfig::new(dir.path())).unwrap();
    let meta = engine.meta();
    assert_eq!(meta.architecture, "llama");
    assert_eq!(meta.vocab_size, VOCAB);
    assert_eq!(meta.context_length, 128);
    assert_eq!(meta.bos_token.as_deref(), Some("<s>"));
    assert_eq!(meta.eos_token.as_deref(), Some("</s>"));
    assert_eq!(meta.eos_token_ids, vec![2, 4]);
    assert!(meta.has_chat_template);
    let size = std::fs::metadata(dir.path().join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(meta.weights_bytes, size);
    engine.shutdown();

    let mut cfg = EngineConfig::new(dir.path());
    cfg.max_context = Some(40);
    let engine = Engine::load(cfg).unwrap();
    assert_eq!(engine.meta().context_length, 40);
    engine.shutdown();
}

#[test]
fn tokenizes_and_renders_chat() {
    let dir = model_dir();
    let engine = Engine::load(EngineConfig::new(dir.path())).unwrap();
    assert_eq!(engine.tokenize("w5 w9 w63", false).unwrap(), vec![5, 9, 63]);
    assert_eq!(engine.tokenize("w5 w9", true).unwrap(), vec![1, 5, 9]);
    assert_eq!(engine.decode(&[5, 9]).unwrap(), "w5 w9");
    let msgs: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
        {"role": "user", "content": "w7 w8"}
    ]))
    .unwrap();
    let text = engine.render_chat(&msgs, None, true).unwrap();
    assert_eq!(
        text,
        "<|im_start|> user w7 w8 <|im_end|> <|im_start|> assistant "
    );
    assert_eq!(
        engine.tokenize(&text, false).unwrap(),
        vec![3, 0, 7, 8, 4, 3, 0]
    );
    engine.shutdown();
}

#[test]
fn greedy_generation_is_deterministic_and_batch_independent() {
    let dir = model_dir();
    let engine = Engine::load(EngineConfig::new(dir.path())).unwrap();
    let a = vec![1, 10, 11, 12, 13, 14];
    let b = vec![1, 40, 41];

    let run = |p: &Vec<u32>| collect(engine.submit(greedy(p.clone(), 8)).unwrap());
    let alone_a = run(&a);
    let (_, reason, prompt_tokens, completion, covered) = alone_a.clone();
    assert_eq!(prompt_tokens, a.len());
    assert_eq!(covered, completion);
    // The fixed weights never emit EOS within 8 tokens from this prompt.
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(completion, 8);
    assert_eq!(run(&a), alone_a, "greedy generation is deterministic");
    let alone_b = run(&b);
    assert_ne!(
        alone_a.0, alone_b.0,
        "the two prompts should differ in output"
    );

    let sa = engine.submit(greedy(a.clone(), 8)).unwrap();
    let sb = engine.submit(greedy(b.clone(), 8)).unwrap();
    let together_b = std::thread::spawn(move || collect(sb));
    assert_eq!(collect(sa), alone_a);
    assert_eq!(together_b.join().unwrap(), alone_b);

    // A fresh engine on the same weights generates the same.
    engine.shutdown();
    let engine = Engine::load(EngineConfig::new(dir.path())).unwrap();
    assert_eq!(
        collect(engine.submit(greedy(a.clone(), 8)).unwrap()),
        alone_a
    );
    engine.shutdown();
}

#[test]
fn missing_tokenizer_is_a_clear_load_error() {
    let dir = model_dir();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    match Engine::load(EngineConfig::new(dir.path())) {
        Err(EngineError::ModelLoad { message, .. }) => {
            assert!(message.contains("tokenizer.json"), "{message}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded without a tokenizer"),
    }
}

#[test]
fn cuda_without_the_feature_or_device_is_a_load_error() {
    let dir = model_dir();
    let mut cfg = EngineConfig::new(dir.path());
    cfg.device = DeviceSpec::Cuda(0);
    if cfg!(not(feature = "cuda")) {
        assert!(matches!(
            Engine::load(cfg),
            Err(EngineError::ModelLoad { .. })
        ));
    }
}
