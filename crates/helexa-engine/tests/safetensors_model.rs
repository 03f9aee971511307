//! The engine on a tiny random llama saved as a safetensors directory.

use helexa_api::chat::ChatMessage;
use helexa_engine::*;
use helexa_testkit::tiny_model::{TinyLlama, VOCAB};

fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    TinyLlama::default().write(dir.path()).unwrap();
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
                ..
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
