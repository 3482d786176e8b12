//! `meshserve up`: the local mesh in one command. One predictor sidecar per revision, Envoy
//! with meshserve's wasm router in front, all on loopback; waits until everything is ready,
//! prints the endpoints, and stops everything on Ctrl-C or SIGTERM. A sidecar that dies is
//! started again on the ports Envoy knows it by (at most [`RESTARTS`] times a minute); if Envoy
//! dies, or a sidecar keeps dying, everything stops.
//!
//! A revision at `minReplicas: 0` scales to zero: its sidecar is started once (to check its
//! model and learn its ports), then stopped once the mesh is up. The router's activator holds
//! its requests and calls `up`'s wake endpoint (loopback, reached only through Envoy's
//! [`WAKE_CLUSTER`](crate::render::WAKE_CLUSTER)), which starts the sidecar again on the same
//! ports; it stops again after Knative's retention period with no request (see
//! [`InferenceService::retention`](crate::isvc::InferenceService::retention)), read from
//! Envoy's own stats. Each revision's state (cold, waking, warm) is in the state directory's
//! [`STATES_FILE`], which `meshserve canary` shows.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use meshserve_predictor::{remote, storage};

use crate::console::{self, ConsoleSpec, Sidecar};
use crate::files::read_documents;
use crate::isvc::{RevisionSpec, Storage};
use crate::render::{self, BOOTSTRAP_FILE, Upstream};
use crate::tools::{find_envoy, find_wasm, find_web_pkg};
use crate::workload::{self, DRAIN_GRACE_MS, batcher_args, logger_args, otlp_args};

/// Why the mesh could not come up.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{0}")]
    Input(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpError {
    let what = what.into();
    move |source| UpError::Io { what, source }
}

/// What `meshserve up` was asked.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub file: PathBuf,
    pub host: IpAddr,
    pub port: u16,
    pub admin_port: u16,
    /// The web console's port on 127.0.0.1 (0: the OS picks).
    pub console_port: u16,
    pub envoy: Option<PathBuf>,
    pub wasm: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// Envoy worker threads (0: Envoy's default, one per core).
    pub envoy_concurrency: usize,
    /// An OTLP/gRPC collector for Envoy's and the sidecars' spans.
    pub otlp_endpoint: Option<String>,
    /// The share of requests traced (without a caller's sampled `traceparent`), 0 to 1.
    pub trace_sampling: f64,
}

/// A child process whose stderr is forwarded with a prefix; killed on drop.
struct Part {
    name: String,
    /// None while a revision is scaled to zero.
    child: Option<Child>,
    /// How to start it again (sidecars only), and when it was.
    restart: Option<Restart>,
    /// The InferenceService of a sidecar's revision.
    isvc: Option<String>,
    /// Where the revision scales to zero.
    scaled: Option<Scaled>,
}

/// A revision's state, as `meshserve up` and `meshserve canary` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warmth {
    /// No sidecar runs (scaled to zero).
    Cold,
    /// Its sidecar started and is not ready yet.
    Waking,
    Warm,
}

impl Warmth {
    pub fn as_str(self) -> &'static str {
        match self {
            Warmth::Cold => "cold",
            Warmth::Waking => "waking",
            Warmth::Warm => "warm",
        }
    }
}

pub use crate::render::STATES_FILE;

/// What `up` knows of a revision that scales to zero.
struct Scaled {
    isvc: String,
    /// The wake endpoint's path for it.
    wake_path: String,
    retention: Duration,
    /// Its sidecar's REST address (readiness is asked there for the states file).
    http: SocketAddr,
    warmth: Warmth,
    /// A SIGTERM was sent; the exit that follows is a scale-down, not a crash.
    stopping: bool,
    /// A wake came while it was stopping: start it as soon as it is gone.
    wake_pending: bool,
    /// Its traffic as last read from Envoy's stats, and when it last changed.
    traffic: Option<u64>,
    last_request: Instant,
}

