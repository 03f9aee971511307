//! Models by name (docs/protocol.md §9) through the real agent, against a
//! local mock of the Hugging Face hub HTTP API: the repo metadata route
//! (`/api/models/{repo}/revision/{rev}?blobs=true`) and `HEAD`/`GET
//! /{repo}/resolve/{rev}/{file}` with the hub's headers (`X-Repo-Commit`,
//! `ETag`, `X-Linked-Etag`, `X-Linked-Size`) and `Range`. The mock can cut
//! a file short, corrupt it or slow it down once, and records every request
//! with its `Authorization` header.

mod support;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use neuron_agent::config::{Config, ModelSpec, SourceConfig};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Clone, Default)]
struct MockFile {
    bytes: Arc<Vec<u8>>,
    /// LFS files are named by their sha256; others by a git-like etag.
    lfs: bool,
}

#[derive(Default)]
struct Faults {
    /// Next full GET of this file answers only its first half (honest
    /// Content-Length of the half).
    truncate_once: Vec<String>,
    /// Next full GET sends half the bytes, then drops the connection.
    drop_once: Vec<String>,
    /// Next full GET of this file has one byte flipped.
    corrupt_once: Vec<String>,
    /// Send files in 64 KiB chunks with this pause between them.
    slow_ms: u64,
    /// Answer every repo with 404 (a source that does not have it).
    not_found: bool,
    /// Next `HEAD` of this file answers 503.
    head_503_once: Vec<String>,
    /// Every request about these repos answers 503.
    unavailable: Vec<String>,
    /// Send LFS files from this other server (the hub's CDN): `HEAD` and
    /// `GET` answer 302 with the `X-Linked-*` headers, as the hub does.
    redirect_to: Option<String>,
}

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    auth: Option<String>,
    range: Option<String>,
}

/// A repo's files, in listing order: (name, contents).
type RepoFiles = Vec<(String, MockFile)>;

