//! The `router` root: applies `meshserve_filter_core::route` decisions in Envoy.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use meshserve_filter_core::activator::{Activator, Admit, Effect, RETRY_AFTER_SECS};
use meshserve_filter_core::config::{Config, WakeCall};
use meshserve_filter_core::graph::{GRAPH_HEADER, STEP_HEADER};
use meshserve_filter_core::route::{
    CLUSTER_HEADER, COMPONENT_HEADER, Decision, ISVC_HEADER, NAMESPACE_HEADER, REVISION_HEADER,
    Reply, Request, Route, decide,
};
use meshserve_filter_core::shadow::agree;
use meshserve_filter_core::transform::TRANSFORMED_HEADER;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

use crate::graph::{GraphStream, Outcome, on_hop_listener};
use crate::host::{Headers, ROUTER_ROOT_ID, Rng, configure, header};
use crate::metrics::Counters;

/// Request headers the filters set and clients may not (`x-meshserve-revision` is the
/// client's pin, and stays).
const INTERNAL_HEADERS: [&str; 5] = [
    CLUSTER_HEADER,
    ISVC_HEADER,
    NAMESPACE_HEADER,
    COMPONENT_HEADER,
    TRANSFORMED_HEADER,
];
/// Headers that name a graph's step: trusted from the hop listener only.
const GRAPH_HEADERS: [&str; 2] = [GRAPH_HEADER, STEP_HEADER];
/// The most response bytes kept to compare a primary answer with its shadow's.
const SHADOW_COMPARE_LIMIT: usize = 1 << 20;
/// How often queued shadow copies are sent.
const SHADOW_TICK: Duration = Duration::from_millis(5);
/// How long a shadow call may take.
const SHADOW_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the activator's clock runs while a revision may be at zero.
const ACTIVATOR_TICK: Duration = Duration::from_millis(10);
/// How long a readiness probe or a wake call may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const WAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Where a revision's readiness is asked (the Open Inference Protocol's server readiness).
const READY_PATH: &str = "/v2/health/ready";

/// A shadow copy waiting for both answers.
#[derive(Debug, Default)]
struct ShadowCall {
    isvc: String,
    revision: String,
    primary: Option<Option<Vec<u8>>>,
    shadow: Option<Option<Vec<u8>>>,
}

/// A shadow copy to send on the next tick.
#[derive(Debug)]
struct PendingShadow {
    id: u64,
    cluster: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// State shared by the root and its streams (one VM is single-threaded).
#[derive(Debug)]
struct Shared {
    config: Option<Rc<Config>>,
    counters: Counters,
    rng: Rng,
    next_shadow: u64,
    /// Copies queued by streams; the root sends them, so their answers reach the root even
    /// after the client's stream (and its context) is gone.
    pending: Vec<PendingShadow>,
    shadows: HashMap<u64, ShadowCall>,
    tokens: HashMap<u32, u64>,
    /// Requests held for revisions waking from zero.
    activator: Activator,
    /// Per revision that may be at zero: its REST cluster and its wake call.
    targets: HashMap<String, (String, Option<WakeCall>)>,
    /// What streams asked of the activator; the root applies it on its tick, so the answers
    /// of its calls reach the root, whatever becomes of the streams.
    effects: Vec<Effect>,
    probes: HashMap<u32, String>,
    wakes: HashMap<u32, String>,
}

/// Milliseconds of the host's clock.
fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

impl Shared {
    fn draw(&mut self) -> u64 {
        self.rng.draw()
    }

    fn count_shadow(&mut self, id: u64, result: &str) {
        if let Some(call) = self.shadows.get(&id) {
            self.counters.increment(
                "shadow",
                &[
                    ("isvc", &call.isvc),
                    ("revision", &call.revision),
                    ("result", result),
                ],
            );
        }
    }

