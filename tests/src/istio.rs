//! An Istio-shaped ingress gateway: a real Envoy given what istiod would give an ingress
//! gateway for the resources `meshserve render` wrote, so that the rendered Istio files
//! themselves (not a second copy of the renderer's logic) run end to end on loopback, with
//! real sidecars behind clusters that carry Istio's names.
//!
//! It reads `istio/gateway.yaml`, `istio/virtualservices.yaml`, one of
//! `istio/wasmplugins.yaml` or `istio/envoyfilter.yaml` ([`Form`]), and the Services in
//! `kubernetes/*.yaml`. It writes a bootstrap (the gateway's listener and admin) and what
//! istiod would push over xDS as files that Envoy watches: the clusters (CDS), the routes
//! (RDS) and each filter's extension config (ECDS). [`IstioGateway::apply`] writes them again
//! from a new rendering and renames them into place, as an `kubectl apply` and istiod's push
//! would change a running gateway: no restart.
//!
//! The rules it follows, each as Istio documents it:
//!
//! 1. **Clusters** (<https://istio.io/latest/docs/ops/diagnostic-tools/proxy-cmd/>): one per
//!    Service port, named `outbound|<port>||<service>.<namespace>.svc.<domain>`. The port's
//!    protocol comes from its `appProtocol`, else from its name's prefix (`grpc`, `http2`:
//!    HTTP/2 to the pods; `http`: HTTP/1.1;
//!    <https://istio.io/latest/docs/ops/configuration/traffic-management/protocol-selection/>).
//!    Istio's defaults for outbound clusters: connect timeout 10 s, circuit breakers at their
//!    maximum (Envoy's own default is 1,024), least-request balancing. The endpoints are the
//!    pods' addresses, which the test gives (its sidecars on loopback), by the port's
//!    `targetPort`.
//! 2. **Listener**: one per `Gateway` server port (on 127.0.0.1 and a port the OS picks), its
//!    routes in the route configuration `http.<port>`, one virtual host per server host.
//! 3. **Routes** (<https://istio.io/latest/docs/reference/config/networking/virtual-service/>):
//!    every VirtualService bound to the gateway (`gateways: [<namespace>/<name>]`, or a name
//!    in the VirtualService's own namespace) whose hosts include the server's. Their `http`
//!    routes keep their order; several VirtualServices on one gateway host are merged in the
//!    order they were created (the order of the files and documents here; Istio merges them
//!    on gateways only, by creation time: <https://istio.io/latest/docs/reference/config/analysis/ist0109/>,
//!    istio/istio#10464). Each `match` entry is one Envoy route: `headers` (`exact`,
//!    `prefix`, `regex`) and `uri` (no `uri`: every path). A destination's `host` (a short
//!    name completed with the VirtualService's namespace) and `port` name the cluster; several
//!    destinations are weighted clusters. `timeout` is the route's timeout and caps a gRPC
//!    client's `grpc-timeout`. Istio's default retry policy applies (two attempts on
//!    connect-failure, refused-stream, unavailable, cancelled and 503, not to the host that
//!    failed: <https://istio.io/latest/docs/concepts/traffic-management/#retries>). A request
//!    no route matches gets Envoy's 404.
//! 4. **WasmPlugins** (<https://istio.io/latest/docs/reference/config/proxy_extensions/wasm-plugin/>):
//!    ordered by `phase` (AUTHN, AUTHZ, STATS: where Istio's authentication, authorization
//!    and stats filters would be; unspecified: last, just before Envoy's router) and within a
//!    phase by `priority`, highest first. Each is an extension config named
//!    `<namespace>.<name>` with `root_id` = `pluginName`, the `pluginConfig` as JSON text for
//!    its configuration, `failStrategy` as `failure_policy`, and the module as Istio's agent
//!    leaves it after the download: a local file. As in istiod's translation, nothing sets
//!    `allow_on_headers_stop_iteration`.
//! 5. **EnvoyFilter** (<https://istio.io/latest/docs/reference/config/networking/envoy-filter/>):
//!    each `EXTENSION_CONFIG` `ADD` patch is an extension config as written, but for its remote
//!    module, which the agent downloads (and checks against its `sha256`, as done here) and
//!    replaces with the local file; `HTTP_FILTER` patches apply in order (`INSERT_FIRST`:
//!    the chain's start; `INSERT_BEFORE`: before the filter named in `subFilter`), and their
//!    ADS config sources read these files instead.
//!
//! A field of those resources that this helper does not translate is an error, so the
//! renderer cannot grow something this gateway would silently ignore. What it does not
//! reproduce, and only a real cluster shows: istiod's own code, mutual TLS between the gateway
//! and the pods, Istio's own filters (`istio.stats`, `istio.alpn`, authentication and
//! authorization, CORS and fault injection, which meshserve's resources do not configure),
//! the agent's OCI pull, and `security.yaml`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::Envoy;

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ROUTES_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const EXTENSION_TYPE: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
const HCM: &str = "envoy.filters.network.http_connection_manager";
const ROUTER: &str = "envoy.filters.http.router";
/// Istio's circuit-breaker thresholds for outbound clusters (2^32 - 1).
const UNLIMITED: u64 = 4_294_967_295;

