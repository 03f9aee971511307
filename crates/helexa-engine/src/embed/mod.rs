//! Sentence embeddings: a BERT encoder (candle-transformers' `BertModel`)
//! over a safetensors folder, pooled and normalised as the folder's
//! sentence-transformers files say (`pooling.rs`).
//!
//! One worker thread runs every forward pass, so concurrent requests never
//! hold more than one batch's activations at a time; a request's inputs are
//! sorted by length and packed into passes of at most `max_batch_tokens`
//! padded tokens (padding masked out of attention and pooling), then put
//! back in their order. Separate from `Engine` because nothing of
//! generation (KV cache, sampling, scheduler) applies.

pub mod pooling;

use crate::api::{DeviceSpec, EngineError, EngineStats};
use crate::model::safetensors::{device, read_json};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use pooling::Pooling;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Padded tokens of one forward pass when the caller sets no limit.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 8192;

/// How to load an embedding model.
#[derive(Debug, Clone)]
pub struct EmbedConfig {
    /// A folder with `config.json` (BERT), `*.safetensors`, `tokenizer.json`
    /// and, optionally, sentence-transformers' `modules.json` / `1_Pooling/`.
    pub model_path: PathBuf,
    /// `tokenizer.json` to use instead of the folder's.
    pub tokenizer_path: Option<PathBuf>,
    pub device: DeviceSpec,
    /// Cap on tokens per input; default and upper bound: the model's
    /// `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Padded tokens (inputs × longest input) of one forward pass; raised
    /// to the context length when smaller, so any one input fits.
    pub max_batch_tokens: usize,
    /// CPU threads of the forward passes; default: candle's (all cores, or
    /// `RAYON_NUM_THREADS`).
    pub threads: Option<usize>,
}

impl EmbedConfig {
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        EmbedConfig {
            model_path: model_path.into(),
            tokenizer_path: None,
            device: DeviceSpec::Cpu,
            max_context: None,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            threads: None,
        }
    }
}

/// What a loaded embedding model is.
#[derive(Debug, Clone)]
pub struct EmbedderMeta {
    /// `_name_or_path` of `config.json`, or the folder's name.
    pub name: String,
    pub architecture: String,
    /// Most tokens one input may have ([CLS] and [SEP] included).
    pub context_length: usize,
    /// Length of every vector.
    pub dimensions: usize,
    pub vocab_size: usize,
    pub weights_bytes: u64,
    pub pooling: Pooling,
    pub max_batch_tokens: usize,
}

/// Whether `path` is a folder this module serves: `config.json` says
/// `model_type: "bert"` or lists `BertModel` among its architectures.
pub fn is_embedding_model(path: &Path) -> bool {
    let cfg = path.join("config.json");
    if !path.is_dir() || !cfg.is_file() {
        return false;
    }
    let Ok(v) = read_json(&cfg) else {
        return false;
    };
    let bert_type = v.get("model_type").and_then(|t| t.as_str()) == Some("bert");
    let bert_arch = v
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("BertModel")));
    bert_type || bert_arch
}

/// A loaded embedding model. Cheap to clone; clones share the worker.
#[derive(Clone)]
pub struct Embedder {
    inner: Arc<Inner>,
}

struct Inner {
    meta: EmbedderMeta,
    tokenizer: Arc<Tokenizer>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    stats: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    in_flight: AtomicUsize,
    prompt_tokens_total: AtomicU64,
    /// f64 bits: tokens per second of the last forward pass.
    tok_s: AtomicU64,
}

struct Job {
    inputs: Vec<Vec<u32>>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>,
}

struct Worker {
    model: BertModel,
    device: Device,
    pooling: Pooling,
    pad_id: u32,
    max_batch_tokens: usize,
    stats: Arc<Counters>,
    /// A pool of `threads` for the passes, when a thread count was given.
    pool: Option<rayon::ThreadPool>,
}

fn load_err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::ModelLoad {
        path: path.display().to_string(),
        message: message.into(),
    }
}

