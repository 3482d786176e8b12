//! The model repository, in Triton's layout: `<root>/<model>/<version>/model.onnx`, with an
//! optional `<root>/<model>/config.yaml`. Models load at start and through the API, reload,
//! and unload; requests in flight keep the version they started on until they finish.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::config::ModelConfig;
use crate::error::{PredictorError, Result};
use crate::metrics::Metrics;
use crate::model::ModelVersion;
use crate::runtime::Runtime;

/// The file each version directory holds.
pub const MODEL_FILE: &str = "model.onnx";

/// A model's state, named as Triton's repository index names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Ready,
    /// Loading failed; the reason says why.
    Unavailable(String),
    /// Unloaded through the API.
    Unloaded,
}

impl ModelState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelState::Loading => "LOADING",
            ModelState::Ready => "READY",
            ModelState::Unavailable(_) | ModelState::Unloaded => "UNAVAILABLE",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            ModelState::Unavailable(reason) => reason,
            ModelState::Unloaded => "unloaded",
            ModelState::Loading | ModelState::Ready => "",
        }
    }
}

#[derive(Debug)]
struct ModelEntry {
    state: ModelState,
    versions: BTreeMap<u64, Arc<ModelVersion>>,
}

/// One line of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    /// Empty for a model with no version loaded.
    pub version: String,
    pub state: String,
    pub reason: String,
}

#[derive(Debug)]
pub struct Repository {
    root: PathBuf,
    runtime: Arc<Runtime>,
    metrics: Metrics,
    models: RwLock<BTreeMap<String, ModelEntry>>,
}

