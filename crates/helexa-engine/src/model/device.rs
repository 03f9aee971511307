//! The device-generic decoder: the llama family (llama, Mistral, Qwen2,
//! Qwen3) over candle tensors on any candle device — CUDA on GPU nodes, and
//! candle's CPU device, where the tests run the very code the GPU runs.
//!
//! It implements the same [`Model`] contract as the hand-written CPU path
//! (`llama.rs`), so the one scheduler drives both: one `forward` runs a
//! mixed batch of prompt chunks and single decode tokens of different
//! sequences through each weight matrix once; a slot's KV cache outlives its
//! sequence and can be copied, so the prefix cache works here too.
//!
//! Weights are dense (safetensors, bf16/f16 on CUDA, f32 on the CPU) or
//! GGUF-quantized through candle's `QMatMul` (kernels on CPU and CUDA for the
//! ggml types candle implements; activations f32).
//!
//! KV cache: per layer one K and one V tensor of shape
//! `[slots, kv_heads, cap, head_dim]`, grown (doubling, up to the served
//! context) as positions are used. That layout lets the decode rows of
//! consecutive slots attend as one batched matmul over a view of the cache,
//! with no copy; new K/V rows of a whole batch are written by one scatter.

use super::llama::{LlamaConfig, RopeStyle};
use super::{Chunk, Model};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

type CResult<T> = candle_core::Result<T>;

/// A linear layer: `y = x Wᵀ (+ b)`.
pub enum Lin {
    Dense { w: Tensor, b: Option<Tensor> },
    Quant { w: QMatMul, b: Option<Tensor> },
}

