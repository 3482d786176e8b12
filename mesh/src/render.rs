//! Renders what a local mesh needs from InferenceServices: the filter configuration (the JSON
//! the wasm filters read, checked by `meshserve-filter-core` itself), the extension config
//! resource Envoy watches for it (so changes apply without a restart), and the Envoy bootstrap.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use meshserve_filter_core::config::Config;
use meshserve_filter_core::graph::Graph;
use serde_json::{Value, json};

use crate::auth::{self, Jwks, Jwt};
use crate::graph::{HOP_CLUSTER, InferenceGraph, URL_CLUSTER_PREFIX};
use crate::isvc::{InferenceService, RevisionSpec};
use crate::workload;

/// The name of the router filter's extension config (ECDS) in the bootstrap.
pub const ROUTER_FILTER: &str = "meshserve.router";
/// The transformer filter's, present when an InferenceService has a transformer.
pub const TRANSFORMER_FILTER: &str = "meshserve.transformer";
/// The most client connections Envoy holds open at once.
pub const MAX_DOWNSTREAM_CONNECTIONS: u64 = 10_000;
/// Files in a rendered directory.
pub const FILTER_CONFIG_FILE: &str = "filter.json";
/// Each revision's state (cold, waking, warm: [`crate::up::Warmth`]), by InferenceService then
/// revision, which `meshserve up` keeps up to date beside the filter configuration.
pub const STATES_FILE: &str = "revisions.json";
pub const ROUTER_ECDS_FILE: &str = "router.ecds.json";
pub const TRANSFORMER_ECDS_FILE: &str = "transformer.ecds.json";
pub const LOGGER_ECDS_FILE: &str = "logger.ecds.json";
/// The logger filter's extension config name, present when a revision logs payloads.
pub const LOGGER_FILTER: &str = "meshserve.logger";
/// Envoy's per-connection buffer beyond the largest transformer body limit, so that the
/// transformer's own 413 (which names the limit) comes before Envoy's.
const BUFFER_HEADROOM: u64 = 1 << 20;

/// One of meshserve's wasm filters in Envoy's chain: its extension config name, root id and
/// ECDS file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    pub name: &'static str,
    pub root_id: &'static str,
    pub file: &'static str,
}

pub const ROUTER: Filter = Filter {
    name: ROUTER_FILTER,
    root_id: "router",
    file: ROUTER_ECDS_FILE,
};
pub const TRANSFORMER: Filter = Filter {
    name: TRANSFORMER_FILTER,
    root_id: "transformer",
    file: TRANSFORMER_ECDS_FILE,
};

pub const LOGGER: Filter = Filter {
    name: LOGGER_FILTER,
    root_id: "logger",
    file: LOGGER_ECDS_FILE,
};

/// The filters a configuration needs, in chain order: the router, the transformer if any
/// InferenceService has one, the logger if any revision logs payloads (last, so that it logs
/// what the predictor gets and answers). Services without pay nothing for them.
pub fn filters(config: &Config) -> Vec<Filter> {
    let mut out = vec![ROUTER];
    if config.services().iter().any(|s| s.transformer.is_some()) {
        out.push(TRANSFORMER);
    }
    let logs = config.services().iter().any(|s| {
        s.predictor.default.logger.is_some()
            || s.predictor.canaries.iter().any(|c| c.logger.is_some())
    });
    if logs {
        out.push(LOGGER);
    }
    out
}

/// Envoy's per-connection buffer limit for a configuration: the default 1 MiB, or enough for
/// the largest transformer body.
pub fn buffer_limit(config: &Config) -> u64 {
    config
        .services()
        .iter()
        .filter_map(|s| s.transformer.as_ref())
        .map(|t| t.limits().max_body_bytes as u64 + BUFFER_HEADROOM)
        .fold(1 << 20, u64::max)
}
pub const BOOTSTRAP_FILE: &str = "envoy.json";

/// Where Envoy reaches something: an IP address (a STATIC cluster) or a DNS name (STRICT_DNS:
/// a compose service, a Kubernetes Service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Endpoint {
        Endpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

