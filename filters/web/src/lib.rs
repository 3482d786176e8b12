//! meshserve's filter core for browsers and Node, through wasm-bindgen: the transformer's pre-
//! and post-processing (byte for byte the tensor the Envoy filter makes from the same input and
//! configuration), and encoders and parsers for Open Inference Protocol and KServe V1 bodies.
//! The functions here only convert between JavaScript values and [`api`]'s plain data; a
//! failure is thrown as an `Error` whose `status` is the HTTP status the server would answer.
//! The npm package's README (`filters/web/npm/README.md`) shows them in use.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod api;

use js_sys::{Array, ArrayBuffer, JSON, Object, Reflect, Uint8Array};
use serde_json::Value;
use wasm_bindgen::prelude::*;

use api::Failure;
use meshserve_filter_core::transform::{Transformer, Wire};

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &str = r#"
/** A tensor in the Open Inference Protocol's JSON form, `data` flat in row-major order. */
export interface Tensor {
  name: string;
  datatype: string;
  shape: number[];
  data: (number | boolean | string)[];
}
/** An encoded `/infer` request: send `body` with `Content-Type: contentType`, and with
 *  `Inference-Header-Content-Length: headerLength` when there is one. */
export interface EncodedBody {
  body: Uint8Array;
  headerLength?: number;
  contentType: string;
}
/** What a pipeline is given as: the InferenceService's `spec.transformer`, as JSON text or an object. */
export type Pipeline = string | object;
/** A body: bytes, or text. */
export type Body = Uint8Array | ArrayBuffer | string;
"#;

/// The deepest nesting [`encode_v1_request`] walks.
const MAX_DEPTH: usize = 64;

fn thrown(failure: Failure) -> JsValue {
    let error = js_sys::Error::new(&failure.message);
    let _ = Reflect::set(&error, &"status".into(), &JsValue::from(failure.status));
    error.into()
}

fn bad(message: &str) -> JsValue {
    thrown(Failure {
        status: 400,
        message: message.to_owned(),
    })
}

/// JSON text from a string, or from any other value by `JSON.stringify`.
fn json_text(value: &JsValue, what: &str) -> Result<String, JsValue> {
    if let Some(text) = value.as_string() {
        return Ok(text);
    }
    JSON::stringify(value)
        .ok()
        .and_then(|s| s.as_string())
        .ok_or_else(|| bad(&format!("{what}: give JSON text or a plain object")))
}

/// The bytes of a `Uint8Array` (a Node `Buffer` is one), an `ArrayBuffer` or a string (UTF-8).
fn bytes(value: &JsValue, what: &str) -> Result<Vec<u8>, JsValue> {
    if let Some(array) = value.dyn_ref::<Uint8Array>() {
        return Ok(array.to_vec());
    }
    if let Some(buffer) = value.dyn_ref::<ArrayBuffer>() {
        return Ok(Uint8Array::new(buffer).to_vec());
    }
    if let Some(text) = value.as_string() {
        return Ok(text.into_bytes());
    }
    Err(bad(&format!(
        "{what}: give a Uint8Array, an ArrayBuffer or a string"
    )))
}

fn parsed(text: &[u8]) -> Result<JsValue, JsValue> {
    JSON::parse(&String::from_utf8_lossy(text))
}

fn header_length(value: Option<u32>) -> Option<usize> {
    value.map(|n| n as usize)
}

fn pipeline(value: &JsValue) -> Result<Transformer, JsValue> {
    api::transformer(&json_text(value, "pipeline")?).map_err(thrown)
}

/// The tensor the model gets for one picture (PNG or JPEG bytes), made by the pipeline's
/// request steps: a batch of one, exactly as the Envoy filter builds it.
#[wasm_bindgen(unchecked_return_type = "Tensor")]
pub fn transform(
    #[wasm_bindgen(unchecked_param_type = "Pipeline")] pipeline_json: JsValue,
    #[wasm_bindgen(unchecked_param_type = "Body")] picture: JsValue,
) -> Result<JsValue, JsValue> {
    let transformer = pipeline(&pipeline_json)?;
    let picture = bytes(&picture, "picture")?;
    let tensor = api::tensor(&transformer, &[&picture]).map_err(thrown)?;
    parsed(tensor.as_bytes())
}

