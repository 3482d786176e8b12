//! REST end to end: the real binary, every endpoint, the reference outputs in JSON and binary
//! form, KServe V1, h2c, and bad input answered with the right status and a useful message.

use meshserve_e2e::{Sidecar, assert_data_close, fixtures};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Each test owns its sidecar: it is gone when the test ends, passed or failed.
fn sidecar() -> Sidecar {
    Sidecar::start(&["--max-request-bytes", "4000000"])
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn get(sidecar: &Sidecar, path: &str) -> (StatusCode, Value) {
    let response = client().get(sidecar.url(path)).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(
    sidecar: &Sidecar,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let response = client()
        .post(sidecar.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn infer_path(fixture: &Value) -> String {
    format!(
        "/v2/models/{}/versions/{}/infer",
        fixture["model"].as_str().unwrap(),
        fixture["version"].as_str().unwrap()
    )
}

#[tokio::test]
async fn health_and_metadata() {
    let sc = sidecar();
    assert_eq!(
        get(&sc, "/v2/health/live").await,
        (StatusCode::OK, json!({"live": true}))
    );
    assert_eq!(
        get(&sc, "/v2/health/ready").await,
        (StatusCode::OK, json!({"ready": true}))
    );
    let (status, server) = get(&sc, "/v2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server["name"], "meshserve");
    assert!(
        server["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );

    let (status, model) = get(&sc, "/v2/models/mnist_cnn").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        model,
        json!({"name": "mnist_cnn", "versions": ["1"], "platform": "onnxruntime_onnx",
               "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
               "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]})
    );
    let (status, model) = get(&sc, "/v2/models/sklearn_digits/versions/1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(model["versions"], json!(["1", "2"]));

    assert_eq!(
        get(&sc, "/v2/models/mnist_cnn/ready").await,
        (StatusCode::OK, json!({"name": "mnist_cnn", "ready": true}))
    );
    assert_eq!(
        get(&sc, "/v2/models/sklearn_digits/versions/2/ready")
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        get(&sc, "/v2/models/sklearn_digits/versions/9/ready")
            .await
            .0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (status, body) = get(&sc, "/v2/models/nope/ready").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains("'nope'"));
}

#[tokio::test]
async fn every_fixture_over_json() {
    let sc = sidecar();
    for fixture in fixtures() {
        let request = json!({"id": "fixture", "inputs": fixture["inputs"]});
        let (status, response) = post(&sc, &infer_path(&fixture), request.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{}: {response}", fixture["model"]);
        assert_eq!(response["model_name"], fixture["model"]);
        assert_eq!(response["model_version"], fixture["version"]);
        assert_eq!(response["id"], "fixture");
        let tolerance = fixture["tolerance"].as_f64().unwrap();
        for expected in fixture["outputs"].as_array().unwrap() {
            let got = response["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["name"] == expected["name"])
                .unwrap();
            assert_eq!(got["datatype"], expected["datatype"]);
            assert_eq!(got["shape"], expected["shape"]);
            let what = format!("{}.{}", fixture["model"], expected["name"]);
            assert_data_close(
                expected["datatype"].as_str().unwrap(),
                &got["data"],
                &expected["data"],
                tolerance,
                &what,
            );
        }
    }
}

/// Raw little-endian bytes of JSON data, as the binary extension carries them.
fn raw(datatype: &str, data: &Value) -> Vec<u8> {
    let items = data.as_array().unwrap();
    let mut out = Vec::new();
    for v in items {
        match datatype {
            "BOOL" => out.push(u8::from(v.as_bool().unwrap())),
            "UINT8" => out.push(v.as_u64().unwrap() as u8),
            "UINT16" => out.extend((v.as_u64().unwrap() as u16).to_le_bytes()),
            "UINT32" => out.extend((v.as_u64().unwrap() as u32).to_le_bytes()),
            "UINT64" => out.extend(v.as_u64().unwrap().to_le_bytes()),
            "INT8" => out.extend((v.as_i64().unwrap() as i8).to_le_bytes()),
            "INT16" => out.extend((v.as_i64().unwrap() as i16).to_le_bytes()),
            "INT32" => out.extend((v.as_i64().unwrap() as i32).to_le_bytes()),
            "INT64" => out.extend(v.as_i64().unwrap().to_le_bytes()),
            "FP16" => out.extend(half::f16::from_f64(v.as_f64().unwrap()).to_le_bytes()),
            "FP32" => out.extend((v.as_f64().unwrap() as f32).to_le_bytes()),
            "FP64" => out.extend(v.as_f64().unwrap().to_le_bytes()),
            "BYTES" => {
                let s = v.as_str().unwrap().as_bytes();
                out.extend((s.len() as u32).to_le_bytes());
                out.extend(s);
            }
            other => panic!("datatype {other}"),
        }
    }
    out
}

#[tokio::test]
async fn every_fixture_over_the_binary_extension() {
    let sc = sidecar();
    for fixture in fixtures() {
        let mut blobs = Vec::new();
        let inputs: Vec<Value> = fixture["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let blob = raw(i["datatype"].as_str().unwrap(), &i["data"]);
                let input = json!({"name": i["name"], "datatype": i["datatype"], "shape": i["shape"],
                                   "parameters": {"binary_data_size": blob.len()}});
                blobs.push(blob);
                input
            })
            .collect();
        let header =
            json!({"inputs": inputs, "parameters": {"binary_data_output": true}}).to_string();
        let mut body = header.clone().into_bytes();
        blobs.iter().for_each(|b| body.extend(b));
        let response = client()
            .post(sc.url(&infer_path(&fixture)))
            .header("content-type", "application/octet-stream")
            .header("inference-header-content-length", header.len())
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{}", fixture["model"]);
        assert_eq!(
            response.headers()["content-type"],
            "application/octet-stream"
        );
        let json_length: usize = response.headers()["inference-header-content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let bytes = response.bytes().await.unwrap();
        let head: Value = serde_json::from_slice(&bytes[..json_length]).unwrap();
        let mut offset = json_length;
        for output in head["outputs"].as_array().unwrap() {
            assert!(output.get("data").is_none());
            let size = output["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
            let expected = fixture["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["name"] == output["name"])
                .unwrap();
            if fixture["tolerance"].as_f64().unwrap() == 0.0 {
                let want = raw(expected["datatype"].as_str().unwrap(), &expected["data"]);
                assert_eq!(
                    &bytes[offset..offset + size],
                    &want[..],
                    "{}.{}",
                    fixture["model"],
                    output["name"]
                );
            }
            offset += size;
        }
        assert_eq!(offset, bytes.len());
    }
}

#[tokio::test]
async fn requested_outputs_parameters_and_classification() {
    let sc = sidecar();
    let fixture = fixtures()
        .into_iter()
        .find(|f| f["model"] == "mnist_cnn")
        .unwrap();
    let request = json!({
        "inputs": fixture["inputs"],
        "parameters": {"tenant": "blue", "priority": 3},
        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
    });
    let (status, response) = post(&sc, "/v2/models/mnist_cnn/infer", request.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(
        response["parameters"],
        json!({"tenant": "blue", "priority": 3})
    );
    let output = &response["outputs"][0];
    assert_eq!(output["datatype"], "BYTES");
    let labels = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    let expected: Vec<&str> = fixture["expected_labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| labels[l.as_u64().unwrap() as usize])
        .collect();
    let got: Vec<&str> = output["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().rsplit(':').next().unwrap())
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn nested_data_and_h2c() {
    let sc = sidecar();
    let nested = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]}]});
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2
        .post(sc.url("/v2/models/fixed_shape/infer"))
        .body(nested.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["outputs"][0]["data"],
        json!([2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    );
}

#[tokio::test]
async fn kserve_v1() {
    let sc = sidecar();
    assert_eq!(
        get(&sc, "/").await,
        (StatusCode::OK, json!({"status": "alive"}))
    );
    let (status, models) = get(&sc, "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        models["models"],
        json!([
            "fixed_shape",
            "identity_all",
            "mnist_cnn",
            "multi_io",
            "sklearn_digits"
        ])
    );
    assert_eq!(
        get(&sc, "/v1/models/mnist_cnn").await,
        (StatusCode::OK, json!({"name": "mnist_cnn", "ready": true}))
    );
    assert_eq!(get(&sc, "/v1/models/nope").await.0, StatusCode::NOT_FOUND);

    let fixture = fixtures()
        .into_iter()
        .find(|f| f["model"] == "sklearn_digits" && f["version"] == "2")
        .unwrap();
    let rows: Vec<Value> = fixture["inputs"][0]["data"]
        .as_array()
        .unwrap()
        .chunks(64)
        .map(|r| Value::from(r.to_vec()))
        .collect();
    let (status, body) = post(
        &sc,
        "/v1/models/sklearn_digits:predict",
        json!({"instances": rows}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["predictions"], fixture["expected_labels"]);

    let multi = json!({"instances": [{"count": [1, 2, 3], "mask": [true, false, true], "text": [{"b64": "aGk="}]}]});
    let (status, body) = post(&sc, "/v1/models/multi_io:predict", multi.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["predictions"][0]["count_doubled"], json!([2, 4, 6]));
    assert_eq!(body["predictions"][0]["masked"], json!([1, 0, 3]));
    assert_eq!(body["predictions"][0]["text_out"], json!(["hi"]));
}

#[tokio::test]
async fn repository_unload_and_load() {
    let sc = sidecar();
    let (status, index) = post(&sc, "/v2/repository/index", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        index
            .as_array()
            .unwrap()
            .contains(&json!({"name": "fixed_shape", "version": "1", "state": "READY"}))
    );
    // fixed_shape is used by other tests only through `nested_data_and_h2c`; take it down and up
    // quickly, then check it serves again.
    assert_eq!(
        post(&sc, "/v2/repository/models/identity_all/unload", "").await,
        (StatusCode::OK, json!({}))
    );
    assert_eq!(
        get(&sc, "/v2/models/identity_all/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (status, body) = post(
        &sc,
        "/v2/models/identity_all/infer",
        json!({"inputs": []}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["error"].as_str().unwrap().contains("unloaded"),
        "{body}"
    );
    let (_, index) = post(&sc, "/v2/repository/index", "").await;
    assert!(
        index.as_array().unwrap().contains(
            &json!({"name": "identity_all", "state": "UNAVAILABLE", "reason": "unloaded"})
        )
    );
    assert_eq!(
        get(&sc, "/v2/health/ready").await.0,
        StatusCode::OK,
        "an unloaded model does not make the server unready"
    );
    assert_eq!(
        post(&sc, "/v2/repository/models/identity_all/load", "{}").await,
        (StatusCode::OK, json!({}))
    );
    assert_eq!(
        get(&sc, "/v2/models/identity_all/ready").await.0,
        StatusCode::OK
    );

    assert_eq!(
        post(&sc, "/v2/repository/models/nope/load", "").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        post(&sc, "/v2/repository/models/..%2Fmodels/load", "")
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (status, body) = post(
        &sc,
        "/v2/repository/models/mnist_cnn/load",
        r#"{"parameters": {"config": "{}"}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("'config'"));
}

/// Each bad request: its status and a part of the message that names the problem.
#[tokio::test]
async fn bad_input_is_refused_clearly_and_the_server_serves_on() {
    let sc = sidecar();
    let digits = |data: Value, shape: Value, datatype: &str| {
        json!({"inputs": [{"name": "input", "datatype": datatype, "shape": shape, "data": data}]})
            .to_string()
    };
    let ok_row: Vec<f32> = vec![0.0; 64];
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        ("/v2/models/sklearn_digits/infer", "{\"inputs\": [".into(), StatusCode::BAD_REQUEST, "malformed"),
        ("/v2/models/nope/infer", digits(json!(ok_row), json!([1, 64]), "FP32"), StatusCode::NOT_FOUND, "unknown model 'nope'"),
        ("/v2/models/sklearn_digits/versions/9/infer", digits(json!(ok_row), json!([1, 64]), "FP32"), StatusCode::NOT_FOUND, "version '9'"),
        ("/v2/models/sklearn_digits/infer", json!({"inputs": []}).to_string(), StatusCode::BAD_REQUEST, "missing input 'input'"),
        (
            "/v2/models/sklearn_digits/infer",
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ok_row},
                              {"name": "extra", "datatype": "FP32", "shape": [1], "data": [1]}]}).to_string(),
            StatusCode::BAD_REQUEST,
            "unknown input 'extra'",
        ),
        ("/v2/models/sklearn_digits/infer", digits(json!(ok_row), json!([1, 64]), "INT32"), StatusCode::BAD_REQUEST, "not a valid INT32"),
        ("/v2/models/sklearn_digits/infer", digits(json!([1, 2]), json!([1, 64]), "FP64"), StatusCode::BAD_REQUEST, "needs 64 elements but the data has 2"),
        ("/v2/models/sklearn_digits/infer", digits(json!(vec![0.5; 64]), json!([1, 64]), "FP64"), StatusCode::BAD_REQUEST, "datatype FP64 does not match the model's FP32"),
        ("/v2/models/sklearn_digits/infer", digits(json!([1.0]), json!([-1, 64]), "FP32"), StatusCode::BAD_REQUEST, "negative dimension"),
        ("/v2/models/sklearn_digits/infer", digits(json!([1.0]), json!([9223372036854775807i64, 64]), "FP32"), StatusCode::BAD_REQUEST, "more elements than can be addressed"),
        ("/v2/models/sklearn_digits/infer", digits(json!([1.0]), json!([99999999999i64, 64]), "FP32"), StatusCode::BAD_REQUEST, "but the data has 1"),
        ("/v2/models/sklearn_digits/infer", digits(json!(ok_row), json!([64]), "FP32"), StatusCode::BAD_REQUEST, "shape [64] does not match the model's [-1, 64]"),
        ("/v2/models/fixed_shape/infer", json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 2], "data": [1, 2, 3, 4, 5, 6]}]}).to_string(), StatusCode::BAD_REQUEST, "does not match the model's [2, 3]"),
        ("/v2/models/sklearn_digits/infer", digits(json!(ok_row), json!([1, 64]), "FLOAT"), StatusCode::BAD_REQUEST, "unknown datatype 'FLOAT'"),
        (
            "/v2/models/sklearn_digits/infer",
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ok_row}], "outputs": [{"name": "logits"}]}).to_string(),
            StatusCode::BAD_REQUEST,
            "unknown output 'logits'",
        ),
        ("/v2/models/sklearn_digits/infer", json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64]}]}).to_string(), StatusCode::BAD_REQUEST, "no 'data'"),
        ("/v1/models/sklearn_digits:predict", json!({"instances": [[1, 2], [3]]}).to_string(), StatusCode::BAD_REQUEST, "ragged"),
        ("/v1/models/sklearn_digits:predict", json!({"rows": []}).to_string(), StatusCode::BAD_REQUEST, "'instances' or 'inputs'"),
    ];
    for (path, body, status, needle) in cases {
        let (got, response) = post(&sc, path, body.clone()).await;
        let message = response["error"].as_str().unwrap_or_default();
        assert_eq!(got, status, "{path} {body:.120}: {response}");
        assert!(
            message.contains(needle),
            "{path} {body:.120}: wanted {needle:?} in {message:?}"
        );
    }
    assert_eq!(get(&sc, "/v2/health/ready").await.0, StatusCode::OK);
}