impl Endpoint {
    /// `http://host:port` (or `https://`, or just `host:port`), as OTLP endpoints are written.
    pub fn from_url(url: &str) -> Result<Endpoint, String> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or(url);
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| format!("'{url}' has no port (e.g. http://127.0.0.1:4317)"))?;
        let port = port
            .parse()
            .map_err(|_| format!("'{url}': '{port}' is not a port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("'{url}' has no host"));
        }
        Ok(Endpoint {
            host: host.to_owned(),
            port,
        })
    }
}

/// Where one revision's sidecar listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub http: Endpoint,
    pub grpc: Endpoint,
}

impl Upstream {
    pub fn local(http: SocketAddr, grpc: SocketAddr) -> Upstream {
        Upstream {
            http: http.into(),
            grpc: grpc.into(),
        }
    }
}

/// What an Envoy bootstrap is made of, besides the filters.
#[derive(Debug, Clone)]
pub struct EnvoySpec<'a> {
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    /// The directory of the ECDS files, as Envoy sees it.
    pub config_dir: &'a Path,
    /// (cluster base name, where that revision's sidecar listens).
    pub upstreams: &'a [(String, Upstream)],
    /// An OTLP/gRPC collector: Envoy traces requests there (OpenTelemetry tracer) and
    /// passes the W3C `traceparent` on to the sidecars.
    pub otlp: Option<Endpoint>,
    /// The share of requests without a caller's trace that Envoy traces, 0 to 1.
    pub trace_sampling: f64,
    /// The services that need a token: (name, namespace, requirement).
    pub jwt: Vec<(String, String, Jwt)>,
    /// `meshserve up`'s wake endpoint ([`WAKE_CLUSTER`]), where revisions scale to zero.
    pub wake: Option<SocketAddr>,
}

/// The services of `services` that need a token, as [`EnvoySpec::jwt`] takes them.
pub fn jwt_services(services: &[InferenceService]) -> Vec<(String, String, Jwt)> {
    services
        .iter()
        .filter_map(|s| {
            s.jwt
                .clone()
                .map(|jwt| (s.name.clone(), s.namespace.clone(), jwt))
        })
        .collect()
}

/// The cluster Envoy sends its spans to.
pub const OTLP_CLUSTER: &str = "meshserve.otlp";
/// How often Envoy sends the spans it has (Envoy's default is 5 s).
const TRACE_FLUSH_MS: u64 = 1000;

/// A revision's Envoy cluster names (REST and gRPC) in the Envoys meshserve renders.
pub fn clusters(isvc: &str, revision: &str) -> (String, String) {
    let base = format!("{isvc}.{revision}");
    (base.clone(), format!("{base}.grpc"))
}

/// How a target names the Envoy clusters that reach a revision. The filters use these names
/// for everything: the router names the revision's cluster in `x-meshserve-cluster` (Envoy's
/// `cluster_header` routes on it locally, Istio's VirtualServices match it), the logger calls
/// out to the REST one for the revision's log intake, the router sends shadow copies to it.
/// This is the one place that decides them for each target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Naming {
    /// The Envoy bootstraps meshserve renders itself (`meshserve up`, render's local and
    /// compose files): [`clusters`].
    Local,
    /// `meshserve up`: [`clusters`], and its wake endpoint ([`WAKE_CLUSTER`]) for the
    /// revisions it scales to zero.
    Up,
    /// Istio: the clusters istiod gives every proxy, one per Service port,
    /// `outbound|<port>||<service>.<namespace>.svc.<domain>` (`domain`: the cluster's DNS
    /// domain, `cluster.local` by default).
    Istio { domain: String },
}

impl Naming {
    /// The `scale_to_zero` entry of a revision at `minReplicas: 0`: how the router's
    /// activator wakes it; none where nothing scales it (render's local and compose files
    /// run every revision).
    fn wake(&self, isvc: &InferenceService, revision: &RevisionSpec) -> Option<Value> {
        match self {
            Naming::Local => None,
            Naming::Up => Some(json!({"wake": {
                "cluster": WAKE_CLUSTER,
                "path": wake_path(&isvc.namespace, &revision.name),
            }})),
            // The namespace's wake scaler: KEDA scales the ScaledObject it names at once.
            Naming::Istio { domain } => Some(json!({"wake": {
                "cluster": format!(
                    "outbound|{}||{}",
                    workload::WAKE_HTTP_PORT,
                    workload::wake_host(&isvc.namespace, domain)
                ),
                "path": wake_path(&isvc.namespace, &workload::name(&isvc.name, &revision.name)),
            }})),
        }
    }

