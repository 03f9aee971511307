//! f32 vector operations of the forward pass (norms, attention inner loops,
//! activations). AVX2+FMA when the CPU has it, plain loops otherwise; both
//! are deterministic, so a row's result never depends on what else is batched.

use super::quant::has_avx2;

/// `sum(a[i] * b[i])`.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/FMA present.
        return unsafe { avx2::dot(a, b) };
    }
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

/// `out = x / rms(x) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = dot(x, x);
    let scale = 1.0 / ((ss / x.len() as f32) + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// In-place RMS norm.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let ss = dot(x, x);
    let scale = 1.0 / ((ss / x.len() as f32) + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}

/// `g = silu(g) * u`, with `silu(a) = a / (1 + e^-a)` in f32 and `e^-a`
/// exactly as the C library's `expf` gives it. (A vectorised approximation,
/// `avx2::exp8` with 2e-7 relative error, flipped a near-tie in the greedy
/// parity fixtures, `tests/parity.rs` "chat_repeat_fox".) On AVX2 machines
/// eight lanes at a time by [`avx2::expf8`], which reproduces glibc's
/// `expf` bit for bit (checked over every f32 by `expf8_is_glibc_expf`);
/// with AVX-512, sixteen by `avx512::expf16`, the same operations eight
/// doubles to a register (`expf16_is_glibc_expf`): the SiLU region of an
/// 8-sequence decode step 355–371 → 280–298 µs, one sequence's 72–75 →
/// 61–67 (`HELEXA_REGION_TIMES=1`).
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if cfg!(target_env = "gnu") {
        if has_avx512() {
            done = g.len() / 16 * 16;
            // SAFETY: AVX-512F present; both slices hold `done` elements.
            unsafe { avx512::silu_mul(&mut g[..done], &u[..done]) };
        }
        if has_avx2() {
            let end = done + (g.len() - done) / 8 * 8;
            // SAFETY: AVX2/FMA present; both slices hold `end` elements.
            unsafe { avx2::silu_mul(&mut g[done..end], &u[done..end]) };
            done = end;
        }
    }
    for (a, &b) in g[done..].iter_mut().zip(&u[done..]) {
        *a = silu1(*a) * b;
    }
}

#[inline]
fn silu1(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

/// `x += y`.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Softmax in place; returns nothing, `xs` sums to 1 afterwards.
pub fn softmax_inplace(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/FMA present.
        unsafe {
            let max = avx2::max(xs);
            let sum = avx2::exp_shifted(xs, max);
            avx2::scale(xs, 1.0 / sum);
        }
        return;
    }
    let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in xs.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in xs.iter_mut() {
        *v *= inv;
    }
}

/// `dst[i] = f16(src[i])`, rounded to nearest even: the KV cache's element
/// type (half the memory, and half the bytes read per step, of f32;
/// llama.cpp's default cache type too).
pub fn store_f16(src: &[f32], dst: &mut [half::f16]) {
    assert_eq!(src.len(), dst.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // `half` converts in software here (its F16C path needs a
        // build-time target feature): ~5 ns an element, half a
        // millisecond of every 8-sequence decode step in the KV store.
        // F16C rounds to nearest even, as `half` does: the same bits.
        done = src.len() / 8 * 8;
        // SAFETY: AVX2/F16C present; `done <= len` of both slices.
        unsafe { avx2::f32_to_f16(&src[..done], dst.as_mut_ptr().cast()) };
    }
    use half::slice::HalfFloatSliceExt;
    dst[done..].convert_from_f32_slice(&src[done..]);
}

