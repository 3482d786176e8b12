//! Conversions between the gRPC messages and the wire-independent request and response.

use std::collections::HashMap;

use serde_json::Value;

use crate::datatype::DataType;
use crate::infer::{
    InferRequest, InferResponse, InputTensor, InvalidRequest, OutputTensor, Parameters,
    RequestedOutput,
};
use crate::inference::infer_parameter::ParameterChoice;
use crate::inference::model_infer_response::InferOutputTensor;
use crate::inference::{InferParameter, ModelInferRequest, ModelInferResponse};
use crate::tensor::TensorData;

/// A gRPC `ModelInferRequest` as the model name, the version (empty: the server chooses) and
/// the request. Inputs are read from `raw_input_contents` when it is used, else from each
/// input's typed `contents`; a request that mixes both is refused, as the protocol requires.
pub fn request_from_grpc(
    request: ModelInferRequest,
) -> Result<(String, String, InferRequest), InvalidRequest> {
    let raw = request.raw_input_contents;
    if !raw.is_empty() {
        if let Some(input) = request.inputs.iter().find(|i| i.contents.is_some()) {
            return Err(InvalidRequest(format!(
                "input '{}' has typed 'contents' while the request uses 'raw_input_contents'; use one or the other",
                input.name
            )));
        }
        if raw.len() != request.inputs.len() {
            return Err(InvalidRequest(format!(
                "'raw_input_contents' has {} entries but the request has {} inputs",
                raw.len(),
                request.inputs.len()
            )));
        }
    }
    let mut raw = raw.into_iter();
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let fail = |message: String| InvalidRequest(format!("input '{}': {message}", input.name));
        let datatype = DataType::parse(&input.datatype)
            .ok_or_else(|| fail(format!("unknown datatype '{}'", input.datatype)))?;
        let data = match (raw.next(), input.contents) {
            (Some(bytes), _) => TensorData::from_raw(datatype, &input.shape, &bytes),
            (None, Some(contents)) => TensorData::from_contents(datatype, &input.shape, contents),
            (None, None) => TensorData::from_contents(datatype, &input.shape, Default::default()),
        }
        .map_err(|e| fail(e.to_string()))?;
        inputs.push(InputTensor {
            name: input.name,
            shape: input.shape,
            data,
            parameters: parameters_from_grpc(input.parameters),
        });
    }
    let outputs = request
        .outputs
        .into_iter()
        .map(|o| RequestedOutput {
            name: o.name,
            parameters: parameters_from_grpc(o.parameters),
        })
        .collect();
    let id = (!request.id.is_empty()).then_some(request.id);
    let infer = InferRequest {
        id,
        parameters: parameters_from_grpc(request.parameters),
        inputs,
        outputs,
    };
    Ok((request.model_name, request.model_version, infer))
}

/// The gRPC form of a response, with every output in `raw_output_contents` (what Triton sends
/// and what tritonclient and the kserve client read).
pub fn response_to_grpc(response: InferResponse) -> ModelInferResponse {
    let mut raw_output_contents = Vec::with_capacity(response.outputs.len());
    let outputs = response
        .outputs
        .into_iter()
        .map(|o| {
            raw_output_contents.push(o.data.to_raw());
            InferOutputTensor {
                name: o.name,
                datatype: o.data.datatype().as_str().to_owned(),
                shape: o.shape,
                parameters: parameters_to_grpc(&o.parameters),
                contents: None,
            }
        })
        .collect();
    ModelInferResponse {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id.unwrap_or_default(),
        parameters: parameters_to_grpc(&response.parameters),
        outputs,
        raw_output_contents,
    }
}

/// The wire-independent form of a gRPC response (for clients and tests).
pub fn response_from_grpc(response: ModelInferResponse) -> Result<InferResponse, InvalidRequest> {
    let mut raw = response.raw_output_contents.into_iter();
    let mut outputs = Vec::with_capacity(response.outputs.len());
    for output in response.outputs {
        let fail = |message: String| InvalidRequest(format!("output '{}': {message}", output.name));
        let datatype = DataType::parse(&output.datatype)
            .ok_or_else(|| fail(format!("unknown datatype '{}'", output.datatype)))?;
        let data = match (raw.next(), output.contents) {
            (Some(bytes), _) => TensorData::from_raw(datatype, &output.shape, &bytes),
            (None, contents) => {
                TensorData::from_contents(datatype, &output.shape, contents.unwrap_or_default())
            }
        }
        .map_err(|e| fail(e.to_string()))?;
        outputs.push(OutputTensor {
            name: output.name,
            shape: output.shape,
            data,
            parameters: parameters_from_grpc(output.parameters),
        });
    }
    Ok(InferResponse {
        model_name: response.model_name,
        model_version: response.model_version,
        id: (!response.id.is_empty()).then_some(response.id),
        parameters: parameters_from_grpc(response.parameters),
        outputs,
    })
}

