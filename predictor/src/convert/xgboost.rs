//! XGBoost boosters saved as JSON (`.json`) or UBJSON (`.ubj`, and `.bst` from XGBoost 2.1
//! on), read into a [`trees::Ensemble`]. The schema is XGBoost's own
//! (doc/model.schema in dmlc/xgboost); the fields read are those of 1.0 to 3.x.
//!
//! XGBoost predicts in `f32`: a row goes to the left child when `x < split_condition`, a
//! missing value (NaN) where `default_left` says; the margin starts from the base score
//! mapped to margin space by the objective (`logit` for the logistic ones, `log` for
//! Poisson, gamma and Tweedie) and the objective's transform gives the prediction.

use serde_json::Value;

use super::trees::{Child, Ensemble, Mode, Precision, Split, Transform, Tree};

/// Reads a booster from the bytes of a model file, and its feature names when it has them.
pub(super) fn read(bytes: &[u8]) -> Result<(Ensemble, Vec<String>), String> {
    let first = bytes.iter().position(|b| !b.is_ascii_whitespace());
    let second = first.and_then(|f| {
        bytes[f + 1..]
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .map(|s| bytes[f + 1 + s])
    });
    let model: Value = match (first.map(|f| bytes[f]), second) {
        (Some(b'{'), Some(b'"' | b'}')) => {
            serde_json::from_slice(bytes).map_err(|e| format!("not XGBoost JSON: {e}"))?
        }
        (Some(b'{'), _) => super::ubjson::parse(bytes)?,
        _ => {
            return Err(
                "the legacy binary XGBoost format (before 1.0), which XGBoost itself no longer writes: load it with XGBoost 1.x or 2.x and save it again as model.json or model.ubj"
                    .to_owned(),
            );
        }
    };
    let names: Vec<String> = model
        .get("learner")
        .and_then(|l| l.get("feature_names"))
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let ensemble = from_json(&model)?;
    check_names(&names, ensemble.features)?;
    Ok((ensemble, names))
}

fn field<'a>(value: &'a Value, path: &[&str]) -> Result<&'a Value, String> {
    let mut at = value;
    for key in path {
        at = at
            .get(key)
            .ok_or_else(|| format!("not an XGBoost model: no {}", path.join(".")))?;
    }
    Ok(at)
}

/// A number XGBoost wrote as a string ("5E-1"), a number, or a one-element list of either.
fn number(value: &Value, what: &str) -> Result<f64, String> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("{what} is not a number: {value}"))
}

/// `base_score`: one value ("5E-1") or one per target ("[1E-1,2E-1]", XGBoost 3.x).
fn base_scores(value: &Value) -> Result<Vec<f64>, String> {
    let text = match value {
        Value::String(s) => s.trim(),
        other => return Ok(vec![number(other, "base_score")?]),
    };
    match text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        Some(list) => list
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("base_score is not a list of numbers: {text}"))
            })
            .collect(),
        None => Ok(vec![number(value, "base_score")?]),
    }
}

fn count(value: &Value, what: &str) -> Result<usize, String> {
    let n = number(value, what)?;
    if n < 0.0 || n.fract() != 0.0 || n > 1e9 {
        return Err(format!("{what} is not a count: {value}"));
    }
    Ok(n as usize)
}

fn array<'a>(tree: &'a Value, key: &str, t: usize) -> Result<&'a Vec<Value>, String> {
    tree.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("tree {t} has no {key}"))
}

