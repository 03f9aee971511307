//! Picks the next token from a sequence's logits: penalties, then greedy or
//! top-k / temperature / top-p / min-p sampling with a per-sequence RNG.
//!
//! Runs once per generated token per sequence, so it reuses its buffers,
//! never sorts the whole vocabulary when it can avoid it, and greedy decoding
//! is one pass over the logits.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::api::SamplingParams;

/// At or below this temperature, decoding is greedy.
const GREEDY_TEMPERATURE: f32 = 1e-5;
/// First partial sort size for top-p; grown 4x while the nucleus is larger.
const TOP_P_FIRST_WINDOW: usize = 64;

/// The sampling state of one sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch: (token id, logit, then unnormalised probability).
    cand: Vec<(u32, f32)>,
    /// Scratch: unnormalised probabilities over the whole vocabulary.
    probs: Vec<f32>,
    /// Scratch for penalties: `stamp[t] == epoch` marks token t seen this call.
    stamp: Vec<u32>,
    count: Vec<u32>,
    epoch: u32,
}

impl Sampler {
    /// A seeded sampler is reproducible; without a seed it draws from OS entropy.
    pub fn new(params: &SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params: params.clone(),
            rng,
            cand: Vec::new(),
            probs: Vec::new(),
            stamp: Vec::new(),
            count: Vec::new(),
            epoch: 0,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether this sampler always takes the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= GREEDY_TEMPERATURE || self.params.top_k == 1
    }

    /// Whether [`Sampler::adjust`] leaves logits as they are and
    /// [`Sampler::pick`] is [`argmax`]: greedy, no `logit_bias`, no
    /// penalties. The scheduler then takes the argmax computed beside the
    /// forward pass (over the model's threads) instead of calling `pick`.
    pub fn is_plain_greedy(&self) -> bool {
        self.is_greedy()
            && self.params.logit_bias.is_empty()
            && !self.repetition_penalised()
            && !self.frequency_penalised()
    }

    /// Whether the repetition penalty changes logits (given a context).
    fn repetition_penalised(&self) -> bool {
        let rep = self.params.repetition_penalty;
        rep > 0.0 && rep != 1.0
    }

    /// Whether the frequency or presence penalty changes logits (given
    /// generated tokens).
    fn frequency_penalised(&self) -> bool {
        self.params.frequency_penalty != 0.0 || self.params.presence_penalty != 0.0
    }

