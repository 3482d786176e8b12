//! scikit-learn pickles, converted by skl2onnx (the field's maintained converter) in a
//! Python process of its own: a pickle is Python code, so it is only ever unpickled there,
//! once per file (the result is cached), bounded by a timeout. The script is
//! `sklearn.py` beside this file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The Python used when none is named and no `.venv` is found.
pub const PYTHON: &str = "python3";
/// How long one conversion may take by default.
pub const SKLEARN_TIMEOUT: Duration = Duration::from_secs(120);

const SCRIPT: &str = include_str!("sklearn.py");

/// The Python to run: the one named (`--python`, `MESHSERVE_PYTHON`) when it is not the
/// default, else the set-up script's `.venv` when there is one, else `python3`.
pub(crate) fn python(named: &Path) -> PathBuf {
    if named != Path::new(PYTHON) {
        return named.to_owned();
    }
    crate::runtime::search_roots()
        .into_iter()
        .map(|r| r.join(".venv/bin/python"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| named.to_owned())
}

/// Converts the pickle into `out` with `python` (see [`python`]) in at most `timeout`:
/// `predict_proba`'s output or `predict`'s. Returns the model's feature names.
pub(super) fn convert(
    pickle: &Path,
    out: &Path,
    python: &Path,
    predict_proba: bool,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let python = self::python(python);
    let mode = if predict_proba {
        "predict_proba"
    } else {
        "predict"
    };
    // The child's own directory (its working directory and its output streams), removed
    // when this returns, whatever happens.
    let parent = out.parent().unwrap_or(Path::new("."));
    let dir = tempfile::Builder::new()
        .prefix(".sklearn-")
        .tempdir_in(parent)
        .map_err(|e| format!("{}: {e}", parent.display()))?;
    let stdout_file = dir.path().join("stdout");
    let stderr_file = dir.path().join("stderr");
    let open = |p: &Path| std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()));
    // Isolated: no PYTHON* variables, no user site, not the working directory on sys.path,
    // and none of the sidecar's environment (its credentials stay with it).
    let mut command = Command::new(&python);
    command
        .arg("-I")
        .arg("-c")
        .arg(SCRIPT)
        .arg(pickle)
        .arg(out)
        .arg(mode)
        .env_clear()
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(open(&stdout_file)?)
        .stderr(open(&stderr_file)?);
    for kept in ["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"] {
        if let Some(value) = std::env::var_os(kept) {
            command.env(kept, value);
        }
    }
    let mut child = command.spawn().map_err(|e| {
        format!(
            "cannot run {} for skl2onnx ({e}): install Python 3 with scikit-learn, skl2onnx and onnx, or name it with --python",
            python.display()
        )
    })?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(out);
                return Err(format!(
                    "the scikit-learn conversion took over {} s (the limit; --convert-timeout-secs)",
                    timeout.as_secs()
                ));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(out);
                return Err(format!("waiting for {}: {e}", python.display()));
            }
        }
    };
    let stdout = std::fs::read_to_string(&stdout_file).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_file).unwrap_or_default();
    drop(dir);
    for line in stderr.lines().filter(|l| l.starts_with("warning: ")) {
        tracing::warn!(pickle = %pickle.display(), "{}", &line[9..]);
    }
    if !status.success() {
        let _ = std::fs::remove_file(out);
        let last: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("warning: ") && !l.trim().is_empty())
            .collect();
        let message = last.last().copied().unwrap_or("no message");
        return Err(match status.code() {
            Some(2 | 3) => message.to_owned(),
            _ => format!("the scikit-learn converter failed ({status}): {message}"),
        });
    }
    let parsed: serde_json::Value = serde_json::from_str(stdout.trim())
        .map_err(|_| format!("the scikit-learn converter said '{}'", stdout.trim()))?;
    Ok(parsed["feature_names"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}
