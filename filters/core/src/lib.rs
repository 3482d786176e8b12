//! What meshserve's Envoy filters decide, as pure functions over data. The proxy-wasm shell
//! (`filters/wasm`) feeds requests in and applies the [`route::Decision`] that comes out; no
//! clock, randomness or host call happens here, so every decision is tested natively.
//!
//! - [`activator`]: holding requests for a revision that scales from zero while it wakes.
//! - [`config`]: the filter configuration (rendered from InferenceServices), validated once.
//! - [`protocol`]: what a request is: KServe V1, Open Inference Protocol REST or gRPC.
//! - [`grpc`]: the model name read from the first bytes of a gRPC request.
//! - [`route`]: which InferenceService, component and revision serve it, or which graph.
//! - [`graph`]: InferenceGraphs (Sequence, Switch, Ensemble, Splitter) as a state machine.
//! - [`transform`]: transformer pipelines (pre- and post-processing).
//! - [`logger`]: payload logging: sampling and KServe's CloudEvents.
//! - [`sink`]: where payload events finally go (a logger's `url`).

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod activator;
pub mod config;
pub mod graph;
pub mod grpc;
pub mod logger;
pub mod protocol;
pub mod route;
pub mod shadow;
pub mod sink;
pub mod transform;
