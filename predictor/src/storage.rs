//! A predictor's model storage, as KServe's `storageUri` names it, turned into a model
//! repository in Triton's layout. The storage is one of:
//! - one `.onnx` file, or a directory of version directories (`1/model.onnx`, ... and an
//!   optional `config.yaml`): one model, served under one name (KServe serves it under the
//!   InferenceService's name);
//! - a repository: a directory of such model directories, served as it is.
//!
//! `meshserve serve --storage` (the sidecar) and `meshserve up` (the control plane) both go
//! through here, so a sidecar in a container (storage mounted at `/mnt/models`) serves exactly
//! what `up` serves locally.

use std::path::{Path, PathBuf};

use crate::ModelConfig;
use crate::config::CONFIG_FILE;
use crate::convert::{self, Format};

/// KServe's `batcher`: (`maxBatchSize` rows, `maxLatency` in ms), each optional.
pub type Batcher = (Option<u64>, Option<u64>);

fn io(what: &Path) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", what.display())
}

/// What a model file in a format meshserve does not convert needs, for the user.
fn foreign(file: &Path) -> Option<String> {
    let name = file.file_name()?.to_str()?.to_ascii_lowercase();
    let what = if name == "saved_model.pb" || name == "saved_model.pbtxt" {
        "a TensorFlow SavedModel: export it with tf2onnx (python -m tf2onnx.convert --saved-model DIR --output model.onnx)"
    } else if [".pt", ".pth", ".mar", ".torchscript"]
        .iter()
        .any(|e| name.ends_with(e))
    {
        "a PyTorch file: export the model with torch.onnx.export"
    } else {
        return None;
    };
    Some(format!(
        "{} is {what}, and meshserve serves ONNX",
        file.display()
    ))
}

/// A model file: ONNX (`None`), or a format converted when it loads.
type ModelFile = (PathBuf, Option<Format>);

/// The format of one file: `format` when given (a `.bst` is then that framework's), else
/// from the file.
fn file_format(file: &Path, format: Option<Format>) -> Option<Option<Format>> {
    let ext = file.extension()?.to_str()?.to_ascii_lowercase();
    if ext == "onnx" {
        return Some(None);
    }
    match format {
        Some(f) => f.reads(file).then_some(Some(f)),
        None => Format::of_file(file).map(Some),
    }
}

