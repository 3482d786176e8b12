//! The `meshserve` command line.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use meshserve_predictor::{Device, Repository, Runtime, RuntimeOptions};

use crate::server::{ListenConfig, Server, stop_signal};
use crate::service::{Limits, Service};

/// meshserve: ONNX model serving as a mesh data plane (Open Inference Protocol and KServe V1).
#[derive(Debug, Parser)]
#[command(name = "meshserve", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MESHSERVE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model repository over REST (HTTP/1.1 and h2c) and gRPC.
    Serve(ServeArgs),
    /// Run InferenceServices locally: a predictor sidecar per revision behind Envoy and
    /// meshserve's wasm router, until Ctrl-C.
    Up(UpArgs),
    /// Change a running mesh's traffic split (no restart, no failed request).
    Canary(CanaryArgs),
    /// Write everything InferenceServices need elsewhere: a local Envoy's files, a
    /// docker-compose project, Istio resources (WasmPlugin or EnvoyFilter, Gateway,
    /// VirtualServices) and Kubernetes manifests (Deployments, Services, HPA or KEDA).
    Render(RenderArgs),
    /// Run an InferenceService's transformer on a body read from stdin and print what comes
    /// out: the request the model would get (as JSON), or the answer the client would get.
    /// The same code as the Envoy filter's.
    Transform(TransformArgs),
    /// Receive CloudEvents (payload logs) and append each as a JSON line, like KServe's
    /// message-dumper.
    LogSink(LogSinkArgs),
}

#[derive(Debug, Args)]
pub struct TransformArgs {
    /// A KServe InferenceService YAML file with a `spec.transformer` (or the transformer alone).
    pub file: PathBuf,
    /// Which InferenceService (default: the first with a transformer).
    #[arg(long)]
    pub isvc: Option<String>,
    /// The client's protocol: v1 (`:predict`) or v2 (`/infer`).
    #[arg(long, value_enum, default_value_t = WireArg::V1)]
    pub protocol: WireArg,
    /// Read a model's `/infer` response (JSON) instead of a client's request.
    #[arg(long)]
    pub response: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireArg {
    V1,
    V2,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// A KServe InferenceService YAML file (several, separated by `---`, are fine).
    pub file: PathBuf,
    /// Envoy's listener port.
    #[arg(long, default_value_t = 8080, env = "MESHSERVE_PORT")]
    pub port: u16,
    /// Envoy's listener address. Only loopback unless you say otherwise.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,
    /// Envoy's admin port (0: let the OS pick; always on loopback).
    #[arg(long, default_value_t = 0)]
    pub admin_port: u16,
    /// The Envoy binary. Default: $MESHSERVE_ENVOY, then the set-up script's .venv.
    #[arg(long)]
    pub envoy: Option<PathBuf>,
    /// meshserve_filters.wasm. Default: the workspace's wasm32-wasip1 release build.
    #[arg(long)]
    pub wasm: Option<PathBuf>,
    /// Where the rendered configuration and per-revision repositories go; `meshserve canary`
    /// reads it.
    #[arg(long, default_value = ".meshserve", env = "MESHSERVE_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Envoy worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub envoy_concurrency: usize,
    /// Trace requests, from Envoy through the sidecars, to this OTLP/gRPC collector
    /// (e.g. http://127.0.0.1:4317).
    #[arg(long, env = "MESHSERVE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The share of requests traced, 0 to 1 (a caller's `traceparent` decides for its own).
    #[arg(long, default_value_t = 1.0, value_parser = crate::telemetry::parse_ratio)]
    pub trace_sampling: f64,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("change").required(true).args(["percent", "promote", "rollback"])))]
