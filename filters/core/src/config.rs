//! The filter configuration: JSON that `meshserve render` makes from InferenceServices and
//! that reaches the filters as plugin configuration (Envoy `configuration`, Istio
//! `pluginConfig`). Parsed into raw types that refuse unknown fields, then validated once;
//! only a validated [`Config`] reaches the route logic.
//!
//! ```json
//! {"services": [{
//!    "name": "digits", "namespace": "default", "models": ["mnist_cnn"],
//!    "predictor": {
//!      "default": {"name": "digits-predictor-00001", "cluster": "digits_default"},
//!      "canaries": [{"name": "digits-predictor-00002", "cluster": "digits_canary", "percent": 20}],
//!      "shadow": {"name": "digits-shadow", "cluster": "digits_shadow", "percent": 10}},
//!    "explainer": {"name": "digits-explainer", "cluster": "digits_explainer"},
//!    "sticky": {"header": "x-user"}}],
//!  "limits": {"grpc_peek_bytes": 4096},
//!  "hold_headers": true}
//! ```

use serde::Deserialize;

use crate::graph::Graph;
use crate::logger::LoggerConfig;
use crate::transform::Transformer;

/// A configuration that failed to parse or validate; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid meshserve filter configuration: {0}")]
pub struct ConfigError(pub String);

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    services: Vec<Service>,
    graphs: Vec<Graph>,
    limits: Limits,
    hold_headers: bool,
}

/// Named limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The most gRPC request bytes buffered to read the model name (default 4096).
    #[serde(default = "default_grpc_peek_bytes")]
    pub grpc_peek_bytes: usize,
    /// The most bytes of one graph step's answer the router keeps (default 4 MiB); a larger
    /// answer fails the step (502).
    #[serde(default = "default_graph_answer_bytes")]
    pub graph_answer_bytes: usize,
    /// Requests held at once for one revision that is waking from zero (default 256); past
    /// it, 503 at once (see [`crate::activator`]).
    #[serde(default = "default_held_per_revision")]
    pub held_per_revision: usize,
    /// Requests held at once for all revisions, per Envoy worker (default 1024).
    #[serde(default = "default_held_total")]
    pub held_total: usize,
    /// The longest a request is held for a waking revision, in ms (default 60 000, at most
    /// [`MAX_HOLD_MS`], below Envoy's stream idle timeout); then 503 with `Retry-After`.
    #[serde(default = "default_hold_ms")]
    pub hold_ms: u64,
}

/// Named limits of the activator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Requests held at once for one revision; past it, 503 at once.
    pub per_revision: usize,
    /// Requests held at once in all (one Envoy worker's VM); past it, 503 at once.
    pub total: usize,
    /// The longest a request is held (below Envoy's stream idle timeout, 300 s); then 503.
    pub hold_ms: u64,
    /// How often a warm revision's readiness is checked.
    pub probe_ms: u64,
    /// How often a waking revision's readiness is checked.
    pub wake_probe_ms: u64,
    /// How often the wake call is repeated while a revision is still waking.
    pub rewake_ms: u64,
}

impl Default for HoldLimits {
    fn default() -> Self {
        HoldLimits {
            per_revision: 256,
            total: 1024,
            hold_ms: 60_000,
            probe_ms: 500,
            wake_probe_ms: 20,
            rewake_ms: 1_000,
        }
    }
}

/// The longest hold a configuration may ask for: under Envoy's default stream idle timeout
/// (300 s), which would end a held stream first.
pub const MAX_HOLD_MS: u64 = 240_000;

fn default_held_per_revision() -> usize {
    HoldLimits::default().per_revision
}

fn default_held_total() -> usize {
    HoldLimits::default().total
}

fn default_hold_ms() -> u64 {
    HoldLimits::default().hold_ms
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            grpc_peek_bytes: default_grpc_peek_bytes(),
            graph_answer_bytes: default_graph_answer_bytes(),
            held_per_revision: default_held_per_revision(),
            held_total: default_held_total(),
            hold_ms: default_hold_ms(),
        }
    }
}

fn default_graph_answer_bytes() -> usize {
    4 << 20
}

