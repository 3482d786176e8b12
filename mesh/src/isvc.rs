//! The KServe `serving.kserve.io/v1beta1` InferenceService subset that `meshserve up` runs:
//! `metadata.name` / `namespace`, `spec.predictor` (`name`, `model.modelFormat.name: onnx`,
//! `model.storageUri`, `canaryTrafficPercent`), standard mode's `spec.canary[]`
//! (`predictor`, `trafficPercent`), and meshserve's `spec.shadow` (the same shape: a revision
//! that gets a copy of `trafficPercent`% of the requests). Fields that only matter on Kubernetes (resources, replicas,
//! service accounts) are accepted and ignored; fields meshserve cannot honour locally are
//! refused with their path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshserve_predictor::convert::Format;
use serde::Deserialize;
use serde_json::Value;

use crate::auth::Jwt;

/// An InferenceService that cannot run, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct IsvcError {
    pub path: String,
    pub message: String,
}

fn error(path: &str, message: impl Into<String>) -> IsvcError {
    IsvcError {
        path: path.to_owned(),
        message: message.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Raw {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: RawMetadata,
    spec: RawSpec,
    /// What a cluster reports (`kubectl get -o yaml`); not configuration.
    #[serde(rename = "status")]
    _status: Option<Value>,
}

/// Kubernetes metadata; fields other than these (uid, resourceVersion, ...) are the
/// cluster's and are ignored.
#[derive(Debug, Deserialize)]
struct RawMetadata {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    predictor: Option<RawPredictor>,
    #[serde(default)]
    canary: Vec<RawCanary>,
    /// meshserve's shadow revision: a `spec.canary[]`-shaped entry whose `trafficPercent` is
    /// the share of requests copied to it.
    shadow: Option<RawCanary>,
    transformer: Option<Value>,
    explainer: Option<Value>,
}

/// KServe's predictor: the component extension fields meshserve honours, the model, and the
/// pod fields passed to the rendered Kubernetes Deployment.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPredictor {
    name: Option<String>,
    canary_traffic_percent: Option<i64>,
    model: Option<RawModel>,
    /// KServe's framework shorthands (`spec.predictor.onnx: {storageUri: ...}`).
    onnx: Option<RawModel>,
    sklearn: Option<RawModel>,
    xgboost: Option<RawModel>,
    lightgbm: Option<RawModel>,
    pytorch: Option<RawModel>,
    tensorflow: Option<RawModel>,
    triton: Option<RawModel>,
    batcher: Option<RawBatcher>,
    logger: Option<RawLogger>,
    min_replicas: Option<i64>,
    max_replicas: Option<i64>,
    scale_metric: Option<String>,
    scale_target: Option<i64>,
    container_concurrency: Option<i64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    service_account_name: Option<String>,
    node_selector: Option<Value>,
    tolerations: Option<Value>,
    affinity: Option<Value>,
    image_pull_secrets: Option<Value>,
    deployment_strategy: Option<Value>,
}

/// KServe's `logger` (`mode`, `url`, `metadataHeaders`; `metadataAnnotations` only matter on
/// Kubernetes) plus meshserve's `samplingPercent`, `maxPayloadBytes` and `cloudEventsBatch`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawLogger {
    mode: Option<String>,
    url: Option<String>,
    #[serde(default)]
    metadata_headers: Vec<String>,
    #[serde(rename = "metadataAnnotations")]
    _metadata_annotations: Option<Value>,
    sampling_percent: Option<i64>,
    max_payload_bytes: Option<u64>,
    cloud_events_batch: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawModel {
    /// `spec.predictor.model` only (a shorthand's key is its format).
    model_format: Option<RawFormat>,
    /// KServe's ServingRuntime: meshserve is the one runtime, whatever it names.
    #[serde(rename = "runtime")]
    _runtime: Option<String>,
    /// The runtime's version (KServe picks the server image by it): not meshserve's.
    #[serde(rename = "runtimeVersion")]
    _runtime_version: Option<String>,
    /// The container's name (KServe's `kserve-container`).
    #[serde(rename = "name")]
    _name: Option<String>,
    storage_uri: Option<String>,
    /// KServe's storage spec: an entry of the storage-config secret, instead of `storageUri`.
    storage: Option<RawStorage>,
    /// v1, v2 or grpc-v2: the sidecar serves all of them.
    protocol_version: Option<String>,
    resources: Option<Value>,
    env: Option<Value>,
    /// The KServe server's command line: refused with the reason.
    args: Option<Value>,
}

/// KServe's `storage`: `key` names the storage-config secret's entry, `path` the model in the
/// bucket, `parameters` override the entry (`bucket`, `type`, ...).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawStorage {
    key: Option<String>,
    path: Option<String>,
    parameters: Option<BTreeMap<String, String>>,
    /// Declared by KServe and read nowhere.
    #[serde(rename = "schemaPath")]
    _schema_path: Option<Value>,
}

/// KServe's `batcher`: `maxBatchSize` rows, `maxLatency` in milliseconds.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawBatcher {
    max_batch_size: Option<u64>,
    max_latency: Option<u64>,
    /// KServe's batcher timeout (seconds); meshserve's queue timeout is the request's.
    #[serde(rename = "timeout")]
    _timeout: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFormat {
    name: Option<String>,
    /// The format's version (an ONNX opset, say): ONNX Runtime reads it from the file.
    #[serde(rename = "version")]
    _version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCanary {
    name: Option<String>,
    predictor: Option<RawPredictor>,
    traffic_percent: Option<i64>,
}

/// Where a revision's model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// `file://PATH`, relative to the InferenceService's file: `path` is where it is here,
    /// `relative` as written (Kubernetes finds it at that path in the models claim).
    File { path: PathBuf, relative: PathBuf },
    /// `pvc://CLAIM/PATH` (KServe's): a PersistentVolumeClaim, on Kubernetes only.
    Pvc { claim: String, path: String },
    /// `s3://`, `gs://`, Azure Blob or `http(s)://`: downloaded by the sidecar
    /// ([`meshserve_predictor::remote`]); by `meshserve up` before it starts the sidecar.
    Remote { uri: String },
    /// KServe's storage spec: `path` in the bucket of the storage-config secret's entry `key`
    /// (KServe's default `default`), with `parameters` over it. On Kubernetes the sidecar
    /// reads the entry from the secret; `meshserve up` from `$STORAGE_CONFIG`.
    Spec {
        key: String,
        path: String,
        parameters: BTreeMap<String, String>,
    },
}

impl Storage {
    /// The model's location on this machine, for `meshserve up`.
    pub fn local(&self) -> Option<&Path> {
        match self {
            Storage::File { path, .. } => Some(path),
            Storage::Pvc { .. } | Storage::Remote { .. } | Storage::Spec { .. } => None,
        }
    }

    /// The model names a revision with this storage serves: its InferenceService's name for
    /// one model (and for a claim or a remote location, not read while rendering), else its
    /// repository's.
    pub fn models(&self, isvc: &str, format: Option<Format>) -> Result<Vec<String>, String> {
        match self.local() {
            Some(path) => meshserve_predictor::storage::model_names(path, isvc, format),
            None => Ok(vec![isvc.to_owned()]),
        }
    }
}

/// KServe's scaling fields on a revision, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scaling {
    /// `minReplicas` (KServe's default 1; 0 scales to zero).
    pub min_replicas: Option<u32>,
    /// `maxReplicas` (at least `minReplicas` and 1).
    pub max_replicas: Option<u32>,
    pub metric: Option<ScaleMetric>,
    /// `scaleTarget`: per cent for cpu and memory, requests for concurrency, per second for rps.
    pub target: Option<u32>,
    /// `containerConcurrency`: requests one replica runs at once (the sidecar's
    /// `--max-in-flight`); 0 or absent: the sidecar's default.
    pub container_concurrency: Option<u32>,
}

/// KServe's `scaleMetric`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleMetric {
    Cpu,
    Memory,
    Concurrency,
    Rps,
}

