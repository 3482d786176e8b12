//! The local mesh: InferenceServices rendered into Envoy and filter configuration
//! ([`render`]), brought up with one predictor sidecar per revision behind Envoy ([`up`]),
//! and their traffic split changed live ([`canary`]); and the same InferenceServices rendered
//! for docker-compose ([`compose`]), Istio ([`istio`]) and Kubernetes ([`kube`]), all at once
//! by [`targets`], over the container workload [`workload`] describes.

pub mod canary;
pub mod compose;
pub mod istio;
pub mod isvc;
pub mod kube;
pub mod render;
pub mod storage;
pub mod targets;
pub mod up;
pub mod workload;
