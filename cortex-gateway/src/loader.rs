//! On-demand loading (docs/protocol.md §5.5): when no replica is loaded but a healthy
//! neuron's catalogue has the model, ask one to load it and hold the request.
//!
//! Single-flight per model: concurrent requests share one load, which runs as
//! its own task so a client going away does not cancel it for the others.

use crate::config::ms;
use crate::router;
use crate::state::Gateway;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use helexa_api::error::{ApiError, ErrorCode};
use helexa_protocol::{ModelRequest, ModelStatus};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type LoadFuture = Shared<BoxFuture<'static, Result<usize, ApiError>>>;

#[derive(Default)]
pub struct Loader {
    inflight: Mutex<HashMap<String, LoadFuture>>,
}

impl Loader {
    /// Loads `model` somewhere (or joins the load under way) and returns the
    /// index of the neuron that has it loaded.
    pub async fn load(&self, gw: &Arc<Gateway>, model: &str) -> Result<usize, ApiError> {
        let fut = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(model) {
                Some(f) => f.clone(),
                None => {
                    let gw2 = gw.clone();
                    let id = model.to_string();
                    let task = tokio::spawn(async move {
                        let res = run_load(&gw2, &id).await;
                        gw2.loader
                            .inflight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id);
                        res
                    });
                    let f: LoadFuture = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(ApiError::new(
                                ErrorCode::InternalError,
                                format!("load task failed: {e}"),
                            ))
                        })
                    }
                    .boxed()
                    .shared();
                    map.insert(model.to_string(), f.clone());
                    f
                }
            }
        };
        fut.await
    }
}

/// Picks the neuron: one already loading the model, else `router::placement`.
fn choose(gw: &Gateway, model: &str) -> Option<usize> {
    let snap = gw.fleet.snapshot();
    let loading = snap.nodes.iter().position(|v| {
        v.healthy
            && (v
                .models
                .get(model)
                .is_some_and(|m| m.status == ModelStatus::Loading)
                || v.load
                    .get(model)
                    .is_some_and(|h| h.status == ModelStatus::Loading))
    });
    loading.or_else(|| router::placement(&gw.fleet, &snap, model))
}

async fn run_load(gw: &Arc<Gateway>, model: &str) -> Result<usize, ApiError> {
    let Some(idx) = choose(gw, model) else {
        return Err(ApiError::new(
            ErrorCode::NoCapacity,
            format!("no healthy neuron can load `{model}` now"),
        )
        .with_retry_after(5));
    };
    let neuron = &gw.fleet.neurons[idx];
    let timeout = gw.config.loading.timeout_ms;
    tracing::info!(model, node = %neuron.name, "loading model on demand");
    let url = format!("{}/models/load", neuron.endpoint);
    let send = gw
        .control
        .post(&url)
        .timeout(ms(timeout))
        .json(&ModelRequest {
            model: model.to_string(),
        })
        .send();
    let result = match send.await {
        Ok(resp) if resp.status().is_success() => Ok(idx),
        Ok(resp) => {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            Err(ApiError::new(
                ErrorCode::NoCapacity,
                format!(
                    "neuron `{}` could not load `{model}`: HTTP {status}: {}",
                    neuron.name,
                    text.chars().take(300).collect::<String>()
                ),
            )
            .with_retry_after(5))
        }
        Err(e) if e.is_timeout() => Err(ApiError::new(
            ErrorCode::ModelLoading,
            format!(
                "`{model}` is still loading on `{}` after {timeout} ms",
                neuron.name
            ),
        )
        .with_retry_after(10)),
        Err(e) => Err(ApiError::new(
            ErrorCode::NoCapacity,
            format!(
                "neuron `{}` could not be asked to load `{model}`: {e}",
                neuron.name
            ),
        )
        .with_retry_after(5)),
    };
    let label = if result.is_ok() { "ok" } else { "error" };
    gw.metrics
        .model_loads
        .with_label_values(&[model, neuron.name.as_str(), label])
        .inc();
    if result.is_ok() {
        crate::poller::refresh_node(gw, idx).await;
    } else if let Err(e) = &result {
        tracing::warn!(model, node = %neuron.name, error = %e.message, "on-demand load failed");
    }
    result
}
