//! The llama-family decoder (llama, SmolLM, Mistral, Qwen2, Qwen3) on the CPU,
//! over memory-mapped quantized weights.
//!
//! Our own forward pass rather than candle-transformers' `quantized_llama`:
//! that one caps the context at 4096, re-concatenates its KV cache every
//! step and holds a single sequence. Here every slot has a KV cache that
//! grows with its sequence (up to the served context), and one `forward`
//! runs a mixed batch —
//! prompt chunks and single decode tokens of different sequences — through
//! each weight matrix once.

use super::regions::{self, Region};
use super::{Chunk, Model};
use crate::kernels::attention;
use crate::kernels::matmul::{matmul_dense, matmul_given, matmul_into_rows, matmul_multi, QMatrix};
use crate::kernels::ops;
use crate::kernels::quant::{self, BlockQ8_1, QK};
use crate::kernels::team::{Disjoint, Team};
use half::f16;

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// (2i, 2i+1): llama GGUFs (q/k rows permuted by the converter).
    Interleaved,
    /// (i, i + d/2): Qwen and other NeoX-style models.
    Neox,
}

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    pub vocab_size: usize,
    /// The context served (cache size per sequence).
    pub context: usize,
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: QMatrix,
    pub wk: QMatrix,
    pub wv: QMatrix,
    pub wo: QMatrix,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    /// Qwen3: RMS norm of each q/k head before RoPE.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: QMatrix,
    pub w_up: QMatrix,
    pub w_down: QMatrix,
}

pub struct Weights {
    pub tok_embd: QMatrix,
    /// `None`: tied to `tok_embd`.
    pub output: Option<QMatrix>,
    pub output_norm: Vec<f32>,
    pub layers: Vec<Layer>,
    /// Per-frequency divisors (llama 3 `rope_freqs.weight`).
    pub rope_freqs: Option<Vec<f32>>,
}

/// Bytes of a transparent huge page (x86-64 and aarch64 with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

/// Fewest positions a slot's KV cache is made for (rounded up to whole
/// huge pages): a chat's or a benchmark's sequence then never grows it.
const MIN_KV_POSITIONS: usize = 256;

/// Halves in a zeroed anonymous mapping whose usable part starts on a huge
/// page boundary, with transparent huge pages asked for (`MADV_HUGEPAGE`).
///
/// Why: each decode step reads every position of every (layer, KV head)
/// stream of every decoding sequence; with 8 sequences of ~140 positions
/// that is ~26 MB over ~6,500 distinct 4 KiB pages, more than the
/// second-level TLB maps, so the attention paid a page walk (two-level
/// under a hypervisor) every 4 KiB of each stream and its hardware
/// prefetcher stopped at each page boundary. On huge pages the attention
/// region of an 8-sequence step took 35–40 % less time (docs/benchmarks.md,
/// tenth session). Pages are committed as they are first touched, a
/// huge page at a time, so a cache costs what its positions need rounded
/// up to 2 MiB, not its capacity's worth of 4 KiB pages.
struct HugeHalves {
    map: memmap2::MmapMut,
    off: usize,
    len: usize,
    /// The usable part: `len` halves rounded up to whole huge pages.
    bytes: usize,
}

impl HugeHalves {
    fn new(len: usize) -> Result<HugeHalves, String> {
        let bytes = (len * 2).next_multiple_of(HUGE_PAGE);
        let map = memmap2::MmapOptions::new()
            .len(bytes + HUGE_PAGE)
            .map_anon()
            .map_err(|e| format!("cannot map {bytes} bytes for a KV cache: {e}"))?;
        // Only a hint: without THP the pages are 4 KiB and all still works.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let at = map.as_ptr() as usize;
        let off = at.next_multiple_of(HUGE_PAGE) - at;
        Ok(HugeHalves {
            map,
            off,
            len,
            bytes,
        })
    }

