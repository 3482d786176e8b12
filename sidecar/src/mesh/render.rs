//! Renders what a local mesh needs from InferenceServices: the filter configuration (the JSON
//! the wasm filters read, checked by `meshserve-filter-core` itself), the extension config
//! resource Envoy watches for it (so changes apply without a restart), and the Envoy bootstrap.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use meshserve_filter_core::config::Config;
use serde_json::{Value, json};

use super::isvc::InferenceService;

/// The name of the router filter's extension config (ECDS) in the bootstrap.
pub const ROUTER_FILTER: &str = "meshserve.router";
/// The most client connections Envoy holds open at once.
pub const MAX_DOWNSTREAM_CONNECTIONS: u64 = 10_000;
/// Files in a rendered directory.
pub const FILTER_CONFIG_FILE: &str = "filter.json";
pub const ROUTER_ECDS_FILE: &str = "router.ecds.json";
pub const BOOTSTRAP_FILE: &str = "envoy.json";

/// Where one revision's sidecar listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

/// A revision's Envoy cluster names (REST and gRPC).
pub fn clusters(isvc: &str, revision: &str) -> (String, String) {
    let base = format!("{isvc}.{revision}");
    (base.clone(), format!("{base}.grpc"))
}

fn revision_json(isvc: &str, name: &str, percent: Option<i64>) -> Value {
    let (cluster, grpc_cluster) = clusters(isvc, name);
    let mut v = json!({"name": name, "cluster": cluster, "grpc_cluster": grpc_cluster});
    if let (Some(p), Some(map)) = (percent, v.as_object_mut()) {
        map.insert("percent".into(), json!(p));
    }
    v
}

/// The filter configuration for some InferenceServices, each serving `models` (the model
/// names its sidecars answer for).
pub fn filter_config(services: &[(&InferenceService, Vec<String>)]) -> Result<Value, String> {
    let services: Vec<Value> = services
        .iter()
        .map(|(isvc, models)| {
            json!({
                "name": isvc.name,
                "namespace": isvc.namespace,
                "models": models,
                "predictor": {
                    "default": revision_json(&isvc.name, &isvc.default.name, None),
                    "canaries": isvc.canaries.iter().map(|c| revision_json(&isvc.name, &c.name, Some(c.percent))).collect::<Vec<_>>(),
                },
            })
        })
        .collect();
    let config = json!({"services": services});
    check(&config)?;
    Ok(config)
}

/// Validates a filter configuration with the filters' own parser.
pub fn check(config: &Value) -> Result<Config, String> {
    Config::parse(config.to_string().as_bytes()).map_err(|e| e.to_string())
}

/// The `TypedExtensionConfig` file Envoy watches for the router filter.
pub fn router_ecds(config: &Value, wasm: &Path) -> Value {
    json!({"resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": ROUTER_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "router",
                "root_id": "router",
                "fail_open": false,
                // A gRPC request's model name is in its body: the router holds the headers
                // (StopIteration) until the first bytes arrive. Without this, Envoy turns that
                // into StopAllIteration and the body never reaches the filter.
                "allow_on_headers_stop_iteration": true,
                "vm_config": {
                    "vm_id": "meshserve",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm.display().to_string()}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": config.to_string(),
                },
            },
        },
    }]})
}

fn cluster(name: &str, addr: SocketAddr, http2: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}}}]}]},
    });
    if http2 && let Some(map) = c.as_object_mut() {
        map.insert(
            "typed_extension_protocol_options".into(),
            json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}),
        );
    }
    c
}

/// The Envoy bootstrap: one listener whose HTTP filters are the meshserve router (its config
/// read from `ecds_path`, reloaded when that file is replaced) and Envoy's router; routes pick
/// the cluster the filter names in `x-meshserve-cluster`; one cluster per revision and
/// protocol. `upstreams`: (cluster base name, addresses). Stats tags turn the filters' stat
/// names into Prometheus labels.
pub fn bootstrap(
    listener: SocketAddr,
    admin: SocketAddr,
    ecds_path: &Path,
    upstreams: &[(String, Upstream)],
) -> Value {
    let mut clusters = Vec::new();
    for (name, upstream) in upstreams {
        clusters.push(cluster(name, upstream.http, false));
        clusters.push(cluster(&format!("{name}.grpc"), upstream.grpc, true));
    }
    // `wasmcustom.meshserve.requests.isvc.digits.revision.v1.outcome.routed` becomes
    // `envoy_wasmcustom_meshserve_requests{isvc="digits",revision="v1",outcome="routed"}`.
    let tags: Vec<Value> = ["isvc", "revision", "outcome", "choice", "result", "reason"]
        .iter()
        .map(|name| json!({"tag_name": name, "regex": format!(r"(\.{name}\.([^.]+))")}))
        .collect();
    json!({
        "node": {"id": "meshserve", "cluster": "meshserve"},
        // A named limit on client connections (Envoy warns when there is none).
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
            },
        }]},
        "admin": {"address": {"socket_address": {"address": admin.ip().to_string(), "port_value": admin.port()}}},
        "stats_config": {"stats_tags": tags},
        "static_resources": {
            "listeners": [{
                "name": "meshserve",
                "address": {"socket_address": {"address": listener.ip().to_string(), "port_value": listener.port()}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "meshserve",
                        "codec_type": "AUTO",
                        "route_config": {"name": "meshserve", "virtual_hosts": [{"name": "inference", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/", "headers": [{"name": "x-meshserve-cluster", "present_match": true}]},
                             "route": {"cluster_header": "x-meshserve-cluster", "timeout": "60s"}},
                            {"match": {"prefix": "/"},
                             "direct_response": {"status": 404, "body": {"inline_string": "{\"error\": \"not an inference endpoint\"}"}},
                             "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                                          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
                        ]}]},
                        "http_filters": [
                            {"name": ROUTER_FILTER, "config_discovery": {
                                "config_source": {"path_config_source": {"path": ecds_path.display().to_string()}},
                                "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"]}},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                        ],
                    },
                }]}],
            }],
            "clusters": clusters,
        },
    })
}

/// Writes `value` as JSON to `path` atomically: a temporary file beside it, renamed over it,
/// so a watcher (Envoy) never reads half a file.
pub fn write_atomically(path: &Path, value: &Value) -> std::io::Result<()> {
    let tmp: PathBuf = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::isvc::RevisionSpec;

    fn isvc() -> InferenceService {
        let rev = |name: &str, percent| RevisionSpec {
            name: name.into(),
            storage: PathBuf::from("/m"),
            percent,
            batcher: None,
        };
        InferenceService {
            name: "digits".into(),
            namespace: "default".into(),
            default: rev("v1", 0),
            canaries: vec![rev("v2", 20)],
        }
    }

    #[test]
    fn the_filter_config_passes_the_filters_own_check() {
        let isvc = isvc();
        let config = filter_config(&[(&isvc, vec!["digits".into()])]).unwrap();
        assert_eq!(
            config["services"][0]["predictor"]["canaries"][0]["percent"],
            20
        );
        assert_eq!(
            config["services"][0]["predictor"]["default"]["grpc_cluster"],
            "digits.v1.grpc"
        );
        let ecds = router_ecds(&config, Path::new("/x.wasm"));
        let embedded = ecds["resources"][0]["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .unwrap();
        assert!(check(&serde_json::from_str(embedded).unwrap()).is_ok());
    }
}
