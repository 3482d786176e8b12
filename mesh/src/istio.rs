//! Istio resources: meshserve's filters in the ingress gateway, as `WasmPlugin`s (one per
//! filter root, from the filters' OCI image) or as the `EnvoyFilter` alternative for meshes
//! without WasmPlugin (EXTENSION_CONFIG + HTTP_FILTER patches, the module fetched by Istio's
//! agent); a `Gateway`; and per InferenceService a `VirtualService` that sends each request to
//! the revision the router filter chose (its `x-meshserve-cluster` header) on that
//! revision's Service. The filter configuration is the same JSON as everywhere else, with
//! Istio's cluster names (`outbound|<port>||<service host>`, [`naming`]): the filters' call-outs
//! (payload events to a revision's log intake, shadow copies) can reach only the clusters
//! istiod gives the gateway.

use serde_json::{Value, json};

use crate::auth::{ISVC_HEADER, Jwks, Jwt, NAMESPACE_HEADER};
use crate::isvc::InferenceService;
use crate::render::{Filter, Naming};
use crate::workload::{self, GRPC_PORT, HTTP_PORT, Settings};

/// The gateway rendered, and the VirtualServices bound to it.
pub const GATEWAY: &str = "meshserve-gateway";
/// The header the router filter sets (read by the VirtualServices' matches).
const CLUSTER_HEADER: &str = "x-meshserve-cluster";
const WASM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// Where each filter sits (Istio runs higher priorities first within a phase): the router
/// first, the transformer, then the logger, all just before Envoy's router. The logger fails
/// open (a request is never lost for its log); the router and the transformer fail closed (a
/// request must not reach a model unrouted or untransformed).
fn placement(filter: Filter) -> (i64, &'static str) {
    match filter.root_id {
        "router" => (30, "FAIL_CLOSE"),
        "transformer" => (20, "FAIL_CLOSE"),
        _ => (10, "FAIL_OPEN"),
    }
}

/// The router runs before Istio's authentication and authorization filters (it names the
/// InferenceService their policies match on); the others at the end of the chain.
fn phase(filter: Filter) -> &'static str {
    if filter.root_id == "router" {
        "AUTHN"
    } else {
        "UNSPECIFIED_PHASE"
    }
}

/// The cluster names the filters use in Istio's proxies.
pub fn naming(settings: &Settings) -> Naming {
    Naming::Istio {
        domain: settings.cluster_domain.clone(),
    }
}

fn gateway_labels(settings: &Settings) -> Value {
    let (k, v) = &settings.gateway_selector;
    json!({k: v})
}

/// One `WasmPlugin` per filter root. Istio's WasmPlugin cannot set Envoy's
/// `allow_on_headers_stop_iteration`, so their configuration says `"hold_headers": false`:
/// the filters then never hold a stream's headers for its body (see
/// `meshserve_filter_core::config::Config::hold_headers`).
pub fn wasm_plugins(filters: &[Filter], config: &Value, settings: &Settings) -> Vec<Value> {
    let mut config = config.clone();
    if let Some(map) = config.as_object_mut() {
        map.insert("hold_headers".into(), json!(false));
    }
    filters
        .iter()
        .map(|filter| {
            let (priority, fail) = placement(*filter);
            json!({
                "apiVersion": "extensions.istio.io/v1alpha1",
                "kind": "WasmPlugin",
                "metadata": {"name": format!("meshserve-{}", filter.root_id), "namespace": settings.gateway_namespace,
                             "labels": {"app.kubernetes.io/managed-by": "meshserve"}},
                "spec": {
                    "selector": {"matchLabels": gateway_labels(settings)},
                    "url": settings.wasm_image,
                    "imagePullPolicy": "IfNotPresent",
                    "pluginName": filter.root_id,
                    "phase": phase(*filter),
                    "priority": priority,
                    "failStrategy": fail,
                    "type": "HTTP",
                    "match": [{"mode": "CLIENT"}],
                    "pluginConfig": config,
                },
            })
        })
        .collect()
}

