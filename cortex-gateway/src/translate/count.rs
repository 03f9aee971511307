//! `POST /v1/messages/count_tokens`: how many prompt tokens a Messages
//! request would take, answered by cortex alone (no neuron is asked).
//!
//! The request is translated as for `/v1/messages` (`max_tokens` may be
//! left out) and counted the way pre-validation counts a chat prompt: with
//! the model's own tokenizer when a neuron serves it, else by the
//! characters-per-token estimate, plus the configured per-message and
//! per-request overheads. Like Anthropic's, the figure is an estimate of
//! the rendered prompt. It spends no `rpm`/`tpm` of the client key, but the
//! key must be valid and allowed the model.

use super::messages;
use crate::inference::ClientFields;
use crate::prevalidate::{self, RequestHead};
use crate::router;
use crate::state::Gateway;
use crate::tokens::Counter;
use axum::response::Response;
use bytes::Bytes;
use helexa_api::error::{ApiError, ErrorCode};
use helexa_api::extract::{check_content_type_value, parse_json};
use http::{header, HeaderValue};
use serde_json::{json, Value};
use std::sync::Arc;

/// Answers one count request, in Anthropic's shape either way.
pub async fn serve(
    gw: Arc<Gateway>,
    fields: ClientFields,
    body: Result<Bytes, ApiError>,
) -> Response {
    match count(&gw, &fields, body).await {
        Ok(n) => {
            let mut resp = Response::new(axum::body::Body::from(
                serde_json::to_vec(&json!({"input_tokens": n})).expect("json serialises"),
            ));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => {
            tracing::warn!(request_id = ?fields.request_id, code = e.code.as_str(),
                error = %e.message, "token count refused");
            messages::error_response(&e)
        }
    }
}

async fn count(
    gw: &Arc<Gateway>,
    fields: &ClientFields,
    body: Result<Bytes, ApiError>,
) -> Result<u64, ApiError> {
    let key = if gw.keys.enabled() {
        gw.keys
            .get()
            .identify(fields.authorization.as_ref(), fields.api_key.as_ref())?
    } else {
        None
    };
    check_content_type_value(fields.content_type.as_ref())?;
    let body = body?;
    let mut req: Value = parse_json(&body)?;
    // Counting needs no output budget.
    if let Some(o) = req.as_object_mut() {
        o.entry("max_tokens").or_insert(json!(1));
        o.remove("stream");
    }
    let (chat, _) = super::translate(
        super::Api::Messages,
        &serde_json::to_vec(&req).expect("json"),
    )?;
    let head: RequestHead<'_> = parse_json(&chat)?;
    let resolved = router::resolve_alias(&gw.config.aliases, &head.model).to_string();
    if let Some(k) = &key {
        if !k.allows(&head.model, &resolved) {
            return Err(k.not_allowed(&head.model));
        }
    }
    if !router::known_anywhere(&gw.fleet.snapshot(), &resolved) {
        return Err(ApiError::model_not_found(&resolved));
    }
    let cfg = &gw.config.prevalidation;
    let tokenizer = match gw.tokenizers.cached(&resolved) {
        Some(t) => t,
        None if cfg.fetch_tokenizer => {
            let g = gw.clone();
            let model = resolved.clone();
            gw.on_main(async move { g.tokenizers.get(&g, &model).await })
                .await
        }
        None => None,
    };
    let Some(t) = tokenizer else {
        let counter = Counter::Estimate {
            chars_per_token: cfg.chars_per_token,
        };
        return Ok(prevalidate::count_prompt(&head, &counter, cfg));
    };
    // Tokenizing a long prompt takes milliseconds: off the API worker, as
    // pre-validation does.
    let _slot = gw.counting.acquire().await;
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || {
        let head: RequestHead<'_> = parse_json(&chat)?;
        Ok(prevalidate::count_prompt(
            &head,
            &Counter::Exact(&t.tokenizer),
            &cfg,
        ))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            ErrorCode::InternalError,
            format!("token counting failed: {e}"),
        )
    })?
}
