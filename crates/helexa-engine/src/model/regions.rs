//! Opt-in wall time of each kind of parallel region of the native decoder's
//! decode steps, for finding where a step goes (`HELEXA_REGION_TIMES=1`).
//!
//! With the variable set, every forward pass whose rows are all decode rows
//! (one token per sequence, no dense prompt rows) adds the time between
//! successive region boundaries, as the calling thread sees it, to the
//! counters of its batch size; every [`REPORT_EVERY`] such steps of one
//! batch size a line goes to stderr and those counters restart:
//!
//! ```text
//! helexa region times, 8 sequences, µs per step over 256 steps: norm 4.5 | qkv 23.6 | ...
//! ```
//!
//! Unset (the default), a forward pass reads one cached flag and nothing
//! else. Kept in the code because every session that tuned the decode step
//! wrote this instrumentation again by hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The kinds of region, in the order of one layer (then the output).
#[derive(Clone, Copy)]
pub enum Region {
    /// Embedding lookup, then for each layer: the attention norm (with the
    /// residual add)...
    AttnNorm = 0,
    Qkv,
    /// RoPE, the K/V store and attention (one region in decode).
    Attention,
    Wo,
    FfnNorm,
    GateUp,
    Silu,
    Down,
    /// The final norm and the output projection (into one vector per
    /// sequence).
    LmHead,
}

const KINDS: usize = 9;
const NAMES: [&str; KINDS] = [
    "attn_norm",
    "qkv",
    "attention",
    "wo",
    "ffn_norm",
    "gate_up",
    "silu",
    "down",
    "lm_head",
];
/// Batch sizes counted separately (larger ones share the last bucket).
const SIZES: usize = 17;
/// Steps of one batch size per report.
pub const REPORT_EVERY: u64 = 256;

struct Counters {
    ns: [AtomicU64; KINDS],
    steps: AtomicU64,
}

static COUNTERS: [Counters; SIZES] = [const {
    Counters {
        ns: [const { AtomicU64::new(0) }; KINDS],
        steps: AtomicU64::new(0),
    }
}; SIZES];

/// Whether `HELEXA_REGION_TIMES` is set (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("HELEXA_REGION_TIMES").is_some_and(|v| v != "0"))
}

/// The clock of one forward pass; inert when `active` is false.
pub struct Clock {
    active: bool,
    rows: usize,
    last: Instant,
    ns: [u64; KINDS],
}

impl Clock {
    pub fn start(active: bool, rows: usize) -> Clock {
        Clock {
            active,
            rows,
            last: Instant::now(),
            ns: [0; KINDS],
        }
    }

    /// The time since the previous mark (or the start) goes to `region`.
    #[inline]
    pub fn mark(&mut self, region: Region) {
        if self.active {
            let now = Instant::now();
            self.ns[region as usize] += (now - self.last).as_nanos() as u64;
            self.last = now;
        }
    }

    /// Adds this pass to its batch size's counters (and reports).
    pub fn finish(self) {
        if !self.active {
            return;
        }
        let c = &COUNTERS[self.rows.min(SIZES - 1)];
        for (a, &v) in c.ns.iter().zip(&self.ns) {
            a.fetch_add(v, Ordering::Relaxed);
        }
        if c.steps.fetch_add(1, Ordering::Relaxed) + 1 == REPORT_EVERY {
            let parts: Vec<String> = NAMES
                .iter()
                .zip(&c.ns)
                .map(|(n, a)| {
                    let us = a.swap(0, Ordering::Relaxed) as f64 / 1e3 / REPORT_EVERY as f64;
                    format!("{n} {us:.1}")
                })
                .collect();
            c.steps.store(0, Ordering::Relaxed);
            eprintln!(
                "helexa region times, {} sequences, µs per step over {REPORT_EVERY} steps: {}",
                self.rows,
                parts.join(" | ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inert_clock_counts_nothing_and_an_active_one_counts_each_region() {
        let mut c = Clock::start(false, 3);
        c.mark(Region::Qkv);
        assert_eq!(c.ns, [0; KINDS]);
        let mut c = Clock::start(true, 3);
        std::thread::sleep(std::time::Duration::from_millis(2));
        c.mark(Region::Qkv);
        c.mark(Region::Wo);
        assert!(c.ns[Region::Qkv as usize] >= 2_000_000);
        assert!(c.ns[Region::Wo as usize] < c.ns[Region::Qkv as usize]);
        assert_eq!(c.ns[Region::Down as usize], 0);
    }
}