pub(super) fn from_json(model: &Value) -> Result<Ensemble, String> {
    let learner = field(model, &["learner"])?;
    let params = field(learner, &["learner_model_param"])?;
    let objective = field(learner, &["objective", "name"])?
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let features = count(field(params, &["num_feature"])?, "num_feature")?;
    let classes = params
        .get("num_class")
        .map(|v| count(v, "num_class"))
        .transpose()?
        .unwrap_or(0);
    let num_target = params
        .get("num_target")
        .map(|v| count(v, "num_target"))
        .transpose()?
        .unwrap_or(1);
    let booster = field(learner, &["gradient_booster"])?;
    let kind = booster
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("gbtree");
    let (trees_model, weights) = match kind {
        "gbtree" => (field(booster, &["model"])?, None),
        "dart" => (
            field(booster, &["gbtree", "model"])?,
            Some(field(booster, &["weight_drop"])?),
        ),
        other => {
            return Err(format!(
                "the {other} booster is not converted (gbtree and dart are): a linear booster has no trees"
            ));
        }
    };
    let (transform, link): (Transform, fn(f64) -> f64) = match objective.as_str() {
        "binary:logistic" | "reg:logistic" => (Transform::Sigmoid { scale: 1.0 }, logit),
        "binary:logitraw" => (Transform::Identity, logit),
        "binary:hinge" => (Transform::Step, identity),
        "multi:softprob" => (Transform::Softmax, identity),
        "multi:softmax" => (Transform::ArgMax, identity),
        "count:poisson" | "reg:gamma" | "reg:tweedie" => (Transform::Exp, f64::ln),
        "reg:squarederror"
        | "reg:linear"
        | "reg:squaredlogerror"
        | "reg:pseudohubererror"
        | "reg:absoluteerror"
        | "reg:quantileerror"
        | "rank:pairwise"
        | "rank:ndcg"
        | "rank:map" => (Transform::Identity, identity),
        other => {
            return Err(format!(
                "the objective '{other}' is not converted (binary:*, multi:softprob, multi:softmax, reg:*, count:poisson, rank:* are)"
            ));
        }
    };
    let targets = if objective.starts_with("multi:") {
        if classes < 2 {
            return Err(format!("{objective} with num_class {classes}"));
        }
        classes
    } else {
        num_target.max(1)
    };
    if targets > super::trees::MAX_TARGETS {
        return Err(format!(
            "{targets} classes or targets, over the limit of {}",
            super::trees::MAX_TARGETS
        ));
    }
    let mut base: Vec<f64> = base_scores(field(params, &["base_score"])?)?
        .into_iter()
        .map(link)
        .collect();
    if base.len() == 1 && targets > 1 {
        base = vec![base[0]; targets];
    }
    if base.len() != targets {
        return Err(format!(
            "base_score has {} values for {targets} targets",
            base.len()
        ));
    }
    let info = field(trees_model, &["tree_info"])?
        .as_array()
        .ok_or("tree_info is not a list")?;
    let trees = field(trees_model, &["trees"])?
        .as_array()
        .ok_or("trees is not a list")?;
    if info.len() != trees.len() {
        return Err(format!(
            "{} trees but tree_info for {}",
            trees.len(),
            info.len()
        ));
    }
    let weights: Vec<f64> = match weights {
        Some(w) => {
            let w = w.as_array().ok_or("weight_drop is not a list")?;
            w.iter()
                .map(|v| number(v, "weight_drop"))
                .collect::<Result<_, _>>()?
        }
        None => vec![1.0; trees.len()],
    };
    if weights.len() != trees.len() {
        return Err(format!(
            "{} trees but {} dart weights",
            trees.len(),
            weights.len()
        ));
    }
    let mut out = Vec::with_capacity(trees.len());
    for (t, (tree, group)) in trees.iter().zip(info).enumerate() {
        out.push(read_tree(tree, t, count(group, "tree_info")?, weights[t])?);
    }
    let ensemble = Ensemble {
        source: format!("xgboost {objective}"),
        features,
        targets,
        precision: Precision::F32,
        trees: out,
        base,
        transform,
    };
    ensemble.check()?;
    Ok(ensemble)
}

