//! Causal attention over the f16 KV cache: the query heads that share one KV
//! head (grouped-query attention) against one sequence's cached keys and
//! values.
//!
//! Layout of one (layer, KV head) stream of a sequence's cache:
//! - values: one row of `hd` halves per position;
//! - keys: transposed in tiles of [`TILE`] positions: element `i` of the 16
//!   positions of tile `t` side by side, at `(t * hd + i) * 16` ([`key_at`]).
//!   A stream holds whole tiles ([`keys_len`]).
//!
//! Why the transposed keys: a score is a dot product over the head's
//! elements, and with keys by row the SIMD kernels paid a horizontal
//! reduction per (position, head) and converted every key row once per query
//! head. With the positions of a tile in the lanes of one vector, the score
//! of 16 positions is `hd` multiply-adds of a broadcast query element into
//! one register, each tile row converted from f16 once for all the heads of
//! the group, and no reduction. (At 8 sequences attention was ~17 % of a
//! decode step and bound by the vector ports, about 15 cycles per
//! (head, position); see `attention_speed`.)
//!
//! Every lane is its own chain of operations in a fixed order (a score:
//! `q[0]·k[0]`, then `fma(q[i], k[i], s)` for `i` in order, times `scale`; an
//! output element: `fma(w[p], v[p], o)` from zero for `p` in order), so the
//! AVX-512, AVX2 and scalar kernels give the same bits, and a head's result
//! does not depend on which heads share its pass (tested). The softmax
//! between them is [`super::ops::softmax_inplace`].

#![allow(clippy::needless_range_loop)]

use super::ops::{softmax_inplace, store_f16};
use super::repack::{pick, Isa};
use half::f16;

/// Positions per key tile.
pub const TILE: usize = 16;

/// Halves a key stream with room for `positions` positions occupies.
pub fn keys_len(positions: usize, hd: usize) -> usize {
    positions.div_ceil(TILE) * TILE * hd
}

/// Where element `i` of position `p`'s key lies in a key stream.
#[inline]
pub fn key_at(hd: usize, p: usize, i: usize) -> usize {
    (p / TILE * hd + i) * TILE + p % TILE
}

/// Writes the key `k` (`hd` floats, rounded to f16) of position `p` into the
/// key stream at `keys`.
///
/// # Safety
/// `keys` points at a key stream with room for position `p`
/// (`keys_len(p + 1, k.len())` halves), and nothing else reads or writes
/// position `p` of it meanwhile.
pub unsafe fn store_key(keys: *mut f16, p: usize, k: &[f32]) {
    let hd = k.len();
    let mut h = [f16::ZERO; 64];
    for (c, part) in k.chunks(64).enumerate() {
        store_f16(part, &mut h[..part.len()]);
        for (j, &v) in h[..part.len()].iter().enumerate() {
            // SAFETY: in the stream (caller's contract).
            unsafe { *keys.add(key_at(hd, p, 64 * c + j)) = v };
        }
    }
}

/// Copies positions `start..end` of the key stream `src` into `dst` (whole
/// tiles as one block, the positions of a partial tile lane by lane; the
/// other positions of `dst` are left alone).
pub fn copy_keys<T: Copy>(dst: &mut [T], src: &[T], hd: usize, start: usize, end: usize) {
    let mut p = start;
    while p < end {
        let t = p / TILE;
        let (l0, l1) = (p % TILE, (end - t * TILE).min(TILE));
        let base = t * TILE * hd;
        if l0 == 0 && l1 == TILE {
            dst[base..base + TILE * hd].copy_from_slice(&src[base..base + TILE * hd]);
        } else {
            for i in 0..hd {
                let r = base + i * TILE;
                dst[r + l0..r + l1].copy_from_slice(&src[r + l0..r + l1]);
            }
        }
        p = t * TILE + l1;
    }
}

