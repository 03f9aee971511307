//! `Engine`: a loaded model, its tokenizer and chat template, behind the
//! scheduler thread that runs every sequence.

use crate::api::*;
use crate::constraint::{Constraint, Grammar, Guidance};
use crate::gendefaults::GenerationDefaults;
use crate::model::{gguf, safetensors, Model};
use crate::scheduler::{Scheduler, Submission, WorkerConfig};
use crate::template::ChatTemplate;
use candle_core::quantized::gguf_file::Value;
use helexa_api::chat::ChatMessage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tokenizers::Tokenizer;

/// Tokens that end a turn in the chat formats we know, besides the model's EOS.
const EXTRA_EOS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
];

/// A loaded model. Cheap to clone; all clones share one scheduler.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    meta: ModelMeta,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    /// Whether `tokenize(.., true)` prepends BOS.
    add_bos: Option<u32>,
    /// `<think>` / `</think>` when the vocabulary has them.
    reasoning: Option<crate::reasoning::Markers>,
    scheduler: Scheduler,
    /// Grammar compiler and token byte table, built on first use.
    guidance: OnceLock<Result<Arc<Guidance>, String>>,
}

fn load_err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::ModelLoad {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What a loader found, for `Engine::start`.
struct Parts {
    name: String,
    architecture: String,
    context_length: usize,
    trained_context: usize,
    vocab_size: usize,
    bos_token: Option<String>,
    /// `None`: the first EOS id's token.
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    add_bos: Option<u32>,
    template: Option<String>,
    weights_bytes: u64,
    threads: usize,
    slots: usize,
    defaults: GenerationDefaults,
}

fn md_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

/// A file that belongs to the GGUF at `path`: `<stem>.<name>` beside it
/// first (a folder may hold several models), else `<name>` in its folder.
fn beside(path: &Path, name: &str) -> Option<PathBuf> {
    let dir = path.parent()?;
    let stem = path.file_stem()?.to_string_lossy();
    [dir.join(format!("{stem}.{name}")), dir.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// A `tokenizer.json` beside a GGUF, if it is this model's: otherwise (or
/// when it cannot be read) the GGUF's own tokenizer, with a warning.
fn sidecar_tokenizer(p: &Path, md: &HashMap<String, Value>) -> Result<Tokenizer, EngineError> {
    let checked = crate::tokenizer::tokenizer_from_file(p)
        .map_err(|e| e.to_string())
        .and_then(|t| crate::tokenizer::check_matches_gguf(&t, md).map(|()| t));
    match checked {
        Ok(t) => {
            tracing::info!(tokenizer = %p.display(), "using the tokenizer.json beside the model");
            Ok(t)
        }
        Err(why) => {
            tracing::warn!(tokenizer = %p.display(), reason = %why,
                "ignoring the tokenizer.json beside the model; using the GGUF's tokenizer");
            crate::tokenizer::tokenizer_from_gguf(md)
        }
    }
}

/// `chat_template` of a `tokenizer_config.json` beside a GGUF that has none.
fn sidecar_template(path: &Path) -> Option<String> {
    let p = beside(path, "tokenizer_config.json")?;
    match safetensors::read_json(&p) {
        Ok(v) => safetensors::chat_template(v.get("chat_template")),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring tokenizer_config.json beside the model");
            None
        }
    }
}

impl Engine {
    /// Loads weights, tokenizer and template, and starts the scheduler thread.
    /// Blocking: call from `spawn_blocking` or before the runtime starts.
    pub fn load(cfg: EngineConfig) -> Result<Engine, EngineError> {
        let path = cfg.model_path.clone();
        if path.is_dir() {
            return Engine::load_dir(&cfg);
        }
        if !path.exists() {
            return Err(load_err(&path, "no such file (run scripts/fetch-model?)"));
        }
        let slots = cfg.max_batch.max(1);
        if !matches!(cfg.dtype, Dtype::Auto | Dtype::F32) {
            return Err(load_err(
                &path,
                format!(
                    "dtype {:?} is for safetensors models; a GGUF runs with f32 activations",
                    cfg.dtype
                ),
            ));
        }
        // Architectures the native kernels do not implement (Gemma, Phi-3,
        // Qwen3-MoE) run on the device-generic decoder, on the CPU too.
        let native = gguf::NATIVE_ARCHITECTURES.contains(
            &gguf::architecture(&path)
                .map_err(|m| load_err(&path, m))?
                .as_str(),
        );
        if matches!(cfg.device, DeviceSpec::Cuda(_)) || cfg.kernels == Kernels::Candle || !native {
            let loaded = gguf::load_on_device(&path, cfg.device, cfg.max_context, slots)
                .map_err(|m| load_err(&path, m))?;
            let parts = Engine::gguf_parts(&cfg, &loaded, 0)?;
            let tokenizer = Engine::gguf_tokenizer(&cfg, &loaded.metadata)?;
            return Engine::start(&cfg, tokenizer, parts, Box::new(loaded.model));
        }
        let threads = cfg
            .threads
            .filter(|&t| t > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let loaded =
            gguf::load(&path, cfg.max_context, slots, threads).map_err(|m| load_err(&path, m))?;
        let parts = Engine::gguf_parts(&cfg, &loaded, threads)?;
        let tokenizer = Engine::gguf_tokenizer(&cfg, &loaded.metadata)?;
        Engine::start(&cfg, tokenizer, parts, Box::new(loaded.model))
    }

    fn gguf_tokenizer(
        cfg: &EngineConfig,
        md: &HashMap<String, Value>,
    ) -> Result<Tokenizer, EngineError> {
        let path = &cfg.model_path;
        match &cfg.tokenizer_path {
            Some(p) => crate::tokenizer::tokenizer_from_file(p),
            None => match beside(path, "tokenizer.json") {
                Some(p) => sidecar_tokenizer(&p, md),
                None => crate::tokenizer::tokenizer_from_gguf(md),
            },
        }
    }

    /// What a GGUF's metadata says about the model, whichever decoder runs it.
    fn gguf_parts<M: Model>(
        cfg: &EngineConfig,
        loaded: &gguf::GgufLoaded<M>,
        threads: usize,
    ) -> Result<Parts, EngineError> {
        let path = cfg.model_path.clone();
        let slots = cfg.max_batch.max(1);
        let md = &loaded.metadata;

        let tokenizer = Engine::gguf_tokenizer(cfg, md)?;
        let bos_id = md_u32(md, "tokenizer.ggml.bos_token_id");
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false)
            .then_some(bos_id)
            .flatten();
        Ok(Parts {
            name: loaded.name.clone().unwrap_or_else(|| stem(&path)),
            architecture: loaded.architecture.clone(),
            context_length: loaded.model.context_length(),
            trained_context: loaded.trained_context,
            vocab_size: loaded.vocab_size,
            bos_token: bos_id.and_then(|i| tokenizer.id_to_token(i)),
            eos_ids: md_u32(md, "tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
            eos_token: None,
            add_bos,
            template: md
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned()
                .or_else(|| sidecar_template(&path)),
            weights_bytes: loaded.weights_bytes,
            threads,
            slots,
            defaults: GenerationDefaults::from_gguf(md).overridden_by(
                beside(&path, "generation_config.json")
                    .map(|p| GenerationDefaults::read(&p))
                    .transpose()
                    .map_err(|m| load_err(&path, m))?
                    .flatten()
                    .unwrap_or_default(),
            ),
        })
    }

    /// A safetensors + `config.json` directory.
    fn load_dir(cfg: &EngineConfig) -> Result<Engine, EngineError> {
        let path = &cfg.model_path;
        let tok_path = cfg
            .tokenizer_path
            .clone()
            .unwrap_or_else(|| path.join("tokenizer.json"));
        if !tok_path.is_file() {
            return Err(load_err(
                path,
                format!(
                    "{} is missing: a safetensors model directory needs a tokenizer.json",
                    tok_path.display()
                ),
            ));
        }
        let slots = cfg.max_batch.max(1);
        let loaded = safetensors::load(path, cfg.device, cfg.dtype, cfg.max_context, slots)
            .map_err(|m| load_err(path, m))?;
        let tokenizer = crate::tokenizer::tokenizer_from_file(&tok_path)?;
        let bos_id = loaded.bos_token_id.or_else(|| {
            loaded
                .bos_token
                .as_deref()
                .and_then(|t| tokenizer.token_to_id(t))
        });
        let mut eos_ids = loaded.eos_token_ids.clone();
        if eos_ids.is_empty() {
            eos_ids.extend(
                loaded
                    .eos_token
                    .as_deref()
                    .and_then(|t| tokenizer.token_to_id(t)),
            );
        }
        let parts = Parts {
            name: loaded.name.clone().unwrap_or_else(|| stem(path)),
            architecture: loaded.architecture.clone(),
            context_length: loaded.model.context_length(),
            trained_context: loaded.trained_context,
            vocab_size: loaded.vocab_size,
            bos_token: loaded
                .bos_token
                .clone()
                .or_else(|| bos_id.and_then(|i| tokenizer.id_to_token(i))),
            eos_token: loaded.eos_token.clone(),
            eos_ids,
            add_bos: loaded
                .add_bos_token
                .unwrap_or(false)
                .then_some(bos_id)
                .flatten(),
            template: loaded.chat_template.clone(),
            weights_bytes: loaded.weights_bytes,
            threads: 0,
            slots,
            defaults: GenerationDefaults::read(&path.join("generation_config.json"))
                .map_err(|m| load_err(path, m))?
                .unwrap_or_default(),
        };
        Engine::start(cfg, tokenizer, parts, Box::new(loaded.model))
    }

    /// What every loader shares: EOS ids, template, meta, the scheduler.
    fn start(
        cfg: &EngineConfig,
        tokenizer: Tokenizer,
        parts: Parts,
        model: Box<dyn Model>,
    ) -> Result<Engine, EngineError> {
        let bos_token = parts.bos_token;
        let mut eos_token_ids = parts.eos_ids;
        let eos_token = parts.eos_token.or_else(|| {
            eos_token_ids
                .first()
                .and_then(|&i| tokenizer.id_to_token(i))
        });
        for &id in &parts.defaults.eos_token_ids {
            if (id as usize) < parts.vocab_size && !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        for t in EXTRA_EOS {
            if let Some(id) = tokenizer.token_to_id(t) {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let has_chat_template = cfg.chat_template.is_some() || parts.template.is_some();
        let template = match cfg.chat_template.as_ref().or(parts.template.as_ref()) {
            Some(src) => ChatTemplate::new(src, bos_token.clone(), eos_token.clone())?,
            None => ChatTemplate::chatml_default(),
        };
        let meta = ModelMeta {
            name: parts.name,
            architecture: parts.architecture,
            context_length: parts.context_length,
            vocab_size: parts.vocab_size,
            bos_token,
            eos_token,
            eos_token_ids: eos_token_ids.clone(),
            has_chat_template,
            weights_bytes: parts.weights_bytes,
            generation_defaults: parts.defaults,
        };
        tracing::info!(
            defaults = ?meta.generation_defaults.to_json(),
            source = meta.generation_defaults.source.as_deref().unwrap_or("none"),
            "sampling defaults"
        );
        tracing::info!(
            model = %meta.name,
            arch = %meta.architecture,
            context = meta.context_length,
            trained_context = parts.trained_context,
            threads = parts.threads,
            slots = parts.slots,
            "model loaded"
        );
        let reasoning = crate::reasoning::Markers::detect(&tokenizer);
        let tokenizer = Arc::new(tokenizer);
        let scheduler = Scheduler::start(
            model,
            WorkerConfig {
                tokenizer: tokenizer.clone(),
                eos_token_ids,
                prefix_cache_bytes: cfg.prefix_cache_bytes,
            },
        )?;
        Ok(Engine {
            inner: Arc::new(Inner {
                meta,
                tokenizer,
                template,
                add_bos: parts.add_bos,
                reasoning,
                scheduler,
                guidance: OnceLock::new(),
            }),
        })
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.inner.meta
    }

    /// The tokenizer in Hugging Face `tokenizer.json` form.
    pub fn tokenizer_json(&self) -> String {
        self.inner
            .tokenizer
            .to_string(false)
            .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }

    /// Token ids of `text`. Special tokens written in the text (such as
    /// `<|im_start|>`) become their single ids. `add_special_tokens` adds BOS
    /// where the model wants one.
    pub fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .inner
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens {
            if let Some(bos) = self.inner.add_bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.inner
            .tokenizer
            .decode(ids, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Renders the model's chat template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.render_chat_with(messages, tools, add_generation_prompt, None)
    }

    /// `render_chat` with extra template variables (`chat_template_kwargs`).
    pub fn render_chat_with(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        kwargs: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String, EngineError> {
        self.inner
            .template
            .render_with(messages, tools, add_generation_prompt, kwargs)
    }

    /// The model's reasoning markers, if it is a reasoning model.
    pub fn reasoning_markers(&self) -> Option<&crate::reasoning::Markers> {
        self.inner.reasoning.as_ref()
    }

    /// Token count of `text` as the model would generate it (no BOS).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.inner
            .tokenizer
            .encode(text, false)
            .map_or(0, |e| e.get_ids().len())
    }

    /// The grammar machinery, built on first use (tens of milliseconds).
    fn guidance(&self) -> Result<&Arc<Guidance>, EngineError> {
        self.inner
            .guidance
            .get_or_init(|| {
                Guidance::new(self.inner.tokenizer.clone(), &self.inner.meta.eos_token_ids)
                    .map(Arc::new)
                    .inspect_err(|e| tracing::warn!(error = %e, "constrained decoding unavailable"))
            })
            .as_ref()
            .map_err(|e| {
                EngineError::InvalidRequest(format!(
                    "constrained decoding is not available for this model's tokenizer: {e}"
                ))
            })
    }

    /// Compiles a grammar for one sequence (blocking: milliseconds for a
    /// large schema). An unsupported schema feature is an `InvalidRequest`
    /// naming it.
    pub fn compile_grammar(&self, grammar: &Grammar) -> Result<Constraint, EngineError> {
        self.guidance()?
            .compile(grammar)
            .map_err(EngineError::InvalidRequest)
    }

    /// The bytes token `id` stands for (for log-probabilities).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self.guidance() {
            Ok(g) => g.token_bytes(id),
            Err(_) => self
                .inner
                .tokenizer
                .decode(&[id], false)
                .unwrap_or_default()
                .into_bytes(),
        }
    }

    /// Whether the chat template itself renders `tools`.
    pub fn template_handles_tools(&self) -> bool {
        self.inner.template.uses_tools()
    }

    /// Whether the chat template writes calls as `<tool_call>` blocks.
    pub fn template_uses_tool_call_tags(&self) -> bool {
        self.inner.template.uses_tool_call_tags()
    }

    /// Queues a sequence; never blocks. Events arrive on the returned stream;
    /// dropping it cancels the sequence within one decode step.
    pub fn submit(&self, req: GenerationRequest) -> Result<GenerationStream, EngineError> {
        let meta = &self.inner.meta;
        if req.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= meta.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                meta.vocab_size
            )));
        }
        if req.prompt.len() + req.max_new_tokens > meta.context_length {
            return Err(EngineError::ContextLength {
                max: meta.context_length,
                prompt: req.prompt.len(),
                requested: req.max_new_tokens,
            });
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.inner.scheduler.submit(Submission { req, tx })?;
        Ok(GenerationStream { rx })
    }

    pub fn stats(&self) -> EngineStats {
        self.inner.scheduler.stats()
    }

    /// Stops the scheduler: running sequences fail with `Shutdown`.
    pub fn shutdown(&self) {
        self.inner.scheduler.shutdown();
    }
}

/// Events of one sequence. Dropping it cancels the sequence.
pub struct GenerationStream {
    rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
}

impl GenerationStream {
    pub async fn next(&mut self) -> Option<GenEvent> {
        self.rx.recv().await
    }

    pub fn blocking_next(&mut self) -> Option<GenEvent> {
        self.rx.blocking_recv()
    }
}

#[cfg(test)]
mod sidecar_tests {
    use super::*;

    #[test]
    fn files_beside_a_gguf_prefer_the_stem_and_give_the_template() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m.Q4.gguf");
        std::fs::write(&gguf, b"").unwrap();
        assert_eq!(beside(&gguf, "tokenizer_config.json"), None);
        assert_eq!(sidecar_template(&gguf), None);

        let shared = dir.path().join("tokenizer_config.json");
        std::fs::write(&shared, r#"{"chat_template": "shared {{ messages }}"}"#).unwrap();
        assert_eq!(beside(&gguf, "tokenizer_config.json"), Some(shared));
        assert_eq!(
            sidecar_template(&gguf).as_deref(),
            Some("shared {{ messages }}")
        );

        let own = dir.path().join("m.Q4.tokenizer_config.json");
        std::fs::write(
            &own,
            r#"{"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "own"}]}"#,
        )
        .unwrap();
        assert_eq!(beside(&gguf, "tokenizer_config.json"), Some(own.clone()));
        assert_eq!(sidecar_template(&gguf).as_deref(), Some("own"));

        // Unreadable JSON: no template, not a failure.
        std::fs::write(&own, "{not json").unwrap();
        assert_eq!(sidecar_template(&gguf), None);
    }
}
