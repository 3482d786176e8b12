//! The optional per-model configuration file, `<repository>/<model>/config.yaml`.
//!
//! ```yaml
//! name: mnist_cnn              # must match the directory when given
//! max_batch_size: 256          # 0: no limit on the first dimension
//! version_policy: {latest: 1}  # or: all, or {specific: [1, 3]}
//! labels: [zero, one, ...]     # or labels_file: labels.txt (one per line)
//! v1_output: probabilities     # which output fills V1 `predictions`
//! instance_count: 2            # sessions running requests in parallel (Triton's instance_group)
//! intra_op_threads: 1          # ONNX Runtime threads per session (0: runtime default)
//! dynamic_batching:            # merge queued requests into batches of up to max_batch_size rows
//!   max_queue_delay_microseconds: 500
//!   preferred_batch_size: [8, 16]
//!   max_queue_size: 1024       # requests waiting; beyond, 429 (0: no limit but the server's)
//!   default_timeout_microseconds: 0   # 0: none; a request can set parameter `timeout`
//! inputs:                      # override what the ONNX file declares
//!   - {name: input, datatype: FP32, shape: [-1, 1, 28, 28]}
//! outputs: []
//! explainer:                   # POST /v1/models/<m>:explain: exactly one method
//!   kernel_shap:                 # any tabular model (see kernel_shap)
//!     background_file: background.json   # rows of features, [[...], ...], next to config.yaml
//!     max_coalitions: 2048       # exact Shapley values up to 11 features at the default
//!   # tree_shap: {background_file: background.json}   # an ONNX tree ensemble (see tree_shap)
//!   # anchors: {background_file: train.json, threshold: 0.95, categorical_features: [3]}
//!   # occlusion: {patch: 4, stride: 4, baseline: 0.0}  # an image model (see occlusion)
//!   timeout_ms: 30000            # an explain request's time limit (504 past it)
//! loading:                     # the model cache (see crate::cache); defaults from the flags
//!   on_demand: true            # not loaded at start: the first request loads it and waits
//!   idle_unload_secs: 600      # unloaded after this long without a request (0: never)
//! converted_from:              # written by meshserve for a model it converted (see convert)
//!   format: xgboost            # the model takes one feature matrix as KServe's servers read it
//!   feature_names: [a, b]      # V1 objects and V2 content_type "pd" name features by these
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::error::{PredictorError, Result};

pub const CONFIG_FILE: &str = "config.yaml";

/// Which versions of a model are served (Triton's version policy). In YAML: `all`,
/// `{latest: N}` or `{specific: [1, 3]}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawPolicy")]
pub enum VersionPolicy {
    /// The N highest version numbers.
    Latest(usize),
    /// Every version present.
    All,
    /// Exactly these versions.
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPolicy {
    Word(String),
    Map(std::collections::BTreeMap<String, serde_yaml::Value>),
}

impl TryFrom<RawPolicy> for VersionPolicy {
    type Error = String;