/// Asks for the start of a key stream (the first 4 tiles of `n` positions)
/// and its first value rows in cache, and, to be written, the lines that
/// position `n - 1`'s key and value go to: a task calls it for its next
/// item while it works on this one, so that item does not begin on a cold
/// stream or wait on its stores (the key's 64 halves are spread over the
/// 32 lines of the last tile; at 8 sequences, timed inside the tasks, the
/// key store took ~0.55 µs of an item and the value store ~0.4 µs, cold;
/// with these prefetches ~0.37 and ~0.28). A hint: nothing is read.
pub fn prefetch_start(keys: *const f16, values: *const f16, n: usize, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let all = n.div_ceil(TILE);
        let tiles = all.min(4);
        super::prefetch_bytes(keys as *const u8, tiles * tile_bytes(hd));
        super::prefetch_bytes(values as *const u8, n.min(TILE) * hd * 2);
        if n > 0 {
            let tb = tile_bytes(hd);
            super::prefetch_bytes_to_write((keys as *const u8).wrapping_add((all - 1) * tb), tb);
            super::prefetch_bytes_to_write(
                (values as *const u8).wrapping_add((n - 1) * hd * 2),
                hd * 2,
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (keys, values, n, hd);
}

/// Which kernels [`attend_heads`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The best kernels for this CPU and a head size (the SIMD ones take heads
/// of a multiple of 16 elements). `HELEXA_KERNELS` caps them as it caps the
/// matmul kernels.
pub fn kernels(hd: usize) -> Kernels {
    if !hd.is_multiple_of(16) {
        return Kernels::Scalar;
    }
    match pick() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => Kernels::Avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Kernels::Avx2,
        Isa::Scalar => Kernels::Scalar,
    }
}

/// Causal attention of the query heads `qs` (`outs.len() / hd` heads of `hd`
/// elements, sharing one KV head) over positions `0..n` of a key stream and
/// its values: `out_j = softmax(q_j · Kᵀ · scale) · V`, head `j` at
/// `outs[j * hd..]`. `scores` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn attend_heads(
    qs: &[f32],
    hd: usize,
    keys: &[f16],
    values: &[f16],
    n: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    outs: &mut [f32],
) {
    attend_with(kernels(hd), qs, hd, keys, values, n, scale, scores, outs)
}

/// [`attend_heads`] with the given kernels.
#[allow(clippy::too_many_arguments)]
pub fn attend_with(
    k: Kernels,
    qs: &[f32],
    hd: usize,
    keys: &[f16],
    values: &[f16],
    n: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    outs: &mut [f32],
) {
    assert_eq!(qs.len(), outs.len());
    assert!(hd > 0 && qs.len().is_multiple_of(hd));
    assert!(keys.len() >= keys_len(n, hd) && values.len() >= n * hd);
    if n == 0 {
        outs.fill(0.0);
        return;
    }
    if k != Kernels::Scalar {
        assert!(
            hd.is_multiple_of(16),
            "SIMD attention takes heads of 16k elements"
        );
    }
    let heads = qs.len() / hd;
    let tiles = n.div_ceil(TILE);
    let np = tiles * TILE;
    scores.clear();
    scores.resize(heads * np, 0.0);
    match k {
        // SAFETY (both): the CPU has the features (`kernels` checked them or
        // the caller did); `keys` holds `tiles` whole tiles, `values` `n`
        // rows, `scores` `heads * np`, `outs` `heads * hd`; hd % 16 == 0.
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512 => unsafe {
            avx512::scores(qs, hd, keys.as_ptr(), values.as_ptr(), tiles, scale, scores)
        },
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2 => unsafe {
            avx2::scores(qs, hd, keys.as_ptr(), values.as_ptr(), tiles, scale, scores)
        },
        Kernels::Scalar => scalar_scores(qs, hd, keys, n, scale, scores),
    }
    for s in scores.chunks_exact_mut(np) {
        softmax_inplace(&mut s[..n]);
    }
    match k {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512 => unsafe { avx512::values(scores, np, hd, values.as_ptr(), n, outs) },
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2 => unsafe { avx2::values(scores, np, hd, values.as_ptr(), n, outs) },
        Kernels::Scalar => scalar_values(scores, np, hd, values, n, outs),
    }
}

