//! A mock neuron agent: the control routes of docs/protocol.md §3 plus `/v1/*`.
//!
//! Everything it reports or does (load, latency, chunking, refusals, death
//! mid-stream, tokenizer) is steerable while it runs, and it records requests.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use helexa_api::error::{ApiError, ErrorCode};
use helexa_protocol::{
    CatalogueEntry, Discovery, EndpointResponse, Health, MemoryMb, ModelHealth, ModelInfo,
    ModelLimit, ModelStatus, NodeStatus,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// One model the mock knows: in its catalogue, and loaded or not.
#[derive(Debug, Clone)]
pub struct MockModel {
    pub id: String,
    pub loaded: bool,
    /// `limit.context`; 0 = unknown.
    pub context: u32,
    /// `limit.output`; 0 = unknown.
    pub output: u32,
    /// Reported `in_flight` is this plus the requests really open.
    pub in_flight: u32,
    pub queue_depth: u32,
    /// What it takes loaded, MiB: `/discovery` `memory_mb` and `/models`
    /// `memory_mb`, and what counts against `Behaviour::memory_budget_mb`.
    pub memory_mb: u64,
}

impl MockModel {
    pub fn loaded(id: &str, context: u32) -> Self {
        MockModel {
            id: id.to_string(),
            loaded: true,
            context,
            output: 0,
            in_flight: 0,
            queue_depth: 0,
            memory_mb: 100,
        }
    }

    /// The same with `memory_mb` set.
    pub fn taking(mut self, memory_mb: u64) -> Self {
        self.memory_mb = memory_mb;
        self
    }

    /// In the catalogue but not loaded.
    pub fn available(id: &str, context: u32) -> Self {
        MockModel {
            loaded: false,
            ..Self::loaded(id, context)
        }
    }
}

/// A refusal sent before any byte of the answer (503 model_busy, 429...).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: String,
}

impl Refusal {
    pub fn busy(retry_after: u64) -> Self {
        let err = ApiError::new(ErrorCode::ModelBusy, "mock neuron is busy");
        Refusal {
            status: 503,
            retry_after: Some(retry_after),
            body: err.to_json(),
        }
    }

    pub fn rate_limited(retry_after: u64) -> Self {
        let err = ApiError::new(ErrorCode::RateLimitExceeded, "mock neuron rate limit");
        Refusal {
            status: 429,
            retry_after: Some(retry_after),
            body: err.to_json(),
        }
    }
}

