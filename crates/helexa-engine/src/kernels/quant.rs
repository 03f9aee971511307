//! Block formats of the quantized weights we have fast kernels for, the
//! int8 activation quantizers that pair with them, and their dot products.
//!
//! Layouts are byte-identical to ggml's (and candle's `k_quants` blocks), so a
//! memory-mapped GGUF tensor can be viewed as a slice of these. Q4_0 weights
//! are multiplied here (a scalar reference and, on x86-64, an AVX2+FMA
//! version chosen at run time; the unit tests check one against the other).
//! Q4_1 and Q8_0 weights are repacked at load and multiplied by the kernels
//! in `repack.rs`; their scalar dots here are those kernels' test reference.

// Index loops read more plainly than iterator chains in these kernels.
#![allow(clippy::needless_range_loop)]

use half::f16;

pub const QK: usize = 32;

/// 4-bit weights, scale only: `x = d * (q - 8)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// 4-bit weights, scale and min: `x = d * q + m`.
/// Element `j < 16` is the low nibble of `qs[j]`, element `j + 16` its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// 8-bit, scale only.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// 8-bit with `s = d * sum(qs)`, the partner of Q4_1.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

impl BlockQ8_0 {
    pub const ZERO: BlockQ8_0 = BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; QK],
    };
}

impl BlockQ8_1 {
    pub const ZERO: BlockQ8_1 = BlockQ8_1 {
        d: f16::ZERO,
        s: f16::ZERO,
        qs: [0; QK],
    };
}

#[inline]
fn amax(xs: &[f32]) -> f32 {
    xs.iter().fold(0f32, |a, &x| a.max(x.abs()))
}

/// Quantizes one row (length a multiple of 32) to Q8_0 blocks.
pub fn quantize_q8_0(xs: &[f32], ys: &mut [BlockQ8_0]) {
    debug_assert_eq!(xs.len(), ys.len() * QK);
    for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
        let x: &[f32; QK] = x.try_into().expect("a block of 32");
        let (d, _) = quantize_block(x, &mut y.qs);
        y.d = f16::from_f32(d);
    }
}

/// Quantizes one row (length a multiple of 32) to Q8_1 blocks.
pub fn quantize_q8_1(xs: &[f32], ys: &mut [BlockQ8_1]) {
    debug_assert_eq!(xs.len(), ys.len() * QK);
    for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
        let x: &[f32; QK] = x.try_into().expect("a block of 32");
        let (d, sum) = quantize_block(x, &mut y.qs);
        y.d = f16::from_f32(d);
        y.s = f16::from_f32(sum as f32 * d);
    }
}

/// `qs = round(x / d)` with `d = max|x| / 127` (ties to even, as llama.cpp's
/// AVX2 quantizer rounds); returns `d` and `sum(qs)`. The AVX2 version and
/// the plain loop give the same bits.
#[inline]
fn quantize_block(x: &[f32; QK], qs: &mut [i8; QK]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/FMA present.
        return unsafe { avx2::quantize_block(x, qs) };
    }
    let d = amax(x) / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
        sum += *q as i32;
    }
    (d, sum)
}