impl ScaleMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleMetric::Cpu => "cpu",
            ScaleMetric::Memory => "memory",
            ScaleMetric::Concurrency => "concurrency",
            ScaleMetric::Rps => "rps",
        }
    }

    /// KServe's and Knative's defaults: 80% for cpu and memory, 100 requests in flight, 200
    /// requests a second.
    pub fn default_target(self) -> u32 {
        match self {
            ScaleMetric::Cpu | ScaleMetric::Memory => 80,
            ScaleMetric::Concurrency => 100,
            ScaleMetric::Rps => 200,
        }
    }
}

/// The Kubernetes-only parts of a revision, passed to its rendered Deployment as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSettings {
    /// `model.resources` (requests and limits) for the sidecar container.
    pub resources: Option<Value>,
    /// `model.env`, added to the sidecar container's.
    pub env: Option<Value>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub service_account_name: Option<String>,
    pub node_selector: Option<Value>,
    pub tolerations: Option<Value>,
    pub affinity: Option<Value>,
    pub image_pull_secrets: Option<Value>,
    pub deployment_strategy: Option<Value>,
}

/// A revision to run: a predictor sidecar over a model location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionSpec {
    pub name: String,
    /// The model: a directory (one model in Triton's layout, or a repository of several) or
    /// one `.onnx` file.
    pub storage: Storage,
    pub scaling: Scaling,
    pub pod: PodSettings,
    pub percent: i64,
    /// KServe's `spec.predictor.batcher`: (`maxBatchSize`, `maxLatency` in ms), if given.
    pub batcher: Option<(Option<u64>, Option<u64>)>,
    /// Payload logging.
    pub logger: Option<RevisionLogger>,
    /// The model's format when the sidecar converts it to ONNX as it loads (sklearn,
    /// xgboost, lightgbm); `None` for ONNX.
    pub format: Option<Format>,
    /// KServe's `PREDICT_PROBA=true` in the predictor's `env`: scikit-learn classifiers
    /// answer with probabilities.
    pub predict_proba: bool,
    /// `protocolVersion: v2` (or `grpc-v2`): callers such as a graph's steps speak the Open
    /// Inference Protocol to it.
    pub v2: bool,
    /// `spec.explainer`'s built-in explainer as the model's config.yaml `explainer` (JSON),
    /// for the sidecar's `--explainer`: every serving revision explains its own model.
    pub explainer: Option<String>,
}

/// A revision's payload logging: the sink its sidecar delivers to, and the filter's part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionLogger {
    /// `http://...` or `file:///...` (KServe's `url`).
    pub url: String,
    /// meshserve's `cloudEventsBatch`: the sidecar sends the sink many events per request, in
    /// CloudEvents' batched mode (an HTTP sink only).
    pub batched: bool,
    /// The filter configuration's `logger` object.
    pub filter: Value,
}

/// A validated InferenceService.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceService {
    pub name: String,
    pub namespace: String,
    pub default: RevisionSpec,
    pub canaries: Vec<RevisionSpec>,
    /// meshserve's `spec.shadow`: a revision that gets a copy of `percent`% of the requests;
    /// its answers go nowhere but to the router's verdict (does it predict what the serving
    /// revision predicted?), counted in Envoy's stats.
    pub shadow: Option<RevisionSpec>,
    /// meshserve's declarative transformer (`spec.transformer`), checked by the filters' own
    /// parser; passed to them as written.
    pub transformer: Option<Value>,
    /// The annotation `serving.kserve.io/autoscalerClass`: hpa (KServe's default), keda,
    /// none or external.
    pub autoscaler: Autoscaler,
    /// `metadata.labels` and `metadata.annotations`, carried to what is rendered.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The annotation [`PUBLIC_CONTROL_API`]: whether the mesh's public listener passes this
    /// service's control APIs (repository load/unload/index, statistics) to its predictors.
    /// Off by default: they answer on the predictor's own port only.
    pub public_control_api: bool,
    /// The `serving.meshserve.io/jwt-*` annotations: the token every call needs.
    pub jwt: Option<Jwt>,
}

/// Knative's annotation: how long a revision scaled to zero keeps its last replica after
/// its last request. `meshserve up` stops a `minReplicas: 0` revision's sidecar after it;
/// on an InferenceService's or a predictor's metadata.
pub const RETENTION_PERIOD: &str = "autoscaling.knative.dev/scale-to-zero-pod-retention-period";
/// Without [`RETENTION_PERIOD`]: Knative's scale-to-zero grace period, 30 s.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30);

impl InferenceService {
    /// How long `revision` (at `minReplicas: 0`) stays up after its last request: its
    /// predictor's [`RETENTION_PERIOD`] annotation, else the InferenceService's, else
    /// [`DEFAULT_RETENTION`]. Both are checked when the file is read.
    pub fn retention(&self, revision: &RevisionSpec) -> Duration {
        revision
            .pod
            .annotations
            .get(RETENTION_PERIOD)
            .or_else(|| self.annotations.get(RETENTION_PERIOD))
            .and_then(|text| go_duration(text).ok())
            .unwrap_or(DEFAULT_RETENTION)
    }
}

