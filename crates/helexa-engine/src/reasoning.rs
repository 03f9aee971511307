//! Reasoning ("thinking") in generated text: splits a reasoning model's
//! output into its reasoning and its answer, incrementally.
//!
//! Models of the DeepSeek-R1 / Qwen3 / QwQ families write their reasoning
//! between `<think>` and `</think>`, both single tokens of their vocabulary;
//! the markers are detected from the tokenizer. A template may open the
//! block itself (DeepSeek-R1 distills end the generation prompt with
//! `<think>\n`): generation then starts inside it, which the caller says by
//! checking the rendered prompt (`starts_inside`). A template that closes an
//! empty block (Qwen3 with `enable_thinking: false`) leaves generation
//! outside it.
//!
//! Like the tool-call parser, only what could still become a marker is held
//! back, so text cut anywhere gives the same split as the whole text (tested
//! for every cut). The whitespace that models put between `</think>` and the
//! answer is dropped.

/// The block's markers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Markers {
    pub open: String,
    pub close: String,
}

impl Markers {
    /// `<think>` / `</think>` when the tokenizer has both as tokens.
    pub fn detect(tokenizer: &tokenizers::Tokenizer) -> Option<Markers> {
        let has = |t: &str| tokenizer.token_to_id(t).is_some();
        (has("<think>") && has("</think>")).then(|| Markers {
            open: "<think>".into(),
            close: "</think>".into(),
        })
    }

    /// Whether a rendered prompt leaves a reasoning block open at its end.
    pub fn open_at_end(&self, prompt: &str) -> bool {
        match prompt.rfind(&self.open) {
            Some(o) => prompt[o..].find(&self.close).is_none(),
            None => false,
        }
    }
}

/// A piece of the split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Reasoning(String),
    Content(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Answer text, watching for an opening marker.
    Outside,
    /// Reasoning, until the closing marker.
    Inside,
    /// Just closed: dropping whitespace before the answer.
    AfterClose,
}

/// The incremental splitter of one choice.
#[derive(Debug)]
pub struct ReasoningParser {
    markers: Markers,
    state: State,
    buf: String,
}

/// Length of the longest suffix of `s` that is a proper prefix of `m`.
fn partial(s: &str, m: &str) -> usize {
    (1..m.len())
        .rev()
        .find(|&k| k <= s.len() && s.is_char_boundary(s.len() - k) && s.ends_with(&m[..k]))
        .unwrap_or(0)
}

impl ReasoningParser {
    pub fn new(markers: Markers, starts_inside: bool) -> Self {
        ReasoningParser {
            markers,
            state: if starts_inside {
                State::Inside
            } else {
                State::Outside
            },
            buf: String::new(),
        }
    }

    /// Feeds generated text; returns what is certain so far.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Outside | State::Inside => {
                    let inside = self.state == State::Inside;
                    let m = if inside {
                        &self.markers.close
                    } else {
                        &self.markers.open
                    };
                    let wrap = |s: String| {
                        if inside {
                            Piece::Reasoning(s)
                        } else {
                            Piece::Content(s)
                        }
                    };
                    match self.buf.find(m.as_str()) {
                        Some(i) => {
                            let len = m.len();
                            if i > 0 {
                                out.push(wrap(self.buf[..i].to_string()));
                            }
                            self.buf.drain(..i + len);
                            self.state = if inside {
                                State::AfterClose
                            } else {
                                State::Inside
                            };
                        }
                        None => {
                            let keep = partial(&self.buf, m);
                            let emit = self.buf.len() - keep;
                            if emit > 0 {
                                out.push(wrap(self.buf[..emit].to_string()));
                                self.buf.drain(..emit);
                            }
                            return out;
                        }
                    }
                }
                State::AfterClose => {
                    let trimmed = self.buf.trim_start();
                    if trimmed.is_empty() {
                        self.buf.clear();
                        return out;
                    }
                    let skip = self.buf.len() - trimmed.len();
                    self.buf.drain(..skip);
                    self.state = State::Outside;
                }
            }
        }
    }

    /// Ends the text: whatever was held is resolved.
    pub fn finish(&mut self) -> Vec<Piece> {
        let buf = std::mem::take(&mut self.buf);
        if buf.is_empty() {
            return Vec::new();
        }
        match self.state {
            State::Inside => vec![Piece::Reasoning(buf)],
            State::Outside => vec![Piece::Content(buf)],
            State::AfterClose => Vec::new(),
        }
    }
}

/// Reasoning and content of a whole text.
pub fn split_all(markers: &Markers, starts_inside: bool, text: &str) -> (String, String) {
    let mut p = ReasoningParser::new(markers.clone(), starts_inside);
    let mut pieces = p.push(text);
    pieces.extend(p.finish());
    join(pieces)
}

/// Reasoning joined, content joined.
pub fn join(pieces: Vec<Piece>) -> (String, String) {
    let (mut r, mut c) = (String::new(), String::new());
    for p in pieces {
        match p {
            Piece::Reasoning(s) => r.push_str(&s),
            Piece::Content(s) => c.push_str(&s),
        }
    }
    (r, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn think() -> Markers {
        Markers {
            open: "<think>".into(),
            close: "</think>".into(),
        }
    }

    fn check_cuts(inside: bool, text: &str, reasoning: &str, content: &str) {
        let whole = split_all(&think(), inside, text);
        assert_eq!(
            (whole.0.as_str(), whole.1.as_str()),
            (reasoning, content),
            "{text:?}"
        );
        let bounds: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &cut in &bounds {
            let mut p = ReasoningParser::new(think(), inside);
            let mut ev = p.push(&text[..cut]);
            ev.extend(p.push(&text[cut..]));
            ev.extend(p.finish());
            assert_eq!(join(ev), whole, "cut at {cut} of {text:?}");
        }
        let mut p = ReasoningParser::new(think(), inside);
        let mut ev = Vec::new();
        for w in bounds.windows(2) {
            ev.extend(p.push(&text[w[0]..w[1]]));
        }
        ev.extend(p.finish());
        assert_eq!(join(ev), whole, "char by char: {text:?}");
    }

    #[test]
    fn qwen3_style_every_cut() {
        check_cuts(
            false,
            "<think>\nThe user wants 2+2. That is 4.\n</think>\n\nIt is **4**.",
            "\nThe user wants 2+2. That is 4.\n",
            "It is **4**.",
        );
        // Disabled thinking: the template closed an empty block already.
        check_cuts(false, "Just the answer.", "", "Just the answer.");
    }

    #[test]
    fn block_opened_by_the_template_every_cut() {
        check_cuts(
            true,
            "Let me think… ünïcode.</think>Answer",
            "Let me think… ünïcode.",
            "Answer",
        );
        // Cut short while reasoning: all of it is reasoning.
        check_cuts(true, "still thinking <thi", "still thinking <thi", "");
    }

    #[test]
    fn tool_calls_after_reasoning_stay_content() {
        check_cuts(
            false,
            "<think>need weather</think>\n<tool_call>{\"name\":\"w\",\"arguments\":{}}</tool_call>",
            "need weather",
            "<tool_call>{\"name\":\"w\",\"arguments\":{}}</tool_call>",
        );
    }

    #[test]
    fn open_at_end_of_prompt() {
        let m = think();
        assert!(m.open_at_end("<|im_start|>assistant\n<think>\n"));
        assert!(!m.open_at_end("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!m.open_at_end("<|im_start|>assistant\n"));
    }
}
