//! The Open Inference Protocol's REST forms: JSON bodies, and the binary tensor extension
//! (`Inference-Header-Content-Length`: a JSON header followed by tensors' raw bytes).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::datatype::DataType;
use crate::infer::{
    BINARY_DATA, BINARY_DATA_OUTPUT, BINARY_DATA_SIZE, InferRequest, InferResponse, InputTensor,
    InvalidRequest, Parameters, RequestedOutput, TensorSpec,
};
use crate::tensor::TensorData;

/// The HTTP header that gives the JSON header's length when binary data follows it.
pub const INFERENCE_HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

#[derive(Debug, Deserialize)]
struct RequestJson {
    id: Option<String>,
    #[serde(default)]
    parameters: Parameters,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Debug, Deserialize)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Parameters,
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Parameters,
}

/// Parses a `/infer` body. `header_length` is the `Inference-Header-Content-Length` value,
/// if the request had one: then the body is that many bytes of JSON followed by the binary
/// data of the inputs that declare `binary_data_size`, in the order of `inputs`.
pub fn parse_infer_request(
    body: &[u8],
    header_length: Option<usize>,
) -> Result<InferRequest, InvalidRequest> {
    let (json, mut binary) = match header_length {
        None => (body, &[][..]),
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(InvalidRequest(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )));
        }
    };
    let request: RequestJson = serde_json::from_slice(json)
        .map_err(|e| InvalidRequest(format!("malformed inference request JSON: {e}")))?;

    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let fail = |message: String| InvalidRequest(format!("input '{}': {message}", input.name));
        let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
            fail(format!("unknown datatype '{}'; expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BYTES", input.datatype))
        })?;
        let binary_size = input.parameters.get(BINARY_DATA_SIZE);
        let data = match (binary_size, &input.data) {
            (Some(_), Some(_)) => {
                return Err(fail(
                    "has both 'data' and 'binary_data_size'; send one".into(),
                ));
            }
            (None, None) => return Err(fail("has no 'data' (and no 'binary_data_size')".into())),
            (None, Some(data)) => TensorData::from_json(datatype, &input.shape, data)
                .map_err(|e| fail(e.to_string()))?,
            (Some(size), None) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| {
                        fail(format!(
                            "'binary_data_size' must be a non-negative integer, got {size}"
                        ))
                    })?;
                if size > binary.len() {
                    return Err(fail(format!(
                        "'binary_data_size' is {size} but only {} bytes of binary data remain",
                        binary.len()
                    )));
                }
                let (raw, rest) = binary.split_at(size);
                binary = rest;
                TensorData::from_raw(datatype, &input.shape, raw)
                    .map_err(|e| fail(e.to_string()))?
            }
        };
        let mut parameters = input.parameters;
        parameters.remove(BINARY_DATA_SIZE);
        inputs.push(InputTensor {
            name: input.name,
            shape: input.shape,
            data,
            parameters,
        });
    }
    if !binary.is_empty() {
        return Err(InvalidRequest(format!(
            "{} bytes of binary data follow the JSON header but no input claims them (set 'binary_data_size')",
            binary.len()
        )));
    }
    let outputs = request
        .outputs
        .into_iter()
        .map(|o| RequestedOutput {
            name: o.name,
            parameters: o.parameters,
        })
        .collect();
    Ok(InferRequest {
        id: request.id,
        parameters: request.parameters,
        inputs,
        outputs,
    })
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Parameters::is_empty")]
    parameters: &'a Parameters,
    outputs: Vec<OutputJsonOut<'a>>,
}

#[derive(Serialize)]
struct OutputJsonOut<'a> {
    name: &'a str,
    datatype: DataType,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Parameters::is_empty")]
    parameters: Parameters,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a TensorData>,
}

/// A response body ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedResponse {
    pub body: Vec<u8>,
    /// `Some(n)`: binary data follows `n` bytes of JSON; send `Inference-Header-Content-Length: n`
    /// and `Content-Type: application/octet-stream`.
    pub header_length: Option<usize>,
}

