//! End-to-end: engine processes under the real agent. A killed engine comes
//! back and serves; the agent's exit, graceful or not, leaves no engine.

use helexa_e2e::*;
use std::time::{Duration, Instant};

async fn wait_engine_gone(pids: &[i32]) {
    let start = Instant::now();
    while pids.iter().any(|&p| pid_alive(p)) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "engine processes {pids:?} outlived the agent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_engine_recovers_and_serves() {
    let mut c = Cluster::start(ClusterOptions {
        with_cortex: false,
        ..Default::default()
    })
    .await;
    let engines = c.engine_pids();
    assert_eq!(engines.len(), 1, "one engine per loaded model");
    unsafe {
        libc::kill(engines[0], libc::SIGKILL);
    }
    // The agent notices, restarts it, and the model is served again.
    let start = Instant::now();
    loop {
        let h = c.neuron_health().await.expect("agent keeps answering");
        let m = model_health(&h);
        let fresh = c.engine_pids();
        if m["status"] == "loaded" && !fresh.is_empty() && fresh[0] != engines[0] {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no recovery: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.wait_neuron_loaded(Duration::from_secs(60)).await;
    let (st, v) = c
        .post(
            &c.neuron_url,
            "/v1/chat/completions",
            &chat_body("Say hello.", 4),
        )
        .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_exit_leaves_no_engine() {
    // Graceful: SIGTERM.
    let mut c = Cluster::start(ClusterOptions {
        with_cortex: false,
        ..Default::default()
    })
    .await;
    let engines = c.engine_pids();
    assert!(!engines.is_empty());
    c.neuron.signal(libc::SIGTERM);
    assert!(
        c.neuron.wait_exit(Duration::from_secs(40)).is_some(),
        "agent did not exit on SIGTERM"
    );
    wait_engine_gone(&engines).await;

    // Abrupt: SIGKILL of the agent still takes its engines down.
    let mut c = Cluster::start(ClusterOptions {
        with_cortex: false,
        ..Default::default()
    })
    .await;
    let engines = c.engine_pids();
    assert!(!engines.is_empty());
    c.neuron.signal(libc::SIGKILL);
    c.neuron.wait_exit(Duration::from_secs(5));
    wait_engine_gone(&engines).await;
}
