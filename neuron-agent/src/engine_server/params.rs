//! Request validation for the engine: OpenAI sampling fields to
//! `SamplingParams`, output budgets against the context, engine errors to
//! the error envelope. Kept apart from the handlers so both APIs share it.

use helexa_api::chat::SamplingFields;
use helexa_api::{ApiError, ErrorCode};
use helexa_engine::{EngineError, SamplingParams};

/// Most stop strings one request may carry.
pub const MAX_STOP_STRINGS: usize = 16;

fn check_range(value: Option<f32>, name: &str, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match value {
        Some(v) if !v.is_finite() || v < lo || v > hi => Err(ApiError::invalid_request(
            format!("`{name}` must be between {lo} and {hi}, got {v}"),
            name,
        )),
        other => Ok(other),
    }
}

/// OpenAI sampling fields → engine sampling settings, with range checks.
pub fn sampling_params(f: &SamplingFields) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let temperature = check_range(f.temperature, "temperature", 0.0, 2.0)?;
    let top_p = check_range(f.top_p, "top_p", 0.0, 1.0)?;
    let min_p = check_range(f.min_p, "min_p", 0.0, 1.0)?;
    let frequency_penalty = check_range(f.frequency_penalty, "frequency_penalty", -2.0, 2.0)?;
    let presence_penalty = check_range(f.presence_penalty, "presence_penalty", -2.0, 2.0)?;
    let repetition_penalty = check_range(f.repetition_penalty, "repetition_penalty", 0.01, 10.0)?;
    if top_p == Some(0.0) {
        return Err(ApiError::invalid_request(
            "`top_p` must be greater than 0",
            "top_p",
        ));
    }
    Ok(SamplingParams {
        temperature: temperature.unwrap_or(d.temperature),
        top_p: top_p.unwrap_or(d.top_p),
        top_k: f.top_k.map(|k| k as usize).unwrap_or(d.top_k),
        min_p: min_p.unwrap_or(d.min_p),
        seed: f.seed,
        repetition_penalty: repetition_penalty.unwrap_or(d.repetition_penalty),
        frequency_penalty: frequency_penalty.unwrap_or(d.frequency_penalty),
        presence_penalty: presence_penalty.unwrap_or(d.presence_penalty),
    })
}

/// The request's stop strings, checked.
pub fn stop_strings(f: &SamplingFields) -> Result<Vec<String>, ApiError> {
    let stops: Vec<String> = f
        .stop
        .as_ref()
        .map(|s| s.to_vec())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_request(
            format!(
                "at most {MAX_STOP_STRINGS} stop strings are allowed, got {}",
                stops.len()
            ),
            "stop",
        ));
    }
    Ok(stops)
}

/// `n` other than 1 is refused: one choice per request.
pub fn check_n(n: Option<u32>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(other) => Err(ApiError::invalid_request(
            format!("only n=1 is supported, got n={other}"),
            "n",
        )),
    }
}

/// How many tokens to generate: the request's cap, checked against the
/// context, or what is left of the context up to the default output cap.
pub fn output_budget(
    context: usize,
    prompt_tokens: usize,
    requested: Option<u32>,
    default_max_output: usize,
) -> Result<usize, ApiError> {
    if prompt_tokens == 0 {
        return Err(ApiError::invalid_request("the prompt is empty", "messages"));
    }
    match requested {
        Some(0) => Err(ApiError::invalid_request(
            "`max_tokens` must be at least 1",
            "max_tokens",
        )),
        Some(n) => {
            let n = n as usize;
            if prompt_tokens + n > context {
                Err(ApiError::context_length_exceeded(
                    context as u64,
                    prompt_tokens as u64,
                    n as u64,
                    "prompt_tokens",
                ))
            } else {
                Ok(n)
            }
        }
        None => {
            if prompt_tokens >= context {
                Err(ApiError::context_length_exceeded(
                    context as u64,
                    prompt_tokens as u64,
                    0,
                    "prompt_tokens",
                ))
            } else {
                Ok((context - prompt_tokens).min(default_max_output))
            }
        }
    }
}

/// Engine errors as the client sees them.
pub fn engine_error(err: EngineError) -> ApiError {
    match err {
        EngineError::ContextLength {
            max,
            prompt,
            requested,
        } => ApiError::context_length_exceeded(
            max as u64,
            prompt as u64,
            requested as u64,
            "prompt_tokens",
        ),
        EngineError::Template(msg) => ApiError::invalid_request(
            format!("the chat template could not render these messages: {msg}"),
            "messages",
        ),
        EngineError::Tokenizer(msg) => {
            ApiError::invalid_request(format!("cannot tokenize the prompt: {msg}"), "messages")
        }
        EngineError::InvalidRequest(msg) => ApiError::new(ErrorCode::InvalidRequest, msg),
        EngineError::Shutdown => {
            ApiError::new(ErrorCode::ShuttingDown, "the engine is shutting down")
        }
        other => ApiError::new(ErrorCode::InternalError, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets() {
        assert_eq!(output_budget(100, 10, Some(20), 50).unwrap(), 20);
        assert_eq!(output_budget(100, 90, None, 50).unwrap(), 10);
        assert_eq!(output_budget(100, 10, None, 50).unwrap(), 50);
        let e = output_budget(100, 90, Some(20), 50).unwrap_err();
        assert_eq!(e.code, ErrorCode::ContextLengthExceeded);
        assert!(e
            .message
            .starts_with("This model's maximum context length is 100 tokens."));
        assert_eq!(e.extras["prompt_tokens"], 90);
        assert_eq!(
            output_budget(100, 100, None, 50).unwrap_err().code,
            ErrorCode::ContextLengthExceeded
        );
        assert_eq!(
            output_budget(100, 0, None, 50).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn ranges() {
        let f = SamplingFields {
            temperature: Some(3.0),
            ..Default::default()
        };
        assert_eq!(
            sampling_params(&f).unwrap_err().param.as_deref(),
            Some("temperature")
        );
        let f = SamplingFields {
            temperature: Some(0.0),
            top_k: Some(5),
            seed: Some(7),
            ..Default::default()
        };
        let p = sampling_params(&f).unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_k, 5);
        assert_eq!(p.seed, Some(7));
        assert!(check_n(Some(2)).is_err());
        assert!(check_n(Some(1)).is_ok());
    }
}
