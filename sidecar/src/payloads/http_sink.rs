//! Sending events to an HTTP sink without overrunning it: at most a window of sends in flight,
//! on kept-alive connections, the window grown while the sink keeps up and halved when it
//! slows, fails or times out (additive increase, multiplicative decrease, as TCP does). A
//! sink that closes every connection (HTTP/1.0, `connection: close`: Python's `http.server`)
//! takes a new connection per event, and its listen backlog is often 5: it gets at most
//! [`WINDOW_START`] at once, so its backlog never overflows (a dropped SYN costs a second).
//! A slow sink sees a few connections, never a burst.
//!
//! Each event goes as a CloudEvent in binary mode (its `ce-*` headers and payload, as KServe's
//! logger sends them), or, in batched mode, many at once as one
//! `application/cloudevents-batch+json` array of structured events.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshserve_filter_core::logger::Event;
use tokio::task::JoinSet;

use super::cloudevents::json_line;
use super::metrics::PayloadMetrics;

/// Sends in flight to one sink: where the window starts (KServe's agent runs 5 workers), and
/// its bounds: the most for a sink that keeps connections alive (the pool keeps as many), and
/// the start for one that closes them.
pub const WINDOW_START: usize = 4;
pub const WINDOW_MAX: usize = 16;
/// A send answered slower than this counts as the sink slowing down.
const SLOW: Duration = Duration::from_secs(1);
/// A sink's answer is awaited this long.
const SINK_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff before a retry: doubling from the first to the last.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A sink that refuses a send outright (a 4xx other than 408 and 429) gets this many attempts
/// before its events are dropped (counted, logged): one bad event must not stall every later one.
const REFUSALS: u32 = 10;
/// The content type of CloudEvents' batched mode.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One HTTP request to the sink: one event (binary mode) or several (batched mode).
#[derive(Debug)]
struct Post {
    headers: Vec<(String, String)>,
    body: Bytes,
    events: u64,
}

/// What one attempt came to.
enum Outcome {
    /// Taken; whether the sink keeps the connection alive.
    Taken { keeps_alive: bool },
    /// Worth another attempt (unreachable, timed out, 5xx, 408, 429); the sink is struggling.
    Retry(String),
    /// The sink refused it (another 4xx).
    Refused(http::StatusCode),
    /// HTTP cannot carry it: it can never be delivered.
    Unsendable(String),
}

/// The congestion window: how many sends may be in flight, at most `cap`.
#[derive(Debug, Clone, Copy)]
struct Window {
    size: f64,
    cap: usize,
}

impl Window {
    fn new() -> Window {
        Window {
            size: WINDOW_START as f64,
            cap: WINDOW_MAX,
        }
    }

    fn size(self) -> usize {
        (self.size as usize).clamp(1, self.cap)
    }

    /// One more send in flight per window's worth of quick answers.
    fn grow(&mut self) {
        self.size = (self.size + 1.0 / self.size).min(self.cap as f64);
    }

    fn shrink(&mut self) {
        self.size = (self.size / 2.0).max(1.0);
    }

    /// The sink closes its connections: every send is a new one, held to the start.
    fn one_connection_per_send(&mut self) {
        self.cap = WINDOW_START;
        self.size = self.size.min(WINDOW_START as f64);
    }
}

/// An HTTP sink, its connections and its window; it lives as long as delivery does.
#[derive(Debug)]
pub struct HttpSink {
    client: HttpClient,
    uri: http::Uri,
    batched: bool,
    window: Window,
}

impl HttpSink {
    pub fn new(uri: http::Uri, batched: bool) -> HttpSink {
        // No Nagle: a request's headers and body leave at once, instead of the body waiting out
        // the sink's delayed ACK (40 ms a request on Linux).
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(WINDOW_MAX)
            .build(connector);
        HttpSink {
            client,
            uri,
            batched,
            window: Window::new(),
        }
    }

    /// Delivers `events`, each until the sink takes it (or refuses it for good); returns once
    /// none is left.
    pub async fn deliver(&mut self, events: Vec<Event>, metrics: &PayloadMetrics) {
        let posts: Vec<Arc<Post>> = if self.batched {
            vec![Arc::new(batch(&events))]
        } else {
            events.into_iter().map(|e| Arc::new(binary(e))).collect()
        };
        // (post, attempts so far, refusals so far)
        let mut pending: VecDeque<(usize, u32, u32)> =
            (0..posts.len()).map(|i| (i, 0, 0)).collect();
        let mut in_flight = JoinSet::new();
        // Which post each attempt carries, so that one that ended abnormally is tried again.
        let mut carrying: HashMap<tokio::task::Id, (usize, u32, u32)> = HashMap::new();
        loop {
            while in_flight.len() < self.window.size()
                && let Some((i, attempts, refusals)) = pending.pop_front()
            {
                let (client, uri) = (self.client.clone(), self.uri.clone());
                let post = Arc::clone(&posts[i]);
                let task = in_flight.spawn(async move {
                    if attempts > 0 {
                        tokio::time::sleep(backoff(attempts)).await;
                    }
                    let started = Instant::now();
                    let outcome = attempt(&client, &uri, &post).await;
                    (outcome, started.elapsed())
                });
                carrying.insert(task.id(), (i, attempts, refusals));
            }
            let (id, ended) = match in_flight.join_next_with_id().await {
                None => return,
                Some(Ok((id, ended))) => (id, Some(ended)),
                Some(Err(e)) => (e.id(), None),
            };
            let Some((i, attempts, refusals)) = carrying.remove(&id) else {
                continue;
            };
            let Some((outcome, took)) = ended else {
                // The attempt ended without an outcome (it cannot panic; were it cancelled):
                // the post goes again, nothing is lost.
                pending.push_back((i, attempts + 1, refusals));
                continue;
            };
            let events = posts[i].events;
            match outcome {
                Outcome::Taken { keeps_alive } => {
                    if !keeps_alive {
                        self.window.one_connection_per_send();
                    }
                    if took < SLOW {
                        self.window.grow();
                    } else {
                        self.window.shrink();
                    }
                }
                Outcome::Retry(why) => {
                    self.window.shrink();
                    metrics.retried.inc_by(events);
                    let attempts = attempts + 1;
                    if attempts == 1 || attempts.is_power_of_two() {
                        tracing::warn!(sink = %self.uri, attempts, window = self.window.size(), "{why}; retrying");
                    }
                    pending.push_back((i, attempts, refusals));
                }
                Outcome::Refused(status) if refusals + 1 >= REFUSALS => {
                    tracing::error!(sink = %self.uri, %status, events, "the sink refuses an event; dropped after {REFUSALS} attempts");
                    metrics
                        .dropped
                        .with_label_values(&["refused_by_sink"])
                        .inc_by(events);
                }
                Outcome::Refused(status) => {
                    metrics.retried.inc_by(events);
                    tracing::warn!(sink = %self.uri, %status, "the sink refused an event; retrying");
                    pending.push_back((i, attempts + 1, refusals + 1));
                }
                Outcome::Unsendable(why) => {
                    tracing::error!(error = %why, "an event cannot be sent over HTTP; dropped");
                    metrics
                        .dropped
                        .with_label_values(&["unsendable"])
                        .inc_by(events);
                }
            }
        }
    }
}