/// Whether an output goes back in binary form: the output's own `binary_data` parameter wins,
/// then the request's `binary_data_output`, else JSON.
pub fn wants_binary(
    request_parameters: &Parameters,
    requested: &[RequestedOutput],
    output: &str,
) -> bool {
    requested
        .iter()
        .find(|o| o.name == output)
        .and_then(|o| o.parameters.get(BINARY_DATA))
        .or_else(|| request_parameters.get(BINARY_DATA_OUTPUT))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Encodes a response as JSON, or JSON plus binary data for the outputs `binary` selects.
pub fn encode_infer_response(
    response: &InferResponse,
    binary: impl Fn(&str) -> bool,
) -> EncodedResponse {
    let mut raw = Vec::new();
    let outputs = response
        .outputs
        .iter()
        .map(|o| {
            let mut parameters = o.parameters.clone();
            let data = if binary(&o.name) {
                let start = raw.len();
                o.data.write_raw(&mut raw);
                parameters.insert(BINARY_DATA_SIZE.into(), Value::from(raw.len() - start));
                None
            } else {
                Some(&o.data)
            };
            OutputJsonOut {
                name: &o.name,
                datatype: o.datatype(),
                shape: &o.shape,
                parameters,
                data,
            }
        })
        .collect();
    let json = ResponseJson {
        model_name: &response.model_name,
        model_version: &response.model_version,
        id: response.id.as_deref(),
        parameters: &response.parameters,
        outputs,
    };
    let mut body = to_json(&json);
    if raw.is_empty() {
        return EncodedResponse {
            body,
            header_length: None,
        };
    }
    let header_length = body.len();
    body.extend_from_slice(&raw);
    EncodedResponse {
        body,
        header_length: Some(header_length),
    }
}

/// Serializes a response body. Our response types hold only strings, numbers and maps with
/// string keys, which serde_json always encodes; the fallback only guards that invariant.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value)
        .unwrap_or_else(|e| error_body(&format!("failed to encode the response: {e}")))
}

/// The protocol's error body: `{"error": "<message>"}`.
pub fn error_body(message: &str) -> Vec<u8> {
    let mut out = b"{\"error\":".to_vec();
    out.extend_from_slice(serde_json::Value::from(message).to_string().as_bytes());
    out.push(b'}');
    out
}

/// `GET /v2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerMetadata {
    pub name: String,
    pub version: String,
    pub extensions: Vec<String>,
}

