//! What every root of the module shares with the host: its root id and configuration, the
//! request's headers, and a random draw seeded from the host's clock.

use meshserve_filter_core::config::Config;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

/// The root ids Envoy gives the filters (`root_id`), one per root context.
pub(crate) const ROUTER_ROOT_ID: &str = "router";
pub(crate) const TRANSFORMER_ROOT_ID: &str = "transformer";
pub(crate) const LOGGER_ROOT_ID: &str = "logger";

pub(crate) fn root_id() -> Option<String> {
    hostcalls::get_property(vec!["plugin_root_id"])
        .ok()
        .flatten()
        .map(|id| String::from_utf8_lossy(&id).into_owned())
}

/// Checks that this root runs as `expected` and reads its configuration: `None` (logged)
/// when either is wrong, which makes `on_configure` refuse it and keep the previous one.
pub(crate) fn configure(expected: &str) -> Option<Config> {
    if let Some(root_id) = root_id()
        && root_id != expected
    {
        log::error!(
            "meshserve_filters.wasm has no filter with root_id '{root_id}' (known: {ROUTER_ROOT_ID}, {TRANSFORMER_ROOT_ID}, {LOGGER_ROOT_ID})"
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
pub(crate) struct Rng(u64);

impl Rng {
    /// Seeded from the host's entropy, its clock and the context id. The clock and the id
    /// alone are not enough: every Envoy worker has its own VM whose root contexts get the
    /// same ids, configured within one tick of the host's clock, and two workers with one
    /// seed drew the same CloudEvent ids. The entropy is WASI's `random_get` (which Envoy's
    /// Wasm host implements), read through std's hash keys, as every `HashMap` here already
    /// does.
    pub(crate) fn seeded(context_id: u32) -> Rng {
        use std::hash::{BuildHasher, Hasher};
        let now = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        let mut entropy = std::collections::hash_map::RandomState::new().build_hasher();
        entropy.write_u64(now);
        entropy.write_u32(context_id);
        Rng(entropy.finish() ^ now ^ (u64::from(context_id) << 32))
    }

    pub(crate) fn draw(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// One header of the request, `None` when absent. A value that is not UTF-8 (HTTP allows
/// any octet from 0x80 up) comes back with replacement characters: the SDK's `get_map_value`
/// would panic on it, and a panic kills the worker's VM (every later request would fail).
pub(crate) fn request_header(name: &str) -> Option<String> {
    header(MapType::HttpRequestHeaders, name)
}

/// One header of the response (or of a call's answer), as [`request_header`].
pub(crate) fn header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .map(lossy)
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A stream's request headers, read in one host call: every lookup after that is free, where
/// each `request_header` is a round trip out of the VM (and one more into it, for the copy).
#[derive(Debug, Default)]
pub(crate) struct Headers(Vec<(String, String)>);

impl Headers {
    /// The request's headers now (values as [`request_header`] gives them).
    pub(crate) fn request() -> Headers {
        let pairs = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
        Headers(pairs.into_iter().map(|(k, v)| (k, lossy(v))).collect())
    }

    /// The first value of `name` (lower case).
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Removes `names` from the request, only those it has (a removal is a host call), and
    /// from this copy.
    pub(crate) fn remove(&mut self, names: &[&str]) {
        for name in names {
            if self.get(name).is_none() {
                continue;
            }
            if let Err(status) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None) {
                log::warn!("cannot remove {name}: {status:?}");
            }
            self.0.retain(|(k, _)| k != name);
        }
    }

    pub(crate) fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
}
