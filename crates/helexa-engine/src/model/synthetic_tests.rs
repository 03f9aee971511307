//! The forward pass on tiny random GGUF models written at test time, against
//! candle-transformers' independent implementations over the same file:
//! `quantized_llama` (llama, here with grouped-query attention),
//! `quantized_qwen2` (q/k/v biases, NeoX RoPE) and `quantized_qwen3` (per-head
//! q/k RMS norm, NeoX RoPE, a head dim other than embd / heads). No real
//! Qwen model is needed: the weights are seeded random numbers at realistic
//! scales, so a wrong rope pairing, a missing bias or a misplaced norm moves
//! the logits far more than quantization noise does.

use super::tests::{argmax, cosine};
use super::{gguf, Chunk, Model};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2, quantized_qwen3};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// Shape and storage types of one synthetic model.
#[derive(Debug, Clone, Copy)]
struct Spec {
    arch: &'static str,
    layers: usize,
    embd: usize,
    ff: usize,
    heads: usize,
    kv_heads: usize,
    /// Written as `key_length` / `value_length` (qwen3); `None`: embd / heads.
    head_dim: Option<usize>,
    vocab: usize,
    /// `attn_{q,k,v}.bias` (qwen2).
    biases: bool,
    /// `attn_{q,k}_norm.weight` (qwen3).
    qk_norm: bool,
    /// No `output.weight`: logits through `token_embd.weight`.
    tied: bool,
    /// Attention and ffn gate/up matrices.
    wtype: GgmlDType,
    /// `ffn_down` (its 256 columns allow the k-quants).
    down_type: GgmlDType,
    embd_type: GgmlDType,
    out_type: GgmlDType,
    rope_theta: f32,
    seed: u64,
}

impl Spec {
    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.embd / self.heads)
    }
}

const BASE: Spec = Spec {
    arch: "llama",
    layers: 2,
    embd: 128,
    ff: 256,
    heads: 4,
    kv_heads: 2,
    head_dim: None,
    vocab: 256,
    biases: false,
    qk_norm: false,
    tied: false,
    wtype: GgmlDType::Q8_0,
    down_type: GgmlDType::Q8_0,
    embd_type: GgmlDType::Q8_0,
    out_type: GgmlDType::Q8_0,
    rope_theta: 10000.0,
    seed: 1,
};

/// Context written to the metadata (candle precomputes RoPE tables for it).
const TRAINED_CONTEXT: u32 = 128;
/// Context our loader serves.
const SERVED_CONTEXT: usize = 64;
const PROMPT_LEN: usize = 12;
const DECODE_STEPS: usize = 8;

struct Gen(StdRng);

impl Gen {
    /// N(mean, std), Box–Muller.
    fn normal(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = self.0.random::<f64>().max(1e-12);
                let u2: f64 = self.0.random::<f64>();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                mean + std * z as f32
            })
            .collect()
    }

    fn tensor(&mut self, shape: &[usize], mean: f32, std: f32, dtype: GgmlDType) -> QTensor {
        let n = shape.iter().product();
        let t = Tensor::from_vec(self.normal(n, mean, std), shape, &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    }
}