    /// Chooses the next token. `logits` (one per vocabulary entry) is modified
    /// in place by the penalties; `context` is the prompt plus the generated
    /// tokens (repetition penalty), `generated` only the generated ones
    /// (frequency and presence penalties).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32], generated: &[u32]) -> u32 {
        self.adjust(logits, context, generated);
        self.pick(logits)
    }

    /// Chooses from logits already adjusted by [`Sampler::adjust`] (and
    /// possibly masked by a grammar).
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        self.sample_distribution(logits)
    }

    /// `logit_bias`, then the penalties, in place: what `sample` does before
    /// choosing.
    pub fn adjust(&mut self, logits: &mut [f32], context: &[u32], generated: &[u32]) {
        for &(t, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        self.apply_penalties(logits, context, generated);
    }

    fn apply_penalties(&mut self, logits: &mut [f32], context: &[u32], generated: &[u32]) {
        let n = logits.len();
        let p = &self.params;
        let rep = p.repetition_penalty;
        let use_rep = self.repetition_penalised() && !context.is_empty();
        let (freq, pres) = (p.frequency_penalty, p.presence_penalty);
        let use_fp = self.frequency_penalised() && !generated.is_empty();
        if !use_rep && !use_fp {
            return;
        }
        if self.stamp.len() < n {
            self.stamp.resize(n, 0);
            self.count.resize(n, 0);
        }
        if use_rep {
            // llama.cpp: each distinct context token once; shrink its logit
            // towards "less likely" whatever its sign.
            let epoch = self.next_epoch();
            for &t in context {
                let t = t as usize;
                if t >= n || self.stamp[t] == epoch {
                    continue;
                }
                self.stamp[t] = epoch;
                let l = &mut logits[t];
                if *l > 0.0 {
                    *l /= rep;
                } else {
                    *l *= rep;
                }
            }
        }
        if use_fp {
            // OpenAI: logit -= count * frequency_penalty + (count > 0) * presence_penalty.
            let epoch = self.next_epoch();
            for &t in generated {
                let t = t as usize;
                if t >= n {
                    continue;
                }
                if self.stamp[t] != epoch {
                    self.stamp[t] = epoch;
                    self.count[t] = 0;
                }
                self.count[t] += 1;
            }
            for &t in generated {
                let t = t as usize;
                if t >= n {
                    continue;
                }
                let c = self.count[t];
                if c > 0 {
                    logits[t] -= c as f32 * freq + pres;
                    self.count[t] = 0;
                }
            }
        }
    }

    fn next_epoch(&mut self) -> u32 {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.stamp.fill(0);
            self.epoch = 1;
        }
        self.epoch
    }

    fn sample_distribution(&mut self, logits: &[f32]) -> u32 {
        let n = logits.len();
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let top_p = p.top_p;
        let min_p = p.min_p.min(1.0);
        let k = if p.top_k > 0 && p.top_k < n {
            p.top_k
        } else {
            n
        };
        let use_top_p = top_p > 0.0 && top_p < 1.0;
        // Higher first; equal values by lower id, so results are deterministic.
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));

        let max = logits
            .iter()
            .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
        if max == f32::NEG_INFINITY {
            return argmax(logits);
        }
        let cand = &mut self.cand;
        cand.clear();
        let mut sum = 0.0f32;
        if k < n {
            top_k_into(logits, k, cand, desc);
            for c in cand.iter_mut() {
                c.1 = fast_exp((c.1 - max) * inv_t);
                sum += c.1;
            }
            if min_p > 0.0 {
                cand.retain(|c| c.1 >= min_p);
                sum = cand.iter().map(|c| c.1).sum();
            }
        } else {
            // Whole vocabulary: probabilities in a flat buffer (vectorised exp).
            let probs = &mut self.probs;
            probs.clear();
            probs.extend(logits.iter().map(|&l| {
                // -inf is a masked token (grammar): exactly 0, never drawn.
                if l.is_nan() || l == f32::NEG_INFINITY {
                    0.0
                } else {
                    fast_exp((l - max) * inv_t)
                }
            }));
            if !use_top_p && min_p <= 0.0 {
                let total: f32 = probs.iter().sum();
                let r = self.rng.random::<f32>() * total;
                let mut cum = 0.0f32;
                for (i, &q) in probs.iter().enumerate() {
                    cum += q;
                    if r < cum && q > 0.0 {
                        return i as u32;
                    }
                }
                return argmax(logits);
            }
            // The most likely token has unnormalised probability 1, so min_p
            // is a plain threshold; apply it while collecting candidates.
            let floor = if min_p > 0.0 {
                min_p
            } else {
                f32::MIN_POSITIVE
            };
            cand.extend(
                probs
                    .iter()
                    .enumerate()
                    .filter(|(_, &q)| q >= floor)
                    .map(|(i, &q)| (i as u32, q)),
            );
            sum = cand.iter().map(|c| c.1).sum();
        }
        if cand.is_empty() {
            return argmax(logits);
        }

        if use_top_p && cand.len() > 1 {
            // Smallest prefix, by probability, whose mass reaches top_p. Sort
            // only a window of the best candidates, growing it if needed.
            let target = top_p * sum;
            let len = cand.len();
            let mut window = TOP_P_FIRST_WINDOW.min(len);
            loop {
                if window < len {
                    cand.select_nth_unstable_by(window - 1, desc);
                }
                cand[..window].sort_unstable_by(desc);
                let mut cum = 0.0f32;
                let cut = cand[..window].iter().position(|c| {
                    cum += c.1;
                    cum >= target
                });
                if let Some(j) = cut {
                    cand.truncate(j + 1);
                    break;
                }
                if window == len {
                    break;
                }
                window = (window * 4).min(len);
            }
            sum = cand.iter().map(|c| c.1).sum();
        }

        let r = self.rng.random::<f32>() * sum;
        let mut cum = 0.0f32;
        for c in cand.iter() {
            cum += c.1;
            if r < cum {
                return c.0;
            }
        }
        cand.last().map_or_else(|| argmax(logits), |c| c.0)
    }
}

/// The `k` best (id, logit) pairs of `logits` (NaN and -inf excluded), in no
/// particular order. Small `k` keeps a bounded buffer (one comparison for most
/// logits); large `k` uses a linear-time selection.
fn top_k_into(
    logits: &[f32],
    k: usize,
    out: &mut Vec<(u32, f32)>,
    desc: impl Fn(&(u32, f32), &(u32, f32)) -> std::cmp::Ordering,
) {
    let valid = |l: f32| !l.is_nan() && l != f32::NEG_INFINITY;
    if k > 256 {
        out.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, &l)| valid(l))
                .map(|(i, &l)| (i as u32, l)),
        );
        if k < out.len() {
            out.select_nth_unstable_by(k - 1, desc);
            out.truncate(k);
        }
        return;
    }
    // `out[worst]` is the smallest kept logit (the highest id among equals).
    let mut worst = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if !valid(l) {
            continue;
        }
        if out.len() < k {
            out.push((i as u32, l));
            if out.len() == k {
                worst = index_of_worst(out);
            }
        } else if l > out[worst].1 {
            // Ids ascend, so an equal logit later never beats a kept one.
            out[worst] = (i as u32, l);
            worst = index_of_worst(out);
        }
    }
}

