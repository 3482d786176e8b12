//! The routing decision: which InferenceService, component and revision serve a request, or
//! the reply the filter gives by itself. Deterministic given its inputs: the shell passes a
//! random draw per request, and the same inputs always give the same decision.

use crate::config::{Config, EXPLAINER_SUFFIX, Revision, Service, Sticky};
use crate::grpc::{Peek, peek_model};
use crate::protocol::{GrpcMethod, Protocol, V1Verb, is_control, parse};
use crate::transform::{Transformer, Wire};

/// Request header that pins a revision: `default`, `canary` or a revision's name.
pub const REVISION_HEADER: &str = "x-meshserve-revision";
/// Headers the filter sets for the route and the upstream.
pub const ISVC_HEADER: &str = "x-meshserve-isvc";
pub const NAMESPACE_HEADER: &str = "x-meshserve-namespace";
pub const COMPONENT_HEADER: &str = "x-meshserve-component";
/// The Envoy cluster the route sends to (`cluster_header` in the route).
pub const CLUSTER_HEADER: &str = "x-meshserve-cluster";

/// What the shell knows about a request.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub path: &'a str,
    /// `:authority` / Host.
    pub authority: Option<&'a str>,
    /// Looks a request header up by lower-case name.
    pub header: &'a dyn Fn(&str) -> Option<String>,
    /// The gRPC body bytes seen so far (empty until the shell has buffered some).
    pub body: &'a [u8],
    /// Whether `body` is the whole body.
    pub end_of_body: bool,
    /// A uniformly random number, fresh per request.
    pub draw: u64,
    /// Another one, for the shadow choice.
    pub shadow_draw: u64,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("path", &self.path)
            .field("authority", &self.authority)
            .field("body_bytes", &self.body.len())
            .field("end_of_body", &self.end_of_body)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Predictor,
    Explainer,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Predictor => "predictor",
            Component::Explainer => "explainer",
        }
    }
}

/// Why a revision was chosen (for stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The weighted split.
    Split,
    /// The sticky key's hash.
    Sticky,
    /// `x-meshserve-revision` or a `latest-` / `prev-` host.
    Pinned,
    /// The component has one revision.
    Only,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub isvc: String,
    pub namespace: String,
    pub component: Component,
    pub revision: String,
    pub cluster: String,
    /// Whether the revision is a canary (not the default).
    pub canary: bool,
    pub choice: Choice,
    /// A shadow revision that also gets a copy of this request: (revision, cluster).
    pub shadow: Option<(String, String)>,
}

impl Route {
    /// The request headers to set: the route picks the cluster from them.
    pub fn headers(&self) -> [(&'static str, &str); 5] {
        [
            (ISVC_HEADER, &self.isvc),
            (NAMESPACE_HEADER, &self.namespace),
            (COMPONENT_HEADER, self.component.as_str()),
            (REVISION_HEADER, &self.revision),
            (CLUSTER_HEADER, &self.cluster),
        ]
    }
}

/// A reply the filter sends itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status (for gRPC: what the status would be over REST; the shell answers gRPC with
    /// HTTP 200 and `grpc-status`).
    pub status: u16,
    pub message: String,
    pub grpc: bool,
}

impl Reply {
    /// `{"error": "..."}`, the protocol's error shape.
    pub fn json_body(&self) -> String {
        serde_json::json!({"error": self.message}).to_string()
    }

    /// The message as a `grpc-message` header value: percent-encoded outside printable ASCII,
    /// as the gRPC protocol requires (model names may be any UTF-8).
    pub fn grpc_message(&self) -> String {
        let mut out = String::with_capacity(self.message.len());
        for byte in self.message.bytes() {
            if (0x20..=0x7e).contains(&byte) && byte != b'%' {
                out.push(char::from(byte));
            } else {
                out.push_str(&format!("%{byte:02X}"));
            }
        }
        out
    }

