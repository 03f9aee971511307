//! `neuron`: the helexa node agent (default) and `neuron engine`, the
//! single-model OpenAI server the agent starts once per loaded model.
//! Flags only; the behaviour lives in the library so tests can build it.

use clap::{Parser, Subcommand};
use neuron_agent::engine_server::EngineArgs;
use neuron_agent::AgentArgs;

#[derive(Debug, Parser)]
#[command(
    name = "neuron",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent (the default when no subcommand is given).
    Agent(AgentArgs),
    /// Serve one model over the OpenAI API (started by the agent per model).
    /// Boxed: the engine's many flags would make every `Command` that large.
    Engine(Box<EngineArgs>),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Engine(args)) => {
            neuron_agent::telemetry::init("text");
            neuron_agent::engine_server::run(*args).await
        }
        Some(Command::Agent(args)) => neuron_agent::run_agent(args).await,
        None => neuron_agent::run_agent(cli.agent).await,
    }
}
