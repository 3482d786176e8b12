//! A proxy-wasm filter that does nothing: every callback returns at once, with no host call.
//! Envoy still creates its context per stream and calls into the VM for each of the stream's
//! events (headers, body chunks, trailers, log, done, delete): that is the floor any Wasm
//! filter pays, meshserve's router included.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Floor) });
}}

struct Floor;

impl Context for Floor {}

impl RootContext for Floor {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl HttpContext for Floor {}
