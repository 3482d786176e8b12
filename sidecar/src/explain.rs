//! `POST /v1/models/<m>:explain`: the model's built-in explainer, run next to the model with
//! batched calls to it (no second server, no pickle). KernelSHAP
//! ([`meshserve_predictor::kernel_shap`]) answers an Alibi-shaped document, as KServe's
//! explainers did:
//!
//! ```json
//! {"meta": {"name": "KernelShap", "type": ["blackbox"], "explanations": ["local"],
//!           "params": {"link": "identity", "max_coalitions": 2048, "background_rows": 10}},
//!  "data": {"shap_values": [[[...per feature] per instance] per output],
//!           "expected_value": [...per output], "feature_names": [...],
//!           "raw": {"raw_prediction": [[...per output] per instance], "instances": [...],
//!                   "exact": true, "coalitions": 14, "model_rows": 151}}}
//! ```

use std::sync::Arc;

use meshserve_predictor::config::{ExplainerConfig, KernelShapConfig};
use meshserve_predictor::kernel_shap::{self, ExplainError, Options};
use meshserve_predictor::model::ModelVersion;
use meshserve_proto::{DataType, InferRequest, InputTensor, TensorData, TensorSpec};
use serde_json::{Value, json};

use crate::error::ApiError;

/// The most instances one `:explain` request may ask about (each is a whole explanation).
pub const MAX_INSTANCES: usize = 16;

/// Explains the instances of a KServe V1 body (`{"instances": [[...], ...]}`).
pub async fn explain(model: Arc<ModelVersion>, body: &[u8]) -> Result<Value, ApiError> {
    let Some(ExplainerConfig {
        kernel_shap: config,
    }) = model.config().explainer.clone()
    else {
        return Err(ApiError::NotFound(format!(
            "model '{}' has no explainer (config.yaml: explainer.kernel_shap)",
            model.name()
        )));
    };
    let input = feature_input(&model).map_err(ApiError::BadRequest)?.clone();
    let instances = instances(body, config.background.features)?;
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let explanations = instances
            .iter()
            .map(|x| explain_one(&handle, &model, &input, &config, x))
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(document(&model, &config, &instances, &explanations))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the explainer stopped: {e}")))?
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

fn explain_one(
    handle: &tokio::runtime::Handle,
    model: &ModelVersion,
    input: &TensorSpec,
    config: &KernelShapConfig,
    x: &[f64],
) -> Result<kernel_shap::Explanation, ApiError> {
    let mut run = |rows: &[f64], n: usize| -> Result<Vec<f64>, String> {
        let request = rows_request(input, rows, n);
        let response = handle
            .block_on(model.infer(request))
            .map_err(|e| e.to_string())?;
        numeric_outputs(&response.outputs, n)
    };
    let options = Options {
        max_coalitions: config.max_coalitions,
        ..Options::default()
    };
    kernel_shap::explain(&mut run, x, &config.background.values, &options).map_err(|e| match e {
        ExplainError::Input(m) => ApiError::BadRequest(m),
        other => ApiError::Internal(other.to_string()),
    })
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

fn document(
    model: &ModelVersion,
    config: &KernelShapConfig,
    instances: &[Vec<f64>],
    explanations: &[kernel_shap::Explanation],
) -> Value {
    let features = config.background.features;
    let outputs = explanations.first().map_or(0, |e| e.shap_values.len());
    let shap_values: Vec<Vec<&Vec<f64>>> = (0..outputs)
        .map(|o| {
            explanations
                .iter()
                .filter_map(|e| e.shap_values.get(o))
                .collect()
        })
        .collect();
    let names = model
        .feature_matrix()
        .map(|(_, names, _)| names.to_vec())
        .filter(|n| n.len() == features)
        .unwrap_or_else(|| (0..features).map(|i| format!("feature_{i}")).collect());
    json!({
        "meta": {
            "name": "KernelShap",
            "type": ["blackbox"],
            "explanations": ["local"],
            "params": {"link": "identity", "max_coalitions": config.max_coalitions,
                       "background_rows": config.background.values.len() / features.max(1)},
        },
        "data": {
            "shap_values": shap_values,
            "expected_value": explanations.first().map(|e| e.expected_value.clone()),
            "feature_names": names,
            "raw": {
                "raw_prediction": explanations.iter().map(|e| &e.prediction).collect::<Vec<_>>(),
                "instances": instances,
                "exact": explanations.iter().all(|e| e.exact),
                "coalitions": explanations.first().map_or(0, |e| e.coalitions),
                "model_rows": explanations.iter().map(|e| e.model_rows).sum::<usize>(),
            },
        },
    })
}