    /// Records a shadow verdict once both answers are in.
    fn settle(&mut self, id: u64) {
        let ready = self
            .shadows
            .get(&id)
            .is_some_and(|c| c.primary.is_some() && c.shadow.is_some());
        if !ready {
            return;
        }
        let Some(call) = self.shadows.remove(&id) else {
            return;
        };
        let result = match (call.primary.flatten(), call.shadow.flatten()) {
            (_, None) => "error",
            (None, Some(_)) => "unknown",
            (Some(primary), Some(shadow)) => match agree(&primary, &shadow) {
                Some(true) => "agree",
                Some(false) => "disagree",
                None => "unknown",
            },
        };
        self.counters.increment(
            "shadow",
            &[
                ("isvc", &call.isvc),
                ("revision", &call.revision),
                ("result", result),
            ],
        );
    }
}

pub(crate) struct RouterRoot {
    context_id: u32,
    shared: Rc<RefCell<Shared>>,
}

impl RouterRoot {
    pub(crate) fn new(context_id: u32) -> Self {
        RouterRoot {
            context_id,
            shared: Rc::new(RefCell::new(Shared {
                config: None,
                counters: Counters::default(),
                rng: Rng::seeded(context_id),
                next_shadow: 0,
                pending: Vec::new(),
                shadows: HashMap::new(),
                tokens: HashMap::new(),
                activator: Activator::default(),
                targets: HashMap::new(),
                effects: Vec::new(),
                probes: HashMap::new(),
                wakes: HashMap::new(),
            })),
        }
    }
}

impl Context for RouterRoot {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let status = header(MapType::HttpCallResponseHeaders, ":status");
        {
            let mut shared = self.shared.borrow_mut();
            if let Some(revision) = shared.probes.remove(&token) {
                let ready = status.as_deref() == Some("200");
                let effects = shared.activator.probed(&revision, ready, now_ms());
                drop(shared);
                self.apply_effects(effects);
                return;
            }
            if let Some(revision) = shared.wakes.remove(&token) {
                if !status.as_deref().is_some_and(|s| s.starts_with('2')) {
                    log::warn!("the wake call for revision {revision} answered {status:?}");
                }
                return;
            }
        }
        let body = if status.as_deref().is_some_and(|s| s.starts_with('2')) {
            hostcalls::get_buffer(
                BufferType::HttpCallResponseBody,
                0,
                body_size.min(SHADOW_COMPARE_LIMIT),
            )
            .ok()
            .flatten()
            .or(Some(Vec::new()))
        } else {
            None
        };
        let mut shared = self.shared.borrow_mut();
        let Some(id) = shared.tokens.remove(&token) else {
            return;
        };
        if let Some(call) = shared.shadows.get_mut(&id) {
            call.shadow = Some(body);
        }
        shared.settle(id);
    }
}

