use std::io::Cursor;

use ::image::{GrayImage, ImageFormat, RgbImage};
use base64::Engine;
use serde_json::{Value, json};

use super::*;

fn transformer(config: Value) -> Result<Transformer, String> {
    serde_json::from_value(config).map_err(|e| e.to_string())
}

/// A grayscale pipeline to 4x4, inverted and scaled to 0..1, NCHW.
fn digits() -> Transformer {
    transformer(json!({
        "request": {"field": "image", "steps": [
            "base64_decode", "image_decode", {"color": "grayscale"},
            {"resize": {"width": 4, "height": 4, "method": "area"}},
            "invert", {"scale": 0.00392156862745098}, {"layout": "nchw"},
            {"emit": {"input": "input"}}]},
        "response": {"steps": [{"softmax": {}}, {"argmax": {}}], "labels": ["zero", "one", "two"]},
        "limits": {"max_batch": 3, "max_image_pixels": 10000}
    }))
    .unwrap()
}

/// An 8x8 image, white except a black left half (value 0), encoded as `format`.
fn picture(format: ImageFormat) -> Vec<u8> {
    let image = GrayImage::from_fn(8, 8, |x, _| ::image::Luma([if x < 4 { 0 } else { 255 }]));
    let mut out = Cursor::new(Vec::new());
    if format == ImageFormat::Jpeg {
        ::image::DynamicImage::ImageLuma8(image)
            .to_rgb8()
            .write_to(&mut out, format)
            .unwrap();
    } else {
        image.write_to(&mut out, format).unwrap();
    }
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn decoded(encoded: &EncodedBody) -> InferRequest {
    rest::parse_infer_request(&encoded.body, encoded.header_length).unwrap()
}

fn fp32(data: &TensorData) -> &[f32] {
    match data {
        TensorData::Fp32(v) => v,
        other => panic!("not FP32: {other:?}"),
    }
}

#[test]
fn v1_instances_in_every_form_become_one_batch_in_order() {
    let t = digits();
    let png = picture(ImageFormat::Png);
    let body = json!({"instances": [
        {"image": {"b64": b64(&png)}},
        {"image": b64(&png)},
        {"image": {"b64": b64(&picture(ImageFormat::Jpeg))}},
    ]});
    let request = decoded(
        &t.request(Wire::V1, body.to_string().as_bytes(), None)
            .unwrap(),
    );
    let input = &request.inputs[0];
    assert_eq!(input.name, "input");
    assert_eq!(input.shape, vec![3, 1, 4, 4]);
    let data = fp32(&input.data);
    // Inverted: the black left half becomes 1, the white right half 0.
    let row = [1.0, 1.0, 0.0, 0.0];
    for (i, v) in data.iter().enumerate() {
        let want = row[i % 4];
        // JPEG is lossy: a little ringing at the edge.
        let tolerance = if i >= 32 { 0.05 } else { 1e-6 };
        assert!((v - want).abs() <= tolerance, "element {i}: {v} vs {want}");
    }
}

#[test]
fn v2_bytes_inputs_json_and_binary_keep_the_other_inputs() {
    let t = digits();
    let png = picture(ImageFormat::Png);
    let json_body = json!({"id": "q", "inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(&png), b64(&png)]},
        {"name": "scale", "datatype": "FP32", "shape": [1], "data": [2.0]}]});
    let request = decoded(
        &t.request(Wire::V2, json_body.to_string().as_bytes(), None)
            .unwrap(),
    );
    assert_eq!(request.id.as_deref(), Some("q"));
    assert_eq!(request.inputs.len(), 2);
    assert_eq!(request.inputs[0].name, "scale");
    assert_eq!(request.inputs[1].shape, vec![2, 1, 4, 4]);

    // The binary extension: raw image bytes, no base64.
    let raw = InferRequest {
        inputs: vec![InputTensor {
            name: "image".into(),
            shape: vec![1],
            data: TensorData::Bytes(vec![png.clone()]),
            parameters: Parameters::new(),
        }],
        ..Default::default()
    };
    let encoded = rest::encode_infer_request(&raw, true);
    let request = decoded(
        &t.request(Wire::V2, &encoded.body, encoded.header_length)
            .unwrap(),
    );
    assert_eq!(fp32(&request.inputs[0].data)[..4], [1.0, 1.0, 0.0, 0.0]);
}

