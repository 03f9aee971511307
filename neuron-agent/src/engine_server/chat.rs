//! `POST /v1/chat/completions` on the engine: render the model's chat
//! template, count the prompt exactly, generate, answer whole or streamed.

use super::params::{check_n, engine_error, output_budget, sampling_params, stop_strings};
use super::stream::{collect, sse_body, sse_response, ChunkFormat};
use super::EngineState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use helexa_api::chat::{
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChunkChoice,
    Delta, ResponseMessage, Usage, CHAT_CHUNK_OBJECT, CHAT_OBJECT,
};
use helexa_api::{sse, ApiError, ApiJson};
use helexa_engine::GenerationRequest;
use std::sync::Arc;

pub async fn chat_completions(
    State(st): State<Arc<EngineState>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Response {
    super::respond(handle(st, req).await, "chat")
}

async fn handle(st: Arc<EngineState>, req: ChatCompletionRequest) -> Result<Response, ApiError> {
    let engine = st.engine()?.clone();
    check_n(req.n)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_request(
            "`messages` must contain at least one message",
            "messages",
        ));
    }
    let params = sampling_params(&req.sampling)?;
    let stop = stop_strings(&req.sampling)?;
    // Rendering and tokenizing a long prompt takes milliseconds: off the runtime.
    let (messages, tools) = (req.messages.clone(), req.tools.clone());
    let tok_engine = engine.clone();
    let prompt = tokio::task::spawn_blocking(move || {
        let text = tok_engine.render_chat(&messages, tools.as_deref(), true)?;
        tok_engine.tokenize(&text, add_bos(&tok_engine, &text))
    })
    .await
    .map_err(|e| ApiError::new(helexa_api::ErrorCode::InternalError, e.to_string()))?
    .map_err(engine_error)?;
    let max_new_tokens = output_budget(
        engine.meta().context_length,
        prompt.len(),
        req.requested_output(),
        st.default_max_output(),
    )?;
    let gen = engine
        .submit(GenerationRequest {
            prompt,
            params,
            max_new_tokens,
            stop,
        })
        .map_err(engine_error)?;
    let format = ChatFormat {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: super::unix_now(),
        model: req.model.clone(),
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
    Ok(axum::Json(ChatCompletionResponse {
        id: format.id,
        object: CHAT_OBJECT.into(),
        created: format.created,
        model: format.model,
        choices: vec![ChatChoice {
            index: 0,
            message: ResponseMessage {
                role: "assistant".into(),
                content: Some(done.text),
                tool_calls: None,
            },
            finish_reason: Some(done.finish_reason.into()),
            logprobs: None,
        }],
        usage: done.usage,
        system_fingerprint: None,
    })
    .into_response())
}

/// Add BOS only when the model wants one and the template did not write it.
fn add_bos(engine: &helexa_engine::Engine, text: &str) -> bool {
    match engine.meta().bos_token.as_deref() {
        Some(bos) if !bos.is_empty() => !text.starts_with(bos),
        _ => true,
    }
}

struct ChatFormat {
    id: String,
    created: u64,
    model: String,
}

impl ChatFormat {
    fn chunk(&self, delta: Delta, finish: Option<&str>) -> Bytes {
        sse::data_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: CHAT_CHUNK_OBJECT.into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish.map(str::to_string),
                logprobs: None,
            }],
            usage: None,
        })
    }
}

impl ChunkFormat for ChatFormat {
    fn opening(&self) -> Option<Bytes> {
        Some(self.chunk(
            Delta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            },
            None,
        ))
    }

    fn text(&self, text: &str) -> Bytes {
        self.chunk(
            Delta {
                role: None,
                content: Some(text.to_string()),
            },
            None,
        )
    }

    fn finish(&self, reason: &str) -> Bytes {
        self.chunk(Delta::default(), Some(reason))
    }

    fn usage(&self, usage: Usage) -> Bytes {
        sse::data_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: CHAT_CHUNK_OBJECT.into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![],
            usage: Some(usage),
        })
    }
}
