//! cortex's own routes: `GET /v1/models` merged over the fleet, `/health`,
//! `/ready`, and the envelope for unknown routes and methods.
//!
//! All of them read the current snapshot; none waits on a neuron.

use crate::state::Gateway;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use helexa_api::error::{ApiError, ErrorBody, ErrorCode, ErrorEnvelope};
use helexa_api::models::{ModelList, ModelObject};
use helexa_protocol::ModelStatus;
use http::StatusCode;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Default)]
struct Merged {
    context: Option<u32>,
    output: Option<u32>,
    replicas: u32,
    loading: bool,
    capabilities: BTreeSet<String>,
    /// The first replica's (replicas of one model share its files).
    generation_defaults: Option<serde_json::Value>,
}

fn min_nonzero(cur: Option<u32>, v: u32) -> Option<u32> {
    if v == 0 {
        cur
    } else {
        Some(cur.map_or(v, |c| c.min(v)))
    }
}

/// The client key a router request presented (put there by the server's
/// key layer).
#[derive(Clone)]
pub struct Caller(pub Arc<crate::keys::Key>);

/// `GET /version`: what this cortex is.
pub async fn version() -> Response {
    Json(crate::version::info()).into_response()
}

pub async fn list_models(
    State(gw): State<Arc<Gateway>>,
    caller: Option<axum::Extension<Caller>>,
) -> Response {
    let snap = gw.fleet.snapshot();
    let mut merged: BTreeMap<String, Merged> = BTreeMap::new();
    for view in snap.nodes.iter().filter(|v| v.healthy) {
        for (id, info) in &view.models {
            let m = merged.entry(id.clone()).or_default();
            m.context = min_nonzero(m.context, info.limit.context);
            m.output = min_nonzero(m.output, info.limit.output);
            if view.serves(id) {
                m.replicas += 1;
            }
            if info.status == ModelStatus::Loading {
                m.loading = true;
            }
            m.capabilities.extend(info.capabilities.iter().cloned());
            if m.generation_defaults.is_none() {
                m.generation_defaults = info.generation_defaults.clone();
            }
        }
        if let Some(d) = &view.discovery {
            for c in &d.catalogue {
                merged.entry(c.id.clone()).or_default();
            }
        }
    }
    let object = |id: &str, m: &Merged| ModelObject {
        id: id.to_string(),
        object: "model".into(),
        created: 0,
        owned_by: "helexa".into(),
        context_length: m.context,
        max_model_len: m.context,
        max_output_tokens: m.output,
        status: Some(
            if m.replicas > 0 {
                "loaded"
            } else if m.loading {
                "loading"
            } else {
                "available"
            }
            .into(),
        ),
        replicas: Some(m.replicas),
        capabilities: Some(m.capabilities.iter().cloned().collect()),
        generation_defaults: m.generation_defaults.clone(),
    };
    let mut data: Vec<ModelObject> = merged.iter().map(|(id, m)| object(id, m)).collect();
    let policy = gw.policy();
    for (alias, target) in &policy.aliases {
        if let Some(m) = merged.get(target) {
            data.push(object(alias, m));
        }
    }
    // A key limited to some models sees only those (by id or alias).
    if let Some(axum::Extension(Caller(key))) = caller {
        data.retain(|m| match policy.aliases.get(&m.id) {
            Some(target) => key.allows(&m.id, target),
            None => key.may_list(&m.id),
        });
    }
    Json(ModelList::new(data)).into_response()
}

pub async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.draining.load(Ordering::Relaxed) {
        return ApiError::new(ErrorCode::ShuttingDown, "cortex is shutting down").into_response();
    }
    let snap = gw.fleet.snapshot();
    let healthy = snap.nodes.iter().filter(|v| v.healthy).count();
    if healthy == 0 {
        return ApiError::new(ErrorCode::NoCapacity, "no neuron is healthy yet")
            .with_retry_after(1)
            .into_response();
    }
    Json(json!({"status": "ready", "healthy_neurons": healthy})).into_response()
}

fn plain_error(status: StatusCode, code: &str, message: String) -> Response {
    let body = ErrorEnvelope {
        error: ErrorBody {
            message,
            kind: "invalid_request_error".into(),
            code: Some(code.into()),
            param: None,
            extras: Default::default(),
        },
    };
    (status, Json(body)).into_response()
}

pub async fn not_found(uri: http::Uri) -> Response {
    plain_error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

pub async fn method_not_allowed(method: http::Method, uri: http::Uri) -> Response {
    plain_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
