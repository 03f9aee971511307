//! `POST /v1/completions` (legacy text completions) shapes.

use crate::chat::{SamplingFields, StreamOptions, Usage};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    #[serde(default)]
    pub prompt: PromptInput,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// Log-probabilities of each output token and this many alternatives (0–5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `prompt`: a string, strings, token ids, or batches of token ids.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

impl Default for PromptInput {
    fn default() -> Self {
        PromptInput::Text(String::new())
    }
}

impl PromptInput {
    /// Total characters of text prompts (for estimates); 0 for token prompts.
    pub fn char_len(&self) -> usize {
        match self {
            PromptInput::Text(s) => s.chars().count(),
            PromptInput::Texts(v) => v.iter().map(|s| s.chars().count()).sum(),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    pub finish_reason: Option<String>,
    /// The stop string that ended the choice (vLLM's field); `null` when
    /// none did. Absent in answers of servers that do not report it.
    #[serde(default)]
    pub stop_reason: Option<String>,
    #[serde(default)]
    pub logprobs: Option<Value>,
}

pub const COMPLETION_OBJECT: &str = "text_completion";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_forms() {
        let r: CompletionRequest = serde_json::from_str(r#"{"model":"m","prompt":"abc"}"#).unwrap();
        assert_eq!(r.prompt, PromptInput::Text("abc".into()));
        let r: CompletionRequest =
            serde_json::from_str(r#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(r.prompt, PromptInput::Tokens(vec![1, 2, 3]));
        let r: CompletionRequest =
            serde_json::from_str(r#"{"model":"m","prompt":["a","bc"]}"#).unwrap();
        assert_eq!(r.prompt.char_len(), 3);
    }
}
