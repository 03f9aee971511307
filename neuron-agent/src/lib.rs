//! neuron: the helexa node agent (and its `engine` subcommand).
//!
//! The agent discovers the machine (`discovery`, `gpu`), keeps the catalogue
//! of models (`registry`), runs and watches one engine process per loaded
//! model (`supervisor`; `engine_server` is the engine itself), admits requests per
//! model (`admission`) and serves docs/protocol.md §3 over HTTP (`api`), with
//! Prometheus metrics on their own listener (`metrics`); `server` ties them
//! together with start-up and bounded shutdown.

pub mod admission;
pub mod api;
pub mod config;
pub mod discovery;
pub mod engine_server;
pub mod gpu;
pub mod hub;
pub mod memory;
pub mod metrics;
pub mod procfs;
pub mod registry;
pub mod server;
pub mod supervisor;
pub mod telemetry;

pub use config::Config;
pub use server::{run_agent, Agent, AgentArgs};
