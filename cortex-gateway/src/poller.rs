//! Polls every neuron concurrently each interval and swaps in a new snapshot.
//!
//! Healthy on the first good poll, unhealthy after `unhealthy_after` failures
//! in a row; models a neuron stops reporting are pruned. Handlers never wait.

use crate::config::ms;
use crate::fleet::NodeView;
use crate::state::Gateway;
use futures_util::future::join_all;
use helexa_protocol::{Discovery, Health, ModelInfo};
use serde::de::DeserializeOwned;
use std::collections::HashSet;
use std::sync::Arc;
use tokio::time::MissedTickBehavior;

/// Runs until the task is aborted; the first poll happens at once.
pub fn spawn(gw: Arc<Gateway>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ms(gw.config.poll.interval_ms));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            poll_all(&gw).await;
        }
    })
}

/// One round over every neuron.
pub async fn poll_all(gw: &Arc<Gateway>) {
    let prev = gw.fleet.snapshot();
    let views =
        join_all((0..gw.fleet.neurons.len()).map(|i| poll_node(gw, i, prev.nodes[i].clone())))
            .await;
    store(gw, |nodes| {
        for (i, v) in views.into_iter().enumerate() {
            nodes[i] = v;
        }
    });
}

/// Re-polls one neuron now (after cortex loaded a model there).
pub async fn refresh_node(gw: &Arc<Gateway>, idx: usize) {
    let prev = gw.fleet.snapshot().nodes[idx].clone();
    let v = poll_node(gw, idx, prev).await;
    store(gw, |nodes| nodes[idx] = v);
}

/// A neuron took a request and sent nothing within the first-byte timeout:
/// it is unhealthy from now until a poll succeeds (rather than after
/// `unhealthy_after` failed polls, each as long as the poll timeout).
pub fn mark_hung(gw: &Arc<Gateway>, idx: usize) {
    let neuron = &gw.fleet.neurons[idx];
    if neuron.is_suspect() {
        return;
    }
    neuron.set_suspect(true);
    tracing::warn!(node = %neuron.name,
        first_byte_timeout_ms = gw.config.upstream.first_byte_timeout_ms,
        "neuron sent no response in time; unhealthy until it answers a poll");
    store(gw, |nodes| {
        nodes[idx].healthy = false;
        nodes[idx].consecutive_failures = gw.config.poll.unhealthy_after;
    });
}

fn store(gw: &Arc<Gateway>, edit: impl FnOnce(&mut Vec<NodeView>)) {
    let prev = gw.fleet.snapshot();
    let mut nodes = prev.nodes.clone();
    edit(&mut nodes);
    let m = &gw.metrics;
    let mut before: HashSet<String> = HashSet::new();
    for n in &prev.nodes {
        before.extend(n.models.keys().cloned());
    }
    let mut after: HashSet<String> = HashSet::new();
    let mut replicas: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for (i, view) in nodes.iter().enumerate() {
        let neuron = &gw.fleet.neurons[i];
        m.neuron_up
            .with_label_values(&[neuron.name.as_str()])
            .set(view.healthy as i64);
        neuron.retain_endpoints(|id| view.models.contains_key(id));
        for (id, h) in &view.load {
            m.model_in_flight
                .with_label_values(&[id.as_str(), neuron.name.as_str()])
                .set(h.in_flight as i64);
            m.model_queue_depth
                .with_label_values(&[id.as_str(), neuron.name.as_str()])
                .set(h.queue_depth as i64);
        }
        for id in prev.nodes[i].load.keys() {
            if !view.load.contains_key(id) {
                let _ = m
                    .model_in_flight
                    .remove_label_values(&[id.as_str(), neuron.name.as_str()]);
                let _ = m
                    .model_queue_depth
                    .remove_label_values(&[id.as_str(), neuron.name.as_str()]);
            }
        }
        after.extend(view.models.keys().cloned());
        // The replica clocks of docs/protocol.md §6: a model that appeared
        // here starts its idle clock now; queued work starts the scale-up one.
        for id in view.models.keys() {
            if view.serves(id) {
                *replicas.entry(id.as_str()).or_default() += 1;
            }
            if !prev.nodes[i].models.contains_key(id) {
                neuron.replica(id).touch();
            }
        }
        for (id, h) in &view.load {
            if view.models.contains_key(id) {
                neuron.replica(id).note_queue(h.queue_depth > 0);
            }
        }
    }
    for id in before.iter().chain(after.iter()) {
        m.replicas
            .with_label_values(&[id.as_str()])
            .set(replicas.get(id.as_str()).copied().unwrap_or(0));
    }
    // Models that vanished from the whole fleet lose their cached tokenizer;
    // new ones get theirs fetched in the background.
    for gone in before.difference(&after) {
        gw.tokenizers.forget(gone);
    }
    let new: Vec<String> = after.difference(&before).cloned().collect();
    gw.fleet.store(nodes);
    // After the store, so the fetch finds the neuron that reported the model.
    if gw.config.prevalidation.enabled && gw.config.prevalidation.fetch_tokenizer {
        for id in new {
            let gw2 = gw.clone();
            tokio::spawn(async move {
                let _ = gw2.tokenizers.get(&gw2, &id).await;
            });
        }
    }
}