    fn try_from(raw: RawPolicy) -> Result<Self, String> {
        const EXPECTED: &str = "expected all, {latest: N} or {specific: [versions]}";
        let map = match raw {
            RawPolicy::Word(word) if word == "all" => return Ok(VersionPolicy::All),
            RawPolicy::Word(word) => {
                return Err(format!("unknown version_policy '{word}': {EXPECTED}"));
            }
            RawPolicy::Map(map) => map,
        };
        let mut entries = map.into_iter();
        match (entries.next(), entries.next()) {
            (Some((key, value)), None) if key == "latest" => value
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .map(VersionPolicy::Latest)
                .ok_or_else(|| "version_policy latest must be an integer of at least 1".to_owned()),
            (Some((key, value)), None) if key == "specific" => {
                serde_yaml::from_value::<Vec<u64>>(value)
                    .map(VersionPolicy::Specific)
                    .map_err(|_| {
                        "version_policy specific must be a list of version numbers".to_owned()
                    })
            }
            _ => Err(format!("unknown version_policy: {EXPECTED}")),
        }
    }
}

impl VersionPolicy {
    /// The versions to serve out of those present.
    pub fn select(&self, present: &[u64]) -> Vec<u64> {
        let mut present = present.to_vec();
        present.sort_unstable();
        match self {
            VersionPolicy::Latest(n) => present.split_off(present.len().saturating_sub(*n)),
            VersionPolicy::All => present,
            VersionPolicy::Specific(wanted) => {
                present.into_iter().filter(|v| wanted.contains(v)).collect()
            }
        }
    }
}

/// An input or output declaration that overrides what the ONNX file says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorOverride {
    pub name: String,
    pub datatype: Option<String>,
    pub shape: Option<Vec<i64>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: Option<String>,
    #[serde(default)]
    pub max_batch_size: u64,
    #[serde(default)]
    pub version_policy: VersionPolicy,
    #[serde(default)]
    pub labels: Vec<String>,
    pub labels_file: Option<String>,
    pub v1_output: Option<String>,
    #[serde(default)]
    pub inputs: Vec<TensorOverride>,
    #[serde(default)]
    pub outputs: Vec<TensorOverride>,
    /// Sessions that run requests in parallel, each on its own thread.
    #[serde(default = "one")]
    pub instance_count: usize,
    /// ONNX Runtime intra-op threads per session; 0 keeps the server's setting.
    #[serde(default)]
    pub intra_op_threads: usize,
    /// Merge queued requests into batches; absent: every request runs alone.
    pub dynamic_batching: Option<DynamicBatching>,
    /// Set for a model converted from another framework's file: requests are read as
    /// KServe's server for that framework reads them ([`meshserve_proto::frame`]).
    pub converted_from: Option<ConvertedFrom>,
    /// A built-in explainer for `:explain`.
    pub explainer: Option<ExplainerConfig>,
    /// When the model is in memory (see [`crate::cache`]); unset fields take the server's
    /// defaults.
    #[serde(default)]
    pub loading: LoadingConfig,
}

/// A model's own cache settings in `config.yaml`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadingConfig {
    /// Not loaded at start; its first request loads it (and waits for the load).
    pub on_demand: Option<bool>,
    /// Unloaded after this many seconds without a request (0: never); it loads again on its
    /// next request.
    pub idle_unload_secs: Option<u64>,
}

/// The built-in explainer: exactly one method, and the time an explanation may take.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainerConfig {
    pub kernel_shap: Option<KernelShapConfig>,
    pub tree_shap: Option<TreeShapConfig>,
    pub anchors: Option<AnchorsConfig>,
    pub occlusion: Option<OcclusionConfig>,
    /// The most milliseconds one explain request may take (504 past it).
    #[serde(default = "default_explain_timeout_ms")]
    pub timeout_ms: u64,
}

/// The default time limit of an explain request (KServe's component `timeout` default is 60 s
/// of which this leaves room for the rest of the request).
pub const DEFAULT_EXPLAIN_TIMEOUT_MS: u64 = 30_000;
/// The longest time limit an explainer may be given.
pub const MAX_EXPLAIN_TIMEOUT_MS: u64 = 600_000;

fn default_explain_timeout_ms() -> u64 {
    DEFAULT_EXPLAIN_TIMEOUT_MS
}

/// TreeSHAP's settings ([`crate::tree_shap`]): the model must be one ONNX tree ensemble.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeShapConfig {
    /// The background rows, as for KernelSHAP.
    pub background_file: String,
    #[serde(skip)]
    pub background: Background,
}

/// KernelSHAP's settings ([`crate::kernel_shap`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelShapConfig {
    /// The background rows, a JSON array of rows of numbers, relative to the model's
    /// directory; read when the model loads, into `background`.
    pub background_file: String,
    #[serde(default = "default_max_coalitions")]
    pub max_coalitions: usize,
    #[serde(skip)]
    pub background: Background,
}

