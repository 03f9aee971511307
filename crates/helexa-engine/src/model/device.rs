//! The device-generic decoder: the llama family (llama, Mistral, Qwen2,
//! Qwen3) and its relatives (Gemma 2/3, Phi-3/4, Qwen3-MoE, described by an
//! [`Arch`]) over candle tensors on any candle device — CUDA on GPU nodes,
//! and candle's CPU device, where the tests run the very code the GPU runs.
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

/// The activation of the gated feed-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Silu,
    /// GELU, tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Act {
    fn apply(self, x: &Tensor) -> CResult<Tensor> {
        match self {
            Act::Silu => x.silu(),
            Act::GeluTanh => x.gelu(),
        }
    }
}

/// What an architecture changes in the llama decoder. `Arch::default()`
/// is the llama family itself.
#[derive(Debug, Clone)]
pub struct Arch {
    pub act: Act,
    /// Embeddings are multiplied by this (Gemma: `sqrt(hidden)`).
    pub embed_scale: Option<f64>,
    /// The attention logit scale; `1 / sqrt(head_dim)` when `None` (Gemma:
    /// `1 / sqrt(query_pre_attn_scalar)`).
    pub attn_scale: Option<f64>,
    /// Attention logits become `cap * tanh(logits / cap)` (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// The same for the output logits (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Sliding-window layers attend to the last `window` positions only,
    /// their own included.
    pub window: Option<usize>,
    /// Per layer: whether it is a sliding-window layer (empty: none is).
    pub sliding: Vec<bool>,
    /// RoPE frequencies of the sliding-window layers when they differ from
    /// the others' (Gemma 3: a local base).
    pub local_inv_freq: Option<Vec<f64>>,
    /// cos and sin are multiplied by this (Phi-3 longrope's attention factor).
    pub rope_mscale: f64,
    /// Mixture-of-experts layers: experts used per token, and whether their
    /// router weights are renormalised to sum to 1 (`norm_topk_prob`).
    pub moe_top_k: usize,
    pub moe_norm_topk: bool,
}

impl Default for Arch {
    fn default() -> Self {
        Arch {
            act: Act::Silu,
            embed_scale: None,
            attn_scale: None,
            attn_softcap: None,
            final_softcap: None,
            window: None,
            sliding: Vec::new(),
            local_inv_freq: None,
            rope_mscale: 1.0,
            moe_top_k: 0,
            moe_norm_topk: true,
        }
    }
}

/// The attention input projections.
pub enum Qkv {
    Split {
        q: Lin,
        k: Lin,
        v: Lin,
    },
    /// One matrix `[q; k; v]` (Phi-3), its output split by columns.
    Fused(Lin),
}

/// One expert of a mixture-of-experts layer.
pub struct Expert {
    pub gate: Lin,
    pub up: Lin,
    pub down: Lin,
}

/// The feed-forward of a layer.
pub enum Ffn {
    Gated {
        gate: Lin,
        up: Lin,
        down: Lin,
    },
    /// `[gate; up]` in one matrix (Phi-3), of `2 * ff` rows.
    FusedGateUp {
        gate_up: Lin,
        down: Lin,
        ff: usize,
    },
    /// Routed experts (Qwen3-MoE): a softmax router picks the top k per row.
    Moe {
        router: Lin,
        experts: Vec<Expert>,
    },
}

