//! The meshserve predictor sidecar: the data-plane process next to Envoy that serves ONNX
//! models over the Open Inference Protocol (REST and gRPC) and KServe V1, and takes the
//! payload-log events of the `logger` filter. Its modules, from the bottom up (each uses only
//! those above it in this list):
//!
//! - [`signal`]: the stop signal (SIGTERM, Ctrl-C).
//! - [`telemetry`]: logs, and traces over OTLP.
//! - [`error`]: one error taxonomy, mapped once to HTTP and once to gRPC.
//! - [`payloads`]: payload logging's intake, durable spool, delivery and test receiver.
//! - [`service`]: what both front ends share: limits, admission, running inference.
//! - [`rest`] and [`grpc`]: the two front ends.
//! - [`server`]: listeners, serving and draining.
//! - [`serve`]: `meshserve serve`, its flags and start-up; [`transform`]: `meshserve transform`.
//!
//! The control plane (InferenceServices, rendering, `meshserve up`) is the `meshserve-mesh`
//! crate; this crate does not depend on it.

pub mod error;
pub mod explain;
pub mod grpc;
pub mod payloads;
pub mod rest;
pub mod serve;
pub mod server;
pub mod service;
pub mod signal;
pub mod telemetry;
pub mod transform;
pub mod wake;
