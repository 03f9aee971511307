//! The scheduler: one worker thread owns the model and runs continuous
//! batching over the submitted sequences.
//!
//! Each step it drops cancelled sequences (their event receiver is gone),
//! admits waiting ones into free cache slots, and runs one forward over a
//! mixed batch: the next token of every decoding sequence plus at most
//! `PREFILL_CHUNK` prompt tokens of prefilling ones, so a long prompt never
//! stalls the others for more than one chunk. Sampling, incremental
//! detokenization and stop strings then run per sequence; a failure in one
//! sequence fails that sequence only.
//!
//! Prefix cache: a slot's KV cache outlives its sequence. A new sequence
//! takes the free slot whose cached tokens share the longest prefix with its
//! prompt (at least `MIN_SHARE` tokens; else the least recently used slot)
//! and skips prefilling that prefix; a prompt that shares a longer prefix with a running sequence (the
//! other choices of an `n` > 1 request, an agent resending its history while
//! an earlier turn still runs) copies those positions from it, waiting for
//! an earlier sequence that is still prefilling them rather than computing
//! them twice. The last prompt token always runs, for its logits.

use crate::api::*;
use crate::detok::StreamDecoder;
use crate::model::{Chunk, Model};
use crate::sampling::Sampler;
use crate::stop::StopMatcher;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Prompt tokens run per step at most (across prefilling sequences).
pub const PREFILL_CHUNK: usize = 512;
/// Prompts at least this long are prefilled through f32 GEMM.
pub const DENSE_MIN_PROMPT: usize = 64;
/// A running sequence's prefix is copied (or waited for) only when it saves
/// at least this many positions.
const MIN_SHARE: usize = 16;
/// Window over which `tok_s_*` are computed.
const RATE_WINDOW: Duration = Duration::from_secs(10);

pub struct Submission {
    pub req: GenerationRequest,
    pub tx: UnboundedSender<GenEvent>,
}

enum Command {
    Submit(Box<Submission>),
    Shutdown,
}

/// Counters shared between the worker and `Engine::stats`.
#[derive(Default)]
pub struct SharedStats {
    in_flight: AtomicUsize,
    tokens_generated_total: AtomicU64,
    prompt_tokens_total: AtomicU64,
    prompt_tokens_cached_total: AtomicU64,
    prefix_cache_bytes: AtomicU64,
    prefix_cache_evictions_total: AtomicU64,
    tok_s_prefill: AtomicU64,
    tok_s_decode: AtomicU64,
}

impl SharedStats {
    pub fn snapshot(&self) -> EngineStats {
        EngineStats {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            tokens_generated_total: self.tokens_generated_total.load(Ordering::Relaxed),
            prompt_tokens_total: self.prompt_tokens_total.load(Ordering::Relaxed),
            prompt_tokens_cached_total: self.prompt_tokens_cached_total.load(Ordering::Relaxed),
            prefix_cache_bytes: self.prefix_cache_bytes.load(Ordering::Relaxed),
            prefix_cache_evictions_total: self.prefix_cache_evictions_total.load(Ordering::Relaxed),
            tok_s_prefill: f64::from_bits(self.tok_s_prefill.load(Ordering::Relaxed)),
            tok_s_decode: f64::from_bits(self.tok_s_decode.load(Ordering::Relaxed)),
        }
    }
}

/// What the worker needs besides the model.
pub struct WorkerConfig {
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub eos_token_ids: Vec<u32>,
    /// Bytes of KV the free slots may keep for reuse.
    pub prefix_cache_bytes: u64,
}