fn default_grpc_peek_bytes() -> usize {
    4096
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The model names this service answers for; empty: the service's own name.
    #[serde(default)]
    pub models: Vec<String>,
    pub predictor: Predictor,
    /// An explainer of its own (a container someone else runs): `:explain` goes there.
    pub explainer: Option<Revision>,
    /// The predictor's sidecars explain their own model (`spec.explainer`'s built-in
    /// methods): `:explain` and `/v2/models/<model>-explainer/infer` go to the revision the
    /// request is routed to, canaries included.
    #[serde(default)]
    pub builtin_explainer: bool,
    pub sticky: Option<Sticky>,
    /// Pre- and post-processing run by the `transformer` filter (see [`crate::transform`]).
    pub transformer: Option<Transformer>,
    /// Whether clients of the public listener may call this service's control APIs (the
    /// model repository, statistics, ...: [`crate::protocol::is_control`]); refused (403) by
    /// default.
    #[serde(default)]
    pub public_control_api: bool,
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// What a model's name gets to name its built-in explainer on the V2 protocol (MLServer's
/// habit: the explainer is a model of its own).
pub const EXPLAINER_SUFFIX: &str = "-explainer";

impl Service {
    /// Whether `model` names this service's built-in explainer (`<model>-explainer`).
    pub fn explains(&self, model: &str) -> bool {
        self.builtin_explainer
            && model
                .strip_suffix(EXPLAINER_SUFFIX)
                .is_some_and(|m| self.serves(m))
    }

    /// Whether this service serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        if self.models.is_empty() {
            self.name == model
        } else {
            self.models.iter().any(|m| m == model)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predictor {
    pub default: Revision,
    #[serde(default)]
    pub canaries: Vec<Canary>,
    pub shadow: Option<Canary>,
}

/// A revision and the Envoy clusters that reach it: `cluster` for REST, `grpc_cluster` (if
/// set) for gRPC requests.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revision {
    pub name: String,
    pub cluster: String,
    pub grpc_cluster: Option<String>,
    /// Payload logging; its events go to the sidecar behind `cluster`.
    #[serde(default)]
    pub logger: Option<LoggerConfig>,
    /// The revision may be at zero replicas: the router holds its requests while it wakes.
    #[serde(default)]
    pub scale_to_zero: Option<ScaleToZero>,
}

/// How a revision at zero is woken (see [`crate::activator`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleToZero {
    /// A call that starts the revision (a POST to `path` on Envoy's cluster `cluster`); none:
    /// something else starts it (an autoscaler reading the held-requests gauge).
    pub wake: Option<WakeCall>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WakeCall {
    pub cluster: String,
    pub path: String,
}

/// A revision with a share of traffic, in whole percent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    pub name: String,
    pub cluster: String,
    pub grpc_cluster: Option<String>,
    pub percent: i64,
    #[serde(default)]
    pub logger: Option<LoggerConfig>,
    #[serde(default)]
    pub scale_to_zero: Option<ScaleToZero>,
}

impl Canary {
    pub fn revision(&self) -> Revision {
        Revision {
            name: self.name.clone(),
            cluster: self.cluster.clone(),
            grpc_cluster: self.grpc_cluster.clone(),
            logger: self.logger.clone(),
            scale_to_zero: self.scale_to_zero.clone(),
        }
    }
}

impl Revision {
    /// The cluster for a request of this protocol.
    pub fn cluster_for(&self, grpc: bool) -> &str {
        match (&self.grpc_cluster, grpc) {
            (Some(c), true) => c,
            _ => &self.cluster,
        }
    }
}

/// Where the sticky-session key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Sticky {
    Header(String),
    Cookie(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    services: Vec<Service>,
    /// InferenceGraphs over the services (see [`crate::graph`]).
    #[serde(default)]
    graphs: Vec<Graph>,
    #[serde(default)]
    limits: Limits,
    #[serde(default = "yes")]
    hold_headers: bool,
}

fn yes() -> bool {
    true
}

