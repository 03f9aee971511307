//! The agent's Prometheus metrics (`neuron_*`), served as text on their own
//! listener (`metrics_listen`, docs/protocol.md §8).
//!
//! Counters and histograms are updated where things happen (admission, the
//! relay of an engine's answer, the supervisor); gauges are set from the
//! registry's cached state when `/metrics` is scraped, so nothing on a
//! request path keeps them up to date. Histograms have explicit buckets
//! (never summaries) and the text is the prometheus crate's encoder.

use helexa_api::VersionInfo;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::time::Duration;

/// `model` label of requests whose `model` is not in the catalogue (or
/// could not be read): client input never becomes a label value.
pub const UNKNOWN_MODEL: &str = "_unknown";

const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
];
const LOAD_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Why a request was refused (`neuron_requests_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// `max_queue_depth` requests were already waiting.
    QueueFull,
    /// No slot freed within `max_wait_secs`.
    WaitTimeout,
    /// The model is loading or its engine is being restarted.
    Loading,
    /// The model is in the catalogue but not loaded.
    NotLoaded,
    /// The agent is draining or the model is being unloaded.
    ShuttingDown,
    /// The model failed, or its engine could not be reached or died.
    EngineUnavailable,
    /// The engine sent no response head within `engine_first_byte_timeout_secs`.
    UpstreamTimeout,
}

impl RefuseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::QueueFull => "queue_full",
            RefuseReason::WaitTimeout => "wait_timeout",
            RefuseReason::Loading => "loading",
            RefuseReason::NotLoaded => "not_loaded",
            RefuseReason::ShuttingDown => "shutting_down",
            RefuseReason::EngineUnavailable => "engine_unavailable",
            RefuseReason::UpstreamTimeout => "upstream_timeout",
        }
    }

    pub const ALL: [RefuseReason; 7] = [
        RefuseReason::QueueFull,
        RefuseReason::WaitTimeout,
        RefuseReason::Loading,
        RefuseReason::NotLoaded,
        RefuseReason::ShuttingDown,
        RefuseReason::EngineUnavailable,
        RefuseReason::UpstreamTimeout,
    ];
}

/// Why a health check of a running engine failed
/// (`neuron_engine_health_failures_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthFailure {
    /// `/health` did not answer within `engine_health_timeout_ms`.
    Timeout,
    /// `/health` answered with an error, or the connection failed.
    Error,
    /// Requests were running but no response byte came for
    /// `engine_stall_timeout_secs`.
    Stalled,
}

impl HealthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthFailure::Timeout => "timeout",
            HealthFailure::Error => "error",
            HealthFailure::Stalled => "stalled",
        }
    }
}

/// The gauges of one catalogue model, read from the registry at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelGauges {
    pub id: String,
    pub in_flight: u32,
    pub queue_depth: u32,
    /// True while the model is `loaded`.
    pub up: bool,
    pub memory_bytes: u64,
}

/// Every `neuron_*` metric; one per agent, shared through an `Arc`.
pub struct Metrics {
    registry: Registry,
    in_flight: IntGaugeVec,
    queue_depth: IntGaugeVec,
    pub admitted: IntCounterVec,
    refused: IntCounterVec,
    requests: IntCounterVec,
    duration: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub cached_prompt_tokens: IntCounterVec,
    pub generated_tokens: IntCounterVec,
    ttft: HistogramVec,
    inter_token: HistogramVec,
    pub engine_restarts: IntCounterVec,
    health_failures: IntCounterVec,
    load_seconds: HistogramVec,
    memory_bytes: IntGaugeVec,
    model_up: IntGaugeVec,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
}
fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge")
}
fn histogram(name: &str, help: &str, buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        &["model"],
    )
    .expect("valid histogram")
}

