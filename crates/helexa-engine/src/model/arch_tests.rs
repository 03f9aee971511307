//! Gemma 2, Gemma 3, Phi-3 and Qwen3-MoE on the device-generic decoder
//! (candle's CPU device), each on a tiny random-weight checkpoint, against
//! candle-transformers' implementation of the same architecture loaded from
//! the same files: a prompt whole and chunked, then greedy decode steps of
//! sequences batched in different slots. GGUFs written from the same weights
//! with llama.cpp's names and metadata must give the same logits.

use super::device::DeviceLlama;
use super::tests::{argmax, chunk, cosine, max_diff, one};
use super::{gguf, safetensors, Model};
use crate::api::DeviceSpec;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use helexa_testkit::tiny_arch::{Kind, TinyArch, HEADS, HIDDEN, KV_HEADS};
use std::path::Path;

const TOL: f32 = 1e-4;

/// candle-transformers' model of `dir`: `forward(tokens, offset)` gives
/// the logits after the last token.
type Reference = Box<dyn FnMut(&[u32], usize) -> Vec<f32>>;

fn reference(kind: Kind, dir: &Path) -> Reference {
    use candle_transformers::models::{gemma2, gemma3, phi3, qwen3_moe};
    let raw = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let file = dir.join("model.safetensors");
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &Device::Cpu)
    }
    .unwrap();
    let input = |t: &[u32]| Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let out = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    match kind {
        Kind::Gemma2 => {
            let cfg: gemma2::Config = serde_json::from_str(&raw).unwrap();
            let mut m = gemma2::Model::new(false, &cfg, vb).unwrap();
            Box::new(move |t, o| out(m.forward(&input(t), o).unwrap()))
        }
        Kind::Gemma3 => {
            let cfg: gemma3::Config = serde_json::from_str(&raw).unwrap();
            let mut m = gemma3::Model::new(false, &cfg, vb).unwrap();
            // One token at a time: its global layers' cache cannot take a
            // multi-token append on the CPU (a non-contiguous slice-set),
            // and its multi-token window mask admits one position too many.
            Box::new(move |t, o| {
                let mut last = Vec::new();
                for (i, &x) in t.iter().enumerate() {
                    last = out(m.forward(&input(&[x]), o + i).unwrap());
                }
                last
            })
        }
        Kind::Phi3 => {
            let cfg: phi3::Config = serde_json::from_str(&raw).unwrap();
            let mut m = phi3::Model::new(&cfg, vb).unwrap();
            Box::new(move |t, o| out(m.forward(&input(t), o).unwrap()))
        }
        Kind::Qwen3Moe => {
            let cfg: qwen3_moe::Config = serde_json::from_str(&raw).unwrap();
            let mut m = qwen3_moe::ModelForCausalLM::new(&cfg, vb).unwrap();
            Box::new(move |t, o| out(m.forward(&input(t), o).unwrap()))
        }
    }
}

const PROMPT: &[u32] = &[1, 17, 33, 5, 60, 7, 9, 88, 41];
const OTHER: &[u32] = &[1, 70, 12, 12, 50, 3, 94];

/// Ours against `reference` on PROMPT (slot 1 whole, slot 0 in two chunks)
/// and OTHER (slot 2, prefilled beside the first decode step), then greedy
/// decode steps with the three slots batched, out of order.
fn check(model: &mut DeviceLlama, mut theirs: impl FnMut() -> Reference, what: &str) {
    let mut r1 = theirs();
    let mut r2 = theirs();
    let b = r1(PROMPT, 0);
    let a = one(model, 1, 0, PROMPT);
    assert!(
        max_diff(&a, &b) < TOL,
        "{what} prompt: {}",
        max_diff(&a, &b)
    );
    one(model, 0, 0, &PROMPT[..4]);
    let c = one(model, 0, 4, &PROMPT[4..]);
    assert!(
        max_diff(&c, &b) < TOL,
        "{what} chunked: {}",
        max_diff(&c, &b)
    );
    let (mut t1, mut t2) = (argmax(&a) as u32, 0u32);
    for i in 0..6 {
        let pos = PROMPT.len() + i;
        let other = [t2];
        let second = if i == 0 {
            chunk(2, 0, OTHER)
        } else {
            chunk(2, OTHER.len() + i - 1, &other)
        };
        let mine = [t1];
        let r = model
            .forward(&[chunk(1, pos, &mine), second, chunk(0, pos, &mine)])
            .unwrap();
        let b1 = r1(&mine, pos);
        let b2 = if i == 0 {
            r2(OTHER, 0)
        } else {
            r2(&other, OTHER.len() + i - 1)
        };
        assert!(
            max_diff(&r[0], &b1) < TOL,
            "{what} step {i}: {}",
            max_diff(&r[0], &b1)
        );
        assert!(
            max_diff(&r[2], &b1) < TOL,
            "{what} step {i}, slot 0: {}",
            max_diff(&r[2], &b1)
        );
        assert!(
            max_diff(&r[1], &b2) < TOL,
            "{what} step {i}, other: {}",
            max_diff(&r[1], &b2)
        );
        t1 = argmax(&r[0]) as u32;
        t2 = argmax(&r[1]) as u32;
    }
}