/// Handle to the worker thread.
pub struct Scheduler {
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    stats: Arc<SharedStats>,
    closed: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Scheduler {
    pub fn start(model: Box<dyn Model>, cfg: WorkerConfig) -> Result<Scheduler, EngineError> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(SharedStats::default());
        let closed = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            slots: (0..model.slots()).map(|_| None).collect(),
            memo: (0..model.slots()).map(|_| Memo::default()).collect(),
            clock: 0,
            reuse: model.reuses_prefix(),
            model,
            cfg,
            rx,
            waiting: VecDeque::new(),
            stats: stats.clone(),
            rates: Rates::default(),
        };
        let thread = std::thread::Builder::new()
            .name("helexa-scheduler".into())
            .spawn(move || worker.run())
            .map_err(|e| {
                EngineError::Inference(format!("cannot start the scheduler thread: {e}"))
            })?;
        Ok(Scheduler {
            tx: Mutex::new(Some(tx)),
            stats,
            closed,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn submit(&self, sub: Submission) -> Result<(), EngineError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::Shutdown);
        }
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let tx = guard.as_ref().ok_or(EngineError::Shutdown)?;
        self.stats.in_flight.fetch_add(1, Ordering::AcqRel);
        if tx.send(Command::Submit(Box::new(sub))).is_err() {
            self.stats.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Shutdown);
        }
        Ok(())
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.snapshot()
    }

    /// Fails every running sequence with a shutdown message and joins the worker.
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(Command::Shutdown);
        }
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Seq {
    prompt_len: usize,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    /// Tokens already in the KV cache.
    cached: usize,
    /// Prompt tokens taken from the prefix cache rather than computed.
    reused: usize,
    /// Admission order: a sequence waits only for an earlier one's prefill.
    admitted: u64,
    max_new: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    tx: UnboundedSender<GenEvent>,
    /// Generated tokens not yet covered by a `Text` event.
    unreported: usize,
    /// The grammar this sequence follows, if any.
    constraint: Option<crate::constraint::Constraint>,
    /// Alternatives to report per token; `None`: no log-probabilities.
    logprobs: Option<usize>,
    /// Log-probabilities of the tokens not yet covered by a `Text` event.
    pending_logprobs: Vec<TokenLogprob>,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn send(&self, ev: GenEvent) {
        let _ = self.tx.send(ev);
    }

    /// Sends text covering the generated tokens not reported yet.
    fn send_text(&mut self, text: String) {
        let tokens = std::mem::take(&mut self.unreported);
        let logprobs = std::mem::take(&mut self.pending_logprobs);
        self.send(GenEvent::Text {
            text,
            tokens,
            logprobs,
        });
    }
}

/// Sliding-window throughput.
#[derive(Default)]
struct Rates {
    steps: VecDeque<(Instant, Duration, usize, usize)>,
}

impl Rates {
    fn record(
        &mut self,
        now: Instant,
        took: Duration,
        prefill: usize,
        decode: usize,
    ) -> (Option<f64>, Option<f64>) {
        self.steps.push_back((now, took, prefill, decode));
        while let Some(&(t, ..)) = self.steps.front() {
            if now.duration_since(t) > RATE_WINDOW {
                self.steps.pop_front();
            } else {
                break;
            }
        }
        let (mut pt, mut pn, mut dt, mut dn) = (0f64, 0usize, 0f64, 0usize);
        for &(_, d, p, n) in &self.steps {
            if p > 0 {
                pt += d.as_secs_f64();
                pn += p;
            }
            if n > 0 {
                dt += d.as_secs_f64();
                dn += n;
            }
        }
        let rate = |n: usize, t: f64| (t > 0.0 && n > 0).then(|| n as f64 / t);
        (rate(pn, pt), rate(dn, dt))
    }
}

/// What a free slot's KV cache holds (positions `0..tokens.len()`).
#[derive(Default)]
struct Memo {
    tokens: Vec<u32>,
    last_used: u64,
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct Worker {
    model: Box<dyn Model>,
    cfg: WorkerConfig,
    rx: mpsc::Receiver<Command>,
    waiting: VecDeque<Box<Submission>>,
    slots: Vec<Option<Seq>>,
    /// Per slot, what its cache holds once its sequence is gone.
    memo: Vec<Memo>,
    /// Ticks on every admission and release (LRU order of the memos).
    clock: u64,
    /// The model keeps caches across `release` and can copy them.
    reuse: bool,
    stats: Arc<SharedStats>,
    rates: Rates,
}

enum Outcome {
    Continue,
    Finished(FinishReason),
    Failed(String),
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

impl Worker {
    fn run(mut self) {
        loop {
            let idle = self.waiting.is_empty() && self.slots.iter().all(Option::is_none);
            // Take new commands: block when there is nothing to do.
            let mut shutdown = false;
            if idle {
                match self.rx.recv() {
                    Ok(cmd) => shutdown |= self.command(cmd),
                    Err(_) => break,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => shutdown |= self.command(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        shutdown = true;
                        break;
                    }
                }
            }
            if shutdown {
                self.fail_all("the engine is shutting down");
                break;
            }
            self.drop_cancelled();
            self.admit();
            self.step();
        }
    }