/// Writes the model described by `s` to `path`.
fn write_model(s: &Spec, path: &Path) {
    let a = s.arch;
    let hd = s.head_dim();
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            "general.name".into(),
            Value::String(format!("synthetic {a}")),
        ),
        // quantized_qwen3: F32 RoPE tables (its default is F16).
        ("general.dtype".into(), Value::U32(0)),
        (format!("{a}.block_count"), Value::U32(s.layers as u32)),
        (format!("{a}.embedding_length"), Value::U32(s.embd as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(s.ff as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(s.heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(s.kv_heads as u32),
        ),
        (format!("{a}.context_length"), Value::U32(TRAINED_CONTEXT)),
        (format!("{a}.rope.freq_base"), Value::F32(s.rope_theta)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
    ];
    if a == "llama" {
        // quantized_llama requires it; qwen GGUFs leave it out.
        md.push((format!("{a}.rope.dimension_count"), Value::U32(hd as u32)));
    }
    if let Some(hd) = s.head_dim {
        md.push((format!("{a}.attention.key_length"), Value::U32(hd as u32)));
        md.push((format!("{a}.attention.value_length"), Value::U32(hd as u32)));
    }

    let mut g = Gen(StdRng::seed_from_u64(s.seed));
    let f32t = GgmlDType::F32;
    let (d, ff, qd, kvd) = (s.embd, s.ff, s.heads * hd, s.kv_heads * hd);
    let mut ts: Vec<(String, QTensor)> = Vec::new();
    ts.push((
        "token_embd.weight".into(),
        g.tensor(&[s.vocab, d], 0.0, 0.3, s.embd_type),
    ));
    for l in 0..s.layers {
        let p = |n: &str| format!("blk.{l}.{n}");
        ts.push((p("attn_norm.weight"), g.tensor(&[d], 1.0, 0.1, f32t)));
        ts.push((p("attn_q.weight"), g.tensor(&[qd, d], 0.0, 0.1, s.wtype)));
        ts.push((p("attn_k.weight"), g.tensor(&[kvd, d], 0.0, 0.1, s.wtype)));
        ts.push((p("attn_v.weight"), g.tensor(&[kvd, d], 0.0, 0.1, s.wtype)));
        if s.biases {
            ts.push((p("attn_q.bias"), g.tensor(&[qd], 0.0, 0.3, f32t)));
            ts.push((p("attn_k.bias"), g.tensor(&[kvd], 0.0, 0.3, f32t)));
            ts.push((p("attn_v.bias"), g.tensor(&[kvd], 0.0, 0.3, f32t)));
        }
        if s.qk_norm {
            ts.push((p("attn_q_norm.weight"), g.tensor(&[hd], 1.0, 0.2, f32t)));
            ts.push((p("attn_k_norm.weight"), g.tensor(&[hd], 1.0, 0.2, f32t)));
        }
        ts.push((
            p("attn_output.weight"),
            g.tensor(&[d, qd], 0.0, 0.05, s.wtype),
        ));
        ts.push((p("ffn_norm.weight"), g.tensor(&[d], 1.0, 0.1, f32t)));
        ts.push((p("ffn_gate.weight"), g.tensor(&[ff, d], 0.0, 0.1, s.wtype)));
        ts.push((p("ffn_up.weight"), g.tensor(&[ff, d], 0.0, 0.1, s.wtype)));
        ts.push((
            p("ffn_down.weight"),
            g.tensor(&[d, ff], 0.0, 0.05, s.down_type),
        ));
    }
    ts.push(("output_norm.weight".into(), g.tensor(&[d], 1.0, 0.1, f32t)));
    if !s.tied {
        ts.push((
            "output.weight".into(),
            g.tensor(&[s.vocab, d], 0.0, 0.3, s.out_type),
        ));
    }

    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

/// candle-transformers' model for the architecture.
enum Reference {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
    Qwen3(quantized_qwen3::ModelWeights),
}

impl Reference {
    fn load(arch: &str, path: &Path) -> Reference {
        let mut f = std::fs::File::open(path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let dev = &Device::Cpu;
        match arch {
            "llama" => {
                Reference::Llama(quantized_llama::ModelWeights::from_gguf(ct, &mut f, dev).unwrap())
            }
            "qwen2" => {
                Reference::Qwen2(quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, dev).unwrap())
            }
            "qwen3" => {
                Reference::Qwen3(quantized_qwen3::ModelWeights::from_gguf(ct, &mut f, dev).unwrap())
            }
            other => panic!("no reference for {other}"),
        }
    }

    /// Logits after the last of `tokens`, written at `pos..`.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
        let x = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let y = match self {
            Reference::Llama(m) => m.forward(&x, pos),
            Reference::Qwen2(m) => m.forward(&x, pos),
            Reference::Qwen3(m) => m.forward(&x, pos),
        };
        y.unwrap().squeeze(0).unwrap().to_vec1().unwrap()
    }
}

/// Top-1 minus top-2: how far from a tie the greedy choice is.
fn margin(v: &[f32]) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    s[0] - s[1]
}

fn chunk(slot: usize, pos: usize, tokens: &[u32], dense: bool) -> Chunk<'_> {
    Chunk {
        slot,
        pos,
        tokens,
        dense,
    }
}

fn one(m: &mut dyn Model, c: Chunk) -> Vec<f32> {
    m.forward(&[c]).unwrap().remove(0)
}