pub struct CanaryArgs {
    /// The InferenceService.
    pub isvc: String,
    /// The canary's share of traffic, 0 to 100.
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..=100))]
    pub percent: Option<i64>,
    /// Make the canary the default revision.
    #[arg(long)]
    pub promote: bool,
    /// Send the canary no traffic.
    #[arg(long)]
    pub rollback: bool,
    /// Which canary, when there are several (default: the first).
    #[arg(long)]
    pub canary: Option<String>,
    /// The state directory of the running `meshserve up`.
    #[arg(long, default_value = ".meshserve", env = "MESHSERVE_STATE_DIR")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// A KServe InferenceService YAML file (several, separated by `---`, are fine).
    pub file: PathBuf,
    /// The directory to write into: the local Envoy's files, and compose/, istio/,
    /// kubernetes/.
    #[arg(long)]
    pub out: PathBuf,
    /// Envoy's listener port (local and compose).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The local Envoy's admin port.
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
    /// The first local sidecar port: revision i gets REST on BASE+2i and gRPC on BASE+2i+1.
    #[arg(long, default_value_t = 9000)]
    pub upstream_base_port: u16,
    /// The path of meshserve_filters.wasm as the local Envoy will see it.
    #[arg(long, default_value = "meshserve_filters.wasm")]
    pub wasm: PathBuf,
    /// meshserve_filters.wasm on this machine: compose mounts it, and its SHA-256 pins the
    /// EnvoyFilter's download. Default: the workspace's build (then nothing is pinned).
    #[arg(long)]
    pub wasm_file: Option<PathBuf>,
    /// The sidecar's image (built from the repository's Dockerfile).
    #[arg(long, default_value = concat!("ghcr.io/meshserve/meshserve:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// Envoy's image for docker-compose.
    #[arg(long, default_value = "envoyproxy/envoy:v1.40.0")]
    pub envoy_image: String,
    /// The filters' OCI image for Istio's WasmPlugin (scripts/package-wasm.py builds it).
    #[arg(long, default_value = concat!("oci://ghcr.io/meshserve/meshserve-filters:", env!("CARGO_PKG_VERSION")))]
    pub wasm_image: String,
    /// The filters' HTTPS URL for the EnvoyFilter form.
    #[arg(long, default_value = concat!("https://github.com/meshserve/meshserve/releases/download/v", env!("CARGO_PKG_VERSION"), "/meshserve_filters.wasm"))]
    pub wasm_url: String,
    /// An OTLP/gRPC collector: Envoy and the sidecars send their spans there.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// The share of requests traced, 0 to 1 (a caller's `traceparent` decides for its own).
    #[arg(long, default_value_t = 1.0, value_parser = crate::telemetry::parse_ratio)]
    pub trace_sampling: f64,
    /// Prometheus, for KEDA's request-based triggers.
    #[arg(long, default_value = "http://prometheus-operated.monitoring.svc:9090")]
    pub prometheus_url: String,
    /// The PersistentVolumeClaim that holds `file://` models on Kubernetes, at their paths
    /// relative to the InferenceService's file with leading `../` dropped. `pvc://CLAIM/PATH`
    /// names its own.
    #[arg(long, default_value = "meshserve-models")]
    pub models_claim: String,
    /// The Istio ingress gateway's namespace (WasmPlugins, EnvoyFilter and Gateway go there).
    #[arg(long, default_value = "istio-system")]
    pub gateway_namespace: String,
    /// The label that selects the gateway's pods, KEY=VALUE.
    #[arg(long, default_value = "istio=ingressgateway", value_parser = parse_label)]
    pub gateway_selector: (String, String),
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model repository: <dir>/<model>/<version>/model.onnx, optional <dir>/<model>/config.yaml.
    #[arg(
        long,
        env = "MESHSERVE_MODEL_REPOSITORY",
        required_unless_present = "storage",
        conflicts_with = "storage"
    )]
    pub model_repository: Option<PathBuf>,
    /// A KServe storage location instead of a repository: one .onnx file, one model's
    /// directory of versions, or a repository (KServe's /mnt/models in a container).
    #[arg(long, env = "MESHSERVE_STORAGE")]
    pub storage: Option<PathBuf>,
    /// The name one model from --storage is served under (KServe: the InferenceService's).
    #[arg(long, default_value = "model", env = "MESHSERVE_MODEL_NAME")]
    pub model_name: String,
    /// Batch requests to the --storage model as KServe's `batcher` does.
    #[arg(long, requires = "storage")]
    pub batcher: bool,
    /// The batcher's `maxBatchSize` (default 32).
    #[arg(long, requires = "batcher")]
    pub batcher_max_batch_size: Option<u64>,
    /// The batcher's `maxLatency` in milliseconds (default 500).
    #[arg(long, requires = "batcher")]
    pub batcher_max_latency_ms: Option<u64>,
    /// Where the repository for --storage is built (links and a config.yaml). Default: a
    /// directory under the system's temporary directory.
    #[arg(long, env = "MESHSERVE_SCRATCH_DIR")]
    pub scratch_dir: Option<PathBuf>,
    #[command(flatten)]
    pub traces: crate::telemetry::TraceArgs,
    /// Address to listen on. Only loopback unless you say otherwise.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST), env = "MESHSERVE_HOST")]
    pub host: IpAddr,
    /// REST port (0: let the OS pick; the bound address is logged).
    #[arg(long, default_value_t = 8080, env = "MESHSERVE_HTTP_PORT")]
    pub http_port: u16,
    /// gRPC port (0: let the OS pick; the bound address is logged).
    #[arg(long, default_value_t = 8081, env = "MESHSERVE_GRPC_PORT")]
    pub grpc_port: u16,
    /// Where inference runs: cpu, cuda or cuda:N. CUDA fails at start if it is unavailable.
    #[arg(long, default_value = "cpu", env = "MESHSERVE_DEVICE")]
    pub device: Device,
    /// The ONNX Runtime library (libonnxruntime.so). Default: $ORT_DYLIB_PATH, then the
    /// set-up script's .venv.
    #[arg(long, env = "MESHSERVE_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
    /// Threads ONNX Runtime uses within one operator (0: one per core). One by default: the
    /// sidecar runs beside Envoy, parallelism comes from concurrent requests and
    /// `instance_count`, and a thread pool's hand-offs cost more than small models gain. Raise
    /// it for large models on many cores (per model: `intra_op_threads` in config.yaml).
    #[arg(long, default_value_t = 1, env = "MESHSERVE_INTRA_OP_THREADS")]
    pub intra_op_threads: usize,
    /// Let ONNX Runtime's idle intra-op threads spin (faster hand-offs on an otherwise idle
    /// many-core machine; on a small one they take the cores the server needs).
    #[arg(long, env = "MESHSERVE_INTRA_OP_SPINNING")]
    pub intra_op_spinning: bool,
    /// Largest request body (REST) or message (gRPC), in bytes; larger ones get 413 / RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Limits::default().max_request_bytes, env = "MESHSERVE_MAX_REQUEST_BYTES")]
    pub max_request_bytes: usize,
    /// Inference requests in flight at once; beyond it, 429 / RESOURCE_EXHAUSTED at once.
    #[arg(long, default_value_t = Limits::default().max_in_flight, value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize), env = "MESHSERVE_MAX_IN_FLIGHT")]
    pub max_in_flight: usize,
    /// Seconds in-flight requests get to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30, env = "MESHSERVE_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: u64,
    /// Apply this transformer (an InferenceService YAML with `spec.transformer`, or the
    /// transformer alone, YAML or JSON) to V1 predict and V2 infer requests that did not come
    /// through meshserve's Envoy filter (those carry `x-meshserve-transformed`).
    #[arg(long, env = "MESHSERVE_TRANSFORMER")]
    pub transformer: Option<PathBuf>,
    /// Payload logging: where the events the `logger` filter sends to this sidecar go,
    /// `http://host:port/path` (CloudEvents, binary mode) or `file:///path.jsonl` (JSON lines).
    /// Without it, the sidecar takes no events.
    #[arg(long, env = "MESHSERVE_LOG_SINK")]
    pub log_sink: Option<String>,
    /// The durable spool between the log intake and the sink.
    #[arg(long, default_value = ".meshserve-spool", env = "MESHSERVE_LOG_SPOOL")]
    pub log_spool: PathBuf,
    /// The most bytes the spool holds; beyond it, new events are refused (the filter counts
    /// them as dropped).
    #[arg(long, default_value_t = 256 << 20, env = "MESHSERVE_LOG_SPOOL_MAX_BYTES")]
    pub log_spool_max_bytes: u64,
    /// A file sink is rotated past this size (5 old files kept).
    #[arg(long, default_value_t = 64 << 20, env = "MESHSERVE_LOG_FILE_MAX_BYTES")]
    pub log_file_max_bytes: u64,
}