    /// The gRPC status code for this reply.
    pub fn grpc_status(&self) -> u32 {
        match self.status {
            400 => 3,
            401 => 16,
            403 => 7,
            404 => 5,
            413 => 8,
            503 => 14,
            _ => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Route to a revision.
    Route(Route),
    /// Answer without an upstream.
    Reply(Reply),
    /// A gRPC request whose model name is in the body: call again with more body.
    NeedBody,
    /// Not an inference request: leave it alone.
    PassThrough,
    /// A call to the graph at this index of the configuration's graphs: the shell buffers
    /// the body and runs it ([`crate::graph::Run`]).
    Graph(usize),
}

/// The path form of a graph's endpoint: `POST /v1/graphs/<name>`.
pub const GRAPH_PATH_PREFIX: &str = "/v1/graphs/";

/// The graph a request calls, if it calls one: `/v1/graphs/<name>` (meshserve's path form;
/// the host's namespace when it names one, else the first graph of that name), or `/` on
/// the graph's own host `<graph>.<namespace>.<domain>` (KServe's form). Only `POST` runs it.
fn graph_call(config: &Config, request: &Request<'_>) -> Option<Decision> {
    if config.graphs().is_empty() {
        return None;
    }
    let path = request.path.split(['?', '#']).next().unwrap_or_default();
    let host_labels = || {
        let host = request.authority?.split(':').next()?;
        let mut labels = host.split('.');
        Some((labels.next()?.to_owned(), labels.next()?.to_owned()))
    };
    let index = if let Some(name) = path.strip_prefix(GRAPH_PATH_PREFIX) {
        let name = name.trim_end_matches('/');
        let namespace = host_labels().map(|(_, ns)| ns);
        let found = config
            .graphs()
            .iter()
            .position(|g| g.name == name && namespace.as_ref().is_some_and(|ns| *ns == g.namespace))
            .or_else(|| config.graphs().iter().position(|g| g.name == name));
        match found {
            Some(index) => index,
            None => {
                return Some(Decision::Reply(Reply {
                    status: 404,
                    message: format!("unknown InferenceGraph '{name}'"),
                    grpc: false,
                }));
            }
        }
    } else if path == "/" {
        let (name, namespace) = host_labels()?;
        config
            .graphs()
            .iter()
            .position(|g| g.name == name && g.namespace == namespace)?
    } else {
        return None;
    };
    if (request.header)(":method").is_some_and(|m| m != "POST") {
        return Some(Decision::Reply(Reply {
            status: 405,
            message: "an InferenceGraph is called with POST".into(),
            grpc: false,
        }));
    }
    Some(Decision::Graph(index))
}

/// Decides a request.
pub fn decide(config: &Config, request: &Request<'_>) -> Decision {
    if let Some(decision) = graph_call(config, request) {
        return decision;
    }
    let protocol = parse(request.path);
    let grpc = matches!(protocol, Protocol::Grpc { .. });
    let reply = |status: u16, message: String| {
        Decision::Reply(Reply {
            status,
            message,
            grpc,
        })
    };
    // Control APIs are refused before anything else is looked at, unless a service opens
    // them; then that service's own setting decides, below.
    let control = is_control(request.path);
    if control && !config.services().iter().any(|s| s.public_control_api) {
        return reply(403, control_refusal(request.path));
    }
    let model = match &protocol {
        Protocol::Other => return Decision::PassThrough,
        Protocol::V1 { model, .. } | Protocol::V2 { model, .. } => model.clone(),
        Protocol::Grpc { method } => {
            let (field, fallback) = match method {
                GrpcMethod::ModelScoped(_) => (1, None),
                GrpcMethod::Repository(_) => (2, Some(1)),
                GrpcMethod::ServerScoped(_) => (0, None),
            };
            if field == 0 || host_route(config, request.authority).is_some() {
                // The host names the service: the model name can stay in the message, for
                // the predictor to read.
                None
            } else {
                match peek_model(request.body, field, fallback) {
                    Peek::Model(name) => Some(name),
                    Peek::NoModel => None,
                    Peek::NeedMore if request.end_of_body => {
                        return reply(400, "the gRPC request ended before its model name".into());
                    }
                    Peek::NeedMore if request.body.len() >= config.limits().grpc_peek_bytes => {
                        return reply(
                            400,
                            format!(
                                "no model name in the first {} bytes of the gRPC request",
                                config.limits().grpc_peek_bytes
                            ),
                        );
                    }
                    Peek::NeedMore if config.hold_headers() => return Decision::NeedBody,
                    // The headers cannot wait for the message here (Istio's WasmPlugin):
                    // the only service, or the host, must say where the call goes.
                    Peek::NeedMore if config.services().len() == 1 => None,
                    Peek::NeedMore => {
                        return reply(
                            400,
                            "this gateway routes gRPC by host, not by the model name in the message (Istio's WasmPlugin cannot hold a request's headers): set the authority to <inferenceservice>.<namespace>.<domain>, or install meshserve's EnvoyFilter form".into(),
                        );
                    }
                    Peek::Malformed(why) => {
                        return reply(400, format!("malformed gRPC request: {why}"));
                    }
                }
            }
        }
    };

    let host = host_route(config, request.authority);
    let service = match (&host, &model) {
        (Some((service, _)), _) => *service,
        (None, Some(model)) => match config
            .services()
            .iter()
            .find(|s| s.serves(model))
            .or_else(|| config.services().iter().find(|s| s.explains(model)))
        {
            Some(service) => service,
            None => return reply(404, format!("unknown model '{model}'")),
        },
        (None, None) => match config.services() {
            [only] => only,
            _ => {
                return reply(
                    404,
                    "this request names no model: set the Host to <inferenceservice>.<namespace>.<domain>".into(),
                );
            }
        },
    };
    if control && !service.public_control_api {
        return reply(403, control_refusal(request.path));
    }
    let explain = matches!(
        protocol,
        Protocol::V1 {
            verb: V1Verb::Explain,
            ..
        }
    );
    // MLServer's form: an inference request to the model `<model>-explainer`.
    let v2_explain = match (&protocol, &model) {
        (Protocol::V2 { model: Some(m), .. }, _) => !service.serves(m) && service.explains(m),
        (
            Protocol::Grpc {
                method: GrpcMethod::ModelScoped(method),
            },
            Some(m),
        ) if method == "ModelInfer" => !service.serves(m) && service.explains(m),
        _ => false,
    };
    let pin = (request.header)(REVISION_HEADER)
        .or_else(|| host.and_then(|(_, pin)| pin.map(str::to_owned)));
    if (explain || v2_explain) && service.builtin_explainer {
        // The sidecar that holds the model explains it: the request goes where a prediction
        // would, canaries and pins included, and is never shadowed.
        return match choose_revision(service, pin.as_deref(), request, grpc) {
            Ok(route) => Decision::Route(Route {
                component: Component::Explainer,
                shadow: None,
                ..route
            }),
            Err(message) => reply(400, message),
        };
    }
    if explain {
        return match &service.explainer {
            Some(explainer) => Decision::Route(Route {
                isvc: service.name.clone(),
                namespace: service.namespace.clone(),
                component: Component::Explainer,
                revision: explainer.name.clone(),
                cluster: explainer.cluster_for(grpc).to_owned(),
                canary: false,
                choice: Choice::Only,
                shadow: None,
            }),
            None => reply(
                404,
                format!("InferenceService '{}' has no explainer", service.name),
            ),
        };
    }
    match choose_revision(service, pin.as_deref(), request, grpc) {
        Ok(route) => Decision::Route(route),
        Err(message) => reply(400, message),
    }
}

/// Why a control API call is refused, for the client.
fn control_refusal(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    format!(
        "{path} is a control API: the mesh serves inference only (operators call the predictor's own port)"
    )
}

/// The service a KServe-style host names (`[latest-|prev-]<isvc>.<namespace>.<domain>`), and
/// the pin its prefix implies.
fn host_route<'c>(
    config: &'c Config,
    authority: Option<&str>,
) -> Option<(&'c Service, Option<&'static str>)> {
    let authority = authority?;
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    };
    let mut labels = host.split('.');
    let first = labels.next()?;
    let namespace = labels.next()?;
    let (name, pin) = match (first.strip_prefix("latest-"), first.strip_prefix("prev-")) {
        (Some(name), _) => (name, Some("latest")),
        (_, Some(name)) => (name, Some("prev")),
        _ => (first, None),
    };
    let exact = config
        .services()
        .iter()
        .find(|s| s.name == first && s.namespace == namespace);
    match exact {
        Some(service) => Some((service, None)),
        None => config
            .services()
            .iter()
            .find(|s| s.name == name && s.namespace == namespace)
            .map(|s| (s, pin)),
    }
}

