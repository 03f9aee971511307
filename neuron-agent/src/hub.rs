//! Models by name (docs/protocol.md §9): a `[[models]]` entry with a `repo`
//! is resolved to a local file or folder in the standard Hugging Face hub
//! cache before its engine starts.
//!
//! Cache layout (shared with `huggingface_hub`, `hf-hub` and the like):
//! `{cache}/models--{org}--{name}/blobs/{etag}` holds each file's bytes,
//! `snapshots/{commit}/{file}` is a relative symlink to its blob, and
//! `refs/{revision}` holds the commit a branch or tag resolved to. A model
//! whose ref and files are already there is used without any network.
//!
//! Online, the sources are tried in order (or only the model's `source`):
//! `GET {endpoint}/api/models/{repo}/revision/{rev}?blobs=true` gives the
//! commit (`sha`) and the files (`siblings`, with `size` and `lfs.sha256`);
//! `HEAD {endpoint}/{repo}/resolve/{commit}/{file}` (redirects not followed)
//! gives `X-Linked-Etag`/`ETag` (the blob name; the sha256 for LFS files) and
//! `X-Linked-Size`/`Content-Length`; the bytes come from a `GET` of the same
//! URL (redirects followed; reqwest drops `Authorization` when a redirect
//! leaves the source's host, so a token goes to its own source only). Bytes
//! go to `blobs/{etag}.incomplete`, resumed with `Range` after a dropped
//! connection or a short answer, and become the blob only once their size
//! and sha256 match the hub's metadata; a corrupt file is deleted and fetched
//! again. Free space is checked (statvfs) before any byte is fetched.
//!
//! Why not the `hf-hub` crate: its tokio API takes one endpoint and one token
//! per `Api`, so "this token to that source only, try the next source on 404"
//! would mean one `Api` per source with no shared retry policy; it does not
//! check a finished blob's sha256 against the hub's metadata, has no disk
//! space check, no bounded back-off while a registry is unreachable and no
//! progress we can publish in `/health`; and it would bring a second HTTP
//! stack and TLS setup. The protocol is small, so it is spoken here with the
//! reqwest the agent already uses.
//!
//! A GGUF repo without the tokenizer files the engine would use (no
//! `tokenizer.json`; no chat template in the GGUF nor a
//! `tokenizer_config.json`) takes them from its base repo: the `base_repo`
//! key, else the model card's `base_model` (`cardData`), else the GGUF's
//! `general.base_model.0` metadata. Its `tokenizer.json`,
//! `tokenizer_config.json` and `chat_template.jinja` are fetched with the
//! same machinery into the base repo's own cache folder; the engine gets
//! the tokenizer (`--tokenizer`, only if it matches the GGUF's vocabulary)
//! and the template (`--chat-template` / `--tokenizer-config`). Whatever
//! fails leaves the GGUF's own tokenizer/template in use, with a warning in
//! `/health` (`Resolved::warning`).
//!
//! Split GGUFs (`-00001-of-0000N`) are one choice for `quant` and are
//! refused with their parts named: the engine loads one file.
//!
//! One blob is written by one download at a time: in a process by
//! `blob_lock`, across processes sharing the cache by an advisory `flock` on
//! huggingface_hub's lock file, `{cache}/.locks/models--…/{etag}.lock`.
//!
//! Not done yet: a moved branch is not noticed while its ref is cached.

use crate::config::{Config, ModelSpec, SourceConfig};
use futures_util::StreamExt;
use helexa_protocol::DownloadProgress;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Files of a GGUF repo fetched beside the chosen `.gguf` when present (the
/// engine uses them when they match the GGUF).
const GGUF_COMPANIONS: &[&str] = &["tokenizer.json", "tokenizer_config.json"];

/// Files fetched from the base repo of a GGUF repo without tokenizer files
/// (those it has; the first two make its snapshot usable from the cache).
const BASE_COMPANIONS: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

/// In a GGUF repo's cache folder: the base repo its model card named, for
/// starts from the cache, which do not read the card. (Hub tools look only
/// at `blobs`, `refs` and `snapshots`.)
const BASE_RECORD: &str = ".helexa-base-model";

/// What a `repo` model resolved to.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// The snapshot's `.gguf` file, or a safetensors snapshot folder.
    pub path: PathBuf,
    /// The base repo's `tokenizer.json`, checked against the GGUF's
    /// vocabulary (`--tokenizer`).
    pub tokenizer: Option<PathBuf>,
    /// The base repo's `chat_template.jinja` (`--chat-template`).
    pub chat_template: Option<PathBuf>,
    /// The base repo's `tokenizer_config.json`, for its `chat_template`
    /// (`--tokenizer-config`).
    pub tokenizer_config: Option<PathBuf>,
    /// What the load falls back on (the GGUF's own tokenizer or template),
    /// and why; shown in `/health`.
    pub warning: Option<String>,
}

/// Why a repo could not be resolved. Every message names the repo and, where
/// there is one, the file, the source and the HTTP status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HubError {
    #[error("repo {repo}: {message}")]
    Select { repo: String, message: String },
    #[error("repo {repo} (revision {revision}): no source has it: {}", .tried.join("; "))]
    NotFound {
        repo: String,
        revision: String,
        tried: Vec<String>,
    },
    #[error("repo {repo}: sources unreachable for {secs}s: {}", .tried.join("; "))]
    Unreachable {
        repo: String,
        secs: u64,
        tried: Vec<String>,
    },
    #[error("repo {repo}, file {file}, source {source_name}: {message}")]
    File {
        repo: String,
        file: String,
        source_name: String,
        message: String,
    },
    #[error("repo {repo}: not enough disk space in {dir}: need {need} bytes, {free} free")]
    NoSpace {
        repo: String,
        dir: PathBuf,
        need: u64,
        free: u64,
    },
    #[error("repo {repo}: cache {dir}: {message}")]
    Cache {
        repo: String,
        dir: PathBuf,
        message: String,
    },
}

/// One failed attempt at a source: transient ones are retried with back-off.
#[derive(Debug)]
struct Attempt {
    transient: bool,
    message: String,
}

/// `GET /api/models/{repo}/revision/{rev}` (fields we use).
#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
    /// The model card's front matter (`base_model`: a repo or a list).
    #[serde(default, rename = "cardData")]
    card_data: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize, Clone)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize, Clone)]
