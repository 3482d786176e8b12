//! What a revision's sidecar is in a container (docker-compose, Kubernetes): its name, the
//! `meshserve serve` command line, and where its model, transformer and spool are mounted.
//! One place, so that compose and Kubernetes run the same sidecar `meshserve up` runs.

use std::path::{Component, Path, PathBuf};

use meshserve_predictor::storage::Batcher;

use crate::isvc::{InferenceService, RevisionLogger, RevisionSpec, Storage};

/// The sidecar's ports in a container (KServe's: REST 8080, gRPC 8081).
pub const HTTP_PORT: u16 = 8080;
pub const GRPC_PORT: u16 = 8081;
/// Where the model is mounted (KServe's `/mnt/models`).
pub const MODELS_DIR: &str = "/mnt/models";
/// Where the transformer's JSON is mounted.
pub const TRANSFORMER_DIR: &str = "/etc/meshserve/transformer";
pub const TRANSFORMER_FILE: &str = "transformer.json";
/// The payload-log spool (a volume: it must outlive the container).
pub const SPOOL_DIR: &str = "/var/spool/meshserve";
/// Where the sidecar builds its repository of links (a writable scratch volume).
pub const SCRATCH_DIR: &str = "/tmp/meshserve";

/// What every container target shares: images, the collector, where Kubernetes finds models.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The sidecar image (the repository's Dockerfile).
    pub image: String,
    /// Envoy's image for docker-compose.
    pub envoy_image: String,
    /// The filters as an OCI image (`oci://...`), for Istio's WasmPlugin.
    pub wasm_image: String,
    /// The filters as a file over HTTPS, for the EnvoyFilter form (Istio's agent fetches it).
    pub wasm_url: String,
    /// The module's SHA-256 (hex), when the module was at hand while rendering.
    pub wasm_sha256: Option<String>,
    /// An OTLP/gRPC collector for Envoy's and the sidecars' spans.
    pub otlp: Option<String>,
    /// The share of new traces recorded, 0 to 1 (Envoy's `random_sampling`, the sidecars'
    /// `--trace-sampling`).
    pub trace_sampling: f64,
    /// Prometheus, for KEDA's triggers.
    pub prometheus: String,
    /// The PersistentVolumeClaim holding `file://` models on Kubernetes, at the same paths
    /// relative to the InferenceService's file.
    pub models_claim: String,
    /// The Istio ingress gateway: its namespace and the label its pods carry.
    pub gateway_namespace: String,
    pub gateway_selector: (String, String),
    /// Render a PeerAuthentication STRICT for the predictors of each namespace.
    pub mtls_strict: bool,
    /// The Kubernetes cluster's DNS domain (`cluster.local` unless the cluster was set up
    /// otherwise): Services are `<name>.<namespace>.svc.<domain>`, in Istio's cluster names too.
    pub cluster_domain: String,
}

/// A revision's workload name (Deployment, Service, compose service): the revision's name
/// when it already starts with the InferenceService's (KServe's `digits-predictor`), else
/// both joined.
pub fn name(isvc: &str, revision: &str) -> String {
    if revision.starts_with(&format!("{isvc}-")) {
        revision.to_owned()
    } else {
        format!("{isvc}-{revision}")
    }
}

/// A sidecar of a revision that scales to zero goes on serving, not ready, this long after
/// SIGTERM before it closes its listeners: longer than the router activator's probe period
/// (500 ms), so every Envoy worker's activator sees it go before a request finds it closed.
pub const DRAIN_GRACE_MS: u64 = 1_000;

/// `meshserve wake-scaler` on Kubernetes (a KEDA external-push scaler, one per namespace
/// with a revision at `minReplicas: 0`): its Deployment and Service name, and ports.
pub const WAKE_SCALER: &str = "meshserve-wake";
pub const WAKE_GRPC_PORT: u16 = 9090;
pub const WAKE_HTTP_PORT: u16 = 9091;

/// The wake scaler's Service in `namespace`, by its full DNS name.
pub fn wake_host(namespace: &str, domain: &str) -> String {
    format!("{WAKE_SCALER}.{namespace}.svc.{domain}")
}

