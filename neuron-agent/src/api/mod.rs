//! The agent's HTTP API (docs/protocol.md §3): the router, its shared state, and
//! the cross-cutting layers (auth, body limit, envelope for unknown routes).
//! Handlers are split by family: `control.rs` (cortex's routes) and
//! `inference.rs` (the OpenAI routes forwarded to engines, whose answers
//! `relay.rs` streams back); `GET /metrics` has its own listener.

mod control;
mod inference;
mod relay;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::Registry;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use helexa_api::{ApiError, ErrorCode, VersionInfo};
use helexa_protocol::{DeviceHealth, DeviceInfo, MemoryMb};
use http::{header, HeaderValue, Method, StatusCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Machine figures refreshed in the background (never on a request path).
#[derive(Debug, Clone, Default)]
pub struct NodeFigures {
    pub memory: MemoryMb,
    pub devices: Vec<DeviceInfo>,
    pub device_health: Vec<DeviceHealth>,
}

pub struct AppInner {
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub version: VersionInfo,
    pub config: Arc<Config>,
    pub node: String,
    pub hostname: String,
    pub cpu: helexa_protocol::CpuInfo,
    pub advertise_url: String,
    pub started: Instant,
    pub draining: AtomicBool,
    pub figures: Mutex<NodeFigures>,
}

/// Shared state of every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState(pub Arc<AppInner>);

impl std::ops::Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl AppState {
    pub fn new(registry: Registry, advertise_url: String) -> Self {
        let config = Arc::new(registry.config().clone());
        AppState(Arc::new(AppInner {
            node: config.node_name(),
            hostname: crate::discovery::hostname(),
            cpu: crate::discovery::cpu(),
            advertise_url,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            figures: Mutex::new(NodeFigures {
                memory: crate::discovery::memory(),
                devices: crate::discovery::devices(),
                device_health: crate::discovery::device_health(),
            }),
            metrics: registry.metrics().clone(),
            version: version(),
            registry,
            config,
        }))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn figures(&self) -> NodeFigures {
        self.figures.lock().expect("figures lock").clone()
    }

    /// Refreshes memory and device figures every `every` until dropped.
    pub async fn refresh_figures(self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let fresh = tokio::task::spawn_blocking(|| NodeFigures {
                memory: crate::discovery::memory(),
                devices: crate::discovery::devices(),
                device_health: crate::discovery::device_health(),
            })
            .await;
            if let Ok(f) = fresh {
                *self.figures.lock().expect("figures lock") = f;
            }
        }
    }
}

/// The whole agent API.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/version", get(control::version))
        .route("/discovery", get(control::discovery))
        .route("/health", get(control::health))
        .route("/models", get(control::models))
        .route("/models/load", post(control::load))
        .route("/models/unload", post(control::unload))
        .route("/models/{id}/endpoint", get(control::endpoint))
        .route("/models/{id}/tokenizer", get(control::tokenizer))
        .route("/v1/models", get(control::openai_models))
        .route("/v1/chat/completions", post(inference::chat_completions))
        .route("/v1/completions", post(inference::completions))
        .route("/v1/embeddings", post(inference::embeddings))
        .route("/v1/responses", post(inference::responses))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// This build of the agent (`GET /version`).
pub fn version() -> VersionInfo {
    helexa_api::version_info!("neuron")
}

/// The metrics listener: `GET /metrics` only. The per-model gauges are set
/// from the registry's cached state at each scrape.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    state
        .metrics
        .set_model_gauges(&state.registry.model_gauges());
    let mut resp = state.metrics.encode().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// `Authorization: Bearer <token>` on every route but `GET /health` and
/// `GET /version`.
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(token) = state.config.auth.token.as_deref() else {
        return next.run(req).await;
    };
    if req.method() == Method::GET && matches!(req.uri().path(), "/health" | "/version") {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => {
            ApiError::new(ErrorCode::InvalidApiKey, "Incorrect API key provided").into_response()
        }
        None => ApiError::new(
            ErrorCode::InvalidApiKey,
            "You didn't provide an API key. Send `Authorization: Bearer <token>`",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An envelope with a status of our choosing (for codes outside §2's table).
fn envelope(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({"error": {
        "message": message, "type": "invalid_request_error", "code": code, "param": null
    }});
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn unknown_route(req: Request) -> Response {
    envelope(
        StatusCode::NOT_FOUND,
        "unknown_route",
        format!("Unknown route: {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> Response {
    envelope(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "Method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}
