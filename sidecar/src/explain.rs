//! `POST /v1/models/<m>:explain` and `POST /v2/models/<m>-explainer/infer`: the model's
//! built-in explainer, run next to the model (no second server, no pickle). KernelSHAP
//! ([`meshserve_predictor::kernel_shap`]) calls the model on batches of perturbed rows;
//! TreeSHAP ([`meshserve_predictor::tree_shap`]) walks the ONNX graph's trees and calls
//! nothing. V1 answers an Alibi-shaped document, as KServe's explainers did:
//!
//! ```json
//! {"meta": {"name": "KernelShap", "type": ["blackbox"], "explanations": ["local"],
//!           "params": {"link": "identity", "max_coalitions": 2048, "background_rows": 10}},
//!  "data": {"shap_values": [[[...per feature] per instance] per output],
//!           "expected_value": [...per output], "feature_names": [...],
//!           "raw": {"raw_prediction": [[...per output] per instance], "instances": [...],
//!                   "exact": true, "coalitions": 14, "model_rows": 151}}}
//! ```
//!
//! TreeSHAP's is the same with `"name": "TreeShap"`, `"type": ["whitebox"]` and params
//! `{"model_output": "margin", "feature_perturbation": "interventional", "background_rows",
//! "operator", "post_transform"}`: its values and `raw_prediction` are the ensemble's margin.
//! V2 answers the way MLServer's explainer runtimes do: one BYTES output `explanation`
//! holding that document as JSON (parameter `content_type: "str"`), to an inference request
//! whose one input holds the rows (`[rows, features]`).
//!
//! Anchors ([`meshserve_predictor::anchors`]) answer Alibi's `AnchorTabular` document for one
//! instance (`anchor`, `precision`, `coverage`, `raw` with each step's precision and coverage);
//! occlusion ([`meshserve_predictor::occlusion`]) answers `attributions`, a height x width heat
//! map per image, with the `target` score explained (the highest unless the request names
//! one: V1 `"target": k`, V2 parameter `target`). Images arrive as the model's input takes
//! them (V1 nested lists, V2 `[n, ...]` tensors), or as the photo a transformer turns into
//! that tensor first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshserve_predictor::anchors::{self, Anchor};
use meshserve_predictor::config::{
    AnchorsConfig, ExplainerConfig, KernelShapConfig, OcclusionConfig,
};
use meshserve_predictor::kernel_shap::{self, ExplainError, Explanation, Options};
use meshserve_predictor::model::ModelVersion;
use meshserve_predictor::occlusion::{self, Geometry, Layout, Saliency};
use meshserve_predictor::tree_shap::TreeModel;
use meshserve_proto::{
    DataType, InferRequest, InferResponse, InputTensor, OutputTensor, TensorData, TensorSpec,
};
use serde_json::{Value, json};

use crate::error::ApiError;

/// The most instances one explain request may ask about (each is a whole explanation).
pub const MAX_INSTANCES: usize = 16;
/// What a model's name gets to name its explainer on the V2 protocol (MLServer's habit).
pub const EXPLAINER_SUFFIX: &str = "-explainer";

/// Explains the instances of a KServe V1 body (`{"instances": [[...], ...]}`).
pub async fn explain(model: Arc<ModelVersion>, body: &[u8]) -> Result<Value, ApiError> {
    let config = explainer(&model)?;
    let instances = instances(body, &expected(&model, &config)?)?;
    explain_instances(model, config, instances).await
}

/// Explains the rows of a V2 inference request sent to `<model>-explainer` (`name`).
pub async fn explain_v2(
    model: Arc<ModelVersion>,
    name: &str,
    request: InferRequest,
) -> Result<InferResponse, ApiError> {
    let version = model.version().to_string();
    let document = explain_tensor(model, &request).await?;
    let mut parameters = meshserve_proto::Parameters::new();
    parameters.insert("content_type".into(), "str".into());
    Ok(InferResponse {
        model_name: name.to_owned(),
        model_version: version,
        id: request.id,
        parameters: Default::default(),
        outputs: vec![OutputTensor {
            name: "explanation".into(),
            shape: vec![1],
            data: TensorData::Bytes(vec![document.to_string().into_bytes()]),
            parameters,
        }],
    })
}

