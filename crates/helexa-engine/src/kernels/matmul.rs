//! Weight matrices (memory-mapped GGUF blocks or owned f32) and the parallel
//! `y = x · Wᵀ` over them.
//!
//! Activations are quantized once per call to the int8 format that pairs with
//! the weight type (as llama.cpp does), then every output column is one dot
//! product of a weight row with an activation row. Work is split over weight
//! rows over a [`Team`]; several matrices sharing one input (q/k/v, gate/up) go in
//! one parallel region. Each output element is computed the same way whatever
//! else is in the batch, so batched and single-sequence results are identical.

use super::quant::{self, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};
use super::repack::{self, Act, Packed, G};
use super::team::Team;
use candle_core::quantized::{k_quants, GgmlDType, GgmlType};
use memmap2::Mmap;
use rayon::prelude::*;
use std::sync::Arc;

/// Bytes of a tensor inside a memory-mapped file.
#[derive(Clone)]
pub struct Mapped {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
}

impl Mapped {
    pub fn new(map: Arc<Mmap>, offset: usize, len: usize) -> Option<Mapped> {
        (offset.checked_add(len)? <= map.len()).then_some(Mapped { map, offset, len })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len]
    }

    /// Drops the pages of these bytes from this process's resident set, once
    /// they have been copied (repacked) and are not read here again.
    fn release(&self) {
        #[cfg(unix)]
        {
            // SAFETY: the map is a read-only shared file mapping that is never
            // written through, so MADV_DONTNEED only drops clean pages: a
            // later read of these bytes (none is made) would fault them back
            // in from the file unchanged. Pages at the range's edges that
            // neighbouring tensors share are dropped too and re-read the same way.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    self.offset,
                    self.len,
                )
            };
        }
    }

    /// Views the bytes as blocks of `T`.
    fn blocks<T>(&self) -> &[T] {
        let b = self.bytes();
        let size = std::mem::size_of::<T>();
        debug_assert_eq!(b.len() % size, 0);
        debug_assert_eq!(b.as_ptr() as usize % std::mem::align_of::<T>(), 0);
        // SAFETY: `T` is a `repr(C)` block of plain integers / f16 whose
        // alignment was checked at load time (`QMatrix::new`); the length is a
        // whole number of blocks; the map lives as long as `self`.
        unsafe { std::slice::from_raw_parts(b.as_ptr() as *const T, b.len() / size) }
    }
}

enum Data {
    F32(Vec<f32>),
    Q4_0(Mapped),
    /// Q4_1 and Q8_0, repacked at load for the decode kernels (`repack.rs`).
    Packed(Packed),
    /// Any other ggml block type, through candle's `GgmlType` kernels.
    Ggml(GgmlDType, Mapped),
}

/// A `rows × cols` weight matrix, row-major (one output feature per row).
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    data: Data,
}

macro_rules! with_ggml {
    ($dt:expr, $T:ident, $body:block, $other:block) => {
        match $dt {
            GgmlDType::Q5_0 => {
                type $T = k_quants::BlockQ5_0;
                $body
            }
            GgmlDType::Q5_1 => {
                type $T = k_quants::BlockQ5_1;
                $body
            }
            GgmlDType::Q2K => {
                type $T = k_quants::BlockQ2K;
                $body
            }
            GgmlDType::Q3K => {
                type $T = k_quants::BlockQ3K;
                $body
            }
            GgmlDType::Q4K => {
                type $T = k_quants::BlockQ4K;
                $body
            }
            GgmlDType::Q5K => {
                type $T = k_quants::BlockQ5K;
                $body
            }
            GgmlDType::Q6K => {
                type $T = k_quants::BlockQ6K;
                $body
            }
            _ => $other,
        }
    };
}

