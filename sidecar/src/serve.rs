//! `meshserve serve`: the sidecar as a process. Its flags, then the order it starts in: ONNX
//! Runtime, the model repository (or a KServe storage location made into one), the service
//! with its limits, transformer and payload-log intake, the listeners; then it serves until
//! SIGTERM or Ctrl-C and drains.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use clap::builder::TypedValueParser as _;
use meshserve_filter_core::sink::SinkSpec;
use meshserve_filter_core::transform::Transformer;
use meshserve_predictor::{CachePolicy, Device, Repository, Runtime, RuntimeOptions};

use crate::payloads::{Intake, PayloadSettings};
use crate::server::{ListenConfig, Server};
use crate::service::{Limits, Service};
use crate::signal::stop_signal;
use crate::telemetry::TraceArgs;

/// `meshserve serve`'s flags (each also read from its environment variable).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model repository: <dir>/<model>/<version>/model.onnx, optional <dir>/<model>/config.yaml.
    #[arg(
        long,
        env = "MESHSERVE_MODEL_REPOSITORY",
        required_unless_present_any = ["storage", "storage_spec_path"],
        conflicts_with_all = ["storage", "storage_spec_path"]
    )]
    pub model_repository: Option<PathBuf>,
    /// A KServe storage location instead of a repository: one .onnx file, one model's
    /// directory of versions, or a repository (KServe's /mnt/models in a container); or a
    /// remote one, downloaded first: s3://, gs://, https://ACCOUNT.blob.core.windows.net/...,
    /// http(s):// (one file or a .tar.gz/.zip), credentials from the environment as KServe's
    /// storage initializer reads them.
    #[arg(long, env = "MESHSERVE_STORAGE", conflicts_with = "storage_spec_path")]
    pub storage: Option<PathBuf>,
    /// KServe's storage spec instead of --storage: the path inside the bucket (`storage.path`);
    /// the store, bucket and credentials come from $STORAGE_CONFIG (the storage-config
    /// secret's entry, JSON) with $STORAGE_OVERRIDE_CONFIG (`storage.parameters`) over it.
    #[arg(long, env = "MESHSERVE_STORAGE_SPEC_PATH")]
    pub storage_spec_path: Option<String>,
    /// Where remote --storage is downloaded (kept: a restart over unchanged objects downloads
    /// nothing). Default: meshserve-storage under the system's temporary directory.
    #[arg(long, env = "MESHSERVE_STORAGE_CACHE")]
    pub storage_cache: Option<PathBuf>,
    /// The most bytes remote --storage may download.
    #[arg(long, default_value_t = meshserve_predictor::remote::MAX_DOWNLOAD_BYTES, env = "MESHSERVE_MAX_DOWNLOAD_BYTES")]
    pub max_download_bytes: u64,
    /// The format of the --storage model (KServe's modelFormat.name): onnx, or sklearn,
    /// xgboost or lightgbm, converted to ONNX when it loads (then only that framework's
    /// files count in the directory). Default: from the files.
    #[arg(long, env = "MESHSERVE_MODEL_FORMAT", value_parser = parse_format)]
    pub model_format: Option<ModelFormat>,
    /// scikit-learn classifiers answer predict_proba instead of predict (KServe's
    /// PREDICT_PROBA=true, in any case; another value is off).
    #[arg(long, env = "PREDICT_PROBA", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_true)]
    pub predict_proba: bool,
    /// The Python that converts scikit-learn pickles (with scikit-learn, skl2onnx and onnx).
    /// Default: the set-up script's .venv when there is one, else python3.
    #[arg(long, default_value = meshserve_predictor::convert::PYTHON, env = "MESHSERVE_PYTHON")]
    pub python: PathBuf,
    /// Seconds one scikit-learn conversion may take.
    #[arg(long, default_value_t = meshserve_predictor::convert::SKLEARN_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..), env = "MESHSERVE_CONVERT_TIMEOUT_SECS")]
    pub convert_timeout_secs: u64,
    /// The name one model from --storage is served under (KServe: the InferenceService's).
    #[arg(long, default_value = "model", env = "MESHSERVE_MODEL_NAME")]
    pub model_name: String,
    /// Batch requests to the --storage model as KServe's `batcher` does.
    #[arg(long, conflicts_with = "model_repository")]
    pub batcher: bool,
    /// The batcher's `maxBatchSize` (default 32).
    #[arg(long, requires = "batcher")]
    pub batcher_max_batch_size: Option<u64>,
    /// The batcher's `maxLatency` in milliseconds (default 500).
    #[arg(long, requires = "batcher")]
    pub batcher_max_latency_ms: Option<u64>,
    /// The --storage model's built-in explainer: config.yaml's `explainer` as JSON, e.g.
    /// `{"tree_shap": {"background_file": "background.json"}}`, the file beside the model in
    /// its storage (the control plane writes it from spec.explainer).
    #[arg(long, conflicts_with = "model_repository", env = "MESHSERVE_EXPLAINER")]
    pub explainer: Option<String>,
    /// Where the repository for --storage is built (links and a config.yaml). Default: a
    /// directory under the system's temporary directory.
    #[arg(long, env = "MESHSERVE_SCRATCH_DIR")]
    pub scratch_dir: Option<PathBuf>,
    #[command(flatten)]
    pub traces: TraceArgs,
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
    /// Seconds a client gets to send a request's body (REST); then 408 Request Timeout and the
    /// connection closes. (Its headers get 10 s.)
    #[arg(long, default_value_t = Limits::default().body_read_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..), env = "MESHSERVE_BODY_READ_TIMEOUT_SECS")]
    pub body_read_timeout_secs: u64,
    /// Models load on their first request instead of at start (the request waits for the
    /// load); a model's config.yaml `loading.on_demand` wins.
    #[arg(long, env = "MESHSERVE_LOAD_ON_DEMAND")]
    pub load_on_demand: bool,
    /// Seconds without a request after which a loaded model is unloaded; it loads again on
    /// its next request (0: never). A model's config.yaml `loading.idle_unload_secs` wins.
    #[arg(long, default_value_t = 0, env = "MESHSERVE_MODEL_IDLE_UNLOAD_SECS")]
    pub model_idle_unload_secs: u64,
    /// The most bytes of models in memory at once (an estimate: ONNX files times
    /// instance_count), e.g. 512Mi or 2G; a load past it evicts the least recently used
    /// models first. Default: no budget.
    #[arg(long, env = "MESHSERVE_MODEL_MEMORY_BUDGET", value_parser = meshserve_predictor::cache::parse_bytes)]
    pub model_memory_budget: Option<u64>,
    /// Seconds a request waits for its model to load; then 503 / UNAVAILABLE (the load goes on).
    #[arg(long, default_value_t = meshserve_predictor::cache::DEFAULT_LOAD_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..), env = "MESHSERVE_MODEL_LOAD_TIMEOUT_SECS")]
    pub model_load_timeout_secs: u64,
    /// Seconds in-flight requests get to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30, env = "MESHSERVE_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: u64,
    /// Milliseconds the sidecar goes on serving after SIGTERM, reporting not ready, before it
    /// stops accepting: for the proxies in front to see it go (0: stop accepting at once).
    #[arg(long, default_value_t = 0, env = "MESHSERVE_DRAIN_GRACE_MS")]
    pub drain_grace_ms: u64,
    /// Apply this transformer (an InferenceService YAML with `spec.transformer`, or the
    /// transformer alone, YAML or JSON) to V1 predict and V2 infer requests that did not come
    /// through meshserve's Envoy filter (those carry `x-meshserve-transformed`).
    // Read by the caller, which passes the transformer to `serve`: an InferenceService file
    // is the control plane's to read.
    #[arg(long, env = "MESHSERVE_TRANSFORMER")]
    pub transformer: Option<PathBuf>,
    /// Payload logging: where the events the `logger` filter sends to this sidecar go,
    /// `http://host:port/path` (CloudEvents, binary mode) or `file:///path.jsonl` (JSON lines).
    /// Without it, the sidecar takes no events.
    #[arg(long, env = "MESHSERVE_LOG_SINK")]
    pub log_sink: Option<String>,
    /// Send an HTTP sink many events per request, in CloudEvents' batched mode
    /// (`application/cloudevents-batch+json`), for sinks that take it.
    #[arg(long, requires = "log_sink", env = "MESHSERVE_LOG_SINK_BATCH")]
    pub log_sink_batch: bool,
    /// The durable spool between the log intake and the sink.
    #[arg(long, default_value = ".meshserve-spool", env = "MESHSERVE_LOG_SPOOL")]
    pub log_spool: PathBuf,
    /// The most bytes the spool holds; beyond it, new events are refused (the filter counts
    /// them as dropped).
    #[arg(long, default_value_t = 256 << 20, env = "MESHSERVE_LOG_SPOOL_MAX_BYTES")]
    pub log_spool_max_bytes: u64,
    /// Keep the last N payload events in memory (their attributes and their payloads' first
    /// 2 KiB) for `GET /meshserve/events/recent` on this port, which `meshserve up`'s console
    /// reads; 0, the default, keeps none. Payloads may be sensitive: meshserve's router never
    /// routes a client to this path. At most 1000.
    #[arg(
        long,
        default_value_t = 0,
        requires = "log_sink",
        env = "MESHSERVE_LOG_RECENT"
    )]
    pub log_recent: usize,
    /// A file sink is rotated past this size (5 old files kept).
    #[arg(long, default_value_t = 64 << 20, env = "MESHSERVE_LOG_FILE_MAX_BYTES")]
    pub log_file_max_bytes: u64,
}

