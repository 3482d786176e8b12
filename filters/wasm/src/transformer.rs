//! The `transformer` root: runs an InferenceService's pre- and post-processing
//! (`meshserve_filter_core::transform`) on the requests the router sent to its predictor.
//!
//! It sits after the router in the filter chain and reads the router's `x-meshserve-*`
//! headers. A request it transforms is held (headers and body, up to the transformer's
//! `max_body_bytes`) until the whole body is in, rewritten, and sent on as an Open Inference
//! Protocol request; the model's answer is held likewise and rewritten for the client. Where
//! the configuration says `hold_headers: false` (Istio's WasmPlugin), only the bodies are held:
//! the headers go on first, the request as JSON and both without a length. Bad
//! input gets the transformer's 400/413 with `{"error": "transformer: ..."}`; gRPC passes
//! untouched.

use std::rc::Rc;

use meshserve_filter_core::config::Config;
use meshserve_filter_core::route::{
    COMPONENT_HEADER, ISVC_HEADER, NAMESPACE_HEADER, select_transformer,
};
use meshserve_filter_core::transform::{TRANSFORMED_HEADER, TransformError, Transformer, Wire};
use meshserve_proto::rest::INFERENCE_HEADER_CONTENT_LENGTH;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

use crate::host::{TRANSFORMER_ROOT_ID, configure, header, request_header};
use crate::metrics::Counters;

pub(crate) struct TransformerRoot {
    config: Option<Rc<Config>>,
    counters: Rc<std::cell::RefCell<Counters>>,
}

impl TransformerRoot {
    pub(crate) fn new() -> Self {
        TransformerRoot {
            config: None,
            counters: Rc::default(),
        }
    }
}

impl Context for TransformerRoot {}