/// The reference: each lane's chain as the SIMD kernels run it.
fn scalar_scores(qs: &[f32], hd: usize, keys: &[f16], n: usize, scale: f32, out: &mut [f32]) {
    let np = n.next_multiple_of(TILE);
    for (q, o) in qs.chunks_exact(hd).zip(out.chunks_exact_mut(np)) {
        for (p, s) in o[..n].iter_mut().enumerate() {
            let mut a = q[0] * keys[key_at(hd, p, 0)].to_f32();
            for i in 1..hd {
                a = q[i].mul_add(keys[key_at(hd, p, i)].to_f32(), a);
            }
            *s = a * scale;
        }
    }
}

fn scalar_values(w: &[f32], np: usize, hd: usize, values: &[f16], n: usize, outs: &mut [f32]) {
    for (wj, o) in w.chunks_exact(np).zip(outs.chunks_exact_mut(hd)) {
        for (e, oe) in o.iter_mut().enumerate() {
            let mut a = 0f32;
            for p in 0..n {
                a = wj[p].mul_add(values[p * hd + e].to_f32(), a);
            }
            *oe = a;
        }
    }
}

/// Bytes of one key tile.
#[cfg(target_arch = "x86_64")]
fn tile_bytes(hd: usize) -> usize {
    TILE * hd * std::mem::size_of::<f16>()
}

/// What to prefetch while tiles `t0..t0 + t` are scored: the next `t`
/// tiles' keys and the values of these tiles' positions (both `t` tiles'
/// worth of bytes, contiguous; hints, so running past the stream is fine).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn ahead(
    hd: usize,
    keys: *const f16,
    values: *const f16,
    t0: usize,
    t: usize,
) -> (*const u8, *const u8) {
    let tb = tile_bytes(hd);
    (
        (keys as *const u8).wrapping_add((t0 + t) * tb),
        (values as *const u8).wrapping_add(t0 * tb),
    )
}

#[cfg(target_arch = "x86_64")]
use super::{prefetch_bytes, prefetch_bytes_to_l2};

