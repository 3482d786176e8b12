//! Requests as KServe's framework servers (sklearnserver, xgbserver, lgbserver) read them: a
//! model takes one matrix of features, rows by columns, and a request gives it
//!
//! - V1: `inputs` (preferred when both are given) or `instances`: a list of rows, or a list
//!   of objects keyed by feature name, as pandas reads them (`{"f": [1, 2]}`: a column of
//!   rows; `{"f": {"0": 1}}`: rows by index; `{"f": 1}`: one row). LightGBM's server reads
//!   objects with the booster's feature names as columns, so there other keys are ignored and
//!   absent features are missing (NaN); scikit-learn's and XGBoost's servers refuse both,
//!   and so does meshserve for those ([`Objects`]);
//! - V2: the first input under any name, in any numeric datatype (read as the model's), or
//!   with `parameters.content_type: "pd"` one input per feature name.
//!
//! The result is one input of the model's datatype, shape `[rows, features]`.

use serde_json::{Map, Value};

use crate::datatype::DataType;
use crate::infer::{InferRequest, InputTensor, InvalidRequest, Parameters, TensorSpec};
use crate::tensor::TensorData;

/// The parameter that asks for one input per feature (KServe: `content_type: pd`).
pub const CONTENT_TYPE: &str = "content_type";

/// The most cells (rows times features) one request's matrix may have: 16 Mi, 128 MiB of
/// `f64`. Objects can name few values and many rows; this bounds what they make.
pub const MAX_CELLS: usize = 16 << 20;

/// How objects keyed by feature name are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objects {
    /// As lgbserver reads them: other keys ignored, absent features missing.
    Lenient,
    /// As sklearnserver and xgbserver read them: every feature, and nothing else.
    Strict,
}

/// The model's matrix: `spec` declares `[batch, features]` in FP32 or FP64.
struct Matrix<'a> {
    spec: &'a TensorSpec,
    features: usize,
    names: &'a [String],
    objects: Objects,
}

impl<'a> Matrix<'a> {
    fn new(
        spec: &'a TensorSpec,
        names: &'a [String],
        objects: Objects,
    ) -> Result<Self, InvalidRequest> {
        let features = match spec.shape.as_slice() {
            [_, f] if *f > 0 => *f as usize,
            _ => {
                return Err(InvalidRequest(format!(
                    "the model's input '{}' is not a matrix of features: {:?}",
                    spec.name, spec.shape
                )));
            }
        };
        Ok(Matrix {
            spec,
            features,
            names,
            objects,
        })
    }

    /// `rows` rows of this matrix, if they fit in [`MAX_CELLS`].
    fn cells(&self, rows: usize) -> Result<usize, InvalidRequest> {
        rows.checked_mul(self.features)
            .filter(|&n| n <= MAX_CELLS)
            .ok_or_else(|| {
                InvalidRequest(format!(
                    "{rows} rows of {} features are over the limit of {MAX_CELLS} values a request",
                    self.features
                ))
            })
    }

    fn tensor(&self, values: Vec<f64>) -> Result<InputTensor, InvalidRequest> {
        let rows = values.len() / self.features;
        let data = match self.spec.datatype {
            DataType::Fp32 => TensorData::Fp32(values.into_iter().map(|v| v as f32).collect()),
            DataType::Fp64 => TensorData::Fp64(values),
            other => {
                return Err(InvalidRequest(format!(
                    "the model's input is {other}, not FP32 or FP64"
                )));
            }
        };
        Ok(InputTensor {
            name: self.spec.name.clone(),
            shape: vec![rows as i64, self.features as i64],
            data,
            parameters: Parameters::new(),
        })
    }

    fn request(
        &self,
        values: Vec<f64>,
        id: Option<String>,
    ) -> Result<InferRequest, InvalidRequest> {
        Ok(InferRequest {
            id,
            parameters: Parameters::new(),
            inputs: vec![self.tensor(values)?],
            outputs: Vec::new(),
        })
    }