impl Embedder {
    /// Loads weights, tokenizer and pooling, and starts the worker thread.
    /// Blocking: call from `spawn_blocking` or before the runtime starts.
    pub fn load(cfg: EmbedConfig) -> Result<Embedder, EngineError> {
        let dir = &cfg.model_path;
        let config_path = dir.join("config.json");
        let raw = read_json(&config_path).map_err(|m| load_err(dir, m))?;
        let config: BertConfig = serde_json::from_value(raw.clone()).map_err(|e| {
            load_err(
                dir,
                format!("{}: not a BERT config: {e}", config_path.display()),
            )
        })?;
        let pooling = pooling::read(dir).map_err(|m| load_err(dir, m))?;
        if !pooling.declared {
            tracing::warn!(model = %dir.display(),
                "no modules.json or 1_Pooling/config.json: mean pooling, not normalised");
        }

        let tok_path = cfg
            .tokenizer_path
            .clone()
            .unwrap_or_else(|| dir.join("tokenizer.json"));
        if !tok_path.is_file() {
            return Err(load_err(
                dir,
                format!(
                    "{} is missing: an embedding model folder needs a tokenizer.json",
                    tok_path.display()
                ),
            ));
        }
        let mut tokenizer = crate::tokenizer::tokenizer_from_file(&tok_path)?;
        // sentence-transformers folders often ship a tokenizer.json that
        // truncates and pads to a fixed length (all-MiniLM-L6-v2: 128).
        // Truncation would silently drop text the client sent, padding
        // would be counted as tokens: both are done here instead.
        tokenizer
            .with_truncation(None)
            .map_err(|e| load_err(dir, format!("cannot turn off truncation: {e}")))?;
        tokenizer.with_padding(None);

        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| load_err(dir, format!("cannot list the folder: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(load_err(dir, "no *.safetensors files in the folder"));
        }
        let weights_bytes = files
            .iter()
            .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
            .sum();
        // f32 on every device: these models are small, and half precision
        // moves vectors measurably away from the reference.
        let (dev, _) = device(cfg.device).map_err(|m| load_err(dir, m))?;
        // SAFETY: the files are mapped read-only; like every mmap loader we
        // rely on them not being modified while the model is loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev) }
            .map_err(|e| load_err(dir, format!("cannot map the safetensors files: {e}")))?;
        let model = BertModel::load(vb, &config)
            .map_err(|e| load_err(dir, format!("cannot load the BERT weights: {e}")))?;

        let trained = config.max_position_embeddings;
        let context_length = cfg
            .max_context
            .filter(|&c| c > 0)
            .map_or(trained, |c| c.min(trained));
        let max_batch_tokens = cfg.max_batch_tokens.max(context_length);
        let name = raw
            .get("_name_or_path")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let meta = EmbedderMeta {
            name,
            architecture: "bert".into(),
            context_length,
            dimensions: config.hidden_size,
            vocab_size: config.vocab_size,
            weights_bytes,
            pooling,
            max_batch_tokens,
        };
        tracing::info!(
            model = %meta.name,
            context = meta.context_length,
            dimensions = meta.dimensions,
            pooling = meta.pooling.mode.as_str(),
            normalize = meta.pooling.normalize,
            max_batch_tokens,
            "embedding model loaded"
        );
        let stats = Arc::new(Counters::default());
        let pool = match cfg.threads.filter(|&t| t > 0) {
            Some(t) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .thread_name(|i| format!("helexa-embed-{i}"))
                    .build()
                    .map_err(|e| load_err(dir, format!("cannot start {t} threads: {e}")))?,
            ),
            None => None,
        };
        let worker = Worker {
            pool,
            model,
            device: dev,
            pooling,
            pad_id: config.pad_token_id as u32,
            max_batch_tokens,
            stats: stats.clone(),
        };
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("helexa-embed".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| load_err(dir, format!("cannot start the worker thread: {e}")))?;
        Ok(Embedder {
            inner: Arc::new(Inner {
                meta,
                tokenizer: Arc::new(tokenizer),
                jobs: Mutex::new(Some(tx)),
                stats,
            }),
        })
    }

    pub fn meta(&self) -> &EmbedderMeta {
        &self.inner.meta
    }

    /// Token ids of `text` with the model's special tokens ([CLS] … [SEP]),
    /// as the vector is computed from them.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.inner
            .tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// The tokenizer in Hugging Face `tokenizer.json` form (truncation and
    /// padding off, as used).
    pub fn tokenizer_json(&self) -> String {
        self.inner
            .tokenizer
            .to_string(false)
            .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }

