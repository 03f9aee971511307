//! `neuron engine`: a single-model OpenAI server around one `helexa_engine::Engine`.
//!
//! The agent starts one of these per loaded model (the same binary). Protocol
//! with the agent: the engine binds first and prints one stdout line
//! `HELEXA_ENGINE_LISTEN <addr>`, then loads the model; `GET /health` answers
//! 503 `{"status":"loading"}` until the model is ready, then 200
//! `{"status":"ready", ...}`. A failed load exits non-zero with the reason on
//! stderr. Routes: `/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`, `/v1/models`, `/health`, `/info`, `/tokenizer`.
//!
//! A BERT folder (`helexa_engine::is_embedding_model`) is served by an
//! `Embedder` with the one capability `embeddings`; any other model by an
//! `Engine` (chat, completions, ...). Each refuses the other's routes with a
//! 400 naming the capability, so a client learns why, not just "no route".

mod chat;
mod completions;
mod embeddings;
mod logprobs;
mod params;
mod stream;
mod structured;
mod tools;

use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use helexa_api::{ApiError, ErrorCode};
use helexa_engine::{DeviceSpec, EmbedConfig, Embedder, Engine, EngineConfig, EngineStats};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The stdout line prefix announcing the bound address.
pub const LISTEN_LINE_PREFIX: &str = "HELEXA_ENGINE_LISTEN ";

#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// A .gguf file or a safetensors model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The model id served (default: the file stem).
    #[arg(long)]
    pub id: Option<String>,
    /// TCP address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub listen: String,
    /// Serve on a unix socket instead of TCP.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A file holding a Jinja chat template that overrides the model's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// A `tokenizer_config.json` whose `chat_template` (a string, or a
    /// list of `{name, template}`: the `default` one) overrides the
    /// model's; `--chat-template` wins over it. The agent passes the base
    /// repo's for a GGUF repo without a template (docs/neuron.md).
    #[arg(long)]
    pub tokenizer_config: Option<PathBuf>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Cap on the served context, tokens.
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Default output cap when a request sets none.
    #[arg(long)]
    pub max_output: Option<usize>,
    #[arg(long)]
    pub threads: Option<usize>,
    /// KV cache kept for reuse by later requests with the same prompt
    /// prefix, MiB (0: no reuse across requests).
    #[arg(long, default_value_t = 1024)]
    pub prefix_cache_mb: u64,
    /// The forward pass of a GGUF on the CPU: `native` (our kernels, the
    /// fastest) or `candle` (the device-generic decoder CUDA runs, on
    /// candle's CPU device). CUDA devices always run the latter.
    #[arg(long, default_value = "native")]
    pub kernels: helexa_engine::Kernels,
    /// What a safetensors model computes in: `auto` (f32 on the CPU; on
    /// CUDA the checkpoint's f16, else bf16), `f32`, `f16` or `bf16`.
    #[arg(long, default_value = "auto")]
    pub dtype: helexa_engine::Dtype,
    /// Seconds between SSE keep-alive comments while a prompt prefills.
    #[arg(long, default_value_t = 1)]
    pub keep_alive_secs: u64,
    /// Largest request body accepted, bytes.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Seconds running requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Embedding models: padded tokens (inputs × longest input) of one
    /// forward pass; a longer list runs in several passes.
    #[arg(long, default_value_t = helexa_engine::embed::DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,
    /// Embedding models: inputs one `/v1/embeddings` request may carry
    /// (OpenAI's limit is 2048).
    #[arg(long, default_value_t = DEFAULT_MAX_INPUTS)]
    pub max_inputs: usize,
}

/// `--max-inputs` when not given.
pub const DEFAULT_MAX_INPUTS: usize = 2048;

/// What a generation engine serves (reported by `/info`, `/v1/models`).
const GENERATE_CAPABILITIES: &[&str] = &[
    "chat",
    "completions",
    "tools",
    "structured_outputs",
    "logprobs",
];
/// What an embedding model serves.
const EMBED_CAPABILITIES: &[&str] = &["embeddings"];