#[test]
fn v1_answers_come_back_as_labelled_predictions() {
    let t = digits();
    let response = json!({"model_name": "m", "model_version": "1", "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [2, 3], "data": [0.1, 3.0, 0.2, 5.0, 1.0, 0.0]}]});
    let body = t
        .response(Wire::V1, response.to_string().as_bytes(), None)
        .unwrap();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer, json!({"predictions": ["one", "zero"]}));
    let body = t
        .response(Wire::V2, response.to_string().as_bytes(), None)
        .unwrap();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["outputs"][0]["data"], json!(["one", "zero"]));
    assert_eq!(answer["outputs"][0]["datatype"], "BYTES");
}

#[test]
fn v1_numbers_convert_to_the_declared_inputs() {
    let t = transformer(json!({"request": {"inputs": [
        {"name": "a", "datatype": "FP32"}, {"name": "b", "datatype": "INT64"}]}}))
    .unwrap();
    assert!(t.transforms_request(Wire::V1) && !t.transforms_request(Wire::V2));
    let body = json!({"instances": [{"a": [1.5, 2.0], "b": 3}, {"a": [0.0, -1.0], "b": 4}]});
    let request = decoded(
        &t.request(Wire::V1, body.to_string().as_bytes(), None)
            .unwrap(),
    );
    assert_eq!(request.inputs[0].shape, vec![2, 2]);
    assert_eq!(request.inputs[1].data, TensorData::Int64(vec![3, 4]));
}

