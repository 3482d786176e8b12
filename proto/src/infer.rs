//! Inference requests and responses independent of the wire: REST (JSON and binary), gRPC and
//! KServe V1 all convert to and from these types, so the predictor sees one shape.

use serde_json::{Map, Value};

use crate::datatype::DataType;
use crate::tensor::TensorData;

/// Request, input and output parameters (`parameters` in the protocol): names to JSON scalars.
/// Over gRPC they are `InferParameter`s; see [`crate::grpc`] for the mapping.
pub type Parameters = Map<String, Value>;

/// Request parameter: every output in binary form unless an output says otherwise.
pub const BINARY_DATA_OUTPUT: &str = "binary_data_output";
/// Output parameter: this output in binary (`true`) or JSON (`false`) form.
pub const BINARY_DATA: &str = "binary_data";
/// Input and output parameter: the size in bytes of the tensor's binary data.
pub const BINARY_DATA_SIZE: &str = "binary_data_size";
/// Output parameter of the classification extension: return the top N classes.
pub const CLASSIFICATION: &str = "classification";

/// Parameters that steer the protocol itself and are not echoed back to the client.
pub const PROTOCOL_PARAMETERS: [&str; 4] = [
    BINARY_DATA_OUTPUT,
    BINARY_DATA,
    BINARY_DATA_SIZE,
    CLASSIFICATION,
];

/// A client's request is malformed; the message says how, for the client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

impl InvalidRequest {
    pub fn new(message: impl Into<String>) -> Self {
        InvalidRequest(message.into())
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct InferRequest {
    pub id: Option<String>,
    pub parameters: Parameters,
    pub inputs: Vec<InputTensor>,
    /// Empty: every output of the model, in the model's order.
    pub outputs: Vec<RequestedOutput>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: TensorData,
    pub parameters: Parameters,
}

impl InputTensor {
    pub fn datatype(&self) -> DataType {
        self.data.datatype()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestedOutput {
    pub name: String,
    pub parameters: Parameters,
}

impl RequestedOutput {
    pub fn new(name: impl Into<String>) -> Self {
        RequestedOutput {
            name: name.into(),
            parameters: Parameters::new(),
        }
    }

    /// The classification extension's class count, if this output asks for it.
    pub fn classification(&self) -> Result<Option<usize>, InvalidRequest> {
        match self.parameters.get(CLASSIFICATION) {
            None => Ok(None),
            Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => Err(InvalidRequest(format!(
                    "output '{}': parameter 'classification' must be a positive integer, got {v}",
                    self.name
                ))),
            },
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: Option<String>,
    pub parameters: Parameters,
    pub outputs: Vec<OutputTensor>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: TensorData,
    pub parameters: Parameters,
}

impl OutputTensor {
    pub fn datatype(&self) -> DataType {
        self.data.datatype()
    }
}

/// A tensor as a model declares it: name, datatype and shape with -1 for variable dimensions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// The names of some tensors, quoted, for messages: `'a', 'b'`.
pub fn quoted_names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("'{}'", s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

impl serde::Serialize for DataType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// The request parameters worth echoing in the response: everything but the protocol's own.
pub fn echoed_parameters(parameters: &Parameters) -> Parameters {
    parameters
        .iter()
        .filter(|(k, _)| !PROTOCOL_PARAMETERS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
