//! Constrained decoding through llguidance: a grammar (a JSON schema, or a
//! Lark grammar for tool calls) becomes a token mask applied to the logits
//! before every sampling step of that one sequence.
//!
//! `Guidance` is built once per engine, lazily (the token trie costs tens of
//! milliseconds for a 50k vocabulary), from our own `tokenizers::Tokenizer`,
//! so no second tokenizer library is loaded. A `Constraint` is one sequence's
//! parser state; sequences without one pay nothing.

use std::fmt;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

/// What a sequence must generate.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON value valid under this schema.
    JsonSchema(Value),
    /// A grammar in llguidance's Lark dialect (may embed `%json {…}`).
    Lark(String),
}

impl Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    pub fn json_object() -> Grammar {
        Grammar::JsonSchema(serde_json::json!({"type": "object"}))
    }
}

/// Compact JSON (no free whitespace): a small model given the freedom to
/// write whitespace may write nothing else until it runs out of tokens.
fn compact(schema: &Value) -> Value {
    let mut s = match schema {
        Value::Object(_) => schema.clone(),
        // `true` / `{}`: anything.
        _ => serde_json::json!({}),
    };
    if let Some(obj) = s.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
        });
    }
    s
}

/// Our tokenizer as llguidance sees it: the byte string of every token in a
/// trie, and encoding for the (rare) forced-token computations.
struct HfEnv {
    trie: TokTrie,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl TokenizerEnv for HfEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.tokenizer
            .encode(String::from_utf8_lossy(s).as_ref(), false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    /// Not claimed: a GGUF-built tokenizer may normalise. llguidance then
    /// skips forced-token shortcuts, which only costs speed.
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// The engine's grammar compiler and token table.
pub struct Guidance {
    factory: ParserFactory,
    env: TokEnv,
}

impl fmt::Debug for Guidance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guidance")
            .field("vocab", &self.env.tok_trie().vocab_size())
            .finish()
    }
}

impl Guidance {
    /// Builds the token trie from the tokenizer's JSON form. `eos` are the
    /// ids that end generation: the grammar allows them once it is complete.
    pub fn new(tokenizer: Arc<tokenizers::Tokenizer>, eos: &[u32]) -> Result<Guidance, String> {
        let json: Value = serde_json::from_str(
            &tokenizer
                .to_string(false)
                .map_err(|e| format!("cannot serialise the tokenizer: {e}"))?,
        )
        .map_err(|e| format!("cannot read the tokenizer's JSON: {e}"))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| format!("cannot read token bytes: {e}"))?;
        let vocab = tokenizer.get_vocab_size(true).max(words.len());
        words.resize(vocab, Vec::new());
        let first_eos = *eos
            .first()
            .ok_or("the model has no end-of-sequence token")?;
        let trie =
            TokTrie::from(&TokRxInfo::new(vocab as u32, first_eos), &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(HfEnv { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Guidance { factory, env })
    }

    /// Compiles a grammar; an unsupported or unsatisfiable schema is an
    /// error that names the feature (llguidance's message).
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, String> {
        let top = match grammar {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema)),
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| format!("{e:#}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(err) = matcher.get_error() {
            return Err(err);
        }
        Ok(Constraint { matcher })
    }

    /// The bytes a token stands for (special tokens: their text).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let trie = self.env.tok_trie();
        if (id as usize) >= trie.vocab_size() {
            return Vec::new();
        }
        trie.decode_ext(&[id], true)
    }
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Constraint {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl Constraint {
    /// Sets every token the grammar forbids now to -inf (ids past the
    /// tokenizer's vocabulary included).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| format!("grammar: {e:#}"))?;
        if mask.num_set() == 0 {
            return Err("grammar: no token can continue the output".into());
        }
        let n = mask.len().min(logits.len());
        mask.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        for l in logits.iter_mut().skip(n) {
            *l = f32::NEG_INFINITY;
        }
        Ok(())
    }

    /// Advances over a generated token. Returns true when the grammar is
    /// complete and allows nothing more: the sequence must stop.
    pub fn commit(&mut self, token: u32) -> Result<bool, String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("grammar: {e:#}"))?;
        Ok(self.matcher.is_stopped())
    }
}