/// The one model file directly in `dir` (KServe's layout: `model.onnx`, `model.joblib`,
/// `model.bst`, ... beside nothing else that is a model), if there is one; two are an error.
/// With a `format` (the InferenceService's), only that framework's files count, as only they
/// do for KServe's server of that framework.
fn model_file(dir: &Path, format: Option<Format>) -> Result<Option<ModelFile>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let onnx: Vec<ModelFile> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .map(|p| (p.clone(), None))
        .collect();
    // ONNX files win over others in a directory, unless the InferenceService names another
    // format.
    let candidates: Vec<ModelFile> = if !onnx.is_empty() && format.is_none() {
        onnx
    } else {
        files
            .iter()
            .filter_map(|f| match file_format(f, format) {
                Some(Some(found)) => Some((f.clone(), Some(found))),
                _ => None,
            })
            .collect()
    };
    match candidates.as_slice() {
        [] => match files.iter().find_map(|f| foreign(f)) {
            Some(why) => Err(why),
            None => match format {
                Some(f) => Err(format!(
                    "{}: no {} model file (*.{}) in it",
                    dir.display(),
                    f.name(),
                    f.extensions().join(", *.")
                )),
                None => Ok(None),
            },
        },
        [one] => Ok(Some(one.clone())),
        several => Err(format!(
            "{}: {} model files side by side ({}); one model file per directory (KServe's rule), or one version directory each",
            dir.display(),
            several.len(),
            several
                .iter()
                .filter_map(|(p, _)| p.file_name().and_then(|n| n.to_str()))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// How storage is laid out: `None` for one model, or the model names of a repository.
pub fn layout(storage: &Path, format: Option<Format>) -> Result<Option<Vec<String>>, String> {
    if storage.is_file() {
        if let Some(why) = foreign(storage) {
            return Err(why);
        }
        return Ok(None);
    }
    if model_file(storage, format)?.is_some() {
        return Ok(None);
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(storage)
        .map_err(io(storage))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    let is_version = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.parse::<u64>().is_ok())
    };
    if entries
        .iter()
        .any(|p| is_version(p) && p.join("model.onnx").is_file())
    {
        return Ok(None);
    }
    let mut models: Vec<String> = entries
        .iter()
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
        .filter(|n| !n.starts_with('.'))
        .collect();
    models.sort();
    Ok(Some(models))
}

/// The model names storage serves: `name` for one model, else the repository's.
pub fn model_names(
    storage: &Path,
    name: &str,
    format: Option<Format>,
) -> Result<Vec<String>, String> {
    Ok(layout(storage, format)?.unwrap_or_else(|| vec![name.to_owned()]))
}

/// How one storage location becomes a repository.
#[derive(Debug, Clone)]
pub struct Prepare {
    /// KServe's batcher, for one model.
    pub batcher: Option<Batcher>,
    /// The format the InferenceService names, when it names one meshserve converts.
    pub format: Option<Format>,
    /// How models in other formats are converted, and where conversions are kept.
    pub convert: convert::Options,
    /// The model's built-in explainer, config.yaml's `explainer` as JSON or YAML (the
    /// control plane's rendering of `spec.explainer`); it replaces the storage's own.
    pub explainer: Option<String>,
}

/// A model repository for `storage`, made under `scratch` for one model (links to its
/// versions, or to its conversion to ONNX, and its config.yaml with the batcher applied), or
/// the storage itself when it is a repository. Returns the repository and its model names.
pub fn prepare_repository(
    storage: &Path,
    name: &str,
    how: &Prepare,
    scratch: &Path,
) -> Result<(PathBuf, Vec<String>), String> {
    let batcher = how.batcher;
    let storage = std::fs::canonicalize(storage).map_err(io(storage))?;
    if let Some(models) = layout(&storage, how.format)? {
        if batcher.is_some() {
            return Err(format!(
                "the KServe batcher applies to one model; {} is a repository of several: set dynamic_batching in each model's config.yaml",
                storage.display()
            ));
        }
        if how.explainer.is_some() {
            return Err(format!(
                "spec.explainer applies to one model; {} is a repository of several: set explainer in each model's config.yaml",
                storage.display()
            ));
        }
        return Ok((storage, models));
    }
    let _ = std::fs::remove_dir_all(scratch);
    let model_dir = scratch.join(name);
    std::fs::create_dir_all(&model_dir).map_err(io(&model_dir))?;
    let mut config = String::new();
    let mut converted = None;
    // Where files the config names (labels, background rows) are found.
    let mut source_dir = None;
    let file = if storage.is_file() {
        match file_format(&storage, how.format) {
            Some(format) => Some((storage.clone(), format)),
            None if how.format.is_some() => {
                return Err(format!(
                    "{} is not a {} model file",
                    storage.display(),
                    how.format.map_or("", Format::name)
                ));
            }
            None => Some((storage.clone(), None)),
        }
    } else {
        model_file(&storage, how.format)?
    };
    if let Some((file, format)) = file {
        let version = model_dir.join("1");
        std::fs::create_dir_all(&version).map_err(io(&version))?;
        let onnx = match format {
            Some(format) => {
                let done = convert::convert(&file, format, &how.convert)?;
                let onnx = done.onnx.clone();
                converted = Some(done);
                onnx
            }
            None => file.clone(),
        };
        link(&onnx, &version.join("model.onnx"))?;
        source_dir = file.parent().map(Path::to_path_buf);
        if let Some(dir) = file.parent().filter(|_| !storage.is_file()) {
            let own = dir.join(CONFIG_FILE);
            if own.is_file() {
                config = std::fs::read_to_string(&own).map_err(io(&own))?;
            }
        }
    } else {
        for entry in std::fs::read_dir(&storage)
            .map_err(io(&storage))?
            .filter_map(|e| e.ok())
        {
            if entry.file_name() == CONFIG_FILE {
                config = std::fs::read_to_string(entry.path()).map_err(io(&entry.path()))?;
            } else {
                link(&entry.path(), &model_dir.join(entry.file_name()))?;
            }
        }
    }
    let mut config = model_config(&config, batcher)?;
    if let Some(done) = converted {
        config = with_converted_from(&config, &done)?;
    }
    if let Some(explainer) = &how.explainer {
        config = with_explainer(&config, explainer)?;
    }
    if let Some(dir) = source_dir {
        link_named_files(&config, &dir, &model_dir)?;
    }
    if !config.is_empty() {
        std::fs::write(model_dir.join(CONFIG_FILE), config).map_err(io(&model_dir))?;
    }
    Ok((scratch.to_path_buf(), vec![name.to_owned()]))
}

/// A model's config.yaml: the storage's own, without its `name` (the model is served under
/// the name given), with KServe's batcher applied.
pub fn model_config(original: &str, batcher: Option<Batcher>) -> Result<String, String> {
    let mut config: serde_yaml::Value = if original.trim().is_empty() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        serde_yaml::from_str(original).map_err(|e| format!("config.yaml: {e}"))?
    };
    let map = config
        .as_mapping_mut()
        .ok_or("config.yaml is not a mapping")?;
    map.remove("name");
    if let Some((max_batch_size, max_latency_ms)) = batcher {
        // The predictor's own mapping of KServe's fields, so `serve` and `up` agree.
        let mut mapped = ModelConfig::default();
        mapped.apply_kserve_batcher(max_batch_size, max_latency_ms);
        let delay = mapped
            .dynamic_batching
            .map_or(0, |b| b.max_queue_delay_microseconds);
        map.insert("max_batch_size".into(), mapped.max_batch_size.into());
        let batching = map
            .entry("dynamic_batching".into())
            .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
        if let Some(batching) = batching.as_mapping_mut() {
            batching.insert("max_queue_delay_microseconds".into(), delay.into());
        }
    }
    if map.is_empty() {
        return Ok(String::new());
    }
    serde_yaml::to_string(&config).map_err(|e| e.to_string())
}

/// A config.yaml with `converted_from` added.
fn with_converted_from(config: &str, done: &convert::Converted) -> Result<String, String> {
    let mut value: serde_yaml::Value = if config.trim().is_empty() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        serde_yaml::from_str(config).map_err(|e| format!("config.yaml: {e}"))?
    };
    let from = crate::config::ConvertedFrom {
        format: done.format.name().to_owned(),
        feature_names: done.feature_names.clone(),
    };
    if let Some(map) = value.as_mapping_mut() {
        map.insert(
            "converted_from".into(),
            serde_yaml::to_value(from).map_err(|e| e.to_string())?,
        );
    }
    serde_yaml::to_string(&value).map_err(|e| e.to_string())
}