/// The tensor for several pictures, stacked in order into one batch.
#[wasm_bindgen(js_name = transformBatch, unchecked_return_type = "Tensor")]
pub fn transform_batch(
    #[wasm_bindgen(unchecked_param_type = "Pipeline")] pipeline_json: JsValue,
    #[wasm_bindgen(unchecked_param_type = "Body[]")] pictures: Array,
) -> Result<JsValue, JsValue> {
    let transformer = pipeline(&pipeline_json)?;
    let pictures = pictures
        .iter()
        .map(|p| bytes(&p, "pictures[]"))
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&[u8]> = pictures.iter().map(Vec::as_slice).collect();
    let tensor = api::tensor(&transformer, &refs).map_err(thrown)?;
    parsed(tensor.as_bytes())
}

/// [`api::preprocess`] or [`api::postprocess`].
type PipelineHalf = fn(&Transformer, Wire, &[u8], Option<usize>) -> Result<Vec<u8>, Failure>;

/// A body through one of the pipeline's two halves ([`api::preprocess`] or
/// [`api::postprocess`]), JSON out.
fn through_pipeline(
    pipeline_json: &JsValue,
    body: &JsValue,
    protocol: Option<String>,
    header: Option<u32>,
    half: PipelineHalf,
) -> Result<JsValue, JsValue> {
    let transformer = pipeline(pipeline_json)?;
    let wire = api::wire(protocol.as_deref()).map_err(thrown)?;
    let body = bytes(body, "body")?;
    parsed(&half(&transformer, wire, &body, header_length(header)).map_err(thrown)?)
}

/// The `/infer` request (JSON) the model gets for a client's body in `protocol` ("v1", the
/// default, or "v2"): what `meshserve transform` prints for the same body.
#[wasm_bindgen(unchecked_return_type = "object")]
pub fn preprocess(
    #[wasm_bindgen(unchecked_param_type = "Pipeline")] pipeline_json: JsValue,
    #[wasm_bindgen(unchecked_param_type = "Body")] body: JsValue,
    protocol: Option<String>,
    #[wasm_bindgen(js_name = headerLength)] header: Option<u32>,
) -> Result<JsValue, JsValue> {
    through_pipeline(&pipeline_json, &body, protocol, header, api::preprocess)
}

/// The client's answer to a model's `/infer` response: the pipeline's response steps (top-k,
/// labels, ...), in `protocol`'s form ("v1", the default: `{"predictions"}`; or "v2").
#[wasm_bindgen(unchecked_return_type = "object")]
pub fn postprocess(
    #[wasm_bindgen(unchecked_param_type = "Pipeline")] pipeline_json: JsValue,
    #[wasm_bindgen(unchecked_param_type = "Body")] body: JsValue,
    protocol: Option<String>,
    #[wasm_bindgen(js_name = headerLength)] header: Option<u32>,
) -> Result<JsValue, JsValue> {
    through_pipeline(&pipeline_json, &body, protocol, header, api::postprocess)
}

/// An `/infer` request body from its JSON form, checked as the server checks it; with
/// `binary`, in the binary tensor extension.
#[wasm_bindgen(js_name = encodeInferRequest, unchecked_return_type = "EncodedBody")]
pub fn encode_infer_request(
    #[wasm_bindgen(unchecked_param_type = "string | object")] request: JsValue,
    binary: Option<bool>,
) -> Result<JsValue, JsValue> {
    let binary = binary.unwrap_or(false);
    let encoded =
        api::encode_infer_request(&json_text(&request, "request")?, binary).map_err(thrown)?;
    let out = Object::new();
    let set = |key: &str, value: JsValue| Reflect::set(&out, &key.into(), &value);
    set("body", Uint8Array::from(encoded.body.as_slice()).into())?;
    if let Some(length) = encoded.header_length {
        set("headerLength", JsValue::from(length as f64))?;
    }
    let content_type = match encoded.header_length {
        Some(_) => "application/octet-stream",
        None => "application/json",
    };
    set("contentType", content_type.into())?;
    Ok(out.into())
}

