//! A ready engine as the request path sees it: where to send requests, its
//! last polled figures, and the activity the watchdog reads to tell a busy
//! engine from a stalled one.

use super::EngineHealth;
use super::EngineInfo;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A ready engine as the request path sees it.
#[derive(Debug)]
pub struct EngineConn {
    pub base_url: String,
    pub pid: u32,
    pub info: EngineInfo,
    stats: Mutex<EngineHealth>,
    /// When this engine was published; the clock of `last_byte_ms`.
    born: Instant,
    /// Answers being relayed from this engine (response head received).
    bodies: AtomicU32,
    /// Milliseconds after `born` of the last response byte (or answer start).
    last_byte_ms: AtomicU64,
}

impl EngineConn {
    pub fn new(base_url: String, pid: u32, info: EngineInfo) -> Arc<EngineConn> {
        Arc::new(EngineConn {
            base_url,
            pid,
            info,
            stats: Mutex::new(EngineHealth::default()),
            born: Instant::now(),
            bodies: AtomicU32::new(0),
            last_byte_ms: AtomicU64::new(0),
        })
    }

    pub fn set_stats(&self, h: EngineHealth) {
        *self.stats.lock().expect("stats lock") = h;
    }

    pub fn stats(&self) -> EngineHealth {
        self.stats.lock().expect("stats lock").clone()
    }

    /// Counts one answer in progress until the guard drops.
    pub fn body_started(self: &Arc<Self>) -> BodyGuard {
        self.bodies.fetch_add(1, Ordering::AcqRel);
        let guard = BodyGuard(self.clone());
        guard.touch();
        guard
    }

    /// How long the engine has sent nothing while answers were in progress
    /// (`None` when none is).
    pub fn silent_for(&self) -> Option<Duration> {
        if self.bodies.load(Ordering::Acquire) == 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_byte_ms.load(Ordering::Acquire));
        Some(self.born.elapsed().saturating_sub(last))
    }
}

/// One answer being relayed from an engine; touched on every chunk.
#[derive(Debug)]
pub struct BodyGuard(Arc<EngineConn>);

impl BodyGuard {
    /// A response byte came from the engine just now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.0.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_byte_ms.fetch_max(ms, Ordering::AcqRel);
    }
}

impl Drop for BodyGuard {
    fn drop(&mut self) {
        self.0.bodies.fetch_sub(1, Ordering::AcqRel);
    }
}