/// How the mock behaves right now; change it with [`MockNeuron::set`].
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Delay before the response head of every `/v1/*` answer.
    pub latency: Duration,
    /// Content pieces: one SSE chunk each when streaming, joined otherwise.
    pub chunks: Vec<String>,
    /// Delay before each streamed chunk.
    pub chunk_delay: Duration,
    /// Refuse every `/v1/*` request with this answer.
    pub refuse: Option<Refusal>,
    /// Abort the connection after sending this many chunks of a stream.
    pub die_after_chunks: Option<usize>,
    /// `/health` and `/models` answer 500 when false.
    pub healthy: bool,
    /// URL returned by `/models/{id}/endpoint` instead of the mock's own.
    pub endpoint_override: Option<String>,
    /// Serve `GET /models/{id}/tokenizer` (the tiny tokenizer) when true.
    pub serve_tokenizer: bool,
    /// Time a `POST /models/load` takes.
    pub load_delay: Duration,
    /// `POST /models/load` fails with 500 when true.
    pub load_fails: bool,
    /// Reported available host memory (`/discovery`).
    pub memory_available_mb: u64,
    /// When set: `/health` reports `memory_mb` {budget, used, free} and a
    /// load that does not fit is refused with `507 insufficient_memory`.
    pub memory_budget_mb: Option<u64>,
    /// Keep bodies and headers of `/v1/*` requests (off for benchmarks).
    pub record: bool,
    /// Accept connections and requests but never answer any (a hung
    /// neuron: alive to TCP, silent to HTTP).
    pub hang: bool,
    /// Tool calls a chat answer makes after its content, as the engine
    /// sends them: `(name, JSON arguments)`; streamed as a head chunk (id,
    /// name, empty arguments) and the arguments in two pieces.
    pub tool_calls: Vec<(String, String)>,
    /// A chat answer's `finish_reason`; `None`: `stop` (`tool_calls` with
    /// tool calls), and no finishing chunk in a stream.
    pub finish_reason: Option<String>,
    /// A chat answer's vLLM-style `stop_reason` (the stop string that
    /// ended it); sent on the finishing chunk, which a stream then has.
    pub stop_reason: Option<String>,
    /// Reasoning pieces a chat answer gives before its content, as a
    /// reasoning model's engine does: `delta.reasoning_content` chunks when
    /// streaming, `message.reasoning_content` otherwise; each counts as one
    /// token in `usage.completion_tokens_details.reasoning_tokens`.
    pub reasoning: Vec<String>,
    /// `generation_defaults` every model reports in `/models`.
    pub generation_defaults: Option<Value>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            latency: Duration::ZERO,
            chunks: vec!["Hello".into(), ", ".into(), "world".into(), "!".into()],
            chunk_delay: Duration::ZERO,
            refuse: None,
            die_after_chunks: None,
            healthy: true,
            endpoint_override: None,
            serve_tokenizer: false,
            load_delay: Duration::from_millis(50),
            load_fails: false,
            memory_available_mb: 16_000,
            memory_budget_mb: None,
            record: true,
            hang: false,
            tool_calls: Vec::new(),
            finish_reason: None,
            stop_reason: None,
            reasoning: Vec::new(),
            generation_defaults: None,
        }
    }
}

/// One `/v1/*` request as received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RecordedRequest {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// What the mock has seen.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// `/v1/*` requests (bodies kept only while `record` is on).
    pub requests: Vec<RecordedRequest>,
    /// Count of `/v1/*` requests, recorded or not.
    pub v1_count: usize,
    /// `/v1/*` answers whose client went away before the end.
    pub closed_early: usize,
    /// `/v1/*` answers delivered to the end.
    pub completed: usize,
    /// Model ids asked for by `POST /models/load`.
    pub loads: Vec<String>,
    /// Model ids asked for by `POST /models/unload`.
    pub unloads: Vec<String>,
    /// Requests per control path (`/health`, `/models`, ...).
    pub control: HashMap<String, usize>,
    /// `Authorization` header values seen on any route.
    pub authorization: Vec<String>,
}

struct Inner {
    node: String,
    models: Vec<MockModel>,
    behaviour: Behaviour,
    recorded: Recorded,
}

impl Inner {
    /// What the loaded models take, MiB.
    fn used_mb(&self) -> u64 {
        self.models
            .iter()
            .filter(|m| m.loaded)
            .map(|m| m.memory_mb)
            .sum()
    }
}

struct Shared {
    inner: Mutex<Inner>,
    active: AtomicUsize,
    /// TCP connections accepted so far.
    connections: AtomicUsize,
    url: String,
    tokenizer: String,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_control(&self, path: &str, headers: &HeaderMap) {
        let mut g = self.lock();
        *g.recorded.control.entry(path.to_string()).or_default() += 1;
        if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
            if g.recorded.authorization.len() < 1000 {
                g.recorded.authorization.push(a.to_string());
            }
        }
    }
}

/// A running mock neuron; stops when dropped.
pub struct MockNeuron {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockNeuron {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockNeuron {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(node: &str, models: Vec<MockModel>) -> MockNeuron {
        Self::start_on(
            "127.0.0.1:0".parse().unwrap(),
            node,
            models,
            Behaviour::default(),
        )
        .await
        .expect("mock neuron binds")
    }

