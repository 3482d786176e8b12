//! meshserve's model runtime: a model repository in Triton's layout, ONNX Runtime sessions
//! through `ort` (the library loaded at run time), and inference over the wire-independent
//! request and response types of [`meshserve_proto`].
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use meshserve_predictor::{Repository, Runtime, RuntimeOptions};
//! let runtime = Arc::new(Runtime::init(RuntimeOptions::default())?);
//! let repository = Repository::open("models/repository", runtime)?;
//! for error in repository.load_all() {
//!     eprintln!("{error}");
//! }
//! let model = repository.get("mnist_cnn", "")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod anchors;
mod batcher;
pub mod cache;
mod classification;
pub mod config;
pub mod convert;
pub mod error;
pub mod kernel_shap;
pub mod metrics;
pub mod model;
pub mod occlusion;
pub mod remote;
pub mod repository;
pub mod runtime;
pub mod storage;
mod tensors;
pub mod tree_shap;

/// The `tracing` target of the spans meant for trace export (`predict`, `queue`, `batch`,
/// `onnxruntime.run`), kept apart from logs: a sidecar that exports no traces turns the
/// target off, so these spans cost nothing there.
pub const TRACE_TARGET: &str = "meshserve::trace";

/// A span for trace export, the child of `$parent` (a `&tracing::Span`), or no span at all
/// when the parent is none: a request that is not traced (not sampled, or no exporter) makes
/// no spans. `trace_span!(&parent, "name", field = value, ...)`.
#[macro_export]
macro_rules! trace_span {
    ($parent:expr, $name:literal $(, $($fields:tt)*)?) => {{
        // Without a trace exporter the target is off: no lookup of the current span at all.
        if !::tracing::enabled!(target: $crate::TRACE_TARGET, ::tracing::Level::INFO) {
            ::tracing::Span::none()
        } else {
            let parent: &::tracing::Span = $parent;
            if parent.is_none() {
                ::tracing::Span::none()
            } else {
                ::tracing::info_span!(target: $crate::TRACE_TARGET, parent: parent, $name $(, $($fields)*)?)
            }
        }
    }};
}

pub use cache::CachePolicy;
pub use config::{DynamicBatching, ModelConfig, VersionPolicy};
pub use error::PredictorError;
pub use metrics::Metrics;
pub use model::{ModelVersion, PLATFORM};
pub use repository::{Cold, IndexEntry, ModelState, Repository};
pub use runtime::{Device, Runtime, RuntimeError, RuntimeOptions};
