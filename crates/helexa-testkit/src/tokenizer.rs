//! A tiny Hugging Face `tokenizer.json` built in memory, never downloaded.
//!
//! Word-level over a handful of words with whitespace pre-tokenisation, so a
//! test knows the exact token count of a prompt: one token per word or mark.

use std::collections::HashMap;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::Tokenizer;

/// The words the tiny tokenizer knows; anything else is `[UNK]` (still one token).
pub const TINY_VOCAB: &[&str] = &[
    "[UNK]", "hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
];

/// `tokenizer.json` text of the tiny word-level tokenizer.
pub fn tiny_tokenizer_json() -> String {
    let vocab: HashMap<String, u32> = TINY_VOCAB
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".to_string())
        .build()
        .expect("word-level model builds");
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.to_string(false).expect("tokenizer serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_one_token_per_word() {
        let json = tiny_tokenizer_json();
        let tok = Tokenizer::from_bytes(json.as_bytes()).unwrap();
        let enc = tok.encode("hello world unknownword fox", false).unwrap();
        assert_eq!(enc.len(), 4);
    }
}