/// A revision's Kubernetes Service, by its full DNS name in a cluster with DNS `domain`.
pub fn service_host(isvc: &InferenceService, revision: &RevisionSpec, domain: &str) -> String {
    format!(
        "{}.{}.svc.{domain}",
        name(&isvc.name, &revision.name),
        isvc.namespace
    )
}

/// Checks a cluster DNS domain: dot-separated DNS labels (`cluster.local`).
pub fn check_domain(domain: &str) -> Result<(), String> {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if domain.len() <= 253 && domain.split('.').all(label) {
        Ok(())
    } else {
        Err(format!(
            "cluster domain '{domain}' is not a DNS name (lower-case labels joined by dots, e.g. cluster.local)"
        ))
    }
}

/// Checks that every workload name is a DNS label and unique.
pub fn check_names(services: &[InferenceService]) -> Result<(), String> {
    let mut seen: Vec<(String, String)> = Vec::new();
    for isvc in services {
        for revision in revisions(isvc) {
            let n = name(&isvc.name, &revision.name);
            if n.len() > 63 {
                return Err(format!(
                    "InferenceService {}: revision {}: the workload name '{n}' is over 63 characters",
                    isvc.name, revision.name
                ));
            }
            if seen.contains(&(isvc.namespace.clone(), n.clone())) {
                return Err(format!(
                    "InferenceService {}: revision {}: the workload name '{n}' is taken in namespace {}",
                    isvc.name, revision.name, isvc.namespace
                ));
            }
            seen.push((isvc.namespace.clone(), n));
        }
    }
    Ok(())
}

/// Every revision that runs: the default first, then the canaries, then the shadow.
pub fn revisions(isvc: &InferenceService) -> impl Iterator<Item = &RevisionSpec> {
    served(isvc).chain(&isvc.shadow)
}

/// The revisions requests are routed to (and answered by): the default, then the canaries.
pub fn served(isvc: &InferenceService) -> impl Iterator<Item = &RevisionSpec> {
    std::iter::once(&isvc.default).chain(&isvc.canaries)
}

/// The model's path inside the container, for a storage location.
pub fn model_path(storage: &Storage) -> String {
    let file_name = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .filter(|_| {
                p.extension().is_some_and(|e| e == "onnx")
                    || meshserve_predictor::convert::Format::of_file(p).is_some()
            })
    };
    let single = match storage {
        Storage::File { path, .. } if path.is_file() => file_name(path),
        Storage::Pvc { path, .. } => file_name(Path::new(path)),
        Storage::File { .. } => None,
        // The sidecar downloads it itself.
        Storage::Remote { uri } => return uri.clone(),
        Storage::Spec { path, .. } => return path.clone(),
    };
    match single {
        Some(file) => format!("{MODELS_DIR}/{file}"),
        None => MODELS_DIR.to_owned(),
    }
}

/// The sidecar's command line (after the image's `meshserve` entrypoint).
pub fn sidecar_args(
    isvc: &InferenceService,
    revision: &RevisionSpec,
    settings: &Settings,
) -> Vec<String> {
    let storage_flag = match revision.storage {
        Storage::Spec { .. } => "--storage-spec-path",
        _ => "--storage",
    };
    let mut args: Vec<String> = [
        "serve",
        storage_flag,
        &model_path(&revision.storage),
        "--model-name",
        &isvc.name,
        "--scratch-dir",
        SCRATCH_DIR,
        "--host",
        "0.0.0.0",
        "--http-port",
        &HTTP_PORT.to_string(),
        "--grpc-port",
        &GRPC_PORT.to_string(),
        "--log-format",
        "json",
    ]
    .map(str::to_owned)
    .to_vec();
    if matches!(
        revision.storage,
        Storage::Remote { .. } | Storage::Spec { .. }
    ) || revision.format.is_some()
    {
        // Downloads and conversions land in the pod's scratch volume.
        args.extend([
            "--storage-cache".to_owned(),
            format!("{SCRATCH_DIR}/storage"),
        ]);
    }
    args.extend(batcher_args(revision.batcher));
    args.extend(model_args(revision));
    if revision.scaling.min_replicas == Some(0) {
        // The activators in front see it go before it stops accepting.
        args.extend(["--drain-grace-ms".to_owned(), DRAIN_GRACE_MS.to_string()]);
    }
    if let Some(n) = revision.scaling.container_concurrency {
        args.extend(["--max-in-flight".to_owned(), n.to_string()]);
    }
    if isvc.transformer.is_some() {
        args.extend([
            "--transformer".to_owned(),
            format!("{TRANSFORMER_DIR}/{TRANSFORMER_FILE}"),
        ]);
    }
    if let Some(logger) = &revision.logger {
        args.extend(logger_args(logger, SPOOL_DIR));
    }
    if let Some(otlp) = &settings.otlp {
        args.extend(otlp_args(isvc, revision, otlp, settings.trace_sampling));
    }
    args
}

