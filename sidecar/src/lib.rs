//! The meshserve predictor sidecar: the process next to Envoy that serves ONNX models over
//! the Open Inference Protocol (REST and gRPC) and KServe V1.
//!
//! - [`service`]: what both front ends share: limits, admission, running inference.
//! - [`rest`] and [`grpc`]: the two front ends.
//! - [`error`]: one error taxonomy, mapped once to HTTP and once to gRPC.
//! - [`server`]: listeners, serving and draining; [`cli`]: the command line.
//! - [`telemetry`]: logs, and traces over OTLP.
//! - [`payloads`]: payload logging's intake, durable spool, delivery and test receiver.

pub mod cli;
pub mod error;
pub mod grpc;
pub mod mesh;
pub mod payloads;
pub mod rest;
pub mod server;
pub mod service;
pub mod telemetry;