impl RootContext for RouterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        match configure(ROUTER_ROOT_ID) {
            Some(config) => {
                log::info!(
                    "meshserve router configured: {} InferenceService(s)",
                    config.services().len()
                );
                let shadows = config
                    .services()
                    .iter()
                    .any(|s| s.predictor.shadow.is_some());
                let targets: HashMap<String, (String, Option<WakeCall>)> = config
                    .scale_to_zero()
                    .into_iter()
                    .map(|(r, scale)| (r.name, (r.cluster, scale.wake)))
                    .collect();
                let activating = !targets.is_empty();
                let effects = {
                    let mut shared = self.shared.borrow_mut();
                    shared.activator.set_limits(config.hold_limits());
                    let effects = shared.activator.watch(targets.keys().map(String::as_str));
                    shared.targets = targets;
                    shared.config = Some(Rc::new(config));
                    effects
                };
                self.apply_effects(effects);
                // Shadow copies leave from the root, on a tick; the activator runs on one.
                let period = match (shadows, activating) {
                    (true, _) => SHADOW_TICK,
                    (false, true) => ACTIVATOR_TICK,
                    (false, false) => Duration::ZERO,
                };
                if let Err(status) = hostcalls::set_tick_period(period) {
                    log::warn!("cannot set the tick period: {status:?}");
                }
                true
            }
            None => false,
        }
    }

    fn on_tick(&mut self) {
        let effects = {
            let mut shared = self.shared.borrow_mut();
            let mut effects = std::mem::take(&mut shared.effects);
            if !shared.targets.is_empty() {
                effects.extend(shared.activator.tick(now_ms()));
            }
            effects
        };
        self.apply_effects(effects);
        let pending = std::mem::take(&mut self.shared.borrow_mut().pending);
        for shadow in pending {
            let mut headers: Vec<(&str, &str)> = shadow
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            headers.push(("x-meshserve-shadow", "true"));
            let sent = hostcalls::dispatch_http_call(
                &shadow.cluster,
                headers,
                Some(&shadow.body),
                Vec::new(),
                SHADOW_TIMEOUT,
            );
            let mut shared = self.shared.borrow_mut();
            match sent {
                Ok(token) => {
                    shared.tokens.insert(token, shadow.id);
                    shared.count_shadow(shadow.id, "sent");
                }
                Err(status) => {
                    log::warn!(
                        "cannot send the shadow copy to {}: {status:?}",
                        shadow.cluster
                    );
                    shared.count_shadow(shadow.id, "error");
                    shared.shadows.remove(&shadow.id);
                }
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.shared.borrow().config.clone()?;
        Some(Box::new(RouterStream {
            context_id,
            shared: Rc::clone(&self.shared),
            config,
            headers: Headers::default(),
            waiting_for_body: false,
            route: None,
            shadow_headers: Vec::new(),
            shadow_body: None,
            shadow_id: None,
            response_copy: None,
            graph: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl RouterRoot {
    /// Applies the activator's effects: probes and wake calls leave from the root (their
    /// answers come back here), held streams are resumed or answered in their own context.
    fn apply_effects(&self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Probe(revision) => self.probe(revision),
                Effect::Wake(revision) => self.wake(revision),
                Effect::Resume(context) => {
                    let resumed = hostcalls::set_effective_context(context)
                        .and_then(|()| hostcalls::resume_http_request());
                    if let Err(status) = resumed {
                        log::warn!("cannot resume held stream {context}: {status:?}");
                    }
                }
                Effect::Refuse(context, reply) => {
                    if let Err(status) = hostcalls::set_effective_context(context) {
                        log::warn!("cannot answer held stream {context}: {status:?}");
                        continue;
                    }
                    send_reply(&mut self.shared.borrow_mut(), &reply);
                }
                Effect::Held(revision, delta) => self.shared.borrow_mut().counters.add_to_gauge(
                    "held",
                    &[("revision", &revision)],
                    delta,
                ),
            }
            // Back in the root's context: the calls it makes answer to it.
            if let Err(status) = hostcalls::set_effective_context(self.context_id) {
                log::warn!("cannot return to the router's root context: {status:?}");
            }
        }
    }

    fn probe(&self, revision: String) {
        let cluster = self
            .shared
            .borrow()
            .targets
            .get(&revision)
            .map(|t| t.0.clone());
        let sent = cluster
            .ok_or(proxy_wasm::types::Status::NotFound)
            .and_then(|cluster| {
                hostcalls::dispatch_http_call(
                    &cluster,
                    vec![
                        (":method", "GET"),
                        (":path", READY_PATH),
                        (":authority", "meshserve-activator"),
                    ],
                    None,
                    Vec::new(),
                    PROBE_TIMEOUT,
                )
            });
        match sent {
            Ok(token) => {
                self.shared.borrow_mut().probes.insert(token, revision);
            }
            Err(status) => {
                log::warn!("cannot ask revision {revision} whether it is ready: {status:?}");
                let effects = self
                    .shared
                    .borrow_mut()
                    .activator
                    .probed(&revision, false, now_ms());
                self.apply_effects(effects);
            }
        }
    }

    fn wake(&self, revision: String) {
        let call = self
            .shared
            .borrow()
            .targets
            .get(&revision)
            .and_then(|t| t.1.clone());
        let Some(call) = call else {
            return;
        };
        let sent = hostcalls::dispatch_http_call(
            &call.cluster,
            vec![
                (":method", "POST"),
                (":path", &call.path),
                (":authority", "meshserve-activator"),
                ("content-length", "0"),
            ],
            None,
            Vec::new(),
            WAKE_TIMEOUT,
        );
        match sent {
            Ok(token) => {
                self.shared.borrow_mut().wakes.insert(token, revision);
            }
            Err(status) => log::warn!("cannot send the wake call for {revision}: {status:?}"),
        }
    }
}

/// Sends a local reply in the current stream's context, and counts it.
fn send_reply(shared: &mut Shared, reply: &Reply) {
    let outcome = format!("replied_{}", reply.status);
    shared.counters.increment(
        "requests",
        &[
            ("isvc", "none"),
            ("revision", "none"),
            ("outcome", &outcome),
        ],
    );
    let retry_after = RETRY_AFTER_SECS.to_string();
    let retry = reply.status == 503;
    let result = if reply.grpc {
        let status = reply.grpc_status().to_string();
        let mut headers = vec![
            ("content-type", "application/grpc"),
            ("grpc-status", status.as_str()),
        ];
        let message = reply.grpc_message();
        headers.push(("grpc-message", &message));
        hostcalls::send_http_response(200, headers, None)
    } else {
        let body = reply.json_body();
        let mut headers = vec![("content-type", "application/json")];
        if retry {
            headers.push(("retry-after", &retry_after));
        }
        hostcalls::send_http_response(u32::from(reply.status), headers, Some(body.as_bytes()))
    };
    if let Err(status) = result {
        log::warn!("cannot send the local reply: {status:?}");
    }
}

struct RouterStream {
    context_id: u32,
    shared: Rc<RefCell<Shared>>,
    config: Rc<Config>,
    /// The request's headers, read once, the internal ones removed.
    headers: Headers,
    /// A gRPC request whose model name is still to come in the body.
    waiting_for_body: bool,
    route: Option<Route>,
    /// The request headers and body copied for the shadow, while they stream past.
    shadow_headers: Vec<(String, String)>,
    shadow_body: Option<Vec<u8>>,
    shadow_id: Option<u64>,
    /// The primary's answer copied for comparison with the shadow's.
    response_copy: Option<Vec<u8>>,
    /// An InferenceGraph this request runs.
    graph: Option<GraphStream>,
}

impl RouterStream {
    fn decide(&self, body: &[u8], end_of_body: bool) -> Decision {
        let (draw, shadow_draw) = {
            let mut shared = self.shared.borrow_mut();
            (shared.draw(), shared.draw())
        };
        let header = |name: &str| self.headers.get(name).map(str::to_owned);
        decide(
            &self.config,
            &Request {
                path: self.headers.get(":path").unwrap_or_default(),
                authority: self.headers.get(":authority"),
                header: &header,
                body,
                end_of_body,
                draw,
                shadow_draw,
            },
        )
    }

    /// Applies a decision made on the headers or on the first body bytes.
    fn apply(&mut self, decision: Decision, end_of_stream: bool) -> Action {
        match decision {
            Decision::PassThrough => Action::Continue,
            Decision::NeedBody => {
                self.waiting_for_body = true;
                Action::Pause
            }
            Decision::Reply(reply) => {
                self.waiting_for_body = false;
                self.reply(&reply);
                Action::Pause
            }
            Decision::Route(route) => {
                self.waiting_for_body = false;
                self.route_to(route, end_of_stream);
                self.activate()
            }
            Decision::Graph(_) if on_hop_listener() => {
                self.reply(&Reply {
                    status: 508,
                    message:
                        "a graph's step may not call a graph: name the node instead (nodeName)"
                            .into(),
                    grpc: false,
                });
                Action::Pause
            }
            Decision::Graph(index) => {
                self.graph = Some(GraphStream::new(Rc::clone(&self.config), index));
                if end_of_stream {
                    self.start_graph(Vec::new());
                }
                Action::Pause
            }
        }
    }

    /// Runs the graph on the request's whole body.
    fn start_graph(&mut self, body: Vec<u8>) {
        let Some(graph) = self.graph.as_mut() else {
            return;
        };
        let shared = Rc::clone(&self.shared);
        let mut draw = || shared.borrow_mut().draw();
        let outcome = graph.start(body, &mut draw);
        self.graph_moved(outcome);
    }

    fn graph_moved(&mut self, outcome: Outcome) {
        if let (Outcome::Answered(status), Some(graph)) = (outcome, &self.graph) {
            let outcome = format!("status_{status}");
            self.shared
                .borrow_mut()
                .counters
                .increment("graphs", &[("graph", graph.name()), ("outcome", &outcome)]);
            self.graph = None;
        }
    }

    fn reply(&self, reply: &Reply) {
        send_reply(&mut self.shared.borrow_mut(), reply);
    }

    /// Holds the routed request while its revision wakes from zero, or refuses it over a cap:
    /// `Pause` then, `Continue` for a warm revision.
    fn activate(&mut self) -> Action {
        let admit = {
            let mut shared = self.shared.borrow_mut();
            // Nothing scales to zero (the common case): no lookup, no host call.
            let Some(route) = self.route.as_ref().filter(|_| !shared.targets.is_empty()) else {
                return Action::Continue;
            };
            let grpc = self
                .headers
                .get("content-type")
                .is_some_and(|t| t.starts_with("application/grpc"));
            let (admit, effects) =
                shared
                    .activator
                    .admit(&route.revision, self.context_id, grpc, now_ms());
            shared.effects.extend(effects);
            admit
        };
        match admit {
            Admit::Pass => Action::Continue,
            Admit::Hold => Action::Pause,
            Admit::Refuse(reply) => {
                self.reply(&reply);
                Action::Pause
            }
        }
    }

    fn route_to(&mut self, route: Route, end_of_stream: bool) {
        for (name, value) in route.headers() {
            if let Err(status) =
                hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))
            {
                log::warn!("cannot set {name}: {status:?}");
            }
        }
        // No `clear_route_cache` call: Envoy clears the route cache whenever a Wasm filter
        // changes the request's headers (`onHeadersModified` in its Wasm context), so the
        // `cluster_header` route reads the cluster just set. The end-to-end tests route by it.
        self.shared
            .borrow_mut()
            .counters
            .routed(&route.isvc, &route.revision, route.choice);
        if route.shadow.is_some() {
            // Envoy exposes the request headers only until they are sent on: copy them now.
            self.shadow_headers = self
                .headers
                .pairs()
                .iter()
                .filter(|(k, _)| !k.starts_with("x-meshserve-") && k != "content-length")
                .cloned()
                .collect();
            self.shadow_body = Some(Vec::new());
            if end_of_stream {
                self.send_shadow();
            }
        }
        self.route = Some(route);
    }

    /// Queues the copied request for the shadow revision; the root sends it on its next tick.
    fn send_shadow(&mut self) {
        let (Some(route), Some(body)) = (&self.route, self.shadow_body.take()) else {
            return;
        };
        let Some((revision, cluster)) = &route.shadow else {
            return;
        };
        let mut headers = std::mem::take(&mut self.shadow_headers);
        headers.push((REVISION_HEADER.to_owned(), revision.clone()));
        let mut shared = self.shared.borrow_mut();
        let id = shared.next_shadow;
        shared.next_shadow += 1;
        shared.shadows.insert(
            id,
            ShadowCall {
                isvc: route.isvc.clone(),
                revision: revision.clone(),
                ..Default::default()
            },
        );
        shared.pending.push(PendingShadow {
            id,
            cluster: cluster.clone(),
            headers,
            body,
        });
        self.shadow_id = Some(id);
        self.response_copy = Some(Vec::new());
    }
}

impl Context for RouterStream {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(graph) = self.graph.as_mut() else {
            return;
        };
        let shared = Rc::clone(&self.shared);
        let mut draw = || shared.borrow_mut().draw();
        let outcome = graph.answered(token, body_size, &mut draw);
        self.graph_moved(outcome);
    }
}

impl HttpContext for RouterStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Headers only the filters may set: a client's copies would pick a cluster (the log
        // intake's, say) or skip a transformer.
        // One host call reads them all; only those present are removed.
        self.headers = Headers::request();
        self.headers.remove(&INTERNAL_HEADERS);
        let hop = !self.config.graphs().is_empty() && on_hop_listener();
        if !hop {
            self.headers.remove(&GRAPH_HEADERS);
        }
        // A request without a body decides here for good (`end_of_body`): a gRPC call with no
        // message gets its 400 instead of waiting for bytes that will not come.
        let decision = self.decide(&[], end_of_stream);
        self.apply(decision, end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.graph.is_some() {
            // Envoy buffers the body (up to its buffer limit, 413 past it) until it is whole.
            if end_of_stream {
                let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                self.start_graph(body);
            }
            return Action::Pause;
        }
        if self.waiting_for_body {
            let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
            let decision = self.decide(&body, end_of_stream);
            let action = self.apply(decision, false);
            // The buffered body so far now streams on: copy it for a shadow too.
            if let Some(copy) = self.shadow_body.as_mut() {
                copy.extend_from_slice(&body);
                if end_of_stream {
                    self.send_shadow();
                }
            }
            return action;
        }
        if let Some(copy) = self.shadow_body.as_mut() {
            if let Ok(Some(chunk)) =
                hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            {
                copy.extend_from_slice(&chunk);
            }
            if end_of_stream {
                self.send_shadow();
            }
        }
        // A held request's body waits with it (Envoy buffers it, up to its buffer limit).
        if self.shared.borrow().activator.is_held(self.context_id) {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(route) = &self.route
            && let Err(status) = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                REVISION_HEADER,
                Some(&route.revision),
            )
        {
            log::warn!("cannot set {REVISION_HEADER}: {status:?}");
        }
        // Only a shadowed request compares answers, and only a successful one.
        let failed = self.shadow_id.is_some()
            && header(MapType::HttpResponseHeaders, ":status").is_none_or(|s| !s.starts_with('2'));
        if failed {
            self.response_copy = None;
            self.settle_primary(None);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(copy) = self.response_copy.as_mut() {
            if let Ok(Some(chunk)) =
                hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
            {
                copy.extend_from_slice(&chunk);
            }
            if copy.len() > SHADOW_COMPARE_LIMIT {
                self.response_copy = None;
                self.settle_primary(None);
            } else if end_of_stream {
                let copy = self.response_copy.take();
                self.settle_primary(copy);
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        // A gRPC answer ends with its trailers, not with a body chunk.
        let copy = self.response_copy.take();
        self.settle_primary(copy);
        Action::Continue
    }

    fn on_log(&mut self) {
        // A held client that went away is held no more.
        {
            let mut shared = self.shared.borrow_mut();
            let effects = shared.activator.gone(self.context_id);
            shared.effects.extend(effects);
        }
        // The stream is over (reset, or ended before an answer): the shadow's verdict must
        // not wait for a primary answer that will not come.
        if self.shadow_id.is_some() {
            self.response_copy = None;
            self.settle_primary(None);
        }
    }
}

impl RouterStream {
    /// Hands the primary's answer (or `None`: not comparable) to the shadow call.
    fn settle_primary(&mut self, answer: Option<Vec<u8>>) {
        let Some(id) = self.shadow_id.take() else {
            return;
        };
        let mut shared = self.shared.borrow_mut();
        if let Some(call) = shared.shadows.get_mut(&id) {
            call.primary = Some(answer);
        }
        shared.settle(id);
    }
}
