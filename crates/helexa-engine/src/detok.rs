//! Incremental detokenization: turns generated ids into text one token at a
//! time without ever emitting half a UTF-8 character.
//!
//! Byte-level BPE splits an emoji or CJK character across several tokens, and
//! some decoders change a token's text depending on what precedes it (the
//! SentencePiece leading space). So each step decodes a short window that
//! starts a little before the new tokens (`prefix_offset`) and emits the part
//! past the already-emitted text (`read_offset`), and only when the result
//! does not end in U+FFFD (an incomplete character).

use std::sync::Arc;

use tokenizers::Tokenizer;

const REPLACEMENT: char = '\u{FFFD}';

/// Streams the text of one sequence's generated tokens.
pub struct StreamDecoder {
    tokenizer: Arc<Tokenizer>,
    /// Ids from `prefix_offset` on; older ones are dropped.
    ids: Vec<u32>,
    /// `ids[..prefix]` is context already emitted, decoded again for its effect on the next token.
    prefix: usize,
    /// `ids[..read]` has been emitted.
    read: usize,
}

impl StreamDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        StreamDecoder {
            tokenizer,
            ids: Vec::with_capacity(8),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds one generated token; returns the text it completes (often the
    /// token's own text, "" while a character is incomplete or for special
    /// tokens, which are never emitted).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let prefix_text = self.decode(self.prefix, self.read);
        let full = self.decode(self.prefix, self.ids.len());
        if full.len() <= prefix_text.len() || full.ends_with(REPLACEMENT) {
            return String::new();
        }
        let emit = split_new(&full, &prefix_text);
        // The emitted window becomes the next step's context.
        self.ids.drain(..self.read);
        self.prefix = 0;
        self.read = self.ids.len();
        emit
    }

    /// Tokens pushed whose text has not been emitted yet.
    pub fn pending_tokens(&self) -> usize {
        self.ids.len() - self.read
    }

    /// End of the sequence: emits whatever is still pending, an incomplete
    /// character as U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.read == self.ids.len() {
            return String::new();
        }
        let prefix_text = self.decode(self.prefix, self.read);
        let full = self.decode(self.prefix, self.ids.len());
        let emit = if full.len() > prefix_text.len() {
            split_new(&full, &prefix_text)
        } else {
            String::new()
        };
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        emit
    }

    fn decode(&self, from: usize, to: usize) -> String {
        if from >= to {
            return String::new();
        }
        match self.tokenizer.decode(&self.ids[from..to], true) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot decode generated tokens");
                String::new()
            }
        }
    }
}

/// The part of `full` after `prefix`; when the window's decoding does not
/// start with the context's (a decoder quirk), the part past the same length.
fn split_new(full: &str, prefix: &str) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_string();
    }
    let mut cut = prefix.len().min(full.len());
    while !full.is_char_boundary(cut) {
        cut += 1;
    }
    full[cut..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> (Arc<Tokenizer>, StreamDecoder) {
        let tok = Arc::new(crate::tokenizer::tests::smollm());
        (tok.clone(), StreamDecoder::new(tok))
    }

    fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn emoji_split_across_tokens_is_held_until_complete() {
        let (tok, mut dec) = decoder();
        let emoji = ids(&tok, "😀");
        assert!(emoji.len() > 1, "expected byte-level pieces, got {emoji:?}");
        for &id in &emoji[..emoji.len() - 1] {
            assert_eq!(dec.push(id), "");
        }
        assert_eq!(dec.pending_tokens(), emoji.len() - 1);
        assert_eq!(dec.push(*emoji.last().unwrap()), "😀");
        assert_eq!(dec.finish(), "");
    }

    #[test]
    fn cjk_and_mixed_text_streams_exactly() {
        let (tok, mut dec) = decoder();
        let text = "Hello 世界! 日本語のテキスト 👩‍💻 done\n  x = 42;";
        let all = ids(&tok, text);
        let mut out = String::new();
        for &id in &all {
            let piece = dec.push(id);
            assert!(!piece.contains(REPLACEMENT), "{piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&dec.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn special_tokens_are_not_emitted() {
        let (tok, mut dec) = decoder();
        let mut out = String::new();
        for id in ids(&tok, "Hi there<|im_end|>") {
            out.push_str(&dec.push(id));
        }
        out.push_str(&dec.finish());
        assert_eq!(out, "Hi there");
    }

    #[test]
    fn finish_flushes_an_incomplete_character() {
        let (tok, mut dec) = decoder();
        let emoji = ids(&tok, "😀");
        assert_eq!(dec.push(emoji[0]), "");
        let rest = dec.finish();
        assert!(rest.contains(REPLACEMENT), "{rest:?}");
        assert_eq!(dec.finish(), "");
    }

    #[test]
    fn window_stays_small() {
        let (tok, mut dec) = decoder();
        for id in ids(&tok, &"word ".repeat(200)) {
            dec.push(id);
        }
        assert!(dec.ids.len() <= 2, "{}", dec.ids.len());
    }
}
