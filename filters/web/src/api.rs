//! The package's functions over plain data: JSON text and bytes in, JSON text and bytes out.
//! They call the filter core and the protocol crate, the code the Envoy filters and the sidecar
//! run, so a page or a Node service makes byte for byte the tensors and bodies they make.
//! `lib.rs` hands them to JavaScript; the tests here run them natively.

use base64::Engine;
use meshserve_filter_core::transform::{TransformError, Transformer, Wire};
use meshserve_proto::infer::InferRequest;
use meshserve_proto::rest;
use serde_json::Value;

/// Why a call failed: the HTTP status the server would answer for the same input, and what
/// was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub message: String,
}

impl Failure {
    fn bad(message: impl Into<String>) -> Failure {
        Failure {
            status: 400,
            message: message.into(),
        }
    }
}

impl From<TransformError> for Failure {
    fn from(e: TransformError) -> Failure {
        Failure {
            status: e.status,
            message: format!("transformer: {}", e.message),
        }
    }
}

/// A transformer from its configuration: the InferenceService's `spec.transformer` as JSON
/// (what `meshserve render` puts in the filter configuration's `transformer`).
pub fn transformer(pipeline: &str) -> Result<Transformer, Failure> {
    serde_json::from_str(pipeline).map_err(|e| Failure::bad(format!("the pipeline: {e}")))
}

/// The protocol a caller names: `v1` (KServe `:predict`) or `v2` (`/infer`).
pub fn wire(protocol: Option<&str>) -> Result<Wire, Failure> {
    match protocol.unwrap_or("v1") {
        "v1" => Ok(Wire::V1),
        "v2" => Ok(Wire::V2),
        other => Err(Failure::bad(format!(
            "protocol '{other}': give \"v1\" or \"v2\""
        ))),
    }
}

/// The tensor the model gets for these pictures (one batch, in order):
/// `{"name", "datatype", "shape", "data"}` with `data` flat, as `meshserve transform` prints it.
pub fn tensor(transformer: &Transformer, pictures: &[&[u8]]) -> Result<String, Failure> {
    let tensor = transformer.tensor(pictures)?;
    let request = InferRequest {
        inputs: vec![tensor],
        ..InferRequest::default()
    };
    first_input(&rest::encode_infer_request(&request, false).body)
}

/// The one input of an all-JSON `/infer` body, as JSON text.
fn first_input(body: &[u8]) -> Result<String, Failure> {
    let mut json: Value = serde_json::from_slice(body).map_err(|e| Failure {
        status: 500,
        message: e.to_string(),
    })?;
    json.get_mut("inputs")
        .and_then(Value::as_array_mut)
        .and_then(|inputs| inputs.pop())
        .map(|input| input.to_string())
        .ok_or_else(|| Failure {
            status: 500,
            message: "the encoded request has no input".into(),
        })
}

/// The `/infer` request (all JSON) the model gets for a client's `body` in `wire`, as
/// `meshserve transform` prints it; a body the transformer leaves alone comes back unchanged.
pub fn preprocess(
    transformer: &Transformer,
    wire: Wire,
    body: &[u8],
    header_length: Option<usize>,
) -> Result<Vec<u8>, Failure> {
    if !transformer.transforms_request(wire) {
        return Ok(body.to_vec());
    }
    let request = transformer.infer_request(wire, body, header_length)?;
    Ok(rest::encode_infer_request(&request, false).body)
}

/// The client's answer (JSON) to a model's `/infer` response `body`, for a client in `wire`.
pub fn postprocess(
    transformer: &Transformer,
    wire: Wire,
    body: &[u8],
    header_length: Option<usize>,
) -> Result<Vec<u8>, Failure> {
    rejected(body, header_length)?;
    Ok(transformer.response(wire, body, header_length)?)
}

/// An `/infer` request body from its JSON form (`{"inputs": [{"name", "shape", "datatype",
/// "data"}], "outputs"?, "parameters"?, "id"?}`), checked as the server checks it: all JSON,
/// or (`binary`) a JSON header and every tensor's data after it (the binary tensor extension;
/// send `Inference-Header-Content-Length` with the length this returns).
pub fn encode_infer_request(json: &str, binary: bool) -> Result<rest::EncodedBody, Failure> {
    let request =
        rest::parse_infer_request(json.as_bytes(), None).map_err(|e| Failure::bad(e.0))?;
    Ok(rest::encode_infer_request(&request, binary))
}

/// A KServe V1 `:predict` (or `:explain`) body: `{"instances": [...]}`.
pub fn encode_v1_request(instances: Value) -> Result<String, Failure> {
    match instances {
        Value::Array(_) => Ok(serde_json::json!({ "instances": instances }).to_string()),
        _ => Err(Failure::bad("instances must be a list")),
    }
}

/// A picture (or any bytes) as a V1 value: `{"b64": "<base64>"}`.
pub fn b64(bytes: &[u8]) -> Value {
    serde_json::json!({ "b64": base64::engine::general_purpose::STANDARD.encode(bytes) })
}

/// An `/infer` response (JSON, or JSON plus binary data when `header_length` is given) as
/// all-JSON text, every output's `data` a flat list; an `{"error"}` answer is a failure.
pub fn parse_infer_response(body: &[u8], header_length: Option<usize>) -> Result<Vec<u8>, Failure> {
    rejected(body, header_length)?;
    let response = rest::parse_infer_response(body, header_length).map_err(|e| Failure {
        status: 502,
        message: e.0,
    })?;
    Ok(rest::encode_infer_response(&response, |_| false).body)
}

