//! The forward pass on the real model against candle-transformers'
//! `quantized_llama` (an independent implementation over the same GGUF), and
//! batch/chunk invariance of our own.

use super::{gguf, Chunk, Model};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use std::path::PathBuf;

pub(super) fn model_path() -> PathBuf {
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
pub(super) const PROMPT: &[u32] = &[
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
];

/// One chunk of the quantized (non-dense) path.
pub(super) fn chunk(slot: usize, pos: usize, tokens: &[u32]) -> Chunk<'_> {
    Chunk {
        slot,
        pos,
        tokens,
        dense: false,
    }
}

/// The logits after `tokens` run alone at `pos` in `slot`.
pub(super) fn one(m: &mut dyn Model, slot: usize, pos: usize, tokens: &[u32]) -> Vec<f32> {
    m.forward(&[chunk(slot, pos, tokens)]).unwrap().remove(0)
}

pub(super) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub(super) fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

pub(super) fn cosine(a: &[f32], b: &[f32]) -> f64 {
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
            dense: false,
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

    // The dense (f32 GEMM) prefill path agrees too.
    let d = ours
        .forward(&[Chunk {
            slot: 1,
            pos: 0,
            tokens: PROMPT,
            dense: true,
        }])
        .unwrap()
        .remove(0);
    let cd = cosine(&d, &b);
    assert!(cd > 0.999, "dense cosine {cd}");
    assert_eq!(argmax(&d), argmax(&b));

    // A few decode steps, each feeding the shared greedy token.
    let mut tok = argmax(&a) as u32;
    for i in 0..10 {
        let pos = PROMPT.len() + i;
        let a = ours
            .forward(&[Chunk {
                slot: 0,
                pos,
                tokens: &[tok],
                dense: false,
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
            dense: false,
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
            dense: false,
        },
        Chunk {
            slot: 2,
            pos: 0,
            tokens: &other,
            dense: false,
        },
    ])
    .unwrap();
    let out = m
        .forward(&[
            Chunk {
                slot: 2,
                pos: other.len(),
                tokens: &[7],
                dense: false,
            },
            Chunk {
                slot: 1,
                pos: p1.len(),
                tokens: p2,
                dense: false,
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
                dense: false,
            },
            Chunk {
                slot: 1,
                pos: PROMPT.len(),
                tokens: &[t],
                dense: false,
            },
        ])
        .unwrap();
    assert_eq!(both[0], both[1]);
    // The dense (prefill) path: a prompt's last token run alone after the
    // rest, as after a prefix-cache hit, gets the bits it got inside the
    // whole chunk — and so does the next decode step.
    let long: Vec<u32> = (0..130).map(|i| 200 + (i * 37) % 900).collect();
    let dense = |slot, pos, tokens| Chunk {
        slot,
        pos,
        tokens,
        dense: true,
    };
    let whole = m.forward(&[dense(0, 0, &long)]).unwrap().remove(0);
    m.forward(&[dense(1, 0, &long[..129])]).unwrap();
    let last = m.forward(&[dense(1, 129, &long[129..])]).unwrap().remove(0);
    assert_eq!(whole, last, "dense logits depend on the chunk's size");
    let t = [argmax(&whole) as u32];
    let (a, b) = (one(&mut m, 0, 130, &t), one(&mut m, 1, 130, &t));
    assert_eq!(a, b, "a dense prefill chunked differently changed the KV");
    // Errors are reported, not panics.
    assert!(m
        .forward(&[Chunk {
            slot: 9,
            pos: 0,
            tokens: &[1],
            dense: false
        }])
        .is_err());
    assert!(m
        .forward(&[Chunk {
            slot: 0,
            pos: 255,
            tokens: &[1, 2],
            dense: false
        }])
        .is_err());
    assert!(m
        .forward(&[Chunk {
            slot: 0,
            pos: 0,
            tokens: &[1_000_000],
            dense: false
        }])
        .is_err());
}

#[test]
fn a_kv_cache_that_grows_keeps_every_position() {
    // A slot's cache is made for the positions its first forward needs
    // (whole huge pages: 352 positions of this model) and moved to a bigger
    // one when the sequence outgrows it; nothing it held may change.
    let path = model_path();
    let mut m = gguf::load(&path, Some(2048), 3, 2).unwrap().model;
    let seq: Vec<u32> = (0..1000).map(|i| 200 + (i * 37) % 900).collect();
    // Slot 0: a 300-token prompt, then one token at a time past two growths
    // (at 352 and 896 positions).
    m.forward(&[chunk(0, 0, &seq[..300])]).unwrap();
    let mut grown = Vec::new();
    for p in 300..1000 {
        grown = one(&mut m, 0, p, &seq[p..p + 1]);
    }
    // Slot 1: the whole sequence in one chunk, its cache made big enough
    // at once (chunking does not change the bits, as tested above).
    let whole = one(&mut m, 1, 0, &seq);
    assert_eq!(grown, whole, "a grown cache changed the logits");
    // A prefix copied into a slot whose cache is too small grows it too.
    m.forward(&[chunk(2, 0, &seq[..10])]).unwrap();
    m.copy_kv(0, 2, 0, 1000).unwrap();
    let next = [7u32];
    assert_eq!(one(&mut m, 2, 1000, &next), one(&mut m, 0, 1000, &next));
    // Past the context: an error, not a bigger cache.
    assert!(m.forward(&[chunk(0, 1001, &[5; 1100])]).is_err());
}

/// Process CPU seconds (user + system), to time runs on a busy machine.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Timing breakdown; `cargo test -p helexa-engine --lib -- --ignored bench_forward --nocapture`.
/// Reports wall-clock and CPU-time rates (the latter for a shared machine).
#[test]
#[ignore]
fn bench_forward() {
    let path = model_path();
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let mut m = gguf::load(&path, Some(2048), 2, threads).unwrap().model;
    let prompt: Vec<u32> = (0..512).map(|i| 100 + (i * 7) % 5000).collect();
    let variants: &[bool] = match std::env::var("BENCH_PREFILL").as_deref() {
        Ok("dense") => &[true],
        Ok("int8") => &[false],
        _ => &[false, true],
    };
    for &dense in variants {
        let (t, c) = (std::time::Instant::now(), cpu_secs());
        m.forward(&[Chunk {
            slot: 0,
            pos: 0,
            tokens: &prompt,
            dense,
        }])
        .unwrap();
        let (pf, pc) = (t.elapsed().as_secs_f64(), cpu_secs() - c);
        eprintln!(
            "threads {threads} dense {dense}: prefill 512: {:.0} tok/s wall, {:.0} tok/CPU-s",
            512.0 / pf,
            512.0 / pc
        );
    }
    let (t, c) = (std::time::Instant::now(), cpu_secs());
    let mut lap = std::time::Instant::now();
    for i in 0..256 {
        m.forward(&[Chunk {
            slot: 0,
            pos: 512 + i,
            tokens: &[200],
            dense: false,
        }])
        .unwrap();
        if i % 32 == 31 {
            eprintln!(
                "  steps {}..{}: {:.1} ms/step",
                i - 31,
                i + 1,
                lap.elapsed().as_secs_f64() * 1000.0 / 32.0
            );
            lap = std::time::Instant::now();
        }
    }
    let (dw, dc) = (t.elapsed().as_secs_f64(), cpu_secs() - c);
    eprintln!(
        "threads {threads}: decode {:.1} tok/s wall, {:.1} tok/CPU-s",
        256.0 / dw,
        256.0 / dc
    );
}