/// A Go duration as Knative's annotations take them: `30s`, `1m30s`, `1.5s`, `500ms`, `2h`.
pub fn go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("'{text}' is not a duration such as 30s, 1m30s or 500ms");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, tail) = rest.split_at(number_len);
        let value: f64 = number.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += value * seconds;
        rest = tail;
    }
    // A day at most: longer reads as a mistake.
    if !(0.0..=86_400.0).contains(&total) {
        return Err(format!("'{text}' is over 24h"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// meshserve's annotation that opens an InferenceService's control APIs to the mesh's
/// clients, as KServe leaves them (`"true"`; default `"false"`).
pub const PUBLIC_CONTROL_API: &str = "serving.meshserve.io/public-control-api";

/// Who scales a revision's Deployment (`serving.kserve.io/autoscalerClass`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Autoscaler {
    /// A HorizontalPodAutoscaler on cpu or memory; KEDA where the revision scales to zero
    /// or on requests.
    #[default]
    Hpa,
    /// A KEDA ScaledObject always.
    Keda,
    /// Nothing: `minReplicas` replicas.
    None,
    /// Something else the user runs: no replicas set, no autoscaler rendered.
    External,
}

/// KServe's annotation naming the autoscaler.
pub const AUTOSCALER_CLASS: &str = "serving.kserve.io/autoscalerClass";

impl InferenceService {
    /// Parses the YAML of one InferenceService; `file://` paths are relative to `base`.
    pub fn parse(yaml: &str, base: &Path) -> Result<InferenceService, IsvcError> {
        let raw: Raw = serde_yaml::from_str(yaml).map_err(yaml_error)?;
        if let Some(api) = &raw.api_version
            && !api.starts_with("serving.kserve.io/")
        {
            return Err(error(
                "apiVersion",
                format!("'{api}' is not serving.kserve.io/v1beta1"),
            ));
        }
        if let Some(kind) = &raw.kind
            && kind != "InferenceService"
        {
            return Err(error("kind", format!("'{kind}' is not InferenceService")));
        }
        let name = raw
            .metadata
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| error("metadata.name", "is required"))?;
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(error(
                "metadata.name",
                format!("'{name}' must be lower-case letters, digits and '-' (a DNS label)"),
            ));
        }
        let namespace = raw
            .metadata
            .namespace
            .unwrap_or_else(|| "default".to_owned());
        let transformer = raw.spec.transformer.map(check_transformer).transpose()?;
        let explainer = raw.spec.explainer.map(check_explainer).transpose()?;
        let predictor = raw
            .spec
            .predictor
            .ok_or_else(|| error("spec.predictor", "is required"))?;
        let canary_percent = predictor.canary_traffic_percent;
        let default = revision(
            "spec.predictor",
            predictor,
            format!("{name}-predictor"),
            0,
            base,
        )?;
        let mut canaries = Vec::new();
        for (i, canary) in raw.spec.canary.into_iter().enumerate() {
            let path = format!("spec.canary[{i}]");
            let inherited = if i == 0 { canary_percent } else { None };
            let fallback = format!("{name}-canary-{}", i + 1);
            canaries.push(extra_revision(&path, canary, inherited, fallback, base)?);
        }
        let shadow = raw
            .spec
            .shadow
            .map(|s| extra_revision("spec.shadow", s, None, format!("{name}-shadow"), base))
            .transpose()?;
        if shadow
            .as_ref()
            .is_some_and(|s| s.scaling.min_replicas == Some(0))
        {
            return Err(error(
                "spec.shadow.predictor.minReplicas",
                "a shadow cannot scale to zero: its copies are the router's call-outs, which no autoscaler sees as requests",
            ));
        }
        if shadow.as_ref().is_some_and(|s| s.logger.is_some()) {
            return Err(error(
                "spec.shadow.predictor.logger",
                "a shadow's answers reach no client, so there is nothing to log: its verdicts are in Envoy's stats (wasmcustom.meshserve.shadow.*)",
            ));
        }
        if canaries.is_empty() && canary_percent.is_some_and(|p| p > 0) {
            return Err(error(
                "spec.predictor.canaryTrafficPercent",
                "needs the canary revision: list it under spec.canary[] (KServe's standard-mode form)",
            ));
        }
        let mut default = default;
        for revision in std::iter::once(&mut default).chain(canaries.iter_mut()) {
            revision.explainer.clone_from(&explainer);
        }
        let total: i64 = canaries.iter().map(|c| c.percent).sum();
        if total > 100 {
            return Err(error(
                "spec.canary",
                format!("traffic percents add up to {total}, over 100"),
            ));
        }
        let mut names = vec![&default.name];
        for (field, revision) in canaries
            .iter()
            .map(|c| ("spec.canary", c))
            .chain(shadow.iter().map(|s| ("spec.shadow", s)))
        {
            if names.contains(&&revision.name) {
                return Err(error(
                    field,
                    format!("revision name '{}' is used twice", revision.name),
                ));
            }
            names.push(&revision.name);
        }
        let autoscaler = match raw
            .metadata
            .annotations
            .get(AUTOSCALER_CLASS)
            .map(String::as_str)
        {
            None | Some("hpa") => Autoscaler::Hpa,
            Some("keda") => Autoscaler::Keda,
            Some("none") => Autoscaler::None,
            Some("external") => Autoscaler::External,
            Some(other) => {
                return Err(error(
                    &format!("metadata.annotations.{AUTOSCALER_CLASS}"),
                    format!("'{other}' is not one of hpa, keda, none, external"),
                ));
            }
        };
        let public_control_api = match raw
            .metadata
            .annotations
            .get(PUBLIC_CONTROL_API)
            .map(String::as_str)
        {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(error(
                    &format!("metadata.annotations.{PUBLIC_CONTROL_API}"),
                    format!("'{other}' is not \"true\" or \"false\""),
                ));
            }
        };
        let jwt = crate::auth::parse(&raw.metadata.annotations)
            .map_err(|(key, message)| error(&format!("metadata.annotations.{key}"), message))?;
        let annotated =
            std::iter::once(("metadata.annotations".to_owned(), &raw.metadata.annotations)).chain(
                std::iter::once(&default).chain(&canaries).map(|r| {
                    (
                        format!("the predictor annotations of revision {}", r.name),
                        &r.pod.annotations,
                    )
                }),
            );
        for (path, annotations) in annotated {
            if let Some(text) = annotations.get(RETENTION_PERIOD) {
                go_duration(text).map_err(|e| error(&format!("{path}.{RETENTION_PERIOD}"), e))?;
            }
        }
        Ok(InferenceService {
            jwt,
            name,
            namespace,
            default,
            canaries,
            shadow,
            transformer,
            autoscaler,
            public_control_api,
            labels: raw.metadata.labels,
            annotations: raw.metadata.annotations,
        })
    }
}

/// A `spec.canary[i]` or `spec.shadow` entry: its `trafficPercent` (or, for the first
/// canary, the predictor's `canaryTrafficPercent`), 0 to 100, and its predictor.
fn extra_revision(
    path: &str,
    entry: RawCanary,
    inherited: Option<i64>,
    fallback: String,
    base: &Path,
) -> Result<RevisionSpec, IsvcError> {
    let percent = entry
        .traffic_percent
        .or(inherited)
        .ok_or_else(|| error(&format!("{path}.trafficPercent"), "is required"))?;
    if !(0..=100).contains(&percent) {
        return Err(error(
            &format!("{path}.trafficPercent"),
            format!("{percent} is not between 0 and 100"),
        ));
    }
    let predictor = entry
        .predictor
        .ok_or_else(|| error(&format!("{path}.predictor"), "is required"))?;
    let fallback = entry.name.clone().unwrap_or(fallback);
    let mut spec = revision(
        &format!("{path}.predictor"),
        predictor,
        fallback,
        percent,
        base,
    )?;
    if let Some(n) = entry.name {
        spec.name = n;
    }
    Ok(spec)
}

/// KServe's transformer is a container; meshserve's is a pipeline the Envoy filter runs
/// (`request`, `response`, `limits`: see `meshserve_filter_core::transform`).
fn check_transformer(value: Value) -> Result<Value, IsvcError> {
    let path = "spec.transformer";
    if value.get("containers").is_some() {
        return Err(error(
            path,
            "meshserve runs transformers inside Envoy as declarative pipelines, not containers: give `request` and `response` steps (see docs/transformers.md)",
        ));
    }
    serde_json::from_value::<meshserve_filter_core::transform::Transformer>(value.clone())
        .map_err(|e| error(path, e.to_string()))?;
    Ok(value)
}