fn safetensors_model(dir: &Path) -> DeviceLlama {
    safetensors::load(dir, DeviceSpec::Cpu, crate::api::Dtype::Auto, None, 3)
        .unwrap()
        .model
}

fn against_candle_transformers(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    TinyArch::new(kind).write(dir.path()).unwrap();
    let mut ours = safetensors_model(dir.path());
    check(
        &mut ours,
        || reference(kind, dir.path()),
        &format!("{kind:?}"),
    );
}

#[test]
fn gemma2_safetensors_matches_candle_transformers() {
    against_candle_transformers(Kind::Gemma2);
}

#[test]
fn gemma3_safetensors_matches_candle_transformers() {
    against_candle_transformers(Kind::Gemma3);
}

#[test]
fn phi3_safetensors_matches_candle_transformers() {
    against_candle_transformers(Kind::Phi3);
}

#[test]
fn qwen3_moe_safetensors_matches_candle_transformers() {
    against_candle_transformers(Kind::Qwen3Moe);
}

/// transformers 5 saves Qwen3-MoE's expert count as `num_local_experts`:
/// the same checkpoint under that name gives the same logits (without it,
/// the layers would be read as dense and fail to load).
#[test]
fn qwen3_moe_expert_count_under_its_transformers_5_name() {
    let dir = tempfile::tempdir().unwrap();
    TinyArch::new(Kind::Qwen3Moe).write(dir.path()).unwrap();
    let a = one(&mut safetensors_model(dir.path()), 0, 0, PROMPT);
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"num_experts\""), "{text}");
    std::fs::write(
        &path,
        text.replace("\"num_experts\"", "\"num_local_experts\""),
    )
    .unwrap();
    let b = one(&mut safetensors_model(dir.path()), 0, 0, PROMPT);
    assert!(max_diff(&a, &b) == 0.0, "{}", max_diff(&a, &b));
}

/// Gemma 3 with a window of 4 and a prompt of 9: candle-transformers, fed
/// one token at a time, keeps exactly the last `window` positions in its
/// rotating cache (as transformers' mask `kv > q - window` does); ours
/// masks the prompt whole, chunked and while decoding.
#[test]
fn gemma3_sliding_window_matches_candle_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyArch {
        window: Some(4),
        ..TinyArch::new(Kind::Gemma3)
    };
    tiny.write(dir.path()).unwrap();
    let mut ours = safetensors_model(dir.path());
    let mut theirs = reference(Kind::Gemma3, dir.path());
    let b = theirs(PROMPT, 0);
    let a = one(&mut ours, 0, 0, PROMPT);
    assert!(max_diff(&a, &b) < TOL, "prompt: {}", max_diff(&a, &b));
    one(&mut ours, 1, 0, &PROMPT[..3]);
    let c = one(&mut ours, 1, 3, &PROMPT[3..]);
    assert!(max_diff(&c, &b) < TOL, "chunked: {}", max_diff(&c, &b));
    let mut tok = argmax(&a) as u32;
    for i in 0..5 {
        let pos = PROMPT.len() + i;
        let r = ours
            .forward(&[chunk(0, pos, &[tok]), chunk(1, pos, &[tok])])
            .unwrap();
        let b = theirs(&[tok], pos);
        assert!(
            max_diff(&r[0], &b) < TOL,
            "step {i}: {}",
            max_diff(&r[0], &b)
        );
        assert!(
            max_diff(&r[1], &b) < TOL,
            "step {i}: {}",
            max_diff(&r[1], &b)
        );
        tok = argmax(&r[0]) as u32;
    }
    // The window matters here: without it the logits differ.
    let wide = tempfile::tempdir().unwrap();
    TinyArch::new(Kind::Gemma3).write(wide.path()).unwrap();
    let full = one(&mut safetensors_model(wide.path()), 0, 0, PROMPT);
    assert!(max_diff(&full, &a) > 1e-2, "{}", max_diff(&full, &a));
}

