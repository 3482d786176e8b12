//! gRPC end to end: every RPC of `inference.GRPCInferenceService` against the real binary,
//! the reference outputs with raw and typed contents, and errors with the right codes.

use meshserve_e2e::{Sidecar, assert_data_close, fixtures};
use meshserve_proto::grpc::{parameters_to_grpc, response_from_grpc};
use meshserve_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use meshserve_proto::inference::model_infer_request::{
    InferInputTensor, InferRequestedOutputTensor,
};
use meshserve_proto::inference::*;
use meshserve_proto::{DataType, TensorData};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

async fn client(sidecar: &Sidecar) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::connect(format!("http://{}", sidecar.grpc))
        .await
        .unwrap()
}

fn tensor_data(v: &Value) -> (String, DataType, Vec<i64>, TensorData) {
    let datatype = DataType::parse(v["datatype"].as_str().unwrap()).unwrap();
    let shape: Vec<i64> = serde_json::from_value(v["shape"].clone()).unwrap();
    let data = TensorData::from_json(datatype, &shape, &v["data"]).unwrap();
    (
        v["name"].as_str().unwrap().to_owned(),
        datatype,
        shape,
        data,
    )
}

/// A ModelInferRequest for a fixture, with inputs as raw contents or typed contents (FP16,
/// which has no typed field, always raw: so typed requests skip fixtures that have it).
fn fixture_request(fixture: &Value, raw: bool) -> Option<ModelInferRequest> {
    let mut request = ModelInferRequest {
        model_name: fixture["model"].as_str().unwrap().into(),
        model_version: fixture["version"].as_str().unwrap().into(),
        id: "g-1".into(),
        ..Default::default()
    };
    for input in fixture["inputs"].as_array().unwrap() {
        let (name, datatype, shape, data) = tensor_data(input);
        let contents = if raw {
            request.raw_input_contents.push(data.to_raw());
            None
        } else {
            Some(data.to_contents()?)
        };
        request.inputs.push(InferInputTensor {
            name,
            datatype: datatype.as_str().into(),
            shape,
            parameters: Default::default(),
            contents,
        });
    }
    Some(request)
}