    /// Why `ids` cannot be embedded, if it cannot: empty, longer than the
    /// context, or holding an id outside the vocabulary.
    pub fn check(&self, ids: &[u32]) -> Result<(), EngineError> {
        let meta = &self.inner.meta;
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest(
                "the input has no tokens".into(),
            ));
        }
        if ids.len() > meta.context_length {
            return Err(EngineError::ContextLength {
                max: meta.context_length,
                prompt: ids.len(),
                requested: 0,
            });
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= meta.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                meta.vocab_size
            )));
        }
        Ok(())
    }

    /// One vector per input, in order. Inputs are token ids as the model
    /// reads them (see [`Self::tokenize`]). Dropping the future before it
    /// resolves skips the passes not yet started.
    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, EngineError> {
        for ids in &inputs {
            self.check(ids)?;
        }
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        {
            let jobs = self.inner.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let tx = jobs.as_ref().ok_or(EngineError::Shutdown)?;
            self.inner.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            if tx.send(Job { inputs, reply }).is_err() {
                self.inner.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                return Err(EngineError::Shutdown);
            }
        }
        rx.await.unwrap_or(Err(EngineError::Shutdown))
    }

    /// Counters in the shape the engine's `/health` reports.
    pub fn stats(&self) -> EngineStats {
        let s = &self.inner.stats;
        EngineStats {
            in_flight: s.in_flight.load(Ordering::Relaxed),
            tokens_generated_total: 0,
            prompt_tokens_total: s.prompt_tokens_total.load(Ordering::Relaxed),
            tok_s_prefill: f64::from_bits(s.tok_s.load(Ordering::Relaxed)),
            tok_s_decode: 0.0,
            ..EngineStats::default()
        }
    }

    /// Stops taking work; the worker ends once the queued jobs are done.
    pub fn shutdown(&self) {
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// Groups of input indexes, each one forward pass: longest first, as many
/// as fit `max_tokens` padded tokens (count × longest of the group).
fn plan(lens: &[usize], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in order {
        // Sorted longest first: the group's first input sets its width.
        let width = cur.first().map_or(lens[i], |&f| lens[f]);
        if !cur.is_empty() && (cur.len() + 1) * width > max_tokens {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl Worker {
    fn run(self, rx: mpsc::Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            let result = self.job(&job);
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            // The requester may be gone; nothing to tell then.
            let _ = job.reply.send(result);
        }
    }

    fn job(&self, job: &Job) -> Result<Vec<Vec<f32>>, EngineError> {
        let lens: Vec<usize> = job.inputs.iter().map(Vec::len).collect();
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); job.inputs.len()];
        for group in plan(&lens, self.max_batch_tokens) {
            if job.reply.is_closed() {
                return Err(EngineError::InvalidRequest(
                    "the request was cancelled".into(),
                ));
            }
            let rows: Vec<&[u32]> = group.iter().map(|&i| job.inputs[i].as_slice()).collect();
            let started = Instant::now();
            // candle's CPU kernels run on the current rayon pool.
            let vectors = match &self.pool {
                Some(pool) => pool.install(|| self.forward(&rows)),
                None => self.forward(&rows),
            }
            .map_err(|e| EngineError::Inference(e.to_string()))?;
            let tokens: usize = rows.iter().map(|r| r.len()).sum();
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            self.stats
                .prompt_tokens_total
                .fetch_add(tokens as u64, Ordering::Relaxed);
            self.stats
                .tok_s
                .store((tokens as f64 / secs).to_bits(), Ordering::Relaxed);
            for (&i, v) in group.iter().zip(vectors) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// One padded forward pass over `rows`.
    fn forward(&self, rows: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut mask = Vec::with_capacity(rows.len() * width);
        for r in rows {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(self.pad_id, width - r.len()));
            mask.extend(std::iter::repeat_n(1u32, r.len()));
            mask.extend(std::iter::repeat_n(0u32, width - r.len()));
        }
        let shape = (rows.len(), width);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let types = ids.zeros_like()?;
        let states = self.model.forward(&ids, &types, Some(&mask))?;
        self.pooling
            .apply(&states, &mask)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::plan;

    #[test]
    fn plan_packs_longest_first_within_the_budget() {
        // Widths 10, 8, 5, 3, 2 with 20 padded tokens per pass.
        let lens = [3, 10, 2, 8, 5];
        let groups = plan(&lens, 20);
        assert_eq!(groups, vec![vec![1, 3], vec![4, 0, 2]]);
        for g in &groups {
            let width = g.iter().map(|&i| lens[i]).max().unwrap();
            assert!(g.len() * width <= 20);
        }
        // Every input exactly once.
        let mut all: Vec<usize> = groups.concat();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        // One input wider than the budget still gets a pass of its own.
        assert_eq!(plan(&[30, 1], 20), vec![vec![0], vec![1]]);
        assert!(plan(&[], 20).is_empty());
    }
}
