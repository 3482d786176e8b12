//! Dynamic batching end to end: concurrent callers over REST (JSON and binary), gRPC and
//! KServe V1, with mixed request sizes, each get exactly their own rows back and the same
//! outputs as without batching; a full queue is refused at once; a request past its timeout
//! gets a clear error and frees its slot; over-large batches and unbatchable models are refused.

use std::time::{Duration, Instant};

use meshserve_e2e::{Sidecar, TempRepository};
use meshserve_proto::TensorData;
use meshserve_proto::grpc::response_from_grpc;
use meshserve_proto::inference::ModelInferRequest;
use meshserve_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use meshserve_proto::inference::model_infer_request::InferInputTensor;
use serde_json::{Value, json};

const BATCHED: &str = "max_batch_size: 16\ninstance_count: 1\ndynamic_batching:\n  max_queue_delay_microseconds: 20000\n  preferred_batch_size: [16]\n";

/// Deterministic pixels for request `r`, `rows` images.
fn pixels(r: usize, rows: usize) -> Vec<f32> {
    (0..rows * 784)
        .map(|i| ((i * 31 + r * 97) % 256) as f32 / 255.0)
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Via {
    Json,
    Binary,
    Grpc,
    V1,
}

/// Sends request `r` of `rows` images to `model` and returns its probabilities, flat.
async fn classify(
    sidecar: &Sidecar,
    http: &reqwest::Client,
    model: &str,
    via: Via,
    r: usize,
    rows: usize,
) -> Vec<f32> {
    let data = pixels(r, rows);
    let shape = json!([rows, 1, 28, 28]);
    let flatten = |v: &Value| -> Vec<f32> {
        let mut out = Vec::new();
        fn walk(v: &Value, out: &mut Vec<f32>) {
            match v {
                Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
                other => out.push(other.as_f64().unwrap() as f32),
            }
        }
        walk(v, &mut out);
        out
    };
    match via {
        Via::Json => {
            let body = json!({"id": format!("r{r}"), "inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data}]});
            let response: Value = http
                .post(sidecar.url(&format!("/v2/models/{model}/infer")))
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(response["id"], format!("r{r}"), "{response}");
            assert_eq!(response["outputs"][0]["shape"], json!([rows, 10]));
            flatten(&response["outputs"][0]["data"])
        }
        Via::Binary => {
            let raw = TensorData::Fp32(data).to_raw();
            let header = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": raw.len()}}],
                                "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]})
            .to_string();
            let mut body = header.clone().into_bytes();
            body.extend(raw);
            let response = http
                .post(sidecar.url(&format!("/v2/models/{model}/infer")))
                .header("inference-header-content-length", header.len())
                .body(body)
                .send()
                .await
                .unwrap();
            let n: usize = response.headers()["inference-header-content-length"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let bytes = response.bytes().await.unwrap();
            let head: Value = serde_json::from_slice(&bytes[..n]).unwrap();
            assert_eq!(head["outputs"][0]["shape"], json!([rows, 10]));
            match TensorData::from_raw(
                meshserve_proto::DataType::Fp32,
                &[rows as i64, 10],
                &bytes[n..],
            )
            .unwrap()
            {
                TensorData::Fp32(v) => v,
                other => panic!("{other:?}"),
            }
        }
        Via::Grpc => {
            let mut client =
                GrpcInferenceServiceClient::connect(format!("http://{}", sidecar.grpc))
                    .await
                    .unwrap();
            let request = ModelInferRequest {
                model_name: model.into(),
                id: format!("r{r}"),
                inputs: vec![InferInputTensor {
                    name: "input".into(),
                    datatype: "FP32".into(),
                    shape: vec![rows as i64, 1, 28, 28],
                    parameters: Default::default(),
                    contents: None,
                }],
                raw_input_contents: vec![TensorData::Fp32(data).to_raw()],
                ..Default::default()
            };
            let response =
                response_from_grpc(client.model_infer(request).await.unwrap().into_inner())
                    .unwrap();
            assert_eq!(response.id.as_deref(), Some(format!("r{r}").as_str()));
            assert_eq!(response.outputs[0].shape, vec![rows as i64, 10]);
            match &response.outputs[0].data {
                TensorData::Fp32(v) => v.clone(),
                other => panic!("{other:?}"),
            }
        }
        Via::V1 => {
            let instances: Vec<Value> = data
                .chunks(784)
                .map(|image| json!([image.chunks(28).collect::<Vec<_>>()]))
                .collect();
            let response: Value = http
                .post(sidecar.url(&format!("/v1/models/{model}:predict")))
                .json(&json!({"instances": instances}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(
                response["predictions"].as_array().map(Vec::len),
                Some(rows),
                "{response}"
            );
            flatten(&response["predictions"])
        }
    }
}

fn metric(text: &str, name: &str, model: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(&format!("model=\"{model}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_caller_gets_its_own_rows_across_protocols() {
    let repo = TempRepository::new(
        "batching-rows",
        &[
            ("cnn_batched", "mnist_cnn", BATCHED),
            ("cnn_plain", "mnist_cnn", ""),
        ],
    );
    let sidecar = std::sync::Arc::new(Sidecar::start_on(&repo.path, &[], true));
    let http = reqwest::Client::new();
    let vias = [Via::Json, Via::Binary, Via::Grpc, Via::V1];
    let requests = 64;
    let mut tasks = Vec::new();
    for r in 0..requests {
        let (sidecar, http) = (sidecar.clone(), http.clone());
        let via = vias[r % vias.len()];
        let rows = 1 + (r * 7) % 5;
        tasks.push(tokio::spawn(async move {
            let batched = classify(&sidecar, &http, "cnn_batched", via, r, rows).await;
            (r, via, rows, batched)
        }));
    }
    for task in tasks {
        let (r, via, rows, batched) = task.await.unwrap();
        let alone = classify(&sidecar, &http, "cnn_plain", Via::Binary, r, rows).await;
        assert_eq!(batched.len(), rows * 10, "request {r} via {via:?}");
        for (i, (a, b)) in batched.iter().zip(&alone).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "request {r} via {via:?}, value {i}: batched {a} vs alone {b}"
            );
        }
    }
    let metrics = http
        .get(sidecar.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let executions = metric(
        &metrics,
        "meshserve_inference_exec_count_total",
        "cnn_batched",
    );
    let successes = metric(
        &metrics,
        "meshserve_inference_request_success_total",
        "cnn_batched",
    );
    assert_eq!(successes, requests as f64, "{metrics}");
    assert!(
        executions < successes,
        "no batching happened: {executions} executions for {successes} requests"
    );
    assert!(
        metrics.contains("meshserve_inference_batch_size_bucket{model=\"cnn_batched\""),
        "{metrics}"
    );
}

/// A request of `rows` rows of the digits model, with extra request parameters.
fn digits(rows: usize, parameters: Value) -> Value {
    json!({"parameters": parameters, "inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": vec![1.0; rows * 64]}]})
}

/// Holds the model's only instance: a 3-row request waits (up to 2 s) for a 4th row that the
/// 2-row requests behind it cannot give, so those stay queued.
const HOLDING: &str = "max_batch_size: 4\ndynamic_batching:\n  max_queue_delay_microseconds: 2000000\n  max_queue_size: 2\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_is_refused_at_once_and_timeouts_free_their_slot() {
    let repo = TempRepository::new("batching-queue", &[("held", "sklearn_digits", HOLDING)]);
    let sidecar = std::sync::Arc::new(Sidecar::start_on(&repo.path, &[], true));
    let http = reqwest::Client::new();
    let url = sidecar.url("/v2/models/held/infer");
    let post = |body: Value| {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let response = http.post(url).json(&body).send().await.unwrap();
            (
                response.status().as_u16(),
                response.text().await.unwrap(),
                started.elapsed(),
            )
        })
    };
    let holder = post(digits(3, json!({})));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Two 2-row requests queue behind it; one of them gives up after 100 ms.
    let patient = post(digits(2, json!({})));
    let impatient = post(digits(2, json!({"timeout": 100_000})));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, body, elapsed) = post(digits(2, json!({}))).await.unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("max_queue_size"), "{body}");
    assert!(
        elapsed < Duration::from_millis(500),
        "refused after {elapsed:?}"
    );

    let (status, body, elapsed) = impatient.await.unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("timeout of 100000 µs"), "{body}");
    assert!(
        elapsed < Duration::from_millis(1000),
        "timed out after {elapsed:?}"
    );
    // Its queue slot is free again.
    let late = post(digits(2, json!({})));

    for task in [holder, patient, late] {
        let (status, body, _) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let metrics = http
        .get(sidecar.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(r#"meshserve_inference_request_failure_total{model="held",reason="queue_full",version="1"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"meshserve_inference_request_failure_total{model="held",reason="timeout",version="1"} 1"#), "{metrics}");
}

#[tokio::test]
async fn over_large_batches_and_unbatchable_models_are_refused() {
    let repo = TempRepository::new(
        "batching-limits",
        &[
            (
                "small",
                "sklearn_digits",
                "max_batch_size: 4\ndynamic_batching: {}\n",
            ),
            (
                "fixed",
                "fixed_shape",
                "max_batch_size: 2\ndynamic_batching: {}\n",
            ),
        ],
    );
    let sidecar = Sidecar::start_on(&repo.path, &[], false);
    let http = reqwest::Client::new();
    let response = http
        .post(sidecar.url("/v2/models/small/infer"))
        .json(&digits(5, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("batch of 5 is over the model's max_batch_size of 4")
    );
    let index: Value = http
        .post(sidecar.url("/v2/repository/index"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fixed = index
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "fixed")
        .unwrap();
    assert_eq!(fixed["state"], "UNAVAILABLE");
    assert!(
        fixed["reason"]
            .as_str()
            .unwrap()
            .contains("needs a variable first dimension"),
        "{fixed}"
    );
}

/// identity_all has 13 inputs of shape [-1, -1]: requests whose second dimension differs must
/// not share a batch, and every type must come back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn different_shapes_past_the_first_dimension_batch_apart() {
    let config = "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_microseconds: 20000\n";
    let repo = TempRepository::new("batching-shapes", &[("identity", "identity_all", config)]);
    let sidecar = std::sync::Arc::new(Sidecar::start_on(&repo.path, &[], true));
    let http = reqwest::Client::new();
    let types = [
        ("bool", "BOOL"),
        ("uint8", "UINT8"),
        ("uint16", "UINT16"),
        ("uint32", "UINT32"),
        ("uint64", "UINT64"),
        ("int8", "INT8"),
        ("int16", "INT16"),
        ("int32", "INT32"),
        ("int64", "INT64"),
        ("fp16", "FP16"),
        ("fp32", "FP32"),
        ("fp64", "FP64"),
        ("bytes", "BYTES"),
    ];
    let mut tasks = Vec::new();
    for r in 0..24usize {
        let (sidecar, http) = (sidecar.clone(), http.clone());
        let (rows, width) = (1 + r % 3, 1 + (r / 3) % 3);
        tasks.push(tokio::spawn(async move {
            let n = rows * width;
            let inputs: Vec<Value> = types
                .iter()
                .map(|(t, dt)| {
                    let data: Vec<Value> = (0..n)
                        .map(|i| match *dt {
                            "BOOL" => json!((r + i) % 2 == 0),
                            "BYTES" => json!(format!("r{r}-{i}")),
                            "FP16" | "FP32" | "FP64" => json!(r as f64 + i as f64 / 4.0),
                            _ => json!((r * 3 + i) % 100),
                        })
                        .collect();
                    json!({"name": format!("in_{t}"), "datatype": dt, "shape": [rows, width], "data": data})
                })
                .collect();
            let response: Value = http
                .post(sidecar.url("/v2/models/identity/infer"))
                .json(&json!({"inputs": inputs}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            for (t, _) in types {
                let output = response["outputs"].as_array().unwrap().iter().find(|o| o["name"] == format!("out_{t}")).unwrap();
                let input = inputs.iter().find(|i| i["name"] == format!("in_{t}")).unwrap();
                assert_eq!(output["shape"], json!([rows, width]), "request {r} {t}");
                assert_eq!(output["data"], input["data"], "request {r} {t}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let metrics = http
        .get(sidecar.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metric(&metrics, "meshserve_inference_exec_count_total", "identity") < 24.0,
        "{metrics}"
    );
}