#[cfg(test)]
pub fn dequantize_q4_1(xs: &[BlockQ4_1], ys: &mut [f32]) {
    for (b, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        let m = b.m.to_f32();
        for j in 0..QK / 2 {
            y[j] = (b.qs[j] & 0x0F) as f32 * d + m;
            y[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
        }
    }
}

pub fn dequantize_q4_0(xs: &[BlockQ4_0], ys: &mut [f32]) {
    for (b, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for j in 0..QK / 2 {
            y[j] = ((b.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            y[j + QK / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

#[cfg(test)]
pub fn dequantize_q8_0(xs: &[BlockQ8_0], ys: &mut [f32]) {
    for (b, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, &q) in y.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
}

// ---------------------------------------------------------------- scalar dots

#[cfg(test)]
pub fn dot_q4_1_q8_1_scalar(xs: &[BlockQ4_1], ys: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in xs.iter().zip(ys) {
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            isum += (x.qs[j] & 0x0F) as i32 * y.qs[j] as i32;
            isum += (x.qs[j] >> 4) as i32 * y.qs[j + QK / 2] as i32;
        }
        sum += isum as f32 * x.d.to_f32() * y.d.to_f32() + x.m.to_f32() * y.s.to_f32();
    }
    sum
}

pub fn dot_q4_0_q8_0_scalar(xs: &[BlockQ4_0], ys: &[BlockQ8_0]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in xs.iter().zip(ys) {
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            isum += ((x.qs[j] & 0x0F) as i32 - 8) * y.qs[j] as i32;
            isum += ((x.qs[j] >> 4) as i32 - 8) * y.qs[j + QK / 2] as i32;
        }
        sum += isum as f32 * x.d.to_f32() * y.d.to_f32();
    }
    sum
}

#[cfg(test)]
pub fn dot_q8_0_q8_0_scalar(xs: &[BlockQ8_0], ys: &[BlockQ8_0]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in xs.iter().zip(ys) {
        let isum: i32 =
            x.qs.iter()
                .zip(&y.qs)
                .map(|(&a, &b)| a as i32 * b as i32)
                .sum();
        sum += isum as f32 * x.d.to_f32() * y.d.to_f32();
    }
    sum
}

// ------------------------------------------------------------------ dispatch

#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // F16C too: the attention kernels and the KV store convert f16 with
        // it (every AVX2 CPU has it).
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[inline]
pub fn dot_q4_0(xs: &[BlockQ4_0], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        unsafe { avx2::dot_q4_0_multi(xs, ys, out) };
        return;
    }
    for (o, y) in out.iter_mut().zip(ys) {
        *o = dot_q4_0_q8_0_scalar(xs, y);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Up to this many activation rows per weight-row pass.
    pub const MAX_ROWS: usize = 4;

    /// Weight blocks are prefetched this many blocks ahead of the one being
    /// used (~0.6–1.1 KB). Decode streams every weight once per token and
    /// `perf annotate` showed the kernels stalled on those loads; with this,
    /// single-stream decode of the default model at 1 thread went from 25 to
    /// 36 tok/s (docs/benchmarks.md). Past a row's end it touches the next
    /// row, which is what comes next anyway.
    const PREFETCH_BLOCKS: usize = 32;

    #[inline(always)]
    fn prefetch_ahead<T>(x: &T) {
        // `wrapping_add`: the address may lie past the slice (or the
        // mapping); a prefetch never faults, and no reference is formed.
        let p = (x as *const T).wrapping_add(PREFETCH_BLOCKS) as *const i8;
        // SAFETY: `_mm_prefetch` is a hint: it reads nothing architecturally
        // and cannot fault, whatever the address; SSE is part of x86_64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
    }

    /// As the plain loop of [`super::quantize_block`], same bits.
    ///
    /// # Safety
    /// AVX2/FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_block(x: &[f32; QK], qs: &mut [i8; QK]) -> (f32, i32) {
        let p = x.as_ptr();
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(p.add(8 * i)) });
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let mut m = _mm256_and_ps(v[0], abs);
        for vi in &v[1..] {
            m = _mm256_max_ps(m, _mm256_and_ps(*vi, abs));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
        let d = _mm_cvtss_f32(m1) / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q: [__m256i; 4] = std::array::from_fn(|i| {
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(_mm256_mul_ps(v[i], id)))
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2));
        // i32 -> i8 with saturation; the packs interleave 128-bit lanes,
        // the permute puts the eight 4-byte groups back in order.
        let w01 = _mm256_packs_epi32(q[0], q[1]);
        let w23 = _mm256_packs_epi32(q[2], q[3]);
        let b = _mm256_packs_epi16(w01, w23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        unsafe { _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, b) };
        (d, _mm_cvtsi128_si32(s1))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(hi, _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 16 packed bytes -> 32 bytes: low nibbles in lanes 0..16, high in 16..32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
        let lo = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let hi = _mm_srli_epi16(lo, 4);
        let both = _mm256_set_m128i(hi, lo);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// Sum of u8*i8 products of 32 lanes, as 8 f32 partial sums.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn madd_u8_i8(u: __m256i, s: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(u, s);
        let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        _mm256_cvtepi32_ps(p32)
    }

    /// Sum of i8*i8 products of 32 lanes (no -128 in `x`), as 8 f32 partial sums.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn madd_i8_i8(x: __m256i, y: __m256i) -> __m256 {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        madd_u8_i8(ax, sy)
    }

    /// # Safety
    /// AVX2 and FMA must be available; `ys.len() == out.len() <= 4`, each
    /// `ys[i].len() >= xs.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_0_multi(xs: &[BlockQ4_0], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
        // Row counts as constants keep the accumulators in registers.
        unsafe {
            match ys.len() {
                1 => dot_q4_0_r::<1>(xs, ys, out),
                2 => dot_q4_0_r::<2>(xs, ys, out),
                3 => dot_q4_0_r::<3>(xs, ys, out),
                _ => dot_q4_0_r::<4>(xs, ys, out),
            }
        }
    }

    /// # Safety
    /// As [`dot_q4_0_multi`], with `ys.len() == out.len() == R`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q4_0_r<const R: usize>(xs: &[BlockQ4_0], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
        let n = R;
        debug_assert!(n <= MAX_ROWS && out.len() == n && ys.len() == n);
        let mut acc = [_mm256_setzero_ps(); R];
        let yrows: [&[_]; R] = std::array::from_fn(|r| ys[r]);
        let eight = _mm256_set1_epi8(8);
        for (b, x) in xs.iter().enumerate() {
            prefetch_ahead(x);
            let xd = x.d.to_f32();
            let qx = _mm256_sub_epi8(unsafe { unpack_nibbles(x.qs.as_ptr()) }, eight);
            for r in 0..n {
                let y = unsafe { yrows[r].get_unchecked(b) };
                let qy = unsafe { _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i) };
                let p = madd_i8_i8(qx, qy);
                let d = _mm256_set1_ps(xd * y.d.to_f32());
                acc[r] = _mm256_fmadd_ps(d, p, acc[r]);
            }
        }
        for r in 0..n {
            out[r] = hsum(acc[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn q4_1_from(xs: &[f32]) -> Vec<BlockQ4_1> {
        xs.chunks_exact(QK)
            .map(|x| {
                let min = x.iter().cloned().fold(f32::INFINITY, f32::min);
                let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let mut qs = [0u8; 16];
                for j in 0..16 {
                    let a = (((x[j] - min) * id).round() as u8).min(15);
                    let b = (((x[j + 16] - min) * id).round() as u8).min(15);
                    qs[j] = a | (b << 4);
                }
                BlockQ4_1 {
                    d: f16::from_f32(d),
                    m: f16::from_f32(min),
                    qs,
                }
            })
            .collect()
    }

    #[test]
    fn q4_1_scalar_dot_matches_the_float_dot() {
        let k = 576;
        let w = rng_vec(k, 1);
        let wq = q4_1_from(&w);
        let mut wd = vec![0f32; k];
        dequantize_q4_1(&wq, &mut wd);
        for (a, b) in w.iter().zip(&wd) {
            assert!((a - b).abs() < 0.1);
        }
        let rows: Vec<Vec<BlockQ8_1>> = (0..4)
            .map(|i| {
                let a = rng_vec(k, 10 + i);
                let mut q = vec![BlockQ8_1::ZERO; k / QK];
                quantize_q8_1(&a, &mut q);
                q
            })
            .collect();
        // And against the float dot.
        let a = rng_vec(k, 10);
        let exact: f32 = wd.iter().zip(&a).map(|(x, y)| x * y).sum();
        // (The repacked kernels are checked against this scalar dot in
        // `repack.rs`.)
        let got = dot_q4_1_q8_1_scalar(&wq, &rows[0]);
        assert!(
            (got - exact).abs() < 0.05 * (1.0 + exact.abs()),
            "{got} {exact}"
        );
    }

    #[test]
    fn q4_0_kernel_matches_scalar() {
        let k = 1536;
        let w = rng_vec(k, 3);
        let mut w8 = vec![BlockQ8_0::ZERO; k / QK];
        quantize_q8_0(&w, &mut w8);
        let w4: Vec<BlockQ4_0> = w8
            .iter()
            .map(|b| {
                let mut qs = [0u8; 16];
                for j in 0..16 {
                    let lo = ((b.qs[j] as i32 / 16) + 8).clamp(0, 15) as u8;
                    let hi = ((b.qs[j + 16] as i32 / 16) + 8).clamp(0, 15) as u8;
                    qs[j] = lo | (hi << 4);
                }
                BlockQ4_0 {
                    d: f16::from_f32(b.d.to_f32() * 16.0),
                    qs,
                }
            })
            .collect();
        let rows: Vec<Vec<BlockQ8_0>> = (0..3)
            .map(|i| {
                let a = rng_vec(k, 20 + i);
                let mut q = vec![BlockQ8_0::ZERO; k / QK];
                quantize_q8_0(&a, &mut q);
                q
            })
            .collect();
        let refs: Vec<&[BlockQ8_0]> = rows.iter().map(|r| r.as_slice()).collect();
        let mut out = vec![0f32; 3];
        dot_q4_0(&w4, &refs, &mut out);
        for r in 0..3 {
            let s = dot_q4_0_q8_0_scalar(&w4, refs[r]);
            assert!((out[r] - s).abs() <= 1e-3 * (1.0 + s.abs()));
        }
    }

    #[test]
    fn activation_quantizer_gives_the_plain_loops_bits() {
        let mut seed = 11u64;
        for case in 0..200 {
            let scale = [1e-6f32, 0.01, 1.0, 37.0, 1e4][case % 5];
            let x: [f32; QK] = std::array::from_fn(|i| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale;
                // Some exact ties and zeros.
                match (case + i) % 13 {
                    0 => 0.0,
                    1 => scale * 0.5,
                    _ => v,
                }
            });
            let mut plain = [0i8; QK];
            let d = amax(&x) / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0;
            for (q, &v) in plain.iter_mut().zip(&x) {
                *q = (v * id).round_ties_even() as i8;
                sum += *q as i32;
            }
            let mut got = [0i8; QK];
            let (gd, gs) = quantize_block(&x, &mut got);
            assert_eq!(
                (got, gd.to_bits(), gs),
                (plain, d.to_bits(), sum),
                "case {case}"
            );
        }
        let mut got = [1i8; QK];
        assert_eq!(quantize_block(&[0.0; QK], &mut got), (0.0, 0));
        assert_eq!(got, [0; QK]);
    }
}
