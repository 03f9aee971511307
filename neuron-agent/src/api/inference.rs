//! The OpenAI routes: admit the request for its model, then forward it to
//! that model's engine and stream the answer back unbuffered (`relay.rs`).
//!
//! The admission decision is made before any response byte. The permit is
//! moved into the response body stream, so the slot frees exactly when the
//! stream ends or the client goes away; dropping the body also drops the
//! upstream response, which closes the connection to the engine at once.
//! Every refusal is counted with its reason; an engine that sends no
//! response head within `engine_first_byte_timeout_secs` is a
//! `504 upstream_timeout`.

use super::relay::{Kind, Measure, Relay};
use super::AppState;
use crate::admission::Refusal;
use crate::metrics::{RefuseReason, UNKNOWN_MODEL};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures_util::stream::StreamExt;
use helexa_api::extract::{check_content_type, parse_json, read_body};
use helexa_api::{ApiError, ErrorCode};
use http::{header, HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use std::time::Instant;

pub async fn chat_completions(State(s): State<AppState>, req: Request) -> Response {
    forward(s, "/v1/chat/completions", req).await
}
pub async fn completions(State(s): State<AppState>, req: Request) -> Response {
    forward(s, "/v1/completions", req).await
}
pub async fn embeddings(State(s): State<AppState>, req: Request) -> Response {
    forward(s, "/v1/embeddings", req).await
}
pub async fn responses(State(s): State<AppState>, req: Request) -> Response {
    forward(s, "/v1/responses", req).await
}

const REQUEST_ID: &str = "x-request-id";
const NODE: &str = "x-helexa-node";

async fn forward(state: AppState, path: &'static str, req: Request) -> Response {
    let started = Instant::now();
    let request_id = req.headers().get(REQUEST_ID).cloned();
    // The metrics label: a catalogue id once the body names one.
    let mut label = UNKNOWN_MODEL.to_string();
    let mut resp =
        match forward_inner(&state, path, req, request_id.clone(), started, &mut label).await {
            Ok(r) => r,
            Err(e) => {
                let resp = axum::response::IntoResponse::into_response(e);
                state
                    .metrics
                    .answered(&label, resp.status().as_u16(), started.elapsed());
                resp
            }
        };
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&state.node) {
        headers.insert(NODE, v);
    }
    if let Some(id) = request_id {
        headers
            .entry(HeaderName::from_static(REQUEST_ID))
            .or_insert(id);
    }
    resp
}

/// The request body, parsed once: its `model`, and the bytes to forward.
struct Forwarded {
    model: String,
    body: Bytes,
    /// The agent added `stream_options.include_usage` (the relay takes the
    /// usage chunk out again).
    added_usage: bool,
}

/// Reads `model` and, for a chat or completions stream that did not ask for
/// usage, asks the engine for it, so that token counters see every answer.
fn prepare(path: &str, body: Bytes) -> Result<Forwarded, ApiError> {
    let mut value: Value = parse_json(&body)?;
    if !value.is_object() {
        return Err(ApiError::invalid_request(
            "the request body must be a JSON object",
            "body",
        ));
    }
    let model = match value.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => return Err(ApiError::missing_model()),
        Some(_) => {
            return Err(
                ApiError::new(ErrorCode::InvalidRequest, "`model` must be a string")
                    .with_param("model"),
            )
        }
    };
    let streams = value.get("stream").and_then(Value::as_bool) == Some(true);
    let wants_usage = value
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let chat_like = matches!(path, "/v1/chat/completions" | "/v1/completions");
    if !(streams && chat_like && !wants_usage) {
        return Ok(Forwarded {
            model,
            body,
            added_usage: false,
        });
    }
    let Some(obj) = value.as_object_mut() else {
        return Ok(Forwarded {
            model,
            body,
            added_usage: false,
        });
    };
    match obj.get_mut("stream_options") {
        Some(Value::Object(o)) => {
            o.insert("include_usage".into(), Value::Bool(true));
        }
        // A malformed `stream_options` is the engine's to refuse.
        Some(_) => {
            return Ok(Forwarded {
                model,
                body,
                added_usage: false,
            })
        }
        None => {
            obj.insert(
                "stream_options".into(),
                serde_json::json!({"include_usage": true}),
            );
        }
    }
    let body = Bytes::from(serde_json::to_vec(&value).expect("a parsed body serialises"));
    Ok(Forwarded {
        model,
        body,
        added_usage: true,
    })
}

/// The refusal reason of a routing error.
fn route_reason(e: &ApiError) -> RefuseReason {
    match e.code {
        ErrorCode::ModelLoading => RefuseReason::Loading,
        ErrorCode::ModelNotFound => RefuseReason::NotLoaded,
        ErrorCode::ModelBusy | ErrorCode::ShuttingDown => RefuseReason::ShuttingDown,
        _ => RefuseReason::EngineUnavailable,
    }
}