/// A KServe V1 answer (`{"predictions": [...]}`, or an explainer's document) as JSON text; an
/// `{"error"}` answer is a failure.
pub fn parse_v1_response(body: &[u8]) -> Result<String, Failure> {
    rejected(body, None)?;
    let json: Value = serde_json::from_slice(body).map_err(|e| Failure {
        status: 502,
        message: format!("malformed V1 answer: {e}"),
    })?;
    match &json {
        Value::Object(map) if !matches!(map.get("predictions"), Some(p) if !p.is_array()) => {
            Ok(json.to_string())
        }
        _ => Err(Failure {
            status: 502,
            message: "a V1 answer is an object, its 'predictions' a list".into(),
        }),
    }
}

/// The server's `{"error": "..."}` answer, as a failure.
fn rejected(body: &[u8], header_length: Option<usize>) -> Result<(), Failure> {
    if header_length.is_some() {
        return Ok(());
    }
    let error = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        let map = v.as_object()?;
        (map.len() == 1)
            .then(|| map.get("error")?.as_str().map(str::to_owned))
            .flatten()
    });
    match error {
        Some(message) => Err(Failure { status: 0, message }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIPELINE: &str = r#"{
        "request": {"field": "image", "steps": ["base64_decode", "image_decode",
            {"color": "grayscale"}, {"resize": {"width": 4, "height": 4, "method": "area"}},
            "invert", {"scale": 0.00392156862745098}, {"layout": "nchw"},
            {"emit": {"input": "input"}}]},
        "response": {"steps": [{"argmax": {}}], "labels": ["zero", "one"]}
    }"#;

    /// A 2x2 PNG, black left column, white right.
    fn png() -> Vec<u8> {
        let image =
            image::GrayImage::from_fn(2, 2, |x, _| image::Luma([if x == 0 { 0 } else { 255 }]));
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn the_tensor_is_the_one_the_filter_sends() {
        let t = transformer(PIPELINE).unwrap();
        let picture = png();
        let tensor: Value = serde_json::from_str(&tensor(&t, &[&picture]).unwrap()).unwrap();
        assert_eq!(tensor["shape"], serde_json::json!([1, 1, 4, 4]));
        assert_eq!(tensor["datatype"], "FP32");
        let body = encode_v1_request(serde_json::json!([{ "image": b64(&picture) }])).unwrap();
        let request: Value =
            serde_json::from_slice(&preprocess(&t, Wire::V1, body.as_bytes(), None).unwrap())
                .unwrap();
        assert_eq!(request["inputs"][0], tensor);
        let data = tensor["data"].as_array().unwrap();
        assert_eq!((data[0].as_f64(), data[3].as_f64()), (Some(1.0), Some(0.0)));
    }

    #[test]
    fn answers_are_post_processed_and_errors_are_failures() {
        let t = transformer(PIPELINE).unwrap();
        let response = br#"{"model_name": "m", "outputs": [{"name": "p", "shape": [1, 2], "datatype": "FP32", "data": [0.2, 0.8]}]}"#;
        let answer: Value =
            serde_json::from_slice(&postprocess(&t, Wire::V1, response, None).unwrap()).unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"predictions": ["one"]}),
            "{answer}"
        );
        let refused = postprocess(&t, Wire::V1, br#"{"error": "unknown model 'm'"}"#, None);
        assert_eq!(refused.unwrap_err().message, "unknown model 'm'");
        let bad = preprocess(&t, Wire::V1, br#"{"instances": [{"image": 3}]}"#, None);
        assert_eq!(bad.unwrap_err().status, 400);
        assert!(transformer(r#"{"request": {"steps": ["nope"]}}"#).is_err());
        assert_eq!(wire(Some("v3")).unwrap_err().status, 400);
    }

    #[test]
    fn requests_encode_in_binary_and_parse_back() {
        let json = r#"{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2.5, -3]}]}"#;
        let binary = encode_infer_request(json, true).unwrap();
        let length = binary.header_length.unwrap();
        assert_eq!(binary.body.len(), length + 12);
        let back = rest::parse_infer_request(&binary.body, Some(length)).unwrap();
        assert_eq!(
            back,
            rest::parse_infer_request(json.as_bytes(), None).unwrap()
        );
        let plain = encode_infer_request(json, false).unwrap();
        assert_eq!(plain.header_length, None);
        let wrong = r#"{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}"#;
        assert_eq!(encode_infer_request(wrong, true).unwrap_err().status, 400);
        assert!(encode_v1_request(serde_json::json!({"a": 1})).is_err());
    }

    #[test]
    fn responses_parse_from_json_and_binary() {
        let binary_json = r#"{"model_name":"m","outputs":[{"name":"y","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = binary_json.as_bytes().to_vec();
        body.extend_from_slice(&[7, 0, 0, 0, 9, 0, 0, 0]);
        let parsed: Value =
            serde_json::from_slice(&parse_infer_response(&body, Some(binary_json.len())).unwrap())
                .unwrap();
        assert_eq!(parsed["outputs"][0]["data"], serde_json::json!([7, 9]));
        let error = parse_infer_response(br#"{"error": "no such model"}"#, None).unwrap_err();
        assert_eq!(error.message, "no such model");
        assert!(parse_v1_response(br#"{"predictions": [1]}"#).is_ok());
        assert!(parse_v1_response(br#"{"predictions": 1}"#).is_err());
        assert!(parse_v1_response(b"[1]").is_err());
    }
}