/// A config.yaml with its `explainer` replaced by `explainer` (JSON or YAML).
fn with_explainer(config: &str, explainer: &str) -> Result<String, String> {
    let mut value: serde_yaml::Value = if config.trim().is_empty() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        serde_yaml::from_str(config).map_err(|e| format!("config.yaml: {e}"))?
    };
    let explainer: serde_yaml::Value =
        serde_yaml::from_str(explainer).map_err(|e| format!("the explainer: {e}"))?;
    value
        .as_mapping_mut()
        .ok_or("config.yaml is not a mapping")?
        .insert("explainer".into(), explainer);
    serde_yaml::to_string(&value).map_err(|e| e.to_string())
}

/// Links the files a model's config.yaml names (`labels_file`, an explainer's
/// `background_file`) from the model's own directory in its storage, beside the config.
fn link_named_files(config: &str, from: &Path, model_dir: &Path) -> Result<(), String> {
    if config.trim().is_empty() {
        return Ok(());
    }
    let value: serde_yaml::Value =
        serde_yaml::from_str(config).map_err(|e| format!("config.yaml: {e}"))?;
    let mut named = vec![value.get("labels_file")];
    if let Some(explainer) = value.get("explainer").and_then(|e| e.as_mapping()) {
        named.extend(
            explainer
                .values()
                .map(|method| method.get("background_file")),
        );
    }
    for name in named.into_iter().flatten().filter_map(|v| v.as_str()) {
        let relative = Path::new(name);
        if !relative
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!(
                "config.yaml names '{name}': files next to the model are named by relative paths inside its directory"
            ));
        }
        let (source, at) = (from.join(relative), model_dir.join(relative));
        if source.is_file() && !at.exists() {
            if let Some(parent) = at.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            link(&source, &at)?;
        }
    }
    Ok(())
}

