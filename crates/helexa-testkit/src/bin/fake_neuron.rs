//! `fake-neuron`: the mock neuron as a process, for benchmarks and demos.
//!
//! Serves one loaded model with instant answers (or a set number of chunks),
//! both the control routes cortex polls and the OpenAI `/v1/*` routes. It
//! advertises a context window (`--context`, 8192 by default) so that
//! cortex's pre-validation runs, as it does in front of a real engine.
//! `--tool-call NAME=ARGS` (repeatable) makes every chat answer end with
//! that tool call, for client checks of tool calling through cortex.

use helexa_testkit::{Behaviour, MockModel, MockNeuron};
use std::time::Duration;

fn main() {
    let mut listen = "127.0.0.1:13131".to_string();
    let mut model = "fake-model".to_string();
    let mut chunks = 16usize;
    let mut chunk_delay_us = 0u64;
    let mut threads = 1usize;
    let mut context = 8192u32;
    let mut tool_calls = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage(&a));
        match a.as_str() {
            "--listen" => listen = val(),
            "--model" => model = val(),
            "--chunks" => chunks = val().parse().unwrap_or_else(|_| usage("--chunks")),
            "--chunk-delay-us" => {
                chunk_delay_us = val().parse().unwrap_or_else(|_| usage("--chunk-delay-us"))
            }
            "--threads" => threads = val().parse().unwrap_or_else(|_| usage("--threads")),
            "--context" => context = val().parse().unwrap_or_else(|_| usage("--context")),
            "--tool-call" => {
                let v = val();
                let (name, args) = v.split_once('=').unwrap_or_else(|| usage("--tool-call"));
                tool_calls.push((name.to_string(), args.to_string()));
            }
            _ => usage(&a),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let behaviour = Behaviour {
            chunks: (0..chunks).map(|i| format!("tok{i} ")).collect(),
            chunk_delay: Duration::from_micros(chunk_delay_us),
            record: false,
            tool_calls,
            ..Behaviour::default()
        };
        let addr = listen.parse().unwrap_or_else(|_| usage("--listen"));
        let mock = MockNeuron::start_on(
            addr,
            "fake",
            vec![MockModel::loaded(&model, context)],
            behaviour,
        )
        .await
        .unwrap_or_else(|e| {
            eprintln!("fake-neuron: cannot listen on {listen}: {e}");
            std::process::exit(1)
        });
        eprintln!("fake-neuron listening on {}", mock.url());
        tokio::signal::ctrl_c().await.ok();
    });
}

fn usage(arg: &str) -> ! {
    eprintln!(
        "fake-neuron: bad argument {arg}\nusage: fake-neuron [--listen ADDR] [--model ID] [--chunks N] [--chunk-delay-us N] [--threads N] [--context TOKENS (0 = unknown)] [--tool-call NAME=JSON_ARGUMENTS]..."
    );
    std::process::exit(2)
}
