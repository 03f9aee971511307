//! Operations (docs/protocol.md §8) against the real agent with fake engines:
//! Prometheus metrics on their own listener, `GET /version`, and what the
//! agent does about engines that hang without exiting.

mod support;

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_tokens_and_refusals() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({}));
    m.preload = true;
    m.max_in_flight = 1;
    m.max_queue_depth = 0;
    let idle = fx.model("idle", json!({}));
    let agent = start(config(vec![m, idle])).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;

    let before = scrape(&agent).await;
    assert_eq!(sample(&before, r#"neuron_model_up{model="m"}"#), 1.0);
    assert_eq!(sample(&before, r#"neuron_model_up{model="idle"}"#), 0.0);
    assert_eq!(
        sample(&before, r#"neuron_model_memory_bytes{model="m"}"#),
        3.0 * 1024.0 * 1024.0,
        "the fake engine's weights_bytes"
    );
    assert_eq!(
        sample(&before, r#"neuron_model_load_seconds_count{model="m"}"#),
        1.0
    );
    let build = format!(
        r#"neuron_build_info{{git_sha="{}",version="{}"}}"#,
        get(&agent, "/version").await.1["git_sha"].as_str().unwrap(),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&before, &build), 1.0, "{before}");
    for series in [
        r#"neuron_requests_admitted_total{model="m"}"#,
        r#"neuron_prompt_tokens_total{model="m"}"#,
        r#"neuron_generated_tokens_total{model="m"}"#,
        r#"neuron_engine_restarts_total{model="m"}"#,
        r#"neuron_time_to_first_token_seconds_count{model="m"}"#,
    ] {
        assert!(
            before.contains(&format!("{series} 0")),
            "{series} in {before}"
        );
    }

    // 1. Not streamed: usage 1 + 3.
    let (s, v) = post_json(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"chunks": 3}), false),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // 2. Streamed without include_usage: the agent asks the engine for
    // usage (1 + 4) and the client does not see it.
    let r = post(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"chunks": 4, "delay_ms": 30}), true),
    )
    .await;
    let text = r.text().await.unwrap();
    assert!(!text.contains("usage"), "{text}");
    assert_eq!(text.matches("\"content\"").count(), 4, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // 3. Streamed with include_usage: the client gets it (1 + 5).
    let mut body = chat("m", json!({"chunks": 5}), true);
    body["stream_options"] = json!({"include_usage": true});
    let text = post(&agent, "/v1/chat/completions", body)
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains(r#""completion_tokens":5"#), "{text}");
    // 4. A slow stream holds the only slot; meanwhile a second request is
    // refused (max_queue_depth 0) and one for an unloaded model too.
    let slow = post(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"chunks": 6, "delay_ms": 60}), true),
    )
    .await;
    let mut slow = slow.bytes_stream();
    let first = slow.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    let mid = scrape(&agent).await;
    assert_eq!(sample(&mid, r#"neuron_model_in_flight{model="m"}"#), 1.0);
    let (s, v) = post_json(&agent, "/v1/chat/completions", chat("m", json!({}), false)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("model_busy")));
    let (s, _) = post_json(
        &agent,
        "/v1/chat/completions",
        chat("idle", json!({}), false),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = post_json(
        &agent,
        "/v1/chat/completions",
        chat("nope", json!({}), false),
    )
    .await;
    assert_eq!(s, 404);
    while let Some(chunk) = slow.next().await {
        chunk.unwrap();
    }

    let after = scrape(&agent).await;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    let m = |name: &str| format!(r#"{name}{{model="m"}}"#);
    assert_eq!(delta(&m("neuron_requests_admitted_total")), 4.0, "{after}");
    assert_eq!(
        delta(r#"neuron_requests_total{model="m",status="200"}"#),
        4.0
    );
    assert_eq!(
        delta(r#"neuron_requests_total{model="m",status="503"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"neuron_requests_total{model="idle",status="404"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"neuron_requests_total{model="_unknown",status="404"}"#),
        1.0,
        "a model outside the catalogue never becomes a label"
    );
    assert!(!after.contains("nope"));
    assert_eq!(
        delta(r#"neuron_requests_refused_total{model="m",reason="queue_full"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"neuron_requests_refused_total{model="idle",reason="not_loaded"}"#),
        1.0
    );
    assert_eq!(delta(&m("neuron_request_duration_seconds_count")), 5.0);
    // Usage of every answer, streamed or not (the slow stream: 1 + 6).
    assert_eq!(delta(&m("neuron_prompt_tokens_total")), 4.0);
    assert_eq!(
        delta(&m("neuron_generated_tokens_total")),
        3.0 + 4.0 + 5.0 + 6.0
    );
    // One first token per stream; one gap per later content chunk.
    assert_eq!(delta(&m("neuron_time_to_first_token_seconds_count")), 3.0);
    assert!(
        delta(&m("neuron_inter_token_latency_seconds_count")) >= 3.0 + 5.0,
        "{after}"
    );
    // Every gap was well under a second.
    assert_eq!(
        delta(r#"neuron_inter_token_latency_seconds_bucket{model="m",le="1"}"#),
        delta(&m("neuron_inter_token_latency_seconds_count"))
    );
    assert_eq!(sample(&after, r#"neuron_model_in_flight{model="m"}"#), 0.0);
    assert_eq!(
        sample(&after, r#"neuron_model_queue_depth{model="m"}"#),
        0.0
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_is_public_and_names_this_build() {
    let fx = Fixture::new();
    let mut c = config(vec![fx.model("m", json!({}))]);
    c.auth.token = Some("sekret".into());
    let agent = start(c).await;
    let (s, v) = get(&agent, "/version").await;
    assert_eq!(s, 200, "no token needed: {v}");
    assert_eq!(v["name"], "neuron");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["features"], json!([]), "a default build has no features");
    let lock =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
    let candle = helexa_api::version_build::locked_version(&lock, "candle-core").unwrap();
    assert_eq!(v["candle"], candle);
    let sha = v["git_sha"].as_str().unwrap();
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string());
    match (std::env::var("HELEXA_GIT_SHA"), head) {
        (Ok(forced), _) if !forced.is_empty() => assert_eq!(sha, forced),
        (_, Some(head)) => assert_eq!(sha, head),
        (_, None) => assert_eq!(sha, "unknown"),
    }
    // The metrics listener serves only /metrics.
    let r = client()
        .get(format!("{}/version", agent.metrics_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    agent.shutdown().await;
}

/// Stops (SIGSTOP) a process: it keeps its sockets but answers nothing.
fn freeze(pid: u32) {
    // SAFETY: kill(2) on a pid this test's agent started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_stream_is_ended_and_its_engine_replaced() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({}));
    m.preload = true;
    let mut c = config(vec![m]);
    // Only the stall check can fire: health polls may take 60 s.
    c.engine_health_timeout_ms = 60_000;
    c.engine_stall_timeout_secs = 1;
    c.restart_backoff_initial_ms = 400;
    let agent = start(c).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;
    let pid = agent.registry().engine_pid("m").unwrap();
    let before = scrape(&agent).await;

    let r = post(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"chunks": 200, "delay_ms": 50}), true),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    while !text.contains("t1 ") {
        text.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    freeze(pid);
    let frozen = Instant::now();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("the stream must end, not hang")
    {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let took = frozen.elapsed();
    // 1 s of silence, checked every 100 ms, then SIGKILL: well under 4 s.
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    let n = events.len();
    assert!(n >= 3, "{text}");
    assert_eq!(events[n - 1], "data: [DONE]", "{text}");
    let err: Value = serde_json::from_str(events[n - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "upstream_error", "{text}");

    eventually(5, "recovering", || async {
        model_health(&agent, "m").await["status"] == "recovering"
    })
    .await;
    eventually(20, "loaded again", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;
    assert_ne!(agent.registry().engine_pid("m"), Some(pid));
    assert!(!alive(pid), "the hung engine was killed and reaped");
    let after = scrape(&agent).await;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(delta(r#"neuron_engine_restarts_total{model="m"}"#), 1.0);
    assert_eq!(
        delta(r#"neuron_engine_health_failures_total{model="m",reason="stalled"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"neuron_engine_health_failures_total{model="m",reason="timeout"}"#),
        0.0
    );
    // The new engine serves.
    let (s, v) = post_json(&agent, "/v1/chat/completions", chat("m", json!({}), false)).await;
    assert_eq!(s, 200, "{v}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_failing_health_checks_is_killed_and_its_request_gets_502() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({}));
    m.preload = true;
    let mut c = config(vec![m]);
    c.engine_poll_interval_ms = 100;
    c.engine_health_timeout_ms = 300;
    c.engine_health_failures = 3;
    c.restart_backoff_initial_ms = 400;
    let agent = start(c).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;
    let pid = agent.registry().engine_pid("m").unwrap();
    let before = scrape(&agent).await;

    // Idle, then frozen; a request sent now waits for an answer that never
    // comes, until the engine is killed.
    freeze(pid);
    let frozen = Instant::now();
    let (s, v) = tokio::time::timeout(
        Duration::from_secs(10),
        post_json(&agent, "/v1/chat/completions", chat("m", json!({}), false)),
    )
    .await
    .expect("the request must end, not hang");
    let took = frozen.elapsed();
    assert_eq!(s, 502, "{v}");
    assert_eq!(v["error"]["code"], "upstream_error", "{v}");
    // 3 polls of at most 300 ms, 100 ms apart: about 1.1 s.
    assert!(took >= Duration::from_millis(800), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");

    eventually(5, "recovering", || async {
        model_health(&agent, "m").await["status"] == "recovering"
    })
    .await;
    eventually(20, "loaded again", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;
    assert!(!alive(pid), "the hung engine was killed and reaped");
    let after = scrape(&agent).await;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(delta(r#"neuron_engine_restarts_total{model="m"}"#), 1.0);
    assert_eq!(
        delta(r#"neuron_engine_health_failures_total{model="m",reason="timeout"}"#),
        3.0
    );
    assert_eq!(
        delta(r#"neuron_requests_refused_total{model="m",reason="engine_unavailable"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"neuron_requests_total{model="m",status="502"}"#),
        1.0
    );
    let (s, _) = post_json(&agent, "/v1/chat/completions", chat("m", json!({}), false)).await;
    assert_eq!(s, 200);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_silent_past_the_first_byte_timeout_is_a_504() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({}));
    m.preload = true;
    let mut c = config(vec![m]);
    c.engine_first_byte_timeout_secs = 1;
    let agent = start(c).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;
    let pid = agent.registry().engine_pid("m").unwrap();
    let before = scrape(&agent).await;

    let sent = Instant::now();
    let r = post(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"head_delay_ms": 5000}), true),
    )
    .await;
    let took = sent.elapsed();
    assert_eq!(r.status(), 504);
    assert!(
        r.headers().get("retry-after").is_none(),
        "504 is not retryable in docs/protocol.md §2"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout", "{v}");
    assert_eq!(v["error"]["type"], "api_error", "{v}");
    assert!(took >= Duration::from_millis(950), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    // The slot is free again and the engine, merely slow, was kept.
    let (s, _) = post_json(&agent, "/v1/chat/completions", chat("m", json!({}), false)).await;
    assert_eq!(s, 200);
    assert_eq!(agent.registry().engine_pid("m"), Some(pid));
    let after = scrape(&agent).await;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        delta(r#"neuron_requests_refused_total{model="m",reason="upstream_timeout"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"neuron_requests_total{model="m",status="504"}"#),
        1.0
    );
    assert_eq!(delta(r#"neuron_engine_restarts_total{model="m"}"#), 0.0);
    assert_eq!(sample(&after, r#"neuron_model_in_flight{model="m"}"#), 0.0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_engine_whose_stream_stalls_is_killed() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({}));
    m.preload = true;
    let mut c = config(vec![m]);
    c.engine_stall_timeout_secs = 1;
    c.restart_backoff_initial_ms = 300;
    let agent = start(c).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;
    let pid = agent.registry().engine_pid("m").unwrap();
    let before = scrape(&agent).await;

    // The engine keeps answering /health; only its stream goes quiet.
    let sent = Instant::now();
    let r = post(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"chunks": 10, "stall_after_chunks": 2}), true),
    )
    .await;
    let text = tokio::time::timeout(Duration::from_secs(10), r.text())
        .await
        .expect("the stream must end, not hang")
        .unwrap();
    let took = sent.elapsed();
    assert!(text.contains("t1 "), "{text}");
    assert!(
        text.contains(r#""code":"upstream_error""#) && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert!(took >= Duration::from_millis(950), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(fx.log("m").contains(&"stalled".to_string()));
    eventually(20, "replaced and loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
            && agent.registry().engine_pid("m") != Some(pid)
    })
    .await;
    let after = scrape(&agent).await;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        delta(r#"neuron_engine_health_failures_total{model="m",reason="stalled"}"#),
        1.0
    );
    assert_eq!(delta(r#"neuron_engine_restarts_total{model="m"}"#), 1.0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_answering_health_with_errors_is_restarted() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({"unhealthy_after_ms": 300}));
    m.preload = true;
    let mut c = config(vec![m]);
    c.engine_poll_interval_ms = 50;
    c.engine_health_failures = 4;
    let agent = start(c).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;
    let pid = agent.registry().engine_pid("m").unwrap();
    eventually(20, "restarted", || async {
        sample(
            &scrape(&agent).await,
            r#"neuron_engine_restarts_total{model="m"}"#,
        ) >= 1.0
    })
    .await;
    assert!(!alive(pid), "the unhealthy engine was killed and reaped");
    let text = scrape(&agent).await;
    let errors = sample(
        &text,
        r#"neuron_engine_health_failures_total{model="m",reason="error"}"#,
    );
    // Four in a row killed the first engine (and maybe some of the next).
    assert!(errors >= 4.0, "{text}");
    assert_eq!(
        sample(
            &text,
            r#"neuron_engine_health_failures_total{model="m",reason="timeout"}"#
        ),
        0.0
    );
    agent.shutdown().await;
}
