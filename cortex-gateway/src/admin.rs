//! The admin API (docs/protocol.md §6): see and steer the fleet. Served on
//! the API listener only when `[admin] token` is set; every call needs
//! `Authorization: Bearer <token>` (compared in constant time).
//!
//! `GET /admin/fleet` reads the snapshot; load and unload go through the
//! loader on the main runtime, like every other load.

use crate::loader::Why;
use crate::state::Gateway;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use helexa_api::error::{ApiError, ErrorCode};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use subtle::ConstantTimeEq;

type Gw = State<Arc<Gateway>>;

/// The admin routes; empty when `[admin] token` is unset.
pub fn routes(gw: &Arc<Gateway>) -> Router<Arc<Gateway>> {
    if gw.config.admin.token.as_deref().is_none_or(str::is_empty) {
        return Router::new();
    }
    Router::new()
        .route("/admin/fleet", get(fleet))
        .route("/admin/models/{id}/load", post(load))
        .route("/admin/models/{id}/unload", post(unload))
        .route("/admin/reload", post(reload))
        .route_layer(axum::middleware::from_fn_with_state(gw.clone(), auth))
}

async fn auth(State(gw): Gw, req: Request, next: Next) -> Response {
    let token = gw.config.admin.token.as_deref().unwrap_or_default();
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    match presented {
        Some(p) if bool::from(p.as_bytes().ct_eq(token.as_bytes())) => next.run(req).await,
        _ => {
            tracing::warn!(path = %req.uri().path(), "admin call refused: no valid admin token");
            ApiError::new(
                ErrorCode::InvalidApiKey,
                "The admin API needs `Authorization: Bearer <[admin] token>`",
            )
            .into_response()
        }
    }
}

/// `GET /admin/fleet`.
async fn fleet(State(gw): Gw) -> Response {
    let snap = gw.fleet.snapshot();
    let policy = gw.policy();
    let now = crate::fleet::now_ms();
    let nodes: Vec<Value> = snap
        .nodes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let neuron = &gw.fleet.neurons[i];
            let mut ids: Vec<&String> = v.models.keys().collect();
            ids.sort();
            let models: Vec<Value> = ids
                .into_iter()
                .map(|id| {
                    let info = &v.models[id];
                    let h = v.load.get(id);
                    let r = neuron.replica(id);
                    json!({
                        "id": id,
                        "status": h.map_or(info.status, |h| h.status),
                        "in_flight": h.map_or(0, |h| h.in_flight)
                            .max(r.in_flight().load(Ordering::Relaxed)),
                        "queue_depth": h.map_or(0, |h| h.queue_depth),
                        "memory_mb": v.taken_mb(id),
                        "last_used_secs_ago": now.saturating_sub(r.last_used_ms()) / 1000,
                    })
                })
                .collect();
            json!({
                "name": neuron.name,
                "endpoint": neuron.endpoint,
                "healthy": v.healthy,
                "memory_mb": v.memory,
                "models": models,
            })
        })
        .collect();
    let counts = crate::placement::replica_counts(&snap);
    let mut ids: std::collections::BTreeSet<&str> = counts.keys().copied().collect();
    ids.extend(policy.models.keys().map(String::as_str));
    for v in &snap.nodes {
        if let Some(d) = &v.discovery {
            ids.extend(d.catalogue.iter().map(|c| c.id.as_str()));
        }
    }
    let models: Vec<Value> = ids
        .into_iter()
        .map(|id| {
            let p = policy.of(id);
            json!({
                "id": id,
                "replicas": counts.get(id).copied().unwrap_or(0),
                "loading": gw.loader.loading(id),
                "min_replicas": p.min_replicas,
                "max_replicas": p.max_replicas,
                "residency_priority": p.residency_priority,
                "pinned_on": p.pinned_on,
                "idle_unload_secs": p.idle_unload_secs,
                "scale_up_after_secs": p.scale_up_after_secs,
            })
        })
        .collect();
    Json(json!({"nodes": nodes, "models": models})).into_response()
}

/// The body of load and unload: optional, and only `node` is honoured.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    node: Option<String>,
}

fn target(gw: &Gateway, body: &Bytes) -> Result<Option<usize>, ApiError> {
    let t: Target = if body.iter().all(u8::is_ascii_whitespace) {
        Target::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("invalid body: {e}")))?
    };
    let Some(name) = t.node else {
        return Ok(None);
    };
    match gw.fleet.neurons.iter().position(|n| n.name == name) {
        Some(i) => Ok(Some(i)),
        None => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("no neuron is named `{name}`"),
        )
        .with_param("node")),
    }
}

fn resolve(gw: &Gateway, id: &str) -> String {
    crate::router::resolve_alias(&gw.policy().aliases, id).to_string()
}

/// `POST /admin/models/{id}/load`: another replica where placement says
/// (or on `node`); evicts as a request's load would.
async fn load(State(gw): Gw, Path(id): Path<String>, body: Bytes) -> Response {
    let node = match target(&gw, &body) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let model = resolve(&gw, &id);
    let snap = gw.fleet.snapshot();
    if !crate::router::known_anywhere(&snap, &model) {
        return ApiError::model_not_found(&model).into_response();
    }
    if let Some(i) = node.filter(|&i| snap.nodes[i].serves(&model)) {
        let name = &gw.fleet.neurons[i].name;
        return Json(json!({"status": "loaded", "model": model, "node": name})).into_response();
    }
    drop(snap);
    let gw2 = gw.clone();
    let m = model.clone();
    let res = gw
        .on_main(async move { gw2.loader.load(&gw2, &m, Why::Admin, node).await })
        .await;
    match res {
        Ok(i) => {
            let name = &gw.fleet.neurons[i].name;
            tracing::info!(model, node = %name, "admin load done");
            Json(json!({"status": "loaded", "model": model, "node": name})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `POST /admin/models/{id}/unload`: from `node`, or from every node that
/// has it loaded. In-flight work there finishes first.
async fn unload(State(gw): Gw, Path(id): Path<String>, body: Bytes) -> Response {
    let node = match target(&gw, &body) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let model = resolve(&gw, &id);
    let snap = gw.fleet.snapshot();
    let nodes: Vec<usize> = snap
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, v)| node.is_none_or(|n| n == *i) && v.models.contains_key(&model))
        .map(|(i, _)| i)
        .collect();
    drop(snap);
    if nodes.is_empty() {
        return ApiError::new(
            ErrorCode::ModelNotFound,
            format!("`{model}` is not loaded on any neuron cortex can reach"),
        )
        .with_param("model")
        .into_response();
    }
    let mut done = Vec::new();
    for i in nodes {
        let gw2 = gw.clone();
        let m = model.clone();
        let res = gw
            .on_main(async move { crate::loader::unload(&gw2, i, &m).await })
            .await;
        if let Err(e) = res {
            return e.into_response();
        }
        done.push(gw.fleet.neurons[i].name.clone());
    }
    tracing::info!(model, nodes = ?done, "admin unload done");
    Json(json!({"status": "unloaded", "model": model, "nodes": done})).into_response()
}

/// `POST /admin/reload`: as `SIGHUP`, with the outcome in the answer.
async fn reload(State(gw): Gw) -> Response {
    match crate::reload::reload_configured(&gw) {
        Ok(crate::reload::Reloaded::Applied { restart_needed }) => {
            tracing::info!(restart_needed = ?restart_needed, "configuration reloaded (admin)");
            Json(json!({"status": "reloaded", "restart_needed": restart_needed})).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "reload refused; the running configuration stays");
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("reload refused; the running configuration stays: {e}"),
            )
            .into_response()
        }
    }
}
