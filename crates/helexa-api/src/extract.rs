//! Request-body extraction that answers in the error envelope.
//!
//! axum's own `Json` rejects with plain-text bodies; every helexa route uses
//! `ApiJson` (or `parse_json` on raw bytes) so that malformed JSON, a wrong
//! content type or an over-limit body gets the docs/protocol.md §2 envelope.

use crate::error::{ApiError, ErrorCode};
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header;
use serde::de::DeserializeOwned;

/// A JSON body whose rejections are OpenAI-style errors.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

/// Checks the content type: `application/json` (any parameters) or
/// `application/*+json`. A missing content type is accepted as JSON, since
/// many hand-written clients omit it; any other explicit type is refused.
pub fn check_content_type(headers: &http::HeaderMap) -> Result<(), ApiError> {
    check_content_type_value(headers.get(header::CONTENT_TYPE))
}

/// [`check_content_type`] for the `Content-Type` value alone.
pub fn check_content_type_value(value: Option<&http::HeaderValue>) -> Result<(), ApiError> {
    let Some(value) = value else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("");
    let mime = text.split(';').next().unwrap_or("").trim().as_bytes();
    let starts = |p: &[u8]| mime.len() >= p.len() && mime[..p.len()].eq_ignore_ascii_case(p);
    let ends =
        |p: &[u8]| mime.len() >= p.len() && mime[mime.len() - p.len()..].eq_ignore_ascii_case(p);
    if mime.eq_ignore_ascii_case(b"application/json") || (starts(b"application/") && ends(b"+json"))
    {
        Ok(())
    } else {
        let text = text.to_ascii_lowercase();
        Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("Content-Type must be application/json, got `{text}`"),
        ))
    }
}

/// Reads the whole body, mapping a body-limit failure to `413`.
pub async fn read_body(req: Request, limit_hint: Option<usize>) -> Result<Bytes, ApiError> {
    match Bytes::from_request(req, &()).await {
        Ok(b) => Ok(b),
        Err(rejection) => {
            if rejection.status() == http::StatusCode::PAYLOAD_TOO_LARGE {
                let msg = match limit_hint {
                    Some(n) => format!("request body is larger than the limit of {n} bytes"),
                    None => "request body is larger than the configured limit".to_string(),
                };
                Err(ApiError::new(ErrorCode::RequestTooLarge, msg))
            } else {
                Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("could not read the request body: {rejection}"),
                ))
            }
        }
    }
}

/// Parses JSON bytes into `T`: syntax errors are `invalid_json` (with the
/// position), shape errors `invalid_request` with `param` naming the field,
/// and a missing `model` is `missing_model`.
pub fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    // The common case, valid input, without the cost of tracking the path;
    // only a failure is parsed again to say where.
    if let Ok(v) = serde_json::from_slice(bytes) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            use serde_json::error::Category;
            match inner.classify() {
                Category::Syntax | Category::Eof | Category::Io => Err(ApiError::new(
                    ErrorCode::InvalidJson,
                    format!("request body is not valid JSON: {inner}"),
                )),
                Category::Data => {
                    let text = inner.to_string();
                    if text.starts_with("missing field `model`") && (path == "." || path.is_empty())
                    {
                        return Err(ApiError::missing_model());
                    }
                    let param = if path == "." || path.is_empty() {
                        // serde names the missing field in the message.
                        text.split('`').nth(1).unwrap_or("body").to_string()
                    } else {
                        path
                    };
                    Err(ApiError::invalid_request(
                        format!("invalid request: {text}"),
                        param,
                    ))
                }
            }
        }
    }
}

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        check_content_type(req.headers()).map_err(IntoResponse::into_response)?;
        let bytes = read_body(req, None)
            .await
            .map_err(IntoResponse::into_response)?;
        parse_json(&bytes)
            .map(ApiJson)
            .map_err(IntoResponse::into_response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Req {
        model: String,
        #[serde(default)]
        max_tokens: Option<u32>,
    }

    #[test]
    fn syntax_error_is_invalid_json_with_position() {
        let e = parse_json::<Req>(b"{\"model\": ").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        assert!(e.message.contains("line 1"), "{}", e.message);
    }

    #[test]
    fn missing_model_is_its_own_code() {
        let e = parse_json::<Req>(b"{}").unwrap_err();
        assert_eq!(e.code, ErrorCode::MissingModel);
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = parse_json::<Req>(br#"{"model":"m","max_tokens":"many"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn content_type_rules() {
        let mut h = http::HeaderMap::new();
        assert!(check_content_type(&h).is_ok());
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(check_content_type(&h).is_ok());
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(
            check_content_type(&h).unwrap_err().code,
            ErrorCode::UnsupportedMediaType
        );
    }
}