impl Lin {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let (y, b) = match self {
            Lin::Dense { w, b } => (x.matmul(&w.t()?)?, b),
            Lin::Quant { w, b } => (w.forward(x)?, b),
        };
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// The token embedding table.
pub enum Embedding {
    Dense(Tensor),
    Quant(QMatMul),
}

impl Embedding {
    fn forward(&self, ids: &Tensor) -> CResult<Tensor> {
        match self {
            Embedding::Dense(t) => t.index_select(ids, 0),
            Embedding::Quant(q) => q.embedding(ids),
        }
    }
}

pub struct DeviceLayer {
    pub attn_norm: Tensor,
    pub q: Lin,
    pub k: Lin,
    pub v: Lin,
    pub o: Lin,
    /// Qwen3: RMS norm of each q/k head before RoPE.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub ffn_norm: Tensor,
    pub gate: Lin,
    pub up: Lin,
    pub down: Lin,
}

pub struct DeviceWeights {
    pub embed: Embedding,
    pub layers: Vec<DeviceLayer>,
    pub norm: Tensor,
    pub lm_head: Lin,
}

/// K and V of every slot for one layer: `[slots, kv_heads, cap, head_dim]`.
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

pub struct DeviceLlama {
    cfg: LlamaConfig,
    device: Device,
    /// Activations and KV cache.
    dtype: DType,
    w: DeviceWeights,
    /// `[context, rope_dim / 2]`, in `dtype`.
    cos: Tensor,
    sin: Tensor,
    /// The same times 1/sqrt(head_dim), for queries: RoPE is linear, so
    /// this applies attention's scale for free (when RoPE covers the head).
    cos_q: Tensor,
    sin_q: Tensor,
    slots: usize,
    /// Positions each slot's cache holds now (all layers, all slots).
    cap: usize,
    cache: Vec<LayerCache>,
}

/// Rotation frequencies of RoPE: `theta^(-2i/d)`, each divided by its
/// `rope_freqs` factor (llama 3 GGUFs) when given.
pub fn inv_freq(cfg: &LlamaConfig, factors: Option<&[f32]>) -> Vec<f64> {
    (0..cfg.rope_dim / 2)
        .map(|i| {
            let f = (cfg.rope_theta as f64).powf(-(2.0 * i as f64) / cfg.rope_dim as f64);
            f / factors.and_then(|v| v.get(i)).copied().unwrap_or(1.0) as f64
        })
        .collect()
}

impl DeviceLlama {
    pub fn new(
        cfg: LlamaConfig,
        w: DeviceWeights,
        inv_freq: &[f64],
        slots: usize,
        device: Device,
        dtype: DType,
    ) -> Result<DeviceLlama, String> {
        if inv_freq.len() != cfg.rope_dim / 2 {
            return Err("rope frequency table does not match the rope dimension".into());
        }
        let half = cfg.rope_dim / 2;
        let mut cos = vec![0f32; cfg.context * half];
        let mut sin = vec![0f32; cfg.context * half];
        for p in 0..cfg.context {
            for (i, f) in inv_freq.iter().enumerate() {
                let a = p as f64 * f;
                cos[p * half + i] = a.cos() as f32;
                sin[p * half + i] = a.sin() as f32;
            }
        }
        let scale = if cfg.rope_dim == cfg.head_dim {
            1.0 / (cfg.head_dim as f32).sqrt()
        } else {
            1.0
        };
        let table = |v: &[f32], k: f32| -> CResult<Tensor> {
            let v: Vec<f32> = v.iter().map(|x| x * k).collect();
            Tensor::from_vec(v, (cfg.context, half), &device)?.to_dtype(dtype)
        };
        let tables = (|| -> CResult<_> {
            Ok((
                table(&cos, 1.0)?,
                table(&sin, 1.0)?,
                table(&cos, scale)?,
                table(&sin, scale)?,
            ))
        })();
        let (cos, sin, cos_q, sin_q) = tables.map_err(|e| e.to_string())?;
        Ok(DeviceLlama {
            cfg,
            device,
            dtype,
            w,
            cos,
            sin,
            cos_q,
            sin_q,
            slots: slots.max(1),
            cap: 0,
            cache: Vec::new(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Grows every layer's cache to hold at least `needed` positions.
    fn reserve(&mut self, needed: usize) -> CResult<()> {
        if needed <= self.cap {
            return Ok(());
        }
        let cap = needed.next_power_of_two().max(256).min(self.cfg.context);
        let shape = (self.slots, self.cfg.n_kv_head, cap, self.cfg.head_dim);
        let mut grown = Vec::with_capacity(self.cfg.n_layer);
        for l in 0..self.cfg.n_layer {
            let k = Tensor::zeros(shape, self.dtype, &self.device)?;
            let v = Tensor::zeros(shape, self.dtype, &self.device)?;
            if let Some(old) = self.cache.get(l) {
                k.slice_set(&old.k, 2, 0)?;
                v.slice_set(&old.v, 2, 0)?;
            }
            grown.push(LayerCache { k, v });
        }
        // The old tensors are freed here, one layer's worth at a time above.
        self.cache = grown;
        self.cap = cap;
        Ok(())
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
        let (m, h, _) = x.dims3()?;
        let (hd, rd) = (self.cfg.head_dim, self.cfg.rope_dim);
        let x = x.reshape((m, h, 1, hd))?;
        let rot = |x: &Tensor| match self.cfg.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin),
            RopeStyle::Neox => candle_nn::rotary_emb::rope(x, cos, sin),
        };
        let y = if rd == hd {
            rot(&x)?
        } else {
            let head = rot(&x.narrow(3, 0, rd)?.contiguous()?)?;
            Tensor::cat(&[&head, &x.narrow(3, rd, hd - rd)?], 3)?
        };
        y.reshape((m, h, hd))
    }

    fn run(&mut self, chunks: &[Chunk]) -> CResult<Vec<Vec<f32>>> {
        let c = self.cfg.clone();
        let (nh, nkv, hd) = (c.n_head, c.n_kv_head, c.head_dim);
        let group = nh / nkv;
        // Rows: every single-token chunk first (they attend as one batch),
        // then the longer chunks, each its own attention.
        let singles: Vec<usize> = (0..chunks.len())
            .filter(|&i| chunks[i].tokens.len() == 1)
            .collect();
        let longs: Vec<usize> = (0..chunks.len())
            .filter(|&i| chunks[i].tokens.len() > 1)
            .collect();
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut last_row = vec![0u32; chunks.len()];
        for &i in singles.iter().chain(&longs) {
            let ch = &chunks[i];
            for (j, &t) in ch.tokens.iter().enumerate() {
                ids.push(t);
                pos.push((ch.pos + j) as u32);
            }
            last_row[i] = (ids.len() - 1) as u32;
        }
        let m = ids.len();
        let needed = chunks
            .iter()
            .map(|ch| ch.pos + ch.tokens.len())
            .max()
            .unwrap_or(0);
        self.reserve(needed)?;
        let cap = self.cap;
        let dev = &self.device;

        // Where each row's K/V goes in a layer's cache seen as
        // `[slots * kv_heads * cap, head_dim]`.
        let mut dst = Vec::with_capacity(m * nkv);
        for &i in singles.iter().chain(&longs) {
            let ch = &chunks[i];
            for j in 0..ch.tokens.len() {
                for h in 0..nkv {
                    dst.push(((ch.slot * nkv + h) * cap + ch.pos + j) as u32);
                }
            }
        }
        let dst = Tensor::from_vec(dst, (m * nkv, 1), dev)?
            .broadcast_as((m * nkv, hd))?
            .contiguous()?;
        let ids_t = Tensor::from_vec(ids, m, dev)?;
        let pos_t = Tensor::from_vec(pos, m, dev)?;
        let half = c.rope_dim / 2;
        let rows_of = |t: &Tensor| t.index_select(&pos_t, 0)?.reshape((m, 1, half));
        let (cos, sin) = (rows_of(&self.cos)?, rows_of(&self.sin)?);
        let (cos_q, sin_q) = (rows_of(&self.cos_q)?, rows_of(&self.sin_q)?);

        // The batched decode rows: their slots (a view of the cache when
        // consecutive), lengths and padding mask.
        let b = singles.len();
        let single_slots: Vec<usize> = singles.iter().map(|&i| chunks[i].slot).collect();
        let maxlen = singles
            .iter()
            .map(|&i| chunks[i].pos + 1)
            .max()
            .unwrap_or(0);
        let consecutive = single_slots.windows(2).all(|w| w[1] == w[0] + 1);
        let slot_ids = if b > 0 && !consecutive {
            let v: Vec<u32> = single_slots.iter().map(|&s| s as u32).collect();
            Some(Tensor::from_vec(v, b, dev)?)
        } else {
            None
        };
        let uniform = singles.iter().all(|&i| chunks[i].pos + 1 == maxlen);
        let single_mask = if b > 0 && !uniform {
            let mut v = vec![0f32; b * maxlen];
            for (r, &i) in singles.iter().enumerate() {
                for x in &mut v[r * maxlen + chunks[i].pos + 1..(r + 1) * maxlen] {
                    *x = f32::NEG_INFINITY;
                }
            }
            Some(Tensor::from_vec(v, (b, 1, 1, maxlen), dev)?.to_dtype(self.dtype)?)
        } else {
            None
        };
        // Causal masks of the longer chunks: `[len, pos + len]`.
        let long_masks = longs
            .iter()
            .map(|&i| {
                let ch = &chunks[i];
                let (l, total) = (ch.tokens.len(), ch.pos + ch.tokens.len());
                let mut v = vec![0f32; l * total];
                for r in 0..l {
                    for x in &mut v[r * total + ch.pos + r + 1..(r + 1) * total] {
                        *x = f32::NEG_INFINITY;
                    }
                }
                Tensor::from_vec(v, (l, total), dev)?.to_dtype(self.dtype)
            })
            .collect::<CResult<Vec<_>>>()?;
        // Folded into `cos_q`/`sin_q` unless RoPE is partial.
        let scale = if c.rope_dim == hd {
            None
        } else {
            Some(1.0 / (hd as f64).sqrt())
        };

        let mut x = self.w.embed.forward(&ids_t)?.to_dtype(self.dtype)?;
        for (li, layer) in self.w.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut q = layer.q.forward(&h)?.reshape((m, nh, hd))?;
            let mut k = layer.k.forward(&h)?.reshape((m, nkv, hd))?;
            let v = layer.v.forward(&h)?.reshape((m, nkv, hd))?;
            if let Some(n) = &layer.q_norm {
                q = candle_nn::ops::rms_norm(&q, n, c.rms_eps)?;
            }
            if let Some(n) = &layer.k_norm {
                k = candle_nn::ops::rms_norm(&k, n, c.rms_eps)?;
            }
            let q = self.rope(&q, &cos_q, &sin_q)?;
            let q = match scale {
                Some(s) => (q * s)?,
                None => q,
            };
            let k = self.rope(&k, &cos, &sin)?;
            let lc = &self.cache[li];
            let flat = (self.slots * nkv * cap, hd);
            lc.k.reshape(flat)?
                .scatter_set(&dst, &k.reshape((m * nkv, hd))?, 0)?;
            lc.v.reshape(flat)?
                .scatter_set(&dst, &v.reshape((m * nkv, hd))?.contiguous()?, 0)?;

            let mut parts = Vec::with_capacity(1 + longs.len());
            if b > 0 {
                let (kb, vb) = match &slot_ids {
                    None => {
                        let s0 = single_slots[0];
                        (
                            lc.k.narrow(0, s0, b)?.narrow(2, 0, maxlen)?,
                            lc.v.narrow(0, s0, b)?.narrow(2, 0, maxlen)?,
                        )
                    }
                    Some(ids) => (
                        lc.k.index_select(ids, 0)?.narrow(2, 0, maxlen)?,
                        lc.v.index_select(ids, 0)?.narrow(2, 0, maxlen)?,
                    ),
                };
                let qd = q.narrow(0, 0, b)?.reshape((b, nkv, group, hd))?;
                // Scores in the activation dtype: candle's softmax
                // accumulates in f32 for bf16/f16.
                let mut att = qd.matmul(&kb.t()?)?;
                if let Some(mask) = &single_mask {
                    att = att.broadcast_add(mask)?;
                }
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let out = att.matmul(&vb)?; // [b, nkv, group, hd]
                parts.push(out.reshape((b, nh * hd))?);
            }
            let mut row = b;
            for (n, &i) in longs.iter().enumerate() {
                let ch = &chunks[i];
                let (l, total) = (ch.tokens.len(), ch.pos + ch.tokens.len());
                let qc = q
                    .narrow(0, row, l)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((nkv, group * l, hd))?;
                row += l;
                let kc =
                    lc.k.narrow(0, ch.slot, 1)?
                        .squeeze(0)?
                        .narrow(1, 0, total)?;
                let vc =
                    lc.v.narrow(0, ch.slot, 1)?
                        .squeeze(0)?
                        .narrow(1, 0, total)?;
                let att = qc
                    .matmul(&kc.t()?)?
                    .reshape((nkv, group, l, total))?
                    .broadcast_add(&long_masks[n])?;
                let att =
                    candle_nn::ops::softmax_last_dim(&att)?.reshape((nkv, group * l, total))?;
                let out = att
                    .matmul(&vc)?
                    .reshape((nh, l, hd))?
                    .transpose(0, 1)?
                    .reshape((l, nh * hd))?;
                parts.push(out);
            }
            let attn = if parts.len() == 1 {
                parts.pop().expect("one part")
            } else {
                Tensor::cat(&parts, 0)?
            };
            x = (x + layer.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let g = layer.gate.forward(&h)?.silu()?;
            let u = layer.up.forward(&h)?;
            x = (x + layer.down.forward(&(g * u)?)?)?;
        }
        let last = Tensor::from_vec(last_row, chunks.len(), dev)?;
        let x = x.index_select(&last, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.w.norm, c.rms_eps)?;
        let logits = self.w.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        logits.to_vec2::<f32>()
    }
}

impl Model for DeviceLlama {
    fn context_length(&self) -> usize {
        self.cfg.context
    }

    fn slots(&self) -> usize {
        self.slots
    }

    fn forward(&mut self, chunks: &[Chunk]) -> Result<Vec<Vec<f32>>, String> {
        let mut seen = vec![false; self.slots];
        for ch in chunks {
            if ch.tokens.is_empty() {
                return Err("empty chunk".into());
            }
            if ch.slot >= self.slots {
                return Err(format!("slot {} out of range", ch.slot));
            }
            if std::mem::replace(&mut seen[ch.slot], true) {
                return Err(format!("two chunks for slot {}", ch.slot));
            }
            if ch.pos + ch.tokens.len() > self.cfg.context {
                return Err(format!(
                    "positions {}..{} exceed the context of {}",
                    ch.pos,
                    ch.pos + ch.tokens.len(),
                    self.cfg.context
                ));
            }
            if let Some(&t) = ch
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(format!(
                    "token id {t} out of the vocabulary ({})",
                    self.cfg.vocab_size
                ));
            }
        }
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        self.run(chunks).map_err(|e| e.to_string())
    }

    /// A slot's cache is left as it is: the scheduler may reuse its prefix.
    fn release(&mut self, _slot: usize) {}

    fn reuses_prefix(&self) -> bool {
        true
    }

    fn kv_bytes_per_position(&self) -> usize {
        2 * self.cfg.n_layer * self.cfg.n_kv_head * self.cfg.head_dim * self.dtype.size_in_bytes()
    }

    /// The cache of every slot is one tensor per layer, so one slot's part
    /// cannot be freed alone: it is simply overwritten by its next sequence.
    fn drop_cache(&mut self, _slot: usize) {}

    fn copy_kv(&mut self, from: usize, to: usize, start: usize, end: usize) -> Result<(), String> {
        if from >= self.slots || to >= self.slots || from == to {
            return Err(format!("cannot copy the cache of slot {from} to slot {to}"));
        }
        if start >= end {
            return Ok(());
        }
        if end > self.cap {
            return Err(format!(
                "positions {start}..{end} of slot {from} were never written"
            ));
        }
        let copy = |t: &Tensor| -> CResult<()> {
            let src = t
                .narrow(0, from, 1)?
                .narrow(2, start, end - start)?
                .contiguous()?;
            // `[1, kv_heads, cap, hd]` view of slot `to`: contiguous.
            t.narrow(0, to, 1)?.slice_set(&src, 2, start)
        };
        for lc in &self.cache {
            copy(&lc.k).map_err(|e| e.to_string())?;
            copy(&lc.v).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Reads a GGUF's tensors onto `device` for [`DeviceLlama`] (quantized
/// matrices stay quantized; norms become `dtype`).
pub fn gguf_weights(
    ct: &candle_core::quantized::gguf_file::Content,
    file: &mut std::fs::File,
    cfg: &LlamaConfig,
    device: &Device,
    dtype: DType,
) -> Result<(DeviceWeights, Option<Vec<f32>>), String> {
    let mut q = |name: &str| -> Result<Arc<QTensor>, String> {
        ct.tensor(file, name, device)
            .map(Arc::new)
            .map_err(|e| format!("tensor {name}: {e}"))
    };
    let has = |name: &str| ct.tensor_infos.contains_key(name);
    let lin = |t: Arc<QTensor>, b: Option<Tensor>| -> Result<Lin, String> {
        Ok(Lin::Quant {
            w: QMatMul::from_arc(t).map_err(|e| e.to_string())?,
            b,
        })
    };
    let vec_of = |t: Arc<QTensor>| -> Result<Tensor, String> {
        t.dequantize(device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| e.to_string())
    };
    let tok = q("token_embd.weight")?;
    let lm_head = if has("output.weight") {
        lin(q("output.weight")?, None)?
    } else {
        lin(tok.clone(), None)?
    };
    let embed = Embedding::Quant(QMatMul::from_arc(tok).map_err(|e| e.to_string())?);
    let mut layers = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("blk.{i}.{s}");
        let mut opt = |s: &str| -> Result<Option<Tensor>, String> {
            if has(&p(s)) {
                vec_of(q(&p(s))?).map(Some)
            } else {
                Ok(None)
            }
        };
        let (bq, bk, bv) = (
            opt("attn_q.bias")?,
            opt("attn_k.bias")?,
            opt("attn_v.bias")?,
        );
        let (q_norm, k_norm) = (opt("attn_q_norm.weight")?, opt("attn_k_norm.weight")?);
        layers.push(DeviceLayer {
            attn_norm: vec_of(q(&p("attn_norm.weight"))?)?,
            q: lin(q(&p("attn_q.weight"))?, bq)?,
            k: lin(q(&p("attn_k.weight"))?, bk)?,
            v: lin(q(&p("attn_v.weight"))?, bv)?,
            o: lin(q(&p("attn_output.weight"))?, None)?,
            q_norm,
            k_norm,
            ffn_norm: vec_of(q(&p("ffn_norm.weight"))?)?,
            gate: lin(q(&p("ffn_gate.weight"))?, None)?,
            up: lin(q(&p("ffn_up.weight"))?, None)?,
            down: lin(q(&p("ffn_down.weight"))?, None)?,
        });
    }
    let norm = vec_of(q("output_norm.weight")?)?;
    let rope_freqs = if has("rope_freqs.weight") {
        let t = q("rope_freqs.weight")?
            .dequantize(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| e.to_string())?;
        Some(t)
    } else {
        None
    };
    Ok((
        DeviceWeights {
            embed,
            layers,
            norm,
            lm_head,
        },
        rope_freqs,
    ))
}
