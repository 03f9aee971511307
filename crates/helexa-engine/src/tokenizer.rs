//! Builds a Hugging Face `tokenizers::Tokenizer` from GGUF metadata (or loads a
//! `tokenizer.json`), so a GGUF file alone is enough to serve a model.
//!
//! Token ids must match llama.cpp's exactly: the pre-tokenizer (how text is
//! split before BPE) is chosen by `tokenizer.ggml.pre`, the same key llama.cpp
//! uses, with the regexes llama.cpp uses for each family. The result is an
//! ordinary `Tokenizer`, so it serialises to JSON (`to_string`) for cortex.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use crate::api::EngineError;

/// llama.cpp `LLAMA_TOKEN_TYPE_CONTROL`.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp `LLAMA_TOKEN_TYPE_USER_DEFINED`.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// llama.cpp `LLAMA_TOKEN_TYPE_BYTE` (`<0x0A>` pieces of SentencePiece vocabs).
const TOKEN_TYPE_BYTE: i32 = 6;

/// llama.cpp's LLAMA3 pre-tokenizer regex (also falcon3, pixtral...).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's QWEN2 pre-tokenizer regex (Qwen2, Qwen2.5, Qwen3).
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Which way text is split before BPE, from `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// GPT-2's regex (ByteLevel with `use_regex`).
    Gpt2,
    /// Every digit alone, then GPT-2's regex (smollm, starcoder, refact...).
    DigitsThenGpt2,
    /// llama.cpp's LLAMA3 regex.
    Llama3,
    /// llama.cpp's QWEN2 regex.
    Qwen2,
}

impl PreTokenizerKind {
    /// The kind llama.cpp uses for a `tokenizer.ggml.pre` value; `None` when unknown.
    pub fn from_gguf_pre(pre: &str) -> Option<Self> {
        Some(match pre {
            "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => PreTokenizerKind::Gpt2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => PreTokenizerKind::DigitsThenGpt2,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => PreTokenizerKind::Llama3,
            "qwen2" | "deepseek-r1-qwen" | "megrez" => PreTokenizerKind::Qwen2,
            _ => return None,
        })
    }

    fn build(self) -> Result<PreTokenizerWrapper, EngineError> {
        let gpt2 = || ByteLevel::new(false, true, true);
        let regex_then_bytes = |re: &str| -> Result<PreTokenizerWrapper, EngineError> {
            let split = Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| EngineError::Tokenizer(format!("bad pre-tokenizer regex: {e}")))?;
            Ok(PreSequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into())
        };
        Ok(match self {
            PreTokenizerKind::Gpt2 => gpt2().into(),
            PreTokenizerKind::DigitsThenGpt2 => {
                PreSequence::new(vec![Digits::new(true).into(), gpt2().into()]).into()
            }
            PreTokenizerKind::Llama3 => regex_then_bytes(LLAMA3_REGEX)?,
            PreTokenizerKind::Qwen2 => regex_then_bytes(QWEN2_REGEX)?,
        })
    }
}

/// Loads a Hugging Face `tokenizer.json`.
pub fn tokenizer_from_file(path: &Path) -> Result<Tokenizer, EngineError> {
    Tokenizer::from_file(path)
        .map_err(|e| EngineError::Tokenizer(format!("cannot load {}: {e}", path.display())))
}

/// Whether a `tokenizer.json` found beside a GGUF belongs to it: the same
/// vocabulary size and the same token strings at the BOS/EOS ids and at 64
/// ids spread over the vocabulary. A folder shared by several models may
/// hold another model's `tokenizer.json`; using it would silently give
/// wrong ids.
pub fn check_matches_gguf(tok: &Tokenizer, md: &HashMap<String, Value>) -> Result<(), String> {
    let tokens = md_strings(md, "tokenizer.ggml.tokens")
        .map_err(|e| e.to_string())?
        .ok_or("the GGUF lists no tokenizer.ggml.tokens to compare with")?;
    let n = tokens.len();
    let size = tok.get_vocab_size(true);
    if size != n {
        return Err(format!("it has {size} tokens, the GGUF {n}"));
    }
    let special = ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]
        .into_iter()
        .filter_map(|k| md.get(k).and_then(|v| v.to_u32().ok()))
        .map(|i| i as usize);
    let step = (n / 64).max(1);
    for i in (0..n).step_by(step).chain(special).filter(|&i| i < n) {
        let theirs = tok.id_to_token(i as u32);
        if theirs.as_deref() != Some(tokens[i].as_str()) {
            return Err(format!(
                "token {i} is {theirs:?} there but {:?} in the GGUF",
                tokens[i]
            ));
        }
    }
    Ok(())
}

/// Builds the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.
pub fn tokenizer_from_gguf(md: &HashMap<String, Value>) -> Result<Tokenizer, EngineError> {
    let model = md_str(md, "tokenizer.ggml.model")?.ok_or_else(|| {
        EngineError::Tokenizer("GGUF has no tokenizer.ggml.model; pass a tokenizer.json".into())
    })?;
    let tokens = md_strings(md, "tokenizer.ggml.tokens")?
        .ok_or_else(|| EngineError::Tokenizer("GGUF has no tokenizer.ggml.tokens".into()))?;
    let types = md_ints(md, "tokenizer.ggml.token_type")?;
    if let Some(t) = &types {
        if t.len() != tokens.len() {
            return Err(EngineError::Tokenizer(format!(
                "tokenizer.ggml.token_type has {} entries, tokenizer.ggml.tokens {}",
                t.len(),
                tokens.len()
            )));
        }
    }
    let token_type = |i: usize| types.as_ref().map_or(1, |t| t[i]);
    let mut tokenizer = match model {
        "gpt2" => gpt2_bpe(md, &tokens)?,
        "llama" => sentencepiece_bpe(md, &tokens, &token_type)?,
        other => {
            return Err(EngineError::Tokenizer(format!(
                "tokenizer.ggml.model {other:?} is not supported (gpt2 and llama are); \
                 pass a tokenizer.json"
            )))
        }
    };

    // Control tokens are special (never decoded as text, matched anywhere in
    // the input); user-defined tokens are matched anywhere too but decode as
    // text, as llama.cpp does.
    let added: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, tok)| match token_type(i) {
            TOKEN_TYPE_CONTROL => Some(AddedToken::from(tok.clone(), true).normalized(false)),
            TOKEN_TYPE_USER_DEFINED => Some(AddedToken::from(tok.clone(), false).normalized(false)),
            _ => None,
        })
        .collect();
    tokenizer.add_special_tokens(added).map_err(|e| {
        EngineError::Tokenizer(format!("cannot add the GGUF's special tokens: {e}"))
    })?;

    let add_bos_default = model == "llama";
    let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
        Some(v) => v
            .to_bool()
            .map_err(|e| EngineError::Tokenizer(format!("tokenizer.ggml.add_bos_token: {e}")))?,
        None => add_bos_default,
    };
    if add_bos {
        if let Some(bos) = md_u32(md, "tokenizer.ggml.bos_token_id")? {
            let bos_tok = tokens.get(bos as usize).ok_or_else(|| {
                EngineError::Tokenizer(format!("bos_token_id {bos} is outside the vocabulary"))
            })?;
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos_tok} $A"))
                .and_then(|b| b.try_pair(format!("{bos_tok} $A {bos_tok}:1 $B:1")))
                .map_err(|e| EngineError::Tokenizer(format!("BOS post-processor: {e}")))?
                .special_tokens(vec![(bos_tok.clone(), bos)])
                .build()
                .map_err(|e| EngineError::Tokenizer(format!("BOS post-processor: {e}")))?;
            tokenizer.with_post_processor(Some(post));
        }
    }
    Ok(tokenizer)
}

/// Byte-level BPE (GPT-2 style) from tokens + merges.
fn gpt2_bpe(md: &HashMap<String, Value>, tokens: &[String]) -> Result<Tokenizer, EngineError> {
    let merges = md_strings(md, "tokenizer.ggml.merges")?
        .ok_or_else(|| EngineError::Tokenizer("GGUF has no tokenizer.ggml.merges".into()))?;
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| EngineError::Tokenizer(format!("malformed merge {m:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| EngineError::Tokenizer(format!("cannot build BPE: {e}")))?;

    let pre = md_str(md, "tokenizer.ggml.pre")?.unwrap_or("default");
    let kind = PreTokenizerKind::from_gguf_pre(pre).unwrap_or_else(|| {
        tracing::warn!(
            pre,
            "unknown tokenizer.ggml.pre; using the GPT-2 pre-tokenizer, token ids may differ from llama.cpp"
        );
        PreTokenizerKind::Gpt2
    });

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(kind.build()?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// SentencePiece (`tokenizer.ggml.model = "llama"`) as a BPE with byte
/// fallback whose merges are derived from the piece scores, the way
/// Hugging Face converts Llama/Mistral vocabularies: a pair merges when the
/// concatenation is a piece, higher-scoring pieces first.
fn sentencepiece_bpe(
    md: &HashMap<String, Value>,
    tokens: &[String],
    token_type: &dyn Fn(usize) -> i32,
) -> Result<Tokenizer, EngineError> {
    let scores = md_floats(md, "tokenizer.ggml.scores")?.unwrap_or_default();
    let score = |i: usize| scores.get(i).copied().unwrap_or(0.0);
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let ty = token_type(id);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_BYTE || ty == TOKEN_TYPE_USER_DEFINED {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                ranked.push((score(id), id as u32, li, ri));
            }
        }
    }
    // Higher score first; ties by the merged piece's id, then the left part's.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<(String, String)> = ranked
        .iter()
        .map(|&(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect();

    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = md_u32(md, "tokenizer.ggml.unknown_token_id")? {
        if let Some(t) = tokens.get(unk as usize) {
            builder = builder.unk_token(t.clone());
        }
    }
    let bpe = builder
        .build()
        .map_err(|e| EngineError::Tokenizer(format!("cannot build BPE: {e}")))?;

    let add_space_prefix = match md.get("tokenizer.ggml.add_space_prefix") {
        Some(v) => v.to_bool().unwrap_or(true),
        None => true,
    };
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| EngineError::Tokenizer(format!("normalizer: {e}")))
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".to_string()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        DecoderWrapper::Replace(replace("▁", " ")?),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| EngineError::Tokenizer(format!("cannot set the normalizer: {e}")))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

fn md_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>, EngineError> {
    md.get(key)
        .map(|v| {
            v.to_string()
                .map(|s| s.as_str())
                .map_err(|e| EngineError::Tokenizer(format!("{key}: {e}")))
        })
        .transpose()
}

fn md_u32(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>, EngineError> {
    md.get(key)
        .map(|v| value_to_i64(v).map(|x| x as u32))
        .transpose()
        .map_err(|e| EngineError::Tokenizer(format!("{key}: {e}")))
}

fn md_array<'a>(
    md: &'a HashMap<String, Value>,
    key: &str,
) -> Result<Option<&'a Vec<Value>>, EngineError> {
    md.get(key)
        .map(|v| {
            v.to_vec()
                .map_err(|e| EngineError::Tokenizer(format!("{key}: {e}")))
        })
        .transpose()
}

fn md_strings(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<String>>, EngineError> {
    let Some(arr) = md_array(md, key)? else {
        return Ok(None);
    };
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| EngineError::Tokenizer(format!("{key}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn md_ints(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<i32>>, EngineError> {
    let Some(arr) = md_array(md, key)? else {
        return Ok(None);
    };
    arr.iter()
        .map(|v| value_to_i64(v).map(|x| x as i32))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(|e| EngineError::Tokenizer(format!("{key}: {e}")))
}

fn md_floats(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<f32>>, EngineError> {
    let Some(arr) = md_array(md, key)? else {
        return Ok(None);
    };
    arr.iter()
        .map(|v| match v {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            other => Err(EngineError::Tokenizer(format!(
                "{key}: expected floats, found {:?}",
                other.value_type()
            ))),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn value_to_i64(v: &Value) -> Result<i64, String> {
    Ok(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => *x as i64,
        Value::I64(x) => *x,
        other => {
            return Err(format!(
                "expected an integer, found {:?}",
                other.value_type()
            ))
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The default model file; fails (never skips) when it is absent.
    pub(crate) fn model_path() -> PathBuf {
        let dir = std::env::var_os("HELEXA_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").expect("HOME is not set");
                PathBuf::from(home).join(".cache/helexa/models")
            });
        let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            path.exists(),
            "{} is missing: run scripts/fetch-model (or set HELEXA_MODEL_DIR)",
            path.display()
        );
        path
    }

    pub(crate) fn gguf_metadata() -> HashMap<String, Value> {
        let path = model_path();
        let mut f = std::fs::File::open(&path).unwrap();
        candle_core::quantized::gguf_file::Content::read(&mut f)
            .unwrap()
            .metadata
    }

    pub(crate) fn smollm() -> Tokenizer {
        tokenizer_from_gguf(&gguf_metadata()).unwrap()
    }

    fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, true).unwrap().get_ids().to_vec()
    }

    fn vocab_id(tok: &Tokenizer, piece: &str) -> u32 {
        tok.token_to_id(piece)
            .unwrap_or_else(|| panic!("{piece:?} not in vocab"))
    }

    #[test]
    fn chatml_special_tokens_are_single_ids() {
        let tok = smollm();
        let expected = vec![
            vocab_id(&tok, "<|im_start|>"),
            vocab_id(&tok, "user"),
            vocab_id(&tok, "Ċ"),
            vocab_id(&tok, "Hello"),
            vocab_id(&tok, "<|im_end|>"),
        ];
        assert_eq!(expected, vec![1, 4093, 198, 19556, 2]);
        assert_eq!(ids(&tok, "<|im_start|>user\nHello<|im_end|>"), expected);
    }

    #[test]
    fn no_bos_added_for_smollm() {
        let tok = smollm();
        assert_eq!(ids(&tok, "Hello"), vec![19556]);
    }

    #[test]
    fn digits_are_split_individually() {
        let tok = smollm();
        let got = ids(&tok, "12345");
        assert_eq!(got.len(), 5, "{got:?}");
        let digits: Vec<u32> = "12345"
            .chars()
            .map(|c| vocab_id(&tok, &c.to_string()))
            .collect();
        assert_eq!(got, digits);
        // " 2024" is the space alone then four digits, as llama.cpp splits it.
        assert_eq!(ids(&tok, "year 2024").len(), 6);
    }

    #[test]
    fn round_trips_ascii_emoji_cjk() {
        let tok = smollm();
        for text in [
            "Hello, world! fn main() { println!(\"{}\", 1 + 2); }",
            "emoji: 😀🎉👩‍💻 done",
            "中文测试，日本語のテキスト、한국어",
            "  leading and trailing spaces \n\n\ttabs ",
        ] {
            let enc = ids(&tok, text);
            assert_eq!(tok.decode(&enc, true).unwrap(), text);
        }
    }

    #[test]
    fn special_tokens_are_skipped_when_decoding() {
        let tok = smollm();
        let enc = ids(&tok, "<|im_start|>user\nHi<|im_end|>");
        assert_eq!(tok.decode(&enc, true).unwrap(), "user\nHi");
        assert_eq!(
            tok.decode(&enc, false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>"
        );
    }

    #[test]
    fn json_round_trip_is_identical() {
        let tok = smollm();
        let json = tok.to_string(false).unwrap();
        let back: Tokenizer = json.parse().unwrap();
        assert_eq!(back.to_string(false).unwrap(), json);
        for text in [
            "<|im_start|>user\n12345 héllo 😀<|im_end|>",
            "x = [1, 22, 333]",
        ] {
            assert_eq!(ids(&back, text), ids(&tok, text));
        }
        // And through a file, as `tokenizer_from_file` reads it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, &json).unwrap();
        let loaded = tokenizer_from_file(&path).unwrap();
        assert_eq!(ids(&loaded, "abc 123"), ids(&tok, "abc 123"));
    }

    /// llama.cpp's ids (tests/fixtures/tokens.json and chats.json, generated by
    /// scripts/gen-parity-fixtures) for every fixture string.
    #[test]
    fn matches_llama_cpp_fixtures() {
        let tok = smollm();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut checked = 0;
        for name in ["tokens.json", "chats.json"] {
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            for case in v["cases"].as_array().unwrap() {
                let input = case
                    .get("text")
                    .or_else(|| case.get("prompt"))
                    .and_then(|t| t.as_str())
                    .unwrap();
                let want: Vec<u32> = case["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(ids(&tok, input), want, "{name} case {}", case["name"]);
                checked += 1;
            }
        }
        assert!(checked >= 20, "only {checked} fixture cases");
    }

    #[test]
    fn pre_tokenizer_kinds() {
        assert_eq!(
            PreTokenizerKind::from_gguf_pre("smollm"),
            Some(PreTokenizerKind::DigitsThenGpt2)
        );
        assert_eq!(
            PreTokenizerKind::from_gguf_pre("llama-bpe"),
            Some(PreTokenizerKind::Llama3)
        );
        assert_eq!(
            PreTokenizerKind::from_gguf_pre("qwen2"),
            Some(PreTokenizerKind::Qwen2)
        );
        assert_eq!(PreTokenizerKind::from_gguf_pre("nonesuch"), None);
        for k in [
            PreTokenizerKind::Gpt2,
            PreTokenizerKind::DigitsThenGpt2,
            PreTokenizerKind::Llama3,
            PreTokenizerKind::Qwen2,
        ] {
            k.build().unwrap();
        }
    }

    #[test]
    fn llama3_regex_groups_three_digits() {
        // Same vocabulary, llama3 pre-tokenizer: digits go in groups of <= 3.
        let mut md = gguf_metadata();
        md.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("llama-bpe".into()),
        );
        let tok = tokenizer_from_gguf(&md).unwrap();
        let pieces = tok.encode("1234567", false).unwrap().get_tokens().to_vec();
        assert_eq!(pieces.concat(), "1234567");
        assert!(pieces.len() >= 3, "{pieces:?}");
    }

    #[test]
    fn missing_or_unknown_model_is_a_clear_error() {
        let mut md = gguf_metadata();
        md.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
        let err = tokenizer_from_gguf(&md).unwrap_err().to_string();
        assert!(err.contains("bert"), "{err}");
        md.remove("tokenizer.ggml.model");
        assert!(tokenizer_from_gguf(&md).is_err());
    }

    #[test]
    fn sentencepiece_from_scores() {
        // A tiny SentencePiece-style vocabulary.
        let pieces = [
            "<unk>", "<s>", "</s>", "▁", "h", "e", "l", "o", "▁h", "▁he", "ll", "llo", "▁hello",
            "<0x0A>",
        ];
        let scores = [
            0.0f32, 0.0, 0.0, -1.0, -2.0, -2.0, -2.0, -2.0, -3.0, -3.5, -4.0, -5.0, -1.5, 0.0,
        ];
        let types = [2i32, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 6];
        let mut md = HashMap::new();
        md.insert(
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        );
        md.insert(
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(
                pieces
                    .iter()
                    .map(|p| Value::String(p.to_string()))
                    .collect(),
            ),
        );
        md.insert(
            "tokenizer.ggml.scores".to_string(),
            Value::Array(scores.iter().map(|s| Value::F32(*s)).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        );
        md.insert("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1));
        md.insert("tokenizer.ggml.unknown_token_id".to_string(), Value::U32(0));
        let tok = tokenizer_from_gguf(&md).unwrap();
        // BOS added by default for SentencePiece vocabularies.
        assert_eq!(ids(&tok, "hello"), vec![1, 12]);
        assert_eq!(tok.decode(&[1, 12], true).unwrap(), "hello");
        // "\n" has no piece: byte fallback.
        let nl = ids(&tok, "hello\n");
        assert_eq!(nl, vec![1, 12, 13]);
        assert_eq!(tok.decode(&nl, true).unwrap(), "hello\n");
    }
}