/// Rotary position embedding of one head in place, by the angles whose
/// cosines and sines are `cos` and `sin` (`half` = `cos.len()` pairs, the
/// first `2 · half` elements of `v`): pairs `(v[2i], v[2i + 1])` when
/// `interleaved` (llama.cpp's "normal" RoPE of GGUF llama models), else
/// `(v[i], v[i + half])` (NeoX). `a' = a·c − b·s`, `b' = a·s + b·c`, each
/// product rounded before the sum (no fused multiply-add), so the AVX2 path
/// gives the plain loop's bits (`rope_simd_gives_the_plain_loops_bits`).
/// Eight lanes at a time: four heads of 64 (a decode step's attention
/// item, SmolLM2) in 24.5 ns against 110 for the interleaved loop
/// (`rope_speed`); small beside the ~0.9 µs such an item spends preparing
/// (docs/benchmarks.md, ninth session).
pub fn rope(v: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    assert!(sin.len() == half && v.len() >= 2 * half);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 present; the lengths were checked above.
        done = unsafe { avx2::rope(v, cos, sin, interleaved) };
    }
    rope_from(v, cos, sin, interleaved, done);
}

/// The plain loop of [`rope`] from pair `i0`.
fn rope_from(v: &mut [f32], cs: &[f32], sn: &[f32], interleaved: bool, i0: usize) {
    let half = cs.len();
    for i in i0..half {
        let (ia, ib) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (a, b) = (v[ia], v[ib]);
        v[ia] = a * cs[i] - b * sn[i];
        v[ib] = a * sn[i] + b * cs[i];
    }
}

