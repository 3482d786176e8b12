//! One loaded model version: its metadata, its sessions behind the batcher or the pool, and inference:
//! validate the request against the metadata, queue it, await the answer, post-process.

use std::path::Path;
use std::time::{Duration, Instant};

use meshserve_proto::infer::{echoed_parameters, quoted_names};
use meshserve_proto::{
    DataType, InferRequest, InferResponse, InputTensor, RequestedOutput, TensorSpec,
};
use ort::session::Session;
use ort::value::ValueType;
use tracing::Instrument as _;

use crate::batcher::{Batcher, Job, Policy, Pool};
use crate::config::{ModelConfig, TensorOverride};
use crate::error::{PredictorError, Result};
use crate::metrics::{FailureReason, Metrics, ModelMetrics};
use crate::runtime::Runtime;
use crate::tensors::datatype_of;

/// The platform name reported in model metadata (Triton's name for ONNX Runtime models).
pub const PLATFORM: &str = "onnxruntime_onnx";

/// Request parameter: how long the request may wait in the queue, in microseconds (Triton's).
pub const TIMEOUT_PARAMETER: &str = "timeout";

#[derive(Debug)]
pub struct ModelVersion {
    name: String,
    version: u64,
    version_string: String,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    config: ModelConfig,
    executor: Executor,
    metrics: ModelMetrics,
    /// The tree ensemble read from the graph, for `explainer.tree_shap`.
    tree_model: Option<std::sync::Arc<crate::tree_shap::TreeModel>>,
}

/// How requests reach the sessions: merged into batches by the batcher's threads, or each
/// on its own through the pool.
#[derive(Debug)]
enum Executor {
    Batched(Batcher),
    Pooled(Box<Pool>),
}

impl ModelVersion {
    /// Loads `file` into `config.instance_count` sessions, works out the metadata (applying
    /// the config's overrides), and starts the batcher.
    pub fn load(
        runtime: &Runtime,
        name: &str,
        version: u64,
        file: &Path,
        config: &ModelConfig,
        metrics: &Metrics,
    ) -> Result<ModelVersion> {
        let fail =
            |reason: String| PredictorError::load(name, format!("version {version}: {reason}"));
        let sessions = (0..config.instance_count.max(1))
            .map(|_| {
                runtime
                    .session_builder(config.intra_op_threads)
                    .map_err(|e| fail(e.to_string()))?
                    .commit_from_file(file)
                    .map_err(|e| fail(format!("{}: {e}", file.display())))
            })
            .collect::<Result<Vec<Session>>>()?;
        let session = sessions.first().ok_or_else(|| fail("no session".into()))?;
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
        let tree_model = explainer_model(config, file, &inputs).map_err(&fail)?;
        let version_string = version.to_string();
        let model_metrics = metrics.model(name, &version_string);
        let executor = match &config.dynamic_batching {
            None => Executor::Pooled(Box::new(Pool::new(name, sessions, model_metrics.clone())?)),
            Some(batching) => {
                if let Some(fixed) = inputs
                    .iter()
                    .chain(&outputs)
                    .find(|t| t.shape.first().is_none_or(|&d| d >= 0))
                {
                    return Err(fail(format!(
                        "dynamic_batching needs a variable first dimension on every input and output, but '{}' has shape {:?}",
                        fixed.name, fixed.shape
                    )));
                }
                let policy = Policy {
                    max_batch: usize::try_from(config.max_batch_size).unwrap_or(usize::MAX),
                    delay: Duration::from_micros(batching.max_queue_delay_microseconds),
                    preferred: batching
                        .preferred_batch_size
                        .iter()
                        .filter_map(|&s| usize::try_from(s).ok())
                        .collect(),
                    max_queue: batching.max_queue_size,
                };
                Executor::Batched(Batcher::start(
                    name,
                    sessions,
                    policy,
                    model_metrics.clone(),
                )?)
            }
        };
        Ok(ModelVersion {
            name: name.to_owned(),
            version,
            version_string,
            inputs,
            outputs,
            config: config.clone(),
            executor,
            metrics: model_metrics,
            tree_model,
        })
    }