    fn as_slice(&self) -> &[f16] {
        // SAFETY: `off + 2 * len` bytes lie in the mapping (see `new`), which
        // is page aligned (so `off` keeps f16 alignment) and zero-filled (a
        // valid f16 everywhere); the mapping lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.off).cast(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [f16] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only view.
        unsafe {
            std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(self.off).cast(), self.len)
        }
    }
}

/// K and V of one sequence, all layers: one stream per (layer, KV head) of
/// `stream` halves each, values by position (`[pos][head_dim]`), keys in the
/// transposed tiles of `kernels::attention`. In f16 as llama.cpp keeps them:
/// half the memory of f32, and half the bytes each decode step's attention
/// reads. Made for `cap` positions and grown (moved to a bigger cache,
/// `LlamaModel::ensure_cache`) when a sequence outgrows it.
struct KvCache {
    cap: usize,
    stream: usize,
    k: HugeHalves,
    v: HugeHalves,
}

impl KvCache {
    fn new(cap: usize, streams: usize, hd: usize) -> Result<KvCache, String> {
        let stream = attention::keys_len(cap, hd);
        Ok(KvCache {
            cap,
            stream,
            k: HugeHalves::new(streams * stream)?,
            v: HugeHalves::new(streams * stream)?,
        })
    }

    /// Memory the cache can commit (all of it, once its positions fill).
    fn bytes(&self) -> u64 {
        (self.k.bytes + self.v.bytes) as u64
    }

    /// Copies positions `start..end` of every stream of `src` into `self`
    /// (whose other positions are left alone).
    fn copy_from(&mut self, src: &KvCache, streams: usize, hd: usize, start: usize, end: usize) {
        let (ds, ss) = (self.stream, src.stream);
        let (dk, sk) = (self.k.as_mut_slice(), src.k.as_slice());
        for i in 0..streams {
            attention::copy_keys(
                &mut dk[i * ds..(i + 1) * ds],
                &sk[i * ss..(i + 1) * ss],
                hd,
                start,
                end,
            );
        }
        let (dv, sv) = (self.v.as_mut_slice(), src.v.as_slice());
        for i in 0..streams {
            dv[i * ds + start * hd..i * ds + end * hd]
                .copy_from_slice(&sv[i * ss + start * hd..i * ss + end * hd]);
        }
    }
}

/// Elements per task of the parallel SiLU.
const SILU_CHUNK: usize = 2048;

pub struct LlamaModel {
    cfg: LlamaConfig,
    w: Weights,
    /// `[pos][rope_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    caches: Vec<Option<KvCache>>,
    /// Runs the parallel regions of the forward pass (see `kernels::team`).
    team: Team,
    /// candle's GEMM of the dense (prompt) path runs on this pool.
    pool: rayon::ThreadPool,
    /// The forward pass's activation buffers, kept from one step to the
    /// next: fresh zeroed buffers cost a zeroing pass and page faults every
    /// decode step.
    bufs: Bufs,
    /// The greedy pick of each sequence of the last forward pass, found by
    /// the output projection's tasks (see `Model::argmaxes`), with the
    /// address of the logits vector it was found in.
    greedy: Vec<(usize, u32)>,
}

#[derive(Default)]
struct Bufs {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    xl: Vec<f32>,
    /// Q8_1 of `xn`, `att` and `g` where the regions that write those
    /// quantize them too (see `forward_inner`).
    qx: Vec<BlockQ8_1>,
    qa: Vec<BlockQ8_1>,
    qg: Vec<BlockQ8_1>,
}

/// Takes a kept buffer out of `slot`, `n` long. What it held is left in
/// place (no zeroing pass): every buffer of the forward pass is written
/// whole before it is read.
fn take<T: Clone>(slot: &mut Vec<T>, n: usize, zero: T) -> Vec<T> {
    let mut b = std::mem::take(slot);
    b.resize(n, zero);
    b
}