fn link(target: &Path, at: &Path) -> Result<(), String> {
    #[cfg(unix)]
    let linked = std::os::unix::fs::symlink(target, at);
    #[cfg(not(unix))]
    let linked = std::fs::copy(target, at).map(|_| ());
    linked.map_err(|e| format!("cannot link {} to {}: {e}", at.display(), target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn how(batcher: Option<Batcher>, cache: &Path) -> Prepare {
        Prepare {
            batcher,
            format: None,
            convert: convert::Options::new(cache),
            explainer: None,
        }
    }

    #[test]
    fn the_kserve_batcher_becomes_dynamic_batching() {
        let config =
            model_config("name: other\nlabels: [a, b]\n", Some((Some(16), Some(5)))).unwrap();
        let parsed: serde_yaml::Value = serde_yaml::from_str(&config).unwrap();
        assert_eq!(parsed["max_batch_size"], serde_yaml::Value::from(16));
        assert_eq!(
            parsed["dynamic_batching"]["max_queue_delay_microseconds"],
            serde_yaml::Value::from(5000)
        );
        assert_eq!(parsed["labels"][1], serde_yaml::Value::from("b"));
        assert!(parsed.get("name").is_none());
        assert_eq!(model_config("", None).unwrap(), "");
        let defaults: serde_yaml::Value =
            serde_yaml::from_str(&model_config("", Some((None, None))).unwrap()).unwrap();
        assert_eq!(defaults["max_batch_size"], serde_yaml::Value::from(32));
    }

    #[test]
    fn one_file_becomes_a_repository_of_one_model() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/repository");
        let scratch = tempfile::tempdir().unwrap();
        let file = root.join("sklearn_digits/1/model.onnx");
        let (repo, names) = prepare_repository(
            &file,
            "digits",
            &how(Some((Some(8), None)), scratch.path()),
            scratch.path(),
        )
        .unwrap();
        assert_eq!(names, vec!["digits"]);
        assert!(repo.join("digits/1/model.onnx").is_file());
        assert!(repo.join("digits/config.yaml").is_file());
        // A repository is served as it is, and refuses the single-model batcher.
        let (same, names) =
            prepare_repository(&root, "x", &how(None, scratch.path()), scratch.path()).unwrap();
        assert_eq!(same, std::fs::canonicalize(&root).unwrap());
        assert!(names.contains(&"mnist_cnn".to_owned()));
        let batched = how(Some((None, None)), scratch.path());
        assert!(prepare_repository(&root, "x", &batched, scratch.path()).is_err());
    }

    #[test]
    fn kserve_directories_of_one_model_file_and_other_formats() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/repository");
        let dir = tempfile::tempdir().unwrap();
        // KServe's ONNX sample layout: model.onnx directly in the storage directory.
        std::fs::copy(
            root.join("sklearn_digits/1/model.onnx"),
            dir.path().join("model.onnx"),
        )
        .unwrap();
        let scratch = tempfile::tempdir().unwrap();
        assert_eq!(layout(dir.path(), None).unwrap(), None);
        let (repo, names) = prepare_repository(
            dir.path(),
            "digits",
            &how(None, scratch.path()),
            scratch.path(),
        )
        .unwrap();
        assert_eq!(names, ["digits"]);
        assert!(repo.join("digits/1/model.onnx").is_file());
        // The explainer the control plane passes lands in config.yaml, and the background
        // rows it names are linked from beside the model file.
        std::fs::write(dir.path().join("bg.json"), "[[0, 1]]").unwrap();
        let mut explained = how(None, scratch.path());
        explained.explainer =
            Some(r#"{"tree_shap": {"background_file": "bg.json"}, "timeout_ms": 900}"#.into());
        let (repo, _) =
            prepare_repository(dir.path(), "digits", &explained, scratch.path()).unwrap();
        let config = std::fs::read_to_string(repo.join("digits/config.yaml")).unwrap();
        let config: serde_yaml::Value = serde_yaml::from_str(&config).unwrap();
        assert_eq!(
            config["explainer"]["timeout_ms"],
            serde_yaml::Value::from(900)
        );
        assert!(repo.join("digits/bg.json").is_file());
        explained.explainer = Some(r#"{"tree_shap": {"background_file": "../bg.json"}}"#.into());
        let outside = prepare_repository(dir.path(), "digits", &explained, scratch.path());
        assert!(outside.unwrap_err().contains("relative paths inside"));
        std::fs::remove_file(dir.path().join("bg.json")).unwrap();
        std::fs::copy(dir.path().join("model.onnx"), dir.path().join("other.onnx")).unwrap();
        let two = layout(dir.path(), None).unwrap_err();
        assert!(
            two.contains("2 model files") && two.contains("other.onnx"),
            "{two}"
        );
        for (file, says) in [("model.pt", "torch.onnx"), ("saved_model.pb", "tf2onnx")] {
            let other = tempfile::tempdir().unwrap();
            std::fs::write(other.path().join(file), b"x").unwrap();
            let why = layout(other.path(), None).unwrap_err();
            assert!(why.contains(says), "{file}: {why}");
            assert!(
                layout(&other.path().join(file), None)
                    .unwrap_err()
                    .contains(says)
            );
        }
    }

    #[test]
    fn other_frameworks_files_are_one_model_each_and_the_format_decides_which_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        std::fs::write(path.join("model.bst"), b"tree\nversion=v4\n").unwrap();
        // Files beside a model that are not one: a README, MLServer's settings.
        std::fs::write(path.join("README.txt"), b"notes").unwrap();
        std::fs::write(path.join("model-settings.json"), br#"{"name": "m"}"#).unwrap();
        assert_eq!(
            model_file(path, None).unwrap().unwrap().1,
            Some(Format::Lightgbm)
        );
        // Two models are an error, naming both.
        std::fs::write(path.join("other.txt"), b"tree\nversion=v4\n").unwrap();
        let two = model_file(path, None).unwrap_err();
        assert!(
            two.contains("other.txt") && two.contains("model.bst"),
            "{two}"
        );
        std::fs::remove_file(path.join("other.txt")).unwrap();
        let (file, format) = model_file(path, Some(Format::Lightgbm)).unwrap().unwrap();
        assert_eq!(
            (file.file_name().unwrap(), format),
            ("model.bst".as_ref(), Some(Format::Lightgbm))
        );
        assert_eq!(
            model_file(path, None).unwrap().unwrap().1,
            Some(Format::Lightgbm),
            "a .bst holding LightGBM's text is LightGBM's"
        );
        let none = model_file(path, Some(Format::Sklearn)).unwrap_err();
        assert!(
            none.contains("no sklearn model file (*.joblib, *.pkl, *.pickle)"),
            "{none}"
        );
        assert_eq!(layout(path, Some(Format::Lightgbm)).unwrap(), None);
    }
}