/// The model behind the server, once loaded.
enum Loaded {
    Generator(Engine),
    Embedder(Embedder),
}

/// Shared by the engine's handlers.
pub struct EngineState {
    id: String,
    /// Known before the load starts, so that a request during the load is
    /// refused for the right reason.
    embedding: bool,
    engine: OnceLock<Loaded>,
    max_inputs: usize,
    tokenizer_json: OnceLock<Bytes>,
    tokenizer_path: Option<PathBuf>,
    max_output: Option<usize>,
    keep_alive: Duration,
    draining: AtomicBool,
    started: Instant,
}

impl EngineState {
    /// The state of a server around an engine already loaded (in-process
    /// tests, or a server inside another program): the same routes as
    /// `neuron engine` serves.
    pub fn loaded(id: impl Into<String>, engine: Engine) -> Arc<EngineState> {
        Arc::new(EngineState::new(id.into(), Loaded::Generator(engine)))
    }

    /// [`Self::loaded`] for an embedding model; `max_inputs` as
    /// `--max-inputs`.
    pub fn loaded_embedder(
        id: impl Into<String>,
        embedder: Embedder,
        max_inputs: usize,
    ) -> Arc<EngineState> {
        let mut st = EngineState::new(id.into(), Loaded::Embedder(embedder));
        st.max_inputs = max_inputs;
        Arc::new(st)
    }

    fn new(id: String, loaded: Loaded) -> EngineState {
        let embedding = matches!(loaded, Loaded::Embedder(_));
        let engine_cell = OnceLock::new();
        let _ = engine_cell.set(loaded);
        EngineState {
            id,
            embedding,
            engine: engine_cell,
            max_inputs: DEFAULT_MAX_INPUTS,
            tokenizer_json: OnceLock::new(),
            tokenizer_path: None,
            max_output: None,
            keep_alive: Duration::from_secs(1),
            draining: AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    fn capabilities(&self) -> &'static [&'static str] {
        if self.embedding {
            EMBED_CAPABILITIES
        } else {
            GENERATE_CAPABILITIES
        }
    }

    /// `400` for a request this model has no capability for.
    fn lacks(&self, capability: &str, route: &str) -> ApiError {
        ApiError::invalid_request(
            format!(
                "The model `{}` does not have the `{capability}` capability needed by {route}: its capabilities are {}",
                self.id,
                self.capabilities().join(", ")
            ),
            "model",
        )
        .with_extra("capabilities", self.capabilities().to_vec())
    }

    /// The loaded model, or why there is none yet.
    fn current(&self) -> Result<&Loaded, ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                format!("engine for `{}` is shutting down", self.id),
            ));
        }
        self.engine.get().ok_or_else(|| {
            ApiError::new(
                ErrorCode::ModelLoading,
                format!("model `{}` is still loading", self.id),
            )
            .with_retry_after(2)
        })
    }

    /// The generation engine for a request needing `capability` (`chat`,
    /// `completions`) on `route`; an embedding model refuses.
    fn engine(&self, capability: &str, route: &str) -> Result<&Engine, ApiError> {
        if self.embedding {
            return Err(self.lacks(capability, route));
        }
        match self.current()? {
            Loaded::Generator(e) => Ok(e),
            Loaded::Embedder(_) => Err(self.lacks(capability, route)),
        }
    }

    /// The embedding model; a generation model refuses.
    fn embedder(&self) -> Result<&Embedder, ApiError> {
        if !self.embedding {
            return Err(self.lacks("embeddings", "/v1/embeddings"));
        }
        match self.current()? {
            Loaded::Embedder(e) => Ok(e),
            Loaded::Generator(_) => Err(self.lacks("embeddings", "/v1/embeddings")),
        }
    }

    /// Tokens one request may hold (prompt + output; one input of an
    /// embedding model), once loaded.
    fn context_length(&self) -> Option<usize> {
        self.engine.get().map(|l| match l {
            Loaded::Generator(e) => e.meta().context_length,
            Loaded::Embedder(e) => e.meta().context_length,
        })
    }

    fn stats(&self) -> Option<EngineStats> {
        self.engine.get().map(|l| match l {
            Loaded::Generator(e) => e.stats(),
            Loaded::Embedder(e) => e.stats(),
        })
    }

    /// Output cap when a request names none: the configured one, else the
    /// whole context.
    fn default_max_output(&self) -> usize {
        if self.embedding {
            return 0;
        }
        let ctx = self.context_length().unwrap_or(0);
        self.max_output.unwrap_or(ctx).min(ctx.max(1))
    }
}

