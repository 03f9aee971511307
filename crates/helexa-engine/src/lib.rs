//! helexa's inference engine: one loaded model, its tokenizer and chat
//! template, sampling, and a scheduler that runs many sequences at once.
//!
//! The public surface is small on purpose: `Engine::load` a model, render and
//! tokenize prompts, `submit` a `GenerationRequest`, read `GenEvent`s from the
//! returned stream. Dropping the stream cancels the sequence within one decode
//! step. Sentence-embedding models (BERT) load as an `Embedder` instead
//! (`embed`). The OpenAI HTTP layer lives in `neuron-agent` (`neuron engine`).

mod api;

pub mod constraint;

pub use api::*;

pub mod detok;
pub mod embed;
mod engine;
pub mod gendefaults;
mod kernels;
mod model;
pub mod reasoning;
pub mod sampling;
mod scheduler;
pub mod stop;
pub mod template;
pub mod tokenizer;
pub mod toolcall;
pub use constraint::{Constraint, Grammar, Guidance};
pub use embed::{is_embedding_model, EmbedConfig, Embedder};
pub use engine::{Engine, GenerationStream};
/// GGUF architectures the native CPU kernels run (the rest go to the
/// device-generic decoder).
pub use model::gguf::NATIVE_ARCHITECTURES;