    /// The tree ensemble TreeSHAP explains (when the config asks for it).
    pub fn tree_model(&self) -> Option<&crate::tree_shap::TreeModel> {
        self.tree_model.as_deref()
    }

    /// Counts one explanation (KServe's `request_explain_seconds`).
    pub fn observe_explain(&self, took: Duration) {
        self.metrics.explained(took.as_secs_f64());
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

    /// For a model converted from another framework: its one input, a matrix of features,
    /// and the features' names. Requests are read as KServe's server for that framework
    /// reads them ([`meshserve_proto::frame`]).
    pub fn feature_matrix(
        &self,
    ) -> Option<(&TensorSpec, &[String], meshserve_proto::frame::Objects)> {
        let converted = self.config.converted_from.as_ref()?;
        // Only lgbserver reads objects with the model's feature names as columns.
        let lightgbm = crate::convert::Format::parse(&converted.format)
            == Some(crate::convert::Format::Lightgbm);
        let objects = if lightgbm {
            meshserve_proto::frame::Objects::Lenient
        } else {
            meshserve_proto::frame::Objects::Strict
        };
        match self.inputs.as_slice() {
            [one] => Some((one, converted.feature_names.as_slice(), objects)),
            _ => None,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Counts the front end's work before [`ModelVersion::infer`] (KServe's
    /// `request_preprocess_seconds`).
    pub fn observe_preprocess(&self, took: Duration) {
        self.metrics.preprocessed(took.as_secs_f64());
    }

    /// Counts the front end's work after [`ModelVersion::infer`] (KServe's
    /// `request_postprocess_seconds`).
    pub fn observe_postprocess(&self, took: Duration) {
        self.metrics.postprocessed(took.as_secs_f64());
    }

    /// Runs one request: checks it against the metadata, queues it for the model's instances
    /// (batched with others if configured), and answers with the requested outputs (all of
    /// them, in the model's order, when none are named).
    pub async fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        let started = Instant::now();
        let span = crate::trace_span!(
            &tracing::Span::current(),
            "predict",
            model.name = %self.name,
            model.version = self.version,
        );
        let result = self.run(request).instrument(span).await;
        self.metrics.predicted(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.metrics.succeeded(),
            Err(e) => self.metrics.failed(match e {
                PredictorError::Overloaded(_) => FailureReason::QueueFull,
                PredictorError::Timeout(_) => FailureReason::Timeout,
                PredictorError::Runtime(_) => FailureReason::Runtime,
                _ => FailureReason::InvalidInput,
            }),
        }
        result
    }

    async fn run(&self, request: InferRequest) -> Result<InferResponse> {
        let request = match self.feature_matrix() {
            Some((spec, names, objects)) => {
                meshserve_proto::frame::request_from_v2(request, spec, names, objects)?
            }
            None => request,
        };
        let requested = self.requested_outputs(&request.outputs)?;
        let timeout = self.timeout(&request)?;
        let inputs = self.validate_inputs(request.inputs)?;
        let rows = if self.config.dynamic_batching.is_some() {
            self.batch_rows(&inputs)?
        } else {
            1
        };
        let job = Job {
            inputs,
            rows,
            outputs: requested
                .iter()
                .map(|(spec, _)| spec.name.clone())
                .collect(),
            span: tracing::Span::current(),
        };
        let deadline = timeout.map(|t| Instant::now() + t);
        let timed_out = || {
            PredictorError::Timeout(format!(
                "request to model '{}' did not run within its timeout of {} µs",
                self.name,
                timeout.unwrap_or_default().as_micros()
            ))
        };
        let outputs = match &self.executor {
            Executor::Pooled(pool) => match deadline {
                None => pool.run(job).await?,
                Some(deadline) => tokio::time::timeout_at(deadline.into(), pool.run(job))
                    .await
                    .map_err(|_| timed_out())??,
            },
            Executor::Batched(batcher) => {
                let ticket = batcher.submit(job)?;
                let answer = match deadline {
                    None => ticket.answer.await,
                    Some(deadline) => {
                        match tokio::time::timeout_at(deadline.into(), ticket.answer).await {
                            Ok(answer) => answer,
                            Err(_) => {
                                batcher.cancel(ticket.id);
                                return Err(timed_out());
                            }
                        }
                    }
                };
                answer.map_err(|_| {
                    PredictorError::Runtime(format!("model '{}' was unloaded", self.name))
                })??
            }
        };
        let outputs = outputs
            .into_iter()
            .zip(&requested)
            .map(|(output, (_, classification))| match classification {
                Some(k) => crate::classification::classify(output, *k, &self.config.labels),
                None => Ok(output),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(InferResponse {
            model_name: self.name.clone(),
            model_version: self.version_string.clone(),
            id: request.id,
            parameters: echoed_parameters(&request.parameters),
            outputs,
        })
    }

    /// The queue timeout: the request's `timeout` parameter (µs), else the model's default.
    fn timeout(&self, request: &InferRequest) -> Result<Option<Duration>> {
        let micros = match request.parameters.get(TIMEOUT_PARAMETER) {
            Some(v) => v.as_u64().ok_or_else(|| {
                PredictorError::invalid(format!(
                    "parameter 'timeout' must be a whole number of microseconds, got {v}"
                ))
            })?,
            None => self
                .config
                .dynamic_batching
                .as_ref()
                .map_or(0, |b| b.default_timeout_microseconds),
        };
        Ok((micros > 0).then(|| Duration::from_micros(micros)))
    }

    /// The batch dimension all inputs share.
    fn batch_rows(&self, inputs: &[InputTensor]) -> Result<usize> {
        let mut rows = inputs
            .iter()
            .map(|i| (i, i.shape.first().copied().unwrap_or(0)));
        let Some((_, first)) = rows.next() else {
            return Ok(1);
        };
        if let Some((other, dim)) = rows.find(|&(_, d)| d != first) {
            return Err(PredictorError::invalid(format!(
                "input '{}' has {dim} rows but input '{}' has {first}: inputs must agree on the batch dimension",
                other.name,
                inputs.first().map_or("", |i| i.name.as_str())
            )));
        }
        usize::try_from(first).map_err(|_| PredictorError::invalid("negative batch dimension"))
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

/// Checks the explainer's background against the model's input and reads the tree ensemble
/// TreeSHAP needs.
fn explainer_model(
    config: &ModelConfig,
    file: &Path,
    inputs: &[TensorSpec],
) -> Result<Option<std::sync::Arc<crate::tree_shap::TreeModel>>, String> {
    let Some(explainer) = &config.explainer else {
        return Ok(None);
    };
    let Some(features) = explainer.background().map(|b| b.features) else {
        // Occlusion reads images, checked per request against the input's shape.
        return Ok(None);
    };
    if let [input] = inputs
        && let Some(&width) = input.shape.get(1)
        && width >= 0
        && width as usize != features
    {
        return Err(format!(
            "the explainer's background rows have {features} features; input '{}' takes {width}",
            input.name
        ));
    }
    let Some(_) = &explainer.tree_shap else {
        return Ok(None);
    };
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let model = crate::tree_shap::TreeModel::from_onnx(&bytes)
        .map_err(|e| format!("explainer.tree_shap: {e}"))?;
    if model.ensemble.features != features {
        return Err(format!(
            "explainer.tree_shap: the background rows have {features} features; the tree ensemble reads {}",
            model.ensemble.features
        ));
    }
    Ok(Some(std::sync::Arc::new(model)))
}
