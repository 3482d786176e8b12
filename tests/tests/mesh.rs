//! The mesh end to end: the real Envoy, the real `meshserve_filters.wasm` and real sidecars
//! on loopback. Routing for V1, V2 REST and gRPC; the canary share; sticky keys; pinning;
//! `:explain` to the explainer; unknown models answered by the filter; the split moved live
//! under load; shadows; bad configurations and bad input.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshserve_e2e::{Envoy, Sidecar, TempRepository, wasm_module, write_local_mesh};
use meshserve_mesh::canary::{Change, apply};
use meshserve_mesh::render::{self, ROUTER_ECDS_FILE};
use meshserve_proto::grpc::response_from_grpc;
use meshserve_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use meshserve_proto::inference::{
    RepositoryIndexRequest, RepositoryModelUnloadRequest, ServerLiveRequest,
};
use serde_json::{Value, json};

/// A tiny upstream that answers every request with `body` after `delay`, counting them.
struct TestServer {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl TestServer {
    fn start(body: &'static str, delay: Duration) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || serve_connection(stream, body, delay, &counter));
            }
        });
        TestServer { addr, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// HTTP/1.1 keep-alive: read a request (headers and Content-Length body), answer, repeat.
fn serve_connection(mut stream: TcpStream, body: &str, delay: Duration, hits: &AtomicUsize) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        buffer.drain(..head_end + length);
        hits.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(delay);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// A mesh: two revisions of `digits` (sklearn digits v1 default, v2 canary), an explainer and a
/// slow shadow, behind Envoy with the wasm router.
struct Mesh {
    dir: PathBuf,
    _repos: Vec<TempRepository>,
    default: Sidecar,
    canary: Sidecar,
    explainer: TestServer,
    shadow: TestServer,
    envoy: Envoy,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const SHADOW_ANSWER: &str = r#"{"predictions": [7, 6]}"#;

fn revision(name: &str, cluster: &str) -> Value {
    json!({"name": name, "cluster": cluster, "grpc_cluster": format!("{cluster}.grpc")})
}

impl Mesh {
    fn start(tag: &str, canary_percent: i64, shadow_percent: i64) -> Mesh {
        let dir = std::env::temp_dir().join(format!("meshserve-mesh-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = "version_policy: all\nv1_output: label\n";
        let v1 = TempRepository::new(
            &format!("{tag}-v1"),
            &[("digits", "sklearn_digits", config)],
        );
        let v2 = TempRepository::new(
            &format!("{tag}-v2"),
            &[("digits", "sklearn_digits", config)],
        );
        let default = Sidecar::start_on(&v1.path, &[], true);
        let canary = Sidecar::start_on(&v2.path, &[], true);
        let explainer =
            TestServer::start(r#"{"explanations": "from the explainer"}"#, Duration::ZERO);
        let shadow = TestServer::start(SHADOW_ANSWER, Duration::from_millis(1500));

        let mut predictor = json!({
            "default": revision("digits-v1", "digits.v1"),
            "canaries": [{"name": "digits-v2", "cluster": "digits.v2", "grpc_cluster": "digits.v2.grpc", "percent": canary_percent}],
        });
        if shadow_percent > 0 {
            predictor["shadow"] = json!({"name": "digits-shadow", "cluster": "digits.shadow", "percent": shadow_percent});
        }
        let config = json!({"services": [
            {"name": "digits", "namespace": "default", "models": ["digits"], "predictor": predictor,
             "explainer": revision("digits-explainer", "digits.explainer"), "sticky": {"header": "x-user"}},
            {"name": "other", "namespace": "team", "models": ["other-model"],
             "predictor": {"default": revision("other-v1", "digits.v1")}},
        ]});
        let bootstrap = write_local_mesh(
            &dir,
            &config,
            &[
                ("digits.v1", default.http, default.grpc),
                ("digits.v2", canary.http, canary.grpc),
                ("digits.explainer", explainer.addr, explainer.addr),
                ("digits.shadow", shadow.addr, shadow.addr),
            ],
            None,
        );
        let envoy = Envoy::start(&bootstrap, &dir);
        Mesh {
            dir,
            _repos: vec![v1, v2],
            default,
            canary,
            explainer,
            shadow,
            envoy,
        }
    }

    /// Successful inferences a sidecar has answered.
    async fn served(sidecar: &Sidecar) -> f64 {
        let text = reqwest::get(sidecar.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with("meshserve_inference_request_success_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn digits_v1_body() -> Value {
    json!({"instances": [vec![0.0; 64], vec![1.0; 64]]})
}

fn digits_v2_body() -> Value {
    json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": vec![3.0; 64]}]})
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Value) {
    let mut request = client.post(url).json(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let revision = response
        .headers()
        .get("x-meshserve-revision")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        revision,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_v1_v2_and_grpc_pins_sticks_explains_and_refuses_unknown_models() {
    let mesh = Mesh::start("routes", 20, 0);
    let client = reqwest::Client::new();
    let v1 = mesh.envoy.url("/v1/models/digits:predict");
    let v2 = mesh.envoy.url("/v2/models/digits/infer");

    let (status, revision, body) = post(&client, &v1, &digits_v1_body(), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(matches!(
        revision.as_deref(),
        Some("digits-v1" | "digits-v2")
    ));
    assert_eq!(
        body["predictions"].as_array().map(Vec::len),
        Some(2),
        "{body}"
    );
    let (status, _, body) = post(&client, &v2, &digits_v2_body(), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_name"], "digits");

    // gRPC: the model name is read from the request body.
    let mut grpc = GrpcInferenceServiceClient::connect(format!("http://{}", mesh.envoy.listener))
        .await
        .unwrap();
    let request = meshserve_e2e::digits_grpc_request("via-envoy");
    let response = grpc.model_infer(request.clone()).await.unwrap();
    let revision = response
        .metadata()
        .get("x-meshserve-revision")
        .map(|v| v.to_str().unwrap().to_owned());
    assert!(
        matches!(revision.as_deref(), Some("digits-v1" | "digits-v2")),
        "{revision:?}"
    );
    let answer = response_from_grpc(response.into_inner()).unwrap();
    assert_eq!(answer.id.as_deref(), Some("via-envoy"));
    let mut unknown = request.clone();
    unknown.model_name = "nope".into();
    let status = grpc.model_infer(unknown).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("unknown model 'nope'"));
    // A server-scoped call without a model and with an ambiguous host is refused clearly.
    let live = grpc.server_live(ServerLiveRequest {}).await.unwrap_err();
    assert!(live.message().contains("set the Host"), "{live:?}");

    // Pinning wins over the weights and over the sticky key.
    for (pin, expected) in [
        ("default", "digits-v1"),
        ("canary", "digits-v2"),
        ("digits-v2", "digits-v2"),
    ] {
        for _ in 0..10 {
            let (status, revision, _) = post(
                &client,
                &v1,
                &digits_v1_body(),
                &[("x-meshserve-revision", pin), ("x-user", "alice")],
            )
            .await;
            assert_eq!(
                (status, revision.as_deref()),
                (200, Some(expected)),
                "pin {pin}"
            );
        }
    }
    for (host, expected) in [
        ("latest-digits.default.example.com", "digits-v2"),
        ("prev-digits.default.example.com", "digits-v1"),
    ] {
        let (status, revision, _) = post(&client, &v1, &digits_v1_body(), &[("host", host)]).await;
        assert_eq!(
            (status, revision.as_deref()),
            (200, Some(expected)),
            "host {host}"
        );
    }
    let (status, _, body) = post(
        &client,
        &v1,
        &digits_v1_body(),
        &[("x-meshserve-revision", "v9")],
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown revision 'v9'")
    );

    // A sticky key always lands on one revision.
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let mut seen = Vec::new();
        for _ in 0..15 {
            seen.push(
                post(&client, &v1, &digits_v1_body(), &[("x-user", user)])
                    .await
                    .1
                    .unwrap(),
            );
        }
        assert!(seen.iter().all(|r| *r == seen[0]), "{user}: {seen:?}");
    }

    // :explain goes to the explainer.
    let (status, revision, body) = post(
        &client,
        &mesh.envoy.url("/v1/models/digits:explain"),
        &digits_v1_body(),
        &[],
    )
    .await;
    assert_eq!(
        (status, revision.as_deref()),
        (200, Some("digits-explainer"))
    );
    assert_eq!(body["explanations"], "from the explainer");
    assert_eq!(mesh.explainer.hits(), 1);
    let (status, _, body) = post(
        &client,
        &mesh.envoy.url("/v1/models/other-model:explain"),
        &digits_v1_body(),
        &[],
    )
    .await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("has no explainer"));

    // An unknown model is answered by the filter: no upstream sees it.
    let before = Mesh::served(&mesh.default).await + Mesh::served(&mesh.canary).await;
    let (status, revision, body) = post(
        &client,
        &mesh.envoy.url("/v2/models/nope/infer"),
        &digits_v2_body(),
        &[],
    )
    .await;
    assert_eq!((status, revision), (404, None));
    assert_eq!(body, json!({"error": "unknown model 'nope'"}));
    let after = Mesh::served(&mesh.default).await + Mesh::served(&mesh.canary).await;
    assert_eq!(before, after);
    assert!(
        mesh.envoy
            .stat("wasmcustom.meshserve.requests.isvc.none.revision.none.outcome.replied_404")
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_apis_are_refused_through_the_mesh_and_answer_on_the_sidecar() {
    let mesh = Mesh::start("control", 20, 0);
    let client = reqwest::Client::new();
    let unload = "/v2/repository/models/digits/unload";
    type Headers = &'static [(&'static str, &'static str)];
    let refused: [(&str, &str, Headers); 8] = [
        ("POST", unload, &[]),
        ("POST", unload, &[("x-meshserve-revision", "canary")]),
        ("POST", unload, &[("x-meshserve-revision", "digits-v1")]),
        (
            "POST",
            unload,
            &[("host", "latest-digits.default.example.com")],
        ),
        (
            "POST",
            "/v2/repository/models/digits/load",
            &[("host", "prev-digits.default.example.com")],
        ),
        ("POST", "/v2/repository/index", &[]),
        ("POST", "/v2/%72epository//index", &[]),
        ("GET", "/v2/models/digits/stats", &[]),
    ];
    for (method, path, headers) in refused {
        let mut request = client
            .request(method.parse().unwrap(), mesh.envoy.url(path))
            .body("{}");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            403,
            "{method} {path} {headers:?}"
        );
        assert!(response.headers().get("x-meshserve-revision").is_none());
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("is a control API"),
            "{body}"
        );
    }
    let mut grpc = GrpcInferenceServiceClient::connect(format!("http://{}", mesh.envoy.listener))
        .await
        .unwrap();
    let status = grpc
        .repository_model_unload(RepositoryModelUnloadRequest {
            repository_name: String::new(),
            model_name: "digits".into(),
            parameters: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = grpc
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // The intake and the metrics were never on the public listener.
    for path in ["/meshserve/events", "/metrics"] {
        let response = client
            .post(mesh.envoy.url(path))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 404, "{path}");
    }

    // Nothing was unloaded: both revisions still answer through the mesh.
    for pin in ["default", "canary"] {
        let (status, _, body) = post(
            &client,
            &mesh.envoy.url("/v1/models/digits:predict"),
            &digits_v1_body(),
            &[("x-meshserve-revision", pin)],
        )
        .await;
        assert_eq!(status, 200, "{pin}: {body}");
    }
    // Operators reach the control APIs on the sidecar's own port.
    let index: Value = client
        .post(mesh.canary.url("/v2/repository/index"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(index[0]["name"], "digits", "{index}");
    assert!(
        mesh.envoy
            .stat("wasmcustom.meshserve.requests.isvc.none.revision.none.outcome.replied_403")
            >= 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twenty_percent_canary_gets_twenty_percent() {
    let mesh = Mesh::start("share", 20, 0);
    let client = reqwest::Client::new();
    let url = mesh.envoy.url("/v2/models/digits/infer");
    let total = 2000;
    let mut by_header: HashMap<String, usize> = HashMap::new();
    for _ in 0..total {
        let (status, revision, body) = post(&client, &url, &digits_v2_body(), &[]).await;
        assert_eq!(status, 200, "{body}");
        *by_header.entry(revision.unwrap()).or_default() += 1;
    }
    let canary_served = Mesh::served(&mesh.canary).await as usize;
    let default_served = Mesh::served(&mesh.default).await as usize;
    assert_eq!(canary_served + default_served, total);
    assert_eq!(
        by_header.get("digits-v2").copied().unwrap_or(0),
        canary_served,
        "the header names the revision that served"
    );
    let share = canary_served as f64 / total as f64 * 100.0;
    assert!(
        (17.0..=23.0).contains(&share),
        "canary share {share:.1}% of {total}"
    );
    let routed = mesh
        .envoy
        .stat("wasmcustom.meshserve.requests.isvc.digits.revision.digits-v2.outcome.routed");
    assert_eq!(routed as usize, canary_served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_split_moves_live_under_load_without_a_failed_request() {
    let mesh = Mesh::start("live", 0, 0);
    let url = mesh.envoy.url("/v1/models/digits:predict");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut loaders = Vec::new();
    let log: Arc<std::sync::Mutex<Vec<(Instant, String)>>> = Arc::default();
    for _ in 0..4 {
        let (url, stop, failures, log) = (
            url.clone(),
            Arc::clone(&stop),
            Arc::clone(&failures),
            Arc::clone(&log),
        );
        loaders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                match client.post(&url).json(&digits_v1_body()).send().await {
                    Ok(r) if r.status() == 200 => {
                        let revision = r
                            .headers()
                            .get("x-meshserve-revision")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        log.lock().unwrap().push((Instant::now(), revision));
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    let share_since = |since: Instant| {
        let entries = log.lock().unwrap();
        let recent: Vec<&String> = entries
            .iter()
            .filter(|(t, _)| *t > since)
            .map(|(_, r)| r)
            .collect();
        let canary = recent.iter().filter(|r| r.as_str() == "digits-v2").count();
        (canary, recent.len())
    };
    let settle = Duration::from_millis(1500);
    tokio::time::sleep(settle).await;
    let (canary, n) = share_since(Instant::now() - settle);
    assert!(n > 20 && canary == 0, "at 0%: {canary}/{n}");
    for (percent, low, high) in [(50, 0.35, 0.65), (100, 1.0, 1.0)] {
        apply(&mesh.dir, "digits", None, &Change::Percent(percent)).unwrap();
        // Envoy notices the replaced file within a moment; measure after that.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let since = Instant::now();
        tokio::time::sleep(settle).await;
        let (canary, n) = share_since(since);
        let share = canary as f64 / n as f64;
        assert!(
            n > 20 && share >= low && share <= high,
            "at {percent}%: {canary}/{n}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    for loader in loaders {
        loader.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "requests failed while the split moved"
    );
    assert!(
        mesh.envoy
            .stat("extension_config_discovery.http_filter.meshserve.router.config_reload")
            >= 3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configurations_are_rejected_and_the_previous_one_keeps_serving() {
    let mesh = Mesh::start("badconfig", 0, 0);
    let client = reqwest::Client::new();
    let url = mesh.envoy.url("/v1/models/digits:predict");
    let ecds_path = mesh.dir.join(ROUTER_ECDS_FILE);
    let good: Value = serde_json::from_slice(&std::fs::read(&ecds_path).unwrap()).unwrap();
    let bad_configs = [
        (
            "{not json".to_owned(),
            "invalid meshserve filter configuration",
        ),
        (
            json!({"services": [], "weights": 3}).to_string(),
            "unknown field `weights`",
        ),
        (
            json!({"services": [{"name": "digits", "models": ["digits"], "predictor": {
                "default": revision("digits-v1", "digits.v1"),
                "canaries": [{"name": "digits-v2", "cluster": "digits.v2", "percent": 120}]}}]})
            .to_string(),
            "120 is not between 0 and 100",
        ),
    ];
    for (i, (config, reason)) in bad_configs.iter().enumerate() {
        let mut ecds = good.clone();
        *ecds
            .pointer_mut("/resources/0/typed_config/config/configuration/value")
            .unwrap() = Value::from(config.as_str());
        render::write_atomically(&ecds_path, &ecds).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while mesh
            .envoy
            .stat("extension_config_discovery.http_filter.meshserve.router.config_fail")
            < (i + 1) as u64
        {
            assert!(
                Instant::now() < deadline,
                "Envoy did not reject bad config {i}:\n{}",
                mesh.envoy.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            mesh.envoy.log().contains(reason),
            "no logged reason {reason:?}:\n{}",
            mesh.envoy.log()
        );
        for _ in 0..10 {
            let (status, revision, _) = post(&client, &url, &digits_v1_body(), &[]).await;
            assert_eq!(
                (status, revision.as_deref()),
                (200, Some("digits-v1")),
                "after bad config {i}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_get_their_share_and_clients_never_wait_for_them() {
    let mesh = Mesh::start("shadow", 0, 50);
    let client = reqwest::Client::new();
    let url = mesh.envoy.url("/v1/models/digits:predict");
    let body = json!({"instances": [vec![0.0; 64], vec![16.0; 64]]});
    let total = 40;
    let started = Instant::now();
    for _ in 0..total {
        let sent = Instant::now();
        let (status, revision, _) = post(&client, &url, &body, &[]).await;
        assert_eq!((status, revision.as_deref()), (200, Some("digits-v1")));
        // The shadow takes 1.5 s to answer; the client must not wait for it.
        assert!(
            sent.elapsed() < Duration::from_millis(1000),
            "a request took {:?}",
            sent.elapsed()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(10);
    let sent = || {
        mesh.envoy
            .stat("wasmcustom.meshserve.shadow.isvc.digits.revision.digits-shadow.result.sent")
    };
    let verdicts = || {
        ["agree", "disagree", "unknown", "error"]
            .iter()
            .map(|r| {
                mesh.envoy.stat(&format!(
                    "wasmcustom.meshserve.shadow.isvc.digits.revision.digits-shadow.result.{r}"
                ))
            })
            .sum::<u64>()
    };
    while verdicts() < sent() {
        assert!(
            Instant::now() < deadline,
            "shadow verdicts missing: {} sent, {} settled",
            sent(),
            verdicts()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let copies = mesh.shadow.hits();
    assert_eq!(copies as u64, sent());
    assert!(
        (8..=32).contains(&copies),
        "{copies} of {total} requests shadowed at 50%"
    );
    // The primary and the shadow answer in the same V1 shape; both verdicts are possible, but
    // every copy gets one.
    assert_eq!(verdicts(), sent());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_answer_and_the_vm_survives() {
    let mesh = Mesh::start("garbage", 20, 0);
    let addr = mesh.envoy.listener;
    let raw = move |request: Vec<u8>| -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(&request).unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        String::from_utf8_lossy(&response).into_owned()
    };
    let answers = tokio::task::spawn_blocking(move || {
        let mut answers = Vec::new();
        for path in ["/v2/models/%zz/infer", "/v1/models/:predict", "/v2/models//infer", "/%%%", "/v2/models/a%00b/infer"] {
            answers.push((path.to_owned(), raw(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes())));
        }
        let huge = "x".repeat(100_000);
        answers.push(("huge header".into(), raw(format!("GET /v2/models/digits HTTP/1.1\r\nHost: x\r\nx-big: {huge}\r\nConnection: close\r\n\r\n").into_bytes())));
        // Header values may hold any octet from 0x80 up: not UTF-8, and the SDK's header
        // getter panicked on it, which killed the worker's VM (every later request failed).
        let body = br#"{"instances": [[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]}"#;
        let mut pinned = format!("POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\nx-meshserve-revision: a", body.len()).into_bytes();
        pinned.extend(b"\xff\xfe\r\n\r\n");
        pinned.extend(body);
        answers.push(("a pin that is not UTF-8".into(), raw(pinned)));
        answers.push((
            "truncated body".into(),
            raw(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"instances\": [".to_vec()),
        ));
        answers
    })
    .await
    .unwrap();
    for (what, answer) in &answers {
        let status: u16 = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(
            (400..500).contains(&status) || answer.is_empty(),
            "{what}: {answer:.300}"
        );
    }
    // Malformed gRPC frames: compressed flag, a broken protobuf, and a frame cut short.
    let mut grpc = GrpcInferenceServiceClient::connect(format!("http://{}", mesh.envoy.listener))
        .await
        .unwrap();
    let _ = grpc.server_live(ServerLiveRequest {}).await;
    for frame in [
        vec![1u8, 0, 0, 0, 2, 0x0a, 0],
        vec![0, 0, 0, 0, 3, 0x0a, 0x05, b'a'],
        vec![0, 0, 0, 0, 50, 0x0a],
    ] {
        let response = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap()
            .post(mesh.envoy.url("/inference.GRPCInferenceService/ModelInfer"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(frame.clone())
            .send()
            .await
            .unwrap();
        let grpc_status = response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            grpc_status.as_deref(),
            Some("3"),
            "frame {frame:?}: {:?}",
            response.headers()
        );
    }
    // The VM is alive and still routing.
    let client = reqwest::Client::new();
    for _ in 0..10 {
        let (status, revision, _) = post(
            &client,
            &mesh.envoy.url("/v1/models/digits:predict"),
            &digits_v1_body(),
            &[],
        )
        .await;
        assert_eq!(status, 200);
        assert!(revision.is_some());
    }
    let log = mesh.envoy.log();
    assert!(
        !log.contains("panicked") && !log.contains("Function: proxy_on"),
        "the wasm VM failed:\n{log}"
    );
}

/// `meshserve up` on the demo: Envoy and two sidecars come up on loopback, requests route
/// through Envoy, `meshserve canary` moves the split, SIGTERM stops everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshserve_up_runs_the_demo_and_stops_cleanly() {
    let root = meshserve_e2e::root();
    let state = std::env::temp_dir().join(format!("meshserve-up-{}", std::process::id()));
    let mut child = meshserve_e2e::owned_command(meshserve_e2e::binary())
        .args([
            "up",
            &root
                .join("envoy-config/demo/inferenceservice.yaml")
                .display()
                .to_string(),
            "--port",
            "0",
        ])
        .args([
            "--state-dir",
            &state.display().to_string(),
            "--envoy",
            &meshserve_e2e::envoy_binary().display().to_string(),
        ])
        .args(["--wasm", &wasm_module().display().to_string()])
        .env(
            "ORT_DYLIB_PATH",
            std::env::var("ORT_DYLIB_PATH").unwrap_or_default(),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let envoy: String = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(90))
            .expect("meshserve up did not come up");
        if let Some(rest) = line.strip_prefix("meshserve is up: Envoy on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let client = reqwest::Client::new();
    let url = format!("{envoy}/v1/models/digits:predict");
    let mut seen = HashMap::new();
    for _ in 0..50 {
        let (status, revision, body) = post(&client, &url, &digits_v1_body(), &[]).await;
        assert_eq!(status, 200, "{body}");
        *seen.entry(revision.unwrap()).or_insert(0) += 1;
    }
    assert!(seen.contains_key("digits-predictor-v1"), "{seen:?}");
    let split = apply(&state, "digits", None, &Change::Percent(100)).unwrap();
    assert_eq!(
        split,
        "digits: digits-predictor-v1 0% (warm), digits-predictor-v2 100% (warm)"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..10 {
        let (_, revision, _) = post(&client, &url, &digits_v1_body(), &[]).await;
        assert_eq!(revision.as_deref(), Some("digits-predictor-v2"));
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "meshserve up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(
        client
            .post(&url)
            .json(&digits_v1_body())
            .send()
            .await
            .is_err(),
        "Envoy still answers after the stop"
    );
    let _ = std::fs::remove_dir_all(&state);
}

/// A revision's sidecar SIGKILLed under load: clients of the other revision see no failure, the
/// killed one's requests fail fast (503, never a hang), and `meshserve up` starts it again on
/// the ports Envoy knows, after which its traffic resumes with nothing else to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidecar_is_started_again_and_the_other_revision_never_notices() {
    let up = meshserve_e2e::Up::start(
        &meshserve_e2e::root().join("envoy-config/demo/inferenceservice.yaml"),
        &[],
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("{}/v1/models/digits:predict", up.url);
    let body =
        std::fs::read(meshserve_e2e::root().join("models/samples/sklearn_digits_v1_request.json"))
            .unwrap();
    let ask = |pin: &'static str| {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        async move {
            let started = Instant::now();
            let status = client
                .post(&url)
                .header("x-meshserve-revision", pin)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            (status, started.elapsed())
        }
    };
    for pin in ["default", "canary"] {
        assert_eq!(ask(pin).await.0, 200, "{pin} before the kill");
    }
    let canary = meshserve_e2e::children_with(up.pid(), "digits-predictor-v2");
    assert_eq!(canary.len(), 1, "one canary sidecar: {canary:?}");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &canary[0].to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut failed_fast, mut back) = (0, false);
    while Instant::now() < deadline && !back {
        let ((default, _), (canary, took)) = tokio::join!(ask("default"), ask("canary"));
        assert_eq!(default, 200, "the default revision's clients never notice");
        assert!(
            took < Duration::from_secs(2),
            "a request to the dead revision took {took:?}"
        );
        match canary {
            200 => back = true,
            503 => failed_fast += 1,
            other => panic!("the dead revision answered {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "the canary did not come back within 30 s");
    let again = meshserve_e2e::children_with(up.pid(), "digits-predictor-v2");
    assert!(
        again.len() == 1 && again != canary,
        "a new canary sidecar: {again:?} (was {canary:?})"
    );
    eprintln!("the killed revision answered 503 {failed_fast} times before it was back");
    for _ in 0..20 {
        assert_eq!(ask("canary").await.0, 200);
    }
}

/// The live router configuration of a running `meshserve up`, changed by `edit` (as
/// `meshserve canary` does: the ECDS file Envoy watches, replaced in one rename).
fn edit_live_config(state: &std::path::Path, edit: impl FnOnce(&mut Value)) {
    let path = state.join(ROUTER_ECDS_FILE);
    let mut ecds: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let at = "/resources/0/typed_config/config/configuration/value";
    let mut config: Value =
        serde_json::from_str(ecds.pointer(at).unwrap().as_str().unwrap()).unwrap();
    edit(&mut config);
    *ecds.pointer_mut(at).unwrap() = Value::from(config.to_string());
    render::write_atomically(&path, &ecds).unwrap();
}

/// Waits until `meshserve up`'s states file says `want` for `revision` of `isvc`.
async fn wait_for_state(state: &std::path::Path, isvc: &str, revision: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let states: Value = std::fs::read(state.join(meshserve_mesh::up::STATES_FILE))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .unwrap_or(Value::Null);
        if states[isvc][revision] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{revision} was not {want} within 20 s: {states}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An InferenceService at `minReplicas: 0` under `meshserve up`: no sidecar until a request;
/// a burst of 64 (REST and gRPC) to the cold revision all answered right while the router
/// holds them; the sidecar stops after the retention period and the next request wakes it
/// again; past the hold limit and the cap, 503 with `Retry-After`; a warm InferenceService
/// beside it serves throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_at_zero_wakes_on_its_first_requests_and_none_fails() {
    let root = meshserve_e2e::root();
    let model = root.join("models/repository/sklearn_digits/1/model.onnx");
    let file = std::env::temp_dir().join(format!("meshserve-zero-{}.yaml", std::process::id()));
    let isvc = |name: &str, extra: &str| {
        format!(
            "apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata:\n  name: {name}\n{extra}spec:\n  predictor:\n    name: {name}-predictor\n{}    model:\n      modelFormat: {{name: onnx}}\n      storageUri: file://{}\n",
            if extra.is_empty() {
                ""
            } else {
                "    minReplicas: 0\n"
            },
            model.display()
        )
    };
    let retention =
        "  annotations: {autoscaling.knative.dev/scale-to-zero-pod-retention-period: 2s}\n";
    std::fs::write(
        &file,
        format!("{}---\n{}", isvc("digits", retention), isvc("warm", "")),
    )
    .unwrap();
    let up = meshserve_e2e::Up::start(&file, &[]);
    let _ = std::fs::remove_file(&file);
    let sidecars = || meshserve_e2e::children_with(up.pid(), "digits-predictor");
    assert!(
        sidecars().is_empty(),
        "no sidecar at zero: {:?}",
        sidecars()
    );
    wait_for_state(&up.state, "digits", "digits-predictor", "cold").await;

    // The same model, warm: the answers the cold revision must give.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let warm_url = format!("{}/v1/models/warm:predict", up.url);
    let (status, _, expected) = post(&client, &warm_url, &digits_v1_body(), &[]).await;
    assert_eq!(status, 200, "{expected}");
    let mut grpc = GrpcInferenceServiceClient::connect(up.url.clone())
        .await
        .unwrap();
    let mut warm_grpc = meshserve_e2e::digits_grpc_request("warm");
    warm_grpc.model_name = "warm".into();
    let expected_grpc = response_from_grpc(grpc.model_infer(warm_grpc).await.unwrap().into_inner())
        .unwrap()
        .outputs;

    // Past the cap and the hold limit: 503 with Retry-After, at once or at the limit.
    edit_live_config(&up.state, |c| {
        c["limits"] = json!({"held_per_revision": 1, "hold_ms": 1});
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let url = format!("{}/v1/models/digits:predict", up.url);
    let mut refused = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url) = (client.clone(), url.clone());
        refused.spawn(async move {
            let response = client
                .post(&url)
                .json(&digits_v1_body())
                .send()
                .await
                .unwrap();
            let retry = response.headers().get("retry-after").cloned();
            (
                response.status().as_u16(),
                retry,
                response.text().await.unwrap(),
            )
        });
    }
    let (mut over_cap, mut over_limit) = (0, 0);
    while let Some(answer) = refused.join_next().await {
        let (status, retry, body) = answer.unwrap();
        assert_eq!(
            (status, retry.as_ref().map(|r| r.to_str().unwrap())),
            (503, Some("1")),
            "{body}"
        );
        over_cap += usize::from(body.contains("1 requests already wait"));
        over_limit += usize::from(body.contains("was not ready within 1 ms"));
    }
    assert_eq!(
        (over_cap + over_limit, over_limit >= 1),
        (8, true),
        "{over_cap} {over_limit}"
    );
    edit_live_config(&up.state, |c| {
        c.as_object_mut().unwrap().remove("limits");
    });
    // Those requests woke it; it goes back to zero after the 2 s retention period.
    wait_for_state(&up.state, "digits", "digits-predictor", "warm").await;
    wait_for_state(&up.state, "digits", "digits-predictor", "cold").await;
    assert!(sidecars().is_empty(), "stopped after the retention period");

    // A warm neighbour serves throughout.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let neighbour = {
        let (client, stop) = (client.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut served = 0;
            while !stop.load(Ordering::Relaxed) {
                let (status, _, body) = post(&client, &warm_url, &digits_v1_body(), &[]).await;
                assert_eq!(status, 200, "the warm InferenceService failed: {body}");
                served += 1;
            }
            served
        })
    };
    for round in 0..2 {
        let started = Instant::now();
        let mut burst = tokio::task::JoinSet::new();
        for i in 0..64 {
            let (client, url, endpoint) = (client.clone(), url.clone(), up.url.clone());
            let expected = expected.clone();
            let expected_grpc = expected_grpc.clone();
            burst.spawn(async move {
                if i % 2 == 0 {
                    let (status, _, body) = post(&client, &url, &digits_v1_body(), &[]).await;
                    assert_eq!((status, &body), (200, &expected), "REST request {i}");
                } else {
                    let mut grpc = GrpcInferenceServiceClient::connect(endpoint).await.unwrap();
                    let answer = grpc
                        .model_infer(meshserve_e2e::digits_grpc_request(&format!("burst-{i}")))
                        .await
                        .unwrap_or_else(|s| panic!("gRPC request {i}: {s}"));
                    let answer = response_from_grpc(answer.into_inner()).unwrap();
                    assert_eq!(answer.outputs, expected_grpc, "gRPC request {i}");
                }
                started.elapsed()
            });
        }
        let mut times = Vec::new();
        while let Some(took) = burst.join_next().await {
            times.push(took.unwrap());
        }
        times.sort();
        eprintln!(
            "round {round}: 64 requests to a revision at zero: first answer after {:?}, last after {:?}",
            times[0], times[63]
        );
        assert_eq!(sidecars().len(), 1, "one sidecar woken");
        // The next round starts from zero again: the request after the stop wakes it.
        wait_for_state(&up.state, "digits", "digits-predictor", "warm").await;
        wait_for_state(&up.state, "digits", "digits-predictor", "cold").await;
        assert!(sidecars().is_empty());
    }
    stop.store(true, Ordering::Relaxed);
    let served = neighbour.await.unwrap();
    assert!(served > 10, "the neighbour served {served}");
    let stats = reqwest::get(format!("{}/stats?filter=held", admin_of(&up)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        stats.contains("wasmcustom.meshserve.held.revision.digits-predictor: 0"),
        "the held gauge is back to 0: {stats}"
    );
}

/// Envoy's admin address of a running `meshserve up`.
fn admin_of(up: &meshserve_e2e::Up) -> String {
    let admin = std::fs::read_to_string(up.state.join("envoy-admin-address")).unwrap();
    format!("http://{}", admin.trim())
}