/// Explains the instances an inference request's one input holds (the V2 form, and a V1
/// request a transformer turned into the model's tensor), answering the document.
pub async fn explain_tensor(
    model: Arc<ModelVersion>,
    request: &InferRequest,
) -> Result<Value, ApiError> {
    let config = explainer(&model)?;
    let instances = v2_instances(request, &expected(&model, &config)?)?;
    explain_instances(model, config, instances).await
}

fn explainer(model: &ModelVersion) -> Result<ExplainerConfig, ApiError> {
    model.config().explainer.clone().ok_or_else(|| {
        ApiError::NotFound(format!(
            "model '{}' has no explainer (config.yaml: explainer)",
            model.name()
        ))
    })
}

/// The instances a request holds, each flattened, with their shape (`[features]` for
/// tabular methods, the image's dimensions for occlusion).
struct Instances {
    rows: Vec<Vec<f64>>,
    dims: Vec<usize>,
    /// The output occlusion explains, when the request names one.
    target: Option<usize>,
}

/// What an instance must look like: each dimension after the batch, `None` where any size goes.
struct Expected {
    dims: Vec<Option<usize>>,
    /// The most instances in one request (anchors explain one at a time, as Alibi's does).
    most: usize,
}

fn expected(model: &ModelVersion, config: &ExplainerConfig) -> Result<Expected, ApiError> {
    if config.occlusion.is_some() {
        let input = feature_input(model).map_err(ApiError::BadRequest)?;
        let dims = input
            .shape
            .iter()
            .skip(1)
            .map(|d| usize::try_from(*d).ok())
            .collect::<Vec<_>>();
        if !(2..=3).contains(&dims.len()) {
            return Err(ApiError::BadRequest(format!(
                "model '{}' cannot be explained by occlusion: its input '{}' has shape {:?}, not [n, h, w] or [n, c, h, w] / [n, h, w, c] images",
                model.name(),
                input.name,
                input.shape
            )));
        }
        return Ok(Expected {
            dims,
            most: MAX_INSTANCES,
        });
    }
    let features = config.background().map_or(0, |b| b.features);
    Ok(Expected {
        dims: vec![Some(features)],
        most: if config.anchors.is_some() {
            1
        } else {
            MAX_INSTANCES
        },
    })
}

impl Expected {
    fn describe(&self) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .map(|d| d.map_or("any".into(), |d| d.to_string()))
            .collect();
        format!("[{}]", dims.join(", "))
    }

    fn check(&self, count: usize, dims: &[usize]) -> Result<(), ApiError> {
        if count == 0 || count > self.most {
            let why = if self.most == 1 {
                " (anchors explain one instance per request, as Alibi's AnchorTabular does)"
            } else {
                ""
            };
            return Err(ApiError::BadRequest(format!(
                "1 to {} instances can be explained at once, not {count}{why}",
                self.most
            )));
        }
        let fits = dims.len() == self.dims.len()
            && dims
                .iter()
                .zip(&self.dims)
                .all(|(d, want)| *d > 0 && want.is_none_or(|w| w == *d));
        if fits {
            Ok(())
        } else if let ([got], [Some(want)]) = (dims, self.dims.as_slice()) {
            Err(ApiError::BadRequest(format!(
                "an instance has {got} features; the explainer's background rows have {want}"
            )))
        } else {
            Err(ApiError::BadRequest(format!(
                "an instance of shape {dims:?}: the explainer takes instances of shape {}",
                self.describe()
            )))
        }
    }
}