/// A revision's payload logging as `meshserve serve` flags: its sink, its mode, the spool.
pub fn logger_args(logger: &RevisionLogger, spool: &str) -> Vec<String> {
    let mut args = vec![
        "--log-sink".to_owned(),
        logger.url.clone(),
        "--log-spool".to_owned(),
        spool.to_owned(),
    ];
    if logger.batched {
        args.push("--log-sink-batch".to_owned());
    }
    args
}

/// The model's format as `meshserve serve` flags, for a format the sidecar converts, and
/// its built-in explainer.
pub fn model_args(revision: &RevisionSpec) -> Vec<String> {
    let mut args = match revision.format {
        Some(format) => vec!["--model-format".to_owned(), format.name().to_owned()],
        None => Vec::new(),
    };
    if let Some(explainer) = &revision.explainer {
        args.extend(["--explainer".to_owned(), explainer.clone()]);
    }
    args
}

/// KServe's batcher as `meshserve serve` flags.
pub fn batcher_args(batcher: Option<Batcher>) -> Vec<String> {
    let Some((size, latency)) = batcher else {
        return Vec::new();
    };
    let mut args = vec!["--batcher".to_owned()];
    if let Some(size) = size {
        args.extend(["--batcher-max-batch-size".to_owned(), size.to_string()]);
    }
    if let Some(ms) = latency {
        args.extend(["--batcher-max-latency-ms".to_owned(), ms.to_string()]);
    }
    args
}

/// The sidecar's tracing flags: its spans go to `endpoint` as `<isvc>-predictor`, with the
/// InferenceService, namespace and revision as resource attributes.
pub fn otlp_args(
    isvc: &InferenceService,
    revision: &RevisionSpec,
    endpoint: &str,
    sampling: f64,
) -> Vec<String> {
    vec![
        "--trace-sampling".to_owned(),
        sampling.to_string(),
        "--otlp-endpoint".to_owned(),
        endpoint.to_owned(),
        "--otlp-service-name".to_owned(),
        format!("{}-predictor", isvc.name),
        "--otlp-resource".to_owned(),
        format!(
            "serving.kserve.io/inferenceservice={},k8s.namespace.name={},meshserve.revision={}",
            isvc.name, isvc.namespace, revision.name
        ),
    ]
}

/// Where a `file://` location is in the models claim: its path as written, normalized, with
/// the `..` that climb out of the InferenceService's directory dropped
/// (`file://../../models/m.onnx` is `models/m.onnx` in the claim).
pub fn claim_path(relative: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for part in relative.components() {
        match part {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    parts.join("/")
}

/// `to` relative to the directory `from` (both absolute), for paths written into files that
/// move with their directory.
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component<'_>> = from.components().collect();
    let to_parts: Vec<Component<'_>> = to.components().collect();
    let common = from
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to_parts[common..] {
        out.push(part.as_os_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(name("digits", "digits-predictor"), "digits-predictor");
        assert_eq!(name("digits", "v2"), "digits-v2");
        assert_eq!(
            relative(
                Path::new("/a/b/out/compose"),
                Path::new("/a/b/models/m.onnx")
            ),
            PathBuf::from("../../models/m.onnx")
        );
        assert_eq!(
            claim_path(Path::new("../../models/./m/../m.onnx")),
            "models/m.onnx"
        );
        assert_eq!(claim_path(Path::new("/abs/m.onnx")), "abs/m.onnx");
        assert_eq!(
            model_path(&Storage::Pvc {
                claim: "c".into(),
                path: "digits/model.onnx".into()
            }),
            "/mnt/models/model.onnx"
        );
        assert_eq!(
            model_path(&Storage::Pvc {
                claim: "c".into(),
                path: "digits".into()
            }),
            "/mnt/models"
        );
    }
}