struct Lfs {
    sha256: String,
    #[serde(default)]
    size: Option<u64>,
}

/// What a file must be, from the hub's metadata.
#[derive(Debug, Clone)]
struct Wanted {
    name: String,
    /// Blob name: the sha256 for LFS files, else the git etag.
    etag: String,
    size: u64,
    sha256: Option<String>,
    url: String,
}

/// The hub client of one load.
pub struct Hub {
    client: reqwest::Client,
    head_client: reqwest::Client,
    sources: Vec<SourceConfig>,
    cache: PathBuf,
    retry: Duration,
    stall: Duration,
}

/// Called with the progress of a download (throttled by the caller).
pub type ProgressFn<'a> = &'a (dyn Fn(DownloadProgress) + Send + Sync);

impl Hub {
    pub fn new(config: &Config) -> Hub {
        let build = |redirects: bool| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .redirect(if redirects {
                    reqwest::redirect::Policy::limited(10)
                } else {
                    reqwest::redirect::Policy::none()
                })
                .user_agent(concat!("helexa-neuron/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("HTTP client builds")
        };
        Hub {
            client: build(true),
            head_client: build(false),
            sources: config.sources.clone(),
            cache: config.hub_cache_dir(),
            retry: Duration::from_secs(config.download_retry_secs),
            stall: Duration::from_secs(config.download_stall_secs.max(1)),
        }
    }

    /// The local path of `spec`'s model if the cache alone holds it.
    pub fn cached_model(cache: &Path, spec: &ModelSpec) -> Option<PathBuf> {
        let repo = spec.repo.as_deref()?;
        let dir = Self::repo_dir(cache, repo);
        cached(&dir, repo, spec.revision(), spec.quant.as_deref())
            .ok()
            .flatten()
    }

    /// The folder of `repo` in the cache (`models--org--name`).
    pub fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
        cache.join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The local path of `spec`'s model (a snapshot's `.gguf` file or, for a
    /// safetensors repo, the snapshot folder) and, for a GGUF repo without
    /// tokenizer files, what its base repo gives. Uses the cache alone when
    /// it already holds the files; otherwise fetches them.
    pub async fn resolve(
        &self,
        spec: &ModelSpec,
        progress: ProgressFn<'_>,
    ) -> Result<Resolved, HubError> {
        let repo = spec.repo.clone().unwrap_or_default();
        let revision = spec.revision().to_string();
        let dir = Self::repo_dir(&self.cache, &repo);
        let quant = spec.quant.as_deref();
        // `Some(card's base_model)` when the repo's metadata was fetched.
        let (path, card) = match cached(&dir, &repo, &revision, quant)? {
            Some(path) => {
                tracing::info!(model = %spec.id, %repo, %revision, path = %path.display(), "model found in the hub cache; no download");
                (path, None)
            }
            None => {
                let (source, info) = self
                    .info_any(
                        &spec.id,
                        &repo,
                        &revision,
                        spec.source.as_deref(),
                        self.retry,
                    )
                    .await?;
                let (files, model_file) = select(&repo, &safe_names(&info), quant)?;
                let snapshot = self
                    .fetch(
                        &spec.id, source, &repo, &revision, &dir, &info, &files, progress,
                    )
                    .await?;
                let path = match model_file {
                    Some(f) => snapshot.join(f),
                    None => snapshot,
                };
                (path, Some(card_base_model(&info)))
            }
        };
        let mut out = Resolved {
            path,
            ..Resolved::default()
        };
        if out.path.is_file() {
            self.companions(spec, &repo, &dir, card, &mut out, progress)
                .await;
        }
        Ok(out)
    }

    /// The repo's metadata from the first source that has it (or only
    /// `only`), retrying rounds with back-off for up to `retry` while a
    /// failure was transient.
    async fn info_any(
        &self,
        model: &str,
        repo: &str,
        revision: &str,
        only: Option<&str>,
        retry: Duration,
    ) -> Result<(&SourceConfig, RepoInfo), HubError> {
        let sources: Vec<&SourceConfig> = self
            .sources
            .iter()
            .filter(|s| only.is_none_or(|n| s.name == n))
            .collect();
        let began = Instant::now();
        let mut delay = Duration::from_secs(1);
        loop {
            let mut tried = Vec::new();
            let mut transient = false;
            for source in &sources {
                match self.info(source, repo, revision).await {
                    Ok(info) => return Ok((source, info)),
                    Err(a) => {
                        tracing::warn!(%model, %repo, source = %source.name, error = %a.message, "source failed");
                        transient |= a.transient;
                        tried.push(format!("source {}: {}", source.name, a.message));
                    }
                }
            }
            if !transient {
                return Err(HubError::NotFound {
                    repo: repo.to_string(),
                    revision: revision.to_string(),
                    tried,
                });
            }
            if began.elapsed() + delay > retry {
                return Err(HubError::Unreachable {
                    repo: repo.to_string(),
                    secs: began.elapsed().as_secs(),
                    tried,
                });
            }
            tracing::warn!(%model, %repo, retry_in_ms = delay.as_millis() as u64, "sources unreachable; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// A GGUF whose repo lacks `tokenizer.json` or a chat template: both
    /// from the base repo (the `base_repo` key, else the model card's
    /// `base_model`, else the GGUF's `general.base_model.0`), fetched into
    /// that repo's own cache folder and checked like the GGUF repo's own
    /// would be. Anything missing leaves the GGUF's own tokenizer/template
    /// in use and says so in `out.warning`. `card`: the model card's base
    /// model when the repo's metadata was fetched (online); `None` when the
    /// model came from the cache, in which case the base repo is tried once,
    /// without back-off.
    async fn companions(
        &self,
        spec: &ModelSpec,
        repo: &str,
        dir: &Path,
        card: Option<Option<String>>,
        out: &mut Resolved,
        progress: ProgressFn<'_>,
    ) {
        let gguf = out.path.clone();
        let md = match tokio::task::spawn_blocking(move || gguf_metadata(&gguf)).await {
            Ok(Ok(md)) => std::sync::Arc::new(md),
            Ok(Err(e)) => {
                tracing::warn!(model = %spec.id, %repo, error = %e, "cannot read the GGUF's metadata; the engine will say more");
                return;
            }
            Err(_) => return,
        };
        // What the engine finds beside the file (docs/neuron.md).
        let beside = |name: &str| {
            let folder = out.path.parent().unwrap_or(Path::new("."));
            let stem = out.path.file_stem().unwrap_or_default().to_string_lossy();
            folder.join(format!("{stem}.{name}")).is_file() || folder.join(name).is_file()
        };
        let own_template = md.contains_key("tokenizer.chat_template");
        let want_tokenizer = spec.tokenizer.is_none() && !beside("tokenizer.json");
        let want_template =
            spec.chat_template.is_none() && !own_template && !beside("tokenizer_config.json");
        if !want_tokenizer && !want_template {
            return;
        }
        let fallback = match (want_tokenizer, want_template) {
            (true, true) => "the GGUF's own tokenizer and the ChatML default template",
            (true, false) => "the GGUF's own tokenizer",
            _ => "the ChatML default template",
        };
        let missing = match (want_tokenizer, want_template) {
            (true, true) => "no tokenizer.json and no chat template",
            (true, false) => "no tokenizer.json",
            _ => "no chat template",
        };
        let record = dir.join(BASE_RECORD);
        if let Some(card) = &card {
            // Remembered for offline starts, which cannot read the card.
            match card {
                Some(b) => {
                    let _ = std::fs::write(&record, b);
                }
                None => {
                    let _ = std::fs::remove_file(&record);
                }
            }
        }
        let remembered = || {
            std::fs::read_to_string(&record)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| valid_repo(s))
        };
        let found = spec
            .base_repo
            .clone()
            .map(|b| (b, "the base_repo key"))
            .or_else(|| match &card {
                Some(c) => c.clone().map(|b| (b, "the model card's base_model")),
                None => remembered().map(|b| (b, "the model card's base_model")),
            })
            .or_else(|| gguf_base_model(&md).map(|b| (b, "the GGUF's general.base_model.0")))
            .filter(|(b, _)| b != repo);
        let warn = |out: &mut Resolved, message: String| {
            tracing::warn!(model = %spec.id, %repo, "{message}");
            out.warning = Some(message);
        };
        let Some((base, how)) = found else {
            return warn(
                out,
                format!(
                    "repo {repo} has {missing} and no base repo was found (no base_repo key, \
                     no base_model in its model card, no general.base_model.0 in the GGUF): \
                     using {fallback}"
                ),
            );
        };
        let retry = if card.is_some() {
            self.retry
        } else {
            Duration::ZERO
        };
        let snapshot = match self
            .fetch_companions(&spec.id, &base, spec.source.as_deref(), retry, progress)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                return warn(
                    out,
                    format!(
                        "repo {repo} has {missing}; its base repo {base} (from {how}) could \
                         not be fetched: {e}: using {fallback}"
                    ),
                )
            }
        };
        tracing::info!(model = %spec.id, %repo, %base, from = how, snapshot = %snapshot.display(), "tokenizer files from the base repo");
        let mut notes = Vec::new();
        if want_tokenizer {
            let p = snapshot.join("tokenizer.json");
            if p.is_file() {
                let (path, md) = (p.clone(), md.clone());
                let checked = tokio::task::spawn_blocking(move || {
                    helexa_engine::tokenizer::tokenizer_from_file(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|t| helexa_engine::tokenizer::check_matches_gguf(&t, &md))
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                match checked {
                    Ok(()) => out.tokenizer = Some(p),
                    Err(why) => notes.push(format!(
                        "the tokenizer.json of base repo {base} does not match the GGUF \
                         ({why}): using the GGUF's own tokenizer"
                    )),
                }
            } else {
                notes.push(format!(
                    "base repo {base} has no tokenizer.json: using the GGUF's own tokenizer"
                ));
            }
        }
        if want_template {
            let jinja = snapshot.join("chat_template.jinja");
            let config = snapshot.join("tokenizer_config.json");
            let has = |p: &Path| {
                std::fs::read_to_string(p)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| crate::engine_server::chat_template_value(&v["chat_template"]))
                    .is_some()
            };
            if jinja.is_file() {
                out.chat_template = Some(jinja);
            } else if has(&config) {
                out.tokenizer_config = Some(config);
            } else {
                notes.push(format!(
                    "base repo {base} has no chat template: using the ChatML default template"
                ));
            }
        }
        if !notes.is_empty() {
            warn(out, notes.join("; "));
        }
    }

    /// The base repo's tokenizer files (`main`): from the cache when its
    /// snapshot has them, else fetched. Returns the snapshot folder.
    async fn fetch_companions(
        &self,
        model: &str,
        base: &str,
        only: Option<&str>,
        retry: Duration,
        progress: ProgressFn<'_>,
    ) -> Result<PathBuf, HubError> {
        let dir = Self::repo_dir(&self.cache, base);
        if let Some(commit) = std::fs::read_to_string(dir.join("refs/main"))
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty() && !c.contains('/'))
        {
            let snapshot = dir.join("snapshots").join(commit);
            if BASE_COMPANIONS[..2]
                .iter()
                .any(|c| snapshot.join(c).is_file())
            {
                return Ok(snapshot);
            }
        }
        let (source, info) = self.info_any(model, base, "main", only, retry).await?;
        let names = safe_names(&info);
        let files: Vec<String> = BASE_COMPANIONS
            .iter()
            .filter(|c| names.iter().any(|n| n == *c))
            .map(|c| c.to_string())
            .collect();
        if files.is_empty() {
            return Err(HubError::Select {
                repo: base.to_string(),
                message: format!("none of {} in the repo", BASE_COMPANIONS.join(", ")),
            });
        }
        self.fetch(model, source, base, "main", &dir, &info, &files, progress)
            .await
    }

    fn auth(&self, source: &SourceConfig, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match source
            .token_env
            .as_deref()
            .and_then(|k| std::env::var(k).ok())
            .filter(|t| !t.is_empty())
        {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn info(
        &self,
        source: &SourceConfig,
        repo: &str,
        revision: &str,
    ) -> Result<RepoInfo, Attempt> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}?blobs=true",
            source.endpoint.trim_end_matches('/'),
            encode(revision)
        );
        let r = self
            .auth(source, self.client.get(&url))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| Attempt {
                transient: true,
                message: format!("GET {url}: {}", chain(&e)),
            })?;
        let status = r.status();
        if !status.is_success() {
            return Err(Attempt {
                transient: is_transient(status),
                message: format!("GET {url}: HTTP {status}"),
            });
        }
        r.json::<RepoInfo>().await.map_err(|e| Attempt {
            transient: true,
            message: format!("GET {url}: bad answer: {e}"),
        })
    }

    /// Fetches `files` of `repo` at `info.sha` into the cache; returns the
    /// snapshot folder.
    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        &self,
        model: &str,
        source: &SourceConfig,
        repo: &str,
        revision: &str,
        dir: &Path,
        info: &RepoInfo,
        files: &[String],
        progress: ProgressFn<'_>,
    ) -> Result<PathBuf, HubError> {
        let commit = info.sha.clone();
        let cache_err = |message: String| HubError::Cache {
            repo: repo.to_string(),
            dir: dir.to_path_buf(),
            message,
        };
        for sub in ["blobs", "refs"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| cache_err(format!("cannot create {sub}: {e}")))?;
        }
        let snapshot = dir.join("snapshots").join(&commit);
        std::fs::create_dir_all(&snapshot)
            .map_err(|e| cache_err(format!("cannot create the snapshot folder: {e}")))?;
        // Metadata first: every file's blob name, size and checksum.
        let mut wanted = Vec::new();
        for name in files {
            let sib = info.siblings.iter().find(|s| &s.rfilename == name);
            let began = Instant::now();
            let mut delay = Duration::from_secs(1);
            loop {
                match self.head(source, repo, &commit, name, sib).await {
                    Ok(w) => {
                        wanted.push(w);
                        break;
                    }
                    Err((true, e)) if began.elapsed() + delay <= self.retry => {
                        tracing::warn!(%model, error = %e, retry_in_ms = delay.as_millis() as u64, "file metadata unavailable; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                    Err((_, e)) => return Err(e),
                }
            }
        }
        let total: u64 = wanted.iter().map(|w| w.size).sum();
        let have = |w: &Wanted| {
            let blob = dir.join("blobs").join(&w.etag);
            if file_len(&blob) == Some(w.size) {
                w.size
            } else {
                0
            }
        };
        let present: u64 = wanted.iter().map(have).sum();
        let partial: u64 = wanted
            .iter()
            .filter(|w| have(w) == 0)
            .map(|w| {
                file_len(&dir.join("blobs").join(format!("{}.incomplete", w.etag)))
                    .unwrap_or(0)
                    .min(w.size)
            })
            .sum();
        let need = total - present - partial;
        if let Some(free) = free_bytes(&dir.join("blobs")) {
            if free < need {
                return Err(HubError::NoSpace {
                    repo: repo.to_string(),
                    dir: dir.join("blobs"),
                    need,
                    free,
                });
            }
        }
        tracing::info!(%model, %repo, source = %source.name, %commit, files = ?files, bytes_total = total, bytes_present = present, "fetching model from the hub");
        let mut done = present;
        for w in &wanted {
            let blob = dir.join("blobs").join(&w.etag);
            if file_len(&blob) != Some(w.size) {
                self.download(model, source, repo, dir, w, done, total, progress)
                    .await?;
            }
            done += w.size;
            link(&snapshot, &w.name, &w.etag).map_err(|e| HubError::File {
                repo: repo.to_string(),
                file: w.name.clone(),
                source_name: source.name.clone(),
                message: format!("cannot link it into {}: {e}", snapshot.display()),
            })?;
        }
        if revision != commit {
            let r = dir.join("refs").join(revision);
            if let Some(parent) = r.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            std::fs::write(&r, &commit)
                .map_err(|e| cache_err(format!("cannot write refs/{revision}: {e}")))?;
        }
        tracing::info!(%model, %repo, source = %source.name, %commit, bytes_total = total, "files fetched and verified");
        Ok(snapshot)
    }

    /// `HEAD …/resolve/{commit}/{file}`: the blob name, size and checksum.
    /// An error says whether it is transient (worth a retry).
    async fn head(
        &self,
        source: &SourceConfig,
        repo: &str,
        commit: &str,
        name: &str,
        sib: Option<&Sibling>,
    ) -> Result<Wanted, (bool, HubError)> {
        let url = format!(
            "{}/{repo}/resolve/{commit}/{}",
            source.endpoint.trim_end_matches('/'),
            name.split('/').map(encode).collect::<Vec<_>>().join("/")
        );
        let ferr = |message: String| HubError::File {
            repo: repo.to_string(),
            file: name.to_string(),
            source_name: source.name.clone(),
            message,
        };
        let r = self
            .auth(source, self.head_client.head(&url))
            .header("accept-encoding", "identity")
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| (true, ferr(format!("HEAD {url}: {}", chain(&e)))))?;
        let status = r.status();
        if !(status.is_success() || status.is_redirection()) {
            return Err((
                is_transient(status),
                ferr(format!("HEAD {url}: HTTP {status}")),
            ));
        }
        let h = r.headers();
        let header = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .filter(|e| !e.is_empty() && !e.contains('/') && !e.contains(".."))
            .ok_or_else(|| (false, ferr(format!("HEAD {url}: no ETag"))))?;
        let size = header("x-linked-size")
            .and_then(|s| s.parse().ok())
            .or(sib.and_then(|s| s.lfs.as_ref().and_then(|l| l.size).or(s.size)))
            .or_else(|| header("content-length").and_then(|s| s.parse().ok()))
            .ok_or_else(|| (false, ferr(format!("HEAD {url}: no size"))))?;
        let sha256 = sib
            .and_then(|s| s.lfs.as_ref().map(|l| l.sha256.to_lowercase()))
            .or_else(|| is_sha256(&etag).then(|| etag.to_lowercase()));
        Ok(Wanted {
            name: name.to_string(),
            etag,
            size,
            sha256,
            url,
        })
    }

    /// Fetches one file into its blob: resumes, retries, verifies.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        model: &str,
        source: &SourceConfig,
        repo: &str,
        dir: &Path,
        w: &Wanted,
        done_before: u64,
        total: u64,
        progress: ProgressFn<'_>,
    ) -> Result<(), HubError> {
        let blob = dir.join("blobs").join(&w.etag);
        let part = dir.join("blobs").join(format!("{}.incomplete", w.etag));
        // Two loads needing the same blob (two ids, one repo): one fetches,
        // the other then finds it done.
        let lock = blob_lock(&blob);
        let _held = lock.lock().await;
        if file_len(&blob) == Some(w.size) {
            return Ok(());
        }
        let ferr = |message: String| HubError::File {
            repo: repo.to_string(),
            file: w.name.clone(),
            source_name: source.name.clone(),
            message,
        };
        // Likewise other processes sharing the cache (another neuron,
        // huggingface_hub): the lock file they take.
        let _file_lock = lock_blob_file(model, dir, &w.etag).await.map_err(ferr)?;
        if file_len(&blob) == Some(w.size) {
            tracing::info!(%model, %repo, file = %w.name, "another process fetched the file");
            return Ok(());
        }
        let report = |have: u64| {
            progress(DownloadProgress {
                model: model.to_string(),
                repo: repo.to_string(),
                source: source.name.clone(),
                file: w.name.clone(),
                bytes_done: done_before + have,
                bytes_total: total,
            })
        };
        let began = Instant::now();
        let mut delay = Duration::from_secs(1);
        let mut corrupt = 0u32;
        loop {
            let mut have = file_len(&part).unwrap_or(0);
            if have > w.size {
                let _ = std::fs::remove_file(&part);
                have = 0;
            }
            let outcome = if have < w.size {
                self.get_range(source, w, &part, have, &report).await
            } else {
                Ok(())
            };
            match outcome {
                Ok(()) => {}
                Err(a) => {
                    if !a.transient || began.elapsed() + delay > self.retry {
                        return Err(ferr(a.message));
                    }
                    tracing::warn!(%model, %repo, file = %w.name, source = %source.name, error = %a.message, retry_in_ms = delay.as_millis() as u64, "download interrupted; resuming");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
            let len = file_len(&part).unwrap_or(0);
            if len != w.size {
                // Short (or long) answer: resume what is there, drop the rest.
                tracing::warn!(%model, %repo, file = %w.name, source = %source.name, got = len, expected = w.size, "size mismatch; resuming");
                if len > w.size {
                    let _ = std::fs::remove_file(&part);
                }
                corrupt += 1;
                if corrupt > 3 {
                    return Err(ferr(format!(
                        "size {len} after download, expected {} (gave up)",
                        w.size
                    )));
                }
                continue;
            }
            if let Some(expected) = &w.sha256 {
                let path = part.clone();
                let got = tokio::task::spawn_blocking(move || sha256_file(&path))
                    .await
                    .map_err(|e| ferr(format!("checksum task: {e}")))?
                    .map_err(|e| ferr(format!("cannot read {}: {e}", part.display())))?;
                if &got != expected {
                    let _ = std::fs::remove_file(&part);
                    corrupt += 1;
                    tracing::warn!(%model, %repo, file = %w.name, source = %source.name, %got, %expected, "sha256 mismatch; fetching the file again");
                    if corrupt > 3 {
                        return Err(ferr(format!(
                            "sha256 {got}, expected {expected} (gave up after {corrupt} tries)"
                        )));
                    }
                    continue;
                }
            }
            std::fs::rename(&part, &blob)
                .map_err(|e| ferr(format!("cannot move it to {}: {e}", blob.display())))?;
            tracing::info!(%model, %repo, file = %w.name, source = %source.name, bytes = w.size, "file verified");
            return Ok(());
        }
    }

    /// One `GET` appended to `part` from byte `have` on.
    async fn get_range(
        &self,
        source: &SourceConfig,
        w: &Wanted,
        part: &Path,
        have: u64,
        report: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), Attempt> {
        let mut req = self
            .auth(source, self.client.get(&w.url))
            .header("accept-encoding", "identity");
        if have > 0 {
            req = req.header("range", format!("bytes={have}-"));
        }
        let r = req.send().await.map_err(|e| Attempt {
            transient: true,
            message: format!("GET {}: {}", w.url, chain(&e)),
        })?;
        let status = r.status();
        let append = match status.as_u16() {
            206 if have > 0 => true,
            200 => false,
            _ => {
                return Err(Attempt {
                    transient: is_transient(status),
                    message: format!("GET {}: HTTP {status}", w.url),
                })
            }
        };
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .await
            .map_err(|e| Attempt {
                transient: false,
                message: format!("cannot write {}: {e}", part.display()),
            })?;
        let mut got = if append { have } else { 0 };
        let mut stream = r.bytes_stream();
        let mut last = Instant::now();
        let mut logged = Instant::now();
        loop {
            let chunk = match tokio::time::timeout(self.stall, stream.next()).await {
                Err(_) => {
                    return Err(Attempt {
                        transient: true,
                        message: format!("GET {}: stalled for {:?}", w.url, self.stall),
                    })
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    let _ = f.flush().await;
                    return Err(Attempt {
                        transient: true,
                        message: format!("GET {}: {}", w.url, chain(&e)),
                    });
                }
                Ok(Some(Ok(c))) => c,
            };
            f.write_all(&chunk).await.map_err(|e| Attempt {
                transient: false,
                message: format!("cannot write {}: {e}", part.display()),
            })?;
            got += chunk.len() as u64;
            if last.elapsed() >= Duration::from_millis(200) {
                last = Instant::now();
                report(got);
            }
            if logged.elapsed() >= Duration::from_secs(5) {
                logged = Instant::now();
                tracing::info!(url = %w.url, file = %w.name, source = %source.name, bytes_done = got, bytes_total = w.size, "downloading");
            }
        }
        f.flush().await.map_err(|e| Attempt {
            transient: false,
            message: format!("cannot write {}: {e}", part.display()),
        })?;
        report(got);
        Ok(())
    }
}

/// The repo's file names, less any that could leave the snapshot folder.
fn safe_names(info: &RepoInfo) -> Vec<String> {
    info.siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|n| {
            !n.is_empty()
                && !n.starts_with('/')
                && n.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        })
        .collect()
}

