//! Test doubles for helexa: an in-process mock neuron that speaks docs/protocol.md §3.
//!
//! Tests start real HTTP servers on `127.0.0.1:0` and steer them at run time
//! (reported load, latency, chunking, refusals, mid-stream death, tokenizer)
//! while the mock records what it received, so assertions are about the wire.

pub mod mock_neuron;
pub mod tiny_arch;
pub mod tiny_model;
pub mod tokenizer;

pub use mock_neuron::{Behaviour, MockModel, MockNeuron, Recorded, RecordedRequest, Refusal};
pub use tokenizer::tiny_tokenizer_json;