async fn explain_instances(
    model: Arc<ModelVersion>,
    config: ExplainerConfig,
    instances: Instances,
) -> Result<Value, ApiError> {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(config.timeout_ms);
    let limit_ms = config.timeout_ms;
    let failed = move |e: ExplainError| match e {
        ExplainError::Input(m) => ApiError::BadRequest(m),
        ExplainError::TooLarge(m) => ApiError::TooLarge(m),
        ExplainError::TimedOut => ApiError::Timeout(format!(
            "the explanation ran past its time limit of {limit_ms} ms (explainer.timeout_ms)"
        )),
        other => ApiError::Internal(other.to_string()),
    };
    let handle = tokio::runtime::Handle::current();
    let worker = Arc::clone(&model);
    let answer = tokio::task::spawn_blocking(move || {
        let model = worker;
        let Instances { rows, dims, target } = instances;
        if let Some(tree) = config.tree_shap.as_ref().and(model.tree_model()) {
            let background = config.background().map(|b| Arc::clone(&b.values));
            let background = background.unwrap_or_default();
            let explanations = rows
                .iter()
                .map(|x| tree.explain(x, &background, &mut || Instant::now() >= deadline))
                .collect::<Result<Vec<_>, ExplainError>>()
                .map_err(failed)?;
            return Ok(tree_document(&model, tree, &config, &rows, &explanations));
        }
        let input = feature_input(&model).map_err(ApiError::BadRequest)?.clone();
        let model_calls = ModelCalls {
            handle: &handle,
            model: &model,
            input: &input,
            dims: &dims,
        };
        if let Some(shap) = &config.kernel_shap {
            let explanations = rows
                .iter()
                .map(|x| explain_one(&model_calls, shap, deadline, x))
                .collect::<Result<Vec<_>, ExplainError>>()
                .map_err(failed)?;
            return Ok(kernel_document(&model, shap, &rows, &explanations));
        }
        if let Some(anchors) = &config.anchors {
            let x = rows.first().map(Vec::as_slice).unwrap_or_default();
            let anchor = anchor_one(&model_calls, anchors, deadline, x).map_err(failed)?;
            return Ok(anchors_document(&model, anchors, x, &anchor));
        }
        if let Some(occlusion) = &config.occlusion {
            let (geometry, layout) = geometry(occlusion, &dims);
            let options = occlusion_options(occlusion, deadline);
            let mut run = |images: &[f64], n: usize| model_calls.scores(images, n);
            let maps = rows
                .iter()
                .map(|image| occlusion::explain(&mut run, image, &geometry, target, &options))
                .collect::<Result<Vec<_>, ExplainError>>()
                .map_err(failed)?;
            return Ok(occlusion_document(
                occlusion, &options, &geometry, layout, &maps,
            ));
        }
        Err(ApiError::Internal(
            "the explainer's tree ensemble was not loaded".into(),
        ))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the explainer stopped: {e}")))?;
    model.observe_explain(started.elapsed());
    answer
}

/// Runs batches of instances through the model from the explainer's blocking thread.
struct ModelCalls<'a> {
    handle: &'a tokio::runtime::Handle,
    model: &'a ModelVersion,
    input: &'a TensorSpec,
    /// One instance's dimensions.
    dims: &'a [usize],
}

impl ModelCalls<'_> {
    fn run(&self, rows: &[f64], n: usize) -> Result<InferResponse, String> {
        let request = rows_request(self.input, rows, n, self.dims);
        self.handle
            .block_on(self.model.infer(request))
            .map_err(|e| e.to_string())
    }

    /// Every float output's values per row, side by side.
    fn outputs(&self, rows: &[f64], n: usize) -> Result<Vec<f64>, String> {
        numeric_outputs(&self.run(rows, n)?.outputs, n)
    }

    /// The first float output's scores per row (an image model's classes).
    fn scores(&self, rows: &[f64], n: usize) -> Result<Vec<f64>, String> {
        first_scores(self.run(rows, n)?, n)
    }

    /// The class of each row: the model's label output, else the highest of its first float
    /// output's scores (as Alibi's predictor wrappers read a classifier).
    fn classes(&self, rows: &[f64], n: usize) -> Result<Vec<f64>, String> {
        let response = self.run(rows, n)?;
        let label = response.outputs.iter().find_map(|o| match &o.data {
            TensorData::Int64(v) if v.len() == n => Some(v.iter().map(|c| *c as f64).collect()),
            TensorData::Int32(v) if v.len() == n => Some(v.iter().map(|c| f64::from(*c)).collect()),
            _ => None,
        });
        if let Some(classes) = label {
            return Ok(classes);
        }
        // The same answer's scores: the rows are not run twice.
        let scores = first_scores(response, n)?;
        let k = scores.len() / n.max(1);
        if k < 2 {
            return Err(
                "anchors explain classifiers: the model answers neither a label nor scores of two or more classes"
                    .into(),
            );
        }
        Ok(scores
            .chunks_exact(k)
            .map(|row| {
                (0..k)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap_or(0) as f64
            })
            .collect())
    }
}