#[derive(Clone, Default)]
struct Mock {
    repos: Arc<Mutex<HashMap<String, RepoFiles>>>,
    /// A repo's model card front matter (`cardData` in its metadata).
    cards: Arc<Mutex<HashMap<String, Value>>>,
    faults: Arc<Mutex<Faults>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct Hub {
    mock: Mock,
    url: String,
}

impl Hub {
    async fn start() -> Hub {
        let mock = Mock::default();
        let app = axum::Router::new().fallback(serve).with_state(mock.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Hub { mock, url }
    }

    fn add(&self, repo: &str, files: Vec<(&str, Vec<u8>)>) {
        let files = files
            .into_iter()
            .map(|(n, b)| {
                let lfs = n.ends_with(".gguf");
                (
                    n.to_string(),
                    MockFile {
                        bytes: Arc::new(b),
                        lfs,
                    },
                )
            })
            .collect();
        self.mock
            .repos
            .lock()
            .unwrap()
            .insert(repo.to_string(), files);
    }

    fn card(&self, repo: &str, card: Value) {
        self.mock
            .cards
            .lock()
            .unwrap()
            .insert(repo.to_string(), card);
    }

    fn seen(&self) -> Vec<Seen> {
        self.mock.seen.lock().unwrap().clone()
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.mock.faults.lock().unwrap()
    }

    fn source(&self, name: &str) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            endpoint: self.url.clone(),
            token_env: None,
        }
    }
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn git_etag(b: &[u8]) -> String {
    sha256(b)[..40].to_string()
}

async fn serve(State(mock): State<Mock>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let h = req.headers();
    let header = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(String::from);
    mock.seen.lock().unwrap().push(Seen {
        method: method.to_string(),
        path: path.clone(),
        auth: header("authorization"),
        range: header("range"),
    });
    if mock.faults.lock().unwrap().not_found {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    }
    let unavailable = mock.faults.lock().unwrap().unavailable.clone();
    if unavailable.iter().any(|r| path.contains(&format!("/{r}/"))) {
        return (StatusCode::SERVICE_UNAVAILABLE, "try later").into_response();
    }
    let repos = mock.repos.lock().unwrap().clone();
    // GET /api/models/{org}/{name}/revision/{rev}
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        if parts.len() == 4 && parts[2] == "revision" {
            let repo = format!("{}/{}", parts[0], parts[1]);
            let Some(files) = repos.get(&repo) else {
                return (StatusCode::NOT_FOUND, "Repository not found").into_response();
            };
            let siblings: Vec<Value> = files
                .iter()
                .map(|(n, f)| {
                    let mut s = json!({"rfilename": n, "size": f.bytes.len(),
                                       "blobId": git_etag(&f.bytes)});
                    if f.lfs {
                        s["lfs"] = json!({"sha256": sha256(&f.bytes), "size": f.bytes.len(),
                                          "pointerSize": 134});
                    }
                    s
                })
                .collect();
            let mut info = json!({"id": repo, "sha": COMMIT, "siblings": siblings});
            if let Some(card) = mock.cards.lock().unwrap().get(&repo) {
                info["cardData"] = card.clone();
            }
            return axum::Json(info).into_response();
        }
    }
    // HEAD/GET /{org}/{name}/resolve/{rev}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return StatusCode::NOT_FOUND.into_response();
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let name = parts[4].to_string();
    let Some(file) = repos
        .get(&repo)
        .and_then(|fs| fs.iter().find(|(n, _)| *n == name))
        .map(|(_, f)| f.clone())
    else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let len = file.bytes.len();
    let mut headers = HeaderMap::new();
    headers.insert("x-repo-commit", COMMIT.parse().unwrap());
    let etag = if file.lfs {
        sha256(&file.bytes)
    } else {
        git_etag(&file.bytes)
    };
    headers.insert("etag", format!("\"{etag}\"").parse().unwrap());
    if file.lfs {
        headers.insert("x-linked-etag", format!("\"{etag}\"").parse().unwrap());
        headers.insert("x-linked-size", len.to_string().parse().unwrap());
    }
    headers.insert("accept-ranges", "bytes".parse().unwrap());
    let cdn = mock.faults.lock().unwrap().redirect_to.clone();
    if let (Some(cdn), true) = (cdn, file.lfs) {
        headers.insert("location", format!("{cdn}{path}").parse().unwrap());
        return (StatusCode::FOUND, headers).into_response();
    }
    if method == Method::HEAD {
        let mut f = mock.faults.lock().unwrap();
        if f.head_503_once.contains(&name) {
            f.head_503_once.retain(|n| *n != name);
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        drop(f);
        headers.insert("content-length", len.to_string().parse().unwrap());
        return (StatusCode::OK, headers).into_response();
    }
    let start: usize = header("range")
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .unwrap_or(0);
    let (mut body, status) = if start > 0 {
        headers.insert(
            "content-range",
            format!("bytes {start}-{}/{len}", len - 1).parse().unwrap(),
        );
        (file.bytes[start..].to_vec(), StatusCode::PARTIAL_CONTENT)
    } else {
        (file.bytes.to_vec(), StatusCode::OK)
    };
    let mut faults = mock.faults.lock().unwrap();
    let take = |v: &mut Vec<String>| {
        let hit = start == 0 && v.contains(&name);
        v.retain(|n| *n != name);
        hit
    };
    let drop_half = take(&mut faults.drop_once);
    if take(&mut faults.truncate_once) {
        body.truncate(len / 2);
    }
    if take(&mut faults.corrupt_once) {
        body[len / 3] ^= 0xff;
    }
    let slow = faults.slow_ms;
    drop(faults);
    if drop_half {
        // Promise everything, send half, then fail the stream.
        let half = body[..len / 2].to_vec();
        let stream = futures_util::stream::iter(vec![
            Ok::<_, std::io::Error>(bytes::Bytes::from(half)),
            Err(std::io::Error::other("connection dropped")),
        ])
        .then(|item| async move {
            // Let the half reach the client before the connection drops.
            if item.is_err() {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            item
        });
        headers.insert("content-length", len.to_string().parse().unwrap());
        return (status, headers, Body::from_stream(stream)).into_response();
    }
    if slow > 0 {
        let chunks: Vec<bytes::Bytes> = body
            .chunks(64 * 1024)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        let stream = futures_util::stream::iter(chunks).then(move |c| async move {
            tokio::time::sleep(Duration::from_millis(slow)).await;
            Ok::<_, std::io::Error>(c)
        });
        return (status, headers, Body::from_stream(stream)).into_response();
    }
    (status, headers, body).into_response()
}

use futures_util::StreamExt;

/// Bytes that differ per `seed` (the fake engine ignores them).
fn blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn hub_config(cache: &Path, sources: Vec<SourceConfig>, models: Vec<ModelSpec>) -> Config {
    let mut c = config(vec![]);
    c.models = models;
    c.sources = sources;
    c.hub_cache = Some(cache.to_path_buf());
    c.download_retry_secs = 3;
    c.download_stall_secs = 5;
    c.finish().unwrap();
    c
}

fn repo_model(id: &str, repo: &str, quant: Option<&str>) -> ModelSpec {
    let mut m = ModelSpec::from_repo(id, repo);
    m.quant = quant.map(String::from);
    m
}

async fn load(agent: &neuron_agent::Agent, id: &str) -> (u16, Value) {
    post_json(agent, "/models/load", json!({"model": id})).await
}

/// The bytes of the default model (`scripts/fetch-model`).
fn default_gguf() -> Vec<u8> {
    let path = std::env::var_os("HELEXA_MODEL_DIR")
        .map(|d| PathBuf::from(d).join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .unwrap_or_else(|| {
            neuron_agent::config::expand_tilde(Path::new(
                "~/.cache/helexa/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            ))
        });
    std::fs::read(&path).expect("the default model (scripts/fetch-model)")
}

/// Checks the hub cache layout of one file; returns its snapshot path.
fn assert_cached(cache: &Path, repo: &str, file: &str, bytes: &[u8], lfs: bool) -> PathBuf {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let etag = if lfs { sha256(bytes) } else { git_etag(bytes) };
    let blob = dir.join("blobs").join(&etag);
    assert_eq!(
        std::fs::metadata(&blob).unwrap().len(),
        bytes.len() as u64,
        "{}",
        blob.display()
    );
    assert_eq!(sha256(&std::fs::read(&blob).unwrap()), sha256(bytes));
    let snap = dir.join("snapshots").join(COMMIT).join(file);
    let target = std::fs::read_link(&snap).unwrap();
    assert_eq!(target, Path::new("../../blobs").join(&etag));
    assert_eq!(
        std::fs::read_to_string(dir.join("refs/main")).unwrap(),
        COMMIT
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("blobs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    snap
}

/// (1) The real default GGUF under a fake repo with several quants: the
/// quant picks it, it is verified, cached in the hub layout, and the real
/// engine serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repo_with_quant_is_fetched_verified_cached_and_served_by_the_real_engine() {
    let gguf = default_gguf();
    let hub = Hub::start().await;
    let repo = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
    hub.add(
        repo,
        vec![
            ("README.md", b"# readme".to_vec()),
            ("SmolLM2-135M-Instruct.Q4_1.gguf", gguf.clone()),
            ("SmolLM2-135M-Instruct.Q8_0.gguf", blob(1, 1000)),
            ("SmolLM2-135M-Instruct.F16.gguf", blob(2, 1000)),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let mut m = repo_model("smol", repo, Some("q4_1"));
    m.preload = true;
    let mut c = hub_config(cache.path(), vec![hub.source("huggingface")], vec![m]);
    c.engine_program = Some(PathBuf::from(env!("CARGO_BIN_EXE_neuron")));
    c.engine_ready_timeout_secs = 120;
    let agent = start(c).await;
    eventually(150, "the model is loaded", || async {
        get(&agent, "/health").await.1["activation"]["state"] == "ready"
    })
    .await;
    let (_, h) = get(&agent, "/health").await;
    assert_eq!(h["activation"]["completed"], json!(["smol"]), "{h}");
    let (_, models) = get(&agent, "/models").await;
    assert_eq!(models[0]["id"], "smol");
    assert_eq!(models[0]["status"], "loaded");
    let (s, v) = post_json(
        &agent,
        "/v1/chat/completions",
        json!({"model": "smol", "max_tokens": 4,
               "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_cached(
        cache.path(),
        repo,
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        &gguf,
        true,
    );
    let gets: Vec<String> = hub
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.contains("/resolve/"))
        .map(|s| s.path)
        .collect();
    assert_eq!(
        gets,
        vec![format!(
            "/{repo}/resolve/{COMMIT}/SmolLM2-135M-Instruct.Q4_1.gguf"
        )],
        "only the chosen quant is downloaded"
    );
    agent.shutdown().await;
}

/// (2) A fetched model starts again with every source down: no network.
/// Progress shows in `/health` `activation.downloads` while fetching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_model_starts_with_the_hub_down_and_progress_shows_while_fetching() {
    let hub = Hub::start().await;
    let repo = "org/tiny-GGUF";
    let weights = blob(7, 1024 * 1024);
    hub.add(
        repo,
        vec![
            ("tiny.Q4_K_M.gguf", weights.clone()),
            ("tokenizer.json", b"{\"fake\": true}".to_vec()),
        ],
    );
    hub.faults().slow_ms = 40;
    let cache = tempfile::tempdir().unwrap();
    let mut m = repo_model("tiny", repo, None);
    m.preload = true;
    let agent = start(hub_config(
        cache.path(),
        vec![hub.source("huggingface")],
        vec![m.clone()],
    ))
    .await;
    eventually(20, "download progress in /health", || async {
        let d = get(&agent, "/health").await.1["activation"]["downloads"].clone();
        d[0]["model"] == "tiny"
            && d[0]["repo"] == repo
            && d[0]["source"] == "huggingface"
            && d[0]["bytes_total"].as_u64() == Some(weights.len() as u64 + 14)
            && d[0]["bytes_done"].as_u64().unwrap_or(0) > 0
    })
    .await;
    eventually(30, "loaded", || async {
        model_health(&agent, "tiny").await["status"] == "loaded"
    })
    .await;
    let (_, h) = get(&agent, "/health").await;
    assert!(h["activation"].get("downloads").is_none(), "{h}");
    assert_cached(cache.path(), repo, "tiny.Q4_K_M.gguf", &weights, true);
    assert_cached(
        cache.path(),
        repo,
        "tokenizer.json",
        b"{\"fake\": true}",
        false,
    );
    agent.shutdown().await;

    // Every source down (a closed port), and a tight retry bound.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let before = hub.seen().len();
    let mut down = hub.source("huggingface");
    down.endpoint = closed;
    let absent = repo_model("absent", "org/absent-GGUF", None);
    let mut c = hub_config(cache.path(), vec![down], vec![m, absent]);
    c.download_retry_secs = 2;
    let agent = start(c).await;
    eventually(20, "loaded from the cache", || async {
        model_health(&agent, "tiny").await["status"] == "loaded"
    })
    .await;
    assert_eq!(
        hub.seen().len(),
        before,
        "no request while serving from cache"
    );
    // A model not in the cache: retried with back-off, then an error that
    // names the repo and the source.
    let began = std::time::Instant::now();
    let (s, v) = load(&agent, "absent").await;
    assert_eq!(s, 502, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("org/absent-GGUF")
            && msg.contains("unreachable")
            && msg.contains("source huggingface"),
        "{msg}"
    );
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "one back-off within download_retry_secs: {took:?}"
    );
    agent.shutdown().await;
}

/// (3) A short answer is resumed with `Range`; a dropped connection is
/// resumed; a corrupt file fails its sha256 and is fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_dropped_and_corrupted_downloads_are_detected_and_refetched() {
    let hub = Hub::start().await;
    let (a, b, c) = (blob(1, 300_000), blob(2, 300_000), blob(3, 300_000));
    hub.add("org/short-GGUF", vec![("short.Q4_0.gguf", a.clone())]);
    hub.add("org/dropped-GGUF", vec![("dropped.Q4_0.gguf", b.clone())]);
    hub.add("org/corrupt-GGUF", vec![("corrupt.Q4_0.gguf", c.clone())]);
    {
        let mut f = hub.faults();
        f.truncate_once.push("short.Q4_0.gguf".into());
        f.drop_once.push("dropped.Q4_0.gguf".into());
        f.corrupt_once.push("corrupt.Q4_0.gguf".into());
    }
    let cache = tempfile::tempdir().unwrap();
    let agent = start(hub_config(
        cache.path(),
        vec![hub.source("hub")],
        vec![
            repo_model("short", "org/short-GGUF", None),
            repo_model("dropped", "org/dropped-GGUF", None),
            repo_model("corrupt", "org/corrupt-GGUF", Some("q4_0")),
        ],
    ))
    .await;
    for id in ["short", "dropped", "corrupt"] {
        let (s, v) = load(&agent, id).await;
        assert_eq!(s, 200, "{id}: {v}");
    }
    assert_cached(cache.path(), "org/short-GGUF", "short.Q4_0.gguf", &a, true);
    assert_cached(
        cache.path(),
        "org/dropped-GGUF",
        "dropped.Q4_0.gguf",
        &b,
        true,
    );
    assert_cached(
        cache.path(),
        "org/corrupt-GGUF",
        "corrupt.Q4_0.gguf",
        &c,
        true,
    );
    let gets = |file: &str| -> Vec<Option<String>> {
        hub.seen()
            .into_iter()
            .filter(|s| s.method == "GET" && s.path.ends_with(file))
            .map(|s| s.range)
            .collect()
    };
    assert_eq!(
        gets("short.Q4_0.gguf"),
        vec![None, Some("bytes=150000-".into())],
        "the short answer is resumed, not fetched again"
    );
    let dropped = gets("dropped.Q4_0.gguf");
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert_eq!(dropped[0], None);
    assert!(
        dropped[1]
            .as_deref()
            .is_some_and(|r| r.starts_with("bytes=")),
        "the dropped download is resumed: {dropped:?}"
    );
    assert_eq!(
        gets("corrupt.Q4_0.gguf"),
        vec![None, None],
        "the corrupt file is fetched again from the start"
    );
    agent.shutdown().await;
}

/// (4) A source's token goes to that source only: the first source does
/// not have the repo (404), the second serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sources_token_goes_only_to_that_source() {
    let first = Hub::start().await;
    first.faults().not_found = true;
    let second = Hub::start().await;
    second.add("org/m-GGUF", vec![("m.Q4_0.gguf", blob(4, 10_000))]);
    // The second source sends the bytes from its "CDN", another host.
    let cdn = Hub::start().await;
    cdn.add("org/m-GGUF", vec![("m.Q4_0.gguf", blob(4, 10_000))]);
    second.faults().redirect_to = Some(cdn.url.replace("127.0.0.1", "localhost"));
    std::env::set_var("HELEXA_TEST_TOKEN_FIRST", "tok-first");
    std::env::set_var("HELEXA_TEST_TOKEN_SECOND", "tok-second");
    let mut s1 = first.source("first");
    s1.token_env = Some("HELEXA_TEST_TOKEN_FIRST".into());
    let mut s2 = second.source("second");
    s2.token_env = Some("HELEXA_TEST_TOKEN_SECOND".into());
    let cache = tempfile::tempdir().unwrap();
    let mut only = repo_model("only-second", "org/m-GGUF", None);
    only.source = Some("second".into());
    let agent = start(hub_config(
        cache.path(),
        vec![s1, s2],
        vec![repo_model("m", "org/m-GGUF", None), only],
    ))
    .await;
    let (s, v) = load(&agent, "m").await;
    assert_eq!(s, 200, "{v}");
    let one = first.seen();
    let two = second.seen();
    assert_eq!(one.len(), 1, "{one:?}");
    assert!(
        one.iter()
            .all(|s| s.auth.as_deref() == Some("Bearer tok-first")),
        "{one:?}"
    );
    assert!(two.len() >= 3, "{two:?}");
    assert!(
        two.iter()
            .all(|s| s.auth.as_deref() == Some("Bearer tok-second")),
        "{two:?}"
    );
    let three = cdn.seen();
    assert_eq!(three.len(), 1, "{three:?}");
    assert_eq!(three[0].method, "GET");
    assert_eq!(three[0].auth, None, "no token to the CDN's host");

    // `source = "second"`: the first source is not asked (and the cache
    // already has the file, so the second is not asked either).
    let (s, v) = load(&agent, "only-second").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(first.seen().len(), 1);
    agent.shutdown().await;

    // Neither source has it: the error names repo, each source and status.
    second.faults().not_found = true;
    let cache = tempfile::tempdir().unwrap();
    let mut s1 = first.source("first");
    s1.token_env = None;
    let agent = start(hub_config(
        cache.path(),
        vec![s1, second.source("second")],
        vec![repo_model("m", "org/m-GGUF", None)],
    ))
    .await;
    let (s, v) = load(&agent, "m").await;
    assert_eq!(s, 502, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for part in ["org/m-GGUF", "source first", "source second", "404"] {
        assert!(msg.contains(part), "{part} in {msg}");
    }
    assert_eq!(
        first.seen().last().unwrap().auth,
        None,
        "no token_env: no token"
    );
    agent.shutdown().await;
}

/// (5) `quant` picks the one GGUF whose name contains it (any case); an
/// ambiguous or unmatched quant is an error naming the candidates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quant_picks_one_file_and_ambiguity_names_the_candidates() {
    let hub = Hub::start().await;
    let q8 = blob(8, 5000);
    hub.add(
        "org/many-GGUF",
        vec![
            ("many.Q4_0.gguf", blob(40, 5000)),
            ("many.Q4_1.gguf", blob(41, 5000)),
            ("many.Q8_0.gguf", q8.clone()),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let agent = start(hub_config(
        cache.path(),
        vec![hub.source("hub")],
        vec![
            repo_model("q8", "org/many-GGUF", Some("q8_0")),
            repo_model("ambiguous", "org/many-GGUF", Some("Q4")),
            repo_model("none", "org/many-GGUF", Some("Q5_K")),
            repo_model("unset", "org/many-GGUF", None),
        ],
    ))
    .await;
    for (id, words) in [
        (
            "ambiguous",
            vec!["ambiguous", "many.Q4_0.gguf", "many.Q4_1.gguf"],
        ),
        ("none", vec!["Q5_K", "many.Q4_0.gguf", "many.Q8_0.gguf"]),
        ("unset", vec!["quant", "many.Q4_1.gguf"]),
    ] {
        let (s, v) = load(&agent, id).await;
        assert_eq!(s, 502, "{id}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("org/many-GGUF"), "{msg}");
        for w in words {
            assert!(msg.contains(w), "{id}: {w} in {msg}");
        }
        assert_eq!(model_health(&agent, id).await["status"], "failed");
    }
    let (s, v) = load(&agent, "q8").await;
    assert_eq!(s, 200, "{v}");
    assert_cached(cache.path(), "org/many-GGUF", "many.Q8_0.gguf", &q8, true);
    let snap = cache
        .path()
        .join("models--org--many-GGUF/snapshots")
        .join(COMMIT);
    assert_eq!(std::fs::read_dir(&snap).unwrap().count(), 1, "only Q8_0");

    agent.shutdown().await;
}

/// A 503 on a file's `HEAD` is retried; two models needing the same file,
/// loaded at once, share one download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_503_is_retried_and_concurrent_loads_share_one_download() {
    let hub = Hub::start().await;
    let bytes = blob(9, 2 * 1024 * 1024);
    hub.add("org/shared-GGUF", vec![("shared.Q4_0.gguf", bytes.clone())]);
    {
        let mut f = hub.faults();
        f.head_503_once.push("shared.Q4_0.gguf".into());
        f.slow_ms = 5;
    }
    let cache = tempfile::tempdir().unwrap();
    let agent = start(hub_config(
        cache.path(),
        vec![hub.source("hub")],
        vec![
            repo_model("a", "org/shared-GGUF", None),
            repo_model("b", "org/shared-GGUF", Some("Q4_0")),
        ],
    ))
    .await;
    let (ra, rb) = tokio::join!(load(&agent, "a"), load(&agent, "b"));
    assert_eq!(ra.0, 200, "{}", ra.1);
    assert_eq!(rb.0, 200, "{}", rb.1);
    assert_cached(
        cache.path(),
        "org/shared-GGUF",
        "shared.Q4_0.gguf",
        &bytes,
        true,
    );
    let seen = hub.seen();
    let gets = seen
        .iter()
        .filter(|s| s.method == "GET" && s.path.contains("/resolve/"))
        .count();
    assert_eq!(gets, 1, "one download for both: {seen:?}");
    assert!(
        seen.iter().filter(|s| s.method == "HEAD").count() >= 2,
        "the 503 HEAD was retried: {seen:?}"
    );
    agent.shutdown().await;
}

/// A cache laid out by another hub tool is used as is: a full snapshot with
/// no network at all; a blob without ref or snapshot is linked after the
/// metadata requests, without downloading it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_fetched_by_other_tools_are_reused() {
    let cache = tempfile::tempdir().unwrap();
    let full = blob(11, 50_000);
    let dir = cache.path().join("models--org--pre-GGUF");
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::create_dir_all(dir.join("snapshots").join(COMMIT)).unwrap();
    std::fs::write(dir.join("blobs").join(sha256(&full)), &full).unwrap();
    std::os::unix::fs::symlink(
        Path::new("../../blobs").join(sha256(&full)),
        dir.join("snapshots").join(COMMIT).join("pre.Q4_0.gguf"),
    )
    .unwrap();
    std::fs::write(dir.join("refs/main"), COMMIT).unwrap();

    let only_blob = blob(12, 50_000);
    let dir2 = cache.path().join("models--org--blob-GGUF");
    std::fs::create_dir_all(dir2.join("blobs")).unwrap();
    std::fs::write(dir2.join("blobs").join(sha256(&only_blob)), &only_blob).unwrap();

    let hub = Hub::start().await;
    hub.add("org/blob-GGUF", vec![("blob.Q4_0.gguf", only_blob.clone())]);
    let agent = start(hub_config(
        cache.path(),
        vec![hub.source("hub")],
        vec![
            repo_model("pre", "org/pre-GGUF", Some("q4_0")),
            repo_model("blob", "org/blob-GGUF", None),
        ],
    ))
    .await;
    let (s, v) = load(&agent, "pre").await;
    assert_eq!(s, 200, "{v}");
    assert!(hub.seen().is_empty(), "{:?}", hub.seen());
    let (s, v) = load(&agent, "blob").await;
    assert_eq!(s, 200, "{v}");
    assert_cached(
        cache.path(),
        "org/blob-GGUF",
        "blob.Q4_0.gguf",
        &only_blob,
        true,
    );
    let seen = hub.seen();
    assert!(
        seen.iter()
            .all(|s| s.method != "GET" || s.path.starts_with("/api/")),
        "the blob is not downloaded again: {seen:?}"
    );
    agent.shutdown().await;
}

/// (9) The memory budget holds for a `repo` model too: unknown before its
/// files are here, checked once they are (the load is refused with
/// `insufficient_memory` and no engine starts), and known from the cache
/// at the next start, so the refusal then comes before anything is fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_repo_model_is_checked_against_the_memory_budget() {
    let gguf = default_gguf();
    let hub = Hub::start().await;
    let repo = "org/budget-GGUF";
    hub.add(repo, vec![("model.Q4_1.gguf", gguf.clone())]);
    let cache = tempfile::tempdir().unwrap();
    let mut m = repo_model("smol", repo, None);
    m.max_context = Some(512);
    m.max_batch = Some(1);
    let make = || {
        let mut c = hub_config(
            cache.path(),
            vec![hub.source("huggingface")],
            vec![m.clone()],
        );
        // The weights alone are ~94 MiB.
        c.memory_budget_mb = Some(50);
        c.engine_program = Some(PathBuf::from("/nonexistent/engine-must-not-start"));
        c
    };
    let agent = start(make()).await;
    let (_, d) = get(&agent, "/discovery").await;
    assert_eq!(
        d["catalogue"][0]["memory_mb"], 0,
        "unknown before the fetch: {d}"
    );
    let (s, e) = load(&agent, "smol").await;
    assert_eq!(s, 507, "{e}");
    assert_eq!(e["error"]["code"], "insufficient_memory", "{e}");
    assert_cached(cache.path(), repo, "model.Q4_1.gguf", &gguf, true);
    let (_, d) = get(&agent, "/discovery").await;
    let need = d["catalogue"][0]["memory_mb"].as_u64().unwrap();
    assert!(need > 90, "the estimate of the fetched file: {d}");
    let (_, h) = get(&agent, "/health").await;
    assert_eq!(h["memory_mb"]["used"], 0, "{h}");
    agent.shutdown().await;

    let fetched = hub.seen().len();
    let agent = start(make()).await;
    let (_, d) = get(&agent, "/discovery").await;
    assert_eq!(
        d["catalogue"][0]["memory_mb"], need,
        "known from the cache: {d}"
    );
    let (s, e) = load(&agent, "smol").await;
    assert_eq!(s, 507, "{e}");
    assert_eq!(
        hub.seen().len(),
        fetched,
        "refused before any request to the hub"
    );
    agent.shutdown().await;
}

/// The default GGUF rewritten without its chat template (older converters
/// wrote none) and with `extra` string metadata, e.g. the base model that
/// llama.cpp's converter records (`general.base_model.0.repo_url`).
fn gguf_without_template(extra: &[(&str, &str)]) -> Vec<u8> {
    use candle_core::quantized::gguf_file::{self, Content, Value};
    let bytes = default_gguf();
    let mut r = std::io::Cursor::new(&bytes);
    let ct = Content::read(&mut r).unwrap();
    let mut md: Vec<(String, Value)> = ct
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "tokenizer.chat_template")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in extra {
        md.push((k.to_string(), Value::String(v.to_string())));
    }
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(&str, candle_core::quantized::QTensor)> = names
        .iter()
        .map(|n| {
            let t = ct.tensor(&mut r, n, &candle_core::Device::Cpu).unwrap();
            (n.as_str(), t)
        })
        .collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(
        &mut out,
        &md.iter().map(|(k, v)| (k.as_str(), v)).collect::<Vec<_>>(),
        &tensors.iter().map(|(n, t)| (*n, t)).collect::<Vec<_>>(),
    )
    .unwrap();
    out.into_inner()
}

/// The default GGUF's tokenizer as a `tokenizer.json` (what its base repo
/// would have: it matches the GGUF's vocabulary).
fn default_tokenizer_json() -> Vec<u8> {
    let bytes = default_gguf();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes))
        .unwrap();
    helexa_engine::tokenizer::tokenizer_from_gguf(&ct.metadata)
        .unwrap()
        .to_string(false)
        .unwrap()
        .into_bytes()
}

/// A base (safetensors) repo: weights that must not be fetched, and the
/// tokenizer files a GGUF repo lacks.
fn base_repo_files(template: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "config.json",
            b"{\"architectures\": [\"LlamaForCausalLM\"]}".to_vec(),
        ),
        ("model.safetensors", blob(50, 100_000)),
        ("tokenizer.json", default_tokenizer_json()),
        (
            "tokenizer_config.json",
            serde_json::to_vec(&json!({"chat_template": template, "bos_token": "<|im_start|>"}))
                .unwrap(),
        ),
    ]
}

