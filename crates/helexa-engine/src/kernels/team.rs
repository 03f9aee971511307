//! A fork-join team for the decode forward pass: the calling thread plus
//! `threads - 1` workers that spin between parallel regions instead of
//! sleeping.
//!
//! Why not rayon here: one decode step of a 30-layer model is ~180 short
//! parallel regions (q/k/v, attention, o, gate/up, SiLU, down per layer)
//! separated by a few microseconds of serial work (norms, RoPE, the KV
//! store). rayon's idle workers yield a few times and then sleep on a futex,
//! so most regions began by waking a worker (an IPI; tens of microseconds in
//! a VM) while the caller waited at the join: with 8 sequences on 2 threads
//! ~10 % of the CPU went to the kernel scheduler, and two 1-thread
//! processes together decoded ~40 % more than one 2-thread process. Here a
//! worker that finished a region spins (then yields) for [`SPIN`] before it
//! parks, which covers the gaps inside a step; between steps it parks.
//!
//! A region is `n` tasks claimed one at a time from one atomic word, so a
//! worker the OS preempts delays only the task it holds. Each task runs
//! once, by whichever thread claims it; what a task computes must not depend
//! on who runs it (the kernels' outputs are a function of the task index
//! only), so results are identical for any number of threads.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker keeps looking for the next region before it
/// parks: longer than the serial gaps inside one forward step, far shorter
/// than the time between steps of an idle engine.
const SPIN: Duration = Duration::from_micros(300);
/// Busy-wait iterations (with a pause hint) before an idle thread starts
/// yielding its core to other runnable threads.
const PAUSES: u32 = 2_000;

/// The region word: `(n << 32) | next`, the task count of the current
/// region and the next unclaimed task. Claims `fetch_add(1)`; a claim is
/// valid when `next < n`.
fn split(w: u64) -> (usize, usize) {
    ((w >> 32) as usize, (w & 0xFFFF_FFFF) as usize)
}

type Task<'a> = dyn Fn(usize) + Sync + 'a;

/// What a region's tasks run, on the caller's stack while the region lasts.
struct Job<'a> {
    f: &'a Task<'a>,
}

/// Keeps a field on cache lines of its own: the claim word and the done
/// count are written by every thread of a region, and sharing a line (with
/// each other or with the read-mostly fields) made every claim and every
/// completion move it between cores twice.
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

struct Shared {
    word: Padded<AtomicU64>,
    /// Tasks completed in the current region; each thread adds its count
    /// once, when it finds no task left (not once per task).
    done: Padded<AtomicUsize>,
    /// The current region's `Job`; written before `word` publishes it and
    /// read only by a thread holding a valid claim (so the region, and the
    /// caller's stack frame holding the job, is still live).
    job: AtomicPtr<Job<'static>>,
    panicked: AtomicBool,
    /// Threads of the team, the caller included.
    threads: usize,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

impl Shared {
    /// Claims and runs tasks of the current region until none is left;
    /// whether any was run.
    fn work(&self) -> bool {
        let mut ran = 0;
        // The count goes in when this thread leaves the region: until then
        // the caller cannot return from `run`, so the job stays alive for
        // every claim made here.
        let finish = |ran: usize| {
            if ran > 0 {
                self.done.fetch_add(ran, Ordering::Release);
            }
            ran > 0
        };
        loop {
            let (n, next) = split(self.word.load(Ordering::Acquire));
            if next >= n {
                return finish(ran);
            }
            // Guided claims: a share of what is left (at least one task),
            // so a region of many small tasks costs few claims (each moves
            // the word's cache line between cores) and its end still
            // balances one task at a time.
            let k = ((n - next) / (2 * self.threads)).max(1);
            let (n, i) = split(self.word.fetch_add(k as u64, Ordering::AcqRel));
            if i >= n {
                return finish(ran);
            }
            // SAFETY: a valid claim (`i < n`) means this region's task `i`
            // has not completed, so the caller is still waiting in `run` and
            // the job it published (before the word, read with Acquire
            // above) is alive.
            let job = unsafe { &*self.job.load(Ordering::Acquire) };
            for t in i..(i + k).min(n) {
                if catch_unwind(AssertUnwindSafe(|| (job.f)(t))).is_err() {
                    self.panicked.store(true, Ordering::Relaxed);
                }
                ran += 1;
            }
        }
    }

    fn has_work(&self) -> bool {
        let (n, next) = split(self.word.load(Ordering::SeqCst));
        next < n
    }

