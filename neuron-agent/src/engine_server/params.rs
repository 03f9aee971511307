//! Request validation for the engine: OpenAI sampling fields to
//! `SamplingParams`, output budgets against the context, engine errors to
//! the error envelope. Kept apart from the handlers so both APIs share it.

use helexa_api::chat::SamplingFields;
use helexa_api::{ApiError, ErrorCode};
use helexa_engine::gendefaults::GenerationDefaults;
use helexa_engine::{EngineError, SamplingParams};

/// Most stop strings one request may carry.
pub const MAX_STOP_STRINGS: usize = 16;
/// Most choices (`n`) one request may ask for.
pub const MAX_N: u32 = 16;
/// Most `logit_bias` entries (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// `top_logprobs` of chat, `logprobs` of completions: OpenAI's limits.
pub const MAX_TOP_LOGPROBS_CHAT: u32 = 20;
pub const MAX_LOGPROBS_COMPLETIONS: u32 = 5;

fn check_range(value: Option<f32>, name: &str, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match value {
        Some(v) if !v.is_finite() || v < lo || v > hi => Err(ApiError::invalid_request(
            format!("`{name}` must be between {lo} and {hi}, got {v}"),
            name,
        )),
        other => Ok(other),
    }
}

/// `logit_bias`: token id keys inside the vocabulary, biases in -100..100.
pub fn logit_bias(
    map: Option<&serde_json::Map<String, serde_json::Value>>,
    vocab: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = map else {
        return Ok(Vec::new());
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid_request(
            format!(
                "`logit_bias` may hold at most {MAX_LOGIT_BIAS} entries, got {}",
                map.len()
            ),
            "logit_bias",
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (key, value) in map {
        let id = key
            .parse::<u32>()
            .ok()
            .filter(|&id| (id as usize) < vocab)
            .ok_or_else(|| {
                ApiError::invalid_request(
                    format!(
                        "`logit_bias` keys must be token ids below the vocabulary size {vocab}, got {key:?}"
                    ),
                    "logit_bias",
                )
            })?;
        let bias = value
            .as_f64()
            .filter(|b| b.is_finite() && (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                ApiError::invalid_request(
                    format!(
                        "`logit_bias[{key}]` must be a number between -100 and 100, got {value}"
                    ),
                    "logit_bias",
                )
            })?;
        out.push((id, bias as f32));
    }
    Ok(out)
}

/// OpenAI sampling fields → engine sampling settings, with range checks.
/// `vocab` bounds the token ids of `logit_bias`; `model` supplies the
/// model's own defaults (`generation_config.json`, GGUF metadata) for the
/// fields the request leaves out, before the API's defaults.
pub fn sampling_params(
    f: &SamplingFields,
    vocab: usize,
    model: &GenerationDefaults,
) -> Result<SamplingParams, ApiError> {
    let api = SamplingParams::default();
    let d = SamplingParams {
        temperature: model.temperature.unwrap_or(api.temperature),
        top_p: model.top_p.unwrap_or(api.top_p),
        top_k: model.top_k.unwrap_or(api.top_k),
        min_p: model.min_p.unwrap_or(api.min_p),
        repetition_penalty: model.repetition_penalty.unwrap_or(api.repetition_penalty),
        ..api
    };
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
        logit_bias: logit_bias(f.logit_bias.as_ref(), vocab)?,
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

/// `n`: how many choices, 1..=MAX_N (default 1).
pub fn check_n(n: Option<u32>) -> Result<usize, ApiError> {
    match n {
        None => Ok(1),
        Some(k) if (1..=MAX_N).contains(&k) => Ok(k as usize),
        Some(other) => Err(ApiError::invalid_request(
            format!("`n` must be between 1 and {MAX_N}, got {other}"),
            "n",
        )),
    }
}

/// Seed of choice `i` of `n`: distinct per choice, reproducible when set.
pub fn choice_params(params: &SamplingParams, i: usize) -> SamplingParams {
    let mut p = params.clone();
    p.seed = p.seed.map(|s| s.wrapping_add(i as u64));
    p
}

/// Fields of the OpenAI API this engine does not implement, refused by name
/// rather than ignored. (Unknown extension fields are still passed over.)
pub fn refuse_unsupported(
    extra: &serde_json::Map<String, serde_json::Value>,
    names: &[&str],
) -> Result<(), ApiError> {
    for name in names {
        if extra.get(*name).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid_request(
                format!("`{name}` is not supported by this server"),
                *name,
            ));
        }
    }
    Ok(())
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
            sampling_params(&f, 10, &GenerationDefaults::default())
                .unwrap_err()
                .param
                .as_deref(),
            Some("temperature")
        );
        let f = SamplingFields {
            temperature: Some(0.0),
            top_k: Some(5),
            seed: Some(7),
            ..Default::default()
        };
        let p = sampling_params(&f, 10, &GenerationDefaults::default()).unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_k, 5);
        assert_eq!(p.seed, Some(7));
        assert_eq!(check_n(None).unwrap(), 1);
        assert_eq!(check_n(Some(1)).unwrap(), 1);
        assert_eq!(check_n(Some(MAX_N)).unwrap(), MAX_N as usize);
        assert_eq!(check_n(Some(0)).unwrap_err().param.as_deref(), Some("n"));
        assert_eq!(
            check_n(Some(MAX_N + 1)).unwrap_err().param.as_deref(),
            Some("n")
        );
    }

    /// Each range rule at its edges: the edge accepted, just outside refused.
    #[test]
    fn penalty_edges() {
        for name in ["frequency_penalty", "presence_penalty"] {
            let with = |v: f32| {
                let mut f = SamplingFields::default();
                match name {
                    "frequency_penalty" => f.frequency_penalty = Some(v),
                    _ => f.presence_penalty = Some(v),
                }
                sampling_params(&f, 10, &GenerationDefaults::default())
            };
            for ok in [-2.0, 2.0, 0.0] {
                assert!(with(ok).is_ok(), "{name}={ok}");
            }
            for bad in [-2.001, 2.001, f32::NAN] {
                assert_eq!(
                    with(bad).unwrap_err().param.as_deref(),
                    Some(name),
                    "{name}={bad}"
                );
            }
        }
        let f = SamplingFields {
            frequency_penalty: Some(-2.0),
            presence_penalty: Some(2.0),
            ..Default::default()
        };
        let p = sampling_params(&f, 10, &GenerationDefaults::default()).unwrap();
        assert_eq!((p.frequency_penalty, p.presence_penalty), (-2.0, 2.0));
    }

    #[test]
    fn logit_bias_edges() {
        let map = |v: serde_json::Value| v.as_object().unwrap().clone();
        let mut ok = logit_bias(
            Some(&map(serde_json::json!({"0": -100, "9": 100, "3": 0.5}))),
            10,
        )
        .unwrap();
        ok.sort_by_key(|e| e.0);
        assert_eq!(ok, vec![(0, -100.0), (3, 0.5), (9, 100.0)]);
        for bad in [
            serde_json::json!({"1": 100.01}),
            serde_json::json!({"1": -100.01}),
            serde_json::json!({"1": "5"}),
            serde_json::json!({"10": 1}),
            serde_json::json!({"-1": 1}),
            serde_json::json!({"abc": 1}),
        ] {
            let e = logit_bias(Some(&map(bad.clone())), 10).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("logit_bias"), "{bad}");
        }
        let many: serde_json::Map<_, _> = (0..=MAX_LOGIT_BIAS)
            .map(|i| (i.to_string(), serde_json::json!(1)))
            .collect();
        assert!(logit_bias(Some(&many), 1000).is_err());
        let most: serde_json::Map<_, _> = (0..MAX_LOGIT_BIAS)
            .map(|i| (i.to_string(), serde_json::json!(1)))
            .collect();
        assert_eq!(logit_bias(Some(&most), 1000).unwrap().len(), MAX_LOGIT_BIAS);
    }
}