    /// Rows of numbers, each `features` long.
    fn rows(&self, rows: &[Value]) -> Result<Vec<f64>, InvalidRequest> {
        let mut values = Vec::with_capacity(self.cells(rows.len())?);
        for (r, row) in rows.iter().enumerate() {
            let Value::Array(row) = row else {
                return Err(InvalidRequest(format!(
                    "row {r} is not a list of {} features",
                    self.features
                )));
            };
            if row.len() != self.features {
                return Err(InvalidRequest(format!(
                    "row {r} has {} features; the model takes {}",
                    row.len(),
                    self.features
                )));
            }
            for (c, v) in row.iter().enumerate() {
                values.push(number(v).ok_or_else(|| {
                    InvalidRequest(format!("row {r} feature {c} is not a number: {v}"))
                })?);
            }
        }
        Ok(values)
    }

    /// Objects keyed by feature name, each one or more rows.
    fn frames(&self, frames: &[Value]) -> Result<Vec<f64>, InvalidRequest> {
        self.named()?;
        let mut values = Vec::new();
        for (i, frame) in frames.iter().enumerate() {
            let frame = match frame {
                Value::Object(map) => map,
                // KServe reads `[[{..}]]` too: a list whose first element is an object.
                Value::Array(items) => {
                    for (j, item) in items.iter().enumerate() {
                        let Value::Object(map) = item else {
                            return Err(InvalidRequest(format!(
                                "instance {i} item {j} is not an object of features: {item}"
                            )));
                        };
                        values.extend(self.frame(map, i)?);
                        self.cells(values.len() / self.features)?;
                    }
                    continue;
                }
                other => {
                    return Err(InvalidRequest(format!(
                        "instance {i} is not an object of features like the first: {other}"
                    )));
                }
            };
            values.extend(self.frame(frame, i)?);
            self.cells(values.len() / self.features)?;
        }
        Ok(values)
    }

    /// Checks that the model names its features, one name per column.
    fn named(&self) -> Result<(), InvalidRequest> {
        if self.names.is_empty() {
            return Err(InvalidRequest::new(
                "the model file names no features, so give rows as lists of numbers, not objects or named inputs",
            ));
        }
        if self.names.len() != self.features {
            return Err(InvalidRequest(format!(
                "the model names {} features but takes {}",
                self.names.len(),
                self.features
            )));
        }
        Ok(())
    }