/// The same filters as one `EnvoyFilter`: an extension config per filter (the module by
/// URL, its SHA-256 pinned when known) and an HTTP filter per filter, inserted in order
/// before Envoy's router in the gateway's listeners.
pub fn envoy_filter(filters: &[Filter], config: &Value, settings: &Settings) -> Value {
    let mut patches = Vec::new();
    for filter in filters {
        let (_, fail) = placement(*filter);
        let mut remote = json!({"http_uri": {"uri": settings.wasm_url, "timeout": "30s"}});
        if let (Some(sha), Some(map)) = (&settings.wasm_sha256, remote.as_object_mut()) {
            map.insert("sha256".into(), json!(sha));
        }
        patches.push(json!({
            "applyTo": "EXTENSION_CONFIG",
            "patch": {"operation": "ADD", "value": {
                "name": filter.name,
                "typed_config": {
                    "@type": WASM_TYPE_URL,
                    "config": {
                        "name": filter.root_id,
                        "root_id": filter.root_id,
                        "fail_open": fail == "FAIL_OPEN",
                        "allow_on_headers_stop_iteration": true,
                        "vm_config": {"vm_id": "meshserve", "runtime": "envoy.wasm.runtime.v8",
                                      "code": {"remote": remote}},
                        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                          "value": config.to_string()},
                    },
                },
            }},
        }));
    }
    for filter in filters {
        // The router first of all (before Istio's jwt_authn and rbac), the others just
        // before Envoy's router.
        let manager = "envoy.filters.network.http_connection_manager";
        let (operation, filter_match) = if filter.root_id == "router" {
            ("INSERT_FIRST", json!({"name": manager}))
        } else {
            (
                "INSERT_BEFORE",
                json!({"name": manager, "subFilter": {"name": "envoy.filters.http.router"}}),
            )
        };
        patches.push(json!({
            "applyTo": "HTTP_FILTER",
            "match": {"context": "GATEWAY", "listener": {"filterChain": {"filter": filter_match}}},
            "patch": {"operation": operation, "value": {
                "name": filter.name,
                "config_discovery": {"config_source": {"ads": {}, "initial_fetch_timeout": "0s"},
                                     "type_urls": [WASM_TYPE_URL]},
            }},
        }));
    }
    json!({
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": "meshserve-filters", "namespace": settings.gateway_namespace,
                     "labels": {"app.kubernetes.io/managed-by": "meshserve"}},
        "spec": {
            "workloadSelector": {"labels": gateway_labels(settings)},
            "configPatches": patches,
        },
    })
}

/// The gateway's HTTP server (port 80, every host).
pub fn gateway(settings: &Settings) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": GATEWAY, "namespace": settings.gateway_namespace,
                     "labels": {"app.kubernetes.io/managed-by": "meshserve"}},
        "spec": {
            "selector": gateway_labels(settings),
            "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}],
        },
    })
}

/// Routes for one InferenceService: each revision's REST and gRPC cluster names (what the
/// router filter writes in `x-meshserve-cluster`: Istio's own names for the revision's
/// Service ports, [`Naming::Istio`]) to that Service's ports. The router never routes a
/// client to the shadow (and removes the header clients send), but its routes name the
/// shadow's Service so that istiod gives the gateway its clusters even where it prunes the
/// gateway's clusters to those its routes use (`PILOT_FILTER_GATEWAY_CLUSTER_CONFIG`): the
/// router's shadow copies call out to them.
pub fn virtual_service(isvc: &InferenceService, settings: &Settings) -> Value {
    let naming = naming(settings);
    let mut routes = Vec::new();
    for revision in workload::revisions(isvc) {
        let (http, grpc) = naming.clusters(isvc, revision);
        let host = workload::service_host(isvc, revision, &settings.cluster_domain);
        for (cluster, port, protocol) in [(grpc, GRPC_PORT, "grpc"), (http, HTTP_PORT, "http")] {
            routes.push(json!({
                "name": format!("{}-{protocol}", workload::name(&isvc.name, &revision.name)),
                "match": [{"headers": {CLUSTER_HEADER: {"exact": cluster}}}],
                "route": [{"destination": {"host": host, "port": {"number": port}}}],
                "timeout": "60s",
            }));
        }
    }
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": format!("meshserve-{}", isvc.name), "namespace": isvc.namespace,
                     "labels": {"app.kubernetes.io/managed-by": "meshserve",
                                "serving.kserve.io/inferenceservice": isvc.name}},
        "spec": {
            "hosts": ["*"],
            "gateways": [format!("{}/{GATEWAY}", settings.gateway_namespace)],
            "http": routes,
        },
    })
}

/// The control APIs' paths, as Istio's `AuthorizationPolicy` writes them (REST resources and
/// gRPC methods; `{*}` is one path segment).
fn control_paths() -> Vec<String> {
    use meshserve_filter_core::protocol::{
        CONTROL_METHODS, CONTROL_MODEL_RESOURCES, CONTROL_RESOURCES,
    };
    let mut paths = Vec::new();
    for resource in CONTROL_RESOURCES {
        paths.push(format!("/v2/{resource}"));
        paths.push(format!("/v2/{resource}/*"));
    }
    for resource in CONTROL_MODEL_RESOURCES {
        for model in ["/v2/models/{*}", "/v2/models/{*}/versions/{*}"] {
            paths.push(format!("{model}/{resource}"));
            paths.push(format!("{model}/{resource}/{{**}}"));
        }
    }
    for method in CONTROL_METHODS {
        paths.push(format!("/inference.GRPCInferenceService/{method}"));
    }
    paths
}

fn security_labels() -> Value {
    json!({"app.kubernetes.io/managed-by": "meshserve"})
}