#[tokio::test]
async fn health_metadata_and_repository() {
    let sidecar = Sidecar::start(&[]);
    let mut c = client(&sidecar).await;
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str, version: &str| ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    assert!(
        c.model_ready(ready("mnist_cnn", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        c.model_ready(ready("sklearn_digits", "1"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !c.model_ready(ready("sklearn_digits", "5"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !c.model_ready(ready("nope", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );

    let server = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.name, "meshserve");
    assert!(server.extensions.contains(&"model_repository".to_owned()));

    let meta = c
        .model_metadata(ModelMetadataRequest {
            name: "multi_io".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.platform, "onnxruntime_onnx");
    let inputs: Vec<(String, String, Vec<i64>)> = meta
        .inputs
        .into_iter()
        .map(|t| (t.name, t.datatype, t.shape))
        .collect();
    assert_eq!(
        inputs,
        vec![
            ("count".into(), "INT64".into(), vec![-1, 3]),
            ("mask".into(), "BOOL".into(), vec![-1, 3]),
            ("text".into(), "BYTES".into(), vec![-1, 1])
        ]
    );
    let missing = c
        .model_metadata(ModelMetadataRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);

    let index = c
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: true,
        })
        .await
        .unwrap();
    assert_eq!(
        index
            .into_inner()
            .models
            .iter()
            .filter(|m| m.name == "sklearn_digits")
            .count(),
        2
    );

    let model = |name: &str| RepositoryModelUnloadRequest {
        repository_name: String::new(),
        model_name: name.into(),
        parameters: Default::default(),
    };
    c.repository_model_unload(model("multi_io")).await.unwrap();
    assert!(
        !c.model_ready(ready("multi_io", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    // KServe's variant of the message carries the model name in field 1.
    let kserve_style = RepositoryModelLoadRequest {
        repository_name: "multi_io".into(),
        model_name: String::new(),
        parameters: Default::default(),
    };
    c.repository_model_load(kserve_style).await.unwrap();
    assert!(
        c.model_ready(ready("multi_io", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let unknown = RepositoryModelLoadRequest {
        repository_name: String::new(),
        model_name: "nope".into(),
        parameters: Default::default(),
    };
    assert_eq!(
        c.repository_model_load(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn every_fixture_with_raw_and_typed_contents() {
    let sidecar = Sidecar::start(&[]);
    let mut c = client(&sidecar).await;
    let mut typed_runs = 0;
    for fixture in fixtures() {
        for raw in [true, false] {
            let Some(request) = fixture_request(&fixture, raw) else {
                continue;
            };
            typed_runs += usize::from(!raw);
            let response = c
                .model_infer(request)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", fixture["model"]))
                .into_inner();
            assert_eq!(response.id, "g-1");
            assert_eq!(response.outputs.len(), response.raw_output_contents.len());
            let response = response_from_grpc(response).unwrap();
            let tolerance = fixture["tolerance"].as_f64().unwrap();
            for expected in fixture["outputs"].as_array().unwrap() {
                let got = response
                    .outputs
                    .iter()
                    .find(|o| o.name == expected["name"].as_str().unwrap())
                    .unwrap();
                assert_eq!(json!(got.shape), expected["shape"]);
                let what = format!("{}.{} raw={raw}", fixture["model"], expected["name"]);
                let datatype = expected["datatype"].as_str().unwrap();
                assert_eq!(got.datatype().as_str(), datatype);
                assert_data_close(
                    datatype,
                    &serde_json::to_value(&got.data).unwrap(),
                    &expected["data"],
                    tolerance,
                    &what,
                );
            }
        }
    }
    assert!(
        typed_runs >= 4,
        "typed contents ran on {typed_runs} fixtures"
    );
}

/// A change that spoils a good request.
type Mutation = Box<dyn Fn(&mut ModelInferRequest)>;

#[tokio::test]
async fn requested_outputs_parameters_and_errors() {
    let sidecar = Sidecar::start(&[]);
    let mut c = client(&sidecar).await;
    let fixture = fixtures()
        .into_iter()
        .find(|f| f["model"] == "sklearn_digits")
        .unwrap();
    let mut request = fixture_request(&fixture, true).unwrap();
    request.outputs = vec![InferRequestedOutputTensor {
        name: "label".into(),
        parameters: Default::default(),
    }];
    request.parameters = parameters_to_grpc(json!({"tenant": "blue"}).as_object().unwrap());
    let response = c.model_infer(request.clone()).await.unwrap().into_inner();
    assert_eq!(response.outputs.len(), 1);
    assert_eq!(response.outputs[0].name, "label");
    assert!(response.parameters.contains_key("tenant"));

    let cases: Vec<(Mutation, Code, &str)> = vec![
        (
            Box::new(|r| r.model_name = "nope".into()),
            Code::NotFound,
            "unknown model 'nope'",
        ),
        (
            Box::new(|r| r.model_version = "7".into()),
            Code::NotFound,
            "version '7'",
        ),
        (
            Box::new(|r| r.inputs[0].datatype = "FP64".into()),
            Code::InvalidArgument,
            "input 'input'",
        ),
        (
            Box::new(|r| r.inputs[0].shape = vec![3, 64]),
            Code::InvalidArgument,
            "needs 768 bytes",
        ),
        (
            Box::new(|r| r.raw_input_contents.clear()),
            Code::InvalidArgument,
            "needs 256 elements but the data has 0",
        ),
        (
            Box::new(|r| r.raw_input_contents.push(vec![])),
            Code::InvalidArgument,
            "2 entries but the request has 1 inputs",
        ),
        (
            Box::new(|r| {
                r.inputs[0].contents = Some(InferTensorContents {
                    fp32_contents: vec![1.0],
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "use one or the other",
        ),
        (
            Box::new(|r| {
                r.raw_input_contents.clear();
                r.inputs[0].contents = Some(InferTensorContents {
                    int64_contents: vec![1; 256],
                    ..Default::default()
                });
            }),
            Code::InvalidArgument,
            "int64_contents",
        ),
        (
            Box::new(|r| r.outputs[0].name = "nope".into()),
            Code::InvalidArgument,
            "unknown output 'nope'",
        ),
    ];
    for (mutate, code, needle) in cases {
        let mut bad = request.clone();
        mutate(&mut bad);
        let status = c.model_infer(bad).await.unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(
            status.message().contains(needle),
            "wanted {needle:?} in {:?}",
            status.message()
        );
    }
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
}

#[tokio::test]
async fn messages_over_the_limit_are_refused() {
    let sidecar = Sidecar::start(&["--max-request-bytes", "10000"]);
    let mut c = client(&sidecar).await;
    let request = ModelInferRequest {
        model_name: "mnist_cnn".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![4, 1, 28, 28],
            parameters: Default::default(),
            contents: None,
        }],
        raw_input_contents: vec![vec![0; 4 * 784 * 4]],
        ..Default::default()
    };
    let status = c.model_infer(request).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
}

/// `meshserve wake-scaler` as KEDA sees it: KEDA holds `StreamIsActive` open for a
/// ScaledObject and gets `true` the moment the activator POSTs its wake, not at the next
/// poll; `IsActive` and `GetMetrics` agree; a bad path is 404, a GET 405; the stream ends
/// `false` when the window passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wake_scaler_pushes_a_wake_to_keda_at_once() {
    use meshserve_proto::externalscaler::external_scaler_client::ExternalScalerClient;
    use meshserve_proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
    use std::time::{Duration, Instant};
    let scaler = Sidecar::command(&[
        "wake-scaler".into(),
        "--grpc-port".into(),
        "0".into(),
        "--http-port".into(),
        "0".into(),
        "--active-secs".into(),
        "2".into(),
    ]);
    let mut keda = ExternalScalerClient::connect(format!("http://{}", scaler.grpc))
        .await
        .unwrap();
    let reference = ScaledObjectRef {
        name: "digits-predictor".into(),
        namespace: "models".into(),
        scaler_metadata: Default::default(),
    };
    let mut stream = keda
        .stream_is_active(reference.clone())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.result, "nothing woke it yet");
    assert!(
        !keda
            .is_active(reference.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );

    let http = reqwest::Client::new();
    let wake = |path: &str| http.post(format!("http://{}{path}", scaler.http)).send();
    let other = wake("/wake/models/other-predictor").await.unwrap();
    assert_eq!(other.status(), 202, "another ScaledObject's wake");
    let woken = Instant::now();
    let answer = wake("/wake/models/digits-predictor").await.unwrap();
    assert_eq!(answer.status(), 202);
    let pushed = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("pushed at once")
        .unwrap()
        .unwrap();
    assert!(pushed.result, "the wake was pushed");
    eprintln!("wake pushed to KEDA's stream in {:?}", woken.elapsed());
    assert!(
        keda.is_active(reference.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );
    let metrics = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(reference.clone()),
            metric_name: "meshserve-wake".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metrics.metric_values[0].metric_value, 1);
    for (path, status) in [
        ("/wake/models", 404),
        ("/wake/Models/x", 404),
        ("/other", 404),
    ] {
        assert_eq!(wake(path).await.unwrap().status(), status, "{path}");
    }
    let get = http
        .get(format!(
            "http://{}/wake/models/digits-predictor",
            scaler.http
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 405);
    // The window (2 s) passes: inactive, pushed once.
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the end of the window is pushed")
        .unwrap()
        .unwrap();
    assert!(!ended.result);
    assert!(woken.elapsed() >= Duration::from_secs(2));
    assert!(!keda.is_active(reference).await.unwrap().into_inner().result);
}
