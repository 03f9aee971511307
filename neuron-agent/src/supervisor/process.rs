//! One engine child process (the supervisor's): how it is started, how the agent learns that it
//! is ready, how it is stopped — and how it never outlives the agent.
//!
//! Protocol (see `engine_server`): `<program> engine --model … --listen
//! 127.0.0.1:0 …`; the child prints `HELEXA_ENGINE_LISTEN <addr>` once bound,
//! answers `GET /health` 503 while loading and 200 when ready; a failed load
//! exits non-zero with the reason on stderr.
//!
//! Orphans are prevented three ways: `PR_SET_PDEATHSIG(SIGKILL)` (the kernel
//! kills the child when the thread that spawned it dies, including on SIGKILL
//! of the agent), `kill_on_drop` (a dropped handle kills the child), and an
//! explicit SIGTERM → SIGKILL → wait on unload and agent exit, so the child
//! is also reaped. Each engine leads its own process group, so a terminal's
//! Ctrl-C reaches only the agent, which then stops its engines in order, and
//! a signal to the group also reaches anything the engine started.

use crate::config::{Config, ModelSpec};
use serde::Deserialize;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Lines of the engine's stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 30;
pub const LISTEN_LINE_PREFIX: &str = crate::engine_server::LISTEN_LINE_PREFIX;

/// `GET /info` of an engine. Unknown fields are ignored, missing ones default.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct EngineInfo {
    pub id: String,
    pub context_length: u32,
    pub max_output_tokens: u32,
    pub architecture: String,
    pub weights_bytes: u64,
    pub capabilities: Vec<String>,
    pub tokenizer: Option<String>,
    pub reasoning: bool,
    pub generation_defaults: Option<serde_json::Value>,
}

/// `GET /health` of a ready engine.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct EngineHealth {
    pub status: String,
    pub in_flight: u32,
    pub tokens_generated_total: u64,
    pub prompt_tokens_total: u64,
    pub tok_s_prefill: f64,
    pub tok_s_decode: f64,
}

/// Why an engine could not be started.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    #[error("model file {0} does not exist")]
    MissingModel(PathBuf),
    /// A `repo` model could not be fetched (the message names repo, file,
    /// source and HTTP status).
    #[error("{0}")]
    Fetch(String),
    #[error("cannot start engine program {program}: {reason}")]
    Spawn { program: PathBuf, reason: String },
    #[error("engine exited during start-up ({status}){}", tail_suffix(.stderr_tail))]
    Exited { status: String, stderr_tail: String },
    #[error("engine not ready after {secs}s{}", tail_suffix(.stderr_tail))]
    Timeout { secs: u64, stderr_tail: String },
    #[error("engine start cancelled")]
    Cancelled,
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", tail.trim())
    }
}

/// The command line that starts the engine for `spec`.
pub fn command_line(config: &Config, spec: &ModelSpec) -> (PathBuf, Vec<OsString>) {
    let program = config
        .engine_program
        .clone()
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("neuron"));
    let mut args: Vec<OsString> = vec![
        "engine".into(),
        "--model".into(),
        spec.path.clone().into(),
        "--id".into(),
        spec.id.clone().into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    let mut opt = |flag: &str, v: Option<String>| {
        if let Some(v) = v {
            args.push(flag.into());
            args.push(v.into());
        }
    };
    opt("--max-context", spec.max_context.map(|v| v.to_string()));
    opt("--max-batch", spec.max_batch.map(|v| v.to_string()));
    opt("--max-output", spec.max_output.map(|v| v.to_string()));
    opt("--threads", spec.threads.map(|v| v.to_string()));
    opt(
        "--prefix-cache-mb",
        spec.prefix_cache_mb.map(|v| v.to_string()),
    );
    opt(
        "--max-batch-tokens",
        spec.max_batch_tokens.map(|v| v.to_string()),
    );
    opt("--max-inputs", spec.max_inputs.map(|v| v.to_string()));
    opt(
        "--tokenizer",
        spec.tokenizer.as_ref().map(|p| p.display().to_string()),
    );
    opt(
        "--chat-template",
        spec.chat_template.as_ref().map(|p| p.display().to_string()),
    );
    opt(
        "--tokenizer-config",
        spec.tokenizer_config
            .as_ref()
            .map(|p| p.display().to_string()),
    );
    opt("--device", spec.device.clone());
    args.extend(spec.extra_args.iter().map(OsString::from));
    (program, args)
}

