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

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshserve_predictor::config::{ExplainerConfig, KernelShapConfig};
use meshserve_predictor::kernel_shap::{self, ExplainError, Explanation, Options};
use meshserve_predictor::model::ModelVersion;
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
    let instances = instances(body, features(&config))?;
    explain_instances(model, config, instances).await
}

/// Explains the rows of a V2 inference request sent to `<model>-explainer` (`name`).
pub async fn explain_v2(
    model: Arc<ModelVersion>,
    name: &str,
    request: InferRequest,
) -> Result<InferResponse, ApiError> {
    let config = explainer(&model)?;
    let instances = v2_instances(&request, features(&config))?;
    let version = model.version().to_string();
    let document = explain_instances(model, config, instances).await?;
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

fn explainer(model: &ModelVersion) -> Result<ExplainerConfig, ApiError> {
    model.config().explainer.clone().ok_or_else(|| {
        ApiError::NotFound(format!(
            "model '{}' has no explainer (config.yaml: explainer)",
            model.name()
        ))
    })
}

fn features(config: &ExplainerConfig) -> usize {
    config.background().map_or(0, |b| b.features)
}

async fn explain_instances(
    model: Arc<ModelVersion>,
    config: ExplainerConfig,
    instances: Vec<Vec<f64>>,
) -> Result<Value, ApiError> {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(config.timeout_ms);
    let limit_ms = config.timeout_ms;
    let timed_out = move |e: ExplainError| match e {
        ExplainError::Input(m) => ApiError::BadRequest(m),
        ExplainError::TimedOut => ApiError::Timeout(format!(
            "the explanation ran past its time limit of {limit_ms} ms (explainer.timeout_ms)"
        )),
        other => ApiError::Internal(other.to_string()),
    };
    let handle = tokio::runtime::Handle::current();
    let worker = Arc::clone(&model);
    let work_config = config.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let model = worker;
        match (&work_config.kernel_shap, model.tree_model()) {
            (Some(shap), _) => {
                let input = feature_input(&model).map_err(ApiError::BadRequest)?.clone();
                let explanations = instances
                    .iter()
                    .map(|x| explain_one(&handle, &model, &input, shap, deadline, x))
                    .collect::<Result<Vec<_>, ExplainError>>()
                    .map_err(timed_out)?;
                Ok(kernel_document(&model, shap, &instances, &explanations))
            }
            (None, Some(tree)) => {
                let background = work_config.background().map(|b| Arc::clone(&b.values));
                let background = background.unwrap_or_default();
                let explanations = instances
                    .iter()
                    .map(|x| tree.explain(x, &background, &mut || Instant::now() >= deadline))
                    .collect::<Result<Vec<_>, ExplainError>>()
                    .map_err(timed_out)?;
                Ok(tree_document(
                    &model,
                    tree,
                    &work_config,
                    &instances,
                    &explanations,
                ))
            }
            (None, None) => Err(ApiError::Internal(
                "the explainer's tree ensemble was not loaded".into(),
            )),
        }
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the explainer stopped: {e}")))?;
    model.observe_explain(started.elapsed());
    answer
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

fn instances(body: &[u8], features: usize) -> Result<Vec<Vec<f64>>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Body {
        instances: Vec<Vec<f64>>,
    }
    let body: Body = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "an explain request is {{\"instances\": [[{features} numbers], ...]}}: {e}"
        ))
    })?;
    if body.instances.is_empty() || body.instances.len() > MAX_INSTANCES {
        return Err(ApiError::BadRequest(format!(
            "1 to {MAX_INSTANCES} instances can be explained at once, not {}",
            body.instances.len()
        )));
    }
    if let Some((i, row)) = body
        .instances
        .iter()
        .enumerate()
        .find(|(_, r)| r.len() != features)
    {
        return Err(ApiError::BadRequest(format!(
            "instance {i} has {} features; the explainer's background rows have {features}",
            row.len()
        )));
    }
    Ok(body.instances)
}

/// The rows of a V2 request's one input (`[rows, features]`, or `[features]` for one row).
fn v2_instances(request: &InferRequest, features: usize) -> Result<Vec<Vec<f64>>, ApiError> {
    let [input] = request.inputs.as_slice() else {
        return Err(ApiError::BadRequest(format!(
            "an explain request has one input, the rows to explain ([rows, {features}]), not {}",
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
                "input '{}' is {:?}: the rows to explain are numbers (FP32, FP64, INT32, INT64)",
                input.name,
                input.datatype()
            )));
        }
    };
    let width = match input.shape.as_slice() {
        [_, w] | [w] => usize::try_from(*w).unwrap_or(0),
        _ => 0,
    };
    if width != features || values.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "input '{}' has shape {:?}; the explainer takes [rows, {features}]",
            input.name, input.shape
        )));
    }
    let rows: Vec<Vec<f64>> = values.chunks_exact(features).map(<[f64]>::to_vec).collect();
    if rows.len() > MAX_INSTANCES {
        return Err(ApiError::BadRequest(format!(
            "1 to {MAX_INSTANCES} instances can be explained at once, not {}",
            rows.len()
        )));
    }
    Ok(rows)
}

fn explain_one(
    handle: &tokio::runtime::Handle,
    model: &ModelVersion,
    input: &TensorSpec,
    config: &KernelShapConfig,
    deadline: Instant,
    x: &[f64],
) -> Result<Explanation, ExplainError> {
    let mut run = |rows: &[f64], n: usize| -> Result<Vec<f64>, String> {
        let request = rows_request(input, rows, n);
        let response = handle
            .block_on(model.infer(request))
            .map_err(|e| e.to_string())?;
        numeric_outputs(&response.outputs, n)
    };
    let options = Options {
        max_coalitions: config.max_coalitions,
        deadline: Some(deadline),
        ..Options::default()
    };
    kernel_shap::explain(&mut run, x, &config.background.values, &options)
}

/// `n` rows as the model's one input, in its float type ([`feature_input`]).
fn rows_request(input: &TensorSpec, rows: &[f64], n: usize) -> InferRequest {
    let data = match input.datatype {
        DataType::Fp32 => TensorData::Fp32(rows.iter().map(|v| *v as f32).collect()),
        _ => TensorData::Fp64(rows.to_vec()),
    };
    InferRequest {
        id: None,
        parameters: Default::default(),
        inputs: vec![InputTensor {
            name: input.name.clone(),
            shape: vec![n as i64, (rows.len() / n.max(1)) as i64],
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
