//! The agent's public HTTP API against fake engines (docs/protocol.md §3).

mod support;

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_health_models_shapes_and_prewarming() {
    let fx = Fixture::new();
    let mut m = fx.model(
        "m1",
        json!({"ready_delay_ms": 600, "context_length": 4096, "max_output_tokens": 512}),
    );
    m.preload = true;
    let other = fx.model("m2", json!({}));
    let agent = start(config(vec![m, other])).await;

    // Bound before pre-warming finished.
    let (s, h) = get(&agent, "/health").await;
    assert_eq!(s, 200);
    assert_eq!(h["status"], "starting", "{h}");
    assert_eq!(h["activation"]["state"], "pre_warming", "{h}");
    let pending_or_running = h["activation"]["in_progress"] == "m1"
        || h["activation"]["pending"]
            .as_array()
            .unwrap()
            .contains(&json!("m1"));
    assert!(pending_or_running, "{h}");

    eventually(20, "pre-warming done", || async {
        get(&agent, "/health").await.1["activation"]["state"] == "ready"
    })
    .await;
    let (_, h) = get(&agent, "/health").await;
    assert_eq!(h["status"], "ready");
    assert_eq!(h["activation"]["completed"], json!(["m1"]));
    assert_eq!(h["activation"]["failed"], json!([]));
    assert!(h["uptime_secs"].is_u64());
    let mh = model_health(&agent, "m1").await;
    assert_eq!(mh["status"], "loaded");
    assert_eq!(mh["in_flight"], 0);
    assert_eq!(mh["queue_depth"], 0);
    assert_eq!(mh["max_in_flight"], 4);
    assert_eq!(mh["max_queue_depth"], 32);
    assert_eq!(mh["rejected_total"], 0);
    // Engine figures arrive through the background poller.
    eventually(5, "engine stats polled", || async {
        model_health(&agent, "m1").await["tok_s_decode"] == 50.0
    })
    .await;
    // m2 is not loaded: not in /health models.
    assert_eq!(model_health(&agent, "m2").await, Value::Null);

    let (s, d) = get(&agent, "/discovery").await;
    assert_eq!(s, 200);
    assert_eq!(d["node"], "test-node");
    assert_eq!(d["protocol"], 1);
    assert!(!d["hostname"].as_str().unwrap().is_empty());
    assert!(d["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert!(!d["cpu"]["model"].as_str().unwrap().is_empty());
    assert!(d["memory_mb"]["total"].as_u64().unwrap() > 0);
    assert!(d["devices"].is_array());
    assert_eq!(d["runtimes"], json!(["candle"]));
    assert_eq!(
        d["catalogue"],
        json!([{"id": "m1", "loaded": true, "memory_mb": 3},
               {"id": "m2", "loaded": false, "memory_mb": 0}])
    );

    let (s, models) = get(&agent, "/models").await;
    assert_eq!(s, 200);
    let models = models.as_array().unwrap();
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(m["id"], "m1");
    assert_eq!(m["status"], "loaded");
    assert_eq!(m["runtime"], "candle");
    assert_eq!(m["limit"], json!({"context": 4096, "output": 512}));
    assert_eq!(m["capabilities"], json!(["chat", "completions"]));
    assert_eq!(
        m["tool_call"], false,
        "tool_call follows a \"tools\" capability"
    );
    assert_eq!(m["memory_mb"], 3);
    assert_eq!(m["devices"], json!([]));
    assert_eq!(m["tokenizer"], "/models/m1/tokenizer");

    let (s, e) = get(&agent, "/models/m1/endpoint").await;
    assert_eq!(s, 200);
    assert_eq!(e["url"], agent.url());
    let (s, e) = get(&agent, "/models/m2/endpoint").await;
    assert_eq!(s, 404);
    assert_eq!(e["error"]["code"], "model_not_found");

    let (s, t) = get(&agent, "/models/m1/tokenizer").await;
    assert_eq!(s, 200);
    assert_eq!(t["model"]["id"], "m1");
    let (s, _) = get(&agent, "/models/m2/tokenizer").await;
    assert_eq!(s, 404);

    let (s, l) = get(&agent, "/v1/models").await;
    assert_eq!(s, 200);
    assert_eq!(l["object"], "list");
    assert_eq!(l["data"][0]["id"], "m1");
    assert_eq!(l["data"][0]["object"], "model");
    assert_eq!(l["data"][0]["context_length"], 4096);
    assert_eq!(l["data"][0]["max_output_tokens"], 512);

    // The agent passed the engine protocol's command line.
    let args = fx
        .log("m1")
        .into_iter()
        .find(|l| l.starts_with("args "))
        .unwrap();
    assert!(
        args.contains("engine --model") && args.contains("--id m1 --listen 127.0.0.1:0"),
        "{args}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_unload_lifecycle_single_flight() {
    let fx = Fixture::new();
    let m = fx.model("m", json!({"ready_delay_ms": 400}));
    let agent = start(config(vec![m])).await;
    assert_eq!(
        get(&agent, "/health").await.1["activation"]["state"],
        "ready"
    );

    // Not loaded yet: inference is a 404.
    let (s, e) = post_json(&agent, "/v1/chat/completions", chat("m", json!({}), false)).await;
    assert_eq!(s, 404);
    assert_eq!(e["error"]["code"], "model_not_found");

    // Two concurrent loads: one engine, the same answer.
    let a = post_json(&agent, "/models/load", json!({"model": "m"}));
    let b = post_json(&agent, "/models/load", json!({"model": "m"}));
    let probe = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        model_health(&agent, "m").await["status"].clone()
    };
    let ((sa, va), (sb, vb), during) = tokio::join!(a, b, probe);
    assert_eq!((sa, sb), (200, 200));
    assert_eq!(va, json!({"status": "loaded"}));
    assert_eq!(vb, va);
    assert_eq!(during, "loading");
    assert_eq!(fx.pids("m").len(), 1, "single-flight: one engine started");
    // Loading an already-loaded model is a 200 at once.
    let t = Instant::now();
    let (s, _) = post_json(&agent, "/models/load", json!({"model": "m"})).await;
    assert_eq!(s, 200);
    assert!(t.elapsed() < Duration::from_millis(300));
    assert_eq!(fx.pids("m").len(), 1);

    let (s, r) = post_json(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"chunks": 2}), false),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");

    let pid = agent.registry().engine_pid("m").unwrap();
    assert!(alive(pid));
    let (s, v) = post_json(&agent, "/models/unload", json!({"model": "m"})).await;
    assert_eq!((s, v), (200, json!({"status": "unloaded"})));
    assert!(!alive(pid), "engine stopped and reaped on unload");
    assert_eq!(model_health(&agent, "m").await, Value::Null);
    assert_eq!(get(&agent, "/models").await.1, json!([]));
    let (s, _) = post_json(&agent, "/models/unload", json!({"model": "m"})).await;
    assert_eq!(s, 200, "unloading an unloaded model is fine");

    // Load again: a new engine.
    let (s, _) = post_json(&agent, "/models/load", json!({"model": "m"})).await;
    assert_eq!(s, 200);
    assert_eq!(fx.pids("m").len(), 2);

    // Lifecycle errors.
    let (s, e) = post_json(&agent, "/models/load", json!({"model": "nope"})).await;
    assert_eq!(s, 404);
    assert_eq!(e["error"]["code"], "model_not_found");
    let (s, e) = post_json(&agent, "/models/load", json!({})).await;
    assert_eq!(s, 400);
    assert_eq!(e["error"]["code"], "missing_model");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_load_reports_a_clear_error() {
    let fx = Fixture::new();
    let bad = fx.model(
        "bad",
        json!({"ready_delay_ms": 50, "fail_load": "weights are corrupt", "exit_code": 3}),
    );
    let mut pre = fx.model("pre", json!({"fail_load": "no memory"}));
    pre.preload = true;
    let mut missing = fx.model("missing", json!({}));
    missing.path = fx.dir.path().join("does-not-exist.gguf");
    let agent = start(config(vec![bad, pre, missing])).await;

    let (s, e) = post_json(&agent, "/models/load", json!({"model": "bad"})).await;
    assert_eq!(s, 502, "{e}");
    assert_eq!(e["error"]["code"], "upstream_error");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("weights are corrupt") && msg.contains("exit code 3"),
        "{msg}"
    );
    assert_eq!(model_health(&agent, "bad").await["status"], "failed");
    let (s, e) = post_json(
        &agent,
        "/v1/chat/completions",
        chat("bad", json!({}), false),
    )
    .await;
    assert_eq!(s, 502);
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("weights are corrupt"));

    let (s, e) = post_json(&agent, "/models/load", json!({"model": "missing"})).await;
    assert_eq!(s, 502);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{e}"
    );

    eventually(10, "activation done", || async {
        get(&agent, "/health").await.1["activation"]["state"] == "ready"
    })
    .await;
    let (_, h) = get(&agent, "/health").await;
    assert_eq!(h["activation"]["failed"], json!(["pre"]));

    // A failed model can be unloaded (cleared) and retried.
    let (s, _) = post_json(&agent, "/models/unload", json!({"model": "bad"})).await;
    assert_eq!(s, 200);
    assert_eq!(model_health(&agent, "bad").await, Value::Null);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_limits_queue_and_timeout() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({}));
    m.preload = true;
    m.max_in_flight = 1;
    m.max_queue_depth = 1;
    m.max_wait_secs = 1;
    let agent = start(config(vec![m])).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;

    // A holds the only slot for ~3 s.
    let a = post(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"chunks": 60, "delay_ms": 50}), true),
    )
    .await;
    assert_eq!(a.status(), 200);
    // B waits in the queue...
    let url = agent.url();
    let b = tokio::spawn(async move {
        let t = Instant::now();
        let r = client()
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat("m", json!({}), false))
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.headers().get("retry-after").cloned(),
            r.json::<Value>().await.unwrap(),
            t.elapsed(),
        )
    });
    eventually(5, "B queued", || async {
        model_health(&agent, "m").await["queue_depth"] == 1
    })
    .await;
    let mh = model_health(&agent, "m").await;
    assert_eq!(mh["in_flight"], 1);
    // ...C finds the queue full: refused at once with Retry-After.
    let t = Instant::now();
    let c = post(&agent, "/v1/chat/completions", chat("m", json!({}), false)).await;
    assert!(t.elapsed() < Duration::from_millis(500));
    assert_eq!(c.status(), 503);
    assert!(c.headers().get("retry-after").is_some());
    let c: Value = c.json().await.unwrap();
    assert_eq!(c["error"]["code"], "model_busy");
    assert_eq!(c["error"]["type"], "rate_limit_error");
    // B gives up after max_wait_secs.
    let (bs, bra, bv, took) = b.await.unwrap();
    assert_eq!(bs, 503);
    assert!(bra.is_some());
    assert_eq!(bv["error"]["code"], "model_busy");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    let mh = model_health(&agent, "m").await;
    assert_eq!(mh["rejected_total"], 2);
    assert_eq!(mh["queue_depth"], 0);
    drop(a);
    eventually(5, "slot free", || async {
        model_health(&agent, "m").await["in_flight"] == 0
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_waiter_does_not_leak_a_slot() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({}));
    m.preload = true;
    m.max_in_flight = 1;
    m.max_queue_depth = 4;
    m.max_wait_secs = 30;
    let agent = start(config(vec![m])).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;

    let a = post(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"chunks": 100, "delay_ms": 50}), true),
    )
    .await;
    assert_eq!(a.status(), 200);
    // B waits, then its client gives up.
    let url = agent.url();
    let b = tokio::spawn(async move {
        client()
            .post(format!("{url}/v1/chat/completions"))
            .timeout(Duration::from_millis(300))
            .json(&chat("m", json!({}), false))
            .send()
            .await
            .is_err()
    });
    eventually(5, "B queued", || async {
        model_health(&agent, "m").await["queue_depth"] == 1
    })
    .await;
    assert!(b.await.unwrap(), "B timed out client-side");
    eventually(5, "B left the queue", || async {
        model_health(&agent, "m").await["queue_depth"] == 0
    })
    .await;
    // A's client goes away mid-stream: its slot frees.
    drop(a);
    eventually(5, "A's slot freed", || async {
        model_health(&agent, "m").await["in_flight"] == 0
    })
    .await;
    // A new request is admitted at once.
    let t = Instant::now();
    let (s, _) = post_json(&agent, "/v1/chat/completions", chat("m", json!({}), false)).await;
    assert_eq!(s, 200);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(model_health(&agent, "m").await["rejected_total"], 0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_forwarded_unbuffered() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({}));
    m.preload = true;
    let agent = start(config(vec![m])).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;

    let t = Instant::now();
    let r = client()
        .post(format!("{}/v1/chat/completions", agent.url()))
        .header("x-request-id", "req-42")
        .json(&chat("m", json!({"chunks": 4, "delay_ms": 400}), true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["x-request-id"], "req-42");
    assert_eq!(r.headers()["x-helexa-node"], "test-node");
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let first_at = t.elapsed();
    assert!(std::str::from_utf8(&first).unwrap().starts_with("data: "));
    assert!(
        first_at < Duration::from_millis(350),
        "first chunk after {first_at:?}"
    );
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(t.elapsed() >= Duration::from_millis(1200));
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(text.matches("chat.completion.chunk").count(), 4);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_closes_the_engine_connection() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({}));
    m.preload = true;
    let agent = start(config(vec![m])).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;

    let r = post(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"chunks": 1000, "delay_ms": 20}), true),
    )
    .await;
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    assert!(fx.log("m").contains(&"start 0".to_string()));
    drop(body);
    eventually(5, "engine saw the stream dropped", || async {
        fx.log("m").contains(&"end 0 dropped".to_string())
    })
    .await;
    eventually(5, "slot freed", || async {
        model_health(&agent, "m").await["in_flight"] == 0
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_death_recovers() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({"ready_delay_ms": 500}));
    m.preload = true;
    let mut c = config(vec![m]);
    c.restart_backoff_initial_ms = 300;
    let agent = start(c).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;
    let pid = agent.registry().engine_pid("m").unwrap();

    // A stream that breaks mid-way ends with an error event, not a cut.
    let r = post(
        &agent,
        "/v1/chat/completions",
        chat(
            "m",
            json!({"chunks": 10, "delay_ms": 20, "die_after_chunks": 3}),
            true,
        ),
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("\"error\"") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );

    eventually(5, "recovering", || async {
        model_health(&agent, "m").await["status"] == "recovering"
    })
    .await;
    // Meanwhile: 503 model_loading with Retry-After.
    let r = post(&agent, "/v1/chat/completions", chat("m", json!({}), false)).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "model_loading"
    );
    assert_eq!(get(&agent, "/models").await.1[0]["status"], "recovering");

    eventually(20, "loaded again", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;
    let new_pid = agent.registry().engine_pid("m").unwrap();
    assert_ne!(pid, new_pid);
    assert!(!alive(pid), "the dead engine was reaped");
    let (s, _) = post_json(&agent, "/v1/chat/completions", chat("m", json!({}), false)).await;
    assert_eq!(s, 200);

    // Death on a non-streaming request.
    let (s, e) = post_json(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"die": true}), false),
    )
    .await;
    assert!(s == 502 || s == 503, "{s} {e}");
    eventually(20, "loaded a third time", || async {
        model_health(&agent, "m").await["status"] == "loaded" && fx.pids("m").len() == 3
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_leaves_no_orphans() {
    let fx = Fixture::new();
    let mut a = fx.model("a", json!({}));
    a.preload = true;
    let mut b = fx.model("b", json!({"ignore_sigterm": true}));
    b.preload = true;
    let mut c = config(vec![a, b]);
    c.engine_stop_timeout_secs = 1;
    c.drain_timeout_secs = 3;
    let agent = start(c).await;
    eventually(20, "both loaded", || async {
        get(&agent, "/health").await.1["activation"]["completed"]
            .as_array()
            .map(|a| a.len())
            == Some(2)
    })
    .await;
    let pids = [
        agent.registry().engine_pid("a").unwrap(),
        agent.registry().engine_pid("b").unwrap(),
    ];
    assert!(pids.iter().all(|&p| alive(p)));

    // A running stream (~1 s) is allowed to finish.
    let running = post(
        &agent,
        "/v1/chat/completions",
        chat("a", json!({"chunks": 10, "delay_ms": 100}), true),
    )
    .await;
    let url = agent.url();
    let t = Instant::now();
    let stopping = tokio::spawn(agent.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // New work is refused while draining.
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat("a", json!({}), false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "shutting_down"
    );
    let (_, h) = {
        let r = client().get(format!("{url}/health")).send().await.unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(h["status"], "draining");
    let text = running.text().await.unwrap();
    assert!(
        text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\""),
        "{text}"
    );
    stopping.await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "bounded: {:?}",
        t.elapsed()
    );
    for pid in pids {
        assert!(!alive(pid), "engine {pid} outlived the agent");
    }
    assert!(fx.log("b").contains(&"sigterm ignored".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_guards_every_route_but_health() {
    let fx = Fixture::new();
    let m = fx.model("m", json!({}));
    let mut c = config(vec![m]);
    c.auth.token = Some("s3cret".into());
    let agent = start(c).await;
    let cl = client();
    let r = cl
        .get(format!("{}/health", agent.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for path in ["/discovery", "/models", "/v1/models", "/models/m/endpoint"] {
        let r = cl
            .get(format!("{}{path}", agent.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert!(r.headers().get("retry-after").is_none());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{path}");
        let r = cl
            .get(format!("{}{path}", agent.url()))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = cl
        .post(format!("{}/v1/chat/completions", agent.url()))
        .json(&chat("m", json!({}), false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = cl
        .get(format!("{}/discovery", agent.url()))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_use_the_envelope() {
    let fx = Fixture::new();
    let m = fx.model("m", json!({}));
    let mut c = config(vec![m]);
    c.max_body_bytes = 1024;
    let agent = start(c).await;
    let cl = client();
    let url = agent.url();

    let check = |v: &Value, code: &str| {
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"]["type"].is_string());
    };
    let (s, v) = post_json(
        &agent,
        "/v1/chat/completions",
        chat("ghost", json!({}), false),
    )
    .await;
    assert_eq!(s, 404);
    check(&v, "model_not_found");
    let (s, v) = post_json(&agent, "/v1/chat/completions", json!({"messages": []})).await;
    assert_eq!(s, 400);
    check(&v, "missing_model");
    let r = cl
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    check(&r.json().await.unwrap(), "invalid_json");
    let r = cl
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    check(&r.json().await.unwrap(), "unsupported_media_type");
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let (s, v) = post_json(&agent, "/v1/chat/completions", big.clone()).await;
    assert_eq!(s, 413);
    check(&v, "request_too_large");
    let (s, v) = post_json(&agent, "/models/load", big).await;
    assert_eq!(s, 413);
    check(&v, "request_too_large");
    let r = cl
        .post(format!("{url}/models/load"))
        .header("content-type", "application/json")
        .body("[")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    check(&r.json().await.unwrap(), "invalid_json");
    let (s, v) = post_json(&agent, "/models/load", json!({"model": 5})).await;
    assert_eq!(s, 400);
    check(&v, "invalid_request");
    let (s, v) = get(&agent, "/nope").await;
    assert_eq!(s, 404);
    check(&v, "unknown_route");
    let (s, v) = get(&agent, "/v1/chat/completions").await;
    assert_eq!(s, 405);
    check(&v, "method_not_allowed");
    let (s, v) = get(&agent, "/models/ghost/tokenizer").await;
    assert_eq!(s, 404);
    check(&v, "model_not_found");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_routes_stay_fast_while_engines_are_busy() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({}));
    m.preload = true;
    m.max_in_flight = 2;
    let agent = start(config(vec![m])).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(
            post(
                &agent,
                "/v1/chat/completions",
                chat("m", json!({"chunks": 100, "delay_ms": 30}), true),
            )
            .await,
        );
    }
    let url = agent.url();
    let mut queued = Vec::new();
    for _ in 0..3 {
        let url = url.clone();
        queued.push(tokio::spawn(async move {
            let _ = client()
                .post(format!("{url}/v1/chat/completions"))
                .json(&chat("m", json!({}), false))
                .send()
                .await;
        }));
    }
    eventually(5, "queue filled", || async {
        model_health(&agent, "m").await["queue_depth"] == 3
    })
    .await;
    let cl = client();
    for path in [
        "/health",
        "/discovery",
        "/models",
        "/v1/models",
        "/models/m/endpoint",
    ] {
        // Warm the connection, then time a request.
        cl.get(format!("{url}{path}")).send().await.unwrap();
        let t = Instant::now();
        let r = cl.get(format!("{url}{path}")).send().await.unwrap();
        let took = t.elapsed();
        assert_eq!(r.status(), 200, "{path}");
        assert!(took < Duration::from_millis(100), "{path} took {took:?}");
    }
    drop(streams);
    for q in queued {
        q.abort();
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_drains_running_and_refuses_queued() {
    let fx = Fixture::new();
    let mut m = fx.model("m", json!({}));
    m.preload = true;
    m.max_in_flight = 1;
    m.max_queue_depth = 4;
    let agent = start(config(vec![m])).await;
    eventually(20, "loaded", || async {
        model_health(&agent, "m").await["status"] == "loaded"
    })
    .await;
    let running = post(
        &agent,
        "/v1/chat/completions",
        chat("m", json!({"chunks": 8, "delay_ms": 100}), true),
    )
    .await;
    let url = agent.url();
    let queued = tokio::spawn(async move {
        let r = client()
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat("m", json!({}), false))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    eventually(5, "queued", || async {
        model_health(&agent, "m").await["queue_depth"] == 1
    })
    .await;
    let t = Instant::now();
    let unload = async {
        let r = post_json(&agent, "/models/unload", json!({"model": "m"})).await;
        (r, t.elapsed())
    };
    let reader = async {
        let text = running.text().await.unwrap();
        (text, t.elapsed())
    };
    let (((s, _), unloaded_at), (text, finished_at)) = tokio::join!(unload, reader);
    assert_eq!(s, 200);
    assert!(
        unloaded_at + Duration::from_millis(50) >= finished_at,
        "unload answered ({unloaded_at:?}) before the running stream ended ({finished_at:?})"
    );
    assert!(finished_at >= Duration::from_millis(500), "{finished_at:?}");
    assert!(
        text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\""),
        "{text}"
    );
    let (qs, qv) = queued.await.unwrap();
    assert_eq!(qs, 503);
    assert_eq!(qv["error"]["code"], "model_busy");
    assert_eq!(
        fx.log("m")
            .iter()
            .filter(|l| l.starts_with("start"))
            .count(),
        1
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failing_loads_share_one_answer_and_unload_cancels_a_load() {
    let fx = Fixture::new();
    let bad = fx.model("bad", json!({"ready_delay_ms": 300, "fail_load": "boom"}));
    let slow = fx.model("slow", json!({"ready_delay_ms": 5000}));
    let agent = start(config(vec![bad, slow])).await;
    let (a, b) = tokio::join!(
        post_json(&agent, "/models/load", json!({"model": "bad"})),
        post_json(&agent, "/models/load", json!({"model": "bad"}))
    );
    assert_eq!(a.0, 502);
    assert_eq!(a, b, "both callers get the same answer");
    assert_eq!(fx.pids("bad").len(), 1);

    // Unloading a model while it loads cancels the load and stops its engine.
    let url = agent.url();
    let load = tokio::spawn(async move {
        let r = client()
            .post(format!("{url}/models/load"))
            .json(&json!({"model": "slow"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    eventually(5, "slow engine started", || async {
        fx.pids("slow").len() == 1
    })
    .await;
    let pid = fx.pids("slow")[0];
    let (s, _) = post_json(&agent, "/models/unload", json!({"model": "slow"})).await;
    assert_eq!(s, 200);
    let (ls, lv) = load.await.unwrap();
    assert_eq!(ls, 503, "{lv}");
    assert_eq!(lv["error"]["code"], "model_loading");
    assert!(
        !alive(pid),
        "the half-started engine was stopped and reaped"
    );
    assert_eq!(model_health(&agent, "slow").await, Value::Null);
    agent.shutdown().await;
}