/// A started, ready engine process.
#[derive(Debug)]
pub struct EngineProcess {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// Set once the child has been waited for.
    exited: Option<ExitStatus>,
}

impl EngineProcess {
    /// Spawns the engine and waits until it is ready (or fails, times out,
    /// or `cancel` fires — in which case the child is killed and reaped).
    pub async fn start(
        config: &Config,
        spec: &ModelSpec,
        client: &reqwest::Client,
        cancel: &CancellationToken,
    ) -> Result<(EngineProcess, EngineInfo), StartError> {
        if !spec.path.exists() {
            return Err(StartError::MissingModel(spec.path.clone()));
        }
        let (program, args) = command_line(config, spec);
        tracing::info!(model = %spec.id, program = %program.display(), ?args, "starting engine");
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        set_parent_death_signal(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| StartError::Spawn {
            program: program.clone(),
            reason: e.to_string(),
        })?;
        let pid = child.id().unwrap_or(0);
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_done = CancellationToken::new();
        if let Some(stderr) = child.stderr.take() {
            let tail = stderr_tail.clone();
            let id = spec.id.clone();
            let done = stderr_done.clone();
            tokio::spawn(async move {
                let _done = done.drop_guard();
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(target: "neuron::engine", model = %id, pid, "{line}");
                    let mut t = tail.lock().expect("stderr tail lock");
                    if t.len() == STDERR_TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        } else {
            stderr_done.cancel();
        }
        let mut proc = EngineProcess {
            child,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr_tail,
            exited: None,
        };
        let deadline = crate::admission::deadline_after(config.engine_ready_timeout());
        let outcome = tokio::select! {
            r = proc.wait_ready(spec, client, deadline) => r,
            _ = cancel.cancelled() => Err(StartError::Cancelled),
        };
        match outcome {
            Ok(info) => {
                tracing::info!(model = %spec.id, pid, addr = %proc.addr, "engine ready");
                Ok((proc, info))
            }
            Err(mut e) => {
                // Let the stderr reader catch the last lines of a dying child.
                let _ = tokio::time::timeout(Duration::from_secs(1), stderr_done.cancelled()).await;
                proc.stop(config.engine_stop_timeout()).await;
                let tail = proc.stderr_tail();
                match &mut e {
                    StartError::Exited { stderr_tail, .. }
                    | StartError::Timeout { stderr_tail, .. } => *stderr_tail = tail,
                    _ => {}
                }
                Err(e)
            }
        }
    }

    async fn wait_ready(
        &mut self,
        spec: &ModelSpec,
        client: &reqwest::Client,
        deadline: tokio::time::Instant,
    ) -> Result<EngineInfo, StartError> {
        let timeout_err = |secs| StartError::Timeout {
            secs,
            stderr_tail: String::new(),
        };
        let secs = (deadline - tokio::time::Instant::now()).as_secs();
        // 1. The listen line on stdout.
        let stdout = self.child.stdout.take().expect("stdout piped");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = tokio::select! {
                l = lines.next_line() => l,
                status = self.child.wait() => {
                    return Err(self.exited_error(status));
                }
                _ = tokio::time::sleep_until(deadline) => return Err(timeout_err(secs)),
            };
            match line {
                Ok(Some(line)) => {
                    if let Some(rest) = line.trim().strip_prefix(LISTEN_LINE_PREFIX.trim()) {
                        if let Ok(addr) = rest.trim().parse::<SocketAddr>() {
                            break addr;
                        }
                    }
                    tracing::info!(target: "neuron::engine", model = %spec.id, "stdout: {line}");
                }
                // stdout closed without the line: the child is exiting.
                Ok(None) | Err(_) => {
                    let status = tokio::select! {
                        s = self.child.wait() => s,
                        _ = tokio::time::sleep_until(deadline) => return Err(timeout_err(secs)),
                    };
                    return Err(self.exited_error(status));
                }
            }
        };
        self.addr = addr;
        // Keep draining stdout so that the child never blocks on a full pipe.
        let id = spec.id.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "neuron::engine", model = %id, "stdout: {line}");
            }
        });
        // 2. /health 200.
        let health_url = format!("{}/health", self.base_url());
        loop {
            let probe = client
                .get(&health_url)
                .timeout(Duration::from_secs(2))
                .send();
            tokio::select! {
                r = probe => {
                    if let Ok(resp) = r {
                        if resp.status().is_success() {
                            break;
                        }
                    }
                }
                status = self.child.wait() => return Err(self.exited_error(status)),
                _ = tokio::time::sleep_until(deadline) => return Err(timeout_err(secs)),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                status = self.child.wait() => return Err(self.exited_error(status)),
            }
        }
        // 3. /info (optional: an engine without it still serves).
        let info = match client
            .get(format!("{}/info", self.base_url()))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(resp) if resp.status().is_success() => {
                resp.json::<EngineInfo>().await.unwrap_or_default()
            }
            _ => EngineInfo::default(),
        };
        Ok(info)
    }

    fn exited_error(&mut self, status: std::io::Result<ExitStatus>) -> StartError {
        let status = match status {
            Ok(s) => {
                self.exited = Some(s);
                describe(s)
            }
            Err(e) => format!("wait failed: {e}"),
        };
        StartError::Exited {
            status,
            stderr_tail: String::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The last lines the engine wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        let t = self.stderr_tail.lock().expect("stderr tail lock");
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Resolves when the child exits (by itself or killed); cancel-safe.
    pub async fn wait(&mut self) -> String {
        if let Some(s) = self.exited {
            return describe(s);
        }
        match self.child.wait().await {
            Ok(s) => {
                self.exited = Some(s);
                describe(s)
            }
            Err(e) => format!("wait failed: {e}"),
        }
    }

    /// SIGKILL to the engine's process group at once (a hung engine gets no
    /// SIGTERM: it would not act on it), then reap. Idempotent.
    pub async fn kill(&mut self) {
        if self.exited.is_some() {
            return;
        }
        signal_group(self.pid, libc::SIGKILL);
        let _ = self.child.start_kill();
        if let Ok(s) = self.child.wait().await {
            self.exited = Some(s);
        }
    }

    /// SIGTERM to the engine's process group, SIGKILL after `timeout`, then
    /// reap. Idempotent.
    pub async fn stop(&mut self, timeout: Duration) {
        if self.exited.is_some() {
            return;
        }
        if let Ok(Some(s)) = self.child.try_wait() {
            self.exited = Some(s);
            signal_group(self.pid, libc::SIGKILL);
            return;
        }
        signal_group(self.pid, libc::SIGTERM);
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(s)) => self.exited = Some(s),
            _ => {
                tracing::warn!(pid = self.pid, "engine ignored SIGTERM; killing it");
                signal_group(self.pid, libc::SIGKILL);
                let _ = self.child.start_kill();
                if let Ok(s) = self.child.wait().await {
                    self.exited = Some(s);
                }
            }
        }
        // Anything left in the group (the engine's own children) goes too.
        signal_group(self.pid, libc::SIGKILL);
    }
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

