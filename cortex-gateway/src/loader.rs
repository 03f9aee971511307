//! Carries out loads and unloads (docs/protocol.md §5.5, §6): placement
//! decides where, this module evicts, loads, counts and re-polls.
//!
//! Single-flight per model: every caller wanting `model` loaded (held
//! requests, `min_replicas` top-ups, scale-ups, admin calls) shares the one
//! load under way, which runs as its own task so that a client going away
//! does not cancel it for the others. Held requests are bounded in number
//! (`loading.max_waiters`) and time (`loading.timeout_ms`); the load itself
//! goes on until `loading.load_timeout_ms`.

use crate::config::ms;
use crate::placement::{self, Plan, Scope};
use crate::state::Gateway;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use helexa_api::error::{ApiError, ErrorCode, ErrorEnvelope};
use helexa_protocol::ModelRequest;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

type LoadFuture = Shared<BoxFuture<'static, Result<usize, ApiError>>>;

/// Why a load was asked for (it decides what is counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A request found no loaded replica (a cold start).
    Request,
    /// A `min_replicas` floor is not met.
    MinReplicas,
    /// Every replica has been queued for `scale_up_after_secs`.
    ScaleUp,
    /// `POST /admin/models/{id}/load`.
    Admin,
}

struct Flight {
    fut: LoadFuture,
    /// Requests holding for this load now.
    waiters: Arc<AtomicUsize>,
}

#[derive(Default)]
pub struct Loader {
    inflight: Mutex<HashMap<String, Flight>>,
    /// MiB promised per node to loads whose effect the last poll does not
    /// show yet, so that two loads of different models do not both count
    /// on the same free memory.
    reserved: Mutex<HashMap<usize, u64>>,
    /// Held while a placement is decided and reserved (never across I/O).
    placing: Mutex<()>,
    /// `(model, node)` unloads under way, so that the autoscaler does not
    /// ask twice while the first is draining.
    unloading: Mutex<std::collections::HashSet<(String, usize)>>,
}