    pub async fn start_on(
        addr: SocketAddr,
        node: &str,
        models: Vec<MockModel>,
        behaviour: Behaviour,
    ) -> std::io::Result<MockNeuron> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                node: node.to_string(),
                models,
                behaviour,
                recorded: Recorded::default(),
            }),
            active: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            url: format!("http://{addr}"),
            tokenizer: crate::tokenizer::tiny_tokenizer_json(),
        });
        let app = router(shared.clone());
        // No Nagle: streamed chunks go out at once, as a real neuron's do.
        let counted = shared.clone();
        let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp| {
            let _ = tcp.set_nodelay(true);
            counted.connections.fetch_add(1, Ordering::SeqCst);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(MockNeuron { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.shared.lock().behaviour);
    }

    /// Changes one model (panics if the mock does not know it).
    pub fn set_model(&self, id: &str, f: impl FnOnce(&mut MockModel)) {
        let mut g = self.shared.lock();
        let m = g
            .models
            .iter_mut()
            .find(|m| m.id == id)
            .expect("mock knows the model");
        f(m);
    }

    pub fn add_model(&self, model: MockModel) {
        self.shared.lock().models.push(model);
    }

    pub fn remove_model(&self, id: &str) {
        self.shared.lock().models.retain(|m| m.id != id);
    }

    pub fn recorded(&self) -> Recorded {
        self.shared.lock().recorded.clone()
    }

    /// `/v1/*` requests open right now.
    /// TCP connections accepted so far (control routes included).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/discovery", get(discovery))
        .route("/health", get(health))
        .route("/models", get(models))
        .route("/models/load", post(load))
        .route("/models/unload", post(unload))
        .route("/models/{id}/endpoint", get(endpoint))
        .route("/models/{id}/tokenizer", get(tokenizer))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), hang))
        .with_state(shared)
}

/// Every route waits forever while `hang` is set.
async fn hang(State(s): St, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if s.lock().behaviour.hang {
        std::future::pending::<()>().await;
    }
    next.run(req).await
}

type St = State<Arc<Shared>>;

async fn discovery(State(s): St, headers: HeaderMap) -> Response {
    s.note_control("/discovery", &headers);
    let g = s.lock();
    let d = Discovery {
        node: g.node.clone(),
        version: "mock".into(),
        protocol: helexa_protocol::PROTOCOL_VERSION,
        hostname: g.node.clone(),
        memory_mb: MemoryMb {
            total: 32_000,
            available: g.behaviour.memory_available_mb,
        },
        runtimes: vec!["mock".into()],
        catalogue: g
            .models
            .iter()
            .map(|m| CatalogueEntry {
                id: m.id.clone(),
                loaded: m.loaded,
                memory_mb: m.memory_mb,
            })
            .collect(),
        ..Default::default()
    };
    Json(d).into_response()
}

fn unhealthy() -> Response {
    ApiError::new(ErrorCode::InternalError, "mock neuron told to be unhealthy").into_response()
}

async fn health(State(s): St, headers: HeaderMap) -> Response {
    s.note_control("/health", &headers);
    let g = s.lock();
    if !g.behaviour.healthy {
        return unhealthy();
    }
    let active = s.active.load(Ordering::SeqCst) as u32;
    let h = Health {
        status: NodeStatus::Ready,
        uptime_secs: 1,
        models: g
            .models
            .iter()
            .filter(|m| m.loaded)
            .map(|m| ModelHealth {
                id: m.id.clone(),
                status: ModelStatus::Loaded,
                in_flight: m.in_flight + active,
                queue_depth: m.queue_depth,
                max_in_flight: 8,
                max_queue_depth: 32,
                ..Default::default()
            })
            .collect(),
        memory_mb: g
            .behaviour
            .memory_budget_mb
            .map(|b| helexa_protocol::MemoryBudget::new(b, g.used_mb())),
        ..Default::default()
    };
    Json(h).into_response()
}

