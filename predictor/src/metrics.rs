//! Prometheus metrics for inference, per model and version. The names follow Triton's
//! (`nv_inference_*`) with a `meshserve_` prefix, so dashboards translate one to one:
//!
//! | metric | type | Triton's | what |
//! |---|---|---|---|
//! | `meshserve_inference_request_success_total` | counter | `nv_inference_request_success` | requests answered |
//! | `meshserve_inference_request_failure_total{reason}` | counter | `nv_inference_request_failure` | requests failed: `invalid_input`, `queue_full`, `timeout`, `runtime` |
//! | `meshserve_inference_count_total` | counter | `nv_inference_count` | rows inferred (a request of batch 8 counts 8) |
//! | `meshserve_inference_exec_count_total` | counter | `nv_inference_exec_count` | model executions (one per batch) |
//! | `meshserve_inference_queue_duration_seconds` | histogram | `nv_inference_queue_duration_us` | time a request waited for a batch and an instance |
//! | `meshserve_inference_compute_duration_seconds` | histogram | `nv_inference_compute_infer_duration_us` | time of one execution |
//! | `meshserve_inference_batch_size` | histogram | (Triton's batch statistics) | rows per execution |
//! | `meshserve_inference_pending_request_count` | gauge | `nv_inference_pending_request_count` | requests queued now |
//!
//! Every metric above has the labels `model` and `version`. Beside them, KServe's model-server
//! histograms under KServe's names and labels (`model_name`, plus `model_version`), so KServe
//! dashboards and alerts read meshserve unchanged:
//!
//! | metric | type | what |
//! |---|---|---|
//! | `request_preprocess_seconds` | histogram | request body to tensors: parsing, and the sidecar's transformer when it runs |
//! | `request_predict_seconds` | histogram | the model's part: validation, queue, execution, splitting |
//! | `request_postprocess_seconds` | histogram | outputs to the response body (and the transformer's response steps) |
//! | `request_explain_seconds` | histogram | one explain request, all its explanations (the built-in explainer's model runs are in `request_predict_seconds` too) |
//!
//! And the repository's state, read at each scrape: `meshserve_models_loaded` (model
//! versions ready) and `meshserve_model_ready{model,version}` (1 ready).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why a request failed, as the `reason` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    InvalidInput,
    QueueFull,
    Timeout,
    Runtime,
}

impl FailureReason {
    fn label(self) -> &'static str {
        match self {
            FailureReason::InvalidInput => "invalid_input",
            FailureReason::QueueFull => "queue_full",
            FailureReason::Timeout => "timeout",
            FailureReason::Runtime => "runtime",
        }
    }
}

/// The metric families, registered on one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    success: IntCounterVec,
    failure: IntCounterVec,
    count: IntCounterVec,
    exec_count: IntCounterVec,
    queue: HistogramVec,
    compute: HistogramVec,
    batch_size: HistogramVec,
    pending: IntGaugeVec,
    preprocess: HistogramVec,
    predict: HistogramVec,
    postprocess: HistogramVec,
    explain: HistogramVec,
    loaded: IntGauge,
    ready: IntGaugeVec,
}

const LABELS: [&str; 2] = ["model", "version"];
/// KServe's label for the model, and the version beside it.
const KSERVE_LABELS: [&str; 2] = ["model_name", "model_version"];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, Box::new(c.clone()), name);
            c
        };
        let histogram_with = |name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, Box::new(h.clone()), name);
            h
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            histogram_with(name, help, buckets, &LABELS)
        };
        let seconds = vec![
            25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
            0.25, 0.5, 1.0, 2.5,
        ];
        let failure_labels = ["model", "version", "reason"];
        let pending = IntGaugeVec::new(
            Opts::new(
                "meshserve_inference_pending_request_count",
                "Inference requests waiting in the queue",
            ),
            &LABELS,
        )
        .unwrap_or_else(|e| unreachable_metric("pending", e));
        register(&registry, Box::new(pending.clone()), "pending");
        let loaded = IntGauge::new("meshserve_models_loaded", "Model versions ready to serve")
            .unwrap_or_else(|e| unreachable_metric("loaded", e));
        register(&registry, Box::new(loaded.clone()), "loaded");
        let ready = IntGaugeVec::new(
            Opts::new(
                "meshserve_model_ready",
                "1 when the model version is ready to serve",
            ),
            &LABELS,
        )
        .unwrap_or_else(|e| unreachable_metric("ready", e));
        register(&registry, Box::new(ready.clone()), "ready");
        Metrics {
            preprocess: histogram_with(
                "request_preprocess_seconds",
                "Pre-processing latency: request body to tensors (KServe's name)",
                seconds.clone(),
                &KSERVE_LABELS,
            ),
            predict: histogram_with(
                "request_predict_seconds",
                "Prediction latency: validation, queue, execution (KServe's name)",
                seconds.clone(),
                &KSERVE_LABELS,
            ),
            postprocess: histogram_with(
                "request_postprocess_seconds",
                "Post-processing latency: outputs to the response body (KServe's name)",
                seconds.clone(),
                &KSERVE_LABELS,
            ),
            explain: histogram_with(
                "request_explain_seconds",
                "Explain request latency (KServe's name)",
                vec![
                    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ],
                &KSERVE_LABELS,
            ),
            loaded,
            ready,
            success: counter(
                "meshserve_inference_request_success_total",
                "Inference requests answered",
                &LABELS,
            ),
            failure: counter(
                "meshserve_inference_request_failure_total",
                "Inference requests failed, by reason",
                &failure_labels,
            ),
            count: counter(
                "meshserve_inference_count_total",
                "Rows inferred (a request of batch N counts N)",
                &LABELS,
            ),
            exec_count: counter(
                "meshserve_inference_exec_count_total",
                "Model executions (one per batch)",
                &LABELS,
            ),
            queue: histogram(
                "meshserve_inference_queue_duration_seconds",
                "Time a request waited for a batch and an instance",
                seconds.clone(),
            ),
            compute: histogram(
                "meshserve_inference_compute_duration_seconds",
                "Time of one model execution",
                seconds,
            ),
            batch_size: histogram(
                "meshserve_inference_batch_size",
                "Rows per model execution",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            ),
            pending,
            registry,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "failed to encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Sets the repository gauges from `(model, version)` of every version ready now.
    pub fn set_loaded<'a>(&self, ready: impl IntoIterator<Item = (&'a str, &'a str)>) {
        self.ready.reset();
        let mut count = 0;
        for (model, version) in ready {
            self.ready.with_label_values(&[model, version]).set(1);
            count += 1;
        }
        self.loaded.set(count);
    }

    /// The handles for one model version.
    pub(crate) fn model(&self, model: &str, version: &str) -> ModelMetrics {
        let labels = [model, version];
        ModelMetrics {
            metrics: self.clone(),
            model: model.to_owned(),
            version: version.to_owned(),
            success: self.success.with_label_values(&labels),
            count: self.count.with_label_values(&labels),
            exec_count: self.exec_count.with_label_values(&labels),
            pending: self.pending.with_label_values(&labels),
            queue: self.queue.with_label_values(&labels),
            compute: self.compute.with_label_values(&labels),
            batch_size: self.batch_size.with_label_values(&labels),
            preprocess: self.preprocess.with_label_values(&labels),
            predict: self.predict.with_label_values(&labels),
            postprocess: self.postprocess.with_label_values(&labels),
            explain: self.explain.with_label_values(&labels),
        }
    }
}

