//! The transformer's hot path natively: the demo's pipeline (a 1024x768 JPEG, base64 in a V1
//! body, to a 28x28 tensor) whole and by stage. `cargo bench -p meshserve-filter-core`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use meshserve_filter_core::transform::image::{self, Color, Fit, Method, Resize};
use meshserve_filter_core::transform::{Transformer, Wire};
use serde_json::json;

fn demo() -> Transformer {
    serde_json::from_value(json!({"request": {"field": "image", "steps": [
        "base64_decode", "image_decode", {"color": "grayscale"},
        {"resize": {"width": 28, "height": 28, "method": "area", "fit": "crop"}},
        "invert", {"scale": 0.00392156862745098}, {"layout": "nchw"}, {"emit": {"input": "input"}}]}}))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn bench(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let jpeg = std::fs::read(root.join("models/samples/digit_photo.jpg"))
        .unwrap_or_else(|e| panic!("{e}"));
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &jpeg);
    let body = json!({"instances": [{"image": {"b64": b64}}]})
        .to_string()
        .into_bytes();
    let transformer = demo();
    c.bench_function(
        "demo pipeline, V1 body to V2 request (1024x768 JPEG)",
        |b| {
            b.iter(|| {
                transformer
                    .request(Wire::V1, black_box(&body), None)
                    .map(|e| e.body.len())
            })
        },
    );
    c.bench_function("decode 1024x768 JPEG (grayscale)", |b| {
        b.iter(|| image::decode(black_box(&jpeg), 1 << 24, Some(Color::Grayscale)).map(|i| i.width))
    });
    let decoded =
        image::decode(&jpeg, 1 << 24, Some(Color::Grayscale)).unwrap_or_else(|e| panic!("{e}"));
    let step = Resize {
        width: 28,
        height: 28,
        method: Method::Area,
        fit: Fit::Crop,
        pad_value: 0.0,
    };
    c.bench_function("area resize 1024x768 -> 28x28 (crop)", |b| {
        b.iter(|| image::resize(black_box(&decoded), &step).width)
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
