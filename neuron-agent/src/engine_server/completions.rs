//! `POST /v1/completions` on the engine: a raw prompt (text or token ids),
//! no chat template; optional `echo` of the prompt, `n` choices,
//! `logprobs`, and `response_format` as on chat.

use super::params::{
    check_n, choice_params, engine_error, output_budget, refuse_unsupported, sampling_params,
    stop_strings, MAX_LOGPROBS_COMPLETIONS,
};
use super::stream::{collect, sse_body, sse_response, ChunkFormat};
use super::{logprobs, structured, EngineState};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use helexa_api::chat::Usage;
use helexa_api::completions::{
    CompletionChoice, CompletionRequest, CompletionResponse, PromptInput, COMPLETION_OBJECT,
};
use helexa_api::{sse, ApiError, ApiJson, ErrorCode};
use helexa_engine::{Engine, GenerationRequest, TokenLogprob};
use serde_json::{json, Value};
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

/// `logprobs`: alternatives per token, 0..=5.
fn logprobs_request(req: &CompletionRequest) -> Result<Option<usize>, ApiError> {
    match req.logprobs {
        None => Ok(None),
        Some(k) if k > MAX_LOGPROBS_COMPLETIONS => Err(ApiError::invalid_request(
            format!("`logprobs` must be between 0 and {MAX_LOGPROBS_COMPLETIONS}, got {k}"),
            "logprobs",
        )),
        Some(_) if req.echo == Some(true) => Err(ApiError::invalid_request(
            "`logprobs` with `echo` would need the prompt's log-probabilities, which this engine does not compute",
            "logprobs",
        )),
        Some(k) => Ok(Some(k as usize)),
    }
}

async fn handle(st: Arc<EngineState>, req: CompletionRequest) -> Result<Response, ApiError> {
    let engine = st.engine("completions", "/v1/completions")?.clone();
    let n = check_n(req.n)?;
    refuse_unsupported(&req.extra, &["best_of"]).or_else(|e| {
        // `best_of` equal to `n` is what we do anyway.
        match req.extra.get("best_of").and_then(|v| v.as_u64()) {
            Some(b) if b as usize == n => Ok(()),
            _ => Err(e),
        }
    })?;
    let logprobs = logprobs_request(&req)?;
    let constraint = match structured::grammar(req.extra.get("response_format"))? {
        Some(g) => Some(structured::compile(&engine, g, "response_format").await?),
        None => None,
    };
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_request(
            "`suffix` (fill-in-the-middle) is not supported by this model",
            "suffix",
        ));
    }
    let params = sampling_params(
        &req.sampling,
        engine.meta().vocab_size,
        &engine.meta().generation_defaults,
    )?;
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
    let mut gens = Vec::with_capacity(n);
    for i in 0..n {
        gens.push(
            engine
                .submit(GenerationRequest {
                    prompt: prompt.clone(),
                    params: choice_params(&params, i),
                    max_new_tokens,
                    stop: stop.clone(),
                    constraint: constraint.clone(),
                    logprobs,
                })
                .map_err(engine_error)?,
        );
    }
    let echo = req.echo.unwrap_or(false);
    let format = CompletionFormat {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: super::unix_now(),
        model: req.model.clone(),
        echo: echo.then(|| prompt_text.clone()),
        engine: engine.clone(),
        logprobs: logprobs.is_some(),
        offsets: vec![0; n],
    };
    if req.stream {
        let include_usage = req
            .stream_options
            .as_ref()
            .map(|o| o.include_usage)
            .unwrap_or(false);
        return Ok(sse_response(sse_body(
            gens,
            format,
            include_usage,
            st.keep_alive,
        )));
    }
    let done = collect(gens).await?;
    let choices = done
        .choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| CompletionChoice {
            text: if echo {
                format!("{prompt_text}{}", c.text)
            } else {
                c.text
            },
            index: i as u32,
            finish_reason: Some(c.finish_reason.into()),
            stop_reason: c.stop_reason,
            logprobs: format
                .logprobs
                .then(|| logprobs::completion_object(&engine, &c.logprobs, 0)),
        })
        .collect();
    Ok(axum::Json(CompletionResponse {
        id: format.id,
        object: COMPLETION_OBJECT.into(),
        created: format.created,
        model: format.model,
        choices,
        usage: Some(done.usage),
    })
    .into_response())
}

struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    echo: Option<String>,
    engine: Engine,
    logprobs: bool,
    /// Characters of each choice's text sent so far (`text_offset`).
    offsets: Vec<usize>,
}

impl CompletionFormat {
    fn chunk(&self, choice: usize, text: &str, finish: Option<&str>, lps: Value) -> Bytes {
        self.chunk_with(choice, text, finish, lps, None)
    }

    fn chunk_with(
        &self,
        choice: usize,
        text: &str,
        finish: Option<&str>,
        lps: Value,
        stop: Option<&str>,
    ) -> Bytes {
        sse::data_event(&json!({
            "id": self.id,
            "object": COMPLETION_OBJECT,
            "created": self.created,
            "model": self.model,
            "choices": [{
                "text": text,
                "index": choice,
                "finish_reason": finish,
                "stop_reason": stop,
                "logprobs": lps,
            }],
        }))
    }
}

impl ChunkFormat for CompletionFormat {
    fn opening(&mut self, choice: usize) -> Option<Bytes> {
        let echo = self.echo.clone()?;
        self.offsets[choice] += echo.chars().count();
        Some(self.chunk(choice, &echo, None, Value::Null))
    }

    fn text(&mut self, choice: usize, text: &str, lps: &[TokenLogprob]) -> Option<Bytes> {
        let lps = if self.logprobs {
            logprobs::completion_object(&self.engine, lps, self.offsets[choice])
        } else {
            Value::Null
        };
        self.offsets[choice] += text.chars().count();
        Some(self.chunk(choice, text, None, lps))
    }

    fn finish(&mut self, choice: usize, reason: &str, stop: Option<&str>) -> Bytes {
        self.chunk_with(choice, "", Some(reason), Value::Null, stop)
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
