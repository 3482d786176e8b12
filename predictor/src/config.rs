//! The optional per-model configuration file, `<repository>/<model>/config.yaml`.
//!
//! ```yaml
//! name: mnist_cnn              # must match the directory when given
//! max_batch_size: 256          # 0: no limit on the first dimension
//! version_policy: {latest: 1}  # or: all, or {specific: [1, 3]}
//! labels: [zero, one, ...]     # or labels_file: labels.txt (one per line)
//! v1_output: probabilities     # which output fills V1 `predictions`
//! inputs:                      # override what the ONNX file declares
//!   - {name: input, datatype: FP32, shape: [-1, 1, 28, 28]}
//! outputs: []
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

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
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
        Ok(config)
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

        for (text, needle) in [
            ("name: other\n", "directory is 'm'"),
            ("max_batch_sise: 3\n", "unknown field"),
            ("version_policy: {latest: 0}\n", "at least 1"),
            (
                "version_policy: newest\n",
                "unknown version_policy 'newest'",
            ),
            ("labels_file: missing.txt\n", "missing.txt"),
        ] {
            write(text);
            let err = ModelConfig::load("m", dir.path()).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