/// A KServe V1 body, `{"instances": [...]}`, as JSON text: bytes anywhere in `instances`
/// (a `Uint8Array`, a Node `Buffer`, an `ArrayBuffer`) become `{"b64": "<base64>"}`; other
/// typed arrays (`Float32Array`, ...) become lists of numbers.
#[wasm_bindgen(js_name = encodeV1Request)]
pub fn encode_v1_request(instances: JsValue) -> Result<String, JsValue> {
    api::encode_v1_request(to_json(&instances, 0)?).map_err(thrown)
}

fn to_json(value: &JsValue, depth: usize) -> Result<Value, JsValue> {
    if depth > MAX_DEPTH {
        return Err(bad(&format!("instances nest deeper than {MAX_DEPTH}")));
    }
    if let Some(array) = value.dyn_ref::<Uint8Array>() {
        return Ok(api::b64(&array.to_vec()));
    }
    if let Some(buffer) = value.dyn_ref::<ArrayBuffer>() {
        return Ok(api::b64(&Uint8Array::new(buffer).to_vec()));
    }
    // Other typed arrays (Float32Array, Int32Array, ...) are lists of numbers.
    if ArrayBuffer::is_view(value) && !value.is_instance_of::<js_sys::DataView>() {
        return Array::from(value)
            .iter()
            .map(|v| to_json(&v, depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array);
    }
    if Array::is_array(value) {
        return Array::from(value)
            .iter()
            .map(|v| to_json(&v, depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array);
    }
    if value.is_null() || value.is_undefined() {
        return Ok(Value::Null);
    }
    if let Some(b) = value.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Some(n) = value.as_f64() {
        return serde_json::Number::from_f64(n)
            .map(Value::Number)
            .ok_or_else(|| bad(&format!("{n} has no JSON form")));
    }
    if let Some(s) = value.as_string() {
        return Ok(Value::String(s));
    }
    if let Some(object) = value.dyn_ref::<Object>() {
        let mut map = serde_json::Map::new();
        for entry in Object::entries(object).iter() {
            let pair = Array::from(&entry);
            let key = pair.get(0).as_string().unwrap_or_default();
            map.insert(key, to_json(&pair.get(1), depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    Err(bad("instances hold a value with no JSON form"))
}

/// An `/infer` response (JSON, or JSON plus binary data when `headerLength`, the response's
/// `Inference-Header-Content-Length`, is given): every output's `data` a flat list. A server's
/// `{"error"}` answer is thrown.
#[wasm_bindgen(js_name = parseInferResponse, unchecked_return_type = "object")]
pub fn parse_infer_response(
    #[wasm_bindgen(unchecked_param_type = "Body")] body: JsValue,
    #[wasm_bindgen(js_name = headerLength)] header: Option<u32>,
) -> Result<JsValue, JsValue> {
    let body = bytes(&body, "body")?;
    parsed(&api::parse_infer_response(&body, header_length(header)).map_err(thrown)?)
}

/// A KServe V1 answer (`{"predictions": [...]}`, or an explanation). A server's `{"error"}`
/// answer is thrown.
#[wasm_bindgen(js_name = parseV1Response, unchecked_return_type = "object")]
pub fn parse_v1_response(
    #[wasm_bindgen(unchecked_param_type = "Body")] body: JsValue,
) -> Result<JsValue, JsValue> {
    let body = bytes(&body, "body")?;
    parsed(api::parse_v1_response(&body).map_err(thrown)?.as_bytes())
}

/// The package's version (the workspace's).
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}
