//! `POST /v1/embeddings` on the engine: check the request strictly (an
//! embedding request has few fields, and a silently ignored one, such as
//! `dimensions`, would hand back vectors of a shape the client did not ask
//! for), tokenize, refuse any input over the model's window as OpenAI does
//! (400, never truncated), embed the whole list, answer floats or base64.

use super::params::engine_error;
use super::EngineState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use helexa_api::embeddings::{
    Embedding, EmbeddingInput, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage,
    EmbeddingVector, EncodingFormat, EMBEDDING_OBJECT, LIST_OBJECT,
};
use helexa_api::{ApiError, ApiJson, ErrorCode};
use helexa_engine::{Embedder, EngineError};
use serde_json::Value;
use std::sync::Arc;

pub async fn embeddings(
    State(st): State<Arc<EngineState>>,
    ApiJson(req): ApiJson<EmbeddingRequest>,
) -> Response {
    super::respond(handle(st, req).await, "embeddings")
}

/// Every field besides the four known ones is refused by name.
fn refuse_unknown(req: &EmbeddingRequest) -> Result<(), ApiError> {
    let mut names: Vec<&str> = req.extra.keys().map(String::as_str).collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort_unstable();
    Err(ApiError::invalid_request(
        format!(
            "unknown field{} {} in an embeddings request (known: model, input, encoding_format, dimensions, user)",
            if names.len() > 1 { "s" } else { "" },
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        names[0],
    ))
}

/// `dimensions`: this model has one size; asking for exactly it is
/// honoured, anything else refused (the model cannot shorten its vectors).
fn check_dimensions(v: Option<&Value>, native: usize) -> Result<(), ApiError> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(d) if d.as_u64() == Some(native as u64) => Ok(()),
        Some(d) => Err(ApiError::invalid_request(
            format!(
                "`dimensions` is not supported by this model: it always returns {native}-dimensional vectors, got `dimensions` {d}"
            ),
            "dimensions",
        )),
    }
}

fn check_user(v: Option<&Value>) -> Result<(), ApiError> {
    match v {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(other) => Err(ApiError::invalid_request(
            format!("`user` must be a string, got {other}"),
            "user",
        )),
    }
}

/// Token ids per input, each checked against the window and vocabulary.
fn tokenize(embedder: &Embedder, input: EmbeddingInput) -> Result<Vec<Vec<u32>>, ApiError> {
    let from_text = matches!(input, EmbeddingInput::Texts(_));
    let seqs: Vec<Vec<u32>> = match input {
        EmbeddingInput::Texts(texts) => texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                embedder.tokenize(t).map_err(|e| {
                    ApiError::invalid_request(
                        format!("cannot tokenize `input[{i}]`: {e}"),
                        format!("input[{i}]"),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        EmbeddingInput::Tokens(seqs) => seqs,
    };
    let meta = embedder.meta();
    for (i, ids) in seqs.iter().enumerate() {
        match embedder.check(ids) {
            Ok(()) => {}
            Err(EngineError::ContextLength { max, prompt, .. }) => {
                return Err(ApiError::new(
                    ErrorCode::ContextLengthExceeded,
                    format!(
                        "This model's maximum context length is {max} tokens. However, `input[{i}]` has {prompt} tokens{}. Please reduce the length of the input.",
                        if from_text { " (with its [CLS] and [SEP] tokens)" } else { "" }
                    ),
                )
                .with_param(format!("input[{i}]"))
                .with_extra("max", max)
                .with_extra("prompt_tokens", prompt)
                .with_extra("index", i));
            }
            Err(e) => {
                let which = ids
                    .iter()
                    .position(|&t| t as usize >= meta.vocab_size)
                    .map_or(format!("input[{i}]"), |j| format!("input[{i}][{j}]"));
                return Err(ApiError::invalid_request(
                    e.to_string()
                        .trim_start_matches("invalid request: ")
                        .to_string(),
                    which,
                ));
            }
        }
    }
    Ok(seqs)
}

/// Little-endian f32 bytes in standard padded base64, as OpenAI sends them.
fn base64_vector(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn handle(st: Arc<EngineState>, req: EmbeddingRequest) -> Result<Response, ApiError> {
    let embedder = st.embedder()?.clone();
    refuse_unknown(&req)?;
    check_dimensions(req.dimensions.as_ref(), embedder.meta().dimensions)?;
    check_user(req.user.as_ref())?;
    let format = EncodingFormat::parse(req.encoding_format.as_ref())?;
    let input = EmbeddingInput::parse(req.input.as_ref())?;
    if input.len() > st.max_inputs {
        return Err(ApiError::invalid_request(
            format!(
                "`input` holds {} inputs; this model takes at most {} per request (max_inputs)",
                input.len(),
                st.max_inputs
            ),
            "input",
        ));
    }
    // Tokenizing thousands of texts is CPU work: off the async workers.
    let tokenizer = embedder.clone();
    let seqs = tokio::task::spawn_blocking(move || tokenize(&tokenizer, input))
        .await
        .map_err(|e| {
            ApiError::new(ErrorCode::InternalError, format!("tokenizing failed: {e}"))
        })??;
    let prompt_tokens: usize = seqs.iter().map(Vec::len).sum();
    let vectors = embedder.embed(seqs).await.map_err(engine_error)?;
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| Embedding {
            object: EMBEDDING_OBJECT.into(),
            index: i as u32,
            embedding: match format {
                EncodingFormat::Float => EmbeddingVector::Float(v),
                EncodingFormat::Base64 => EmbeddingVector::Base64(base64_vector(&v)),
            },
        })
        .collect();
    let tokens = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
    Ok(axum::Json(EmbeddingResponse {
        object: LIST_OBJECT.into(),
        data,
        model: st.id.clone(),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_is_little_endian_f32() {
        // 1.0f32 = 0x3f800000 → bytes 00 00 80 3f.
        assert_eq!(base64_vector(&[1.0]), "AACAPw==");
        assert_eq!(base64_vector(&[]), "");
    }

    #[test]
    fn dimensions_only_as_the_model_has_them() {
        assert!(check_dimensions(None, 384).is_ok());
        assert!(check_dimensions(Some(&json!(384)), 384).is_ok());
        for bad in [json!(383), json!(0), json!("384"), json!(-1)] {
            let e = check_dimensions(Some(&bad), 384).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("dimensions"), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_named() {
        let req: EmbeddingRequest =
            serde_json::from_value(json!({"model": "m", "input": "a", "zeta": 1, "alpha": 2}))
                .unwrap();
        let e = refuse_unknown(&req).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("alpha"));
        assert!(e.message.contains("`alpha`, `zeta`"), "{}", e.message);
        let ok: EmbeddingRequest =
            serde_json::from_value(json!({"model": "m", "input": "a", "user": "u"})).unwrap();
        assert!(refuse_unknown(&ok).is_ok());
        assert!(check_user(Some(&json!(5))).is_err());
    }
}