    fn worker(&self) {
        let mut idle_since = Instant::now();
        let mut pauses = 0u32;
        while !self.shutdown.load(Ordering::Relaxed) {
            if self.work() {
                idle_since = Instant::now();
                pauses = 0;
                continue;
            }
            if pauses < PAUSES {
                pauses += 1;
                std::hint::spin_loop();
                continue;
            }
            if idle_since.elapsed() < SPIN {
                std::thread::yield_now();
                continue;
            }
            let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            while !self.has_work() && !self.shutdown.load(Ordering::SeqCst) {
                g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(g);
            idle_since = Instant::now();
            pauses = 0;
        }
    }
}

/// See the module documentation. One region at a time: `run` is called by
/// one thread (the forward pass owns its team).
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    busy: AtomicBool,
}

impl Team {
    /// A team of `threads` (the caller included; at least 1).
    pub fn new(threads: usize, name: &str) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            word: Padded(AtomicU64::new(0)),
            done: Padded(AtomicUsize::new(0)),
            job: AtomicPtr::new(std::ptr::null_mut()),
            panicked: AtomicBool::new(false),
            threads: threads.max(1),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let s = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || s.worker())?,
            );
        }
        Ok(Team {
            shared,
            workers,
            busy: AtomicBool::new(false),
        })
    }

    /// Threads that run a region, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0) … f(n - 1)`, each once, over the team; returns when all
    /// have run. A panic in a task is re-raised here once every task has
    /// finished.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        assert!(n < 1 << 31, "too many tasks");
        if n == 0 {
            return;
        }
        if n == 1 || self.workers.is_empty() {
            (0..n).for_each(f);
            return;
        }
        assert!(
            !self.busy.swap(true, Ordering::Acquire),
            "Team::run is not reentrant"
        );
        let s = &*self.shared;
        let job = Job { f };
        s.done.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        // The lifetime is erased for the shared slot; the job outlives every
        // read of it (see `Shared::work`), as this frame waits below.
        s.job
            .store((&job as *const Job).cast_mut().cast(), Ordering::Release);
        s.word.store((n as u64) << 32, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        s.work();
        let mut pauses = 0u32;
        while s.done.load(Ordering::Acquire) < n {
            if pauses < PAUSES {
                pauses += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        s.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        let panicked = s.panicked.load(Ordering::Relaxed);
        self.busy.store(false, Ordering::Release);
        if panicked {
            resume_unwind(Box::new("a parallel task panicked"));
        }
    }

    /// `f(i, chunk)` for each `chunk`-element piece of `buf` (the last may be
    /// shorter), over the team.
    pub fn for_chunks_mut<T: Send>(
        &self,
        buf: &mut [T],
        chunk: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        assert!(chunk > 0);
        let len = buf.len();
        let d = Disjoint::new(buf);
        self.run(len.div_ceil(chunk), &|i| {
            let start = i * chunk;
            // SAFETY: task `i` runs once and is the only one given
            // `start..start + chunk`.
            f(i, unsafe { d.slice(start, chunk.min(len - start)) });
        });
    }
}

/// A mutable buffer whose disjoint pieces the tasks of one region write
/// (rows of a matrix, slots of a cache) through a shared reference.
pub struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: a `Disjoint` only hands out `&mut` pieces whose disjointness the
// caller of `slice` guarantees, so sharing it is sharing `&mut [T]` pieces.
unsafe impl<T: Send> Send for Disjoint<'_, T> {}
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    pub fn new(buf: &'a mut [T]) -> Self {
        Disjoint {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// A pointer to `buf[start]`, with `len` elements from there in the
    /// buffer (checked): for writes to scattered elements that no one piece
    /// covers (the caller keeps them apart from every other writer's).
    pub fn ptr(&self, start: usize, len: usize) -> *mut T {
        assert!(
            start <= self.len && len <= self.len - start,
            "piece out of the buffer"
        );
        self.ptr.wrapping_add(start)
    }

    /// `buf[start..start + len]`.
    ///
    /// # Safety
    /// No two pieces alive at the same time overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(
            start <= self.len && len <= self.len - start,
            "piece out of the buffer"
        );
        // SAFETY: in bounds (checked); exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_exactly_once_over_many_regions() {
        for threads in [1, 2, 3, 5] {
            let team = Team::new(threads, "t").unwrap();
            for n in [0usize, 1, 2, 7, 64, 1000] {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                team.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "threads {threads}, n {n}"
                );
            }
        }
    }

    #[test]
    fn regions_after_the_workers_parked_still_run_on_every_thread() {
        let team = Team::new(3, "t").unwrap();
        for _ in 0..3 {
            std::thread::sleep(SPIN * 4); // the workers park
            let ids = Mutex::new(std::collections::HashSet::new());
            // Tasks long enough that every thread gets one.
            team.run(64, &|_| {
                ids.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(Duration::from_millis(2));
            });
            assert_eq!(ids.lock().unwrap().len(), 3);
        }
    }

    #[test]
    fn chunks_cover_the_buffer_once() {
        let team = Team::new(2, "t").unwrap();
        let mut v = vec![0u32; 10_001];
        for _ in 0..50 {
            team.for_chunks_mut(&mut v, 97, |i, c| {
                for (j, x) in c.iter_mut().enumerate() {
                    *x += (i * 97 + j) as u32;
                }
            });
        }
        assert!(v.iter().enumerate().all(|(i, &x)| x == 50 * i as u32));
    }

    #[test]
    fn a_panicking_task_is_reraised_after_the_region_and_the_team_still_works() {
        let team = Team::new(2, "t").unwrap();
        let ran = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.run(16, &|i| {
                ran.fetch_add(1, Ordering::Relaxed);
                if i == 5 {
                    panic!("task 5");
                }
            })
        }));
        assert!(r.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 16, "all tasks still ran");
        let sum = AtomicUsize::new(0);
        team.run(100, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }

    /// `cargo test --release -p helexa-engine --lib region_cost -- --ignored --nocapture`:
    /// the fixed cost of one region (tasks that do nothing), by team size and
    /// task count. A decode step runs ~11 regions per layer.
    #[test]
    #[ignore = "timing, prints figures"]
    fn region_cost() {
        for threads in [1usize, 2] {
            let team = Team::new(threads, "t").unwrap();
            for n in [2usize, 8, 32] {
                let reps = 200_000;
                let sink = AtomicUsize::new(0);
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    team.run(n, &|i| {
                        sink.fetch_add(i, Ordering::Relaxed);
                    });
                }
                let ns = t.elapsed().as_nanos() as f64 / reps as f64;
                println!("{threads} threads, {n} empty tasks: {ns:.0} ns per region");
            }
        }
    }
}
