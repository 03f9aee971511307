//! `/v1/embeddings` on the engine's OpenAI server, in-process on
//! 127.0.0.1:0, with the real all-MiniLM-L6-v2 (scripts/fetch-embedding-model).
//!
//! The vectors are checked against `tests/fixtures/embeddings.json`, made by
//! an independent numpy forward pass (scripts/gen-embedding-fixtures), not
//! against the engine itself; a batch must give the vectors of one-by-one
//! requests. Then every input form, base64, usage, and each refusal.
//!
//! Skipped, with a message, only when the model folder is absent
//! (scripts/test fetches it, so CI never skips).

use base64::Engine as _;
use helexa_engine::{EmbedConfig, Embedder, Engine, EngineConfig};
use neuron_agent::engine_server::{router, EngineState};
use serde_json::{json, Value};
use std::path::PathBuf;

const MODEL_ID: &str = "minilm";
const EMBED_DIR: &str = "all-MiniLM-L6-v2";
const CHAT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_dir() -> PathBuf {
    std::env::var_os("HELEXA_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/helexa/models")
        })
}

/// The embedding model's folder, or `None` (and a message) when absent.
fn embed_path() -> Option<PathBuf> {
    let p = model_dir().join(EMBED_DIR);
    if p.join("model.safetensors").is_file() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: the embedding model {} is absent; run scripts/fetch-embedding-model (or set HELEXA_MODEL_DIR)",
            p.display()
        );
        None
    }
}

struct Fixture {
    text: String,
    tokens: Vec<u32>,
    embedding: Vec<f32>,
}