    /// (REST cluster, gRPC cluster) of `revision` of `isvc`.
    pub fn clusters(&self, isvc: &InferenceService, revision: &RevisionSpec) -> (String, String) {
        match self {
            Naming::Local | Naming::Up => clusters(&isvc.name, &revision.name),
            Naming::Istio { domain } => {
                let host = workload::service_host(isvc, revision, domain);
                (
                    format!("outbound|{}||{host}", workload::HTTP_PORT),
                    format!("outbound|{}||{host}", workload::GRPC_PORT),
                )
            }
        }
    }
}

fn revision_json(
    isvc: &InferenceService,
    revision: &RevisionSpec,
    percent: Option<i64>,
    naming: &Naming,
) -> Value {
    let (cluster, grpc_cluster) = naming.clusters(isvc, revision);
    let mut v = json!({"name": revision.name, "cluster": cluster, "grpc_cluster": grpc_cluster});
    if let Some(map) = v.as_object_mut() {
        if let Some(p) = percent {
            map.insert("percent".into(), json!(p));
        }
        if let Some(logger) = &revision.logger {
            map.insert("logger".into(), logger.filter.clone());
        }
        if let (Some(0), Some(wake)) = (revision.scaling.min_replicas, naming.wake(isvc, revision))
        {
            map.insert("scale_to_zero".into(), wake);
        }
    }
    v
}

/// The Envoy cluster of `meshserve up`'s wake endpoint (loopback), which starts a revision's
/// sidecar when the router's activator asks.
pub const WAKE_CLUSTER: &str = "meshserve.wake";

/// The path that wakes a revision: `meshserve up`'s wake endpoint takes the revision's name,
/// `meshserve wake-scaler` the name of its ScaledObject (the revision's workload).
pub fn wake_path(namespace: &str, revision: &str) -> String {
    format!("/wake/{namespace}/{revision}")
}

/// The filter configuration for some InferenceServices, each serving `models` (the model
/// names its sidecars answer for), with the cluster names of the target it is for.
pub fn filter_config(
    services: &[(&InferenceService, Vec<String>)],
    naming: &Naming,
) -> Result<Value, String> {
    let services: Vec<Value> = services
        .iter()
        .map(|(isvc, models)| {
            let revision = |r: &RevisionSpec, percent| revision_json(isvc, r, percent, naming);
            let mut predictor = json!({
                "default": revision(&isvc.default, None),
                "canaries": isvc.canaries.iter().map(|c| revision(c, Some(c.percent))).collect::<Vec<_>>(),
            });
            if let (Some(shadow), Some(map)) = (&isvc.shadow, predictor.as_object_mut()) {
                map.insert("shadow".into(), revision(shadow, Some(shadow.percent)));
            }
            let mut service = json!({
                "name": isvc.name,
                "namespace": isvc.namespace,
                "models": models,
                "predictor": predictor,
            });
            if let (Some(transformer), Some(map)) = (&isvc.transformer, service.as_object_mut()) {
                map.insert("transformer".into(), transformer.clone());
            }
            if let (true, Some(map)) = (isvc.public_control_api, service.as_object_mut()) {
                map.insert("public_control_api".into(), json!(true));
            }
            if let (true, Some(map)) = (isvc.default.explainer.is_some(), service.as_object_mut()) {
                map.insert("builtin_explainer".into(), json!(true));
            }
            service
        })
        .collect();
    let config = json!({"services": services});
    check(&config)?;
    Ok(config)
}