/// Feature names, when a model file gives them, name every feature.
pub(super) fn check_names(names: &[String], features: usize) -> Result<(), String> {
    if names.is_empty() || names.len() == features {
        Ok(())
    } else {
        Err(format!(
            "{} feature names for {features} features",
            names.len()
        ))
    }
}

fn identity(v: f64) -> f64 {
    v
}

fn logit(p: f64) -> f64 {
    -(1.0 / p - 1.0).ln()
}

fn read_tree(tree: &Value, t: usize, target: usize, weight: f64) -> Result<Tree, String> {
    if let Some(size) = tree
        .get("tree_param")
        .and_then(|p| p.get("size_leaf_vector"))
        && count(size, "size_leaf_vector")? > 1
    {
        return Err(format!(
            "tree {t} has vector leaves (multi_strategy=multi_output_tree), which are not converted"
        ));
    }
    let left = array(tree, "left_children", t)?;
    let right = array(tree, "right_children", t)?;
    let index = array(tree, "split_indices", t)?;
    let condition = array(tree, "split_conditions", t)?;
    let default_left = array(tree, "default_left", t)?;
    let split_type = tree.get("split_type").and_then(Value::as_array);
    let n = left.len();
    if [
        right.len(),
        index.len(),
        condition.len(),
        default_left.len(),
    ]
    .iter()
    .any(|&l| l != n)
        || n == 0
    {
        return Err(format!("tree {t}: its node arrays differ in length"));
    }
    let int = |v: &Value| v.as_i64().or_else(|| v.as_bool().map(i64::from));
    // Nodes that are splits, numbered in order; leaves become values.
    let is_leaf = |i: usize| int(&left[i]) == Some(-1);
    let mut split_number = vec![usize::MAX; n];
    let mut splits = 0;
    for (i, number) in split_number.iter_mut().enumerate() {
        if !is_leaf(i) {
            *number = splits;
            splits += 1;
        }
    }
    let child = |c: &Value| -> Result<Child, String> {
        let i = int(c)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < n)
            .ok_or_else(|| format!("tree {t}: a child outside the tree"))?;
        Ok(if is_leaf(i) {
            Child::Leaf(number(&condition[i], "a leaf value")? * weight)
        } else {
            Child::Split(split_number[i])
        })
    };
    // Categorical splits: `categories_nodes[k]` holds the categories
    // `categories[categories_segments[k]..][..categories_sizes[k]]`, the ones that go right.
    let empty = Vec::new();
    let list = |key: &str| tree.get(key).and_then(Value::as_array).unwrap_or(&empty);
    let (cat_nodes, segments, sizes, cats) = (
        list("categories_nodes"),
        list("categories_segments"),
        list("categories_sizes"),
        list("categories"),
    );
    let categories_of = |node: usize| -> Result<Vec<f64>, String> {
        let k = cat_nodes
            .iter()
            .position(|v| int(v) == Some(node as i64))
            .ok_or_else(|| {
                format!("tree {t} node {node}: a categorical split without categories")
            })?;
        let at = |v: Option<&Value>| v.and_then(int).and_then(|i| usize::try_from(i).ok());
        let (from, size) = at(segments.get(k))
            .zip(at(sizes.get(k)))
            .ok_or_else(|| format!("tree {t} node {node}: bad category segments"))?;
        cats.get(from..from.saturating_add(size))
            .ok_or_else(|| format!("tree {t} node {node}: categories outside the list"))?
            .iter()
            .map(|c| number(c, "a category"))
            .collect()
    };
    let mut out = Vec::with_capacity(splits);
    for i in (0..n).filter(|&i| !is_leaf(i)) {
        let feature = int(&index[i])
            .and_then(|f| usize::try_from(f).ok())
            .ok_or_else(|| format!("tree {t}: a split on no feature"))?;
        let default_left = int(&default_left[i]).unwrap_or(0) != 0;
        if split_type.and_then(|s| s.get(i)).and_then(int).unwrap_or(0) != 0 {
            // XGBoost sends the split's categories right, every other value left, and a
            // missing one where default_left says.
            out.push(Split {
                feature,
                threshold: 0.0,
                mode: Mode::Member,
                categories: categories_of(i)?,
                missing_true: !default_left,
                yes: child(&right[i])?,
                no: child(&left[i])?,
            });
            continue;
        }
        out.push(Split {
            feature,
            threshold: number(&condition[i], "a split condition")?,
            mode: Mode::Lt,
            categories: Vec::new(),
            missing_true: default_left,
            yes: child(&left[i])?,
            no: child(&right[i])?,
        });
    }
    let root = if is_leaf(0) {
        Child::Leaf(number(&condition[0], "a leaf value")? * weight)
    } else {
        Child::Split(split_number[0])
    };
    Ok(Tree {
        target,
        root,
        splits: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// One tree: `x0 < 0.5` (missing: left) gives 1.0, else -1.0.
    fn model(objective: &str, tree: Value) -> Value {
        json!({"learner": {
            "learner_model_param": {"base_score": "[5E-1]", "num_class": "0", "num_feature": "2", "num_target": "1"},
            "objective": {"name": objective},
            "feature_names": ["a", "b"],
            "gradient_booster": {"name": "gbtree", "model": {"tree_info": [0], "trees": [tree]}},
        }})
    }

    fn tree() -> Value {
        json!({"left_children": [1, -1, -1], "right_children": [2, -1, -1], "split_indices": [0, 0, 0],
               "split_conditions": [0.5, 1.0, -1.0], "default_left": [1, 0, 0], "split_type": [0, 0, 0],
               "tree_param": {"size_leaf_vector": "1"}})
    }

    #[test]
    fn a_booster_becomes_trees_with_xgboosts_comparison_and_base_margin() {
        let bytes = serde_json::to_vec(&model("binary:logistic", tree())).unwrap();
        let (ensemble, names) = read(&bytes).unwrap();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(ensemble.transform, Transform::Sigmoid { scale: 1.0 });
        assert_eq!(ensemble.base, vec![0.0], "logit(0.5)");
        let split = &ensemble.trees[0].splits[0];
        assert_eq!(
            (split.mode, split.missing_true, split.yes, split.no),
            (Mode::Lt, true, Child::Leaf(1.0), Child::Leaf(-1.0))
        );
        let poisson = from_json(&model("count:poisson", tree())).unwrap();
        assert!((poisson.base[0] - 0.5f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn what_is_not_converted_says_so() {
        assert!(
            read(b"\x00\x00\x00?binf")
                .unwrap_err()
                .contains("legacy binary")
        );
        let mut categorical = tree();
        categorical["split_type"] = json!([1, 0, 0]);
        let mut with_categories = categorical.clone();
        with_categories["categories_nodes"] = json!([0]);
        with_categories["categories_segments"] = json!([0]);
        with_categories["categories_sizes"] = json!([2]);
        with_categories["categories"] = json!([3, 8]);
        let split = &from_json(&model("binary:logistic", with_categories))
            .unwrap()
            .trees[0]
            .splits[0];
        assert_eq!(
            (split.mode, &split.categories),
            (Mode::Member, &vec![3.0, 8.0])
        );
        assert_eq!((split.yes, split.missing_true), (Child::Leaf(-1.0), false));
        let mut cyclic = tree();
        cyclic["left_children"] = json!([0, -1, -1]);
        let mut linear = model("binary:logistic", tree());
        linear["learner"]["gradient_booster"] = json!({"name": "gblinear", "model": {}});
        for (m, says) in [
            (model("binary:logistic", categorical), "without categories"),
            (model("binary:logistic", cyclic), "not a tree"),
            (model("survival:cox", tree()), "survival:cox"),
            (linear, "gblinear"),
        ] {
            let why = from_json(&m).unwrap_err();
            assert!(why.contains(says), "{why}");
        }
    }
}