impl LlamaModel {
    pub fn new(
        cfg: LlamaConfig,
        w: Weights,
        slots: usize,
        threads: usize,
    ) -> Result<LlamaModel, String> {
        let half = cfg.rope_dim / 2;
        let mut inv = vec![0f64; half];
        for (i, f) in inv.iter_mut().enumerate() {
            *f = (cfg.rope_theta as f64).powf(-(2.0 * i as f64) / cfg.rope_dim as f64);
            if let Some(ff) = &w.rope_freqs {
                *f /= ff.get(i).copied().unwrap_or(1.0) as f64;
            }
        }
        let mut cos = vec![0f32; cfg.context * half];
        let mut sin = vec![0f32; cfg.context * half];
        for p in 0..cfg.context {
            for i in 0..half {
                let a = p as f64 * inv[i];
                cos[p * half + i] = a.cos() as f32;
                sin[p * half + i] = a.sin() as f32;
            }
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("helexa-mm-{i}"))
            .build()
            .map_err(|e| format!("thread pool: {e}"))?;
        let team =
            Team::new(threads.max(1), "helexa-team").map_err(|e| format!("thread team: {e}"))?;
        Ok(LlamaModel {
            cfg,
            w,
            cos,
            sin,
            caches: (0..slots).map(|_| None).collect(),
            team,
            pool,
            bufs: Bufs::default(),
            greedy: Vec::new(),
        })
    }

    #[cfg(test)]
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// (layer, KV head) streams of a KV cache.
    fn streams(&self) -> usize {
        self.cfg.n_layer * self.cfg.n_kv_head
    }

    /// Positions a cache made for at least `positions` gets: every byte of
    /// its whole huge pages, at most the context.
    fn cap_for(&self, positions: usize) -> usize {
        let hd = self.cfg.head_dim;
        let per_tile = self.streams() * attention::keys_len(attention::TILE, hd) * 2;
        let want = positions.max(MIN_KV_POSITIONS);
        let bytes = (want.div_ceil(attention::TILE) * per_tile).next_multiple_of(HUGE_PAGE);
        (bytes / per_tile * attention::TILE).min(self.cfg.context.next_multiple_of(attention::TILE))
    }

    /// Gives `slot` a cache with room for `positions` positions, keeping
    /// positions `0..keep` of the one it has. A cache too small is replaced
    /// by one with room for twice as many (so a long generation moves its
    /// cache a logarithmic number of times).
    fn ensure_cache(&mut self, slot: usize, positions: usize, keep: usize) -> Result<(), String> {
        let (streams, hd) = (self.streams(), self.cfg.head_dim);
        match &self.caches[slot] {
            Some(c) if c.cap >= positions => Ok(()),
            Some(c) => {
                let cap = self.cap_for(positions.max(2 * c.cap));
                let mut grown = KvCache::new(cap, streams, hd)?;
                grown.copy_from(c, streams, hd, 0, keep.min(c.cap));
                self.caches[slot] = Some(grown);
                Ok(())
            }
            None => {
                self.caches[slot] = Some(KvCache::new(self.cap_for(positions), streams, hd)?);
                Ok(())
            }
        }
    }