/// Anchors' settings ([`crate::anchors`]), with Alibi `AnchorTabular`'s names and defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorsConfig {
    /// The rows rules are sampled from and coverage is measured on (the training data's
    /// sample Alibi's explainer was fitted on), as for KernelSHAP.
    pub background_file: String,
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    #[serde(default = "default_delta")]
    pub delta: f64,
    #[serde(default = "default_tau")]
    pub tau: f64,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub beam_size: usize,
    #[serde(default = "default_batch_size")]
    pub min_samples_start: usize,
    pub max_anchor_size: Option<usize>,
    /// Percentiles the numerical features are cut at.
    #[serde(default = "default_disc_perc")]
    pub disc_perc: Vec<f64>,
    /// Features compared for equality rather than binned (column indices).
    #[serde(default)]
    pub categorical_features: Vec<usize>,
    /// The most rows the model labels for one explanation.
    #[serde(default = "default_anchor_rows")]
    pub max_model_rows: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(skip)]
    pub background: Background,
    /// The bins cut from the background when the model loads.
    #[serde(skip)]
    pub discretizer: Option<crate::anchors::Discretizer>,
}

fn default_threshold() -> f64 {
    0.95
}
fn default_delta() -> f64 {
    0.1
}
fn default_tau() -> f64 {
    0.15
}
fn default_batch_size() -> usize {
    100
}
fn default_disc_perc() -> Vec<f64> {
    vec![25.0, 50.0, 75.0]
}
fn default_anchor_rows() -> usize {
    crate::anchors::DEFAULT_MAX_MODEL_ROWS
}

/// Occlusion saliency's settings ([`crate::occlusion`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OcclusionConfig {
    /// The square patch's side, in pixels.
    #[serde(default = "default_patch")]
    pub patch: usize,
    /// Pixels between windows (default: the patch, windows side by side).
    pub stride: Option<usize>,
    /// What a patch is filled with, in the model's input units.
    #[serde(default)]
    pub baseline: f64,
    /// `nchw` or `nhwc`; by default read from the input's shape (`[n, 1|3|4, h, w]` is NCHW,
    /// `[n, h, w, 1|3|4]` NHWC, `[n, h, w]` one channel).
    pub layout: Option<String>,
    /// Occluded images per model call.
    #[serde(default = "default_batch_images")]
    pub batch_size: usize,
}

fn default_patch() -> usize {
    crate::occlusion::DEFAULT_PATCH
}
fn default_batch_images() -> usize {
    crate::occlusion::DEFAULT_MAX_BATCH_IMAGES
}

fn default_max_coalitions() -> usize {
    crate::kernel_shap::DEFAULT_MAX_COALITIONS
}

/// The most background rows an explainer takes (each coalition runs the model on all).
pub const MAX_BACKGROUND_ROWS: usize = 1000;
/// The most coalitions an explainer may be given.
pub const MAX_COALITIONS: usize = 1 << 16;
/// The most model rows one explanation may run: coalitions times background rows.
pub const MAX_EXPLAIN_ROWS: usize = 1 << 22;

/// The most rows an anchors explanation samples at a time (`batch_size`, `min_samples_start`).
pub const MAX_EXPLAIN_BATCH: usize = 1 << 16;
/// The most model rows an anchors explanation may be given.
pub const MAX_ANCHOR_ROWS: usize = 1 << 22;

/// Background rows, row-major.
#[derive(Debug, Clone, Default)]
pub struct Background {
    pub features: usize,
    pub values: std::sync::Arc<Vec<f64>>,
}

impl PartialEq for Background {
    fn eq(&self, other: &Self) -> bool {
        self.features == other.features
            && self.values.len() == other.values.len()
            && self
                .values
                .iter()
                .zip(other.values.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl Eq for Background {}

impl Background {
    pub fn rows(&self) -> usize {
        self.values.len() / self.features.max(1)
    }
}

impl Background {
    /// Reads a JSON array of rows of finite numbers, all of one length.
    pub fn read(path: &Path) -> Result<Background, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let rows: Vec<Vec<f64>> = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{}: not a JSON array of rows of numbers: {e}",
                path.display()
            )
        })?;
        let features = rows.first().map_or(0, Vec::len);
        if rows.is_empty() || rows.len() > MAX_BACKGROUND_ROWS || features == 0 {
            return Err(format!(
                "{}: 1 to {MAX_BACKGROUND_ROWS} rows of at least one feature are needed, not {}",
                path.display(),
                rows.len()
            ));
        }
        if let Some(i) = rows.iter().position(|r| r.len() != features) {
            return Err(format!(
                "{}: row {i} has {} features, row 0 has {features}",
                path.display(),
                rows[i].len()
            ));
        }
        Ok(Background {
            features,
            values: std::sync::Arc::new(rows.into_iter().flatten().collect()),
        })
    }
}