impl Metrics {
    /// Registers every metric. Per-model series of the catalogue's `models`
    /// start at zero, so that rates and alerts see them before the first
    /// event.
    pub fn new(models: &[String], build: &VersionInfo) -> Metrics {
        let m = Metrics {
            registry: Registry::new(),
            in_flight: gauge(
                "neuron_model_in_flight",
                "Requests of the model running in its engine",
                &["model"],
            ),
            queue_depth: gauge(
                "neuron_model_queue_depth",
                "Requests of the model waiting for an admission slot",
                &["model"],
            ),
            admitted: counter(
                "neuron_requests_admitted_total",
                "Requests admitted and forwarded to the model's engine",
                &["model"],
            ),
            refused: counter(
                "neuron_requests_refused_total",
                "Requests refused before or instead of an engine answer, by reason",
                &["model", "reason"],
            ),
            requests: counter(
                "neuron_requests_total",
                "Inference requests answered, by HTTP status of the answer",
                &["model", "status"],
            ),
            duration: histogram(
                "neuron_request_duration_seconds",
                "Time from the request's arrival to the end of its answer (stream included)",
                DURATION_BUCKETS,
            ),
            prompt_tokens: counter(
                "neuron_prompt_tokens_total",
                "Prompt tokens, from the usage of the engines' answers",
                &["model"],
            ),
            cached_prompt_tokens: counter(
                "neuron_prompt_tokens_cached_total",
                "Prompt tokens served from the engines' prefix caches, from the usage of their answers",
                &["model"],
            ),
            generated_tokens: counter(
                "neuron_generated_tokens_total",
                "Generated tokens, from the usage of the engines' answers",
                &["model"],
            ),
            ttft: histogram(
                "neuron_time_to_first_token_seconds",
                "Time from a streamed request's arrival to its first content chunk",
                TTFT_BUCKETS,
            ),
            inter_token: histogram(
                "neuron_inter_token_latency_seconds",
                "Time between consecutive content chunks of a stream",
                INTER_TOKEN_BUCKETS,
            ),
            engine_restarts: counter(
                "neuron_engine_restarts_total",
                "Engines restarted after dying or being killed as hung",
                &["model"],
            ),
            health_failures: counter(
                "neuron_engine_health_failures_total",
                "Failed health checks of running engines, by reason",
                &["model", "reason"],
            ),
            load_seconds: histogram(
                "neuron_model_load_seconds",
                "Time from engine start to ready, for loads and restarts that succeeded",
                LOAD_BUCKETS,
            ),
            memory_bytes: gauge(
                "neuron_model_memory_bytes",
                "Memory of the loaded model: its weights, else its engine's resident set",
                &["model"],
            ),
            model_up: gauge(
                "neuron_model_up",
                "1 while the model is loaded (status `loaded`), else 0",
                &["model"],
            ),
        };
        let build_info = gauge(
            "neuron_build_info",
            "Always 1; the labels say which build runs",
            &["version", "git_sha"],
        );
        build_info
            .with_label_values(&[build.version.as_str(), build.git_sha.as_str()])
            .set(1);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.in_flight.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.admitted.clone()),
            Box::new(m.refused.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.duration.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.cached_prompt_tokens.clone()),
            Box::new(m.generated_tokens.clone()),
            Box::new(m.ttft.clone()),
            Box::new(m.inter_token.clone()),
            Box::new(m.engine_restarts.clone()),
            Box::new(m.health_failures.clone()),
            Box::new(m.load_seconds.clone()),
            Box::new(m.memory_bytes.clone()),
            Box::new(m.model_up.clone()),
            Box::new(build_info),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        for id in models {
            let l = &[id.as_str()];
            for c in [
                &m.admitted,
                &m.prompt_tokens,
                &m.cached_prompt_tokens,
                &m.generated_tokens,
                &m.engine_restarts,
            ] {
                c.with_label_values(l);
            }
            for g in [&m.in_flight, &m.queue_depth, &m.memory_bytes, &m.model_up] {
                g.with_label_values(l);
            }
            for h in [&m.duration, &m.ttft, &m.inter_token, &m.load_seconds] {
                h.with_label_values(l);
            }
        }
        m
    }

    pub fn refused(&self, model: &str, reason: RefuseReason) {
        self.refused
            .with_label_values(&[model, reason.as_str()])
            .inc();
    }

    /// One answered request: its status and its whole duration.
    pub fn answered(&self, model: &str, status: u16, took: Duration) {
        let status = status.to_string();
        self.requests
            .with_label_values(&[model, status.as_str()])
            .inc();
        self.duration
            .with_label_values(&[model])
            .observe(took.as_secs_f64());
    }

    pub fn usage(&self, model: &str, prompt: u64, generated: u64, cached: u64) {
        self.prompt_tokens
            .with_label_values(&[model])
            .inc_by(prompt);
        self.cached_prompt_tokens
            .with_label_values(&[model])
            .inc_by(cached);
        self.generated_tokens
            .with_label_values(&[model])
            .inc_by(generated);
    }

    pub fn first_token(&self, model: &str, after: Duration) {
        self.ttft
            .with_label_values(&[model])
            .observe(after.as_secs_f64());
    }

    pub fn inter_token(&self, model: &str, gap: Duration) {
        self.inter_token
            .with_label_values(&[model])
            .observe(gap.as_secs_f64());
    }

    pub fn health_failure(&self, model: &str, why: HealthFailure) {
        self.health_failures
            .with_label_values(&[model, why.as_str()])
            .inc();
    }

    pub fn loaded_in(&self, model: &str, took: Duration) {
        self.load_seconds
            .with_label_values(&[model])
            .observe(took.as_secs_f64());
    }

    pub fn restarted(&self, model: &str) {
        self.engine_restarts.with_label_values(&[model]).inc();
    }

    /// Sets the per-model gauges from a snapshot of the registry.
    pub fn set_model_gauges(&self, models: &[ModelGauges]) {
        for g in models {
            let l = &[g.id.as_str()];
            self.in_flight.with_label_values(l).set(g.in_flight.into());
            self.queue_depth
                .with_label_values(l)
                .set(g.queue_depth.into());
            self.model_up.with_label_values(l).set(i64::from(g.up));
            self.memory_bytes
                .with_label_values(l)
                .set(i64::try_from(g.memory_bytes).unwrap_or(i64::MAX));
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics");
        String::from_utf8(out).expect("the text encoder writes UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_series_are_exposed() {
        let build = VersionInfo::new("neuron", "0.1.0", "abc123", "", "0.11.1");
        let m = Metrics::new(&["m".to_string()], &build);
        m.refused("m", RefuseReason::QueueFull);
        m.answered("m", 503, Duration::from_millis(3));
        m.usage("m", 5, 7, 4);
        m.set_model_gauges(&[ModelGauges {
            id: "m".into(),
            in_flight: 2,
            queue_depth: 1,
            up: true,
            memory_bytes: 4096,
        }]);
        let text = m.encode();
        for line in [
            "neuron_build_info{git_sha=\"abc123\",version=\"0.1.0\"} 1",
            "neuron_requests_refused_total{model=\"m\",reason=\"queue_full\"} 1",
            "neuron_requests_total{model=\"m\",status=\"503\"} 1",
            "neuron_request_duration_seconds_count{model=\"m\"} 1",
            "neuron_prompt_tokens_total{model=\"m\"} 5",
            "neuron_prompt_tokens_cached_total{model=\"m\"} 4",
            "neuron_generated_tokens_total{model=\"m\"} 7",
            "neuron_model_in_flight{model=\"m\"} 2",
            "neuron_model_queue_depth{model=\"m\"} 1",
            "neuron_model_up{model=\"m\"} 1",
            "neuron_model_memory_bytes{model=\"m\"} 4096",
            "neuron_engine_restarts_total{model=\"m\"} 0",
            "neuron_requests_admitted_total{model=\"m\"} 0",
            "# TYPE neuron_time_to_first_token_seconds histogram",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
