//! The model repository, in Triton's layout: `<root>/<model>/<version>/model.onnx`, with an
//! optional `<root>/<model>/config.yaml`. Models load at start and through the API, reload,
//! and unload; requests in flight keep the version they started on until they finish.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::cache::{CacheMetrics, CachePolicy, Eviction, ModelPolicy};
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
    /// Unloaded through the API: it stays out until loaded through the API.
    Unloaded,
    /// Not in memory, and its next request loads it (see [`crate::cache`]).
    Cold(Cold),
}

/// Why a model that loads on demand is not in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cold {
    /// Not loaded yet (`on_demand`).
    NotLoaded,
    /// Taken out of memory.
    Evicted(Eviction),
}

impl ModelState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelState::Loading => "LOADING",
            ModelState::Ready => "READY",
            ModelState::Unavailable(_) | ModelState::Unloaded | ModelState::Cold(_) => {
                "UNAVAILABLE"
            }
        }
    }

    pub fn reason(&self) -> String {
        match self {
            ModelState::Unavailable(reason) => reason.clone(),
            ModelState::Unloaded => "unloaded".to_owned(),
            ModelState::Cold(Cold::NotLoaded) => {
                "not loaded yet: loads on its first request".to_owned()
            }
            ModelState::Cold(Cold::Evicted(Eviction::Budget)) => {
                "evicted for the memory budget: loads on its next request".to_owned()
            }
            ModelState::Cold(Cold::Evicted(Eviction::Idle(idle))) => format!(
                "unloaded after {} s without a request: loads on its next request",
                idle.as_secs()
            ),
            ModelState::Loading | ModelState::Ready => String::new(),
        }
    }

    /// Whether a request for the model waits for a load rather than failing.
    fn loads_on_request(&self) -> bool {
        matches!(self, ModelState::Cold(_) | ModelState::Loading)
    }
}

#[derive(Debug)]
struct ModelEntry {
    state: ModelState,
    versions: BTreeMap<u64, Arc<ModelVersion>>,
    policy: ModelPolicy,
    /// The estimated bytes of the loaded versions.
    bytes: u64,
    loaded_at: Instant,
    /// Milliseconds from the repository's epoch to the last request that used it.
    last_used: AtomicU64,
}