/// The engine's command line (its process's `/proc/{pid}/cmdline`).
fn engine_args(agent: &neuron_agent::Agent, id: &str) -> Vec<String> {
    let pid = agent.registry().engine_pid(id).expect("engine running");
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect()
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Prompt tokens of a one-message chat: what the template rendered.
async fn prompt_tokens(agent: &neuron_agent::Agent, id: &str) -> u64 {
    let (s, v) = post_json(
        agent,
        "/v1/chat/completions",
        json!({"model": id, "max_tokens": 1,
               "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["usage"]["prompt_tokens"].as_u64().unwrap()
}

/// Renders a message's content alone: "hi" is a token or two, where the
/// ChatML default wraps it in role markers (about ten).
const BARE_TEMPLATE: &str = "{% for m in messages %}{{ m.content }}{% endfor %}";

/// A GGUF repo without `tokenizer.json` / `tokenizer_config.json` (and a
/// GGUF without a template) takes them from the base repo its model card
/// names: fetched into that repo's own cache folder (the tokenizer files
/// only), given to the engine, and the template is the base repo's. A
/// model whose base repo is not found loads with the GGUF's own tokenizer
/// and the ChatML default, and says so in `/health`. A second start with
/// the hub down uses the cached base files without a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_repo_without_tokenizer_files_takes_them_from_the_base_repo_its_card_names() {
    let gguf = gguf_without_template(&[]);
    let hub = Hub::start().await;
    hub.add("org/smol-GGUF", vec![("smol.Q4_1.gguf", gguf.clone())]);
    hub.card(
        "org/smol-GGUF",
        json!({"base_model": ["org/smol"], "license": "apache-2.0"}),
    );
    let base = base_repo_files(BARE_TEMPLATE);
    hub.add("org/smol", base.clone());
    hub.add("org/plain-GGUF", vec![("plain.Q4_1.gguf", gguf.clone())]);
    let cache = tempfile::tempdir().unwrap();
    let small = |m: &mut ModelSpec| {
        m.max_context = Some(256);
        m.max_batch = Some(1);
    };
    let mut based = repo_model("based", "org/smol-GGUF", None);
    small(&mut based);
    let mut plain = repo_model("plain", "org/plain-GGUF", None);
    small(&mut plain);
    let make = |endpoint: Option<String>| {
        let mut source = hub.source("huggingface");
        if let Some(e) = endpoint {
            source.endpoint = e;
        }
        let mut c = hub_config(
            cache.path(),
            vec![source],
            vec![based.clone(), plain.clone()],
        );
        c.engine_program = Some(PathBuf::from(env!("CARGO_BIN_EXE_neuron")));
        c.engine_ready_timeout_secs = 120;
        c
    };
    let agent = start(make(None)).await;
    let (s, v) = load(&agent, "based").await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = load(&agent, "plain").await;
    assert_eq!(s, 200, "{v}");

    // The base repo's tokenizer files, in its own cache folder; not its weights.
    let tok = assert_cached(
        cache.path(),
        "org/smol",
        "tokenizer.json",
        &base[2].1,
        false,
    );
    let cfg = assert_cached(
        cache.path(),
        "org/smol",
        "tokenizer_config.json",
        &base[3].1,
        false,
    );
    let base_gets: Vec<String> = hub
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.starts_with("/org/smol/"))
        .map(|s| s.path)
        .collect();
    assert_eq!(
        base_gets,
        vec![
            format!("/org/smol/resolve/{COMMIT}/tokenizer.json"),
            format!("/org/smol/resolve/{COMMIT}/tokenizer_config.json"),
        ]
    );
    let args = engine_args(&agent, "based");
    assert_eq!(
        flag(&args, "--tokenizer"),
        Some(tok.display().to_string()),
        "{args:?}"
    );
    assert_eq!(
        flag(&args, "--tokenizer-config"),
        Some(cfg.display().to_string()),
        "{args:?}"
    );
    assert_eq!(model_health(&agent, "based").await["warning"], Value::Null);

    // Without a base repo: the GGUF's own tokenizer, ChatML, and a warning.
    let args = engine_args(&agent, "plain");
    assert_eq!(flag(&args, "--tokenizer"), None, "{args:?}");
    assert_eq!(flag(&args, "--tokenizer-config"), None, "{args:?}");
    let h = model_health(&agent, "plain").await;
    assert_eq!(h["status"], "loaded", "{h}");
    let w = h["warning"].as_str().unwrap_or_default();
    for part in [
        "org/plain-GGUF",
        "no tokenizer.json and no chat template",
        "no base repo was found",
        "ChatML",
    ] {
        assert!(w.contains(part), "{part} in {h}");
    }

    // The base template renders "hi" bare; ChatML wraps it.
    let bare = prompt_tokens(&agent, "based").await;
    let chatml = prompt_tokens(&agent, "plain").await;
    assert!(
        bare <= 3 && chatml >= bare + 5,
        "base {bare}, chatml {chatml}"
    );
    agent.shutdown().await;

    // Offline: the hub is down; the cached base files are used as they were.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let before = hub.seen().len();
    let agent = start(make(Some(closed))).await;
    let (s, v) = load(&agent, "based").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(hub.seen().len(), before, "no request from the cache");
    let args = engine_args(&agent, "based");
    assert_eq!(
        flag(&args, "--tokenizer"),
        Some(tok.display().to_string()),
        "{args:?}"
    );
    assert_eq!(
        flag(&args, "--tokenizer-config"),
        Some(cfg.display().to_string()),
        "{args:?}"
    );
    assert_eq!(model_health(&agent, "based").await["warning"], Value::Null);
    assert_eq!(prompt_tokens(&agent, "based").await, bare);
    agent.shutdown().await;
}

/// The base repo from the GGUF's own metadata (`general.base_model.0`), the
/// `base_repo` key over the model card, and a base repo that is unreachable
/// (503 until the retry bound): that model loads anyway with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_repo_from_gguf_metadata_or_the_key_and_an_unreachable_one_only_warns() {
    let gguf = gguf_without_template(&[(
        "general.base_model.0.repo_url",
        "https://huggingface.co/org/meta-base",
    )]);
    let hub = Hub::start().await;
    hub.add("org/meta-GGUF", vec![("meta.Q4_1.gguf", gguf.clone())]);
    hub.add("org/meta-base", base_repo_files(BARE_TEMPLATE));
    // The card names one base repo, the key another (which wins).
    hub.add("org/keyed-GGUF", vec![("keyed.Q4_1.gguf", gguf.clone())]);
    hub.card("org/keyed-GGUF", json!({"base_model": "org/meta-base"}));
    let keyed_template = "{% for m in messages %}KEYED {{ m.role }}: {{ m.content }}\n{% endfor %}";
    let mut keyed_files = base_repo_files(keyed_template);
    // Another model's tokenizer.json: refused, the GGUF's own is kept.
    keyed_files[2].1 = serde_json::to_vec(&json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}
    }))
    .unwrap();
    hub.add("org/keyed-base", keyed_files);
    hub.add("org/lost-GGUF", vec![("lost.Q4_1.gguf", gguf.clone())]);
    hub.card("org/lost-GGUF", json!({"base_model": "org/down"}));
    hub.add("org/down", base_repo_files(BARE_TEMPLATE));
    hub.faults().unavailable.push("org/down".into());
    let cache = tempfile::tempdir().unwrap();
    let spec = |id: &str, repo: &str| {
        let mut m = repo_model(id, repo, None);
        m.max_context = Some(256);
        m.max_batch = Some(1);
        m
    };
    let mut keyed = spec("keyed", "org/keyed-GGUF");
    keyed.base_repo = Some("org/keyed-base".into());
    let mut c = hub_config(
        cache.path(),
        vec![hub.source("huggingface")],
        vec![
            spec("meta", "org/meta-GGUF"),
            keyed,
            spec("lost", "org/lost-GGUF"),
        ],
    );
    c.engine_program = Some(PathBuf::from(env!("CARGO_BIN_EXE_neuron")));
    c.engine_ready_timeout_secs = 120;
    c.download_retry_secs = 2;
    let agent = start(c).await;
    for id in ["meta", "keyed", "lost"] {
        let (s, v) = load(&agent, id).await;
        assert_eq!(s, 200, "{id}: {v}");
    }
    let snap = |repo: &str, file: &str| {
        cache
            .path()
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots")
            .join(COMMIT)
            .join(file)
            .display()
            .to_string()
    };

    let args = engine_args(&agent, "meta");
    assert_eq!(
        flag(&args, "--tokenizer"),
        Some(snap("org/meta-base", "tokenizer.json")),
        "{args:?}"
    );
    assert_eq!(
        flag(&args, "--tokenizer-config"),
        Some(snap("org/meta-base", "tokenizer_config.json")),
        "{args:?}"
    );
    assert_eq!(model_health(&agent, "meta").await["warning"], Value::Null);

    let args = engine_args(&agent, "keyed");
    assert_eq!(flag(&args, "--tokenizer"), None, "{args:?}");
    assert_eq!(
        flag(&args, "--tokenizer-config"),
        Some(snap("org/keyed-base", "tokenizer_config.json")),
        "{args:?}"
    );
    let w = model_health(&agent, "keyed").await["warning"].clone();
    assert!(
        w.as_str()
            .is_some_and(|w| w
                .contains("tokenizer.json of base repo org/keyed-base does not match the GGUF")),
        "{w}"
    );

    let args = engine_args(&agent, "lost");
    assert_eq!(flag(&args, "--tokenizer"), None, "{args:?}");
    assert_eq!(flag(&args, "--tokenizer-config"), None, "{args:?}");
    let h = model_health(&agent, "lost").await;
    let w = h["warning"].as_str().unwrap_or_default();
    for part in [
        "org/lost-GGUF",
        "org/down",
        "model card",
        "unreachable",
        "503",
    ] {
        assert!(w.contains(part), "{part} in {h}");
    }

    // The templates differ in what they render around "hi".
    let bare = prompt_tokens(&agent, "meta").await;
    let keyed = prompt_tokens(&agent, "keyed").await;
    let chatml = prompt_tokens(&agent, "lost").await;
    assert!(bare <= 3, "{bare}");
    assert!(
        keyed > bare && keyed != chatml,
        "keyed {keyed}, chatml {chatml}"
    );
    agent.shutdown().await;
}

