//! Logs on stderr and, when an OTLP endpoint is configured, traces exported over OTLP/gRPC.
//!
//! Spans for export use the target [`TRACE_TARGET`]: the log output never shows them, and
//! without an exporter they are disabled at their call sites, so a sidecar that does not
//! trace pays nothing for them. The server span of each request continues the trace of the
//! W3C `traceparent` it came with (Envoy's span, when Envoy traces), and the predictor's
//! spans (`predict`, `queue`, `batch`, `onnxruntime.run`) hang below it.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use http::HeaderMap;
use meshserve_filter_core::graph::{GRAPH_HEADER, STEP_HEADER};
use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

pub use meshserve_predictor::TRACE_TARGET;

/// The log format on stderr (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where and how to export traces (`meshserve serve` flags).
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// Export traces over OTLP/gRPC to this endpoint (e.g. http://127.0.0.1:4317). Without
    /// it, nothing is traced.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported spans. `OTEL_RESOURCE_ATTRIBUTES` adds attributes.
    #[arg(long, default_value = "meshserve", env = "OTEL_SERVICE_NAME")]
    pub otlp_service_name: String,
    /// More resource attributes for exported spans: KEY=VALUE,KEY=VALUE (added to
    /// `OTEL_RESOURCE_ATTRIBUTES`).
    #[arg(long, value_parser = parse_attributes, default_value = "")]
    pub otlp_resource: Attributes,
    /// The share of new traces (requests without a sampled `traceparent`) to record, 0 to 1.
    /// A request whose `traceparent` says sampled (or not) is followed as it says.
    #[arg(long, default_value_t = 1.0, value_parser = parse_ratio)]
    pub trace_sampling: f64,
    /// How long finished spans wait before they are sent (OTLP batches).
    #[arg(long, default_value_t = 1000)]
    pub otlp_export_interval_ms: u64,
    /// Finished spans waiting to be sent; beyond it, new ones are dropped (the exporter
    /// cannot keep up, or the collector is away).
    #[arg(long, default_value_t = 65_536)]
    pub otlp_max_queued_spans: usize,
}

/// Resource attributes given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes(pub Vec<(String, String)>);

fn parse_attributes(text: &str) -> Result<Attributes, String> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(format!("'{pair}' is not KEY=VALUE")),
        })
        .collect::<Result<_, _>>()
        .map(Attributes)
}

pub fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("'{text}' is not a ratio between 0 and 1")),
    }
}

/// Spans per OTLP export request (the SDK's default is 512; larger batches cost fewer calls
/// at high request rates).
const EXPORT_BATCH_SPANS: usize = 4096;

/// Keeps the exporter running; dropping it sends the spans still waiting.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "traces not all exported at exit");
        }
    }
}

/// Sets up logging on stderr (filtered by `RUST_LOG`, default `info`) and, when `traces`
/// names an endpoint, the OTLP exporter. Call it inside the Tokio runtime: the exporter's
/// gRPC channel runs on it.
pub fn init(format: LogFormat, traces: Option<&TraceArgs>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(
            format!("{TRACE_TARGET}=off")
                .parse()
                .map_err(|e| format!("log filter: {e}"))?,
        );
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Json => logs.json().with_filter(filter).boxed(),
        LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
    };
    let provider = match traces.and_then(|t| t.otlp_endpoint.as_deref().map(|e| (t, e))) {
        Some((args, endpoint)) => {
            let provider = provider(args, endpoint)?;
            let _ = SAMPLING.set(args.trace_sampling);
            Some(provider)
        }
        None => None,
    };
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("meshserve"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(TRACE_TARGET, tracing::Level::TRACE),
            )
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .map_err(|e| format!("logging: {e}"))?;
    if let Some(args) = traces
        && let Some(endpoint) = &args.otlp_endpoint
    {
        tracing::info!(%endpoint, service = %args.otlp_service_name, sampling = args.trace_sampling, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

fn provider(args: &TraceArgs, endpoint: &str) -> Result<SdkTracerProvider, String> {
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
    let batches = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(args.otlp_export_interval_ms))
                .with_max_queue_size(args.otlp_max_queued_spans)
                .with_max_export_batch_size(EXPORT_BATCH_SPANS.min(args.otlp_max_queued_spans))
                .build(),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batches)
        // The sidecar decides which requests it traces (`traced`); what it records is kept.
        .with_sampler(Sampler::AlwaysOn)
        .with_resource(
            Resource::builder()
                .with_service_name(args.otlp_service_name.clone())
                .with_attributes(
                    args.otlp_resource
                        .0
                        .iter()
                        .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
                )
                .build(),
        )
        .build())
}

