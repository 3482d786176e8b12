//! `meshserve up`'s web console, on a loopback admin address of its own (never on Envoy's
//! public listener): each InferenceService, its revisions and their state, the configured
//! split beside the split Envoy's router made, request rates, latency and errors per
//! revision, the last payload-log events, the canary controls (the same change
//! [`canary::apply`] makes for `meshserve canary`), and a "try it" panel that runs the
//! transformer's pre-processing in the page with the `@meshserve/web` package and sends the
//! tensor through Envoy.
//!
//! The page, its style and script are compiled into the binary (`assets/`); the package's two
//! files are served from `filters/web/pkg/web`, where `scripts/build-web.sh` builds them.
//!
//! What it serves, besides the page:
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/api/mesh` | the [`view`] of every service and revision |
//! | GET | `/api/events` | the last payload-log events of every revision that logs |
//! | POST | `/api/canary` | `{"isvc", "canary"?, "action": "percent" \| "promote" \| "rollback", "percent"?}` |
//! | POST | `/api/infer/v1/models/…`, `/api/infer/v2/models/…` | sent on to Envoy's listener |
//!
//! A browser page on another site cannot drive it: requests must name the console's own
//! loopback address as `Host` (no DNS rebinding), a `POST` must carry
//! `x-meshserve-console: 1` (which a cross-site page cannot send without a CORS preflight,
//! which this server never grants) and, where the browser says where it comes from, the
//! console's own `Origin`.

pub mod view;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};

use crate::canary::{self, Change};
use crate::http::fetch;
use crate::render::FILTER_CONFIG_FILE;
use view::{EnvoyStats, History, Sample};

/// How many payload events each logging sidecar keeps for the console (`--log-recent`).
pub const RECENT_EVENTS: usize = 50;
/// The most events `/api/events` answers, newest first.
const EVENTS_SHOWN: usize = 20;
/// The console's address (`127.0.0.1:PORT`, as text), in the state directory.
pub const ADDRESS_FILE: &str = "console-address";
/// The header a `POST` must carry.
pub const CONSOLE_HEADER: &str = "x-meshserve-console";
/// The largest body the console takes (a picture's tensor for "try it", a canary change).
const MAX_BODY: usize = 16 << 20;
/// A client gets this long to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the console waits for Envoy's admin API or a sidecar's metrics.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long "try it" waits for Envoy's answer (an explanation takes a while).
const INFER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client gets to send a request's body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The most connections the console serves at once; more are closed as they come.
const MAX_CONNECTIONS: usize = 64;

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_CSS: &str = include_str!("assets/console.css");
const CONSOLE_JS: &str = include_str!("assets/console.js");
/// The package files the page loads, from [`ConsoleSpec::web_pkg`].
const PKG_FILES: [(&str, &str); 2] = [
    ("meshserve_web.js", "text/javascript; charset=utf-8"),
    ("meshserve_web_bg.wasm", "application/wasm"),
];
const SECURITY_HEADERS: [(&str, &str); 4] = [
    (
        "content-security-policy",
        "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; img-src 'self' blob: data:; style-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
];

/// A revision's sidecar, as the console reads it.
#[derive(Debug, Clone)]
pub struct Sidecar {
    pub isvc: String,
    pub revision: String,
    /// Its REST address (`/metrics`, `/meshserve/events/recent`).
    pub http: SocketAddr,
    /// Whether it logs payloads (and keeps the last events).
    pub logs: bool,
}

/// What the console reads and changes.
#[derive(Debug, Clone)]
pub struct ConsoleSpec {
    /// `meshserve up`'s state directory, with the filter configuration.
    pub state: PathBuf,
    /// The revisions' states file (cold, waking, warm) that `up` keeps.
    pub states: PathBuf,
    pub envoy_admin: SocketAddr,
    /// Envoy's public listener, where "try it" sends requests.
    pub listener: SocketAddr,
    pub sidecars: Vec<Sidecar>,
    /// `@meshserve/web`'s browser build (`filters/web/pkg/web`), if it is there.
    pub web_pkg: Option<PathBuf>,
}

struct Console {
    spec: ConsoleSpec,
    /// The console's own address: the only `Host` (and `Origin`) it answers.
    address: SocketAddr,
    history: Mutex<History>,
}

/// Binds the console on loopback (`port` 0: the OS picks), writes its address into the state
/// directory's [`ADDRESS_FILE`] and serves it in the background; returns the address.
pub async fn start(port: u16, spec: ConsoleSpec) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    let address = listener.local_addr()?;
    let file = spec.state.join(ADDRESS_FILE);
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, address.to_string())?;
    std::fs::rename(&tmp, &file)?;
    let console = Arc::new(Console {
        spec,
        address,
        history: Mutex::new(History::default()),
    });
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                continue;
            };
            let console = Arc::clone(&console);
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |request| {
                    let console = Arc::clone(&console);
                    async move { Ok::<_, std::convert::Infallible>(console.answer(request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(address)
}

type Answer = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn json_answer(status: StatusCode, body: &Value) -> Answer {
    respond(status, "application/json", body.to_string())
}

fn error(status: StatusCode, message: &str) -> Answer {
    json_answer(status, &json!({ "error": message }))
}

impl Console {
    async fn answer(&self, request: Request<Incoming>) -> Answer {
        if let Err((status, message)) = self.allowed(&request) {
            return error(status, &message);
        }
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        match (method, path.as_str()) {
            (Method::GET, "/") => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML),
            (Method::GET, "/console.css") => {
                respond(StatusCode::OK, "text/css; charset=utf-8", CONSOLE_CSS)
            }
            (Method::GET, "/console.js") => {
                respond(StatusCode::OK, "text/javascript; charset=utf-8", CONSOLE_JS)
            }
            (Method::GET, p) if p.starts_with("/pkg/") => self.package_file(&p["/pkg/".len()..]),
            (Method::GET, "/api/mesh") => self.mesh().await,
            (Method::GET, "/api/events") => self.events().await,
            (Method::POST, "/api/canary") => match body(request, 4096).await {
                Ok(body) => self.canary(&body),
                Err(refused) => *refused,
            },
            (Method::POST, p) if p.starts_with("/api/infer/") => {
                let target = p["/api/infer".len()..].to_owned();
                self.infer(&target, request).await
            }
            (_, "/" | "/console.css" | "/console.js" | "/api/mesh" | "/api/events") => {
                error(StatusCode::METHOD_NOT_ALLOWED, &format!("{path} takes GET"))
            }
            (_, "/api/canary") => error(StatusCode::METHOD_NOT_ALLOWED, "/api/canary takes POST"),
            _ => error(StatusCode::NOT_FOUND, &format!("no console page at {path}")),
        }
    }

    /// Refuses requests not meant for this console (see the module's doc).
    fn allowed(&self, request: &Request<Incoming>) -> Result<(), (StatusCode, String)> {
        let headers = request.headers();
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if !host.is_some_and(|h| self.is_own(h)) {
            return Err((
                StatusCode::MISDIRECTED_REQUEST,
                format!("the console answers requests for {} only", self.address),
            ));
        }
        if request.method() == Method::GET || request.method() == Method::HEAD {
            return Ok(());
        }
        if headers.get(CONSOLE_HEADER).and_then(|v| v.to_str().ok()) != Some("1") {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "changes need the header {CONSOLE_HEADER}: 1 (the console's page sends it)"
                ),
            ));
        }
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        if let Some(origin) = origin
            && !origin
                .strip_prefix("http://")
                .is_some_and(|host| self.is_own(host))
        {
            return Err((
                StatusCode::FORBIDDEN,
                "changes come from the console's own page only".into(),
            ));
        }
        Ok(())
    }

    /// Whether `host` (a `Host` header, or an origin's host) names this console.
    fn is_own(&self, host: &str) -> bool {
        let port = self.address.port().to_string();
        match host.rsplit_once(':') {
            Some((name, p)) => p == port && matches!(name, "127.0.0.1" | "localhost"),
            None => false,
        }
    }

    fn package_file(&self, name: &str) -> Answer {
        let Some((file, content_type)) = PKG_FILES.iter().find(|(f, _)| *f == name) else {
            return error(StatusCode::NOT_FOUND, &format!("no package file {name}"));
        };
        let Some(dir) = &self.spec.web_pkg else {
            return error(
                StatusCode::NOT_FOUND,
                "the browser package is not built: bash scripts/build-web.sh",
            );
        };
        match std::fs::read(dir.join(file)) {
            Ok(bytes) => respond(StatusCode::OK, content_type, bytes),
            Err(e) => error(
                StatusCode::NOT_FOUND,
                &format!("{}: {e}", dir.join(file).display()),
            ),
        }
    }

    /// `/api/mesh`: Envoy's stats and every warm sidecar's metrics read now, measured
    /// against the reading a window ago.
    async fn mesh(&self) -> Answer {
        let config = match read_json(&self.spec.state.join(FILTER_CONFIG_FILE)) {
            Ok(config) => config,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        };
        let states = read_json(&self.spec.states).unwrap_or(Value::Null);
        let stats_text = fetch(
            self.spec.envoy_admin,
            Method::GET,
            "/stats?format=json&usedonly",
            HeaderMap::new(),
            Bytes::new(),
            FETCH_TIMEOUT,
        )
        .await;
        let stats = match stats_text.map(|r| EnvoyStats::parse(&String::from_utf8_lossy(&r.body))) {
            Ok(Ok(stats)) => stats,
            Ok(Err(e)) | Err(e) => {
                return error(StatusCode::BAD_GATEWAY, &format!("Envoy's admin API: {e}"));
            }
        };
        let warm = self
            .spec
            .sidecars
            .iter()
            .filter(|s| states[&s.isvc][&s.revision] != "cold");
        let mut predict = HashMap::new();
        for (sidecar, metrics) in each_sidecar(warm, "/metrics").await {
            if metrics.status == StatusCode::OK {
                let text = String::from_utf8_lossy(&metrics.body);
                predict.insert(
                    (sidecar.isvc, sidecar.revision),
                    view::predict_buckets(&text),
                );
            }
        }
        let now = Sample {
            at: Instant::now(),
            counts: view::counts(&config, &stats, &predict),
        };
        let base = match self.history.lock() {
            Ok(mut history) => history.push(now.clone()),
            Err(_) => None,
        };
        let mut out = view::view(&config, &states, &stats, &now, base.as_ref());
        if let Some(map) = out.as_object_mut() {
            map.insert("envoy".into(), json!(self.spec.listener.to_string()));
            map.insert("package".into(), json!(self.spec.web_pkg.is_some()));
        }
        json_answer(StatusCode::OK, &out)
    }

    /// `/api/events`: the newest payload events of every logging sidecar that is up.
    async fn events(&self) -> Answer {
        let logging = self.spec.sidecars.iter().filter(|s| s.logs);
        let mut all = Vec::new();
        for (sidecar, answer) in each_sidecar(logging, "/meshserve/events/recent").await {
            let Ok(doc) = serde_json::from_slice::<Value>(&answer.body) else {
                continue;
            };
            for mut event in doc["events"].as_array().cloned().unwrap_or_default() {
                if let Some(map) = event.as_object_mut() {
                    map.insert("revision".into(), json!(sidecar.revision));
                    map.insert("isvc".into(), json!(sidecar.isvc));
                }
                all.push(event);
            }
        }
        // Newest first: by CloudEvent time (RFC 3339, which sorts as text), then id.
        all.sort_by(|a, b| {
            let key = |e: &Value| {
                (
                    e["attributes"]["time"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    e["attributes"]["id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    e["attributes"]["type"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            };
            key(b).cmp(&key(a))
        });
        all.truncate(EVENTS_SHOWN);
        json_answer(StatusCode::OK, &json!({ "events": all }))
    }

    /// `/api/canary`: the change `meshserve canary` makes.
    fn canary(&self, body: &[u8]) -> Answer {
        let change = serde_json::from_slice::<Value>(body)
            .map_err(|e| format!("a JSON object: {e}"))
            .and_then(|request| canary_change(&request));
        let (isvc, name, change) = match change {
            Ok(change) => change,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        };
        // `apply` takes the state directory's lock: one change at a time, this page's or
        // `meshserve canary`'s.
        match canary::apply(&self.spec.state, &isvc, name.as_deref(), &change) {
            Ok(split) => {
                eprintln!("[console] {split}");
                json_answer(StatusCode::OK, &json!({ "split": split }))
            }
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        }
    }

    /// `/api/infer/...`: the page's request sent on to Envoy's listener, and its answer back.
    async fn infer(&self, target: &str, request: Request<Incoming>) -> Answer {
        if !(target.starts_with("/v1/models/") || target.starts_with("/v2/models/")) {
            return error(
                StatusCode::NOT_FOUND,
                "try it sends /v1/models/... and /v2/models/... requests only",
            );
        }
        let mut headers = HeaderMap::new();
        for name in [
            header::CONTENT_TYPE.as_str(),
            "inference-header-content-length",
        ] {
            if let Some(value) = request.headers().get(name) {
                headers.insert(name, value.clone());
            }
        }
        let body = match body(request, MAX_BODY).await {
            Ok(body) => body,
            Err(refused) => return *refused,
        };
        match fetch(
            self.spec.listener,
            Method::POST,
            target,
            headers,
            body,
            INFER_TIMEOUT,
        )
        .await
        {
            Ok(answer) => {
                let content_type = answer
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("application/octet-stream")
                    .to_owned();
                let mut response = respond(answer.status, &content_type, answer.body);
                for name in ["inference-header-content-length", "x-meshserve-revision"] {
                    if let Some(value) = answer.headers.get(name) {
                        response.headers_mut().insert(name, value.clone());
                    }
                }
                response
            }
            Err(e) => error(StatusCode::BAD_GATEWAY, &format!("Envoy's listener: {e}")),
        }
    }
}

/// `GET path` from each of `sidecars` at once (one that hangs costs its timeout once): the
/// answers of those that answered.
async fn each_sidecar<'a>(
    sidecars: impl Iterator<Item = &'a Sidecar>,
    path: &'static str,
) -> Vec<(Sidecar, crate::http::Fetched)> {
    let mut reads = tokio::task::JoinSet::new();
    for sidecar in sidecars.cloned() {
        reads.spawn(async move {
            let answer = fetch(
                sidecar.http,
                Method::GET,
                path,
                HeaderMap::new(),
                Bytes::new(),
                FETCH_TIMEOUT,
            )
            .await;
            (sidecar, answer)
        });
    }
    let mut answers = Vec::new();
    while let Some(read) = reads.join_next().await {
        if let Ok((sidecar, Ok(answer))) = read {
            answers.push((sidecar, answer));
        }
    }
    answers
}

/// A `/api/canary` request as the change to make: `(isvc, canary, change)`.
fn canary_change(request: &Value) -> Result<(String, Option<String>, Change), String> {
    let isvc = request["isvc"]
        .as_str()
        .ok_or("name the InferenceService: \"isvc\"")?
        .to_owned();
    let name = request["canary"].as_str().map(str::to_owned);
    let change = match request["action"].as_str() {
        Some("percent") => Change::Percent(
            request["percent"]
                .as_i64()
                .ok_or("\"percent\": a whole number from 0 to 100")?,
        ),
        Some("promote") => Change::Promote,
        Some("rollback") => Change::Rollback,
        _ => return Err("\"action\": \"percent\", \"promote\" or \"rollback\"".into()),
    };
    Ok((isvc, name, change))
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A request's body, at most `limit` bytes; else the 413 to answer.
async fn body(request: Request<Incoming>, limit: usize) -> Result<Bytes, Box<Answer>> {
    let read = Limited::new(request.into_body(), limit).collect();
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(_)) => Err(Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is unreadable or over {limit} bytes"),
        ))),
        Err(_) => Err(Box::new(error(
            StatusCode::REQUEST_TIMEOUT,
            &format!(
                "the body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_changes_from_the_page() {
        let change = |v: Value| canary_change(&v);
        assert_eq!(
            change(json!({"isvc": "digits", "action": "percent", "percent": 50})).unwrap(),
            ("digits".into(), None, Change::Percent(50))
        );
        assert_eq!(
            change(json!({"isvc": "digits", "canary": "v3", "action": "promote"})).unwrap(),
            ("digits".into(), Some("v3".into()), Change::Promote)
        );
        assert_eq!(
            change(json!({"isvc": "d", "action": "rollback"}))
                .unwrap()
                .2,
            Change::Rollback
        );
        assert!(change(json!({"action": "rollback"})).is_err());
        assert!(change(json!({"isvc": "d", "action": "percent"})).is_err());
        assert!(change(json!({"isvc": "d", "action": "delete"})).is_err());
    }
}