/// Gives a reservation back when the load is over (success or not).
struct Reservation<'a> {
    loader: &'a Loader,
    node: usize,
    mb: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut r = lock(&self.loader.reserved);
        if let Some(v) = r.get_mut(&self.node) {
            *v = v.saturating_sub(self.mb);
            if *v == 0 {
                r.remove(&self.node);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a held request until dropped.
struct Waiter(Arc<AtomicUsize>);

impl Drop for Waiter {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Loader {
    /// Whether a load of `model` is under way.
    pub fn loading(&self, model: &str) -> bool {
        lock(&self.inflight).contains_key(model)
    }

    /// Joins the load of `model` under way, or starts one (on `node` when
    /// given), and returns the future of its outcome and its waiter count.
    fn flight(
        &self,
        gw: &Arc<Gateway>,
        model: &str,
        why: Why,
        node: Option<usize>,
    ) -> (LoadFuture, Arc<AtomicUsize>) {
        let mut map = lock(&self.inflight);
        if let Some(f) = map.get(model) {
            return (f.fut.clone(), f.waiters.clone());
        }
        let gw2 = gw.clone();
        let id = model.to_string();
        let task = tokio::spawn(async move {
            let res = run_load(&gw2, &id, why, node).await;
            lock(&gw2.loader.inflight).remove(&id);
            res
        });
        let fut: LoadFuture = async move {
            task.await.unwrap_or_else(|e| {
                Err(ApiError::new(
                    ErrorCode::InternalError,
                    format!("load task failed: {e}"),
                ))
            })
        }
        .boxed()
        .shared();
        let waiters = Arc::new(AtomicUsize::new(0));
        map.insert(
            model.to_string(),
            Flight {
                fut: fut.clone(),
                waiters: waiters.clone(),
            },
        );
        (fut, waiters)
    }

    /// Loads `model` (or joins the load under way) for a control-plane
    /// caller and returns the index of the neuron that loaded it. Must run
    /// on the main runtime.
    pub async fn load(
        &self,
        gw: &Arc<Gateway>,
        model: &str,
        why: Why,
        node: Option<usize>,
    ) -> Result<usize, ApiError> {
        self.flight(gw, model, why, node).0.await
    }

    /// A request holding for `model`: joins or starts its load, within
    /// `loading.max_waiters` and `loading.timeout_ms` (each refusal is
    /// `503 model_loading` with `Retry-After`). Must run on the main runtime.
    pub async fn hold(&self, gw: &Arc<Gateway>, model: &str) -> Result<usize, ApiError> {
        let cfg = &gw.config.loading;
        let (fut, waiters) = self.flight(gw, model, Why::Request, None);
        if waiters.fetch_add(1, Ordering::Relaxed) >= cfg.max_waiters {
            waiters.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::new(
                ErrorCode::ModelLoading,
                format!(
                    "`{model}` is loading and {} requests already wait for it (loading.max_waiters)",
                    cfg.max_waiters
                ),
            )
            .with_retry_after(5));
        }
        let _waiter = Waiter(waiters);
        match tokio::time::timeout(ms(cfg.timeout_ms), fut).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::new(
                ErrorCode::ModelLoading,
                format!(
                    "`{model}` is still loading after {} ms (loading.timeout_ms)",
                    cfg.timeout_ms
                ),
            )
            .with_retry_after(retry_secs(cfg.timeout_ms))),
        }
    }

    /// Decides where `model` goes and reserves its memory there.
    fn place(
        &self,
        gw: &Gateway,
        model: &str,
        why: Why,
        node: Option<usize>,
    ) -> Result<(Plan, Reservation<'_>), ApiError> {
        let _placing = lock(&self.placing);
        let snap = gw.fleet.snapshot();
        // A request for a model some node is loading already (its own
        // preload, or another cortex's load) waits for that one.
        if why == Why::Request && node.is_none() {
            if let Some(i) = snap
                .nodes
                .iter()
                .position(|v| v.healthy && v.loading(model))
            {
                return Ok((
                    Plan::Fits {
                        node: i,
                        need_mb: 0,
                    },
                    Reservation {
                        loader: self,
                        node: i,
                        mb: 0,
                    },
                ));
            }
        }
        let policy = gw.policy();
        let reserved = lock(&self.reserved).clone();
        let plan = placement::plan(
            &gw.fleet,
            &snap,
            &policy,
            model,
            Scope {
                only: node,
                reserved: Some(&reserved),
            },
        )?;
        let (i, mb) = (plan.node(), plan.need_mb());
        *lock(&self.reserved).entry(i).or_default() += mb;
        Ok((
            plan,
            Reservation {
                loader: self,
                node: i,
                mb,
            },
        ))
    }
}

/// `Retry-After` for a load still under way: a tenth of the wait, 1..=30 s.
fn retry_secs(timeout_ms: u64) -> u64 {
    (timeout_ms / 10_000).clamp(1, 30)
}

