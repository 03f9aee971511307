//! Public types of the engine. The contract the `neuron engine` server codes
//! against; implementation modules sit behind it.

use std::path::PathBuf;

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

/// How to load one model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A `.gguf` file, or a directory with `config.json` + `*.safetensors`.
    pub model_path: PathBuf,
    /// `tokenizer.json` to use; default: beside the weights, else from GGUF metadata.
    pub tokenizer_path: Option<PathBuf>,
    /// A Jinja chat template overriding the model's own.
    pub chat_template: Option<String>,
    pub device: DeviceSpec,
    /// Cap on the served context (tokens); default: the model's trained context.
    pub max_context: Option<usize>,
    /// Sequences decoded together at most (continuous batching width).
    pub max_batch: usize,
    /// CPU threads for the matmuls; default: all cores.
    pub threads: Option<usize>,
    /// KV cache kept for finished sequences' prefixes (the prefix cache),
    /// bytes at most; least recently used prefixes go first. 0 turns off
    /// reuse across requests (the choices of one `n` > 1 request still
    /// share their prompt).
    pub prefix_cache_bytes: u64,
    /// Which forward pass runs a GGUF on the CPU (CUDA always runs the
    /// device-generic one).
    pub kernels: Kernels,
    /// Weights, activations and KV cache of a safetensors model.
    pub dtype: Dtype,
}

/// `--dtype`: what a safetensors model computes in. GGUF models always run
/// with f32 activations (candle's quantized kernels take f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dtype {
    /// f32 on the CPU; on CUDA the checkpoint's f16, else bf16.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Dtype::Auto),
            "f32" | "float32" => Ok(Dtype::F32),
            "f16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            other => Err(format!(
                "dtype must be auto, f32, f16 or bf16, got {other:?}"
            )),
        }
    }
}

/// The forward pass of a GGUF model on the CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kernels {
    /// Our own CPU kernels (`kernels/`): the fastest on a CPU.
    #[default]
    Native,
    /// The device-generic decoder over candle's tensors: what CUDA runs,
    /// here on candle's CPU device (to test or compare it).
    Candle,
}

impl std::str::FromStr for Kernels {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(Kernels::Native),
            "candle" => Ok(Kernels::Candle),
            other => Err(format!(
                "kernels must be \"native\" or \"candle\", got {other:?}"
            )),
        }
    }
}

/// Default prefix cache budget: 1 GiB.
pub const DEFAULT_PREFIX_CACHE_BYTES: u64 = 1 << 30;

impl EngineConfig {
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        EngineConfig {
            model_path: model_path.into(),
            tokenizer_path: None,
            chat_template: None,
            device: DeviceSpec::Cpu,
            max_context: None,
            max_batch: 8,
            threads: None,
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE_BYTES,
            kernels: Kernels::Native,
            dtype: Dtype::Auto,
        }
    }
}

/// What a loaded model is.
#[derive(Debug, Clone, Default)]
pub struct ModelMeta {
    /// `general.name` or the file stem.
    pub name: String,
    /// `llama`, `qwen2`, `qwen3`, ...
    pub architecture: String,
    /// The context this engine really serves (prompt + output), in tokens.
    pub context_length: usize,
    pub vocab_size: usize,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every token id that ends generation (EOS, `<|im_end|>`, EOT...).
    pub eos_token_ids: Vec<u32>,
    pub has_chat_template: bool,
    /// Bytes of weights resident (mapped or on device).
    pub weights_bytes: u64,
    /// The model's own sampling defaults, for fields a request omits.
    pub generation_defaults: crate::gendefaults::GenerationDefaults,
}

/// Sampling settings of one sequence. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 0 = off.
    pub min_p: f32,
    /// Reproducible sampling when set.
    pub seed: Option<u64>,
    /// 1.0 = off (llama.cpp semantics, over the whole context).
    pub repetition_penalty: f32,
    /// OpenAI semantics, over generated tokens.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Added to the logits of these token ids before anything else (OpenAI
    /// `logit_bias`; -100 bans a token in practice, 100 forces it).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Tokens to generate at most; the caller has checked prompt + this fits.
    pub max_new_tokens: usize,
    /// Stop strings: matched across token boundaries and never emitted.
    pub stop: Vec<String>,
    /// A grammar every generated token must follow (structured outputs, tool
    /// calls); the sequence also stops when the grammar is complete.
    pub constraint: Option<crate::constraint::Constraint>,
    /// Report each generated token's log-probability and this many
    /// alternatives (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
}

/// One generated token's log-probability, with the most likely alternatives
/// (best first), all under the distribution the token was drawn from (after
/// `logit_bias`, penalties and any grammar mask; before temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_new_tokens` reached (or the context filled).
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a running sequence reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The prompt has been prefilled; decoding starts.
    Prefilled { prompt_tokens: usize },
    /// New text: UTF-8 complete, with any possible stop-string prefix held back.
    /// `tokens` is how many generated tokens this text covers (may be 0 or >1).
    Text {
        text: String,
        tokens: usize,
        /// One entry per token this text covers, when the request asked for
        /// log-probabilities (tokens whose text a stop string swallowed are
        /// reported with the text before it).
        logprobs: Vec<TokenLogprob>,
    },
    /// The sequence ended.
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens whose KV came from the prefix cache.
        cached_tokens: usize,
        /// The stop string that ended the sequence (`reason` is then `Stop`);
        /// `None` for EOS, a finished grammar, or length.
        stop_string: Option<String>,
    },
    /// The sequence failed; no more events follow.
    Failed { message: String },
}

/// Running counters of an engine.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    /// Sequences admitted and not finished (prefilling, decoding or waiting).
    pub in_flight: usize,
    pub tokens_generated_total: u64,
    pub prompt_tokens_total: u64,
    /// Of `prompt_tokens_total`, those served from the prefix cache.
    pub prompt_tokens_cached_total: u64,
    /// KV bytes the prefix cache holds for finished sequences now.
    pub prefix_cache_bytes: u64,
    /// Cached prefixes dropped to stay within the budget.
    pub prefix_cache_evictions_total: u64,
    /// Recent prefill throughput, tokens/s.
    pub tok_s_prefill: f64,
    /// Recent decode throughput over all sequences, tokens/s.
    pub tok_s_decode: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load model from {path}: {message}")]
    ModelLoad { path: String, message: String },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    #[error("This model's maximum context length is {max} tokens. However, you requested {} tokens ({prompt} in the messages, {requested} in the completion).", prompt + requested)]
    ContextLength {
        max: usize,
        prompt: usize,
        requested: usize,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the engine is shutting down")]
    Shutdown,
}
