//! The `meshserve` command line: the subcommands, the control plane's flags (the sidecar's
//! are its own: `ServeArgs`, `LogSinkArgs`, `TransformArgs`), and what each subcommand runs.
//! The sidecar's subcommands go to `meshserve-sidecar`, the control plane's to
//! `meshserve-mesh`; an InferenceService file is read by the control plane only, so a
//! transformer named by one is read here and handed to the sidecar.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use meshserve_mesh::canary::{Change, apply};
use meshserve_mesh::files::load_transformer;
use meshserve_mesh::targets::{self, RenderOptions};
use meshserve_mesh::tools::find_wasm;
use meshserve_mesh::up::{UpError, UpOptions};
use meshserve_mesh::workload::Settings;
use meshserve_sidecar::payloads::receiver::LogSinkArgs;
use meshserve_sidecar::serve::{ServeArgs, StartError};
use meshserve_sidecar::signal::stop_signal;
use meshserve_sidecar::telemetry::{LogFormat, parse_ratio};
use meshserve_sidecar::transform::TransformArgs;
use meshserve_sidecar::wake::WakeScalerArgs;

/// meshserve: ONNX model serving as a mesh data plane (Open Inference Protocol and KServe V1).
#[derive(Debug, Parser)]
#[command(name = "meshserve", version, about)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MESHSERVE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
    /// Wake revisions at zero at once on Kubernetes: a KEDA external-push scaler that the
    /// gateway's activator calls (`meshserve render` deploys it where a revision has
    /// `minReplicas: 0`).
    WakeScaler(WakeScalerArgs),
}

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
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
    /// The web console's port (0: let the OS pick; always on loopback, never on Envoy's
    /// listener). Its address is printed, and written to <state-dir>/console-address.
    #[arg(long, default_value_t = 0, env = "MESHSERVE_CONSOLE_PORT")]
    pub console_port: u16,
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
    #[arg(long, default_value_t = 1.0, value_parser = parse_ratio)]
    pub trace_sampling: f64,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("change").required(true).args(["percent", "promote", "rollback"])))]
pub(crate) struct CanaryArgs {
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
pub(crate) struct RenderArgs {
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
    /// The path of meshserve_filters.wasm as the local Envoy will see it. Default: the
    /// absolute path of --wasm-file (else meshserve_filters.wasm in Envoy's directory).
    #[arg(long)]
    pub wasm: Option<PathBuf>,
    /// Where the local Envoy will read the rendered extension-config files (router.ecds.json,
    /// ...) from. Default: --out, made absolute, so the bootstrap works from any directory.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
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
    #[arg(long, default_value_t = 1.0, value_parser = parse_ratio)]
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
    /// Also render a PeerAuthentication that makes mutual TLS STRICT for the predictors in
    /// each InferenceService's namespace (istio/security.yaml).
    #[arg(long)]
    pub mtls_strict: bool,
    /// The Kubernetes cluster's DNS domain: Services are <name>.<namespace>.svc.DOMAIN, and
    /// the Istio filter configuration calls out to Istio's clusters by those names.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

/// Runs `meshserve serve` until SIGTERM or Ctrl-C.
pub(crate) async fn serve(args: ServeArgs) -> Result<(), String> {
    let transformer = match &args.transformer {
        Some(file) => Some(load_transformer(file, None)?),
        None => None,
    };
    meshserve_sidecar::serve::serve(args, transformer)
        .await
        .map_err(|e: StartError| e.to_string())
}

/// Runs `meshserve log-sink` until SIGTERM or Ctrl-C.
pub(crate) async fn log_sink(args: LogSinkArgs) -> Result<(), String> {
    meshserve_sidecar::payloads::receiver::run(args).await
}

/// Runs `meshserve wake-scaler` until SIGTERM or Ctrl-C.
pub(crate) async fn wake_scaler(args: WakeScalerArgs) -> Result<(), String> {
    meshserve_sidecar::wake::run(args).await
}

/// Runs `meshserve transform`.
pub(crate) fn transform(args: TransformArgs) -> Result<(), String> {
    let transformer = load_transformer(&args.file, args.isvc.as_deref())?;
    meshserve_sidecar::transform::run(&args, &transformer)
}

/// Runs `meshserve up` until SIGTERM or Ctrl-C.
pub(crate) async fn up(args: UpArgs) -> Result<(), UpError> {
    meshserve_mesh::up::up(
        UpOptions {
            file: args.file,
            host: args.host,
            port: args.port,
            admin_port: args.admin_port,
            console_port: args.console_port,
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
pub(crate) fn canary(args: CanaryArgs) -> Result<(), String> {
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

/// Runs `meshserve render`.
pub(crate) fn render(args: RenderArgs) -> Result<(), String> {
    // The SHA-256 pin comes from a module named on the command line (a release's); the
    // workspace's build, found by default, changes with every build.
    let pin = args.wasm_file.is_some();
    let wasm_file = args.wasm_file.or_else(|| find_wasm(None).ok());
    let options = RenderOptions {
        file: args.file,
        out: args.out,
        port: args.port,
        admin_port: args.admin_port,
        upstream_base_port: args.upstream_base_port,
        wasm: args.wasm,
        config_dir: args.config_dir,
        wasm_file,
        pin_wasm: pin,
        settings: Settings {
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
            mtls_strict: args.mtls_strict,
            cluster_domain: args.cluster_domain,
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
