//! Per-model admission (docs/protocol.md §3): at most `max_in_flight` requests
//! run, at most `max_queue_depth` wait, none waits longer than `max_wait`.
//!
//! The decision is made before any response byte is sent. A [`Permit`]
//! releases its slot on drop, wherever it is dropped: a waiter whose client
//! went away is removed from the semaphore's queue (tokio's acquire is
//! cancel-safe), and a running request's permit lives inside its response
//! body stream, so the slot frees when the stream ends or is dropped.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Limits of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_in_flight: u32,
    pub max_queue_depth: u32,
    pub max_wait: Duration,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_queue_depth` requests already wait.
    QueueFull,
    /// No slot freed within `max_wait`.
    WaitTimeout,
    /// The gate was closed (model unloading or agent draining).
    Closed,
}

/// The gate of one loaded model.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    slots: Arc<Semaphore>,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    in_flight: AtomicU32,
    waiting: AtomicU32,
    rejected: AtomicU64,
    admitted: AtomicU64,
    /// Signalled whenever `in_flight` drops, for drains.
    idle: Notify,
}

/// A running slot. Dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    counters: Arc<Counters>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.counters.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.counters.idle.notify_waiters();
    }
}

/// Counts a waiter for as long as it waits, even if its future is dropped.
struct WaitGuard<'a>(&'a Counters);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            slots: Arc::new(Semaphore::new(limits.max_in_flight.max(1) as usize)),
            counters: Arc::new(Counters::default()),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Waits for a slot within the limits. Cancel-safe: dropping the future
    /// leaves no trace in the counters or the queue.
    pub async fn acquire(&self) -> Result<Permit, Refusal> {
        if self.slots.is_closed() {
            return Err(self.refuse(Refusal::Closed));
        }
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(self.admit(slot));
        }
        // Reserve a place in the queue atomically, so that concurrent
        // arrivals cannot overshoot `max_queue_depth`.
        let reserved =
            self.counters
                .waiting
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    (w < self.limits.max_queue_depth).then_some(w + 1)
                });
        if reserved.is_err() {
            return Err(self.refuse(Refusal::QueueFull));
        }
        let _guard = WaitGuard(&self.counters);
        match tokio::time::timeout(self.limits.max_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(self.admit(slot)),
            Ok(Err(_closed)) => Err(self.refuse(Refusal::Closed)),
            Err(_elapsed) => Err(self.refuse(Refusal::WaitTimeout)),
        }
    }

    fn admit(&self, slot: OwnedSemaphorePermit) -> Permit {
        self.counters.in_flight.fetch_add(1, Ordering::AcqRel);
        self.counters.admitted.fetch_add(1, Ordering::Relaxed);
        Permit {
            _slot: slot,
            counters: self.counters.clone(),
        }
    }

    fn refuse(&self, why: Refusal) -> Refusal {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        why
    }

    /// Refuses every waiter (they get `Closed`) and all later arrivals.
    /// Running requests keep their slots.
    pub fn close(&self) {
        self.slots.close();
    }

    pub fn is_closed(&self) -> bool {
        self.slots.is_closed()
    }

    /// Waits until no request runs, or `timeout` passes; true when idle.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = deadline_after(timeout);
        loop {
            let notified = self.counters.idle.notified();
            if self.in_flight() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight() == 0;
            }
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.counters.in_flight.load(Ordering::Acquire)
    }

    pub fn queue_depth(&self) -> u32 {
        self.counters.waiting.load(Ordering::Acquire)
    }

    pub fn rejected_total(&self) -> u64 {
        self.counters.rejected.load(Ordering::Relaxed)
    }

    pub fn admitted_total(&self) -> u64 {
        self.counters.admitted.load(Ordering::Relaxed)
    }
}

/// `now + after`, or a far-off instant when that would overflow (a
/// configured timeout of `u64::MAX` seconds means "never", not a panic).
pub fn deadline_after(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(in_flight: u32, queue: u32, wait_ms: u64) -> Arc<Admission> {
        Arc::new(Admission::new(Limits {
            max_in_flight: in_flight,
            max_queue_depth: queue,
            max_wait: Duration::from_millis(wait_ms),
        }))
    }

    #[tokio::test]
    async fn limits_queue_and_timeout() {
        let g = gate(1, 1, 100);
        let p1 = g.acquire().await.unwrap();
        assert_eq!(g.in_flight(), 1);
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.acquire().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(g.queue_depth(), 1);
        // Queue full.
        assert_eq!(g.acquire().await.unwrap_err(), Refusal::QueueFull);
        // The waiter times out.
        assert_eq!(waiter.await.unwrap().unwrap_err(), Refusal::WaitTimeout);
        assert_eq!(g.queue_depth(), 0);
        assert_eq!(g.rejected_total(), 2);
        drop(p1);
        assert_eq!(g.in_flight(), 0);
        let _p = g.acquire().await.unwrap();
    }

    #[tokio::test]
    async fn cancelled_waiter_leaks_nothing() {
        let g = gate(1, 4, 10_000);
        let p1 = g.acquire().await.unwrap();
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.acquire().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(g.queue_depth(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(g.queue_depth(), 0);
        drop(p1);
        // The slot is free again: a new request is admitted at once.
        let p = tokio::time::timeout(Duration::from_millis(100), g.acquire())
            .await
            .expect("no leaked slot")
            .unwrap();
        assert_eq!(g.in_flight(), 1);
        drop(p);
    }

    #[tokio::test]
    async fn huge_limits_do_not_overflow() {
        let g = Arc::new(Admission::new(Limits {
            max_in_flight: u32::MAX,
            max_queue_depth: u32::MAX,
            max_wait: Duration::from_secs(u64::MAX),
        }));
        let p = g.acquire().await.unwrap();
        assert_eq!(g.in_flight(), 1);
        assert!(!g.drain(Duration::from_millis(10)).await);
        drop(p);
        assert!(g.drain(Duration::from_secs(u64::MAX)).await);
        assert!(deadline_after(Duration::MAX) > tokio::time::Instant::now());
    }

    #[tokio::test]
    async fn queue_depth_zero_refuses_at_once() {
        let g = gate(1, 0, 10_000);
        let _p = g.acquire().await.unwrap();
        assert_eq!(g.acquire().await.unwrap_err(), Refusal::QueueFull);
    }

    #[tokio::test]
    async fn close_refuses_waiters_and_drain_waits() {
        let g = gate(1, 4, 10_000);
        let p1 = g.acquire().await.unwrap();
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.acquire().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        g.close();
        assert_eq!(waiter.await.unwrap().unwrap_err(), Refusal::Closed);
        assert!(!g.drain(Duration::from_millis(30)).await);
        let g3 = g.clone();
        let drained = tokio::spawn(async move { g3.drain(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(p1);
        assert!(drained.await.unwrap());
    }
}
