//! The router's InferenceGraph runs: the stream's body is buffered, then each step the
//! [`meshserve_filter_core::graph::Run`] asks for is dispatched to Envoy's hop listener (an
//! internal listener with the same filters), so it is routed, transformed and logged like a
//! direct call; the graph's answer goes back as a local reply.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use meshserve_filter_core::config::Config;
use meshserve_filter_core::graph::{Answer, Call, GRAPH_HEADER, HOP, Progress, Run, STEP_HEADER};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

use crate::host::{header, request_header};

/// How far the filter's clock may be from Envoy's timers when a call times out.
const CLOCK_SLACK: Duration = Duration::from_millis(5);
/// Request headers a step inherits from the graph's request.
const PROPAGATED: [&str; 5] = [
    "authorization",
    "traceparent",
    "tracestate",
    "x-request-id",
    "content-type",
];

/// Whether this stream arrived on the hop listener (Envoy's `xds.filter_chain_name`).
pub(crate) fn on_hop_listener() -> bool {
    hostcalls::get_property(vec!["xds", "filter_chain_name"])
        .ok()
        .flatten()
        .is_some_and(|name| name == HOP.as_bytes())
}

fn now() -> Duration {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default()
}

/// A step call in flight.
#[derive(Debug)]
struct Sent {
    id: u64,
    step: String,
    sent: Duration,
    timeout: Duration,
}

/// One graph request on a stream.
pub(crate) struct GraphStream {
    config: Rc<Config>,
    index: usize,
    headers: Vec<(String, String)>,
    deadline: Duration,
    run: Option<Run>,
    sent: HashMap<u32, Sent>,
}

/// What the stream does when a graph has moved on.
pub(crate) enum Outcome {
    /// Calls are out: keep the stream paused.
    Waiting,
    /// The graph answered (the local reply is sent): its status.
    Answered(u16),
}

impl GraphStream {
    /// A graph request whose headers just arrived (they are copied now: Envoy shows them only
    /// until the body is in).
    pub(crate) fn new(config: Rc<Config>, index: usize) -> GraphStream {
        let timeout = config.graphs().get(index).map_or(0, |g| g.timeout_ms);
        let headers = PROPAGATED
            .iter()
            .filter_map(|name| Some(((*name).to_owned(), request_header(name)?)))
            .collect();
        GraphStream {
            config,
            index,
            headers,
            deadline: now() + Duration::from_millis(timeout),
            run: None,
            sent: HashMap::new(),
        }
    }

    pub(crate) fn name(&self) -> &str {
        self.config
            .graphs()
            .get(self.index)
            .map_or("", |g| g.name.as_str())
    }

    /// Starts the run on the whole request body.
    pub(crate) fn start(&mut self, body: Vec<u8>, draw: &mut dyn FnMut() -> u64) -> Outcome {
        let config = Rc::clone(&self.config);
        let Some(graph) = config.graphs().get(self.index) else {
            return self.reply(Answer::error(500, "the graph is gone".into()));
        };
        let (run, progress) = Run::start(graph, body, draw);
        self.run = Some(run);
        self.proceed(progress, draw)
    }

    /// Takes the answer to the call behind `token` (a response, or Envoy's failure to get one).
    pub(crate) fn answered(
        &mut self,
        token: u32,
        body_size: usize,
        draw: &mut dyn FnMut() -> u64,
    ) -> Outcome {
        let Some(sent) = self.sent.remove(&token) else {
            return Outcome::Waiting;
        };
        let status =
            header(MapType::HttpCallResponseHeaders, ":status").and_then(|s| s.parse::<u16>().ok());
        let limit = self.config.limits().graph_answer_bytes;
        // Envoy answers a call it timed out itself with a 504 of its own (or none): the
        // wall clock the filter reads and Envoy's timer may differ by a little.
        let timed_out = now().saturating_sub(sent.sent) + CLOCK_SLACK >= sent.timeout;
        let answer = match status {
            None | Some(504) if timed_out => Answer::error(
                504,
                format!(
                    "{}: no answer within {} ms",
                    self.at(&sent.step),
                    sent.timeout.as_millis()
                ),
            ),
            Some(_) if body_size > limit => Answer::error(
                502,
                format!("{}: the answer is over {limit} bytes", self.at(&sent.step)),
            ),
            Some(status) => Answer {
                status,
                body: hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            },
            None => Answer::error(
                502,
                format!("{}: the step could not be reached", self.at(&sent.step)),
            ),
        };
        self.feed(sent.id, answer, draw)
    }

