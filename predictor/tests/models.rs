//! The predictor over the real ONNX Runtime library and the repository's generated models,
//! checked against reference outputs computed by Python onnxruntime.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use meshserve_predictor::{CachePolicy, PredictorError, Repository, Runtime, RuntimeOptions};
use meshserve_proto::{
    DataType, InferRequest, InputTensor, Parameters, RequestedOutput, TensorData,
};
use serde_json::{Value, json};

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// ONNX Runtime allows one environment per process: the tests share it.
fn runtime() -> Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    Arc::clone(RUNTIME.get_or_init(|| {
        Arc::new(
            Runtime::init(RuntimeOptions::default()).expect("ONNX Runtime (run scripts/setup.sh)"),
        )
    }))
}

fn repository() -> &'static Repository {
    static REPO: OnceLock<Repository> = OnceLock::new();
    REPO.get_or_init(|| {
        let repo = Repository::open(models_dir().join("repository"), runtime()).unwrap();
        assert!(repo.load_all().is_empty());
        repo
    })
}

fn tensor(v: &Value) -> (String, Vec<i64>, TensorData) {
    let datatype = DataType::parse(v["datatype"].as_str().unwrap()).unwrap();
    let shape: Vec<i64> = serde_json::from_value(v["shape"].clone()).unwrap();
    let data = TensorData::from_json(datatype, &shape, &v["data"]).unwrap();
    (v["name"].as_str().unwrap().to_owned(), shape, data)
}

fn close(actual: &TensorData, expected: &TensorData, tolerance: f64) -> bool {
    let as_f64 = |d: &TensorData| -> Option<Vec<f64>> {
        match d {
            TensorData::Fp16(v) => Some(v.iter().map(|x| x.to_f64()).collect()),
            TensorData::Fp32(v) => Some(v.iter().map(|&x| f64::from(x)).collect()),
            TensorData::Fp64(v) => Some(v.clone()),
            _ => None,
        }
    };
    match (as_f64(actual), as_f64(expected)) {
        (Some(a), Some(e)) => {
            a.len() == e.len()
                && a.iter()
                    .zip(&e)
                    .all(|(x, y)| (x - y).abs() <= tolerance || x == y)
        }
        _ => actual == expected,
    }
}

#[tokio::test]
async fn every_reference_fixture_matches() {
    let mut checked = 0;
    for entry in std::fs::read_dir(models_dir().join("reference")).unwrap() {
        let fixture: Value =
            serde_json::from_slice(&std::fs::read(entry.unwrap().path()).unwrap()).unwrap();
        let model = repository()
            .get(
                fixture["model"].as_str().unwrap(),
                fixture["version"].as_str().unwrap(),
            )
            .unwrap();
        answers_as_the_fixture(&model, &fixture).await;
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} fixtures");
}

/// Runs the fixture's inputs on `model` and checks its outputs against the fixture's.
async fn answers_as_the_fixture(model: &meshserve_predictor::ModelVersion, fixture: &Value) {
    let inputs = fixture["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let (name, shape, data) = tensor(v);
            InputTensor {
                name,
                shape,
                data,
                parameters: Parameters::new(),
            }
        })
        .collect();
    let response = model
        .infer(InferRequest {
            inputs,
            ..Default::default()
        })
        .await
        .unwrap();
    let tolerance = fixture["tolerance"].as_f64().unwrap();
    for expected in fixture["outputs"].as_array().unwrap() {
        let (name, shape, data) = tensor(expected);
        let got = response.outputs.iter().find(|o| o.name == name).unwrap();
        assert_eq!(got.shape, shape, "{}: {name}", fixture["model"]);
        assert!(
            close(&got.data, &data, tolerance),
            "{}: {name}: {:?} vs {:?}",
            fixture["model"],
            got.data,
            data
        );
    }
}