/// `org/name`: two non-empty parts, neither `.` nor `..`.
fn valid_repo(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
}

/// The model card's `base_model` (a repo, or a list: the first).
fn card_base_model(info: &RepoInfo) -> Option<String> {
    let v = &info.card_data.as_ref()?["base_model"];
    let s = v.as_str().or_else(|| v.as_array()?.first()?.as_str())?;
    let s = s.trim();
    valid_repo(s).then(|| s.to_string())
}

/// The GGUF header's metadata (the tensors are not read).
fn gguf_metadata(
    path: &Path,
) -> Result<std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    candle_core::quantized::gguf_file::Content::read(&mut f)
        .map(|c| c.metadata)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The base model llama.cpp's converter records in a GGUF:
/// `general.base_model.0.repo_url` (`https://huggingface.co/org/name`), else
/// `general.base_model.0.organization` + `.name` (titles, so spaces become
/// `-`: a best guess).
fn gguf_base_model(
    md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
) -> Option<String> {
    let get = |k: &str| {
        md.get(k)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    if let Some(url) = get("general.base_model.0.repo_url") {
        let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
        let parts: Vec<&str> = rest.split('/').skip(1).filter(|p| !p.is_empty()).collect();
        if parts.len() >= 2 {
            let repo = format!("{}/{}", parts[0], parts[1]);
            if valid_repo(&repo) {
                return Some(repo);
            }
        }
    }
    let repo = format!(
        "{}/{}",
        get("general.base_model.0.organization")?.replace(' ', "-"),
        get("general.base_model.0.name")?.replace(' ', "-")
    );
    valid_repo(&repo).then_some(repo)
}

/// An advisory `flock` on `{cache}/.locks/{repo folder}/{etag}.lock`, the
/// lock file huggingface_hub's `filelock` takes before it writes the blob,
/// so that processes sharing a cache do not write one blob at once; waited
/// for (polling, so that a cancelled load stops waiting) while another
/// process holds it. Released when the file is dropped. A file system
/// without `flock` goes on unlocked, with a warning.
async fn lock_blob_file(model: &str, dir: &Path, etag: &str) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let locks = dir
        .parent()
        .unwrap_or(dir)
        .join(".locks")
        .join(dir.file_name().unwrap_or_default());
    let path = locks.join(format!("{etag}.lock"));
    let f = std::fs::create_dir_all(&locks)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
        })
        .map_err(|e| format!("cannot open the lock file {}: {e}", path.display()))?;
    let began = Instant::now();
    let mut said = None::<Instant>;
    loop {
        // SAFETY: `f` is an open file; flock only reads its descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            tracing::warn!(%model, lock = %path.display(), error = %e, "cannot lock the blob; fetching it unlocked");
            return Ok(f);
        }
        if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            said = Some(Instant::now());
            tracing::info!(%model, lock = %path.display(), waited_secs = began.elapsed().as_secs(), "another process is fetching this file; waiting");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The in-process lock of one blob path.
