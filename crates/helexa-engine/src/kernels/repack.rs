//! Q4_1 and Q8_0 weight matrices repacked at load, 16 rows at a time, into
//! the order the decode kernels stream them, and those kernels.
//!
//! Why: with GGUF's layout a decode step is one dot product per weight row,
//! each block of 32 weights paying its own scale conversions, a horizontal
//! reduction per row and a scalar min term (`quant.rs`); the profile showed
//! those kernels at ~22 cycles per block, far from the memory bound. Here the
//! 16 rows of a group sit side by side: one vector load brings 4 weight bytes
//! of each of the 16 rows, one multiply-add instruction (`vpdpbusd` with
//! AVX-512 VNNI, `vpmaddubsw` on AVX2) multiplies them with the same 4
//! activation bytes broadcast, the 16 row scales convert with one
//! instruction, and the 16 row results end in the 16 lanes of one register:
//! no horizontal sums. (The idea is ggml's CPU "repack" buffers; the layout
//! and kernels here are our own.)
//!
//! Layout, per group of 16 rows `g` and block column `b` (`kb = cols / 32`
//! blocks per row), at `(g * kb + b) * GROUP_BYTES`:
//! - Q4_1: `d[16]` f16, `m[16]` f16, then 4 chunks `c` of 64 bytes: row `r`'s
//!   bytes `qs[4c..4c + 4]` at `64c + 4r`. Their low nibbles are elements
//!   `4c..4c + 4` of the block, the high nibbles elements `16 + 4c..`.
//! - Q8_0: `d[16]` f16, then 8 chunks `c` of 64 bytes: row `r`'s `qs[4c..4c +
//!   4]` at `32 + 64c + 4r`.
//!
//! Rows past the matrix's end (the last group's padding) are zero.
//!
//! Every row's result is computed with the same operations in the same
//! order in the scalar, AVX2 and AVX-512 kernels: an exact integer sum per
//! block, then `acc = fma(f32(isum), d_w * d_a, acc)` (and `acc = fma(m_w,
//! s_a, acc)` for Q4_1), blocks in order. So the three agree bit for bit, and
//! a row's output does not depend on what else is batched with it.

#![allow(clippy::needless_range_loop)]

use super::quant::{BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};
use half::f16;

/// Rows per group.
pub const G: usize = 16;

/// Most activation rows one [`Packed::dot_groups`] call takes. The AVX-512
/// kernel holds all of them against each unpacked weight block (32 vector
/// registers); AVX2 takes them one at a time (16 registers).
pub const MAX_ACTS: usize = 8;

const Q4_1_GROUP_BYTES: usize = 2 * G * 2 + G * QK / 2; // 320
const Q8_0_GROUP_BYTES: usize = G * 2 + G * QK; // 544

/// Repacked weights live in 64-byte aligned pieces of large anonymous
/// mappings for which transparent huge pages are asked (`MADV_HUGEPAGE`).
/// Decode streams every weight once per token: with 4 KiB pages that is a
/// TLB miss (a two-level page walk under a hypervisor) every 4 KiB and a
/// hardware prefetcher stopped at every page boundary. Small matrices share
/// a chunk, since a mapping smaller than 2 MiB cannot hold a huge page.
/// `kernel_speed`: a 70 MB Q4_1 matrix, one activation row, 37 ns per
/// group-block on 4 KiB pages, 25 ns on huge pages.
const CHUNK: usize = 32 << 20;

struct Chunk {
    map: memmap2::MmapRaw,
}

impl Chunk {
    fn new(bytes: usize) -> Chunk {
        let map = memmap2::MmapOptions::new()
            .len(bytes.max(1))
            .map_anon()
            .map(memmap2::MmapRaw::from)
            .unwrap_or_else(|e| panic!("cannot map {bytes} bytes for weights: {e}"));
        // Only a hint: without THP the pages are 4 KiB and all still works.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Chunk { map }
    }
}

/// The chunk small pieces are cut from, and how much of it is used.
static ARENA: std::sync::Mutex<Option<(std::sync::Arc<Chunk>, usize)>> =
    std::sync::Mutex::new(None);

/// A piece of a [`Chunk`]: zeroed (fresh anonymous memory), 64-byte aligned,
/// owned by one [`Packed`] matrix; the chunk is unmapped when its last
/// piece is dropped.
struct Buf {
    chunk: std::sync::Arc<Chunk>,
    off: usize,
    len: usize,
}

impl Buf {
    fn zeroed(bytes: usize) -> Buf {
        let len = bytes.next_multiple_of(64);
        if len > CHUNK / 4 {
            return Buf {
                chunk: std::sync::Arc::new(Chunk::new(len)),
                off: 0,
                len,
            };
        }
        let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
        match arena.as_mut() {
            Some((chunk, used)) if *used + len <= CHUNK => {
                let off = *used;
                *used += len;
                Buf {
                    chunk: chunk.clone(),
                    off,
                    len,
                }
            }
            _ => {
                let chunk = std::sync::Arc::new(Chunk::new(CHUNK));
                *arena = Some((chunk.clone(), len));
                Buf { chunk, off: 0, len }
            }
        }
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `off..off + len` lies inside the chunk's mapping (see
        // `zeroed`), which lives as long as `self.chunk`.
        unsafe { std::slice::from_raw_parts(self.chunk.map.as_ptr().add(self.off), self.len) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; no other `Buf` covers these bytes, and `&mut
        // self` makes this the only view of them.
        unsafe {
            std::slice::from_raw_parts_mut(self.chunk.map.as_mut_ptr().add(self.off), self.len)
        }
    }
}

/// Which block format a [`Packed`] matrix holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q4_1,
    Q8_0,
}

