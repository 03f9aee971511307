//! Keeps each `[[models]]` entry's replica count where its policy says
//! (docs/protocol.md §6), once per poll interval:
//!
//! - below `min_replicas` (at start-up, after a node returned or lost the
//!   model): load one more;
//! - every replica queued for `scale_up_after_secs` and fewer than
//!   `max_replicas`: load one more where placement finds room (it never
//!   evicts a model of higher priority);
//! - above `min_replicas`, a replica unused for `idle_unload_secs`: unload it.
//!   A new replica's idle clock starts at its load, so it is never removed
//!   within its idle window (no flapping).
//!
//! One step per model per tick; each step is a loader call, so a model never
//! has two loads at once.

use crate::config::ms;
use crate::fleet::now_ms;
use crate::loader::Why;
use crate::state::Gateway;
use std::sync::Arc;
use tokio::time::MissedTickBehavior;

/// Runs until aborted.
pub fn spawn(gw: Arc<Gateway>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ms(gw.config.poll.interval_ms));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            step(&gw);
        }
    })
}

/// What one tick decided for one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Load(Why),
    /// Unload from this node index.
    Unload(usize),
}

/// One pass over the policies; the work it starts runs in its own tasks.
pub fn step(gw: &Arc<Gateway>) {
    for (model, action) in decide(gw) {
        let gw = gw.clone();
        tokio::spawn(async move {
            let res = match action {
                Action::Load(why) => gw.loader.load(&gw, &model, why, None).await.map(drop),
                Action::Unload(idx) => crate::loader::unload(&gw, idx, &model).await,
            };
            if let Err(e) = res {
                tracing::debug!(model, action = ?action, error = %e.message, "autoscale step failed");
            }
        });
    }
}

/// What each policy needs now, given the current snapshot.
pub fn decide(gw: &Gateway) -> Vec<(String, Action)> {
    let snap = gw.fleet.snapshot();
    let policy = gw.policy();
    let now = now_ms();
    let mut out = Vec::new();
    for (model, p) in &policy.models {
        if gw.loader.loading(model) || gw.loader.unloading(model) {
            continue;
        }
        // Healthy replicas serving it now, and nodes loading it.
        let replicas: Vec<usize> = snap
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, v)| v.serves(model))
            .map(|(i, _)| i)
            .collect();
        let loading = snap.nodes.iter().any(|v| v.healthy && v.loading(model));
        let can_load = snap.nodes.iter().any(|v| v.can_load(model));
        let n = replicas.len() as u32;
        if n < p.min_replicas {
            if !loading && can_load {
                out.push((model.clone(), Action::Load(Why::MinReplicas)));
            }
            continue;
        }
        if loading {
            continue;
        }
        let after = p.scale_up_after_secs.saturating_mul(1000);
        if n >= 1 && n < p.max_replicas && can_load {
            let all_queued = replicas.iter().all(|&i| {
                let q = gw.fleet.neurons[i].replica(model).queued_for_ms();
                q > 0 && q >= after
            });
            if all_queued {
                out.push((model.clone(), Action::Load(Why::ScaleUp)));
                continue;
            }
        }
        if p.idle_unload_secs > 0 && n > p.min_replicas {
            let idle = p.idle_unload_secs.saturating_mul(1000);
            let victim = replicas
                .iter()
                .filter(|&&i| {
                    let r = gw.fleet.neurons[i].replica(model);
                    let busy = snap.nodes[i]
                        .load
                        .get(model)
                        .is_some_and(|h| h.in_flight > 0 || h.queue_depth > 0);
                    !busy
                        && r.in_flight().load(std::sync::atomic::Ordering::Relaxed) == 0
                        && now.saturating_sub(r.last_used_ms()) >= idle
                })
                .min_by_key(|&&i| gw.fleet.neurons[i].replica(model).last_used_ms());
            if let Some(&i) = victim {
                out.push((model.clone(), Action::Unload(i)));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