/// Whether the 16-lane kernels of this module run: AVX-512F, and not
/// capped by `HELEXA_KERNELS` (see `repack::pick`).
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    matches!(super::repack::pick(), super::repack::Isa::Avx512Vnni)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::{C, EXP2_32, INV_LN2_N, SHIFT};
    use std::arch::x86_64::*;

    /// `e^x` of 8 lanes in double as [`super::avx2::expf8`] computes it
    /// (the same operations in the same order, so the same bits: glibc's
    /// `expf` for `|x| < 88`), eight doubles to a register, and the table
    /// looked up with two permutes instead of a gather.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn expf8d(x: __m256, t: [__m512i; 4]) -> __m256 {
        let xd = _mm512_cvtps_pd(x);
        let inv_ln2_n = _mm512_set1_pd(f64::from_bits(INV_LN2_N));
        let shift = _mm512_set1_pd(f64::from_bits(SHIFT));
        let kd = _mm512_fmadd_pd(inv_ln2_n, xd, shift);
        let ki = _mm512_castpd_si512(kd);
        let kd = _mm512_sub_pd(kd, shift);
        let r = _mm512_fmsub_pd(inv_ln2_n, xd, kd);
        let [c0, c1, c2] = C.map(|c| _mm512_set1_pd(f64::from_bits(c)));
        let z = _mm512_fmadd_pd(c0, r, c1);
        // Entry `ki & 31`: its low four bits pick one of 16 in each half
        // of the table, bit 4 the half.
        let idx = _mm512_and_si512(ki, _mm512_set1_epi64(31));
        let lo = _mm512_permutex2var_epi64(t[0], idx, t[1]);
        let hi = _mm512_permutex2var_epi64(t[2], idx, t[3]);
        let upper = _mm512_test_epi64_mask(idx, _mm512_set1_epi64(16));
        let tab = _mm512_mask_blend_epi64(upper, lo, hi);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(tab, _mm512_slli_epi64::<47>(ki)));
        let r2 = _mm512_mul_pd(r, r);
        let y = _mm512_fmadd_pd(r, c2, _mm512_set1_pd(1.0));
        let y = _mm512_fmadd_pd(z, r2, y);
        _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
    }

    /// The table of [`expf16`] in four registers.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn table() -> [__m512i; 4] {
        // SAFETY: 32 u64 entries, read 8 at a time.
        std::array::from_fn(|i| unsafe {
            _mm512_loadu_si512(EXP2_32.as_ptr().add(8 * i) as *const __m512i)
        })
    }

    /// `e^x` of 16 lanes, the bits of glibc's `expf` for `|x| < 88`; `t`
    /// is [`table`] (loaded once by a caller that loops).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn expf16(x: __m512, t: [__m512i; 4]) -> __m512 {
        let lo = expf8d(_mm512_castps512_ps256(x), t);
        let hi = expf8d(
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))),
            t,
        );
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castps_pd(_mm512_castps256_ps512(lo)),
            _mm256_castps_pd(hi),
        ))
    }

    /// [`super::silu_mul`] over whole groups of 16, as
    /// [`super::avx2::silu_mul`] does over 8 (the same bits).
    ///
    /// # Safety
    /// AVX-512F; `g.len() == u.len()`, a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
        let one = _mm512_set1_ps(1.0);
        let limit = _mm512_set1_ps(88.0);
        let t = table();
        for (a, b) in g.chunks_exact_mut(16).zip(u.chunks_exact(16)) {
            unsafe {
                let va = _mm512_loadu_ps(a.as_ptr());
                // NaN compares false: not-less-than catches it too.
                let slow = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(_mm512_abs_ps(va), limit);
                if slow != 0 {
                    for (x, &y) in a.iter_mut().zip(b) {
                        *x = super::silu1(*x) * y;
                    }
                    continue;
                }
                let neg = _mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_castps_si512(va),
                    _mm512_set1_epi32(i32::MIN),
                ));
                let e = expf16(neg, t);
                let s = _mm512_div_ps(va, _mm512_add_ps(one, e));
                _mm512_storeu_ps(
                    a.as_mut_ptr(),
                    _mm512_mul_ps(s, _mm512_loadu_ps(b.as_ptr())),
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::rope`] for as many pairs as fill whole vectors; returns
    /// how many pairs it did.
    ///
    /// # Safety
    /// AVX2; `v` holds `2 * cos.len()` elements, `sin` as many as `cos`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rope(v: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) -> usize {
        let half = cos.len();
        let p = v.as_mut_ptr();
        unsafe {
            if interleaved {
                // Four pairs per vector: [a0 b0 a1 b1 ..]; the angles' values
                // doubled into [c0 c0 c1 c1 ..]; the swapped pairs
                // [b0 a0 ..] times the sines; `addsub` subtracts in the
                // even lanes (a·c − b·s) and adds in the odd (b·c + a·s,
                // the same sum as a·s + b·c).
                let dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
                let n = half / 4 * 4;
                for i in (0..n).step_by(4) {
                    let x = _mm256_loadu_ps(p.add(2 * i));
                    let c = _mm256_permutevar8x32_ps(
                        _mm256_castps128_ps256(_mm_loadu_ps(cos.as_ptr().add(i))),
                        dup,
                    );
                    let s = _mm256_permutevar8x32_ps(
                        _mm256_castps128_ps256(_mm_loadu_ps(sin.as_ptr().add(i))),
                        dup,
                    );
                    let swapped = _mm256_permute_ps::<0b10_11_00_01>(x);
                    let r = _mm256_addsub_ps(_mm256_mul_ps(x, c), _mm256_mul_ps(swapped, s));
                    _mm256_storeu_ps(p.add(2 * i), r);
                }
                n
            } else {
                let n = half / 8 * 8;
                for i in (0..n).step_by(8) {
                    let a = _mm256_loadu_ps(p.add(i));
                    let b = _mm256_loadu_ps(p.add(i + half));
                    let c = _mm256_loadu_ps(cos.as_ptr().add(i));
                    let s = _mm256_loadu_ps(sin.as_ptr().add(i));
                    let ra = _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s));
                    let rb = _mm256_add_ps(_mm256_mul_ps(a, s), _mm256_mul_ps(b, c));
                    _mm256_storeu_ps(p.add(i), ra);
                    _mm256_storeu_ps(p.add(i + half), rb);
                }
                n
            }
        }
    }

    /// `dst[i] = f16(src[i])` (round to nearest even), `src.len()` a
    /// multiple of 8.
    ///
    /// # Safety
    /// AVX2 and F16C; `dst` has room for `src.len()` halves.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f32_to_f16(src: &[f32], dst: *mut u16) {
        for (i, c) in src.chunks_exact(8).enumerate() {
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(c.as_ptr()));
                _mm_storeu_si128(dst.add(8 * i) as *mut __m128i, h);
            }
        }
    }

    /// The largest of `xs` as `fold(-inf, f32::max)` finds it (NaNs
    /// skipped: `maxps` returns its second operand when the first is NaN),
    /// eight lanes at a time. The softmax of an attention head ran that
    /// fold as one serial chain (a fifth of its time at ~140 positions).
    ///
    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max(xs: &[f32]) -> f32 {
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            acc = _mm256_max_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, acc);
        }
        let mut lanes = [0f32; 8];
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes
            .iter()
            .chain(chunks.remainder())
            .cloned()
            .fold(f32::NEG_INFINITY, f32::max)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(hi, _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// AVX2/FMA; equal lengths.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        unsafe {
            while i + 16 <= n {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8)),
                    _mm256_loadu_ps(pb.add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            while i + 8 <= n {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                i += 8;
            }
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    /// `2^(i/32)` rounded to double, less `i << 47`, for `i` in `0..32`
    /// (generated with Python's `decimal` at 60 digits): the table of the
    /// `expf` algorithm of ARM's optimized-routines, which glibc uses.
    /// The other constants of that algorithm, as f64 bits: `32 / ln 2`,
    /// the rounding shift `0x1.8p52`, and the cubic's coefficients.
    pub(super) const INV_LN2_N: u64 = 0x40471547652b82fe;
    pub(super) const SHIFT: u64 = 0x4338000000000000;
    pub(super) const C: [u64; 3] = [0x3ebc6af84b912394, 0x3f2ebfce50fac4f3, 0x3f962e42ff0c52d6];

    pub(super) const EXP2_32: [u64; 32] = [
        0x3ff0000000000000,
        0x3fefd9b0d3158574,
        0x3fefb5586cf9890f,
        0x3fef9301d0125b51,
        0x3fef72b83c7d517b,
        0x3fef54873168b9aa,
        0x3fef387a6e756238,
        0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715,
        0x3feef1a7373aa9cb,
        0x3feedea64c123422,
        0x3feece086061892d,
        0x3feebfdad5362a27,
        0x3feeb42b569d4f82,
        0x3feeab07dd485429,
        0x3feea47eb03a5585,
        0x3feea09e667f3bcd,
        0x3fee9f75e8ec5f74,
        0x3feea11473eb0187,
        0x3feea589994cce13,
        0x3feeace5422aa0db,
        0x3feeb737b0cdc5e5,
        0x3feec49182a3f090,
        0x3feed503b23e255d,
        0x3feee89f995ad3ad,
        0x3feeff76f2fb5e47,
        0x3fef199bdd85529c,
        0x3fef3720dcef9069,
        0x3fef5818dcfba487,
        0x3fef7c97337b9b5f,
        0x3fefa4afa2a490da,
        0x3fefd0765b6e4540,
    ];

    /// `e^x` of 4 lanes computed in double as glibc's `expf` (FMA variant)
    /// does: `x/ln2 = k/32 + r/32`, `e^x = 2^(k/32) · p(r)` with a cubic
    /// `p` (the library's published coefficients), rounded once to f32.
    /// Valid for `|x| < 88` (`expf`'s fast path); callers take other
    /// lanes elsewhere.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn expf4(x: __m128) -> __m128 {
        let xd = _mm256_cvtps_pd(x);
        let inv_ln2_n = _mm256_set1_pd(f64::from_bits(INV_LN2_N));
        let shift = _mm256_set1_pd(f64::from_bits(SHIFT));
        let kd = _mm256_fmadd_pd(inv_ln2_n, xd, shift);
        let ki = _mm256_castpd_si256(kd);
        let kd = _mm256_sub_pd(kd, shift);
        let r = _mm256_fmsub_pd(inv_ln2_n, xd, kd);
        let [c0, c1, c2] = C.map(|c| _mm256_set1_pd(f64::from_bits(c)));
        let z = _mm256_fmadd_pd(c0, r, c1);
        let idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
        // SAFETY: indices are in 0..32.
        let t = unsafe { _mm256_i64gather_epi64::<8>(EXP2_32.as_ptr() as *const i64, idx) };
        let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
        let r2 = _mm256_mul_pd(r, r);
        let y = _mm256_fmadd_pd(r, c2, _mm256_set1_pd(1.0));
        let y = _mm256_fmadd_pd(z, r2, y);
        _mm256_cvtpd_ps(_mm256_mul_pd(y, s))
    }

    /// `e^x` of 8 lanes, the bits of glibc's `expf` for `|x| < 88`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn expf8(x: __m256) -> __m256 {
        let lo = expf4(_mm256_castps256_ps128(x));
        let hi = expf4(_mm256_extractf128_ps::<1>(x));
        _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo), hi)
    }

    /// [`super::silu_mul`] over whole groups of 8; a group with a lane
    /// outside `expf`'s fast path (`|a| ≥ 88`, inf, NaN) goes through the
    /// scalar loop.
    ///
    /// # Safety
    /// AVX2/FMA; `g.len() == u.len()`, a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
        let one = _mm256_set1_ps(1.0);
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let limit = _mm256_set1_ps(88.0);
        for (a, b) in g.chunks_exact_mut(8).zip(u.chunks_exact(8)) {
            unsafe {
                let va = _mm256_loadu_ps(a.as_ptr());
                // NaN compares false: not-less-than catches it too.
                let slow = _mm256_cmp_ps::<_CMP_NLT_UQ>(_mm256_and_ps(va, abs), limit);
                if _mm256_movemask_ps(slow) != 0 {
                    for (x, &y) in a.iter_mut().zip(b) {
                        *x = super::silu1(*x) * y;
                    }
                    continue;
                }
                let e = expf8(_mm256_xor_ps(va, _mm256_set1_ps(-0.0)));
                let s = _mm256_div_ps(va, _mm256_add_ps(one, e));
                _mm256_storeu_ps(
                    a.as_mut_ptr(),
                    _mm256_mul_ps(s, _mm256_loadu_ps(b.as_ptr())),
                );
            }
        }
    }

    /// `e^x` of 8 lanes: `2^n · p(r)` with `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`,
    /// `p` the degree-6 Taylor polynomial (relative error < 2e-7); inputs
    /// below -87.3 give 0 (softmax's shifted scores are ≤ 0).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        let lo = _mm256_set1_ps(-87.3);
        let x = _mm256_min_ps(_mm256_set1_ps(88.3), x);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
        let x = _mm256_max_ps(x, lo);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 in two parts, so that n·ln2 is subtracted exactly.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_andnot_ps(under, _mm256_mul_ps(p, pow2))
    }

    /// `xs[i] = e^(xs[i] - max)`; returns their sum.
    ///
    /// # Safety
    /// AVX2/FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(xs: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                acc = _mm256_add_ps(acc, e);
            }
        }
        let rest = chunks.into_remainder();
        let mut sum = hsum(acc);
        if !rest.is_empty() {
            let mut buf = [f32::NEG_INFINITY; 8];
            buf[..rest.len()].copy_from_slice(rest);
            let e = exp8(_mm256_sub_ps(unsafe { _mm256_loadu_ps(buf.as_ptr()) }, m));
            unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), e) };
            rest.copy_from_slice(&buf[..rest.len()]);
            sum += rest.iter().sum::<f32>();
        }
        sum
    }

    /// `xs[i] *= a`.
    ///
    /// # Safety
    /// AVX2/FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scale(xs: &mut [f32], a: f32) {
        let va = _mm256_set1_ps(a);
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            unsafe {
                _mm256_storeu_ps(
                    c.as_mut_ptr(),
                    _mm256_mul_ps(va, _mm256_loadu_ps(c.as_ptr())),
                )
            };
        }
        for v in chunks.into_remainder() {
            *v *= a;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo test --release -p helexa-engine --lib rope_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn rope_speed() {
        let half = 32;
        let cos: Vec<f32> = (0..half).map(|i| (i as f32 * 0.1).cos()).collect();
        let sin: Vec<f32> = (0..half).map(|i| (i as f32 * 0.1).sin()).collect();
        let mut v: Vec<f32> = (0..4 * 2 * half).map(|i| (i as f32 * 0.37).sin()).collect();
        for interleaved in [true, false] {
            let reps = 2_000_000;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for h in v.chunks_exact_mut(2 * half) {
                    rope_from(std::hint::black_box(h), &cos, &sin, interleaved, 0);
                }
            }
            let plain = t.elapsed().as_nanos() as f64 / reps as f64;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for h in v.chunks_exact_mut(2 * half) {
                    rope(std::hint::black_box(h), &cos, &sin, interleaved);
                }
            }
            let simd = t.elapsed().as_nanos() as f64 / reps as f64;
            println!("rope, 4 heads of 64, interleaved {interleaved}: plain {plain:.1} ns, rope() {simd:.1} ns");
        }
    }

    #[test]
    fn rope_simd_gives_the_plain_loops_bits() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut f = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 7.0
        };
        for half in [1usize, 3, 4, 7, 8, 12, 16, 20, 32, 64] {
            for interleaved in [true, false] {
                for pos in [0.0f32, 1.0, 17.0, 4093.0] {
                    let cos: Vec<f32> = (0..half).map(|i| (pos * (i as f32 + 0.3)).cos()).collect();
                    let sin: Vec<f32> = (0..half).map(|i| (pos * (i as f32 + 0.3)).sin()).collect();
                    // A head longer than the rotated part (partial RoPE).
                    let v: Vec<f32> = (0..2 * half + 5).map(|_| f()).collect();
                    let mut want = v.clone();
                    rope_from(&mut want, &cos, &sin, interleaved, 0);
                    let mut got = v.clone();
                    rope(&mut got, &cos, &sin, interleaved);
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "half {half} interleaved {interleaved}"
                    );
                    assert_eq!(got[2 * half..], v[2 * half..], "past the rotated part");
                    // And the loop is the rotation it says it is.
                    let (i, j) = if interleaved { (0, 1) } else { (0, half) };
                    let (a, b) = (v[i], v[j]);
                    assert!(
                        (want[i] - (a * cos[0] - b * sin[0])).abs()
                            <= 1e-6 * (1.0 + a.abs() + b.abs())
                    );
                }
            }
        }
    }

    #[test]
    fn f16_store_gives_the_bits_of_the_software_conversion() {
        // Normal values, halfway cases, subnormals, overflow, signed zeros
        // and infinities; a length that is not a multiple of 8.
        let mut src: Vec<f32> = Vec::new();
        let mut bits = 0x1234_5678u32;
        for _ in 0..20_000 {
            bits ^= bits << 13;
            bits ^= bits >> 17;
            bits ^= bits << 5;
            // Exponents around f16's range.
            let e = 100 + (bits >> 24) % 50;
            src.push(f32::from_bits((bits & 0x807F_FFFF) | (e << 23)));
        }
        for h in 0..=u16::MAX {
            let v = half::f16::from_bits(h);
            if v.is_nan() {
                continue;
            }
            // Each f16 value and the halfway points around it.
            let x = v.to_f32();
            src.push(x);
            let up = half::f16::from_bits(h.wrapping_add(1)).to_f32();
            if up.is_finite() && x.is_finite() {
                src.push((x as f64 / 2.0 + up as f64 / 2.0) as f32);
            }
        }
        src.extend([0.0, -0.0, 65504.0, 65520.0, 1e9, -1e9, f32::INFINITY]);
        src.extend([f32::NEG_INFINITY, 1e-8, -1e-8, 5.96e-8, 2.98e-8, 3.0]);
        let mut fast = vec![half::f16::ZERO; src.len()];
        store_f16(&src, &mut fast);
        for (x, f) in src.iter().zip(&fast) {
            assert_eq!(f.to_bits(), half::f16::from_f32(*x).to_bits(), "{x:e}");
        }
        let nan = [f32::NAN; 9];
        let mut out = [half::f16::ZERO; 9];
        store_f16(&nan, &mut out);
        assert!(out.iter().all(|h| h.is_nan()));
    }

    #[test]
    fn dot_matches_the_plain_loop() {
        let a: Vec<f32> = (0..70).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..70).map(|i| (i as f32 * 0.11).cos()).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-4);
    }

    #[test]
    fn softmax_matches_the_scalar_exp() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        for n in [1usize, 3, 8, 9, 17, 40, 333] {
            // Spreads from tiny to past exp's underflow (-87).
            for spread in [0.01f32, 3.0, 30.0, 200.0] {
                let xs: Vec<f32> = (0..n).map(|_| (next() - 0.5) * spread).collect();
                let mut got = xs.clone();
                softmax_inplace(&mut got);
                let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f64> = xs.iter().map(|&x| ((x - max) as f64).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (i, (&g, &w)) in got.iter().zip(&e).enumerate() {
                    let w = w / sum;
                    assert!(
                        (g as f64 - w).abs() <= 1e-6 * w + 1e-30,
                        "n {n} spread {spread} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_vector_max_is_the_serial_fold() {
        if !has_avx2() {
            return;
        }
        let fold = |xs: &[f32]| xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        for n in [0usize, 1, 7, 8, 9, 16, 23, 136, 137] {
            for case in 0..5 {
                let mut xs: Vec<f32> = (0..n)
                    .map(|i| ((i * 7919 + case * 31) % 97) as f32 - 60.0)
                    .collect();
                if n > 0 {
                    match case {
                        // The largest in the tail, past the last whole 8.
                        1 => xs[n - 1] = 1e6,
                        // NaNs are skipped, wherever they are.
                        2 => {
                            xs[0] = f32::NAN;
                            xs[n / 2] = f32::NAN;
                        }
                        3 => xs.iter_mut().for_each(|v| *v = f32::NAN),
                        4 => xs.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
                        _ => {}
                    }
                }
                // SAFETY: AVX2 checked above.
                let got = unsafe { avx2::max(&xs) };
                let want = fold(&xs);
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "n {n} case {case}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn silu_mul_matches_the_scalar_exp() {
        let g: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.9).collect();
        let u: Vec<f32> = (0..203).map(|i| (i as f32 * 0.3).cos()).collect();
        let mut got = g.clone();
        silu_mul(&mut got, &u);
        for i in 0..g.len() {
            let a = g[i] as f64;
            let want = a / (1.0 + (-a).exp()) * u[i] as f64;
            assert!(
                (got[i] as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30,
                "[{i}] silu({}) * {}: {} vs {want}",
                g[i],
                u[i],
                got[i]
            );
        }
    }

    /// Every `step`-th f32 bit pattern in `expf`'s fast path, `L` at a time
    /// through `exp` against the C library's `expf`; how many were checked.
    fn check_expf<const L: usize>(step: u64, exp: impl Fn(&[f32; L]) -> [f32; L]) -> u64 {
        let mut lanes = [0f32; L];
        let mut n = 0usize;
        let mut checked = 0u64;
        let flush = |lanes: &[f32; L], n: usize| {
            let got = exp(lanes);
            for j in 0..n {
                let want = lanes[j].exp();
                assert_eq!(got[j].to_bits(), want.to_bits(), "expf({:e})", lanes[j]);
            }
        };
        let mut b = 0u64;
        while b < 1 << 32 {
            let x = f32::from_bits(b as u32);
            if x.abs() < 88.0 {
                lanes[n] = x;
                n += 1;
                checked += 1;
                if n == L {
                    flush(&lanes, L);
                    n = 0;
                }
            }
            b += step;
        }
        flush(&lanes, n);
        checked
    }

    /// [`check_expf`] through `avx2::expf8` (0 without AVX2 or glibc).
    #[cfg(target_arch = "x86_64")]
    fn check_expf8(step: u64) -> u64 {
        use std::arch::x86_64::*;
        if !has_avx2() || !cfg!(target_env = "gnu") {
            return 0;
        }
        check_expf::<8>(step, |lanes| {
            let mut got = [0f32; 8];
            // SAFETY: AVX2/FMA checked above.
            unsafe {
                _mm256_storeu_ps(
                    got.as_mut_ptr(),
                    avx2::expf8(_mm256_loadu_ps(lanes.as_ptr())),
                )
            };
            got
        })
    }

    /// [`check_expf`] through `avx512::expf16` (0 without AVX-512 or glibc).
    #[cfg(target_arch = "x86_64")]
    fn check_expf16(step: u64) -> u64 {
        use std::arch::x86_64::*;
        if !has_avx512() || !cfg!(target_env = "gnu") {
            return 0;
        }
        check_expf::<16>(step, |lanes| {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F checked above.
            unsafe {
                _mm512_storeu_ps(
                    got.as_mut_ptr(),
                    avx512::expf16(_mm512_loadu_ps(lanes.as_ptr()), avx512::table()),
                )
            };
            got
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn expf16_gives_glibc_expf_bits_on_a_sample() {
        let n = check_expf16(997);
        assert!(
            n > 1_000_000 || !has_avx512() || !cfg!(target_env = "gnu"),
            "{n}"
        );
    }

    /// `cargo test --release -p helexa-engine --lib expf16_is_glibc_expf -- --ignored`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore = "exhaustive, about a minute in release"]
    fn expf16_is_glibc_expf() {
        let n = check_expf16(1);
        println!("{n} inputs, all equal");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn expf8_gives_glibc_expf_bits_on_a_sample() {
        // A prime stride: every exponent and a spread of mantissas.
        let n = check_expf8(997);
        assert!(
            n > 1_000_000 || !has_avx2() || !cfg!(target_env = "gnu"),
            "{n}"
        );
    }

    /// `cargo test --release -p helexa-engine --lib expf8_is_glibc_expf -- --ignored`:
    /// all 2.1 billion f32 in the fast path (about a minute).
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore = "exhaustive, about a minute in release"]
    fn expf8_is_glibc_expf() {
        let n = check_expf8(1);
        println!("{n} inputs, all equal");
    }

    #[test]
    fn silu_mul_gives_the_scalar_loops_bits() {
        let mut g: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 0.0517).collect();
        g.extend([0.0, -0.0, 87.9, 88.0, -88.0, 100.0, -100.0, f32::INFINITY]);
        g.extend([f32::NEG_INFINITY, f32::NAN, 1e-30, -1e-30, 3.0, 4.0, 5.0]);
        let u: Vec<f32> = (0..g.len()).map(|i| (i as f32 * 0.3).cos()).collect();
        let mut got = g.clone();
        silu_mul(&mut got, &u);
        for i in 0..g.len() {
            let want = silu1(g[i]) * u[i];
            assert!(
                got[i].to_bits() == want.to_bits() || (got[i].is_nan() && want.is_nan()),
                "[{i}] silu({}) * {}: {} vs {want}",
                g[i],
                u[i],
                got[i]
            );
        }
    }
}