    /// One object: its rows, in the model's feature order.
    fn frame(&self, frame: &Map<String, Value>, i: usize) -> Result<Vec<f64>, InvalidRequest> {
        let fail = |m: String| InvalidRequest(format!("instance {i}: {m}"));
        let known = frame.keys().filter(|k| self.names.contains(k)).count();
        if known == 0 {
            return Err(fail(format!(
                "names none of the model's features ({})",
                self.names.join(", ")
            )));
        }
        if self.objects == Objects::Strict {
            if let Some(other) = frame.keys().find(|k| !self.names.contains(k)) {
                return Err(fail(format!(
                    "'{other}' is not one of the model's features ({})",
                    self.names.join(", ")
                )));
            }
            if let Some(absent) = self.names.iter().find(|n| !frame.contains_key(*n)) {
                return Err(fail(format!("feature '{absent}' is missing")));
            }
        }
        // The rows' index: positions for lists, the keys (in first-seen order) for objects.
        let mut index: Vec<String> = Vec::new();
        let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let mut list_rows: Option<usize> = None;
        for (name, column) in frame.iter().filter(|(n, _)| self.names.contains(n)) {
            match column {
                Value::Array(items) => match list_rows {
                    Some(n) if n != items.len() => {
                        return Err(fail(format!(
                            "feature '{name}' has {} rows, another {n}",
                            items.len()
                        )));
                    }
                    _ => list_rows = Some(items.len()),
                },
                Value::Object(by_index) => {
                    for key in by_index.keys() {
                        if seen.insert(key) {
                            index.push(key.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        let rows = match (list_rows, index.len()) {
            (Some(n), 0) => n,
            (None, 0) => 1,
            (None, n) => n,
            (Some(_), _) => {
                return Err(fail(
                    "features given both as lists and as objects by index".to_owned(),
                ));
            }
        };
        let mut values = vec![f64::NAN; self.cells(rows)?];
        for (c, name) in self.names.iter().enumerate() {
            let Some(column) = frame.get(name) else {
                continue;
            };
            for r in 0..rows {
                let cell = match column {
                    Value::Array(items) => items.get(r),
                    Value::Object(by_index) => by_index.get(&index[r]),
                    scalar => Some(scalar),
                };
                let Some(cell) = cell else { continue };
                if cell.is_null() {
                    continue;
                }
                values[r * self.features + c] = number(cell)
                    .ok_or_else(|| fail(format!("feature '{name}' is not a number: {cell}")))?;
            }
        }
        Ok(values)
    }
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::Null => Some(f64::NAN),
        _ => None,
    }
}

/// Reads a V1 predict body for a model of one feature matrix.
pub fn request_from_v1(
    body: &[u8],
    spec: &TensorSpec,
    names: &[String],
    objects: Objects,
) -> Result<InferRequest, InvalidRequest> {
    let matrix = Matrix::new(spec, names, objects)?;
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| InvalidRequest(format!("malformed V1 predict JSON: {e}")))?;
    let Value::Object(mut body) = body else {
        return Err(InvalidRequest::new(
            "a V1 predict request must be a JSON object with 'instances' or 'inputs'",
        ));
    };
    let (key, given) = match body.remove("inputs") {
        Some(inputs) => ("inputs", Some(inputs)),
        None => ("instances", body.remove("instances")),
    };
    let rows = match given {
        Some(Value::Array(rows)) => rows,
        Some(_) => return Err(InvalidRequest(format!("'{key}' must be a list"))),
        None => {
            return Err(InvalidRequest::new(
                "a V1 predict request needs 'instances' or 'inputs'",
            ));
        }
    };
    let framed = match rows.first() {
        Some(Value::Object(_)) => true,
        Some(Value::Array(first)) => first.first().is_some_and(Value::is_object),
        _ => false,
    };
    let values = if framed {
        matrix.frames(&rows)?
    } else {
        matrix.rows(&rows)?
    };
    if values.is_empty() {
        return Err(InvalidRequest::new("no rows to predict"));
    }
    matrix.request(values, None)
}

/// Reads a V2 request for a model of one feature matrix (see the module's documentation).
pub fn request_from_v2(
    request: InferRequest,
    spec: &TensorSpec,
    names: &[String],
    objects: Objects,
) -> Result<InferRequest, InvalidRequest> {
    let matrix = Matrix::new(spec, names, objects)?;
    let framed = request.parameters.get(CONTENT_TYPE).and_then(Value::as_str) == Some("pd");
    let InferRequest {
        id,
        parameters,
        inputs,
        outputs,
    } = request;
    let values = if framed {
        matrix.named()?;
        let mut frame = Map::new();
        for input in &inputs {
            let column = reals(&input.data)
                .ok_or_else(|| InvalidRequest(format!("input '{}' is not numeric", input.name)))?;
            if input.shape.len() > 2 || input.shape.get(1).is_some_and(|&d| d != 1) {
                return Err(InvalidRequest(format!(
                    "input '{}' of shape {:?} is not one column",
                    input.name, input.shape
                )));
            }
            frame.insert(
                input.name.clone(),
                Value::Array(column.into_iter().map(|v| serde_json::json!(v)).collect()),
            );
        }
        matrix.frame(&frame, 0)?
    } else {
        let input = match inputs.as_slice() {
            [one] => one,
            [] => return Err(InvalidRequest::new("the request has no inputs")),
            several => {
                return Err(InvalidRequest(format!(
                    "the model takes one input, a matrix of {} features; the request has {} (name each feature with parameters.content_type \"pd\")",
                    matrix.features,
                    several.len()
                )));
            }
        };
        let fits = match input.shape.as_slice() {
            [_, f] => *f == matrix.features as i64,
            [f] => *f == matrix.features as i64,
            _ => false,
        };
        if !fits {
            return Err(InvalidRequest(format!(
                "input '{}' has shape {:?}; the model takes [rows, {}]",
                input.name, input.shape, matrix.features
            )));
        }
        if input.data.datatype() == spec.datatype && input.shape.len() == 2 {
            // Already the model's matrix: only the name changes.
            let mut inputs = inputs;
            inputs[0].name = spec.name.clone();
            return Ok(InferRequest {
                id,
                parameters,
                inputs,
                outputs,
            });
        }
        reals(&input.data)
            .ok_or_else(|| InvalidRequest(format!("input '{}' is not numeric", input.name)))?
    };
    let mut out = matrix.request(values, id)?;
    out.parameters = parameters;
    out.parameters.remove(CONTENT_TYPE);
    out.outputs = outputs;
    Ok(out)
}

/// Numeric data as reals (booleans as 0 and 1); `None` for BYTES.
pub fn reals(data: &TensorData) -> Option<Vec<f64>> {
    fn all<T: Copy>(v: &[T], f: impl Fn(T) -> f64) -> Option<Vec<f64>> {
        Some(v.iter().map(|&x| f(x)).collect())
    }
    match data {
        TensorData::Bool(v) => all(v, |x| f64::from(u8::from(x))),
        TensorData::Uint8(v) => all(v, f64::from),
        TensorData::Uint16(v) => all(v, f64::from),
        TensorData::Uint32(v) => all(v, f64::from),
        TensorData::Uint64(v) => all(v, |x| x as f64),
        TensorData::Int8(v) => all(v, f64::from),
        TensorData::Int16(v) => all(v, f64::from),
        TensorData::Int32(v) => all(v, f64::from),
        TensorData::Int64(v) => all(v, |x| x as f64),
        TensorData::Fp16(v) => all(v, f64::from),
        TensorData::Fp32(v) => all(v, f64::from),
        TensorData::Fp64(v) => Some(v.clone()),
        TensorData::Bytes(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(datatype: DataType) -> TensorSpec {
        TensorSpec {
            name: "input-0".into(),
            datatype,
            shape: vec![-1, 3],
        }
    }

    fn names() -> Vec<String> {
        ["a", "b", "c"].map(String::from).to_vec()
    }

    fn data(request: &InferRequest) -> (Vec<i64>, Vec<f64>) {
        let input = &request.inputs[0];
        (input.shape.clone(), reals(&input.data).unwrap())
    }

    #[test]
    fn v1_rows_and_pandas_shaped_objects() {
        let s = spec(DataType::Fp64);
        let r = request_from_v1(
            br#"{"instances": [[1, 2, 3], [4, 5, 6]]}"#,
            &s,
            &names(),
            Objects::Lenient,
        )
        .unwrap();
        assert_eq!(data(&r), (vec![2, 3], vec![1., 2., 3., 4., 5., 6.]));
        // `inputs` wins over `instances`, as in KServe.
        let r = request_from_v1(
            br#"{"instances": [[0, 0, 0]], "inputs": [[1, 1, 1]]}"#,
            &s,
            &names(),
            Objects::Lenient,
        )
        .unwrap();
        assert_eq!(data(&r).1, vec![1., 1., 1.]);
        // Columns of rows, by any order of keys; unknown keys ignored, absent ones missing.
        let r = request_from_v1(
            br#"{"inputs": [{"c": [3, 30], "a": [1, 10], "zz": [9, 9]}]}"#,
            &s,
            &names(),
            Objects::Lenient,
        )
        .unwrap();
        let (shape, v) = data(&r);
        assert_eq!(shape, vec![2, 3]);
        assert_eq!((v[0], v[2], v[3], v[5]), (1., 3., 10., 30.));
        assert!(v[1].is_nan() && v[4].is_nan());
        // Rows by index (pandas' dict of dicts), and scalars for one row.
        let r = request_from_v1(
            br#"{"inputs": [{"b": {"0": 2}, "a": {"0": 1}, "c": {"0": 3}}]}"#,
            &s,
            &names(),
            Objects::Lenient,
        )
        .unwrap();
        assert_eq!(data(&r).1, vec![1., 2., 3.]);
        let r = request_from_v1(
            br#"{"instances": [{"a": 1, "b": 2, "c": 3}, {"a": 4, "b": 5, "c": 6}]}"#,
            &s,
            &names(),
            Objects::Lenient,
        )
        .unwrap();
        assert_eq!(data(&r), (vec![2, 3], vec![1., 2., 3., 4., 5., 6.]));
    }

    #[test]
    fn v1_refusals_say_why() {
        let s = spec(DataType::Fp32);
        for (body, says) in [
            (&br#"{"instances": [[1, 2]]}"#[..], "has 2 features"),
            (br#"{"instances": [[1, "x", 3]]}"#, "not a number"),
            (br#"{"instances": []}"#, "no rows"),
            (br#"{"rows": []}"#, "needs 'instances'"),
            (br#"{"inputs": [{"a": [1, 2], "b": [1]}]}"#, "rows"),
        ] {
            let e = request_from_v1(body, &s, &names(), Objects::Lenient).unwrap_err();
            assert!(e.0.contains(says), "{e:?} lacks {says}");
        }
        let e =
            request_from_v1(br#"{"inputs": [{"a": 1}]}"#, &s, &[], Objects::Lenient).unwrap_err();
        assert!(e.0.contains("names no features"), "{e:?}");
    }

    #[test]
    fn strict_objects_need_every_feature_and_nothing_else_and_sizes_are_bounded() {
        let s = spec(DataType::Fp64);
        let strict = |body: &[u8]| request_from_v1(body, &s, &names(), Objects::Strict);
        assert!(strict(br#"{"instances": [{"a": 1, "b": 2, "c": 3}]}"#).is_ok());
        let absent = strict(br#"{"instances": [{"a": 1, "b": 2}]}"#).unwrap_err();
        assert!(absent.0.contains("'c' is missing"), "{absent:?}");
        let other = strict(br#"{"instances": [{"a": 1, "b": 2, "c": 3, "d": 4}]}"#).unwrap_err();
        assert!(other.0.contains("'d' is not one of"), "{other:?}");
        let none = request_from_v1(
            br#"{"inputs": [{"x": [1]}]}"#,
            &s,
            &names(),
            Objects::Lenient,
        )
        .unwrap_err();
        assert!(none.0.contains("names none"), "{none:?}");
        // A column of many rows with other features absent: bounded before it is filled.
        let wide = TensorSpec {
            name: "input-0".into(),
            datatype: DataType::Fp64,
            shape: vec![-1, 1 << 20],
        };
        let many: Vec<String> = (0..1 << 20).map(|i| format!("f{i}")).collect();
        let body = format!(
            r#"{{"inputs": [{{"f0": [{}]}}]}}"#,
            vec!["0"; 100].join(",")
        );
        let big = request_from_v1(body.as_bytes(), &wide, &many, Objects::Lenient).unwrap_err();
        assert!(big.0.contains("over the limit"), "{big:?}");
    }

    #[test]
    fn v2_any_name_any_numeric_type_and_pandas_columns() {
        let s = spec(DataType::Fp32);
        let input = |name: &str, shape: Vec<i64>, data: TensorData| InputTensor {
            name: name.into(),
            shape,
            data,
            parameters: Parameters::new(),
        };
        let request = InferRequest {
            id: Some("7".into()),
            parameters: Parameters::new(),
            inputs: vec![input(
                "whatever",
                vec![1, 3],
                TensorData::Int64(vec![1, 2, 3]),
            )],
            outputs: Vec::new(),
        };
        let r = request_from_v2(request.clone(), &s, &names(), Objects::Lenient).unwrap();
        assert_eq!(r.inputs[0].name, "input-0");
        assert_eq!(r.inputs[0].data, TensorData::Fp32(vec![1., 2., 3.]));
        assert_eq!(r.id.as_deref(), Some("7"));
        let mut framed = request.clone();
        framed.parameters.insert(CONTENT_TYPE.into(), "pd".into());
        framed.inputs = vec![
            input("c", vec![2], TensorData::Fp64(vec![3., 30.])),
            input("a", vec![2, 1], TensorData::Fp64(vec![1., 10.])),
            input("b", vec![2], TensorData::Fp64(vec![2., 20.])),
        ];
        let r = request_from_v2(framed, &s, &names(), Objects::Lenient).unwrap();
        assert_eq!(
            r.inputs[0].data,
            TensorData::Fp32(vec![1., 2., 3., 10., 20., 30.])
        );
        assert!(!r.parameters.contains_key(CONTENT_TYPE));
        let mut two = request.clone();
        two.inputs.push(two.inputs[0].clone());
        assert!(
            request_from_v2(two, &s, &names(), Objects::Lenient)
                .unwrap_err()
                .0
                .contains("content_type")
        );
        let mut wrong = request;
        wrong.inputs[0].shape = vec![1, 4];
        assert!(
            request_from_v2(wrong, &s, &names(), Objects::Lenient)
                .unwrap_err()
                .0
                .contains("[rows, 3]")
        );
    }
}