/// Where a converted model came from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConvertedFrom {
    /// `sklearn`, `xgboost` or `lightgbm`.
    pub format: String,
    /// The features' names, in the input's column order, when the model file names them.
    #[serde(default)]
    pub feature_names: Vec<String>,
}

fn one() -> usize {
    1
}

impl Default for ModelConfig {
    /// What a model without a config file gets: the same as an empty file.
    fn default() -> Self {
        ModelConfig {
            name: None,
            max_batch_size: 0,
            version_policy: VersionPolicy::default(),
            labels: Vec::new(),
            labels_file: None,
            v1_output: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
            instance_count: 1,
            intra_op_threads: 0,
            dynamic_batching: None,
            converted_from: None,
            explainer: None,
            loading: LoadingConfig::default(),
        }
    }
}

/// Triton's `dynamic_batching`, with the same field names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicBatching {
    /// How long the first request of a batch waits for others.
    #[serde(default)]
    pub max_queue_delay_microseconds: u64,
    /// Batch sizes (rows) worth running at once, without waiting longer.
    #[serde(default)]
    pub preferred_batch_size: Vec<u64>,
    /// Requests waiting at most; beyond it a request is refused at once (0: no limit here,
    /// the server's in-flight limit still holds).
    #[serde(default)]
    pub max_queue_size: usize,
    /// How long a request may wait in the queue (0: no limit). A request's own `timeout`
    /// parameter, in microseconds, takes precedence.
    #[serde(default)]
    pub default_timeout_microseconds: u64,
}

impl ModelConfig {
    /// Applies KServe's `spec.predictor.batcher` (`maxBatchSize` rows, `maxLatency` in
    /// milliseconds): batching on, with those limits; KServe's defaults are 32 rows and 500 ms.
    pub fn apply_kserve_batcher(
        &mut self,
        max_batch_size: Option<u64>,
        max_latency_ms: Option<u64>,
    ) {
        self.max_batch_size = max_batch_size.unwrap_or(32);
        let batching = self
            .dynamic_batching
            .get_or_insert_with(DynamicBatching::default);
        batching.max_queue_delay_microseconds = max_latency_ms.unwrap_or(500).saturating_mul(1000);
    }
}