/// A handler's answer, or its refusal logged once at WARN and sent as the
/// error envelope.
fn respond(result: Result<Response, ApiError>, api: &str) -> Response {
    result.unwrap_or_else(|err| {
        tracing::warn!(api, code = err.code.as_str(), message = %err.message, "request refused");
        err.into_response()
    })
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn parse_device(text: &str) -> anyhow::Result<DeviceSpec> {
    if text == "cpu" {
        return Ok(DeviceSpec::Cpu);
    }
    if let Some(n) = text.strip_prefix("cuda") {
        let n = n.trim_start_matches(':');
        let index = if n.is_empty() { 0 } else { n.parse()? };
        return Ok(DeviceSpec::Cuda(index));
    }
    anyhow::bail!("unknown device `{text}`: use `cpu` or `cuda:N`")
}

/// The engine's routes over `state`.
pub fn router(state: Arc<EngineState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/tokenizer", get(tokenizer))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let mut resp = ApiError::new(
        ErrorCode::InvalidRequest,
        format!("no route for {}", uri.path()),
    )
    .into_response();
    *resp.status_mut() = axum::http::StatusCode::NOT_FOUND;
    resp
}

async fn health(State(st): State<Arc<EngineState>>) -> Response {
    if st.draining.load(Ordering::Relaxed) {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    let Some(s) = st.stats() else {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading", "uptime_secs": st.started.elapsed().as_secs()})),
        )
            .into_response();
    };
    axum::Json(json!({
        "status": "ready",
        "model": st.id,
        "uptime_secs": st.started.elapsed().as_secs(),
        "in_flight": s.in_flight,
        "tokens_generated_total": s.tokens_generated_total,
        "prompt_tokens_total": s.prompt_tokens_total,
        "prompt_tokens_cached_total": s.prompt_tokens_cached_total,
        "prefix_cache_bytes": s.prefix_cache_bytes,
        "prefix_cache_evictions_total": s.prefix_cache_evictions_total,
        "tok_s_prefill": s.tok_s_prefill,
        "tok_s_decode": s.tok_s_decode,
    }))
    .into_response()
}

async fn info(State(st): State<Arc<EngineState>>) -> Response {
    let engine = match st.current() {
        Ok(Loaded::Generator(e)) => e,
        Ok(Loaded::Embedder(e)) => {
            let meta = e.meta();
            return axum::Json(json!({
                "id": st.id,
                "name": meta.name,
                "architecture": meta.architecture,
                "context_length": meta.context_length,
                "max_output_tokens": 0,
                "vocab_size": meta.vocab_size,
                "weights_bytes": meta.weights_bytes,
                "capabilities": EMBED_CAPABILITIES,
                "dimensions": meta.dimensions,
                "pooling": meta.pooling.mode.as_str(),
                "normalized": meta.pooling.normalize,
                "tokenizer": st.tokenizer_path.as_ref().map(|p| p.display().to_string()),
            }))
            .into_response();
        }
        Err(e) => return e.into_response(),
    };
    let meta = engine.meta();
    axum::Json(json!({
        "id": st.id,
        "name": meta.name,
        "architecture": meta.architecture,
        "context_length": meta.context_length,
        "max_output_tokens": st.default_max_output(),
        "vocab_size": meta.vocab_size,
        "weights_bytes": meta.weights_bytes,
        // Tool calls and structured outputs work on every chat model: the
        // template renders tools when it can, else the generic tool prompt.
        "capabilities": GENERATE_CAPABILITIES,
        "has_chat_template": meta.has_chat_template,
        "generation_defaults": meta.generation_defaults.to_json(),
        "reasoning": engine.reasoning_markers().is_some(),
        "tokenizer": st.tokenizer_path.as_ref().map(|p| p.display().to_string()),
    }))
    .into_response()
}

