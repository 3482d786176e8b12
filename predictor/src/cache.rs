//! The model cache (what ModelMesh did, and Triton and MLServer do not): models listed in the
//! repository load when their first request comes instead of at start, unload after an idle
//! time, and share a memory budget, the least recently used model evicted to make room. A
//! request for a model that is not in memory waits for its load, up to
//! [`CachePolicy::load_timeout`], and is answered as if the model had been there.
//!
//! Loads run one at a time (ModelMesh's default loading concurrency is 1 too): the budget is
//! checked and room made before a load starts, so memory stays under the budget but for the
//! models requests in flight still hold. A model's size is an estimate made before it loads,
//! as ModelMesh makes it: the bytes of its ONNX files times its `instance_count` (each session
//! holds its own copy of the weights).
//!
//! The server's defaults come from `meshserve serve`'s flags; a model's `config.yaml` may set
//! its own under `loading:` ([`crate::config::LoadingConfig`]).
//!
//! Metrics, with ModelMesh's meanings (`modelmesh_*` there):
//!
//! | metric | type | what |
//! |---|---|---|
//! | `meshserve_cache_miss_milliseconds{model}` | histogram | how long a request waited for its model to load |
//! | `meshserve_loadmodel_milliseconds{model}` | histogram | the time of a load |
//! | `meshserve_evictions_total{model,reason}` | counter | models taken out of memory: `budget` (to make room) or `idle` |
//! | `meshserve_age_at_eviction_milliseconds{reason}` | histogram | how long the model had been loaded when it was taken out |
//! | `meshserve_instance_capacity_bytes` | gauge | the memory budget (0: none) |
//! | `meshserve_instance_used_bytes` | gauge | the estimated bytes of the models loaded |
//! | `meshserve_instance_lru_seconds` | gauge | how long ago the least recently used loaded model was last used |

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use crate::config::LoadingConfig;

/// The server's defaults for every model without its own `loading:` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// Models load on their first request rather than at start.
    pub on_demand: bool,
    /// A loaded model without a request for this long is unloaded (`None`: never).
    pub idle_unload: Option<Duration>,
    /// The most estimated bytes of loaded models (`None`: no budget).
    pub memory_budget: Option<u64>,
    /// How long a request waits for its model to load; then 503 (gRPC `UNAVAILABLE`) and the
    /// load goes on.
    pub load_timeout: Duration,
}

/// The default wait for a load.
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(120);

impl Default for CachePolicy {
    /// Triton's behaviour: every model loads at start and stays.
    fn default() -> Self {
        CachePolicy {
            on_demand: false,
            idle_unload: None,
            memory_budget: None,
            load_timeout: DEFAULT_LOAD_TIMEOUT,
        }
    }
}

/// One model's settings: its `config.yaml`'s over the server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModelPolicy {
    pub on_demand: bool,
    pub idle_unload: Option<Duration>,
}

impl CachePolicy {
    pub(crate) fn for_model(&self, own: &LoadingConfig) -> ModelPolicy {
        ModelPolicy {
            on_demand: own.on_demand.unwrap_or(self.on_demand),
            idle_unload: match own.idle_unload_secs {
                Some(0) => None,
                Some(secs) => Some(Duration::from_secs(secs)),
                None => self.idle_unload,
            },
        }
    }
}

/// Why a model left memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// To make room under the memory budget for another model.
    Budget,
    /// No request within its idle time.
    Idle(Duration),
}

impl Eviction {
    fn label(self) -> &'static str {
        match self {
            Eviction::Budget => "budget",
            Eviction::Idle(_) => "idle",
        }
    }
}

/// Parses a byte count with an optional unit: `512`, `64k`, `256Mi`, `2G`, `1.5Gi`
/// (Kubernetes' suffixes: k, M, G, T powers of 1000; Ki, Mi, Gi, Ti powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale: f64 = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "'{text}': unknown unit '{other}' (use k, M, G, T, Ki, Mi, Gi or Ti)"
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a byte count such as 512Mi"))?;
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("'{text}' is not a byte count of at least 1"));
    }
    Ok(bytes as u64)
}