/// meshserve's built-in explainers under `spec.explainer`, beside KServe's `alibi` and `art`
/// keys: run by each predictor revision's sidecar on its own model.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawExplainer {
    kernel_shap: Option<RawKernelShap>,
    tree_shap: Option<RawTreeShap>,
    anchors: Option<RawAnchors>,
    occlusion: Option<RawOcclusion>,
    /// KServe's component `timeout`: seconds an explain request may take.
    timeout: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawKernelShap {
    background_file: String,
    max_coalitions: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTreeShap {
    background_file: String,
}

/// Alibi `AnchorTabular`'s parameters, camelCased.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAnchors {
    background_file: String,
    threshold: Option<f64>,
    delta: Option<f64>,
    tau: Option<f64>,
    batch_size: Option<u64>,
    beam_size: Option<u64>,
    min_samples_start: Option<u64>,
    max_anchor_size: Option<u64>,
    disc_perc: Option<Vec<f64>>,
    categorical_features: Option<Vec<u64>>,
    max_model_rows: Option<u64>,
    seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOcclusion {
    patch: Option<u64>,
    stride: Option<u64>,
    baseline: Option<f64>,
    layout: Option<String>,
    batch_size: Option<u64>,
}

/// `spec.explainer.anchors` as config.yaml's `anchors`, each bound checked where it is written.
fn check_anchors(at: &str, raw: RawAnchors, file: String) -> Result<Value, IsvcError> {
    let mut method = serde_json::json!({"background_file": file});
    for (key, name, value) in [
        ("threshold", "threshold", raw.threshold),
        ("delta", "delta", raw.delta),
        ("tau", "tau", raw.tau),
    ] {
        if let Some(v) = value {
            if !(v > 0.0 && v < 1.0) {
                return Err(error(
                    &format!("{at}.{name}"),
                    format!("{v} is not between 0 and 1"),
                ));
            }
            method[key] = v.into();
        }
    }
    let limit = meshserve_predictor::config::MAX_ANCHOR_ROWS as u64;
    let batch = meshserve_predictor::config::MAX_EXPLAIN_BATCH as u64;
    for (key, name, value, most) in [
        ("batch_size", "batchSize", raw.batch_size, batch),
        ("beam_size", "beamSize", raw.beam_size, 64),
        (
            "min_samples_start",
            "minSamplesStart",
            raw.min_samples_start,
            batch,
        ),
        ("max_anchor_size", "maxAnchorSize", raw.max_anchor_size, 64),
        ("max_model_rows", "maxModelRows", raw.max_model_rows, limit),
    ] {
        if let Some(n) = value {
            if n == 0 || n > most {
                return Err(error(
                    &format!("{at}.{name}"),
                    format!("{n} is not 1 to {most}"),
                ));
            }
            method[key] = n.into();
        }
    }
    if let Some(percentiles) = raw.disc_perc {
        if percentiles.iter().any(|p| !(0.0..=100.0).contains(p)) {
            return Err(error(&format!("{at}.discPerc"), "percentiles are 0 to 100"));
        }
        method["disc_perc"] = percentiles.into();
    }
    if let Some(columns) = raw.categorical_features {
        method["categorical_features"] = columns.into();
    }
    if let Some(seed) = raw.seed {
        method["seed"] = seed.into();
    }
    Ok(method)
}

fn check_occlusion(at: &str, raw: RawOcclusion) -> Result<Value, IsvcError> {
    let mut method = serde_json::json!({});
    for (key, name, value) in [
        ("patch", "patch", raw.patch),
        ("stride", "stride", raw.stride),
        ("batch_size", "batchSize", raw.batch_size),
    ] {
        if let Some(n) = value {
            let most = meshserve_predictor::occlusion::MAX_WINDOWS as u64;
            if n == 0 || n > most {
                return Err(error(
                    &format!("{at}.{name}"),
                    format!("{n} is not 1 to {most}"),
                ));
            }
            method[key] = n.into();
        }
    }
    if let Some(baseline) = raw.baseline {
        method["baseline"] = baseline.into();
    }
    if let Some(layout) = raw.layout {
        let lower = layout.to_ascii_lowercase();
        if !matches!(lower.as_str(), "nchw" | "nhwc") {
            return Err(error(
                &format!("{at}.layout"),
                format!("'{layout}' is not NCHW or NHWC"),
            ));
        }
        method["layout"] = lower.into();
    }
    Ok(method)
}

const ONE_EXPLAINER: &str = "needs exactly one built-in explainer: kernelShap (any tabular model), treeShap (a tree ensemble), anchors (a tabular classifier) or occlusion (an image model)";

/// `spec.explainer` as the sidecar's `--explainer` (config.yaml's `explainer`, JSON).
fn check_explainer(value: Value) -> Result<String, IsvcError> {
    let path = "spec.explainer";
    let refusals = [
        (
            "alibi",
            "KServe's Alibi explainer is gone (removed in KServe 0.13 after Alibi moved to the BSL licence) and ran pickled explainers: use meshserve's anchors (the same AnchorTabular rules, Alibi's defaults), kernelShap (any tabular model) or treeShap (tree ensembles), whose fitted state is a JSON file of rows next to the model, not a pickle (see docs/explainers.md)",
        ),
        (
            "art",
            "ART's SquareAttack finds adversarial examples, which is not an explanation: meshserve's explainers are kernelShap, treeShap, anchors and occlusion",
        ),
        (
            "containers",
            "meshserve explains the model in its predictor's sidecar, not in a container of its own: give kernelShap, treeShap, anchors or occlusion",
        ),
    ];
    if let Some((key, why)) = refusals.iter().find(|(k, _)| value.get(k).is_some()) {
        return Err(error(&format!("{path}.{key}"), *why));
    }
    let raw: RawExplainer = serde_json::from_value(value).map_err(|e| {
        error(
            path,
            format!(
                "{e} (the explainer runs in each predictor revision's sidecar and scales with it: no replicas or resources of its own)"
            ),
        )
    })?;
    let relative = |at: &str, file: &str| {
        let plain = !file.is_empty()
            && Path::new(file)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if plain {
            Ok(file.to_owned())
        } else {
            Err(error(
                at,
                format!("'{file}' must be a relative path inside the model's storage"),
            ))
        }
    };
    let mut out = serde_json::Map::new();
    let methods = usize::from(raw.kernel_shap.is_some())
        + usize::from(raw.tree_shap.is_some())
        + usize::from(raw.anchors.is_some())
        + usize::from(raw.occlusion.is_some());
    if methods > 1 {
        return Err(error(path, ONE_EXPLAINER));
    }
    if let Some(anchors) = raw.anchors {
        let at = format!("{path}.anchors");
        let file = relative(&format!("{at}.backgroundFile"), &anchors.background_file)?;
        out.insert("anchors".into(), check_anchors(&at, anchors, file)?);
    }
    if let Some(occlusion) = raw.occlusion {
        out.insert(
            "occlusion".into(),
            check_occlusion(&format!("{path}.occlusion"), occlusion)?,
        );
    }
    match (raw.kernel_shap, raw.tree_shap) {
        _ if !out.is_empty() => {}
        (Some(shap), None) => {
            let at = format!("{path}.kernelShap");
            let file = relative(&format!("{at}.backgroundFile"), &shap.background_file)?;
            let mut method = serde_json::json!({"background_file": file});
            if let Some(n) = shap.max_coalitions {
                let limit = meshserve_predictor::config::MAX_COALITIONS as u64;
                if n == 0 || n > limit {
                    return Err(error(
                        &format!("{at}.maxCoalitions"),
                        format!("{n} is not 1 to {limit}"),
                    ));
                }
                method["max_coalitions"] = n.into();
            }
            out.insert("kernel_shap".into(), method);
        }
        (None, Some(tree)) => {
            let file = relative(
                &format!("{path}.treeShap.backgroundFile"),
                &tree.background_file,
            )?;
            out.insert(
                "tree_shap".into(),
                serde_json::json!({"background_file": file}),
            );
        }
        _ => return Err(error(path, ONE_EXPLAINER)),
    }
    if let Some(seconds) = raw.timeout {
        let limit = meshserve_predictor::config::MAX_EXPLAIN_TIMEOUT_MS / 1000;
        if seconds == 0 || seconds > limit {
            return Err(error(
                &format!("{path}.timeout"),
                format!("{seconds} seconds is not 1 to {limit}"),
            ));
        }
        out.insert("timeout_ms".into(), (seconds * 1000).into());
    }
    Ok(Value::Object(out).to_string())
}

fn revision(
    path: &str,
    mut predictor: RawPredictor,
    fallback: String,
    percent: i64,
    base: &Path,
) -> Result<RevisionSpec, IsvcError> {
    let scaling = scaling(path, &predictor)?;
    let (model_path, format_path, format, model) = model_form(path, &mut predictor)?;
    match format.to_ascii_lowercase().as_str() {
        // ONNX, and the frameworks whose ONNX exports KServe users put under their own key
        // (a TorchScript file or a SavedModel is refused when the sidecar reads the storage,
        // naming the export step). Triton's repository of ONNX models serves as it is.
        "onnx" | "pytorch" | "tensorflow" | "triton" => {}
        // Converted to ONNX by the sidecar when the model loads.
        "sklearn" | "xgboost" | "lightgbm" => {}
        _ => {
            return Err(error(
                &format_path,
                format!(
                    "'{format}' is not supported: meshserve serves onnx (convert with skl2onnx, onnxmltools, tf2onnx, torch.onnx)"
                ),
            ));
        }
    }
    if model.args.is_some() {
        return Err(error(
            &format!("{model_path}.args"),
            "are the command line of KServe's server for the model (--nthread, --workers, ...); meshserve's sidecar is the runtime and takes none: set its limits in the model's config.yaml or the predictor's fields",
        ));
    }
    let converted = Format::parse(&format);
    let storage = match (model.storage_uri, model.storage) {
        (Some(_), Some(_)) => {
            return Err(error(
                &format!("{model_path}.storage"),
                "give storageUri or storage, not both",
            ));
        }
        (None, None) => {
            return Err(error(
                &format!("{model_path}.storageUri"),
                "is required (or KServe's storage spec)",
            ));
        }
        (Some(uri), None) => storage(&format!("{model_path}.storageUri"), &uri, base)?,
        (None, Some(spec)) => storage_spec(&format!("{model_path}.storage"), spec)?,
    };
    let predict_proba = env_flag(model.env.as_ref(), "PREDICT_PROBA");
    if let Some(protocol) = &model.protocol_version
        && !["v1", "v2", "grpc-v2"].contains(&protocol.as_str())
    {
        return Err(error(
            &format!("{model_path}.protocolVersion"),
            format!("'{protocol}' is not v1, v2 or grpc-v2 (the sidecar serves all three)"),
        ));
    }
    let logger = predictor
        .logger
        .map(|l| logger(&format!("{path}.logger"), l))
        .transpose()?;
    if let Some(name) = &predictor.name
        && !is_dns_label(name)
    {
        return Err(error(
            &format!("{path}.name"),
            format!("'{name}' must be lower-case letters, digits and '-' (a DNS label)"),
        ));
    }
    Ok(RevisionSpec {
        name: predictor.name.unwrap_or(fallback),
        storage,
        percent,
        batcher: predictor.batcher.map(|b| (b.max_batch_size, b.max_latency)),
        logger,
        format: converted,
        predict_proba,
        v2: model.protocol_version.as_deref().is_some_and(|p| p != "v1"),
        explainer: None,
        scaling,
        pod: PodSettings {
            resources: model.resources,
            env: model.env,
            labels: predictor.labels,
            annotations: predictor.annotations,
            service_account_name: predictor.service_account_name,
            node_selector: predictor.node_selector,
            tolerations: predictor.tolerations,
            affinity: predictor.affinity,
            image_pull_secrets: predictor.image_pull_secrets,
            deployment_strategy: predictor.deployment_strategy,
        },
    })
}

/// Whether a container's `env` (a list of `{name, value}`) sets `name` to `true`, as KServe's
/// servers read their flags (any case).
fn env_flag(env: Option<&Value>, name: &str) -> bool {
    env.and_then(Value::as_array).is_some_and(|vars| {
        vars.iter().any(|v| {
            v.get("name").and_then(Value::as_str) == Some(name)
                && v.get("value")
                    .and_then(Value::as_str)
                    .is_some_and(meshserve_predictor::convert::is_true)
        })
    })
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The predictor's model, in whichever of KServe's forms it is given: `model` (with
/// `modelFormat.name`) or one framework key. Returns the model's path, the path of the field
/// that names its format, the format and the model; two forms at once, or none, is an error.
fn model_form(
    path: &str,
    predictor: &mut RawPredictor,
) -> Result<(String, String, String, RawModel), IsvcError> {
    let mut forms: Vec<(&str, RawModel)> = [
        ("model", predictor.model.take()),
        ("onnx", predictor.onnx.take()),
        ("sklearn", predictor.sklearn.take()),
        ("xgboost", predictor.xgboost.take()),
        ("lightgbm", predictor.lightgbm.take()),
        ("pytorch", predictor.pytorch.take()),
        ("tensorflow", predictor.tensorflow.take()),
        ("triton", predictor.triton.take()),
    ]
    .into_iter()
    .filter_map(|(key, model)| Some((key, model?)))
    .collect();
    if forms.len() > 1 {
        let keys: Vec<&str> = forms.iter().map(|(k, _)| *k).collect();
        return Err(error(
            path,
            format!("give the model once: {} are all set", keys.join(", ")),
        ));
    }
    let Some((key, mut model)) = forms.pop() else {
        return Err(error(
            &format!("{path}.model"),
            "is required (or one of KServe's framework keys: onnx, sklearn, xgboost, lightgbm, pytorch, tensorflow, triton)",
        ));
    };
    let model_path = format!("{path}.{key}");
    let (format_path, format) = if key == "model" {
        let name = model
            .model_format
            .take()
            .and_then(|f| f.name)
            .unwrap_or_default();
        (format!("{model_path}.modelFormat.name"), name)
    } else if model.model_format.is_some() {
        return Err(error(
            &format!("{model_path}.modelFormat"),
            format!("belongs to spec.predictor.model; under {key} the format is {key}"),
        ));
    } else {
        (model_path.clone(), key.to_owned())
    };
    Ok((model_path, format_path, format, model))
}

/// KServe's storage spec, checked: a path, and an s3 type where `parameters` give one.
fn storage_spec(path: &str, spec: RawStorage) -> Result<Storage, IsvcError> {
    let parameters = spec.parameters.unwrap_or_default();
    if let Some(kind) = parameters.get("type")
        && kind != "s3"
    {
        return Err(error(
            &format!("{path}.parameters.type"),
            format!(
                "'{kind}' is not read: meshserve reads s3 storage specs (give other stores as storageUri)"
            ),
        ));
    }
    let model = spec.path.unwrap_or_default();
    if model.trim_matches('/').is_empty() {
        return Err(error(
            &format!("{path}.path"),
            "is required: the model's path in the bucket",
        ));
    }
    let key = spec.key.unwrap_or_else(|| match parameters.get("type") {
        Some(kind) => format!("default_{kind}"),
        None => "default".to_owned(),
    });
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(error(
            &format!("{path}.key"),
            format!("'{key}' is not a secret key name"),
        ));
    }
    Ok(Storage::Spec {
        key,
        path: model,
        parameters,
    })
}

/// `file://` (relative to the InferenceService's file, which must exist here) or `pvc://`.
fn storage(path: &str, uri: &str, base: &Path) -> Result<Storage, IsvcError> {
    if let Some(local) = uri.strip_prefix("file://") {
        let relative = PathBuf::from(local);
        let full = base.join(&relative);
        if !full.exists() {
            return Err(error(path, format!("{} does not exist", full.display())));
        }
        return Ok(Storage::File {
            path: full,
            relative,
        });
    }
    if let Some(rest) = uri.strip_prefix("pvc://") {
        let (claim, inner) = rest.split_once('/').unwrap_or((rest, ""));
        if !is_dns_label(claim) {
            return Err(error(
                path,
                format!("'{uri}': '{claim}' is not a PersistentVolumeClaim name"),
            ));
        }
        return Ok(Storage::Pvc {
            claim: claim.to_owned(),
            path: inner.trim_matches('/').to_owned(),
        });
    }
    if meshserve_predictor::remote::is_remote(uri) {
        let (_, rest) = uri.split_once("://").unwrap_or_default();
        if rest.split('/').next().is_none_or(str::is_empty) {
            return Err(error(path, format!("'{uri}' names no bucket or host")));
        }
        if rest.contains('@') {
            return Err(error(
                path,
                "credentials do not belong in the URI: give them in the environment (docs/reference.md#remote-storage)",
            ));
        }
        return Ok(Storage::Remote {
            uri: uri.to_owned(),
        });
    }
    Err(error(
        path,
        format!(
            "'{uri}': meshserve reads file:// (relative to this file), pvc://CLAIM/PATH, s3://, gs://, https://ACCOUNT.blob.core.windows.net/... and http(s)://"
        ),
    ))
}

fn scaling(path: &str, predictor: &RawPredictor) -> Result<Scaling, IsvcError> {
    let count = |field: &str, value: Option<i64>| -> Result<Option<u32>, IsvcError> {
        value
            .map(|v| {
                u32::try_from(v).map_err(|_| {
                    error(
                        &format!("{path}.{field}"),
                        format!("{v} is not a whole number of 0 or more"),
                    )
                })
            })
            .transpose()
    };
    let min_replicas = count("minReplicas", predictor.min_replicas)?;
    let max_replicas = count("maxReplicas", predictor.max_replicas)?;
    if let (Some(min), Some(max)) = (min_replicas, max_replicas)
        && max > 0
        && min > max
    {
        return Err(error(
            &format!("{path}.maxReplicas"),
            format!("{max} is below minReplicas {min}"),
        ));
    }
    let metric = match predictor.scale_metric.as_deref() {
        None => None,
        Some("cpu") => Some(ScaleMetric::Cpu),
        Some("memory") => Some(ScaleMetric::Memory),
        Some("concurrency") => Some(ScaleMetric::Concurrency),
        Some("rps") => Some(ScaleMetric::Rps),
        Some(other) => {
            return Err(error(
                &format!("{path}.scaleMetric"),
                format!("'{other}' is not one of cpu, memory, concurrency, rps"),
            ));
        }
    };
    let target = count("scaleTarget", predictor.scale_target)?;
    if target == Some(0) {
        return Err(error(&format!("{path}.scaleTarget"), "must be above 0"));
    }
    Ok(Scaling {
        min_replicas,
        max_replicas,
        metric,
        target,
        container_concurrency: count("containerConcurrency", predictor.container_concurrency)?
            .filter(|&c| c > 0),
    })
}

/// A YAML error, with the path serde_yaml tracked (`spec.predictor: unknown field ...`)
/// as the field at fault.
fn yaml_error(e: serde_yaml::Error) -> IsvcError {
    let text = e.to_string();
    match text.split_once(": ") {
        Some((path, message))
            if !path.contains(' ')
                && (path.starts_with("spec") || path.starts_with("metadata")) =>
        {
            let message = match message.split_once(", expected") {
                Some((unknown, _)) if unknown.starts_with("unknown field") => format!(
                    "{unknown}: meshserve does not support it (docs/reference.md lists the fields it reads)"
                ),
                _ => message.to_owned(),
            };
            error(path, message)
        }
        _ => error("(document)", text),
    }
}

fn logger(path: &str, raw: RawLogger) -> Result<RevisionLogger, IsvcError> {
    let url = raw
        .url
        .filter(|u| !u.is_empty())
        .ok_or_else(|| error(&format!("{path}.url"), "is required: where the events go"))?;
    let sink = meshserve_filter_core::sink::SinkSpec::parse(&url, u64::MAX)
        .map_err(|e| error(&format!("{path}.url"), e))?;
    let batched = raw.cloud_events_batch.unwrap_or(false);
    if batched && !matches!(sink, meshserve_filter_core::sink::SinkSpec::Http(_)) {
        return Err(error(
            &format!("{path}.cloudEventsBatch"),
            "applies to an http:// sink (a file sink always writes many events at once)",
        ));
    }
    let mode = raw
        .mode
        .unwrap_or_else(|| "all".into())
        .to_ascii_lowercase();
    let headers: Vec<String> = raw
        .metadata_headers
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    let mut filter = serde_json::json!({"mode": mode, "metadata_headers": headers});
    if let Some(map) = filter.as_object_mut() {
        if let Some(p) = raw.sampling_percent {
            map.insert("sampling_percent".into(), p.into());
        }
        if let Some(b) = raw.max_payload_bytes {
            map.insert("max_payload_bytes".into(), b.into());
        }
    }
    // The filters' own parser, so what `up` accepts the filter does too.
    let checked: meshserve_filter_core::logger::LoggerConfig =
        serde_json::from_value(filter.clone()).map_err(|e| error(path, e.to_string()))?;
    checked.check(path).map_err(|e| {
        error(
            path,
            e.trim_start_matches(path)
                .trim_start_matches('.')
                .replace("sampling_percent", "samplingPercent")
                .replace("metadata_headers", "metadataHeaders"),
        )
    })?;
    Ok(RevisionLogger {
        url,
        batched,
        filter,
    })
}

/// An InferenceService for unit tests: `digits`, a default revision `v1` and a canary `v2`
/// at 20%, both on `file:///m`.
#[cfg(test)]
pub(crate) fn sample() -> InferenceService {
    let rev = |name: &str, percent| RevisionSpec {
        name: name.into(),
        storage: Storage::File {
            path: PathBuf::from("/m"),
            relative: PathBuf::from("m"),
        },
        scaling: Scaling::default(),
        pod: Default::default(),
        percent,
        batcher: None,
        logger: None,
        format: None,
        predict_proba: false,
        v2: false,
        explainer: None,
    };
    InferenceService {
        name: "digits".into(),
        namespace: "default".into(),
        default: rev("v1", 0),
        canaries: vec![rev("v2", 20)],
        shadow: None,
        transformer: None,
        autoscaler: Autoscaler::default(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        public_control_api: false,
        jwt: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    const GOOD: &str = r#"
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: digits
spec:
  predictor:
    name: digits-v1
    minReplicas: 1
    model:
      modelFormat: {name: onnx}
      storageUri: file://models/repository/sklearn_digits/1/model.onnx
  canary:
    - predictor:
        name: digits-v2
        model:
          modelFormat: {name: onnx}
          storageUri: file://models/repository/sklearn_digits/2/model.onnx
      trafficPercent: 20
"#;

    #[test]
    fn a_transformer_pipeline_is_kept_as_written() {
        let yaml = GOOD.replace(
            "  canary:",
            "  transformer:\n    response:\n      steps: [{softmax: {}}]\n  canary:",
        );
        let isvc = InferenceService::parse(&yaml, &base()).unwrap();
        assert_eq!(
            isvc.transformer,
            Some(serde_json::json!({"response": {"steps": [{"softmax": {}}]}}))
        );
    }

    #[test]
    fn the_kserve_logger_is_read_and_checked() {
        let yaml = GOOD.replace(
            "    minReplicas: 1\n",
            "    logger:\n      mode: request\n      url: http://127.0.0.1:8090\n      metadataHeaders: [X-User]\n      samplingPercent: 50\n",
        );
        let isvc = InferenceService::parse(&yaml, &base()).unwrap();
        let logger = isvc.default.logger.unwrap();
        assert_eq!(logger.url, "http://127.0.0.1:8090");
        assert_eq!(
            logger.filter,
            serde_json::json!({"mode": "request", "metadata_headers": ["x-user"], "sampling_percent": 50})
        );
        for (bad, field) in [
            ("mode: sometimes", "spec.predictor.logger"),
            ("url: ftp://x", "spec.predictor.logger.url"),
            ("samplingPercent: 150", "spec.predictor.logger"),
        ] {
            let yaml = GOOD.replace(
                "    minReplicas: 1\n",
                &format!("    logger:\n      url: http://127.0.0.1:1\n      {bad}\n"),
            );
            let yaml = if bad.starts_with("url") {
                yaml.replace("      url: http://127.0.0.1:1\n", "")
            } else {
                yaml
            };
            let err = InferenceService::parse(&yaml, &base()).unwrap_err();
            assert_eq!(err.path, field, "{bad}: {err}");
        }
        assert!(!logger.batched);
        let batched = |url: &str| {
            InferenceService::parse(
                &GOOD.replace(
                    "    minReplicas: 1\n",
                    &format!("    logger:\n      url: {url}\n      cloudEventsBatch: true\n"),
                ),
                &base(),
            )
        };
        let isvc = batched("http://sink:8080").unwrap();
        let logger = isvc.default.logger.as_ref().unwrap();
        assert!(logger.batched);
        assert_eq!(
            crate::workload::logger_args(logger, "/spool"),
            [
                "--log-sink",
                "http://sink:8080",
                "--log-spool",
                "/spool",
                "--log-sink-batch"
            ]
        );
        assert_eq!(
            batched("file:///tmp/e.jsonl").unwrap_err().path,
            "spec.predictor.logger.cloudEventsBatch"
        );
    }

    #[test]
    fn kserve_framework_keys_and_model_forms_are_read() {
        let onnx = GOOD.replacen(
            "    model:\n      modelFormat: {name: onnx}\n      storageUri: file://models/repository/sklearn_digits/1/model.onnx\n",
            "    onnx:\n      storageUri: file://models/repository/sklearn_digits/1/model.onnx\n      runtimeVersion: 1.31.1\n      protocolVersion: v2\n      resources: {limits: {cpu: '1'}}\n",
            1,
        );
        assert_ne!(onnx, GOOD);
        let isvc = InferenceService::parse(&onnx, &base()).unwrap();
        assert!(matches!(isvc.default.storage, Storage::File { .. }));
        assert_eq!(
            isvc.default.pod.resources,
            Some(serde_json::json!({"limits": {"cpu": "1"}}))
        );
        let with_runtime = GOOD.replacen(
            "      modelFormat: {name: onnx}\n",
            "      modelFormat: {name: onnx, version: '13'}\n      runtime: kserve-tritonserver\n",
            1,
        );
        assert!(InferenceService::parse(&with_runtime, &base()).is_ok());
        // The formats the sidecar converts, with KServe's PREDICT_PROBA.
        let sklearn = onnx.replace(
            "    onnx:\n",
            "    sklearn:\n      env: [{name: PREDICT_PROBA, value: 'True'}]\n",
        );
        let isvc = InferenceService::parse(&sklearn, &base()).unwrap();
        assert_eq!(isvc.default.format, Some(Format::Sklearn));
        assert!(isvc.default.predict_proba);
        let spec = GOOD.replacen(
            "      storageUri: file://models/repository/sklearn_digits/1/model.onnx\n",
            "      storage: {key: localMinIO, path: /sklearn, parameters: {bucket: example-models}}\n",
            1,
        );
        let isvc = InferenceService::parse(&spec, &base()).unwrap();
        assert_eq!(
            isvc.default.storage,
            Storage::Spec {
                key: "localMinIO".into(),
                path: "/sklearn".into(),
                parameters: [("bucket".to_owned(), "example-models".to_owned())].into(),
            }
        );
        let xgboost = GOOD.replacen("{name: onnx}", "{name: XGBoost}", 1);
        let isvc = InferenceService::parse(&xgboost, &base()).unwrap();
        assert_eq!(isvc.default.format, Some(Format::Xgboost));
        assert!(!isvc.default.predict_proba);
        for (yaml, path, says) in [
            (
                GOOD.replacen("{name: onnx}", "{name: paddle}", 1),
                "spec.predictor.model.modelFormat.name",
                "not supported",
            ),
            (
                onnx.replace("      runtimeVersion: 1.31.1\n", "      args: [--workers=2]\n"),
                "spec.predictor.onnx.args",
                "sidecar is the runtime",
            ),
            (
                onnx.replace(
                    "    onnx:\n",
                    "    model:\n      modelFormat: {name: onnx}\n      storageUri: file://models\n    onnx:\n",
                ),
                "spec.predictor",
                "model, onnx are all set",
            ),
        ] {
            let err = InferenceService::parse(&yaml, &base()).unwrap_err();
            assert_eq!(err.path, path, "{err}");
            assert!(err.message.contains(says), "{err}");
        }
    }

    #[test]
    fn built_in_explainers_reach_every_serving_revision_and_others_are_refused() {
        let with = |explainer: &str| {
            GOOD.replace("  canary:", &format!("  explainer:\n{explainer}  canary:"))
        };
        let isvc = InferenceService::parse(
            &with("    timeout: 20\n    kernelShap: {backgroundFile: bg/rows.json, maxCoalitions: 512}\n"),
            &base(),
        )
        .unwrap();
        let want = r#"{"kernel_shap":{"background_file":"bg/rows.json","max_coalitions":512},"timeout_ms":20000}"#;
        assert_eq!(isvc.default.explainer.as_deref(), Some(want));
        assert_eq!(isvc.canaries[0].explainer.as_deref(), Some(want));
        let args = crate::workload::model_args(&isvc.canaries[0]);
        assert_eq!(args, ["--explainer", want]);
        let tree =
            InferenceService::parse(&with("    treeShap: {backgroundFile: bg.json}\n"), &base())
                .unwrap();
        assert_eq!(
            tree.default.explainer.as_deref(),
            Some(r#"{"tree_shap":{"background_file":"bg.json"}}"#)
        );
        let parsed = |explainer: &str| {
            InferenceService::parse(&with(explainer), &base())
                .unwrap()
                .default
                .explainer
                .unwrap()
        };
        assert_eq!(
            parsed(
                "    anchors: {backgroundFile: train.json, tau: 0.2, categoricalFeatures: [3], maxAnchorSize: 2}\n"
            ),
            r#"{"anchors":{"background_file":"train.json","categorical_features":[3],"max_anchor_size":2,"tau":0.2}}"#
        );
        assert_eq!(
            parsed("    occlusion: {patch: 7, layout: NHWC}\n"),
            r#"{"occlusion":{"layout":"nhwc","patch":7}}"#
        );
        for (explainer, path, says) in [
            (
                "    anchors: {backgroundFile: t.json, threshold: 1.5}\n",
                "spec.explainer.anchors.threshold",
                "between 0 and 1",
            ),
            (
                "    anchors: {backgroundFile: t.json}\n    occlusion: {}\n",
                "spec.explainer",
                "exactly one",
            ),
            (
                "    occlusion: {stride: 0}\n",
                "spec.explainer.occlusion.stride",
                "not 1 to 4096",
            ),
            (
                "    occlusion: {layout: chw}\n",
                "spec.explainer.occlusion.layout",
                "not NCHW or NHWC",
            ),
            (
                "    alibi: {type: AnchorTabular, storageUri: gs://x}\n",
                "spec.explainer.alibi",
                "BSL",
            ),
            (
                "    art: {type: SquareAttack}\n",
                "spec.explainer.art",
                "adversarial",
            ),
            (
                "    containers: [{image: x}]\n",
                "spec.explainer.containers",
                "sidecar",
            ),
            (
                "    minReplicas: 2\n    treeShap: {backgroundFile: b.json}\n",
                "spec.explainer",
                "scales with it",
            ),
            ("    timeout: 5\n", "spec.explainer", "exactly one"),
            (
                "    treeShap: {backgroundFile: ../b.json}\n",
                "spec.explainer.treeShap.backgroundFile",
                "relative path",
            ),
            (
                "    kernelShap: {backgroundFile: b.json, maxCoalitions: 0}\n",
                "spec.explainer.kernelShap.maxCoalitions",
                "not 1 to 65536",
            ),
            (
                "    timeout: 0\n    treeShap: {backgroundFile: b.json}\n",
                "spec.explainer.timeout",
                "not 1 to",
            ),
        ] {
            let err = InferenceService::parse(&with(explainer), &base()).unwrap_err();
            assert_eq!(err.path, path, "{explainer}: {err}");
            assert!(err.message.contains(says), "{explainer}: {err}");
        }
    }

    const SHADOW: &str = "  shadow:\n    trafficPercent: 30\n    predictor:\n      name: digits-v3\n      model:\n        modelFormat: {name: onnx}\n        storageUri: file://models/repository/sklearn_digits/2/model.onnx\n";

    #[test]
    fn a_shadow_is_a_revision_that_gets_copies() {
        let yaml = format!("{GOOD}{SHADOW}");
        let isvc = InferenceService::parse(&yaml, &base()).unwrap();
        let parsed = isvc.shadow.as_ref().unwrap();
        assert_eq!((parsed.name.as_str(), parsed.percent), ("digits-v3", 30));
        // It runs (a workload of its own) but is not routed to, and takes no canary share.
        let names: Vec<&str> = crate::workload::revisions(&isvc)
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["digits-v1", "digits-v2", "digits-v3"]);
        assert_eq!(crate::workload::served(&isvc).count(), 2);
        let config = crate::render::filter_config(
            &[(&isvc, vec!["digits".into()])],
            &crate::render::Naming::Local,
        )
        .unwrap();
        assert_eq!(
            config["services"][0]["predictor"]["shadow"],
            serde_json::json!({"name": "digits-v3", "cluster": "digits.digits-v3",
                               "grpc_cluster": "digits.digits-v3.grpc", "percent": 30})
        );
    }

    #[test]
    fn the_kserve_batcher_is_read() {
        let yaml = GOOD.replace(
            "    minReplicas: 1\n",
            "    batcher:\n      maxBatchSize: 16\n      maxLatency: 5\n",
        );
        let isvc = InferenceService::parse(&yaml, &base()).unwrap();
        assert_eq!(isvc.default.batcher, Some((Some(16), Some(5))));
        assert_eq!(isvc.canaries[0].batcher, None);
    }

    #[test]
    fn unknown_fields_are_named_with_their_path() {
        for (yaml, path, word) in [
            (
                GOOD.replace("minReplicas: 1", "minReplica: 1"),
                "spec.predictor",
                "minReplica",
            ),
            (
                GOOD.replace("modelFormat: {name: onnx}\n      storageUri: file://models/repository/sklearn_digits/1", "modelFormat: {name: onnx}\n      image: my/server\n      storageUri: file://models/repository/sklearn_digits/1"),
                "spec.predictor.model",
                "image",
            ),
            (
                GOOD.replace("      trafficPercent: 20", "      trafficPercent: 20\n      weight: 3"),
                "spec.canary[0]",
                "weight",
            ),
            (
                GOOD.replace("spec:\n", "spec:\n  sklearn: {}\n"),
                "spec",
                "sklearn",
            ),
        ] {
            let err = InferenceService::parse(&yaml, &base()).unwrap_err();
            assert_eq!(err.path, path, "{err}");
            assert!(err.message.contains(word), "{err}");
        }
    }

    #[test]
    fn scaling_storage_and_pod_fields_are_read() {
        let yaml = GOOD
            .replace(
                "  name: digits\n",
                "  name: digits\n  annotations:\n    serving.kserve.io/autoscalerClass: keda\n",
            )
            .replace(
                "    minReplicas: 1\n",
                "    minReplicas: 0\n    maxReplicas: 5\n    scaleMetric: rps\n    scaleTarget: 50\n    containerConcurrency: 4\n    serviceAccountName: models\n",
            )
            .replace(
                "storageUri: file://models/repository/sklearn_digits/2/model.onnx",
                "storageUri: pvc://model-store/digits/v2/\n          resources: {limits: {cpu: '2'}}",
            );
        let isvc = InferenceService::parse(&yaml, &base()).unwrap();
        assert_eq!(isvc.autoscaler, Autoscaler::Keda);
        assert_eq!(
            isvc.default.scaling,
            Scaling {
                min_replicas: Some(0),
                max_replicas: Some(5),
                metric: Some(ScaleMetric::Rps),
                target: Some(50),
                container_concurrency: Some(4),
            }
        );
        assert_eq!(
            isvc.default.pod.service_account_name.as_deref(),
            Some("models")
        );
        assert_eq!(
            isvc.canaries[0].storage,
            Storage::Pvc {
                claim: "model-store".into(),
                path: "digits/v2".into()
            }
        );
        assert_eq!(
            isvc.canaries[0].pod.resources,
            Some(serde_json::json!({"limits": {"cpu": "2"}}))
        );
        for (bad, path) in [
            (
                "minReplicas: 3\n    maxReplicas: 2",
                "spec.predictor.maxReplicas",
            ),
            ("minReplicas: -1", "spec.predictor.minReplicas"),
            (
                "minReplicas: 1\n    scaleMetric: gpu",
                "spec.predictor.scaleMetric",
            ),
            (
                "minReplicas: 1\n    scaleTarget: 0",
                "spec.predictor.scaleTarget",
            ),
        ] {
            let yaml = GOOD.replace("minReplicas: 1", bad);
            let err = InferenceService::parse(&yaml, &base()).unwrap_err();
            assert_eq!(err.path, path, "{bad}: {err}");
        }
        let yaml = GOOD.replace(
            "  name: digits\n",
            "  name: digits\n  annotations: {serving.kserve.io/autoscalerClass: kpa}\n",
        );
        let err = InferenceService::parse(&yaml, &base()).unwrap_err();
        assert_eq!(
            err.path,
            "metadata.annotations.serving.kserve.io/autoscalerClass"
        );
    }

    #[test]
    fn control_apis_open_only_by_annotation() {
        let closed = InferenceService::parse(GOOD, &base()).unwrap();
        assert!(!closed.public_control_api);
        let with = |value: &str| {
            GOOD.replace(
                "  name: digits\n",
                &format!("  name: digits\n  annotations: {{{PUBLIC_CONTROL_API}: '{value}'}}\n"),
            )
        };
        let open = InferenceService::parse(&with("true"), &base()).unwrap();
        assert!(open.public_control_api);
        let config = crate::render::filter_config(
            &[(&open, vec!["digits".into()])],
            &crate::render::Naming::Local,
        )
        .unwrap();
        assert_eq!(config["services"][0]["public_control_api"], true);
        let config = crate::render::filter_config(
            &[(&closed, vec!["digits".into()])],
            &crate::render::Naming::Local,
        )
        .unwrap();
        assert!(config["services"][0].get("public_control_api").is_none());
        assert!(
            !InferenceService::parse(&with("false"), &base())
                .unwrap()
                .public_control_api
        );
        let err = InferenceService::parse(&with("yes"), &base()).unwrap_err();
        assert_eq!(
            err.path,
            format!("metadata.annotations.{PUBLIC_CONTROL_API}")
        );
    }

    #[test]
    fn knative_retention_periods_parse_and_bad_ones_are_named() {
        for (text, ms) in [
            ("30s", 30_000),
            ("1m30s", 90_000),
            ("1.5s", 1_500),
            ("500ms", 500),
            ("0s", 0),
            ("2h", 7_200_000),
        ] {
            assert_eq!(
                go_duration(text).unwrap(),
                Duration::from_millis(ms),
                "{text}"
            );
        }
        for bad in ["", "30", "s", "1x", "-1s", "25h"] {
            assert!(go_duration(bad).is_err(), "{bad}");
        }
        let isvc = InferenceService::parse(GOOD, &base()).unwrap();
        assert_eq!(isvc.retention(&isvc.default), DEFAULT_RETENTION);
        let annotated = GOOD.replace(
            "  name: digits\n",
            &format!("  name: digits\n  annotations: {{{RETENTION_PERIOD}: 2s}}\n"),
        );
        let isvc = InferenceService::parse(&annotated, &base()).unwrap();
        assert_eq!(isvc.retention(&isvc.canaries[0]), Duration::from_secs(2));
        let err =
            InferenceService::parse(&annotated.replace(": 2s}", ": soon}"), &base()).unwrap_err();
        assert_eq!(err.path, format!("metadata.annotations.{RETENTION_PERIOD}"));
    }

    #[test]
    fn a_kserve_file_parses() {
        let isvc = InferenceService::parse(GOOD, &base()).unwrap();
        assert_eq!(
            (isvc.name.as_str(), isvc.namespace.as_str()),
            ("digits", "default")
        );
        assert_eq!(isvc.default.name, "digits-v1");
        assert_eq!(isvc.canaries.len(), 1);
        assert_eq!(
            (isvc.canaries[0].name.as_str(), isvc.canaries[0].percent),
            ("digits-v2", 20)
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                GOOD.replace("name: onnx", "name: mlflow"),
                "spec.predictor.model.modelFormat.name",
            ),
            (
                GOOD.replacen(
                    "      storageUri: file://models/repository/sklearn_digits/1/model.onnx\n",
                    "      storageUri: s3://b/m\n      storage: {path: m}\n",
                    1,
                ),
                "spec.predictor.model.storage",
            ),
            (
                GOOD.replacen(
                    "      storageUri: file://models/repository/sklearn_digits/1/model.onnx\n",
                    "      storage: {key: k}\n",
                    1,
                ),
                "spec.predictor.model.storage.path",
            ),
            (
                GOOD.replacen(
                    "      storageUri: file://models/repository/sklearn_digits/1/model.onnx\n",
                    "      storage: {path: m, parameters: {type: hdfs}}\n",
                    1,
                ),
                "spec.predictor.model.storage.parameters.type",
            ),
            (
                GOOD.replace("trafficPercent: 20", "trafficPercent: 120"),
                "spec.canary[0].trafficPercent",
            ),
            (
                GOOD.replace("file://models/repository/sklearn_digits/1", "s3://user:secret@bucket"),
                "spec.predictor.model.storageUri",
            ),
            (
                GOOD.replace("sklearn_digits/2", "nowhere/2"),
                "spec.canary[0].predictor.model.storageUri",
            ),
            (
                GOOD.replace("name: digits\n", "name: Digits_1\n"),
                "metadata.name",
            ),
            (
                GOOD.replace("kind: InferenceService", "kind: Deployment"),
                "kind",
            ),
            (
                GOOD.replace(
                    "  canary:",
                    "  transformer:\n    containers: [{image: kserve/image-transformer}]\n  canary:",
                ),
                "spec.transformer",
            ),
            (
                GOOD.replace(
                    "  canary:",
                    "  transformer:\n    request: {steps: [image_decode]}\n  canary:",
                ),
                "spec.transformer",
            ),
            (
                GOOD.replace("name: digits-v2", "name: digits-v1"),
                "spec.canary",
            ),
            (
                format!("{GOOD}{SHADOW}").replace("trafficPercent: 30", "trafficPercent: 130"),
                "spec.shadow.trafficPercent",
            ),
            (
                format!("{GOOD}{SHADOW}").replace("name: digits-v3", "name: digits-v2"),
                "spec.shadow",
            ),
            (
                format!("{GOOD}{SHADOW}").replace(
                    "      name: digits-v3\n",
                    "      name: digits-v3\n      logger: {url: http://127.0.0.1:1}\n",
                ),
                "spec.shadow.predictor.logger",
            ),
        ];
        for (yaml, path) in cases {
            let err = InferenceService::parse(&yaml, &base()).unwrap_err();
            assert_eq!(err.path, path, "{err}");
        }
    }
}