/// Agreement of our logits `a` with the reference `b`: cosine above 0.999
/// and the same argmax, unless the two candidates are a near-tie in both, that
/// is closer than three times the rms difference between the two outputs (the
/// implementations round differently: e.g. candle rounds Q8_1's `s` through
/// f16 twice, llama.cpp and we once). Returns the cosine.
fn agree(what: &str, a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let c = cosine(a, b);
    let rms_diff =
        (a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>() / a.len() as f32).sqrt();
    let (ia, ib) = (argmax(a), argmax(b));
    eprintln!(
        "{what}: cosine {c:.6}, argmax {ia} / {ib}, rms diff {rms_diff:.4}, reference top-2 margin {:.3}",
        margin(b)
    );
    assert!(c > 0.999, "{what}: cosine {c}");
    if ia != ib {
        let tol = 3.0 * rms_diff;
        assert!(
            b[ib] - b[ia] < tol && a[ia] - a[ib] < tol,
            "{what}: argmax {ia} differs from the reference's {ib} (reference logits {} vs {}, ours {} vs {})",
            b[ia],
            b[ib],
            a[ia],
            a[ib]
        );
        eprintln!("{what}: near-tie, argmax {ia} vs {ib} accepted");
    }
    c
}

/// Writes the model, then checks prefill (both paths) and greedy decode
/// against the reference, and batching invariance of our own forward.
fn check(s: Spec) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{}.gguf", s.arch));
    write_model(&s, &path);
    let loaded = gguf::load(&path, Some(SERVED_CONTEXT), 3, 2).unwrap();
    assert_eq!(loaded.architecture, s.arch);
    let cfg = loaded.model.config();
    assert_eq!(
        (cfg.head_dim, cfg.n_kv_head, cfg.vocab_size, cfg.context),
        (s.head_dim(), s.kv_heads, s.vocab, SERVED_CONTEXT)
    );
    let mut ours = loaded.model;
    let mut theirs = Reference::load(s.arch, &path);

    let mut g = StdRng::seed_from_u64(s.seed ^ 0x5eed);
    let prompt: Vec<u32> = (0..PROMPT_LEN)
        .map(|_| g.random_range(0..s.vocab as u32))
        .collect();
    let other: Vec<u32> = (0..PROMPT_LEN + 3)
        .map(|_| g.random_range(0..s.vocab as u32))
        .collect();

    let mut min_cos = f64::INFINITY;
    let prefill = one(&mut ours, chunk(0, 0, &prompt, false));
    let reference = theirs.forward(&prompt, 0);
    min_cos = min_cos.min(agree("prefill", &prefill, &reference));
    let dense = one(&mut ours, chunk(1, 0, &prompt, true));
    min_cos = min_cos.min(agree("dense prefill", &dense, &reference));

    // Greedy decode, feeding both the same token.
    let mut tok = argmax(&prefill) as u32;
    let mut decoded = Vec::new();
    for i in 0..DECODE_STEPS {
        let pos = prompt.len() + i;
        let a = one(&mut ours, chunk(0, pos, &[tok], false));
        let b = theirs.forward(&[tok], pos);
        min_cos = min_cos.min(agree(&format!("decode {i} (token {tok})"), &a, &b));
        decoded.push((tok, a.clone()));
        tok = argmax(&a) as u32;
    }
    // The dense-prefilled slot decodes like the other one.
    let (t0, a0) = &decoded[0];
    let d0 = one(&mut ours, chunk(1, prompt.len(), &[*t0], false));
    min_cos = min_cos.min(agree("decode 0 after dense prefill", &d0, a0));
    eprintln!("{} (seed {}): min cosine {min_cos:.6}", s.arch, s.seed);

    // Batching: the same sequences in one forward call of a fresh model give
    // exactly the logits each got alone.
    let other_alone = one(&mut ours, chunk(2, 0, &other, false));
    let next_other = argmax(&other_alone) as u32;
    let other_step = one(&mut ours, chunk(2, other.len(), &[next_other], false));
    let mut fresh = gguf::load(&path, Some(SERVED_CONTEXT), 3, 2).unwrap().model;
    let out = fresh
        .forward(&[chunk(1, 0, &other, false), chunk(0, 0, &prompt, false)])
        .unwrap();
    assert_eq!(out[0], other_alone, "batched prefill differs (other)");
    assert_eq!(out[1], prefill, "batched prefill differs (prompt)");
    let out = fresh
        .forward(&[
            chunk(0, prompt.len(), &[decoded[0].0], false),
            chunk(1, other.len(), &[next_other], false),
        ])
        .unwrap();
    assert_eq!(out[0], decoded[0].1, "batched decode differs (prompt)");
    assert_eq!(out[1], other_step, "batched decode differs (other)");
    // The step's greedy picks over the model's threads: the sampler's
    // argmax of each wanted row, nothing for the others.
    let views: Vec<&[f32]> = vec![&out[0], &out[1], &out[0]];
    for want in [
        [true, true, true],
        [false, true, false],
        [true, false, true],
    ] {
        let picks = fresh.argmaxes(&views, &want);
        let expect: Vec<Option<u32>> = views
            .iter()
            .zip(want)
            .map(|(v, w)| w.then(|| crate::sampling::argmax(v)))
            .collect();
        assert_eq!(picks, expect);
    }
    // A dense prefill and a decode step in one call.
    let out = fresh
        .forward(&[
            chunk(0, prompt.len() + 1, &[decoded[1].0], false),
            chunk(2, 0, &prompt, true),
        ])
        .unwrap();
    assert_eq!(
        out[0], decoded[1].1,
        "decode next to a dense prefill differs"
    );
    assert_eq!(out[1].len(), dense.len());
    let c = cosine(&out[1], &dense);
    assert!(
        c > 0.99999,
        "dense prefill in a batch differs from alone: {c}"
    );
    assert_eq!(argmax(&out[1]), argmax(&dense));
}

