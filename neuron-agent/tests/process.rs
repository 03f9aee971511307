//! The real `neuron` binary as a process: engines never outlive it, whether
//! it exits on SIGTERM or is killed outright.

mod support;

use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// True while `pid` exists and is not a zombie.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

fn wait_gone(pids: &[u32], secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if pids.iter().all(|&p| !running(p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Starts `neuron --config FILE` and returns it with its bound address.
fn spawn_agent(fx: &Fixture) -> (Child, String) {
    let mut a = fx.model("a", json!({}));
    a.preload = true;
    let mut b = fx.model("b", json!({"ignore_sigterm": true}));
    b.preload = true;
    let mut c = config(vec![a, b]);
    c.engine_stop_timeout_secs = 1;
    let path = fx.dir.path().join("neuron.toml");
    std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_neuron"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("agent logs its address").unwrap();
        if let Some(rest) = line.split("addr=").nth(1) {
            if line.contains("listening") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        }
    };
    // Keep draining stderr so that the agent never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    (child, format!("http://{addr}"))
}

async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client().get(format!("{url}/health")).send().await {
            let h: serde_json::Value = r.json().await.unwrap();
            if h["activation"]["state"] == "ready" {
                assert_eq!(
                    h["activation"]["completed"].as_array().unwrap().len(),
                    2,
                    "{h}"
                );
                return;
            }
        }
        assert!(Instant::now() < deadline, "agent not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_engines_and_exits() {
    let fx = Fixture::new();
    let (mut agent, url) = spawn_agent(&fx);
    wait_ready(&url).await;
    let pids: Vec<u32> = ["a", "b"].iter().flat_map(|m| fx.pids(m)).collect();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| running(p)));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = agent.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(wait_gone(&pids, 2), "engines outlived the agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_agent_kills_its_engines() {
    let fx = Fixture::new();
    let (mut agent, url) = spawn_agent(&fx);
    wait_ready(&url).await;
    let pids: Vec<u32> = ["a", "b"].iter().flat_map(|m| fx.pids(m)).collect();
    assert_eq!(pids.len(), 2);
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(wait_gone(&pids, 5), "engines outlived a SIGKILLed agent");
}