async fn run_load(
    gw: &Arc<Gateway>,
    model: &str,
    why: Why,
    node: Option<usize>,
) -> Result<usize, ApiError> {
    let (plan, reservation) = match gw.loader.place(gw, model, why, node) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(model, why = ?why, code = e.code.as_str(), error = %e.message, "no placement");
            return Err(e);
        }
    };
    let idx = plan.node();
    let neuron = &gw.fleet.neurons[idx];
    if let Plan::Evict { victims, .. } = &plan {
        for victim in victims {
            tracing::info!(model, victim = %victim, node = %neuron.name, "evicting to make room");
            unload_raw(gw, idx, victim).await.map_err(|e| {
                ApiError::new(
                    ErrorCode::NoCapacity,
                    format!(
                        "could not evict `{victim}` from `{}` to load `{model}`: {}",
                        neuron.name, e.message
                    ),
                )
                .with_retry_after(5)
            })?;
            gw.metrics
                .evictions
                .with_label_values(&[victim.as_str(), neuron.name.as_str()])
                .inc();
        }
        crate::poller::refresh_node(gw, idx).await;
    }
    tracing::info!(model, node = %neuron.name, why = ?why, "loading model");
    let started = Instant::now();
    let result = post_lifecycle(gw, idx, "load", model).await;
    let label = if result.is_ok() { "ok" } else { "error" };
    gw.metrics
        .model_loads
        .with_label_values(&[model, neuron.name.as_str(), label])
        .inc();
    match &result {
        Ok(()) => {
            gw.metrics
                .model_load_seconds
                .observe(started.elapsed().as_secs_f64());
            if why == Why::Request {
                gw.metrics.cold_starts.with_label_values(&[model]).inc();
            }
            // A new replica starts its idle clock at its load.
            neuron.replica(model).touch();
            crate::poller::refresh_node(gw, idx).await;
        }
        Err(e) => {
            tracing::warn!(model, node = %neuron.name, code = e.code.as_str(), error = %e.message, "load failed")
        }
    }
    drop(reservation);
    result.map(|()| idx)
}

/// Unloads `model` from neuron `idx` (in-flight work there finishes first)
/// and re-polls it. Must run on the main runtime.
pub async fn unload(gw: &Arc<Gateway>, idx: usize, model: &str) -> Result<(), ApiError> {
    let key = (model.to_string(), idx);
    if !lock(&gw.loader.unloading).insert(key.clone()) {
        return Ok(()); // the same unload is under way
    }
    let r = unload_raw(gw, idx, model).await;
    crate::poller::refresh_node(gw, idx).await;
    lock(&gw.loader.unloading).remove(&key);
    r
}

impl Loader {
    /// Whether some unload of `model` is under way.
    pub fn unloading(&self, model: &str) -> bool {
        lock(&self.unloading).iter().any(|(m, _)| m == model)
    }
}

async fn unload_raw(gw: &Arc<Gateway>, idx: usize, model: &str) -> Result<(), ApiError> {
    tracing::info!(model, node = %gw.fleet.neurons[idx].name, "unloading model");
    post_lifecycle(gw, idx, "unload", model).await
}

/// `POST /models/{load,unload}` on neuron `idx`; errors keep the neuron's
/// code where cortex passes it on (`507 insufficient_memory`).
async fn post_lifecycle(gw: &Gateway, idx: usize, op: &str, model: &str) -> Result<(), ApiError> {
    let neuron = &gw.fleet.neurons[idx];
    let timeout = gw.config.loading.load_timeout_ms;
    let send = gw
        .control
        .post(format!("{}/models/{op}", neuron.endpoint))
        .timeout(ms(timeout))
        .json(&ModelRequest {
            model: model.to_string(),
        })
        .send();
    match send.await {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            let upstream = serde_json::from_str::<ErrorEnvelope>(&text)
                .map(|e| e.error.message)
                .unwrap_or_else(|_| text.chars().take(300).collect());
            let message = format!(
                "neuron `{}` could not {op} `{model}`: HTTP {status}: {upstream}",
                neuron.name
            );
            Err(if status.as_u16() == 507 {
                ApiError::new(ErrorCode::InsufficientMemory, message)
            } else {
                ApiError::new(ErrorCode::NoCapacity, message).with_retry_after(5)
            })
        }
        Err(e) if e.is_timeout() => Err(ApiError::new(
            ErrorCode::ModelLoading,
            format!(
                "neuron `{}` did not finish {op}ing `{model}` within {timeout} ms (loading.load_timeout_ms)",
                neuron.name
            ),
        )
        .with_retry_after(10)),
        Err(e) => Err(ApiError::new(
            ErrorCode::NoCapacity,
            format!(
                "neuron `{}` could not be asked to {op} `{model}`: {e}",
                neuron.name
            ),
        )
        .with_retry_after(5)),
    }
}