/// The share of new traces to record, set once an exporter runs; unset: nothing is traced.
static SAMPLING: OnceLock<f64> = OnceLock::new();

/// Whether a request with these headers is traced: as its `traceparent` says, else at the
/// configured ratio. The decision is made once, here: an untraced request creates no spans
/// at all, in the sidecar or the predictor.
fn traced(headers: &HeaderMap) -> Option<opentelemetry::Context> {
    let ratio = *SAMPLING.get()?;
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let remote = parent.span().span_context().clone();
    let sampled = if remote.is_valid() {
        remote.is_sampled()
    } else {
        ratio >= 1.0 || (ratio > 0.0 && random_unit() < ratio)
    };
    sampled.then_some(parent)
}

/// A number in [0, 1) from the standard library's per-process random keys.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The server span of one request, continuing the trace its `traceparent` names; none when
/// the request is not traced.
pub fn server_span(method: &http::Method, path: &str, headers: &HeaderMap) -> tracing::Span {
    let Some(parent) = traced(headers) else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "request",
        otel.name = %format_args!("{method} {path}"),
        otel.kind = "server",
        http.request.method = %method,
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        meshserve.graph = tracing::field::Empty,
        meshserve.graph.step = tracing::field::Empty,
    );
    // A step of an InferenceGraph run by the router filter: which graph, which step (the
    // filter sets these on its own calls only and strips them from clients' requests).
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let (Some(graph), Some(step)) = (header(GRAPH_HEADER), header(STEP_HEADER)) {
        span.record("meshserve.graph", graph);
        span.record("meshserve.graph.step", step);
    }
    let _ = span.set_parent(parent);
    span
}

/// Records the answer's status on a server span (`ERROR` for 5xx, as OpenTelemetry's HTTP
/// conventions say for servers).
pub fn record_status(span: &tracing::Span, status: u16) {
    if span.is_none() {
        return;
    }
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// Records a call's gRPC status on its span (`ERROR` for the codes that mean a server fault).
pub fn record_grpc_status(span: &tracing::Span, error: Option<&tonic::Status>) {
    if span.is_none() {
        return;
    }
    let code = error.map_or(tonic::Code::Ok, tonic::Status::code);
    span.record("rpc.grpc.status_code", code as i32);
    if matches!(
        code,
        tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DataLoss
    ) {
        span.record("otel.status_code", "ERROR");
    }
}

/// The gRPC server span of one call (`rpc.system` grpc), continuing the trace of its
/// metadata; none when the call is not traced.
pub fn grpc_span(method: &str, headers: &HeaderMap) -> tracing::Span {
    let Some(parent) = traced(headers) else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "rpc",
        otel.name = %format_args!("inference.GRPCInferenceService/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "inference.GRPCInferenceService",
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let _ = span.set_parent(parent);
    span
}

/// The span of a request's way from body to tensors (parsing, the sidecar's transformer).
pub fn preprocess_span() -> tracing::Span {
    meshserve_predictor::trace_span!(&tracing::Span::current(), "preprocess")
}

/// The span of a response's way from tensors to body.
pub fn postprocess_span() -> tracing::Span {
    meshserve_predictor::trace_span!(&tracing::Span::current(), "postprocess")
}

/// Runs `work` inside `span` and says how long it took.
pub fn timed<T>(span: tracing::Span, work: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let result = span.in_scope(work);
    (result, started.elapsed())
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
