//! `POST /v1/completions` on the engine: a raw prompt (text or token ids),
//! no chat template; optional `echo` of the prompt.

use super::params::{check_n, engine_error, output_budget, sampling_params, stop_strings};
use super::stream::{collect, sse_body, sse_response, ChunkFormat};
use super::EngineState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use helexa_api::chat::Usage;
use helexa_api::completions::{
    CompletionChoice, CompletionRequest, CompletionResponse, PromptInput, COMPLETION_OBJECT,
};
use helexa_api::{sse, ApiError, ApiJson, ErrorCode};
use helexa_engine::GenerationRequest;
use serde_json::json;
use std::sync::Arc;

pub async fn completions(
    State(st): State<Arc<EngineState>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Response {
    super::respond(handle(st, req).await, "completion")
}

/// One prompt per request: arrays of several prompts are refused.
fn single_prompt(p: &PromptInput) -> Result<PromptInput, ApiError> {
    let many = |n: usize| {
        ApiError::invalid_request(
            format!("only one prompt per request is supported, got {n}"),
            "prompt",
        )
    };
    Ok(match p {
        PromptInput::Texts(v) if v.len() == 1 => PromptInput::Text(v[0].clone()),
        PromptInput::Texts(v) => return Err(many(v.len())),
        PromptInput::TokenBatches(v) if v.len() == 1 => PromptInput::Tokens(v[0].clone()),
        PromptInput::TokenBatches(v) => return Err(many(v.len())),
        other => other.clone(),
    })
}

async fn handle(st: Arc<EngineState>, req: CompletionRequest) -> Result<Response, ApiError> {
    let engine = st.engine()?.clone();
    check_n(req.n)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_request(
            "`suffix` (fill-in-the-middle) is not supported by this model",
            "suffix",
        ));
    }
    let params = sampling_params(&req.sampling)?;
    let stop = stop_strings(&req.sampling)?;
    let prompt_input = single_prompt(&req.prompt)?;
    let vocab = engine.meta().vocab_size;
    let tok_engine = engine.clone();
    let (prompt, prompt_text) = tokio::task::spawn_blocking(move || match prompt_input {
        PromptInput::Text(text) => {
            let ids = tok_engine.tokenize(&text, true)?;
            Ok((ids, text))
        }
        PromptInput::Tokens(ids) => {
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(helexa_engine::EngineError::InvalidRequest(format!(
                    "token id {bad} is outside the vocabulary of {vocab} tokens"
                )));
            }
            let text = tok_engine.decode(&ids)?;
            Ok((ids, text))
        }
        _ => unreachable!("single_prompt returns one prompt"),
    })
    .await
    .map_err(|e| ApiError::new(ErrorCode::InternalError, e.to_string()))?
    .map_err(|e| {
        let mut err = engine_error(e);
        err.param = Some("prompt".into());
        err
    })?;
    let max_new_tokens = output_budget(
        engine.meta().context_length,
        prompt.len(),
        req.max_tokens,
        st.default_max_output(),
    )
    .map_err(|mut e| {
        if e.code == ErrorCode::InvalidRequest && e.param.as_deref() == Some("messages") {
            e.param = Some("prompt".into());
        }
        e
    })?;
    let gen = engine
        .submit(GenerationRequest {
            prompt,
            params,
            max_new_tokens,
            stop,
        })
        .map_err(engine_error)?;
    let echo = req.echo.unwrap_or(false);
    let format = CompletionFormat {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: super::unix_now(),
        model: req.model.clone(),
        echo: echo.then(|| prompt_text.clone()),
    };
    if req.stream {
        let include_usage = req
            .stream_options
            .as_ref()
            .map(|o| o.include_usage)
            .unwrap_or(false);
        return Ok(sse_response(sse_body(
            gen,
            format,
            include_usage,
            st.keep_alive,
        )));
    }
    let done = collect(gen).await?;
    let text = if echo {
        format!("{prompt_text}{}", done.text)
    } else {
        done.text
    };
    Ok(axum::Json(CompletionResponse {
        id: format.id,
        object: COMPLETION_OBJECT.into(),
        created: format.created,
        model: format.model,
        choices: vec![CompletionChoice {
            text,
            index: 0,
            finish_reason: Some(done.finish_reason.into()),
            logprobs: None,
        }],
        usage: Some(done.usage),
    })
    .into_response())
}

struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    echo: Option<String>,
}

impl CompletionFormat {
    fn chunk(&self, text: &str, finish: Option<&str>) -> Bytes {
        sse::data_event(&json!({
            "id": self.id,
            "object": COMPLETION_OBJECT,
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text, "index": 0, "finish_reason": finish, "logprobs": null}],
        }))
    }
}

impl ChunkFormat for CompletionFormat {
    fn opening(&self) -> Option<Bytes> {
        self.echo.as_deref().map(|t| self.chunk(t, None))
    }

    fn text(&self, text: &str) -> Bytes {
        self.chunk(text, None)
    }

    fn finish(&self, reason: &str) -> Bytes {
        self.chunk("", Some(reason))
    }

    fn usage(&self, usage: Usage) -> Bytes {
        sse::data_event(&json!({
            "id": self.id,
            "object": COMPLETION_OBJECT,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        }))
    }
}