impl QMatrix {
    /// A quantized matrix over mapped bytes. Errors name what is unsupported.
    pub fn new(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        bytes: Mapped,
    ) -> Result<QMatrix, String> {
        let bs = dtype.block_size();
        if !cols.is_multiple_of(bs) {
            return Err(format!(
                "{cols} columns is not a multiple of the {dtype:?} block size {bs}"
            ));
        }
        let want = rows * cols / bs * dtype.type_size();
        if bytes.len != want {
            return Err(format!(
                "{dtype:?} {rows}x{cols} needs {want} bytes, found {}",
                bytes.len
            ));
        }
        // Blocks hold f16 (and f32 for some k-quants); GGUF aligns tensors
        // to 32. Checked before any block is viewed (or repacked).
        let blocks = matches!(
            dtype,
            GgmlDType::Q4_0
                | GgmlDType::Q4_1
                | GgmlDType::Q8_0
                | GgmlDType::Q5_0
                | GgmlDType::Q5_1
                | GgmlDType::Q2K
                | GgmlDType::Q3K
                | GgmlDType::Q4K
                | GgmlDType::Q5K
                | GgmlDType::Q6K
        );
        if blocks && !(bytes.bytes().as_ptr() as usize).is_multiple_of(4) {
            return Err("tensor data is not 4-byte aligned".into());
        }
        let conv = |f: &dyn Fn(&[u8], &mut [f32])| {
            let mut out = vec![0f32; rows * cols];
            f(bytes.bytes(), &mut out);
            out
        };
        let data = match dtype {
            GgmlDType::F32 => Data::F32(conv(&|b, o| {
                for (v, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                    *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            })),
            GgmlDType::F16 => Data::F32(conv(&|b, o| {
                for (v, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *v = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            })),
            GgmlDType::BF16 => Data::F32(conv(&|b, o| {
                for (v, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *v = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            })),
            GgmlDType::Q4_0 => Data::Q4_0(bytes),
            GgmlDType::Q4_1 | GgmlDType::Q8_0 => {
                let packed = if dtype == GgmlDType::Q4_1 {
                    Packed::q4_1(bytes.blocks::<BlockQ4_1>(), rows, cols)
                } else {
                    Packed::q8_0(bytes.blocks::<BlockQ8_0>(), rows, cols)
                };
                bytes.release();
                Data::Packed(packed)
            }
            GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K => Data::Ggml(dtype, bytes),
            other => return Err(format!("weight type {other:?} is not supported")),
        };
        Ok(QMatrix { rows, cols, data })
    }

    /// Row `n` as f32 (embedding lookup).
    pub fn row_f32(&self, n: usize, out: &mut [f32]) {
        let k = self.cols;
        let kb = k / QK;
        match &self.data {
            Data::F32(v) => out.copy_from_slice(&v[n * k..(n + 1) * k]),
            Data::Q4_0(m) => {
                quant::dequantize_q4_0(&m.blocks::<BlockQ4_0>()[n * kb..(n + 1) * kb], out)
            }
            Data::Packed(p) => p.row_f32(n, out),
            Data::Ggml(dt, m) => with_ggml!(
                *dt,
                T,
                {
                    let kb = k / T::BLCK_SIZE;
                    T::to_float(&m.blocks::<T>()[n * kb..(n + 1) * kb], out);
                },
                { unreachable!() }
            ),
        }
    }
}

/// Activations quantized for the weight types in use; filled on demand.
#[derive(Default)]
struct ActCache<'a> {
    q8_0: Option<Vec<BlockQ8_0>>,
    /// Each `q8_0` block's `sum(qs)`.
    q8_0_sums: Vec<i32>,
    q8_1: Option<std::borrow::Cow<'a, [BlockQ8_1]>>,
}

/// A raw output pointer shared by tasks writing disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (their own weight rows' columns).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Activation rows per cache tile in the prefill loop.
const M_TILE: usize = 64;

/// The dense path's fewest rows per gemm call (see `matmul_dense`).
const DENSE_MIN_ROWS: usize = 2;

/// Most weight rows one task takes (a multiple of the repacked group).
const MAX_CHUNK: usize = 512;

/// Fewest activation blocks quantized over the team rather than on the
/// calling thread (below, the region's start costs more than it saves).
const PAR_QUANT_MIN_BLOCKS: usize = 96;

/// `q = quantize(x)` block by block (rows of `x` are whole blocks), over the
/// team when there is enough of it: with several sequences this was a
/// serial stretch before every matmul while the other threads waited.
/// Blocks are independent, so the split changes no bits.
fn quantize_rows<B: Send>(team: &Team, x: &[f32], q: &mut [B], f: fn(&[f32], &mut [B])) {
    let nb = q.len();
    if nb < PAR_QUANT_MIN_BLOCKS || team.threads() < 2 {
        f(x, q);
        return;
    }
    let per = nb.div_ceil(team.threads() * 2);
    team.for_chunks_mut(q, per, |i, qc| f(&x[i * per * QK..][..qc.len() * QK], qc));
}

/// `outs[i] = x · ws[i]ᵀ` for `m` rows of `x` (`m × cols`), each output
/// `m × ws[i].rows`. All matrices must share `cols`.
pub fn matmul_multi(team: &Team, ws: &[&QMatrix], x: &[f32], m: usize, outs: &mut [&mut [f32]]) {
    matmul_given(team, ws, x, None, m, outs)
}

impl QMatrix {
    /// Whether [`matmul_given`] uses Q8_1 activations for this matrix.
    pub fn takes_q8_1(&self) -> bool {
        matches!(&self.data, Data::Packed(p) if p.kind == repack::Kind::Q4_1)
    }
}

/// [`matmul_multi`] with `x` already quantized to Q8_1 (`quant::quantize_q8_1`
/// of each row, `m * cols / 32` blocks) where `q8_1` is given: the caller
/// quantized it inside a parallel region it runs anyway (the norm, the
/// attention, the SiLU), saving this call's own quantizing region. The
/// same blocks either way, so the same results.
pub fn matmul_given(
    team: &Team,
    ws: &[&QMatrix],
    x: &[f32],
    q8_1: Option<&[BlockQ8_1]>,
    m: usize,
    outs: &mut [&mut [f32]],
) {
    assert_eq!(ws.len(), outs.len());
    let rows: Vec<Vec<OutPtr>> = outs
        .iter_mut()
        .zip(ws)
        .map(|(o, w)| {
            assert_eq!(o.len(), m * w.rows);
            (0..m)
                .map(|r| OutPtr(o[r * w.rows..].as_mut_ptr()))
                .collect()
        })
        .collect();
    // SAFETY: row `r` of output `i` is `ws[i].rows` floats of `outs[i]`,
    // borrowed mutably for the call.
    unsafe { matmul_rows(team, ws, x, q8_1, m, &rows, None) }
}

/// The weight rows of each task of a matmul over `ws` on `threads` threads,
/// `(matrix, first row, end row)`, in column order.
fn task_rows(ws: &[&QMatrix], threads: usize) -> Vec<(usize, usize, usize)> {
    let total_rows: usize = ws.iter().map(|w| w.rows).sum();
    // Two tasks per thread: each task is one contiguous stream of weight
    // groups, and every task start pays the memory latency before the
    // prefetch runs ahead; with four per thread an 8-sequence decode was
    // ~5 % slower (`engine_bench` A/B, 2 threads: 883 against 928 tok/s).
    let target_tasks = (threads * 2).max(1);
    // Whole groups of the repacked matrices.
    let chunk = (total_rows.div_ceil(target_tasks))
        .clamp(G, MAX_CHUNK)
        .next_multiple_of(G);
    let mut tasks = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        let mut r = 0;
        while r < w.rows {
            let e = (r + chunk).min(w.rows);
            tasks.push((i, r, e));
            r = e;
        }
    }
    tasks
}

/// `x · wᵀ` for `m` rows of `x`, row `r`'s `w.rows` outputs written to
/// `rows[r]` (every element of it): the output projection writes each
/// sequence's logits straight into the vector the sampler gets, rather
/// than into one buffer copied out row by row. Returns each row's
/// [`crate::sampling::argmax`], found by the tasks over the outputs they
/// just wrote (a separate scan read the logits back from memory once more).
///
/// # Safety
/// Each `rows[r]` points at `w.rows` writable floats that nothing else
/// reads or writes during the call, no two overlapping.
pub unsafe fn matmul_into_rows(
    team: &Team,
    w: &QMatrix,
    x: &[f32],
    m: usize,
    rows: &[*mut f32],
) -> Vec<u32> {
    assert_eq!(rows.len(), m);
    let rows = vec![rows.iter().map(|&p| OutPtr(p)).collect::<Vec<_>>()];
    let tasks = task_rows(&[w], team.threads());
    // Each task's best (value, index) per row, tasks in column order.
    let mut best = vec![(f32::NEG_INFINITY, 0u32); tasks.len() * m];
    let slots = super::team::Disjoint::new(&mut best);
    let after = |t: usize| {
        let (_, r0, r1) = tasks[t];
        // SAFETY: task `t` alone writes these entries.
        let mine = unsafe { slots.slice(t * m, m) };
        for (j, b) in mine.iter_mut().enumerate() {
            // SAFETY: the task wrote columns `r0..r1` of row `j`, which no
            // other task touches.
            let out = unsafe { std::slice::from_raw_parts(rows[0][j].0.add(r0), r1 - r0) };
            let i = crate::sampling::argmax(out) as usize;
            *b = (out[i], (r0 + i) as u32);
        }
    };
    // SAFETY: the caller's contract.
    unsafe { matmul_rows(team, &[w], x, None, m, &rows, Some(&after)) };
    // The first index of the largest value, as one scan in order finds it:
    // a task's candidate replaces the best so far only when strictly larger.
    (0..m)
        .map(|j| {
            let (mut v, mut at) = (f32::NEG_INFINITY, 0u32);
            for t in 0..tasks.len() {
                let (bv, bi) = best[t * m + j];
                if bv > v {
                    (v, at) = (bv, bi);
                }
            }
            at
        })
        .collect()
}

/// The matmul of [`matmul_given`] with output `i`'s row `r` at `rows[i][r]`.
///
/// # Safety
/// `rows[i][r]` points at `ws[i].rows` writable floats, for `r < m`, none
/// overlapping and none touched by anything else during the call.
unsafe fn matmul_rows(
    team: &Team,
    ws: &[&QMatrix],
    x: &[f32],
    q8_1: Option<&[BlockQ8_1]>,
    m: usize,
    rows: &[Vec<OutPtr>],
    after: Option<&(dyn Fn(usize) + Sync)>,
) {
    assert_eq!(ws.len(), rows.len());
    assert!(rows.iter().all(|r| r.len() == m));
    let k = ws[0].cols;
    assert_eq!(x.len(), m * k);
    let mut acts = ActCache::default();
    if let Some(q) = q8_1 {
        assert_eq!(q.len(), m * k / QK);
        acts.q8_1 = Some(std::borrow::Cow::Borrowed(q));
    }
    for w in ws {
        assert_eq!(w.cols, k);
        let (q8_1, q8_0) = match &w.data {
            Data::Packed(p) => (p.kind == repack::Kind::Q4_1, p.kind == repack::Kind::Q8_0),
            Data::Q4_0(_) => (false, true),
            _ => (false, false),
        };
        if q8_1 && acts.q8_1.is_none() {
            let mut q = vec![BlockQ8_1::ZERO; m * k / QK];
            quantize_rows(team, x, &mut q, quant::quantize_q8_1);
            acts.q8_1 = Some(std::borrow::Cow::Owned(q));
        }
        if q8_0 && acts.q8_0.is_none() {
            let mut q = vec![BlockQ8_0::ZERO; m * k / QK];
            quantize_rows(team, x, &mut q, quant::quantize_q8_0);
            acts.q8_0_sums = vec![0; q.len()];
            repack::block_sums(&q, &mut acts.q8_0_sums);
            acts.q8_0 = Some(q);
        }
    }
    // Generic ggml types quantize their own activations (rare path).
    let generic: Vec<Option<GenericActs>> = ws
        .iter()
        .map(|w| match &w.data {
            Data::Ggml(dt, _) => Some(GenericActs::new(*dt, x, m, k)),
            _ => None,
        })
        .collect();

    let tasks = task_rows(ws, team.threads());
    let run = |&(i, r0, r1): &(usize, usize, usize)| {
        let w = ws[i];
        let rp = &rows[i];
        let kb = k / QK;
        let store = |row: usize, col: usize, v: f32| {
            // SAFETY: `row < m`, `col` in this task's own range `r0..r1`, so no
            // other task writes this element; the row holds `w.rows` floats.
            unsafe { *rp[row].0.add(col) = v };
        };
        match &w.data {
            Data::Packed(p) => {
                let (g0, g1) = (r0 / G, r1.div_ceil(G));
                let width = (g1 - g0) * G;
                // Whole groups (every matrix whose rows are a multiple of
                // 16): the kernel writes the output rows in place. A
                // trailing partial group goes through a scratch buffer.
                let direct = r0 == g0 * G && r1 == g1 * G;
                let mut buf = if direct {
                    Vec::new()
                } else {
                    vec![[0f32; MAX_CHUNK]; repack::MAX_ACTS]
                };
                let mut m0 = 0;
                while m0 < m {
                    let cnt = (m - m0).min(repack::MAX_ACTS);
                    let act = |j: usize| -> Act {
                        let row = m0 + j;
                        match p.kind {
                            repack::Kind::Q4_1 => Act::Q8_1(
                                &acts.q8_1.as_deref().expect("q8_1 acts")[row * kb..][..kb],
                            ),
                            repack::Kind::Q8_0 => Act::Q8_0(
                                &acts.q8_0.as_deref().expect("q8_0 acts")[row * kb..][..kb],
                                &acts.q8_0_sums[row * kb..][..kb],
                            ),
                        }
                    };
                    let a: [Act; repack::MAX_ACTS] = std::array::from_fn(|j| act(j.min(cnt - 1)));
                    if direct {
                        let mut o: [&mut [f32]; repack::MAX_ACTS] = Default::default();
                        for (j, oj) in o.iter_mut().take(cnt).enumerate() {
                            // SAFETY: row `m0 + j < m`, columns `r0..r1` are
                            // this task's own (no other task writes them);
                            // the row holds `w.rows` floats and `r1 <= w.rows`.
                            *oj = unsafe {
                                std::slice::from_raw_parts_mut(rp[m0 + j].0.add(r0), width)
                            };
                        }
                        p.dot_groups(g0, g1, &a[..cnt], &mut o[..cnt]);
                    } else {
                        let mut o: Vec<&mut [f32]> =
                            buf.iter_mut().take(cnt).map(|b| &mut b[..width]).collect();
                        p.dot_groups(g0, g1, &a[..cnt], &mut o);
                        for (j, b) in buf.iter().take(cnt).enumerate() {
                            let src = &b[r0 - g0 * G..r1 - g0 * G];
                            // SAFETY: row `m0 + j < m`, columns `r0..r1` are
                            // this task's own; the row holds `w.rows` floats.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    src.as_ptr(),
                                    rp[m0 + j].0.add(r0),
                                    src.len(),
                                )
                            };
                        }
                    }
                    m0 += cnt;
                }
            }
            Data::Q4_0(mm) => {
                let a = acts.q8_0.as_deref().expect("q8_0 acts");
                tiled_quant(
                    m,
                    r0,
                    r1,
                    mm.blocks::<BlockQ4_0>(),
                    a,
                    kb,
                    quant::dot_q4_0,
                    store,
                );
            }
            Data::F32(v) => {
                tiled(
                    m,
                    r0,
                    r1,
                    |n, m0, cnt, out| {
                        let wr = &v[n * k..(n + 1) * k];
                        for j in 0..cnt {
                            out[j] = super::ops::dot(wr, &x[(m0 + j) * k..(m0 + j + 1) * k]);
                        }
                    },
                    store,
                );
            }
            Data::Ggml(_, mm) => {
                let g = generic[i].as_ref().expect("generic acts");
                for n in r0..r1 {
                    for row in 0..m {
                        store(row, n, g.dot(mm, n, row));
                    }
                }
            }
        }
    };
    team.run(tasks.len(), &|t| {
        run(&tasks[t]);
        if let Some(f) = after {
            f(t);
        }
    });
}