/// `--model-format`: ONNX, or a format converted when it loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    Onnx,
    Converted(meshserve_predictor::convert::Format),
}

fn parse_true(value: &str) -> Result<bool, String> {
    Ok(meshserve_predictor::convert::is_true(value))
}

fn parse_format(name: &str) -> Result<ModelFormat, String> {
    match name.to_ascii_lowercase().as_str() {
        "onnx" | "pytorch" | "tensorflow" | "triton" => Ok(ModelFormat::Onnx),
        other => meshserve_predictor::convert::Format::parse(other)
            .map(ModelFormat::Converted)
            .ok_or_else(|| format!("'{name}' is not onnx, sklearn, xgboost or lightgbm")),
    }
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
    PayloadLogging(String),
}

/// `--storage` on this machine: as given, or downloaded first when remote.
async fn local_storage(
    storage: &Path,
    cache: Option<&Path>,
    max_bytes: u64,
) -> Result<PathBuf, StartError> {
    let uri = storage.to_string_lossy();
    if !meshserve_predictor::remote::is_remote(&uri) {
        return Ok(storage.to_owned());
    }
    let cache = storage_cache(cache);
    meshserve_predictor::remote::fetch(&uri, &cache, max_bytes)
        .await
        .map_err(StartError::Storage)
}

