//! The memory budget (docs/protocol.md §6): `/discovery` estimates,
//! `/health` `memory_mb`, and `507 insufficient_memory` before a load that
//! cannot fit starts anything.

mod support;

use candle_core::quantized::gguf_file::{self, Value as Gguf};
use serde_json::json;
use support::*;

/// A GGUF file with a llama header and `weights_mib` MiB of tensor data:
/// enough for the estimate, never loaded by these tests.
fn synthetic_gguf(path: &std::path::Path, weights_mib: usize) {
    let md = [
        ("general.architecture", Gguf::String("llama".into())),
        ("llama.block_count", Gguf::U32(2)),
        ("llama.embedding_length", Gguf::U32(64)),
        ("llama.attention.head_count", Gguf::U32(1)),
        ("llama.attention.head_count_kv", Gguf::U32(1)),
        ("llama.context_length", Gguf::U32(4096)),
    ];
    let refs: Vec<(&str, &Gguf)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &refs, &[]).unwrap();
    // Pad to the 32-byte alignment the reader expects, then the "tensors".
    let len = f.metadata().unwrap().len() as usize;
    let pad = len.div_ceil(32) * 32 - len;
    std::io::Write::write_all(&mut f, &vec![0u8; pad + weights_mib * 1024 * 1024]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_over_budget_is_507_before_anything_starts() {
    let fx = Fixture::new();
    let small = fx.model("small", json!({}));
    let big_path = fx.dir.path().join("big.gguf");
    synthetic_gguf(&big_path, 8);
    let mut big = neuron_agent::config::ModelSpec::new("big", &big_path);
    big.max_context = Some(1024);
    big.max_batch = Some(1);
    let mut cfg = config(vec![small, big]);
    cfg.memory_budget_mb = Some(10);
    let agent = start(cfg).await;

    // 8 MiB of weights + 2 (k, v) * 2 layers * 64 dims * 1024 positions *
    // 4 bytes = 1 MiB of KV cache.
    let (_, d) = get(&agent, "/discovery").await;
    assert_eq!(
        d["catalogue"][1],
        json!({"id": "big", "loaded": false, "memory_mb": 9})
    );
    let (_, h) = get(&agent, "/health").await;
    assert_eq!(h["memory_mb"], json!({"budget": 10, "used": 0, "free": 10}));

    // The fake engine reports 3 MiB of weights once loaded.
    let (s, _) = post_json(&agent, "/models/load", json!({"model": "small"})).await;
    assert_eq!(s, 200);
    let (_, h) = get(&agent, "/health").await;
    assert_eq!(h["memory_mb"], json!({"budget": 10, "used": 3, "free": 7}));

    let r = post(&agent, "/models/load", json!({"model": "big"})).await;
    assert_eq!(r.status(), 507);
    assert!(r.headers().get("retry-after").is_none());
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "insufficient_memory", "{e}");
    assert_eq!(e["error"]["type"], "api_error");
    assert_eq!(e["error"]["need_mb"], 9);
    assert_eq!(e["error"]["free_mb"], 7);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("memory_budget_mb"),
        "{e}"
    );
    // Nothing was started for it: not loading, no engine.
    assert!(agent.registry().engine_pid("big").is_none());
    let (_, h) = get(&agent, "/health").await;
    assert_eq!(h["models"].as_array().unwrap().len(), 1, "{h}");
    assert_eq!(h["memory_mb"]["used"], 3);

    // Once the small one is gone the big one fits the budget.
    let (s, _) = post_json(&agent, "/models/unload", json!({"model": "small"})).await;
    assert_eq!(s, 200);
    let (_, h) = get(&agent, "/health").await;
    assert_eq!(h["memory_mb"], json!({"budget": 10, "used": 0, "free": 10}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_loads_cannot_share_the_last_free_memory() {
    let fx = Fixture::new();
    let mut specs = Vec::new();
    for id in ["big1", "big2"] {
        let path = fx.dir.path().join(format!("{id}.gguf"));
        synthetic_gguf(&path, 8);
        let mut spec = neuron_agent::config::ModelSpec::new(id, &path);
        spec.max_context = Some(1024);
        spec.max_batch = Some(1);
        specs.push(spec);
    }
    let mut cfg = config(specs);
    // Room for one 9 MiB estimate, not two.
    cfg.memory_budget_mb = Some(12);
    let agent = start(cfg).await;
    let (a, b) = tokio::join!(
        post(&agent, "/models/load", json!({"model": "big1"})),
        post(&agent, "/models/load", json!({"model": "big2"}))
    );
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 507]);
    // Loaded, the model takes the engine's real weights (the fake engine
    // reports 3 MiB) plus its 1 MiB KV cache, not the 9 MiB estimate.
    let (_, h) = get(&agent, "/health").await;
    assert_eq!(h["memory_mb"], json!({"budget": 12, "used": 4, "free": 8}));
    let (_, models) = get(&agent, "/models").await;
    assert_eq!(models[0]["memory_mb"], 4, "{models}");
    let (_, d) = get(&agent, "/discovery").await;
    let loaded = d["catalogue"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["loaded"] == true)
        .unwrap();
    assert_eq!(loaded["memory_mb"], 4, "{d}");
}
