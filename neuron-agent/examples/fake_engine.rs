//! A stand-in for `neuron engine`, for the agent's integration tests: it
//! speaks the agent <-> engine protocol (listen line, `/health`, `/info`,
//! `/tokenizer`, OpenAI routes) without a model.
//!
//! Behaviour comes from the JSON file passed as `--model`:
//! `{"ready_delay_ms": 0, "fail_load": "reason", "exit_code": 3,
//!   "context_length": 4096, "max_output_tokens": 512, "tokenizer": true,
//!   "ignore_sigterm": false, "log": "/path/to/log", "unhealthy_after_ms": null}`
//! (`unhealthy_after_ms`: once ready, `/health` answers 500 after that long).
//! Each request may carry `"fake": {"chunks": 3, "delay_ms": 10,
//! "die": false, "die_after_chunks": null, "stall_after_chunks": null,
//! "head_delay_ms": 0}` (`stall_after_chunks`: the stream then sends nothing
//! more, while the engine stays healthy)
//! (`head_delay_ms`: wait that long before answering at all). A stream
//! with `stream_options.include_usage` ends with a usage-only chunk, as the
//! real engine's does; usage is `prompt_tokens` 1 and one token per chunk. The log gets one line per event
//! (`pid N`, `args …`, `start K`, `end K complete|dropped`) so that tests can
//! see what the engine saw.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::{Parser, Subcommand};
use neuron_agent::engine_server::EngineArgs;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Engine(EngineArgs),
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct Behaviour {
    ready_delay_ms: u64,
    fail_load: Option<String>,
    exit_code: Option<i32>,
    context_length: Option<u32>,
    max_output_tokens: Option<u32>,
    tokenizer: Option<bool>,
    ignore_sigterm: bool,
    log: Option<String>,
    unhealthy_after_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Fake {
    chunks: u32,
    delay_ms: u64,
    die: bool,
    die_after_chunks: Option<u32>,
    stall_after_chunks: Option<u32>,
    head_delay_ms: u64,
}

struct Engine {
    id: String,
    b: Behaviour,
    ready: AtomicBool,
    unhealthy: AtomicBool,
    in_flight: AtomicU64,
    generated: AtomicU64,
    next: AtomicU64,
    log: Mutex<Option<std::fs::File>>,
}

impl Engine {
    fn log(&self, line: &str) {
        if let Some(f) = self.log.lock().unwrap().as_mut() {
            let _ = writeln!(f, "{line}");
            let _ = f.flush();
        }
    }
}

type S = Arc<Engine>;

#[tokio::main]
async fn main() {
    let Cmd::Engine(args) = Cli::parse().cmd;
    let b: Behaviour = std::fs::read_to_string(&args.model)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let log = b.log.as_ref().map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .expect("log file")
    });
    let engine = Arc::new(Engine {
        id: args.id.clone().unwrap_or_else(|| "fake".into()),
        b: b.clone(),
        ready: AtomicBool::new(false),
        unhealthy: AtomicBool::new(false),
        in_flight: AtomicU64::new(0),
        generated: AtomicU64::new(0),
        next: AtomicU64::new(0),
        log: Mutex::new(log),
    });
    engine.log(&format!("pid {}", std::process::id()));
    engine.log(&format!(
        "args {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    ));
    if b.ignore_sigterm {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        let e = engine.clone();
        tokio::spawn(async move {
            while term.recv().await.is_some() {
                e.log("sigterm ignored");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(&args.listen).await.unwrap();
    println!("HELEXA_ENGINE_LISTEN {}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/tokenizer", get(tokenizer))
        .route("/v1/chat/completions", post(generate))
        .route("/v1/completions", post(generate))
        .with_state(engine.clone());
    let e = engine.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(e.b.ready_delay_ms)).await;
        if let Some(reason) = &e.b.fail_load {
            eprintln!("error: {reason}");
            std::process::exit(e.b.exit_code.unwrap_or(3));
        }
        e.ready.store(true, Ordering::SeqCst);
        if let Some(ms) = e.b.unhealthy_after_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            e.unhealthy.store(true, Ordering::SeqCst);
            e.log("unhealthy");
        }
        eprintln!("fake engine ready");
    });
    axum::serve(listener, app).await.unwrap();
}

async fn health(State(e): State<S>) -> Response {
    if e.unhealthy.load(Ordering::SeqCst) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"status": "broken"})),
        )
            .into_response();
    }
    if !e.ready.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response();
    }
    Json(json!({
        "status": "ready",
        "in_flight": e.in_flight.load(Ordering::SeqCst),
        "tokens_generated_total": e.generated.load(Ordering::SeqCst),
        "prompt_tokens_total": 0,
        "tok_s_prefill": 100.0,
        "tok_s_decode": 50.0,
    }))
    .into_response()
}