/// The tiny checkpoint's tensors under llama.cpp's GGUF names (Gemma norms
/// stored as `1 + w`, as its converter does; Qwen3-MoE experts stacked).
fn gguf_tensors(tiny: &TinyArch) -> Vec<(String, Tensor)> {
    let gemma = matches!(tiny.kind, Kind::Gemma2 | Kind::Gemma3);
    let mut by_name = std::collections::HashMap::new();
    for (name, shape, data) in tiny.tensors() {
        by_name.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    }
    let mut out = Vec::new();
    let norm = |t: &Tensor| if gemma { (t + 1.0).unwrap() } else { t.clone() };
    out.push((
        "token_embd.weight".to_string(),
        by_name["model.embed_tokens.weight"].clone(),
    ));
    if let Some(t) = by_name.get("lm_head.weight") {
        out.push(("output.weight".into(), t.clone()));
    }
    out.push((
        "output_norm.weight".into(),
        norm(&by_name["model.norm.weight"]),
    ));
    for l in 0..tiny.layers() {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let g = |s: &str| format!("blk.{l}.{s}");
        let mut names: Vec<(&str, &str, bool)> = vec![
            ("input_layernorm.weight", "attn_norm.weight", true),
            ("self_attn.o_proj.weight", "attn_output.weight", false),
            ("self_attn.q_norm.weight", "attn_q_norm.weight", true),
            ("self_attn.k_norm.weight", "attn_k_norm.weight", true),
            ("self_attn.q_proj.weight", "attn_q.weight", false),
            ("self_attn.k_proj.weight", "attn_k.weight", false),
            ("self_attn.v_proj.weight", "attn_v.weight", false),
            ("self_attn.qkv_proj.weight", "attn_qkv.weight", false),
            ("mlp.gate_proj.weight", "ffn_gate.weight", false),
            ("mlp.up_proj.weight", "ffn_up.weight", false),
            ("mlp.gate_up_proj.weight", "ffn_up.weight", false),
            ("mlp.down_proj.weight", "ffn_down.weight", false),
            ("mlp.gate.weight", "ffn_gate_inp.weight", false),
        ];
        if gemma {
            names.extend([
                (
                    "post_attention_layernorm.weight",
                    "post_attention_norm.weight",
                    true,
                ),
                ("pre_feedforward_layernorm.weight", "ffn_norm.weight", true),
                (
                    "post_feedforward_layernorm.weight",
                    "post_ffw_norm.weight",
                    true,
                ),
            ]);
        } else {
            names.push(("post_attention_layernorm.weight", "ffn_norm.weight", true));
        }
        for (h, gg, is_norm) in names {
            if let Some(t) = by_name.get(&hf(h)) {
                out.push((g(gg), if is_norm { norm(t) } else { t.clone() }));
            }
        }
        if tiny.kind == Kind::Qwen3Moe {
            for (w, gg) in [
                ("gate_proj", "ffn_gate_exps.weight"),
                ("up_proj", "ffn_up_exps.weight"),
                ("down_proj", "ffn_down_exps.weight"),
            ] {
                let experts: Vec<Tensor> = (0..8)
                    .map(|e| by_name[&hf(&format!("mlp.experts.{e}.{w}.weight"))].clone())
                    .collect();
                out.push((g(gg), Tensor::stack(&experts, 0).unwrap()));
            }
        }
    }
    out
}