fn signal_group(pgid: u32, sig: libc::c_int) {
    if pgid == 0 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; the group
    // was created for this engine (`process_group(0)`), so its id is the pid.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), sig);
    }
}

#[cfg(target_os = "linux")]
fn set_parent_death_signal(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) run
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent died between fork and prctl: do not live on.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut Command) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_every_flag() {
        let config = Config {
            engine_program: Some("/bin/engine".into()),
            ..Config::default()
        };
        let mut spec = ModelSpec::new("m", "/models/m.gguf");
        spec.max_context = Some(4096);
        spec.threads = Some(3);
        spec.max_batch_tokens = Some(4096);
        spec.max_inputs = Some(64);
        spec.device = Some("cuda:1".into());
        spec.extra_args = vec!["--keep-alive-secs".into(), "2".into()];
        let (program, args) = command_line(&config, &spec);
        assert_eq!(program, PathBuf::from("/bin/engine"));
        let args: Vec<String> = args.into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            args.join(" "),
            "engine --model /models/m.gguf --id m --listen 127.0.0.1:0 --max-context 4096 --threads 3 --max-batch-tokens 4096 --max-inputs 64 --device cuda:1 --keep-alive-secs 2"
        );
    }

    #[test]
    fn engine_documents_parse() {
        let info: EngineInfo = serde_json::from_str(
            r#"{"id":"m","context_length":8192,"max_output_tokens":2048,"architecture":"llama","weights_bytes":1048576,"capabilities":["chat","completions"],"tokenizer":null,"future":1}"#,
        )
        .unwrap();
        assert_eq!(info.context_length, 8192);
        let h: EngineHealth = serde_json::from_str(
            r#"{"status":"ready","in_flight":1,"tokens_generated_total":5,"prompt_tokens_total":9,"tok_s_prefill":1.5,"tok_s_decode":2.5}"#,
        )
        .unwrap();
        assert_eq!(h.tokens_generated_total, 5);
    }
}