#[derive(Debug, Args)]
pub struct LogSinkArgs {
    /// Address to listen on. Only loopback unless you say otherwise.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,
    /// Port (0: let the OS pick; the bound address is logged as `listening on http=ADDR`).
    #[arg(long, default_value_t = 8090)]
    pub port: u16,
    /// The JSON-lines file the events are appended to (`-`: stdout).
    #[arg(long, default_value = "-")]
    pub out: PathBuf,
}

/// Runs `meshserve up` until SIGTERM or Ctrl-C.
pub async fn up(args: UpArgs) -> Result<(), crate::mesh::up::UpError> {
    crate::mesh::up::up(
        crate::mesh::up::UpOptions {
            file: args.file,
            host: args.host,
            port: args.port,
            admin_port: args.admin_port,
            envoy: args.envoy,
            wasm: args.wasm,
            state_dir: args.state_dir,
            envoy_concurrency: args.envoy_concurrency,
            otlp_endpoint: args.otlp_endpoint,
            trace_sampling: args.trace_sampling,
        },
        stop_signal(),
    )
    .await
}

/// Runs `meshserve canary`; prints the new split.
pub fn canary(args: CanaryArgs) -> Result<(), String> {
    use crate::mesh::canary::{Change, apply};
    let change = match (args.percent, args.promote, args.rollback) {
        (Some(p), false, false) => Change::Percent(p),
        (None, true, false) => Change::Promote,
        (None, false, true) => Change::Rollback,
        _ => return Err("give exactly one of --percent, --promote, --rollback".into()),
    };
    let split = apply(&args.state_dir, &args.isvc, args.canary.as_deref(), &change)?;
    println!("{split}");
    Ok(())
}