/// A GGUF of the tiny checkpoint; matrices of type `dtype`, vectors f32.
fn write_gguf(tiny: &TinyArch, path: &Path, dtype: GgmlDType) {
    use gguf_file::Value as V;
    let arch = match tiny.kind {
        Kind::Gemma2 => "gemma2",
        Kind::Gemma3 => "gemma3",
        Kind::Phi3 => "phi3",
        Kind::Qwen3Moe => "qwen3moe",
    };
    let cfg = tiny.config();
    let k = |s: &str| format!("{arch}.{s}");
    let u = |v: usize| V::U32(v as u32);
    let mut md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        ("general.name".into(), V::String(format!("tiny {arch}"))),
        (k("block_count"), u(tiny.layers())),
        (k("context_length"), u(256)),
        (k("embedding_length"), u(HIDDEN)),
        (k("feed_forward_length"), u(tiny.intermediate())),
        (k("attention.head_count"), u(HEADS)),
        (k("attention.head_count_kv"), u(KV_HEADS)),
        (k("attention.key_length"), u(tiny.head_dim())),
        (k("attention.value_length"), u(tiny.head_dim())),
        (k("attention.layer_norm_rms_epsilon"), V::F32(1e-6)),
        (
            k("rope.freq_base"),
            V::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        ),
    ];
    let f = |key: &str| cfg.get(key).and_then(|v| v.as_f64());
    match tiny.kind {
        Kind::Gemma2 | Kind::Gemma3 => {
            if let Some(w) = tiny.window {
                md.push((k("attention.sliding_window"), u(w)));
            }
            for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
                if let Some(v) = f(key) {
                    md.push((k(key), V::F32(v as f32)));
                }
            }
            if tiny.kind == Kind::Gemma3 {
                md.push((k("attention.sliding_window_pattern"), u(3)));
                // candle-transformers' name for the same.
                md.push((k("attention.sliding_window_type"), u(3)));
            }
        }
        Kind::Phi3 if tiny.longrope => {
            md.push((k("rope.dimension_count"), u(tiny.head_dim() / 2)));
            md.push((k("rope.scaling.original_context_length"), u(64)));
        }
        Kind::Phi3 => {
            let rope = if tiny.partial_rotary {
                tiny.head_dim() / 2
            } else {
                tiny.head_dim()
            };
            md.push((k("rope.dimension_count"), u(rope)));
            if let Some(w) = tiny.window {
                md.push((k("attention.sliding_window"), u(w)));
            }
        }
        Kind::Qwen3Moe => {
            md.push((k("expert_count"), u(8)));
            md.push((k("expert_used_count"), u(2)));
            md.push((k("expert_feed_forward_length"), u(32)));
        }
    }
    let mut named = gguf_tensors(tiny);
    if tiny.longrope {
        // llama.cpp's converter writes the factors as tensors.
        let sc = &cfg["rope_scaling"];
        for (key, name) in [
            ("short_factor", "rope_factors_short.weight"),
            ("long_factor", "rope_factors_long.weight"),
        ] {
            let f: Vec<f32> = serde_json::from_value(sc[key].clone()).unwrap();
            let n = f.len();
            named.push((name.into(), Tensor::from_vec(f, n, &Device::Cpu).unwrap()));
        }
    }
    let tensors: Vec<(String, QTensor)> = named
        .into_iter()
        .map(|(n, t)| {
            let dt = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
            (n, QTensor::quantize(&t, dt).unwrap())
        })
        .collect();
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &md_refs, &t_refs).unwrap();
}

fn gguf_model(path: &Path, slots: usize) -> DeviceLlama {
    gguf::load_on_device(path, DeviceSpec::Cpu, None, slots)
        .unwrap()
        .model
}

/// An f32 GGUF of the same weights gives the safetensors path's logits;
/// a q8_0 one the same greedy tokens, nearly the same logits.
fn gguf_matches_safetensors(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyArch::new(kind);
    tiny.write(dir.path()).unwrap();
    let f32_path = dir.path().join("tiny.f32.gguf");
    write_gguf(&tiny, &f32_path, GgmlDType::F32);
    let dense = dir.path().to_path_buf();
    let mut g = gguf_model(&f32_path, 3);
    check(
        &mut g,
        || {
            let mut m = safetensors_model(&dense);
            Box::new(move |t, o| one(&mut m, 0, o, t))
        },
        &format!("{kind:?} f32 GGUF"),
    );
    // The native kernels refuse it, naming why.
    let e = gguf::load(&f32_path, None, 1, 1).err().unwrap();
    assert!(e.contains("device-generic"), "{e}");

    let q_path = dir.path().join("tiny.q8_0.gguf");
    write_gguf(&tiny, &q_path, GgmlDType::Q8_0);
    let mut q = gguf_model(&q_path, 1);
    let mut d = safetensors_model(dir.path());
    let a = one(&mut q, 0, 0, PROMPT);
    let b = one(&mut d, 0, 0, PROMPT);
    let c = cosine(&a, &b);
    // candle's q8_0 kernels quantize the activations too.
    assert!(
        c > 0.995 && argmax(&a) == argmax(&b),
        "{kind:?} q8_0: cosine {c}"
    );
    let mut tok = argmax(&a) as u32;
    for i in 0..4 {
        let pos = PROMPT.len() + i;
        let a = one(&mut q, 0, pos, &[tok]);
        let b = one(&mut d, 0, pos, &[tok]);
        let c = cosine(&a, &b);
        assert!(
            c > 0.995 && argmax(&a) == argmax(&b),
            "{kind:?} q8_0 step {i}: cosine {c}"
        );
        tok = argmax(&a) as u32;
    }
}