/// How often `up` reads Envoy's stats for the idle time of revisions that scale to zero.
const TRAFFIC_POLL: Duration = Duration::from_millis(500);

/// A sidecar's command line with the ports it bound, so that Envoy's clusters still reach it.
struct Restart {
    program: PathBuf,
    args: Vec<String>,
    times: Vec<Instant>,
}

/// A sidecar is started again at most this many times within [`RESTART_WINDOW`].
pub const RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// The wait before a restart: the dead process's ports are free by then.
const RESTART_DELAY: Duration = Duration::from_millis(200);

fn spawn(
    name: &str,
    program: &Path,
    args: &[String],
    lines: Option<mpsc::UnboundedSender<String>>,
) -> Result<Part, UpError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(io(format!("cannot start {}", program.display())))?;
    if let Some(stderr) = child.stderr.take() {
        let prefix = name.to_owned();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("[{prefix}] {line}");
                if let Some(tx) = &lines {
                    let _ = tx.send(line);
                }
            }
        });
    }
    Ok(Part {
        name: name.to_owned(),
        child: Some(child),
        restart: None,
        isvc: None,
        scaled: None,
    })
}

impl Part {
    /// Starts a sidecar again after it exited with `status`; `Err` with the reason the mesh
    /// stops when it cannot be (no restart for this part, or too many within a minute).
    async fn restart(&mut self, status: std::process::ExitStatus) -> Result<(), String> {
        let Some(restart) = self.restart.as_mut() else {
            return Err(format!("{} exited ({status})", self.name));
        };
        restart.times.retain(|t| t.elapsed() < RESTART_WINDOW);
        if restart.times.len() >= RESTARTS {
            return Err(format!(
                "{} exited ({status}) {RESTARTS} times within {} s",
                self.name,
                RESTART_WINDOW.as_secs()
            ));
        }
        restart.times.push(Instant::now());
        eprintln!(
            "[{}] exited ({status}); starting it again on the same ports",
            self.name
        );
        tokio::time::sleep(RESTART_DELAY).await;
        self.start_again()
    }

    /// Starts the sidecar again on its ports.
    fn start_again(&mut self) -> Result<(), String> {
        let Some(restart) = self.restart.as_ref() else {
            return Err(format!("{} cannot be started again", self.name));
        };
        self.child = spawn(&self.name, &restart.program, &restart.args, None)
            .map_err(|e| e.to_string())?
            .child;
        Ok(())
    }

    /// Whether the process has exited: its status, and the process forgotten.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// SIGTERM: the sidecar drains (not ready for [`DRAIN_GRACE_MS`], then its in-flight
    /// requests) and exits.
    fn terminate(&self) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    fn warmth(&self) -> Warmth {
        match &self.scaled {
            Some(scaled) => scaled.warmth,
            None if self.child.is_some() => Warmth::Warm,
            None => Warmth::Waking,
        }
    }
}

/// The `meshserve serve` flags that give a revision's sidecar its model: the storage, the
/// name one model is served under (the InferenceService's, as in KServe), KServe's batcher,
/// and where the sidecar builds its repository.
fn sidecar_storage_args(
    isvc: &str,
    revision: &RevisionSpec,
    storage: &Path,
    state: &Path,
) -> Vec<String> {
    let mut args = vec![
        "--storage".to_owned(),
        storage.display().to_string(),
        "--model-name".to_owned(),
        isvc.to_owned(),
        "--scratch-dir".to_owned(),
        state
            .join("repositories")
            .join(isvc)
            .join(&revision.name)
            .display()
            .to_string(),
    ];
    args.extend(batcher_args(revision.batcher));
    args.extend(workload::model_args(revision));
    if revision.predict_proba {
        // On Kubernetes the predictor's env carries PREDICT_PROBA to the sidecar.
        args.push("--predict-proba".to_owned());
    }
    args.extend([
        "--storage-cache".to_owned(),
        state.join("storage").display().to_string(),
    ]);
    args
}

