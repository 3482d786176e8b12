//! KServe's V1 protocol (TensorFlow Serving's): `{"instances": [...]}` or `{"inputs": ...}` in,
//! `{"predictions": [...]}` out. V1 carries no datatypes or shapes, so the request is read
//! against the model's declared inputs: shapes come from the nesting, datatypes from the model.

use base64::Engine;
use serde_json::{Map, Value};

use crate::datatype::DataType;
use crate::infer::{
    InferRequest, InferResponse, InputTensor, InvalidRequest, OutputTensor, Parameters, TensorSpec,
    quoted_names,
};
use crate::tensor::TensorData;

/// Reads a V1 predict body against the model's inputs.
///
/// - `instances`: a list of rows. With one model input, each row is that input's value; rows
///   that are objects name the inputs (`[{"a": .., "b": ..}, ...]`).
/// - `inputs`: columnar. A list for a model with one input, or an object of input name to
///   list (the batch along the first dimension).
///
/// Binary values for BYTES inputs may be written `{"b64": "<base64>"}`.
pub fn request_from_v1(
    body: &[u8],
    model_inputs: &[TensorSpec],
) -> Result<InferRequest, InvalidRequest> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| InvalidRequest(format!("malformed V1 predict JSON: {e}")))?;
    let Value::Object(mut body) = body else {
        return Err(InvalidRequest::new(
            "a V1 predict request must be a JSON object with 'instances' or 'inputs'",
        ));
    };
    let columns: Vec<(String, Value)> = match (body.remove("instances"), body.remove("inputs")) {
        (Some(_), Some(_)) => {
            return Err(InvalidRequest::new(
                "give 'instances' or 'inputs', not both",
            ));
        }
        (None, None) => {
            return Err(InvalidRequest::new(
                "a V1 predict request needs 'instances' or 'inputs'",
            ));
        }
        (Some(Value::Array(rows)), None) => instances_to_columns(rows, model_inputs)?,
        (Some(_), None) => return Err(InvalidRequest::new("'instances' must be a list")),
        (None, Some(Value::Object(named))) => named.into_iter().collect(),
        (None, Some(tensor)) => vec![(single_input(model_inputs)?.name.clone(), tensor)],
    };
    let inputs = columns
        .into_iter()
        .map(|(name, value)| {
            let spec = model_inputs
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| {
                    InvalidRequest(format!(
                        "unknown input '{name}'; the model's inputs are {}",
                        quoted_names(model_inputs)
                    ))
                })?;
            column_to_tensor(spec, value)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(InferRequest {
        id: None,
        parameters: Parameters::new(),
        inputs,
        outputs: Vec::new(),
    })
}

/// The V1 answer: `{"predictions": [...]}`, one entry per row of the batch. The entry is the
/// row of `select` if given, else of the only output, else an object of every output's row.
pub fn predictions(response: &InferResponse, select: Option<&str>) -> Value {
    let chosen: Vec<&OutputTensor> = match select {
        Some(name) => response.outputs.iter().filter(|o| o.name == name).collect(),
        None => response.outputs.iter().collect(),
    };
    let rows = match chosen.as_slice() {
        [only] => split_rows(only),
        many => {
            let per_output: Vec<(&str, Vec<Value>)> = many
                .iter()
                .map(|o| (o.name.as_str(), split_rows(o)))
                .collect();
            let count = per_output
                .iter()
                .map(|(_, rows)| rows.len())
                .max()
                .unwrap_or(0);
            (0..count)
                .map(|i| {
                    let row: Map<String, Value> = per_output
                        .iter()
                        .map(|(name, rows)| {
                            (
                                (*name).to_owned(),
                                rows.get(i).cloned().unwrap_or(Value::Null),
                            )
                        })
                        .collect();
                    Value::Object(row)
                })
                .collect()
        }
    };
    let mut out = Map::new();
    out.insert("predictions".into(), Value::Array(rows));
    Value::Object(out)
}

fn single_input(model_inputs: &[TensorSpec]) -> Result<&TensorSpec, InvalidRequest> {
    match model_inputs {
        [only] => Ok(only),
        _ => Err(InvalidRequest(format!(
            "the model has {} inputs ({}): name them, with objects in 'instances' or an object in 'inputs'",
            model_inputs.len(),
            quoted_names(model_inputs)
        ))),
    }
}

