//! `meshserve render`: every target from one InferenceService file, from the same filter
//! configuration.
//!
//! | directory | what |
//! |---|---|
//! | `.` | a local Envoy: `filter.json`, one `*.ecds.json` per filter, `envoy.json` (sidecars on loopback ports) |
//! | `compose/` | docker-compose: the same files for Envoy's container, each transformer's JSON, `docker-compose.yaml` |
//! | `istio/` | `wasmplugins.yaml`, or `envoyfilter.yaml` instead; `gateway.yaml`; `virtualservices.yaml`; `security.yaml` |
//! | `kubernetes/` | `<isvc>.yaml`: Deployments, Services, ConfigMaps, HorizontalPodAutoscalers or KEDA ScaledObjects |

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::files::read_documents;
use crate::render::{self, EnvoySpec, Naming, Upstream};
use crate::workload::{self, Settings};
use crate::{compose, istio, kube};

pub const COMPOSE_DIR: &str = "compose";
pub const ISTIO_DIR: &str = "istio";
pub const KUBERNETES_DIR: &str = "kubernetes";
/// The local Envoy's module path when no module is named or found: beside where Envoy runs.
pub const DEFAULT_WASM: &str = "meshserve_filters.wasm";

/// What `meshserve render` was asked.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    pub file: PathBuf,
    pub out: PathBuf,
    /// Envoy's listener port (local and compose).
    pub port: u16,
    /// The local Envoy's admin port.
    pub admin_port: u16,
    /// The first local sidecar port: revision i gets REST on BASE+2i and gRPC on BASE+2i+1.
    pub upstream_base_port: u16,
    /// The module's path as the local Envoy sees it (default: `wasm_file`, made absolute).
    pub wasm: Option<PathBuf>,
    /// Where the local Envoy reads the rendered extension-config files from (default: `out`,
    /// made absolute, so the bootstrap works from any directory).
    pub config_dir: Option<PathBuf>,
    /// The module on this machine (compose mounts it; its SHA-256 pins the EnvoyFilter's).
    pub wasm_file: Option<PathBuf>,
    /// Pin the EnvoyFilter's download to `wasm_file`'s SHA-256.
    pub pin_wasm: bool,
    pub settings: Settings,
}

