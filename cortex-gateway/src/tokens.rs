//! Counting prompt tokens: exactly with the model's own tokenizer when a
//! neuron serves it, else by the ~chars-per-token estimate.
//!
//! Each model's tokenizer is fetched once (single-flight) and cached; a 404
//! is remembered too, so a missing tokenizer costs one request per model.

use crate::config::ms;
use crate::state::Gateway;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokenizers::Tokenizer;
use tokio::sync::OnceCell;

type Cell = Arc<OnceCell<Option<Arc<ModelTokenizer>>>>;

/// A model's tokenizer and the longest token in its vocabulary, in
/// characters of the vocabulary's own spelling (never fewer than the
/// characters the token stands for: byte-level BPE spells each byte as one
/// character, SentencePiece a space as `▁`, WordPiece adds `##`), so that
/// the non-whitespace characters of a text over it bound the text's token
/// count from below (up to what a normalizer removes).
pub struct ModelTokenizer {
    pub tokenizer: Tokenizer,
    pub max_token_chars: usize,
}

impl ModelTokenizer {
    pub fn new(tokenizer: Tokenizer) -> Self {
        let max_token_chars = tokenizer
            .get_vocab(true)
            .keys()
            .map(|k| k.chars().count())
            .max()
            .unwrap_or(1)
            .max(1);
        ModelTokenizer {
            tokenizer,
            max_token_chars,
        }
    }
}

#[derive(Default)]
pub struct Tokenizers {
    cells: RwLock<HashMap<String, Cell>>,
}

impl Tokenizers {
    fn cell(&self, model: &str) -> Cell {
        if let Some(c) = self
            .cells
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
        {
            return c.clone();
        }
        self.cells
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(model.to_string())
            .or_default()
            .clone()
    }

    /// The cached answer, without fetching: `Some(None)` = known absent.
    pub fn cached(&self, model: &str) -> Option<Option<Arc<ModelTokenizer>>> {
        self.cells
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .and_then(|c| c.get().cloned())
    }

    pub fn forget(&self, model: &str) {
        self.cells
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(model);
    }

    /// The tokenizer of `model`, fetched from a neuron that has it loaded the
    /// first time. `None` when no neuron serves one (or fetching failed; a
    /// network failure is not remembered and is retried next time).
    pub async fn get(&self, gw: &Gateway, model: &str) -> Option<Arc<ModelTokenizer>> {
        let cell = self.cell(model);
        let res = cell.get_or_try_init(|| fetch(gw, model)).await.cloned();
        match res {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(model, error = %e, "tokenizer fetch failed; estimating");
                None
            }
        }
    }
}

async fn fetch(gw: &Gateway, model: &str) -> Result<Option<Arc<ModelTokenizer>>, String> {
    let snap = gw.fleet.snapshot();
    // Only a replica that has finished loading can answer for its tokenizer:
    // asking one that is still loading would cache a 404 for good.
    let Some(idx) = snap.nodes.iter().position(|v| v.serves(model)) else {
        return Err("no healthy neuron has the model loaded".into());
    };
    let neuron = &gw.fleet.neurons[idx];
    let url = format!("{}/models/{}/tokenizer", neuron.endpoint, model);
    let cfg = &gw.config.prevalidation;
    let resp = gw
        .control
        .get(&url)
        .timeout(ms(cfg.tokenizer_fetch_timeout_ms))
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if resp.status() == http::StatusCode::NOT_FOUND {
        tracing::info!(model, node = %neuron.name, "neuron serves no tokenizer; estimating token counts");
        return Ok(None);
    }
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    if resp
        .content_length()
        .is_some_and(|n| n as usize > cfg.max_tokenizer_bytes)
    {
        return Ok(None);
    }
    let bytes = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    if bytes.len() > cfg.max_tokenizer_bytes {
        return Ok(None);
    }
    let parsed =
        tokio::task::spawn_blocking(move || Tokenizer::from_bytes(&bytes).map(ModelTokenizer::new))
            .await
            .map_err(|e| e.to_string())?;
    match parsed {
        Ok(t) => {
            tracing::info!(model, node = %neuron.name, "tokenizer cached; counting exactly");
            Ok(Some(Arc::new(t)))
        }
        Err(e) => {
            tracing::warn!(model, node = %neuron.name, error = %e, "tokenizer.json unusable; estimating");
            Ok(None)
        }
    }
}

/// How to turn text into a token count.
pub enum Counter<'a> {
    Exact(&'a Tokenizer),
    Estimate {
        chars_per_token: f64,
    },
    /// `ceil(bytes / per_token)`: with 1 an upper bound on any BPE,
    /// SentencePiece or WordPiece count (a token stands for at least one
    /// byte); with 4, a rough estimate that costs nothing.
    Bytes {
        per_token: usize,
    },
    /// `ceil(non-whitespace characters / max_token_chars)`: a lower bound
    /// (see [`ModelTokenizer`]).
    AtLeast {
        max_token_chars: usize,
    },
}

impl Counter<'_> {
    pub fn count(&self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        match self {
            Counter::Exact(t) => match t.encode_fast(text, false) {
                Ok(enc) => enc.len() as u64,
                Err(_) => estimate(text, 4.0),
            },
            Counter::Estimate { chars_per_token } => estimate(text, *chars_per_token),
            Counter::Bytes { per_token } => text.len().div_ceil((*per_token).max(1)) as u64,
            Counter::AtLeast { max_token_chars } => {
                text.chars()
                    .filter(|c| !c.is_whitespace())
                    .count()
                    .div_ceil((*max_token_chars).max(1)) as u64
            }
        }
    }

    pub fn is_exact(&self) -> bool {
        matches!(self, Counter::Exact(_))
    }
}

fn estimate(text: &str, chars_per_token: f64) -> u64 {
    (text.chars().count() as f64 / chars_per_token).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_rounds_up() {
        let c = Counter::Estimate {
            chars_per_token: 4.0,
        };
        assert_eq!(c.count(""), 0);
        assert_eq!(c.count("abc"), 1);
        assert_eq!(c.count("abcdefghi"), 3);
    }
}