impl Kind {
    fn group_bytes(self) -> usize {
        match self {
            Kind::Q4_1 => Q4_1_GROUP_BYTES,
            Kind::Q8_0 => Q8_0_GROUP_BYTES,
        }
    }
}

/// A repacked `rows × cols` matrix.
pub struct Packed {
    pub kind: Kind,
    pub rows: usize,
    pub cols: usize,
    kb: usize,
    buf: Buf,
}

fn put_f16(dst: &mut [u8], v: f16) {
    dst[..2].copy_from_slice(&v.to_le_bytes());
}

fn get_f16(src: &[u8]) -> f32 {
    f16::from_le_bytes([src[0], src[1]]).to_f32()
}

impl Packed {
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(G)
    }

    fn group_bytes(&self) -> usize {
        self.kind.group_bytes()
    }

    /// Repacks GGUF-layout Q4_1 rows (`rows * cols / 32` blocks).
    pub fn q4_1(blocks: &[BlockQ4_1], rows: usize, cols: usize) -> Packed {
        Packed::pack(Kind::Q4_1, blocks, rows, cols, |blk, out, r| {
            put_f16(&mut out[2 * r..], blk.d);
            put_f16(&mut out[2 * G + 2 * r..], blk.m);
            for c in 0..4 {
                let at = 4 * G + 64 * c + 4 * r;
                out[at..at + 4].copy_from_slice(&blk.qs[4 * c..4 * c + 4]);
            }
        })
    }

    /// Repacks GGUF-layout Q8_0 rows.
    pub fn q8_0(blocks: &[BlockQ8_0], rows: usize, cols: usize) -> Packed {
        Packed::pack(Kind::Q8_0, blocks, rows, cols, |blk, out, r| {
            put_f16(&mut out[2 * r..], blk.d);
            for c in 0..8 {
                let at = 2 * G + 64 * c + 4 * r;
                for j in 0..4 {
                    out[at + j] = blk.qs[4 * c + j] as u8;
                }
            }
        })
    }

    /// Lays `rows * cols / 32` blocks out by group: `put(block, group_block,
    /// r)` writes one block as row `r` of its group-block's bytes.
    fn pack<B>(
        kind: Kind,
        blocks: &[B],
        rows: usize,
        cols: usize,
        put: impl Fn(&B, &mut [u8], usize),
    ) -> Packed {
        let kb = cols / QK;
        assert_eq!(blocks.len(), rows * kb);
        let gb = kind.group_bytes();
        let mut buf = Buf::zeroed(rows.div_ceil(G) * kb * gb);
        let out = buf.bytes_mut();
        for n in 0..rows {
            let (g, r) = (n / G, n % G);
            for b in 0..kb {
                let base = (g * kb + b) * gb;
                put(&blocks[n * kb + b], &mut out[base..base + gb], r);
            }
        }
        Packed {
            kind,
            rows,
            cols,
            kb,
            buf,
        }
    }

    /// Row `n` dequantized (embedding lookup, the dense prefill path).
    pub fn row_f32(&self, n: usize, out: &mut [f32]) {
        assert!(n < self.rows && out.len() == self.cols);
        let (g, r) = (n / G, n % G);
        let gb = self.group_bytes();
        let bytes = self.buf.bytes();
        #[cfg(target_arch = "x86_64")]
        if pick() != Isa::Scalar {
            // SAFETY: AVX2 present (`pick`); the group's blocks are in
            // `bytes` and `out` holds `kb` blocks (asserted above).
            unsafe { avx2::row_f32(self, &bytes[g * self.kb * gb..][..self.kb * gb], r, out) };
            return;
        }
        for b in 0..self.kb {
            let blk = &bytes[(g * self.kb + b) * gb..][..gb];
            let y = &mut out[b * QK..(b + 1) * QK];
            let d = get_f16(&blk[2 * r..]);
            match self.kind {
                Kind::Q4_1 => {
                    let m = get_f16(&blk[2 * G + 2 * r..]);
                    for c in 0..4 {
                        for j in 0..4 {
                            let q = blk[4 * G + 64 * c + 4 * r + j];
                            y[4 * c + j] = (q & 0x0F) as f32 * d + m;
                            y[16 + 4 * c + j] = (q >> 4) as f32 * d + m;
                        }
                    }
                }
                Kind::Q8_0 => {
                    for c in 0..8 {
                        for j in 0..4 {
                            y[4 * c + j] = blk[2 * G + 64 * c + 4 * r + j] as i8 as f32 * d;
                        }
                    }
                }
            }
        }
    }

    /// `out[i][(g - g0) * 16 + lane] = dot(row g * 16 + lane, acts[i])` for
    /// groups `g0..g1` and up to [`MAX_ACTS`] activation rows. Q4_1 takes `Act::Q8_1`
    /// rows, Q8_0 takes `Act::Q8_0` rows. `out[i]` holds `(g1 - g0) * 16`.
    pub fn dot_groups(&self, g0: usize, g1: usize, acts: &[Act], out: &mut [&mut [f32]]) {
        assert!(g0 <= g1 && g1 <= self.groups());
        assert!(!acts.is_empty() && acts.len() <= MAX_ACTS && acts.len() == out.len());
        for (a, o) in acts.iter().zip(out.iter()) {
            assert!(o.len() >= (g1 - g0) * G);
            match (self.kind, a) {
                (Kind::Q4_1, Act::Q8_1(y)) => assert!(y.len() >= self.kb),
                (Kind::Q8_0, Act::Q8_0(y, s)) => assert!(y.len() >= self.kb && s.len() >= self.kb),
                _ => panic!("activation type does not match {:?} weights", self.kind),
            }
        }
        match pick() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                // SAFETY: the CPU has AVX-512 F/BW/VNNI (`pick`); the sizes
                // were checked above.
                unsafe { avx512::dot_groups(self, g0, g1, acts, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: the CPU has AVX2/FMA (`pick`); sizes checked above.
                unsafe { avx2::dot_groups(self, g0, g1, acts, out) }
            }
            Isa::Scalar => scalar_dot_groups(self, g0, g1, acts, out),
        }
    }

    fn group(&self, g: usize, b: usize) -> *const u8 {
        debug_assert!(g < self.groups() && b < self.kb);
        // SAFETY (of the callers' reads): the buffer holds `groups * kb`
        // group-blocks of `group_bytes` each.
        unsafe {
            self.buf
                .bytes()
                .as_ptr()
                .add((g * self.kb + b) * self.group_bytes())
        }
    }
}

