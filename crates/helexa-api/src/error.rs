//! The error envelope every helexa HTTP error uses (docs/protocol.md §2).
//!
//! `ApiError` is both what handlers return and what clients parse; it carries
//! the status, the OpenAI `type`/`code`/`param`, optional extras (such as
//! `max` and `prompt_tokens`) and `Retry-After` for retryable errors.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The `code` values of docs/protocol.md §2, with their status and `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    InvalidRequest,
    MissingModel,
    ContextLengthExceeded,
    InvalidApiKey,
    ModelNotAllowed,
    ModelNotFound,
    RequestTooLarge,
    UnsupportedMediaType,
    RateLimitExceeded,
    UpstreamError,
    ModelBusy,
    ModelLoading,
    NoCapacity,
    ShuttingDown,
    UpstreamTimeout,
    /// `507`: the model does not fit the memory a node may give to models
    /// (docs/protocol.md §6); permanent until something is unloaded.
    InsufficientMemory,
    /// Not in the table: an engine-side failure after admission.
    InternalError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MissingModel => "missing_model",
            ErrorCode::ContextLengthExceeded => "context_length_exceeded",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::ModelNotAllowed => "model_not_allowed",
            ErrorCode::ModelNotFound => "model_not_found",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RateLimitExceeded => "rate_limit_exceeded",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::ModelBusy => "model_busy",
            ErrorCode::ModelLoading => "model_loading",
            ErrorCode::NoCapacity => "no_capacity",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::InsufficientMemory => "insufficient_memory",
            ErrorCode::InternalError => "internal_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::InvalidRequest
            | ErrorCode::MissingModel
            | ErrorCode::ContextLengthExceeded => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidApiKey => StatusCode::UNAUTHORIZED,
            ErrorCode::ModelNotAllowed => StatusCode::FORBIDDEN,
            ErrorCode::ModelNotFound => StatusCode::NOT_FOUND,
            ErrorCode::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::RateLimitExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::UpstreamError => StatusCode::BAD_GATEWAY,
            ErrorCode::ModelBusy
            | ErrorCode::ModelLoading
            | ErrorCode::NoCapacity
            | ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::InsufficientMemory => StatusCode::INSUFFICIENT_STORAGE,
            ErrorCode::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn error_type(self) -> &'static str {
        match self {
            ErrorCode::RateLimitExceeded | ErrorCode::ModelBusy => "rate_limit_error",
            ErrorCode::UpstreamError
            | ErrorCode::ModelLoading
            | ErrorCode::NoCapacity
            | ErrorCode::ShuttingDown
            | ErrorCode::UpstreamTimeout
            | ErrorCode::InsufficientMemory
            | ErrorCode::InternalError => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// Retryable errors always carry `Retry-After`; permanent ones never do.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimitExceeded
                | ErrorCode::ModelBusy
                | ErrorCode::ModelLoading
                | ErrorCode::NoCapacity
                | ErrorCode::ShuttingDown
        )
    }
}

/// The inner object of `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
    /// Extras such as `max`, `prompt_tokens`, `estimated_prompt_tokens`.
    #[serde(flatten)]
    pub extras: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

/// An error as a handler returns it: converts into the envelope response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub param: Option<String>,
    /// Boxed: with serde_json's `preserve_order` (turned on by llguidance)
    /// a map is an `IndexMap`, and `ApiError` would grow past clippy's
    /// `result_large_err` limit for every `Result<_, ApiError>`.
    pub extras: Box<Map<String, Value>>,
    /// Whole seconds; defaulted to 1 for retryable codes when unset.
    pub retry_after: Option<u64>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            param: None,
            extras: Box::default(),
            retry_after: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_extra(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extras.insert(key.to_string(), value.into());
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn invalid_request(message: impl Into<String>, param: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message).with_param(param)
    }

    pub fn missing_model() -> Self {
        Self::new(
            ErrorCode::MissingModel,
            "you must provide a model parameter",
        )
        .with_param("model")
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            ErrorCode::ModelNotFound,
            format!("The model `{model}` does not exist or is not available"),
        )
        .with_param("model")
    }

    /// `400 context_length_exceeded`, worded as OpenAI words it (litellm maps
    /// this sentence to `ContextWindowExceededError`). `count_key` is
    /// `prompt_tokens` for exact counts, `estimated_prompt_tokens` for cortex's.
    pub fn context_length_exceeded(
        max: u64,
        prompt_tokens: u64,
        requested_output: u64,
        count_key: &str,
    ) -> Self {
        let message = if requested_output > 0 {
            format!(
                "This model's maximum context length is {max} tokens. However, you requested {} tokens ({prompt_tokens} in the messages, {requested_output} in the completion). Please reduce the length of the messages or completion.",
                // u128: a client's max_tokens may be anything up to u64::MAX.
                prompt_tokens as u128 + requested_output as u128
            )
        } else {
            format!(
                "This model's maximum context length is {max} tokens. However, your messages resulted in {prompt_tokens} tokens. Please reduce the length of the messages."
            )
        };
        Self::new(ErrorCode::ContextLengthExceeded, message)
            .with_param("messages")
            .with_extra("max", max)
            .with_extra(count_key, prompt_tokens)
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn body(&self) -> ErrorEnvelope {
        ErrorEnvelope {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.code.error_type().to_string(),
                code: Some(self.code.as_str().to_string()),
                param: self.param.clone(),
                extras: (*self.extras).clone(),
            },
        }
    }

    /// The JSON text of the envelope.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.body()).expect("error envelope serialises")
    }

    /// The `Retry-After` value this error is sent with, if any.
    pub fn effective_retry_after(&self) -> Option<u64> {
        if self.code.retryable() {
            Some(self.retry_after.unwrap_or(1).max(1))
        } else {
            None
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), self.to_json()).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.effective_retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_error_has_litellm_wording_and_extras() {
        let e = ApiError::context_length_exceeded(8192, 9000, 0, "prompt_tokens");
        assert!(e
            .message
            .starts_with("This model's maximum context length is 8192 tokens."));
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["max"], 8192);
        assert_eq!(v["error"]["prompt_tokens"], 9000);
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.effective_retry_after(), None);
    }

    #[test]
    fn retryable_errors_carry_retry_after() {
        let resp = ApiError::new(ErrorCode::ModelBusy, "busy").into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let resp = ApiError::new(ErrorCode::ModelNotFound, "x").into_response();
        assert!(resp.headers().get(header::RETRY_AFTER).is_none());
        let resp = ApiError::new(ErrorCode::NoCapacity, "x")
            .with_retry_after(7)
            .into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
    }

    #[test]
    fn envelope_parses_back() {
        let text = ApiError::model_not_found("m").to_json();
        let env: ErrorEnvelope = serde_json::from_str(&text).unwrap();
        assert_eq!(env.error.code.as_deref(), Some("model_not_found"));
        assert_eq!(env.error.param.as_deref(), Some("model"));
    }
}
