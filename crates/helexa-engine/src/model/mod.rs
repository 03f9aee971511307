//! Models behind one small trait the scheduler drives: run a batch of token
//! chunks of several sequences, each at its own position in its own KV-cache
//! slot, and get the next-token logits of each chunk.

pub mod device;
pub mod gguf;
pub mod llama;
pub mod regions;
pub mod safetensors;

/// Tokens of one sequence to run: written to `slot`'s cache at positions
/// `pos..pos + tokens.len()`, attending to everything before them.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub slot: usize,
    pub pos: usize,
    pub tokens: &'a [u32],
    /// Run through dequantized f32 GEMM instead of int8 dot products: faster
    /// for long prompts. Results differ slightly between the two paths, so
    /// the caller decides per sequence, never per batch.
    pub dense: bool,
}

pub trait Model: Send {
    /// Positions each slot holds.
    fn context_length(&self) -> usize;
    /// Sequences that can be cached at once.
    fn slots(&self) -> usize;
    /// Logits (vocab-sized) after the last token of each chunk, in order.
    /// Several chunks may not share a slot.
    fn forward(&mut self, chunks: &[Chunk]) -> Result<Vec<Vec<f32>>, String>;
    /// [`crate::sampling::argmax`] of `logits[i]` where `want[i]`, `None`
    /// elsewhere: the greedy picks of a step, which a model with a thread
    /// team computes over it (one vocabulary scan per sequence on the
    /// scheduler thread kept the other threads waiting), or has found
    /// already while computing them. Called with the last `forward`'s
    /// vectors unchanged, or with any others (then scanned).
    fn argmaxes(&self, logits: &[&[f32]], want: &[bool]) -> Vec<Option<u32>> {
        logits
            .iter()
            .zip(want)
            .map(|(l, &w)| w.then(|| crate::sampling::argmax(l)))
            .collect()
    }
    /// The slot's sequence is done; its cache may be reused.
    fn release(&mut self, slot: usize);
    /// Whether a slot's cache survives `release` and `copy_kv` works: the
    /// scheduler's prefix cache needs both.
    fn reuses_prefix(&self) -> bool {
        false
    }
    /// KV cache bytes one position of one slot takes.
    fn kv_bytes_per_position(&self) -> usize {
        0
    }
    /// Memory `slot`'s cache holds while it keeps `positions` positions
    /// (what the prefix cache's byte budget counts): by default the
    /// positions' own bytes; a model whose caches hold more (whole pages, room
    /// to grow) says so.
    fn kv_bytes(&self, slot: usize, positions: usize) -> u64 {
        let _ = slot;
        positions as u64 * self.kv_bytes_per_position() as u64
    }
    /// Frees the memory of `slot`'s cache (it is rebuilt on next use).
    fn drop_cache(&mut self, slot: usize) {
        let _ = slot;
    }
    /// Copies cache positions `start..end` of slot `from` into slot `to`.
    fn copy_kv(&mut self, from: usize, to: usize, start: usize, end: usize) -> Result<(), String> {
        let _ = (from, to, start, end);
        Err("this model cannot copy its KV cache".into())
    }
}

#[cfg(test)]
mod arch_tests;
#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod synthetic_tests;
#[cfg(test)]
mod tests;