fn index_of_worst(v: &[(u32, f32)]) -> usize {
    let mut w = 0;
    for (j, c) in v.iter().enumerate().skip(1) {
        if c.1 < v[w].1 || (c.1 == v[w].1 && c.0 > v[w].0) {
            w = j;
        }
    }
    w
}

/// e^x for x <= 0 (probabilities relative to the best token), to ~2e-6
/// relative error; written so the compiler vectorises it.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    let y = x.max(-87.0) * std::f32::consts::LOG2_E;
    let n = y.floor();
    let f = y - n;
    // 2^f on [0, 1): Taylor series of e^(f ln 2) to degree 7.
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11
                    + f * (0.009_618_129
                        + f * (0.001_333_355_8 + f * (0.000_154_035_3 + f * 0.000_015_252_73))))));
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

/// Log-probability of `chosen` and the `top` most likely tokens (best first,
/// ties by lower id) under the softmax of `logits`. One pass over the
/// vocabulary plus a bounded selection; only run when a client asks.
pub fn token_logprobs(logits: &[f32], chosen: u32, top: usize) -> crate::api::TokenLogprob {
    let max = logits
        .iter()
        .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    let sum: f64 = logits
        .iter()
        .map(|&l| {
            if l.is_nan() {
                0.0
            } else {
                ((l - max) as f64).exp()
            }
        })
        .sum();
    let log_z = max as f64 + sum.ln();
    let lp = |l: f32| (l as f64 - log_z) as f32;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        top_k_into(logits, top.min(logits.len()), &mut best, desc);
        best.sort_unstable_by(desc);
    }
    crate::api::TokenLogprob {
        token: chosen,
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: best.into_iter().map(|(t, l)| (t, lp(l))).collect(),
    }
}

