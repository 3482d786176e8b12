//! Pictures through the demo's transformer pipeline (base64, JPEG/PNG decoding, grayscale,
//! area resize with crop, invert, scale, NCHW) under its pixel limit, as the Envoy filter
//! runs it: the bytes are a picture file in a KServe V1 body.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshserve_filter_core::transform::{Transformer, Wire};

const PIPELINE: &str = r#"{
  "request": {"field": "image", "steps": ["base64_decode", "image_decode", {"color": "grayscale"},
    {"resize": {"width": 28, "height": 28, "method": "area", "fit": "crop"}}, "invert",
    {"scale": 0.00392156862745098}, {"layout": "nchw"}, {"emit": {"input": "input"}}]},
  "response": {"steps": [{"top_k": {"k": 3}}], "labels": ["0","1","2","3","4","5","6","7","8","9"]},
  "limits": {"max_body_bytes": 4194304, "max_image_pixels": 1000000}}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(transformer) = serde_json::from_str::<Transformer>(PIPELINE) else {
        return;
    };
    let picture = base64::engine::general_purpose::STANDARD.encode(data);
    let body = format!(r#"{{"instances": [{{"image": {{"b64": "{picture}"}}}}]}}"#);
    let _ = transformer.request(Wire::V1, body.as_bytes(), None);
    // And the bytes as a model's answer for the response steps.
    let _ = transformer.response(Wire::V1, data, None);
});