fn digits_request(rows: i64) -> InferRequest {
    InferRequest {
        inputs: vec![InputTensor {
            name: "input".into(),
            shape: vec![rows, 64],
            data: TensorData::Fp32(vec![1.0; (rows * 64) as usize]),
            parameters: Parameters::new(),
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn requested_outputs_and_parameters() {
    let model = repository().get("sklearn_digits", "1").unwrap();
    let mut request = digits_request(2);
    request.id = Some("abc".into());
    request.outputs = vec![RequestedOutput::new("label")];
    request.parameters.insert("trace".into(), json!("x"));
    request
        .parameters
        .insert("binary_data_output".into(), json!(false));
    let response = model.infer(request).await.unwrap();
    assert_eq!(response.id.as_deref(), Some("abc"));
    assert_eq!(response.outputs.len(), 1);
    assert_eq!(response.outputs[0].shape, vec![2]);
    assert_eq!(
        response.parameters,
        json!({"trace": "x"}).as_object().unwrap().clone()
    );
    assert_eq!(response.model_version, "1");
}

/// More concurrent requests than sessions: those that find the session busy queue for the
/// instance thread, and each still gets its own answer (the label of its own row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_one_session_each_get_their_own_answer() {
    let model = repository().get("sklearn_digits", "1").unwrap();
    let request = |i: usize| {
        let mut request = digits_request(1);
        request.inputs[0].data =
            TensorData::Fp32((0..64).map(|j| ((i * 7 + j * 3) % 17) as f32).collect());
        request.outputs = vec![RequestedOutput::new("label")];
        request
    };
    let mut alone = Vec::new();
    for i in 0..64 {
        alone.push(
            model.infer(request(i)).await.unwrap().outputs[0]
                .data
                .clone(),
        );
    }
    let mut together = tokio::task::JoinSet::new();
    for i in 0..64 {
        let (model, request) = (Arc::clone(&model), request(i));
        together.spawn(async move { (i, model.infer(request).await) });
    }
    while let Some(done) = together.join_next().await {
        let (i, answer) = done.unwrap();
        assert_eq!(answer.unwrap().outputs[0].data, alone[i], "request {i}");
    }
}

#[tokio::test]
async fn classification_uses_the_labels() {
    let model = repository().get("mnist_cnn", "").unwrap();
    let mut output = RequestedOutput::new("probabilities");
    output.parameters.insert("classification".into(), json!(2));
    let request = InferRequest {
        inputs: vec![InputTensor {
            name: "input".into(),
            shape: vec![1, 1, 28, 28],
            data: TensorData::Fp32(vec![0.0; 784]),
            parameters: Parameters::new(),
        }],
        outputs: vec![output],
        ..Default::default()
    };
    let response = model.infer(request).await.unwrap();
    let TensorData::Bytes(classes) = &response.outputs[0].data else {
        panic!("not BYTES")
    };
    assert_eq!(response.outputs[0].shape, vec![1, 2]);
    let first = String::from_utf8(classes[0].clone()).unwrap();
    let label = first.rsplit(':').next().unwrap();
    assert!(
        [
            "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"
        ]
        .contains(&label),
        "{first}"
    );
}

#[tokio::test]
async fn bad_requests_name_the_problem() {
    let model = repository().get("sklearn_digits", "").unwrap();
    let cases: Vec<(InferRequest, &str)> = vec![
        (InferRequest::default(), "missing input 'input'"),
        (
            {
                let mut r = digits_request(1);
                r.inputs.push(r.inputs[0].clone());
                r
            },
            "more than once",
        ),
        (
            {
                let mut r = digits_request(1);
                r.inputs[0].name = "x".into();
                r
            },
            "unknown input 'x'",
        ),
        (
            {
                let mut r = digits_request(1);
                r.inputs[0].data = TensorData::Fp64(vec![1.0; 64]);
                r
            },
            "datatype FP64 does not match the model's FP32",
        ),
        (
            {
                let mut r = digits_request(1);
                r.inputs[0].shape = vec![2, 32];
                r
            },
            "shape [2, 32] does not match",
        ),
        (
            {
                let mut r = digits_request(1);
                r.outputs = vec![RequestedOutput::new("nope")];
                r
            },
            "unknown output 'nope'",
        ),
    ];
    for (request, needle) in cases {
        match model.infer(request).await {
            Err(PredictorError::InvalidInput(message)) => {
                assert!(message.contains(needle), "{message}")
            }
            other => panic!("expected InvalidInput containing {needle:?}, got {other:?}"),
        }
    }
    let batch = repository()
        .get("mnist_cnn", "")
        .unwrap()
        .infer(InferRequest {
            inputs: vec![InputTensor {
                name: "input".into(),
                shape: vec![257, 1, 28, 28],
                data: TensorData::Fp32(vec![0.0; 257 * 784]),
                parameters: Parameters::new(),
            }],
            ..Default::default()
        })
        .await;
    assert!(
        matches!(batch, Err(PredictorError::InvalidInput(m)) if m.contains("max_batch_size of 256"))
    );
}

#[test]
fn versions_and_unknown_models() {
    let repo = repository();
    assert_eq!(repo.versions("sklearn_digits").unwrap(), vec![1, 2]);
    assert_eq!(repo.get("sklearn_digits", "").unwrap().version(), 2);
    assert!(matches!(
        repo.get("sklearn_digits", "7"),
        Err(PredictorError::VersionNotFound { .. })
    ));
    assert!(matches!(
        repo.get("nope", ""),
        Err(PredictorError::ModelNotFound(_))
    ));
    assert!(matches!(
        repo.get("../models", ""),
        Err(PredictorError::ModelNotFound(_))
    ));
    assert!(repo.is_ready());
}

#[test]
fn a_missing_library_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Runtime::init(RuntimeOptions {
        library: Some(dir.path().join("absent.so")),
        ..Default::default()
    });
    assert!(missing.unwrap_err().to_string().contains("no such file"));
}

/// A repository of three copies of the CNN, named a, b and c, under `policy`.
fn three_models(policy: CachePolicy) -> (tempfile::TempDir, Arc<Repository>) {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b", "c"] {
        let version = dir.path().join(name).join("1");
        std::fs::create_dir_all(&version).unwrap();
        std::fs::copy(
            models_dir().join("repository/mnist_cnn/1/model.onnx"),
            version.join("model.onnx"),
        )
        .unwrap();
    }
    let repo = Repository::open(dir.path(), runtime())
        .unwrap()
        .with_cache(policy);
    assert!(repo.load_all().is_empty());
    (dir, Arc::new(repo))
}

fn metric(repo: &Repository, line_start: &str) -> f64 {
    let text = repo.encode_metrics();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
}

#[tokio::test]
async fn a_budget_for_two_of_three_models_serves_all_three_evicting_the_least_recently_used() {
    let size = std::fs::metadata(models_dir().join("repository/mnist_cnn/1/model.onnx"))
        .unwrap()
        .len();
    let (_dir, repo) = three_models(CachePolicy {
        on_demand: true,
        memory_budget: Some(size * 5 / 2),
        ..CachePolicy::default()
    });
    // Nothing is loaded at start; every model is listed, ready to load.
    assert!(repo.is_ready());
    assert_eq!(repo.servable(), ["a", "b", "c"]);
    assert!(repo.index(true).is_empty());
    assert!(repo.is_model_ready("a", "").unwrap());
    let fixture: Value = serde_json::from_slice(
        &std::fs::read(models_dir().join("reference/mnist_cnn_v1.json")).unwrap(),
    )
    .unwrap();
    for (i, name) in ["a", "b", "c", "a", "b", "c", "a", "b", "c"]
        .iter()
        .enumerate()
    {
        let model = repo.acquire(name, "").await.unwrap();
        answers_as_the_fixture(&model, &fixture).await;
        let loaded: Vec<String> = repo.index(true).into_iter().map(|e| e.name).collect();
        assert_eq!(loaded.len(), (i + 1).min(2), "{name}: {loaded:?}");
        assert!(loaded.contains(&(*name).to_owned()));
    }
    // Round-robin over three with room for two: every request but the first two evicted the
    // least recently used, the model wanted next.
    let index = repo.index(false);
    let evicted = index.iter().find(|e| e.state != "READY").unwrap();
    assert_eq!(evicted.name, "a");
    assert!(evicted.reason.contains("memory budget"), "{evicted:?}");
    let evictions: f64 = ["a", "b", "c"]
        .iter()
        .map(|m| {
            metric(
                &repo,
                &format!("meshserve_evictions_total{{model=\"{m}\",reason=\"budget\"}}"),
            )
        })
        .sum();
    assert_eq!(evictions, 7.0);
    assert_eq!(
        metric(&repo, "meshserve_instance_used_bytes"),
        (2 * size) as f64
    );
    assert_eq!(
        metric(&repo, "meshserve_instance_capacity_bytes"),
        (size * 5 / 2) as f64
    );
    for m in ["a", "b", "c"] {
        assert_eq!(
            metric(
                &repo,
                &format!("meshserve_cache_miss_milliseconds_count{{model=\"{m}\"}}")
            ),
            3.0
        );
    }
    // A model over the whole budget says so.
    let (_small, tight) = three_models(CachePolicy {
        on_demand: true,
        memory_budget: Some(size / 2),
        ..CachePolicy::default()
    });
    let error = tight.acquire("a", "").await.unwrap_err().to_string();
    assert!(error.contains("over the memory budget"), "{error}");
}

#[tokio::test]
async fn concurrent_requests_for_a_cold_model_share_one_load_and_idle_models_unload() {
    let idle = std::time::Duration::from_millis(400);
    let (_dir, repo) = three_models(CachePolicy {
        on_demand: true,
        idle_unload: Some(idle),
        ..CachePolicy::default()
    });
    let waiting: Vec<_> = (0..16)
        .map(|_| {
            let repo = Arc::clone(&repo);
            tokio::spawn(async move { repo.acquire("b", "").await.map(|m| m.version()) })
        })
        .collect();
    // The server stays ready while the load runs.
    assert!(repo.is_ready());
    for request in waiting {
        assert_eq!(request.await.unwrap().unwrap(), 1);
    }
    assert_eq!(
        metric(&repo, "meshserve_loadmodel_milliseconds_count{model=\"b\"}"),
        1.0
    );
    // Used just now: it stays.
    assert_eq!(repo.unload_idle(), 0);
    let deadline = std::time::Instant::now() + idle * 10;
    while repo.unload_idle() == 0 {
        assert!(std::time::Instant::now() < deadline, "b never unloaded");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let b = repo
        .index(false)
        .into_iter()
        .find(|e| e.name == "b")
        .unwrap();
    assert!(b.reason.contains("without a request"), "{b:?}");
    // The next request loads it again.
    assert_eq!(repo.acquire("b", "").await.unwrap().version(), 1);
    // A model unloaded through the API stays out.
    repo.unload("c").unwrap();
    assert!(repo.acquire("c", "").await.is_err());
}
