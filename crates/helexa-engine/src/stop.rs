//! Stop strings: generation ends at the first occurrence of any of them, and
//! neither the stop string nor anything after it reaches the client.
//!
//! Text arrives in token-sized pieces, so a stop string may straddle pieces.
//! `StopMatcher` therefore holds back the longest suffix of what it has seen
//! that could still become a stop string, and releases it once it cannot.

/// What one `push` produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is now safe to send: before any stop string, never a part of one.
    pub emit: String,
    /// A stop string was matched; nothing more will be emitted.
    pub stopped: bool,
}

/// Finds stop strings in streamed text.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
    /// The stop string that ended generation (vLLM reports it as `stop_reason`).
    matched: Option<String>,
}

impl StopMatcher {
    /// Empty stop strings are ignored; with none left every push passes straight through.
    pub fn new(stops: Vec<String>) -> Self {
        let mut stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        stops.sort();
        stops.dedup();
        StopMatcher {
            stops,
            held: String::new(),
            stopped: false,
            matched: None,
        }
    }

    /// The stop string that ended generation, once one has.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// Whether a stop string has been matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Text currently held back as a possible stop-string prefix.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Feeds newly generated text.
    pub fn push(&mut self, text: &str) -> StopStep {
        if self.stopped {
            return StopStep {
                emit: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopStep {
                emit: text.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(text);

        // The match that completes first (then the one that starts first):
        // what a stream cut anywhere sees, since text arriving later cannot
        // complete a match earlier. (Earliest *start* would depend on where
        // the text was cut: with stops `😀éb` and `é`, text `😀é` pushed
        // first completes `é` before `😀éb` can.) No match can start in text
        // already emitted (it was released only when no stop could start
        // there), so a search of `held` alone is complete.
        let first = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|p| (p + s.len(), p, i)))
            .min();
        if let Some((_, pos, i)) = first {
            self.held.truncate(pos);
            self.stopped = true;
            self.matched = Some(self.stops[i].clone());
            return StopStep {
                emit: std::mem::take(&mut self.held),
                stopped: true,
            };
        }

        // Hold the longest suffix that is a proper prefix of some stop string.
        let bytes = self.held.as_bytes();
        let hold = self
            .stops
            .iter()
            .map(|s| {
                let max = (s.len() - 1).min(bytes.len());
                (1..=max)
                    .rev()
                    .find(|&k| bytes.ends_with(&s.as_bytes()[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        // A suffix equal to a prefix of valid UTF-8 starts on a char boundary.
        let cut = self.held.len() - hold;
        debug_assert!(self.held.is_char_boundary(cut));
        let emit = if hold == 0 {
            std::mem::take(&mut self.held)
        } else {
            let rest = self.held.split_off(cut);
            std::mem::replace(&mut self.held, rest)
        };
        StopStep {
            emit,
            stopped: false,
        }
    }

    /// The end of generation (EOS or length): releases any held text.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let (out, matched) = run_matched(stops, pieces);
        (out, matched.is_some())
    }

    /// The emitted text and the stop string `matched` reports.
    fn run_matched(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let step = m.push(p);
            out.push_str(&step.emit);
            if step.stopped {
                assert!(m.matched().is_some(), "stopped without a matched string");
                return (out, m.matched().map(str::to_string));
            }
            assert_eq!(m.matched(), None);
        }
        out.push_str(&m.finish());
        (out, m.matched().map(str::to_string))
    }

    #[test]
    fn reports_the_stop_string_that_matched() {
        let got = run_matched(&["zz", "b"], &["az", "zb"]);
        assert_eq!(got, ("a".into(), Some("zz".into())));
        let got = run_matched(&["😀éb", "é"], &["😀é", "baa"]);
        assert_eq!(got, ("😀".into(), Some("é".into())));
        assert_eq!(run_matched(&["x"], &["abc"]), ("abc".into(), None));
    }

    #[test]
    fn no_stops_passes_through() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(m.push("abc").emit, "abc");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn holds_possible_prefix_and_releases_it() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        let s = m.push("hello E");
        assert_eq!(s.emit, "hello ");
        assert_eq!(m.held(), "E");
        let s = m.push("N");
        assert_eq!(s.emit, "");
        let s = m.push("x");
        assert_eq!(s.emit, "ENx");
        assert!(!s.stopped);
        assert_eq!(m.push("EN").emit, "");
        assert_eq!(m.finish(), "EN");
    }

    #[test]
    fn match_across_pieces_emits_only_text_before() {
        assert_eq!(run(&["</s>"], &["ab<", "/", "s>cd"]), ("ab".into(), true));
        assert_eq!(run(&["\n\n"], &["line\n", "\nmore"]), ("line".into(), true));
        // The stop that completes first wins, wherever the text was cut.
        assert_eq!(run(&["zz", "b"], &["azzb"]), ("a".into(), true));
        assert_eq!(run(&["😀éb", "é"], &["😀ébaa"]), ("😀".into(), true));
        assert_eq!(run(&["😀éb", "é"], &["😀é", "baa"]), ("😀".into(), true));
        assert_eq!(run(&["abc", "bcd"], &["ab", "cd"]), ("".into(), true));
        // Multi-byte text and stops.
        assert_eq!(run(&["😀"], &["日本", "😀語"]), ("日本".into(), true));
    }

    #[test]
    fn nothing_after_stop() {
        let mut m = StopMatcher::new(vec!["x".into()]);
        assert!(m.push("axb").stopped);
        assert!(m.is_stopped());
        assert_eq!(
            m.push("more"),
            StopStep {
                emit: String::new(),
                stopped: true
            }
        );
        assert_eq!(m.finish(), "");
    }

    fn expected(text: &str, stops: &[String]) -> (String, Option<String>) {
        match stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()).map(|p| (p + s.len(), p, s)))
            .min()
        {
            Some((_, p, s)) => (text[..p].to_string(), Some(s.clone())),
            None => (text.to_string(), None),
        }
    }

    fn chars() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!['a', 'b', 'c', 'é', '😀', '\n']),
            0..40,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    fn stop_strings() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!['a', 'b', 'c', 'é', '😀', '\n']),
            0..4,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #[test]
        fn emits_equal_text_truncated_at_first_stop(
            text in chars(),
            stops in prop::collection::vec(stop_strings(), 0..4),
            cuts in prop::collection::vec(0usize..64, 0..12),
        ) {
            let boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
            let mut points: Vec<usize> = cuts
                .iter()
                .filter(|_| !boundaries.is_empty())
                .map(|c| boundaries[c % boundaries.len()])
                .collect();
            points.push(0);
            points.push(text.len());
            points.sort();
            points.dedup();
            let pieces: Vec<&str> = points.windows(2).map(|w| &text[w[0]..w[1]]).collect();
            let stop_refs: Vec<&str> = stops.iter().map(|s| s.as_str()).collect();
            prop_assert_eq!(run_matched(&stop_refs, &pieces), expected(&text, &stops));
        }
    }
}
