//! The KServe `serving.kserve.io/v1beta1` InferenceService subset that `meshserve up` runs:
//! `metadata.name` / `namespace`, `spec.predictor` (`name`, `model.modelFormat.name: onnx`,
//! `model.storageUri`, `canaryTrafficPercent`), and standard mode's `spec.canary[]`
//! (`predictor`, `trafficPercent`). Fields that only matter on Kubernetes (resources, replicas,
//! service accounts) are accepted and ignored; fields meshserve cannot honour locally are
//! refused with their path.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

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
#[serde(rename_all = "camelCase")]
struct Raw {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: RawMetadata,
    spec: RawSpec,
}

#[derive(Debug, Deserialize)]
struct RawMetadata {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawSpec {
    predictor: Option<RawPredictor>,
    #[serde(default)]
    canary: Vec<RawCanary>,
    transformer: Option<Value>,
    explainer: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPredictor {
    name: Option<String>,
    canary_traffic_percent: Option<i64>,
    model: Option<RawModel>,
    batcher: Option<RawBatcher>,
    logger: Option<RawLogger>,
}

/// KServe's `logger` (`mode`, `url`, `metadataHeaders`; `metadataAnnotations` only matter on
/// Kubernetes) plus meshserve's `samplingPercent` and `maxPayloadBytes`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLogger {
    mode: Option<String>,
    url: Option<String>,
    #[serde(default)]
    metadata_headers: Vec<String>,
    sampling_percent: Option<i64>,
    max_payload_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawModel {
    model_format: Option<RawFormat>,
    storage_uri: Option<String>,
}

/// KServe's `batcher`: `maxBatchSize` rows, `maxLatency` in milliseconds.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBatcher {
    max_batch_size: Option<u64>,
    max_latency: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct RawFormat {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCanary {
    name: Option<String>,
    predictor: Option<RawPredictor>,
    traffic_percent: Option<i64>,
}

/// A revision to run: a predictor sidecar over a model location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionSpec {
    pub name: String,
    /// The model: a directory (one model in Triton's layout, or a repository of several) or
    /// one `.onnx` file.
    pub storage: PathBuf,
    pub percent: i64,
    /// KServe's `spec.predictor.batcher`: (`maxBatchSize`, `maxLatency` in ms), if given.
    pub batcher: Option<(Option<u64>, Option<u64>)>,
    /// Payload logging.
    pub logger: Option<RevisionLogger>,
}

/// A revision's payload logging: the sink its sidecar delivers to, and the filter's part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionLogger {
    /// `http://...` or `file:///...` (KServe's `url`).
    pub url: String,
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
    /// meshserve's declarative transformer (`spec.transformer`), checked by the filters' own
    /// parser; passed to them as written.
    pub transformer: Option<Value>,
}

impl InferenceService {
    /// Parses the YAML of one InferenceService; `file://` paths are relative to `base`.
    pub fn parse(yaml: &str, base: &Path) -> Result<InferenceService, IsvcError> {
        let raw: Raw =
            serde_yaml::from_str(yaml).map_err(|e| error("(document)", e.to_string()))?;
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
        if raw.spec.explainer.is_some() {
            return Err(error(
                "spec.explainer",
                "meshserve up cannot run explainer containers; route :explain with a rendered configuration",
            ));
        }
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
            let percent = match (canary.traffic_percent, canary_percent, i) {
                (Some(p), _, _) => p,
                (None, Some(p), 0) => p,
                (None, _, _) => {
                    return Err(error(&format!("{path}.trafficPercent"), "is required"));
                }
            };
            if !(0..=100).contains(&percent) {
                return Err(error(
                    &format!("{path}.trafficPercent"),
                    format!("{percent} is not between 0 and 100"),
                ));
            }
            let predictor = canary
                .predictor
                .ok_or_else(|| error(&format!("{path}.predictor"), "is required"))?;
            let fallback = canary
                .name
                .clone()
                .unwrap_or_else(|| format!("{name}-canary-{}", i + 1));
            let mut spec = revision(
                &format!("{path}.predictor"),
                predictor,
                fallback,
                percent,
                base,
            )?;
            if let Some(n) = canary.name {
                spec.name = n;
            }
            canaries.push(spec);
        }
        if canaries.is_empty() && canary_percent.is_some_and(|p| p > 0) {
            return Err(error(
                "spec.predictor.canaryTrafficPercent",
                "needs the canary revision: list it under spec.canary[] (KServe's standard-mode form)",
            ));
        }
        let total: i64 = canaries.iter().map(|c| c.percent).sum();
        if total > 100 {
            return Err(error(
                "spec.canary",
                format!("traffic percents add up to {total}, over 100"),
            ));
        }
        let mut names = vec![&default.name];
        for canary in &canaries {
            if names.contains(&&canary.name) {
                return Err(error(
                    "spec.canary",
                    format!("revision name '{}' is used twice", canary.name),
                ));
            }
            names.push(&canary.name);
        }
        Ok(InferenceService {
            name,
            namespace,
            default,
            canaries,
            transformer,
        })
    }
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

fn revision(
    path: &str,
    predictor: RawPredictor,
    fallback: String,
    percent: i64,
    base: &Path,
) -> Result<RevisionSpec, IsvcError> {
    let model = predictor
        .model
        .ok_or_else(|| error(&format!("{path}.model"), "is required"))?;
    let format = model.model_format.and_then(|f| f.name).unwrap_or_default();
    if !format.eq_ignore_ascii_case("onnx") {
        return Err(error(
            &format!("{path}.model.modelFormat.name"),
            format!(
                "'{format}' is not supported: meshserve serves onnx (convert with skl2onnx, tf2onnx, torch.onnx)"
            ),
        ));
    }
    let uri = model
        .storage_uri
        .ok_or_else(|| error(&format!("{path}.model.storageUri"), "is required"))?;
    let Some(local) = uri.strip_prefix("file://") else {
        return Err(error(
            &format!("{path}.model.storageUri"),
            format!("'{uri}': meshserve up reads file:// locations only"),
        ));
    };
    let storage = base.join(local);
    if !storage.exists() {
        return Err(error(
            &format!("{path}.model.storageUri"),
            format!("{} does not exist", storage.display()),
        ));
    }
    let logger = predictor
        .logger
        .map(|l| logger(&format!("{path}.logger"), l))
        .transpose()?;
    Ok(RevisionSpec {
        name: predictor.name.unwrap_or(fallback),
        storage,
        percent,
        batcher: predictor.batcher.map(|b| (b.max_batch_size, b.max_latency)),
        logger,
    })
}

fn logger(path: &str, raw: RawLogger) -> Result<RevisionLogger, IsvcError> {
    let url = raw
        .url
        .filter(|u| !u.is_empty())
        .ok_or_else(|| error(&format!("{path}.url"), "is required: where the events go"))?;
    crate::payloads::delivery::SinkSpec::parse(&url, u64::MAX)
        .map_err(|e| error(&format!("{path}.url"), e))?;
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
    Ok(RevisionLogger { url, filter })
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
                GOOD.replace("name: onnx", "name: sklearn"),
                "spec.predictor.model.modelFormat.name",
            ),
            (
                GOOD.replace("trafficPercent: 20", "trafficPercent: 120"),
                "spec.canary[0].trafficPercent",
            ),
            (
                GOOD.replace("file://models/repository/sklearn_digits/1", "s3://bucket"),
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
        ];
        for (yaml, path) in cases {
            let err = InferenceService::parse(&yaml, &base()).unwrap_err();
            assert_eq!(err.path, path, "{err}");
        }
    }
}