/// KServe's storage spec, locally: the storage-config entry comes from `$STORAGE_CONFIG` (on
/// Kubernetes, from the secret), `parameters` over it.
async fn fetch_storage_spec(
    key: &str,
    path: &str,
    parameters: &std::collections::BTreeMap<String, String>,
    cache: &Path,
) -> Result<PathBuf, String> {
    let config = std::env::var(remote::STORAGE_CONFIG).map_err(|_| {
        format!(
            "its storage spec names the storage-config secret's entry '{key}', which meshserve up reads from ${}: set it to that entry's JSON, or give storageUri",
            remote::STORAGE_CONFIG
        )
    })?;
    let overrides = serde_json::to_string(parameters).map_err(|e| e.to_string())?;
    remote::fetch_storage_spec(
        path,
        &config,
        Some(&overrides),
        cache,
        remote::MAX_DOWNLOAD_BYTES,
    )
    .await
}

/// `meshserve serve` on these ports (0: the OS picks) with the revision's flags.
fn serve_args(http: u16, grpc: u16, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "serve".to_owned(),
        "--http-port".to_owned(),
        http.to_string(),
        "--grpc-port".to_owned(),
        grpc.to_string(),
    ];
    args.extend_from_slice(extra);
    args
}

/// Starts a predictor sidecar and reads the addresses it bound.
async fn start_sidecar(name: &str, extra: &[String]) -> Result<(Part, Upstream), UpError> {
    let exe = std::env::current_exe().map_err(io("cannot find the meshserve executable"))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut part = spawn(name, &exe, &serve_args(0, 0, extra), Some(tx))?;
    let (mut http, mut grpc) = (None, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while http.is_none() || grpc.is_none() {
        let line = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| {
                UpError::Start(format!(
                    "sidecar {name} did not report its addresses within 60 s"
                ))
            })?;
        let Some(line) = line else {
            let status = match part.child.as_mut() {
                Some(child) => child.wait().await.ok(),
                None => None,
            };
            return Err(UpError::Start(format!(
                "sidecar {name} exited at start ({status:?}); its log is above"
            )));
        };
        let parse = |kind: &str| {
            line.split(&format!("listening on {kind}="))
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse::<SocketAddr>().ok())
        };
        http = http.or_else(|| parse("http"));
        grpc = grpc.or_else(|| parse("grpc"));
    }
    match (http, grpc) {
        (Some(http), Some(grpc)) => {
            part.restart = Some(Restart {
                program: exe,
                args: serve_args(http.port(), grpc.port(), extra),
                times: Vec::new(),
            });
            Ok((part, Upstream::local(http, grpc)))
        }
        _ => Err(UpError::Start(format!(
            "sidecar {name} reported no addresses"
        ))),
    }
}

/// One GET over a fresh connection, within 5 s: the status and the body.
async fn http_get_full(addr: SocketAddr, path: &str, host: &str) -> Option<(u16, String)> {
    crate::http::get(addr, path, host, Duration::from_secs(5)).await
}

async fn http_get(addr: SocketAddr, path: &str, host: &str) -> Option<u16> {
    http_get_full(addr, path, host)
        .await
        .map(|(status, _)| status)
}

/// The port Envoy's listener bound (it may have been asked for port 0): the admin API's
/// plain-text `/listeners` says `meshserve::127.0.0.1:PORT`.
async fn listener_port(admin: SocketAddr) -> Option<u16> {
    let (_, body) = http_get_full(admin, "/listeners", "admin").await?;
    body.lines().find_map(|l| {
        l.trim()
            .strip_prefix("meshserve::")?
            .rsplit(':')
            .next()?
            .trim()
            .parse()
            .ok()
    })
}

