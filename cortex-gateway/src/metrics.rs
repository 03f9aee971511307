//! cortex's Prometheus metrics, registered once, served on `metrics_listen`.
//!
//! Histograms have explicit buckets (never summaries); text exposition is
//! the prometheus crate's encoder, never hand-written.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub ttft: HistogramVec,
    pub tokens_total: IntCounterVec,
    /// `cortex_tokens_total{kind="prompt"}` and `{kind="completion"}`,
    /// looked up once rather than per request.
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub upstream_retries: IntCounter,
    pub prevalidation_rejections: IntCounterVec,
    pub neuron_up: IntGaugeVec,
    pub model_in_flight: IntGaugeVec,
    pub model_queue_depth: IntGaugeVec,
    pub model_loads: IntCounterVec,
    /// `cortex_connections_open`: client connections open now.
    pub connections_open: IntGauge,
    /// `cortex_connections_closed_total{end}`: how client connections
    /// ended (`clean`, `cut`, `timeout`, `refused`).
    pub connections_closed: IntCounterVec,
    /// `cortex_key_rejections_total{key,reason}`: requests refused for a
    /// client key (`unauthenticated`, `model`, `rpm`, `tpm`, `concurrency`).
    pub key_rejections: IntCounterVec,
    /// `cortex_build_info{version,git_sha}` = 1.
    pub build_info: IntGaugeVec,
    /// `cortex_cold_starts_total{model}`: loads a request waited for (its
    /// model had no loaded replica).
    pub cold_starts: IntCounterVec,
    /// `cortex_evictions_total{model,node}`: models unloaded to make room.
    pub evictions: IntCounterVec,
    /// `cortex_model_load_seconds`: how long loads cortex asked for took.
    pub model_load_seconds: prometheus::Histogram,
    /// `cortex_replicas{model}`: loaded replicas on healthy neurons.
    pub replicas: IntGaugeVec,
}

const LOAD_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new(
                "cortex_requests_total",
                "Requests answered, by model, node, status and client key name (`-`: no key)",
            ),
            &["model", "node", "status", "key"],
        )
        .expect("metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "cortex_request_duration_seconds",
                "Time from request to the end of the response (stream included)",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["model"],
        )
        .expect("metric");
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "cortex_time_to_first_token_seconds",
                "Time from request to the first content token",
            )
            .buckets(TTFT_BUCKETS.to_vec()),
            &["model"],
        )
        .expect("metric");
        let tokens_total = IntCounterVec::new(
            Opts::new("cortex_tokens_total", "Tokens reported by upstream usage"),
            &["kind"],
        )
        .expect("metric");
        let upstream_retries = IntCounter::new(
            "cortex_upstream_retries_total",
            "Replicas skipped because they refused before the first byte",
        )
        .expect("metric");
        let prevalidation_rejections = IntCounterVec::new(
            Opts::new(
                "cortex_prevalidation_rejections_total",
                "Requests refused at the edge because the prompt cannot fit",
            ),
            &["model"],
        )
        .expect("metric");
        let neuron_up = IntGaugeVec::new(
            Opts::new("cortex_neuron_up", "1 while the neuron is healthy"),
            &["node"],
        )
        .expect("metric");
        let model_in_flight = IntGaugeVec::new(
            Opts::new(
                "cortex_model_in_flight",
                "Polled in-flight requests per replica",
            ),
            &["model", "node"],
        )
        .expect("metric");
        let model_queue_depth = IntGaugeVec::new(
            Opts::new("cortex_model_queue_depth", "Polled queue depth per replica"),
            &["model", "node"],
        )
        .expect("metric");
        let model_loads = IntCounterVec::new(
            Opts::new(
                "cortex_model_loads_total",
                "On-demand loads cortex asked for, by result",
            ),
            &["model", "node", "result"],
        )
        .expect("metric");
        let connections_open =
            IntGauge::new("cortex_connections_open", "Client connections open now")
                .expect("metric");
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "cortex_connections_closed_total",
                "Client connections closed, by how they ended: clean (between requests), \
                 cut (mid-request or mid-answer), timeout (client_timeout_ms), refused (unreadable request)",
            ),
            &["end"],
        )
        .expect("metric");
        let key_rejections = IntCounterVec::new(
            Opts::new(
                "cortex_key_rejections_total",
                "Requests refused by client-key checks, by key name and reason",
            ),
            &["key", "reason"],
        )
        .expect("metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "cortex_build_info",
                "Always 1; the build's version and git sha",
            ),
            &["version", "git_sha"],
        )
        .expect("metric");
        let cold_starts = IntCounterVec::new(
            Opts::new(
                "cortex_cold_starts_total",
                "Loads that requests waited for because their model had no loaded replica",
            ),
            &["model"],
        )
        .expect("metric");
        let evictions = IntCounterVec::new(
            Opts::new(
                "cortex_evictions_total",
                "Models unloaded from a node to make room for another",
            ),
            &["model", "node"],
        )
        .expect("metric");
        let model_load_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "cortex_model_load_seconds",
                "Time from asking a neuron to load a model to its answer (successful loads)",
            )
            .buckets(LOAD_BUCKETS.to_vec()),
        )
        .expect("metric");
        let replicas = IntGaugeVec::new(
            Opts::new("cortex_replicas", "Loaded replicas on healthy neurons"),
            &["model"],
        )
        .expect("metric");
        let v = crate::version::info();
        build_info
            .with_label_values(&[v.version.as_str(), v.git_sha.as_str()])
            .set(1);
        for c in [
            Box::new(requests_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(connections_open.clone()),
            Box::new(connections_closed.clone()),
            Box::new(key_rejections.clone()),
            Box::new(build_info.clone()),
            Box::new(request_duration.clone()),
            Box::new(ttft.clone()),
            Box::new(tokens_total.clone()),
            Box::new(upstream_retries.clone()),
            Box::new(prevalidation_rejections.clone()),
            Box::new(neuron_up.clone()),
            Box::new(model_in_flight.clone()),
            Box::new(model_queue_depth.clone()),
            Box::new(model_loads.clone()),
            Box::new(cold_starts.clone()),
            Box::new(evictions.clone()),
            Box::new(model_load_seconds.clone()),
            Box::new(replicas.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Metrics {
            registry,
            requests_total,
            request_duration,
            ttft,
            prompt_tokens: tokens_total.with_label_values(&["prompt"]),
            completion_tokens: tokens_total.with_label_values(&["completion"]),
            tokens_total,
            upstream_retries,
            prevalidation_rejections,
            neuron_up,
            model_in_flight,
            model_queue_depth,
            model_loads,
            connections_open,
            connections_closed,
            key_rejections,
            build_info,
            cold_starts,
            evictions,
            model_load_seconds,
            replicas,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8 exposition")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_have_explicit_buckets() {
        let m = Metrics::new();
        m.request_duration.with_label_values(&["m"]).observe(0.003);
        let text = m.render();
        assert!(text.contains("cortex_request_duration_seconds_bucket{model=\"m\",le=\"0.005\"} 1"));
        assert!(
            text.contains("cortex_request_duration_seconds_bucket{model=\"m\",le=\"0.0025\"} 0")
        );
    }
}