/// [`tiled`] over quantized weights: weight row `n` (`kb` blocks of `wb`)
/// against up to four activation rows of `a` at once with `dot`.
#[allow(clippy::too_many_arguments)]
fn tiled_quant<W, A>(
    m: usize,
    r0: usize,
    r1: usize,
    wb: &[W],
    a: &[A],
    kb: usize,
    dot: impl Fn(&[W], &[&[A]], &mut [f32]),
    store: impl Fn(usize, usize, f32),
) {
    tiled(
        m,
        r0,
        r1,
        |n, m0, cnt, out| {
            let rows: [&[A]; 4] = std::array::from_fn(|j| &a[(m0 + j.min(cnt - 1)) * kb..][..kb]);
            dot(&wb[n * kb..(n + 1) * kb], &rows[..cnt], out);
        },
        store,
    );
}

/// The loop nest of one task: activation rows in tiles of `M_TILE`, weight
/// rows `r0..r1`, then up to 4 activation rows per kernel call.
#[inline]
fn tiled(
    m: usize,
    r0: usize,
    r1: usize,
    mut kern: impl FnMut(usize, usize, usize, &mut [f32]),
    store: impl Fn(usize, usize, f32),
) {
    let mut out = [0f32; 4];
    let mut t0 = 0;
    while t0 < m {
        let t1 = (t0 + M_TILE).min(m);
        for n in r0..r1 {
            let mut m0 = t0;
            while m0 < t1 {
                let cnt = (t1 - m0).min(4);
                kern(n, m0, cnt, &mut out[..cnt]);
                for (j, &v) in out[..cnt].iter().enumerate() {
                    store(m0 + j, n, v);
                }
                m0 += cnt;
            }
        }
        t0 = t1;
    }
}

