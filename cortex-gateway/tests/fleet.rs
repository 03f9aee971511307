//! Fleet orchestration (docs/protocol.md §6) against mock neurons with
//! memory budgets: one test per rule of placement, eviction, single-flight,
//! waiting, `min_replicas`, autoscaling, the admin API and reload.

mod common;
use common::*;
use cortex_gateway::config::ModelPolicy;
use cortex_gateway::Config;
use helexa_testkit::{MockModel, MockNeuron};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A mock neuron with a memory budget and these models.
async fn node(name: &str, budget: u64, models: Vec<MockModel>) -> MockNeuron {
    let n = MockNeuron::start(name, models).await;
    n.set(|b| b.memory_budget_mb = Some(budget));
    n
}

fn loaded(id: &str, mb: u64) -> MockModel {
    MockModel::loaded(id, 0).taking(mb)
}

fn available(id: &str, mb: u64) -> MockModel {
    MockModel::available(id, 0).taking(mb)
}

fn policy(id: &str, f: impl FnOnce(&mut ModelPolicy)) -> ModelPolicy {
    let mut p = ModelPolicy {
        id: id.into(),
        ..Default::default()
    };
    f(&mut p);
    p
}

const TOKEN: &str = "admin-secret";

/// Waits until cortex has polled every neuron's catalogue and memory.
async fn polled(h: &Harness, nodes: usize) {
    wait_until("every neuron polled with memory", 20, || async {
        let snap = h.cortex.gateway.fleet.snapshot();
        snap.nodes
            .iter()
            .filter(|v| v.healthy && v.discovery.is_some() && v.memory.is_some())
            .count()
            == nodes
    })
    .await;
}

async fn start_fleet(neurons: &[(&str, &MockNeuron)], tune: impl FnOnce(&mut Config)) -> Harness {
    let mut cfg = config(neurons);
    cfg.admin.token = Some(TOKEN.into());
    tune(&mut cfg);
    let h = start(cfg).await;
    polled(&h, neurons.len()).await;
    h
}

/// The value of the metric line starting with `series` (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn admin(h: &Harness, method: &str, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut rb = match method {
        "GET" => h.client.get(h.url(path)),
        _ => h.client.post(h.url(path)),
    }
    .bearer_auth(TOKEN);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    rb.send().await.unwrap()
}