/// The percentage point a request falls on, in [0, 100).
fn point(value: u64) -> i64 {
    (value % 100) as i64
}

/// FNV-1a: stable across processes and platforms, so a sticky key lands alike everywhere.
pub fn sticky_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn sticky_key(service: &Service, request: &Request<'_>) -> Option<String> {
    match service.sticky.as_ref()? {
        Sticky::Header(name) => {
            (request.header)(&name.to_ascii_lowercase()).filter(|v| !v.is_empty())
        }
        Sticky::Cookie(name) => {
            let cookies = (request.header)("cookie")?;
            cookies.split(';').find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name && !v.is_empty()).then(|| v.to_owned())
            })
        }
    }
}

fn choose_revision(
    service: &Service,
    pin: Option<&str>,
    request: &Request<'_>,
    grpc: bool,
) -> Result<Route, String> {
    let predictor = &service.predictor;
    let route = |revision: &Revision, canary: bool, choice: Choice| Route {
        isvc: service.name.clone(),
        namespace: service.namespace.clone(),
        component: Component::Predictor,
        revision: revision.name.clone(),
        cluster: revision.cluster_for(grpc).to_owned(),
        canary,
        choice,
        shadow: predictor
            .shadow
            .as_ref()
            .filter(|s| point(request.shadow_draw) < s.percent)
            .map(|s| (s.name.clone(), s.revision().cluster_for(grpc).to_owned())),
    };
    let default = &predictor.default;
    if let Some(pin) = pin {
        let latest = predictor.canaries.first();
        return match pin {
            "default" | "prev" => Ok(route(default, false, Choice::Pinned)),
            "canary" => latest
                .map(|c| route(&c.revision(), true, Choice::Pinned))
                .ok_or_else(|| format!("InferenceService '{}' has no canary revision", service.name)),
            "latest" => Ok(latest.map_or_else(
                || route(default, false, Choice::Pinned),
                |c| route(&c.revision(), true, Choice::Pinned),
            )),
            name if name == default.name => Ok(route(default, false, Choice::Pinned)),
            name => predictor
                .canaries
                .iter()
                .find(|c| c.name == name)
                .map(|c| route(&c.revision(), true, Choice::Pinned))
                .ok_or_else(|| {
                    let mut names = vec![default.name.as_str()];
                    names.extend(predictor.canaries.iter().map(|c| c.name.as_str()));
                    format!(
                        "unknown revision '{name}' for InferenceService '{}': use default, canary or one of {}",
                        service.name,
                        names.join(", ")
                    )
                }),
        };
    }
    if predictor.canaries.is_empty() {
        return Ok(route(default, false, Choice::Only));
    }
    let (at, choice) = match sticky_key(service, request) {
        Some(key) => (point(sticky_hash(&key)), Choice::Sticky),
        None => (point(request.draw), Choice::Split),
    };
    let mut upper = 0;
    for canary in &predictor.canaries {
        upper += canary.percent;
        if at < upper {
            return Ok(route(&canary.revision(), true, choice));
        }
    }
    Ok(route(default, false, choice))
}