/// The first float output of `n` rows' answer, row by row.
fn first_scores(response: InferResponse, n: usize) -> Result<Vec<f64>, String> {
    let first = response
        .outputs
        .into_iter()
        .find(|o| matches!(o.data, TensorData::Fp32(_) | TensorData::Fp64(_)));
    numeric_outputs(first.as_slice(), n)
}

/// The model's one input, a matrix of FP32 or FP64 features: what the explainer feeds.
fn feature_input(model: &ModelVersion) -> Result<&TensorSpec, String> {
    match model.inputs() {
        [input] if matches!(input.datatype, DataType::Fp32 | DataType::Fp64) => Ok(input),
        [input] => Err(format!(
            "model '{}' cannot be explained: its input '{}' is {:?}, not FP32 or FP64 features",
            model.name(),
            input.name,
            input.datatype
        )),
        _ => Err(format!(
            "model '{}' cannot be explained: it takes {} inputs, not one matrix of features",
            model.name(),
            model.inputs().len()
        )),
    }
}

fn instances(body: &[u8], expected: &Expected) -> Result<Instances, ApiError> {
    #[derive(serde::Deserialize)]
    struct Body {
        instances: Vec<Value>,
        target: Option<usize>,
    }
    let body: Body = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "an explain request is {{\"instances\": [instance, ...]}}, each of shape {}: {e}",
            expected.describe()
        ))
    })?;
    let mut rows = Vec::with_capacity(body.instances.len());
    let mut dims = Vec::new();
    for (i, instance) in body.instances.iter().enumerate() {
        let (mut values, mut shape) = (Vec::new(), Vec::new());
        flatten(instance, 0, &mut values, &mut shape)
            .map_err(|e| ApiError::BadRequest(format!("instance {i}: {e}")))?;
        if i > 0 && shape != dims {
            return Err(ApiError::BadRequest(format!(
                "instance {i} has shape {shape:?}, instance 0 {dims:?}"
            )));
        }
        dims = shape;
        rows.push(values);
    }
    expected.check(rows.len(), &dims)?;
    Ok(Instances {
        rows,
        dims,
        target: body.target,
    })
}

/// A nested JSON list of numbers, flattened row-major; `shape` gets its dimensions.
fn flatten(
    value: &Value,
    depth: usize,
    out: &mut Vec<f64>,
    shape: &mut Vec<usize>,
) -> Result<(), String> {
    match value {
        Value::Number(n) => {
            if depth != shape.len() {
                return Err("the nested lists are ragged".into());
            }
            out.push(n.as_f64().ok_or("a number out of range")?);
            Ok(())
        }
        Value::Array(items) if depth < 8 => {
            match shape.get(depth) {
                None if depth == shape.len() => shape.push(items.len()),
                Some(&n) if n == items.len() => {}
                _ => return Err("the nested lists are ragged".into()),
            }
            items
                .iter()
                .try_for_each(|item| flatten(item, depth + 1, out, shape))
        }
        Value::Array(_) => Err("lists nested deeper than 8".into()),
        other => Err(format!("{other} is not a number")),
    }
}

/// The instances of a V2 request's one input (`[n, ...instance]`, or one instance).
fn v2_instances(request: &InferRequest, expected: &Expected) -> Result<Instances, ApiError> {
    let [input] = request.inputs.as_slice() else {
        return Err(ApiError::BadRequest(format!(
            "an explain request has one input, the instances to explain ([n, ...] of shape {}), not {}",
            expected.describe(),
            request.inputs.len()
        )));
    };
    let values: Vec<f64> = match &input.data {
        TensorData::Fp32(v) => v.iter().map(|x| f64::from(*x)).collect(),
        TensorData::Fp64(v) => v.clone(),
        TensorData::Int32(v) => v.iter().map(|x| f64::from(*x)).collect(),
        TensorData::Int64(v) => v.iter().map(|x| *x as f64).collect(),
        _ => {
            return Err(ApiError::BadRequest(format!(
                "input '{}' is {:?}: the instances to explain are numbers (FP32, FP64, INT32, INT64)",
                input.name,
                input.datatype()
            )));
        }
    };
    let shape: Vec<usize> = input
        .shape
        .iter()
        .map(|d| usize::try_from(*d).unwrap_or(0))
        .collect();
    let dims = if shape.len() == expected.dims.len() {
        shape
    } else {
        shape.get(1..).unwrap_or_default().to_vec()
    };
    let size: usize = dims.iter().product();
    if size == 0 || values.is_empty() || !values.len().is_multiple_of(size) {
        return Err(ApiError::BadRequest(format!(
            "input '{}' has shape {:?}; the explainer takes [n, ...] of shape {}",
            input.name,
            input.shape,
            expected.describe()
        )));
    }
    let rows: Vec<Vec<f64>> = values.chunks_exact(size).map(<[f64]>::to_vec).collect();
    expected.check(rows.len(), &dims)?;
    let target = request
        .parameters
        .get("target")
        .and_then(Value::as_u64)
        .and_then(|t| usize::try_from(t).ok());
    Ok(Instances { rows, dims, target })
}