    /// Returns true on shutdown.
    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(s) => {
                self.waiting.push_back(s);
                false
            }
            Command::Shutdown => true,
        }
    }

    fn end_one(&self) {
        self.stats.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    fn fail_all(&mut self, msg: &str) {
        for s in self.waiting.drain(..) {
            let _ = s.tx.send(GenEvent::Failed {
                message: msg.into(),
            });
            self.stats.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        for i in 0..self.slots.len() {
            if let Some(seq) = self.slots[i].take() {
                seq.send(GenEvent::Failed {
                    message: msg.into(),
                });
                self.vacate(i, &seq, false);
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.tx.is_closed());
        for _ in self.waiting.len()..before {
            self.end_one();
        }
        for i in 0..self.slots.len() {
            if self.slots[i].as_ref().is_some_and(|s| s.tx.is_closed()) {
                let seq = self.slots[i].take().expect("checked");
                // What it prefilled stays useful: a cancelled request is
                // often retried with the same prompt.
                self.vacate(i, &seq, true);
            }
        }
    }

    fn admit(&mut self) {
        while !self.waiting.is_empty() {
            // The free slot whose cache shares most of the prompt; when none
            // shares at least MIN_SHARE tokens, the least recently used one
            // (never-used slots first), so that a long cached prefix is not
            // overwritten for a gain of a token or two.
            let prompt = &self.waiting[0].req.prompt;
            let limit = prompt.len().saturating_sub(1);
            let reuse = self.reuse;
            let free: Vec<(usize, usize, u64)> = (0..self.slots.len())
                .filter(|&i| self.slots[i].is_none())
                .map(|i| {
                    let m = &self.memo[i];
                    let shared = if reuse {
                        common_prefix(&m.tokens, &prompt[..limit])
                    } else {
                        0
                    };
                    (i, shared, m.last_used)
                })
                .collect();
            let best = free
                .iter()
                .copied()
                .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))
                .filter(|b| b.1 >= MIN_SHARE)
                .or_else(|| {
                    free.iter()
                        .copied()
                        .min_by_key(|f| f.2)
                        .map(|f| (f.0, 0, f.2))
                });
            let Some((slot, reused, _)) = best else {
                break;
            };
            let sub = self.waiting.pop_front().expect("non-empty");
            let Submission { req, tx } = *sub;
            let built = catch_unwind(AssertUnwindSafe(|| {
                (
                    Sampler::new(&req.params),
                    StreamDecoder::new(self.cfg.tokenizer.clone()),
                    StopMatcher::new(req.stop.clone()),
                )
            }));
            let (sampler, decoder, stop) = match built {
                Ok(parts) => parts,
                Err(p) => {
                    let _ = tx.send(GenEvent::Failed {
                        message: format!("cannot start the sequence: {}", panic_message(&*p)),
                    });
                    self.end_one();
                    continue;
                }
            };
            self.stats
                .prompt_tokens_total
                .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
            self.stats
                .prompt_tokens_cached_total
                .fetch_add(reused as u64, Ordering::Relaxed);
            self.clock += 1;
            self.memo[slot].last_used = self.clock;
            self.memo[slot].tokens.clear();
            self.slots[slot] = Some(Seq {
                prompt_len: req.prompt.len(),
                tokens: req.prompt,
                cached: reused,
                reused,
                admitted: self.clock,
                max_new: req.max_new_tokens,
                sampler,
                decoder,
                stop,
                tx,
                unreported: 0,
                constraint: req.constraint,
                logprobs: req.logprobs,
                pending_logprobs: Vec::new(),
            });
        }
    }

    /// One forward over the active sequences, then sampling.
    fn step(&mut self) {
        // Plan: every decoding sequence's pending token, then prompt chunks.
        let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (slot, from, to)
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s {
                if s.cached >= s.prompt_len && s.cached < s.tokens.len() {
                    plan.push((i, s.cached, s.tokens.len()));
                }
            }
        }
        let wait = self.share_prefixes();
        let mut budget = PREFILL_CHUNK;
        let mut prefill_tokens = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if let Some(s) = s {
                if s.cached < s.prompt_len && !wait[i] {
                    let to = (s.cached + budget).min(s.tokens.len());
                    budget -= to - s.cached;
                    prefill_tokens += to - s.cached;
                    plan.push((i, s.cached, to));
                }
            }
        }
        if plan.is_empty() {
            return;
        }
        let decode_tokens = plan
            .iter()
            .filter(|&&(slot, from, _)| {
                self.slots[slot]
                    .as_ref()
                    .is_some_and(|s| from >= s.prompt_len)
            })
            .count();
        let started = Instant::now();
        let results = self.forward_isolating(&plan);
        let took = started.elapsed();
        let (pr, dr) = self
            .rates
            .record(Instant::now(), took, prefill_tokens, decode_tokens);
        if let Some(r) = pr {
            self.stats
                .tok_s_prefill
                .store(r.to_bits(), Ordering::Relaxed);
        }
        if let Some(r) = dr {
            self.stats
                .tok_s_decode
                .store(r.to_bits(), Ordering::Relaxed);
        }