/// One quantized activation row: Q8_1 blocks for Q4_1 weights; Q8_0 blocks
/// and each block's [`block_sums`] term for Q8_0 weights.
#[derive(Clone, Copy)]
pub enum Act<'a> {
    Q8_1(&'a [BlockQ8_1]),
    Q8_0(&'a [BlockQ8_0], &'a [i32]),
}

/// `-128 · sum(qs)` of each block: the VNNI Q8_0 kernel's correction term
/// (it multiplies `w + 128` as unsigned bytes), stored ready to use so that
/// the kernel broadcasts it straight from memory (a load) instead of
/// computing and broadcasting it from a register (a vector-port µop per
/// row and block, ~1/13 of an 8-row block's).
pub fn block_sums(ys: &[BlockQ8_0], out: &mut [i32]) {
    for (y, s) in ys.iter().zip(out.iter_mut()) {
        *s = -128 * y.qs.iter().map(|&q| q as i32).sum::<i32>();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

/// The best kernel set this CPU runs, detected once. `HELEXA_KERNELS=avx2`
/// or `=scalar` caps it (for comparing them on one machine).
pub fn pick() -> Isa {
    use std::sync::OnceLock;
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("HELEXA_KERNELS").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c");
            let vnni = avx2
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni");
            if cap != "avx2" && cap != "scalar" && vnni {
                return Isa::Avx512Vnni;
            }
            if cap != "scalar" && avx2 {
                return Isa::Avx2;
            }
        }
        let _ = cap;
        Isa::Scalar
    })
}

/// The reference: the same operations in the same order as the SIMD kernels.
fn scalar_dot_groups(p: &Packed, g0: usize, g1: usize, acts: &[Act], out: &mut [&mut [f32]]) {
    for g in g0..g1 {
        for (a, o) in acts.iter().zip(out.iter_mut()) {
            let mut acc = [0f32; G];
            for b in 0..p.kb {
                // SAFETY: `group` points at a whole group-block.
                let blk = unsafe { std::slice::from_raw_parts(p.group(g, b), p.group_bytes()) };
                match (p.kind, a) {
                    (Kind::Q4_1, Act::Q8_1(y)) => {
                        let y = &y[b];
                        let (dy, sy) = (y.d.to_f32(), y.s.to_f32());
                        for r in 0..G {
                            let mut isum = 0i32;
                            for c in 0..4 {
                                for j in 0..4 {
                                    let q = blk[4 * G + 64 * c + 4 * r + j];
                                    isum += (q & 0x0F) as i32 * y.qs[4 * c + j] as i32;
                                    isum += (q >> 4) as i32 * y.qs[16 + 4 * c + j] as i32;
                                }
                            }
                            let d = get_f16(&blk[2 * r..]);
                            let m = get_f16(&blk[2 * G + 2 * r..]);
                            acc[r] = (isum as f32).mul_add(d * dy, acc[r]);
                            acc[r] = m.mul_add(sy, acc[r]);
                        }
                    }
                    (Kind::Q8_0, Act::Q8_0(y, _)) => {
                        let y = &y[b];
                        let dy = y.d.to_f32();
                        for r in 0..G {
                            let mut isum = 0i32;
                            for c in 0..8 {
                                for j in 0..4 {
                                    let q = blk[2 * G + 64 * c + 4 * r + j] as i8;
                                    isum += q as i32 * y.qs[4 * c + j] as i32;
                                }
                            }
                            let d = get_f16(&blk[2 * r..]);
                            acc[r] = (isum as f32).mul_add(d * dy, acc[r]);
                        }
                    }
                    _ => unreachable!("checked by dot_groups"),
                }
            }
            o[(g - g0) * G..(g - g0 + 1) * G].copy_from_slice(&acc);
        }
    }
}