fn explain_one(
    calls: &ModelCalls<'_>,
    config: &KernelShapConfig,
    deadline: Instant,
    x: &[f64],
) -> Result<Explanation, ExplainError> {
    let mut run = |rows: &[f64], n: usize| calls.outputs(rows, n);
    let options = Options {
        max_coalitions: config.max_coalitions,
        deadline: Some(deadline),
        ..Options::default()
    };
    kernel_shap::explain(&mut run, x, &config.background.values, &options)
}

fn anchor_one(
    calls: &ModelCalls<'_>,
    config: &AnchorsConfig,
    deadline: Instant,
    x: &[f64],
) -> Result<Anchor, ExplainError> {
    let Some(discretizer) = &config.discretizer else {
        return Err(ExplainError::Model(
            "the anchors' bins were not fitted".into(),
        ));
    };
    let mut run = |rows: &[f64], n: usize| calls.classes(rows, n);
    let options = anchors::Options {
        threshold: config.threshold,
        delta: config.delta,
        tau: config.tau,
        batch_size: config.batch_size,
        beam_size: config.beam_size,
        min_samples_start: config.min_samples_start,
        max_anchor_size: config.max_anchor_size,
        max_model_rows: config.max_model_rows,
        seed: config.seed,
        deadline: Some(deadline),
    };
    anchors::explain(
        &mut run,
        x,
        &config.background.values,
        discretizer,
        &options,
    )
}

/// An image's geometry from its dimensions and the configured (or inferred) layout.
fn geometry(config: &OcclusionConfig, dims: &[usize]) -> (Geometry, &'static str) {
    let channel_like = |d: usize| matches!(d, 1 | 3 | 4);
    let layout = match (config.layout.as_deref(), dims) {
        (Some("nhwc"), [_, _, _]) => Layout::Hwc,
        (Some(_), _) => Layout::Chw,
        (None, [c, _, w]) if !channel_like(*c) && channel_like(*w) => Layout::Hwc,
        (None, _) => Layout::Chw,
    };
    let geometry = match (layout, dims) {
        (Layout::Hwc, [h, w, c]) => Geometry {
            channels: *c,
            height: *h,
            width: *w,
            layout,
        },
        (_, [c, h, w]) => Geometry {
            channels: *c,
            height: *h,
            width: *w,
            layout,
        },
        (_, [h, w]) => Geometry {
            channels: 1,
            height: *h,
            width: *w,
            layout,
        },
        _ => Geometry {
            channels: 0,
            height: 0,
            width: 0,
            layout,
        },
    };
    let name = match (layout, dims.len()) {
        (_, 2) => "nhw",
        (Layout::Hwc, _) => "nhwc",
        (Layout::Chw, _) => "nchw",
    };
    (geometry, name)
}

fn occlusion_options(config: &OcclusionConfig, deadline: Instant) -> occlusion::Options {
    let stride = config.stride.unwrap_or(config.patch);
    occlusion::Options {
        patch: (config.patch, config.patch),
        stride: (stride, stride),
        baseline: config.baseline,
        max_batch_images: config.batch_size,
        max_windows: occlusion::MAX_WINDOWS,
        deadline: Some(deadline),
    }
}