impl ExplainerConfig {
    /// Checks the limits and reads the background rows.
    fn load(&mut self, model_dir: &Path) -> Result<(), String> {
        if self.timeout_ms == 0 || self.timeout_ms > MAX_EXPLAIN_TIMEOUT_MS {
            return Err(format!(
                "explainer.timeout_ms must be 1 to {MAX_EXPLAIN_TIMEOUT_MS}"
            ));
        }
        let methods = usize::from(self.kernel_shap.is_some())
            + usize::from(self.tree_shap.is_some())
            + usize::from(self.anchors.is_some())
            + usize::from(self.occlusion.is_some());
        if methods != 1 {
            return Err(
                "explainer needs exactly one method: kernel_shap, tree_shap, anchors or occlusion"
                    .into(),
            );
        }
        if let Some(anchors) = &mut self.anchors {
            let fraction = |v: f64| v > 0.0 && v < 1.0;
            if !(fraction(anchors.threshold) && fraction(anchors.delta) && fraction(anchors.tau)) {
                return Err(
                    "explainer.anchors: threshold, delta and tau are each between 0 and 1".into(),
                );
            }
            let sizes = [anchors.batch_size, anchors.min_samples_start];
            if sizes.iter().any(|n| *n == 0 || *n > MAX_EXPLAIN_BATCH)
                || anchors.beam_size == 0
                || anchors.beam_size > crate::kernel_shap::MAX_FEATURES
            {
                return Err(format!(
                    "explainer.anchors: batch_size and min_samples_start are 1 to {MAX_EXPLAIN_BATCH}, beam_size 1 to {}",
                    crate::kernel_shap::MAX_FEATURES
                ));
            }
            if anchors.max_model_rows == 0 || anchors.max_model_rows > MAX_ANCHOR_ROWS {
                return Err(format!(
                    "explainer.anchors.max_model_rows must be 1 to {MAX_ANCHOR_ROWS}"
                ));
            }
            if anchors.disc_perc.iter().any(|p| !(0.0..=100.0).contains(p)) {
                return Err("explainer.anchors.disc_perc: percentiles are 0 to 100".into());
            }
            anchors.background = Background::read(&model_dir.join(&anchors.background_file))?;
            let features = anchors.background.features;
            if let Some(j) = anchors
                .categorical_features
                .iter()
                .find(|j| **j >= features)
            {
                return Err(format!(
                    "explainer.anchors.categorical_features: {j} is not a column of the {features}-feature background rows"
                ));
            }
            if features > crate::kernel_shap::MAX_FEATURES {
                return Err(format!(
                    "explainer.anchors: {features} features, over the {} a rule is made of",
                    crate::kernel_shap::MAX_FEATURES
                ));
            }
            anchors.discretizer = Some(crate::anchors::Discretizer::fit(
                &anchors.background.values,
                features,
                &anchors.categorical_features,
                &anchors.disc_perc,
            ));
            return Ok(());
        }
        if let Some(occlusion) = &self.occlusion {
            let sizes = [
                occlusion.patch,
                occlusion.stride.unwrap_or(1),
                occlusion.batch_size,
            ];
            if sizes
                .iter()
                .any(|n| *n == 0 || *n > crate::occlusion::MAX_WINDOWS)
            {
                return Err(format!(
                    "explainer.occlusion: patch, stride and batch_size are 1 to {}",
                    crate::occlusion::MAX_WINDOWS
                ));
            }
            if !occlusion.baseline.is_finite() {
                return Err("explainer.occlusion.baseline must be a finite number".into());
            }
            if let Some(layout) = &occlusion.layout
                && !matches!(layout.as_str(), "nchw" | "nhwc")
            {
                return Err(format!(
                    "explainer.occlusion.layout: '{layout}' is not nchw or nhwc"
                ));
            }
            return Ok(());
        }
        match (&mut self.kernel_shap, &mut self.tree_shap) {
            (Some(shap), None) => {
                if shap.max_coalitions == 0 || shap.max_coalitions > MAX_COALITIONS {
                    return Err(format!(
                        "explainer.kernel_shap.max_coalitions must be 1 to {MAX_COALITIONS}"
                    ));
                }
                shap.background = Background::read(&model_dir.join(&shap.background_file))?;
                let rows = shap.background.rows();
                if shap.max_coalitions.saturating_mul(rows) > MAX_EXPLAIN_ROWS {
                    return Err(format!(
                        "explainer.kernel_shap: {} coalitions x {rows} background rows is over {MAX_EXPLAIN_ROWS} model rows per explanation: lower max_coalitions or use fewer background rows",
                        shap.max_coalitions
                    ));
                }
            }
            (None, Some(tree)) => {
                tree.background = Background::read(&model_dir.join(&tree.background_file))?;
            }
            _ => {
                return Err("explainer needs exactly one method: kernel_shap or tree_shap".into());
            }
        }
        Ok(())
    }

    /// The background rows of the method (occlusion has none).
    pub fn background(&self) -> Option<&Background> {
        self.kernel_shap
            .as_ref()
            .map(|m| &m.background)
            .or(self.tree_shap.as_ref().map(|m| &m.background))
            .or(self.anchors.as_ref().map(|m| &m.background))
    }
}