fn blob_lock(blob: &Path) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    static LOCKS: std::sync::OnceLock<
        std::sync::Mutex<
            std::collections::HashMap<PathBuf, std::sync::Arc<tokio::sync::Mutex<()>>>,
        >,
    > = std::sync::OnceLock::new();
    let mut map = LOCKS
        .get_or_init(Default::default)
        .lock()
        .expect("blob locks");
    map.retain(|_, l| std::sync::Arc::strong_count(l) > 1);
    map.entry(blob.to_path_buf()).or_default().clone()
}

/// An error with its causes (reqwest's own message is only the outer layer:
/// "error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn is_transient(status: reqwest::StatusCode) -> bool {
    status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn file_len(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

fn sha256_file(p: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

/// Bytes available to an unprivileged writer on the file system of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// `snapshots/{commit}/{name}` → `../../blobs/{etag}` (a relative symlink,
/// as the hub tools make; a copy where symlinks fail).
fn link(snapshot: &Path, name: &str, etag: &str) -> std::io::Result<()> {
    let dst = snapshot.join(name);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let depth = name.split('/').count(); // snapshots/{commit}/a/b → 1 + subdirs
    let mut target = PathBuf::new();
    for _ in 0..depth + 1 {
        target.push("..");
    }
    target.push("blobs");
    target.push(etag);
    if std::fs::read_link(&dst).ok().as_deref() == Some(target.as_path()) {
        return Ok(());
    }
    let _ = std::fs::remove_file(&dst);
    match std::os::unix::fs::symlink(&target, &dst) {
        Ok(()) => Ok(()),
        Err(_) => {
            let from = dst.parent().unwrap_or(snapshot).join(&target);
            std::fs::copy(from, &dst).map(|_| ())
        }
    }
}

/// The files of a repo to fetch, and the one the engine is given (`None`:
/// the snapshot folder, for safetensors).
fn select(
    repo: &str,
    names: &[String],
    quant: Option<&str>,
) -> Result<(Vec<String>, Option<String>), HubError> {
    let serr = |message: String| HubError::Select {
        repo: repo.to_string(),
        message,
    };
    let ggufs: Vec<&String> = names
        .iter()
        .filter(|n| n.to_lowercase().ends_with(".gguf"))
        .collect();
    if !ggufs.is_empty() {
        let chosen = pick_gguf(&ggufs, quant).map_err(serr)?;
        let mut files = vec![chosen.clone()];
        for c in GGUF_COMPANIONS {
            if names.iter().any(|n| n == c) {
                files.push(c.to_string());
            }
        }
        return Ok((files, Some(chosen)));
    }
    if let Some(q) = quant {
        return Err(serr(format!(
            "quant {q:?} given but the repo has no .gguf file"
        )));
    }
    // sentence-transformers' pooling folder (`1_Pooling/config.json`) says
    // how an embedding model's vectors are made: without it they are wrong.
    let pooling = |n: &str| {
        n.split_once('/')
            .is_some_and(|(dir, f)| dir.ends_with("_Pooling") && f == "config.json")
    };
    let files: Vec<String> = names
        .iter()
        .filter(|n| {
            pooling(n)
                || !n.contains('/')
                    && (n.ends_with(".safetensors")
                        || n.ends_with(".safetensors.index.json")
                        || matches!(
                            n.as_str(),
                            "config.json"
                                | "generation_config.json"
                                | "tokenizer.json"
                                | "tokenizer_config.json"
                                | "special_tokens_map.json"
                                | "chat_template.jinja"
                                | "modules.json"
                                | "sentence_bert_config.json"
                        ))
        })
        .cloned()
        .collect();
    if !files.iter().any(|f| f.ends_with(".safetensors"))
        || !files.iter().any(|f| f == "config.json")
    {
        return Err(serr(format!(
            "no .gguf file and no safetensors model (config.json + *.safetensors); files: {}",
            names.join(", ")
        )));
    }
    Ok((files, None))
}

/// `name-00001-of-00003.gguf` → (`name`, 1, 3): a part of a split GGUF.
fn split_part(n: &str) -> Option<(&str, u32, u32)> {
    let stem = n
        .strip_suffix(".gguf")
        .or_else(|| n.strip_suffix(".GGUF"))?;
    let (rest, total) = stem.rsplit_once("-of-")?;
    let (prefix, index) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(index) || !digits(total) {
        return None;
    }
    Some((prefix, index.parse().ok()?, total.parse().ok()?))
}

/// One choice among a repo's GGUFs: a file, or every part of a split one.
struct GgufChoice {
    /// The file, or the split's first part (`…-00001-of-0000N.gguf`).
    name: String,
    /// A split GGUF: the parts of `total` present, in order.
    parts: Vec<String>,
    total: u32,
}

impl GgufChoice {
    fn label(&self) -> String {
        if self.parts.is_empty() {
            self.name.clone()
        } else {
            format!(
                "{} ({} of {} parts)",
                self.name,
                self.parts.len(),
                self.total
            )
        }
    }
}

/// The repo's GGUFs as choices: the parts of one split GGUF are one.
fn gguf_choices(ggufs: &[&String]) -> Vec<GgufChoice> {
    let mut out: Vec<GgufChoice> = Vec::new();
    for n in ggufs {
        match split_part(n) {
            Some((prefix, _, total)) => {
                let first = format!("{prefix}-00001-of-{total:05}.gguf");
                match out.iter_mut().find(|c| c.total == total && c.name == first) {
                    Some(c) => c.parts.push(n.to_string()),
                    None => out.push(GgufChoice {
                        name: first,
                        parts: vec![n.to_string()],
                        total,
                    }),
                }
            }
            None => out.push(GgufChoice {
                name: n.to_string(),
                parts: Vec::new(),
                total: 0,
            }),
        }
    }
    for c in &mut out {
        c.parts.sort();
    }
    out
}

/// The GGUF file `quant` picks: the only choice whose name contains it
/// (case-insensitive); without `quant`, the only GGUF of the repo. The parts
/// of a split GGUF (`-00001-of-0000N`) are one choice, which is refused:
/// the engine loads one file.
fn pick_gguf(ggufs: &[&String], quant: Option<&str>) -> Result<String, String> {
    let choices = gguf_choices(ggufs);
    let list = |v: &[&GgufChoice]| v.iter().map(|c| c.label()).collect::<Vec<_>>().join(", ");
    let all: Vec<&GgufChoice> = choices.iter().collect();
    let matching: Vec<&GgufChoice> = match quant {
        Some(q) => {
            let q = q.to_lowercase();
            all.iter()
                .copied()
                .filter(|c| file_name(&c.name).to_lowercase().contains(&q))
                .collect()
        }
        None => all.clone(),
    };
    let chosen = match (matching.len(), quant) {
        (1, _) => matching[0],
        (0, Some(q)) => {
            return Err(format!(
                "quant {q:?} matches none of the GGUF files: {}",
                list(&all)
            ))
        }
        (_, Some(q)) => {
            return Err(format!(
                "quant {q:?} is ambiguous: it matches {}",
                list(&matching)
            ))
        }
        (_, None) => {
            return Err(format!(
                "the repo has several GGUF files; set quant to pick one of: {}",
                list(&all)
            ))
        }
    };
    if chosen.parts.is_empty() {
        return Ok(chosen.name.clone());
    }
    let missing: Vec<String> = (1..=chosen.total)
        .map(|i| {
            let prefix = chosen
                .name
                .trim_end_matches(&format!("-00001-of-{:05}.gguf", chosen.total));
            format!("{prefix}-{i:05}-of-{:05}.gguf", chosen.total)
        })
        .filter(|n| !chosen.parts.contains(n))
        .collect();
    Err(format!(
        "{} is a split GGUF ({} parts: {}{}); split GGUFs are not supported: the engine \
         loads one file (merge the parts with `llama-gguf-split --merge` into a local \
         `path`, or pick another quant)",
        chosen.name,
        chosen.total,
        chosen.parts.join(", "),
        if missing.is_empty() {
            String::new()
        } else {
            format!("; missing from the repo: {}", missing.join(", "))
        }
    ))
}

fn file_name(n: &str) -> &str {
    n.rsplit('/').next().unwrap_or(n)
}

/// The model's path from the cache alone, if its ref and files are there.
fn cached(
    dir: &Path,
    repo: &str,
    revision: &str,
    quant: Option<&str>,
) -> Result<Option<PathBuf>, HubError> {
    let commit = match std::fs::read_to_string(dir.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) if revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()) => {
            revision.to_string()
        }
        Err(_) => return Ok(None),
    };
    if commit.is_empty() || commit.contains('/') {
        return Ok(None);
    }
    let snapshot = dir.join("snapshots").join(&commit);
    let mut names = Vec::new();
    list_files(&snapshot, "", &mut names);
    if names.is_empty() {
        return Ok(None);
    }
    let ggufs: Vec<&String> = names
        .iter()
        .filter(|n| n.to_lowercase().ends_with(".gguf"))
        .collect();
    if !ggufs.is_empty() {
        // A file the cache lacks may still be on the hub: no match here
        // means "go online", not an error.
        return Ok(pick_gguf(&ggufs, quant).ok().map(|f| snapshot.join(f)));
    }
    if quant.is_some() {
        return Ok(None);
    }
    // safetensors: config.json and every shard the index names.
    if !snapshot.join("config.json").is_file() {
        return Ok(None);
    }
    let index = snapshot.join("model.safetensors.index.json");
    if let Ok(text) = std::fs::read_to_string(&index) {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| HubError::Cache {
            repo: repo.to_string(),
            dir: index.clone(),
            message: e.to_string(),
        })?;
        let complete = v["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|f| f.as_str())
                    .all(|f| snapshot.join(f).is_file())
            })
            .unwrap_or(false);
        return Ok(complete.then_some(snapshot));
    }
    Ok(snapshot
        .join("model.safetensors")
        .is_file()
        .then_some(snapshot))
}

