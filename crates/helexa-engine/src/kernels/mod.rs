//! CPU compute kernels: quantized dot products, the parallel matmul over
//! memory-mapped weights, and the f32 vector ops of the forward pass.

pub mod attention;
pub mod matmul;
pub mod ops;
pub mod quant;
pub mod repack;
pub mod team;

/// Asks for the `len` bytes at `p` in L1, one 64-byte line at a time. A
/// hint: it cannot fault whatever the address.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_bytes(p: *const u8, len: usize) {
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T0 }>(p, len)
}

/// As [`prefetch_bytes`], into L2 only (`prefetcht1`). The attention
/// streams its K/V from memory at the rate one core's outstanding misses
/// allow: a prefetch into L1 holds one of its few fill buffers until the
/// line arrives, one into L2 only a slot of the larger L2 miss queue, and
/// the loads that follow hit L2. Keys a block of tiles ahead and the
/// block's values into L2 instead of L1: attention region of an
/// 8-sequence step −3.5..−6.7 % (`HELEXA_REGION_TIMES=1`, 3 alternated
/// pairs); a second block ahead as well was 10 % slower.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_bytes_to_l2(p: *const u8, len: usize) {
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T1 }>(p, len)
}

/// As [`prefetch_bytes`], with the intent to write (`prefetchw`): the lines
/// arrive owned, so the stores that follow need no second trip to take them
/// from another core's cache. A hint (a no-op on CPUs without it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_bytes_to_write(p: *const u8, len: usize) {
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_ET0 }>(p, len)
}

/// `_mm_prefetch` with `HINT` of every 64-byte line of `len` bytes at `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_lines<const HINT: i32>(p: *const u8, len: usize) {
    let a = p as *const i8;
    let mut off = 0;
    while off < len {
        // SAFETY: a prefetch is a hint; it cannot fault.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(a.wrapping_add(off)) };
        off += 64;
    }
}