/// Istio's security resources: the control APIs denied at the gateway (as the router filter
/// does, for services that do not open them), and per service that asks for tokens a
/// `RequestAuthentication` and a DENY `AuthorizationPolicy`; with `settings.mtls_strict`, a
/// `PeerAuthentication` STRICT for the predictors of each namespace.
pub fn security(services: &[InferenceService], settings: &Settings) -> Vec<Value> {
    let labels = gateway_labels(settings);
    let open: Vec<&str> = services
        .iter()
        .filter(|s| s.public_control_api)
        .map(|s| s.name.as_str())
        .collect();
    let mut rule = json!({"to": [{"operation": {"paths": control_paths()}}]});
    if !open.is_empty()
        && let Some(map) = rule.as_object_mut()
    {
        // Those services' control calls pass (the repository index, naming no service, stays
        // closed here).
        map.insert(
            "when".into(),
            json!([{"key": format!("request.headers[{ISVC_HEADER}]"), "notValues": open}]),
        );
    }
    let mut out = vec![json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "meshserve-control-apis", "namespace": settings.gateway_namespace,
                     "labels": security_labels()},
        "spec": {"selector": {"matchLabels": labels}, "action": "DENY", "rules": [rule]},
    })];
    for isvc in services {
        if let Some(jwt) = &isvc.jwt {
            out.push(request_authentication(isvc, jwt, settings));
            out.push(authorization_policy(isvc, jwt, settings));
        }
    }
    if settings.mtls_strict {
        let mut namespaces: Vec<&str> = services.iter().map(|s| s.namespace.as_str()).collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        for namespace in namespaces {
            out.push(json!({
                "apiVersion": "security.istio.io/v1",
                "kind": "PeerAuthentication",
                "metadata": {"name": "meshserve-predictors", "namespace": namespace, "labels": security_labels()},
                "spec": {
                    "selector": {"matchLabels": {"app.kubernetes.io/managed-by": "meshserve", "component": "predictor"}},
                    "mtls": {"mode": "STRICT"},
                },
            }));
        }
    }
    out
}

/// A security resource's metadata, in the gateway's namespace, labelled with its service.
fn security_metadata(name: String, isvc: &InferenceService, settings: &Settings) -> Value {
    json!({"name": name, "namespace": settings.gateway_namespace,
           "labels": {"app.kubernetes.io/managed-by": "meshserve",
                      "serving.kserve.io/inferenceservice": isvc.name}})
}

/// Istio's `RequestAuthentication` for one service, on the gateway's pods.
pub fn request_authentication(isvc: &InferenceService, jwt: &Jwt, settings: &Settings) -> Value {
    let (name, namespace) = (&isvc.name, &isvc.namespace);
    let mut rule = json!({"issuer": jwt.issuer, "forwardOriginalToken": false});
    if let Some(map) = rule.as_object_mut() {
        match &jwt.jwks {
            Jwks::Inline(text) => map.insert("jwks".into(), json!(text)),
            Jwks::Uri(url) => map.insert("jwksUri".into(), json!(url.text)),
        };
        if !jwt.audiences.is_empty() {
            map.insert("audiences".into(), json!(jwt.audiences));
        }
        if !jwt.claim_headers.is_empty() {
            map.insert(
                "outputClaimToHeaders".into(),
                jwt.claim_headers
                    .iter()
                    .map(|c| json!({"header": c.header, "claim": c.claim}))
                    .collect(),
            );
        }
    }
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": security_metadata(format!("meshserve-{namespace}-{name}"), isvc, settings),
        "spec": {"selector": {"matchLabels": gateway_labels(settings)}, "jwtRules": [rule]},
    })
}

/// Istio's `AuthorizationPolicy` for one service: every request routed to it without a
/// token from its issuer (or from another subject than those allowed) is denied.
pub fn authorization_policy(isvc: &InferenceService, jwt: &Jwt, settings: &Settings) -> Value {
    let (name, namespace) = (&isvc.name, &isvc.namespace);
    let principals: Vec<String> = if jwt.subjects.is_empty() {
        vec![format!("{}/*", jwt.issuer)]
    } else {
        jwt.subjects
            .iter()
            .map(|s| format!("{}/{s}", jwt.issuer))
            .collect()
    };
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": security_metadata(format!("meshserve-{namespace}-{name}-callers"), isvc, settings),
        "spec": {
            "selector": {"matchLabels": gateway_labels(settings)},
            "action": "DENY",
            "rules": [{
                "from": [{"source": {"notRequestPrincipals": principals}}],
                "when": [
                    {"key": format!("request.headers[{ISVC_HEADER}]"), "values": [name]},
                    {"key": format!("request.headers[{NAMESPACE_HEADER}]"), "values": [namespace]},
                ],
            }],
        },
    })
}
