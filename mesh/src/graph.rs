//! KServe InferenceGraphs (`serving.kserve.io/v1alpha1`), parsed and validated (the field at
//! fault named), and resolved against the InferenceServices beside them into the router
//! filter's graph configuration ([`meshserve_filter_core::graph`]). There is no router pod:
//! the pod fields KServe gives its router (`resources`, `affinity`, replicas, ...) are read
//! and have nothing to apply to.

use std::collections::BTreeMap;

use meshserve_filter_core::graph::{DEFAULT_TIMEOUT_MS, Graph};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::isvc::InferenceService;

/// The Envoy cluster that reaches the hop listener (an internal listener running the same
/// filters): a step that names an InferenceService goes there, and is routed like a direct
/// call.
pub use meshserve_filter_core::graph::HOP as HOP_CLUSTER;
/// The prefix of the clusters a step's `serviceUrl` outside the file gets
/// (`meshserve_graph_url.<host>:<port>`).
pub const URL_CLUSTER_PREFIX: &str = "meshserve_graph_url.";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Raw {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: RawMetadata,
    spec: RawSpec,
    #[serde(rename = "status")]
    _status: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct RawMetadata {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSpec {
    nodes: BTreeMap<String, RawRouter>,
    /// Seconds for the whole graph.
    timeout: Option<u64>,
    router_timeouts: Option<RawTimeouts>,
    // KServe's router pod: no pod here, read and not applied.
    #[serde(rename = "resources")]
    _resources: Option<Value>,
    #[serde(rename = "affinity")]
    _affinity: Option<Value>,
    #[serde(rename = "minReplicas")]
    _min_replicas: Option<Value>,
    #[serde(rename = "maxReplicas")]
    _max_replicas: Option<Value>,
    #[serde(rename = "scaleTarget")]
    _scale_target: Option<Value>,
    #[serde(rename = "scaleMetric")]
    _scale_metric: Option<Value>,
    #[serde(rename = "tolerations")]
    _tolerations: Option<Value>,
    #[serde(rename = "nodeSelector")]
    _node_selector: Option<Value>,
    #[serde(rename = "nodeName")]
    _node_name: Option<Value>,
    #[serde(rename = "serviceAccountName")]
    _service_account_name: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTimeouts {
    service_client: Option<u64>,
    #[serde(rename = "serverRead")]
    _server_read: Option<u64>,
    #[serde(rename = "serverWrite")]
    _server_write: Option<u64>,
    #[serde(rename = "serverIdle")]
    _server_idle: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRouter {
    router_type: String,
    #[serde(default)]
    steps: Vec<RawStep>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawStep {
    name: Option<String>,
    node_name: Option<String>,
    service_name: Option<String>,
    service_url: Option<String>,
    data: Option<String>,
    #[serde(default)]
    map_predictions_to_instances: bool,
    weight: Option<i64>,
    condition: Option<String>,
    dependency: Option<String>,
}

/// Where a step goes, as the file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Node(String),
    Service(String),
    /// `http://host[:port]/path`.
    Url {
        host: String,
        port: u16,
        path: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub target: Target,
    /// `$response` (else `$request`).
    pub response: bool,
    pub map_predictions_to_instances: bool,
    pub weight: Option<u32>,
    pub condition: String,
    pub hard: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub router_type: String,
    pub steps: Vec<Step>,
}

/// A validated InferenceGraph; `nodes` has `root` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceGraph {
    pub name: String,
    pub namespace: String,
    pub nodes: Vec<Node>,
    pub timeout_ms: u64,
    pub step_timeout_ms: Option<u64>,
}

/// Whether a YAML document is an InferenceGraph (by its `kind`).
pub fn is_graph(yaml: &str) -> bool {
    serde_yaml::from_str::<Value>(yaml)
        .ok()
        .and_then(|v| {
            v.get("kind")
                .and_then(Value::as_str)
                .map(|k| k == "InferenceGraph")
        })
        .unwrap_or(false)
}

fn fail<T>(path: &str, message: impl Into<String>) -> Result<T, String> {
    Err(format!("{path}: {}", message.into()))
}

impl InferenceGraph {
    /// Parses the YAML of one InferenceGraph.
    pub fn parse(yaml: &str) -> Result<InferenceGraph, String> {
        let raw: Raw = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        if let Some(api) = &raw.api_version
            && !api.starts_with("serving.kserve.io/")
        {
            return fail(
                "apiVersion",
                format!("'{api}' is not serving.kserve.io/v1alpha1"),
            );
        }
        if raw.kind.as_deref() != Some("InferenceGraph") {
            return fail("kind", "must be InferenceGraph");
        }
        let name = raw.metadata.name.unwrap_or_default();
        let dns = name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && !name.ends_with('-')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !dns {
            return fail(
                "metadata.name",
                format!(
                    "'{name}' must be lower-case letters, digits and '-', starting with a letter"
                ),
            );
        }
        let mut nodes = Vec::new();
        let mut raw_nodes = raw.spec.nodes;
        let Some(root) = raw_nodes.remove("root") else {
            return fail(
                "spec.nodes",
                "a node named 'root' is needed: the graph starts there",
            );
        };
        for (node_name, router) in std::iter::once(("root".to_owned(), root)).chain(raw_nodes) {
            let at = format!("spec.nodes.{node_name}");
            let kinds = ["Sequence", "Switch", "Ensemble", "Splitter"];
            if !kinds.contains(&router.router_type.as_str()) {
                return fail(
                    &format!("{at}.routerType"),
                    format!(
                        "'{}' is not one of {}",
                        router.router_type,
                        kinds.join(", ")
                    ),
                );
            }
            let mut steps = Vec::new();
            for (i, step) in router.steps.into_iter().enumerate() {
                steps.push(parse_step(&format!("{at}.steps[{i}]"), step)?);
            }
            nodes.push(Node {
                name: node_name,
                router_type: router.router_type,
                steps,
            });
        }
        let step_timeout_ms = raw
            .spec
            .router_timeouts
            .and_then(|t| t.service_client)
            .map(|s| s.saturating_mul(1000));
        let graph = InferenceGraph {
            name,
            namespace: raw.metadata.namespace.unwrap_or_else(|| "default".into()),
            nodes,
            timeout_ms: raw
                .spec
                .timeout
                .map_or(DEFAULT_TIMEOUT_MS, |s| s.saturating_mul(1000)),
            step_timeout_ms,
        };
        // The filter's own checks (weights, cycles, conditions), with this file's paths.
        let mut checked: Graph = serde_json::from_value(graph.config(&|name| {
            Ok(json!({"cluster": HOP_CLUSTER, "authority": format!("{name}.check"), "path": "/"}))
        })?)
        .map_err(|e| e.to_string())?;
        checked.validate("spec")?;
        Ok(graph)
    }

    /// The names of the InferenceServices the graph's steps call.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .flat_map(|n| &n.steps)
            .filter_map(|s| match &s.target {
                Target::Service(name) => Some(name.as_str()),
                _ => None,
            })
    }

    /// The router filter's configuration of this graph. `call` gives a service step's
    /// `{cluster, authority, path}`.
    fn config(&self, call: &dyn Fn(&str) -> Result<Value, String>) -> Result<Value, String> {
        let mut nodes = Vec::new();
        for node in &self.nodes {
            let mut steps = Vec::new();
            for (i, step) in node.steps.iter().enumerate() {
                let at = format!(
                    "InferenceGraph {}: spec.nodes.{}.steps[{i}]",
                    self.name, node.name
                );
                let mut s = json!({
                    "name": step.name,
                    "data": if step.response { "response" } else { "request" },
                    "condition": step.condition,
                    "dependency": if step.hard { "hard" } else { "soft" },
                    "map_predictions_to_instances": step.map_predictions_to_instances,
                });
                let target = match &step.target {
                    Target::Node(name) => ("node", json!(name)),
                    Target::Service(name) => (
                        "call",
                        call(name).map_err(|e| format!("{at}.serviceName: {e}"))?,
                    ),
                    Target::Url { host, port, path } => (
                        "call",
                        json!({"cluster": format!("{URL_CLUSTER_PREFIX}{host}:{port}"),
                               "authority": host, "path": path}),
                    ),
                };
                if let Some(map) = s.as_object_mut() {
                    map.insert(target.0.into(), target.1);
                    if let Some(weight) = step.weight {
                        map.insert("weight".into(), json!(weight));
                    }
                }
                steps.push(s);
            }
            nodes.push(json!({"name": node.name, "router_type": node.router_type, "steps": steps}));
        }
        let mut graph = json!({
            "name": self.name, "namespace": self.namespace, "nodes": nodes, "timeout_ms": self.timeout_ms,
        });
        if let (Some(ms), Some(map)) = (self.step_timeout_ms, graph.as_object_mut()) {
            map.insert("step_timeout_ms".into(), json!(ms));
        }
        Ok(graph)
    }

    /// The graph's filter configuration, its service steps resolved against `served` (each
    /// InferenceService with the model names it serves). A step's `serviceUrl` whose host is
    /// an InferenceService of the file (`<isvc>.<namespace>[.<domain>]`) goes through the hop
    /// listener too.
    pub fn resolve(&self, served: &[(&InferenceService, Vec<String>)]) -> Result<Value, String> {
        let call = |name: &str| {
            let Some((isvc, models)) = served
                .iter()
                .find(|(s, _)| s.name == name && s.namespace == self.namespace)
            else {
                let known: Vec<&str> = served.iter().map(|(s, _)| s.name.as_str()).collect();
                return Err(format!(
                    "no InferenceService '{name}' in namespace '{}' among this file's ({})",
                    self.namespace,
                    known.join(", ")
                ));
            };
            // KServe calls the predictor's model by the InferenceService's name.
            let model = if models.iter().any(|m| m == name) {
                name.to_owned()
            } else {
                match models.as_slice() {
                    [only] => only.clone(),
                    _ => {
                        return Err(format!(
                            "InferenceService '{name}' serves several models ({}): call one by serviceUrl (http://{name}.{}/v1/models/<model>:predict)",
                            models.join(", "),
                            isvc.namespace
                        ));
                    }
                }
            };
            let path = if isvc.default.v2 {
                format!("/v2/models/{model}/infer")
            } else {
                format!("/v1/models/{model}:predict")
            };
            Ok(
                json!({"cluster": HOP_CLUSTER, "authority": format!("{name}.{}", isvc.namespace), "path": path}),
            )
        };
        let mut config = self.config(&call)?;
        // A URL that names a service of the file goes through the hop listener.
        if let Some(nodes) = config.get_mut("nodes").and_then(Value::as_array_mut) {
            for step in nodes
                .iter_mut()
                .filter_map(|n| n.get_mut("steps")?.as_array_mut())
                .flatten()
            {
                let Some(call) = step.get_mut("call") else {
                    continue;
                };
                let authority = call
                    .get("authority")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let mut labels = authority.split('.');
                let (first, namespace) = (labels.next().unwrap_or_default(), labels.next());
                let internal = served
                    .iter()
                    .any(|(s, _)| s.name == first && Some(s.namespace.as_str()) == namespace);
                if internal {
                    call["cluster"] = json!(HOP_CLUSTER);
                }
            }
        }
        Ok(config)
    }
}

fn parse_step(at: &str, raw: RawStep) -> Result<Step, String> {
    let targets = [&raw.node_name, &raw.service_name, &raw.service_url]
        .iter()
        .filter(|t| t.as_ref().is_some_and(|t| !t.is_empty()))
        .count();
    if targets != 1 {
        return fail(
            at,
            "give exactly one of nodeName, serviceName and serviceUrl",
        );
    }
    let target = match (raw.node_name, raw.service_name, raw.service_url) {
        (Some(node), _, _) if !node.is_empty() => Target::Node(node),
        (_, Some(service), _) if !service.is_empty() => Target::Service(service),
        (_, _, Some(url)) => parse_url(&format!("{at}.serviceUrl"), &url)?,
        _ => {
            return fail(
                at,
                "give exactly one of nodeName, serviceName and serviceUrl",
            );
        }
    };
    let response = match raw.data.as_deref() {
        None | Some("" | "$request") => false,
        Some("$response") => true,
        Some(other) => {
            return fail(
                &format!("{at}.data"),
                format!("'{other}' is not $request or $response"),
            );
        }
    };
    let hard = match raw.dependency.as_deref() {
        None | Some("" | "Soft") => false,
        Some("Hard") => true,
        Some(other) => {
            return fail(
                &format!("{at}.dependency"),
                format!("'{other}' is not Soft or Hard"),
            );
        }
    };
    let weight = match raw.weight {
        None => None,
        Some(w @ 0..=100) => Some(w as u32),
        Some(w) => {
            return fail(
                &format!("{at}.weight"),
                format!("{w} is not between 0 and 100"),
            );
        }
    };
    Ok(Step {
        name: raw.name.unwrap_or_default(),
        target,
        response,
        map_predictions_to_instances: raw.map_predictions_to_instances,
        weight,
        condition: raw.condition.unwrap_or_default(),
        hard,
    })
}

fn parse_url(at: &str, url: &str) -> Result<Target, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return fail(
            at,
            format!(
                "'{url}': give an http:// URL (TLS to a step is the mesh's job, as KServe's router leaves it to Istio)"
            ),
        );
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("{at}: '{port}' is not a port"))?,
        ),
        None => (authority, 80),
    };
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !valid {
        return fail(at, format!("'{url}' has no host name meshserve can call"));
    }
    Ok(Target::Url {
        host: host.to_owned(),
        port,
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEQUENCE: &str = "apiVersion: serving.kserve.io/v1alpha1\nkind: InferenceGraph\nmetadata:\n  name: model-chainer\nspec:\n  nodes:\n    root:\n      routerType: Sequence\n      steps:\n        - serviceName: sklearn-iris\n        - serviceName: xgboost-iris\n          data: $request\n";

    #[test]
    fn kserve_samples_parse() {
        let graph = InferenceGraph::parse(SEQUENCE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(graph.nodes[0].steps.len(), 2);
        assert_eq!(
            graph.services().collect::<Vec<_>>(),
            ["sklearn-iris", "xgboost-iris"]
        );
        assert_eq!(graph.timeout_ms, DEFAULT_TIMEOUT_MS);
        let switch = "kind: InferenceGraph\nmetadata:\n  name: model-switch\nspec:\n  nodes:\n    root:\n      routerType: Switch\n      steps:\n      - serviceUrl: http://single-1.default.example.com/switch\n        condition: \"[@this].#(source==client)\"\n";
        let graph = InferenceGraph::parse(switch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            graph.nodes[0].steps[0].target,
            Target::Url {
                host: "single-1.default.example.com".into(),
                port: 80,
                path: "/switch".into()
            }
        );
    }

    #[test]
    fn bad_graphs_name_the_field() {
        let cases = [
            (
                SEQUENCE.replace("root:", "first:"),
                "spec.nodes: a node named 'root'",
            ),
            (
                SEQUENCE.replace("Sequence", "Loop"),
                "spec.nodes.root.routerType: 'Loop'",
            ),
            (
                SEQUENCE.replace("data: $request", "data: $everything"),
                "spec.nodes.root.steps[1].data",
            ),
            (
                SEQUENCE.replace(
                    "- serviceName: sklearn-iris",
                    "- serviceName: a\n          nodeName: root",
                ),
                "steps[0]: give exactly one",
            ),
            (
                SEQUENCE.replace("- serviceName: sklearn-iris", "- nodeName: root"),
                "cycle (root -> root)",
            ),
            (
                SEQUENCE.replace("serviceName: sklearn-iris", "serviceUrl: https://x/"),
                "give an http:// URL",
            ),
            (SEQUENCE.replace("model-chainer", "Model"), "metadata.name"),
            (
                SEQUENCE.replace("routerType: Sequence", "routerType: Splitter"),
                "needs a weight",
            ),
            (
                SEQUENCE.replace("data: $request", "weights: 3"),
                "unknown field `weights`",
            ),
        ];
        for (yaml, needle) in cases {
            match InferenceGraph::parse(&yaml) {
                Err(e) => assert!(e.contains(needle), "wanted {needle:?} in {e}"),
                Ok(_) => panic!("accepted a graph that should fail with {needle:?}"),
            }
        }
    }
}