impl Config {
    /// Parses and validates plugin configuration bytes.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError(e.to_string()))?;
        let mut graphs = raw.graphs;
        for (i, graph) in graphs.iter_mut().enumerate() {
            graph
                .validate(&format!("graphs[{i}]"))
                .map_err(ConfigError)?;
        }
        let config = Config {
            services: raw.services,
            graphs,
            limits: raw.limits,
            hold_headers: raw.hold_headers,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    pub fn graphs(&self) -> &[Graph] {
        &self.graphs
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether the filters may hold a stream's headers while they read its body (`true`
    /// unless the configuration says `"hold_headers": false`). That needs Envoy's
    /// `allow_on_headers_stop_iteration`, which meshserve's own Envoy configurations and the
    /// EnvoyFilter form set and Istio's WasmPlugin cannot; without it a held stream would
    /// never get its body. Where it is off, a gRPC request is routed by its host (or to the
    /// only InferenceService), not by the model name in its message, and the transformer
    /// sends the rewritten headers before the rewritten body (JSON to the model, not the
    /// binary tensor extension).
    pub fn hold_headers(&self) -> bool {
        self.hold_headers
    }

    /// The activator's limits.
    pub fn hold_limits(&self) -> HoldLimits {
        HoldLimits {
            per_revision: self.limits.held_per_revision,
            total: self.limits.held_total,
            hold_ms: self.limits.hold_ms,
            ..Default::default()
        }
    }

    /// Every revision that may be at zero: its name, its REST cluster (where readiness is
    /// asked) and how it is woken.
    pub fn scale_to_zero(&self) -> Vec<(Revision, ScaleToZero)> {
        self.services
            .iter()
            .flat_map(|s| {
                std::iter::once(s.predictor.default.clone())
                    .chain(s.predictor.canaries.iter().map(Canary::revision))
            })
            .filter_map(|r| {
                let scale = r.scale_to_zero.clone()?;
                Some((r, scale))
            })
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |path: String, message: String| Err(ConfigError(format!("{path}: {message}")));
        if self.services.is_empty() {
            return fail(
                "services".into(),
                "at least one InferenceService is needed".into(),
            );
        }
        if !(1..=MAX_HOLD_MS).contains(&self.limits.hold_ms) {
            return fail(
                "limits.hold_ms".into(),
                format!("must be from 1 to {MAX_HOLD_MS} (Envoy's stream idle timeout is 300 s)"),
            );
        }
        if self.limits.held_per_revision == 0 || self.limits.held_total == 0 {
            return fail(
                "limits.held_per_revision, limits.held_total".into(),
                "must be at least 1".into(),
            );
        }
        if self.limits.grpc_peek_bytes < 16 {
            return fail(
                "limits.grpc_peek_bytes".into(),
                "must be at least 16".into(),
            );
        }
        for (i, graph) in self.graphs.iter().enumerate() {
            let twice = self
                .graphs
                .iter()
                .take(i)
                .any(|g| g.name == graph.name && g.namespace == graph.namespace);
            let service = self
                .services
                .iter()
                .any(|s| s.name == graph.name && s.namespace == graph.namespace);
            if twice || service {
                return fail(
                    format!("graphs[{i}]"),
                    format!(
                        "the name '{}' is taken by another graph or InferenceService of its namespace (they share a host)",
                        graph.name
                    ),
                );
            }
        }
        for (i, service) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            if service.name.is_empty() || service.namespace.is_empty() {
                return fail(at, "name and namespace must not be empty".into());
            }
            if let Some((j, _)) = self
                .services
                .iter()
                .enumerate()
                .take(i)
                .find(|(_, s)| s.name == service.name && s.namespace == service.namespace)
            {
                return fail(
                    at,
                    format!(
                        "InferenceService '{}' is defined twice (also services[{j}])",
                        service.name
                    ),
                );
            }
            for model in self.model_names(service) {
                if let Some(other) = self.services.iter().take(i).find(|s| s.serves(model)) {
                    return fail(
                        format!("{at}.models"),
                        format!(
                            "model '{model}' is also served by InferenceService '{}'",
                            other.name
                        ),
                    );
                }
            }
            let predictor = &service.predictor;
            let mut names: Vec<&str> = vec![&predictor.default.name];
            check_revision(&format!("{at}.predictor.default"), &predictor.default)?;
            let mut total = 0i64;
            for (c, canary) in predictor.canaries.iter().enumerate() {
                let path = format!("{at}.predictor.canaries[{c}]");
                check_revision(&path, &canary.revision())?;
                check_percent(&path, canary.percent)?;
                if names.contains(&canary.name.as_str()) {
                    return fail(
                        path,
                        format!("revision name '{}' is used twice", canary.name),
                    );
                }
                names.push(&canary.name);
                total += canary.percent;
            }
            if total > 100 {
                return fail(
                    format!("{at}.predictor.canaries"),
                    format!("canary percents add up to {total}, over 100"),
                );
            }
            if let Some(shadow) = &predictor.shadow {
                let path = format!("{at}.predictor.shadow");
                check_revision(&path, &shadow.revision())?;
                check_percent(&path, shadow.percent)?;
                if names.contains(&shadow.name.as_str()) {
                    return fail(
                        path,
                        format!("revision name '{}' is used twice", shadow.name),
                    );
                }
            }
            if let Some(explainer) = &service.explainer {
                check_revision(&format!("{at}.explainer"), explainer)?;
                if service.builtin_explainer {
                    return fail(
                        format!("{at}.explainer"),
                        "give an explainer revision or builtin_explainer, not both".into(),
                    );
                }
            }
            if let Some(Sticky::Header(key) | Sticky::Cookie(key)) = &service.sticky
                && key.is_empty()
            {
                return fail(
                    format!("{at}.sticky"),
                    "the header or cookie name must not be empty".into(),
                );
            }
        }
        Ok(())
    }

    /// The logger of `isvc`'s revision `revision` and the cluster its events go to.
    pub fn logger(
        &self,
        isvc: &str,
        namespace: &str,
        revision: &str,
    ) -> Option<(&LoggerConfig, &str)> {
        let service = self
            .services
            .iter()
            .find(|s| s.name == isvc && s.namespace == namespace)?;
        let predictor = &service.predictor;
        if predictor.default.name == revision {
            return Some((
                predictor.default.logger.as_ref()?,
                &predictor.default.cluster,
            ));
        }
        predictor
            .canaries
            .iter()
            .chain(predictor.shadow.as_ref())
            .find(|c| c.name == revision)
            .and_then(|c| Some((c.logger.as_ref()?, c.cluster.as_str())))
    }

    fn model_names<'a>(&self, service: &'a Service) -> Vec<&'a str> {
        if service.models.is_empty() {
            vec![service.name.as_str()]
        } else {
            service.models.iter().map(String::as_str).collect()
        }
    }
}