    fn forward_inner(&mut self, chunks: &[Chunk]) -> Result<Vec<Vec<f32>>, String> {
        let c = self.cfg.clone();
        let (d, hd, nh, nkv) = (c.n_embd, c.head_dim, c.n_head, c.n_kv_head);
        let qd = nh * hd;
        let kvd = nkv * hd;
        let group = nh / nkv;
        // Validate and lay out rows.
        let mut rows: Vec<(usize, usize)> = Vec::new(); // (slot, pos) of each row
        let mut tokens: Vec<u32> = Vec::new();
        // Dense chunks' rows first, so both paths get contiguous row ranges.
        let order: Vec<usize> = (0..chunks.len())
            .filter(|&i| chunks[i].dense)
            .chain((0..chunks.len()).filter(|&i| !chunks[i].dense))
            .collect();
        let mut last_row = vec![0usize; chunks.len()];
        for &ci in &order {
            let ch = &chunks[ci];
            if ch.tokens.is_empty() {
                return Err("empty chunk".into());
            }
            if ch.slot >= self.caches.len() {
                return Err(format!("slot {} out of range", ch.slot));
            }
            // Rows write their K/V in parallel: one chunk per slot keeps
            // every (slot, position) distinct.
            if chunks.iter().filter(|o| o.slot == ch.slot).count() > 1 {
                return Err(format!("slot {} appears in two chunks", ch.slot));
            }
            if ch.pos + ch.tokens.len() > c.context {
                return Err(format!(
                    "positions {}..{} exceed the context of {}",
                    ch.pos,
                    ch.pos + ch.tokens.len(),
                    c.context
                ));
            }
            for (i, &t) in ch.tokens.iter().enumerate() {
                if t as usize >= self.w.tok_embd.rows {
                    return Err(format!(
                        "token id {t} out of the vocabulary ({})",
                        self.w.tok_embd.rows
                    ));
                }
                rows.push((ch.slot, ch.pos + i));
                tokens.push(t);
            }
            last_row[ci] = rows.len() - 1;
        }
        let md: usize = chunks
            .iter()
            .filter(|c| c.dense)
            .map(|c| c.tokens.len())
            .sum();
        for ch in chunks {
            self.ensure_cache(ch.slot, ch.pos + ch.tokens.len(), ch.pos)?;
        }
        let m = rows.len();
        let mut x = take(&mut self.bufs.x, m * d, 0.0);
        for (r, &t) in tokens.iter().enumerate() {
            self.w
                .tok_embd
                .row_f32(t as usize, &mut x[r * d..(r + 1) * d]);
        }
        let mut xn = take(&mut self.bufs.xn, m * d, 0.0);
        let mut q = take(&mut self.bufs.q, m * qd, 0.0);
        let mut k = take(&mut self.bufs.k, m * kvd, 0.0);
        let mut v = take(&mut self.bufs.v, m * kvd, 0.0);
        let mut att = take(&mut self.bufs.att, m * qd, 0.0);
        let mut o = take(&mut self.bufs.o, m * d, 0.0);
        let mut g = take(&mut self.bufs.g, m * c.n_ff, 0.0);
        let mut u = take(&mut self.bufs.u, m * c.n_ff, 0.0);
        // With every row through the quantized kernels (no dense prompt
        // rows), the regions that write a matmul's input also quantize it
        // (the norm, the attention, the SiLU), sparing the matmul a region
        // of its own; the same blocks, so the same results.
        let fused = md == 0;
        let q8_for = |slot: &mut Vec<BlockQ8_1>, cols: usize| {
            take(slot, if fused { m * cols / QK } else { 0 }, BlockQ8_1::ZERO)
        };
        let mut qx = q8_for(&mut self.bufs.qx, d);
        let mut qa = q8_for(&mut self.bufs.qa, qd);
        let mut qg = q8_for(&mut self.bufs.qg, c.n_ff);
        let scale = 1.0 / (hd as f32).sqrt();

        // Every matmul of the layers: the first `md` rows through the dense path.
        let (team, pool) = (&self.team, &self.pool);
        let mul =
            |ws: &[&QMatrix], x: &[f32], q8: Option<&[BlockQ8_1]>, outs: &mut [&mut [f32]]| {
                mm((team, pool), ws, x, q8, m, md, outs)
            };
        // `x += add` (the previous block's output), then `xn = norm(x)`
        // (quantized to `q8` when given), one task per row.
        let norm = |x: &mut [f32],
                    add: Option<&[f32]>,
                    w: &[f32],
                    xn: &mut [f32],
                    q8: Option<&mut [BlockQ8_1]>| {
            let kb = d / QK;
            let (xs, xns) = (Disjoint::new(x), Disjoint::new(xn));
            let q8 = q8.map(Disjoint::new);
            team.run(m, &|r| {
                // SAFETY: task `r` alone touches row `r`.
                let (xr, xnr) = unsafe { (xs.slice(r * d, d), xns.slice(r * d, d)) };
                if let Some(a) = add {
                    ops::add_inplace(xr, &a[r * d..(r + 1) * d]);
                }
                ops::rms_norm(xr, w, c.rms_eps, xnr);
                if let Some(q) = &q8 {
                    // SAFETY: as above.
                    quant::quantize_q8_1(xnr, unsafe { q.slice(r * kb, kb) });
                }
            });
        };
        // Decode steps only (one row per sequence, no dense rows).
        let mut clock = regions::Clock::start(
            regions::enabled() && md == 0 && rows.len() == chunks.len(),
            m,
        );
        for (l, layer) in self.w.layers.iter().enumerate() {
            let q_qkv = fused && layer.wq.takes_q8_1();
            norm(
                &mut x,
                (l > 0).then_some(&o[..]),
                &layer.attn_norm,
                &mut xn,
                q_qkv.then_some(&mut qx[..]),
            );
            clock.mark(Region::AttnNorm);
            mul(
                &[&layer.wq, &layer.wk, &layer.wv],
                &xn,
                q_qkv.then_some(&qx[..]),
                &mut [&mut q, &mut k, &mut v],
            )?;
            clock.mark(Region::Qkv);
            // Per row: biases, q/k norms, RoPE and the K/V store at the
            // row's position; then causal attention of every (row, KV head)
            // over its own sequence. With one row per sequence (decode) the
            // two run in one region, item (row, KV head) preparing its own
            // heads first: its stream of the cache is written and read by
            // that item alone. With several rows of a sequence (a prompt),
            // a row attends over positions other rows store, so all rows
            // are prepared in a region of their own first.
            let merged = rows.len() == chunks.len();
            // A task's attention outputs are whole Q8_1 blocks when a
            // group's are.
            let q_att = fused && layer.wo.takes_q8_1() && (group * hd).is_multiple_of(QK);
            {
                let half = c.rope_dim / 2;
                let (cos, sin) = (&self.cos, &self.sin);
                let interleaved = matches!(c.rope_style, RopeStyle::Interleaved);
                let rope = |vv: &mut [f32], pos: usize| {
                    let cs = &cos[pos * half..(pos + 1) * half];
                    let sn = &sin[pos * half..(pos + 1) * half];
                    ops::rope(vv, cs, sn, interleaved);
                };
                // Each slot's keys, values and stream length.
                type Streams<'a> = (Disjoint<'a, f16>, Disjoint<'a, f16>, usize);
                let caches: Vec<Option<Streams>> = self
                    .caches
                    .iter_mut()
                    .map(|c| {
                        c.as_mut().map(|c| {
                            let KvCache { k, v, stream, .. } = c;
                            (
                                Disjoint::new(k.as_mut_slice()),
                                Disjoint::new(v.as_mut_slice()),
                                *stream,
                            )
                        })
                    })
                    .collect();
                let (qs, ks, vs) = (
                    Disjoint::new(&mut q),
                    Disjoint::new(&mut k),
                    Disjoint::new(&mut v),
                );
                let rows = &rows;
                // KV heads `kvs` of row `r` and their query heads: biases,
                // norms and RoPE (all per head or per element, so any split
                // gives the same bits), then the K/V store.
                //
                // SAFETY (caller): no other task touches these heads of row
                // `r` or these (slot, position) elements of the cache.
                let prep = |r: usize, kvs: std::ops::Range<usize>| {
                    let (slot, pos) = rows[r];
                    let (h0, h1) = (kvs.start * group, kvs.end * group);
                    // SAFETY: the caller's contract.
                    let (qr, kr, vr) = unsafe {
                        (
                            qs.slice(r * qd + h0 * hd, (h1 - h0) * hd),
                            ks.slice(r * kvd + kvs.start * hd, kvs.len() * hd),
                            vs.slice(r * kvd + kvs.start * hd, kvs.len() * hd),
                        )
                    };
                    if let Some(b) = &layer.bq {
                        ops::add_inplace(qr, &b[h0 * hd..h1 * hd]);
                    }
                    if let Some(b) = &layer.bk {
                        ops::add_inplace(kr, &b[kvs.start * hd..kvs.end * hd]);
                    }
                    if let Some(b) = &layer.bv {
                        ops::add_inplace(vr, &b[kvs.start * hd..kvs.end * hd]);
                    }
                    for h in qr.chunks_exact_mut(hd) {
                        if let Some(nw) = &layer.q_norm {
                            ops::rms_norm_inplace(h, nw, c.rms_eps);
                        }
                        rope(h, pos);
                    }
                    for h in kr.chunks_exact_mut(hd) {
                        if let Some(nw) = &layer.k_norm {
                            ops::rms_norm_inplace(h, nw, c.rms_eps);
                        }
                        rope(h, pos);
                    }
                    let (kc, vc, stream) = caches[slot].as_ref().expect("cache allocated");
                    let stream = *stream;
                    for (j, h) in kvs.enumerate() {
                        let base = (l * nkv + h) * stream;
                        // SAFETY: the caller's contract; the stream has
                        // room for the context.
                        unsafe {
                            attention::store_key(
                                kc.ptr(base, stream),
                                pos,
                                &kr[j * hd..(j + 1) * hd],
                            );
                            ops::store_f16(
                                &vr[j * hd..(j + 1) * hd],
                                vc.slice(base + pos * hd, hd),
                            );
                        }
                    }
                };
                if !merged {
                    // Rows write disjoint cache elements: distinct slots, or
                    // distinct positions of one slot.
                    self.team.run(m, &|r| prep(r, 0..nkv));
                }
                // One item per (row, KV head): the query heads that share
                // a KV head attend together, reading its cache rows once.
                let work = |i: usize, outs: &mut [f32], scores: &mut Vec<f32>| {
                    let (r, kvh) = (i / nkv, i % nkv);
                    if merged {
                        // Item `i` alone touches these heads of row `r`, and
                        // its slot's stream `kvh` (one row per slot).
                        prep(r, kvh..kvh + 1);
                    }
                    let (slot, pos) = rows[r];
                    let (kc, vc, stream) = caches[slot].as_ref().expect("cache allocated");
                    let base = (l * nkv + kvh) * stream;
                    let h0 = kvh * group;
                    let n = pos + 1;
                    // SAFETY: this item's own heads of row `r` (read only
                    // here), and positions `0..n` of its stream, which no
                    // task writes now (`prep` above is done: the same task,
                    // or the region before).
                    let (qh, keys, values) = unsafe {
                        (
                            &*qs.slice(r * qd + h0 * hd, group * hd),
                            &*kc.slice(base, attention::keys_len(n, hd)),
                            &*vc.slice(base, n * hd),
                        )
                    };
                    attention::attend_heads(qh, hd, keys, values, n, scale, scores, outs);
                };
                // A few items per task: enough tasks to balance the causal
                // rows' unequal lengths, few enough to claim cheaply.
                let gd = group * hd;
                let per = (m * nkv).div_ceil(self.team.threads() * 8).max(1);
                let qas = q_att.then(|| Disjoint::new(&mut qa[..]));
                // The start of item `i`'s cache streams, asked for ahead.
                let warm = |i: usize| {
                    let (r, kvh) = (i / nkv, i % nkv);
                    let (slot, pos) = rows[r];
                    let (kc, vc, stream) = caches[slot].as_ref().expect("cache allocated");
                    let base = (l * nkv + kvh) * stream;
                    attention::prefetch_start(
                        kc.ptr(base, *stream),
                        vc.ptr(base, *stream),
                        pos + 1,
                        hd,
                    );
                };
                self.team.for_chunks_mut(&mut att, per * gd, |t, outs| {
                    let mut s = Vec::new();
                    let items = outs.len() / gd;
                    for (j, out) in outs.chunks_mut(gd).enumerate() {
                        if j + 1 < items {
                            warm(t * per + j + 1);
                        }
                        work(t * per + j, out, &mut s);
                    }
                    if let Some(q) = &qas {
                        // SAFETY: task `t`'s own blocks.
                        let qt = unsafe { q.slice(t * per * gd / QK, outs.len() / QK) };
                        quant::quantize_q8_1(outs, qt);
                    }
                });
            }
            clock.mark(Region::Attention);
            mul(&[&layer.wo], &att, q_att.then_some(&qa[..]), &mut [&mut o])?;
            clock.mark(Region::Wo);
            let q_ffn = fused && layer.w_gate.takes_q8_1();
            norm(
                &mut x,
                Some(&o),
                &layer.ffn_norm,
                &mut xn,
                q_ffn.then_some(&mut qx[..]),
            );
            clock.mark(Region::FfnNorm);
            mul(
                &[&layer.w_gate, &layer.w_up],
                &xn,
                q_ffn.then_some(&qx[..]),
                &mut [&mut g, &mut u],
            )?;
            clock.mark(Region::GateUp);
            // Over the pool: with several sequences its scalar `exp` (kept
            // for greedy parity, see `ops::silu_mul`) was a serial stretch
            // of every layer. Element-wise, so the split changes no bits;
            // chunks are whole Q8_1 blocks of the rows.
            let q_down = fused && layer.w_down.takes_q8_1();
            {
                let qgs = q_down.then(|| Disjoint::new(&mut qg[..]));
                self.team.for_chunks_mut(&mut g, SILU_CHUNK, |i, a| {
                    ops::silu_mul(a, &u[i * SILU_CHUNK..][..a.len()]);
                    if let Some(q) = &qgs {
                        // SAFETY: chunk `i`'s own blocks.
                        let qi = unsafe { q.slice(i * SILU_CHUNK / QK, a.len() / QK) };
                        quant::quantize_q8_1(a, qi);
                    }
                });
            }
            clock.mark(Region::Silu);
            mul(
                &[&layer.w_down],
                &g,
                q_down.then_some(&qg[..]),
                &mut [&mut o],
            )?;
            clock.mark(Region::Down);
        }
        if !self.w.layers.is_empty() {
            ops::add_inplace(&mut x, &o);
        }

        // Logits of each chunk's last row only.
        let last = last_row;
        let ml = last.len();
        let mut xl = take(&mut self.bufs.xl, ml * d, 0.0);
        for (i, &r) in last.iter().enumerate() {
            ops::rms_norm(
                &x[r * d..(r + 1) * d],
                &self.w.output_norm,
                c.rms_eps,
                &mut xl[i * d..(i + 1) * d],
            );
        }
        let out_w = self.w.output.as_ref().unwrap_or(&self.w.tok_embd);
        let vocab = out_w.rows;
        // Each sequence's logits written straight into the vector the
        // sampler gets (a shared buffer copied out per sequence was a
        // region of its own: 1.5 MB more to read and write at 8 sequences).
        let mut out: Vec<Vec<f32>> = (0..ml).map(|_| Vec::with_capacity(vocab)).collect();
        let ptrs: Vec<*mut f32> = out
            .iter_mut()
            .map(|o| o.spare_capacity_mut().as_mut_ptr().cast())
            .collect();
        // SAFETY: each pointer is a distinct vector's room for `vocab`
        // floats, untouched until the call returns.
        let picks = unsafe { matmul_into_rows(&self.team, out_w, &xl, ml, &ptrs) };
        self.greedy = ptrs.iter().map(|&p| p as usize).zip(picks).collect();
        for o in &mut out {
            // SAFETY: the matmul wrote all `vocab` outputs of every row.
            unsafe { o.set_len(vocab) };
        }
        clock.mark(Region::LmHead);
        clock.finish();
        self.bufs = Bufs {
            x,
            xn,
            q,
            k,
            v,
            att,
            o,
            g,
            u,
            xl,
            qx,
            qa,
            qg,
        };
        Ok(out)
    }
}