/// Index of the largest logit; ties go to the lowest id, NaN is never chosen
/// (all NaN or -inf gives 0).
pub fn argmax(logits: &[f32]) -> u32 {
    // Sixteen lanes, each keeping the first index of its own largest value
    // (a strict `>`, as the plain loop), so the compiler vectorises the
    // scan: it ran once per sequence per step on the scheduler thread while
    // the matmul threads waited (~50 µs over a 49k vocabulary).
    const L: usize = 16;
    let mut bv = [f32::NEG_INFINITY; L];
    let mut bi = [0u32; L];
    let chunks = logits.chunks_exact(L);
    let rest = chunks.remainder();
    for (c, v) in chunks.enumerate() {
        for j in 0..L {
            if v[j] > bv[j] {
                bv[j] = v[j];
                bi[j] = (c * L + j) as u32;
            }
        }
    }
    let mut best = 0u32;
    let mut best_v = f32::NEG_INFINITY;
    for j in 0..L {
        if bv[j] > best_v || (bv[j] == best_v && bv[j] > f32::NEG_INFINITY && bi[j] < best) {
            best_v = bv[j];
            best = bi[j];
        }
    }
    let base = logits.len() - rest.len();
    for (i, &v) in rest.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = (base + i) as u32;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    fn draws(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p);
        (0..n)
            .map(|_| s.sample(&mut logits.to_vec(), &[], &[]))
            .collect()
    }

    fn freqs(samples: &[u32], vocab: usize) -> Vec<f64> {
        let mut c = vec![0usize; vocab];
        for &s in samples {
            c[s as usize] += 1;
        }
        c.iter().map(|&x| x as f64 / samples.len() as f64).collect()
    }

    fn ln(p: &[f64]) -> Vec<f32> {
        p.iter().map(|x| x.ln() as f32).collect()
    }

    #[test]
    fn plain_greedy_is_greedy_without_bias_or_penalties() {
        let plain = |f: fn(&mut SamplingParams)| Sampler::new(&params(f)).is_plain_greedy();
        assert!(plain(|p| p.temperature = 0.0));
        assert!(plain(|p| {
            p.temperature = 0.8;
            p.top_k = 1;
            p.repetition_penalty = 1.0;
        }));
        assert!(!plain(|p| p.temperature = 0.8));
        assert!(!plain(|p| {
            p.temperature = 0.0;
            p.logit_bias = vec![(3, 1.0)];
        }));
        assert!(!plain(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 1.1;
        }));
        assert!(!plain(|p| {
            p.temperature = 0.0;
            p.frequency_penalty = 0.5;
        }));
        assert!(!plain(|p| {
            p.temperature = 0.0;
            p.presence_penalty = -0.5;
        }));
    }

    #[test]
    fn greedy_takes_argmax_lowest_id_on_ties() {
        let p = params(|p| p.temperature = 0.0);
        let mut s = Sampler::new(&p);
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 3.0], &[], &[]), 1);
        assert_eq!(s.sample(&mut [f32::NAN, 0.5, 0.7], &[], &[]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn lane_argmax_matches_the_plain_loop() {
        fn plain(v: &[f32]) -> u32 {
            let (mut best, mut best_v) = (0usize, f32::NEG_INFINITY);
            for (i, &x) in v.iter().enumerate() {
                if x > best_v {
                    best_v = x;
                    best = i;
                }
            }
            best as u32
        }
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for len in [
            0usize, 1, 5, 15, 16, 17, 31, 32, 33, 100, 1000, 49152, 49155,
        ] {
            for round in 0..20 {
                // Few distinct values so that ties are common; some NaN and
                // -inf, and sometimes nothing else.
                let v: Vec<f32> = (0..len)
                    .map(|_| match next() % 16 {
                        0 => f32::NAN,
                        1 | 2 => f32::NEG_INFINITY,
                        _ if round % 5 == 0 => f32::NEG_INFINITY,
                        r => (r % 5) as f32 - 2.0,
                    })
                    .collect();
                assert_eq!(argmax(&v), plain(&v), "len {len}, round {round}");
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (a, b) = (fast_exp(x), x.exp());
            assert!((a - b).abs() <= 1e-5 * b + 1e-37, "x={x}: {a} vs {b}");
            x += 0.013;
        }
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(f32::NEG_INFINITY), fast_exp(-87.0));
    }

    #[test]
    fn bounded_top_k_matches_selection() {
        let logits: Vec<f32> = (0..3000)
            .map(|i| ((i * 7919) % 997) as f32 / 10.0)
            .collect();
        for k in [1, 2, 40, 256, 300] {
            let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            let mut got = Vec::new();
            top_k_into(&logits, k, &mut got, desc);
            got.sort_by(desc);
            let mut all: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect();
            all.sort_by(desc);
            all.truncate(k);
            assert_eq!(got, all, "k={k}");
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [1.0, 2.0, 1.9, 0.0];
        let p = params(|p| p.top_k = 1);
        assert!(draws(&p, &logits, 200).iter().all(|&t| t == 1));
    }

    #[test]
    fn seeded_is_reproducible_and_seed_matters() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let a = draws(&params(|p| p.seed = Some(42)), &logits, 200);
        let b = draws(&params(|p| p.seed = Some(42)), &logits, 200);
        let c = draws(&params(|p| p.seed = Some(43)), &logits, 200);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Unseeded samplers differ from each other (with overwhelming probability).
        let u1 = draws(&params(|p| p.seed = None), &logits, 200);
        let u2 = draws(&params(|p| p.seed = None), &logits, 200);
        assert_ne!(u1, u2);
    }

    #[test]
    fn small_top_p_keeps_only_the_top_token() {
        let logits = ln(&[0.1, 0.6, 0.3]);
        let p = params(|p| p.top_p = 0.05);
        assert!(draws(&p, &logits, 300).iter().all(|&t| t == 1));
        // top_p = 0.85 keeps {1, 2} only.
        let p = params(|p| p.top_p = 0.85);
        let d = draws(&p, &logits, 2000);
        assert!(d.iter().all(|&t| t != 0));
        assert!(d.contains(&2));
    }

    #[test]
    fn top_p_with_large_vocab_window_growth() {
        // Flat distribution over 5000 tokens: the nucleus needs ~4500 of them,
        // more than the first window.
        let logits = vec![0.0f32; 5000];
        let p = params(|p| p.top_p = 0.9);
        let d = draws(&p, &logits, 3000);
        assert!(d.iter().all(|&t| t < 4501), "{:?}", d.iter().max());
        assert!(d.iter().any(|&t| t > 4000));
    }

    #[test]
    fn min_p_filters_relative_to_max() {
        let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
        // min_p 0.2: keeps p >= 0.1, i.e. tokens 0, 1, 2.
        let d = draws(&params(|p| p.min_p = 0.2), &logits, 3000);
        assert!(!d.contains(&3));
        assert!(d.contains(&2));
    }

    #[test]
    fn top_k_limits_candidates() {
        let logits = ln(&[0.3, 0.05, 0.3, 0.05, 0.3]);
        let d = draws(&params(|p| p.top_k = 3), &logits, 3000);
        assert!(d.iter().all(|&t| t == 0 || t == 2 || t == 4));
    }

    #[test]
    fn temperature_frequencies() {
        let logits = ln(&[0.5, 0.3, 0.2]);
        let f = freqs(&draws(&params(|p| p.temperature = 1.0), &logits, 20_000), 3);
        for (got, want) in f.iter().zip([0.5, 0.3, 0.2]) {
            assert!((got - want).abs() < 0.02, "{f:?}");
        }
        // T = 0.5 squares the probabilities: 0.25 : 0.09 : 0.04.
        let f = freqs(&draws(&params(|p| p.temperature = 0.5), &logits, 20_000), 3);
        for (got, want) in f.iter().zip([0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]) {
            assert!((got - want).abs() < 0.02, "{f:?}");
        }
    }

    #[test]
    fn repetition_penalty_llama_cpp_semantics() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 2.0;
        });
        let mut s = Sampler::new(&p);
        let mut logits = [3.0, 2.0, -1.0, 0.5];
        // Token 0 seen (twice, penalised once), token 2 seen (negative: multiplied).
        assert_eq!(s.sample(&mut logits, &[0, 2, 0], &[]), 1);
        assert_eq!(logits, [1.5, 2.0, -2.0, 0.5]);
    }

    #[test]
    fn frequency_and_presence_penalties() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.frequency_penalty = 0.5;
            p.presence_penalty = 0.25;
        });
        let mut s = Sampler::new(&p);
        let mut logits = [3.0, 2.5, 0.0];
        // Token 0 generated three times: 3.0 - 1.5 - 0.25 = 1.25 < 2.5.
        // Prompt-only tokens (context) are not penalised by these.
        assert_eq!(s.sample(&mut logits, &[1, 1, 0, 0, 0], &[0, 0, 0]), 1);
        assert_eq!(logits, [1.25, 2.5, 0.0]);
        // Negative penalties encourage.
        let p = params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = -2.0;
        });
        let mut s = Sampler::new(&p);
        assert_eq!(s.sample(&mut [3.0, 2.5, 0.0], &[], &[2]), 0);
        assert_eq!(s.sample(&mut [3.0, 2.5, 1.5], &[], &[2]), 2);
    }

    #[test]
    fn penalties_apply_to_sampling_too_and_ignore_out_of_range_ids() {
        let p = params(|p| {
            p.top_k = 1;
            p.repetition_penalty = 10.0;
        });
        let mut s = Sampler::new(&p);
        assert_eq!(s.sample(&mut [5.0, 1.0], &[0, 99], &[99]), 1);
    }

    #[test]
    fn logprobs_are_log_softmax_with_sorted_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let lp = token_logprobs(&logits, 2, 2);
        let z: f64 = [1.0f64, 3.0, 2.0].iter().map(|l| l.exp()).sum();
        assert!((lp.logprob as f64 - (2.0 - z.ln())).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-5);
        assert_eq!(token_logprobs(&logits, 3, 0).logprob, f32::NEG_INFINITY);
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
    }

    #[test]
    fn logit_bias_bans_and_forces() {
        let logits = vec![5.0f32, 1.0, 0.0];
        let p = params(|p| {
            p.temperature = 0.0;
            p.logit_bias = vec![(0, -100.0), (2, 3.0), (99, 100.0)];
        });
        let mut l = logits.clone();
        assert_eq!(Sampler::new(&p).sample(&mut l, &[], &[]), 2);
        let p = params(|p| p.logit_bias = vec![(1, 100.0)]);
        assert!(draws(&p, &logits, 200).iter().all(|&t| t == 1));
    }

    /// A grammar mask is -inf: such tokens are never drawn, whatever the
    /// sampling path (whole vocabulary, min_p floor, top_p, top_k).
    #[test]
    fn masked_tokens_are_never_drawn() {
        let mut logits = vec![f32::NEG_INFINITY; 5000];
        logits[4321] = -3.0;
        logits[17] = -3.5;
        for p in [
            params(|_| {}),
            params(|p| p.min_p = 0.05),
            params(|p| p.top_p = 0.99),
            params(|p| p.top_k = 40),
            params(|p| p.temperature = 2.0),
        ] {
            for t in draws(&p, &logits, 300) {
                assert!(t == 4321 || t == 17, "drew masked token {t}");
            }
        }
    }
}
