//! `POST /v1/embeddings` shapes, and the one reading of `input` that every
//! helexa process shares.
//!
//! `input` is kept as raw JSON in the request so that a wrong shape gets an
//! error naming the exact element (`input[2][5]`), which serde's untagged
//! enums cannot say.

use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const EMBEDDING_OBJECT: &str = "embedding";
pub const LIST_OBJECT: &str = "list";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingRequest {
    pub model: String,
    /// A string, strings, token ids, or lists of token ids; see [`EmbeddingInput::parse`].
    #[serde(default)]
    pub input: Option<Value>,
    /// `float` (default) or `base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<Value>,
    /// Accepted and not used (OpenAI's abuse-monitoring tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What to embed: texts, or token id sequences used as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingInput {
    Texts(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

impl EmbeddingInput {
    /// Reads `input`: a string, a list of strings, a list of token ids (one
    /// input), or a list of lists of token ids. Empty input, an empty
    /// string, an empty token list, a mixed list or a token id that is not a
    /// non-negative 32-bit integer is refused with `param` naming the place.
    pub fn parse(input: Option<&Value>) -> Result<EmbeddingInput, ApiError> {
        let bad = |msg: String, param: String| Err(ApiError::invalid_request(msg, param));
        let items = match input {
            None | Some(Value::Null) => {
                return bad("`input` is required".into(), "input".into());
            }
            Some(Value::String(s)) => {
                if s.is_empty() {
                    return bad("`input` must not be an empty string".into(), "input".into());
                }
                return Ok(EmbeddingInput::Texts(vec![s.clone()]));
            }
            Some(Value::Array(items)) => items,
            Some(other) => {
                return bad(
                    format!(
                        "`input` must be a string, a list of strings, a list of token ids or a list of lists of token ids, got {}",
                        kind(other)
                    ),
                    "input".into(),
                )
            }
        };
        if items.is_empty() {
            return bad("`input` must not be an empty list".into(), "input".into());
        }
        match &items[0] {
            Value::String(_) => {
                let mut texts = Vec::with_capacity(items.len());
                for (i, it) in items.iter().enumerate() {
                    match it {
                        Value::String(s) if s.is_empty() => {
                            return bad(
                                format!("`input[{i}]` is an empty string"),
                                format!("input[{i}]"),
                            )
                        }
                        Value::String(s) => texts.push(s.clone()),
                        other => {
                            return bad(
                                format!(
                                    "`input` mixes strings with {}: every element must be a string",
                                    kind(other)
                                ),
                                format!("input[{i}]"),
                            )
                        }
                    }
                }
                Ok(EmbeddingInput::Texts(texts))
            }
            Value::Number(_) => Ok(EmbeddingInput::Tokens(vec![token_ids(items, "input")?])),
            Value::Array(_) => {
                let mut seqs = Vec::with_capacity(items.len());
                for (i, it) in items.iter().enumerate() {
                    let param = format!("input[{i}]");
                    match it {
                        Value::Array(ids) if ids.is_empty() => {
                            return bad(format!("`{param}` is an empty list of token ids"), param)
                        }
                        Value::Array(ids) => seqs.push(token_ids(ids, &param)?),
                        other => {
                            return bad(
                                format!(
                                    "`input` mixes lists of token ids with {}: every element must be a list of token ids",
                                    kind(other)
                                ),
                                param,
                            )
                        }
                    }
                }
                Ok(EmbeddingInput::Tokens(seqs))
            }
            other => bad(
                format!(
                    "`input` must hold strings, token ids or lists of token ids, got {}",
                    kind(other)
                ),
                "input[0]".into(),
            ),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            EmbeddingInput::Texts(t) => t.len(),
            EmbeddingInput::Tokens(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn token_ids(items: &[Value], param: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(j, v)| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    ApiError::invalid_request(
                        format!(
                            "`{param}[{j}]` must be a token id (a non-negative integer), got {v}"
                        ),
                        format!("{param}[{j}]"),
                    )
                })
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// How vectors are written in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncodingFormat {
    #[default]
    Float,
    /// Little-endian f32 bytes, base64 (standard alphabet, padded), as OpenAI.
    Base64,
}

impl EncodingFormat {
    pub fn parse(v: Option<&Value>) -> Result<EncodingFormat, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(EncodingFormat::Float),
            Some(Value::String(s)) if s == "float" => Ok(EncodingFormat::Float),
            Some(Value::String(s)) if s == "base64" => Ok(EncodingFormat::Base64),
            Some(other) => Err(ApiError::invalid_request(
                format!("`encoding_format` must be \"float\" or \"base64\", got {other}"),
                "encoding_format",
            )),
        }
    }
}

/// One vector: numbers, or the base64 of their little-endian f32 bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Embedding {
    pub object: String,
    pub index: u32,
    pub embedding: EmbeddingVector,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
}

/// The answer. `usage` is last on purpose: the neuron agent reads token
/// counts from the tail of a plain answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingResponse {
    pub object: String,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<EmbeddingInput, ApiError> {
        EmbeddingInput::parse(Some(&v))
    }

    #[test]
    fn every_input_form_is_read() {
        assert_eq!(
            parse(json!("a")).unwrap(),
            EmbeddingInput::Texts(vec!["a".into()])
        );
        assert_eq!(
            parse(json!(["a", "b"])).unwrap(),
            EmbeddingInput::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            parse(json!([101, 7, 102])).unwrap(),
            EmbeddingInput::Tokens(vec![vec![101, 7, 102]])
        );
        assert_eq!(
            parse(json!([[1], [2, 3]])).unwrap(),
            EmbeddingInput::Tokens(vec![vec![1], vec![2, 3]])
        );
    }

    #[test]
    fn bad_inputs_name_the_place() {
        let param = |v: Value| parse(v).unwrap_err().param.unwrap();
        assert_eq!(
            EmbeddingInput::parse(None).unwrap_err().param.unwrap(),
            "input"
        );
        assert_eq!(param(json!("")), "input");
        assert_eq!(param(json!([])), "input");
        assert_eq!(param(json!(["a", ""])), "input[1]");
        assert_eq!(param(json!(["a", 1])), "input[1]");
        assert_eq!(param(json!([[1], []])), "input[1]");
        assert_eq!(param(json!([[1], [2, -3]])), "input[1][1]");
        assert_eq!(param(json!([1, 2.5])), "input[1]");
        assert_eq!(param(json!([1, 4294967296u64])), "input[1]");
        assert_eq!(param(json!([[1], "a"])), "input[1]");
        assert_eq!(param(json!([{"a": 1}])), "input[0]");
        assert_eq!(param(json!(12)), "input");
        // The largest 32-bit id still parses (the model bounds it later).
        assert!(parse(json!([4294967295u64])).is_ok());
    }

    #[test]
    fn encoding_format_is_float_or_base64() {
        assert_eq!(EncodingFormat::parse(None).unwrap(), EncodingFormat::Float);
        assert_eq!(
            EncodingFormat::parse(Some(&json!("base64"))).unwrap(),
            EncodingFormat::Base64
        );
        let e = EncodingFormat::parse(Some(&json!("int8"))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("encoding_format"));
    }

    #[test]
    fn usage_is_the_last_field() {
        let r = EmbeddingResponse {
            object: LIST_OBJECT.into(),
            data: vec![Embedding {
                object: EMBEDDING_OBJECT.into(),
                index: 0,
                embedding: EmbeddingVector::Float(vec![0.5]),
            }],
            model: "m".into(),
            usage: EmbeddingUsage {
                prompt_tokens: 3,
                total_tokens: 3,
            },
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(
            text.ends_with(r#""usage":{"prompt_tokens":3,"total_tokens":3}}"#),
            "{text}"
        );
    }
}
