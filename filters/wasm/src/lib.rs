//! `meshserve_filters.wasm`: meshserve's Envoy filters in one proxy-wasm module. Every
//! filter shares one `vm_id`; Envoy picks the filter by `root_id`:
//!
//! - `router`: finds the InferenceService, component and revision for each request (router and
//!   canary in one pass, see `meshserve-filter-core`), sets the `x-meshserve-*` headers, clears
//!   the route cache so a `cluster_header` route picks the revision's cluster, answers unknown
//!   models itself, copies shadowed requests to the shadow revision, and names the revision that
//!   served each response in `x-meshserve-revision`.
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

mod metrics;
mod router;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> { Box::new(router::RouterRoot::new(context_id)) });
}}
