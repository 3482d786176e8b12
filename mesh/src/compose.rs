//! The mesh as a docker-compose project: Envoy's official image with meshserve's filters, and
//! one sidecar container per revision (the repository's Dockerfile), on compose's network.
//! Envoy reads the same filter configuration and ECDS files as the local mesh, so
//! `meshserve canary --state-dir DIR` changes the split of a running compose project live.

use std::path::Path;

use serde_json::{Value, json};

use crate::isvc::{InferenceService, Storage};
use crate::render::{self, Endpoint, EnvoySpec, Upstream};
use crate::workload::{
    self, GRPC_PORT, HTTP_PORT, SCRATCH_DIR, SPOOL_DIR, Settings, TRANSFORMER_DIR, TRANSFORMER_FILE,
};

pub const COMPOSE_FILE: &str = "docker-compose.yaml";
/// Where Envoy's container sees the rendered directory and the module.
const CONFIG_DIR: &str = "/etc/meshserve/config";
const WASM_PATH: &str = "/etc/meshserve/wasm/meshserve_filters.wasm";
/// Envoy's admin port inside the compose network (published on the host's loopback only).
const ADMIN_PORT: u16 = 9901;

/// Whether compose can run these services: every model a local file (`pvc://` storage
/// exists on Kubernetes only); else which revision cannot.
pub fn local_only(services: &[InferenceService]) -> Result<(), String> {
    for isvc in services {
        for revision in workload::revisions(isvc) {
            let why = match revision.storage {
                Storage::Pvc { .. } => "pvc:// storage exists on Kubernetes only",
                Storage::Remote { .. } | Storage::Spec { .. } => {
                    "remote storage is read on Kubernetes and by meshserve up; compose mounts local files"
                }
                Storage::File { .. } => continue,
            };
            return Err(format!(
                "InferenceService {}: revision {}: {why}",
                isvc.name, revision.name
            ));
        }
    }
    Ok(())
}

/// Writes the compose project into `dir` (which must exist): the filter configuration, the
/// ECDS files and the Envoy bootstrap for the containers, each transformer's JSON, and
/// `docker-compose.yaml`. `wasm`: the module on this machine; `port`: Envoy's published
/// port. Returns the files written.
pub fn write(
    dir: &Path,
    source: &Path,
    services: &[InferenceService],
    config: &Value,
    wasm: &Path,
    port: u16,
    settings: &Settings,
) -> Result<Vec<String>, String> {
    local_only(services)?;
    let dir = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let upstreams: Vec<(String, Upstream)> = services
        .iter()
        .flat_map(|isvc| {
            workload::revisions(isvc).map(|r| {
                let host = workload::name(&isvc.name, &r.name);
                let at = |port| Endpoint {
                    host: host.clone(),
                    port,
                };
                (
                    render::clusters(&isvc.name, &r.name).0,
                    Upstream {
                        http: at(HTTP_PORT),
                        grpc: at(GRPC_PORT),
                    },
                )
            })
        })
        .collect();
    let otlp = settings
        .otlp
        .as_deref()
        .map(Endpoint::from_url)
        .transpose()?;
    let envoy = EnvoySpec {
        listener: ([0, 0, 0, 0], HTTP_PORT).into(),
        admin: ([0, 0, 0, 0], ADMIN_PORT).into(),
        config_dir: Path::new(CONFIG_DIR),
        upstreams: &upstreams,
        otlp,
        trace_sampling: settings.trace_sampling,
        jwt: render::jwt_services(services),
        wake: None,
    };
    let mut written: Vec<String> = render::write_mesh(&dir, config, Path::new(WASM_PATH), &envoy)?
        .into_iter()
        .map(str::to_owned)
        .collect();

    let mount = |host: &Path, container: &str| {
        format!(
            "{}:{container}:ro",
            workload::relative(&dir, host).display()
        )
    };
    let wasm_host = std::fs::canonicalize(wasm).unwrap_or_else(|_| wasm.to_path_buf());
    let mut compose_services = serde_json::Map::new();
    let mut volumes = serde_json::Map::new();
    let mut sidecars = Vec::new();
    for isvc in services {
        let transformer = match &isvc.transformer {
            Some(spec) => {
                let file = format!("{}.{TRANSFORMER_FILE}", isvc.name);
                render::write_atomically(&dir.join(&file), spec)
                    .map_err(|e| format!("{file}: {e}"))?;
                written.push(file.clone());
                Some(file)
            }
            None => None,
        };
        for revision in workload::revisions(isvc) {
            let name = workload::name(&isvc.name, &revision.name);
            let Storage::File { path, .. } = &revision.storage else {
                continue;
            };
            let model =
                std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut mounts = vec![mount(&model, &workload::model_path(&revision.storage))];
            if let Some(file) = &transformer {
                mounts.push(format!("./{file}:{TRANSFORMER_DIR}/{TRANSFORMER_FILE}:ro"));
            }
            if revision.logger.is_some() {
                let volume = format!("{name}-spool");
                mounts.push(format!("{volume}:{SPOOL_DIR}"));
                volumes.insert(volume, json!({}));
            }
            compose_services.insert(
                name.clone(),
                json!({
                    "image": settings.image,
                    "command": workload::sidecar_args(isvc, revision, settings),
                    "volumes": mounts,
                    "tmpfs": [SCRATCH_DIR],
                    "restart": "unless-stopped",
                    "stop_grace_period": "40s",
                    "labels": {
                        "serving.kserve.io/inferenceservice": isvc.name,
                        "meshserve.io/revision": revision.name,
                    },
                }),
            );
            sidecars.push(name);
        }
    }
    compose_services.insert(
        "envoy".into(),
        json!({
            "image": settings.envoy_image,
            "command": ["-c", format!("{CONFIG_DIR}/{}", render::BOOTSTRAP_FILE), "--log-level", "warning"],
            "ports": [format!("{port}:{HTTP_PORT}"), format!("127.0.0.1:{ADMIN_PORT}:{ADMIN_PORT}")],
            "volumes": [format!("./:{CONFIG_DIR}:ro"), mount(&wasm_host, WASM_PATH)],
            "depends_on": sidecars,
            "restart": "unless-stopped",
        }),
    );
    let mut project = json!({"version": "3.8", "services": compose_services});
    if !volumes.is_empty()
        && let Some(map) = project.as_object_mut()
    {
        map.insert("volumes".into(), Value::Object(volumes));
    }
    let text = serde_yaml::to_string(&project).map_err(|e| e.to_string())?;
    let header = format!(
        "# Rendered by `meshserve render` from {}: edit the InferenceService and render again.\n# `docker-compose up` serves it on http://localhost:{port}; `meshserve canary ISVC --percent N\n# --state-dir <this directory>` changes the split live.\n",
        source
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
    );
    std::fs::write(dir.join(COMPOSE_FILE), header + &text)
        .map_err(|e| format!("{COMPOSE_FILE}: {e}"))?;
    written.push(COMPOSE_FILE.to_owned());
    Ok(written)
}