    fn at(&self, step: &str) -> String {
        let (node, step) = step.split_once('/').unwrap_or((step, ""));
        format!("graph '{}' node '{node}' step '{step}'", self.name())
    }

    fn feed(&mut self, id: u64, answer: Answer, draw: &mut dyn FnMut() -> u64) -> Outcome {
        let config = Rc::clone(&self.config);
        let (Some(run), Some(graph)) = (self.run.as_mut(), config.graphs().get(self.index)) else {
            return Outcome::Waiting;
        };
        let progress = run.answer(graph, id, answer, draw);
        self.proceed(progress, draw)
    }

    /// Makes the calls a run asks for; a call that cannot be made is answered at once.
    fn proceed(&mut self, mut progress: Progress, draw: &mut dyn FnMut() -> u64) -> Outcome {
        let mut failed: VecDeque<(u64, Answer)> = VecDeque::new();
        loop {
            match progress {
                Progress::Done(answer) => return self.reply(answer),
                Progress::Calls(calls) => {
                    for call in calls {
                        if let Err(answer) = self.dispatch(&call) {
                            failed.push_back((call.id, answer));
                        }
                    }
                }
            }
            let Some((id, answer)) = failed.pop_front() else {
                return Outcome::Waiting;
            };
            let config = Rc::clone(&self.config);
            let (Some(run), Some(graph)) = (self.run.as_mut(), config.graphs().get(self.index))
            else {
                return Outcome::Waiting;
            };
            progress = run.answer(graph, id, answer, draw);
        }
    }

    fn dispatch(&mut self, call: &Call) -> Result<(), Answer> {
        let graph = self.config.graphs().get(self.index);
        let step_limit = graph
            .and_then(|g| g.step_timeout_ms)
            .map_or(Duration::MAX, Duration::from_millis);
        let sent = now();
        let timeout = self.deadline.saturating_sub(sent).min(step_limit);
        if timeout.is_zero() {
            return Err(Answer::error(
                504,
                format!(
                    "{}: the graph's time ran out before it",
                    self.at(&call.step)
                ),
            ));
        }
        let name = self.name().to_owned();
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "POST"),
            (":path", &call.target.path),
            (":authority", &call.target.authority),
            (":scheme", "http"),
        ];
        // Which graph and step a call is: for the mesh's own filters (the hop listener), not
        // for a URL outside it.
        if call.target.cluster == HOP {
            headers.extend([
                (GRAPH_HEADER, name.as_str()),
                (STEP_HEADER, call.step.as_str()),
            ]);
        }
        headers.extend(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if !self.headers.iter().any(|(k, _)| k == "content-type") {
            headers.push(("content-type", "application/json"));
        }
        match hostcalls::dispatch_http_call(
            &call.target.cluster,
            headers,
            Some(&call.body),
            Vec::new(),
            timeout,
        ) {
            Ok(token) => {
                self.sent.insert(
                    token,
                    Sent {
                        id: call.id,
                        step: call.step.clone(),
                        sent,
                        timeout,
                    },
                );
                Ok(())
            }
            Err(status) => {
                log::warn!(
                    "cannot call {} for {}: {status:?}",
                    call.target.cluster,
                    call.step
                );
                Err(Answer::error(
                    502,
                    format!("{}: the step could not be called", self.at(&call.step)),
                ))
            }
        }
    }

    fn reply(&mut self, answer: Answer) -> Outcome {
        self.run = None;
        let content_type = if answer.is_json() {
            "application/json"
        } else {
            "application/octet-stream"
        };
        let name = self.name().to_owned();
        if let Err(status) = hostcalls::send_http_response(
            u32::from(answer.status),
            vec![("content-type", content_type), (GRAPH_HEADER, &name)],
            Some(&answer.body),
        ) {
            log::warn!("cannot send the graph's answer: {status:?}");
        }
        Outcome::Answered(answer.status)
    }
}
