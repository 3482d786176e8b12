//! Triton's classification extension: an output requested with `classification: K` comes back
//! as BYTES holding the top K classes of each row, as `"<score>:<index>"` or, when the model
//! has labels, `"<score>:<index>:<label>"`.

use meshserve_proto::{OutputTensor, TensorData};

use crate::error::{PredictorError, Result};

/// Replaces a score output (shape `[C]` or `[B, C]`) by its top-`k` classes per row.
pub(crate) fn classify(output: OutputTensor, k: usize, labels: &[String]) -> Result<OutputTensor> {
    let fail =
        |message: String| PredictorError::invalid(format!("output '{}': {message}", output.name));
    let scores: Vec<(f64, String)> = match &output.data {
        TensorData::Fp16(v) => v.iter().map(|x| (x.to_f64(), x.to_string())).collect(),
        TensorData::Fp32(v) => v.iter().map(|x| (f64::from(*x), x.to_string())).collect(),
        TensorData::Fp64(v) => v.iter().map(|x| (*x, x.to_string())).collect(),
        TensorData::Int32(v) => v.iter().map(|x| (f64::from(*x), x.to_string())).collect(),
        TensorData::Int64(v) => v.iter().map(|x| (*x as f64, x.to_string())).collect(),
        other => {
            return Err(fail(format!(
                "classification needs numeric scores, not {}",
                other.datatype()
            )));
        }
    };
    let (batch, classes) = match output.shape.as_slice() {
        [c] => (None, *c),
        [b, c] => (Some(*b), *c),
        shape => {
            return Err(fail(format!(
                "classification needs scores of shape [C] or [B, C], not {shape:?}"
            )));
        }
    };
    let classes = usize::try_from(classes).unwrap_or(0).max(1);
    let k = k.min(classes);
    let mut top = Vec::with_capacity(scores.len() / classes * k);
    for row in scores.chunks(classes) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].0.total_cmp(&row[a].0).then(a.cmp(&b)));
        top.extend(order.into_iter().take(k).map(|index| {
            let (_, score) = &row[index];
            match labels.get(index) {
                Some(label) => format!("{score}:{index}:{label}").into_bytes(),
                None => format!("{score}:{index}").into_bytes(),
            }
        }));
    }
    let k = i64::try_from(k).unwrap_or(i64::MAX);
    let shape = match batch {
        Some(b) => vec![b, k],
        None => vec![k],
    };
    Ok(OutputTensor {
        name: output.name,
        shape,
        data: TensorData::Bytes(top),
        parameters: output.parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshserve_proto::Parameters;

    fn output(shape: Vec<i64>, data: TensorData) -> OutputTensor {
        OutputTensor {
            name: "p".into(),
            shape,
            data,
            parameters: Parameters::new(),
        }
    }

    #[test]
    fn top_k_per_row_with_labels() {
        let scores = output(
            vec![2, 3],
            TensorData::Fp32(vec![0.1, 0.7, 0.2, 0.5, 0.25, 0.25]),
        );
        let labels = ["a".to_owned(), "b".to_owned()];
        let out = classify(scores, 2, &labels).unwrap();
        assert_eq!(out.shape, vec![2, 2]);
        let strings: Vec<String> = match out.data {
            TensorData::Bytes(v) => v
                .into_iter()
                .map(|b| String::from_utf8(b).unwrap())
                .collect(),
            other => panic!("{other:?}"),
        };
        assert_eq!(strings, ["0.7:1:b", "0.2:2", "0.5:0:a", "0.25:1:b"]);
    }

    #[test]
    fn k_is_capped_and_non_scores_are_refused() {
        let out = classify(output(vec![2], TensorData::Int64(vec![3, 9])), 5, &[]).unwrap();
        assert_eq!(out.shape, vec![2]);
        assert_eq!(
            out.data,
            TensorData::Bytes(vec![b"9:1".to_vec(), b"3:0".to_vec()])
        );
        assert!(classify(output(vec![1], TensorData::Bool(vec![true])), 1, &[]).is_err());
        assert!(classify(output(vec![1, 1, 1], TensorData::Fp32(vec![1.0])), 1, &[]).is_err());
    }
}
