//! Fleet orchestration end to end (docs/protocol.md §6): two real neurons,
//! each with a memory budget that holds one model, three catalogue ids (the
//! default model under three names) and a real cortex. Requests alternating
//! between the three force a load each time and an eviction once both nodes
//! are full; every answer must be right, and `/admin/fleet` and the metrics
//! must tell the same story.

use helexa_e2e::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const IDS: [&str; 3] = ["m1", "m2", "m3"];
const TOKEN: &str = "e2e-admin";

/// A neuron config: the default model as m1, m2 and m3, small context and
/// one batch slot so that its KV cache is small.
fn neuron_toml(port: u16, node: &str, budget: Option<u64>) -> String {
    let mut t = format!(
        "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:0\"\nnode = \"{node}\"\n"
    );
    if let Some(b) = budget {
        t += &format!("memory_budget_mb = {b}\n");
    }
    for id in IDS {
        t += &format!(
            "\n[[models]]\nid = \"{id}\"\npath = \"{}\"\nmax_context = 512\nmax_batch = 1\n",
            model_path().display()
        );
    }
    t
}

async fn get(http: &reqwest::Client, url: String) -> Option<Value> {
    http.get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

fn start_neuron(dir: &std::path::Path, node: &str, budget: Option<u64>) -> (Proc, String) {
    let port = free_port();
    let cfg = dir.join(format!("{node}.toml"));
    std::fs::write(&cfg, neuron_toml(port, node, budget)).unwrap();
    let mut cmd = Command::new(binary("neuron"));
    cmd.arg("--config").arg(&cfg).env("RUST_LOG", "info");
    (
        Proc::spawn("neuron", cmd),
        format!("http://127.0.0.1:{port}"),
    )
}

/// Waits until `url/discovery` answers; returns it.
async fn discovery(http: &reqwest::Client, url: &str) -> Value {
    let start = Instant::now();
    loop {
        if let Some(d) = get(http, format!("{url}/discovery")).await {
            return d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{url} never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_models_load_and_evict_across_two_neurons() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();

    // The neuron's own estimate decides the budget: one model fits, and
    // once it is loaded (its real figure is at least its KV cache) a second
    // does not.
    let (probe, url) = start_neuron(dir.path(), "probe", None);
    let d = discovery(&http, &url).await;
    drop(probe);
    let need = d["catalogue"][0]["memory_mb"].as_u64().unwrap();
    assert!(need > 0, "no estimate: {d}");
    let budget = need + 8;

    let (_n1, url1) = start_neuron(dir.path(), "n1", Some(budget));
    let (_n2, url2) = start_neuron(dir.path(), "n2", Some(budget));
    let h = discovery(&http, &url1).await;
    assert_eq!(h["catalogue"][0]["memory_mb"], need);
    discovery(&http, &url2).await;

    let port = free_port();
    let mport = free_port();
    let cfg = dir.path().join("cortex.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{mport}\"\n\n\
             [poll]\ninterval_ms = 200\n\n[admin]\ntoken = \"{TOKEN}\"\n\n\
             [[neurons]]\nname = \"n1\"\nendpoint = \"{url1}\"\n\n\
             [[neurons]]\nname = \"n2\"\nendpoint = \"{url2}\"\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(binary("cortex"));
    cmd.arg("--config").arg(&cfg).env("RUST_LOG", "info");
    let _cortex = Proc::spawn("cortex", cmd);
    let api = format!("http://127.0.0.1:{port}");
    let fleet = || async {
        http.get(format!("{api}/admin/fleet"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?
            .json::<Value>()
            .await
            .ok()
    };
    let start = Instant::now();
    loop {
        if let Some(f) = fleet().await {
            let ready = f["nodes"].as_array().is_some_and(|n| {
                n.iter()
                    .all(|n| n["healthy"] == true && n["memory_mb"]["budget"] == budget)
            });
            if ready {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "cortex never saw both neurons"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // m1, m2 fill the two nodes; every later request evicts the least
    // recently used model: m1, m2, m3, then m1 again.
    let order = ["m1", "m2", "m3", "m1", "m2", "m3"];
    let mut answers = Vec::new();
    for model in order {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "Say hello."}],
                          "max_tokens": 8, "temperature": 0});
        let r = http
            .post(format!("{api}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let node = r
            .headers()
            .get("x-helexa-node")
            .map(|v| v.to_str().unwrap().to_string());
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{model}: {v}");
        assert_eq!(v["model"], model, "{v}");
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(!text.is_empty(), "{v}");
        answers.push((model, node.unwrap(), text));
    }
    // The same weights under three names, greedy: one answer.
    assert!(answers.iter().all(|a| a.2 == answers[0].2), "{answers:?}");
    // Best fit on two empty nodes ties, then name: n1; then the other node;
    // from then on the LRU victim's node.
    let nodes: Vec<&str> = answers.iter().map(|a| a.1.as_str()).collect();
    assert_eq!(nodes, ["n1", "n2", "n1", "n2", "n1", "n2"], "{answers:?}");

    // What cortex says matches what happened: m2 on n1, m3 on n2.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let f = fleet().await.unwrap();
    let on = |i: usize| -> Vec<String> {
        f["nodes"][i]["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(on(0), vec!["m2"], "{f}");
    assert_eq!(on(1), vec!["m3"], "{f}");
    for (i, url) in [&url1, &url2].iter().enumerate() {
        let nh = get(&http, format!("{url}/health")).await.unwrap();
        assert_eq!(f["nodes"][i]["memory_mb"], nh["memory_mb"], "{f} {nh}");
    }
    let replicas = |id: &str| {
        f["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap()["replicas"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((replicas("m1"), replicas("m2"), replicas("m3")), (0, 1, 1));

    let text = http
        .get(format!("http://127.0.0.1:{mport}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for id in IDS {
        assert_eq!(
            metric(
                &text,
                &format!("cortex_cold_starts_total{{model=\"{id}\"}}")
            ),
            2.0,
            "{text}"
        );
    }
    let evictions: f64 = text
        .lines()
        .filter(|l| l.starts_with("cortex_evictions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(evictions, 4.0, "{text}");
    assert_eq!(
        metric(&text, r#"cortex_evictions_total{model="m1",node="n1"}"#),
        1.0
    );
    assert_eq!(metric(&text, "cortex_model_load_seconds_count"), 6.0);
    assert_eq!(metric(&text, r#"cortex_replicas{model="m1"}"#), 0.0);
    assert_eq!(metric(&text, r#"cortex_replicas{model="m2"}"#), 1.0);
    assert_eq!(metric(&text, r#"cortex_replicas{model="m3"}"#), 1.0);
}