impl Repository {
    /// Opens a repository directory; nothing is loaded yet (see [`Repository::load_all`]).
    pub fn open(root: impl Into<PathBuf>, runtime: Arc<Runtime>) -> Result<Repository> {
        let root = root.into();
        if !root.is_dir() {
            return Err(PredictorError::load(
                "*",
                format!("model repository {} is not a directory", root.display()),
            ));
        }
        Ok(Repository {
            root,
            runtime,
            metrics: Metrics::new(),
            models: RwLock::new(BTreeMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The inference metrics of every model loaded from this repository.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The Prometheus text of every metric, with the loaded-model gauges read now.
    pub fn encode_metrics(&self) -> String {
        let ready = self.index(true);
        self.metrics
            .set_loaded(ready.iter().map(|e| (e.name.as_str(), e.version.as_str())));
        self.metrics.encode()
    }

    /// The model directories present on disk, sorted.
    pub fn models_on_disk(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    /// Loads every model on disk. Failures are recorded (the model is UNAVAILABLE with the
    /// reason, and the server is not ready) and returned, not fatal.
    pub fn load_all(&self) -> Vec<PredictorError> {
        self.models_on_disk()
            .iter()
            .filter_map(|name| self.load(name).err())
            .collect()
    }

    /// Loads, or reloads, one model from disk. Until the new versions are ready the old ones
    /// keep serving; on failure the old ones are dropped and the model is UNAVAILABLE.
    pub fn load(&self, name: &str) -> Result<()> {
        let dir = self.model_dir(name)?;
        self.set_state(name, ModelState::Loading, false);
        match self.load_versions(name, &dir) {
            Ok(versions) => {
                let loaded: Vec<u64> = versions.keys().copied().collect();
                self.write().insert(
                    name.to_owned(),
                    ModelEntry {
                        state: ModelState::Ready,
                        versions,
                    },
                );
                tracing::info!(model = name, versions = ?loaded, "model loaded");
                Ok(())
            }
            Err(e) => {
                self.set_state(name, ModelState::Unavailable(e.to_string()), true);
                tracing::error!(model = name, error = %e, "model failed to load");
                Err(e)
            }
        }
    }

    /// Unloads a model; its directory stays, so it can be loaded again.
    pub fn unload(&self, name: &str) -> Result<()> {
        let known = self.read().contains_key(name);
        if !known && !self.models_on_disk().iter().any(|n| n == name) {
            return Err(PredictorError::ModelNotFound(name.to_owned()));
        }
        self.set_state(name, ModelState::Unloaded, true);
        tracing::info!(model = name, "model unloaded");
        Ok(())
    }

    /// The version to serve: `""` picks the highest loaded version.
    pub fn get(&self, name: &str, version: &str) -> Result<Arc<ModelVersion>> {
        let models = self.read();
        let Some(entry) = models.get(name) else {
            return Err(self.missing(name));
        };
        if entry.state != ModelState::Ready {
            return Err(PredictorError::ModelNotReady {
                model: name.to_owned(),
                reason: match &entry.state {
                    ModelState::Loading => "it is loading".to_owned(),
                    ModelState::Unloaded => "it was unloaded".to_owned(),
                    ModelState::Unavailable(reason) => reason.clone(),
                    ModelState::Ready => String::new(),
                },
            });
        }
        let found = if version.is_empty() {
            entry.versions.values().next_back()
        } else {
            version
                .parse::<u64>()
                .ok()
                .and_then(|v| entry.versions.get(&v))
        };
        found
            .cloned()
            .ok_or_else(|| PredictorError::VersionNotFound {
                model: name.to_owned(),
                version: version.to_owned(),
            })
    }

    /// The loaded version numbers of a model, ascending.
    pub fn versions(&self, name: &str) -> Result<Vec<u64>> {
        let models = self.read();
        let entry = models.get(name).ok_or_else(|| self.missing(name))?;
        Ok(entry.versions.keys().copied().collect())
    }

    /// Whether a model (and version, if not empty) can serve.
    pub fn is_model_ready(&self, name: &str, version: &str) -> Result<bool> {
        match self.get(name, version) {
            Ok(_) => Ok(true),
            Err(PredictorError::ModelNotReady { .. } | PredictorError::VersionNotFound { .. }) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Ready when every model that should be loaded is: none loading or failed.
    pub fn is_ready(&self) -> bool {
        self.read()
            .values()
            .all(|e| matches!(e.state, ModelState::Ready | ModelState::Unloaded))
    }

    /// Every model on disk or known, one line per loaded version, or one for the model.
    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let models = self.read();
        let mut names = self.models_on_disk();
        names.extend(
            models
                .keys()
                .filter(|k| !names.contains(k))
                .cloned()
                .collect::<Vec<_>>(),
        );
        names.sort();
        let mut out = Vec::new();
        for name in names {
            match models.get(&name) {
                Some(entry) if entry.state == ModelState::Ready => {
                    out.extend(entry.versions.keys().map(|v| IndexEntry {
                        name: name.clone(),
                        version: v.to_string(),
                        state: ModelState::Ready.as_str().to_owned(),
                        reason: String::new(),
                    }));
                }
                _ if ready_only => {}
                Some(entry) => out.push(IndexEntry {
                    name,
                    version: String::new(),
                    state: entry.state.as_str().to_owned(),
                    reason: entry.state.reason().to_owned(),
                }),
                None => out.push(IndexEntry {
                    name,
                    version: String::new(),
                    state: "UNAVAILABLE".to_owned(),
                    reason: "not loaded".to_owned(),
                }),
            }
        }
        out
    }

    fn missing(&self, name: &str) -> PredictorError {
        if self.models_on_disk().iter().any(|n| n == name) {
            PredictorError::ModelNotReady {
                model: name.to_owned(),
                reason: "it is not loaded".to_owned(),
            }
        } else {
            PredictorError::ModelNotFound(name.to_owned())
        }
    }

    /// `<root>/<name>`, for a name that is one plain path component naming a directory.
    fn model_dir(&self, name: &str) -> Result<PathBuf> {
        let plain =
            !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
        let dir = self.root.join(name);
        if plain && dir.is_dir() {
            Ok(dir)
        } else {
            Err(PredictorError::ModelNotFound(name.to_owned()))
        }
    }

    fn load_versions(&self, name: &str, dir: &Path) -> Result<BTreeMap<u64, Arc<ModelVersion>>> {
        let config = ModelConfig::load(name, dir)?;
        let present: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| PredictorError::load(name, format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(MODEL_FILE).is_file())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
            .filter(|&v| v > 0)
            .collect();
        let chosen = config.version_policy.select(&present);
        if chosen.is_empty() {
            return Err(PredictorError::load(
                name,
                format!(
                    "no version to serve: {} holds versions {present:?} (directories <version>/{MODEL_FILE}, version >= 1) and the policy is {:?}",
                    dir.display(),
                    config.version_policy
                ),
            ));
        }
        chosen
            .into_iter()
            .map(|v| {
                let file = dir.join(v.to_string()).join(MODEL_FILE);
                ModelVersion::load(&self.runtime, name, v, &file, &config, &self.metrics)
                    .map(|m| (v, Arc::new(m)))
            })
            .collect()
    }

    fn set_state(&self, name: &str, state: ModelState, drop_versions: bool) {
        let mut models = self.write();
        let entry = models.entry(name.to_owned()).or_insert_with(|| ModelEntry {
            state: ModelState::Loading,
            versions: BTreeMap::new(),
        });
        // A reload keeps serving the old versions while it loads.
        if entry.state != ModelState::Ready || drop_versions {
            entry.state = state;
        }
        if drop_versions {
            entry.versions.clear();
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
