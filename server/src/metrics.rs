//! Prometheus metrics, served at `/metrics`. Every generation metric has a
//! `model` label; names follow the `fusechat_` prefix.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    pub e2e_latency: HistogramVec,
    pub queue_time: HistogramVec,
    pub requests_running: IntGaugeVec,
    pub requests_waiting: IntGaugeVec,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub requests_finished: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Admin loads by model and result (`ok`, `failed`, `forbidden`).
    pub model_loads: IntCounterVec,
    pub model_load_seconds: HistogramVec,
    pub model_unloads: IntCounterVec,
    pub alias_swaps: IntCounterVec,
    /// 1 per alias, labelled with the model it points at and its weights' fingerprint.
    pub alias_info: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["model"]).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        Self {
            registry: registry.clone(),
            time_to_first_token: histogram(
                "fusechat_time_to_first_token_seconds",
                "Time from accepting a request to its first generated token (queue and prefill included).",
                LATENCY_BUCKETS,
                &["model"],
            ),
            inter_token_latency: histogram(
                "fusechat_inter_token_latency_seconds",
                "Time between two streamed pieces of one choice.",
                TOKEN_BUCKETS,
                &["model"],
            ),
            e2e_latency: histogram(
                "fusechat_e2e_request_latency_seconds",
                "Time from accepting a request to its last token.",
                LATENCY_BUCKETS,
                &["model"],
            ),
            queue_time: histogram(
                "fusechat_request_queue_time_seconds",
                "Time a request waited for a seat in the running batch.",
                LATENCY_BUCKETS,
                &["model"],
            ),
            requests_running: gauge(
                "fusechat_num_requests_running",
                "Sequences in the model's running batch.",
            ),
            requests_waiting: gauge(
                "fusechat_num_requests_waiting",
                "Sequences waiting for a seat in the running batch.",
            ),
            prompt_tokens: counter(
                "fusechat_prompt_tokens_total",
                "Prompt tokens processed.",
                &["model"],
            ),
            generation_tokens: counter(
                "fusechat_generation_tokens_total",
                "Tokens generated.",
                &["model"],
            ),
            requests_finished: counter(
                "fusechat_request_success_total",
                "Finished choices by finish reason (stop, length, cancelled, error).",
                &["model", "finish_reason"],
            ),
            http_requests: counter(
                "fusechat_http_requests_total",
                "HTTP requests by route, method and status.",
                &["route", "method", "status"],
            ),
            http_duration: histogram(
                "fusechat_http_request_duration_seconds",
                "HTTP request handling time until the response head is sent.",
                LATENCY_BUCKETS,
                &["route", "method"],
            ),
            model_loads: counter(
                "fusechat_model_loads_total",
                "Models loaded through the admin API, by result (ok, failed, forbidden).",
                &["model", "result"],
            ),
            model_load_seconds: histogram(
                "fusechat_model_load_seconds",
                "Time to load a model through the admin API.",
                LATENCY_BUCKETS,
                &["model"],
            ),
            model_unloads: counter(
                "fusechat_model_unloads_total",
                "Models unloaded through the admin API.",
                &["model"],
            ),
            alias_swaps: counter(
                "fusechat_alias_swaps_total",
                "Times an alias was pointed at a model.",
                &["alias"],
            ),
            alias_info: {
                let g = IntGaugeVec::new(
                    Opts::new("fusechat_alias_info", "1 per alias, labelled with its model and that model's weights fingerprint."),
                    &["alias", "model", "fingerprint"],
                )
                .expect("valid gauge");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
        }
    }

    /// Makes a model's series exist (at zero) as soon as it is configured.
    pub fn register_model(&self, model: &str) {
        self.requests_running.with_label_values(&[model]).set(0);
        self.requests_waiting.with_label_values(&[model]).set(0);
        self.prompt_tokens.with_label_values(&[model]);
        self.generation_tokens.with_label_values(&[model]);
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding of metrics");
        String::from_utf8(buffer).expect("metrics are UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_metrics_carry_the_model_label() {
        let metrics = Metrics::new();
        metrics.register_model("m1");
        metrics.generation_tokens.with_label_values(&["m1"]).inc_by(5);
        metrics.time_to_first_token.with_label_values(&["m1"]).observe(0.2);
        let text = metrics.render();
        assert!(text.contains("fusechat_generation_tokens_total{model=\"m1\"} 5"), "{text}");
        assert!(text.contains("fusechat_time_to_first_token_seconds_bucket{model=\"m1\",le=\"0.25\"} 1"));
        assert!(text.contains("fusechat_num_requests_running{model=\"m1\"} 0"));
    }
}
