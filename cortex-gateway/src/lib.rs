//! cortex: the OpenAI-compatible gateway in front of a fleet of neurons.
//!
//! `server::start` builds exactly what the `cortex` binary runs, so tests
//! drive the real thing in-process on `127.0.0.1:0`.

pub mod admin;
pub mod advice;
pub mod api;
pub mod autoscale;
pub mod config;
pub mod fleet;
pub mod front;
pub mod h1;
pub mod inference;
pub mod keys;
pub mod loader;
pub mod metrics;
pub mod placement;
pub mod policy;
pub mod poller;
pub mod prevalidate;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod router;
pub mod server;
pub mod state;
pub mod tokens;
pub mod translate;
pub mod upstream;
pub mod version;

pub use config::Config;
pub use server::{start, Running, StartError};
