//! Fleet simulation benchmark (`scripts/bench-fleet`): cortex's real poller,
//! router and placement code against N in-process mock neurons × M models.
//!
//! Prints routing-decision and placement-decision latency (p50/p99/max), the
//! poller's CPU time per round (one round per `poll.interval_ms`, so at the
//! default 1 s this is CPU per second) and cortex's share of the process RSS.
//! The mocks run on their own runtime threads, so the poller's thread CPU
//! clock counts cortex's work only.

use cortex_gateway::config::NeuronConfig;
use cortex_gateway::placement::{self, Scope};
use cortex_gateway::state::Gateway;
use cortex_gateway::{poller, router, Config};
use helexa_testkit::{Behaviour, MockModel, MockNeuron};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    nodes: usize,
    models: usize,
    loaded_per_node: usize,
    rounds: usize,
    decisions: usize,
}

fn args() -> Args {
    let mut a = Args {
        nodes: 200,
        models: 20,
        loaded_per_node: 3,
        rounds: 10,
        decisions: 200_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v: usize = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage());
        match flag.as_str() {
            "--nodes" => a.nodes = v,
            "--models" => a.models = v,
            "--loaded-per-node" => a.loaded_per_node = v,
            "--rounds" => a.rounds = v,
            "--decisions" => a.decisions = v,
            _ => usage(),
        }
    }
    a
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_fleet [--nodes 200] [--models 20] [--loaded-per-node 3] [--rounds 10] [--decisions 200000]"
    );
    std::process::exit(2)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant
    // every Linux kernel supports.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn rss_mb() -> f64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn percentiles(mut ns: Vec<u64>) -> (f64, f64, f64) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)] as f64 / 1000.0;
    (at(0.50), at(0.99), *ns.last().unwrap() as f64 / 1000.0)
}

fn model_id(i: usize) -> String {
    format!("model-{i:02}")
}

fn main() {
    let a = args();
    let mocks_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Each node: every model in its catalogue, `loaded_per_node` of them
    // loaded (spread so each model has about N * loaded / M replicas);
    // half the models need 1000 MiB, half 1500, of a 4500 MiB budget (500
    // or 1000 MiB free), so placement meets both "fits" and "must evict".
    let mocks: Vec<MockNeuron> = mocks_rt.block_on(async {
        let mut out = Vec::with_capacity(a.nodes);
        for n in 0..a.nodes {
            let models = (0..a.models)
                .map(|m| {
                    let loaded =
                        (0..a.loaded_per_node).any(|k| (n * a.loaded_per_node + k) % a.models == m);
                    let mb = if m % 2 == 0 { 1000 } else { 1500 };
                    let base = if loaded {
                        MockModel::loaded(&model_id(m), 4096)
                    } else {
                        MockModel::available(&model_id(m), 4096)
                    };
                    base.taking(mb)
                })
                .collect();
            let behaviour = Behaviour {
                record: false,
                memory_budget_mb: Some(4500),
                ..Behaviour::default()
            };
            let mock = MockNeuron::start_on(
                "127.0.0.1:0".parse().unwrap(),
                &format!("n{n:03}"),
                models,
                behaviour,
            )
            .await
            .expect("mock neuron starts");
            out.push(mock);
        }
        out
    });
    let rss_mocks = rss_mb();

    let cortex_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    cortex_rt.block_on(async {
        let cfg = Config {
            neurons: mocks
                .iter()
                .enumerate()
                .map(|(n, m)| NeuronConfig {
                    name: format!("n{n:03}"),
                    endpoint: m.url(),
                })
                .collect(),
            ..Config::default()
        };
        let gw = Arc::new(Gateway::new(cfg).expect("gateway"));
        // Warm-up: discovery, connections, tokenizer fetches off.
        poller::poll_all(&gw).await;
        poller::poll_all(&gw).await;
        let snap = gw.fleet.snapshot();
        let healthy = snap.nodes.iter().filter(|v| v.healthy).count();
        assert_eq!(healthy, a.nodes, "every mock answered");

        let mut cpu = Duration::ZERO;
        let mut wall = Duration::ZERO;
        for _ in 0..a.rounds {
            let (c0, t0) = (thread_cpu(), Instant::now());
            poller::poll_all(&gw).await;
            cpu += thread_cpu() - c0;
            wall += t0.elapsed();
        }
        let per_round_cpu = cpu.as_secs_f64() * 1000.0 / a.rounds as f64;
        let per_round_wall = wall.as_secs_f64() * 1000.0 / a.rounds as f64;

        let models: Vec<String> = (0..a.models).map(model_id).collect();
        let mut routing = Vec::with_capacity(a.decisions);
        let mut replicas = 0usize;
        for j in 0..a.decisions {
            let model = &models[j % models.len()];
            let t = Instant::now();
            let snap = gw.fleet.snapshot();
            let ranked = router::rank(&gw.fleet, &snap, model);
            routing.push(t.elapsed().as_nanos() as u64);
            replicas += black_box(ranked).len();
        }
        // The same decision by scanning every node (how `rank` found
        // replicas before the per-model index), for comparison.
        let mut scanning = Vec::with_capacity(a.decisions);
        for j in 0..a.decisions {
            let model = &models[j % models.len()];
            let t = Instant::now();
            let snap = gw.fleet.snapshot();
            let found: Vec<usize> = snap
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, v)| v.serves(model))
                .map(|(i, _)| i)
                .collect();
            scanning.push(t.elapsed().as_nanos() as u64);
            black_box(found);
        }
        let policy = gw.policy();
        let placements = (a.decisions / 20).max(1000);
        let mut placing = Vec::with_capacity(placements);
        let (mut fits, mut evicts, mut none) = (0, 0, 0);
        for j in 0..placements {
            let model = &models[j % models.len()];
            let t = Instant::now();
            let snap = gw.fleet.snapshot();
            let plan = placement::plan(&gw.fleet, &snap, &policy, model, Scope::default());
            placing.push(t.elapsed().as_nanos() as u64);
            match black_box(plan) {
                Ok(placement::Plan::Fits { .. }) => fits += 1,
                Ok(placement::Plan::Evict { .. }) => evicts += 1,
                Err(_) => none += 1,
            }
        }
        let rss_all = rss_mb();
        let (r50, r99, rmax) = percentiles(routing);
        let (p50, p99, pmax) = percentiles(placing);
        let (s50, s99, _) = percentiles(scanning);
        println!("fleet: {} nodes x {} models, {} loaded per node ({:.1} replicas per model on average)",
            a.nodes, a.models, a.loaded_per_node, replicas as f64 / a.decisions as f64);
        println!("routing decision  (snapshot + rank), {} decisions: p50 {r50:.2} us  p99 {r99:.2} us  max {rmax:.1} us",
            a.decisions);
        println!("  (finding the replicas by scanning every node instead: p50 {s50:.2} us  p99 {s99:.2} us, before any scoring)");
        println!("placement decision (snapshot + plan), {placements} decisions ({fits} fit, {evicts} evict, {none} no room): p50 {p50:.1} us  p99 {p99:.1} us  max {pmax:.1} us");
        println!("poll round over {} neurons (/health + /models each): {per_round_cpu:.1} ms CPU, {per_round_wall:.1} ms wall (mean of {} rounds; at poll.interval_ms = 1000 that is {:.1}% of one core)",
            a.nodes, a.rounds, per_round_cpu / 10.0);
        println!("RSS: {rss_mocks:.0} MiB with the mocks alone, {rss_all:.0} MiB with cortex: cortex ~{:.0} MiB",
            rss_all - rss_mocks);
    });
    drop(mocks);
}
