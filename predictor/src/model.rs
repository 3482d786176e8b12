//! One loaded model version: its ONNX Runtime session, the metadata clients see, and
//! inference: validate the request against the metadata, run, return the requested outputs.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Mutex;

use meshserve_proto::infer::{echoed_parameters, quoted_names};
use meshserve_proto::{
    DataType, InferRequest, InferResponse, InputTensor, OutputTensor, Parameters, RequestedOutput,
    TensorData, TensorSpec,
};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use crate::config::{ModelConfig, TensorOverride};
use crate::error::{PredictorError, Result};
use crate::runtime::Runtime;

/// The platform name reported in model metadata (Triton's name for ONNX Runtime models).
pub const PLATFORM: &str = "onnxruntime_onnx";

#[derive(Debug)]
pub struct ModelVersion {
    name: String,
    version: u64,
    version_string: String,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    config: ModelConfig,
    session: Mutex<Session>,
}

impl ModelVersion {
    /// Loads `<dir>/model.onnx` and works out its metadata, applying the config's overrides.
    pub fn load(
        runtime: &Runtime,
        name: &str,
        version: u64,
        file: &Path,
        config: &ModelConfig,
    ) -> Result<ModelVersion> {
        let fail =
            |reason: String| PredictorError::load(name, format!("version {version}: {reason}"));
        let session = runtime
            .session_builder()
            .map_err(|e| fail(e.to_string()))?
            .commit_from_file(file)
            .map_err(|e| fail(format!("{}: {e}", file.display())))?;
        let inputs = session
            .inputs()
            .iter()
            .map(|o| tensor_spec("input", o.name(), o.dtype()))
            .collect::<Result<Vec<_>, String>>()
            .map_err(&fail)?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| tensor_spec("output", o.name(), o.dtype()))
            .collect::<Result<Vec<_>, String>>()
            .map_err(&fail)?;
        let inputs = apply_overrides("input", inputs, &config.inputs).map_err(&fail)?;
        let outputs = apply_overrides("output", outputs, &config.outputs).map_err(&fail)?;
        if let Some(v1) = &config.v1_output
            && !outputs.iter().any(|o| &o.name == v1)
        {
            return Err(fail(format!(
                "v1_output '{v1}' is not an output of the model"
            )));
        }
        Ok(ModelVersion {
            name: name.to_owned(),
            version,
            version_string: version.to_string(),
            inputs,
            outputs,
            config: config.clone(),
            session: Mutex::new(session),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs one request: checks it against the metadata, runs the session, and answers with
    /// the requested outputs (all of them, in the model's order, when none are named).
    pub fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        let requested = self.requested_outputs(&request.outputs)?;
        let ordered = self.validate_inputs(request.inputs)?;
        let values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = ordered
            .into_iter()
            .map(|input| {
                let value = to_ort(input.shape, input.data)
                    .map_err(|e| PredictorError::invalid(format!("input '{}': {e}", input.name)))?;
                Ok((Cow::Owned(input.name), SessionInputValue::from(value)))
            })
            .collect::<Result<_>>()?;

        let mut session = self
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let results = session
            .run(values)
            .map_err(|e| PredictorError::Runtime(e.to_string()))?;
        let mut outputs = Vec::with_capacity(requested.len());
        for (spec, classification) in requested {
            let value = results.get(&spec.name).ok_or_else(|| {
                PredictorError::Runtime(format!("the model did not produce output '{}'", spec.name))
            })?;
            let (shape, data) = from_ort(value)
                .map_err(|e| PredictorError::Runtime(format!("output '{}': {e}", spec.name)))?;
            let output = OutputTensor {
                name: spec.name.clone(),
                shape,
                data,
                parameters: Parameters::new(),
            };
            outputs.push(match classification {
                Some(k) => crate::classification::classify(output, k, &self.config.labels)?,
                None => output,
            });
        }
        drop(results);
        drop(session);
        Ok(InferResponse {
            model_name: self.name.clone(),
            model_version: self.version_string.clone(),
            id: request.id,
            parameters: echoed_parameters(&request.parameters),
            outputs,
        })
    }

    /// The outputs to return, each with its classification count if asked.
    fn requested_outputs(
        &self,
        requested: &[RequestedOutput],
    ) -> Result<Vec<(&TensorSpec, Option<usize>)>> {
        if requested.is_empty() {
            return Ok(self.outputs.iter().map(|o| (o, None)).collect());
        }
        requested
            .iter()
            .map(|r| {
                let spec = self
                    .outputs
                    .iter()
                    .find(|o| o.name == r.name)
                    .ok_or_else(|| {
                        PredictorError::invalid(format!(
                            "unknown output '{}'; model '{}' has outputs {}",
                            r.name,
                            self.name,
                            quoted_names(&self.outputs)
                        ))
                    })?;
                Ok((spec, r.classification()?))
            })
            .collect()
    }

    /// Checks names, datatypes, shapes and the batch limit; returns the inputs in the model's
    /// order.
    fn validate_inputs(&self, mut given: Vec<InputTensor>) -> Result<Vec<InputTensor>> {
        for (i, input) in given.iter().enumerate() {
            if given[..i].iter().any(|earlier| earlier.name == input.name) {
                return Err(PredictorError::invalid(format!(
                    "input '{}' is given more than once",
                    input.name
                )));
            }
            if !self.inputs.iter().any(|s| s.name == input.name) {
                return Err(PredictorError::invalid(format!(
                    "unknown input '{}'; model '{}' has inputs {}",
                    input.name,
                    self.name,
                    quoted_names(&self.inputs)
                )));
            }
        }
        let mut ordered = Vec::with_capacity(self.inputs.len());
        for spec in &self.inputs {
            let position = given
                .iter()
                .position(|i| i.name == spec.name)
                .ok_or_else(|| {
                    PredictorError::invalid(format!(
                        "missing input '{}' ({} {:?})",
                        spec.name, spec.datatype, spec.shape
                    ))
                })?;
            let input = given.swap_remove(position);
            self.check_input(spec, &input)?;
            ordered.push(input);
        }
        Ok(ordered)
    }

    fn check_input(&self, spec: &TensorSpec, input: &InputTensor) -> Result<()> {
        let fail =
            |message: String| PredictorError::invalid(format!("input '{}': {message}", spec.name));
        if input.datatype() != spec.datatype {
            return Err(fail(format!(
                "datatype {} does not match the model's {}",
                input.datatype(),
                spec.datatype
            )));
        }
        let fits = input.shape.len() == spec.shape.len()
            && input
                .shape
                .iter()
                .zip(&spec.shape)
                .all(|(&given, &declared)| declared < 0 || given == declared);
        if !fits {
            return Err(fail(format!(
                "shape {:?} does not match the model's {:?}",
                input.shape, spec.shape
            )));
        }
        if self.config.max_batch_size > 0
            && let Some(&batch) = input.shape.first()
            && u64::try_from(batch).is_ok_and(|b| b > self.config.max_batch_size)
        {
            return Err(fail(format!(
                "batch of {batch} is over the model's max_batch_size of {}",
                self.config.max_batch_size
            )));
        }
        input
            .data
            .check_shape(&input.shape)
            .map_err(|e| fail(e.to_string()))?;
        input.data.check_text().map_err(|e| fail(e.to_string()))
    }
}

fn datatype_of(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

fn tensor_spec(kind: &str, name: &str, ty: &ValueType) -> Result<TensorSpec, String> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => {
            let datatype = datatype_of(*ty).ok_or_else(|| {
                format!("{kind} '{name}' has element type {ty}, which the protocol cannot carry")
            })?;
            let shape = shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect();
            Ok(TensorSpec {
                name: name.to_owned(),
                datatype,
                shape,
            })
        }
        other => Err(format!(
            "{kind} '{name}' is a {other}, not a tensor (scikit-learn models: export with skl2onnx options {{'zipmap': False}})"
        )),
    }
}

