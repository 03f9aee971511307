//! Where a cold load goes and what it evicts (docs/protocol.md §6); it
//! decides only — the loader carries the plan out.
//!
//! Among healthy neurons whose catalogue has the model, that `pinned_on`
//! allows and that do not already have it: (1) the node where it fits in
//! free memory now with the least left over; else (2) the node where it fits
//! after evicting displaceable models (priority at most the model's, not
//! holding a `min_replicas` floor), least recently used first, with the
//! fewest evictions and then the least recently used victims; else (3)
//! `507 insufficient_memory`. A node that does not report memory is taken
//! to have room (an older neuron refuses for itself).

use crate::fleet::{Fleet, Snapshot};
use crate::policy::Policy;
use helexa_api::error::{ApiError, ErrorCode};
use std::collections::HashMap;

/// What to do for one cold load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Load on `node`; it fits now.
    Fits { node: usize, need_mb: u64 },
    /// Unload `victims` from `node` (least recently used first), then load.
    Evict {
        node: usize,
        need_mb: u64,
        victims: Vec<String>,
    },
}

impl Plan {
    pub fn node(&self) -> usize {
        match self {
            Plan::Fits { node, .. } | Plan::Evict { node, .. } => *node,
        }
    }

    pub fn need_mb(&self) -> u64 {
        match self {
            Plan::Fits { need_mb, .. } | Plan::Evict { need_mb, .. } => *need_mb,
        }
    }
}

/// Limits on one decision.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scope<'a> {
    /// Only this node (an admin load naming one).
    pub only: Option<usize>,
    /// MiB already promised, per node, to loads under way that the last
    /// poll does not show yet.
    pub reserved: Option<&'a HashMap<usize, u64>>,
}

/// One node that could take the model, and how.
struct Site {
    node: usize,
    need: u64,
    /// `None`: the node does not report memory.
    free: Option<u64>,
}

/// Decides where `model` goes; the error is what the client sees.
pub fn plan(
    fleet: &Fleet,
    snap: &Snapshot,
    policy: &Policy,
    model: &str,
    scope: Scope<'_>,
) -> Result<Plan, ApiError> {
    let mp = policy.of(model);
    let name = |i: usize| fleet.neurons[i].name.as_str();
    let reserved = |i: usize| scope.reserved.and_then(|r| r.get(&i)).copied().unwrap_or(0);
    let options: Vec<Site> = snap
        .catalogued(model)
        .iter()
        .filter(|&&(i, _)| {
            let v = &snap.nodes[i];
            scope.only.is_none_or(|o| o == i)
                && v.accepts_loads()
                && mp.allows_node(name(i))
                && !v.models.contains_key(model)
                && !v.load.contains_key(model)
        })
        .map(|&(i, need)| Site {
            node: i,
            need,
            free: snap.nodes[i]
                .memory
                .map(|m| m.free.saturating_sub(reserved(i))),
        })
        .collect();
    if options.is_empty() {
        return Err(nowhere(fleet, snap, policy, model, scope));
    }
    // 1. Fits now: least free memory left after the load, ties by name;
    // nodes that do not report memory come after every node that does.
    let fits = options
        .iter()
        .filter(|o| o.free.is_none_or(|f| o.need <= f))
        .min_by(|a, b| {
            let left = |o: &Site| o.free.map_or(u64::MAX, |f| f - o.need);
            left(a)
                .cmp(&left(b))
                .then_with(|| name(a.node).cmp(name(b.node)))
        });
    if let Some(o) = fits {
        return Ok(Plan::Fits {
            node: o.node,
            need_mb: o.need,
        });
    }
    // 2. Fits after evictions.
    let best = options
        .iter()
        .filter_map(|o| {
            let victims = victims(fleet, snap, o, policy, mp.residency_priority)?;
            Some((o, victims))
        })
        .min_by(|(a, va), (b, vb)| {
            va.len()
                .cmp(&vb.len())
                .then_with(|| newest_first(va).cmp(&newest_first(vb)))
                .then_with(|| name(a.node).cmp(name(b.node)))
        });
    if let Some((o, v)) = best {
        return Ok(Plan::Evict {
            node: o.node,
            need_mb: o.need,
            victims: v.into_iter().map(|(m, _)| m.to_string()).collect(),
        });
    }
    // 3. No room anywhere.
    let need = options.iter().map(|o| o.need).min().unwrap_or(0);
    let most_free = options.iter().filter_map(|o| o.free).max().unwrap_or(0);
    Err(ApiError::new(
        ErrorCode::InsufficientMemory,
        format!(
            "no node has room for `{model}` ({need} MiB): the most free memory on a node that \
             may load it is {most_free} MiB, and evicting models of equal or lower \
             residency_priority ({}) that no min_replicas holds would not free enough",
            mp.residency_priority
        ),
    ))
}