/// The CRC-32 PNG chunks carry.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A small PNG whose header claims `width` x `height`.
fn claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = picture(ImageFormat::Png);
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[test]
fn bad_requests_get_a_status_and_a_message_the_client_can_act_on() {
    let t = digits();
    let png = picture(ImageFormat::Png);
    let jpeg = picture(ImageFormat::Jpeg);
    let instance = |v: Value| json!({"instances": [v]}).to_string().into_bytes();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            instance(json!({"image": b64(&png[..png.len() / 2])})),
            400,
            "cannot decode",
        ),
        (
            instance(json!({"image": b64(&jpeg[..jpeg.len() - 40])})),
            400,
            "the JPEG image is truncated",
        ),
        (
            instance(json!({"image": "not base64!"})),
            400,
            "invalid base64",
        ),
        (
            instance(json!({"image": b64(&claiming(20000, 20000))})),
            413,
            "20000x20000 (400000000 pixels), over the limit of 10000 (limits.max_image_pixels)",
        ),
        (
            instance(json!({"image": b64(&claiming(0, 8))})),
            400,
            "image",
        ),
        (
            instance(json!({"image": b64(b"GIF89a\x01\x00\x01\x00\x80\x00\x00")})),
            400,
            "not supported; send PNG or JPEG",
        ),
        (
            instance(json!({"picture": b64(&png)})),
            400,
            "instance 0: expected an object with 'image'",
        ),
        (instance(json!({"image": b64(b"")})), 400, "empty"),
        (
            json!({"instances": vec![json!({"image": b64(&png)}); 4]})
                .to_string()
                .into_bytes(),
            413,
            "limits.max_batch",
        ),
        (
            json!({"instances": []}).to_string().into_bytes(),
            400,
            "no instances",
        ),
        (b"{".to_vec(), 400, "malformed V1 predict JSON"),
        (
            json!({"rows": []}).to_string().into_bytes(),
            400,
            "needs 'instances'",
        ),
    ];
    for (body, status, needle) in cases {
        let err = t.request(Wire::V1, &body, None).unwrap_err();
        assert_eq!(err.status, status, "{err:?}");
        assert!(
            err.message.contains(needle),
            "wanted {needle:?} in {:?}",
            err.message
        );
        assert!(
            String::from_utf8(err.body())
                .unwrap()
                .starts_with("{\"error\":\"transformer: ")
        );
    }
    let v2 =
        json!({"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["x"]}]});
    let err = t
        .request(Wire::V2, v2.to_string().as_bytes(), None)
        .unwrap_err();
    assert!(
        err.message
            .contains("the images go in input 'image'; the request has ['pixels']"),
        "{err}"
    );
    let mut big = digits();
    big.limits.max_body_bytes = 10;
    assert_eq!(
        big.request(Wire::V1, &instance(json!("aaaa")), None)
            .unwrap_err()
            .status,
        413
    );
}

#[test]
fn images_of_different_sizes_need_a_resize() {
    let t = transformer(json!({"request": {"steps": ["image_decode", {"layout": "flat"}, {"emit": {"input": "x"}}]}})).unwrap();
    let small = {
        let mut out = Cursor::new(Vec::new());
        RgbImage::new(2, 2)
            .write_to(&mut out, ImageFormat::Png)
            .unwrap();
        out.into_inner()
    };
    let body =
        json!({"instances": [{"b64": b64(&picture(ImageFormat::Png))}, {"b64": b64(&small)}]});
    let err = t
        .request(Wire::V1, body.to_string().as_bytes(), None)
        .unwrap_err();
    assert!(
        err.message.contains("add `resize` and `color` steps"),
        "{err}"
    );
}

#[test]
fn bad_pipelines_are_refused_with_the_step_named() {
    let cases = [
        (
            json!({"request": {"steps": ["invert", {"layout": "nchw"}, {"emit": {"input": "x"}}]}}),
            "steps[0]: this step takes an image",
        ),
        (
            json!({"request": {"steps": ["image_decode", {"layout": "nchw"}]}}),
            "end with `emit",
        ),
        (
            json!({"request": {"steps": ["image_decode", {"emit": {"input": "x"}}, {"layout": "nchw"}]}}),
            "steps[1]: emit must be the last step",
        ),
        (
            json!({"request": {"steps": ["image_decode", {"layout": "nchw"}, {"cast": "BYTES"}, {"emit": {"input": "x"}}]}}),
            "steps[2].cast: 'BYTES'",
        ),
        (
            json!({"request": {"steps": ["image_decode", {"color": "grayscale"}, {"normalize": {"mean": [0.1, 0.2, 0.3], "std": [1]}}, {"layout": "nchw"}, {"emit": {"input": "x"}}]}}),
            "one per channel (1)",
        ),
        (
            json!({"request": {"steps": ["image_decode", {"resize": {"width": 0, "height": 2}}, {"layout": "nchw"}, {"emit": {"input": "x"}}]}}),
            "0x2 is not a usable size",
        ),
        (
            json!({"request": {"steps": ["rotate"]}}),
            "unknown variant `rotate`",
        ),
        (
            json!({"request": {"steps": ["image_decode"], "inputs": [{"name": "x", "datatype": "FP32"}]}}),
            "not both",
        ),
        (
            json!({"response": {"steps": [{"top_k": {"k": 0}}]}}),
            "k must be at least 1",
        ),
        (json!({"limits": {"max_batch": 0}}), "above 0"),
        (
            json!({"request": {"steps": ["image_decode", {"normalize": {"mean": [0.5], "std": [0.5]}}, "invert", {"layout": "nchw"}, {"emit": {"input": "x"}}]}}),
            "steps[2]: invert after normalize",
        ),
        (
            json!({"request": {"steps": ["image_decode", {"resize": {"width": 65536, "height": 65536}}, {"layout": "nchw"}, {"emit": {"input": "x"}}]}}),
            "65536x65536 is not a usable size",
        ),
        (
            json!({"limits": {"max_bytes": 1}}),
            "unknown field `max_bytes`",
        ),
    ];
    for (config, needle) in cases {
        let err = transformer(config).unwrap_err();
        assert!(err.contains(needle), "wanted {needle:?} in {err}");
    }
}

#[test]
fn casts_round_and_saturate() {
    assert_eq!(
        cast(vec![1.4, 1.6, 300.0, -2.0], DataType::Uint8),
        TensorData::Uint8(vec![1, 2, 255, 0])
    );
    assert_eq!(cast(vec![0.5], DataType::Fp64), TensorData::Fp64(vec![0.5]));
}

#[test]
fn a_request_is_bounded_as_a_whole() {
    let png = picture(ImageFormat::Png);
    let body = json!({"instances": [{"b64": b64(&png)}, {"b64": b64(&png)}, {"b64": b64(&png)}]});
    let steps = json!(["image_decode", {"layout": "flat"}, {"emit": {"input": "x"}}]);
    // 8x8 pictures: two fit in 150 pixels, the third does not.
    let t =
        transformer(json!({"request": {"steps": steps}, "limits": {"max_request_pixels": 150}}))
            .unwrap();
    let err = t
        .request(Wire::V1, body.to_string().as_bytes(), None)
        .unwrap_err();
    assert_eq!(err.status, 413);
    assert!(
        err.message.contains("instance 2") && err.message.contains("limits.max_request_pixels"),
        "{err}"
    );
    // 64 floats a picture, 4 bytes each: two fit in 600 bytes, the third does not.
    let t = transformer(json!({"request": {"steps": steps}, "limits": {"max_tensor_bytes": 600}}))
        .unwrap();
    let err = t
        .request(Wire::V1, body.to_string().as_bytes(), None)
        .unwrap_err();
    assert_eq!(err.status, 413);
    assert!(err.message.contains("limits.max_tensor_bytes"), "{err}");
    let t = transformer(json!({"request": {"steps": steps}})).unwrap();
    assert!(
        t.request(Wire::V1, body.to_string().as_bytes(), None)
            .is_ok()
    );
}

#[test]
fn an_explanation_reaches_a_v1_client_as_its_document() {
    let document = br#"{"meta": {"name": "Occlusion"}, "data": {"attributions": [[[0.5]]]}}"#;
    let answer = json!({"model_name": "m-explainer", "outputs": [{"name": "explanation",
        "datatype": "BYTES", "shape": [1], "parameters": {"content_type": "str"},
        "data": [String::from_utf8_lossy(document)]}]});
    let body = digits()
        .explanation(answer.to_string().as_bytes(), None)
        .unwrap();
    assert_eq!(body, document);
    let predictions = json!({"model_name": "m", "outputs": [{"name": "p", "datatype": "FP32",
        "shape": [1], "data": [0.5]}]});
    let err = digits()
        .explanation(predictions.to_string().as_bytes(), None)
        .unwrap_err();
    assert_eq!(err.status, 500);
    assert!(err.message.contains("'explanation'"), "{}", err.message);
}

#[test]
fn the_tensor_for_pictures_is_the_one_their_request_becomes() {
    let t = digits();
    let (png, jpeg) = (picture(ImageFormat::Png), picture(ImageFormat::Jpeg));
    let body =
        json!({"instances": [{"image": {"b64": b64(&png)}}, {"image": {"b64": b64(&jpeg)}}]});
    let request = t
        .infer_request(Wire::V1, body.to_string().as_bytes(), None)
        .unwrap();
    let tensor = t.tensor(&[&png, &jpeg]).unwrap();
    assert_eq!(tensor, request.inputs[0]);
    assert_eq!(tensor.shape, [2, 1, 4, 4]);
    assert_eq!(t.tensor(&[png.as_slice(); 4]).unwrap_err().status, 413);
    assert_eq!(t.tensor(&[b"not a picture"]).unwrap_err().status, 400);
    let converts = transformer(json!({"request": {"inputs": [{"name": "x", "datatype": "FP32"}]}}));
    assert!(
        converts
            .unwrap()
            .tensor(&[&png])
            .unwrap_err()
            .message
            .contains("no request steps")
    );
}
