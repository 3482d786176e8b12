//! The Open Inference Protocol (KServe V2) and KServe V1, as types and pure conversions.
//!
//! - [`inference`]: the gRPC messages (and, with the `tonic` feature, the service stubs),
//!   generated at build time from `protos/grpc_service.proto` without a system `protoc`.
//! - [`tensor`]: tensor data in every datatype and its JSON, raw and typed-gRPC forms.
//! - [`infer`]: requests and responses independent of the wire.
//! - [`rest`], [`grpc`], [`v1`]: the conversions between those and each wire form.
//!
//! No I/O happens here, and without the `tonic` feature the crate builds for wasm32-wasip1,
//! so the proxy-wasm filters use the same code as the sidecar.

pub mod datatype;
pub mod frame;
pub mod grpc;
pub mod infer;
pub mod rest;
pub mod tensor;
pub mod v1;

/// Generated from `protos/grpc_service.proto` (package `inference`).
#[allow(
    clippy::all,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

/// Generated from `protos/externalscaler.proto` (KEDA's package `externalscaler`): the
/// interface of a KEDA external scaler, for `meshserve wake-scaler`.
#[cfg(feature = "tonic")]
#[allow(
    clippy::all,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
pub mod externalscaler {
    include!(concat!(env!("OUT_DIR"), "/externalscaler.rs"));
}

pub use datatype::DataType;
pub use infer::{
    InferRequest, InferResponse, InputTensor, InvalidRequest, OutputTensor, Parameters,
    RequestedOutput, TensorSpec,
};
pub use tensor::{TensorData, TensorError};