/// Runs `$body` for each pass over the heads: `$hn` (up to 4) heads from
/// head `$h0`.
macro_rules! by_heads {
    ($heads:expr, |$h0:ident, $hn:ident| $body:expr) => {{
        let mut $h0 = 0;
        while $h0 < $heads {
            let $hn = ($heads - $h0).min(4);
            $body;
            $h0 += $hn;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn row(p: *const f16) -> __m512 {
        // SAFETY: 16 halves readable (caller).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }

    /// Scores of every head over `tiles` whole tiles into `out` (`heads`
    /// rows of `tiles * 16`).
    ///
    /// # Safety
    /// AVX-512F/F16C; sizes as [`attend_with`] checks them.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn scores(
        qs: &[f32],
        hd: usize,
        keys: *const f16,
        values: *const f16,
        tiles: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let heads = qs.len() / hd;
        let np = tiles * TILE;
        by_heads!(heads, |h0, hn| {
            let q = qs[h0 * hd..].as_ptr();
            let o = out[h0 * np..].as_mut_ptr();
            // SAFETY: heads h0..h0 + hn of `qs` and of `out`.
            unsafe {
                match hn {
                    1 => tiles_of::<1, 4>(q, hd, keys, values, tiles, scale, o, np),
                    2 => tiles_of::<2, 4>(q, hd, keys, values, tiles, scale, o, np),
                    3 => tiles_of::<3, 4>(q, hd, keys, values, tiles, scale, o, np),
                    _ => tiles_of::<4, 3>(q, hd, keys, values, tiles, scale, o, np),
                }
            }
        });
    }

    /// `H` heads, `T` (at most 4) tiles at a time (`H * T` independent
    /// chains), the rest in one block of fewer.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles_of<const H: usize, const T: usize>(
        q: *const f32,
        hd: usize,
        keys: *const f16,
        values: *const f16,
        tiles: usize,
        scale: f32,
        out: *mut f32,
        np: usize,
    ) {
        let first = keys as *const u8;
        prefetch_bytes(first, T.min(tiles) * tile_bytes(hd));
        let mut t = 0;
        while t + T <= tiles {
            unsafe { block::<H, T>(q, hd, keys, values, t, scale, out, np) };
            t += T;
        }
        // The last 1..T tiles in one block too: tile by tile, `H` chains
        // (3 for SmolLM2's groups) left the FMA units waiting on each
        // chain's latency.
        unsafe {
            match tiles - t {
                0 => {}
                1 => block::<H, 1>(q, hd, keys, values, t, scale, out, np),
                2 => block::<H, 2>(q, hd, keys, values, t, scale, out, np),
                _ => block::<H, 3>(q, hd, keys, values, t, scale, out, np),
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const H: usize, const T: usize>(
        q: *const f32,
        hd: usize,
        keys: *const f16,
        values: *const f16,
        t0: usize,
        scale: f32,
        out: *mut f32,
        np: usize,
    ) {
        unsafe {
            let at = |t: usize, i: usize| keys.add(((t0 + t) * hd + i) * TILE);
            let k0: [__m512; T] = std::array::from_fn(|t| row(at(t, 0)));
            let mut acc: [[__m512; T]; H] = std::array::from_fn(|h| {
                let qb = _mm512_set1_ps(*q.add(h * hd));
                std::array::from_fn(|t| _mm512_mul_ps(qb, k0[t]))
            });
            // Spread over the loop: the next tiles' keys, and the values
            // of these tiles' positions for the weighted sum.
            let (next, vals) = ahead(hd, keys, values, t0, T);
            let per = T * 32;
            for i in 1..hd {
                prefetch_bytes_to_l2(next.wrapping_add(i * per), per);
                prefetch_bytes_to_l2(vals.wrapping_add(i * per), per);
                let k: [__m512; T] = std::array::from_fn(|t| row(at(t, i)));
                for (h, a) in acc.iter_mut().enumerate() {
                    let qb = _mm512_set1_ps(*q.add(h * hd + i));
                    for t in 0..T {
                        a[t] = _mm512_fmadd_ps(qb, k[t], a[t]);
                    }
                }
            }
            let vs = _mm512_set1_ps(scale);
            for (h, a) in acc.iter().enumerate() {
                for t in 0..T {
                    _mm512_storeu_ps(out.add(h * np + (t0 + t) * TILE), _mm512_mul_ps(a[t], vs));
                }
            }
        }
    }

    /// `outs[j] = Σ_p w[j][p] · values[p]` for every head (`w`: `heads`
    /// rows of `np`).
    ///
    /// # Safety
    /// AVX-512F/F16C; sizes as [`attend_with`] checks them.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn values(
        w: &[f32],
        np: usize,
        hd: usize,
        values: *const f16,
        n: usize,
        outs: &mut [f32],
    ) {
        let heads = outs.len() / hd;
        by_heads!(heads, |h0, hn| {
            // Up to 64 elements (4 vectors) of the heads at a time.
            let mut e0 = 0;
            while e0 < hd {
                let vn = ((hd - e0) / 16).min(4);
                let wp = w[h0 * np..].as_ptr();
                let o = outs[h0 * hd + e0..].as_mut_ptr();
                let v = values.wrapping_add(e0);
                macro_rules! go {
                    ($h:literal) => {
                        // SAFETY: heads h0..h0 + hn, elements e0..e0 + 16 vn.
                        unsafe {
                            match vn {
                                1 => part::<$h, 1>(wp, np, hd, v, n, o),
                                2 => part::<$h, 2>(wp, np, hd, v, n, o),
                                3 => part::<$h, 3>(wp, np, hd, v, n, o),
                                _ => part::<$h, 4>(wp, np, hd, v, n, o),
                            }
                        }
                    };
                }
                match hn {
                    1 => go!(1),
                    2 => go!(2),
                    3 => go!(3),
                    _ => go!(4),
                }
                e0 += 16 * vn;
            }
        });
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn part<const H: usize, const V: usize>(
        w: *const f32,
        np: usize,
        hd: usize,
        values: *const f16,
        n: usize,
        out: *mut f32,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; H];
            for p in 0..n {
                let r = values.add(p * hd);
                let v: [__m512; V] = std::array::from_fn(|c| row(r.add(16 * c)));
                for (h, a) in acc.iter_mut().enumerate() {
                    let wb = _mm512_set1_ps(*w.add(h * np + p));
                    for c in 0..V {
                        a[c] = _mm512_fmadd_ps(wb, v[c], a[c]);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                for c in 0..V {
                    _mm512_storeu_ps(out.add(h * hd + 16 * c), a[c]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn row8(p: *const f16) -> __m256 {
        // SAFETY: 8 halves readable (caller).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    /// As `avx512::scores`, a tile as two 8-lane halves, one tile at a time
    /// (16 registers: `2 H` chains, the two halves of the tile row and the
    /// broadcast query element).
    ///
    /// # Safety
    /// AVX2/FMA/F16C; sizes as [`attend_with`] checks them.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores(
        qs: &[f32],
        hd: usize,
        keys: *const f16,
        values: *const f16,
        tiles: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let heads = qs.len() / hd;
        let np = tiles * TILE;
        by_heads!(heads, |h0, hn| {
            let q = qs[h0 * hd..].as_ptr();
            let o = out[h0 * np..].as_mut_ptr();
            for t in 0..tiles {
                // SAFETY: heads h0..h0 + hn of `qs` and `out`; tile t.
                unsafe {
                    match hn {
                        1 => tile::<1>(q, hd, keys, values, t, scale, o, np),
                        2 => tile::<2>(q, hd, keys, values, t, scale, o, np),
                        3 => tile::<3>(q, hd, keys, values, t, scale, o, np),
                        _ => tile::<4>(q, hd, keys, values, t, scale, o, np),
                    }
                }
            }
        });
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const H: usize>(
        q: *const f32,
        hd: usize,
        keys: *const f16,
        values: *const f16,
        t: usize,
        scale: f32,
        out: *mut f32,
        np: usize,
    ) {
        unsafe {
            let at = |i: usize| keys.add((t * hd + i) * TILE);
            let (k0, k1) = (row8(at(0)), row8(at(0).add(8)));
            let mut acc: [[__m256; 2]; H] = std::array::from_fn(|h| {
                let qb = _mm256_set1_ps(*q.add(h * hd));
                [_mm256_mul_ps(qb, k0), _mm256_mul_ps(qb, k1)]
            });
            let (next, vals) = ahead(hd, keys, values, t, 1);
            for i in 1..hd {
                prefetch_bytes_to_l2(next.wrapping_add(i * 32), 32);
                prefetch_bytes_to_l2(vals.wrapping_add(i * 32), 32);
                let (k0, k1) = (row8(at(i)), row8(at(i).add(8)));
                for (h, a) in acc.iter_mut().enumerate() {
                    let qb = _mm256_set1_ps(*q.add(h * hd + i));
                    a[0] = _mm256_fmadd_ps(qb, k0, a[0]);
                    a[1] = _mm256_fmadd_ps(qb, k1, a[1]);
                }
            }
            let vs = _mm256_set1_ps(scale);
            for (h, a) in acc.iter().enumerate() {
                let o = out.add(h * np + t * TILE);
                _mm256_storeu_ps(o, _mm256_mul_ps(a[0], vs));
                _mm256_storeu_ps(o.add(8), _mm256_mul_ps(a[1], vs));
            }
        }
    }

    /// As `avx512::values`, 16 elements (two vectors) of up to 4 heads at a
    /// time.
    ///
    /// # Safety
    /// AVX2/FMA/F16C; sizes as [`attend_with`] checks them.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn values(
        w: &[f32],
        np: usize,
        hd: usize,
        values: *const f16,
        n: usize,
        outs: &mut [f32],
    ) {
        let heads = outs.len() / hd;
        by_heads!(heads, |h0, hn| {
            for e0 in (0..hd).step_by(16) {
                let wp = w[h0 * np..].as_ptr();
                let o = outs[h0 * hd + e0..].as_mut_ptr();
                let v = values.wrapping_add(e0);
                // SAFETY: heads h0..h0 + hn, elements e0..e0 + 16.
                unsafe {
                    match hn {
                        1 => part::<1>(wp, np, hd, v, n, o),
                        2 => part::<2>(wp, np, hd, v, n, o),
                        3 => part::<3>(wp, np, hd, v, n, o),
                        _ => part::<4>(wp, np, hd, v, n, o),
                    }
                }
            }
        });
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn part<const H: usize>(
        w: *const f32,
        np: usize,
        hd: usize,
        values: *const f16,
        n: usize,
        out: *mut f32,
    ) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; H];
            for p in 0..n {
                let r = values.add(p * hd);
                let (v0, v1) = (row8(r), row8(r.add(8)));
                for (h, a) in acc.iter_mut().enumerate() {
                    let wb = _mm256_set1_ps(*w.add(h * np + p));
                    a[0] = _mm256_fmadd_ps(wb, v0, a[0]);
                    a[1] = _mm256_fmadd_ps(wb, v1, a[1]);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(h * hd), a[0]);
                _mm256_storeu_ps(out.add(h * hd + 8), a[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, f: f32, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + seed as f32 * 7.3) * f).sin() * (1.0 + (i % 5) as f32 * 0.3))
            .collect()
    }

    /// `n` keys and values of `hd` (by row, f32) as a cache holds them: the
    /// key stream (with `junk` in the unused lanes of the last tile) and the
    /// value rows, both f16, and the f16 values back as f32 by row.
    #[allow(clippy::type_complexity)]
    fn cache(
        n: usize,
        hd: usize,
        seed: u64,
        junk: f16,
    ) -> (Vec<f16>, Vec<f16>, Vec<f32>, Vec<f32>) {
        let k = wave(n * hd, 0.071, seed);
        let v = wave(n * hd, 0.029, seed + 1);
        let mut ks = vec![junk; keys_len(n, hd)];
        for p in 0..n {
            // SAFETY: the stream has room for position p; one thread.
            unsafe { store_key(ks.as_mut_ptr(), p, &k[p * hd..(p + 1) * hd]) };
        }
        let mut vs = vec![f16::ZERO; n * hd];
        store_f16(&v, &mut vs);
        let kr: Vec<f32> = k.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let vr: Vec<f32> = vs.iter().map(|x| x.to_f32()).collect();
        (ks, vs, kr, vr)
    }

    /// Plain attention in f64 over keys and values by row.
    fn reference(q: &[f32], k: &[f32], v: &[f32], n: usize, scale: f32) -> Vec<f32> {
        let hd = q.len();
        let s: Vec<f64> = (0..n)
            .map(|p| {
                (0..hd)
                    .map(|i| q[i] as f64 * k[p * hd + i] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..hd)
            .map(|i| {
                (0..n)
                    .map(|p| e[p] / sum * v[p * hd + i] as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }

    fn all_kernels(hd: usize) -> Vec<Kernels> {
        let mut ks = vec![Kernels::Scalar];
        #[cfg(target_arch = "x86_64")]
        if hd.is_multiple_of(16) {
            if super::super::quant::has_avx2() {
                ks.push(Kernels::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") && super::super::quant::has_avx2() {
                ks.push(Kernels::Avx512);
            }
        }
        ks
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|f| f.to_bits()).collect()
    }

    #[test]
    fn keys_go_where_key_at_says_and_round_to_f16() {
        let (n, hd) = (37, 80);
        let (ks, _, kr, _) = cache(n, hd, 3, f16::NAN);
        assert_eq!(ks.len(), 48 * hd);
        for p in 0..n {
            for i in 0..hd {
                assert_eq!(ks[key_at(hd, p, i)].to_f32(), kr[p * hd + i], "p {p} i {i}");
            }
        }
        // The rest of the last tile is untouched.
        for p in n..48 {
            assert!(ks[key_at(hd, p, 0)].is_nan());
        }
    }

    #[test]
    fn every_kernel_set_gives_the_same_bits_close_to_plain_attention() {
        for hd in [64usize, 128, 32, 80, 24] {
            for heads in [1usize, 2, 3, 4, 5, 7, 9] {
                for n in [1usize, 3, 15, 16, 17, 33, 48, 136] {
                    // NaN in the unused lanes: they must never reach a result.
                    let (ks, vs, kr, vr) = cache(n, hd, n as u64, f16::NAN);
                    let qs = wave(heads * hd, 0.13, hd as u64 + heads as u64);
                    let mut first: Option<Vec<u32>> = None;
                    for k in all_kernels(hd) {
                        let mut out = vec![f32::NAN; heads * hd];
                        let mut sc = Vec::new();
                        attend_with(k, &qs, hd, &ks, &vs, n, 0.125, &mut sc, &mut out);
                        for j in 0..heads {
                            let want = reference(&qs[j * hd..][..hd], &kr, &vr, n, 0.125);
                            for (i, (&g, &w)) in out[j * hd..][..hd].iter().zip(&want).enumerate() {
                                assert!(
                                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                    "{k:?} hd {hd} heads {heads} n {n} head {j} [{i}]: {g} vs {w}"
                                );
                            }
                            // Alone, the head gets the bits it got in its group.
                            let mut alone = vec![0f32; hd];
                            attend_with(
                                k,
                                &qs[j * hd..][..hd],
                                hd,
                                &ks,
                                &vs,
                                n,
                                0.125,
                                &mut sc,
                                &mut alone,
                            );
                            assert_eq!(bits(&alone), bits(&out[j * hd..][..hd]), "{k:?} alone");
                        }
                        match &first {
                            None => first = Some(bits(&out)),
                            Some(f) => assert_eq!(f, &bits(&out), "{k:?} hd {hd} n {n}"),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn copying_keys_moves_exactly_the_positions_asked() {
        let hd = 8;
        let len = keys_len(70, hd);
        let src: Vec<u32> = (0..len as u32).collect();
        for (start, end) in [
            (0, 70),
            (0, 16),
            (3, 9),
            (5, 40),
            (16, 32),
            (17, 64),
            (31, 33),
        ] {
            let mut dst = vec![u32::MAX; len];
            copy_keys(&mut dst, &src, hd, start, end);
            for p in 0..70 {
                for i in 0..hd {
                    let at = key_at(hd, p, i);
                    let want = if (start..end).contains(&p) {
                        src[at]
                    } else {
                        u32::MAX
                    };
                    assert_eq!(dst[at], want, "{start}..{end}: p {p} i {i}");
                }
            }
        }
    }

    /// `cargo test --release -p helexa-engine --lib attention_speed -- --ignored --nocapture`:
    /// ns per (query head, cached position) of one KV group of SmolLM2's
    /// shape (3 query heads of 64 over an f16 cache), per kernel set.
    #[test]
    #[ignore = "timing, prints figures"]
    fn attention_speed() {
        let (hd, heads) = (64usize, 3usize);
        for n in [136usize, 170, 1000] {
            let (ks, vs, _, _) = cache(n, hd, 5, f16::ZERO);
            let qs = wave(heads * hd, 0.13, 5);
            let mut out = vec![0f32; heads * hd];
            let mut sc = Vec::new();
            let reps = 20_000_000 / (n * heads);
            for k in all_kernels(hd) {
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    attend_with(k, &qs, hd, &ks, &vs, n, 0.125, &mut sc, &mut out);
                }
                let ns = t.elapsed().as_nanos() as f64 / (reps * heads * n) as f64;
                println!("n {n} {k:?}: {ns:.3} ns per head-position");
            }
        }
    }
}
