//! `neuron engine`: a single-model OpenAI server around one `helexa_engine::Engine`.
//!
//! The agent starts one of these per loaded model (the same binary). Protocol
//! with the agent: the engine binds first and prints one stdout line
//! `HELEXA_ENGINE_LISTEN <addr>`, then loads the model; `GET /health` answers
//! 503 `{"status":"loading"}` until the model is ready, then 200
//! `{"status":"ready", ...}`. A failed load exits non-zero with the reason on
//! stderr. Routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! `/health`, `/info`, `/tokenizer`.

use std::path::PathBuf;

/// The stdout line prefix announcing the bound address.
pub const LISTEN_LINE_PREFIX: &str = "HELEXA_ENGINE_LISTEN ";

#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// A .gguf file or a safetensors model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The model id served (default: the file stem).
    #[arg(long)]
    pub id: Option<String>,
    /// TCP address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub listen: String,
    /// Serve on a unix socket instead of TCP.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A file holding a Jinja chat template that overrides the model's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Cap on the served context, tokens.
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Default output cap when a request sets none.
    #[arg(long)]
    pub max_output: Option<usize>,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds between SSE keep-alive comments while a prompt prefills.
    #[arg(long, default_value_t = 1)]
    pub keep_alive_secs: u64,
}

/// Runs the engine server until SIGTERM/SIGINT.
pub async fn run(args: EngineArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("engine server: being implemented")
}
