//! Payload logging end to end: the real Envoy with the wasm logger, real sidecars with their
//! intake and spool, and `meshserve log-sink` as the sink. Every client request carries
//! `x-request-n` (a metadata header), so each event can be traced back to its request.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshserve_e2e::{Envoy, LogSink, Sidecar, TempRepository, write_local_mesh};
use serde_json::{Value, json};

const SAMPLE: &str = include_str!("../../models/samples/sklearn_digits_v1_request.json");

struct Mesh {
    dir: PathBuf,
    repository: TempRepository,
    sidecar: Sidecar,
    spool: PathBuf,
    sink: LogSink,
    envoy: Envoy,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- log-sink ----\n{}", self.sink.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One sidecar serving `models` (each a copy of sklearn_digits), one InferenceService per
/// model with its own logger settings, all logging to one log-sink.
fn start(tag: &str, loggers: &[(&str, Value)]) -> Mesh {
    start_with(tag, loggers, &[])
}

/// As [`start`], with more `meshserve serve` flags for the sidecar.
fn start_with(tag: &str, loggers: &[(&str, Value)], extra: &[&str]) -> Mesh {
    start_sinking_to(tag, loggers, extra, None)
}

/// As [`start_with`], delivering to `sink_url` instead of the mesh's log-sink (which then
/// gets nothing).
fn start_sinking_to(
    tag: &str,
    loggers: &[(&str, Value)],
    extra: &[&str],
    sink_url: Option<&str>,
) -> Mesh {
    let dir = std::env::temp_dir().join(format!("meshserve-payloads-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let models: Vec<(&str, &str, &str)> = loggers
        .iter()
        .map(|(name, _)| (*name, "sklearn_digits", "version_policy: {latest: 1}\n"))
        .collect();
    let repository = TempRepository::new(tag, &models);
    let sink = LogSink::start(0, &dir.join("events.jsonl"));
    let spool = dir.join("spool");
    let sink_url = sink_url.map_or_else(|| format!("http://{}/", sink.addr), str::to_owned);
    let spool_dir = spool.display().to_string();
    let mut flags = vec!["--log-sink", &sink_url, "--log-spool", &spool_dir];
    flags.extend_from_slice(extra);
    let sidecar = Sidecar::start_on(&repository.path, &flags, true);
    let services: Vec<Value> = loggers
        .iter()
        .map(|(name, logger)| {
            json!({"name": name, "models": [name], "predictor": {"default": {
                "name": format!("{name}-v1"), "cluster": "logs.v1", "logger": logger}}})
        })
        .collect();
    let config = json!({"services": services});
    let bootstrap = write_local_mesh(
        &dir,
        &config,
        &[("logs.v1", sidecar.http, sidecar.grpc)],
        None,
    );
    let envoy = Envoy::start(&bootstrap, &dir);
    Mesh {
        dir,
        repository,
        sidecar,
        spool,
        sink,
        envoy,
    }
}

/// Sends requests `range` to `model` at `concurrency`, each with `x-request-n`; returns the
/// statuses by request number.
async fn load(
    envoy: &Envoy,
    model: &str,
    range: std::ops::Range<usize>,
    concurrency: usize,
    pause: Duration,
) -> HashMap<usize, u16> {
    let url = Arc::new(envoy.url(&format!("/v1/models/{model}:predict")));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(range.start));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (url, next, end) = (Arc::clone(&url), Arc::clone(&next), range.end);
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut statuses = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n >= end {
                    return statuses;
                }
                let status = client
                    .post(url.as_str())
                    .header("x-request-n", n.to_string())
                    .header("content-type", "application/json")
                    .body(SAMPLE)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                statuses.push((n, status));
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
        }));
    }
    let mut out = HashMap::new();
    for task in tasks {
        out.extend(task.await.unwrap());
    }
    out
}

fn request_n(event: &Value) -> Option<usize> {
    event["metadata"]["x-request-n"][0].as_str()?.parse().ok()
}

/// Waits until every request in `range` has its request and response events at the sink;
/// returns the events.
fn wait_for_pairs(sink: &LogSink, range: std::ops::Range<usize>, within: Duration) -> Vec<Value> {
    wait_for_pairs_in(|| sink.events(), range, within)
}