async fn tokenizer(State(st): State<Arc<EngineState>>) -> Response {
    let loaded = match st.current() {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let body = st
        .tokenizer_json
        .get_or_init(|| {
            Bytes::from(match loaded {
                Loaded::Generator(e) => e.tokenizer_json(),
                Loaded::Embedder(e) => e.tokenizer_json(),
            })
        })
        .clone();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn models(State(st): State<Arc<EngineState>>) -> Response {
    let ctx = st.context_length();
    let status = if ctx.is_some() { "loaded" } else { "loading" };
    let defaults = match st.engine.get() {
        Some(Loaded::Generator(e)) => Some(e.meta().generation_defaults.to_json()),
        _ => None,
    };
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.id, "object": "model", "created": unix_now(), "owned_by": "helexa",
            "context_length": ctx, "max_model_len": ctx,
            "max_output_tokens": ctx.map(|_| st.default_max_output()),
            "status": status,
            "capabilities": st.capabilities(),
            "generation_defaults": defaults,
        }],
    }))
    .into_response()
}

enum Bound {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// The `chat_template` of a `tokenizer_config.json`: a string, or the
/// `default` entry (else the first) of a list of `{name, template}`.
fn template_of_tokenizer_config(p: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| anyhow::anyhow!("cannot read tokenizer config {}: {e}", p.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("tokenizer config {}: {e}", p.display()))?;
    chat_template_value(&v["chat_template"])
        .ok_or_else(|| anyhow::anyhow!("tokenizer config {}: no chat_template", p.display()))
}

/// A `chat_template` value of a `tokenizer_config.json` (see above).
pub fn chat_template_value(v: &serde_json::Value) -> Option<String> {
    if let Some(s) = v.as_str() {
        return Some(s.to_string());
    }
    let list = v.as_array()?;
    let named = |n: &str| {
        list.iter()
            .find(|e| e["name"] == n)
            .and_then(|e| e["template"].as_str())
    };
    named("default")
        .or_else(|| list.first().and_then(|e| e["template"].as_str()))
        .map(str::to_string)
}

/// Runs the engine server until SIGTERM/SIGINT: binds, announces the address,
/// loads the model (`/health` says `loading` meanwhile), serves, and on a
/// signal stops admitting and lets running answers finish up to the drain
/// timeout.
pub async fn run(args: EngineArgs) -> anyhow::Result<()> {
    let id = args.id.clone().unwrap_or_else(|| {
        args.model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let device = parse_device(&args.device)?;
    let chat_template = match (&args.chat_template, &args.tokenizer_config) {
        (Some(p), _) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read chat template {}: {e}", p.display()))?,
        ),
        (None, Some(p)) => Some(template_of_tokenizer_config(p)?),
        (None, None) => None,
    };
    let embedding = helexa_engine::is_embedding_model(&args.model);
    let state = Arc::new(EngineState {
        id: id.clone(),
        embedding,
        engine: OnceLock::new(),
        max_inputs: args.max_inputs.max(1),
        tokenizer_json: OnceLock::new(),
        tokenizer_path: args.tokenizer.clone(),
        max_output: args.max_output,
        keep_alive: Duration::from_secs(args.keep_alive_secs.max(1)),
        draining: AtomicBool::new(false),
        started: Instant::now(),
    });
    let app = router(state.clone(), args.max_body_bytes);
    let mut stop = Box::pin(helexa_api::shutdown::Signals::first());

    let bound = match &args.unix {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .map_err(|e| anyhow::anyhow!("cannot bind unix socket {}: {e}", path.display()))?;
            announce(&path.display().to_string());
            Bound::Unix(l)
        }
        None => {
            let l = tokio::net::TcpListener::bind(&args.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
            announce(&l.local_addr()?.to_string());
            Bound::Tcp(l)
        }
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let graceful = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };
    let server = tokio::spawn(async move {
        match bound {
            Bound::Tcp(l) => axum::serve(l, app).with_graceful_shutdown(graceful).await,
            Bound::Unix(l) => axum::serve(l, app).with_graceful_shutdown(graceful).await,
        }
    });

    let loading = if embedding {
        let cfg = EmbedConfig {
            model_path: args.model.clone(),
            tokenizer_path: args.tokenizer.clone(),
            device,
            max_context: args.max_context,
            max_batch_tokens: args.max_batch_tokens.max(1),
            threads: args.threads,
        };
        tokio::task::spawn_blocking(move || Embedder::load(cfg).map(Loaded::Embedder))
    } else {
        let cfg = EngineConfig {
            model_path: args.model.clone(),
            tokenizer_path: args.tokenizer.clone(),
            chat_template,
            device,
            max_context: args.max_context,
            max_batch: args.max_batch.max(1),
            threads: args.threads,
            prefix_cache_bytes: args.prefix_cache_mb.saturating_mul(1 << 20),
            kernels: args.kernels,
            dtype: args.dtype,
        };
        tokio::task::spawn_blocking(move || Engine::load(cfg).map(Loaded::Generator))
    };
    tokio::select! {
        loaded = loading => {
            let loaded = loaded??;
            let _ = state.engine.set(loaded);
            tracing::info!(model = %id, context = state.context_length(), embedding, "engine ready");
        }
        _ = &mut stop => {
            tracing::info!(model = %id, "signal while loading: exiting");
            return Ok(());
        }
    }

    stop.await;
    tracing::info!(model = %id, drain_secs = args.drain_timeout_secs, "draining");
    state.draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let drain = Duration::from_secs(args.drain_timeout_secs);
    if tokio::time::timeout(drain, server).await.is_err() {
        tracing::warn!(model = %id, "drain timeout: ending running answers");
    }
    match state.engine.get() {
        Some(Loaded::Generator(e)) => e.shutdown(),
        Some(Loaded::Embedder(e)) => e.shutdown(),
        None => {}
    }
    Ok(())
}

/// Tells the agent where we listen: one stdout line, flushed at once.
fn announce(addr: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{LISTEN_LINE_PREFIX}{addr}");
    let _ = out.flush();
}

#[cfg(test)]
mod tokenizer_config_tests {
    use super::*;

    #[test]
    fn chat_template_of_a_tokenizer_config_string_or_named_list() {
        assert_eq!(
            chat_template_value(&json!("{{ x }}")).as_deref(),
            Some("{{ x }}")
        );
        let list =
            json!([{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]);
        assert_eq!(chat_template_value(&list).as_deref(), Some("d"));
        let list = json!([{"name": "rag", "template": "r"}]);
        assert_eq!(chat_template_value(&list).as_deref(), Some("r"));
        assert_eq!(chat_template_value(&json!(null)), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer_config.json");
        std::fs::write(&p, r#"{"chat_template": "T", "bos_token": "<s>"}"#).unwrap();
        assert_eq!(template_of_tokenizer_config(&p).unwrap(), "T");
        std::fs::write(&p, r#"{"bos_token": "<s>"}"#).unwrap();
        let e = template_of_tokenizer_config(&p).unwrap_err().to_string();
        assert!(e.contains("no chat_template"), "{e}");
    }
}