fn fixtures() -> Vec<Fixture> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embeddings.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    doc["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Fixture {
            text: s["text"].as_str().unwrap().to_string(),
            tokens: serde_json::from_value(s["tokens"].clone()).unwrap(),
            embedding: serde_json::from_value(s["embedding"].clone()).unwrap(),
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn vector(v: &Value) -> Vec<f32> {
    serde_json::from_value(v["embedding"].clone()).expect("a float vector")
}

struct Server {
    base: String,
    http: reqwest::Client,
}

impl Server {
    async fn serve(state: std::sync::Arc<EngineState>) -> Server {
        let app = router(state, 8 << 20);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        Server {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    /// The embedding model with `max_batch_tokens` and `max_inputs`.
    async fn embedder(path: PathBuf, max_batch_tokens: usize, max_inputs: usize) -> Server {
        let mut cfg = EmbedConfig::new(path);
        cfg.max_batch_tokens = max_batch_tokens;
        let e = tokio::task::spawn_blocking(move || Embedder::load(cfg))
            .await
            .unwrap()
            .expect("embedding model loads");
        Server::serve(EngineState::loaded_embedder(MODEL_ID, e, max_inputs)).await
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r.json().await.unwrap()
    }

    async fn embed(&self, input: Value) -> Value {
        let (st, v) = self
            .post(
                "/v1/embeddings",
                &json!({"model": MODEL_ID, "input": input}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        v
    }
}

/// The envelope's code and param of a refused request.
async fn refused(s: &Server, body: Value) -> (String, Option<String>, String) {
    let (st, v) = s.post("/v1/embeddings", &body).await;
    assert_eq!(st, 400, "expected a refusal of {body}: {v}");
    let e = &v["error"];
    (
        e["code"].as_str().unwrap().to_string(),
        e["param"].as_str().map(str::to_string),
        e["message"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_match_the_numpy_reference_one_by_one_and_batched() {
    let Some(path) = embed_path() else { return };
    // 512 padded tokens per pass: the 289-token sentence runs alone and
    // the rest together, padded to their longest.
    let s = Server::embedder(path, 512, 2048).await;
    let fx = fixtures();
    assert!(fx.len() >= 6 && fx.iter().any(|f| f.tokens.len() > 256));

    let mut singles = Vec::new();
    for f in &fx {
        let v = s.embed(json!(f.text)).await;
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], MODEL_ID);
        assert_eq!(v["data"][0]["object"], "embedding");
        assert_eq!(v["data"][0]["index"], 0);
        // Tokenized exactly as the reference: the same count.
        assert_eq!(
            v["usage"]["prompt_tokens"].as_u64(),
            Some(f.tokens.len() as u64),
            "{:?}",
            f.text
        );
        let got = vector(&v["data"][0]);
        assert_eq!(got.len(), 384);
        let cos = cosine(&got, &f.embedding);
        eprintln!(
            "cosine vs numpy reference {cos:.7} ({} tokens) {:?}",
            f.tokens.len(),
            f.text.chars().take(40).collect::<String>()
        );
        assert!(cos >= 0.999, "cosine {cos} for {:?}", f.text);
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
        singles.push(got);
    }

    // Unrelated sentences are not all alike (a constant vector would pass
    // the norm check but not this).
    assert!(cosine(&singles[0], &singles[1]) < 0.5);

    // The whole list in one request: same vectors, in order.
    let texts: Vec<&str> = fx.iter().map(|f| f.text.as_str()).collect();
    let v = s.embed(json!(texts)).await;
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), fx.len());
    let total: usize = fx.iter().map(|f| f.tokens.len()).sum();
    assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(total as u64));
    assert_eq!(v["usage"]["total_tokens"].as_u64(), Some(total as u64));
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        let got = vector(d);
        let cos = cosine(&got, &singles[i]);
        let diff = got
            .iter()
            .zip(&singles[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("input {i}: batched vs alone cosine {cos:.8}, max abs diff {diff:e}");
        assert!(
            cos >= 0.99999 && diff < 1e-4,
            "input {i}: batched differs from alone (cosine {cos}, max diff {diff})"
        );
        assert!(cosine(&got, &fx[i].embedding) >= 0.999);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_inputs_base64_and_usage() {
    let Some(path) = embed_path() else { return };
    let s = Server::embedder(path, 8192, 2048).await;
    let fx = fixtures();
    let text_vec = vector(&s.embed(json!(fx[0].text)).await["data"][0]);

    // One list of token ids is one input: the same vector as the text.
    let v = s.embed(json!(fx[0].tokens)).await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64(),
        Some(fx[0].tokens.len() as u64)
    );
    assert!(cosine(&vector(&v["data"][0]), &text_vec) > 0.99999);

    // Lists of token ids: one vector each.
    let v = s.embed(json!([fx[0].tokens, fx[1].tokens])).await;
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(cosine(&vector(&data[0]), &text_vec) > 0.99999);
    assert!(cosine(&vector(&data[1]), &fx[1].embedding) >= 0.999);
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64(),
        Some((fx[0].tokens.len() + fx[1].tokens.len()) as u64)
    );

    // base64: little-endian f32 of the same numbers; `user` is accepted.
    let (st, b) = s
        .post(
            "/v1/embeddings",
            &json!({"model": MODEL_ID, "input": [fx[0].text], "encoding_format": "base64", "user": "u-1"}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().expect("a base64 string"))
        .unwrap();
    assert_eq!(bytes.len(), 384 * 4);
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, text_vec);
    assert_eq!(b["usage"]["prompt_tokens"].as_u64(), Some(12));

    // `encoding_format: "float"` and `dimensions` equal to the model's own.
    let (st, f) = s
        .post(
            "/v1/embeddings",
            &json!({"model": MODEL_ID, "input": fx[0].text, "encoding_format": "float", "dimensions": 384}),
        )
        .await;
    assert_eq!(st, 200, "{f}");
    assert_eq!(vector(&f["data"][0]), text_vec);

    // Exactly the window (512 tokens) is served.
    let mut ids = vec![101u32];
    ids.extend(std::iter::repeat_n(1996u32, 510));
    ids.push(102);
    let v = s.embed(json!(ids)).await;
    assert_eq!(v["usage"]["prompt_tokens"], 512);

    // The server's model list and info say what it is.
    let models = s.get("/v1/models").await;
    assert_eq!(models["data"][0]["capabilities"], json!(["embeddings"]));
    assert_eq!(models["data"][0]["context_length"], 512);
    let info = s.get("/info").await;
    assert_eq!(info["capabilities"], json!(["embeddings"]));
    assert_eq!(info["dimensions"], 384);
    assert_eq!(info["pooling"], "mean");
    assert_eq!(info["normalized"], true);
    let health = s.get("/health").await;
    assert_eq!(health["status"], "ready");
    assert!(health["prompt_tokens_total"].as_u64().unwrap() >= 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_what_is_wrong() {
    let Some(path) = embed_path() else { return };
    let s = Server::embedder(path, 8192, 4).await;
    let m = MODEL_ID;

    let (code, param, msg) =
        refused(&s, json!({"model": m, "input": "a", "dimensions": 128})).await;
    assert_eq!(
        (code.as_str(), param.as_deref()),
        ("invalid_request", Some("dimensions"))
    );
    assert!(msg.contains("384"), "{msg}");

    let (_, param, msg) = refused(&s, json!({"model": m, "input": "a", "truncate": true})).await;
    assert_eq!(param.as_deref(), Some("truncate"));
    assert!(msg.contains("`truncate`"), "{msg}");

    for (input, want) in [
        (json!(""), "input"),
        (json!([]), "input"),
        (json!(["a", ""]), "input[1]"),
        (json!([[101, 102], []]), "input[1]"),
        (json!(["a", 5]), "input[1]"),
        (json!([101, -1]), "input[1]"),
        (json!([101, 30522, 102]), "input[0][1]"),
        (json!({"text": "a"}), "input"),
        (Value::Null, "input"),
    ] {
        let (code, param, _) = refused(&s, json!({"model": m, "input": input})).await;
        assert_eq!(code, "invalid_request", "{input}");
        assert_eq!(param.as_deref(), Some(want), "{input}");
    }

    let (_, param, _) = refused(
        &s,
        json!({"model": m, "input": "a", "encoding_format": "int8"}),
    )
    .await;
    assert_eq!(param.as_deref(), Some("encoding_format"));
    let (_, param, _) = refused(&s, json!({"model": m, "input": "a", "user": 7})).await;
    assert_eq!(param.as_deref(), Some("user"));

    // More inputs than max_inputs (4 here).
    let (_, param, msg) =
        refused(&s, json!({"model": m, "input": ["a", "b", "c", "d", "e"]})).await;
    assert_eq!(param.as_deref(), Some("input"));
    assert!(msg.contains("at most 4"), "{msg}");

    // Over the window: refused as OpenAI does, never truncated.
    let long = "word ".repeat(600);
    let (st, v) = s
        .post(
            "/v1/embeddings",
            &json!({"model": m, "input": ["short", long]}),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    let e = &v["error"];
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "input[1]");
    assert_eq!(e["max"], 512);
    assert_eq!(e["prompt_tokens"], 602);
    assert!(e["message"]
        .as_str()
        .unwrap()
        .starts_with("This model's maximum context length is 512 tokens."));
    let mut ids = vec![101u32];
    ids.extend(std::iter::repeat_n(1996u32, 511));
    ids.push(102);
    let (code, param, _) = refused(&s, json!({"model": m, "input": [ids]})).await;
    assert_eq!(
        (code.as_str(), param.as_deref()),
        ("context_length_exceeded", Some("input[0]"))
    );

    // Generation routes on an embedding model: 400 naming the capability.
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": m, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "model");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("`chat` capability") && msg.contains("embeddings"),
        "{msg}"
    );
    let (st, v) = s
        .post("/v1/completions", &json!({"model": m, "prompt": "hi"}))
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`completions` capability"));

    // Still serving after all that.
    s.embed(json!("still here")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_model_refuses_embeddings_naming_the_capability() {
    let p = model_dir().join(CHAT_FILE);
    if !p.is_file() {
        eprintln!(
            "SKIPPED: the chat model {} is absent; run scripts/fetch-model",
            p.display()
        );
        return;
    }
    let mut cfg = EngineConfig::new(p);
    cfg.max_batch = 1;
    cfg.max_context = Some(512);
    let engine = tokio::task::spawn_blocking(move || Engine::load(cfg))
        .await
        .unwrap()
        .expect("model loads");
    let s = Server::serve(EngineState::loaded("smollm2", engine)).await;
    let (st, v) = s
        .post(
            "/v1/embeddings",
            &json!({"model": "smollm2", "input": "hello"}),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_request");
    assert_eq!(v["error"]["param"], "model");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`embeddings` capability"), "{msg}");
    assert!(v["error"]["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("chat")));
    let models = s.get("/v1/models").await;
    let caps = models["data"][0]["capabilities"].as_array().unwrap();
    assert!(caps.contains(&json!("chat")) && !caps.contains(&json!("embeddings")));
}