/// `--storage-spec-path`: KServe's storage spec, read from the environment as KServe's
/// storage initializer reads it, downloaded.
async fn from_storage_spec(
    path: &str,
    cache: Option<&Path>,
    max_bytes: u64,
) -> Result<PathBuf, StartError> {
    use meshserve_predictor::remote::{self, STORAGE_CONFIG, STORAGE_OVERRIDE_CONFIG};
    let config = std::env::var(STORAGE_CONFIG).map_err(|_| {
        StartError::Storage(format!(
            "--storage-spec-path needs ${STORAGE_CONFIG}: the storage-config secret's entry (JSON)"
        ))
    })?;
    let overrides = std::env::var(STORAGE_OVERRIDE_CONFIG).ok();
    let (uri, s3) =
        remote::storage_spec(path, &config, overrides.as_deref()).map_err(StartError::Storage)?;
    tracing::info!(%uri, "storage spec");
    remote::fetch_with(&uri, &s3, &storage_cache(cache), max_bytes)
        .await
        .map_err(StartError::Storage)
}

/// `--storage-cache`, or its default.
fn storage_cache(cache: Option<&Path>) -> PathBuf {
    cache.map_or_else(
        || std::env::temp_dir().join("meshserve-storage"),
        Path::to_owned,
    )
}

fn repository_registry(service: &Service) -> &prometheus::Registry {
    service.repository().metrics().registry()
}