async fn info(State(e): State<S>) -> Json<Value> {
    Json(json!({
        "id": e.id,
        "context_length": e.b.context_length.unwrap_or(8192),
        "max_output_tokens": e.b.max_output_tokens.unwrap_or(2048),
        "architecture": "fake",
        "weights_bytes": 3 * 1024 * 1024,
        "capabilities": ["chat", "completions"],
        "tokenizer": null,
    }))
}

async fn tokenizer(State(e): State<S>) -> Response {
    if e.b.tokenizer == Some(false) {
        return (StatusCode::NOT_FOUND, "no tokenizer").into_response();
    }
    Json(json!({"version": "1.0", "model": {"type": "fake", "id": e.id}})).into_response()
}

/// Logs `end K dropped` unless the stream completed.
struct Guard {
    e: S,
    k: u64,
    complete: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.e.in_flight.fetch_sub(1, Ordering::SeqCst);
        let how = if self.complete { "complete" } else { "dropped" };
        self.e.log(&format!("end {} {how}", self.k));
    }
}

async fn generate(State(e): State<S>, Json(body): Json<Value>) -> Response {
    let fake: Fake = body
        .get("fake")
        .and_then(|f| serde_json::from_value(f.clone()).ok())
        .unwrap_or_default();
    if fake.die {
        e.log("die");
        std::process::exit(9);
    }
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    tokio::time::sleep(Duration::from_millis(fake.head_delay_ms)).await;
    let k = e.next.fetch_add(1, Ordering::SeqCst);
    e.in_flight.fetch_add(1, Ordering::SeqCst);
    e.log(&format!("start {k}"));
    let mut guard = Guard {
        e: e.clone(),
        k,
        complete: false,
    };
    let chunks = fake.chunks.max(1);
    let delay = Duration::from_millis(fake.delay_ms);
    if !stream {
        for i in 0..chunks {
            if fake.die_after_chunks == Some(i) {
                std::process::exit(9);
            }
            tokio::time::sleep(delay).await;
        }
        e.generated.fetch_add(chunks as u64, Ordering::SeqCst);
        guard.complete = true;
        return Json(json!({
            "id": format!("chatcmpl-{k}"), "object": "chat.completion", "created": 0,
            "model": e.id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok ".repeat(chunks as usize)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": chunks, "total_tokens": chunks + 1},
        }))
        .into_response();
    }
    let id = e.id.clone();
    let body = futures_util::stream::unfold((0u32, guard), move |(i, mut guard)| {
        let id = id.clone();
        let die_after = fake.die_after_chunks;
        let stall_after = fake.stall_after_chunks;
        async move {
            if i > chunks {
                return None;
            }
            if die_after == Some(i) {
                std::process::exit(9);
            }
            if stall_after == Some(i) {
                guard.e.log("stalled");
                std::future::pending::<()>().await;
            }
            if i == chunks {
                guard.complete = true;
                let mut last = String::new();
                if include_usage {
                    let u = json!({"id": "c", "object": "chat.completion.chunk", "model": id,
                        "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": chunks,
                        "total_tokens": chunks + 1}});
                    last.push_str(&format!("data: {u}\n\n"));
                }
                last.push_str("data: [DONE]\n\n");
                return Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::from(last)),
                    (i + 1, guard),
                ));
            }
            if i > 0 {
                tokio::time::sleep(delay).await;
            }
            guard.e.generated.fetch_add(1, Ordering::SeqCst);
            let ev = json!({"id": "c", "object": "chat.completion.chunk", "model": id,
                "choices": [{"index": 0, "delta": {"content": format!("t{i} ")}, "finish_reason": null}]});
            Some((
                Ok(bytes::Bytes::from(format!("data: {ev}\n\n"))),
                (i + 1, guard),
            ))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .unwrap()
}