/// Which of the rendered forms configures meshserve's filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `istio/wasmplugins.yaml`.
    WasmPlugins,
    /// `istio/envoyfilter.yaml`.
    EnvoyFilter,
}

/// Where a Service's pods listen here: (namespace, Service name) → target port (a port name
/// or number, as the Service's `targetPort` says) → address.
pub type Pods = BTreeMap<(String, String), BTreeMap<String, SocketAddr>>;

/// What the gateway is given, translated from one rendering.
#[derive(Debug, Clone)]
struct Translation {
    /// The Gateway server's port (the route configuration is `http.<port>`).
    port: u64,
    clusters: Vec<Value>,
    routes: Value,
    /// The HTTP filters before Envoy's router, in order: (name, extension config).
    filters: Vec<(String, Value)>,
}

/// All YAML documents of the files under `dir` named by `names` (`*.yaml` for all).
fn documents(dir: &Path, names: &[&str]) -> Result<Vec<Value>, String> {
    let mut files: Vec<PathBuf> = Vec::new();
    for name in names {
        if *name == "*.yaml" {
            let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .filter_map(|e| Some(e.ok()?.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
                .collect();
            all.sort();
            files.extend(all);
        } else {
            files.push(dir.join(name));
        }
    }
    let mut out = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(document)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            if !value.is_null() {
                out.push(value);
            }
        }
    }
    Ok(out)
}

/// Refuses fields this helper does not translate.
fn only(value: &Value, at: &str, known: &[&str]) -> Result<(), String> {
    match value.as_object() {
        Some(map) => match map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(key) => Err(format!(
                "{at}.{key}: not translated by the Istio-shaped gateway"
            )),
            None => Ok(()),
        },
        None => Err(format!("{at}: not an object")),
    }
}

fn text<'a>(value: &'a Value, at: &str) -> Result<&'a str, String> {
    value.as_str().ok_or_else(|| format!("{at}: not a string"))
}

fn namespace(object: &Value) -> &str {
    object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
}

