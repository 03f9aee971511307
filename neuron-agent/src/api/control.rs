//! Control routes read by cortex: discovery, health, models, lifecycle.
//! Every read answers from cached state; no handler here waits on an engine
//! except `load`/`unload` (which wait for the lifecycle they asked for) and a
//! first, uncached `tokenizer` fetch.

use super::AppState;
use crate::registry::Phase;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use helexa_api::models::{ModelList, ModelObject};
use helexa_api::{ApiError, ApiJson};
use helexa_protocol::{
    ActivationState, CatalogueEntry, Discovery, EndpointResponse, Health, LifecycleResponse,
    ModelRequest, NodeStatus, PROTOCOL_VERSION,
};
use http::{header, HeaderValue};

/// `GET /version` (docs/protocol.md §8), public.
pub async fn version(State(state): State<AppState>) -> Json<helexa_api::VersionInfo> {
    Json(state.version.clone())
}

pub async fn discovery(State(state): State<AppState>) -> Json<Discovery> {
    let figures = state.figures();
    let catalogue = state
        .registry
        .phases()
        .into_iter()
        .map(|(id, phase)| CatalogueEntry {
            memory_mb: state.registry.memory_mb(&id),
            id,
            loaded: matches!(phase, Phase::Loaded | Phase::Recovering),
        })
        .collect();
    Json(Discovery {
        node: state.node.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        hostname: state.hostname.clone(),
        cpu: state.cpu.clone(),
        memory_mb: figures.memory,
        devices: figures.devices,
        runtimes: vec!["candle".to_string()],
        catalogue,
    })
}

pub async fn health(State(state): State<AppState>) -> Json<Health> {
    let activation = state.registry.activation();
    let status = if state.is_draining() {
        NodeStatus::Draining
    } else if activation.state == ActivationState::Ready {
        NodeStatus::Ready
    } else {
        NodeStatus::Starting
    };
    Json(Health {
        status,
        uptime_secs: state.started.elapsed().as_secs(),
        activation,
        devices: state.figures().device_health,
        models: state.registry.model_health(),
        memory_mb: Some(state.registry.memory()),
    })
}

pub async fn models(State(state): State<AppState>) -> Json<Vec<helexa_protocol::ModelInfo>> {
    Json(state.registry.model_infos())
}

fn check_model_id(req: &ModelRequest) -> Result<(), ApiError> {
    if req.model.trim().is_empty() {
        Err(ApiError::missing_model())
    } else {
        Ok(())
    }
}

pub async fn load(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ModelRequest>,
) -> Result<Json<LifecycleResponse>, ApiError> {
    check_model_id(&req)?;
    if state.is_draining() {
        return Err(shutting_down(&state));
    }
    state.registry.load(&req.model).await?;
    Ok(Json(LifecycleResponse {
        status: "loaded".to_string(),
    }))
}

pub async fn unload(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ModelRequest>,
) -> Result<Json<LifecycleResponse>, ApiError> {
    check_model_id(&req)?;
    state.registry.unload(&req.model).await?;
    Ok(Json(LifecycleResponse {
        status: "unloaded".to_string(),
    }))
}

pub async fn endpoint(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<EndpointResponse>, ApiError> {
    match state.registry.phase(&id) {
        Some(Phase::Loaded | Phase::Recovering) => Ok(Json(EndpointResponse {
            url: state.advertise_url.clone(),
        })),
        Some(_) => Err(not_loaded(&id)),
        None => Err(ApiError::model_not_found(&id)),
    }
}

pub async fn tokenizer(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !state.registry.in_catalogue(&id) {
        return Err(ApiError::model_not_found(&id));
    }
    let bytes = state.registry.tokenizer(&id).await?;
    let mut resp = bytes.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// `GET /v1/models`: the OpenAI list of this node's loaded models.
pub async fn openai_models(State(state): State<AppState>) -> Json<ModelList> {
    let data = state
        .registry
        .model_infos()
        .into_iter()
        .map(|m| {
            let context = (m.limit.context > 0).then_some(m.limit.context);
            ModelObject {
                id: m.id,
                object: "model".to_string(),
                created: 0,
                owned_by: "helexa".to_string(),
                context_length: context,
                max_model_len: context,
                max_output_tokens: (m.limit.output > 0).then_some(m.limit.output),
                status: Some(
                    match m.status {
                        helexa_protocol::ModelStatus::Loaded => "loaded",
                        _ => "loading",
                    }
                    .to_string(),
                ),
                replicas: Some(u32::from(m.status == helexa_protocol::ModelStatus::Loaded)),
                capabilities: Some(m.capabilities),
                generation_defaults: m.generation_defaults,
            }
        })
        .collect();
    Json(ModelList::new(data))
}

fn not_loaded(id: &str) -> ApiError {
    ApiError::new(
        helexa_api::ErrorCode::ModelNotFound,
        format!("The model `{id}` is not loaded on this node"),
    )
    .with_param("model")
}

pub(super) fn shutting_down(state: &AppState) -> ApiError {
    ApiError::new(
        helexa_api::ErrorCode::ShuttingDown,
        "This node is shutting down; retry on another node",
    )
    .with_retry_after(state.config.loading_retry_after_secs)
}
