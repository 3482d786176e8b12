//! The local mesh: InferenceServices rendered into Envoy and filter configuration
//! ([`render`]), brought up with one predictor sidecar per revision behind Envoy ([`up`]),
//! and their traffic split changed live ([`canary`]).

pub mod canary;
pub mod isvc;
pub mod render;
pub mod up;