fn is_b64(value: &Value) -> bool {
    matches!(value, Value::Object(m) if m.len() == 1 && m.contains_key("b64"))
}

/// Turns rows into one column per input.
fn instances_to_columns(
    rows: Vec<Value>,
    model_inputs: &[TensorSpec],
) -> Result<Vec<(String, Value)>, InvalidRequest> {
    let named = rows.first().is_some_and(|r| r.is_object() && !is_b64(r));
    if !named {
        return Ok(vec![(
            single_input(model_inputs)?.name.clone(),
            Value::Array(rows),
        )]);
    }
    let mut columns: Vec<(String, Vec<Value>)> = Vec::new();
    for (index, row) in rows.into_iter().enumerate() {
        let Value::Object(fields) = row else {
            return Err(InvalidRequest(format!(
                "instance {index} is not an object like the first instance"
            )));
        };
        if index > 0 && fields.len() != columns.len() {
            return Err(InvalidRequest(format!(
                "instance {index} names different inputs than the first instance"
            )));
        }
        for (name, value) in fields {
            match columns.iter_mut().find(|(n, _)| *n == name) {
                Some((_, column)) => column.push(value),
                None if index == 0 => columns.push((name, vec![value])),
                None => {
                    return Err(InvalidRequest(format!(
                        "instance {index} has input '{name}' that the first instance lacks"
                    )));
                }
            }
        }
    }
    Ok(columns
        .into_iter()
        .map(|(n, c)| (n, Value::Array(c)))
        .collect())
}

fn column_to_tensor(spec: &TensorSpec, value: Value) -> Result<InputTensor, InvalidRequest> {
    let fail = |message: String| InvalidRequest(format!("input '{}': {message}", spec.name));
    let shape = nested_shape(&value).map_err(fail)?;
    let data = if spec.datatype == DataType::Bytes {
        let mut elements = Vec::new();
        collect_bytes(&value, &mut elements).map_err(fail)?;
        TensorData::Bytes(elements)
    } else {
        TensorData::from_json(spec.datatype, &shape, &value).map_err(|e| fail(e.to_string()))?
    };
    Ok(InputTensor {
        name: spec.name.clone(),
        shape,
        data,
        parameters: Parameters::new(),
    })
}

/// The shape of a nested list, refusing ragged ones.
fn nested_shape(value: &Value) -> Result<Vec<i64>, String> {
    let mut shape = Vec::new();
    let mut probe = value;
    while let Value::Array(items) = probe {
        shape.push(i64::try_from(items.len()).map_err(|_| "too many elements".to_owned())?);
        match items.first() {
            Some(first) => probe = first,
            None => break,
        }
    }
    check_rectangular(value, &shape)?;
    Ok(shape)
}

fn check_rectangular(value: &Value, shape: &[i64]) -> Result<(), String> {
    match (value, shape.split_first()) {
        (Value::Array(items), Some((&len, rest))) => {
            if i64::try_from(items.len()).ok() != Some(len) {
                return Err(format!(
                    "ragged list: a list of {} where {len} was expected",
                    items.len()
                ));
            }
            items
                .iter()
                .try_for_each(|item| check_rectangular(item, rest))
        }
        (Value::Array(_), None) => {
            Err("ragged list: a list where a single value was expected".to_owned())
        }
        (_, Some(_)) => Err("ragged list: a single value where a list was expected".to_owned()),
        (_, None) => Ok(()),
    }
}

fn collect_bytes(value: &Value, out: &mut Vec<Vec<u8>>) -> Result<(), String> {
    match value {
        Value::Array(items) => items.iter().try_for_each(|item| collect_bytes(item, out)),
        Value::String(s) => {
            out.push(s.as_bytes().to_vec());
            Ok(())
        }
        Value::Object(m) if is_b64(value) => {
            let encoded = m
                .get("b64")
                .and_then(Value::as_str)
                .ok_or("'b64' must hold a string")?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| format!("element {} has invalid base64: {e}", out.len()))?;
            out.push(bytes);
            Ok(())
        }
        other => Err(format!(
            "element {} ({other}) is not a string or {{\"b64\": ...}}",
            out.len()
        )),
    }
}

