//! The `router` root: applies `meshserve_filter_core::route` decisions in Envoy.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use meshserve_filter_core::config::Config;
use meshserve_filter_core::route::{
    Choice, Decision, REVISION_HEADER, Reply, Request, Route, decide,
};
use meshserve_filter_core::shadow::agree;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

use crate::metrics::Counters;

/// The root id Envoy must give this filter.
pub(crate) const ROOT_ID: &str = "router";
/// The most response bytes kept to compare a primary answer with its shadow's.
const SHADOW_COMPARE_LIMIT: usize = 1 << 20;
/// How long a shadow call may take.
const SHADOW_TIMEOUT: Duration = Duration::from_secs(10);

/// A shadow call in flight, waiting for both answers.
#[derive(Debug, Default)]
struct ShadowCall {
    isvc: String,
    revision: String,
    primary: Option<Option<Vec<u8>>>,
    shadow: Option<Option<Vec<u8>>>,
}

/// State shared by the root and its streams (one VM is single-threaded).
#[derive(Debug)]
struct Shared {
    root_context_id: u32,
    config: Option<Rc<Config>>,
    counters: Counters,
    rng: u64,
    shadows: HashMap<u32, ShadowCall>,
}

impl Shared {
    /// splitmix64: a fresh uniform draw per call.
    fn draw(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Records a shadow verdict once both answers are in.
    fn settle(&mut self, token: u32) {
        let ready = self
            .shadows
            .get(&token)
            .is_some_and(|c| c.primary.is_some() && c.shadow.is_some());
        if !ready {
            return;
        }
        let Some(call) = self.shadows.remove(&token) else {
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
    shared: Rc<RefCell<Shared>>,
}

impl RouterRoot {
    pub(crate) fn new(context_id: u32) -> Self {
        let seed = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        RouterRoot {
            shared: Rc::new(RefCell::new(Shared {
                root_context_id: context_id,
                config: None,
                counters: Counters::default(),
                rng: seed ^ u64::from(context_id),
                shadows: HashMap::new(),
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
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten();
        let ok = status.as_deref().is_some_and(|s| s.starts_with('2'));
        let body = if ok {
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
        if let Some(call) = shared.shadows.get_mut(&token) {
            call.shadow = Some(body);
        }
        shared.settle(token);
    }
}

impl RootContext for RouterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        if let Ok(Some(root_id)) = hostcalls::get_property(vec!["plugin_root_id"]) {
            let root_id = String::from_utf8_lossy(&root_id).into_owned();
            if root_id != ROOT_ID {
                log::error!(
                    "meshserve_filters.wasm has no filter with root_id '{root_id}' (known: {ROOT_ID})"
                );
                return false;
            }
        }
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => Vec::new(),
            Err(status) => {
                log::error!("cannot read the plugin configuration: {status:?}");
                return false;
            }
        };
        match Config::parse(&bytes) {
            Ok(config) => {
                log::info!(
                    "meshserve router configured: {} InferenceService(s)",
                    config.services().len()
                );
                self.shared.borrow_mut().config = Some(Rc::new(config));
                true
            }
            Err(e) => {
                log::error!("{e}; keeping the previous configuration");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.shared.borrow().config.clone()?;
        Some(Box::new(RouterStream {
            context_id,
            shared: Rc::clone(&self.shared),
            config,
            waiting_for_body: false,
            route: None,
            shadow_body: None,
            shadow_token: None,
            response_copy: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct RouterStream {
    context_id: u32,
    shared: Rc<RefCell<Shared>>,
    config: Rc<Config>,
    /// A gRPC request whose model name is still to come in the body.
    waiting_for_body: bool,
    route: Option<Route>,
    /// The request body copied for the shadow, while it streams past.
    shadow_body: Option<Vec<u8>>,
    shadow_token: Option<u32>,
    /// The primary's answer copied for comparison with the shadow's.
    response_copy: Option<Vec<u8>>,
}

fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

impl RouterStream {
    fn decide(&self, body: &[u8], end_of_body: bool) -> Decision {
        let path = request_header(":path").unwrap_or_default();
        let authority = request_header(":authority");
        let (draw, shadow_draw) = {
            let mut shared = self.shared.borrow_mut();
            (shared.draw(), shared.draw())
        };
        decide(
            &self.config,
            &Request {
                path: &path,
                authority: authority.as_deref(),
                header: &request_header,
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
                Action::Continue
            }
        }
    }

    fn reply(&self, reply: &Reply) {
        self.shared.borrow_mut().counters.increment(
            "requests",
            &[
                ("isvc", "none"),
                ("revision", "none"),
                ("outcome", "replied"),
            ],
        );
        let result = if reply.grpc {
            let status = reply.grpc_status().to_string();
            hostcalls::send_http_response(
                200,
                vec![
                    ("content-type", "application/grpc"),
                    ("grpc-status", &status),
                    ("grpc-message", &reply.message),
                ],
                None,
            )
        } else {
            let body = reply.json_body();
            hostcalls::send_http_response(
                u32::from(reply.status),
                vec![("content-type", "application/json")],
                Some(body.as_bytes()),
            )
        };
        if let Err(status) = result {
            log::warn!("cannot send the local reply: {status:?}");
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
        // Envoy does not promise to re-route after a header changes: ask it to.
        if let Err(status) = hostcalls::call_foreign_function("clear_route_cache", Some(&[])) {
            log::warn!("clear_route_cache failed: {status:?}");
            self.shared
                .borrow_mut()
                .counters
                .increment("errors", &[("reason", "clear_route_cache")]);
        }
        {
            let mut shared = self.shared.borrow_mut();
            let choice = match route.choice {
                Choice::Split => "split",
                Choice::Sticky => "sticky",
                Choice::Pinned => "pinned",
                Choice::Only => "only",
            };
            shared.counters.increment(
                "requests",
                &[
                    ("isvc", &route.isvc),
                    ("revision", &route.revision),
                    ("outcome", "routed"),
                ],
            );
            shared.counters.increment(
                "canary",
                &[
                    ("isvc", &route.isvc),
                    ("revision", &route.revision),
                    ("choice", choice),
                ],
            );
        }
        if route.shadow.is_some() {
            self.shadow_body = Some(Vec::new());
            if end_of_stream {
                self.send_shadow();
            }
        }
        self.route = Some(route);
    }

    /// Sends the copied request to the shadow revision, on the root context so the answer
    /// arrives even after this stream is gone.
    fn send_shadow(&mut self) {
        let (Some(route), Some(body)) = (&self.route, self.shadow_body.take()) else {
            return;
        };
        let Some((revision, cluster)) = &route.shadow else {
            return;
        };
        let headers: Vec<(String, String)> = hostcalls::get_map(MapType::HttpRequestHeaders)
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("x-meshserve-") && k != "content-length")
            .collect();
        let mut headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        headers.push((REVISION_HEADER, revision));
        headers.push(("x-meshserve-shadow", "true"));
        let root = self.shared.borrow().root_context_id;
        let _ = hostcalls::set_effective_context(root);
        let sent = hostcalls::dispatch_http_call(
            cluster,
            headers,
            Some(&body),
            Vec::new(),
            SHADOW_TIMEOUT,
        );
        let _ = hostcalls::set_effective_context(self.context_id);
        let mut shared = self.shared.borrow_mut();
        match sent {
            Ok(token) => {
                shared.counters.increment(
                    "shadow",
                    &[
                        ("isvc", &route.isvc),
                        ("revision", revision),
                        ("result", "sent"),
                    ],
                );
                shared.shadows.insert(
                    token,
                    ShadowCall {
                        isvc: route.isvc.clone(),
                        revision: revision.clone(),
                        ..Default::default()
                    },
                );
                self.shadow_token = Some(token);
                self.response_copy = Some(Vec::new());
            }
            Err(status) => {
                log::warn!("cannot send the shadow copy to {cluster}: {status:?}");
                shared.counters.increment(
                    "shadow",
                    &[
                        ("isvc", &route.isvc),
                        ("revision", revision),
                        ("result", "error"),
                    ],
                );
            }
        }
    }
}

impl Context for RouterStream {}

impl HttpContext for RouterStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let decision = self.decide(&[], end_of_stream);
        if decision == Decision::NeedBody && end_of_stream {
            return self.apply(self.decide(&[], true), true);
        }
        self.apply(decision, end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
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
        let failed = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
            .is_none_or(|s| !s.starts_with('2'));
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
}

impl RouterStream {
    /// Hands the primary's answer (or `None`: not comparable) to the shadow call.
    fn settle_primary(&mut self, answer: Option<Vec<u8>>) {
        let Some(token) = self.shadow_token.take() else {
            return;
        };
        let mut shared = self.shared.borrow_mut();
        if let Some(call) = shared.shadows.get_mut(&token) {
            call.primary = Some(answer);
        }
        shared.settle(token);
    }
}