/// `config` with the InferenceGraphs of the file, their steps resolved against `services`.
pub fn with_graphs(
    mut config: Value,
    graphs: &[InferenceGraph],
    services: &[(&InferenceService, Vec<String>)],
) -> Result<Value, String> {
    if graphs.is_empty() {
        return Ok(config);
    }
    let resolved = graphs
        .iter()
        .map(|g| g.resolve(services))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(map) = config.as_object_mut() {
        map.insert("graphs".into(), Value::Array(resolved));
    }
    check(&config)?;
    Ok(config)
}

/// Validates a filter configuration with the filters' own parser.
pub fn check(config: &Value) -> Result<Config, String> {
    Config::parse(config.to_string().as_bytes()).map_err(|e| e.to_string())
}

/// The `TypedExtensionConfig` file Envoy watches for one of the filters.
pub fn ecds(filter: Filter, config: &Value, wasm: &Path) -> Value {
    json!({"resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": filter.name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": filter.root_id,
                "root_id": filter.root_id,
                "fail_open": false,
                // The router holds a gRPC request's headers (StopIteration) until the model
                // name arrives in the body; the transformer holds a request's headers until
                // its body is rewritten. Without this, Envoy turns that into StopAllIteration
                // and the body never reaches the filter.
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

/// The `TypedExtensionConfig` file Envoy watches for the router filter.
pub fn router_ecds(config: &Value, wasm: &Path) -> Value {
    ecds(ROUTER, config, wasm)
}

/// Writes what a local mesh needs into `dir`: the filter configuration, one ECDS file per
/// filter and the Envoy bootstrap (written last: it names the others). Returns the file names.
pub fn write_mesh(
    dir: &Path,
    config: &Value,
    wasm: &Path,
    envoy: &EnvoySpec<'_>,
) -> Result<Vec<&'static str>, String> {
    let checked = check(config)?;
    let write = |name: &str, value: &Value| {
        let path = dir.join(name);
        write_atomically(&path, value).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(FILTER_CONFIG_FILE, config)?;
    let filters = filters(&checked);
    let mut written = vec![FILTER_CONFIG_FILE];
    for filter in &filters {
        write(filter.file, &ecds(*filter, config, wasm))?;
        written.push(filter.file);
    }
    write(
        BOOTSTRAP_FILE,
        &bootstrap(envoy, &filters, buffer_limit(&checked), checked.graphs()),
    )?;
    written.push(BOOTSTRAP_FILE);
    Ok(written)
}

fn cluster(name: &str, at: &Endpoint, http2: bool) -> Value {
    let kind = if at.host.parse::<std::net::IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    let mut c = json!({
        "name": name,
        "type": kind,
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": at.host, "port_value": at.port}}}}]}]},
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

/// The Envoy bootstrap: one listener whose HTTP filters are meshserve's `filters` (each one's
/// config read from its ECDS file in the spec's directory, reloaded when that file is
/// replaced) and Envoy's router; routes pick the cluster the router filter names in
/// `x-meshserve-cluster`; one cluster per revision and protocol. Stats tags turn the
/// filters' stat names into Prometheus labels. `buffer_limit`: the most bytes a filter may
/// hold of one request or response (Envoy answers 413 above it). With an OTLP collector,
/// Envoy's OpenTelemetry tracer traces every request (a server span, and a client span per
/// upstream request whose context goes on as `traceparent`). With `graphs`, a second,
/// internal listener (the hop listener, the same filters) takes the graphs' steps, and each
/// step URL outside the mesh gets a cluster.
pub fn bootstrap(
    envoy: &EnvoySpec<'_>,
    filters: &[Filter],
    buffer_limit: u64,
    graphs: &[Graph],
) -> Value {
    let mut clusters = Vec::new();
    for (name, upstream) in envoy.upstreams {
        clusters.push(cluster(name, &upstream.http, false));
        clusters.push(cluster(&format!("{name}.grpc"), &upstream.grpc, true));
    }
    if let Some(wake) = envoy.wake {
        clusters.push(cluster(WAKE_CLUSTER, &wake.into(), false));
    }
    // `wasmcustom.meshserve.requests.isvc.digits.revision.v1.outcome.routed` becomes
    // `envoy_wasmcustom_meshserve_requests{isvc="digits",revision="v1",outcome="routed"}`.
    let tags: Vec<Value> = [
        "isvc", "revision", "outcome", "choice", "result", "reason", "phase", "graph",
    ]
    .iter()
    .map(|name| json!({"tag_name": name, "regex": format!(r"(\.{name}\.([^.]+))")}))
    .collect();
    let mut http_filters: Vec<Value> = filters
        .iter()
        .map(|f| {
            json!({"name": f.name, "config_discovery": {
                "config_source": {"path_config_source": {"path": envoy.config_dir.join(f.file).display().to_string()}},
                "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"]}})
        })
        .collect();
    // Tokens are checked right after the router filter has named each request's service.
    let checks = auth::envoy_filters(&envoy.jwt);
    let at = usize::from(!http_filters.is_empty());
    http_filters.splice(at..at, checks);
    for (name, namespace, jwt) in &envoy.jwt {
        if let Jwks::Uri(url) = &jwt.jwks {
            let at = Endpoint {
                host: url.host.clone(),
                port: url.port,
            };
            let mut jwks = cluster(&auth::jwks_cluster(name, namespace), &at, false);
            if let (Some(tls), Some(map)) = (auth::jwks_tls(url), jwks.as_object_mut()) {
                map.insert("transport_socket".into(), tls);
            }
            clusters.push(jwks);
        }
    }
    http_filters.push(
        json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}),
    );
    let mut manager = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "meshserve",
        "codec_type": "AUTO",
        // A client gets 10 s to send a request's headers (slow-loris), as the sidecar does.
        "request_headers_timeout": "10s",
        // And 60 s for the whole request, body included (slow bodies), as the sidecar does.
        "request_timeout": "60s",
        "route_config": {"name": "meshserve", "virtual_hosts": [{"name": "inference", "domains": ["*"], "routes": [
            {"match": {"prefix": "/", "headers": [{"name": "x-meshserve-cluster", "present_match": true}]},
             "route": {"cluster_header": "x-meshserve-cluster", "timeout": "60s"}},
            {"match": {"prefix": "/"},
             "direct_response": {"status": 404, "body": {"inline_string": "{\"error\": \"not an inference endpoint\"}"}},
             "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
        ]}]},
        "http_filters": http_filters,
    });
    // Envoy's own replies in the REST error shape: a request not received in time (408),
    // and the token checks' refusals.
    let mut refusals = vec![json!({"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": 408, "runtime_key": "meshserve.reply.408"}}}})];
    refusals.extend(auth::envoy_refusals(&envoy.jwt));
    if let Some(map) = manager.as_object_mut() {
        let mappers: Vec<Value> = refusals.into_iter().map(rest_error_mapper).collect();
        map.insert("local_reply_config".into(), json!({"mappers": mappers}));
        if let Some(removal) = auth::envoy_claim_removal(&envoy.jwt) {
            map.insert("early_header_mutation_extensions".into(), removal);
        }
    }
    let mut runtime = json!({});
    if let Some(otlp) = &envoy.otlp {
        clusters.push(cluster(OTLP_CLUSTER, otlp, true));
        if let Some(map) = manager.as_object_mut() {
            map.insert("tracing".into(), json!({
                "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                    "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "2s"},
                    "service_name": "meshserve-envoy",
                }},
                "spawn_upstream_span": true,
                "random_sampling": {"value": (envoy.trace_sampling * 100.0).clamp(0.0, 100.0)},
            }));
        }
        runtime = json!({"tracing.opentelemetry.flush_interval_ms": TRACE_FLUSH_MS});
    }
    let mut listeners = vec![json!({
        "name": "meshserve",
        "address": {"socket_address": {"address": envoy.listener.ip().to_string(), "port_value": envoy.listener.port()}},
        "per_connection_buffer_limit_bytes": buffer_limit,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": manager.clone(),
        }]}],
    })];
    let mut extensions = Vec::new();
    if !graphs.is_empty() {
        // The hop listener: an in-process (internal) listener whose filter chain's name tells
        // the router that a request is a graph's step.
        extensions.push(json!({"name": "envoy.bootstrap.internal_listener", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"}}));
        let mut hop = manager;
        hop["stat_prefix"] = json!(HOP_CLUSTER);
        listeners.push(json!({
            "name": HOP_CLUSTER,
            "internal_listener": {},
            "per_connection_buffer_limit_bytes": buffer_limit,
            "filter_chains": [{"name": HOP_CLUSTER, "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": hop,
            }]}],
        }));
        clusters.push(json!({
            "name": HOP_CLUSTER,
            "connect_timeout": "2s",
            "load_assignment": {"cluster_name": HOP_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "envoy_internal_address": {"server_listener_name": HOP_CLUSTER}}}}]}]},
        }));
        let mut urls: Vec<&str> = graphs
            .iter()
            .flat_map(|g| &g.nodes)
            .flat_map(|n| &n.steps)
            .filter_map(|s| s.call.as_ref()?.cluster.strip_prefix(URL_CLUSTER_PREFIX))
            .collect();
        urls.sort_unstable();
        urls.dedup();
        for authority in urls {
            if let Some((host, port)) = authority.rsplit_once(':')
                && let Ok(port) = port.parse()
            {
                let at = Endpoint {
                    host: host.to_owned(),
                    port,
                };
                clusters.push(cluster(
                    &format!("{URL_CLUSTER_PREFIX}{authority}"),
                    &at,
                    false,
                ));
            }
        }
    }
    let mut bootstrap = json!({
        "node": {"id": "meshserve", "cluster": "meshserve"},
        // A named limit on client connections (Envoy warns when there is none).
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
            },
        }]},
        "layered_runtime": {"layers": [
            {"name": "static", "static_layer": runtime},
            {"name": "admin", "admin_layer": {}},
        ]},
        "admin": {"address": {"socket_address": {"address": envoy.admin.ip().to_string(), "port_value": envoy.admin.port()}}},
        "stats_config": {"stats_tags": tags},
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
        },
    });
    if let (false, Some(map)) = (extensions.is_empty(), bootstrap.as_object_mut()) {
        map.insert("bootstrap_extensions".into(), Value::Array(extensions));
    }
    bootstrap
}