fn check_revision(path: &str, revision: &Revision) -> Result<(), ConfigError> {
    if let Some(logger) = &revision.logger {
        logger
            .check(&format!("{path}.logger"))
            .map_err(ConfigError)?;
    }
    if revision.name.is_empty()
        || revision.cluster.is_empty()
        || revision.grpc_cluster.as_ref().is_some_and(String::is_empty)
    {
        return Err(ConfigError(format!(
            "{path}: name and cluster must not be empty"
        )));
    }
    Ok(())
}

fn check_percent(path: &str, percent: i64) -> Result<(), ConfigError> {
    if !(0..=100).contains(&percent) {
        return Err(ConfigError(format!(
            "{path}.percent: {percent} is not between 0 and 100"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    pub(crate) fn sample() -> Value {
        json!({"services": [{
            "name": "digits", "namespace": "default", "models": ["mnist_cnn"],
            "predictor": {
                "default": {"name": "digits-v1", "cluster": "digits_default"},
                "canaries": [{"name": "digits-v2", "cluster": "digits_canary", "percent": 20}],
                "shadow": {"name": "digits-v3", "cluster": "digits_shadow", "percent": 10}},
            "explainer": {"name": "digits-explainer", "cluster": "digits_explainer"},
            "sticky": {"header": "x-user"}}]})
    }

    fn with(mutate: impl FnOnce(&mut Value)) -> Result<Config, ConfigError> {
        let mut v = sample();
        mutate(&mut v);
        Config::parse(v.to_string().as_bytes())
    }

    #[test]
    fn a_good_configuration_parses() {
        let config = with(|_| {}).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.services().len(), 1);
        assert_eq!(config.limits().grpc_peek_bytes, 4096);
    }

    /// A change that spoils the sample configuration.
    type Mutation = Box<dyn FnOnce(&mut Value)>;

    #[test]
    fn bad_configurations_name_the_field() {
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|v| v["services"][0]["predictor"]["canaries"][0]["percent"] = json!(101)),
                "canaries[0].percent: 101 is not between 0 and 100",
            ),
            (
                Box::new(|v| v["services"][0]["predictor"]["canaries"][0]["percent"] = json!(-5)),
                "-5 is not between 0 and 100",
            ),
            (
                Box::new(|v| {
                    v["services"][0]["predictor"]["canaries"] = json!([
                        {"name": "a", "cluster": "a", "percent": 60}, {"name": "b", "cluster": "b", "percent": 50}])
                }),
                "add up to 110, over 100",
            ),
            (
                Box::new(|v| {
                    v["services"][0]["predictor"]["canaries"][0]["name"] = json!("digits-v1")
                }),
                "used twice",
            ),
            (
                Box::new(|v| v["services"][0]["predictor"]["default"]["cluster"] = json!("")),
                "predictor.default: name and cluster",
            ),
            (
                Box::new(|v| v["services"][0]["weights"] = json!(1)),
                "unknown field `weights`",
            ),
            (Box::new(|v| v["services"] = json!([])), "at least one"),
            (
                Box::new(|v| v["limits"] = json!({"grpc_peek_bytes": 2})),
                "at least 16",
            ),
            (
                Box::new(|v| v["services"][0]["sticky"] = json!({"query": "u"})),
                "unknown variant",
            ),
            (
                Box::new(|v| {
                    let mut other = v["services"][0].clone();
                    other["name"] = json!("other");
                    if let Some(services) = v["services"].as_array_mut() {
                        services.push(other);
                    }
                }),
                "model 'mnist_cnn' is also served by InferenceService 'digits'",
            ),
        ];
        for (mutate, needle) in cases {
            match with(mutate) {
                Err(e) => assert!(e.to_string().contains(needle), "wanted {needle:?} in {e}"),
                Ok(_) => panic!("accepted a configuration that should fail with {needle:?}"),
            }
        }
        assert!(Config::parse(b"{not json").is_err());
        assert!(Config::parse(b"").is_err());
    }
}