impl RootContext for TransformerRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        match configure(TRANSFORMER_ROOT_ID) {
            Some(config) => {
                let count = config
                    .services()
                    .iter()
                    .filter(|s| s.transformer.is_some())
                    .count();
                log::info!(
                    "meshserve transformer configured: {count} InferenceService(s) with a transformer"
                );
                self.config = Some(Rc::new(config));
                true
            }
            None => false,
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(TransformStream {
            config,
            counters: Rc::clone(&self.counters),
            active: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A request being transformed.
struct Active {
    /// Index of the service in the configuration.
    service: usize,
    isvc: String,
    wire: Wire,
    /// Whether the request body is rewritten (else only the response).
    request: bool,
    /// A call to the built-in explainer: a V1 client gets the explanation's document, a V2
    /// client the explainer's answer as it is.
    explain: bool,
    /// The client's `Inference-Header-Content-Length`.
    header_length: Option<usize>,
    /// Whether the model answered 2xx (set on its response headers).
    response: bool,
    response_header_length: Option<usize>,
}

struct TransformStream {
    config: Rc<Config>,
    counters: Rc<std::cell::RefCell<Counters>>,
    active: Option<Active>,
}

impl TransformStream {
    fn transformer(&self) -> Option<&Transformer> {
        let active = self.active.as_ref()?;
        self.config
            .services()
            .get(active.service)?
            .transformer
            .as_ref()
    }

    fn count(&self, phase: &str, outcome: &str) {
        let isvc = self.active.as_ref().map_or("none", |a| a.isvc.as_str());
        self.counters.borrow_mut().increment(
            "transform",
            &[("isvc", isvc), ("phase", phase), ("outcome", outcome)],
        );
    }

    /// Answers the client with the transformer's error.
    fn refuse(&mut self, error: &TransformError) -> Action {
        self.count("request", &format!("refused_{}", error.status));
        if let Err(status) = hostcalls::send_http_response(
            u32::from(error.status),
            vec![("content-type", "application/json")],
            Some(&error.body()),
        ) {
            log::warn!("cannot send the transformer's reply: {status:?}");
        }
        self.active = None;
        Action::Pause
    }
}

fn set(map: MapType, name: &str, value: Option<&str>) {
    if let Err(status) = hostcalls::set_map_value(map, name, value) {
        log::warn!("cannot set {name}: {status:?}");
    }
}

fn header_length(map: MapType) -> Option<usize> {
    header(map, INFERENCE_HEADER_CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())
}

impl Context for TransformStream {}

impl HttpContext for TransformStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let (Some(isvc), Some(namespace), Some(component)) = (
            request_header(ISVC_HEADER),
            request_header(NAMESPACE_HEADER),
            request_header(COMPONENT_HEADER),
        ) else {
            return Action::Continue;
        };
        let method = request_header(":method").unwrap_or_default();
        let path = request_header(":path").unwrap_or_default();
        let Some(selected) =
            select_transformer(&self.config, &isvc, &namespace, &component, &method, &path)
        else {
            return Action::Continue;
        };
        let request = selected.transformer.transforms_request(selected.wire);
        let limit = selected.transformer.limits().max_body_bytes;
        let too_large = request
            .then(|| request_header("content-length"))
            .flatten()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > limit)
            .map(|n| selected.transformer.body_too_large(n));
        let new_path = selected.path.clone();
        self.active = Some(Active {
            service: selected.service,
            isvc,
            wire: selected.wire,
            request,
            explain: selected.explain,
            header_length: header_length(MapType::HttpRequestHeaders),
            response: false,
            response_header_length: None,
        });
        if let Some(error) = too_large {
            return self.refuse(&error);
        }
        set(
            MapType::HttpRequestHeaders,
            TRANSFORMED_HEADER,
            Some("true"),
        );
        if !request {
            return Action::Continue;
        }
        if end_of_stream {
            return self.refuse(&TransformError::bad("the request has no body"));
        }
        // The body will change: its length and form are set again when it is rewritten.
        set(MapType::HttpRequestHeaders, "content-length", None);
        set(
            MapType::HttpRequestHeaders,
            INFERENCE_HEADER_CONTENT_LENGTH,
            None,
        );
        if let Some(path) = new_path {
            set(MapType::HttpRequestHeaders, ":path", Some(&path));
        }
        if !self.config.hold_headers() {
            // The headers go on now (Istio's WasmPlugin cannot hold them): the rewritten
            // body will be JSON, sent chunked.
            set(
                MapType::HttpRequestHeaders,
                "content-type",
                Some("application/json"),
            );
            return Action::Continue;
        }
        // Hold the headers until the body is rewritten (needs Envoy's
        // `allow_on_headers_stop_iteration`, which the renderer sets).
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(active) = self.active.as_ref().filter(|a| a.request) else {
            return Action::Continue;
        };
        let (wire, header_length) = (active.wire, active.header_length);
        let Some(transformer) = self.transformer() else {
            return Action::Continue;
        };
        if body_size > transformer.limits().max_body_bytes {
            let error = transformer.body_too_large(body_size);
            return self.refuse(&error);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let held = self.config.hold_headers();
        let encoded = match transformer.request_as(wire, &body, header_length, held) {
            Ok(encoded) => encoded,
            Err(error) => return self.refuse(&error),
        };
        if let Err(status) =
            hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_size, &encoded.body)
        {
            log::warn!("cannot replace the request body: {status:?}");
            return self.refuse(&TransformError::internal(
                "the transformed request could not be sent",
            ));
        }
        if !held {
            // Its headers are gone already, JSON and without a length.
            self.count("request", "ok");
            return Action::Continue;
        }
        let length = encoded.body.len().to_string();
        set(MapType::HttpRequestHeaders, "content-length", Some(&length));
        match encoded.header_length {
            Some(n) => {
                set(
                    MapType::HttpRequestHeaders,
                    "content-type",
                    Some("application/octet-stream"),
                );
                set(
                    MapType::HttpRequestHeaders,
                    INFERENCE_HEADER_CONTENT_LENGTH,
                    Some(&n.to_string()),
                );
            }
            None => set(
                MapType::HttpRequestHeaders,
                "content-type",
                Some("application/json"),
            ),
        }
        self.count("request", "ok");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(active) = self.active.as_mut() else {
            return Action::Continue;
        };
        let ok =
            header(MapType::HttpResponseHeaders, ":status").is_some_and(|s| s.starts_with('2'));
        // Errors keep the model's `{"error": ...}`, the same shape in V1 and V2; a V2
        // explainer's answer is already the client's.
        if !ok || end_of_stream || (active.explain && active.wire == Wire::V2) {
            self.active = None;
            return Action::Continue;
        }
        active.response = true;
        active.response_header_length = header_length(MapType::HttpResponseHeaders);
        set(MapType::HttpResponseHeaders, "content-length", None);
        set(
            MapType::HttpResponseHeaders,
            INFERENCE_HEADER_CONTENT_LENGTH,
            None,
        );
        set(
            MapType::HttpResponseHeaders,
            "content-type",
            Some("application/json"),
        );
        if self.config.hold_headers() {
            Action::Pause
        } else {
            // The status and these headers go on now; the body is rewritten below.
            Action::Continue
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(active) = self.active.as_ref().filter(|a| a.response) else {
            return Action::Continue;
        };
        if !end_of_stream {
            return Action::Pause;
        }
        let (wire, header_length) = (active.wire, active.response_header_length);
        let explain = active.explain;
        let Some(transformer) = self.transformer() else {
            return Action::Continue;
        };
        let body = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let answer = match explain {
            true => transformer.explanation(&body, header_length),
            false => transformer.response(wire, &body, header_length),
        };
        let (answer, outcome) = match answer {
            Ok(answer) => (answer, "ok"),
            Err(error) if !self.config.hold_headers() => {
                // The client has its 200 already: end the stream rather than send an error
                // body under it.
                log::warn!("transformer: {error} (the response is reset)");
                self.count("response", "reset");
                if let Err(status) = hostcalls::reset_http_response() {
                    log::warn!("cannot reset the response: {status:?}");
                }
                return Action::Pause;
            }
            Err(error) => {
                log::warn!("transformer: {error}");
                set(
                    MapType::HttpResponseHeaders,
                    ":status",
                    Some(&error.status.to_string()),
                );
                (error.body(), "failed")
            }
        };
        if let Err(status) =
            hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &answer)
        {
            log::warn!("cannot replace the response body: {status:?}");
        }
        if self.config.hold_headers() {
            set(
                MapType::HttpResponseHeaders,
                "content-length",
                Some(&answer.len().to_string()),
            );
        }
        self.count("response", outcome);
        Action::Continue
    }
}
