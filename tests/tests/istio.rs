//! The rendered Istio resources end to end, in an Istio-shaped ingress gateway
//! ([`meshserve_e2e::istio`]): real Envoy configured from `meshserve render`'s
//! `gateway.yaml`, `virtualservices.yaml` and either `wasmplugins.yaml` or
//! `envoyfilter.yaml`, with Istio's cluster names, in front of real sidecars.
//!
//! The demo InferenceServices as written (only their model paths and log sink changed for
//! this machine) plus a shadow revision: V1, V2 and gRPC routing, the canary split and
//! pinning, the transformer, payload events reaching the sink in pairs, shadow verdicts, and
//! a live change of the split by applying a new rendering. And the check that the rendering
//! before Istio's names (the local cluster names in `pluginConfig`) loses every payload event
//! and every shadow copy there.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use meshserve_e2e::istio::{Form, IstioGateway, Pods};
use meshserve_e2e::{LogSink, Sidecar, root, run_to_exit, wasm_module};
use meshserve_proto::grpc::response_from_grpc;
use meshserve_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use serde_json::{Value, json};

const SAMPLE: &str = include_str!("../../models/samples/sklearn_digits_v1_request.json");
const SHADOW: &str = "digits-predictor-v3";
/// The cluster's DNS domain, not the default, so that `--cluster-domain` is exercised.
const DOMAIN: &str = "corp.internal";

/// The demo's InferenceServices for this machine: absolute model paths, the test's sink, a
/// shadow revision copied every request, and the canary at `canary` percent.
fn inference_services(sink: &str, canary: u32) -> String {
    let demo = std::fs::read_to_string(root().join("envoy-config/demo/inferenceservice.yaml"))
        .expect("the demo InferenceService");
    let models = root().join("models").canonicalize().unwrap();
    let shadow = format!(
        "  shadow:\n    trafficPercent: 100\n    predictor:\n      name: {SHADOW}\n      model:\n        modelFormat:\n          name: onnx\n        storageUri: file://{}/repository/sklearn_digits/2/model.onnx\n",
        models.display()
    );
    let text = demo
        .replace(
            "file://../../models",
            &format!("file://{}", models.display()),
        )
        .replace("url: http://127.0.0.1:8090", &format!("url: {sink}"))
        .replace(
            "      trafficPercent: 20\n",
            &format!("      trafficPercent: {canary}\n{shadow}"),
        );
    assert!(
        text.contains(SHADOW) && text.contains(sink),
        "the demo file changed shape"
    );
    text
}

/// A gateway, its sidecars and the sink, for one form.
struct Istio {
    dir: PathBuf,
    sink: LogSink,
    sidecars: Vec<(String, Sidecar)>,
    gateway: IstioGateway,
}