#[tokio::test]
async fn protocol_level_refusals() {
    let sc = sidecar();
    let url = sc.url("/v2/models/sklearn_digits/infer");
    let text = client()
        .post(&url)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(text.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(text.text().await.unwrap().contains("text/plain"));

    let gzip = client()
        .post(&url)
        .header("content-encoding", "gzip")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(gzip.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let past = client()
        .post(&url)
        .header("inference-header-content-length", "1000")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), StatusCode::BAD_REQUEST);
    assert!(
        past.text()
            .await
            .unwrap()
            .contains("Inference-Header-Content-Length is 1000")
    );

    let header = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "parameters": {"binary_data_size": 256}}]}).to_string();
    let mut short = header.clone().into_bytes();
    short.extend([0u8; 100]);
    let response = client()
        .post(&url)
        .header("inference-header-content-length", header.len())
        .body(short)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.text().await.unwrap().contains("only 100 bytes"));

    // Over the limit: refused from Content-Length before the body is read, and, for a
    // chunked body without a length, as soon as the limit is crossed.
    let addr = sc.http;
    let (declared, chunked) = tokio::task::spawn_blocking(move || {
        let declared = raw_exchange(addr, "Content-Length: 4000001\r\n", b"");
        let mut chunk = format!("{:x}\r\n", 4_000_001).into_bytes();
        chunk.extend(vec![b' '; 4_000_001]);
        chunk.extend(b"\r\n0\r\n\r\n");
        let chunked = raw_exchange(addr, "Transfer-Encoding: chunked\r\n", &chunk);
        (declared, chunked)
    })
    .await
    .unwrap();
    for response in [declared, chunked] {
        assert!(response.starts_with("HTTP/1.1 413"), "{response:.200}");
        assert!(
            response.contains("over the limit of 4000000 bytes"),
            "{response:.300}"
        );
    }

    let utf8 = {
        let header = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": 6}},
                                        {"name": "count", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]},
                                        {"name": "mask", "datatype": "BOOL", "shape": [1, 3], "data": [true, true, true]}]}).to_string();
        let mut body = header.clone().into_bytes();
        body.extend([2, 0, 0, 0, 0xff, 0xfe]);
        client()
            .post(sc.url("/v2/models/multi_io/infer"))
            .header("inference-header-content-length", header.len())
            .body(body)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(utf8.status(), StatusCode::BAD_REQUEST);
    assert!(utf8.text().await.unwrap().contains("not valid UTF-8"));

    let wrong_method = client().get(&url).send().await.unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    let nowhere = client().get(sc.url("/v3/things")).send().await.unwrap();
    assert_eq!(nowhere.status(), StatusCode::NOT_FOUND);
    assert!(nowhere.text().await.unwrap().contains("no endpoint"));
    assert_eq!(get(&sc, "/v2/health/live").await.0, StatusCode::OK);
}