impl ModelEntry {
    fn new(state: ModelState, policy: ModelPolicy) -> ModelEntry {
        ModelEntry {
            state,
            versions: BTreeMap::new(),
            policy,
            bytes: 0,
            loaded_at: Instant::now(),
            last_used: AtomicU64::new(0),
        }
    }
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
    policy: CachePolicy,
    cache: CacheMetrics,
    epoch: Instant,
    /// Held by the load running now: loads go one at a time.
    loading: Arc<tokio::sync::Mutex<()>>,
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
        let metrics = Metrics::new();
        let cache = CacheMetrics::register(metrics.registry());
        Ok(Repository {
            root,
            runtime,
            cache,
            metrics,
            models: RwLock::new(BTreeMap::new()),
            policy: CachePolicy::default(),
            epoch: Instant::now(),
            loading: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Keeps models in memory as `policy` says (the default: all loaded at start, for good).
    pub fn with_cache(self, policy: CachePolicy) -> Repository {
        Repository { policy, ..self }
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

    /// The Prometheus text of every metric, with the loaded-model and cache gauges read now.
    pub fn encode_metrics(&self) -> String {
        let ready = self.index(true);
        self.metrics
            .set_loaded(ready.iter().map(|e| (e.name.as_str(), e.version.as_str())));
        {
            let models = self.read();
            let loaded = models.values().filter(|e| e.state == ModelState::Ready);
            let used = loaded.clone().map(|e| e.bytes).sum();
            let oldest = loaded.map(|e| e.last_used.load(Ordering::Relaxed)).min();
            let now = self.now_ms();
            let lru = oldest.map(|t| Duration::from_millis(now.saturating_sub(t)));
            self.cache.set_usage(self.policy.memory_budget, used, lru);
        }
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

    /// Loads every model on disk, but those that load on demand: they are listed and load on
    /// their first request. Failures are recorded (the model is UNAVAILABLE with the reason,
    /// and the server is not ready) and returned, not fatal.
    pub fn load_all(&self) -> Vec<PredictorError> {
        let mut failures = Vec::new();
        for name in self.models_on_disk() {
            let policy = self.model_dir(&name).ok().and_then(|dir| {
                let config = ModelConfig::load(&name, &dir).ok()?;
                Some(self.policy.for_model(&config.loading))
            });
            match policy {
                Some(policy) if policy.on_demand => {
                    self.write().insert(
                        name,
                        ModelEntry::new(ModelState::Cold(Cold::NotLoaded), policy),
                    );
                }
                // A configuration that does not read fails in the load, with its reason.
                _ => failures.extend(self.load(&name).err()),
            }
        }
        failures
    }

    /// Loads, or reloads, one model from disk, making room under the memory budget first.
    /// Until the new versions are ready the old ones keep serving; on failure the old ones
    /// are dropped and the model is UNAVAILABLE. Blocks: async callers use
    /// [`Repository::load_now`].
    pub fn load(&self, name: &str) -> Result<()> {
        let dir = self.model_dir(name)?;
        // A model loading on demand stays cold while it loads: the server stays ready (its
        // requests wait for the load) instead of reporting not ready while a request waits.
        let cold = matches!(
            self.read().get(name).map(|e| &e.state),
            Some(ModelState::Cold(_))
        );
        if !cold {
            self.set_state(name, ModelState::Loading, false);
        }
        let started = Instant::now();
        match self.load_versions(name, &dir) {
            Ok((versions, policy, bytes)) => {
                let loaded: Vec<u64> = versions.keys().copied().collect();
                let entry = ModelEntry {
                    versions,
                    bytes,
                    last_used: AtomicU64::new(self.now_ms()),
                    ..ModelEntry::new(ModelState::Ready, policy)
                };
                self.write().insert(name.to_owned(), entry);
                self.cache.loaded(name, started.elapsed());
                tracing::info!(model = name, versions = ?loaded, bytes, ms = started.elapsed().as_millis() as u64, "model loaded");
                Ok(())
            }
            Err(e) => {
                self.set_state(name, ModelState::Unavailable(e.to_string()), true);
                tracing::error!(model = name, error = %e, "model failed to load");
                Err(e)
            }
        }
    }

    /// Loads, or reloads, a model on the blocking pool, after the load running now.
    pub async fn load_now(self: &Arc<Self>, name: &str) -> Result<()> {
        let _turn = Arc::clone(&self.loading).lock_owned().await;
        Arc::clone(self).load_blocking(name.to_owned()).await
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

    /// The version to serve (`""`: the highest loaded), loading the model first when it loads
    /// on demand and is not in memory: the request waits for the load, up to the policy's
    /// `load_timeout`.
    pub async fn acquire(self: &Arc<Self>, name: &str, version: &str) -> Result<Arc<ModelVersion>> {
        // The warm path: one look.
        match self.get(name, version) {
            Err(_) if self.is_cold(name) => {}
            found => return found,
        }
        let started = Instant::now();
        let load = tokio::spawn(Arc::clone(self).load_cold(name.to_owned()));
        match tokio::time::timeout(self.policy.load_timeout, load).await {
            Err(_) => {
                return Err(PredictorError::ModelNotReady {
                    model: name.to_owned(),
                    reason: format!(
                        "it is loading and was not ready within {} s (--model-load-timeout-secs); retry",
                        self.policy.load_timeout.as_secs()
                    ),
                });
            }
            Ok(Err(e)) => {
                return Err(PredictorError::load(
                    name,
                    format!("the load task failed: {e}"),
                ));
            }
            Ok(Ok(result)) => result?,
        }
        let found = self.get(name, version)?;
        self.cache.missed(name, started.elapsed());
        Ok(found)
    }

    /// Loads a model that is not in memory, in its turn; a request that queued behind the
    /// load of the same model finds it loaded.
    async fn load_cold(self: Arc<Self>, name: String) -> Result<()> {
        let _turn = Arc::clone(&self.loading).lock_owned().await;
        if !self.is_cold(&name) {
            return Ok(());
        }
        self.load_blocking(name).await
    }

    /// Whether a request for `name` waits for a load rather than failing.
    fn is_cold(&self, name: &str) -> bool {
        self.read()
            .get(name)
            .is_some_and(|e| e.state.loads_on_request())
    }

    /// [`Repository::load`] on the blocking pool.
    async fn load_blocking(self: Arc<Self>, name: String) -> Result<()> {
        tokio::task::spawn_blocking(move || self.load(&name))
            .await
            .map_err(|e| PredictorError::load("*", format!("the load task failed: {e}")))?
    }

    /// Takes out of memory every model idle past its `idle_unload` time; they load again on
    /// their next request. Returns how many. Called on a timer by the server.
    pub fn unload_idle(&self) -> usize {
        let now = self.now_ms();
        let mut models = self.write();
        let mut count = 0;
        for (name, entry) in models.iter_mut() {
            let Some(idle) = entry.policy.idle_unload else {
                continue;
            };
            let since = now.saturating_sub(entry.last_used.load(Ordering::Relaxed));
            if entry.state == ModelState::Ready && u128::from(since) >= idle.as_millis() {
                self.evict(name, entry, Eviction::Idle(idle));
                count += 1;
            }
        }
        count
    }

    fn evict(&self, name: &str, entry: &mut ModelEntry, why: Eviction) {
        entry.versions.clear();
        entry.state = ModelState::Cold(Cold::Evicted(why));
        let age = entry.loaded_at.elapsed();
        self.cache.evicted(name, why, age);
        tracing::info!(model = name, reason = ?why, bytes = entry.bytes, age_s = age.as_secs(), "model taken out of memory");
        entry.bytes = 0;
    }

    /// Evicts the least recently used models until `bytes` more fit under the budget.
    fn make_room(&self, name: &str, bytes: u64) -> Result<()> {
        let Some(budget) = self.policy.memory_budget else {
            return Ok(());
        };
        if bytes > budget {
            return Err(PredictorError::load(
                name,
                format!(
                    "it needs about {bytes} bytes (its ONNX files times instance_count), over the memory budget of {budget} bytes"
                ),
            ));
        }
        let mut models = self.write();
        loop {
            let others = models
                .iter_mut()
                .filter(|(n, e)| n.as_str() != name && e.state == ModelState::Ready);
            let used: u64 = others.map(|(_, e)| e.bytes).sum();
            if used.saturating_add(bytes) <= budget {
                return Ok(());
            }
            let victim = models
                .iter_mut()
                .filter(|(n, e)| n.as_str() != name && e.state == ModelState::Ready)
                .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed));
            match victim {
                Some((victim, entry)) => {
                    let victim = victim.clone();
                    self.evict(&victim, entry, Eviction::Budget);
                }
                None => return Ok(()),
            }
        }
    }

    /// The version to serve: `""` picks the highest loaded version. A model that loads on
    /// demand and is not in memory is not ready here: see [`Repository::acquire`].
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
                    state => state.reason(),
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
        let found = found
            .cloned()
            .ok_or_else(|| PredictorError::VersionNotFound {
                model: name.to_owned(),
                version: version.to_owned(),
            })?;
        entry.last_used.store(self.now_ms(), Ordering::Relaxed);
        Ok(found)
    }

    /// The loaded version numbers of a model, ascending.
    pub fn versions(&self, name: &str) -> Result<Vec<u64>> {
        let models = self.read();
        let entry = models.get(name).ok_or_else(|| self.missing(name))?;
        Ok(entry.versions.keys().copied().collect())
    }

    /// Whether a model (and version, if not empty) can serve: one that loads on its next
    /// request can, when the version is on disk.
    pub fn is_model_ready(&self, name: &str, version: &str) -> Result<bool> {
        if self.is_cold(name) {
            return Ok(version.is_empty()
                || self
                    .root
                    .join(name)
                    .join(version)
                    .join(MODEL_FILE)
                    .is_file());
        }
        match self.get(name, version) {
            Ok(_) => Ok(true),
            Err(PredictorError::ModelNotReady { .. } | PredictorError::VersionNotFound { .. }) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Ready when every model that should be loaded is, or loads on its next request: none
    /// failed, none loading at start.
    pub fn is_ready(&self) -> bool {
        self.read().values().all(|e| {
            matches!(
                e.state,
                ModelState::Ready | ModelState::Unloaded | ModelState::Cold(_)
            )
        })
    }

    /// The models a client may call now: loaded, or loading on their next request.
    pub fn servable(&self) -> Vec<String> {
        self.read()
            .iter()
            .filter(|(_, e)| matches!(e.state, ModelState::Ready | ModelState::Cold(_)))
            .map(|(n, _)| n.clone())
            .collect()
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
                    reason: entry.state.reason(),
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

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
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

    /// Loads the versions the policy picks, after making room for them; with the model's
    /// cache settings and its estimated bytes.
    fn load_versions(
        &self,
        name: &str,
        dir: &Path,
    ) -> Result<(BTreeMap<u64, Arc<ModelVersion>>, ModelPolicy, u64)> {
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
        let file = |v: u64| dir.join(v.to_string()).join(MODEL_FILE);
        let on_disk: u64 = chosen
            .iter()
            .map(|&v| std::fs::metadata(file(v)).map_or(0, |m| m.len()))
            .sum();
        let bytes = on_disk.saturating_mul(config.instance_count.max(1) as u64);
        self.make_room(name, bytes)?;
        let versions = chosen
            .into_iter()
            .map(|v| {
                ModelVersion::load(&self.runtime, name, v, &file(v), &config, &self.metrics)
                    .map(|m| (v, Arc::new(m)))
            })
            .collect::<Result<_>>()?;
        Ok((versions, self.policy.for_model(&config.loading), bytes))
    }

    fn set_state(&self, name: &str, state: ModelState, drop_versions: bool) {
        let mut models = self.write();
        let policy = self.policy.for_model(&Default::default());
        let entry = models
            .entry(name.to_owned())
            .or_insert_with(|| ModelEntry::new(ModelState::Loading, policy));
        // A reload keeps serving the old versions while it loads.
        if entry.state != ModelState::Ready || drop_versions {
            entry.state = state;
        }
        if drop_versions {
            entry.versions.clear();
            entry.bytes = 0;
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
