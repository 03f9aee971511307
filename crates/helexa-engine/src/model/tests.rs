//! The forward pass on the real model against candle-transformers'
//! `quantized_llama` (an independent implementation over the same GGUF), and
//! batch/chunk invariance of our own.

use super::{gguf, Chunk, Model};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use std::path::PathBuf;

fn model_path() -> PathBuf {
    let dir = std::env::var_os("HELEXA_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/helexa/models")
        });
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "test model {} not found: run scripts/fetch-model (or set HELEXA_MODEL_DIR)",
        p.display()
    );
    p
}

// "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
const PROMPT: &[u32] = &[
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
];

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

#[test]
fn logits_match_candle_quantized_llama() {
    let path = model_path();
    let mut ours = gguf::load(&path, Some(512), 2, 2).unwrap().model;
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut theirs = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();

    let a = ours
        .forward(&[Chunk {
            slot: 0,
            pos: 0,
            tokens: PROMPT,
        }])
        .unwrap()
        .remove(0);
    let x = Tensor::new(PROMPT, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let b: Vec<f32> = theirs
        .forward(&x, 0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a.len(), b.len());
    let c = cosine(&a, &b);
    assert!(c > 0.999, "cosine {c}");
    assert_eq!(argmax(&a), argmax(&b));

    // A few decode steps, each feeding the shared greedy token.
    let mut tok = argmax(&a) as u32;
    for i in 0..10 {
        let pos = PROMPT.len() + i;
        let a = ours
            .forward(&[Chunk {
                slot: 0,
                pos,
                tokens: &[tok],
            }])
            .unwrap()
            .remove(0);
        let x = Tensor::new(&[tok], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let b: Vec<f32> = theirs
            .forward(&x, pos)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let c = cosine(&a, &b);
        eprintln!(
            "step {i}: tok {tok} cosine {c} argmax {} {}",
            argmax(&a),
            argmax(&b)
        );
        assert!(c > 0.98, "step {i}: cosine {c}");
        assert_eq!(argmax(&a), argmax(&b), "step {i}");
        tok = argmax(&a) as u32;
    }
}

#[test]
fn batching_and_chunking_do_not_change_results() {
    let path = model_path();
    let mut m = gguf::load(&path, Some(256), 3, 2).unwrap().model;
    let other: Vec<u32> = (100..140).collect();
    // Alone, one chunk.
    let alone = m
        .forward(&[Chunk {
            slot: 0,
            pos: 0,
            tokens: PROMPT,
        }])
        .unwrap()
        .remove(0);
    // In two chunks, in a batch with another sequence.
    let (p1, p2) = PROMPT.split_at(5);
    m.forward(&[
        Chunk {
            slot: 1,
            pos: 0,
            tokens: p1,
        },
        Chunk {
            slot: 2,
            pos: 0,
            tokens: &other,
        },
    ])
    .unwrap();
    let out = m
        .forward(&[
            Chunk {
                slot: 2,
                pos: other.len(),
                tokens: &[7],
            },
            Chunk {
                slot: 1,
                pos: p1.len(),
                tokens: p2,
            },
        ])
        .unwrap();
    assert_eq!(
        alone, out[1],
        "batched/chunked logits differ from a single run"
    );
    // Decode of two sequences together equals each alone.
    let t = argmax(&alone) as u32;
    let both = m
        .forward(&[
            Chunk {
                slot: 0,
                pos: PROMPT.len(),
                tokens: &[t],
            },
            Chunk {
                slot: 1,
                pos: PROMPT.len(),
                tokens: &[t],
            },
        ])
        .unwrap();
    assert_eq!(both[0], both[1]);
    // Errors are reported, not panics.
    assert!(m
        .forward(&[Chunk {
            slot: 9,
            pos: 0,
            tokens: &[1]
        }])
        .is_err());
    assert!(m
        .forward(&[Chunk {
            slot: 0,
            pos: 255,
            tokens: &[1, 2]
        }])
        .is_err());
    assert!(m
        .forward(&[Chunk {
            slot: 0,
            pos: 0,
            tokens: &[1_000_000]
        }])
        .is_err());
}
