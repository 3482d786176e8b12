//! The part of ONNX's protobuf schema (onnx/onnx.proto, IR version 9) that the converters
//! write, as prost messages (field numbers as in onnx.proto), and a small graph builder.

use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    #[prost(string, tag = "7")]
    pub domain: String,
}

/// `AttributeProto.AttributeType`.
pub mod attribute_type {
    pub const FLOAT: i32 = 1;
    pub const INT: i32 = 2;
    pub const TENSOR: i32 = 4;
    pub const INTS: i32 = 7;
}

#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

/// `TensorProto.DataType`.
pub mod data_type {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const DOUBLE: i32 = 11;
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    #[prost(double, repeated, tag = "10")]
    pub double_data: Vec<f64>,
    /// `EXTERNAL` (1): the data is in another file, which meshserve does not read.
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

/// An attribute of a node.
pub fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        i: value,
        r#type: attribute_type::INT,
        ..Default::default()
    }
}

pub fn ints(name: &str, values: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        ints: values,
        r#type: attribute_type::INTS,
        ..Default::default()
    }
}

pub fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        f: value,
        r#type: attribute_type::FLOAT,
        ..Default::default()
    }
}

pub fn tensor_attribute(name: &str, tensor: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        t: Some(tensor),
        r#type: attribute_type::TENSOR,
        ..Default::default()
    }
}

/// A one-dimensional tensor of `values` in `data_type` (FLOAT or DOUBLE).
pub fn real_tensor(name: &str, data_type: i32, values: &[f64]) -> TensorProto {
    let mut tensor = TensorProto {
        name: name.to_owned(),
        dims: vec![values.len() as i64],
        data_type,
        ..Default::default()
    };
    if data_type == data_type::DOUBLE {
        tensor.double_data = values.to_vec();
    } else {
        tensor.float_data = values.iter().map(|&v| v as f32).collect();
    }
    tensor
}

pub fn int64_tensor(name: &str, values: Vec<i64>) -> TensorProto {
    TensorProto {
        name: name.to_owned(),
        dims: vec![values.len() as i64],
        data_type: data_type::INT64,
        int64_data: values,
        ..Default::default()
    }
}

/// UINT8 data is carried in `int32_data` (onnx.proto says so for every type narrower than 32 bits).
pub fn uint8_tensor(name: &str, values: &[u8]) -> TensorProto {
    TensorProto {
        name: name.to_owned(),
        dims: vec![values.len() as i64],
        data_type: data_type::UINT8,
        int32_data: values.iter().map(|&v| i32::from(v)).collect(),
        ..Default::default()
    }
}

/// A tensor value of `elem_type` whose dimensions are `dims` (`None`: a named free dimension).
pub fn value_info(name: &str, elem_type: i32, dims: &[Option<i64>]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| match d {
                            Some(v) => Dimension {
                                dim_value: Some(*v),
                                dim_param: None,
                            },
                            None => Dimension {
                                dim_value: None,
                                dim_param: Some("batch".to_owned()),
                            },
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

/// A graph under construction: nodes in order, each output named after its node.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

impl Graph {
    /// Appends a node of the default domain (or `domain`) and returns its output's name.
    pub fn node(
        &mut self,
        domain: &str,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> String {
        let name = format!("{}_{}", op_type.to_ascii_lowercase(), self.nodes.len());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![name.clone()],
            name: name.clone(),
            op_type: op_type.to_owned(),
            attribute: attributes,
            domain: domain.to_owned(),
        });
        name
    }

    /// Adds a constant and returns its name.
    pub fn constant(&mut self, mut tensor: TensorProto) -> String {
        tensor.name = format!("const_{}", self.initializers.len());
        let name = tensor.name.clone();
        self.initializers.push(tensor);
        name
    }

    /// Names the value `result` (a node's output) as the graph's `output` and finishes the
    /// model.
    pub fn finish(
        mut self,
        result: &str,
        input: ValueInfoProto,
        output: ValueInfoProto,
        producer: &str,
        doc: String,
    ) -> ModelProto {
        for node in &mut self.nodes {
            for name in node.output.iter_mut().chain(node.input.iter_mut()) {
                if name == result {
                    *name = output.name.clone();
                }
            }
        }
        ModelProto {
            ir_version: 9,
            producer_name: "meshserve".to_owned(),
            producer_version: env!("CARGO_PKG_VERSION").to_owned(),
            doc_string: format!("converted from {producer} by meshserve: {doc}"),
            graph: Some(GraphProto {
                node: self.nodes,
                name: "meshserve_converted".to_owned(),
                initializer: self.initializers,
                input: vec![input],
                output: vec![output],
            }),
            opset_import: vec![
                OperatorSetIdProto {
                    domain: String::new(),
                    version: 21,
                },
                OperatorSetIdProto {
                    domain: "ai.onnx.ml".to_owned(),
                    version: 5,
                },
            ],
        }
    }
}

/// The model's bytes.
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}