/// Activations quantized for a candle `GgmlType` weight.
struct GenericActs {
    dtype: GgmlDType,
    k: usize,
    /// `m` rows of `T::VecDotType` blocks (a `Vec<V>`), type-erased.
    q: Box<dyn std::any::Any + Send + Sync>,
}

impl GenericActs {
    fn new(dtype: GgmlDType, x: &[f32], m: usize, k: usize) -> GenericActs {
        with_ggml!(
            dtype,
            T,
            {
                type V = <T as GgmlType>::VecDotType;
                let per_row = k / V::BLCK_SIZE;
                let mut q: Vec<V> = (0..m * per_row).map(|_| V::zeros()).collect();
                for (xr, qr) in x.chunks_exact(k).zip(q.chunks_exact_mut(per_row)) {
                    V::from_float(xr, qr);
                }
                GenericActs {
                    dtype,
                    k,
                    q: Box::new(q),
                }
            },
            { unreachable!() }
        )
    }

    fn dot(&self, w: &Mapped, n: usize, row: usize) -> f32 {
        let k = self.k;
        with_ggml!(
            self.dtype,
            T,
            {
                type V = <T as GgmlType>::VecDotType;
                let kb = k / T::BLCK_SIZE;
                let vb = k / V::BLCK_SIZE;
                let q = self.q.downcast_ref::<Vec<V>>().expect("activation type");
                T::vec_dot(
                    k,
                    &w.blocks::<T>()[n * kb..(n + 1) * kb],
                    &q[row * vb..(row + 1) * vb],
                )
            },
            { unreachable!() }
        )
    }
}