impl Drop for Istio {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- log-sink ----\n{}", self.sink.log());
            for (name, sidecar) in &self.sidecars {
                eprintln!("---- {name} ----\n{}", sidecar.log());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn render(file: &Path, out: &Path) {
    let (status, log) = run_to_exit(
        &[
            "render",
            &file.display().to_string(),
            "--out",
            &out.display().to_string(),
            "--wasm-file",
            &wasm_module().display().to_string(),
            "--cluster-domain",
            DOMAIN,
        ],
        Duration::from_secs(60),
    );
    assert!(status.is_some_and(|s| s.success()), "render failed:\n{log}");
}

/// Rewrites a rendering's Istio files back to the cluster names meshserve rendered before it
/// used Istio's (`<isvc>.<revision>`, the local Envoy's), as `kubectl apply` would have got
/// them.
fn with_local_names(out: &Path) {
    for file in [
        "wasmplugins.yaml",
        "envoyfilter.yaml",
        "virtualservices.yaml",
    ] {
        let path = out.join("istio").join(file);
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (isvc, revision) in [
            ("digits", "digits-predictor-v1"),
            ("digits", "digits-predictor-v2"),
            ("digits", SHADOW),
            ("mnist", "mnist-predictor-v1"),
            ("digits-xgboost", "digits-xgboost-predictor"),
        ] {
            let host = format!("{revision}.default.svc.{DOMAIN}");
            text = text
                .replace(
                    &format!("outbound|8081||{host}"),
                    &format!("{isvc}.{revision}.grpc"),
                )
                .replace(
                    &format!("outbound|8080||{host}"),
                    &format!("{isvc}.{revision}"),
                );
        }
        assert!(!text.contains("outbound|"), "{file}: names left");
        std::fs::write(&path, text).unwrap();
    }
}

impl Istio {
    fn start(tag: &str, form: Form, local_names: bool) -> Istio {
        let dir =
            std::env::temp_dir().join(format!("meshserve-istio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sink = LogSink::start(0, &dir.join("events.jsonl"));
        let file = dir.join("inferenceservice.yaml");
        std::fs::write(
            &file,
            inference_services(&format!("http://{}/", sink.addr), 30),
        )
        .unwrap();
        let out = dir.join("rendered");
        render(&file, &out);
        if local_names {
            with_local_names(&out);
        }

        // The pods: a sidecar per revision, as its Deployment runs it (the model and the
        // sink), on loopback ports.
        let models = root().join("models/repository");
        let spool = |name: &str| dir.join(format!("{name}.spool")).display().to_string();
        let sink_url = format!("http://{}/", sink.addr);
        let mut sidecars = Vec::new();
        for (name, isvc, storage, logs) in [
            (
                "digits-predictor-v1",
                "digits",
                "sklearn_digits/1/model.onnx",
                true,
            ),
            (
                "digits-predictor-v2",
                "digits",
                "sklearn_digits/2/model.onnx",
                true,
            ),
            (SHADOW, "digits", "sklearn_digits/2/model.onnx", false),
            ("mnist-predictor-v1", "mnist", "mnist_cnn", false),
        ] {
            let mut args: Vec<String> = [
                "--storage",
                &models.join(storage).display().to_string(),
                "--model-name",
                isvc,
                "--http-port",
                "0",
                "--grpc-port",
                "0",
            ]
            .map(str::to_owned)
            .to_vec();
            if logs {
                args.extend(["--log-sink".into(), sink_url.clone()]);
                args.extend(["--log-spool".into(), spool(name)]);
            }
            sidecars.push((name.to_owned(), Sidecar::serve(&args, true)));
        }
        let mut pods = Pods::new();
        for (name, sidecar) in &sidecars {
            pods.insert(
                ("default".into(), name.clone()),
                BTreeMap::from([
                    ("http".to_owned(), sidecar.http),
                    ("grpc".to_owned(), sidecar.grpc),
                ]),
            );
        }
        let gateway = IstioGateway::start(
            &out,
            form,
            pods,
            &wasm_module(),
            DOMAIN,
            &dir.join("gateway"),
        )
        .unwrap_or_else(|e| panic!("the rendering does not translate: {e}"));
        Istio {
            dir,
            sink,
            sidecars,
            gateway,
        }
    }

    fn url(&self, path: &str) -> String {
        self.gateway.envoy.url(path)
    }

    fn stat(&self, name: &str) -> u64 {
        self.gateway.envoy.stat(name)
    }

    /// Renders the InferenceServices again with the canary at `canary` percent and applies
    /// the rendering to the running gateway.
    fn apply_canary(&self, canary: u32) {
        let file = self.dir.join("inferenceservice.yaml");
        let sink = format!("http://{}/", self.sink.addr);
        std::fs::write(&file, inference_services(&sink, canary)).unwrap();
        let out = self.dir.join("rendered");
        render(&file, &out);
        self.gateway.apply(&out).unwrap();
    }
}

/// POSTs `body` with `x-user: user` (the demo logger's metadata header) and maybe a pin;
/// returns the status, the revision that answered and the body.
async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &str,
    user: &str,
    pin: Option<&str>,
) -> (u16, String, Value) {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-user", user)
        .body(body.to_owned());
    if let Some(pin) = pin {
        request = request.header("x-meshserve-revision", pin);
    }
    let response = request.send().await.expect("the gateway answers");
    let status = response.status().as_u16();
    let revision = response
        .headers()
        .get("x-meshserve-revision")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.unwrap_or_default();
    (
        status,
        revision,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Sends `n` V1 requests (users `prefix-0`...); returns how many each revision answered.
async fn split(istio: &Istio, n: usize, prefix: &str) -> HashMap<String, usize> {
    let client = reqwest::Client::new();
    let url = istio.url("/v1/models/digits:predict");
    let mut counts = HashMap::new();
    for i in 0..n {
        let (status, revision, body) =
            post(&client, &url, SAMPLE, &format!("{prefix}-{i}"), None).await;
        assert_eq!(status, 200, "{body}");
        *counts.entry(revision).or_insert(0) += 1;
    }
    counts
}

/// Waits until `check` holds, up to `within`.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check()
}

/// The users whose request and response events both reached the sink, paired by event id.
fn paired_users(sink: &LogSink) -> Vec<String> {
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    for event in sink.events() {
        by_id
            .entry(event["id"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(event);
    }
    let mut users: Vec<String> = by_id
        .values()
        .filter(|group| {
            let mut kinds: Vec<&str> = group.iter().filter_map(|e| e["type"].as_str()).collect();
            kinds.sort_unstable();
            kinds
                == [
                    "org.kubeflow.serving.inference.request",
                    "org.kubeflow.serving.inference.response",
                ]
        })
        .filter_map(|group| Some(group[0]["metadata"]["x-user"][0].as_str()?.to_owned()))
        .collect();
    users.sort();
    users
}

fn shadow_stat(result: &str) -> String {
    format!("wasmcustom.meshserve.shadow.isvc.digits.revision.{SHADOW}.result.{result}")
}

/// A gRPC ModelInfer through the gateway, with `authority` as the request's authority.
async fn grpc_infer(
    istio: &Istio,
    authority: Option<&str>,
) -> Result<meshserve_proto::InferResponse, tonic::Status> {
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", istio.gateway.envoy.listener))
            .unwrap();
    if let Some(authority) = authority {
        endpoint = endpoint.origin(format!("http://{authority}").parse().unwrap());
    }
    let mut grpc = GrpcInferenceServiceClient::new(endpoint.connect().await.unwrap());
    let request = meshserve_e2e::digits_grpc_request("through-istio");
    let response = tokio::time::timeout(Duration::from_secs(10), grpc.model_infer(request))
        .await
        .expect("a gRPC answer within 10 s")?;
    Ok(response_from_grpc(response.into_inner()).unwrap())
}

/// Everything the local mesh tests check, through the Istio-shaped gateway.
async fn serves_through_the_gateway(form: Form, tag: &str) {
    let istio = Istio::start(tag, form, false);
    let client = reqwest::Client::new();
    // The router first (it names the service for everything after it), the logger last.
    let chain: &[&str] = match form {
        Form::WasmPlugins => &[
            "istio-system.meshserve-router",
            "istio-system.meshserve-transformer",
            "istio-system.meshserve-logger",
        ],
        Form::EnvoyFilter => &[
            "meshserve.router",
            "meshserve.transformer",
            "meshserve.logger",
        ],
    };
    assert_eq!(istio.gateway.filters(), chain);

    // V1 and V2 REST.
    let (status, revision, body) = post(
        &client,
        &istio.url("/v1/models/digits:predict"),
        SAMPLE,
        "v1",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(revision.starts_with("digits-predictor-v"), "{revision}");
    assert!(body["predictions"].is_array(), "{body}");
    let v2 = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": vec![3.0; 64]}]});
    let (status, _, body) = post(
        &client,
        &istio.url("/v2/models/digits/infer"),
        &v2.to_string(),
        "v2",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_name"], "digits");

    // gRPC, by KServe's host for the service, and by the model named in the message: that
    // needs the headers held, which the WasmPlugin form cannot (a clear refusal, no wait).
    let by_host = grpc_infer(&istio, Some("digits.default.example.com")).await;
    assert_eq!(by_host.unwrap().id.as_deref(), Some("through-istio"));
    let by_body = grpc_infer(&istio, None).await;
    match form {
        Form::EnvoyFilter => assert_eq!(by_body.unwrap().id.as_deref(), Some("through-istio")),
        Form::WasmPlugins => {
            let status = by_body.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status.message().contains("routes gRPC by host"),
                "{status:?}"
            );
        }
    }

    // The transformer: a photo of a digit, as KServe V1's {"b64": ...}.
    let photo = std::fs::read(root().join("models/samples/digit_photo.jpg")).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(photo);
    let (status, _, body) = post(
        &client,
        &istio.url("/v1/models/mnist:predict"),
        &json!({"instances": [{"b64": b64}]}).to_string(),
        "photo",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["predictions"][0]["digits"].is_array(), "{body}");

    // The canary's 30%, and pinning.
    let counts = split(&istio, 100, "split").await;
    let canary = counts.get("digits-predictor-v2").copied().unwrap_or(0);
    assert!(
        (15..=45).contains(&canary),
        "canary share at 30%: {counts:?}"
    );
    assert!(
        !counts.contains_key(SHADOW),
        "the shadow answered a client: {counts:?}"
    );
    for (pin, expected) in [
        ("canary", "digits-predictor-v2"),
        ("default", "digits-predictor-v1"),
    ] {
        let (status, revision, body) = post(
            &client,
            &istio.url("/v1/models/digits:predict"),
            SAMPLE,
            "pinned",
            Some(pin),
        )
        .await;
        assert_eq!((status, revision.as_str()), (200, expected), "{body}");
    }

    // Every digits request's payload events reached the sink, request and response paired.
    let expected: Vec<String> = {
        let mut users: Vec<String> = (0..100).map(|i| format!("split-{i}")).collect();
        users.extend(["v1", "v2", "pinned", "pinned"].map(str::to_owned));
        users.sort();
        users
    };
    let arrived = eventually(Duration::from_secs(20), || {
        paired_users(&istio.sink) == expected
    })
    .await;
    assert!(
        arrived,
        "payload events: {} of {} requests paired",
        paired_users(&istio.sink).len(),
        expected.len()
    );

    // Every digits request was copied to the shadow, and each copy got a verdict.
    let sent = istio.stat(&shadow_stat("sent"));
    assert!(sent >= 100, "{sent} shadow copies sent");
    let settled = eventually(Duration::from_secs(10), || {
        ["agree", "disagree", "unknown", "error"]
            .iter()
            .map(|r| istio.stat(&shadow_stat(r)))
            .sum::<u64>()
            == istio.stat(&shadow_stat("sent"))
    })
    .await;
    assert!(
        settled,
        "shadow verdicts missing:\n{}",
        istio
            .gateway
            .envoy
            .admin_get("/stats?filter=meshserve.shadow")
    );
    assert_eq!(istio.stat(&shadow_stat("error")), 0);
    assert!(istio.stat(&shadow_stat("agree")) > 0);

    // A new split, applied to the running gateway as a new rendering.
    istio.apply_canary(0);
    let moved = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts = split(&istio, 20, "moving").await;
            if counts.keys().all(|r| r == "digits-predictor-v1") {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
        }
    };
    assert!(moved, "the new split was not applied");
    let counts = split(&istio, 50, "after").await;
    assert_eq!(counts.get("digits-predictor-v1"), Some(&50), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wasmplugin_form_serves_through_an_istio_shaped_gateway() {
    serves_through_the_gateway(Form::WasmPlugins, "wasmplugins").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envoyfilter_form_serves_through_an_istio_shaped_gateway() {
    serves_through_the_gateway(Form::EnvoyFilter, "envoyfilter").await;
}

/// The rendering before Istio's names: requests are routed (the VirtualServices match the
/// same names the router sets), but the filters' call-outs name clusters the gateway does
/// not have, so no payload event and no shadow copy gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cluster_names_lose_every_event_and_shadow_in_istio() {
    let istio = Istio::start("local-names", Form::WasmPlugins, true);
    let counts = split(&istio, 20, "lost").await;
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(paired_users(&istio.sink), Vec::<String>::new());
    assert!(istio.sink.events().is_empty(), "events arrived");
    assert_eq!(istio.stat(&shadow_stat("sent")), 0);
    assert!(istio.stat(&shadow_stat("error")) >= 20);
}
