//! ONNX Runtime, loaded at run time (ort's `load-dynamic`) from the library that the PyPI
//! `onnxruntime` wheel ships. A missing or incompatible library is an error at start, never a
//! panic: nothing touches ort before [`Runtime::init`] has loaded and checked the library.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ort::environment::Environment;
use ort::ep::ExecutionProviderDispatch;

/// The ONNX Runtime release this build is tested with (the pinned PyPI wheel).
pub const TESTED_ORT_VERSION: &str = "1.31.1";

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The CUDA execution provider on GPU N.
    Cuda(i32),
}

impl FromStr for Device {
    type Err = String;

    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<i32>().ok())
                .filter(|&n| n >= 0)
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device '{s}': expected cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Why ONNX Runtime could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found: set ORT_DYLIB_PATH or --ort-library to libonnxruntime.so \
         (the set-up script installs onnxruntime=={TESTED_ORT_VERSION} into .venv; looked in: {searched})"
    )]
    LibraryNotFound { searched: String },
    #[error("ONNX Runtime library {path} could not be used: {reason}")]
    Library { path: PathBuf, reason: String },
    #[error("the CUDA execution provider could not be registered on {device}: {reason}")]
    Device { device: Device, reason: String },
}

/// Options for starting ONNX Runtime.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// The library to load; `None` searches (see [`find_library`]).
    pub library: Option<PathBuf>,
    pub device: Device,
    /// Threads ONNX Runtime uses inside one operator; 0 lets it choose (one per core).
    pub intra_op_threads: usize,
    /// Let idle intra-op threads spin. Off by default: spinning threads take the cores the
    /// server's own threads need, which on a small machine costs more than it saves.
    pub intra_op_spinning: bool,
}

/// A started ONNX Runtime: the loaded library and its environment.
pub struct Runtime {
    environment: Environment,
    library: PathBuf,
    options: RuntimeOptions,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("library", &self.library)
            .field("options", &self.options)
            .finish()
    }
}

impl Runtime {
    /// Loads the library, checks its version, and creates the environment.
    pub fn init(options: RuntimeOptions) -> Result<Runtime, RuntimeError> {
        let library = match &options.library {
            Some(path) => path.clone(),
            None => find_library()?,
        };
        if !library.is_file() {
            return Err(RuntimeError::Library {
                path: library,
                reason: "no such file".into(),
            });
        }
        let builder = ort::init_from(&library).map_err(|e| RuntimeError::Library {
            path: library.clone(),
            reason: e.to_string(),
        })?;
        let environment = builder
            .with_name("meshserve")
            .with_telemetry(false)
            .build()
            .map_err(|e| RuntimeError::Library {
                path: library.clone(),
                reason: e.to_string(),
            })?;
        let runtime = Runtime {
            environment,
            library,
            options,
        };
        if let Device::Cuda(_) = runtime.options.device {
            runtime.check_device()?;
        }
        Ok(runtime)
    }

    pub fn library(&self) -> &Path {
        &self.library
    }

    pub fn device(&self) -> Device {
        self.options.device
    }

    /// A session builder with this runtime's device and threading; `intra_op_threads` > 0
    /// overrides the runtime's setting for this model.
    pub(crate) fn session_builder(
        &self,
        intra_op_threads: usize,
    ) -> ort::Result<ort::session::builder::SessionBuilder> {
        let mut builder = ort::session::Session::builder(&self.environment)?
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)?;
        let threads = if intra_op_threads > 0 {
            intra_op_threads
        } else {
            self.options.intra_op_threads
        };
        if threads > 0 {
            builder = builder.with_intra_threads(threads)?;
        }
        builder = builder.with_intra_op_spinning(self.options.intra_op_spinning)?;
        if let Some(ep) = self.execution_provider() {
            builder = builder.with_execution_providers([ep])?;
        }
        Ok(builder)
    }

    fn execution_provider(&self) -> Option<ExecutionProviderDispatch> {
        match self.options.device {
            Device::Cpu => None,
            Device::Cuda(id) => Some(
                ort::ep::CUDA::default()
                    .with_device_id(id)
                    .build()
                    .error_on_failure(),
            ),
        }
    }

    /// CUDA registration happens per session; try it once on an empty session builder so that
    /// a machine without the CUDA provider fails at start, not at the first model.
    fn check_device(&self) -> Result<(), RuntimeError> {
        let device = self.options.device;
        let fail = |reason: String| RuntimeError::Device { device, reason };
        let ep = self
            .execution_provider()
            .ok_or_else(|| fail("no execution provider".into()))?;
        ort::session::Session::builder(&self.environment)
            .map_err(|e| fail(e.to_string()))?
            .with_execution_providers([ep])
            .map_err(|e| {
                fail(format!(
                    "{e} (is onnxruntime-gpu installed, with CUDA and cuDNN on the library path?)"
                ))
            })?;
        Ok(())
    }
}

/// Finds `libonnxruntime`: `$ORT_DYLIB_PATH`, then the `.venv` the set-up script makes, looked
/// for in the working directory and in the directories above the executable.
pub fn find_library() -> Result<PathBuf, RuntimeError> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let roots = search_roots();
    roots
        .iter()
        .flat_map(|root| site_packages(&root.join(".venv")))
        .find_map(|site| library_in(&site.join("onnxruntime").join("capi")))
        .ok_or_else(|| RuntimeError::LibraryNotFound {
            searched: roots
                .iter()
                .map(|r| r.join(".venv").display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Where meshserve looks for the files the set-up script installs (the `.venv`, the wasm
/// build): the working directory, then every directory above the executable.
pub fn search_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots
}

/// A virtualenv's `lib/python3.*/site-packages` directories, sorted.
pub fn site_packages(venv: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3"))
        })
        .map(|p| p.join("site-packages"))
        .filter(|p| p.is_dir())
        .collect();
    found.sort();
    found
}

/// The newest `libonnxruntime.so.<version>` (or `.dylib`) in the wheel's `capi` directory.
fn library_in(capi: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(capi)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so") || n == "libonnxruntime.dylib")
        })
        .collect();
    libs.sort();
    libs.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert!("cuda:-1".parse::<Device>().is_err());
        assert!("gpu".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn library_is_found_in_a_venv_layout() {
        let dir = tempfile::tempdir().unwrap();
        let capi = dir
            .path()
            .join("lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        let find = || {
            site_packages(dir.path())
                .iter()
                .find_map(|s| library_in(&s.join("onnxruntime/capi")))
        };
        assert_eq!(find(), None);
        std::fs::write(capi.join("libonnxruntime.so.1.31.1"), b"").unwrap();
        assert_eq!(find(), Some(capi.join("libonnxruntime.so.1.31.1")));
    }
}