/// `matmul` with the first `md` rows through the dense path.
/// With `md == 0`, `q8` (when given) is `x` quantized to Q8_1.
fn mm(
    (team, pool): (&Team, &rayon::ThreadPool),
    ws: &[&QMatrix],
    x: &[f32],
    q8: Option<&[BlockQ8_1]>,
    m: usize,
    md: usize,
    outs: &mut [&mut [f32]],
) -> Result<(), String> {
    if md == 0 {
        matmul_given(team, ws, x, q8, m, outs);
        return Ok(());
    }
    debug_assert!(q8.is_none());
    let k = ws[0].cols;
    let (xd, xq) = x.split_at(md * k);
    let mut dense_outs = Vec::with_capacity(ws.len());
    let mut q_outs = Vec::with_capacity(ws.len());
    for (w, o) in ws.iter().zip(outs.iter_mut()) {
        let (a, b) = o.split_at_mut(md * w.rows);
        dense_outs.push(a);
        q_outs.push(b);
    }
    pool.install(|| matmul_dense(ws, xd, md, &mut dense_outs))?;
    if m > md {
        matmul_multi(team, ws, xq, m - md, &mut q_outs);
    }
    Ok(())
}

impl Model for LlamaModel {
    fn argmaxes(&self, logits: &[&[f32]], want: &[bool]) -> Vec<Option<u32>> {
        // The last forward pass's picks, when these are its logits vectors
        // (the scheduler's call, before it changes them): the output
        // projection's tasks found them over the logits they had just
        // written.
        let ours = self.greedy.len() == logits.len()
            && self
                .greedy
                .iter()
                .zip(logits)
                .all(|(&(at, g), l)| at == l.as_ptr() as usize && (g as usize) < l.len());
        if ours {
            return want
                .iter()
                .zip(&self.greedy)
                .map(|(&w, &(_, g))| w.then_some(g))
                .collect();
        }
        let mut out = vec![None; logits.len()];
        self.team.for_chunks_mut(&mut out, 1, |i, o| {
            if want[i] {
                o[0] = Some(crate::sampling::argmax(logits[i]));
            }
        });
        out
    }