/// Istio's protocol for a Service port: `appProtocol`, else the name's prefix.
fn http2(port: &Value) -> bool {
    let protocol = port["appProtocol"]
        .as_str()
        .or_else(|| port["name"].as_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if protocol.starts_with("grpc-web") {
        // gRPC-Web is HTTP/1.1-compatible: Istio treats it as HTTP.
        return false;
    }
    let prefix = protocol.split('-').next().unwrap_or_default();
    matches!(prefix, "grpc" | "http2" | "h2c" | "kubernetes.io/h2c")
}

/// Rule 1: the clusters of every Service in `kubernetes/`.
fn clusters(out: &Path, pods: &Pods, domain: &str) -> Result<Vec<Value>, String> {
    let mut clusters = Vec::new();
    for service in documents(&out.join("kubernetes"), &["*.yaml"])?
        .into_iter()
        .filter(|d| d["kind"] == "Service")
    {
        let name = text(&service["metadata"]["name"], "Service metadata.name")?;
        let ns = namespace(&service);
        let host = format!("{name}.{ns}.svc.{domain}");
        let addresses = pods.get(&(ns.to_owned(), name.to_owned()));
        for port in service["spec"]["ports"].as_array().into_iter().flatten() {
            let number = port["port"]
                .as_u64()
                .ok_or_else(|| format!("Service {name}: a port without a number"))?;
            let target = match &port["targetPort"] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => number.to_string(),
            };
            let endpoints: Vec<Value> = addresses
                .and_then(|a| a.get(&target))
                .map(|addr| {
                    json!({"endpoint": {"address": {"socket_address": {
                        "address": addr.ip().to_string(), "port_value": addr.port()}}}})
                })
                .into_iter()
                .collect();
            let cluster_name = format!("outbound|{number}||{host}");
            let mut cluster = json!({
                "@type": CLUSTER_TYPE,
                "name": cluster_name,
                "type": "STATIC",
                "connect_timeout": "10s",
                "lb_policy": "LEAST_REQUEST",
                "circuit_breakers": {"thresholds": [{"max_connections": UNLIMITED,
                    "max_pending_requests": UNLIMITED, "max_requests": UNLIMITED,
                    "max_retries": UNLIMITED}]},
                "load_assignment": {"cluster_name": cluster_name,
                                    "endpoints": [{"lb_endpoints": endpoints}]},
            });
            if http2(port) {
                cluster["typed_extension_protocol_options"] = json!({
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                });
            }
            clusters.push(cluster);
        }
    }
    Ok(clusters)
}

/// A VirtualService's string match (`exact`, `prefix`, `regex`) as Envoy's.
fn string_match(value: &Value, at: &str) -> Result<Value, String> {
    only(value, at, &["exact", "prefix", "regex"])?;
    if let Some(s) = value.get("exact") {
        Ok(json!({"exact": text(s, at)?}))
    } else if let Some(s) = value.get("prefix") {
        Ok(json!({"prefix": text(s, at)?}))
    } else if let Some(s) = value.get("regex") {
        Ok(json!({"safe_regex": {"regex": text(s, at)?}}))
    } else {
        Err(format!("{at}: no exact, prefix or regex"))
    }
}