#[test]
fn gemma2_gguf_matches_safetensors() {
    gguf_matches_safetensors(Kind::Gemma2);
}

#[test]
fn gemma3_gguf_matches_safetensors() {
    gguf_matches_safetensors(Kind::Gemma3);
}

#[test]
fn phi3_gguf_matches_safetensors() {
    gguf_matches_safetensors(Kind::Phi3);
}

#[test]
fn qwen3_moe_gguf_matches_safetensors() {
    gguf_matches_safetensors(Kind::Qwen3Moe);
}

/// A sliding window in a GGUF (Gemma 2's alternating layers) masks as the
/// safetensors path does.
#[test]
fn gemma2_gguf_sliding_window_matches_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyArch {
        window: Some(3),
        ..TinyArch::new(Kind::Gemma2)
    };
    tiny.write(dir.path()).unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&tiny, &path, GgmlDType::F32);
    let mut g = gguf_model(&path, 3);
    let dense = dir.path().to_path_buf();
    check(
        &mut g,
        || {
            let mut m = safetensors_model(&dense);
            Box::new(move |t, o| one(&mut m, 0, o, t))
        },
        "gemma2 windowed GGUF",
    );
}

#[test]
fn unsupported_architectures_are_refused_naming_the_supported_set() {
    let dir = tempfile::tempdir().unwrap();
    TinyArch::new(Kind::Phi3).write(dir.path()).unwrap();
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("\"phi3\"", "\"falcon\"");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let e = safetensors::load(
        dir.path(),
        DeviceSpec::Cpu,
        crate::api::Dtype::Auto,
        None,
        1,
    )
    .err()
    .unwrap();
    assert!(e.contains("\"falcon\" is not supported"), "{e}");
    for t in safetensors::SUPPORTED_MODEL_TYPES {
        assert!(e.contains(t), "{e}");
    }
    for t in ["gemma2", "gemma3_text", "phi3", "qwen3_moe"] {
        assert!(safetensors::SUPPORTED_MODEL_TYPES.contains(&t));
    }

    let path = dir.path().join("falcon.gguf");
    let md = [(
        "general.architecture",
        &gguf_file::Value::String("falcon".into()),
    )];
    let t = QTensor::quantize(
        &Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &md, &[("token_embd.weight", &t)]).unwrap();
    drop(f);
    for e in [
        gguf::load_on_device(&path, DeviceSpec::Cpu, None, 1)
            .err()
            .unwrap(),
        gguf::load(&path, None, 1, 1).err().unwrap(),
    ] {
        assert!(e.contains("\"falcon\" is not supported"), "{e}");
        for a in gguf::SUPPORTED_ARCHITECTURES {
            assert!(e.contains(a), "{e}");
        }
    }
    for a in ["gemma2", "gemma3", "phi3", "qwen3moe"] {
        assert!(gguf::SUPPORTED_ARCHITECTURES.contains(&a));
    }
}

