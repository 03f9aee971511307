//! Sends one request to one replica and classifies what came back before
//! the first byte: a response to relay, a refusal to retry elsewhere, or a
//! failure to report.
//!
//! Refusals are connection refused/reset, `503` and `429`: the neuron did
//! no work, so the next-best replica may take the request.

use crate::config::ms;
use crate::fleet::Replica;
use crate::state::Gateway;
use crate::upstream::SendError;
use bytes::Bytes;
use helexa_api::error::{ApiError, ErrorCode};
use helexa_protocol::EndpointResponse;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use std::sync::Arc;

/// A refusal as the replica sent it, kept to pass on if all refuse.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// `None` for a connection-level refusal.
    pub status: Option<StatusCode>,
    pub retry_after: Option<HeaderValue>,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
    pub reason: String,
}

pub use crate::upstream::UpstreamResponse;

pub enum Outcome {
    Response(UpstreamResponse),
    Refused(Refusal),
    Failed(ApiError),
}

/// The base URL for `/v1/*` of `replica` on neuron `idx` (cached).
async fn endpoint(gw: &Gateway, idx: usize, replica: &Replica) -> Result<Arc<str>, String> {
    if let Some(u) = replica.endpoint() {
        return Ok(u);
    }
    let neuron = &gw.fleet.neurons[idx];
    let url = format!("{}/models/{}/endpoint", neuron.endpoint, replica.model);
    let ep: EndpointResponse = crate::poller::get_json(gw, url.clone()).await?;
    if ep.url.is_empty() {
        return Err(format!("{url}: empty url"));
    }
    let base: Arc<str> = Arc::from(ep.url.trim_end_matches('/'));
    replica.set_endpoint(Some(base.clone()));
    Ok(base)
}

/// POSTs `body` to `path` of `replica`'s model on neuron `idx`.
pub async fn attempt(
    gw: &Arc<Gateway>,
    idx: usize,
    replica: &Replica,
    path: &str,
    body: Bytes,
    request_id: &HeaderValue,
    accept: Option<&HeaderValue>,
) -> Outcome {
    let neuron = &gw.fleet.neurons[idx];
    let base = match endpoint(gw, idx, replica).await {
        Ok(b) => b,
        Err(reason) => {
            return Outcome::Refused(Refusal {
                status: None,
                retry_after: None,
                content_type: None,
                body: Bytes::new(),
                reason: format!("endpoint lookup failed: {reason}"),
            })
        }
    };
    let sent = tokio::time::timeout(
        ms(gw.config.upstream.first_byte_timeout_ms),
        gw.upstream.post(&base, path, body, request_id, accept),
    )
    .await;
    let resp = match sent {
        Err(_) => {
            crate::poller::mark_hung(gw, idx);
            return Outcome::Failed(ApiError::new(
                ErrorCode::UpstreamTimeout,
                format!(
                    "neuron `{}` sent no response within {} ms",
                    neuron.name, gw.config.upstream.first_byte_timeout_ms
                ),
            ));
        }
        Ok(Err(e)) => {
            if matches!(e, SendError::Connect(_)) {
                // The cached endpoint may be stale; look it up again next time.
                replica.set_endpoint(None);
            }
            return Outcome::Refused(Refusal {
                status: None,
                retry_after: None,
                content_type: None,
                body: Bytes::new(),
                reason: e.to_string(),
            });
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        let retry_after = resp.head.retry_after.clone();
        let content_type = resp.head.content_type.clone();
        let body = read_capped(resp, gw.config.upstream.max_refusal_body_bytes).await;
        return Outcome::Refused(Refusal {
            status: Some(status),
            retry_after,
            content_type,
            body,
            reason: format!("HTTP {status}"),
        });
    }
    Outcome::Response(resp)
}

async fn read_capped(resp: UpstreamResponse, cap: usize) -> Bytes {
    use http_body_util::BodyExt;
    let mut body = resp.body;
    let mut out = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(chunk) = frame.into_data() {
            let room = cap.saturating_sub(out.len());
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if out.len() >= cap {
                break;
            }
        }
    }
    Bytes::from(out)
}

/// The client's answer when every replica refused: the last refusal intact
/// (status, body, `Retry-After`), or `502 upstream_error` when it was a
/// connection failure.
pub fn refusal_response(r: &Refusal, model: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    match r.status {
        Some(status) => {
            let mut resp = (status, axum::body::Body::from(r.body.clone())).into_response();
            let h: &mut HeaderMap = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                r.content_type
                    .clone()
                    .unwrap_or(HeaderValue::from_static("application/json")),
            );
            match &r.retry_after {
                Some(v) => {
                    h.insert(header::RETRY_AFTER, v.clone());
                }
                None => {
                    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                }
            }
            resp
        }
        None => ApiError::new(
            ErrorCode::UpstreamError,
            format!(
                "no replica of `{model}` could be reached (last error: {})",
                r.reason
            ),
        )
        .into_response(),
    }
}
