//! The OpenAI routes: admit the request for its model, then forward it to
//! that model's engine and stream the answer back unbuffered.
//!
//! The admission decision is made before any response byte. The permit is
//! moved into the response body stream, so the slot frees exactly when the
//! stream ends or the client goes away; dropping the body also drops the
//! upstream response, which closes the connection to the engine at once.

use super::AppState;
use crate::admission::{Permit, Refusal};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use helexa_api::extract::{check_content_type, parse_json, read_body};
use helexa_api::{ApiError, ErrorCode};
use http::{header, HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use std::pin::Pin;
use std::task::{Context, Poll};

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

/// Only the routing field of the body; everything else goes through as is.
#[derive(Deserialize)]
struct Target {
    model: String,
}

const REQUEST_ID: &str = "x-request-id";
const NODE: &str = "x-helexa-node";

async fn forward(state: AppState, path: &'static str, req: Request) -> Response {
    let request_id = req.headers().get(REQUEST_ID).cloned();
    let mut resp = match forward_inner(&state, path, req, request_id.clone()).await {
        Ok(r) => r,
        Err(e) => axum::response::IntoResponse::into_response(e),
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

async fn forward_inner(
    state: &AppState,
    path: &'static str,
    req: Request,
    request_id: Option<HeaderValue>,
) -> Result<Response, ApiError> {
    if state.is_draining() {
        return Err(super::control::shutting_down(state));
    }
    check_content_type(req.headers())?;
    let accept = req.headers().get(header::ACCEPT).cloned();
    let body = read_body(req, Some(state.config.max_body_bytes)).await?;
    let target: Target = parse_json(&body)?;
    if target.model.trim().is_empty() {
        return Err(ApiError::missing_model());
    }
    let model = target.model;
    let route = state.registry.route(&model)?;
    let permit = route.admission.acquire().await.map_err(|why| {
        let limits = route.admission.limits();
        let message = match why {
            Refusal::QueueFull => format!(
                "The model `{model}` is busy: {} requests running and {} waiting (max_queue_depth {})",
                route.admission.in_flight(),
                route.admission.queue_depth(),
                limits.max_queue_depth
            ),
            Refusal::WaitTimeout => format!(
                "The model `{model}` is busy: no slot freed within max_wait_secs ({}s)",
                limits.max_wait.as_secs()
            ),
            Refusal::Closed => format!("The model `{model}` is being unloaded or the node is draining"),
        };
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
    let engine = state.registry.current_engine(&model)?;
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
    let upstream = upstream.send().await.map_err(|e| {
        // A dead engine is a restart in progress, not a broken node.
        if let Err(loading) = state.registry.current_engine(&model) {
            return loading;
        }
        tracing::warn!(model = %model, error = %e, "engine request failed");
        ApiError::new(
            ErrorCode::UpstreamError,
            format!("The engine of `{model}` could not be reached: {e}"),
        )
    })?;
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
    let stream = PermitStream {
        inner: upstream.bytes_stream().boxed(),
        _permit: permit,
        is_sse,
        done: false,
        model: model.clone(),
    };
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// The engine's body, holding the admission permit until it ends or is
/// dropped. A stream that breaks after its first byte ends, for SSE, with an
/// error event and `[DONE]` (PROTOCOL.md §2), never a silent cut.
struct PermitStream {
    inner: BoxStream<'static, reqwest::Result<Bytes>>,
    _permit: Permit,
    is_sse: bool,
    done: bool,
    model: String,
}

impl Stream for PermitStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(b))),
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                tracing::warn!(model = %self.model, error = %e, "engine stream broke");
                if self.is_sse {
                    let err = ApiError::new(
                        ErrorCode::UpstreamError,
                        format!("The engine of `{}` stopped mid-stream: {e}", self.model),
                    );
                    Poll::Ready(Some(Ok(helexa_api::sse::error_events(&err))))
                } else {
                    Poll::Ready(Some(Err(std::io::Error::other(e))))
                }
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