/// Victims' last-use times, most recent first: comparing these prefers the
/// node whose newest victim is oldest.
fn newest_first(v: &[(&str, u64)]) -> Vec<u64> {
    let mut t: Vec<u64> = v.iter().map(|(_, t)| *t).collect();
    t.sort_unstable_by(|a, b| b.cmp(a));
    t
}

/// The least recently used displaceable models whose memory, with what is
/// free, makes room on this node; `None` when even all of them would not.
fn victims<'v>(
    fleet: &Fleet,
    snap: &'v Snapshot,
    o: &Site,
    policy: &Policy,
    priority: i32,
) -> Option<Vec<(&'v str, u64)>> {
    let free = o.free?;
    let view = &snap.nodes[o.node];
    let neuron = &fleet.neurons[o.node];
    let mut displaceable: Vec<(&str, u64, u64)> = view
        .models
        .keys()
        .filter(|id| view.serves(id))
        .filter(|id| {
            let p = policy.of(id);
            p.residency_priority <= priority && snap.serving(id).len() as u32 > p.min_replicas
        })
        .map(|id| {
            (
                id.as_str(),
                view.taken_mb(id),
                neuron.replica(id).last_used_ms(),
            )
        })
        .collect();
    displaceable.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.cmp(b.0)));
    let mut room = free;
    let mut out = Vec::new();
    for (id, mb, used) in displaceable {
        if room >= o.need {
            break;
        }
        room += mb;
        out.push((id, used));
    }
    (room >= o.need).then_some(out)
}

/// Loaded replicas per model on healthy neurons.
pub fn replica_counts(snap: &Snapshot) -> HashMap<&str, u32> {
    let mut out: HashMap<&str, u32> = HashMap::new();
    for v in &snap.nodes {
        for id in v.models.keys() {
            if v.serves(id) {
                *out.entry(id.as_str()).or_default() += 1;
            }
        }
    }
    out
}