/// `GET /v2/models/<m>[/versions/<v>]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// One entry of `POST /v2/repository/index`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepositoryIndexEntry {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub version: String,
    pub state: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::OutputTensor;
    use serde_json::json;

    fn body(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn parses_nested_and_flat_json() {
        for data in [json!([[1.0, 2.0], [3.0, 4.0]]), json!([1.0, 2.0, 3.0, 4.0])] {
            let req = parse_infer_request(
                &body(json!({"id": "7", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": data}]})),
                None,
            )
            .unwrap();
            assert_eq!(req.id.as_deref(), Some("7"));
            assert_eq!(
                req.inputs[0].data,
                TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0])
            );
        }
    }

    #[test]
    fn binary_inputs_are_taken_in_order() {
        let header = body(json!({"inputs": [
            {"name": "a", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}},
            {"name": "b", "shape": [1], "datatype": "BOOL", "data": [true]},
            {"name": "c", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 11}},
        ]}));
        let mut full = header.clone();
        full.extend_from_slice(&1i32.to_le_bytes());
        full.extend_from_slice(&(-2i32).to_le_bytes());
        full.extend_from_slice(&[2, 0, 0, 0, b'h', b'i', 1, 0, 0, 0, b'!']);
        let req = parse_infer_request(&full, Some(header.len())).unwrap();
        assert_eq!(req.inputs[0].data, TensorData::Int32(vec![1, -2]));
        assert_eq!(req.inputs[1].data, TensorData::Bool(vec![true]));
        assert_eq!(
            req.inputs[2].data,
            TensorData::Bytes(vec![b"hi".to_vec(), b"!".to_vec()])
        );
        assert!(req.inputs[0].parameters.is_empty());
    }

    #[test]
    fn rejects_what_it_should_with_the_input_named() {
        let cases = [
            (
                json!({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}]}),
                "input 'x'",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1.0]}]}),
                "unknown datatype",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}),
                "no 'data'",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1.0]}]}),
                "negative",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]}),
                "not a valid INT8",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]}),
                "BYTES",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": 1.0}]}),
                "must be an array",
            ),
            (json!({"outputs": []}), "missing field `inputs`"),
        ];
        for (request, needle) in cases {
            let err = parse_infer_request(&body(request.clone()), None)
                .unwrap_err()
                .0;
            assert!(err.contains(needle), "{request}: {err}");
        }
        let err = parse_infer_request(b"{not json", None).unwrap_err().0;
        assert!(err.contains("malformed"), "{err}");
        let err = parse_infer_request(b"{}", Some(10)).unwrap_err().0;
        assert!(err.contains("Inference-Header-Content-Length"), "{err}");
    }

    #[test]
    fn binary_size_past_the_body_is_refused() {
        let header = body(json!({"inputs": [
            {"name": "a", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}));
        let mut full = header.clone();
        full.extend_from_slice(&[0; 8]);
        let err = parse_infer_request(&full, Some(header.len()))
            .unwrap_err()
            .0;
        assert!(err.contains("only 8 bytes"), "{err}");
        full.extend_from_slice(&[0; 12]);
        let err = parse_infer_request(&full, Some(header.len()))
            .unwrap_err()
            .0;
        assert!(err.contains("no input claims"), "{err}");
    }

    #[test]
    fn encodes_json_and_binary_outputs() {
        let response = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: Some("r".into()),
            parameters: Parameters::new(),
            outputs: vec![
                OutputTensor {
                    name: "p".into(),
                    shape: vec![2],
                    data: TensorData::Fp32(vec![0.5, 1.5]),
                    parameters: Parameters::new(),
                },
                OutputTensor {
                    name: "l".into(),
                    shape: vec![1],
                    data: TensorData::Int64(vec![3]),
                    parameters: Parameters::new(),
                },
            ],
        };
        let json_only = encode_infer_response(&response, |_| false);
        assert_eq!(json_only.header_length, None);
        let v: Value = serde_json::from_slice(&json_only.body).unwrap();
        assert_eq!(v["outputs"][0]["data"], json!([0.5, 1.5]));
        assert_eq!(v["outputs"][1]["datatype"], "INT64");

        let mixed = encode_infer_response(&response, |name| name == "l");
        let n = mixed.header_length.unwrap();
        let v: Value = serde_json::from_slice(&mixed.body[..n]).unwrap();
        assert_eq!(v["outputs"][1]["parameters"]["binary_data_size"], 8);
        assert!(v["outputs"][1].get("data").is_none());
        assert_eq!(&mixed.body[n..], &3i64.to_le_bytes());
    }

    #[test]
    fn binary_choice_prefers_the_output_parameter() {
        let mut request = Parameters::new();
        request.insert(BINARY_DATA_OUTPUT.into(), json!(true));
        let mut out = RequestedOutput::new("a");
        out.parameters.insert(BINARY_DATA.into(), json!(false));
        assert!(!wants_binary(&request, &[out.clone()], "a"));
        assert!(wants_binary(&request, &[out], "b"));
        assert!(!wants_binary(&Parameters::new(), &[], "b"));
    }

    #[test]
    fn error_body_escapes() {
        let v: Value = serde_json::from_slice(&error_body("bad \"x\"\n")).unwrap();
        assert_eq!(v, json!({"error": "bad \"x\"\n"}));
    }
}
