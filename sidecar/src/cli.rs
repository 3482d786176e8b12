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
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model repository: <dir>/<model>/<version>/model.onnx, optional <dir>/<model>/config.yaml.
    #[arg(long, env = "MESHSERVE_MODEL_REPOSITORY")]
    pub model_repository: PathBuf,
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
    /// Threads ONNX Runtime uses within one operator (0: one per core).
    #[arg(long, default_value_t = 0, env = "MESHSERVE_INTRA_OP_THREADS")]
    pub intra_op_threads: usize,
    /// Largest request body (REST) or message (gRPC), in bytes; larger ones get 413 / RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Limits::default().max_request_bytes, env = "MESHSERVE_MAX_REQUEST_BYTES")]
    pub max_request_bytes: usize,
    /// Inference requests in flight at once; beyond it, 429 / RESOURCE_EXHAUSTED at once.
    #[arg(long, default_value_t = Limits::default().max_in_flight, value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize), env = "MESHSERVE_MAX_IN_FLIGHT")]
    pub max_in_flight: usize,
    /// Seconds in-flight requests get to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30, env = "MESHSERVE_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: u64,
}

/// Why `meshserve serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Runtime(#[from] meshserve_predictor::RuntimeError),
    #[error(transparent)]
    Repository(#[from] meshserve_predictor::PredictorError),
    #[error("cannot listen: {0}")]
    Listen(#[from] std::io::Error),
}

/// Runs `meshserve serve` until SIGTERM or Ctrl-C.
pub async fn serve(args: ServeArgs) -> Result<(), StartError> {
    let runtime = Runtime::init(RuntimeOptions {
        library: args.ort_library,
        device: args.device,
        intra_op_threads: args.intra_op_threads,
    })?;
    tracing::info!(library = %runtime.library().display(), device = %runtime.device(), "ONNX Runtime loaded");
    let repository = Arc::new(Repository::open(&args.model_repository, Arc::new(runtime))?);
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
    let service = Arc::new(Service::new(repository, limits));
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
