//! The device-generic decoder (what CUDA runs) on candle's CPU device:
//! against our native CPU path and candle-transformers on the real GGUF,
//! against candle-transformers' llama on a tiny safetensors model, and
//! invariant under batching, slot order, chunking and KV copies.

use super::tests::{argmax, chunk, cosine, max_diff, model_path, one, PROMPT};
use super::{device::DeviceLlama, gguf, safetensors, Model};
use crate::api::DeviceSpec;
use helexa_testkit::tiny_model::TinyLlama;

fn device_gguf(slots: usize) -> DeviceLlama {
    gguf::load_on_device(&model_path(), DeviceSpec::Cpu, Some(512), slots)
        .unwrap()
        .model
}

/// Prompt and ten greedy steps: the device path agrees with the native
/// kernels (both quantize activations to 8 bits, in different ways).
#[test]
fn gguf_on_candle_agrees_with_the_native_kernels() {
    let mut ours = gguf::load(&model_path(), Some(512), 1, 2).unwrap().model;
    let mut dev = device_gguf(1);
    let a = one(&mut ours, 0, 0, PROMPT);
    let b = one(&mut dev, 0, 0, PROMPT);
    let c = cosine(&a, &b);
    assert!(c > 0.999, "prompt: cosine {c}");
    assert_eq!(argmax(&a), argmax(&b));
    let mut tok = argmax(&a) as u32;
    for i in 0..10 {
        let pos = PROMPT.len() + i;
        let a = one(&mut ours, 0, pos, &[tok]);
        let b = one(&mut dev, 0, pos, &[tok]);
        let c = cosine(&a, &b);
        assert!(c > 0.99, "step {i}: cosine {c}");
        assert_eq!(argmax(&a), argmax(&b), "step {i}");
        tok = argmax(&a) as u32;
    }
}

/// Sequences in one batch — a prompt chunk beside decode rows, slots out
/// of order and not consecutive — give what each gives alone.
#[test]
fn batching_slot_order_and_chunking_do_not_change_results() {
    let other: Vec<u32> = (100..140).collect();
    let third: Vec<u32> = (300..310).collect();
    // Alone, each in a fresh model.
    let alone = |slot: usize, prompt: &[u32], next: u32| {
        let mut m = device_gguf(4);
        let p = one(&mut m, slot, 0, prompt);
        let d = one(&mut m, slot, prompt.len(), &[next]);
        (p, d)
    };
    let (p0, d0) = alone(0, PROMPT, 42);
    let (p1, d1) = alone(3, &other, 43);
    let (p2, d2) = alone(1, &third, 44);

    let mut m = device_gguf(4);
    // The first prompt in two chunks beside the second prompt whole.
    let r = m
        .forward(&[chunk(0, 0, &PROMPT[..7]), chunk(3, 0, &other)])
        .unwrap();
    assert!(max_diff(&r[1], &p1) < 1e-3, "{}", max_diff(&r[1], &p1));
    let r = m
        .forward(&[chunk(3, other.len(), &[43]), chunk(0, 7, &PROMPT[7..])])
        .unwrap();
    assert!(max_diff(&r[0], &d1) < 1e-3, "{}", max_diff(&r[0], &d1));
    // Chunked: candle's CPU `QMatMul` picks its path by row count (8-bit
    // activations or dequantized f32), so the first chunk's K/V differ by
    // quantization noise; the dense tiny model checks chunking exactly.
    let c = cosine(&r[1], &p0);
    assert!(c > 0.999 && argmax(&r[1]) == argmax(&p0), "cosine {c}");
    // Decode rows of slots 0 and 1 (consecutive) while slot 1 prefilled
    // just before; then slots 1 and 0 out of order.
    let r = m.forward(&[chunk(1, 0, &third)]).unwrap();
    assert!(max_diff(&r[0], &p2) < 1e-3);
    let r = m
        .forward(&[chunk(1, third.len(), &[44]), chunk(0, PROMPT.len(), &[42])])
        .unwrap();
    assert!(max_diff(&r[0], &d2) < 1e-3, "{}", max_diff(&r[0], &d2));
    // Slot 0's prompt was chunked (see above).
    let c = cosine(&r[1], &d0);
    assert!(c > 0.995 && argmax(&r[1]) == argmax(&d0), "cosine {c}");
}

/// A slot seeded by `copy_kv` continues exactly as the slot it copied.
#[test]
fn copied_kv_continues_like_the_original() {
    let mut m = device_gguf(3);
    assert!(m.reuses_prefix());
    one(&mut m, 0, 0, PROMPT);
    let n = PROMPT.len() - 1;
    m.copy_kv(0, 2, 0, n).unwrap();
    let a = one(&mut m, 2, n, &PROMPT[n..]);
    let mut fresh = device_gguf(3);
    let b = one(&mut fresh, 1, 0, PROMPT);
    assert!(max_diff(&a, &b) < 1e-3, "{}", max_diff(&a, &b));
    assert!(m.copy_kv(0, 0, 0, 1).is_err());
    assert!(m.copy_kv(0, 1, 0, 10_000).is_err());
}

#[test]
fn bad_chunks_are_errors_not_panics() {
    let mut m = device_gguf(2);
    assert!(m.forward(&[chunk(2, 0, &[1])]).is_err());
    assert!(m.forward(&[chunk(0, 0, &[])]).is_err());
    assert!(m.forward(&[chunk(0, 0, &[1_000_000])]).is_err());
    assert!(m.forward(&[chunk(0, 510, &[1, 2, 3])]).is_err());
    assert!(m.forward(&[chunk(0, 0, &[1]), chunk(0, 1, &[2])]).is_err());
    // Still serves afterwards.
    assert_eq!(one(&mut m, 1, 0, PROMPT).len(), 49152);
}

/// The tiny safetensors model against candle-transformers' llama, an
/// independent implementation of the same architecture.
#[test]
fn safetensors_logits_match_candle_transformers_llama() {
    use candle_core::{DType, Device, Tensor};
    use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
    let dir = tempfile::tempdir().unwrap();
    TinyLlama::default().write(dir.path()).unwrap();
    let mut ours = safetensors::load(
        dir.path(),
        DeviceSpec::Cpu,
        crate::api::Dtype::Auto,
        None,
        2,
    )
    .unwrap()
    .model;

    let raw = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let cfg: LlamaConfig = serde_json::from_str(&raw).unwrap();
    let cfg = cfg.into_config(false);
    let file = dir.path().join("model.safetensors");
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &Device::Cpu)
    }
    .unwrap();
    let theirs = Llama::load(vb, &cfg).unwrap();
    let mut cache = Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();

    let prompt: Vec<u32> = vec![1, 17, 33, 5, 60, 7, 9];
    let a = one(&mut ours, 1, 0, &prompt);
    let x = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let b: Vec<f32> = theirs
        .forward(&x, 0, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(max_diff(&a, &b) < 1e-4, "prompt: {}", max_diff(&a, &b));
    // The same prompt in two chunks in the other slot.
    one(&mut ours, 0, 0, &prompt[..3]);
    let c = one(&mut ours, 0, 3, &prompt[3..]);
    assert!(max_diff(&a, &c) < 1e-4, "chunked: {}", max_diff(&a, &c));
    let mut tok = argmax(&a) as u32;
    for i in 0..8 {
        let pos = prompt.len() + i;
        let a = one(&mut ours, 1, pos, &[tok]);
        let x = Tensor::new(&[tok], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let b: Vec<f32> = theirs
            .forward(&x, pos, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-4, "step {i}: {}", max_diff(&a, &b));
        tok = argmax(&a) as u32;
    }
}