/// Rule 3: one VirtualService's http routes, as Envoy routes.
fn vs_routes(vs: &Value, domain: &str) -> Result<Vec<Value>, String> {
    let ns = namespace(vs);
    let vs_name = vs["metadata"]["name"].as_str().unwrap_or("?");
    only(&vs["spec"], vs_name, &["hosts", "gateways", "http"])?;
    let mut routes = Vec::new();
    for (i, http) in vs["spec"]["http"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("VirtualService {vs_name}: http[{i}]");
        only(http, &at, &["name", "match", "route", "timeout"])?;
        let mut destinations = Vec::new();
        for (j, route) in http["route"].as_array().into_iter().flatten().enumerate() {
            let at = format!("{at}.route[{j}]");
            only(route, &at, &["destination", "weight"])?;
            only(&route["destination"], &at, &["host", "port"])?;
            let host = text(&route["destination"]["host"], &at)?;
            let host = if host.contains('.') {
                host.to_owned()
            } else {
                format!("{host}.{ns}.svc.{domain}")
            };
            let port = route["destination"]["port"]["number"]
                .as_u64()
                .ok_or_else(|| format!("{at}.destination.port.number is required here"))?;
            destinations.push((
                format!("outbound|{port}||{host}"),
                route["weight"].as_u64().unwrap_or(100),
            ));
        }
        let mut action = match destinations.as_slice() {
            [] => return Err(format!("{at}: no route")),
            [(cluster, _)] => json!({"cluster": cluster}),
            several => json!({"weighted_clusters": {"clusters": several.iter()
                .map(|(c, w)| json!({"name": c, "weight": w})).collect::<Vec<_>>()}}),
        };
        if let Some(timeout) = http.get("timeout") {
            let timeout = text(timeout, &format!("{at}.timeout"))?;
            action["timeout"] = json!(timeout);
            action["max_stream_duration"] = json!({"grpc_timeout_header_max": timeout});
        }
        action["retry_policy"] = json!({
            "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            "num_retries": 2,
            "retriable_status_codes": [503],
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
            "host_selection_retry_max_attempts": 5,
        });
        let matches: Vec<Value> = match http.get("match").and_then(Value::as_array) {
            Some(list) if !list.is_empty() => list.clone(),
            _ => vec![json!({})],
        };
        for (k, m) in matches.iter().enumerate() {
            let at = format!("{at}.match[{k}]");
            only(m, &at, &["headers", "uri", "name"])?;
            let mut envoy_match = match m.get("uri") {
                None => json!({"prefix": "/"}),
                Some(uri) => {
                    let converted = string_match(uri, &format!("{at}.uri"))?;
                    match converted.as_object().and_then(|o| o.iter().next()) {
                        Some((kind, value)) if kind == "exact" => json!({"path": value}),
                        Some((kind, value)) => json!({kind.as_str(): value}),
                        None => json!({"prefix": "/"}),
                    }
                }
            };
            let mut headers = Vec::new();
            for (name, value) in m
                .get("headers")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                headers.push(json!({"name": name.to_ascii_lowercase(),
                    "string_match": string_match(value, &format!("{at}.headers.{name}"))?}));
            }
            if !headers.is_empty() {
                envoy_match["headers"] = json!(headers);
            }
            let mut route = json!({"match": envoy_match, "route": action});
            if let Some(name) = http.get("name") {
                route["name"] = name.clone();
            }
            routes.push(route);
        }
    }
    Ok(routes)
}

/// Rules 2 and 3: the gateway's server port and its route configuration.
fn routes(out: &Path, domain: &str) -> Result<(u64, Value), String> {
    let istio = out.join("istio");
    let gateways: Vec<Value> = documents(&istio, &["gateway.yaml"])?;
    let [gateway] = gateways.as_slice() else {
        return Err(format!(
            "gateway.yaml: {} Gateways; this helper runs one",
            gateways.len()
        ));
    };
    only(&gateway["spec"], "Gateway", &["selector", "servers"])?;
    let gateway_ref = format!(
        "{}/{}",
        namespace(gateway),
        text(&gateway["metadata"]["name"], "Gateway metadata.name")?
    );
    let servers = gateway["spec"]["servers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let [server] = servers.as_slice() else {
        return Err("the Gateway must have one server here".into());
    };
    only(server, "Gateway server", &["port", "hosts"])?;
    if server["port"]["protocol"] != "HTTP" {
        return Err("the Gateway server is not HTTP".into());
    }
    let port = server["port"]["number"]
        .as_u64()
        .ok_or("the Gateway server has no port number")?;
    let mut virtual_hosts = Vec::new();
    for host in server["hosts"].as_array().into_iter().flatten() {
        let host = text(host, "Gateway server hosts")?;
        let mut routes = Vec::new();
        for vs in documents(&istio, &["virtualservices.yaml"])? {
            let ns = namespace(&vs);
            let bound = vs["spec"]["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|g| {
                    g.as_str().is_some_and(|g| {
                        g == gateway_ref || (!g.contains('/') && format!("{ns}/{g}") == gateway_ref)
                    })
                });
            let hosts_match = vs["spec"]["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|h| h == host || h == "*");
            if bound && hosts_match {
                routes.extend(vs_routes(&vs, domain)?);
            }
        }
        virtual_hosts
            .push(json!({"name": format!("{host}:{port}"), "domains": [host], "routes": routes}));
    }
    Ok((
        port,
        json!({"@type": ROUTES_TYPE, "name": format!("http.{port}"), "virtual_hosts": virtual_hosts}),
    ))
}