async fn wait_until(
    what: &str,
    within: Duration,
    mut ready: impl AsyncFnMut() -> bool,
) -> Result<(), UpError> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ready().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(UpError::Start(format!(
        "{what} was not ready within {} s",
        within.as_secs()
    )))
}

/// The wake endpoint: `POST /wake/<namespace>/<revision>` for a revision that scales to zero
/// answers 202 and has the supervisor start it; other paths 404, other methods 405. It
/// listens on loopback and Envoy reaches it only from the router's activator (no route leads
/// there: the router removes a client's `x-meshserve-cluster`).
async fn serve_wakes(
    listener: tokio::net::TcpListener,
    known: Vec<String>,
    wakes: mpsc::UnboundedSender<String>,
) {
    let known = std::sync::Arc::new(known);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (known, wakes) = (std::sync::Arc::clone(&known), wakes.clone());
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), answer_wake(stream, &known, &wakes))
                    .await;
        });
    }
}

/// The largest request head the wake endpoint reads.
const WAKE_HEAD_BYTES: usize = 8 * 1024;

async fn answer_wake(
    mut stream: tokio::net::TcpStream,
    known: &[String],
    wakes: &mpsc::UnboundedSender<String>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < WAKE_HEAD_BYTES {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut request_line = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (request_line.next(), request_line.next());
    let (status, body) = match (method, path) {
        (Some("POST"), Some(path)) if known.iter().any(|k| k == path) => {
            let _ = wakes.send(path.to_owned());
            ("202 Accepted", r#"{"waking": true}"#)
        }
        (Some("POST"), _) => (
            "404 Not Found",
            r#"{"error": "no revision that scales to zero at this path"}"#,
        ),
        _ => (
            "405 Method Not Allowed",
            r#"{"error": "POST /wake/<namespace>/<revision>"}"#,
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Envoy's view of a revision's traffic: requests the router sent it (any outcome), and
/// whether any is held by the activator or in flight to its sidecar.
fn traffic(stats: &str, isvc: &str, revision: &str) -> (u64, bool) {
    let routed = format!("wasmcustom.meshserve.requests.isvc.{isvc}.revision.{revision}.");
    let held = format!("wasmcustom.meshserve.held.revision.{revision}");
    let (rest, grpc) = crate::render::clusters(isvc, revision);
    let active = [
        format!("cluster.{rest}.upstream_rq_active"),
        format!("cluster.{grpc}.upstream_rq_active"),
    ];
    let (mut count, mut busy) = (0, false);
    for line in stats.lines() {
        let Some((name, value)) = line.split_once(": ") else {
            continue;
        };
        let value: u64 = value.trim().parse().unwrap_or(0);
        if name.starts_with(&routed) {
            count += value;
        } else if (name == held || active.iter().any(|a| a == name)) && value > 0 {
            busy = true;
        }
    }
    (count, busy)
}

/// Starts a revision that scales to zero, if it is not running (or as soon as it has stopped).
fn wake(part: &mut Part) -> Result<(), String> {
    let running = part.child.is_some();
    let Some(scaled) = part.scaled.as_mut() else {
        return Ok(());
    };
    scaled.last_request = Instant::now();
    scaled.traffic = None;
    if scaled.stopping {
        scaled.wake_pending = true;
        return Ok(());
    }
    if running {
        return Ok(());
    }
    scaled.warmth = Warmth::Waking;
    eprintln!("[{}] woken by a request: starting it", part.name);
    part.start_again()
}

/// Each revision's state, as the states file holds it.
fn states(parts: &[Part]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for part in parts {
        let Some(isvc) = &part.isvc else {
            continue;
        };
        if let Some(map) = out
            .entry(isvc.clone())
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
        {
            map.insert(part.name.clone(), part.warmth().as_str().into());
        }
    }
    serde_json::Value::Object(out)
}

/// Keeps the sidecars running (restarting ones that die), wakes and stops the revisions that
/// scale to zero, and keeps the states file up to date; returns why the mesh must stop.
async fn supervise(
    parts: &mut [Part],
    mut wakes: mpsc::UnboundedReceiver<String>,
    admin: SocketAddr,
    states_path: &Path,
) -> String {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_poll = Instant::now();
    let mut written = serde_json::Value::Null;
    loop {
        tokio::select! {
            Some(path) = wakes.recv() => {
                let woken = parts
                    .iter_mut()
                    .find(|p| p.scaled.as_ref().is_some_and(|s| s.wake_path == path));
                if let Some(part) = woken
                    && let Err(reason) = wake(part)
                {
                    return reason;
                }
            }
            _ = tick.tick() => {
                for part in parts.iter_mut() {
                    if let Some(status) = part.exited() {
                        let scaled_down = part.scaled.as_mut().filter(|s| s.stopping).map(|s| {
                            s.stopping = false;
                            s.warmth = Warmth::Cold;
                            std::mem::take(&mut s.wake_pending)
                        });
                        match scaled_down {
                            Some(woken) => {
                                eprintln!("[{}] scaled to zero", part.name);
                                if woken && let Err(reason) = wake(part) {
                                    return reason;
                                }
                            }
                            None => {
                                if let Err(reason) = part.restart(status).await {
                                    return reason;
                                }
                            }
                        }
                    }
                    if let Some(scaled) = part.scaled.as_mut()
                        && scaled.warmth == Warmth::Waking
                        && http_get(scaled.http, "/v2/health/ready", "meshserve-up").await == Some(200)
                    {
                        scaled.warmth = Warmth::Warm;
                        scaled.last_request = Instant::now();
                    }
                }
                let watching = parts
                    .iter()
                    .any(|p| p.scaled.as_ref().is_some_and(|s| s.warmth != Warmth::Cold && !s.stopping));
                if watching && last_poll.elapsed() >= TRAFFIC_POLL {
                    last_poll = Instant::now();
                    if let Some((_, stats)) = http_get_full(admin, "/stats?usedonly", "admin").await {
                        for part in parts.iter_mut() {
                            let running = part.child.is_some();
                            let Some(scaled) = part.scaled.as_mut().filter(|s| !s.stopping && running) else {
                                continue;
                            };
                            let (count, busy) = traffic(&stats, &scaled.isvc, &part.name);
                            if busy || scaled.traffic != Some(count) {
                                scaled.traffic = Some(count);
                                scaled.last_request = Instant::now();
                            } else if scaled.warmth == Warmth::Warm
                                && scaled.last_request.elapsed() >= scaled.retention
                            {
                                eprintln!(
                                    "[{}] no request for {:?}: scaling it to zero",
                                    part.name, scaled.retention
                                );
                                scaled.stopping = true;
                                part.terminate();
                            }
                        }
                    }
                }
                let now = states(parts);
                if now != written {
                    if let Err(e) = render::write_atomically(states_path, &now) {
                        eprintln!("cannot write {}: {e}", states_path.display());
                    }
                    written = now;
                }
            }
        }
    }
}

/// Brings the mesh up, serves until `stop` resolves or a part dies, then stops everything.
pub async fn up(
    options: UpOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), UpError> {
    let (services, graphs) = read_documents(&options.file).map_err(UpError::Input)?;
    let envoy = find_envoy(options.envoy.as_deref()).map_err(UpError::Start)?;
    let wasm = std::fs::canonicalize(find_wasm(options.wasm.as_deref()).map_err(UpError::Start)?)
        .map_err(io("meshserve_filters.wasm"))?;
    let state = &options.state_dir;
    std::fs::create_dir_all(state).map_err(io(format!("cannot create {}", state.display())))?;
    let state = std::fs::canonicalize(state).map_err(io(format!("{}", state.display())))?;

    let mut parts = Vec::new();
    let mut upstreams = Vec::new();
    let mut served = Vec::new();
    let mut sidecars = Vec::new();
    for isvc in &services {
        let mut models = Vec::new();
        // The sidecars apply the transformer too, for clients that bypass Envoy.
        let transformer = match &isvc.transformer {
            Some(spec) => {
                let path = state.join(format!("{}.transformer.json", isvc.name));
                render::write_atomically(&path, spec)
                    .map_err(io("cannot write the transformer for the sidecars"))?;
                Some(path)
            }
            None => None,
        };
        for revision in workload::revisions(isvc) {
            let fetched;
            let local = match &revision.storage {
                Storage::Remote { uri } => {
                    let cache = state.join("storage");
                    fetched = remote::fetch(uri, &cache, remote::MAX_DOWNLOAD_BYTES)
                        .await
                        .map_err(|e| UpError::Input(format!("revision {}: {e}", revision.name)))?;
                    fetched.as_path()
                }
                Storage::Spec {
                    key,
                    path,
                    parameters,
                } => {
                    fetched = fetch_storage_spec(key, path, parameters, &state.join("storage"))
                        .await
                        .map_err(|e| UpError::Input(format!("revision {}: {e}", revision.name)))?;
                    fetched.as_path()
                }
                storage => storage.local().ok_or_else(|| {
                    UpError::Input(format!(
                        "revision {}: pvc:// storage is read on Kubernetes only (meshserve render); meshserve up serves file:// and remote locations",
                        revision.name
                    ))
                })?,
            };
            let names = storage::model_names(local, &isvc.name, revision.format)
                .map_err(|e| UpError::Input(format!("revision {}: {e}", revision.name)))?;
            let mut extra = sidecar_storage_args(&isvc.name, revision, local, &state);
            if let Some(file) = &transformer {
                extra.extend(["--transformer".to_owned(), file.display().to_string()]);
            }
            if let Some(endpoint) = &options.otlp_endpoint {
                extra.extend(otlp_args(isvc, revision, endpoint, options.trace_sampling));
            }
            if let Some(logger) = &revision.logger {
                let spool = state.join(format!("{}.{}.spool", isvc.name, revision.name));
                extra.extend(logger_args(logger, &spool.display().to_string()));
                // The console shows the last events.
                extra.extend([
                    "--log-recent".to_owned(),
                    console::RECENT_EVENTS.to_string(),
                ]);
            }
            let at_zero = revision.scaling.min_replicas == Some(0);
            if at_zero {
                extra.extend(["--drain-grace-ms".to_owned(), DRAIN_GRACE_MS.to_string()]);
            }
            let (mut part, upstream) = start_sidecar(&revision.name, &extra).await?;
            part.isvc = Some(isvc.name.clone());
            sidecars.push(Sidecar {
                isvc: isvc.name.clone(),
                revision: revision.name.clone(),
                http: upstream_addr(&upstream)?,
                logs: revision.logger.is_some(),
            });
            if at_zero {
                part.scaled = Some(Scaled {
                    isvc: isvc.name.clone(),
                    wake_path: render::wake_path(&isvc.namespace, &revision.name),
                    retention: isvc.retention(revision),
                    http: upstream_addr(&upstream)?,
                    warmth: Warmth::Warm,
                    stopping: false,
                    wake_pending: false,
                    traffic: None,
                    last_request: Instant::now(),
                });
            }
            parts.push(part);
            upstreams.push((render::clusters(&isvc.name, &revision.name).0, upstream));
            // The names clients may call: the shadow's extra models are not served.
            let shadow = isvc
                .shadow
                .as_ref()
                .is_some_and(|s| s.name == revision.name);
            for name in names.into_iter().filter(|_| !shadow) {
                if !models.contains(&name) {
                    models.push(name);
                }
            }
        }
        served.push((isvc, models));
    }
    // The wake endpoint, where revisions scale to zero.
    let (wake_tx, mut wake_rx) = mpsc::unbounded_channel();
    let known: Vec<String> = parts
        .iter()
        .filter_map(|p| Some(p.scaled.as_ref()?.wake_path.clone()))
        .collect();
    let wake = if known.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(io("cannot open the wake endpoint"))?;
        let at = listener
            .local_addr()
            .map_err(io("cannot open the wake endpoint"))?;
        tokio::spawn(serve_wakes(listener, known, wake_tx));
        Some(at)
    };
    let config = render::filter_config(&served, &render::Naming::Up)
        .and_then(|c| render::with_graphs(c, &graphs, &served))
        .map_err(UpError::Input)?;
    let listener = SocketAddr::new(options.host, options.port);
    let admin = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), options.admin_port);
    let otlp = match &options.otlp_endpoint {
        Some(url) => Some(render::Endpoint::from_url(url).map_err(UpError::Input)?),
        None => None,
    };
    let envoy_spec = render::EnvoySpec {
        listener,
        admin,
        config_dir: &state,
        upstreams: &upstreams,
        otlp,
        trace_sampling: options.trace_sampling,
        jwt: render::jwt_services(&services),
        wake,
    };
    render::write_mesh(&state, &config, &wasm, &envoy_spec)
        .map_err(|e| UpError::Input(format!("cannot write the mesh's files: {e}")))?;
    let bootstrap_path = state.join(BOOTSTRAP_FILE);

    let admin_file = state.join("envoy-admin-address");
    let _ = std::fs::remove_file(&admin_file);
    let mut args: Vec<String> = vec![
        "-c".into(),
        bootstrap_path.display().to_string(),
        "--disable-hot-restart".into(),
        "--admin-address-path".into(),
        admin_file.display().to_string(),
        "-l".into(),
        "warning".into(),
    ];
    if options.envoy_concurrency > 0 {
        args.extend([
            "--concurrency".into(),
            options.envoy_concurrency.to_string(),
        ]);
    }
    parts.push(spawn("envoy", &envoy, &args, None)?);

    // Envoy creates the file before it writes the address into it: wait for an address.
    let read_admin = |file: &std::path::Path| {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
    };
    wait_until(
        "Envoy's admin address",
        Duration::from_secs(30),
        async || read_admin(&admin_file).is_some(),
    )
    .await?;
    let admin_addr = read_admin(&admin_file)
        .ok_or_else(|| UpError::Start("Envoy wrote an unreadable admin address".into()))?;
    wait_until("Envoy", Duration::from_secs(30), async || {
        http_get(admin_addr, "/ready", "admin").await == Some(200)
    })
    .await?;
    let listener = match listener_port(admin_addr).await {
        Some(port) => SocketAddr::new(listener.ip(), port),
        None => {
            return Err(UpError::Start(
                "Envoy did not report its listener's port".into(),
            ));
        }
    };
    for isvc in &services {
        let host = format!("{}.{}.example.com", isvc.name, isvc.namespace);
        // A service that needs a token answers 401 once the router has named it (its
        // sidecars were seen ready on their own ports).
        let routed = if isvc.jwt.is_some() { 401 } else { 200 };
        wait_until(
            &format!("InferenceService {}", isvc.name),
            Duration::from_secs(60),
            async || http_get(listener, "/v2/health/ready", &host).await == Some(routed),
        )
        .await?;
    }

    // Revisions at minReplicas 0 were started to check their models and learn their ports;
    // now they scale to zero, and wait for a request.
    for part in parts.iter_mut().filter(|p| p.scaled.is_some()) {
        part.terminate();
    }
    for part in parts.iter_mut().filter(|p| p.scaled.is_some()) {
        if let Some(child) = part.child.as_mut()
            && tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
        {
            let _ = child.kill().await;
        }
        part.child = None;
        if let Some(scaled) = part.scaled.as_mut() {
            scaled.warmth = Warmth::Cold;
        }
    }
    // Wakes from the readiness checks above are answered already.
    while wake_rx.try_recv().is_ok() {}
    let states_path = state.join(STATES_FILE);
    render::write_atomically(&states_path, &states(&parts))
        .map_err(io(format!("cannot write {}", states_path.display())))?;

    let console_addr = console::start(
        options.console_port,
        ConsoleSpec {
            state: state.clone(),
            states: states_path.clone(),
            envoy_admin: admin_addr,
            listener,
            sidecars,
            web_pkg: find_web_pkg(),
        },
    )
    .await
    .map_err(io("cannot open the console"))?;

    println!(
        "meshserve is up: Envoy on http://{listener} (admin http://{admin_addr}), state in {}",
        state.display()
    );
    println!("  console: http://{console_addr}/ (loopback only)");
    for (isvc, models) in &served {
        let warmth = |revision: &RevisionSpec| {
            let part = parts
                .iter()
                .find(|p| p.isvc.as_deref() == Some(isvc.name.as_str()) && p.name == revision.name);
            match part.and_then(|p| p.scaled.as_ref().map(|s| (p.warmth(), s.retention))) {
                Some((warmth, retention)) => format!(
                    "{}: scales to zero, wakes on a request, stops {} s after its last",
                    warmth.as_str(),
                    retention.as_secs_f64()
                ),
                None => Warmth::Warm.as_str().to_owned(),
            }
        };
        let split: Vec<String> = std::iter::once(format!(
            "{} {}% ({})",
            isvc.default.name,
            100 - isvc.canaries.iter().map(|c| c.percent).sum::<i64>(),
            warmth(&isvc.default)
        ))
        .chain(
            isvc.canaries
                .iter()
                .map(|c| format!("{} {}% ({})", c.name, c.percent, warmth(c))),
        )
        .chain(
            isvc.shadow
                .iter()
                .map(|s| format!("shadow {} gets a copy of {}%", s.name, s.percent)),
        )
        .collect();
        println!(
            "  InferenceService {} ({}): {}",
            isvc.name,
            split.join(", "),
            models.join(", ")
        );
        for model in models {
            println!(
                "    POST http://{listener}/v2/models/{model}/infer    POST http://{listener}/v1/models/{model}:predict"
            );
        }
        println!(
            "    pin a revision: -H 'x-meshserve-revision: default|canary|<name>'; shift traffic: meshserve canary {} --percent N",
            isvc.name
        );
    }
    for graph in &graphs {
        println!(
            "  InferenceGraph {} ({} node(s)): POST http://{listener}/v1/graphs/{}    (or POST / with Host: {}.{})",
            graph.name,
            graph.nodes.len(),
            graph.name,
            graph.name,
            graph.namespace
        );
    }
    println!("Ctrl-C stops everything.");

    // Serve until asked to stop, or until a part dies for good.
    let outcome = tokio::select! {
        () = stop => None,
        reason = supervise(&mut parts, wake_rx, admin_addr, &states_path) => Some(reason),
    };
    shutdown(&mut parts).await;
    let _ = std::fs::remove_file(state.join(console::ADDRESS_FILE));
    match outcome {
        None => Ok(()),
        Some(reason) => Err(UpError::Start(format!("{reason}; stopped the mesh"))),
    }
}

/// SIGTERM to every part (Envoy first), then a kill for any still running after 10 s.
async fn shutdown(parts: &mut [Part]) {
    for part in parts.iter().rev() {
        part.terminate();
    }
    for part in parts.iter_mut().rev() {
        if let Some(child) = part.child.as_mut()
            && tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

/// A local sidecar's REST address.
fn upstream_addr(upstream: &Upstream) -> Result<SocketAddr, UpError> {
    format!("{}:{}", upstream.http.host, upstream.http.port)
        .parse()
        .map_err(|_| UpError::Start(format!("sidecar address {:?} is not local", upstream.http)))
}