/// Files (followed symlinks that resolve) under `dir`, relative, `/`-joined.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let p = e.path();
        if p.is_dir() {
            list_files(&p, &rel, out);
        } else if p.is_file() {
            out.push(rel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn quant_picks_one_file_or_names_candidates() {
        let n = names(&[
            "README.md",
            "m.Q4_0.gguf",
            "m.Q4_1.gguf",
            "m.Q8_0.gguf",
            "tokenizer.json",
        ]);
        let (files, f) = select("o/m", &n, Some("q4_1")).unwrap();
        assert_eq!(f.as_deref(), Some("m.Q4_1.gguf"));
        assert_eq!(files, names(&["m.Q4_1.gguf", "tokenizer.json"]));
        let e = select("o/m", &n, Some("Q4")).unwrap_err().to_string();
        assert!(
            e.contains("ambiguous") && e.contains("m.Q4_0.gguf") && e.contains("m.Q4_1.gguf"),
            "{e}"
        );
        let e = select("o/m", &n, Some("Q5")).unwrap_err().to_string();
        assert!(
            e.contains("none") && e.contains("m.Q8_0.gguf") && e.contains("o/m"),
            "{e}"
        );
        let e = select("o/m", &n, None).unwrap_err().to_string();
        assert!(e.contains("set quant"), "{e}");
    }

    #[test]
    fn safetensors_repo_takes_weights_and_configs() {
        let n = names(&[
            "config.json",
            "model.safetensors",
            "README.md",
            "tokenizer.json",
        ]);
        let (files, f) = select("o/m", &n, None).unwrap();
        assert_eq!(f, None);
        assert_eq!(
            files,
            names(&["config.json", "model.safetensors", "tokenizer.json"])
        );
        // An embedding model's sentence-transformers files come along.
        let n = names(&[
            "1_Pooling/config.json",
            "config.json",
            "model.safetensors",
            "modules.json",
            "onnx/model.onnx",
            "openvino/config.json",
            "tokenizer.json",
        ]);
        let (files, _) = select("o/m", &n, None).unwrap();
        assert_eq!(
            files,
            names(&[
                "1_Pooling/config.json",
                "config.json",
                "model.safetensors",
                "modules.json",
                "tokenizer.json"
            ])
        );
    }

    #[test]
    fn parts_of_a_split_gguf_are_one_choice_which_is_refused() {
        let n = names(&[
            "m.Q4_K_M-00001-of-00003.gguf",
            "m.Q4_K_M-00002-of-00003.gguf",
            "m.Q4_K_M-00003-of-00003.gguf",
            "m.Q8_0-00001-of-00002.gguf",
            "m.Q2_K.gguf",
        ]);
        // Not "ambiguous" between its parts: one split model, refused.
        let e = select("o/m", &n, Some("q4_k_m")).unwrap_err().to_string();
        assert!(
            e.contains("split GGUF")
                && e.contains("not supported")
                && e.contains("m.Q4_K_M-00001-of-00003.gguf")
                && e.contains("m.Q4_K_M-00003-of-00003.gguf")
                && !e.contains("ambiguous"),
            "{e}"
        );
        // A part missing from the repo is named.
        let e = select("o/m", &n, Some("Q8_0")).unwrap_err().to_string();
        assert!(
            e.contains("split GGUF")
                && e.contains("missing from the repo: m.Q8_0-00002-of-00002.gguf"),
            "{e}"
        );
        // Candidates list a split once.
        let e = select("o/m", &n, Some("m.Q")).unwrap_err().to_string();
        assert!(
            e.contains("ambiguous")
                && e.contains("m.Q4_K_M-00001-of-00003.gguf (3 of 3 parts)")
                && !e.contains("00002-of-00003"),
            "{e}"
        );
        // A plain file beside splits is still picked.
        let (files, f) = select("o/m", &n, Some("q2_k")).unwrap();
        assert_eq!(f.as_deref(), Some("m.Q2_K.gguf"));
        assert_eq!(files, names(&["m.Q2_K.gguf"]));
        // A lone split model without quant: refused, not "set quant".
        let one = names(&["x-00001-of-00002.gguf", "x-00002-of-00002.gguf"]);
        let e = select("o/x", &one, None).unwrap_err().to_string();
        assert!(e.contains("split GGUF") && !e.contains("set quant"), "{e}");
        assert_eq!(split_part("a-00002-of-00010.gguf"), Some(("a", 2, 10)));
        assert_eq!(split_part("a-2-of-10.gguf"), None);
    }

    #[test]
    fn base_model_from_the_card_or_the_gguf_metadata() {
        let info = |card: serde_json::Value| RepoInfo {
            sha: "c".into(),
            siblings: vec![],
            card_data: Some(card),
        };
        assert_eq!(
            card_base_model(&info(serde_json::json!({"base_model": "org/base"}))).as_deref(),
            Some("org/base")
        );
        assert_eq!(
            card_base_model(&info(serde_json::json!({"base_model": ["org/a", "org/b"]})))
                .as_deref(),
            Some("org/a")
        );
        assert_eq!(
            card_base_model(&info(serde_json::json!({"base_model": "../x"}))),
            None
        );
        assert_eq!(
            card_base_model(&info(serde_json::json!({"license": "mit"}))),
            None
        );

        use candle_core::quantized::gguf_file::Value;
        let md = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect::<std::collections::HashMap<_, _>>()
        };
        assert_eq!(
            gguf_base_model(&md(&[(
                "general.base_model.0.repo_url",
                "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
            )]))
            .as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M-Instruct")
        );
        assert_eq!(
            gguf_base_model(&md(&[
                ("general.base_model.0.organization", "HuggingFaceTB"),
                ("general.base_model.0.name", "SmolLM2 135M Instruct"),
            ]))
            .as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M-Instruct")
        );
        assert_eq!(gguf_base_model(&md(&[("general.name", "x")])), None);
    }

    #[test]
    fn encode_keeps_unreserved() {
        assert_eq!(encode("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode("m.Q4_1.gguf"), "m.Q4_1.gguf");
    }
}