/// Runs `meshserve serve` until SIGTERM or Ctrl-C. `transformer` is the one `--transformer`
/// names, read by the caller (an InferenceService file is the control plane's to read).
pub async fn serve(args: ServeArgs, transformer: Option<Transformer>) -> Result<(), StartError> {
    let runtime = Runtime::init(RuntimeOptions {
        library: args.ort_library,
        device: args.device,
        intra_op_threads: args.intra_op_threads,
        intra_op_spinning: args.intra_op_spinning,
    })?;
    tracing::info!(library = %runtime.library().display(), device = %runtime.device(), "ONNX Runtime loaded");
    let spec_storage = match &args.storage_spec_path {
        Some(path) => Some(
            from_storage_spec(path, args.storage_cache.as_deref(), args.max_download_bytes).await?,
        ),
        None => None,
    };
    let root = match (
        &args.model_repository,
        spec_storage.as_ref().or(args.storage.as_ref()),
    ) {
        (Some(repository), _) => repository.clone(),
        (None, Some(storage)) => {
            let storage = &match &spec_storage {
                Some(fetched) => fetched.clone(),
                None => {
                    local_storage(
                        storage,
                        args.storage_cache.as_deref(),
                        args.max_download_bytes,
                    )
                    .await?
                }
            };
            let scratch = args.scratch_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("meshserve-{}", std::process::id()))
            });
            let mut convert = meshserve_predictor::convert::Options::new(storage_cache(
                args.storage_cache.as_deref(),
            ));
            convert.predict_proba = args.predict_proba;
            convert.python = args.python.clone();
            convert.timeout = Duration::from_secs(args.convert_timeout_secs);
            let how = meshserve_predictor::storage::Prepare {
                batcher: args
                    .batcher
                    .then_some((args.batcher_max_batch_size, args.batcher_max_latency_ms)),
                format: match args.model_format {
                    Some(ModelFormat::Converted(format)) => Some(format),
                    _ => None,
                },
                convert,
                explainer: args.explainer.clone(),
            };
            // Converting a model may take a while: off the async threads.
            let (storage_dir, name) = (storage.clone(), args.model_name.clone());
            let (root, names) = tokio::task::spawn_blocking(move || {
                meshserve_predictor::storage::prepare_repository(
                    &storage_dir,
                    &name,
                    &how,
                    &scratch,
                )
            })
            .await
            .map_err(|e| StartError::Storage(format!("preparing the storage: {e}")))?
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
    let cache = CachePolicy {
        on_demand: args.load_on_demand,
        idle_unload: (args.model_idle_unload_secs > 0)
            .then(|| Duration::from_secs(args.model_idle_unload_secs)),
        memory_budget: args.model_memory_budget,
        load_timeout: Duration::from_secs(args.model_load_timeout_secs),
    };
    let repository = Arc::new(Repository::open(&root, Arc::new(runtime))?.with_cache(cache));
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
        body_read_timeout: Duration::from_secs(args.body_read_timeout_secs),
    };
    let mut service = Service::new(repository, limits);
    if let Some(transformer) = transformer {
        let file = args.transformer.as_deref().unwrap_or(Path::new("-"));
        tracing::info!(file = %file.display(), "applying the transformer to requests that bypass Envoy");
        service = service.with_transformer(transformer);
    }
    if let Some(url) = &args.log_sink {
        let settings = PayloadSettings {
            sink: SinkSpec::parse(url, args.log_file_max_bytes)
                .map_err(StartError::PayloadLogging)?,
            batched: args.log_sink_batch,
            spool_dir: args.log_spool.clone(),
            spool_max_bytes: args.log_spool_max_bytes,
            recent: args.log_recent,
        };
        let intake = Intake::start(&settings, repository_registry(&service))
            .map_err(StartError::PayloadLogging)?;
        tracing::info!(sink = %settings.sink.describe(), spool = %settings.spool_dir.display(), "payload logging on");
        service = service.with_intake(intake);
    }
    let service = Arc::new(service);
    tokio::spawn(unload_idle_models(Arc::downgrade(service.repository())));
    let server = Server::start(
        service,
        ListenConfig {
            http: SocketAddr::new(args.host, args.http_port),
            grpc: SocketAddr::new(args.host, args.grpc_port),
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
            drain_grace: Duration::from_millis(args.drain_grace_ms),
        },
    )
    .await?;
    tracing::info!("listening on http={}", server.http_addr);
    tracing::info!("listening on grpc={}", server.grpc_addr);
    server.run_until(stop_signal()).await;
    Ok(())
}

/// How often loaded models are checked for their idle time.
const IDLE_SWEEP: Duration = Duration::from_millis(250);

/// Unloads idle models on a timer, for as long as the repository lives.
async fn unload_idle_models(repository: std::sync::Weak<Repository>) {
    let mut tick = tokio::time::interval(IDLE_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(repository) = repository.upgrade() else {
            return;
        };
        repository.unload_idle();
    }
}
