//! Prefill and decode throughput of the engine on a GGUF model.
//!
//! `cargo run --release -p helexa-engine --example engine_bench -- [MODEL.gguf] [THREADS] [PROMPT_TOKENS]`
//! (PROMPT_TOKENS: about how long the prompt is, default 500; decode speed
//! at a short context is what `scripts/bench-engine` compares)
//! (default model: `$HELEXA_MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf`).

use helexa_engine::*;
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .filter(|a| !a.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HELEXA_MODEL_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/helexa/models")
                })
                .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let mut cfg = EngineConfig::new(&path);
    cfg.threads = args.get(2).and_then(|t| t.parse().ok());
    cfg.max_batch = 8;
    let t = Instant::now();
    let e = Engine::load(cfg).expect("load");
    println!(
        "load: {:.2?} ({} ctx {})",
        t.elapsed(),
        e.meta().name,
        e.meta().context_length
    );

    let story = "Once upon a time, in a small village by the sea, there lived an old fisherman who told stories to the children every evening. ";
    let mut prompt = e.tokenize("<|im_start|>user\n", false).unwrap();
    let piece = e.tokenize(story, false).unwrap();
    let target: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(500);
    while prompt.len() + piece.len() < target {
        prompt.extend_from_slice(&piece);
    }
    prompt.extend(
        e.tokenize(
            "Continue the story at length.<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .unwrap(),
    );
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };

    // HELEXA_BENCH_BATCHES=1,8 picks the batch sizes (default 1, 4, 8).
    let batches: Vec<usize> = std::env::var("HELEXA_BENCH_BATCHES")
        .ok()
        .map(|v| v.split(',').filter_map(|b| b.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 8]);
    // HELEXA_BENCH_REPS=N runs each batch size N times (default 2; more
    // for a profile of decode that the load and first prefill do not swamp).
    let reps: usize = std::env::var("HELEXA_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    for &batch in &batches {
        for rep in 0..reps {
            let t0 = Instant::now();
            let streams: Vec<_> = (0..batch)
                .map(|i| {
                    let mut p = prompt.clone();
                    // Different prompts per sequence (last token varies).
                    p.insert(1, 100 + i as u32);
                    e.submit(GenerationRequest {
                        prompt: p,
                        params: greedy.clone(),
                        max_new_tokens: 128,
                        stop: vec![],
                        constraint: None,
                        logprobs: None,
                    })
                    .unwrap()
                })
                .collect();
            let mut prefill_done = None;
            let mut first_text = None;
            let mut gen = 0usize;
            let mut last = t0;
            for mut s in streams {
                while let Some(ev) = s.blocking_next() {
                    match ev {
                        GenEvent::Prefilled { .. } => {
                            prefill_done.get_or_insert(Instant::now());
                        }
                        GenEvent::Text { .. } => {
                            first_text.get_or_insert(Instant::now());
                        }
                        GenEvent::Finished {
                            completion_tokens, ..
                        } => {
                            gen += completion_tokens;
                            last = last.max(Instant::now());
                            break;
                        }
                        GenEvent::Failed { message } => panic!("{message}"),
                    }
                }
            }
            let pf = prefill_done.unwrap() - t0;
            let dec = last - first_text.unwrap();
            println!(
                "batch {batch} rep {rep}: prompt {} tok x{batch}: first prefill {:.0} ms ({:.0} tok/s) | {gen} tokens decoded in {:.2?} = {:.1} tok/s | engine stats {:?}",
                prompt.len() + 1,
                pf.as_secs_f64() * 1000.0,
                (prompt.len() + 1) as f64 / pf.as_secs_f64(),
                dec,
                gen.saturating_sub(batch) as f64 / dec.as_secs_f64(),
                e.stats()
            );
        }
    }
}
