//! What operators see: one request traced from Envoy through the sidecar to ONNX Runtime in a
//! real OTLP receiver, and Prometheus figures that match the requests sent.

use std::time::Duration;

use meshserve_e2e::otlp::{OtlpReceiver, Received, hex};
use meshserve_e2e::{Envoy, Sidecar, TempRepository, Up, root, write_local_mesh};
use serde_json::{Value, json};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// A sidecar serving `digits` (no batching) and `digits_batched` (dynamic batching), behind
/// Envoy with the router filter; both export traces to `otlp` when given.
struct Stack {
    envoy: Envoy,
    sidecar: Sidecar,
    _repository: TempRepository,
    _dir: std::path::PathBuf,
}

fn stack(tag: &str, otlp: Option<&OtlpReceiver>) -> Stack {
    let repository = TempRepository::new(
        tag,
        &[
            ("digits", "sklearn_digits", ""),
            (
                "digits_batched",
                "sklearn_digits",
                "max_batch_size: 8\ndynamic_batching: {max_queue_delay_microseconds: 200}\n",
            ),
        ],
    );
    let url = otlp.map(OtlpReceiver::url).unwrap_or_default();
    let mut flags = vec![];
    if otlp.is_some() {
        flags.extend([
            "--otlp-endpoint",
            &url,
            "--otlp-service-name",
            "digits-predictor",
            "--otlp-resource",
            "meshserve.revision=digits-v1",
            "--otlp-export-interval-ms",
            "100",
        ]);
    }
    let sidecar = Sidecar::start_on(&repository.path, &flags, true);
    let dir = std::env::temp_dir().join(format!("meshserve-{tag}-mesh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = json!({"services": [{"name": "digits", "namespace": "default",
        "models": ["digits", "digits_batched"],
        "predictor": {"default": {"name": "digits-v1", "cluster": "digits.v1", "grpc_cluster": "digits.v1.grpc"}}}]});
    let bootstrap = write_local_mesh(
        &dir,
        &config,
        &[("digits.v1", sidecar.http, sidecar.grpc)],
        otlp.map(|r| r.addr),
    );
    let envoy = Envoy::start(&bootstrap, &dir);
    Stack {
        envoy,
        sidecar,
        _repository: repository,
        _dir: dir,
    }
}

fn digits_request(input: &str) -> Value {
    json!({"inputs": [{"name": input, "datatype": "FP32", "shape": [1, 64], "data": vec![3.0; 64]}]})
}

async fn post(url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = reqwest::Client::new().post(url).json(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

fn one<'a>(spans: &'a [Received], what: &str, pick: impl Fn(&Received) -> bool) -> &'a Received {
    let found: Vec<&Received> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {what}, found {}: {:#?}",
        found.len(),
        summary(spans)
    );
    found[0]
}

fn summary(spans: &[Received]) -> Vec<String> {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} kind={} trace={} id={} parent={}",
                s.service,
                s.span.name,
                s.span.kind,
                hex(&s.span.trace_id),
                hex(&s.span.span_id),
                hex(&s.span.parent_span_id)
            )
        })
        .collect()
}

/// The spans of one trace (its id in hex).
fn of_trace(spans: &[Received], trace: &str) -> Vec<Received> {
    spans
        .iter()
        .filter(|s| hex(&s.span.trace_id) == trace)
        .cloned()
        .collect()
}