fn apply_overrides(
    kind: &str,
    mut specs: Vec<TensorSpec>,
    overrides: &[TensorOverride],
) -> Result<Vec<TensorSpec>, String> {
    for o in overrides {
        let spec = specs.iter_mut().find(|s| s.name == o.name).ok_or_else(|| {
            format!(
                "config names {kind} '{}', which the model does not have",
                o.name
            )
        })?;
        if let Some(datatype) = &o.datatype {
            let parsed = DataType::parse(datatype)
                .ok_or_else(|| format!("config: unknown datatype '{datatype}'"))?;
            if parsed != spec.datatype {
                return Err(format!(
                    "config gives {kind} '{}' datatype {parsed}, but the model's is {}",
                    o.name, spec.datatype
                ));
            }
        }
        if let Some(shape) = &o.shape {
            let compatible = shape.len() == spec.shape.len()
                && shape
                    .iter()
                    .zip(&spec.shape)
                    .all(|(&c, &m)| m < 0 || c == m || c < 0);
            if !compatible {
                return Err(format!(
                    "config gives {kind} '{}' shape {shape:?}, which contradicts the model's {:?}",
                    o.name, spec.shape
                ));
            }
            spec.shape = shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect();
        }
    }
    Ok(specs)
}

fn to_ort(shape: Vec<i64>, data: TensorData) -> ort::Result<DynValue> {
    Ok(match data {
        TensorData::Bool(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Uint8(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Uint16(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Uint32(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Uint64(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Int8(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Int16(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Int32(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Int64(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Fp16(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Fp32(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Fp64(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Bytes(v) => {
            // UTF-8 was checked in validation; a lossy conversion keeps this total.
            let strings: Vec<String> = v
                .into_iter()
                .map(|b| {
                    String::from_utf8(b)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
                })
                .collect();
            Tensor::from_string_array((shape, &strings[..]))?.into_dyn()
        }
    })
}

fn from_ort(value: &DynValue) -> Result<(Vec<i64>, TensorData), String> {
    fn take<T: ort::value::PrimitiveTensorElementType + Clone>(
        value: &DynValue,
    ) -> ort::Result<(Vec<i64>, Vec<T>)> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        Ok((shape.to_vec(), data.to_vec()))
    }
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(format!(
            "the model produced a {}, not a tensor",
            value.dtype()
        ));
    };
    let datatype =
        datatype_of(*ty).ok_or_else(|| format!("element type {ty} cannot be returned"))?;
    let result = match datatype {
        DataType::Bool => take(value).map(|(s, d)| (s, TensorData::Bool(d))),
        DataType::Uint8 => take(value).map(|(s, d)| (s, TensorData::Uint8(d))),
        DataType::Uint16 => take(value).map(|(s, d)| (s, TensorData::Uint16(d))),
        DataType::Uint32 => take(value).map(|(s, d)| (s, TensorData::Uint32(d))),
        DataType::Uint64 => take(value).map(|(s, d)| (s, TensorData::Uint64(d))),
        DataType::Int8 => take(value).map(|(s, d)| (s, TensorData::Int8(d))),
        DataType::Int16 => take(value).map(|(s, d)| (s, TensorData::Int16(d))),
        DataType::Int32 => take(value).map(|(s, d)| (s, TensorData::Int32(d))),
        DataType::Int64 => take(value).map(|(s, d)| (s, TensorData::Int64(d))),
        DataType::Fp16 => take(value).map(|(s, d)| (s, TensorData::Fp16(d))),
        DataType::Fp32 => take(value).map(|(s, d)| (s, TensorData::Fp32(d))),
        DataType::Fp64 => take(value).map(|(s, d)| (s, TensorData::Fp64(d))),
        DataType::Bytes => value.try_extract_strings().map(|(s, d)| {
            (
                s.to_vec(),
                TensorData::Bytes(d.into_iter().map(String::into_bytes).collect()),
            )
        }),
    };
    result.map_err(|e| e.to_string())
}
