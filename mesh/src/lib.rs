//! meshserve's control plane: KServe InferenceServices in, everything that runs them out. Its
//! modules, from the bottom up (each uses only those above it in this list):
//!
//! - [`http`]: the one HTTP client, to Envoy and the sidecars on loopback.
//! - [`auth`]: JWT requirements from annotations, and the Envoy filters that enforce them.
//! - [`isvc`]: one InferenceService, parsed and validated (the field at fault named);
//!   [`graph`]: one InferenceGraph, likewise, and its steps resolved to the services;
//!   [`files`]: the InferenceServices and InferenceGraphs of a file, and a transformer read
//!   from one.
//! - [`render`]: the filter configuration, its extension-config files and an Envoy bootstrap.
//! - [`canary`]: a running mesh's traffic split changed live.
//! - [`workload`]: what a revision's container is (command line, ports, mounts).
//! - [`compose`], [`istio`], [`kube`]: docker-compose, Istio and Kubernetes resources.
//! - [`targets`]: `meshserve render`, every target at once.
//! - [`tools`]: where Envoy and meshserve_filters.wasm are found.
//! - [`console`]: `up`'s web console (the mesh's state, live; canary controls; "try it").
//! - [`up`]: `meshserve up`, the local mesh: a predictor sidecar per revision behind Envoy.
//!
//! It drives the sidecar as a process (`meshserve serve` flags), never as a library: this
//! crate does not depend on `meshserve-sidecar`.

pub mod auth;
pub mod canary;
pub mod compose;
pub mod console;
pub mod files;
pub mod graph;
pub mod http;
pub mod istio;
pub mod isvc;
pub mod kube;
pub mod render;
pub mod targets;
pub mod tools;
pub mod up;
pub mod workload;