fn child_of<'a>(spans: &'a [Received], parent: &Received, name: &str) -> &'a Received {
    one(
        spans,
        &format!("'{name}' under '{}'", parent.span.name),
        |s| s.span.name == name && s.span.parent_span_id == parent.span.span_id,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_traced_from_envoy_to_onnx_runtime() {
    let receiver = OtlpReceiver::start();
    let stack = stack("traces", Some(&receiver));
    for (model, trace, caller) in [
        (
            "digits",
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "00f067aa0ba902b7",
        ),
        (
            "digits_batched",
            "0af7651916cd43dd8448eb211c80319c",
            "b7ad6b7169203331",
        ),
    ] {
        let traceparent = format!("00-{trace}-{caller}-01");
        let (status, body) = post(
            &stack.envoy.url(&format!("/v2/models/{model}/infer")),
            &digits_request("input"),
            &[("traceparent", &traceparent)],
        )
        .await;
        assert_eq!(status, 200, "{body}");

        let expected = if model == "digits" { 8 } else { 9 };
        let of_trace = |spans: &[Received]| of_trace(spans, trace);
        let spans = receiver
            .wait_for(Duration::from_secs(20), |spans| {
                of_trace(spans).len() >= expected
            })
            .map(|s| of_trace(&s))
            .unwrap_or_else(|s| {
                panic!(
                    "the trace did not arrive whole:\n{:#?}\nsidecar log:\n{}\nEnvoy log:\n{}",
                    summary(&s),
                    stack.sidecar.log(),
                    stack.envoy.log()
                )
            });

        // Envoy continues the caller's trace: its server span, and the client span of the
        // upstream request whose context went on as `traceparent`.
        let ingress = one(&spans, "Envoy server span", |s| {
            s.service == "meshserve-envoy" && s.span.kind == SERVER
        });
        assert_eq!(hex(&ingress.span.parent_span_id), caller);
        assert_eq!(ingress.span.name, "ingress");
        let egress = one(&spans, "Envoy client span", |s| {
            s.service == "meshserve-envoy" && s.span.kind == CLIENT
        });
        assert_eq!(egress.span.parent_span_id, ingress.span.span_id);
        assert_eq!(egress.span.name, "router digits.v1 egress");

        // The sidecar's server span is the child of Envoy's upstream span.
        let server = one(&spans, "sidecar server span", |s| {
            s.service == "digits-predictor" && s.span.kind == SERVER
        });
        assert_eq!(
            server.span.parent_span_id,
            egress.span.span_id,
            "{:#?}",
            summary(&spans)
        );
        assert_eq!(server.span.name, format!("POST /v2/models/{model}/infer"));
        assert_eq!(
            server.attribute("http.response.status_code").as_deref(),
            Some("200")
        );
        assert_eq!(
            server.resource_attribute("meshserve.revision").as_deref(),
            Some("digits-v1")
        );
        child_of(&spans, server, "preprocess");
        child_of(&spans, server, "postprocess");
        let predict = child_of(&spans, server, "predict");
        assert_eq!(predict.attribute("model.name").as_deref(), Some(model));
        child_of(&spans, predict, "queue");
        // Without batching, the session runs for the request itself; with it, inside the
        // batch the request started.
        let run_parent = if model == "digits" {
            predict
        } else {
            let batch = child_of(&spans, predict, "batch");
            assert_eq!(batch.attribute("batch.rows").as_deref(), Some("1"));
            batch
        };
        let run = child_of(&spans, run_parent, "onnxruntime.run");
        assert!(run.span.end_time_unix_nano >= run.span.start_time_unix_nano);
        assert!(
            server.span.start_time_unix_nano <= run.span.start_time_unix_nano
                && run.span.end_time_unix_nano <= server.span.end_time_unix_nano,
            "the run lies inside the request"
        );
    }
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_requests_sent() {
    let stack = stack("metrics", None);
    let v2 = stack.envoy.url("/v2/models/digits/infer");
    for _ in 0..6 {
        let (status, body) = post(&v2, &digits_request("input"), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    for _ in 0..3 {
        let (status, body) = post(
            &stack.envoy.url("/v1/models/digits:predict"),
            &json!({"instances": [vec![1.0; 64]]}),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    for _ in 0..2 {
        let (status, body) = post(&v2, &digits_request("nope"), &[]).await;
        assert_eq!(status, 400, "{body}");
    }
    let text = reqwest::get(stack.sidecar.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let labels = r#"{model="digits",version="1"}"#;
    let kserve = r#"{model_name="digits",model_version="1"}"#;
    for (series, want) in [
        (format!("meshserve_inference_request_success_total{labels}"), 9.0),
        (
            r#"meshserve_inference_request_failure_total{model="digits",reason="invalid_input",version="1"}"#.to_owned(),
            2.0,
        ),
        (format!("meshserve_inference_count_total{labels}"), 9.0),
        (format!("meshserve_inference_exec_count_total{labels}"), 9.0),
        (format!("request_preprocess_seconds_count{kserve}"), 11.0),
        (format!("request_predict_seconds_count{kserve}"), 11.0),
        (format!("request_postprocess_seconds_count{kserve}"), 9.0),
        ("meshserve_models_loaded".to_owned(), 2.0),
        (
            r#"meshserve_model_ready{model="digits_batched",version="1"}"#.to_owned(),
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, &series), want, "{series}");
    }
    assert!(sample(&text, &format!("request_predict_seconds_sum{kserve}")) > 0.0);
    // Envoy's own count of what the router sent to the revision.
    assert_eq!(
        stack
            .envoy
            .stat("wasmcustom.meshserve.requests.isvc.digits.revision.digits-v1.outcome.routed"),
        11
    );
}

/// `meshserve up --otlp-endpoint`: Envoy and every sidecar it starts trace to the collector,
/// the sidecars named after their InferenceService, with the revision as an attribute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshserve_up_traces_envoy_and_its_sidecars() {
    let receiver = OtlpReceiver::start();
    let up = Up::start(
        &root().join("envoy-config/demo/inferenceservice.yaml"),
        &["--otlp-endpoint", &receiver.url()],
    );
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let (status, body) = post(
        &format!("{}/v1/models/digits:predict", up.url),
        &json!({"instances": [vec![1.0; 64]]}),
        &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            spans
                .iter()
                .filter(|s| hex(&s.span.trace_id) == trace)
                .count()
                >= 8
        })
        .unwrap_or_else(|s| panic!("the trace did not arrive whole: {:#?}", summary(&s)));
    let spans: Vec<Received> = spans
        .into_iter()
        .filter(|s| hex(&s.span.trace_id) == trace)
        .collect();
    let egress = one(&spans, "Envoy client span", |s| {
        s.service == "meshserve-envoy" && s.span.kind == CLIENT
    });
    let server = one(&spans, "sidecar server span", |s| {
        s.service == "digits-predictor" && s.span.kind == SERVER
    });
    assert_eq!(server.span.parent_span_id, egress.span.span_id);
    assert_eq!(
        server
            .resource_attribute("serving.kserve.io/inferenceservice")
            .as_deref(),
        Some("digits")
    );
    let revision = server
        .resource_attribute("meshserve.revision")
        .unwrap_or_default();
    assert!(revision.starts_with("digits-predictor-v"), "{revision}");
    assert!(
        egress.span.name.contains(&format!("digits.{revision}")),
        "Envoy's upstream span names the revision's cluster: {}",
        egress.span.name
    );
}

/// An InferenceGraph's steps in the trace of the graph's request: the router filter passes the
/// request's `traceparent` to every step, each step is an Envoy pass of its own on the hop
/// listener (a server span, and a client span to the revision), and each step's sidecar span
/// names the graph and the step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graphs_steps_are_spans_of_its_trace() {
    let receiver = OtlpReceiver::start();
    let models = root().join("models/repository/sklearn_digits");
    let mut spec = String::new();
    for (name, version) in [("digits-a", "1"), ("digits-b", "2")] {
        spec += &format!(
            "---\napiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata: {{name: {name}}}\nspec:\n  predictor:\n    model: {{modelFormat: {{name: onnx}}, storageUri: \"file://{}/{version}/model.onnx\"}}\n",
            models.display()
        );
    }
    spec += "---\napiVersion: serving.kserve.io/v1alpha1\nkind: InferenceGraph\nmetadata: {name: chain}\nspec:\n  nodes:\n    root:\n      routerType: Sequence\n      steps:\n        - serviceName: digits-a\n        - serviceName: digits-b\n          data: $request\n";
    let dir = std::env::temp_dir().join(format!("meshserve-graph-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("graph-trace.yaml");
    std::fs::write(&file, spec).unwrap();
    let up = Up::start(&file, &["--otlp-endpoint", &receiver.url()]);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4737";
    let (status, body) = post(
        &format!("{}/v1/graphs/chain", up.url),
        &json!({"instances": [vec![1.0; 64]]}),
        &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let ours = |spans: &[Received]| of_trace(spans, trace);
    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            let ours = ours(spans);
            ["digits-a-predictor", "digits-b-predictor"]
                .iter()
                .all(|service| {
                    ours.iter()
                        .any(|s| s.service == *service && s.span.kind == SERVER)
                })
                && ours
                    .iter()
                    .filter(|s| s.service == "meshserve-envoy")
                    .count()
                    >= 5
        })
        .unwrap_or_else(|s| panic!("the graph's trace did not arrive: {:#?}", summary(&s)));
    let spans = ours(&spans);
    // The graph's own request, and one Envoy pass per step.
    let envoy_servers = spans
        .iter()
        .filter(|s| s.service == "meshserve-envoy" && s.span.kind == SERVER)
        .count();
    assert_eq!(envoy_servers, 3, "{:#?}", summary(&spans));
    for (service, step) in [
        ("digits-a-predictor", "root/0"),
        ("digits-b-predictor", "root/1"),
    ] {
        let server = one(&spans, &format!("{service} server span"), |s| {
            s.service == service && s.span.kind == SERVER
        });
        assert_eq!(
            server.attribute("meshserve.graph").as_deref(),
            Some("chain")
        );
        assert_eq!(
            server.attribute("meshserve.graph.step").as_deref(),
            Some(step)
        );
        let egress = one(&spans, &format!("Envoy's call to {service}"), |s| {
            s.span.span_id == server.span.parent_span_id
        });
        assert_eq!(
            (egress.service.as_str(), egress.span.kind),
            ("meshserve-envoy", CLIENT)
        );
    }
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
}