async fn models(State(s): St, headers: HeaderMap) -> Response {
    s.note_control("/models", &headers);
    let g = s.lock();
    if !g.behaviour.healthy {
        return unhealthy();
    }
    let list: Vec<ModelInfo> = g
        .models
        .iter()
        .filter(|m| m.loaded)
        .map(|m| ModelInfo {
            id: m.id.clone(),
            status: ModelStatus::Loaded,
            runtime: "mock".into(),
            memory_mb: m.memory_mb,
            limit: ModelLimit {
                context: m.context,
                output: m.output,
            },
            // The mock answers every /v1 route, so it reports them all.
            capabilities: vec!["chat".into(), "completions".into(), "embeddings".into()],
            tokenizer: g
                .behaviour
                .serve_tokenizer
                .then(|| format!("/models/{}/tokenizer", m.id)),
            generation_defaults: g.behaviour.generation_defaults.clone(),
            ..Default::default()
        })
        .collect();
    Json(list).into_response()
}

async fn endpoint(State(s): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    s.note_control("/endpoint", &headers);
    let g = s.lock();
    if !g.models.iter().any(|m| m.id == id && m.loaded) {
        return ApiError::model_not_found(&id).into_response();
    }
    let url = g
        .behaviour
        .endpoint_override
        .clone()
        .unwrap_or_else(|| s.url.clone());
    Json(EndpointResponse { url }).into_response()
}

async fn tokenizer(State(s): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    s.note_control("/tokenizer", &headers);
    let g = s.lock();
    if !g.behaviour.serve_tokenizer || !g.models.iter().any(|m| m.id == id) {
        return ApiError::new(ErrorCode::ModelNotFound, "no tokenizer").into_response();
    }
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        s.tokenizer.clone(),
    )
        .into_response()
}

async fn load(State(s): St, headers: HeaderMap, body: Bytes) -> Response {
    s.note_control("/models/load", &headers);
    let req: helexa_protocol::ModelRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return ApiError::new(ErrorCode::InvalidJson, e.to_string()).into_response(),
    };
    let (delay, fails, known) = {
        let mut g = s.lock();
        g.recorded.loads.push(req.model.clone());
        let model = g.models.iter().find(|m| m.id == req.model).cloned();
        if let (Some(m), Some(budget)) = (&model, g.behaviour.memory_budget_mb) {
            let used = g.used_mb();
            if !m.loaded && used + m.memory_mb > budget {
                return ApiError::new(
                    ErrorCode::InsufficientMemory,
                    format!(
                        "mock: `{}` needs {} MiB, {} of {budget} MiB free",
                        m.id,
                        m.memory_mb,
                        budget.saturating_sub(used)
                    ),
                )
                .into_response();
            }
        }
        (
            g.behaviour.load_delay,
            g.behaviour.load_fails,
            model.is_some(),
        )
    };
    if !known {
        return ApiError::model_not_found(&req.model).into_response();
    }
    tokio::time::sleep(delay).await;
    if fails {
        return ApiError::new(ErrorCode::InternalError, "mock load failed").into_response();
    }
    let mut g = s.lock();
    if let Some(m) = g.models.iter_mut().find(|m| m.id == req.model) {
        m.loaded = true;
    }
    Json(json!({"status": "loaded"})).into_response()
}

/// `POST /models/unload`: the model stops being loaded at once (the mock
/// has no engine to drain).
async fn unload(State(s): St, headers: HeaderMap, body: Bytes) -> Response {
    s.note_control("/models/unload", &headers);
    let req: helexa_protocol::ModelRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return ApiError::new(ErrorCode::InvalidJson, e.to_string()).into_response(),
    };
    let mut g = s.lock();
    g.recorded.unloads.push(req.model.clone());
    match g.models.iter_mut().find(|m| m.id == req.model) {
        Some(m) => {
            m.loaded = false;
            Json(json!({"status": "unloaded"})).into_response()
        }
        None => ApiError::model_not_found(&req.model).into_response(),
    }
}

/// Counts an open `/v1/*` request; on drop records whether it finished.
struct ActiveGuard {
    shared: Arc<Shared>,
    finished: bool,
}

impl ActiveGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard {
            shared,
            finished: false,
        }
    }
}