/// Renders every target; returns the files written, relative to `out`, and notes for the
/// user (targets skipped, and why).
pub fn render(options: &RenderOptions) -> Result<(Vec<String>, Vec<String>), String> {
    let (services, graphs) = read_documents(&options.file)?;
    workload::check_names(&services)?;
    workload::check_domain(&options.settings.cluster_domain)?;
    let mut settings = options.settings.clone();
    if settings.wasm_sha256.is_none()
        && options.pin_wasm
        && let Some(file) = &options.wasm_file
        && let Ok(bytes) = std::fs::read(file)
    {
        settings.wasm_sha256 = Some(hex(&Sha256::digest(&bytes)));
    }
    let mut served = Vec::new();
    for isvc in &services {
        let mut models = Vec::new();
        // The names clients may call: the shadow's extra models are not served.
        for revision in workload::served(isvc) {
            for name in revision.storage.models(&isvc.name, revision.format)? {
                if !models.contains(&name) {
                    models.push(name);
                }
            }
        }
        served.push((isvc, models));
    }
    let config = render::with_graphs(
        render::filter_config(&served, &Naming::Local)?,
        &graphs,
        &served,
    )?;
    let checked = render::check(&config)?;
    let filters = render::filters(&checked);
    let istio_config = render::filter_config(&served, &istio::naming(&settings))?;
    let mut written = Vec::new();
    let mut notes = Vec::new();
    if !graphs.is_empty() {
        notes.push(format!(
            "{ISTIO_DIR}/ and {KUBERNETES_DIR}/: the InferenceGraphs ({}) are served by the local Envoy and compose only: their steps need the hop listener, which the rendered Istio resources do not add",
            graphs.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    for isvc in &services {
        for revision in workload::revisions(isvc) {
            if let Some(logger) = &revision.logger
                && ["://127.", "://localhost", "://[::1]"]
                    .iter()
                    .any(|l| logger.url.contains(l))
            {
                notes.push(format!(
                    "{}: revision {}: the logger's url {} is loopback: in a container that is the container itself; give the sink's service address for compose and Kubernetes",
                    isvc.name, revision.name, logger.url
                ));
            }
        }
    }

    // Local Envoy: every path it reads is absolute (Envoy resolves relative ones against its
    // own working directory, not the bootstrap's).
    let out = &options.out;
    create(out)?;
    let config_dir = match &options.config_dir {
        Some(dir) => dir.clone(),
        None => absolute(out)?,
    };
    let wasm = match (&options.wasm, &options.wasm_file) {
        (Some(wasm), _) => wasm.clone(),
        (None, Some(file)) => absolute(file)?,
        (None, None) => PathBuf::from(DEFAULT_WASM),
    };
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut port = options.upstream_base_port;
    let mut upstreams = Vec::new();
    for isvc in &services {
        for revision in workload::revisions(isvc) {
            upstreams.push((
                render::clusters(&isvc.name, &revision.name).0,
                Upstream::local(
                    SocketAddr::new(loopback, port),
                    SocketAddr::new(loopback, port.saturating_add(1)),
                ),
            ));
            port = port.saturating_add(2);
        }
    }
    let otlp = settings
        .otlp
        .as_deref()
        .map(render::Endpoint::from_url)
        .transpose()?;
    let local = EnvoySpec {
        listener: SocketAddr::new(loopback, options.port),
        admin: SocketAddr::new(loopback, options.admin_port),
        config_dir: &config_dir,
        upstreams: &upstreams,
        otlp,
        trace_sampling: settings.trace_sampling,
        jwt: render::jwt_services(&services),
        wake: None,
    };
    written.extend(
        render::write_mesh(out, &config, &wasm, &local)?
            .into_iter()
            .map(str::to_owned),
    );

    // docker-compose, where every model is a local file.
    if let Err(why) = compose::local_only(&services) {
        notes.push(format!("{COMPOSE_DIR}/: skipped: {why}"));
    } else {
        let dir = out.join(COMPOSE_DIR);
        create(&dir)?;
        let wasm = options
            .wasm_file
            .clone()
            .unwrap_or_else(|| PathBuf::from("meshserve_filters.wasm"));
        for file in compose::write(
            &dir,
            &options.file,
            &services,
            &config,
            &wasm,
            options.port,
            &settings,
        )? {
            written.push(format!("{COMPOSE_DIR}/{file}"));
        }
    }

    // Istio.
    let dir = out.join(ISTIO_DIR);
    create(&dir)?;
    let header = format!(
        "# Rendered by `meshserve render` from {}: edit the InferenceService and render again.\n",
        options
            .file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    );
    let istio_files: [(&str, Vec<Value>, &str); 5] = [
        (
            "wasmplugins.yaml",
            istio::wasm_plugins(&filters, &istio_config, &settings),
            "# meshserve's filters in the ingress gateway, one WasmPlugin per filter (Istio 1.12 and later).\n",
        ),
        (
            "envoyfilter.yaml",
            vec![istio::envoy_filter(&filters, &istio_config, &settings)],
            "# The same filters for meshes without WasmPlugin: apply this OR wasmplugins.yaml, not both.\n",
        ),
        ("gateway.yaml", vec![istio::gateway(&settings)], ""),
        (
            "virtualservices.yaml",
            services
                .iter()
                .map(|isvc| istio::virtual_service(isvc, &settings))
                .collect(),
            "# Each revision's REST and gRPC routes, chosen by the router filter's x-meshserve-cluster.\n",
        ),
        (
            "security.yaml",
            istio::security(&services, &settings),
            "# Control APIs denied at the gateway; the tokens InferenceServices ask for (serving.meshserve.io/jwt-*).\n",
        ),
    ];
    for (file, objects, about) in istio_files {
        write_text(
            &dir.join(file),
            &kube::to_yaml(&objects, &format!("{header}{about}"))?,
        )?;
        written.push(format!("{ISTIO_DIR}/{file}"));
    }

    // Kubernetes.
    let dir = out.join(KUBERNETES_DIR);
    create(&dir)?;
    for isvc in &services {
        let file = format!("{}.yaml", isvc.name);
        let objects = kube::objects(isvc, &settings)?;
        write_text(&dir.join(&file), &kube::to_yaml(&objects, &header)?)?;
        written.push(format!("{KUBERNETES_DIR}/{file}"));
    }
    let wake = kube::wake_scalers(&services, &settings);
    if !wake.is_empty() {
        let file = format!("{}.yaml", crate::workload::WAKE_SCALER);
        write_text(&dir.join(&file), &kube::to_yaml(&wake, &header)?)?;
        written.push(format!("{KUBERNETES_DIR}/{file}"));
    }
    Ok((written, notes))
}

fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn create(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

fn write_text(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
