//! `meshserve_filters.wasm`: meshserve's Envoy filters in one proxy-wasm module. Every
//! filter shares one `vm_id`; Envoy picks the filter by `root_id`:
//!
//! - `router`: finds the InferenceService, component and revision for each request (router and
//!   canary in one pass, see `meshserve-filter-core`), sets the `x-meshserve-*` headers, clears
//!   the route cache so a `cluster_header` route picks the revision's cluster, answers unknown
//!   models itself, copies shadowed requests to the shadow revision, and names the revision that
//!   served each response in `x-meshserve-revision`.
//! - `transformer`: an InferenceService's declarative pre- and post-processing (image decoding,
//!   resizing, normalisation, V1 <-> V2, softmax, top-k, labels) on the requests the router sent
//!   to its predictor; placed after the router.
//! - `logger`: payload logging: copies of the payloads a revision's predictor gets and answers,
//!   sent as KServe CloudEvents to that revision's sidecar after the stream ends; placed last.
//!
//! This crate is a thin shell: decisions come from `meshserve-filter-core`; here they are
//! applied through host calls. Nothing here may panic (a panic kills the VM): host-call
//! failures are logged and the request continues.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod logger;
mod metrics;
mod router;
mod transformer;

use meshserve_filter_core::config::Config;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::RootContext;
use proxy_wasm::types::{BufferType, LogLevel, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        match root_id().as_deref() {
            Some(transformer::ROOT_ID) => Box::new(transformer::TransformerRoot::new()),
            Some(logger::ROOT_ID) => Box::new(logger::LoggerRoot::new(context_id)),
            // The router, and any unknown root id, which its on_configure refuses.
            _ => Box::new(router::RouterRoot::new(context_id)),
        }
    });
}}

fn root_id() -> Option<String> {
    hostcalls::get_property(vec!["plugin_root_id"])
        .ok()
        .flatten()
        .map(|id| String::from_utf8_lossy(&id).into_owned())
}

/// Checks that this root runs as `expected` and reads its configuration: `None` (logged)
/// when either is wrong, which makes `on_configure` refuse it and keep the previous one.
fn configure(expected: &str) -> Option<Config> {
    if let Some(root_id) = root_id()
        && root_id != expected
    {
        log::error!(
            "meshserve_filters.wasm has no filter with root_id '{root_id}' (known: {}, {}, {})",
            router::ROOT_ID,
            transformer::ROOT_ID,
            logger::ROOT_ID
        );
        return None;
    }
    let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => Vec::new(),
        Err(status) => {
            log::error!("cannot read the plugin configuration: {status:?}");
            return None;
        }
    };
    match Config::parse(&bytes) {
        Ok(config) => Some(config),
        Err(e) => {
            log::error!("{e}; keeping the previous configuration");
            None
        }
    }
}

/// splitmix64: a fresh uniform draw per call (canary splits, shadows, sampling, event ids).
#[derive(Debug, Default)]
struct Rng(u64);

impl Rng {
    /// Seeded from the host's clock and the context id.
    fn seeded(context_id: u32) -> Rng {
        let now = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(now ^ (u64::from(context_id) << 32) ^ u64::from(context_id))
    }

    fn draw(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}