/// `outs[i] = x · ws[i]ᵀ` through f32 GEMM: each weight is dequantized once
/// per call (parallel over rows), then multiplied with candle's CPU matmul.
/// Worth it for many rows (prompt prefill), where int8 dot products are
/// bound by their per-block overhead rather than by memory.
pub fn matmul_dense(
    ws: &[&QMatrix],
    x: &[f32],
    m: usize,
    outs: &mut [&mut [f32]],
) -> Result<(), String> {
    use candle_core::{Device, Tensor};
    assert_eq!(ws.len(), outs.len());
    let k = ws[0].cols;
    assert_eq!(x.len(), m * k);
    // One row is padded to two: gemm (gemm-common 0.19) multiplies a single
    // row with its gemv kernel, which sums in another order than its
    // blocked kernels, whose k-blocking does not depend on the row count.
    // A prompt's last token recomputed alone after a prefix-cache hit thus
    // gets the bits it got inside the whole prompt's chunk.
    let mp = m.max(DENSE_MIN_ROWS);
    let mut xp;
    let x = if mp == m {
        x
    } else {
        xp = vec![0f32; mp * k];
        xp[..m * k].copy_from_slice(x);
        &xp[..]
    };
    let xt = Tensor::from_slice(x, (mp, k), &Device::Cpu).map_err(|e| e.to_string())?;
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        assert_eq!(w.cols, k);
        assert_eq!(out.len(), m * w.rows);
        let mut wf = vec![0f32; w.rows * k];
        let rows_per = 64;
        wf.par_chunks_mut(rows_per * k)
            .enumerate()
            .for_each(|(c, buf)| {
                for (j, row) in buf.chunks_exact_mut(k).enumerate() {
                    w.row_f32(c * rows_per + j, row);
                }
            });
        let wt = Tensor::from_vec(wf, (w.rows, k), &Device::Cpu).map_err(|e| e.to_string())?;
        let y = xt
            .matmul(&wt.t().map_err(|e| e.to_string())?)
            .and_then(|y| y.flatten_all())
            .and_then(|y| y.to_vec1::<f32>())
            .map_err(|e| e.to_string())?;
        out.copy_from_slice(&y[..m * w.rows]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_written_in_place_and_their_argmax_are_those_of_one_scan() {
        // out[j][c] = w[c][j] (x = unit rows), 3000 outputs: six tasks of
        // 512 columns on two threads, so ties and candidates fall in
        // different tasks.
        let (n, k, m) = (3000, 4, 3);
        let mut w = vec![0f32; n * k];
        let mut set = |c: usize, j: usize, v: f32| w[c * k + j] = v;
        for c in 0..n {
            set(c, 0, (c % 97) as f32 * 0.01);
            set(c, 1, -1.0); // all equal: the first
            set(c, 2, -((c % 13) as f32));
        }
        set(700, 0, 5.0); // a tie across tasks: the first wins
        set(1030, 0, 5.0);
        set(5, 2, f32::NAN); // NaN never wins
        set(2998, 2, f32::NAN);
        set(2999, 2, 3.0);
        let q = QMatrix {
            rows: n,
            cols: k,
            data: Data::F32(w),
        };
        let x: Vec<f32> = (0..m * k)
            .map(|i| u8::from(i / k == i % k) as f32)
            .collect();
        let team = Team::new(2, "test").unwrap();
        let mut outs: Vec<Vec<f32>> = (0..m).map(|_| vec![0.0; n]).collect();
        let ptrs: Vec<*mut f32> = outs.iter_mut().map(|o| o.as_mut_ptr()).collect();
        // SAFETY: three distinct vectors of `n` floats.
        let picks = unsafe { matmul_into_rows(&team, &q, &x, m, &ptrs) };
        let mut flat = vec![0f32; m * n];
        matmul_given(&team, &[&q], &x, None, m, &mut [&mut flat]);
        for j in 0..m {
            let want: Vec<u32> = flat[j * n..(j + 1) * n]
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let got: Vec<u32> = outs[j].iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "row {j}");
        }
        assert_eq!(picks, vec![700, 0, 2999]);
        let scans: Vec<u32> = outs.iter().map(|o| crate::sampling::argmax(o)).collect();
        assert_eq!(picks, scans);
    }
}