impl ModelConfig {
    /// Reads `<model_dir>/config.yaml` if it exists (defaults otherwise), and the labels file
    /// it names. `model` is the directory's name.
    pub fn load(model: &str, model_dir: &Path) -> Result<ModelConfig> {
        let path = model_dir.join(CONFIG_FILE);
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => serde_yaml::from_str::<ModelConfig>(&text)
                .map_err(|e| PredictorError::load(model, format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ModelConfig::default(),
            Err(e) => {
                return Err(PredictorError::load(
                    model,
                    format!("{}: {e}", path.display()),
                ));
            }
        };
        if let Some(name) = &config.name
            && name != model
        {
            return Err(PredictorError::load(
                model,
                format!(
                    "{} names the model '{name}' but its directory is '{model}'",
                    path.display()
                ),
            ));
        }
        if let Some(file) = config.labels_file.take() {
            if !config.labels.is_empty() {
                return Err(PredictorError::load(
                    model,
                    "give 'labels' or 'labels_file', not both",
                ));
            }
            let labels_path = model_dir.join(&file);
            let text = std::fs::read_to_string(&labels_path).map_err(|e| {
                PredictorError::load(model, format!("{}: {e}", labels_path.display()))
            })?;
            config.labels = text.lines().map(str::to_owned).collect();
        }
        if let Some(explainer) = config.explainer.as_mut() {
            explainer
                .load(model_dir)
                .map_err(|e| PredictorError::load(model, format!("{}: {e}", path.display())))?;
        }
        config
            .check()
            .map_err(|e| PredictorError::load(model, format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.instance_count == 0 {
            return Err("instance_count must be at least 1".into());
        }
        if let Some(batching) = &self.dynamic_batching {
            if self.max_batch_size == 0 {
                return Err(
                    "dynamic_batching needs max_batch_size (the most rows in one batch)".into(),
                );
            }
            if let Some(size) = batching
                .preferred_batch_size
                .iter()
                .find(|&&s| s == 0 || s > self.max_batch_size)
            {
                return Err(format!(
                    "preferred_batch_size {size} must be between 1 and max_batch_size ({})",
                    self.max_batch_size
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_select_versions() {
        let present = [3, 1, 2, 10];
        assert_eq!(VersionPolicy::Latest(1).select(&present), vec![10]);
        assert_eq!(VersionPolicy::Latest(2).select(&present), vec![3, 10]);
        assert_eq!(VersionPolicy::Latest(9).select(&present), vec![1, 2, 3, 10]);
        assert_eq!(VersionPolicy::All.select(&present), vec![1, 2, 3, 10]);
        assert_eq!(
            VersionPolicy::Specific(vec![2, 7]).select(&present),
            vec![2]
        );
    }

    #[test]
    fn kserve_batcher_maps_to_dynamic_batching() {
        let mut config = ModelConfig::default();
        config.apply_kserve_batcher(None, None);
        assert_eq!(config.max_batch_size, 32);
        assert_eq!(
            config
                .dynamic_batching
                .as_ref()
                .unwrap()
                .max_queue_delay_microseconds,
            500_000
        );
        config.apply_kserve_batcher(Some(64), Some(5));
        assert_eq!(config.max_batch_size, 64);
        assert_eq!(
            config
                .dynamic_batching
                .unwrap()
                .max_queue_delay_microseconds,
            5_000
        );
    }

    #[test]
    fn batching_config_parses() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "max_batch_size: 32\ninstance_count: 2\nintra_op_threads: 1\ndynamic_batching:\n  max_queue_delay_microseconds: 200\n  preferred_batch_size: [8, 16]\n  max_queue_size: 100\n",
        )
        .unwrap();
        let config = ModelConfig::load("m", dir.path()).unwrap();
        assert_eq!(config.instance_count, 2);
        assert_eq!(
            config.dynamic_batching,
            Some(DynamicBatching {
                max_queue_delay_microseconds: 200,
                preferred_batch_size: vec![8, 16],
                max_queue_size: 100,
                default_timeout_microseconds: 0
            })
        );
    }

    #[test]
    fn config_files_parse_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| std::fs::write(dir.path().join(CONFIG_FILE), text).unwrap();
        assert_eq!(
            ModelConfig::load("m", dir.path()).unwrap(),
            ModelConfig::default()
        );

        write("name: m\nmax_batch_size: 8\nversion_policy: all\nlabels_file: labels.txt\n");
        std::fs::write(dir.path().join("labels.txt"), "cat\ndog\n").unwrap();
        let config = ModelConfig::load("m", dir.path()).unwrap();
        assert_eq!(config.max_batch_size, 8);
        assert_eq!(config.version_policy, VersionPolicy::All);
        assert_eq!(config.labels, vec!["cat", "dog"]);

        write("version_policy: {specific: [1, 3]}\ninputs: [{name: x, shape: [-1, 4]}]\n");
        let config = ModelConfig::load("m", dir.path()).unwrap();
        assert_eq!(config.version_policy, VersionPolicy::Specific(vec![1, 3]));
        assert_eq!(config.inputs[0].shape, Some(vec![-1, 4]));

        write("explainer: {kernel_shap: {background_file: bg.json}}\n");
        std::fs::write(dir.path().join("bg.json"), "[[1, 2], [3, 4.5]]").unwrap();
        std::fs::write(dir.path().join("ragged.json"), "[[1, 2], [3]]").unwrap();
        let big = format!("[{}]", vec!["[0, 0]"; 100].join(","));
        std::fs::write(dir.path().join("big.json"), big).unwrap();
        let config = ModelConfig::load("m", dir.path()).unwrap();
        let explainer = config.explainer.unwrap();
        assert_eq!(explainer.timeout_ms, DEFAULT_EXPLAIN_TIMEOUT_MS);
        let shap = explainer.kernel_shap.unwrap();
        assert_eq!(
            shap.max_coalitions,
            crate::kernel_shap::DEFAULT_MAX_COALITIONS
        );
        assert_eq!(shap.background.features, 2);
        assert_eq!(*shap.background.values, vec![1.0, 2.0, 3.0, 4.5]);

        for (text, needle) in [
            ("name: other\n", "directory is 'm'"),
            ("max_batch_sise: 3\n", "unknown field"),
            ("version_policy: {latest: 0}\n", "at least 1"),
            (
                "version_policy: newest\n",
                "unknown version_policy 'newest'",
            ),
            ("labels_file: missing.txt\n", "missing.txt"),
            (
                "explainer: {kernel_shap: {background_file: nope.json}}\n",
                "nope.json",
            ),
            (
                "explainer: {kernel_shap: {background_file: bg.json, max_coalitions: 0}}\n",
                "max_coalitions must be 1 to",
            ),
            (
                "explainer: {kernel_shap: {background_file: big.json, max_coalitions: 65536}}\n",
                "over 4194304 model rows",
            ),
            (
                "explainer: {kernel_shap: {background_file: ragged.json}}\n",
                "row 1 has 1 features, row 0 has 2",
            ),
            ("explainer: {lime: {}}\n", "unknown field"),
            (
                "explainer: {anchors: {}}\n",
                "missing field `background_file`",
            ),
            (
                "explainer: {anchors: {background_file: bg.json, tau: 1.5}}\n",
                "between 0 and 1",
            ),
            (
                "explainer: {anchors: {background_file: bg.json, categorical_features: [9]}}\n",
                "9 is not a column",
            ),
            ("explainer: {occlusion: {patch: 0}}\n", "1 to 4096"),
            (
                "explainer: {occlusion: {batch_size: 100000}}\n",
                "1 to 4096",
            ),
            (
                "explainer: {anchors: {background_file: bg.json, batch_size: 100000000}}\n",
                "1 to 65536",
            ),
            (
                "explainer: {occlusion: {layout: chw}}\n",
                "not nchw or nhwc",
            ),
            ("explainer: {timeout_ms: 5}\n", "exactly one method"),
            (
                "explainer: {kernel_shap: {background_file: bg.json}, tree_shap: {background_file: bg.json}}\n",
                "exactly one method",
            ),
            (
                "explainer: {tree_shap: {background_file: bg.json}, timeout_ms: 0}\n",
                "timeout_ms must be 1 to",
            ),
            (
                "explainer: {tree_shap: {background_file: bg.json, max_coalitions: 3}}\n",
                "unknown field",
            ),
            ("instance_count: 0\n", "at least 1"),
            ("dynamic_batching: {}\n", "needs max_batch_size"),
            (
                "max_batch_size: 8\ndynamic_batching: {preferred_batch_size: [16]}\n",
                "between 1 and max_batch_size",
            ),
            ("dynamic_batching: {max_delay: 3}\n", "unknown field"),
        ] {
            write(text);
            let err = ModelConfig::load("m", dir.path()).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
