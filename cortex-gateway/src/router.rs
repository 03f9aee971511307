//! Decides where a request goes (docs/protocol.md §5); it never sends anything.
//!
//! Score = max(cortex's own open requests, polled in_flight) + polled
//! queue_depth; lowest first, ties by node name. The local count is what
//! spreads a burst evenly between polls.

use crate::fleet::{Fleet, Snapshot};
use std::collections::BTreeMap;

/// One replica to try, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Index into `Fleet::neurons` / `Snapshot::nodes`.
    pub node: usize,
    pub score: u64,
}

/// Loaded replicas of `model` on healthy neurons, best first.
pub fn rank(fleet: &Fleet, snap: &Snapshot, model: &str) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = snap
        .serving(model)
        .iter()
        .map(|&i| {
            let view = &snap.nodes[i];
            let local = fleet.neurons[i].local_in_flight(model) as u64;
            let (polled, queue) = view
                .load
                .get(model)
                .map(|h| (h.in_flight as u64, h.queue_depth as u64))
                .unwrap_or((0, 0));
            Candidate {
                node: i,
                score: local.max(polled) + queue,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        a.score
            .cmp(&b.score)
            .then_with(|| fleet.neurons[a.node].name.cmp(&fleet.neurons[b.node].name))
    });
    out
}

/// Resolves a client-facing name through the alias table.
pub fn resolve_alias<'a>(aliases: &'a BTreeMap<String, String>, model: &'a str) -> &'a str {
    aliases.get(model).map(String::as_str).unwrap_or(model)
}

/// Whether any node's catalogue or loaded set knows `model` at all.
pub fn known_anywhere(snap: &Snapshot, model: &str) -> bool {
    snap.nodes.iter().any(|v| {
        v.models.contains_key(model)
            || v.discovery
                .as_ref()
                .is_some_and(|d| d.catalogue.iter().any(|c| c.id == model))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Neuron, NodeView};
    use helexa_protocol::{ModelHealth, ModelInfo, NodeStatus};

    fn view(model: &str, in_flight: u32, queue: u32) -> NodeView {
        let mut v = NodeView {
            healthy: true,
            status: Some(NodeStatus::Ready),
            ..Default::default()
        };
        v.models.insert(
            model.into(),
            ModelInfo {
                id: model.into(),
                ..Default::default()
            },
        );
        v.load.insert(
            model.into(),
            ModelHealth {
                id: model.into(),
                in_flight,
                queue_depth: queue,
                ..Default::default()
            },
        );
        v
    }

    fn fleet(names: &[&str]) -> Fleet {
        Fleet::new(names.iter().map(|n| Neuron::new(n, "http://x")).collect())
    }

    #[test]
    fn lowest_score_wins_ties_by_name() {
        let f = fleet(&["b", "a", "c"]);
        let snap = Snapshot::new(vec![view("m", 0, 0), view("m", 0, 0), view("m", 0, 1)]);
        let r = rank(&f, &snap, "m");
        assert_eq!(r.iter().map(|c| c.node).collect::<Vec<_>>(), vec![1, 0, 2]);
    }

    #[test]
    fn local_count_used_when_higher_than_polled() {
        let f = fleet(&["a", "b"]);
        let snap = Snapshot::new(vec![view("m", 1, 0), view("m", 2, 0)]);
        let r = f.neurons[0].replica("m");
        r.in_flight()
            .fetch_add(3, std::sync::atomic::Ordering::SeqCst);
        let r = rank(&f, &snap, "m");
        assert_eq!(r[0].node, 1);
        assert_eq!(r[0].score, 2);
        assert_eq!(r[1].score, 3);
    }

    #[test]
    fn unhealthy_and_unloaded_are_not_candidates() {
        let f = fleet(&["a", "b", "c"]);
        let mut sick = view("m", 0, 0);
        sick.healthy = false;
        let snap = Snapshot::new(vec![sick, view("other", 0, 0), view("m", 5, 5)]);
        let r = rank(&f, &snap, "m");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].node, 2);
    }
}