fn repository_registry(service: &Service) -> &prometheus::Registry {
    service.repository().metrics().registry()
}

/// Runs `meshserve log-sink` until SIGTERM or Ctrl-C.
pub async fn log_sink(args: LogSinkArgs) -> Result<(), String> {
    crate::payloads::receiver::serve(SocketAddr::new(args.host, args.port), args.out).await
}

/// Runs `meshserve transform`.
pub fn transform(args: TransformArgs) -> Result<(), String> {
    use std::io::{Read, Write};

    use meshserve_filter_core::transform::Wire;
    use meshserve_proto::rest;

    let transformer = load_transformer(&args.file, args.isvc.as_deref())?;
    let wire = match args.protocol {
        WireArg::V1 => Wire::V1,
        WireArg::V2 => Wire::V2,
    };
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .map_err(|e| format!("cannot read stdin: {e}"))?;
    let out = if args.response {
        transformer.response(wire, &body, None)
    } else if !transformer.transforms_request(wire) {
        Ok(body)
    } else {
        transformer.request(wire, &body, None).and_then(|encoded| {
            // Shown as JSON: the filter sends the same tensors in binary form.
            let request = rest::parse_infer_request(&encoded.body, encoded.header_length)
                .map_err(|e| meshserve_filter_core::transform::TransformError::internal(e.0))?;
            Ok(rest::encode_infer_request(&request, false).body)
        })
    }
    .map_err(|e| format!("{} {}", e.status, e.message))?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&out)
        .and_then(|()| stdout.write_all(b"\n"))
        .map_err(|e| format!("cannot write stdout: {e}"))
}

/// Runs `meshserve render`.
pub fn render(args: RenderArgs) -> Result<(), String> {
    use crate::mesh::targets;
    // The SHA-256 pin comes from a module named on the command line (a release's); the
    // workspace's build, found by default, changes with every build.
    let pin = args.wasm_file.is_some();
    let wasm_file = args
        .wasm_file
        .or_else(|| crate::mesh::up::find_wasm(None).ok());
    let options = targets::RenderOptions {
        file: args.file,
        out: args.out,
        port: args.port,
        admin_port: args.admin_port,
        upstream_base_port: args.upstream_base_port,
        wasm: args.wasm,
        wasm_file,
        pin_wasm: pin,
        settings: crate::mesh::workload::Settings {
            image: args.image,
            envoy_image: args.envoy_image,
            wasm_image: args.wasm_image,
            wasm_url: args.wasm_url,
            wasm_sha256: None,
            otlp: args.otlp_endpoint,
            trace_sampling: args.trace_sampling,
            prometheus: args.prometheus_url,
            models_claim: args.models_claim,
            gateway_namespace: args.gateway_namespace,
            gateway_selector: args.gateway_selector,
        },
    };
    let (written, notes) = targets::render(&options)?;
    println!("wrote to {}:", options.out.display());
    for file in written {
        println!("  {file}");
    }
    for note in notes {
        println!("note: {note}");
    }
    Ok(())
}

