//! The registry projected onto the wire and the metrics: `/health` model
//! entries, `/models` entries and the per-model gauges of `/metrics`. Each
//! reads cached slot state under the slot's lock; `/proc` is read after it.

use super::{Phase, Registry};
use crate::metrics::ModelGauges;
use crate::procfs::process_rss_mb;
use helexa_protocol::{ModelHealth, ModelStatus};

impl Registry {
    /// `/health` figures for every model that is not unloaded.
    pub fn model_health(&self) -> Vec<ModelHealth> {
        let mut out = Vec::new();
        for slot in &self.inner.slots {
            let st = slot.lock();
            let Some(status) = st.phase.wire() else {
                continue;
            };
            let stats = st.engine.as_ref().map(|e| e.stats()).unwrap_or_default();
            let (in_flight, queue_depth, rejected) = st
                .admission
                .as_ref()
                .map(|a| (a.in_flight(), a.queue_depth(), a.rejected_total()))
                .unwrap_or((0, 0, 0));
            out.push(ModelHealth {
                id: slot.spec.id.clone(),
                status,
                in_flight,
                queue_depth,
                max_in_flight: slot.spec.max_in_flight,
                max_queue_depth: slot.spec.max_queue_depth,
                rejected_total: st.rejected_base.saturating_add(rejected),
                tokens_generated_total: st.tokens_base.saturating_add(stats.tokens_generated_total),
                tok_s_prefill: stats.tok_s_prefill,
                tok_s_decode: stats.tok_s_decode,
                warning: st.warning.clone(),
            });
        }
        out
    }

    /// The per-model gauges of `/metrics`, for every catalogue model.
    pub fn model_gauges(&self) -> Vec<ModelGauges> {
        self.inner
            .slots
            .iter()
            .map(|slot| {
                let (in_flight, queue_depth, up, engine) = {
                    let st = slot.lock();
                    let (in_flight, queue_depth) = st
                        .admission
                        .as_ref()
                        .map(|a| (a.in_flight(), a.queue_depth()))
                        .unwrap_or((0, 0));
                    (
                        in_flight,
                        queue_depth,
                        st.phase == Phase::Loaded,
                        st.engine.clone(),
                    )
                };
                // /proc is read outside the slot's lock.
                let memory_bytes = match engine {
                    Some(e) if e.info.weights_bytes > 0 => e.info.weights_bytes,
                    Some(e) => process_rss_mb(e.pid).saturating_mul(1024 * 1024),
                    None => 0,
                };
                ModelGauges {
                    id: slot.spec.id.clone(),
                    in_flight,
                    queue_depth,
                    up,
                    memory_bytes,
                }
            })
            .collect()
    }

    /// `/models` entries: loading, loaded and recovering models.
    pub fn model_infos(&self) -> Vec<helexa_protocol::ModelInfo> {
        let mut out = Vec::new();
        for (i, slot) in self.inner.slots.iter().enumerate() {
            let st = slot.lock();
            let status = match st.phase {
                Phase::Loading => ModelStatus::Loading,
                Phase::Loaded => ModelStatus::Loaded,
                Phase::Recovering => ModelStatus::Recovering,
                _ => continue,
            };
            let info = st
                .engine
                .as_ref()
                .map(|e| e.info.clone())
                .or_else(|| st.last_info.clone())
                .unwrap_or_default();
            // The figure `/health` `memory_mb.used` sums (weights + KV
            // cache) when the model has an estimate; else what is known.
            let estimate = self.estimate_of(i);
            let memory_mb = if estimate.total_mb() > 0 {
                estimate.loaded_mb(info.weights_bytes)
            } else if info.weights_bytes > 0 {
                info.weights_bytes.div_ceil(1024 * 1024)
            } else {
                st.engine
                    .as_ref()
                    .map(|e| process_rss_mb(e.pid))
                    .unwrap_or(0)
            };
            let capabilities = if info.capabilities.is_empty() {
                vec!["chat".to_string(), "completions".to_string()]
            } else {
                info.capabilities.clone()
            };
            out.push(helexa_protocol::ModelInfo {
                id: slot.spec.id.clone(),
                status,
                runtime: "candle".to_string(),
                devices: slot.spec.device_indexes(),
                memory_mb,
                limit: helexa_protocol::ModelLimit {
                    context: info.context_length,
                    output: info.max_output_tokens,
                },
                tool_call: capabilities.iter().any(|c| c == "tools"),
                capabilities,
                reasoning: info.reasoning,
                generation_defaults: info
                    .generation_defaults
                    .clone()
                    .filter(|v| v.as_object().is_some_and(|o| !o.is_empty())),
                tokenizer: Some(format!("/models/{}/tokenizer", slot.spec.id)),
            });
        }
        out
    }
}
