//! The response steps: softmax, argmax, top-k and threshold over the last axis of an output,
//! with labels from the configuration, and output renaming.

use meshserve_proto::infer::{InferResponse, OutputTensor, Parameters};
use meshserve_proto::tensor::TensorData;
use serde::Deserialize;

use super::error::TransformError;

/// One response step. `output` names the output it works on (default: the first).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseStep {
    /// Softmax over the last axis (FP32).
    Softmax {
        #[serde(default)]
        output: Option<String>,
    },
    /// The index of the largest value over the last axis (INT64), or its label (BYTES).
    Argmax {
        #[serde(default)]
        output: Option<String>,
    },
    /// The `k` largest values over the last axis: the output becomes their indices (INT64) or
    /// labels (BYTES), and `<output>_scores` (FP32) holds the values, best first.
    TopK {
        k: usize,
        #[serde(default)]
        output: Option<String>,
    },
    /// 1 where a value is at least `value`, else 0 (INT64); with labels, the first label for 0
    /// and the second for 1 (BYTES).
    Threshold {
        value: f64,
        #[serde(default)]
        output: Option<String>,
    },
    /// Renames outputs: `{from: to}`.
    Rename(std::collections::BTreeMap<String, String>),
}

/// Runs the steps over a response.
pub fn apply(
    response: &mut InferResponse,
    steps: &[ResponseStep],
    labels: &[String],
) -> Result<(), TransformError> {
    for step in steps {
        match step {
            ResponseStep::Softmax { output } => {
                let o = output_mut(response, output.as_deref())?;
                let (rows, width) = rows(o)?;
                let mut values = numbers(o)?;
                for row in values.chunks_exact_mut(width) {
                    let top = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    row.iter_mut().for_each(|v| *v = (*v - top).exp());
                    let total: f64 = row.iter().sum();
                    row.iter_mut().for_each(|v| *v /= total);
                }
                debug_assert_eq!(values.len(), rows * width);
                o.data = TensorData::Fp32(values.into_iter().map(|v| v as f32).collect());
            }
            ResponseStep::Argmax { output } => {
                let o = output_mut(response, output.as_deref())?;
                let (rows, width) = rows(o)?;
                let values = numbers(o)?;
                let best: Vec<usize> = values
                    .chunks_exact(width)
                    .map(|r| ranked(r, 1))
                    .map(|r| r.first().copied().unwrap_or(0))
                    .collect();
                o.shape = batch_shape(&o.shape, None);
                o.data = indices_or_labels(&best, labels, &o.name)?;
                debug_assert_eq!(best.len(), rows);
            }
            ResponseStep::TopK { k, output } => {
                let o = output_mut(response, output.as_deref())?;
                let (_, width) = rows(o)?;
                let k = (*k).min(width);
                let values = numbers(o)?;
                let mut indices = Vec::new();
                let mut scores = Vec::new();
                for row in values.chunks_exact(width) {
                    for i in ranked(row, k) {
                        indices.push(i);
                        scores.push(row.get(i).copied().unwrap_or(f64::NAN) as f32);
                    }
                }
                let shape = batch_shape(&o.shape, Some(k));
                o.data = indices_or_labels(&indices, labels, &o.name)?;
                o.shape.clone_from(&shape);
                let scores = OutputTensor {
                    name: format!("{}_scores", o.name),
                    shape,
                    data: TensorData::Fp32(scores),
                    parameters: Parameters::new(),
                };
                response.outputs.push(scores);
            }
            ResponseStep::Threshold { value, output } => {
                let o = output_mut(response, output.as_deref())?;
                let flags: Vec<usize> = numbers(o)?
                    .iter()
                    .map(|v| usize::from(*v >= *value))
                    .collect();
                o.data = indices_or_labels(&flags, labels, &o.name)?;
            }
            ResponseStep::Rename(names) => {
                for o in &mut response.outputs {
                    if let Some(to) = names.get(&o.name) {
                        o.name.clone_from(to);
                    }
                }
            }
        }
    }
    Ok(())
}

fn output_mut<'a>(
    response: &'a mut InferResponse,
    name: Option<&str>,
) -> Result<&'a mut OutputTensor, TransformError> {
    let names: Vec<String> = response
        .outputs
        .iter()
        .map(|o| format!("'{}'", o.name))
        .collect();
    let found = match name {
        Some(name) => response.outputs.iter_mut().find(|o| o.name == name),
        None => response.outputs.first_mut(),
    };
    found.ok_or_else(|| {
        TransformError::internal(format!(
            "the transformer's response steps name output '{}', but the model answered with [{}]",
            name.unwrap_or("(first)"),
            names.join(", ")
        ))
    })
}

/// (rows, width of the last axis); a 1-D output is one value per row.
fn rows(o: &OutputTensor) -> Result<(usize, usize), TransformError> {
    let width = match o.shape.as_slice() {
        [_] => 1,
        [.., last] => usize::try_from(*last).unwrap_or(0),
        [] => 1,
    };
    if width == 0 || !o.data.len().is_multiple_of(width) {
        return Err(TransformError::internal(format!(
            "output '{}' of shape {:?} has no last axis to work along",
            o.name, o.shape
        )));
    }
    Ok((o.data.len() / width, width))
}

/// The shape of a per-row result: the batch dimensions, plus `k` if given.
fn batch_shape(shape: &[i64], k: Option<usize>) -> Vec<i64> {
    let mut out: Vec<i64> = match shape {
        [] | [_] => shape.to_vec(),
        [rest @ .., _] => rest.to_vec(),
    };
    if let Some(k) = k {
        out.push(i64::try_from(k).unwrap_or(i64::MAX));
    }
    out
}