/// Why `meshserve serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--storage: {0}")]
    Storage(String),
    #[error(transparent)]
    Runtime(#[from] meshserve_predictor::RuntimeError),
    #[error(transparent)]
    Repository(#[from] meshserve_predictor::PredictorError),
    #[error("cannot listen: {0}")]
    Listen(#[from] std::io::Error),
    #[error("{0}")]
    Transformer(String),
    #[error("{0}")]
    PayloadLogging(String),
}

/// Reads a transformer: from an InferenceService YAML (the one named `isvc`, else the first
/// with a `spec.transformer`), or from a file holding the transformer alone.
pub fn load_transformer(
    file: &std::path::Path,
    isvc: Option<&str>,
) -> Result<meshserve_filter_core::transform::Transformer, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let first: serde_json::Value = serde_yaml::from_str(text.split("\n---").next().unwrap_or(""))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let spec = if first.get("spec").is_some() {
        let services = crate::mesh::up::read_services(file).map_err(|e| e.to_string())?;
        services
            .iter()
            .filter(|s| isvc.is_none_or(|name| s.name == name))
            .find_map(|s| s.transformer.clone())
            .ok_or_else(|| {
                format!(
                    "{}: no InferenceService{} with a spec.transformer",
                    file.display(),
                    isvc.map(|n| format!(" '{n}'")).unwrap_or_default()
                )
            })?
    } else {
        first
    };
    serde_json::from_value(spec).map_err(|e| format!("{}: {e}", file.display()))
}

/// Runs `meshserve serve` until SIGTERM or Ctrl-C.
pub async fn serve(args: ServeArgs) -> Result<(), StartError> {
    let runtime = Runtime::init(RuntimeOptions {
        library: args.ort_library,
        device: args.device,
        intra_op_threads: args.intra_op_threads,
        intra_op_spinning: args.intra_op_spinning,
    })?;
    tracing::info!(library = %runtime.library().display(), device = %runtime.device(), "ONNX Runtime loaded");
    let root = match (&args.model_repository, &args.storage) {
        (Some(repository), _) => repository.clone(),
        (None, Some(storage)) => {
            let scratch = args.scratch_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("meshserve-{}", std::process::id()))
            });
            let batcher = args
                .batcher
                .then_some((args.batcher_max_batch_size, args.batcher_max_latency_ms));
            let (root, names) = crate::mesh::storage::prepare_repository(
                storage,
                &args.model_name,
                batcher,
                &scratch,
            )
            .map_err(StartError::Storage)?;
            tracing::info!(storage = %storage.display(), models = %names.join(","), "serving the storage");
            root
        }
        (None, None) => {
            return Err(StartError::Storage(
                "give --model-repository or --storage".into(),
            ));
        }
    };
    let repository = Arc::new(Repository::open(&root, Arc::new(runtime))?);
    let loader = Arc::clone(&repository);
    let failures = tokio::task::spawn_blocking(move || loader.load_all())
        .await
        .unwrap_or_default();
    if !failures.is_empty() {
        tracing::warn!(
            failed = failures.len(),
            "some models failed to load; the server is not ready until they load"
        );
    }
    let limits = Limits {
        max_request_bytes: args.max_request_bytes,
        max_in_flight: args.max_in_flight,
    };
    let mut service = Service::new(repository, limits);
    if let Some(file) = &args.transformer {
        let transformer = load_transformer(file, None).map_err(StartError::Transformer)?;
        tracing::info!(file = %file.display(), "applying the transformer to requests that bypass Envoy");
        service = service.with_transformer(transformer);
    }
    if let Some(url) = &args.log_sink {
        let settings = crate::payloads::PayloadSettings {
            sink: crate::payloads::delivery::SinkSpec::parse(url, args.log_file_max_bytes)
                .map_err(StartError::PayloadLogging)?,
            spool_dir: args.log_spool.clone(),
            spool_max_bytes: args.log_spool_max_bytes,
        };
        let intake = crate::payloads::Intake::start(&settings, repository_registry(&service))
            .map_err(StartError::PayloadLogging)?;
        tracing::info!(sink = %settings.sink.describe(), spool = %settings.spool_dir.display(), "payload logging on");
        service = service.with_intake(intake);
    }
    let service = Arc::new(service);
    let server = Server::start(
        service,
        ListenConfig {
            http: SocketAddr::new(args.host, args.http_port),
            grpc: SocketAddr::new(args.host, args.grpc_port),
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        },
    )
    .await?;
    tracing::info!("listening on http={}", server.http_addr);
    tracing::info!("listening on grpc={}", server.grpc_addr);
    server.run_until(stop_signal()).await;
    Ok(())
}