/// `n` instances of `dims` as the model's one input, in its float type ([`feature_input`]).
fn rows_request(input: &TensorSpec, rows: &[f64], n: usize, dims: &[usize]) -> InferRequest {
    let data = match input.datatype {
        DataType::Fp32 => TensorData::Fp32(rows.iter().map(|v| *v as f32).collect()),
        _ => TensorData::Fp64(rows.to_vec()),
    };
    InferRequest {
        id: None,
        parameters: Default::default(),
        inputs: vec![InputTensor {
            name: input.name.clone(),
            shape: std::iter::once(n as i64)
                .chain(dims.iter().map(|d| *d as i64))
                .collect(),
            data,
            parameters: Default::default(),
        }],
        outputs: Vec::new(),
    }
}

/// Every float output's values per row, side by side (a classifier's probabilities; a
/// regressor's value); labels and other integer outputs are not explained.
fn numeric_outputs(
    outputs: &[meshserve_proto::OutputTensor],
    n: usize,
) -> Result<Vec<f64>, String> {
    let columns: Vec<Vec<f64>> = outputs
        .iter()
        .filter_map(|o| match &o.data {
            TensorData::Fp32(v) => Some(v.iter().map(|x| f64::from(*x)).collect()),
            TensorData::Fp64(v) => Some(v.clone()),
            _ => None,
        })
        .collect();
    if columns.is_empty() {
        return Err("the model answers no FP32 or FP64 output to explain".into());
    }
    // Row by row, each output's values for that row side by side.
    let mut rows: Vec<std::slice::ChunksExact<'_, f64>> = columns
        .iter()
        .map(|c| c.chunks_exact((c.len() / n.max(1)).max(1)))
        .collect();
    let mut out = Vec::new();
    for _ in 0..n {
        for column in &mut rows {
            out.extend(column.next().unwrap_or_default());
        }
    }
    Ok(out)
}

/// The model's feature names: a converted model's own, else `feature_<i>`.
fn feature_names(model: &ModelVersion, features: usize) -> Vec<String> {
    model
        .feature_matrix()
        .map(|(_, names, _)| names.to_vec())
        .filter(|n| n.len() == features)
        .unwrap_or_else(|| (0..features).map(|i| format!("feature_{i}")).collect())
}

/// `[output][instance][feature]`, as Alibi and shap lay out several outputs.
fn by_output(explanations: &[Explanation]) -> Vec<Vec<&Vec<f64>>> {
    let outputs = explanations.first().map_or(0, |e| e.shap_values.len());
    (0..outputs)
        .map(|o| {
            explanations
                .iter()
                .filter_map(|e| e.shap_values.get(o))
                .collect()
        })
        .collect()
}

fn kernel_document(
    model: &ModelVersion,
    config: &KernelShapConfig,
    instances: &[Vec<f64>],
    explanations: &[Explanation],
) -> Value {
    let params = json!({"link": "identity", "max_coalitions": config.max_coalitions,
                        "background_rows": config.background.rows()});
    let mut document = document(
        ("KernelShap", "blackbox", params),
        model,
        config.background.features,
        instances,
        explanations,
    );
    let raw = &mut document["data"]["raw"];
    raw["exact"] = explanations.iter().all(|e| e.exact).into();
    raw["coalitions"] = explanations.first().map_or(0, |e| e.coalitions).into();
    raw["model_rows"] = explanations
        .iter()
        .map(|e| e.model_rows)
        .sum::<usize>()
        .into();
    document
}

fn tree_document(
    model: &ModelVersion,
    tree: &TreeModel,
    config: &ExplainerConfig,
    instances: &[Vec<f64>],
    explanations: &[Explanation],
) -> Value {
    let params = json!({"model_output": "margin", "feature_perturbation": "interventional",
                        "background_rows": config.background().map_or(0, |b| b.rows()),
                        "operator": tree.operator, "post_transform": tree.post_transform,
                        "trees": tree.ensemble.trees.len()});
    let mut document = document(
        ("TreeShap", "whitebox", params),
        model,
        tree.ensemble.features,
        instances,
        explanations,
    );
    document["data"]["raw"]["exact"] = true.into();
    document
}