pub(crate) fn register(
    registry: &Registry,
    collector: Box<dyn prometheus::core::Collector>,
    name: &str,
) {
    if let Err(e) = registry.register(collector) {
        tracing::error!(metric = name, error = %e, "failed to register a metric");
    }
}

/// Metric definitions are constants; a bad one is a programming error caught by the tests.
#[cold]
pub(crate) fn unreachable_metric<T>(name: &str, error: prometheus::Error) -> T {
    panic!("metric {name} is malformed: {error}")
}

/// One model version's metric handles.
#[derive(Debug, Clone)]
pub(crate) struct ModelMetrics {
    metrics: Metrics,
    model: String,
    version: String,
    success: IntCounter,
    count: IntCounter,
    exec_count: IntCounter,
    pub(crate) pending: IntGauge,
    queue: Histogram,
    compute: Histogram,
    batch_size: Histogram,
    preprocess: Histogram,
    predict: Histogram,
    postprocess: Histogram,
    explain: Histogram,
}

impl ModelMetrics {
    pub(crate) fn succeeded(&self) {
        self.success.inc();
    }

    pub(crate) fn failed(&self, reason: FailureReason) {
        self.metrics
            .failure
            .with_label_values(&[&self.model, &self.version, reason.label()])
            .inc();
    }

    pub(crate) fn preprocessed(&self, seconds: f64) {
        self.preprocess.observe(seconds);
    }

    pub(crate) fn predicted(&self, seconds: f64) {
        self.predict.observe(seconds);
    }

    pub(crate) fn postprocessed(&self, seconds: f64) {
        self.postprocess.observe(seconds);
    }

    pub(crate) fn explained(&self, seconds: f64) {
        self.explain.observe(seconds);
    }

    pub(crate) fn queued_for(&self, seconds: f64) {
        self.queue.observe(seconds);
    }

    pub(crate) fn executed(&self, rows: usize, seconds: f64) {
        self.exec_count.inc();
        self.count.inc_by(rows as u64);
        self.compute.observe(seconds);
        self.batch_size.observe(rows as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_labelled_per_model_and_version() {
        let metrics = Metrics::new();
        let m = metrics.model("digits", "2");
        m.succeeded();
        m.failed(FailureReason::QueueFull);
        m.executed(8, 0.001);
        m.queued_for(0.0002);
        m.predicted(0.003);
        m.preprocessed(0.0001);
        m.explained(0.02);
        metrics.set_loaded([("digits", "2"), ("mnist", "1")]);
        let text = metrics.encode();
        for line in [
            r#"request_predict_seconds_count{model_name="digits",model_version="2"} 1"#,
            r#"request_predict_seconds_bucket{model_name="digits",model_version="2",le="0.005"} 1"#,
            r#"request_preprocess_seconds_count{model_name="digits",model_version="2"} 1"#,
            r#"request_postprocess_seconds_count{model_name="digits",model_version="2"} 0"#,
            r#"request_explain_seconds_count{model_name="digits",model_version="2"} 1"#,
            "meshserve_models_loaded 2",
            r#"meshserve_model_ready{model="mnist",version="1"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        metrics.set_loaded([("mnist", "1")]);
        let text = metrics.encode();
        assert!(text.contains("meshserve_models_loaded 1"), "{text}");
        assert!(
            !text.contains(r#"meshserve_model_ready{model="digits""#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"meshserve_inference_request_success_total{model="digits",version="2"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"meshserve_inference_request_failure_total{model="digits",reason="queue_full",version="2"} 1"#), "{text}");
        assert!(
            text.contains(r#"meshserve_inference_count_total{model="digits",version="2"} 8"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"meshserve_inference_batch_size_bucket{model="digits",version="2",le="8"} 1"#
            ),
            "{text}"
        );
    }
}
