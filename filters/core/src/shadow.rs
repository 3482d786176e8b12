//! Whether a shadow revision's answer agrees with the primary's: the same prediction, read
//! from either protocol's JSON. For each output (V2) or each prediction (V1), numeric rows are
//! compared by their arg-max (the class), anything else by value.

use serde_json::Value;

/// `Some(true)` if the two answers predict the same, `Some(false)` if not, `None` if either is
/// not a JSON inference answer (binary responses, errors).
pub fn agree(primary: &[u8], shadow: &[u8]) -> Option<bool> {
    let a: Value = serde_json::from_slice(primary).ok()?;
    let b: Value = serde_json::from_slice(shadow).ok()?;
    let (pa, pb) = (predictions(&a)?, predictions(&b)?);
    Some(pa.len() == pb.len() && pa.iter().zip(&pb).all(|(x, y)| same(x, y)))
}

/// The predictions in an answer: V2 `outputs[].data`, or V1 `predictions`.
fn predictions(answer: &Value) -> Option<Vec<&Value>> {
    if let Some(outputs) = answer.get("outputs").and_then(Value::as_array) {
        return outputs.iter().map(|o| o.get("data")).collect();
    }
    answer.get("predictions").map(|p| vec![p])
}

fn same(a: &Value, b: &Value) -> bool {
    match (argmax(a), argmax(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The index of the largest number in a flat numeric list (nested lists: per row).
fn argmax(value: &Value) -> Option<Vec<usize>> {
    let items = value.as_array()?;
    if items.iter().all(Value::is_number) {
        let best = items.iter().filter_map(Value::as_f64).enumerate().fold(
            None,
            |best: Option<(usize, f64)>, (i, x)| match best {
                Some((_, b)) if b >= x => best,
                _ => Some((i, x)),
            },
        )?;
        return Some(vec![best.0]);
    }
    items
        .iter()
        .map(|row| argmax(row).and_then(|v| v.first().copied()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_class_agrees_despite_different_scores() {
        let a = br#"{"outputs": [{"name": "p", "data": [0.1, 0.7, 0.2]}]}"#;
        let b = br#"{"outputs": [{"name": "p", "data": [0.2, 0.5, 0.3]}]}"#;
        let c = br#"{"outputs": [{"name": "p", "data": [0.6, 0.3, 0.1]}]}"#;
        assert_eq!(agree(a, b), Some(true));
        assert_eq!(agree(a, c), Some(false));
    }

    #[test]
    fn v1_predictions_compare_by_value_or_class() {
        assert_eq!(
            agree(br#"{"predictions": [3, 7]}"#, br#"{"predictions": [3, 7]}"#),
            Some(true)
        );
        assert_eq!(
            agree(br#"{"predictions": [3, 7]}"#, br#"{"predictions": [3, 1]}"#),
            Some(false)
        );
        assert_eq!(
            agree(
                br#"{"predictions": [[0.1, 0.9], [0.8, 0.2]]}"#,
                br#"{"predictions": [[0.3, 0.7], [0.6, 0.4]]}"#
            ),
            Some(true)
        );
    }

    #[test]
    fn non_answers_are_not_compared() {
        assert_eq!(agree(b"not json", br#"{"predictions": []}"#), None);
        assert_eq!(agree(br#"{"error": "x"}"#, br#"{"predictions": []}"#), None);
    }
}