/// GET `url` on the control client and parse its JSON; errors name the URL.
pub(crate) async fn get_json<T: DeserializeOwned>(gw: &Gateway, url: String) -> Result<T, String> {
    let resp = gw
        .control
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    resp.json::<T>().await.map_err(|e| format!("{url}: {e}"))
}

async fn poll_node(gw: &Gateway, idx: usize, prev: NodeView) -> NodeView {
    let neuron = &gw.fleet.neurons[idx];
    let base = &neuron.endpoint;
    let need_discovery =
        prev.discovery.is_none() || prev.polls_since_discovery >= gw.config.poll.discovery_every;
    let discovery = async {
        if need_discovery {
            Some(get_json::<Discovery>(gw, format!("{base}/discovery")).await)
        } else {
            None
        }
    };
    let (health, models, discovery) = tokio::join!(
        get_json::<Health>(gw, format!("{base}/health")),
        get_json::<Vec<ModelInfo>>(gw, format!("{base}/models")),
        discovery
    );
    match (health, models) {
        (Ok(health), Ok(models)) => {
            neuron.set_suspect(false);
            if !prev.healthy {
                tracing::info!(node = %neuron.name, models = models.len(), "neuron is healthy");
            }
            let (discovery, polls_since_discovery) = match discovery {
                Some(Ok(d)) => (Some(d), 0),
                Some(Err(e)) => {
                    tracing::debug!(node = %neuron.name, error = %e, "discovery poll failed");
                    (prev.discovery, prev.polls_since_discovery + 1)
                }
                None => (prev.discovery, prev.polls_since_discovery + 1),
            };
            NodeView {
                healthy: true,
                consecutive_failures: 0,
                status: Some(health.status),
                discovery,
                models: models.into_iter().map(|m| (m.id.clone(), m)).collect(),
                memory: health.memory_mb,
                load: health
                    .models
                    .into_iter()
                    .map(|m| (m.id.clone(), m))
                    .collect(),
                polls_since_discovery,
            }
        }
        (h, m) => {
            let failures = prev.consecutive_failures + 1;
            let healthy =
                prev.healthy && !neuron.is_suspect() && failures < gw.config.poll.unhealthy_after;
            let err = h.err().or(m.err()).unwrap_or_default();
            if prev.healthy && !healthy {
                tracing::warn!(node = %neuron.name, failures, error = %err, "neuron is unhealthy");
            } else {
                tracing::debug!(node = %neuron.name, failures, error = %err, "poll failed");
            }
            NodeView {
                healthy,
                consecutive_failures: failures,
                ..prev
            }
        }
    }
}