/// A request the transformer filter works on.
#[derive(Debug)]
pub struct SelectedTransformer<'a> {
    /// The service's index in the configuration.
    pub service: usize,
    pub transformer: &'a Transformer,
    pub wire: Wire,
    /// The path to send the request on, when it changes (V1 `:predict` to V2 `/infer`).
    pub path: Option<String>,
    /// A call to the built-in explainer: the request is pre-processed as a prediction would
    /// be, and the answer is the explanation (V1: its document), not post-processed.
    pub explain: bool,
}

/// Whether the transformer filter works on a request the router sent to `isvc`'s
/// `component`: predict and infer calls (`POST`) of a service with a transformer.
pub fn select_transformer<'a>(
    config: &'a Config,
    isvc: &str,
    namespace: &str,
    component: &str,
    method: &str,
    path: &str,
) -> Option<SelectedTransformer<'a>> {
    let explain = match component {
        "predictor" => false,
        "explainer" => true,
        _ => return None,
    };
    if method != "POST" {
        return None;
    }
    let (service, found) = config
        .services()
        .iter()
        .enumerate()
        .find(|(_, s)| s.name == isvc && s.namespace == namespace)?;
    let transformer = found.transformer.as_ref()?;
    let wire = match (parse(path), explain) {
        (
            Protocol::V1 {
                verb: V1Verb::Predict,
                ..
            },
            false,
        )
        | (
            Protocol::V1 {
                verb: V1Verb::Explain,
                ..
            },
            true,
        ) => Wire::V1,
        (Protocol::V2 { model: Some(m), .. }, _)
            if path.split(['?', '#']).next()?.ends_with("/infer")
                && explain == (!found.serves(&m) && found.explains(&m)) =>
        {
            Wire::V2
        }
        _ => return None,
    };
    // The built-in explainer's input is what the model takes, so only a transformer that
    // makes that input has anything to do for it.
    let wanted = if explain {
        found.builtin_explainer && transformer.transforms_request(wire)
    } else {
        transformer.transforms_response(wire)
    };
    if !wanted {
        return None;
    }
    let path = match wire {
        Wire::V1 if transformer.transforms_request(wire) => {
            // `/v1/models/<m>:predict` -> `/v2/models/<m>/infer` (`:explain` ->
            // `/v2/models/<m>-explainer/infer`), the segment kept as sent.
            let segment = path.split(['?', '#']).next()?.strip_prefix("/v1/models/")?;
            Some(match explain {
                false => format!("/v2/models/{}/infer", segment.strip_suffix(":predict")?),
                true => format!(
                    "/v2/models/{}{EXPLAINER_SUFFIX}/infer",
                    segment.strip_suffix(":explain")?
                ),
            })
        }
        _ => None,
    };
    Some(SelectedTransformer {
        service,
        transformer,
        wire,
        path,
        explain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_filter_selects_predict_and_infer_calls_of_services_with_a_transformer() {
        let mut service = json!({"name": "mnist", "models": ["mnist_cnn"],
            "predictor": {"default": {"name": "v1", "cluster": "c"}}});
        let plain =
            json!({"name": "plain", "predictor": {"default": {"name": "v1", "cluster": "p"}}});
        service["transformer"] = json!({"request": {"steps": ["image_decode", {"layout": "nchw"}, {"emit": {"input": "x"}}]}});
        let config =
            Config::parse(json!({"services": [service, plain]}).to_string().as_bytes()).unwrap();
        let pick = |isvc: &str, method: &str, path: &str| {
            select_transformer(&config, isvc, "default", "predictor", method, path)
                .map(|s| (s.wire, s.path))
        };
        assert_eq!(
            pick("mnist", "POST", "/v1/models/mnist_cnn:predict?x=1"),
            Some((Wire::V1, Some("/v2/models/mnist_cnn/infer".into())))
        );
        assert_eq!(
            pick("mnist", "POST", "/v2/models/mnist_cnn/versions/1/infer"),
            Some((Wire::V2, None))
        );
        assert_eq!(pick("mnist", "GET", "/v2/models/mnist_cnn"), None);
        assert_eq!(
            pick("mnist", "POST", "/v2/repository/models/mnist_cnn/load"),
            None
        );
        assert_eq!(pick("plain", "POST", "/v1/models/plain:predict"), None);
        assert_eq!(pick("other", "POST", "/v1/models/mnist_cnn:predict"), None);
        let explain = |config: &Config, path: &str| {
            select_transformer(config, "mnist", "default", "explainer", "POST", path)
                .map(|s| (s.wire, s.path, s.explain))
        };
        // An explainer of its own (a container) gets the request as the client sent it.
        assert_eq!(explain(&config, "/v1/models/mnist_cnn:explain"), None);
        // The built-in explainer gets the tensor the transformer makes, as the model does.
        service["builtin_explainer"] = json!(true);
        let builtin = Config::parse(json!({"services": [service]}).to_string().as_bytes()).unwrap();
        assert_eq!(
            explain(&builtin, "/v1/models/mnist_cnn:explain"),
            Some((
                Wire::V1,
                Some("/v2/models/mnist_cnn-explainer/infer".into()),
                true
            ))
        );
        assert_eq!(
            explain(&builtin, "/v2/models/mnist_cnn-explainer/infer"),
            Some((Wire::V2, None, true))
        );
        // Predictions are not explanations, and the other way round.
        assert_eq!(explain(&builtin, "/v2/models/mnist_cnn/infer"), None);
        assert_eq!(explain(&builtin, "/v1/models/mnist_cnn:predict"), None);
        let predict = select_transformer(
            &builtin,
            "mnist",
            "default",
            "predictor",
            "POST",
            "/v2/models/mnist_cnn-explainer/infer",
        );
        assert!(predict.is_none());
    }

    fn config() -> Config {
        let v = json!({"services": [
            {"name": "digits", "namespace": "default", "models": ["mnist_cnn", "sklearn_digits"],
             "predictor": {
                "default": {"name": "digits-v1", "cluster": "digits_default", "grpc_cluster": "digits_default_grpc"},
                "canaries": [{"name": "digits-v2", "cluster": "digits_canary", "percent": 20}],
                "shadow": {"name": "digits-v3", "cluster": "digits_shadow", "percent": 10}},
             "explainer": {"name": "digits-explainer", "cluster": "digits_explainer"},
             "sticky": {"header": "x-user"}},
            {"name": "text", "namespace": "nlp",
             "predictor": {"default": {"name": "text-v1", "cluster": "text_default"}},
             "sticky": {"cookie": "session"}}]});
        Config::parse(v.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"))
    }

    struct Req {
        path: &'static str,
        authority: Option<&'static str>,
        headers: Vec<(&'static str, &'static str)>,
        body: Vec<u8>,
        draw: u64,
    }

    fn req(path: &'static str) -> Req {
        Req {
            path,
            authority: None,
            headers: Vec::new(),
            body: Vec::new(),
            draw: 50,
        }
    }

    impl Req {
        fn decide(&self) -> Decision {
            let headers = self.headers.clone();
            let lookup = move |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            };
            decide(
                &config(),
                &Request {
                    path: self.path,
                    authority: self.authority,
                    header: &lookup,
                    body: &self.body,
                    end_of_body: false,
                    draw: self.draw,
                    shadow_draw: 50,
                },
            )
        }

        fn route(&self) -> Route {
            match self.decide() {
                Decision::Route(route) => route,
                other => panic!("{}: expected a route, got {other:?}", self.path),
            }
        }

        fn reply(&self) -> Reply {
            match self.decide() {
                Decision::Reply(reply) => reply,
                other => panic!("{}: expected a reply, got {other:?}", self.path),
            }
        }
    }

    fn grpc_frame(model: &str) -> Vec<u8> {
        let mut message = vec![0x0a, model.len() as u8];
        message.extend(model.as_bytes());
        let mut frame = vec![0];
        frame.extend((message.len() as u32).to_be_bytes());
        frame.extend(message);
        frame
    }

    #[test]
    fn control_apis_are_refused_unless_the_service_opens_them() {
        let unload = "/v2/repository/models/mnist_cnn/unload";
        let mut grpc_unload = req("/inference.GRPCInferenceService/RepositoryModelUnload");
        grpc_unload.body = grpc_frame("mnist_cnn");
        let refused = [
            req(unload),
            req("/v2/repository/index"),
            req("/v2/models/mnist_cnn/stats"),
            Req {
                headers: vec![(REVISION_HEADER, "canary")],
                ..req(unload)
            },
            Req {
                authority: Some("latest-digits.default.example.com"),
                ..req("/v2/repository/index")
            },
            Req {
                authority: Some("prev-digits.default.example.com"),
                ..req(unload)
            },
            req("/inference.GRPCInferenceService/RepositoryIndex"),
            grpc_unload,
        ];
        for request in refused {
            let reply = request.reply();
            assert_eq!(reply.status, 403, "{}", request.path);
            assert!(
                reply.message.contains("is a control API"),
                "{}",
                reply.message
            );
            assert_eq!(reply.grpc, request.path.starts_with("/inference."));
            assert_eq!(reply.grpc_status(), 7, "PERMISSION_DENIED");
        }
        // Inference is untouched.
        assert_eq!(req("/v2/models/mnist_cnn/infer").route().isvc, "digits");

        // A service that opens them gets its own control calls; the others stay closed.
        let mut v: serde_json::Value = serde_json::json!({"services": [
            {"name": "digits", "models": ["mnist_cnn"],
             "predictor": {"default": {"name": "d1", "cluster": "d"}}},
            {"name": "text", "namespace": "nlp", "public_control_api": true,
             "predictor": {"default": {"name": "t1", "cluster": "t"}}}]});
        let open = Config::parse(v.to_string().as_bytes()).unwrap();
        let decide_on = |config: &Config, path: &str, authority: Option<&str>| {
            decide(
                config,
                &Request {
                    path,
                    authority,
                    header: &|_| None,
                    body: &[],
                    end_of_body: true,
                    draw: 0,
                    shadow_draw: 0,
                },
            )
        };
        match decide_on(&open, "/v2/repository/models/text/unload", None) {
            Decision::Route(route) => assert_eq!(route.cluster, "t"),
            other => panic!("{other:?}"),
        }
        match decide_on(&open, "/v2/repository/index", Some("text.nlp.example.com")) {
            Decision::Route(route) => assert_eq!(route.isvc, "text"),
            other => panic!("{other:?}"),
        }
        match decide_on(&open, "/v2/repository/models/mnist_cnn/unload", None) {
            Decision::Reply(reply) => assert_eq!(reply.status, 403),
            other => panic!("{other:?}"),
        }
        v["services"][1]["public_control_api"] = serde_json::json!("yes");
        assert!(Config::parse(v.to_string().as_bytes()).is_err());
    }

    #[test]
    fn finds_the_service_by_model_or_host() {
        let cases: Vec<(Req, &str, &str)> = vec![
            (req("/v2/models/mnist_cnn/infer"), "digits", "predictor"),
            (
                req("/v2/models/sklearn_digits/versions/2/infer"),
                "digits",
                "predictor",
            ),
            (
                req("/v1/models/sklearn_digits:predict"),
                "digits",
                "predictor",
            ),
            (req("/v1/models/mnist_cnn:explain"), "digits", "explainer"),
            (req("/v1/models/text:predict"), "text", "predictor"),
            (
                Req {
                    authority: Some("text.nlp.example.com"),
                    ..req("/v2/health/ready")
                },
                "text",
                "predictor",
            ),
            (
                Req {
                    authority: Some("text.nlp.example.com:8080"),
                    ..req("/v2/models/any/infer")
                },
                "text",
                "predictor",
            ),
            (
                Req {
                    body: grpc_frame("mnist_cnn"),
                    ..req("/inference.GRPCInferenceService/ModelInfer")
                },
                "digits",
                "predictor",
            ),
            (
                Req {
                    authority: Some("digits.default.svc"),
                    ..req("/inference.GRPCInferenceService/ServerLive")
                },
                "digits",
                "predictor",
            ),
        ];
        let grpc = Req {
            body: grpc_frame("mnist_cnn"),
            ..req("/inference.GRPCInferenceService/ModelInfer")
        }
        .route();
        assert_eq!(grpc.cluster, "digits_default_grpc");
        assert_eq!(
            req("/v2/models/mnist_cnn/infer").route().cluster,
            "digits_default"
        );
        for (request, isvc, component) in cases {
            let route = request.route();
            assert_eq!(
                (route.isvc.as_str(), route.component.as_str()),
                (isvc, component),
                "{}",
                request.path
            );
        }
    }

    #[test]
    fn built_in_explainers_are_asked_where_predictions_go() {
        let service = json!({"name": "iris", "builtin_explainer": true,
            "predictor": {
                "default": {"name": "iris-v1", "cluster": "iris_default"},
                "canaries": [{"name": "iris-v2", "cluster": "iris_canary", "percent": 30}],
                "shadow": {"name": "iris-v3", "cluster": "iris_shadow", "percent": 100}}});
        let config = Config::parse(
            json!({"services": [service.clone()]})
                .to_string()
                .as_bytes(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let decide_at = |path: &str, draw: u64, pin: Option<&str>| {
            let header = |name: &str| pin.filter(|_| name == REVISION_HEADER).map(str::to_owned);
            decide(
                &config,
                &Request {
                    path,
                    authority: None,
                    header: &header,
                    body: b"",
                    end_of_body: true,
                    draw,
                    shadow_draw: 0,
                },
            )
        };
        let route = |path: &str, draw: u64, pin: Option<&str>| match decide_at(path, draw, pin) {
            Decision::Route(r) => (r.component, r.cluster, r.shadow),
            other => panic!("{path}: {other:?}"),
        };
        let explainer = Component::Explainer;
        for path in ["/v1/models/iris:explain", "/v2/models/iris-explainer/infer"] {
            assert_eq!(
                route(path, 99, None),
                (explainer, "iris_default".into(), None)
            );
            assert_eq!(
                route(path, 0, None),
                (explainer, "iris_canary".into(), None)
            );
            assert_eq!(
                route(path, 99, Some("canary")),
                (explainer, "iris_canary".into(), None)
            );
        }
        // gRPC ModelInfer to `iris-explainer`, found by the model name in the message.
        let frame = grpc_frame("iris-explainer");
        let grpc = decide(
            &config,
            &Request {
                path: "/inference.GRPCInferenceService/ModelInfer",
                authority: None,
                header: &|_| None,
                body: &frame,
                end_of_body: true,
                draw: 99,
                shadow_draw: 0,
            },
        );
        assert!(
            matches!(&grpc, Decision::Route(r) if r.component == explainer && r.shadow.is_none()),
            "{grpc:?}"
        );
        // Predictions keep their shadow; an unknown model is still unknown.
        assert!(route("/v2/models/iris/infer", 99, None).2.is_some());
        assert!(matches!(
            decide_at("/v2/models/rose-explainer/infer", 0, None),
            Decision::Reply(Reply { status: 404, .. })
        ));
        let mut both = service;
        both["explainer"] = json!({"name": "e", "cluster": "e"});
        let err = Config::parse(json!({"services": [both]}).to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
    }

    #[test]
    fn answers_by_itself_when_it_must() {
        let unknown = req("/v2/models/nope/infer").reply();
        assert_eq!((unknown.status, unknown.grpc), (404, false));
        assert_eq!(unknown.json_body(), r#"{"error":"unknown model 'nope'"}"#);
        let no_explainer = req("/v1/models/text:explain").reply();
        assert!(no_explainer.message.contains("'text' has no explainer"));
        let ambiguous = req("/v2/health/ready").reply();
        assert!(ambiguous.message.contains("set the Host"));
        let accented = Reply {
            status: 404,
            message: "unknown model 'ré%'\n".into(),
            grpc: true,
        };
        assert_eq!(accented.grpc_message(), "unknown model 'r%C3%A9%25'%0A");
        let grpc_unknown = Req {
            body: grpc_frame("nope"),
            ..req("/inference.GRPCInferenceService/ModelInfer")
        }
        .reply();
        assert_eq!((grpc_unknown.grpc, grpc_unknown.grpc_status()), (true, 5));
        let bad_pin = Req {
            headers: vec![(REVISION_HEADER, "v9")],
            ..req("/v2/models/mnist_cnn/infer")
        }
        .reply();
        assert!(
            bad_pin.message.contains("unknown revision 'v9'")
                && bad_pin.message.contains("digits-v2")
        );
        let malformed = Req {
            body: vec![1, 0, 0, 0, 1, 0],
            ..req("/inference.GRPCInferenceService/ModelInfer")
        }
        .reply();
        assert_eq!(malformed.grpc_status(), 3);
        assert_eq!(req("/metrics").decide(), Decision::PassThrough);
        assert_eq!(
            Req {
                body: vec![0, 0],
                ..req("/inference.GRPCInferenceService/ModelInfer")
            }
            .decide(),
            Decision::NeedBody
        );
    }

    #[test]
    fn grpc_goes_by_host_and_never_waits_where_headers_cannot_be_held() {
        let infer = "/inference.GRPCInferenceService/ModelInfer";
        // A host that names the service routes at once, the message unread.
        let by_host = Req {
            authority: Some("digits.default.example.com"),
            ..req(infer)
        }
        .route();
        assert_eq!(
            (by_host.isvc.as_str(), by_host.cluster.as_str()),
            ("digits", "digits_default_grpc")
        );

        let decide_with = |config: &Config, authority: Option<&str>| {
            decide(
                config,
                &Request {
                    path: infer,
                    authority,
                    header: &|_: &str| None,
                    body: &[],
                    end_of_body: false,
                    draw: 0,
                    shadow_draw: 99,
                },
            )
        };
        let mut v = json!({"services": [
            {"name": "digits", "predictor": {"default": {"name": "v1", "cluster": "d", "grpc_cluster": "d.grpc"}}},
            {"name": "text", "predictor": {"default": {"name": "v1", "cluster": "t"}}}]});
        v["hold_headers"] = json!(false);
        let unheld = Config::parse(v.to_string().as_bytes()).unwrap();
        assert!(!unheld.hold_headers() && config().hold_headers());
        // Two services and no host: a clear refusal, not a stream that waits for ever.
        match decide_with(&unheld, None) {
            Decision::Reply(reply) => {
                assert_eq!((reply.status, reply.grpc_status()), (400, 3));
                assert!(
                    reply.message.contains("routes gRPC by host"),
                    "{}",
                    reply.message
                );
            }
            other => panic!("{other:?}"),
        }
        match decide_with(&unheld, Some("digits.default.svc")) {
            Decision::Route(route) => assert_eq!(route.cluster, "d.grpc"),
            other => panic!("{other:?}"),
        }
        // One service: it is where the call goes.
        v["services"].as_array_mut().unwrap().pop();
        let one = Config::parse(v.to_string().as_bytes()).unwrap();
        match decide_with(&one, None) {
            Decision::Route(route) => assert_eq!(route.isvc, "digits"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_split_follows_the_percentages() {
        let mut canary = 0;
        for draw in 0..1000 {
            let route = Req {
                draw,
                ..req("/v2/models/mnist_cnn/infer")
            }
            .route();
            assert_eq!(route.choice, Choice::Split);
            canary += usize::from(route.canary);
        }
        assert_eq!(canary, 200);
        let only = req("/v1/models/text:predict").route();
        assert_eq!(
            (only.revision.as_str(), only.choice),
            ("text-v1", Choice::Only)
        );
    }

    #[test]
    fn sticky_keys_hold_one_revision() {
        for user in ["alice", "bob", "carol", "dave", "eve"] {
            let revisions: Vec<String> = (0..50)
                .map(|draw| {
                    Req {
                        draw,
                        headers: vec![("x-user", user)],
                        ..req("/v2/models/mnist_cnn/infer")
                    }
                    .route()
                })
                .map(|r| {
                    assert_eq!(r.choice, Choice::Sticky);
                    r.revision
                })
                .collect();
            assert!(
                revisions.iter().all(|r| *r == revisions[0]),
                "{user}: {revisions:?}"
            );
        }
        // The hash is fixed: these keys land where they always have.
        // FNV-1a 64 of "alice" is 5803779529149266183 (checked against an independent implementation).
        assert_eq!(sticky_hash("alice"), 5_803_779_529_149_266_183);
        assert_eq!(sticky_hash(""), 0xcbf2_9ce4_8422_2325);
        let cookie = Req {
            headers: vec![("cookie", "a=1; session=abc")],
            ..req("/v1/models/text:predict")
        }
        .route();
        assert_eq!(cookie.choice, Choice::Only);
    }

    #[test]
    fn pinning_wins_over_weights_and_stickiness() {
        for draw in [0, 19, 20, 99] {
            let pinned = |value: &'static str| {
                Req {
                    draw,
                    headers: vec![(REVISION_HEADER, value), ("x-user", "alice")],
                    ..req("/v2/models/mnist_cnn/infer")
                }
                .route()
            };
            assert_eq!(pinned("default").revision, "digits-v1");
            assert_eq!(pinned("canary").revision, "digits-v2");
            assert_eq!(pinned("digits-v2").revision, "digits-v2");
            assert_eq!(pinned("digits-v1").choice, Choice::Pinned);
            let latest = Req {
                draw,
                authority: Some("latest-digits.default.example.com"),
                ..req("/v2/models/mnist_cnn/infer")
            }
            .route();
            assert_eq!(latest.revision, "digits-v2");
            let prev = Req {
                draw,
                authority: Some("prev-digits.default.example.com"),
                ..req("/v2/models/mnist_cnn/infer")
            }
            .route();
            assert_eq!(prev.revision, "digits-v1");
        }
        let no_canary = Req {
            headers: vec![(REVISION_HEADER, "canary")],
            ..req("/v1/models/text:predict")
        }
        .reply();
        assert!(no_canary.message.contains("no canary"));
    }

    #[test]
    fn shadows_get_their_share() {
        let shadowed = (0..100u64)
            .filter(|&d| {
                let headers = |_: &str| None;
                match decide(
                    &config(),
                    &Request {
                        path: "/v2/models/mnist_cnn/infer",
                        authority: None,
                        header: &headers,
                        body: &[],
                        end_of_body: false,
                        draw: 0,
                        shadow_draw: d,
                    },
                ) {
                    Decision::Route(route) => route.shadow.is_some(),
                    _ => false,
                }
            })
            .count();
        assert_eq!(shadowed, 10);
    }
}