/// transformers' logits (scripts/gen-arch-fixtures) on the same tiny
/// checkpoints, with windows shorter than the prompt (Gemma 2's alternating
/// layers, Gemma 3's pattern, Phi-3's every layer) and a Gemma
/// `query_pre_attn_scalar` that is not the head size — what
/// candle-transformers does not implement.
fn matches_transformers(kind: &str) {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/fixtures/arch_logits.json")).unwrap();
    let case = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == kind)
        .unwrap();
    let k = match kind {
        "gemma2" => Kind::Gemma2,
        "gemma3" => Kind::Gemma3,
        "phi3" | "phi3_longrope" => Kind::Phi3,
        _ => Kind::Qwen3Moe,
    };
    let longrope = kind == "phi3_longrope";
    let n = |v: &serde_json::Value| v.as_u64().map(|x| x as usize);
    let tiny = TinyArch {
        window: n(&case["window"]),
        query_scalar: n(&case["query_scalar"]),
        longrope,
        ..TinyArch::new(k)
    };
    let dir = tempfile::tempdir().unwrap();
    tiny.write(dir.path()).unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    // The tensor data, not the JSON header (whose key order depends on
    // serde_json's features in the build).
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let fnv = bytes[8 + header..]
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
    assert_eq!(
        format!("{fnv:016x}"),
        case["weights_fnv1a"].as_str().unwrap(),
        "the testkit's {kind} checkpoint changed: rerun scripts/gen-arch-fixtures"
    );
    let logits: Vec<Vec<f32>> = serde_json::from_value(case["logits"].clone()).unwrap();
    let tokens: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
    let prompt: Vec<u32> = serde_json::from_value(fixture["prompt"].clone()).unwrap();
    // Longrope: served within the original context (64), the short factors
    // apply, as in transformers for a sequence that short.
    let context = longrope.then_some(64);
    let mut ours = safetensors::load(
        dir.path(),
        DeviceSpec::Cpu,
        crate::api::Dtype::Auto,
        context,
        1,
    )
    .unwrap()
    .model;
    if longrope {
        // Served beyond it, the long ones (llama.cpp's choice): different.
        let mut long = safetensors_model(dir.path());
        let d = max_diff(&one(&mut long, 0, 0, &prompt), &logits[0]);
        assert!(d > 1e-2, "long factors: {d}");
    }
    let mut a = one(&mut ours, 0, 0, &prompt);
    assert!(
        max_diff(&a, &logits[0]) < TOL,
        "{kind} prompt: {}",
        max_diff(&a, &logits[0])
    );
    for (i, &t) in tokens.iter().enumerate() {
        assert_eq!(argmax(&a) as u32, t, "{kind} step {i}");
        a = one(&mut ours, 0, prompt.len() + i, &[t]);
        let d = max_diff(&a, &logits[i + 1]);
        assert!(d < TOL, "{kind} step {i}: {d}");
    }
}

#[test]
fn gemma2_matches_transformers() {
    matches_transformers("gemma2");
}

#[test]
fn gemma3_matches_transformers() {
    matches_transformers("gemma3");
}

#[test]
fn phi3_matches_transformers() {
    matches_transformers("phi3");
}

#[test]
fn qwen3_moe_matches_transformers() {
    matches_transformers("qwen3_moe");
}

#[test]
fn phi3_longrope_matches_transformers() {
    matches_transformers("phi3_longrope");
}

/// The engine with its default (native) kernels on the CPU loads a GGUF of
/// an architecture they do not implement on the device decoder, and
/// generates what that decoder does.
#[test]
fn engine_runs_a_gemma2_gguf_on_the_device_decoder_by_default() {
    use crate::api::{EngineConfig, FinishReason, GenEvent, GenerationRequest, SamplingParams};
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyArch::new(Kind::Gemma2);
    tiny.write(dir.path()).unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&tiny, &path, GgmlDType::F32);
    let mut cfg = EngineConfig::new(&path);
    cfg.tokenizer_path = Some(dir.path().join("tokenizer.json"));
    let engine = crate::engine::Engine::load(cfg).unwrap();
    assert_eq!(engine.meta().architecture, "gemma2");

    let mut m = gguf_model(&path, 1);
    let mut logits = one(&mut m, 0, 0, PROMPT);
    let mut expected = Vec::new();
    for i in 0..5 {
        let t = argmax(&logits) as u32;
        expected.push(t);
        logits = one(&mut m, 0, PROMPT.len() + i, &[t]);
    }
    let mut s = engine
        .submit(GenerationRequest {
            prompt: PROMPT.to_vec(),
            params: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            max_new_tokens: 5,
            stop: Vec::new(),
            constraint: None,
            logprobs: None,
        })
        .unwrap();
    let mut text = String::new();
    loop {
        match s.blocking_next().expect("a finish") {
            GenEvent::Text { text: t, .. } => text.push_str(&t),
            GenEvent::Finished { reason, .. } => {
                assert_eq!(reason, FinishReason::Length);
                break;
            }
            GenEvent::Failed { message } => panic!("{message}"),
            _ => {}
        }
    }
    assert_eq!(text, engine.decode(&expected).unwrap());
    engine.shutdown();
}