#[test]
fn synthetic_llama_gqa() {
    check(Spec {
        wtype: GgmlDType::Q4_1,
        down_type: GgmlDType::Q4_1,
        embd_type: GgmlDType::Q8_0,
        out_type: GgmlDType::Q8_0,
        seed: 11,
        ..BASE
    });
}

#[test]
fn synthetic_llama_tied_q4_0() {
    check(Spec {
        heads: 4,
        kv_heads: 1,
        tied: true,
        wtype: GgmlDType::Q4_0,
        down_type: GgmlDType::Q4K,
        embd_type: GgmlDType::Q4_0,
        seed: 12,
        ..BASE
    });
}

#[test]
fn synthetic_qwen2_biases_tied() {
    check(Spec {
        arch: "qwen2",
        biases: true,
        tied: true,
        wtype: GgmlDType::Q8_0,
        down_type: GgmlDType::Q6K,
        embd_type: GgmlDType::Q8_0,
        rope_theta: 1_000_000.0,
        seed: 21,
        ..BASE
    });
}

#[test]
fn synthetic_qwen2_biases_output() {
    check(Spec {
        arch: "qwen2",
        biases: true,
        wtype: GgmlDType::Q4_0,
        down_type: GgmlDType::Q4_0,
        embd_type: GgmlDType::F16,
        out_type: GgmlDType::Q4_1,
        rope_theta: 1_000_000.0,
        seed: 22,
        ..BASE
    });
}

#[test]
fn synthetic_qwen3_qk_norm_wide_heads_tied() {
    // Head dim 64 with 4 heads over a 128 embedding (q is 256 wide), as in
    // Qwen3, whose key_length is not embd / heads.
    check(Spec {
        arch: "qwen3",
        head_dim: Some(64),
        qk_norm: true,
        tied: true,
        wtype: GgmlDType::Q4_0,
        down_type: GgmlDType::Q4K,
        embd_type: GgmlDType::Q8_0,
        rope_theta: 1_000_000.0,
        seed: 31,
        ..BASE
    });
}

#[test]
fn synthetic_qwen3_qk_norm_output() {
    check(Spec {
        arch: "qwen3",
        head_dim: Some(32),
        qk_norm: true,
        wtype: GgmlDType::Q8_0,
        down_type: GgmlDType::Q8_0,
        embd_type: GgmlDType::Q4_1,
        out_type: GgmlDType::F16,
        rope_theta: 1_000_000.0,
        seed: 32,
        ..BASE
    });
}