/// A local-reply mapper that puts Envoy's reason in `{"error": ...}` (the REST protocols'
/// error shape) for the non-gRPC replies `filter` (an access-log filter) selects; gRPC
/// clients keep Envoy's `grpc-status`.
fn rest_error_mapper(filter: Value) -> Value {
    let not_grpc = json!({"header_filter": {"header": {"name": "content-type",
        "string_match": {"prefix": "application/grpc"}, "invert_match": true}}});
    json!({
        "filter": {"and_filter": {"filters": [filter, not_grpc]}},
        "body_format_override": {"json_format": {"error": "%LOCAL_REPLY_BODY%"}, "content_type": "application/json"},
    })
}

/// Writes `value` as JSON to `path` atomically: a temporary file beside it, renamed over it,
/// so a watcher (Envoy) never reads half a file. The temporary file's name is this process's
/// and this write's own, so two writers never rename each other's half-written file.
pub fn write_atomically(path: &Path, value: &Value) -> std::io::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp: PathBuf = path.with_extension(format!("json.{}.{n}.tmp", std::process::id()));
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn isvc() -> InferenceService {
        crate::isvc::sample()
    }

    #[test]
    fn istio_names_the_clusters_istiod_gives_its_proxies() {
        let mut isvc = isvc();
        isvc.default.logger = Some(crate::isvc::RevisionLogger {
            url: "http://sink:8080".into(),
            batched: false,
            filter: json!({"mode": "all"}),
        });
        let naming = Naming::Istio {
            domain: "corp.internal".into(),
        };
        let config = filter_config(&[(&isvc, vec!["digits".into()])], &naming).unwrap();
        let default = &config["services"][0]["predictor"]["default"];
        assert_eq!(
            default["cluster"],
            "outbound|8080||digits-v1.default.svc.corp.internal"
        );
        assert_eq!(
            default["grpc_cluster"],
            "outbound|8081||digits-v1.default.svc.corp.internal"
        );
        // The logger's call-outs go to the REST cluster of the revision it logs for.
        let checked = check(&config).unwrap();
        let (_, intake) = checked.logger("digits", "default", "v1").unwrap();
        assert_eq!(intake, default["cluster"]);
    }

    #[test]
    fn a_revision_at_zero_is_woken_by_whatever_starts_it_there() {
        let mut isvc = isvc();
        isvc.canaries[0].scaling.min_replicas = Some(0);
        let wake = |naming: &Naming| {
            let config = filter_config(&[(&isvc, vec!["digits".into()])], naming).unwrap();
            check(&config)
                .unwrap()
                .scale_to_zero()
                .into_iter()
                .map(|(revision, scale)| (revision.name, scale.wake))
                .collect::<Vec<_>>()
        };
        // `meshserve up`'s wake endpoint, by revision; on Kubernetes the namespace's wake
        // scaler, by the ScaledObject's name; `render`'s local files run every revision.
        let up = wake(&Naming::Up);
        assert_eq!(up.len(), 1, "only the canary scales to zero");
        let (name, call) = &up[0];
        let call = call.as_ref().unwrap();
        assert_eq!(name, "v2");
        assert_eq!(
            (call.cluster.as_str(), call.path.as_str()),
            (WAKE_CLUSTER, "/wake/default/v2")
        );
        let istio = wake(&Naming::Istio {
            domain: "corp.internal".into(),
        });
        let call = istio[0].1.as_ref().unwrap();
        assert_eq!(
            call.cluster,
            "outbound|9091||meshserve-wake.default.svc.corp.internal"
        );
        assert_eq!(call.path, "/wake/default/digits-v2");
        assert!(wake(&Naming::Local).is_empty());
    }

    #[test]
    fn the_filter_config_passes_the_filters_own_check() {
        let isvc = isvc();
        let config = filter_config(&[(&isvc, vec!["digits".into()])], &Naming::Local).unwrap();
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

    #[test]
    fn a_transformer_adds_its_filter_after_the_router_and_raises_the_buffer() {
        let mut isvc = isvc();
        isvc.transformer = Some(
            json!({"response": {"steps": [{"softmax": {}}]}, "limits": {"max_body_bytes": 4_000_000}}),
        );
        let config = filter_config(&[(&isvc, vec!["digits".into()])], &Naming::Local).unwrap();
        let checked = check(&config).unwrap();
        assert_eq!(filters(&checked), vec![ROUTER, TRANSFORMER]);
        assert_eq!(buffer_limit(&checked), 4_000_000 + BUFFER_HEADROOM);
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let spec = EnvoySpec {
            listener: addr,
            admin: addr,
            config_dir: dir.path(),
            upstreams: &[],
            otlp: None,
            trace_sampling: 1.0,
            jwt: Vec::new(),
            wake: None,
        };
        let written = write_mesh(dir.path(), &config, Path::new("/x.wasm"), &spec).unwrap();
        assert_eq!(
            written,
            vec![
                FILTER_CONFIG_FILE,
                ROUTER_ECDS_FILE,
                TRANSFORMER_ECDS_FILE,
                BOOTSTRAP_FILE
            ]
        );
        let envoy: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(BOOTSTRAP_FILE)).unwrap())
                .unwrap();
        let listener = &envoy["static_resources"]["listeners"][0];
        assert_eq!(
            listener["per_connection_buffer_limit_bytes"],
            4_000_000 + BUFFER_HEADROOM
        );
        let chain: Vec<&str> =
            listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap())
                .collect();
        assert_eq!(
            chain,
            vec![
                ROUTER_FILTER,
                TRANSFORMER_FILTER,
                "envoy.filters.http.router"
            ]
        );
        // Without a transformer: the router alone, Envoy's default buffer.
        let plain = filter_config(
            &[(&self::tests::isvc(), vec!["digits".into()])],
            &Naming::Local,
        )
        .unwrap();
        assert_eq!(filters(&check(&plain).unwrap()), vec![ROUTER]);
        assert_eq!(buffer_limit(&check(&plain).unwrap()), 1 << 20);
    }
}