/// A q8_0 Phi-3 GGUF against candle-transformers' quantized Phi-3 reading
/// the same file: an independent reader of llama.cpp's fused `attn_qkv` and
/// `ffn_up` = `[gate; up]`, with the same `QMatMul` kernels (so activations
/// are quantized alike). Full rotary: that implementation has no partial
/// rotary. (Its quantized Gemma 3 runs a SiLU feed-forward and masks the
/// cache out of multi-token chunks, and its quantized Qwen3-MoE runs on
/// CUDA only, so neither is a reference here.)
#[test]
fn phi3_q8_0_gguf_matches_candle_transformers_quantized() {
    use candle_transformers::models::quantized_phi3;
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyArch {
        partial_rotary: false,
        ..TinyArch::new(Kind::Phi3)
    };
    let path = dir.path().join("tiny.q8_0.gguf");
    write_gguf(&tiny, &path, GgmlDType::Q8_0);
    let path2 = path.clone();
    let theirs = move || -> Reference {
        let mut f = std::fs::File::open(&path2).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let mut m =
            quantized_phi3::ModelWeights::from_gguf(false, ct, &mut f, &Device::Cpu).unwrap();
        Box::new(move |t, o| {
            let x = Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            m.forward(&x, o)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
    };
    let mut ours = gguf_model(&path, 3);
    check(&mut ours, theirs, "phi3 q8_0 GGUF");
}

/// A multimodal Gemma 3 checkpoint (`model_type: gemma3`, the text model's
/// config under `text_config`, its tensors under `language_model.model.`
/// as transformers 4 saves them or `model.language_model.` as transformers
/// 5 does) serves its text model: the same logits as `gemma3_text`.
#[test]
fn multimodal_gemma3_checkpoint_serves_its_text_model() {
    let tiny = TinyArch::new(Kind::Gemma3);
    let text = tempfile::tempdir().unwrap();
    tiny.write(text.path()).unwrap();
    let want = one(&mut safetensors_model(text.path()), 0, 0, PROMPT);
    for prefix in ["language_model.model.", "model.language_model."] {
        let dir = tempfile::tempdir().unwrap();
        tiny.write(dir.path()).unwrap();
        let config = serde_json::json!({
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": tiny.config(),
            "vision_config": {"model_type": "siglip_vision_model"},
            "eos_token_id": [2, 1],
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let tensors: Vec<_> = tiny
            .tensors()
            .into_iter()
            .map(|(n, s, d)| (n.replacen("model.", prefix, 1), s, d))
            .collect();
        std::fs::write(
            dir.path().join("model.safetensors"),
            helexa_testkit::tiny_model::safetensors(&tensors),
        )
        .unwrap();
        let loaded = safetensors::load(
            dir.path(),
            DeviceSpec::Cpu,
            crate::api::Dtype::Auto,
            None,
            1,
        )
        .unwrap();
        assert_eq!(loaded.architecture, "gemma3");
        assert_eq!(loaded.eos_token_ids, vec![2, 1]);
        let mut m = loaded.model;
        let got = one(&mut m, 0, 0, PROMPT);
        assert!(
            max_diff(&got, &want) < 1e-6,
            "{prefix}: {}",
            max_diff(&got, &want)
        );
    }
}

/// A longrope Phi-3 GGUF (factors as `rope_factors_{short,long}` tensors,
/// `rope.scaling.original_context_length`; the attention factor from the
/// trained and original contexts) gives the safetensors path's logits, within
/// the original context (short factors) and beyond it (long ones).
#[test]
fn phi3_longrope_gguf_matches_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyArch {
        longrope: true,
        ..TinyArch::new(Kind::Phi3)
    };
    tiny.write(dir.path()).unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&tiny, &path, GgmlDType::F32);
    let mut seen = Vec::new();
    for context in [Some(64), None] {
        let mut g = gguf::load_on_device(&path, DeviceSpec::Cpu, context, 1)
            .unwrap()
            .model;
        let mut d = safetensors::load(
            dir.path(),
            DeviceSpec::Cpu,
            crate::api::Dtype::Auto,
            context,
            1,
        )
        .unwrap()
        .model;
        let a = one(&mut g, 0, 0, PROMPT);
        let b = one(&mut d, 0, 0, PROMPT);
        assert!(max_diff(&a, &b) < TOL, "{context:?}: {}", max_diff(&a, &b));
        seen.push(a);
    }
    assert!(
        max_diff(&seen[0], &seen[1]) > 1e-2,
        "short and long factors agree"
    );
}