/// gRPC parameters as JSON values: bool, int64, uint64 and double as numbers, strings as strings.
pub fn parameters_from_grpc(parameters: HashMap<String, InferParameter>) -> Parameters {
    parameters
        .into_iter()
        .filter_map(|(name, p)| {
            let value = match p.parameter_choice? {
                ParameterChoice::BoolParam(b) => Value::from(b),
                ParameterChoice::Int64Param(i) => Value::from(i),
                ParameterChoice::Uint64Param(u) => Value::from(u),
                ParameterChoice::DoubleParam(d) => Value::from(d),
                ParameterChoice::StringParam(s) => Value::from(s),
            };
            Some((name, value))
        })
        .collect()
}

/// JSON parameters as gRPC ones; arrays and objects, which gRPC cannot hold, travel as their
/// JSON text in a string parameter.
pub fn parameters_to_grpc(parameters: &Parameters) -> HashMap<String, InferParameter> {
    parameters
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(name, value)| {
            let choice = match value {
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => ParameterChoice::Int64Param(i),
                    (None, Some(u), _) => ParameterChoice::Uint64Param(u),
                    (_, _, d) => ParameterChoice::DoubleParam(d.unwrap_or(f64::NAN)),
                },
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                other => ParameterChoice::StringParam(other.to_string()),
            };
            (
                name.clone(),
                InferParameter {
                    parameter_choice: Some(choice),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::InferTensorContents;
    use crate::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
    use serde_json::json;

    fn input(
        name: &str,
        datatype: &str,
        shape: Vec<i64>,
        contents: Option<InferTensorContents>,
    ) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: HashMap::new(),
            contents,
        }
    }

    #[test]
    fn typed_contents_are_read() {
        let request = ModelInferRequest {
            model_name: "m".into(),
            id: "42".into(),
            inputs: vec![input(
                "x",
                "INT16",
                vec![3],
                Some(InferTensorContents {
                    int_contents: vec![1, -2, 3],
                    ..Default::default()
                }),
            )],
            outputs: vec![InferRequestedOutputTensor {
                name: "y".into(),
                parameters: HashMap::new(),
            }],
            ..Default::default()
        };
        let (model, version, req) = request_from_grpc(request).unwrap();
        assert_eq!((model.as_str(), version.as_str()), ("m", ""));
        assert_eq!(req.id.as_deref(), Some("42"));
        assert_eq!(req.inputs[0].data, TensorData::Int16(vec![1, -2, 3]));
        assert_eq!(req.outputs[0].name, "y");
    }

    #[test]
    fn raw_contents_are_read_in_order() {
        let request = ModelInferRequest {
            inputs: vec![
                input("a", "FP16", vec![1], None),
                input("b", "UINT8", vec![2], None),
            ],
            raw_input_contents: vec![half::f16::from_f32(1.5).to_le_bytes().to_vec(), vec![7, 8]],
            ..Default::default()
        };
        let (_, _, req) = request_from_grpc(request).unwrap();
        assert_eq!(
            req.inputs[0].data,
            TensorData::Fp16(vec![half::f16::from_f32(1.5)])
        );
        assert_eq!(req.inputs[1].data, TensorData::Uint8(vec![7, 8]));
    }

    #[test]
    fn mixing_typed_and_raw_is_refused() {
        let request = ModelInferRequest {
            inputs: vec![input(
                "a",
                "FP32",
                vec![1],
                Some(InferTensorContents {
                    fp32_contents: vec![1.0],
                    ..Default::default()
                }),
            )],
            raw_input_contents: vec![vec![0; 4]],
            ..Default::default()
        };
        let err = request_from_grpc(request).unwrap_err().0;
        assert!(
            err.contains("input 'a'") && err.contains("one or the other"),
            "{err}"
        );
    }

    #[test]
    fn wrong_contents_field_and_narrowing_are_refused() {
        let wrong = ModelInferRequest {
            inputs: vec![input(
                "a",
                "FP32",
                vec![1],
                Some(InferTensorContents {
                    int64_contents: vec![1],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        assert!(
            request_from_grpc(wrong)
                .unwrap_err()
                .0
                .contains("int64_contents")
        );
        let narrow = ModelInferRequest {
            inputs: vec![input(
                "a",
                "UINT8",
                vec![1],
                Some(InferTensorContents {
                    uint_contents: vec![256],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        assert!(
            request_from_grpc(narrow)
                .unwrap_err()
                .0
                .contains("not a valid UINT8")
        );
    }

    #[test]
    fn responses_round_trip_through_raw() {
        let response = InferResponse {
            model_name: "m".into(),
            model_version: "2".into(),
            id: None,
            parameters: json!({"k": "v", "n": 3, "f": 0.5, "b": true})
                .as_object()
                .unwrap()
                .clone(),
            outputs: vec![OutputTensor {
                name: "s".into(),
                shape: vec![2],
                data: TensorData::Bytes(vec![b"a".to_vec(), b"".to_vec()]),
                parameters: Parameters::new(),
            }],
        };
        let back = response_from_grpc(response_to_grpc(response.clone())).unwrap();
        assert_eq!(back, response);
    }
}