fn backoff(attempts: u32) -> Duration {
    BACKOFF_FIRST
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(BACKOFF_MAX)
}

/// A CloudEvent in binary mode: its `ce-*` and `content-type` headers, its payload.
fn binary(event: Event) -> Post {
    Post {
        headers: event.headers,
        body: Bytes::from(event.body),
        events: 1,
    }
}

/// Events in CloudEvents' batched mode: a JSON array of structured events.
fn batch(events: &[Event]) -> Post {
    let mut body = Vec::with_capacity(events.iter().map(|e| e.body.len() + 512).sum());
    body.push(b'[');
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&json_line(event));
    }
    body.push(b']');
    Post {
        headers: vec![("content-type".to_owned(), BATCH_CONTENT_TYPE.to_owned())],
        body: Bytes::from(body),
        events: events.len() as u64,
    }
}

async fn attempt(client: &HttpClient, uri: &http::Uri, post: &Post) -> Outcome {
    let mut request = http::Request::post(uri.clone());
    for (name, value) in &post.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = match request.body(Full::new(post.body.clone())) {
        Ok(request) => request,
        Err(e) => return Outcome::Unsendable(e.to_string()),
    };
    match tokio::time::timeout(SINK_TIMEOUT, client.request(request)).await {
        Ok(Ok(response)) if response.status().is_success() => Outcome::Taken {
            keeps_alive: response.version() != http::Version::HTTP_10
                && !response
                    .headers()
                    .get(http::header::CONNECTION)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        },
        Ok(Ok(response)) => {
            let status = response.status();
            if status.is_client_error()
                && status != http::StatusCode::REQUEST_TIMEOUT
                && status != http::StatusCode::TOO_MANY_REQUESTS
            {
                Outcome::Refused(status)
            } else {
                Outcome::Retry(format!("the sink answered {status}"))
            }
        }
        Ok(Err(e)) => Outcome::Retry(format!("cannot reach the sink: {e}")),
        Err(_) => Outcome::Retry("the sink did not answer in time".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_grows_slowly_and_halves_at_once() {
        let mut window = Window::new();
        let mut answers = 0;
        while window.size() == WINDOW_START {
            window.grow();
            answers += 1;
        }
        assert_eq!(window.size(), WINDOW_START + 1);
        // About one window's worth of quick answers per step (1/size each).
        assert!(
            (WINDOW_START..=WINDOW_START + 1).contains(&answers),
            "{answers} answers to grow by one"
        );
        for _ in 0..1000 {
            window.grow();
        }
        assert_eq!(window.size(), WINDOW_MAX);
        window.shrink();
        assert_eq!(window.size(), WINDOW_MAX / 2);
        for _ in 0..10 {
            window.shrink();
        }
        assert_eq!(window.size(), 1, "never below one");
        for _ in 0..1000 {
            window.grow();
        }
        window.one_connection_per_send();
        assert_eq!(window.size(), WINDOW_START, "a new connection per send");
        for _ in 0..1000 {
            window.grow();
        }
        assert_eq!(window.size(), WINDOW_START);
        assert_eq!(backoff(1), BACKOFF_FIRST);
        assert_eq!(backoff(3), BACKOFF_FIRST * 4);
        assert_eq!(backoff(40), BACKOFF_MAX);
    }

    #[test]
    fn a_batch_is_one_array_of_structured_events() {
        let event = |id: &str| Event {
            headers: vec![
                ("ce-id".into(), id.into()),
                ("ce-type".into(), "t".into()),
                ("content-type".into(), "application/json".into()),
            ],
            body: br#"{"x": 1}"#.to_vec(),
        };
        let post = batch(&[event("1"), event("2")]);
        assert_eq!(post.events, 2);
        let parsed: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
        assert_eq!(parsed[1]["id"], "2");
        assert_eq!(parsed[0]["data"]["x"], 1);
        assert_eq!(post.headers[0].1, BATCH_CONTENT_TYPE);
    }
}