/// The Alibi-shaped document both explainers answer: `(name, type, params)` in `meta`, the
/// values and what they add up to in `data` (each explainer adds its own `raw` fields).
fn document(
    (name, kind, params): (&str, &str, Value),
    model: &ModelVersion,
    features: usize,
    instances: &[Vec<f64>],
    explanations: &[Explanation],
) -> Value {
    json!({
        "meta": {"name": name, "type": [kind], "explanations": ["local"], "params": params},
        "data": {
            "shap_values": by_output(explanations),
            "expected_value": explanations.first().map(|e| e.expected_value.clone()),
            "feature_names": feature_names(model, features),
            "raw": {
                "raw_prediction": explanations.iter().map(|e| &e.prediction).collect::<Vec<_>>(),
                "instances": instances,
            },
        },
    })
}

/// Alibi's `AnchorTabular` document for one instance.
fn anchors_document(
    model: &ModelVersion,
    config: &AnchorsConfig,
    x: &[f64],
    anchor: &Anchor,
) -> Value {
    let names = feature_names(model, x.len());
    let name = |j: usize| {
        names
            .get(j)
            .cloned()
            .unwrap_or_else(|| format!("feature_{j}"))
    };
    let rule: Vec<String> = anchor
        .conditions
        .iter()
        .map(|(j, c)| c.describe(&name(*j)))
        .collect();
    let conditions: Vec<Value> = anchor
        .conditions
        .iter()
        .map(|(j, c)| match c {
            anchors::Condition::Interval { lower, upper } => {
                json!({"feature": j, "name": name(*j), "lower": lower, "upper": upper})
            }
            anchors::Condition::Equals(v) => json!({"feature": j, "name": name(*j), "equals": v}),
        })
        .collect();
    let params = json!({"threshold": config.threshold, "delta": config.delta, "tau": config.tau,
        "batch_size": config.batch_size, "beam_size": config.beam_size,
        "min_samples_start": config.min_samples_start, "max_anchor_size": config.max_anchor_size,
        "disc_perc": config.disc_perc, "categorical_features": config.categorical_features,
        "max_model_rows": config.max_model_rows, "seed": config.seed,
        "background_rows": config.background.rows()});
    json!({
        "meta": {"name": "AnchorTabular", "type": ["blackbox"], "explanations": ["local"],
                 "params": params},
        "data": {
            "anchor": rule,
            "precision": anchor.precision,
            "coverage": anchor.coverage,
            "raw": {
                "feature": anchor.conditions.iter().map(|(j, _)| j).collect::<Vec<_>>(),
                "precision": anchor.steps.iter().map(|s| s.0).collect::<Vec<_>>(),
                "coverage": anchor.steps.iter().map(|s| s.1).collect::<Vec<_>>(),
                "mean": anchor.steps.iter().map(|s| s.0).collect::<Vec<_>>(),
                "names": rule,
                "conditions": conditions,
                "success": anchor.success,
                "num_preds": anchor.model_rows,
                "prediction": [class_number(anchor.prediction)],
                "instance": x,
                "instances": [x],
                "feature_names": names,
            },
        },
    })
}

/// The occlusion document: a `[height][width]` heat map per image.
fn occlusion_document(
    config: &OcclusionConfig,
    options: &occlusion::Options,
    geometry: &Geometry,
    layout: &str,
    maps: &[Saliency],
) -> Value {
    let width = geometry.width.max(1);
    let params = json!({"patch": config.patch, "stride": options.stride.0,
        "baseline": config.baseline, "layout": layout, "height": geometry.height,
        "width": geometry.width, "channels": geometry.channels,
        "windows": maps.first().map_or(0, |m| m.windows)});
    json!({
        "meta": {"name": "Occlusion", "type": ["blackbox"], "explanations": ["local"],
                 "params": params},
        "data": {
            "attributions": maps.iter().map(|m| m.attributions.chunks(width).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "target": maps.iter().map(|m| m.target).collect::<Vec<_>>(),
            "raw": {
                "raw_prediction": maps.iter().map(|m| &m.prediction).collect::<Vec<_>>(),
                "model_rows": maps.iter().map(|m| m.model_rows).sum::<usize>(),
            },
        },
    })
}

/// A class as Alibi writes it: an integer when it is one.
fn class_number(class: f64) -> Value {
    if class.fract() == 0.0 && class.abs() < 9.0e15 {
        json!(class as i64)
    } else {
        json!(class)
    }
}