/// Splits an output along its first dimension into nested JSON rows.
fn split_rows(output: &OutputTensor) -> Vec<Value> {
    let flat = match serde_json::to_value(&output.data) {
        Ok(Value::Array(items)) => items,
        _ => Vec::new(),
    };
    let Some((_, row_shape)) = output.shape.split_first() else {
        return flat;
    };
    let row_len: usize = row_shape
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .product();
    if row_len == 0 {
        return Vec::new();
    }
    flat.chunks(row_len)
        .map(|row| nest(row, row_shape))
        .collect()
}

fn nest(flat: &[Value], shape: &[i64]) -> Value {
    match shape.split_first() {
        None => flat.first().cloned().unwrap_or(Value::Null),
        Some((_, rest)) => {
            let inner: usize = rest
                .iter()
                .map(|&d| usize::try_from(d).unwrap_or(0))
                .product();
            if inner == 0 {
                return Value::Array(Vec::new());
            }
            Value::Array(flat.chunks(inner).map(|chunk| nest(chunk, rest)).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn instances_for_one_input_stack_into_a_batch() {
        let inputs = [spec("x", DataType::Fp32, &[-1, 2])];
        let req = request_from_v1(br#"{"instances": [[1, 2], [3, 4], [5, 6]]}"#, &inputs).unwrap();
        assert_eq!(req.inputs[0].shape, vec![3, 2]);
        assert_eq!(
            req.inputs[0].data,
            TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
    }

    #[test]
    fn named_instances_and_b64() {
        let inputs = [
            spec("n", DataType::Int64, &[-1]),
            spec("s", DataType::Bytes, &[-1]),
        ];
        let req = request_from_v1(
            br#"{"instances": [{"n": 1, "s": {"b64": "aGk="}}, {"n": 2, "s": "yo"}]}"#,
            &inputs,
        )
        .unwrap();
        assert_eq!(req.inputs[0].data, TensorData::Int64(vec![1, 2]));
        assert_eq!(
            req.inputs[1].data,
            TensorData::Bytes(vec![b"hi".to_vec(), b"yo".to_vec()])
        );
    }

    #[test]
    fn columnar_inputs() {
        let inputs = [
            spec("a", DataType::Int32, &[-1]),
            spec("b", DataType::Bool, &[-1]),
        ];
        let req =
            request_from_v1(br#"{"inputs": {"a": [1, 2], "b": [true, false]}}"#, &inputs).unwrap();
        assert_eq!(req.inputs[1].data, TensorData::Bool(vec![true, false]));
    }

    #[test]
    fn refusals_say_why() {
        let one = [spec("x", DataType::Fp32, &[-1, 2])];
        let two = [
            spec("a", DataType::Fp32, &[-1]),
            spec("b", DataType::Fp32, &[-1]),
        ];
        let cases: [(&[u8], &[TensorSpec], &str); 7] = [
            (b"[1]", &one, "JSON object"),
            (b"{}", &one, "needs 'instances' or 'inputs'"),
            (br#"{"instances": [[1, 2], [3]]}"#, &one, "ragged"),
            (br#"{"instances": [1, 2]}"#, &two, "2 inputs"),
            (br#"{"inputs": {"c": [1]}}"#, &two, "unknown input 'c'"),
            (br#"{"instances": [["a", "b"]]}"#, &one, "not a valid FP32"),
            (br#"{"instances": 3}"#, &one, "must be a list"),
        ];
        for (body, inputs, needle) in cases {
            let err = request_from_v1(body, inputs).unwrap_err().0;
            assert!(
                err.contains(needle),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn predictions_split_rows() {
        let out = |name: &str, shape: Vec<i64>, data| OutputTensor {
            name: name.into(),
            shape,
            data,
            parameters: Parameters::new(),
        };
        let response = InferResponse {
            outputs: vec![
                out("label", vec![2], TensorData::Int64(vec![3, 7])),
                out(
                    "p",
                    vec![2, 2],
                    TensorData::Fp32(vec![0.25, 0.75, 1.0, 0.0]),
                ),
            ],
            ..Default::default()
        };
        assert_eq!(
            predictions(&response, Some("label")),
            json!({"predictions": [3, 7]})
        );
        assert_eq!(
            predictions(&response, None),
            json!({"predictions": [{"label": 3, "p": [0.25, 0.75]}, {"label": 7, "p": [1.0, 0.0]}]})
        );
    }
}