/// The cache's metric families, on the repository's registry.
#[derive(Debug, Clone)]
pub(crate) struct CacheMetrics {
    miss: HistogramVec,
    load: HistogramVec,
    evictions: IntCounterVec,
    age: HistogramVec,
    capacity: IntGauge,
    used: IntGauge,
    lru: IntGauge,
}

impl CacheMetrics {
    pub(crate) fn register(registry: &Registry) -> CacheMetrics {
        let milliseconds = vec![
            1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
            30000.0, 60000.0, 120000.0,
        ];
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .unwrap_or_else(|e| crate::metrics::unreachable_metric(name, e));
            crate::metrics::register(registry, Box::new(h.clone()), name);
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help)
                .unwrap_or_else(|e| crate::metrics::unreachable_metric(name, e));
            crate::metrics::register(registry, Box::new(g.clone()), name);
            g
        };
        let evictions = IntCounterVec::new(
            Opts::new(
                "meshserve_evictions_total",
                "Models taken out of memory, by reason (budget, idle)",
            ),
            &["model", "reason"],
        )
        .unwrap_or_else(|e| crate::metrics::unreachable_metric("evictions", e));
        crate::metrics::register(registry, Box::new(evictions.clone()), "evictions");
        // Ages run from seconds to days.
        let ages = vec![
            1e3, 1e4, 6e4, 3e5, 6e5, 1.8e6, 3.6e6, 1.08e7, 2.16e7, 4.32e7, 8.64e7, 6.048e8,
        ];
        CacheMetrics {
            miss: histogram(
                "meshserve_cache_miss_milliseconds",
                "How long a request waited for its model to load (ModelMesh's cache miss)",
                &["model"],
                milliseconds.clone(),
            ),
            load: histogram(
                "meshserve_loadmodel_milliseconds",
                "The time of one model load",
                &["model"],
                milliseconds,
            ),
            evictions,
            age: histogram(
                "meshserve_age_at_eviction_milliseconds",
                "How long a model had been loaded when it was taken out of memory",
                &["reason"],
                ages,
            ),
            capacity: gauge(
                "meshserve_instance_capacity_bytes",
                "The memory budget for loaded models (0: none)",
            ),
            used: gauge(
                "meshserve_instance_used_bytes",
                "Estimated bytes of the models loaded",
            ),
            lru: gauge(
                "meshserve_instance_lru_seconds",
                "Seconds since the least recently used loaded model was last used",
            ),
        }
    }

    pub(crate) fn missed(&self, model: &str, waited: Duration) {
        self.miss
            .with_label_values(&[model])
            .observe(waited.as_secs_f64() * 1e3);
    }

    pub(crate) fn loaded(&self, model: &str, took: Duration) {
        self.load
            .with_label_values(&[model])
            .observe(took.as_secs_f64() * 1e3);
    }

    pub(crate) fn evicted(&self, model: &str, why: Eviction, age: Duration) {
        self.evictions
            .with_label_values(&[model, why.label()])
            .inc();
        self.age
            .with_label_values(&[why.label()])
            .observe(age.as_secs_f64() * 1e3);
    }

    pub(crate) fn set_usage(&self, capacity: Option<u64>, used: u64, lru: Option<Duration>) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.capacity.set(capacity.map_or(0, clamp));
        self.used.set(clamp(used));
        self.lru.set(lru.map_or(0, |d| clamp(d.as_secs())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_take_kubernetes_units() {
        for (text, bytes) in [
            ("512", 512),
            ("64k", 64_000),
            ("256Mi", 256 << 20),
            ("2G", 2_000_000_000),
            ("1.5Gi", 3 << 29),
        ] {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text}");
        }
        for bad in ["", "Mi", "12 MB", "-1", "0", "1.2.3", "5Q"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_models_settings_win_over_the_servers() {
        let server = CachePolicy {
            on_demand: true,
            idle_unload: Some(Duration::from_secs(30)),
            ..CachePolicy::default()
        };
        assert_eq!(
            server.for_model(&LoadingConfig::default()),
            ModelPolicy {
                on_demand: true,
                idle_unload: Some(Duration::from_secs(30))
            }
        );
        let own = LoadingConfig {
            on_demand: Some(false),
            idle_unload_secs: Some(0),
        };
        assert_eq!(
            server.for_model(&own),
            ModelPolicy {
                on_demand: false,
                idle_unload: None
            }
        );
    }
}
