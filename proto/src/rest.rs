//! The Open Inference Protocol's REST forms: JSON bodies, and the binary tensor extension
//! (`Inference-Header-Content-Length`: a JSON header followed by tensors' raw bytes).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::datatype::DataType;
use crate::infer::{
    BINARY_DATA, BINARY_DATA_OUTPUT, BINARY_DATA_SIZE, InferRequest, InferResponse, InputTensor,
    InvalidRequest, OutputTensor, Parameters, RequestedOutput, TensorSpec,
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
    let (json, mut binary) = split_binary(body, header_length)?;
    let request: RequestJson = serde_json::from_slice(json)
        .map_err(|e| InvalidRequest(format!("malformed inference request JSON: {e}")))?;

    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let (data, parameters) = read_tensor(
            &input.name,
            &input.shape,
            &input.datatype,
            input.parameters,
            input.data.as_ref(),
            &mut binary,
        )?;
        inputs.push(InputTensor {
            name: input.name,
            shape: input.shape,
            data,
            parameters,
        });
    }
    no_binary_left(binary, "input")?;
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

/// Splits a body into its JSON header and the binary data after it.
fn split_binary(
    body: &[u8],
    header_length: Option<usize>,
) -> Result<(&[u8], &[u8]), InvalidRequest> {
    match header_length {
        None => Ok((body, &[][..])),
        Some(n) if n <= body.len() => Ok(body.split_at(n)),
        Some(n) => Err(InvalidRequest(format!(
            "Inference-Header-Content-Length is {n} but the body has only {} bytes",
            body.len()
        ))),
    }
}

/// Reads one tensor of a JSON header: from its `data`, or from the next `binary_data_size`
/// bytes of `binary`. Returns the data and the parameters without `binary_data_size`.
fn read_tensor(
    name: &str,
    shape: &[i64],
    datatype: &str,
    mut parameters: Parameters,
    data: Option<&Value>,
    binary: &mut &[u8],
) -> Result<(TensorData, Parameters), InvalidRequest> {
    let fail = |message: String| InvalidRequest(format!("input '{name}': {message}"));
    let datatype = DataType::parse(datatype).ok_or_else(|| {
        fail(format!("unknown datatype '{datatype}'; expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BYTES"))
    })?;
    let data = match (parameters.remove(BINARY_DATA_SIZE), data) {
        (Some(_), Some(_)) => {
            return Err(fail(
                "has both 'data' and 'binary_data_size'; send one".into(),
            ));
        }
        (None, None) => return Err(fail("has no 'data' (and no 'binary_data_size')".into())),
        (None, Some(data)) => {
            TensorData::from_json(datatype, shape, data).map_err(|e| fail(e.to_string()))?
        }
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
            *binary = rest;
            TensorData::from_raw(datatype, shape, raw).map_err(|e| fail(e.to_string()))?
        }
    };
    Ok((data, parameters))
}

fn no_binary_left(binary: &[u8], what: &str) -> Result<(), InvalidRequest> {
    if binary.is_empty() {
        return Ok(());
    }
    Err(InvalidRequest(format!(
        "{} bytes of binary data follow the JSON header but no {what} claims them (set 'binary_data_size')",
        binary.len()
    )))
}

#[derive(Debug, Deserialize)]
struct ResponseJsonIn {
    model_name: String,
    #[serde(default)]
    model_version: String,
    id: Option<String>,
    #[serde(default)]
    parameters: Parameters,
    outputs: Vec<InputJson>,
}

/// Parses an `/infer` response (JSON, or JSON plus binary data when `header_length` is
/// given): what a client, or a transformer between client and model, reads.
pub fn parse_infer_response(
    body: &[u8],
    header_length: Option<usize>,
) -> Result<InferResponse, InvalidRequest> {
    let (json, mut binary) = split_binary(body, header_length)?;
    let response: ResponseJsonIn = serde_json::from_slice(json)
        .map_err(|e| InvalidRequest(format!("malformed inference response JSON: {e}")))?;
    let mut outputs = Vec::with_capacity(response.outputs.len());
    for output in response.outputs {
        let (data, parameters) = read_tensor(
            &output.name,
            &output.shape,
            &output.datatype,
            output.parameters,
            output.data.as_ref(),
            &mut binary,
        )
        .map_err(|e| InvalidRequest(e.0.replacen("input '", "output '", 1)))?;
        outputs.push(OutputTensor {
            name: output.name,
            shape: output.shape,
            data,
            parameters,
        });
    }
    no_binary_left(binary, "output")?;
    Ok(InferResponse {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id,
        parameters: response.parameters,
        outputs,
    })
}

