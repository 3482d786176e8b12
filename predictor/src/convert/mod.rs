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
const CONVERTER_VERSION: &str = "1";

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

    /// The format of a file, from its extension; a `.bst` is LightGBM's when its text says
    /// so, else XGBoost's. `None`: not a model file this converts.
    pub fn of_file(file: &Path) -> Option<Format> {
        let ext = file.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "joblib" | "pkl" | "pickle" => Some(Format::Sklearn),
            "json" | "ubj" => Some(Format::Xgboost),
            "txt" => Some(Format::Lightgbm),
            "bst" => {
                let mut head = [0u8; 5];
                let is_text = std::fs::File::open(file)
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                    .is_ok()
                    && (&head == b"tree\n" || &head == b"tree\r");
                Some(if is_text {
                    Format::Lightgbm
                } else {
                    Format::Xgboost
                })
            }
            _ => None,
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
    let partial = dir.join(format!("{key}.partial-{}", std::process::id()));
    let (model, feature_names) = match format {
        Format::Xgboost => {
            let (ensemble, names) = xgboost::read(&bytes).map_err(what)?;
            (ensemble.to_onnx().map_err(what)?, names)
        }
        Format::Lightgbm => {
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| what("not a LightGBM text model (not UTF-8)".into()))?;
            let (ensemble, names) = lightgbm::read(text).map_err(what)?;
            (ensemble.to_onnx().map_err(what)?, names)
        }
        Format::Sklearn => {
            let names = sklearn::convert(
                file,
                &partial,
                &options.python,
                options.predict_proba,
                options.timeout,
            )
            .map_err(what)?;
            let written = finish(&partial, None, &onnx_file, &names_file, &names);
            written.map_err(what)?;
            tracing::info!(file = %file.display(), onnx = %onnx_file.display(), took_ms = started.elapsed().as_millis() as u64, "converted");
            return Ok(Converted {
                onnx: onnx_file,
                format,
                feature_names: names,
            });
        }
    };
    let bytes = onnx::encode(&model);
    finish(
        &partial,
        Some(&bytes),
        &onnx_file,
        &names_file,
        &feature_names,
    )
    .map_err(what)?;
    tracing::info!(file = %file.display(), onnx = %onnx_file.display(), took_ms = started.elapsed().as_millis() as u64, "converted");
    Ok(Converted {
        onnx: onnx_file,
        format,
        feature_names,
    })
}

/// Writes the feature names, then renames the ONNX file (written to `partial`, or `bytes`
/// written there now) into place.
fn finish(
    partial: &Path,
    bytes: Option<&[u8]>,
    onnx_file: &Path,
    names_file: &Path,
    names: &[String],
) -> Result<(), String> {
    let fail = |e: std::io::Error| {
        let _ = std::fs::remove_file(partial);
        format!("cannot write the conversion: {e}")
    };
    if let Some(bytes) = bytes {
        std::fs::write(partial, bytes).map_err(fail)?;
    }
    let names_partial = names_file.with_extension(format!("partial-{}", std::process::id()));
    let json = serde_json::to_vec(names).unwrap_or_default();
    std::fs::write(&names_partial, json).map_err(fail)?;
    std::fs::rename(&names_partial, names_file).map_err(fail)?;
    std::fs::rename(partial, onnx_file).map_err(fail)
}