/// The module as Istio's agent leaves it: `local` instead of `remote`, checked against a
/// pinned SHA-256.
fn local_module(pinned: Option<&str>, wasm: &Path) -> Result<Value, String> {
    if let Some(pinned) = pinned {
        let bytes = std::fs::read(wasm).map_err(|e| format!("{}: {e}", wasm.display()))?;
        let actual: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if actual != pinned {
            return Err(format!(
                "the module's SHA-256 is {actual}, the EnvoyFilter pins {pinned}: the agent would refuse it"
            ));
        }
    }
    Ok(json!({"local": {"filename": wasm.display().to_string()}}))
}

const PHASES: [&str; 4] = ["AUTHN", "AUTHZ", "STATS", "UNSPECIFIED_PHASE"];

/// The labels of the gateway's pods: what the rendered Gateway selects.
fn gateway_labels(out: &Path) -> Result<Value, String> {
    let gateways = documents(&out.join("istio"), &["gateway.yaml"])?;
    gateways
        .first()
        .map(|g| g["spec"]["selector"].clone())
        .ok_or_else(|| "gateway.yaml has no Gateway".into())
}

/// Whether a selector's labels are all on the gateway's pods (istiod applies the resource to
/// those pods only).
fn selects(labels: &Value, selector: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|wanted| wanted.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Rule 4: the WasmPlugins as extension configs, in chain order.
fn wasm_plugins(out: &Path, wasm: &Path) -> Result<Vec<(String, Value)>, String> {
    let labels = gateway_labels(out)?;
    let mut plugins = Vec::new();
    for plugin in documents(&out.join("istio"), &["wasmplugins.yaml"])? {
        let name = format!(
            "{}.{}",
            namespace(&plugin),
            text(&plugin["metadata"]["name"], "WasmPlugin metadata.name")?
        );
        let spec = &plugin["spec"];
        only(
            spec,
            &name,
            &[
                "selector",
                "url",
                "imagePullPolicy",
                "pluginName",
                "phase",
                "priority",
                "failStrategy",
                "type",
                "match",
                "pluginConfig",
            ],
        )?;
        if spec["type"] != "HTTP" {
            return Err(format!("{name}: only HTTP plugins are translated"));
        }
        if !selects(&labels, &spec["selector"]["matchLabels"]) {
            continue;
        }
        // A gateway's traffic is all CLIENT traffic (it originates every request upstream).
        let modes = spec["match"].as_array().cloned().unwrap_or_default();
        if !modes.is_empty()
            && !modes
                .iter()
                .any(|m| m["mode"] == "CLIENT" || m["mode"] == "CLIENT_AND_SERVER")
        {
            continue;
        }
        let phase = spec["phase"].as_str().unwrap_or("UNSPECIFIED_PHASE");
        let rank = PHASES
            .iter()
            .position(|p| *p == phase)
            .ok_or_else(|| format!("{name}: unknown phase {phase}"))?;
        let policy = match spec["failStrategy"].as_str().unwrap_or("FAIL_CLOSE") {
            "FAIL_CLOSE" => "FAIL_CLOSED",
            "FAIL_OPEN" => "FAIL_OPEN",
            other => return Err(format!("{name}: failStrategy {other} is not translated")),
        };
        let config = json!({
            "name": name,
            "root_id": text(&spec["pluginName"], &format!("{name}: pluginName"))?,
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                              "value": spec["pluginConfig"].to_string()},
            "failure_policy": policy,
            "vm_config": {
                "runtime": "envoy.wasm.runtime.v8",
                "code": local_module(None, wasm)?,
                "environment_variables": {"key_values": {
                    "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "1"}},
            },
        });
        let priority = spec["priority"].as_i64().unwrap_or(0);
        plugins.push((
            rank,
            -priority,
            name.clone(),
            json!({"@type": WASM_TYPE, "config": config}),
        ));
    }
    plugins.sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
    Ok(plugins.into_iter().map(|(_, _, n, c)| (n, c)).collect())
}

/// Rule 5: the EnvoyFilter's patches, in chain order.
fn envoy_filter(out: &Path, wasm: &Path) -> Result<Vec<(String, Value)>, String> {
    let documents = documents(&out.join("istio"), &["envoyfilter.yaml"])?;
    let [filter] = documents.as_slice() else {
        return Err("envoyfilter.yaml must hold one EnvoyFilter".into());
    };
    only(
        &filter["spec"],
        "EnvoyFilter",
        &["workloadSelector", "configPatches"],
    )?;
    if !selects(
        &gateway_labels(out)?,
        &filter["spec"]["workloadSelector"]["labels"],
    ) {
        return Err("the EnvoyFilter does not select the gateway's pods".into());
    }
    let mut extensions: BTreeMap<String, Value> = BTreeMap::new();
    let mut chain: Vec<String> = vec![ROUTER.to_owned()];
    for (i, patch) in filter["spec"]["configPatches"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("EnvoyFilter configPatches[{i}]");
        only(patch, &at, &["applyTo", "match", "patch"])?;
        let value = &patch["patch"]["value"];
        let operation = patch["patch"]["operation"].as_str().unwrap_or_default();
        let name = text(&value["name"], &format!("{at}.patch.value.name"))?.to_owned();
        match (patch["applyTo"].as_str(), operation) {
            (Some("EXTENSION_CONFIG"), "ADD") => {
                let mut typed = value["typed_config"].clone();
                if typed["@type"] != WASM_TYPE {
                    return Err(format!("{at}: not a Wasm filter"));
                }
                let code = typed["config"]["vm_config"]["code"].clone();
                typed["config"]["vm_config"]["code"] =
                    local_module(code["remote"]["sha256"].as_str(), wasm)?;
                extensions.insert(name, typed);
            }
            (Some("HTTP_FILTER"), operation) => {
                if patch["match"]["context"] != "GATEWAY"
                    || patch["match"]["listener"]["filterChain"]["filter"]["name"] != HCM
                {
                    return Err(format!("{at}: does not match the gateway's HTTP listeners"));
                }
                if value.get("config_discovery").is_none() {
                    return Err(format!("{at}: an HTTP filter without config_discovery"));
                }
                match operation {
                    "INSERT_FIRST" => chain.insert(0, name),
                    "INSERT_BEFORE" => {
                        let before = patch["match"]["listener"]["filterChain"]["filter"]
                            ["subFilter"]["name"]
                            .as_str()
                            .ok_or_else(|| format!("{at}: INSERT_BEFORE without subFilter"))?;
                        let index = chain
                            .iter()
                            .position(|f| f == before)
                            .ok_or_else(|| format!("{at}: no filter {before} to insert before"))?;
                        chain.insert(index, name);
                    }
                    other => return Err(format!("{at}: operation {other} is not translated")),
                }
            }
            (apply, operation) => {
                return Err(format!("{at}: {apply:?} {operation} is not translated"));
            }
        }
    }
    chain
        .into_iter()
        .filter(|f| f != ROUTER)
        .map(|name| {
            let config = extensions
                .remove(&name)
                .ok_or_else(|| format!("HTTP filter {name} has no EXTENSION_CONFIG"))?;
            Ok((name, config))
        })
        .collect()
}

fn translate(
    out: &Path,
    form: Form,
    pods: &Pods,
    wasm: &Path,
    domain: &str,
) -> Result<Translation, String> {
    let (port, routes) = routes(out, domain)?;
    Ok(Translation {
        port,
        clusters: clusters(out, pods, domain)?,
        routes,
        filters: match form {
            Form::WasmPlugins => wasm_plugins(out, wasm)?,
            Form::EnvoyFilter => envoy_filter(out, wasm)?,
        },
    })
}

/// A real Envoy configured as an Istio ingress gateway for a rendering.
#[derive(Debug)]
pub struct IstioGateway {
    pub envoy: Envoy,
    dir: PathBuf,
    form: Form,
    pods: Pods,
    wasm: PathBuf,
    domain: String,
    /// The filters' names, in chain order (the listener holds them; a change needs a new
    /// listener, which this helper does not do).
    filters: Vec<String>,
}

impl IstioGateway {
    /// Translates the rendering in `out` and starts Envoy on it; `dir` holds the files.
    pub fn start(
        out: &Path,
        form: Form,
        pods: Pods,
        wasm: &Path,
        domain: &str,
        dir: &Path,
    ) -> Result<IstioGateway, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let translation = translate(out, form, &pods, wasm, domain)?;
        let source = |file: &str| {
            json!({"path_config_source": {"path": dir.join(file).display().to_string()},
                   "resource_api_version": "V3"})
        };
        let mut http_filters: Vec<Value> = translation
            .filters
            .iter()
            .map(|(name, _)| {
                json!({"name": name, "config_discovery": {
                    "config_source": source(&ecds_file(name)), "type_urls": [WASM_TYPE]}})
            })
            .collect();
        http_filters.push(json!({"name": ROUTER, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}));
        let port = translation.port;
        let bootstrap = json!({
            "node": {"id": "istio-ingressgateway", "cluster": "istio-ingressgateway.istio-system"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "dynamic_resources": {"cds_config": source("cds.json")},
            "static_resources": {"listeners": [{
                "name": format!("0.0.0.0_{port}"),
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{"name": HCM, "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": format!("outbound_0.0.0.0_{port}"),
                    "codec_type": "AUTO",
                    "use_remote_address": true,
                    "normalize_path": true,
                    "rds": {"route_config_name": format!("http.{port}"), "config_source": source("rds.json")},
                    "http_filters": http_filters,
                }}]}],
            }]},
        });
        let gateway_filters = translation.filters.iter().map(|(n, _)| n.clone()).collect();
        write_xds(dir, &translation)?;
        let path = dir.join("bootstrap.json");
        std::fs::write(&path, bootstrap.to_string())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let envoy = Envoy::start(&path, dir);
        Ok(IstioGateway {
            envoy,
            dir: dir.to_owned(),
            form,
            pods,
            wasm: wasm.to_owned(),
            domain: domain.to_owned(),
            filters: gateway_filters,
        })
    }

    /// The gateway's HTTP filters before Envoy's router, in chain order.
    pub fn filters(&self) -> &[String] {
        &self.filters
    }

    /// Applies a new rendering to the running gateway, as `kubectl apply` and istiod's push
    /// would: every xDS file replaced in one rename each.
    pub fn apply(&self, out: &Path) -> Result<(), String> {
        let translation = translate(out, self.form, &self.pods, &self.wasm, &self.domain)?;
        let names: Vec<String> = translation.filters.iter().map(|(n, _)| n.clone()).collect();
        if names != self.filters {
            return Err(format!(
                "the filters changed ({:?} to {names:?}): that needs a new listener, which this helper does not push",
                self.filters
            ));
        }
        write_xds(&self.dir, &translation)
    }
}

fn ecds_file(name: &str) -> String {
    format!("{name}.ecds.json")
}

/// Writes the xDS files (CDS first, so that routes never name a cluster not yet there).
fn write_xds(dir: &Path, translation: &Translation) -> Result<(), String> {
    let write = |file: String, value: Value| {
        meshserve_mesh::render::write_atomically(&dir.join(&file), &value)
            .map_err(|e| format!("{file}: {e}"))
    };
    write(
        "cds.json".into(),
        json!({"resources": translation.clusters}),
    )?;
    write(
        "rds.json".into(),
        json!({"resources": [translation.routes]}),
    )?;
    for (name, config) in &translation.filters {
        write(
            ecds_file(name),
            json!({"resources": [{"@type": EXTENSION_TYPE, "name": name, "typed_config": config}]}),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_protocols_follow_istio_selection() {
        assert!(http2(&json!({"name": "grpc", "appProtocol": "grpc"})));
        assert!(http2(&json!({"name": "grpc-inference"})));
        assert!(!http2(&json!({"name": "http", "appProtocol": "http"})));
        // appProtocol wins over the name.
        assert!(!http2(&json!({"name": "grpc", "appProtocol": "http"})));
        assert!(!http2(&json!({"name": "metrics"})));
    }
}