        // The greedy picks of the sequences that sample plainly, over the
        // model's threads (`Model::argmaxes`); the same function `pick`
        // would run, so the same tokens.
        let want: Vec<bool> = plan
            .iter()
            .zip(&results)
            .map(|(&(slot, _, to), res)| {
                res.is_ok()
                    && self.slots[slot].as_ref().is_some_and(|s| {
                        to == s.tokens.len()
                            && s.constraint.is_none()
                            && s.sampler.is_plain_greedy()
                    })
            })
            .collect();
        let picks = if want.iter().any(|&w| w) {
            let views: Vec<&[f32]> = results
                .iter()
                .map(|r| r.as_ref().map_or(&[][..], |l| &l[..]))
                .collect();
            self.model.argmaxes(&views, &want)
        } else {
            vec![None; plan.len()]
        };
        for (((slot, _from, to), res), pick) in plan.into_iter().zip(results).zip(picks) {
            let mut logits = match res {
                Ok(l) => l,
                Err(msg) => {
                    self.finish_failed(slot, format!("inference failed: {msg}"));
                    continue;
                }
            };
            let seq = self.slots[slot].as_mut().expect("planned slot is active");
            let was_prefill = seq.cached < seq.prompt_len;
            seq.cached = to;
            if was_prefill && to == seq.prompt_len {
                seq.send(GenEvent::Prefilled {
                    prompt_tokens: seq.prompt_len,
                });
            }
            if to < seq.tokens.len() {
                continue; // mid-prompt chunk
            }
            let before = seq.generated();
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                Self::advance(
                    seq,
                    &mut logits,
                    pick,
                    &self.cfg.eos_token_ids,
                    self.model.context_length(),
                )
            }));
            let after = self.slots[slot].as_ref().map_or(before, |s| s.generated());
            self.stats
                .tokens_generated_total
                .fetch_add(after.saturating_sub(before) as u64, Ordering::Relaxed);
            match outcome {
                Ok(Outcome::Continue) => {}
                Ok(Outcome::Finished(reason)) => {
                    let seq = self.slots[slot].take().expect("active");
                    let generated = seq.generated();
                    seq.send(GenEvent::Finished {
                        reason,
                        prompt_tokens: seq.prompt_len,
                        completion_tokens: generated,
                        cached_tokens: seq.reused,
                        stop_string: seq.stop.matched().map(str::to_string),
                    });
                    self.vacate(slot, &seq, true);
                }
                Ok(Outcome::Failed(message)) => self.finish_failed(slot, message),
                Err(p) => {
                    self.finish_failed(slot, format!("sequence failed: {}", panic_message(&*p)));
                }
            }
        }
    }

    fn finish_failed(&mut self, slot: usize, message: String) {
        if let Some(seq) = self.slots[slot].take() {
            tracing::warn!(slot, %message, "sequence failed");
            seq.send(GenEvent::Failed { message });
            // A failed forward may have left the cache half written.
            self.vacate(slot, &seq, false);
        }
    }

    /// Frees `slot` after `seq`; `keep`: what it cached stays reusable.
    fn vacate(&mut self, slot: usize, seq: &Seq, keep: bool) {
        self.clock += 1;
        let memo = &mut self.memo[slot];
        memo.tokens.clear();
        if keep && self.reuse {
            memo.tokens.extend_from_slice(&seq.tokens[..seq.cached]);
        }
        memo.last_used = self.clock;
        self.model.release(slot);
        self.end_one();
        self.trim_cache();
    }

    /// Keeps the free slots' cached prefixes within the byte budget,
    /// dropping the least recently used first (and their memory with them).
    fn trim_cache(&mut self) {
        let held = |w: &Worker, i: usize| {
            if w.slots[i].is_none() && !w.memo[i].tokens.is_empty() {
                w.model.kv_bytes(i, w.memo[i].tokens.len())
            } else {
                0
            }
        };
        let mut total: u64 = (0..self.slots.len()).map(|i| held(self, i)).sum();
        while total > self.cfg.prefix_cache_bytes {
            let Some(lru) = (0..self.slots.len())
                .filter(|&i| held(self, i) > 0)
                .min_by_key(|&i| self.memo[i].last_used)
            else {
                break;
            };
            total -= held(self, lru);
            self.memo[lru].tokens.clear();
            self.model.drop_cache(lru);
            self.stats
                .prefix_cache_evictions_total
                .fetch_add(1, Ordering::Relaxed);
        }
        self.stats
            .prefix_cache_bytes
            .store(total, Ordering::Relaxed);
    }

    /// Before planning a step: copies prefixes that running sequences have
    /// already computed into the prefilling sequences that share them, and
    /// returns which prefilling sequences should wait for an earlier one
    /// still computing their shared prefix.
    fn share_prefixes(&mut self) -> Vec<bool> {
        let n = self.slots.len();
        let mut wait = vec![false; n];
        if !self.reuse {
            return wait;
        }
        let mut order: Vec<usize> = (0..n)
            .filter(|&i| {
                self.slots[i]
                    .as_ref()
                    .is_some_and(|s| s.cached < s.prompt_len)
            })
            .collect();
        order.sort_by_key(|&i| self.slots[i].as_ref().map_or(0, |s| s.admitted));
        for i in order {
            let seq = self.slots[i].as_ref().expect("active");
            let limit = seq.prompt_len - 1;
            // (donor, positions it can give now, positions it will have)
            let mut best: Option<(usize, usize, usize)> = None;
            for (d, other) in self.slots.iter().enumerate() {
                let Some(o) = other.as_ref().filter(|_| d != i) else {
                    continue;
                };
                let shared = common_prefix(&seq.tokens[..limit], &o.tokens);
                let now = shared.min(o.cached);
                if best.is_none_or(|b| (now, shared) > (b.1, b.2)) {
                    best = Some((d, now, shared));
                }
            }
            let Some((d, now, shared)) = best else {
                continue;
            };
            let (from, admitted) = (seq.cached, seq.admitted);
            if now >= from + MIN_SHARE {
                match self.model.copy_kv(d, i, from, now) {
                    Ok(()) => {
                        let seq = self.slots[i].as_mut().expect("active");
                        seq.cached = now;
                        seq.reused += now - from;
                        self.stats
                            .prompt_tokens_cached_total
                            .fetch_add((now - from) as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot copy a cached prefix");
                        continue;
                    }
                }
            }
            let donor = self.slots[d].as_ref().expect("active");
            let cached = self.slots[i].as_ref().expect("active").cached;
            if shared >= cached + MIN_SHARE
                && donor.cached < donor.prompt_len
                && donor.admitted < admitted
                && !wait[d]
            {
                wait[i] = true;
            }
        }
        wait
    }

    /// Runs the plan as one batch; if that fails, runs each chunk alone so
    /// that only the failing sequences fail.
    fn forward_isolating(
        &mut self,
        plan: &[(usize, usize, usize)],
    ) -> Vec<Result<Vec<f32>, String>> {
        let run =
            |model: &mut Box<dyn Model>, slots: &[Option<Seq>], part: &[(usize, usize, usize)]| {
                let chunks: Vec<Chunk> = part
                    .iter()
                    .map(|&(slot, from, to)| {
                        let seq = slots[slot].as_ref().expect("active");
                        Chunk {
                            slot,
                            pos: from,
                            tokens: &seq.tokens[from..to],
                            // Decided per sequence so that batching never
                            // changes a sequence's numerics.
                            dense: from < seq.prompt_len && seq.prompt_len >= DENSE_MIN_PROMPT,
                        }
                    })
                    .collect();
                match catch_unwind(AssertUnwindSafe(|| model.forward(&chunks))) {
                    Ok(Ok(l)) if l.len() == chunks.len() => Ok(l),
                    Ok(Ok(_)) => Err("model returned the wrong number of outputs".to_string()),
                    Ok(Err(e)) => Err(e),
                    Err(p) => Err(format!("panic in the forward pass: {}", panic_message(&*p))),
                }
            };
        match run(&mut self.model, &self.slots, plan) {
            Ok(all) => all.into_iter().map(Ok).collect(),
            Err(e) if plan.len() == 1 => vec![Err(e)],
            Err(_) => plan
                .iter()
                .map(|p| {
                    run(&mut self.model, &self.slots, std::slice::from_ref(p))
                        .map(|mut v| v.remove(0))
                })
                .collect(),
        }
    }

    /// Samples the next token of `seq` and emits its text.
    /// `greedy`: the argmax of `logits`, computed already, when the
    /// sequence samples plainly greedily (see `step`).
    fn advance(
        seq: &mut Seq,
        logits: &mut [f32],
        greedy: Option<u32>,
        eos: &[u32],
        context: usize,
    ) -> Outcome {
        if seq.generated() >= seq.max_new {
            Self::flush(seq);
            return Outcome::Finished(FinishReason::Length);
        }
        {
            let (ctx, gen) = (&seq.tokens[..], &seq.tokens[seq.prompt_len..]);
            seq.sampler.adjust(logits, ctx, gen);
        }
        // Only constrained sequences pay for a mask.
        if let Some(c) = seq.constraint.as_mut() {
            if let Err(e) = c.mask(logits) {
                return Outcome::Failed(e);
            }
        }
        let tok = match greedy {
            Some(t) => {
                debug_assert_eq!(t, seq.sampler.pick(logits));
                t
            }
            None => seq.sampler.pick(logits),
        };
        seq.tokens.push(tok);
        seq.unreported += 1;
        if eos.contains(&tok) {
            Self::flush(seq);
            return Outcome::Finished(FinishReason::Stop);
        }
        if let Some(top) = seq.logprobs {
            seq.pending_logprobs
                .push(crate::sampling::token_logprobs(logits, tok, top));
        }
        let mut grammar_done = false;
        if let Some(c) = seq.constraint.as_mut() {
            match c.commit(tok) {
                Ok(done) => grammar_done = done,
                Err(e) => return Outcome::Failed(e),
            }
        }
        let text = seq.decoder.push(tok);
        if !text.is_empty() {
            let step = seq.stop.push(&text);
            if !step.emit.is_empty() {
                seq.send_text(step.emit);
            }
            if step.stopped {
                return Outcome::Finished(FinishReason::Stop);
            }
        }
        if grammar_done {
            // The grammar allows nothing more: as if EOS had been drawn.
            Self::flush(seq);
            return Outcome::Finished(FinishReason::Stop);
        }
        if seq.generated() >= seq.max_new || seq.tokens.len() >= context {
            Self::flush(seq);
            return Outcome::Finished(FinishReason::Length);
        }
        Outcome::Continue
    }

    /// Emits text held back by the decoder and the stop matcher.
    fn flush(seq: &mut Seq) {
        let mut text = String::new();
        let rest = seq.decoder.finish();
        if !rest.is_empty() {
            let step = seq.stop.push(&rest);
            text.push_str(&step.emit);
            if step.stopped {
                if !text.is_empty() {
                    seq.send_text(text);
                }
                return;
            }
        }
        text.push_str(&seq.stop.finish());
        if !text.is_empty() {
            seq.send_text(text);
        }
    }
}