/// The parts of a split GGUF are one choice for `quant` (not "ambiguous"),
/// refused with a message naming them; nothing is downloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_gguf_is_refused_naming_its_parts() {
    let hub = Hub::start().await;
    hub.add(
        "org/split-GGUF",
        vec![
            ("big.Q4_K_M-00001-of-00002.gguf", blob(60, 1000)),
            ("big.Q4_K_M-00002-of-00002.gguf", blob(61, 1000)),
            ("big.Q8_0.gguf", blob(62, 1000)),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let agent = start(hub_config(
        cache.path(),
        vec![hub.source("hub")],
        vec![repo_model("split", "org/split-GGUF", Some("Q4_K_M"))],
    ))
    .await;
    let (s, v) = load(&agent, "split").await;
    assert_eq!(s, 502, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for part in [
        "org/split-GGUF",
        "split GGUF",
        "not supported",
        "big.Q4_K_M-00001-of-00002.gguf",
        "big.Q4_K_M-00002-of-00002.gguf",
    ] {
        assert!(msg.contains(part), "{part} in {msg}");
    }
    assert!(!msg.contains("ambiguous"), "{msg}");
    assert_eq!(model_health(&agent, "split").await["status"], "failed");
    assert!(
        hub.seen().iter().all(|s| s.path.starts_with("/api/")),
        "nothing downloaded: {:?}",
        hub.seen()
    );
    agent.shutdown().await;
}

/// Another process sharing the cache (another neuron, huggingface_hub)
/// holding the blob's lock file (`.locks/models--…/{etag}.lock`, `flock`):
/// the load waits without downloading, and once that process has written
/// the blob and let go, uses it without fetching it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_another_process_is_fetching_is_waited_for_not_fetched_again() {
    use std::os::fd::AsRawFd;
    let hub = Hub::start().await;
    let bytes = blob(70, 200_000);
    hub.add("org/locked-GGUF", vec![("locked.Q4_0.gguf", bytes.clone())]);
    let cache = tempfile::tempdir().unwrap();
    let locks = cache.path().join(".locks/models--org--locked-GGUF");
    std::fs::create_dir_all(&locks).unwrap();
    let lock = std::fs::File::create(locks.join(format!("{}.lock", sha256(&bytes)))).unwrap();
    // SAFETY: an open file's descriptor.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let agent = start(hub_config(
        cache.path(),
        vec![hub.source("hub")],
        vec![repo_model("locked", "org/locked-GGUF", None)],
    ))
    .await;
    let done = std::sync::atomic::AtomicBool::new(false);
    let gets = |hub: &Hub| {
        hub.seen()
            .iter()
            .filter(|s| s.method == "GET" && s.path.contains("/resolve/"))
            .count()
    };
    let ((s, v), ()) = tokio::join!(
        async {
            let r = load(&agent, "locked").await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        },
        async {
            eventually(10, "the file's metadata is read", || async {
                hub.seen().iter().any(|s| s.method == "HEAD")
            })
            .await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert!(
                !done.load(std::sync::atomic::Ordering::SeqCst),
                "the load waits for the lock"
            );
            assert_eq!(gets(&hub), 0, "nothing downloaded while locked");
            // The other process finishes the blob, then lets go.
            let blobs = cache.path().join("models--org--locked-GGUF/blobs");
            std::fs::create_dir_all(&blobs).unwrap();
            std::fs::write(blobs.join(sha256(&bytes)), &bytes).unwrap();
            drop(lock);
        }
    );
    assert_eq!(s, 200, "{v}");
    assert_cached(
        cache.path(),
        "org/locked-GGUF",
        "locked.Q4_0.gguf",
        &bytes,
        true,
    );
    assert_eq!(gets(&hub), 0, "the other process's blob is used");
    agent.shutdown().await;
}

