//! Models in other frameworks' formats, converted to ONNX once, when they load, so one
//! runtime serves them all:
//!
//! | format | files | how |
//! |---|---|---|
//! | XGBoost | `*.json`, `*.ubj`, `*.bst` (JSON or UBJSON inside) | natively: the booster is plain data ([`xgboost`]) |
//! | LightGBM | `*.txt`, `*.bst` (the text model) | natively ([`lightgbm`]) |
//! | scikit-learn | `*.joblib`, `*.pkl`, `*.pickle` | skl2onnx, in a Python process of its own ([`sklearn`]) |
//!
//! The result is cached by content: `<cache>/converted/<sha256>.onnx`, the hash over the
//! file's bytes, the format, the options that change the graph and this converter's version.
//! A restart over the same file converts nothing; a changed file converts again. Files land
//! under a temporary name and are renamed into place: a half-written model is never served.

mod lightgbm;
pub mod onnx;
mod sklearn;
pub mod trees;
mod ubjson;
mod xgboost;

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use sklearn::{PYTHON, SKLEARN_TIMEOUT};

/// Bumped whenever a converter's output changes, so cached conversions are redone.
const CONVERTER_VERSION: &str = "2";

/// Whether a flag's value turns it on, as KServe's servers read `PREDICT_PROBA`: `true` in
/// any case; any other value is off.
pub fn is_true(value: &str) -> bool {
    value.trim().eq_ignore_ascii_case("true")
}

/// A model format meshserve converts, as KServe's `modelFormat.name` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Sklearn,
    Xgboost,
    Lightgbm,
}

impl Format {
    pub fn parse(name: &str) -> Option<Format> {
        match name.to_ascii_lowercase().as_str() {
            "sklearn" | "scikit-learn" => Some(Format::Sklearn),
            "xgboost" => Some(Format::Xgboost),
            "lightgbm" => Some(Format::Lightgbm),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Sklearn => "sklearn",
            Format::Xgboost => "xgboost",
            Format::Lightgbm => "lightgbm",
        }
    }

    /// The file extensions KServe's server for this format loads.
    pub fn extensions(self) -> &'static [&'static str] {
        match self {
            Format::Sklearn => &["joblib", "pkl", "pickle"],
            Format::Xgboost => &["bst", "json", "ubj"],
            Format::Lightgbm => &["bst", "txt"],
        }
    }

    /// The format of a file: from its extension and the start of its content (a `.bst` is
    /// LightGBM's when it starts with LightGBM's `tree` header, else XGBoost's; a `.json` is
    /// XGBoost's only when it is a booster, a `.txt` LightGBM's only when it is a model, so
    /// that a `model-settings.json` or a `README.txt` beside a model is not one). `None`: not
    /// a model file this converts.
    pub fn of_file(file: &Path) -> Option<Format> {
        [Format::Sklearn, Format::Xgboost, Format::Lightgbm]
            .into_iter()
            .find(|f| f.reads(file))
    }

    /// Whether `file` is a model file of this format (see [`Format::of_file`]).
    pub fn reads(self, file: &Path) -> bool {
        let Some(ext) = file
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
        else {
            return false;
        };
        if !self.extensions().contains(&ext.as_str()) {
            return false;
        }
        let mut head = [0u8; 512];
        let read = std::fs::File::open(file)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .unwrap_or(0);
        let head = &head[..read];
        let lightgbm = head.starts_with(b"tree\n") || head.starts_with(b"tree\r");
        match (self, ext.as_str()) {
            (Format::Sklearn, _) => true,
            (Format::Lightgbm, _) => lightgbm,
            (Format::Xgboost, "json") => head.windows(9).any(|w| w == b"\"learner\""),
            (Format::Xgboost, _) => !lightgbm,
        }
    }
}