/// Sends a POST to the infer endpoint with the given headers and body over a raw connection
/// and returns what came back before the server closed or 5 s passed.
fn raw_exchange(addr: std::net::SocketAddr, headers: &str, body: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "POST /v2/models/sklearn_digits/infer HTTP/1.1\r\nHost: t\r\n{headers}\r\n"
    )
    .unwrap();
    // The server may answer and close before taking the whole body: that is the point.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        response.extend(&buf[..n]);
        if response.windows(4).any(|w| w == b"\r\n\r\n") && response.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

/// A client that sends its headers a byte at a time (slow-loris) is cut off after the
/// sidecar's header timeout (10 s), and the sidecar serves others meanwhile.
#[tokio::test]
async fn a_client_slow_to_send_its_headers_is_cut_off() {
    use std::io::{Read, Write};
    let sc = sidecar();
    let addr = sc.http;
    let slow = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"POST /v2/models/sklearn_digits/infer HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        (
            started.elapsed(),
            String::from_utf8_lossy(&answer).into_owned(),
        )
    });
    let (status, _) = get(&sc, "/v2/health/ready").await;
    assert_eq!(status, StatusCode::OK, "others are served meanwhile");
    let (took, answer) = slow.await.unwrap();
    assert!(
        took >= std::time::Duration::from_secs(9) && took < std::time::Duration::from_secs(20),
        "closed after {took:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
}