async fn fleet_json(h: &Harness) -> Value {
    admin(h, "GET", "/admin/fleet", None)
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn cold_load_goes_to_the_best_fit() {
    let a = node("a", 1000, vec![available("m", 500)]).await;
    let b = node("b", 600, vec![available("m", 500)]).await;
    let c = node("c", 400, vec![available("m", 500)]).await;
    let h = start_fleet(&[("node-a", &a), ("node-b", &b), ("node-c", &c)], |_| {}).await;
    let resp = h.chat("m", false).await;
    assert_eq!(resp.status(), 200);
    // b leaves 100 MiB free, a 500; c has no room.
    assert_eq!(node_of(&resp), "node-b");
    assert!(a.recorded().loads.is_empty());
    assert!(c.recorded().loads.is_empty());
    assert_eq!(b.recorded().loads, vec!["m".to_string()]);
}

#[tokio::test]
async fn never_evicts_while_another_node_has_room() {
    let a = node(
        "a",
        1000,
        vec![loaded("x", 500), loaded("y", 500), available("m", 500)],
    )
    .await;
    let b = node("b", 1000, vec![available("m", 500)]).await;
    let h = start_fleet(&[("node-a", &a), ("node-b", &b)], |_| {}).await;
    let resp = h.chat("m", false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(node_of(&resp), "node-b");
    assert!(a.recorded().unloads.is_empty());
    assert!(a.recorded().loads.is_empty());
}

#[tokio::test]
async fn evicts_the_least_recently_used_and_metrics_move() {
    let a = node(
        "a",
        1000,
        vec![loaded("x", 500), loaded("y", 500), available("z", 500)],
    )
    .await;
    let h = start_fleet(&[("node-a", &a)], |_| {}).await;
    // y used first, then x: y is the least recently used.
    assert_eq!(h.chat("y", false).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(h.chat("x", false).await.status(), 200);
    let resp = h.chat("z", false).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(a.recorded().unloads, vec!["y".to_string()]);
    assert_eq!(a.recorded().loads, vec!["z".to_string()]);
    h.wait_replicas("z", 1).await;
    let text = h.metrics().await;
    assert_eq!(
        metric(&text, r#"cortex_evictions_total{model="y",node="node-a"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, r#"cortex_cold_starts_total{model="z"}"#), 1.0);
    assert_eq!(metric(&text, "cortex_model_load_seconds_count"), 1.0);
    assert_eq!(metric(&text, r#"cortex_replicas{model="z"}"#), 1.0);
    wait_until("y's replica gauge drops", 10, || async {
        metric(&h.metrics().await, r#"cortex_replicas{model="y"}"#) == 0.0
    })
    .await;
    // Now x is the least recently used; z was just used.
    assert_eq!(h.chat("y", false).await.status(), 200);
    assert_eq!(a.recorded().unloads, vec!["y".to_string(), "x".to_string()]);
}

#[tokio::test]
async fn the_node_needing_fewest_evictions_wins() {
    let a = node(
        "a",
        800,
        vec![loaded("s1", 400), loaded("s2", 400), available("big", 800)],
    )
    .await;
    let b = node("b", 800, vec![loaded("t", 800), available("big", 800)]).await;
    let h = start_fleet(&[("node-a", &a), ("node-b", &b)], |_| {}).await;
    let resp = h.chat("big", false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(node_of(&resp), "node-b");
    assert_eq!(b.recorded().unloads, vec!["t".to_string()]);
    assert!(a.recorded().unloads.is_empty());
}

#[tokio::test]
async fn a_higher_priority_model_is_never_evicted() {
    let a = node("a", 500, vec![loaded("vip", 500), available("m", 500)]).await;
    let h = start_fleet(&[("node-a", &a)], |c| {
        c.models = vec![policy("vip", |p| p.residency_priority = 10)];
    })
    .await;
    let resp = h.chat("m", false).await;
    assert_eq!(resp.status(), 507);
    assert!(resp.headers().get("retry-after").is_none());
    let e = envelope(resp).await;
    assert_eq!(e["code"], "insufficient_memory", "{e}");
    assert_eq!(e["type"], "api_error");
    assert!(a.recorded().unloads.is_empty());
    assert!(a.recorded().loads.is_empty());
    // A model of the same priority may displace it.
    let b = node("b", 500, vec![loaded("vip", 500), available("peer", 500)]).await;
    let h = start_fleet(&[("node-b", &b)], |c| {
        c.models = vec![
            policy("vip", |p| p.residency_priority = 10),
            policy("peer", |p| p.residency_priority = 10),
        ];
    })
    .await;
    assert_eq!(h.chat("peer", false).await.status(), 200);
    assert_eq!(b.recorded().unloads, vec!["vip".to_string()]);
}

#[tokio::test]
async fn min_replicas_are_prewarmed_and_restored_after_a_node_returns() {
    let a = node("a", 1000, vec![available("m", 500)]).await;
    let h = start_fleet(&[("node-a", &a)], |c| {
        c.models = vec![policy("m", |p| p.min_replicas = 1)];
    })
    .await;
    h.wait_replicas("m", 1).await;
    assert_eq!(a.recorded().loads, vec!["m".to_string()]);
    // The node restarts: gone for a while, back without the model.
    a.set(|b| b.healthy = false);
    a.set_model("m", |m| m.loaded = false);
    wait_until("node-a unhealthy", 10, || async {
        !h.cortex.gateway.fleet.snapshot().nodes[0].healthy
    })
    .await;
    assert_eq!(
        a.recorded().loads.len(),
        1,
        "no load while the node is away"
    );
    a.set(|b| b.healthy = true);
    h.wait_replicas("m", 1).await;
    assert_eq!(a.recorded().loads, vec!["m".to_string(), "m".to_string()]);
}

#[tokio::test]
async fn twenty_concurrent_requests_share_one_load() {
    let a = node("a", 1000, vec![available("m", 500)]).await;
    a.set(|b| b.load_delay = Duration::from_millis(500));
    let h = start_fleet(&[("node-a", &a)], |_| {}).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = h.client.clone();
        let url = h.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            c.post(url)
                .json(&chat_body("m", i % 2 == 0))
                .send()
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        let resp = t.await.unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert!(text.contains("Hello"), "{text}");
    }
    assert_eq!(
        a.recorded().loads,
        vec!["m".to_string()],
        "exactly one load"
    );
    assert_eq!(a.recorded().v1_count, 20);
    let text = h.metrics().await;
    assert_eq!(metric(&text, r#"cortex_cold_starts_total{model="m"}"#), 1.0);
}

#[tokio::test]
async fn waiters_give_up_with_model_loading_and_are_bounded_in_number() {
    let a = node("a", 1000, vec![available("m", 500)]).await;
    a.set(|b| b.load_delay = Duration::from_secs(3));
    let h = start_fleet(&[("node-a", &a)], |c| {
        c.loading.timeout_ms = 300;
        c.loading.max_waiters = 1;
    })
    .await;
    let first = {
        let c = h.client.clone();
        let url = h.url("/v1/chat/completions");
        tokio::spawn(async move {
            c.post(url)
                .json(&chat_body("m", false))
                .send()
                .await
                .unwrap()
        })
    };
    wait_until("the load started", 10, || async {
        !a.recorded().loads.is_empty()
    })
    .await;
    // The one waiter's place is taken: the next is refused at once.
    let resp = h.chat("m", false).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let e = envelope(resp).await;
    assert_eq!(e["code"], "model_loading");
    assert!(
        e["message"].as_str().unwrap().contains("max_waiters"),
        "{e}"
    );
    // The waiter gives up after timeout_ms, the load goes on.
    let started = Instant::now();
    let resp = first.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(resp.status(), 503);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let e = envelope(resp).await;
    assert_eq!(e["code"], "model_loading", "{e}");
    assert!(e["message"].as_str().unwrap().contains("timeout_ms"), "{e}");
    // Streamed: the head went out, so the refusal is an SSE error event.
    let data = sse_data(h.chat("m", true).await).await;
    assert!(data[0].contains("model_loading"), "{data:?}");
    // The load finished in the background: the model is served.
    h.wait_replicas("m", 1).await;
    assert_eq!(h.chat("m", false).await.status(), 200);
    assert_eq!(a.recorded().loads.len(), 1);
}

#[tokio::test]
async fn autoscale_adds_a_replica_when_queued_and_removes_it_when_idle() {
    let a = node("a", 1000, vec![loaded("m", 500)]).await;
    let b = node("b", 1000, vec![available("m", 500)]).await;
    let h = start_fleet(&[("node-a", &a), ("node-b", &b)], |c| {
        c.models = vec![policy("m", |p| {
            p.min_replicas = 1;
            p.max_replicas = 2;
            p.scale_up_after_secs = 1;
            p.idle_unload_secs = 2;
        })];
    })
    .await;
    // Queued but not long enough yet: no new replica.
    let queued_at = Instant::now();
    a.set_model("m", |m| m.queue_depth = 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(b.recorded().loads.is_empty());
    wait_until("a second replica", 10, || async {
        !b.recorded().loads.is_empty()
    })
    .await;
    assert!(queued_at.elapsed() >= Duration::from_secs(1));
    h.wait_replicas("m", 2).await;
    let scaled_at = Instant::now();
    assert_eq!(
        metric(&h.metrics().await, r#"cortex_replicas{model="m"}"#),
        2.0
    );
    // max_replicas = 2: still queued, but no third load anywhere.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(b.recorded().loads.len(), 1);
    assert!(a.recorded().loads.is_empty());
    // The queue drains; the older, idle replica goes, never the new one
    // within its idle window, and never below min_replicas.
    a.set_model("m", |m| m.queue_depth = 0);
    wait_until("one replica unloaded", 10, || async {
        a.recorded().unloads.len() + b.recorded().unloads.len() == 1
    })
    .await;
    assert_eq!(a.recorded().unloads, vec!["m".to_string()]);
    h.wait_replicas("m", 1).await;
    assert!(b.recorded().unloads.is_empty());
    // b's replica (loaded after the scale-up) has been idle past its window
    // now, but min_replicas = 1 keeps it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(scaled_at.elapsed() >= Duration::from_secs(2));
    assert!(b.recorded().unloads.is_empty());
    assert_eq!(
        metric(&h.metrics().await, r#"cortex_replicas{model="m"}"#),
        1.0
    );
}

#[tokio::test]
async fn admin_api_lists_loads_and_unloads() {
    let a = node("a", 1000, vec![loaded("x", 300), available("m", 500)]).await;
    let b = node("b", 1000, vec![available("m", 500)]).await;
    let h = start_fleet(&[("node-a", &a), ("node-b", &b)], |c| {
        c.models = vec![policy("m", |p| {
            p.max_replicas = 2;
            p.residency_priority = 3;
            p.aliases = vec!["big".into()];
        })];
    })
    .await;
    // No token, a wrong one: 401.
    let r = h.client.get(h.url("/admin/fleet")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .client
        .get(h.url("/admin/fleet"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let f = fleet_json(&h).await;
    assert_eq!(f["nodes"][0]["name"], "node-a");
    assert_eq!(f["nodes"][0]["endpoint"], a.url());
    assert_eq!(f["nodes"][0]["healthy"], true);
    assert_eq!(
        f["nodes"][0]["memory_mb"],
        json!({"budget": 1000, "used": 300, "free": 700})
    );
    let x = &f["nodes"][0]["models"][0];
    assert_eq!(x["id"], "x");
    assert_eq!(x["status"], "loaded");
    assert_eq!(x["in_flight"], 0);
    assert_eq!(x["queue_depth"], 0);
    assert!(x["last_used_secs_ago"].is_u64());
    let m = f["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "m")
        .unwrap();
    assert_eq!(m["replicas"], 0);
    assert_eq!(m["min_replicas"], 0);
    assert_eq!(m["max_replicas"], 2);
    assert_eq!(m["residency_priority"], 3);

    // Load by alias on a named node, then where placement says.
    let r = admin(
        &h,
        "POST",
        "/admin/models/big/load",
        Some(json!({"node": "node-a"})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"status": "loaded", "model": "m", "node": "node-a"})
    );
    let r = admin(&h, "POST", "/admin/models/m/load", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["node"], "node-b");
    h.wait_replicas("m", 2).await;
    let f = fleet_json(&h).await;
    let m = f["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "m")
        .unwrap();
    assert_eq!(m["replicas"], 2);

    // Bad bodies and names are refused, naming what is wrong.
    let r = admin(
        &h,
        "POST",
        "/admin/models/m/load",
        Some(json!({"node": "zzz"})),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(envelope(r).await["param"], "node");
    let r = admin(
        &h,
        "POST",
        "/admin/models/m/load",
        Some(json!({"nodes": "x"})),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert!(envelope(r).await["message"]
        .as_str()
        .unwrap()
        .contains("nodes"));
    let r = admin(&h, "POST", "/admin/models/nope/load", None).await;
    assert_eq!(r.status(), 404);

    // Unload from one node, then from all.
    let r = admin(
        &h,
        "POST",
        "/admin/models/m/unload",
        Some(json!({"node": "node-b"})),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["nodes"], json!(["node-b"]));
    assert_eq!(b.recorded().unloads, vec!["m".to_string()]);
    let r = admin(&h, "POST", "/admin/models/m/unload", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(a.recorded().unloads, vec!["m".to_string()]);
    h.wait_replicas("m", 0).await;
    let r = admin(&h, "POST", "/admin/models/m/unload", None).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn admin_api_is_off_without_a_token() {
    let a = node("a", 1000, vec![loaded("m", 100)]).await;
    let h = start(config(&[("node-a", &a)])).await;
    let r = h
        .client
        .get(h.url("/admin/fleet"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn reload_applies_policy_and_keeps_it_on_a_bad_file() {
    let a = node("a", 1000, vec![loaded("m", 100)]).await;
    let h = start_fleet(&[("node-a", &a)], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cortex.toml");
    h.cortex.gateway.config_path.set(path.clone()).unwrap();
    assert_eq!(h.chat("fast", false).await.status(), 404);

    std::fs::write(
        &path,
        "[[models]]\nid = \"m\"\naliases = [\"fast\"]\nmax_replicas = 3\n",
    )
    .unwrap();
    let r = admin(&h, "POST", "/admin/reload", None).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "reloaded");
    assert_eq!(h.chat("fast", false).await.status(), 200);
    assert_eq!(h.cortex.gateway.policy().of("m").max_replicas, 3);

    // A bad file: 400 naming line and key; the running policy stays.
    std::fs::write(&path, "[[models]]\nid = \"m\"\nmax_replicas = \"three\"\n").unwrap();
    let r = admin(&h, "POST", "/admin/reload", None).await;
    assert_eq!(r.status(), 400);
    let e = envelope(r).await;
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("line 3"), "{msg}");
    assert!(msg.contains("max_replicas"), "{msg}");
    assert!(msg.contains("running configuration stays"), "{msg}");
    assert_eq!(h.chat("fast", false).await.status(), 200);
    assert_eq!(h.cortex.gateway.policy().of("m").max_replicas, 3);
    // A rule broken, not a type: the same.
    std::fs::write(
        &path,
        "[[models]]\nid = \"m\"\nmin_replicas = 2\nmax_replicas = 1\n",
    )
    .unwrap();
    let r = admin(&h, "POST", "/admin/reload", None).await;
    assert_eq!(r.status(), 400);
    let msg = envelope(r).await["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("models.max_replicas") && msg.contains("line 4"),
        "{msg}"
    );
    assert_eq!(h.cortex.gateway.policy().of("m").max_replicas, 3);
}
