//! The filter configuration as the filters' `on_configure` reads it (Envoy's `configuration`,
//! Istio's `pluginConfig`, a file `meshserve canary` writes): services, revisions, weights,
//! loggers, transformer pipelines, limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshserve_filter_core::config::Config;

fuzz_target!(|data: &[u8]| {
    let _ = Config::parse(data);
});
