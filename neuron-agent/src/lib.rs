//! neuron: the helexa node agent (and its `engine` subcommand).

pub mod engine_server;