fn numbers(o: &OutputTensor) -> Result<Vec<f64>, TransformError> {
    let out: Vec<f64> = match &o.data {
        TensorData::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
        TensorData::Uint8(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::Uint16(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::Uint32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::Uint64(v) => v.iter().map(|&x| x as f64).collect(),
        TensorData::Int8(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::Int16(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::Int32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::Int64(v) => v.iter().map(|&x| x as f64).collect(),
        TensorData::Fp16(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::Fp32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::Fp64(v) => v.clone(),
        TensorData::Bytes(_) => {
            return Err(TransformError::internal(format!(
                "output '{}' is BYTES: the response steps need numbers",
                o.name
            )));
        }
    };
    Ok(out)
}

/// The indices of the `k` largest values, best first (ties: the lower index first; NaN last).
fn ranked(row: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    let key = |i: &usize| {
        row.get(*i)
            .copied()
            .filter(|v| !v.is_nan())
            .unwrap_or(f64::NEG_INFINITY)
    };
    order.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
    order.truncate(k);
    order
}

fn indices_or_labels(
    indices: &[usize],
    labels: &[String],
    output: &str,
) -> Result<TensorData, TransformError> {
    if labels.is_empty() {
        return Ok(TensorData::Int64(
            indices
                .iter()
                .map(|&i| i64::try_from(i).unwrap_or(i64::MAX))
                .collect(),
        ));
    }
    indices
        .iter()
        .map(|&i| {
            labels.get(i).map(|l| l.as_bytes().to_vec()).ok_or_else(|| {
                TransformError::internal(format!(
                    "output '{output}': class {i} has no label (the transformer has {} labels)",
                    labels.len()
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(TensorData::Bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(shape: Vec<i64>, values: Vec<f32>) -> InferResponse {
        InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            parameters: Parameters::new(),
            outputs: vec![OutputTensor {
                name: "logits".into(),
                shape,
                data: TensorData::Fp32(values),
                parameters: Parameters::new(),
            }],
        }
    }

    #[test]
    fn softmax_argmax_top_k_match_hand_computed_values() {
        let mut r = response(vec![2, 3], vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0]);
        let steps = [ResponseStep::Softmax { output: None }];
        apply(&mut r, &steps, &[]).unwrap();
        let TensorData::Fp32(p) = &r.outputs[0].data else {
            panic!("softmax gives FP32")
        };
        // e^1, e^2, e^3 over their sum: 0.0900, 0.2447, 0.6652.
        for (got, want) in p.iter().zip([
            0.090_030_6,
            0.244_728_5,
            0.665_240_9,
            1. / 3.,
            1. / 3.,
            1. / 3.,
        ]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }

        let mut r = response(vec![2, 3], vec![1.0, 5.0, 3.0, 9.0, 0.0, 9.0]);
        apply(&mut r, &[ResponseStep::Argmax { output: None }], &[]).unwrap();
        assert_eq!(r.outputs[0].data, TensorData::Int64(vec![1, 0]));
        assert_eq!(r.outputs[0].shape, vec![2]);

        let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut r = response(vec![2, 3], vec![1.0, 5.0, 3.0, 9.0, 0.0, 8.0]);
        apply(
            &mut r,
            &[ResponseStep::TopK {
                k: 2,
                output: Some("logits".into()),
            }],
            &labels,
        )
        .unwrap();
        assert_eq!(
            r.outputs[0].data,
            TensorData::Bytes(vec![
                b"b".to_vec(),
                b"c".to_vec(),
                b"a".to_vec(),
                b"c".to_vec()
            ])
        );
        assert_eq!(r.outputs[0].shape, vec![2, 2]);
        assert_eq!(r.outputs[1].name, "logits_scores");
        assert_eq!(
            r.outputs[1].data,
            TensorData::Fp32(vec![5.0, 3.0, 9.0, 8.0])
        );
    }

    #[test]
    fn threshold_and_rename() {
        let mut r = response(vec![3, 1], vec![0.2, 0.5, 0.9]);
        let labels: Vec<String> = ["no", "yes"].map(String::from).to_vec();
        let mut names = std::collections::BTreeMap::new();
        names.insert("logits".to_owned(), "fraud".to_owned());
        apply(
            &mut r,
            &[
                ResponseStep::Threshold {
                    value: 0.5,
                    output: None,
                },
                ResponseStep::Rename(names),
            ],
            &labels,
        )
        .unwrap();
        assert_eq!(r.outputs[0].name, "fraud");
        assert_eq!(
            r.outputs[0].data,
            TensorData::Bytes(vec![b"no".to_vec(), b"yes".to_vec(), b"yes".to_vec()])
        );
    }

    #[test]
    fn missing_outputs_and_labels_are_reported() {
        let mut r = response(vec![1, 3], vec![1.0, 5.0, 3.0]);
        let err = apply(
            &mut r,
            &[ResponseStep::Softmax {
                output: Some("probs".into()),
            }],
            &[],
        )
        .unwrap_err();
        assert!(err.message.contains("'logits'"), "{err:?}");
        let err = apply(
            &mut r,
            &[ResponseStep::Argmax { output: None }],
            &["only".into()],
        )
        .unwrap_err();
        assert!(err.message.contains("class 1 has no label"), "{err:?}");
    }
}
