//! The process around the protocol: admission control, draining on SIGTERM, and clear errors
//! at start for a missing or wrong ONNX Runtime library, an unavailable device, or a bad
//! repository.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use meshserve_e2e::{Sidecar, http_status, model_repository, run_to_exit};

const BODY: &str = r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}]}"#;

/// Opens an infer request and sends all of it but the last byte: the server has admitted it
/// and is waiting for the rest of the body.
fn start_slow_request(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST /v2/models/fixed_shape/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        BODY.len(),
        &BODY[..BODY.len() - 1]
    )
    .unwrap();
    stream.flush().unwrap();
    stream
}

fn finish_slow_request(mut stream: TcpStream) -> String {
    stream
        .write_all(&BODY.as_bytes()[BODY.len() - 1..])
        .unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        response.extend(&buf[..n]);
        if response.ends_with(b"}]}") {
            break;
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

fn post_status(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

#[test]
fn over_the_in_flight_limit_is_429_at_once_and_the_slot_comes_back() {
    let sidecar = Sidecar::start(&["--max-in-flight", "1"]);
    let slow = start_slow_request(sidecar.http);
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let (status, response) = post_status(sidecar.http, "/v2/models/fixed_shape/infer");
    assert_eq!(status, 429, "{response}");
    assert!(response.contains("overloaded"), "{response}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the refusal must not wait"
    );
    // Health is not inference: it still answers while inference is full.
    assert_eq!(http_status(sidecar.http, "GET /v2/health/live"), Some(200));

    let answer = finish_slow_request(slow);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        post_status(sidecar.http, "/v2/models/fixed_shape/infer").0,
        200
    );
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits() {
    let mut sidecar = Sidecar::start(&[]);
    let slow = start_slow_request(sidecar.http);
    std::thread::sleep(Duration::from_millis(200));
    sidecar.terminate();
    std::thread::sleep(Duration::from_millis(300));
    // The listener is closed: new connections are refused while the old request finishes.
    assert_eq!(http_status(sidecar.http, "GET /v2/health/live"), None);
    let answer = finish_slow_request(slow);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("\"data\":[2.0,3.0,4.0,5.0,6.0,7.0]"),
        "{answer}"
    );
    let status = sidecar
        .wait_exit(Duration::from_secs(10))
        .expect("exits after draining");
    assert!(status.success(), "{status}");
    assert!(sidecar.log().contains("draining"), "{}", sidecar.log());
}

fn serve_with(extra: &[&str]) -> (Option<std::process::ExitStatus>, String) {
    let repo = model_repository().display().to_string();
    let mut args = vec![
        "serve",
        "--model-repository",
        &repo,
        "--http-port",
        "0",
        "--grpc-port",
        "0",
    ];
    args.extend_from_slice(extra);
    run_to_exit(&args, Duration::from_secs(20))
}

#[test]
fn a_missing_or_wrong_onnx_runtime_library_stops_the_start_clearly() {
    let (status, log) = serve_with(&["--ort-library", "/nonexistent/libonnxruntime.so"]);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("/nonexistent/libonnxruntime.so") && log.contains("no such file"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");

    let dir = std::env::temp_dir().join(format!("meshserve-fake-ort-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("libonnxruntime.so.1.31.1");
    std::fs::write(&fake, b"\x7fELF but not really a library").unwrap();
    let (status, log) = serve_with(&["--ort-library", fake.to_str().unwrap()]);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(log.contains("could not be used"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unavailable_cuda_device_stops_the_start_clearly() {
    let (status, log) = serve_with(&["--device", "cuda:0"]);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("CUDA execution provider could not be registered on cuda:0"),
        "{log}"
    );
    let (status, log) = serve_with(&["--device", "tpu"]);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{log}");
    assert!(log.contains("unknown device 'tpu'"), "{log}");
}

#[test]
fn a_model_that_fails_to_load_leaves_the_server_unready_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("meshserve-bad-repo-{}", std::process::id()));
    let good = dir.join("fixed_shape/1");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::copy(
        model_repository().join("fixed_shape/1/model.onnx"),
        good.join("model.onnx"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("broken/1")).unwrap();
    std::fs::write(dir.join("broken/1/model.onnx"), b"not onnx").unwrap();
    std::fs::create_dir_all(dir.join("misconfigured/1")).unwrap();
    std::fs::copy(
        model_repository().join("fixed_shape/1/model.onnx"),
        dir.join("misconfigured/1/model.onnx"),
    )
    .unwrap();
    std::fs::write(dir.join("misconfigured/config.yaml"), "max_batch_sise: 4\n").unwrap();

    let sidecar = Sidecar::start_on(&dir, &[], false);
    let addr = sidecar.http;
    let log = sidecar.log();
    assert_eq!(
        http_status(addr, "GET /v2/health/ready"),
        Some(503),
        "{log}"
    );
    assert_eq!(
        http_status(addr, "GET /v2/models/fixed_shape/ready"),
        Some(200)
    );
    assert_eq!(http_status(addr, "GET /v2/models/broken/ready"), Some(503));
    let (_, index) = post_status(addr, "/v2/repository/index");
    assert!(
        index.contains("\"name\":\"broken\",\"state\":\"UNAVAILABLE\""),
        "{index}"
    );
    assert!(index.contains("unknown field `max_batch_sise`"), "{index}");
    drop(sidecar);
    let _ = std::fs::remove_dir_all(dir);
}

/// A body sent too slowly (slow-loris) gets 408 after `--body-read-timeout-secs` and its
/// connection is closed; a `Content-Length` over the limit gets 413 before any body is sent.
#[test]
fn slow_bodies_time_out_and_huge_ones_are_refused_at_once() {
    let sidecar = Sidecar::start(&["--body-read-timeout-secs", "1"]);
    let started = std::time::Instant::now();
    let mut slow = start_slow_request(sidecar.http);
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    let took = started.elapsed();
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("--body-read-timeout-secs"),
        "{answer}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "closed after {took:?}"
    );

    let mut huge = TcpStream::connect(sidecar.http).unwrap();
    huge.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        huge,
        "POST /v2/models/fixed_shape/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = huge.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}