async fn forward_inner(
    state: &AppState,
    path: &'static str,
    req: Request,
    request_id: Option<HeaderValue>,
    started: Instant,
    label: &mut String,
) -> Result<Response, ApiError> {
    check_content_type(req.headers())?;
    let accept = req.headers().get(header::ACCEPT).cloned();
    let body = read_body(req, Some(state.config.max_body_bytes)).await?;
    let Forwarded {
        model,
        body,
        added_usage,
    } = prepare(path, body)?;
    if state.registry.in_catalogue(&model) {
        label.clone_from(&model);
    }
    let metrics = &state.metrics;
    let refuse = |reason: RefuseReason| {
        if label.as_str() != UNKNOWN_MODEL {
            metrics.refused(label, reason);
        }
    };
    // Refusals other than admission's (which logs its numbers below).
    let refuse_route = |e: &ApiError| {
        let reason = route_reason(e);
        refuse(reason);
        tracing::warn!(model = %model, reason = reason.as_str(), code = e.code.as_str(), request_id = ?request_id, "request refused");
    };
    if state.is_draining() {
        let e = super::control::shutting_down(state);
        refuse_route(&e);
        return Err(e);
    }
    let route = state.registry.route(&model).inspect_err(refuse_route)?;
    let permit = route.admission.acquire().await.map_err(|why| {
        let limits = route.admission.limits();
        let (message, reason) = match why {
            Refusal::QueueFull => (format!(
                "The model `{model}` is busy: {} requests running and {} waiting (max_queue_depth {})",
                route.admission.in_flight(),
                route.admission.queue_depth(),
                limits.max_queue_depth
            ), RefuseReason::QueueFull),
            Refusal::WaitTimeout => (format!(
                "The model `{model}` is busy: no slot freed within max_wait_secs ({}s)",
                limits.max_wait.as_secs()
            ), RefuseReason::WaitTimeout),
            Refusal::Closed => (format!("The model `{model}` is being unloaded or the node is draining"), RefuseReason::ShuttingDown),
        };
        refuse(reason);
        tracing::warn!(
            model = %model, reason = ?why,
            in_flight = route.admission.in_flight(),
            queue_depth = route.admission.queue_depth(),
            max_in_flight = limits.max_in_flight,
            max_queue_depth = limits.max_queue_depth,
            request_id = ?request_id,
            "request refused"
        );
        ApiError::new(ErrorCode::ModelBusy, message)
            .with_retry_after(state.config.busy_retry_after_secs)
    })?;
    // The engine may have died or been replaced while we waited.
    let engine = state
        .registry
        .current_engine(&model)
        .inspect_err(refuse_route)?;
    metrics.admitted.with_label_values(&[label.as_str()]).inc();
    let mut upstream = state
        .registry
        .client()
        .post(format!("{}{path}", engine.base_url))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(a) = accept {
        upstream = upstream.header(header::ACCEPT, a);
    }
    if let Some(id) = &request_id {
        upstream = upstream.header(REQUEST_ID, id.clone());
    }
    let first_byte = state.config.engine_first_byte_timeout();
    let sent = tokio::time::timeout(first_byte, upstream.send()).await;
    let upstream = match sent {
        Err(_elapsed) => {
            refuse(RefuseReason::UpstreamTimeout);
            tracing::warn!(model = %model, timeout_secs = first_byte.as_secs(), request_id = ?request_id, "engine sent no response head in time");
            return Err(ApiError::new(
                ErrorCode::UpstreamTimeout,
                format!(
                    "The engine of `{model}` did not answer within engine_first_byte_timeout_secs ({}s)",
                    first_byte.as_secs()
                ),
            ));
        }
        Ok(Err(e)) => {
            // Refused at connect by an engine that is gone: a restart is in
            // progress, not a broken node. A request the engine had taken
            // and then lost is a 502.
            if e.is_connect() {
                if let Err(loading) = state.registry.current_engine(&model) {
                    refuse_route(&loading);
                    return Err(loading);
                }
            }
            refuse(RefuseReason::EngineUnavailable);
            tracing::warn!(model = %model, error = %e, request_id = ?request_id, "engine request failed");
            return Err(ApiError::new(
                ErrorCode::UpstreamError,
                format!("The engine of `{model}` failed before answering: {e}"),
            ));
        }
        Ok(Ok(r)) => r,
    };
    let status = upstream.status();
    let mut headers = HeaderMap::new();
    for name in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        HeaderName::from_static(REQUEST_ID),
    ] {
        if let Some(v) = upstream.headers().get(&name) {
            headers.insert(name, v.clone());
        }
    }
    let is_sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let kind = if is_sse {
        Kind::Sse {
            strip_usage: added_usage,
        }
    } else {
        Kind::Plain
    };
    let measure = Measure::new(
        state.metrics.clone(),
        label.clone(),
        started,
        status.as_u16(),
    );
    let relay = Relay::new(
        upstream.bytes_stream().boxed(),
        permit,
        engine.body_started(),
        measure,
        kind,
    );
    let mut resp = Response::new(Body::from_stream(relay));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(resp)
}