impl ActiveGuard {
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
        let mut g = self.shared.lock();
        if self.finished {
            g.recorded.completed += 1;
        } else {
            g.recorded.closed_early += 1;
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completions,
    Responses,
    Embeddings,
}

async fn chat(State(s): St, headers: HeaderMap, body: Bytes) -> Response {
    serve(s, Kind::Chat, "/v1/chat/completions", headers, body).await
}
async fn completions(State(s): St, headers: HeaderMap, body: Bytes) -> Response {
    serve(s, Kind::Completions, "/v1/completions", headers, body).await
}
async fn responses(State(s): St, headers: HeaderMap, body: Bytes) -> Response {
    serve(s, Kind::Responses, "/v1/responses", headers, body).await
}
async fn embeddings(State(s): St, headers: HeaderMap, body: Bytes) -> Response {
    serve(s, Kind::Embeddings, "/v1/embeddings", headers, body).await
}

async fn serve(
    s: Arc<Shared>,
    kind: Kind,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let behaviour = {
        let mut g = s.lock();
        g.recorded.v1_count += 1;
        if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
            if g.recorded.authorization.len() < 1000 {
                g.recorded.authorization.push(a.to_string());
            }
        }
        if g.behaviour.record {
            g.recorded.requests.push(RecordedRequest {
                path: path.to_string(),
                headers: headers.clone(),
                body: body.clone(),
            });
        }
        g.behaviour.clone()
    };
    if let Some(r) = &behaviour.refuse {
        let mut resp = (
            StatusCode::from_u16(r.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            [(http::header::CONTENT_TYPE, "application/json")],
            r.body.clone(),
        )
            .into_response();
        if let Some(secs) = r.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, secs.into());
        }
        return resp;
    }
    let mut guard = ActiveGuard::new(s.clone());
    if !behaviour.latency.is_zero() {
        tokio::time::sleep(behaviour.latency).await;
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = req["model"].as_str().unwrap_or("unknown").to_string();
    let stream = req["stream"].as_bool().unwrap_or(false) && kind != Kind::Embeddings;
    let include_usage = req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let prompt_tokens = (body.len() / 4) as u64;
    let reasoning_tokens = behaviour.reasoning.len() as u64;
    let completion_tokens = behaviour.chunks.len() as u64 + reasoning_tokens;
    let mut usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens});
    if reasoning_tokens > 0 && kind == Kind::Chat {
        usage["completion_tokens_details"] = json!({"reasoning_tokens": reasoning_tokens});
    }
    let calls = &behaviour.tool_calls;
    let finish = match &behaviour.finish_reason {
        Some(r) if r != "stop" => r.clone(),
        _ if !calls.is_empty() => "tool_calls".to_string(),
        _ => "stop".to_string(),
    };
    if !stream {
        let text: String = behaviour.chunks.concat();
        let v = match kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": text});
                if !behaviour.reasoning.is_empty() {
                    message["reasoning_content"] = json!(behaviour.reasoning.concat());
                }
                if !calls.is_empty() {
                    if text.is_empty() {
                        message["content"] = Value::Null;
                    }
                    message["tool_calls"] = calls
                        .iter()
                        .enumerate()
                        .map(|(i, (name, args))| {
                            json!({"id": format!("call_mock_{i}"),
                            "type": "function", "function": {"name": name, "arguments": args}})
                        })
                        .collect();
                }
                let mut v = json!({"id": "chatcmpl-mock", "object": "chat.completion",
                "created": 1, "model": model, "choices": [{"index": 0, "message": message,
                "finish_reason": finish, "logprobs": null}], "usage": usage});
                if let Some(stop) = &behaviour.stop_reason {
                    v["choices"][0]["stop_reason"] = json!(stop);
                }
                v
            }
            Kind::Completions => {
                json!({"id": "cmpl-mock", "object": "text_completion", "created": 1,
                "model": model, "choices": [{"index": 0, "text": text, "finish_reason": "stop"}], "usage": usage})
            }
            Kind::Responses => {
                json!({"id": "resp-mock", "object": "response", "status": "completed",
                "model": model, "output": [{"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": text}]}],
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}})
            }
            Kind::Embeddings => json!({"object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 1.0]}],
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}),
        };
        guard.finished = true;
        return Json(v).into_response();
    }

    // Streaming: one event per chunk, then usage (if asked), then the end.
    let mut events: Vec<Bytes> = Vec::with_capacity(behaviour.chunks.len() + 2);
    if kind == Kind::Chat {
        for (i, piece) in behaviour.reasoning.iter().enumerate() {
            let mut delta = json!({"reasoning_content": piece});
            if i == 0 {
                delta["role"] = json!("assistant");
            }
            let v = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1,
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": null}]});
            events.push(frame(kind, &v, ""));
        }
    }
    for (i, piece) in behaviour.chunks.iter().enumerate() {
        let v = match kind {
            Kind::Chat => {
                json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1,
                "model": model, "choices": [{"index": 0, "delta": if i == 0 {
                    json!({"role": "assistant", "content": piece}) } else { json!({"content": piece}) },
                "finish_reason": null}]})
            }
            Kind::Completions => {
                json!({"id": "cmpl-mock", "object": "text_completion", "created": 1,
                "model": model, "choices": [{"index": 0, "text": piece, "finish_reason": null}]})
            }
            _ => json!({"type": "response.output_text.delta", "delta": piece}),
        };
        events.push(frame(kind, &v, "response.output_text.delta"));
    }
    if kind == Kind::Chat {
        let chunk = |delta: Value, finish: Option<&str>| {
            let mut v = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                "created": 1, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            if let Some(stop) = finish.and(behaviour.stop_reason.as_deref()) {
                v["choices"][0]["stop_reason"] = json!(stop);
            }
            frame(kind, &v, "")
        };
        for (i, (name, args)) in calls.iter().enumerate() {
            events.push(chunk(
                json!({"tool_calls": [{"index": i, "id": format!("call_mock_{i}"), "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                None,
            ));
            let half = args
                .char_indices()
                .nth(args.chars().count() / 2)
                .map_or(0, |(b, _)| b);
            for piece in [&args[..half], &args[half..]] {
                events.push(chunk(
                    json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}),
                    None,
                ));
            }
        }
        if behaviour.finish_reason.is_some() || behaviour.stop_reason.is_some() || !calls.is_empty()
        {
            events.push(chunk(json!({}), Some(&finish)));
        }
    }
    match kind {
        Kind::Responses => {
            let v = json!({"type": "response.completed", "response": {"id": "resp-mock",
                "status": "completed", "usage": {"input_tokens": prompt_tokens,
                "output_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}}});
            events.push(frame(kind, &v, "response.completed"));
        }
        _ => {
            if include_usage {
                let v = json!({"id": "mock", "object": "chat.completion.chunk", "created": 1,
                    "model": model, "choices": [], "usage": usage});
                events.push(frame(kind, &v, ""));
            }
            events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        }
    }
    let delay = behaviour.chunk_delay;
    let die_after = behaviour.die_after_chunks;
    let state = (events.into_iter().enumerate(), guard);
    let body = stream::unfold(state, move |(mut it, mut guard)| async move {
        let (i, ev) = match it.next() {
            Some(x) => x,
            None => {
                guard.finish();
                return None;
            }
        };
        if die_after == Some(i) {
            // Counts as the mock's own death, not a client going away.
            guard.finish();
            return Some((
                Err(std::io::Error::other("mock neuron died mid-stream")),
                (it, guard),
            ));
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<Bytes, std::io::Error>(ev), (it, guard)))
    });
    (
        [
            (http::header::CONTENT_TYPE, "text/event-stream"),
            (http::header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

fn frame(kind: Kind, v: &Value, event: &str) -> Bytes {
    let mut out = Vec::with_capacity(256);
    if kind == Kind::Responses && !event.is_empty() {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut out, v).expect("json");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
