//! The `logger` root: payload logging (`meshserve_filter_core::logger`).
//!
//! It sits last among meshserve's filters, so it sees what the predictor gets and answers
//! (after the transformer's rewriting of a request, before its rewriting of the answer). A
//! stream of a revision with a logger, if sampled, has its payloads copied as they pass (never
//! held: the request does not wait) up to the configured size; when the stream ends, its events
//! go to the root, which sends them on its next tick to the revision's sidecar (its log intake
//! over the revision's own cluster): the stream may be gone by then, and Envoy cancels callouts
//! of finished streams. An event the intake does not take (unreachable, full, timeout) is
//! counted in `meshserve.logger` with `result` `dropped_*`; the client never knows.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use meshserve_filter_core::config::Config;
use meshserve_filter_core::graph::{GRAPH_HEADER, STEP_HEADER};
use meshserve_filter_core::logger::{
    EXCHANGES_CONTENT_TYPE, Exchange, INTAKE_PATH, LoggerConfig, Payload, encode_exchange,
    event_id, is_inference, rfc3339,
};
use meshserve_filter_core::route::{
    COMPONENT_HEADER, ISVC_HEADER, NAMESPACE_HEADER, REVISION_HEADER,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

use crate::host::{LOGGER_ROOT_ID, Rng, configure, header, request_header};
use crate::metrics::Counters;

/// How often queued events are sent: each tick sends what it gathered in one call per intake,
/// so a longer tick means fewer calls (and spool syncs) for a little more delay of the logs.
const TICK: Duration = Duration::from_millis(20);
/// How long the intake may take to acknowledge an event.
const INTAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most events, and event bytes, waiting for a tick in one worker; beyond them, new ones
/// are dropped (and counted).
const MAX_PENDING: usize = 10_000;
const MAX_PENDING_BYTES: usize = 64 << 20;

/// An exchange on its way to an intake, as its record, and the events it makes there.
#[derive(Debug)]
struct Outgoing {
    cluster: String,
    isvc: String,
    record: Vec<u8>,
    events: usize,
}

impl Outgoing {
    fn size(&self) -> usize {
        self.record.len()
    }
}

/// The most events, and bytes, in one call to an intake (under the sidecar's request limit).
const MAX_BATCH: usize = 1_000;
const MAX_BATCH_BYTES: usize = 8 << 20;

#[derive(Debug, Default)]
struct Shared {
    config: Option<Rc<Config>>,
    counters: Counters,
    rng: Rng,
    pending: Vec<Outgoing>,
    pending_bytes: usize,
    /// Callouts in flight: token -> the InferenceService of each exchange in it, and its
    /// events.
    in_flight: HashMap<u32, Vec<(String, usize)>>,
}

impl Shared {
    fn count(&mut self, isvc: &str, result: &str) {
        self.counters
            .increment("logger", &[("isvc", isvc), ("result", result)]);
    }
}

pub(crate) struct LoggerRoot {
    shared: Rc<RefCell<Shared>>,
}

impl LoggerRoot {
    pub(crate) fn new(context_id: u32) -> Self {
        LoggerRoot {
            shared: Rc::new(RefCell::new(Shared {
                rng: Rng::seeded(context_id),
                ..Default::default()
            })),
        }
    }
}

fn now_nanos() -> u128 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

impl Context for LoggerRoot {
    fn on_done(&mut self) -> bool {
        // The root is going (a new configuration): send what is gathered now.
        self.send_pending();
        true
    }

    fn on_http_call_response(
        &mut self,
        token: u32,
        _num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        let status = header(MapType::HttpCallResponseHeaders, ":status");
        let mut shared = self.shared.borrow_mut();
        let Some(isvcs) = shared.in_flight.remove(&token) else {
            return;
        };
        let result = match status.as_deref() {
            Some(s) if s.starts_with('2') => "sent".to_owned(),
            Some(s) => format!("dropped_{s}"),
            // No answer: the intake was unreachable or timed out.
            None => "dropped_unreachable".to_owned(),
        };
        for (isvc, events) in isvcs {
            for _ in 0..events {
                shared.count(&isvc, &result);
            }
        }
    }
}

impl RootContext for LoggerRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        match configure(LOGGER_ROOT_ID) {
            Some(config) => {
                self.shared.borrow_mut().config = Some(Rc::new(config));
                if let Err(status) = hostcalls::set_tick_period(TICK) {
                    log::warn!("cannot set the tick period: {status:?}");
                }
                log::info!("meshserve logger configured");
                true
            }
            None => false,
        }
    }

    fn on_tick(&mut self) {
        self.send_pending();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.shared.borrow().config.clone()?;
        Some(Box::new(LoggerStream {
            shared: Rc::clone(&self.shared),
            config,
            active: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl LoggerRoot {
    fn send_pending(&mut self) {
        let pending = {
            let mut shared = self.shared.borrow_mut();
            shared.pending_bytes = 0;
            std::mem::take(&mut shared.pending)
        };
        if pending.is_empty() {
            return;
        }
        // One call per intake (cluster) and tick, with every event gathered for it (up to a
        // batch's count and bytes).
        let mut by_cluster: Vec<(String, usize, Vec<Outgoing>)> = Vec::new();
        for outgoing in pending {
            let size = outgoing.size();
            match by_cluster.iter_mut().find(|(c, bytes, group)| {
                *c == outgoing.cluster
                    && group.len() < MAX_BATCH
                    && *bytes + size <= MAX_BATCH_BYTES
            }) {
                Some((_, bytes, group)) => {
                    *bytes += size;
                    group.push(outgoing);
                }
                None => by_cluster.push((outgoing.cluster.clone(), size, vec![outgoing])),
            }
        }
        for (cluster, bytes, group) in by_cluster {
            let mut body = Vec::with_capacity(bytes);
            let mut isvcs = Vec::with_capacity(group.len());
            for outgoing in group {
                body.extend_from_slice(&outgoing.record);
                isvcs.push((outgoing.isvc, outgoing.events));
            }
            let headers = vec![
                (":method", "POST"),
                (":path", INTAKE_PATH),
                (":authority", "meshserve-log-intake"),
                ("content-type", EXCHANGES_CONTENT_TYPE),
            ];
            let sent = hostcalls::dispatch_http_call(
                &cluster,
                headers,
                Some(&body),
                Vec::new(),
                INTAKE_TIMEOUT,
            );
            let mut shared = self.shared.borrow_mut();
            match sent {
                Ok(token) => {
                    shared.in_flight.insert(token, isvcs);
                }
                Err(status) => {
                    log::warn!("cannot send events to {cluster}'s intake: {status:?}");
                    for (isvc, events) in isvcs {
                        for _ in 0..events {
                            shared.count(&isvc, "dropped_unreachable");
                        }
                    }
                }
            }
        }
    }
}

/// A stream being logged.
struct Active {
    logger: LoggerConfig,
    cluster: String,
    exchange: Exchange,
}

struct LoggerStream {
    shared: Rc<RefCell<Shared>>,
    config: Rc<Config>,
    active: Option<Active>,
}

fn copy_chunk(buffer: BufferType, size: usize, payload: &mut Payload, limit: usize) {
    if payload.body.len() >= limit {
        payload.truncated |= size > 0;
        return;
    }
    if let Ok(Some(chunk)) = hostcalls::get_buffer(buffer, 0, size) {
        payload.push(&chunk, limit);
    }
}

impl Context for LoggerStream {}

impl HttpContext for LoggerStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (Some(isvc), Some(namespace), Some(revision)) = (
            request_header(ISVC_HEADER),
            request_header(NAMESPACE_HEADER),
            request_header(REVISION_HEADER),
        ) else {
            return Action::Continue;
        };
        let path = request_header(":path").unwrap_or_default();
        if !is_inference(&path) {
            return Action::Continue;
        }
        let Some((logger, cluster)) = self.config.logger(&isvc, &namespace, &revision) else {
            return Action::Continue;
        };
        let (draw, high, low) = {
            let mut shared = self.shared.borrow_mut();
            (shared.rng.draw(), shared.rng.draw(), shared.rng.draw())
        };
        if !logger.sampled(draw) {
            return Action::Continue;
        }
        let metadata = logger
            .metadata_headers
            .iter()
            .filter_map(|name| Some((name.clone(), request_header(name)?)))
            .collect();
        self.active = Some(Active {
            logger: logger.clone(),
            cluster: cluster.to_owned(),
            exchange: Exchange {
                id: event_id(high, low),
                time: rfc3339(now_nanos()),
                isvc,
                namespace,
                component: request_header(COMPONENT_HEADER).unwrap_or_else(|| "predictor".into()),
                endpoint: revision,
                path,
                metadata,
                request: Payload {
                    content_type: request_header("content-type"),
                    ..Payload::default()
                },
                response: None,
                graph: request_header(GRAPH_HEADER).zip(request_header(STEP_HEADER)),
            },
        });
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if let Some(active) = self.active.as_mut() {
            let limit = active.logger.max_payload_bytes;
            copy_chunk(
                BufferType::HttpRequestBody,
                body_size,
                &mut active.exchange.request,
                limit,
            );
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(active) = self.active.as_mut() {
            let response = |name| header(MapType::HttpResponseHeaders, name);
            let status = response(":status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            active.exchange.response = Some((
                status,
                Payload {
                    content_type: response("content-type"),
                    ..Payload::default()
                },
            ));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if let Some(active) = self.active.as_mut()
            && let Some((_, payload)) = active.exchange.response.as_mut()
        {
            let limit = active.logger.max_payload_bytes;
            copy_chunk(BufferType::HttpResponseBody, body_size, payload, limit);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        let mut shared = self.shared.borrow_mut();
        let mut record = Vec::with_capacity(
            active.exchange.request.body.len()
                + active
                    .exchange
                    .response
                    .as_ref()
                    .map_or(0, |(_, p)| p.body.len())
                + 512,
        );
        let events = encode_exchange(&active.exchange, active.logger.mode, &mut record);
        if events == 0 {
            return;
        }
        let isvc = active.exchange.isvc;
        if shared.pending.len() >= MAX_PENDING
            || shared.pending_bytes + record.len() > MAX_PENDING_BYTES
        {
            for _ in 0..events {
                shared.count(&isvc, "dropped_queue_full");
            }
            return;
        }
        shared.pending_bytes += record.len();
        shared.pending.push(Outgoing {
            cluster: active.cluster,
            isvc,
            record,
            events,
        });
    }
}