pub struct DeviceLayer {
    pub attn_norm: Tensor,
    pub qkv: Qkv,
    pub o: Lin,
    /// Qwen3, Gemma 3: RMS norm of each q/k head before RoPE.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// Gemma 2/3: a norm of the attention output before the residual add.
    pub post_attn_norm: Option<Tensor>,
    pub ffn_norm: Tensor,
    pub ffn: Ffn,
    /// Gemma 2/3: a norm of the feed-forward output before the residual add.
    pub post_ffn_norm: Option<Tensor>,
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
    arch: Arch,
    device: Device,
    /// Activations and KV cache.
    dtype: DType,
    w: DeviceWeights,
    /// `[context, rope_dim / 2]`, in `dtype`.
    cos: Tensor,
    sin: Tensor,
    /// The sliding-window layers' tables when their frequencies differ.
    local: Option<(Tensor, Tensor)>,
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
    /// A decoder of architecture `arch` (see [`Arch`]).
    pub fn with_arch(
        cfg: LlamaConfig,
        arch: Arch,
        w: DeviceWeights,
        inv_freq: &[f64],
        slots: usize,
        device: Device,
        dtype: DType,
    ) -> Result<DeviceLlama, String> {
        let half = cfg.rope_dim / 2;
        if inv_freq.len() != half
            || arch
                .local_inv_freq
                .as_ref()
                .is_some_and(|f| f.len() != half)
        {
            return Err("rope frequency table does not match the rope dimension".into());
        }
        if w.layers.len() != cfg.n_layer
            || !(arch.sliding.is_empty() || arch.sliding.len() == cfg.n_layer)
        {
            return Err("layer count does not match the configuration".into());
        }
        if arch.sliding.iter().any(|&s| s) && arch.window.is_none_or(|w| w == 0) {
            return Err("sliding-window layers without a window".into());
        }
        let has_moe = w.layers.iter().any(|l| matches!(l.ffn, Ffn::Moe { .. }));
        if has_moe && arch.moe_top_k == 0 {
            return Err("mixture-of-experts layers need experts per token".into());
        }
        let tables = |inv_freq: &[f64]| -> CResult<(Tensor, Tensor)> {
            let mut cos = vec![0f32; cfg.context * half];
            let mut sin = vec![0f32; cfg.context * half];
            for p in 0..cfg.context {
                for (i, f) in inv_freq.iter().enumerate() {
                    let a = p as f64 * f;
                    cos[p * half + i] = (a.cos() * arch.rope_mscale) as f32;
                    sin[p * half + i] = (a.sin() * arch.rope_mscale) as f32;
                }
            }
            let table = |v: Vec<f32>| -> CResult<Tensor> {
                Tensor::from_vec(v, (cfg.context, half), &device)?.to_dtype(dtype)
            };
            Ok((table(cos)?, table(sin)?))
        };
        let (cos, sin) = tables(inv_freq).map_err(|e| e.to_string())?;
        let local = match &arch.local_inv_freq {
            Some(f) => Some(tables(f).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(DeviceLlama {
            cfg,
            arch,
            device,
            dtype,
            w,
            cos,
            sin,
            local,
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
        let pick =
            |t: &Tensor| -> CResult<Tensor> { t.index_select(&pos_t, 0)?.reshape((m, 1, half)) };
        let rope_global = (pick(&self.cos)?, pick(&self.sin)?);
        let rope_local = match &self.local {
            Some((cos, sin)) => Some((pick(cos)?, pick(sin)?)),
            None => None,
        };

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
        // Key `j` is hidden from the query at position `p` when it lies
        // after it, or (a sliding-window layer) `window` or more before it.
        let hidden =
            |p: usize, j: usize, window: Option<usize>| j > p || window.is_some_and(|w| j + w <= p);
        let single_mask = |window: Option<usize>| -> CResult<Option<Tensor>> {
            if b == 0 {
                return Ok(None);
            }
            let mut v = vec![0f32; b * maxlen];
            for (r, &i) in singles.iter().enumerate() {
                let p = chunks[i].pos;
                for (j, x) in v[r * maxlen..(r + 1) * maxlen].iter_mut().enumerate() {
                    if hidden(p, j, window) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            // Rows of one length with nothing outside a window: no mask.
            if v.iter().all(|x| *x == 0.0) {
                return Ok(None);
            }
            Ok(Some(
                Tensor::from_vec(v, (b, 1, 1, maxlen), dev)?.to_dtype(self.dtype)?,
            ))
        };
        // Masks of the longer chunks: `[len, pos + len]`.
        let long_masks = |window: Option<usize>| -> CResult<Vec<Tensor>> {
            longs
                .iter()
                .map(|&i| {
                    let ch = &chunks[i];
                    let (l, total) = (ch.tokens.len(), ch.pos + ch.tokens.len());
                    let mut v = vec![0f32; l * total];
                    for r in 0..l {
                        for (j, x) in v[r * total..(r + 1) * total].iter_mut().enumerate() {
                            if hidden(ch.pos + r, j, window) {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                    }
                    Tensor::from_vec(v, (l, total), dev)?.to_dtype(self.dtype)
                })
                .collect()
        };
        let arch = &self.arch;
        let global_masks = (single_mask(None)?, long_masks(None)?);
        let window_masks = if arch.sliding.iter().any(|&s| s) {
            Some((single_mask(arch.window)?, long_masks(arch.window)?))
        } else {
            None
        };
        let scale = arch.attn_scale.unwrap_or(1.0 / (hd as f64).sqrt());
        // Scores stay in the activation dtype (candle's softmax accumulates
        // in f32 for bf16/f16); soft-capping's tanh runs in f32.
        let dtype = self.dtype;
        let softcap = |att: Tensor| -> CResult<Tensor> {
            match arch.attn_softcap {
                Some(cap) => ((att.to_dtype(DType::F32)? / cap)?.tanh()? * cap)?.to_dtype(dtype),
                None => Ok(att),
            }
        };

        let mut x = self.w.embed.forward(&ids_t)?.to_dtype(self.dtype)?;
        if let Some(s) = arch.embed_scale {
            x = (x * s)?;
        }
        for (li, layer) in self.w.layers.iter().enumerate() {
            let sliding = arch.sliding.get(li).copied().unwrap_or(false);
            let (single_mask, long_masks) = match (&window_masks, sliding) {
                (Some(w), true) => w,
                _ => &global_masks,
            };
            let (cos, sin) = match (&rope_local, sliding) {
                (Some(t), true) => t,
                _ => &rope_global,
            };
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let (q, k, v) = match &layer.qkv {
                Qkv::Split { q, k, v } => (q.forward(&h)?, k.forward(&h)?, v.forward(&h)?),
                Qkv::Fused(qkv) => {
                    let y = qkv.forward(&h)?;
                    (
                        y.narrow(1, 0, nh * hd)?,
                        y.narrow(1, nh * hd, nkv * hd)?,
                        y.narrow(1, (nh + nkv) * hd, nkv * hd)?,
                    )
                }
            };
            let mut q = q.reshape((m, nh, hd))?;
            let mut k = k.reshape((m, nkv, hd))?;
            let v = v.reshape((m, nkv, hd))?;
            if let Some(n) = &layer.q_norm {
                q = candle_nn::ops::rms_norm(&q.contiguous()?, n, c.rms_eps)?;
            }
            if let Some(n) = &layer.k_norm {
                k = candle_nn::ops::rms_norm(&k.contiguous()?, n, c.rms_eps)?;
            }
            let q = (self.rope(&q.contiguous()?, cos, sin)? * scale)?;
            let k = self.rope(&k.contiguous()?, cos, sin)?;
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
                let mut att = softcap(qd.matmul(&kb.t()?)?)?;
                if let Some(mask) = single_mask {
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
                let att = softcap(qc.matmul(&kc.t()?)?)?
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
            let mut a = layer.o.forward(&attn)?;
            if let Some(n) = &layer.post_attn_norm {
                a = candle_nn::ops::rms_norm(&a, n, c.rms_eps)?;
            }
            x = (x + a)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let mut f = match &layer.ffn {
                Ffn::Gated { gate, up, down } => {
                    down.forward(&(arch.act.apply(&gate.forward(&h)?)? * up.forward(&h)?)?)?
                }
                Ffn::FusedGateUp { gate_up, down, ff } => {
                    let y = gate_up.forward(&h)?;
                    let g = arch.act.apply(&y.narrow(1, 0, *ff)?)?;
                    down.forward(&(g * y.narrow(1, *ff, *ff)?)?)?
                }
                Ffn::Moe { router, experts } => self.moe(&h, router, experts)?,
            };
            if let Some(n) = &layer.post_ffn_norm {
                f = candle_nn::ops::rms_norm(&f, n, c.rms_eps)?;
            }
            x = (x + f)?;
        }
        let last = Tensor::from_vec(last_row, chunks.len(), dev)?;
        let x = x.index_select(&last, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.w.norm, c.rms_eps)?;
        let mut logits = self.w.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        if let Some(cap) = arch.final_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        logits.to_vec2::<f32>()
    }

    /// Routed experts: each row goes through the `top_k` experts its router
    /// scores highest (softmax over all experts, in f32), their outputs
    /// weighted by those scores (renormalised over the chosen ones when
    /// `moe_norm_topk`).
    fn moe(&self, h: &Tensor, router: &Lin, experts: &[Expert]) -> CResult<Tensor> {
        let (k, norm) = (self.arch.moe_top_k, self.arch.moe_norm_topk);
        let probs = candle_nn::ops::softmax_last_dim(&router.forward(h)?.to_dtype(DType::F32)?)?
            .to_vec2::<f32>()?;
        let mut rows = vec![Vec::<u32>::new(); experts.len()];
        let mut weights = vec![Vec::<f32>::new(); experts.len()];
        for (r, p) in probs.iter().enumerate() {
            let mut order: Vec<usize> = (0..p.len()).collect();
            // Highest first; ties to the lower index, as torch.topk does.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let top = &order[..k.min(order.len())];
            let sum: f32 = top.iter().map(|&e| p[e]).sum();
            for &e in top {
                rows[e].push(r as u32);
                weights[e].push(if norm { p[e] / sum } else { p[e] });
            }
        }
        let mut out = h.zeros_like()?;
        for (e, ex) in experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let n = rows[e].len();
            let idx = Tensor::from_vec(std::mem::take(&mut rows[e]), n, &self.device)?;
            let w = Tensor::from_vec(std::mem::take(&mut weights[e]), (n, 1), &self.device)?
                .to_dtype(self.dtype)?;
            let xs = h.index_select(&idx, 0)?;
            let y = ex
                .down
                .forward(&(self.arch.act.apply(&ex.gate.forward(&xs)?)? * ex.up.forward(&xs)?)?)?;
            out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(out)
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
/// matrices stay quantized; norms become `dtype`), with llama.cpp's tensor
/// names: fused `attn_qkv` and `ffn_up` = `[gate; up]` (Phi-3),
/// `post_attention_norm` / `post_ffw_norm` (Gemma 2/3), `ffn_gate_inp` and
/// `ffn_{gate,up,down}_exps` (mixture of experts).
pub fn gguf_weights(
    ct: &candle_core::quantized::gguf_file::Content,
    file: &mut std::fs::File,
    cfg: &LlamaConfig,
    device: &Device,
    dtype: DType,
) -> Result<(DeviceWeights, Option<Vec<f32>>), String> {
    let mut q = |name: &str, dev: &Device| -> Result<Arc<QTensor>, String> {
        ct.tensor(file, name, dev)
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
    let tok = q("token_embd.weight", device)?;
    let lm_head = if has("output.weight") {
        lin(q("output.weight", device)?, None)?
    } else {
        lin(tok.clone(), None)?
    };
    let embed = Embedding::Quant(QMatMul::from_arc(tok).map_err(|e| e.to_string())?);
    let mut layers = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("blk.{i}.{s}");
        let mut opt = |s: &str| -> Result<Option<Tensor>, String> {
            if has(&p(s)) {
                vec_of(q(&p(s), device)?).map(Some)
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
        let post_attn_norm = opt("post_attention_norm.weight")?;
        let post_ffn_norm = opt("post_ffw_norm.weight")?;
        let bqkv = opt("attn_qkv.bias")?;
        let qkv = if has(&p("attn_qkv.weight")) {
            Qkv::Fused(lin(q(&p("attn_qkv.weight"), device)?, bqkv)?)
        } else {
            Qkv::Split {
                q: lin(q(&p("attn_q.weight"), device)?, bq)?,
                k: lin(q(&p("attn_k.weight"), device)?, bk)?,
                v: lin(q(&p("attn_v.weight"), device)?, bv)?,
            }
        };
        let ffn = if has(&p("ffn_gate_inp.weight")) {
            let router = lin(q(&p("ffn_gate_inp.weight"), device)?, None)?;
            // `[experts, rows, cols]`: each expert's matrix is a whole
            // number of rows, so a contiguous run of blocks.
            let mut split = |s: &str| -> Result<Vec<Lin>, String> {
                let t = q(&p(s), &Device::Cpu)?;
                let (e, r, c) = t.shape().dims3().map_err(|e| format!("{}: {e}", p(s)))?;
                let data = t.data().map_err(|e| e.to_string())?;
                let per = data.len() / e;
                (0..e)
                    .map(|x| {
                        let st = candle_core::quantized::QStorage::from_data(
                            std::borrow::Cow::Borrowed(&data[x * per..(x + 1) * per]),
                            device,
                            t.dtype(),
                        )
                        .map_err(|e| e.to_string())?;
                        let qt = QTensor::new(st, (r, c)).map_err(|e| e.to_string())?;
                        lin(Arc::new(qt), None)
                    })
                    .collect()
            };
            let gates = split("ffn_gate_exps.weight")?;
            let ups = split("ffn_up_exps.weight")?;
            let downs = split("ffn_down_exps.weight")?;
            if gates.len() != ups.len() || gates.len() != downs.len() {
                return Err(format!(
                    "block {i}: expert tensors disagree on the expert count"
                ));
            }
            let experts = gates
                .into_iter()
                .zip(ups)
                .zip(downs)
                .map(|((gate, up), down)| Expert { gate, up, down })
                .collect();
            Ffn::Moe { router, experts }
        } else if has(&p("ffn_gate.weight")) {
            Ffn::Gated {
                gate: lin(q(&p("ffn_gate.weight"), device)?, None)?,
                up: lin(q(&p("ffn_up.weight"), device)?, None)?,
                down: lin(q(&p("ffn_down.weight"), device)?, None)?,
            }
        } else {
            let gate_up = q(&p("ffn_up.weight"), device)?;
            let ff = gate_up.shape().dims()[0] / 2;
            Ffn::FusedGateUp {
                gate_up: lin(gate_up, None)?,
                down: lin(q(&p("ffn_down.weight"), device)?, None)?,
                ff,
            }
        };
        layers.push(DeviceLayer {
            attn_norm: vec_of(q(&p("attn_norm.weight"), device)?)?,
            qkv,
            o: lin(q(&p("attn_output.weight"), device)?, None)?,
            q_norm,
            k_norm,
            post_attn_norm,
            ffn_norm: vec_of(q(&p("ffn_norm.weight"), device)?)?,
            ffn,
            post_ffn_norm,
        });
    }
    let norm = vec_of(q("output_norm.weight", device)?)?;
    let rope_freqs = if has("rope_freqs.weight") {
        let t = q("rope_freqs.weight", &Device::Cpu)?
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