/// Why no node can even be considered.
fn nowhere(fleet: &Fleet, snap: &Snapshot, policy: &Policy, model: &str, scope: Scope) -> ApiError {
    let mp = policy.of(model);
    let listed: Vec<&str> = snap
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, v)| scope.only.is_none_or(|o| o == *i) && v.can_load(model))
        .map(|(i, _)| fleet.neurons[i].name.as_str())
        .collect();
    if listed.is_empty() {
        return ApiError::new(
            ErrorCode::NoCapacity,
            format!("no healthy neuron can load `{model}` now"),
        )
        .with_retry_after(5);
    }
    if !listed.iter().any(|n| mp.allows_node(n)) {
        return ApiError::new(
            ErrorCode::NoCapacity,
            format!(
                "`{model}` is pinned on {:?}, and none of them is healthy with it in its catalogue",
                mp.pinned_on
            ),
        )
        .with_retry_after(5);
    }
    ApiError::new(
        ErrorCode::NoCapacity,
        format!("every healthy neuron that may load `{model}` already has it"),
    )
    .with_retry_after(5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ModelPolicy};
    use crate::fleet::{Neuron, NodeView};
    use helexa_protocol::{CatalogueEntry, Discovery, MemoryBudget, ModelHealth, ModelInfo};

    /// A healthy node with `budget` MiB whose catalogue has every model of
    /// `catalogue` (id, MiB) and has `loaded` of them loaded.
    fn node(budget: u64, catalogue: &[(&str, u64)], loaded: &[&str]) -> NodeView {
        let mut v = NodeView {
            healthy: true,
            status: Some(helexa_protocol::NodeStatus::Ready),
            discovery: Some(Discovery {
                catalogue: catalogue
                    .iter()
                    .map(|(id, mb)| CatalogueEntry {
                        id: id.to_string(),
                        loaded: loaded.contains(id),
                        memory_mb: *mb,
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut used = 0;
        for id in loaded {
            let mb = catalogue.iter().find(|(c, _)| c == id).unwrap().1;
            used += mb;
            v.models.insert(
                id.to_string(),
                ModelInfo {
                    id: id.to_string(),
                    memory_mb: mb,
                    ..Default::default()
                },
            );
            v.load.insert(
                id.to_string(),
                ModelHealth {
                    id: id.to_string(),
                    ..Default::default()
                },
            );
        }
        v.memory = Some(MemoryBudget::new(budget, used));
        v
    }

    fn fleet(names: &[&str]) -> Fleet {
        Fleet::new(names.iter().map(|n| Neuron::new(n, "http://x")).collect())
    }

    fn policy(models: Vec<ModelPolicy>) -> Policy {
        Policy::from_config(&Config {
            models,
            ..Default::default()
        })
    }

    fn pol(id: &str, f: impl FnOnce(&mut ModelPolicy)) -> ModelPolicy {
        let mut p = ModelPolicy {
            id: id.into(),
            ..Default::default()
        };
        f(&mut p);
        p
    }

    const CAT: &[(&str, u64)] = &[("a", 400), ("b", 400), ("c", 400), ("d", 200)];

    #[test]
    fn best_fit_leaves_least_free() {
        let f = fleet(&["n1", "n2", "n3"]);
        let snap = Snapshot::new(vec![
            node(2000, CAT, &[]),
            node(500, CAT, &[]),
            node(300, CAT, &[]),
        ]);
        let p = plan(&f, &snap, &policy(vec![]), "a", Scope::default()).unwrap();
        assert_eq!(
            p,
            Plan::Fits {
                node: 1,
                need_mb: 400
            }
        );
        // Ties by name.
        let f = fleet(&["z", "y"]);
        let snap = Snapshot::new(vec![node(500, CAT, &[]), node(500, CAT, &[])]);
        let p = plan(&f, &snap, &policy(vec![]), "a", Scope::default()).unwrap();
        assert_eq!(p.node(), 1);
    }

    #[test]
    fn reservations_count_against_free_memory() {
        let f = fleet(&["n1", "n2"]);
        let snap = Snapshot::new(vec![node(500, CAT, &[]), node(900, CAT, &[])]);
        let reserved = HashMap::from([(0, 400)]);
        let scope = Scope {
            reserved: Some(&reserved),
            ..Default::default()
        };
        let p = plan(&f, &snap, &policy(vec![]), "a", scope).unwrap();
        assert_eq!(p.node(), 1);
    }

    #[test]
    fn never_evicts_while_another_node_has_room() {
        let f = fleet(&["full", "roomy"]);
        let snap = Snapshot::new(vec![node(800, CAT, &["a", "b"]), node(5000, CAT, &[])]);
        let p = plan(&f, &snap, &policy(vec![]), "c", Scope::default()).unwrap();
        assert_eq!(
            p,
            Plan::Fits {
                node: 1,
                need_mb: 400
            }
        );
    }

    #[test]
    fn evicts_least_recently_used_on_node_needing_fewest() {
        let f = fleet(&["n1", "n2"]);
        // n1 must drop both of its 200 MiB... n2 one 400 MiB model.
        let cat: &[(&str, u64)] = &[("a", 400), ("b", 400), ("c", 400), ("x", 200), ("y", 200)];
        let snap = Snapshot::new(vec![
            node(400, cat, &["x", "y"]),
            node(800, cat, &["a", "b"]),
        ]);
        f.neurons[1].replica("a").touch();
        std::thread::sleep(std::time::Duration::from_millis(3));
        f.neurons[1].replica("b").touch();
        let p = plan(&f, &snap, &policy(vec![]), "c", Scope::default()).unwrap();
        assert_eq!(
            p,
            Plan::Evict {
                node: 1,
                need_mb: 400,
                victims: vec!["a".into()]
            }
        );
        // Use `a` again: now `b` is the least recently used.
        std::thread::sleep(std::time::Duration::from_millis(3));
        f.neurons[1].replica("a").touch();
        let p = plan(&f, &snap, &policy(vec![]), "c", Scope::default()).unwrap();
        assert!(matches!(p, Plan::Evict { victims, .. } if victims == vec!["b".to_string()]));
    }

    #[test]
    fn equal_counts_prefer_the_older_victims() {
        let f = fleet(&["n1", "n2"]);
        let snap = Snapshot::new(vec![node(400, CAT, &["a"]), node(400, CAT, &["b"])]);
        f.neurons[1].replica("b").touch();
        std::thread::sleep(std::time::Duration::from_millis(3));
        f.neurons[0].replica("a").touch();
        let p = plan(&f, &snap, &policy(vec![]), "c", Scope::default()).unwrap();
        assert_eq!(p.node(), 1);
    }

    #[test]
    fn higher_priority_and_min_replicas_are_never_evicted() {
        let f = fleet(&["n1"]);
        let snap = Snapshot::new(vec![node(800, CAT, &["a", "b"])]);
        let pols = policy(vec![
            pol("a", |p| p.residency_priority = 5),
            pol("b", |p| p.min_replicas = 1),
        ]);
        let e = plan(&f, &snap, &pols, "c", Scope::default()).unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientMemory);
        assert!(e.retry_after.is_none());
        // With equal priority `a` may go (b is still held by min_replicas).
        let pols = policy(vec![
            pol("a", |p| p.residency_priority = 5),
            pol("b", |p| p.min_replicas = 1),
            pol("c", |p| p.residency_priority = 5),
        ]);
        let p = plan(&f, &snap, &pols, "c", Scope::default()).unwrap();
        assert!(matches!(p, Plan::Evict { victims, .. } if victims == vec!["a".to_string()]));
    }

    #[test]
    fn pinned_only_nodes_and_nodes_without_it() {
        let f = fleet(&["n1", "n2"]);
        let snap = Snapshot::new(vec![node(5000, CAT, &[]), node(500, CAT, &["a"])]);
        let pols = policy(vec![pol("b", |p| p.pinned_on = vec!["n1".into()])]);
        assert_eq!(
            plan(&f, &snap, &pols, "b", Scope::default())
                .unwrap()
                .node(),
            0
        );
        // A node that already has the model is not a place for another replica.
        assert_eq!(
            plan(&f, &snap, &pols, "a", Scope::default())
                .unwrap()
                .node(),
            0
        );
        let only = Scope {
            only: Some(1),
            ..Default::default()
        };
        let e = plan(&f, &snap, &pols, "a", only).unwrap_err();
        assert_eq!(e.code, ErrorCode::NoCapacity);
        let e = plan(&f, &snap, &pols, "zzz", Scope::default()).unwrap_err();
        assert_eq!(e.code, ErrorCode::NoCapacity);
    }

    #[test]
    fn nodes_without_memory_figures_come_last_but_count() {
        let f = fleet(&["old", "new"]);
        let mut old = node(0, CAT, &[]);
        old.memory = None;
        let snap = Snapshot::new(vec![old, node(300, CAT, &[])]);
        // `new` has no room for `a` (400): the older neuron decides for itself.
        assert_eq!(
            plan(&f, &snap, &policy(vec![]), "a", Scope::default())
                .unwrap()
                .node(),
            0
        );
        assert_eq!(
            plan(&f, &snap, &policy(vec![]), "d", Scope::default())
                .unwrap()
                .node(),
            1
        );
    }
}