/// As [`wait_for_pairs`], for any sink's events.
fn wait_for_pairs_in(
    sink: impl Fn() -> Vec<Value>,
    range: std::ops::Range<usize>,
    within: Duration,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let events = sink();
        let mut seen: HashSet<(usize, String)> = HashSet::new();
        for e in &events {
            if let (Some(n), Some(kind)) = (request_n(e), e["type"].as_str()) {
                seen.insert((n, kind.to_owned()));
            }
        }
        let missing = range
            .clone()
            .filter(|n| {
                !seen.contains(&(*n, "org.kubeflow.serving.inference.request".into()))
                    || !seen.contains(&(*n, "org.kubeflow.serving.inference.response".into()))
            })
            .count();
        if missing == 0 {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} requests still lack an event after {within:?}",
            range.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Checks the pairing: per request number one ce-id, shared by its request and response
/// events, each carrying KServe's attributes; returns the duplicates (events seen twice).
fn check_pairs(events: &[Value], range: std::ops::Range<usize>) -> usize {
    let mut by_id: HashMap<String, Vec<&Value>> = HashMap::new();
    for e in events
        .iter()
        .filter(|e| request_n(e).is_some_and(|n| range.contains(&n)))
    {
        by_id
            .entry(e["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(e);
        for attribute in [
            "specversion",
            "id",
            "type",
            "source",
            "time",
            "inferenceservicename",
            "namespace",
            "component",
            "endpoint",
            "metadata",
        ] {
            assert!(!e[attribute].is_null(), "no {attribute} in {e}");
        }
    }
    assert_eq!(by_id.len(), range.len(), "one ce-id per request");
    let mut duplicates = 0;
    for (id, group) in by_id {
        let mut kinds: Vec<&str> = group.iter().map(|e| e["type"].as_str().unwrap()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), 2, "{id}: {group:?}");
        let n: HashSet<usize> = group.iter().filter_map(|e| request_n(e)).collect();
        assert_eq!(n.len(), 1, "{id} carries several requests: {group:?}");
        // A duplicate is a redelivery: the very same event again.
        let distinct: HashSet<String> = group.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            distinct.len(),
            2,
            "{id}: events differ beyond redelivery: {group:?}"
        );
        duplicates += group.len() - 2;
    }
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_arrives_once_and_a_sink_outage_loses_nothing() {
    let mut mesh = start(
        "load",
        &[("digits", json!({"metadata_headers": ["x-request-n"]}))],
    );

    // 5,000 requests at concurrency 16, the sink up: every event once.
    let statuses = load(&mesh.envoy, "digits", 0..5_000, 16, Duration::ZERO).await;
    assert!(statuses.values().all(|s| *s == 200), "a request failed");
    let events = wait_for_pairs(&mesh.sink, 0..5_000, Duration::from_secs(120));
    assert_eq!(
        check_pairs(&events, 0..5_000),
        0,
        "duplicates with the sink up"
    );
    assert_eq!(events.len(), 10_000);
    assert_eq!(
        mesh.envoy
            .stat("wasmcustom.meshserve.logger.isvc.digits.result.sent"),
        10_000
    );

    // The sink down for 10 s in the middle of the load.
    let envoy = &mesh.envoy;
    let load = load(envoy, "digits", 5_000..6_500, 4, Duration::from_millis(30));
    let outage = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let port = mesh.sink.addr.port();
        let out = mesh.sink.out.clone();
        mesh.sink.stop();
        tokio::time::sleep(Duration::from_secs(10)).await;
        LogSink::start(port, &out)
    };
    let (statuses, restarted) = tokio::join!(load, outage);
    mesh.sink = restarted;
    assert_eq!(statuses.len(), 1_500);
    assert!(
        statuses.values().all(|s| *s == 200),
        "client requests failed during the sink outage"
    );
    let events = wait_for_pairs(&mesh.sink, 5_000..6_500, Duration::from_secs(60));
    let duplicates = check_pairs(&events, 5_000..6_500);
    eprintln!("sink outage: {duplicates} events redelivered");
    let metrics = sidecar_metrics(&mesh.sidecar).await;
    let retried = metric(&metrics, "meshserve_payload_events_retried_total");
    assert!(
        retried > 0.0,
        "the outage should have caused retries:\n{metrics}"
    );
    assert!(metric(&metrics, "meshserve_payload_events_delivered_total") >= 13_000.0);
}

async fn sidecar_metrics(sidecar: &Sidecar) -> String {
    reqwest::get(sidecar.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_acknowledged_before_a_sidecar_restart_arrive_after_it() {
    let mut mesh = start(
        "restart",
        &[("digits", json!({"metadata_headers": ["x-request-n"]}))],
    );
    let (port, out) = (mesh.sink.addr.port(), mesh.sink.out.clone());
    // The sink down: acknowledged events wait in the spool.
    mesh.sink.stop();
    let statuses = load(&mesh.envoy, "digits", 0..300, 8, Duration::ZERO).await;
    assert!(statuses.values().all(|s| *s == 200));
    let deadline = Instant::now() + Duration::from_secs(20);
    while mesh
        .envoy
        .stat("wasmcustom.meshserve.logger.isvc.digits.result.sent")
        < 600
    {
        assert!(
            Instant::now() < deadline,
            "the intake did not take 600 events"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Killed: no drain, no chance to flush anything.
    let ports = (mesh.sidecar.http.port(), mesh.sidecar.grpc.port());
    mesh.sidecar.kill();
    mesh.sink = LogSink::start(port, &out);
    let sink_url = format!("http://{}/", mesh.sink.addr);
    mesh.sidecar = Sidecar::start_at(
        &mesh.repository.path,
        ports,
        &[
            "--log-sink",
            &sink_url,
            "--log-spool",
            &mesh.spool.display().to_string(),
        ],
        true,
    );
    let events = wait_for_pairs(&mesh.sink, 0..300, Duration::from_secs(60));
    check_pairs(&events, 0..300);
    // And the restarted sidecar goes on logging.
    let statuses = load(&mesh.envoy, "digits", 300..400, 4, Duration::ZERO).await;
    assert!(statuses.values().all(|s| *s == 200));
    let events = wait_for_pairs(&mesh.sink, 300..400, Duration::from_secs(60));
    check_pairs(&events, 300..400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn modes_sampling_truncation_and_errors_behave_as_configured() {
    let headers = json!(["x-request-n"]);
    let mesh = start(
        "modes",
        &[
            (
                "requests",
                json!({"mode": "request", "metadata_headers": headers}),
            ),
            (
                "responses",
                json!({"mode": "response", "metadata_headers": headers}),
            ),
            (
                "sampled",
                json!({"sampling_percent": 30, "metadata_headers": headers}),
            ),
            (
                "small",
                json!({"max_payload_bytes": 100, "metadata_headers": headers}),
            ),
        ],
    );
    load(&mesh.envoy, "requests", 0..50, 4, Duration::ZERO).await;
    load(&mesh.envoy, "responses", 1_000..1_050, 4, Duration::ZERO).await;
    load(&mesh.envoy, "sampled", 2_000..2_600, 8, Duration::ZERO).await;
    load(&mesh.envoy, "small", 3_000..3_010, 2, Duration::ZERO).await;
    // A request the model refuses (400) is logged with its answer.
    let client = reqwest::Client::new();
    let bad = client
        .post(mesh.envoy.url("/v1/models/small:predict"))
        .header("x-request-n", "3999")
        .header("content-type", "application/json")
        .body(r#"{"instances": [[1, 2]]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // A client cannot reach an intake through Envoy by naming its cluster.
    let forged = client
        .post(mesh.envoy.url("/meshserve/events"))
        .header("x-meshserve-cluster", "logs.v1")
        .header("ce-specversion", "1.0")
        .header("ce-id", "forged")
        .header("ce-type", "org.kubeflow.serving.inference.request")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 404);

    // Every logged request has gone out through the intake once these counts are reached.
    let expected_min = 50 + 50 + 10 * 2 + 2;
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let events = mesh.sink.events();
        let logged = events.iter().filter(|e| request_n(e).is_some()).count();
        let sent = mesh
            .envoy
            .stat("wasmcustom.meshserve.logger.isvc.sampled.result.sent")
            + mesh
                .envoy
                .stat("wasmcustom.meshserve.logger.isvc.requests.result.sent")
            + mesh
                .envoy
                .stat("wasmcustom.meshserve.logger.isvc.responses.result.sent")
            + mesh
                .envoy
                .stat("wasmcustom.meshserve.logger.isvc.small.result.sent");
        // Per service too: a filter may still hold one service's events while the others'
        // counts already add up (seen under CI load).
        let of_service = |name: &str| {
            events
                .iter()
                .filter(|e| e["inferenceservicename"] == name)
                .count()
        };
        let each = of_service("requests") >= 50
            && of_service("responses") >= 50
            && of_service("small") >= 10 * 2 + 2;
        if logged >= expected_min && each && logged as u64 == sent {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "events still missing: {logged} of {sent}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let of = |model: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["inferenceservicename"] == model)
            .collect()
    };
    let requests = of("requests");
    assert_eq!(requests.len(), 50);
    assert!(
        requests
            .iter()
            .all(|e| e["type"] == "org.kubeflow.serving.inference.request")
    );
    assert_eq!(
        requests[0]["data"]["instances"].as_array().unwrap().len(),
        2
    );
    let responses = of("responses");
    assert_eq!(responses.len(), 50);
    assert!(
        responses
            .iter()
            .all(|e| e["type"] == "org.kubeflow.serving.inference.response")
    );
    assert!(responses.iter().all(|e| e["statuscode"] == "200"));
    let sampled: HashSet<usize> = of("sampled").iter().filter_map(|e| request_n(e)).collect();
    assert!(
        (120..=240).contains(&sampled.len()),
        "30% of 600 sampled: {}",
        sampled.len()
    );
    assert_eq!(
        of("sampled").len(),
        sampled.len() * 2,
        "both events of each sampled request"
    );
    let small = of("small");
    let request = small
        .iter()
        .find(|e| {
            e["type"] == "org.kubeflow.serving.inference.request" && request_n(e) == Some(3_000)
        })
        .unwrap();
    assert_eq!(request["truncated"], "true");
    let kept = base64_len(request["data_base64"].as_str().unwrap());
    assert_eq!(kept, 100, "the payload is cut at max_payload_bytes");
    let refused = small
        .iter()
        .find(|e| {
            e["type"] == "org.kubeflow.serving.inference.response" && request_n(e) == Some(3_999)
        })
        .expect("the 400 answer is logged");
    assert_eq!(refused["statuscode"], "400");
    assert!(refused["data"]["error"].as_str().unwrap().contains("shape"));
    assert!(events.iter().all(|e| e["id"] != "forged"));
    let _ = Path::new(&mesh.dir);
}

fn base64_len(text: &str) -> usize {
    let padding = text.chars().rev().take_while(|c| *c == '=').count();
    text.len() / 4 * 3 - padding
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_spool_drops_events_counted_and_every_request_still_succeeds() {
    let mut mesh = start_with(
        "full",
        &[("digits", json!({"metadata_headers": ["x-request-n"]}))],
        &["--log-spool-max-bytes", "20000"],
    );
    // The sink down: the spool fills and stays full.
    mesh.sink.stop();
    let statuses = load(&mesh.envoy, "digits", 0..200, 8, Duration::ZERO).await;
    assert!(statuses.values().all(|s| *s == 200), "a request failed");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dropped = mesh
            .envoy
            .stat("wasmcustom.meshserve.logger.isvc.digits.result.dropped_429");
        let sent = mesh
            .envoy
            .stat("wasmcustom.meshserve.logger.isvc.digits.result.sent");
        if dropped > 0 && dropped + sent == 400 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events unaccounted for: {sent} sent, {dropped} dropped of 400"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = sidecar_metrics(&mesh.sidecar).await;
    assert!(
        metric(
            &metrics,
            "meshserve_payload_events_dropped_total{reason=\"spool_full\"}"
        ) > 0.0,
        "{metrics}"
    );
}

/// A sink written the common way: Python's `http.server.ThreadingHTTPServer` (listen backlog
/// 5, a thread per connection, HTTP/1.0 so one connection per request). Each event it takes,
/// in binary or batched mode, becomes a line of `out` in CloudEvents' JSON format.
struct PythonSink {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    out: PathBuf,
}

const PYTHON_SINK: &str = r#"
import http.server, json, sys, threading
lock, out = threading.Lock(), open(sys.argv[1], "a")
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("content-type", "").startswith("application/cloudevents-batch+json"):
            events = json.loads(body)
        else:
            event = {k[3:]: v for k, v in self.headers.items() if k.lower().startswith("ce-")}
            event["metadata"] = json.loads(event.get("metadata", "{}"))
            events = [event]
        with lock:
            for event in events:
                out.write(json.dumps(event) + "\n")
            out.flush()
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

impl PythonSink {
    fn start(out: &Path) -> PythonSink {
        use std::io::BufRead;
        let python = meshserve_e2e::root().join(".venv/bin/python");
        let mut child = meshserve_e2e::owned_command(&python)
            .args(["-c", PYTHON_SINK])
            .arg(out)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the sink's port");
        PythonSink {
            child,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            out: out.to_path_buf(),
        }
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for PythonSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sink with a listen backlog of 5 and one connection per event gets every event of 500
/// requests within 10 s of the last one: delivery keeps a few connections, never a burst
/// (64 at once used to lose most SYNs and wait seconds per event). The same in CloudEvents'
/// batched mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_common_sink_gets_every_event_soon() {
    for (tag, extra) in [
        ("slow-sink", &[][..]),
        ("slow-sink-batch", &["--log-sink-batch"][..]),
    ] {
        let dir =
            std::env::temp_dir().join(format!("meshserve-python-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sink = PythonSink::start(&dir.join("events.jsonl"));
        let url = format!("http://{}/", sink.addr);
        let mesh = start_sinking_to(
            tag,
            &[("digits", json!({"metadata_headers": ["x-request-n"]}))],
            extra,
            Some(&url),
        );
        let statuses = load(&mesh.envoy, "digits", 0..500, 16, Duration::ZERO).await;
        assert!(statuses.values().all(|s| *s == 200), "a request failed");
        let last = Instant::now();
        let events = wait_for_pairs_in(|| sink.events(), 0..500, Duration::from_secs(10));
        eprintln!(
            "{tag}: every event at the sink {:?} after the last request",
            last.elapsed()
        );
        assert_eq!(check_pairs(&events, 0..500), 0, "{tag}: no redelivery");
        drop(mesh);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