#[derive(Serialize)]
struct RequestJsonOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Parameters::is_empty")]
    parameters: &'a Parameters,
    inputs: Vec<OutputJsonOut<'a>>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    outputs: Vec<RequestedOutputOut<'a>>,
}

#[derive(Serialize)]
struct RequestedOutputOut<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Parameters::is_empty")]
    parameters: &'a Parameters,
}

/// Encodes an `/infer` request: all JSON, or (`binary`) a JSON header with every input's data
/// after it in the binary tensor extension (cheaper to write and to read for large tensors).
pub fn encode_infer_request(request: &InferRequest, binary: bool) -> EncodedBody {
    let mut raw = Vec::new();
    let inputs = request
        .inputs
        .iter()
        .map(|i| tensor_out(&i.name, &i.shape, &i.data, &i.parameters, binary, &mut raw))
        .collect();
    let json = RequestJsonOut {
        id: request.id.as_deref(),
        parameters: &request.parameters,
        inputs,
        outputs: request
            .outputs
            .iter()
            .map(|o| RequestedOutputOut {
                name: &o.name,
                parameters: &o.parameters,
            })
            .collect(),
    };
    with_binary(to_json(&json), raw)
}

fn tensor_out<'a>(
    name: &'a str,
    shape: &'a [i64],
    data: &'a TensorData,
    parameters: &Parameters,
    binary: bool,
    raw: &mut Vec<u8>,
) -> OutputJsonOut<'a> {
    let mut parameters = parameters.clone();
    let datatype = data.datatype();
    let data = if binary {
        let start = raw.len();
        data.write_raw(raw);
        parameters.insert(BINARY_DATA_SIZE.into(), Value::from(raw.len() - start));
        None
    } else {
        Some(data)
    };
    OutputJsonOut {
        name,
        datatype,
        shape,
        parameters,
        data,
    }
}

/// A JSON header with `raw` binary data after it (none: plain JSON).
fn with_binary(mut body: Vec<u8>, raw: Vec<u8>) -> EncodedBody {
    if raw.is_empty() {
        return EncodedBody {
            body,
            header_length: None,
        };
    }
    let header_length = body.len();
    body.extend_from_slice(&raw);
    EncodedBody {
        body,
        header_length: Some(header_length),
    }
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

/// A request or response body ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedBody {
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
) -> EncodedBody {
    let mut raw = Vec::new();
    let outputs = response
        .outputs
        .iter()
        .map(|o| {
            tensor_out(
                &o.name,
                &o.shape,
                &o.data,
                &o.parameters,
                binary(&o.name),
                &mut raw,
            )
        })
        .collect();
    let json = ResponseJson {
        model_name: &response.model_name,
        model_version: &response.model_version,
        id: response.id.as_deref(),
        parameters: &response.parameters,
        outputs,
    };
    with_binary(to_json(&json), raw)
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
    fn requests_and_responses_round_trip_in_both_forms() {
        let request = InferRequest {
            id: Some("r".into()),
            parameters: Parameters::new(),
            inputs: vec![
                InputTensor {
                    name: "x".into(),
                    shape: vec![1, 3],
                    data: TensorData::Fp32(vec![0.5, -1.0, 2.0]),
                    parameters: Parameters::new(),
                },
                InputTensor {
                    name: "s".into(),
                    shape: vec![2],
                    data: TensorData::Bytes(vec![b"ab".to_vec(), "\u{e9}t\u{e9}".into()]),
                    parameters: Parameters::new(),
                },
            ],
            outputs: vec![RequestedOutput::new("y")],
        };
        for binary in [false, true] {
            let encoded = encode_infer_request(&request, binary);
            assert_eq!(encoded.header_length.is_some(), binary);
            let back = parse_infer_request(&encoded.body, encoded.header_length).unwrap();
            assert_eq!(back, request);
        }
        let response = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            parameters: Parameters::new(),
            outputs: vec![OutputTensor {
                name: "y".into(),
                shape: vec![1, 2],
                data: TensorData::Int64(vec![3, -4]),
                parameters: Parameters::new(),
            }],
        };
        for binary in [false, true] {
            let encoded = encode_infer_response(&response, |_| binary);
            let back = parse_infer_response(&encoded.body, encoded.header_length).unwrap();
            assert_eq!(back, response);
        }
        let err = parse_infer_response(
            br#"{"model_name": "m", "outputs": [{"name": "y", "shape": [1], "datatype": "FP32"}]}"#,
            None,
        )
        .unwrap_err();
        assert!(err.0.contains("output 'y'"), "{err}");
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
