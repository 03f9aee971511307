//! `Engine`: a loaded model behind a scheduler thread.
//!
//! PLACEHOLDER SIGNATURES — being implemented; the bodies below are replaced
//! by the real loader and scheduler.

use crate::api::*;
use helexa_api::chat::ChatMessage;
use std::sync::Arc;

/// A loaded model. Cheap to clone; all clones share one scheduler.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    meta: ModelMeta,
}

impl Engine {
    /// Loads weights, tokenizer and template, and starts the scheduler thread.
    /// Blocking: call from `spawn_blocking` or before the runtime starts.
    pub fn load(cfg: EngineConfig) -> Result<Engine, EngineError> {
        let _ = cfg;
        Err(EngineError::Inference("not implemented yet".into()))
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.inner.meta
    }

    /// The tokenizer in Hugging Face `tokenizer.json` form.
    pub fn tokenizer_json(&self) -> String {
        unimplemented!()
    }

    /// Token ids of `text`. Special tokens written in the text (such as
    /// `<|im_start|>`) become their single ids. `add_special_tokens` adds BOS
    /// where the model wants one.
    pub fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        let _ = (text, add_special_tokens);
        unimplemented!()
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        let _ = ids;
        unimplemented!()
    }

    /// Renders the model's chat template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let _ = (messages, tools, add_generation_prompt);
        unimplemented!()
    }

    /// Queues a sequence; never blocks. Events arrive on the returned stream;
    /// dropping it cancels the sequence within one decode step.
    pub fn submit(&self, req: GenerationRequest) -> Result<GenerationStream, EngineError> {
        let _ = req;
        unimplemented!()
    }

    pub fn stats(&self) -> EngineStats {
        unimplemented!()
    }

    /// Stops the scheduler: running sequences fail with `Shutdown`.
    pub fn shutdown(&self) {}
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
