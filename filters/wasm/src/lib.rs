//! `meshserve_filters.wasm`: meshserve's Envoy filters in one proxy-wasm module. Every
//! filter shares one `vm_id`; Envoy picks the filter by `root_id`:
//!
//! - `router`: finds the InferenceService, component and revision for each request (router and
//!   canary in one pass, see `meshserve-filter-core`), sets the `x-meshserve-*` headers (Envoy
//!   clears its route cache on that, so a `cluster_header` route picks the revision's
//!   cluster), answers unknown models itself, copies shadowed requests to the shadow revision,
//!   names the revision that served each response in `x-meshserve-revision`, and runs
//!   InferenceGraphs (each step a call through Envoy's hop listener, see `graph`).
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

mod graph;
mod host;
mod logger;
mod metrics;
mod router;
mod transformer;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

use crate::host::{LOGGER_ROOT_ID, TRANSFORMER_ROOT_ID, root_id};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        match root_id().as_deref() {
            Some(TRANSFORMER_ROOT_ID) => Box::new(transformer::TransformerRoot::new()),
            Some(LOGGER_ROOT_ID) => Box::new(logger::LoggerRoot::new(context_id)),
            // The router, and any unknown root id, which its on_configure refuses.
            _ => Box::new(router::RouterRoot::new(context_id)),
        }
    });
}}