    fn context_length(&self) -> usize {
        self.cfg.context
    }

    fn slots(&self) -> usize {
        self.caches.len()
    }

    fn forward(&mut self, chunks: &[Chunk]) -> Result<Vec<Vec<f32>>, String> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        self.forward_inner(chunks)
    }

    fn release(&mut self, _slot: usize) {
        // The cache is kept for the slot's next sequence: the scheduler's
        // prefix cache reuses what it holds, and positions past the reused
        // prefix are overwritten before they are read.
    }

    fn reuses_prefix(&self) -> bool {
        true
    }

    fn kv_bytes_per_position(&self) -> usize {
        2 * self.cfg.n_layer * self.cfg.n_kv_head * self.cfg.head_dim * std::mem::size_of::<f16>()
    }

    fn kv_bytes(&self, slot: usize, positions: usize) -> u64 {
        match self.caches.get(slot) {
            Some(Some(c)) => c.bytes(),
            _ => (positions * self.kv_bytes_per_position()) as u64,
        }
    }

    fn drop_cache(&mut self, slot: usize) {
        if let Some(c) = self.caches.get_mut(slot) {
            *c = None;
        }
    }

    fn copy_kv(&mut self, from: usize, to: usize, start: usize, end: usize) -> Result<(), String> {
        let n = self.caches.len();
        if from >= n || to >= n || start > end || end > self.cfg.context {
            return Err(format!(
                "cannot copy positions {start}..{end} from slot {from} to slot {to}"
            ));
        }
        if from == to || start == end {
            return Ok(());
        }
        match &self.caches[from] {
            None => return Err(format!("slot {from} has no cache to copy")),
            Some(c) if c.cap < end => {
                return Err(format!(
                    "slot {from} has room for {} positions, not {end}",
                    c.cap
                ))
            }
            Some(_) => {}
        }
        // The source is checked first, so a refused copy grows nothing.
        self.ensure_cache(to, end, start)?;
        let src = self.caches[from].take().expect("checked above");
        let (streams, hd) = (self.streams(), self.cfg.head_dim);
        let dst = self.caches[to].as_mut().expect("ensured above");
        dst.copy_from(&src, streams, hd, start, end);
        self.caches[from] = Some(src);
        Ok(())
    }
}