/// Two agent processes sharing one cache load the same repo at once: the
/// blob is downloaded once (the other waits on its lock file, then uses it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agent_processes_sharing_a_cache_download_a_blob_once() {
    let hub = Hub::start().await;
    let bytes = blob(71, 2 * 1024 * 1024);
    hub.add("org/twice-GGUF", vec![("twice.Q4_0.gguf", bytes.clone())]);
    hub.faults().slow_ms = 50; // ~1.6 s for the file: the loads overlap
    let cache = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    let mut urls = Vec::new();
    for i in 0..2 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = hub_config(
            cache.path(),
            vec![hub.source("hub")],
            vec![repo_model("twice", "org/twice-GGUF", None)],
        );
        c.listen = format!("127.0.0.1:{port}");
        let file = cache.path().join(format!("neuron-{i}.toml"));
        std::fs::write(&file, toml::to_string(&c).unwrap()).unwrap();
        agents.push(
            tokio::process::Command::new(env!("CARGO_BIN_EXE_neuron"))
                .arg("--config")
                .arg(&file)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
        urls.push(format!("http://127.0.0.1:{port}"));
    }
    let http = client();
    for url in &urls {
        eventually(20, "the agent answers", || async {
            http.get(format!("{url}/health")).send().await.is_ok()
        })
        .await;
    }
    let load_at = |url: &String| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http
                .post(format!("{url}/models/load"))
                .json(&json!({"model": "twice"}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (a, b) = tokio::join!(load_at(&urls[0]), load_at(&urls[1]));
    assert_eq!(a.0, 200, "{}", a.1);
    assert_eq!(b.0, 200, "{}", b.1);
    assert_cached(
        cache.path(),
        "org/twice-GGUF",
        "twice.Q4_0.gguf",
        &bytes,
        true,
    );
    let gets = hub
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.contains("/resolve/"))
        .count();
    assert_eq!(gets, 1, "one download for both processes: {:?}", hub.seen());
    for mut a in agents {
        let _ = a.kill().await;
    }
}