/// Group-blocks are prefetched this far ahead (7.5 KB of Q4_1, 13 KB of
/// Q8_0): decode streams every weight once per token, and a line asked for
/// must arrive before the kernel gets there — ~150 ns from memory in this
/// VM, while 8 rows take ~23 ns per group-block and one row ~6. Four
/// group-blocks ahead (~90 ns at 8 rows, ~25 at one) left the kernels
/// waiting at each block's first load: `engine_bench` A/B (2 threads, 6
/// alternated pairs), 4 → 24: one sequence 252 → 306 tok/s (+21 %), 8
/// sequences 803 → 848 (+5.6 %); 12 and 40 were no better than 24.
#[cfg(target_arch = "x86_64")]
const PREFETCH_GROUP_BLOCKS: usize = 24;

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(p: *const u8, bytes: usize) {
    super::prefetch_bytes(p.wrapping_add(PREFETCH_GROUP_BLOCKS * bytes), bytes);
}

/// With several activation rows the Q8_0 kernel (the output projection,
/// 30 MB of SmolLM2's weights, streamed once per step) takes ~21 ns per
/// group-block, long enough for lines asked for only
/// [`PREFETCH_GROUP_BLOCKS`] ahead to come from L3 or memory late: an
/// 8-sequence step's output projection ran at ~1.4× its time with the
/// matrix in cache. These group-blocks (~136 KiB) ahead it is also asked
/// into L2 (`prefetcht1`, which queues in L2's larger miss queue): output
/// projection at 8 sequences −3..−16 % per alternated pair
/// (`HELEXA_REGION_TIMES=1 engine_bench`, 3 pairs against none; 128 ahead
/// −2..−6 %, 512 like 256). Not for one row (memory-bound, no gain) nor
/// for Q4_1 (gate/up at 8 rows no faster in 3 pairs).
#[cfg(target_arch = "x86_64")]
const PREFETCH_FAR_GROUP_BLOCKS: usize = 256;

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_far(p: *const u8, bytes: usize) {
    super::prefetch_bytes_to_l2(p.wrapping_add(PREFETCH_FAR_GROUP_BLOCKS * bytes), bytes);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`Packed::row_f32`] of row `r` of a group (`blocks`: the group's
    /// `kb` group-blocks): the same products and sums as the plain loop
    /// (`q * d + m`, no fused multiply-add), so the same bits, eight at a
    /// time. The dense (prompt) path dequantizes every weight per call;
    /// with the plain loop that was most of the time of a short prompt
    /// suffix after a prefix-cache hit.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_f32(p: &Packed, blocks: &[u8], r: usize, out: &mut [f32]) {
        let gb = p.group_bytes();
        let u32_at = |blk: &[u8], at: usize| -> i32 {
            assert!(at + 4 <= blk.len());
            // SAFETY: in bounds (checked just above).
            unsafe { (blk.as_ptr().add(at) as *const i32).read_unaligned() }
        };
        let mask = _mm_set1_epi8(0x0F);
        for (b, y) in out.chunks_exact_mut(QK).enumerate().take(p.kb) {
            let blk = &blocks[b * gb..][..gb];
            let d = _mm256_set1_ps(get_f16(&blk[2 * r..]));
            let yp = y.as_mut_ptr();
            // Bytes `4 * c + j` of the row's block, c = 0..4 (Q4_1) or 0..8.
            let row16 = |first: usize, base: usize| {
                _mm_setr_epi32(
                    u32_at(blk, base + 64 * first + 4 * r),
                    u32_at(blk, base + 64 * (first + 1) + 4 * r),
                    u32_at(blk, base + 64 * (first + 2) + 4 * r),
                    u32_at(blk, base + 64 * (first + 3) + 4 * r),
                )
            };
            match p.kind {
                Kind::Q4_1 => {
                    let m = _mm256_set1_ps(get_f16(&blk[2 * G + 2 * r..]));
                    let q = row16(0, 4 * G);
                    let lo = _mm_and_si128(q, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                    for (i, v) in [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)]
                        .into_iter()
                        .enumerate()
                    {
                        let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                        // SAFETY: `y` holds 32 floats; `8 * i + 8 <= 32`.
                        unsafe {
                            _mm256_storeu_ps(yp.add(8 * i), _mm256_add_ps(_mm256_mul_ps(f, d), m))
                        };
                    }
                }
                Kind::Q8_0 => {
                    let (q0, q1) = (row16(0, 2 * G), row16(4, 2 * G));
                    for (i, v) in [q0, _mm_srli_si128::<8>(q0), q1, _mm_srli_si128::<8>(q1)]
                        .into_iter()
                        .enumerate()
                    {
                        let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                        // SAFETY: as above.
                        unsafe { _mm256_storeu_ps(yp.add(8 * i), _mm256_mul_ps(f, d)) };
                    }
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bcast4(p: *const i8) -> __m256i {
        _mm256_set1_epi32(unsafe { (p as *const i32).read_unaligned() })
    }

    /// # Safety
    /// AVX2/FMA/F16C; arguments as checked by [`Packed::dot_groups`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_groups(
        p: &Packed,
        g0: usize,
        g1: usize,
        acts: &[Act],
        out: &mut [&mut [f32]],
    ) {
        let gb = p.group_bytes();
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for g in g0..g1 {
            for (a, o) in acts.iter().zip(out.iter_mut()) {
                // Two halves of 8 rows each, one accumulator apiece.
                let mut acc = [_mm256_setzero_ps(); 2];
                for b in 0..p.kb {
                    let blk = p.group(g, b);
                    prefetch(blk, gb);
                    unsafe {
                        match a {
                            Act::Q8_1(y) => {
                                let y = y.get_unchecked(b);
                                let dy = _mm256_set1_ps(y.d.to_f32());
                                let sy = _mm256_set1_ps(y.s.to_f32());
                                let yq = y.qs.as_ptr();
                                let ylo: [__m256i; 4] =
                                    std::array::from_fn(|c| bcast4(yq.add(4 * c)));
                                let yhi: [__m256i; 4] =
                                    std::array::from_fn(|c| bcast4(yq.add(16 + 4 * c)));
                                for h in 0..2 {
                                    // 8 sums of two products per chunk and
                                    // nibble half, each ≤ 2·15·127: all eight
                                    // fit an i16 lane (≤ 30480).
                                    let mut s16 = _mm256_setzero_si256();
                                    for c in 0..4 {
                                        let v = _mm256_load_si256(
                                            blk.add(4 * G + 64 * c + 32 * h) as *const __m256i
                                        );
                                        let lo = _mm256_and_si256(v, mask);
                                        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                                        s16 =
                                            _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo, ylo[c]));
                                        s16 =
                                            _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi, yhi[c]));
                                    }
                                    let isum = _mm256_madd_epi16(s16, ones);
                                    let d = _mm256_cvtph_ps(_mm_load_si128(
                                        blk.add(16 * h) as *const __m128i
                                    ));
                                    let m = _mm256_cvtph_ps(_mm_load_si128(
                                        blk.add(2 * G + 16 * h) as *const __m128i,
                                    ));
                                    acc[h] = _mm256_fmadd_ps(
                                        _mm256_cvtepi32_ps(isum),
                                        _mm256_mul_ps(d, dy),
                                        acc[h],
                                    );
                                    acc[h] = _mm256_fmadd_ps(m, sy, acc[h]);
                                }
                            }
                            Act::Q8_0(y, _) => {
                                let y = y.get_unchecked(b);
                                let dy = _mm256_set1_ps(y.d.to_f32());
                                let yq = y.qs.as_ptr();
                                for h in 0..2 {
                                    let mut isum = _mm256_setzero_si256();
                                    for c in 0..8 {
                                        let w = _mm256_loadu_si256(
                                            blk.add(2 * G + 64 * c + 32 * h) as *const __m256i,
                                        );
                                        let yv = bcast4(yq.add(4 * c));
                                        // |w| · sign(y, w): u8 × i8 with the
                                        // same products; pair sums ≤ 2·128·127.
                                        let p16 = _mm256_maddubs_epi16(
                                            _mm256_sign_epi8(w, w),
                                            _mm256_sign_epi8(yv, w),
                                        );
                                        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, ones));
                                    }
                                    let d = _mm256_cvtph_ps(_mm_loadu_si128(
                                        blk.add(16 * h) as *const __m128i
                                    ));
                                    acc[h] = _mm256_fmadd_ps(
                                        _mm256_cvtepi32_ps(isum),
                                        _mm256_mul_ps(d, dy),
                                        acc[h],
                                    );
                                }
                            }
                        }
                    }
                }
                let dst = o[(g - g0) * G..].as_mut_ptr();
                unsafe {
                    _mm256_storeu_ps(dst, acc[0]);
                    _mm256_storeu_ps(dst.add(8), acc[1]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F/BW/VNNI and F16C; arguments as checked by
    /// [`Packed::dot_groups`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_groups(
        p: &Packed,
        g0: usize,
        g1: usize,
        acts: &[Act],
        out: &mut [&mut [f32]],
    ) {
        // The activations' f16 scales as f32, once per call rather than once
        // per group (exact conversions: the same values either way).
        let kb = p.kb;
        let mut sc = vec![0f32; acts.len() * kb * 2];
        for (r, a) in acts.iter().enumerate() {
            let row = &mut sc[r * kb * 2..(r + 1) * kb * 2];
            match a {
                Act::Q8_1(y) => {
                    for (b, y) in y[..kb].iter().enumerate() {
                        row[2 * b] = y.d.to_f32();
                        row[2 * b + 1] = y.s.to_f32();
                    }
                }
                Act::Q8_0(y, _) => {
                    for (b, y) in y[..kb].iter().enumerate() {
                        row[2 * b] = y.d.to_f32();
                    }
                }
            }
        }
        // Row counts as constants keep the accumulators in registers.
        macro_rules! run {
            ($n:literal) => {
                match p.kind {
                    Kind::Q4_1 => {
                        let ys: [&[BlockQ8_1]; $n] = std::array::from_fn(|r| match acts[r] {
                            Act::Q8_1(y) => y,
                            _ => unreachable!("checked by dot_groups"),
                        });
                        unsafe { q4_1_r::<$n>(p, g0, g1, ys, &sc, out) }
                    }
                    Kind::Q8_0 => {
                        let ys: [(&[BlockQ8_0], &[i32]); $n] =
                            std::array::from_fn(|r| match acts[r] {
                                Act::Q8_0(y, s) => (y, s),
                                _ => unreachable!("checked by dot_groups"),
                            });
                        unsafe { q8_0_r::<$n>(p, g0, g1, ys, &sc, out) }
                    }
                }
            };
        }
        match acts.len() {
            1 => run!(1),
            2 => run!(2),
            3 => run!(3),
            4 => run!(4),
            5 => run!(5),
            6 => run!(6),
            7 => run!(7),
            _ => run!(8),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        _mm512_set1_epi32(unsafe { (p as *const i32).read_unaligned() })
    }

    /// `R` activation rows against each group of Q4_1 rows: the 16 rows'
    /// weights are unpacked once per block and used `R` times.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn q4_1_r<const R: usize>(
        p: &Packed,
        g0: usize,
        g1: usize,
        ys: [&[BlockQ8_1]; R],
        sc: &[f32],
        out: &mut [&mut [f32]],
    ) {
        let gb = p.group_bytes();
        let mask = _mm512_set1_epi8(0x0F);
        for g in g0..g1 {
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..p.kb {
                let blk = p.group(g, b);
                prefetch(blk, gb);
                unsafe {
                    let d = _mm512_cvtph_ps(_mm256_load_si256(blk as *const __m256i));
                    let m = _mm512_cvtph_ps(_mm256_load_si256(blk.add(2 * G) as *const __m256i));
                    let mut lo = [_mm512_setzero_si512(); 4];
                    let mut hi = [_mm512_setzero_si512(); 4];
                    for c in 0..4 {
                        let v = _mm512_load_si512(blk.add(4 * G + 64 * c) as *const __m512i);
                        lo[c] = _mm512_and_si512(v, mask);
                        hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                    }
                    for r in 0..R {
                        let y = ys[r].get_unchecked(b);
                        let yq = y.qs.as_ptr();
                        // Two chains (low and high nibbles) for latency;
                        // exact integers, so the order of the adds does not
                        // matter.
                        let mut s0 = _mm512_setzero_si512();
                        let mut s1 = _mm512_setzero_si512();
                        for c in 0..4 {
                            s0 = _mm512_dpbusd_epi32(s0, lo[c], bcast4(yq.add(4 * c)));
                            s1 = _mm512_dpbusd_epi32(s1, hi[c], bcast4(yq.add(16 + 4 * c)));
                        }
                        let isum = _mm512_add_epi32(s0, s1);
                        let s = sc.as_ptr().add((r * p.kb + b) * 2);
                        let dy = _mm512_set1_ps(*s);
                        let sy = _mm512_set1_ps(*s.add(1));
                        acc[r] =
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, dy), acc[r]);
                        acc[r] = _mm512_fmadd_ps(m, sy, acc[r]);
                    }
                }
            }
            for r in 0..R {
                unsafe { _mm512_storeu_ps(out[r][(g - g0) * G..].as_mut_ptr(), acc[r]) };
            }
        }
    }

    /// As [`q4_1_r`] for Q8_0 rows; `sums` are the activation blocks'
    /// [`block_sums`] terms.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn q8_0_r<const R: usize>(
        p: &Packed,
        g0: usize,
        g1: usize,
        ys: [(&[BlockQ8_0], &[i32]); R],
        sc: &[f32],
        out: &mut [&mut [f32]],
    ) {
        let gb = p.group_bytes();
        let flip = _mm512_set1_epi8(-128);
        for g in g0..g1 {
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..p.kb {
                let blk = p.group(g, b);
                prefetch(blk, gb);
                if R >= 4 {
                    super::prefetch_far(blk, gb);
                }
                unsafe {
                    let d = _mm512_cvtph_ps(_mm256_load_si256(blk as *const __m256i));
                    // w + 128 as u8: Σ(w+128)·y = Σw·y + 128·Σy.
                    let mut w = [_mm512_setzero_si512(); 8];
                    for c in 0..8 {
                        w[c] = _mm512_xor_si512(
                            _mm512_loadu_si512(blk.add(2 * G + 64 * c) as *const __m512i),
                            flip,
                        );
                    }
                    for r in 0..R {
                        let (y, sums) = ys[r];
                        let y = y.get_unchecked(b);
                        let yq = y.qs.as_ptr();
                        let mut s0 = _mm512_set1_epi32(*sums.get_unchecked(b));
                        let mut s1 = _mm512_setzero_si512();
                        for c in 0..4 {
                            s0 = _mm512_dpbusd_epi32(s0, w[c], bcast4(yq.add(4 * c)));
                            s1 = _mm512_dpbusd_epi32(s1, w[4 + c], bcast4(yq.add(16 + 4 * c)));
                        }
                        let isum = _mm512_add_epi32(s0, s1);
                        let dy = _mm512_set1_ps(*sc.get_unchecked((r * p.kb + b) * 2));
                        acc[r] =
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, dy), acc[r]);
                    }
                }
            }
            for r in 0..R {
                unsafe { _mm512_storeu_ps(out[r][(g - g0) * G..].as_mut_ptr(), acc[r]) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::{self, dot_q4_1_q8_1_scalar, dot_q8_0_q8_0_scalar};

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s >> 33
        }
    }

    fn floats(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rng(seed);
        (0..n)
            .map(|_| (r() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0)
            .collect()
    }

    /// Random blocks over their whole value ranges (every nibble, -128..=127
    /// in Q8_0 weights, extreme scales).
    fn q4_1_blocks(n: usize, seed: u64) -> Vec<BlockQ4_1> {
        let mut r = rng(seed);
        (0..n)
            .map(|_| BlockQ4_1 {
                d: f16::from_f32((r() % 1000) as f32 / 3000.0),
                m: f16::from_f32(-((r() % 1000) as f32) / 700.0),
                qs: std::array::from_fn(|_| r() as u8),
            })
            .collect()
    }

    fn q8_0_blocks(n: usize, seed: u64) -> Vec<BlockQ8_0> {
        let mut r = rng(seed);
        (0..n)
            .map(|_| BlockQ8_0 {
                d: f16::from_f32((r() % 1000) as f32 / 50000.0),
                qs: std::array::from_fn(|_| r() as u8 as i8),
            })
            .collect()
    }

    fn acts_q8_1(k: usize, seed: u64) -> Vec<BlockQ8_1> {
        let mut q = vec![BlockQ8_1::ZERO; k / QK];
        quant::quantize_q8_1(&floats(k, seed), &mut q);
        q
    }

    fn acts_q8_0(k: usize, seed: u64) -> (Vec<BlockQ8_0>, Vec<i32>) {
        let mut q = vec![BlockQ8_0::ZERO; k / QK];
        quant::quantize_q8_0(&floats(k, seed), &mut q);
        let mut s = vec![0; k / QK];
        block_sums(&q, &mut s);
        (q, s)
    }

    /// Every kernel set this CPU has, run on the same inputs.
    fn all_isas(p: &Packed, g0: usize, g1: usize, acts: &[Act]) -> Vec<(Isa, Vec<Vec<f32>>)> {
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            if std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512bw")
            {
                isas.push(Isa::Avx512Vnni);
            }
        }
        isas.into_iter()
            .map(|isa| {
                let mut outs = vec![vec![f32::NAN; (g1 - g0) * G]; acts.len()];
                let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512Vnni => unsafe { avx512::dot_groups(p, g0, g1, acts, &mut refs) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { avx2::dot_groups(p, g0, g1, acts, &mut refs) },
                    Isa::Scalar => scalar_dot_groups(p, g0, g1, acts, &mut refs),
                }
                (isa, outs)
            })
            .collect()
    }

    #[test]
    fn q4_1_kernels_agree_bit_for_bit_and_match_the_unpacked_dot() {
        // 37 rows: two full groups and a padded one.
        let (rows, cols) = (37, 320);
        let kb = cols / QK;
        let w = q4_1_blocks(rows * kb, 1);
        let p = Packed::q4_1(&w, rows, cols);
        let ys: Vec<Vec<BlockQ8_1>> = (0..MAX_ACTS as u64)
            .map(|i| acts_q8_1(cols, 10 + i))
            .collect();
        for n_act in 1..=MAX_ACTS {
            let acts: Vec<Act> = ys[..n_act].iter().map(|y| Act::Q8_1(y)).collect();
            let runs = all_isas(&p, 0, p.groups(), &acts);
            assert!(!runs.is_empty());
            for (isa, outs) in &runs {
                assert_eq!(
                    outs.iter()
                        .map(|o| o.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
                        .collect::<Vec<_>>(),
                    runs[0]
                        .1
                        .iter()
                        .map(|o| o.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
                        .collect::<Vec<_>>(),
                    "{isa:?} differs from the scalar kernel with {n_act} rows"
                );
                for (a, o) in outs.iter().enumerate() {
                    for n in 0..rows {
                        let want = dot_q4_1_q8_1_scalar(&w[n * kb..(n + 1) * kb], &ys[a]);
                        assert!(
                            (o[n] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{isa:?} row {n}: {} vs {want}",
                            o[n]
                        );
                    }
                    for n in rows..p.groups() * G {
                        assert_eq!(o[n], 0.0, "padding row {n}");
                    }
                }
            }
            // A row's result does not depend on the rows batched with it.
            let alone = all_isas(&p, 0, p.groups(), &acts[..1]);
            for ((_, a), (_, b)) in alone.iter().zip(&runs) {
                assert_eq!(a[0], b[0]);
            }
        }
        // A sub-range of groups writes from the start of `out`.
        let acts = [Act::Q8_1(&ys[0])];
        let full = all_isas(&p, 0, 3, &acts);
        let part = all_isas(&p, 1, 2, &acts);
        for ((_, f), (_, s)) in full.iter().zip(&part) {
            assert_eq!(&f[0][G..2 * G], &s[0][..]);
        }
    }

    #[test]
    fn q8_0_kernels_agree_bit_for_bit_and_match_the_unpacked_dot() {
        let (rows, cols) = (50, 256);
        let kb = cols / QK;
        let mut w = q8_0_blocks(rows * kb, 2);
        // Extremes: -128 and 127 against -127 and 127 activations.
        w[0].qs = [-128; QK];
        w[1].qs = [127; QK];
        let p = Packed::q8_0(&w, rows, cols);
        let mut ys: Vec<(Vec<BlockQ8_0>, Vec<i32>)> = (0..MAX_ACTS as u64)
            .map(|i| acts_q8_0(cols, 20 + i))
            .collect();
        ys[3].0[0].qs = [-127; QK];
        ys[3].0[1].qs = [127; QK];
        let (q, s) = &mut ys[3];
        block_sums(q, s);
        for n_act in 1..=MAX_ACTS {
            let acts: Vec<Act> = ys[..n_act].iter().map(|(y, s)| Act::Q8_0(y, s)).collect();
            let runs = all_isas(&p, 0, p.groups(), &acts);
            for (isa, outs) in &runs {
                for (a, o) in outs.iter().enumerate() {
                    assert_eq!(
                        o.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        runs[0].1[a].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{isa:?} differs from the scalar kernel"
                    );
                    for n in 0..rows {
                        let want = dot_q8_0_q8_0_scalar(&w[n * kb..(n + 1) * kb], &ys[a].0);
                        assert!(
                            (o[n] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{isa:?} row {n}: {} vs {want}",
                            o[n]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_dequantize_as_the_unpacked_blocks_do() {
        let (rows, cols) = (21, 96);
        let kb = cols / QK;
        let w4 = q4_1_blocks(rows * kb, 3);
        let w8 = q8_0_blocks(rows * kb, 4);
        let (p4, p8) = (Packed::q4_1(&w4, rows, cols), Packed::q8_0(&w8, rows, cols));
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        for n in 0..rows {
            p4.row_f32(n, &mut a);
            quant::dequantize_q4_1(&w4[n * kb..(n + 1) * kb], &mut b);
            assert_eq!(a, b, "q4_1 row {n}");
            p8.row_f32(n, &mut a);
            quant::dequantize_q8_0(&w8[n * kb..(n + 1) * kb], &mut b);
            assert_eq!(a, b, "q8_0 row {n}");
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::kernels::quant;

    /// Not a check: prints each kernel's time per 16-row group-block for 1..4
    /// activation rows, on a 1536 × 576 Q4_1 matrix (SmolLM2's gate) and a
    /// 49152 × 576 Q8_0 one (its output). `cargo test --release -p
    /// helexa-engine --lib kernel_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn kernel_speed() {
        let cols = 576;
        let kb = cols / QK;
        for (kind, rows) in [
            (Kind::Q4_1, 1536),
            (Kind::Q4_1, 196608),
            (Kind::Q8_0, 49152),
        ] {
            let p = match kind {
                Kind::Q4_1 => {
                    let w: Vec<BlockQ4_1> = (0..rows * kb)
                        .map(|i| BlockQ4_1 {
                            d: f16::from_f32(0.01),
                            m: f16::from_f32(-0.05),
                            qs: [(i % 251) as u8; 16],
                        })
                        .collect();
                    Packed::q4_1(&w, rows, cols)
                }
                Kind::Q8_0 => {
                    let w: Vec<BlockQ8_0> = (0..rows * kb)
                        .map(|i| BlockQ8_0 {
                            d: f16::from_f32(0.01),
                            qs: [(i % 251) as u8 as i8; 32],
                        })
                        .collect();
                    Packed::q8_0(&w, rows, cols)
                }
            };
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut y1 = vec![BlockQ8_1::ZERO; kb];
            quant::quantize_q8_1(&x, &mut y1);
            let mut y0 = vec![BlockQ8_0::ZERO; kb];
            quant::quantize_q8_0(&x, &mut y0);
            let mut s0 = vec![0; kb];
            block_sums(&y0, &mut s0);
            let act = match kind {
                Kind::Q4_1 => Act::Q8_1(&y1),
                Kind::Q8_0 => Act::Q8_0(&y0, &s0),
            };
            let g = p.groups();
            // Dequantization to f32 rows (the dense prompt path).
            let mut row = vec![0f32; cols];
            let t = std::time::Instant::now();
            for n in 0..rows.min(8192) {
                p.row_f32(n, &mut row);
            }
            println!(
                "{kind:?} {rows}x{cols} {:?}, row_f32: {:.2} ns per weight",
                pick(),
                t.elapsed().as_nanos() as f64 / (rows.min(8192) * cols) as f64
            );
            for r in [1, 2, 4, 8] {
                let acts = vec![act; r];
                let mut outs = vec![vec![0f32; g * G]; r];
                // One untimed pass first: the outputs' pages are faulted in
                // (the forward pass keeps its buffers), and at least three
                // timed passes even over the big matrix.
                {
                    let mut o: Vec<&mut [f32]> =
                        outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                    p.dot_groups(0, g, &acts, &mut o);
                }
                let reps = (200_000_000 / (rows * cols)).max(3);
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    let mut o: Vec<&mut [f32]> =
                        outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                    p.dot_groups(0, g, &acts, &mut o);
                }
                let per = t.elapsed().as_secs_f64() / (reps * g * kb) as f64;
                println!(
                    "{kind:?} {rows}x{cols} {:?}, {r} rows: {:.2} ns per group-block, {:.2} GB/s of weights",
                    pick(),
                    per * 1e9,
                    p.group_bytes() as f64 / per / 1e9
                );
            }
        }
    }
}