/// What changes a conversion, and where conversions are kept.
#[derive(Debug, Clone)]
pub struct Options {
    /// Converted models are cached under `<cache>/converted`.
    pub cache: PathBuf,
    /// scikit-learn classifiers answer `predict_proba` instead of `predict` (KServe's
    /// `PREDICT_PROBA=true`).
    pub predict_proba: bool,
    /// The Python that runs skl2onnx.
    pub python: PathBuf,
    /// How long one scikit-learn conversion may take.
    pub timeout: Duration,
}

impl Options {
    pub fn new(cache: impl Into<PathBuf>) -> Options {
        Options {
            cache: cache.into(),
            predict_proba: false,
            python: PathBuf::from(PYTHON),
            timeout: SKLEARN_TIMEOUT,
        }
    }
}

/// A converted model: the ONNX file, and the input's feature names when the model file
/// names them (a V1 instance may then be an object keyed by them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    pub onnx: PathBuf,
    pub format: Format,
    pub feature_names: Vec<String>,
}

/// Converts `file` (in `format`) to ONNX, or finds the conversion in the cache.
pub fn convert(file: &Path, format: Format, options: &Options) -> Result<Converted, String> {
    let what = |e: String| format!("{} ({} model): {e}", file.display(), format.name());
    let bytes = std::fs::read(file).map_err(|e| what(e.to_string()))?;
    let mut hash = Sha256::new();
    hash.update(CONVERTER_VERSION);
    hash.update(format.name());
    hash.update([u8::from(options.predict_proba && format == Format::Sklearn)]);
    hash.update(&bytes);
    let key: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let dir = options.cache.join("converted");
    let onnx_file = dir.join(format!("{key}.onnx"));
    let names_file = dir.join(format!("{key}.features.json"));
    if onnx_file.is_file() {
        let feature_names = std::fs::read(&names_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        tracing::info!(file = %file.display(), onnx = %onnx_file.display(), "converted before");
        return Ok(Converted {
            onnx: onnx_file,
            format,
            feature_names,
        });
    }
    std::fs::create_dir_all(&dir).map_err(|e| what(format!("{}: {e}", dir.display())))?;
    let started = std::time::Instant::now();
    // Unique names in the cache directory (sidecars in pods sharing a volume all have pid 1),
    // removed on drop unless persisted.
    let temporary = |suffix: &str| {
        tempfile::Builder::new()
            .prefix(&format!("{key}.partial-"))
            .suffix(suffix)
            .tempfile_in(&dir)
            .map_err(|e| what(format!("{}: {e}", dir.display())))
    };
    let partial = temporary(".onnx")?;
    let feature_names = match format {
        Format::Xgboost | Format::Lightgbm => {
            let (ensemble, names) = match format {
                Format::Xgboost => xgboost::read(&bytes),
                _ => std::str::from_utf8(&bytes)
                    .map_err(|_| "not a LightGBM text model (not UTF-8)".to_owned())
                    .and_then(lightgbm::read),
            }
            .map_err(what)?;
            let model = onnx::encode(&ensemble.to_onnx().map_err(what)?);
            std::fs::write(partial.path(), model).map_err(|e| what(e.to_string()))?;
            names
        }
        Format::Sklearn => sklearn::convert(
            file,
            partial.path(),
            &options.python,
            options.predict_proba,
            options.timeout,
        )
        .map_err(what)?,
    };
    let names = temporary(".json")?;
    std::fs::write(
        names.path(),
        serde_json::to_vec(&feature_names).unwrap_or_default(),
    )
    .map_err(|e| what(e.to_string()))?;
    // The names first: a converted model in place always has its names beside it.
    names
        .persist(&names_file)
        .and_then(|_| partial.persist(&onnx_file))
        .map_err(|e| what(format!("cannot keep the conversion: {e}")))?;
    tracing::info!(file = %file.display(), onnx = %onnx_file.display(), took_ms = started.elapsed().as_millis() as u64, "converted");
    Ok(Converted {
        onnx: onnx_file,
        format,
        feature_names,
    })
}
