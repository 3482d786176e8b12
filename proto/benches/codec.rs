//! The protocol codec's hot paths: parsing an inference request and encoding its response, in
//! JSON and in the binary tensor extension, for one 28x28 image and for a batch of 32.
//!
//! `cargo bench -p meshserve-proto --bench codec`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use meshserve_proto::rest::{encode_infer_response, parse_infer_request};
use meshserve_proto::{InferResponse, OutputTensor, Parameters, TensorData};
use serde_json::json;

fn pixels(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 255) as f32 / 255.0).collect()
}

fn json_request(batch: usize) -> Vec<u8> {
    json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [batch, 1, 28, 28], "data": pixels(batch * 784)}]})
        .to_string()
        .into_bytes()
}

fn binary_request(batch: usize) -> (Vec<u8>, usize) {
    let raw = TensorData::Fp32(pixels(batch * 784)).to_raw();
    let header =
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [batch, 1, 28, 28],
                                    "parameters": {"binary_data_size": raw.len()}}]})
        .to_string();
    let length = header.len();
    let mut body = header.into_bytes();
    body.extend(raw);
    (body, length)
}

fn response(batch: usize) -> InferResponse {
    InferResponse {
        model_name: "mnist_cnn".into(),
        model_version: "1".into(),
        id: None,
        parameters: Parameters::new(),
        outputs: vec![OutputTensor {
            name: "probabilities".into(),
            shape: vec![batch as i64, 10],
            data: TensorData::Fp32(pixels(batch * 10)),
            parameters: Parameters::new(),
        }],
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_infer_request");
    for batch in [1, 32] {
        let body = json_request(batch);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("json", batch), &body, |b, body| {
            b.iter(|| parse_infer_request(black_box(body), None).unwrap())
        });
        let (body, length) = binary_request(batch);
        group.bench_with_input(BenchmarkId::new("binary", batch), &body, |b, body| {
            b.iter(|| parse_infer_request(black_box(body), Some(length)).unwrap())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("encode_infer_response");
    for batch in [1, 32] {
        let response = response(batch);
        group.bench_with_input(BenchmarkId::new("json", batch), &response, |b, r| {
            b.iter(|| encode_infer_response(black_box(r), |_| false))
        });
        group.bench_with_input(BenchmarkId::new("binary", batch), &response, |b, r| {
            b.iter(|| encode_infer_response(black_box(r), |_| true))
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
