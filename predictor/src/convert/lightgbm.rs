//! LightGBM models in its text format (`model.txt`, `.bst` as KServe's lgbserver names it;
//! what `Booster.save_model` writes), read into a [`trees::Ensemble`].
//!
//! LightGBM predicts in `f64`: a row goes to the left child when `x <= threshold`. A missing
//! value (NaN) goes where `decision_type`'s default-left bit says when the split's missing
//! type is NaN, and is read as 0 when it is None. Leaves already carry the shrinkage. The
//! objective's transform gives the prediction (`sigmoid:S` scales the logistic).

use std::collections::HashMap;

use super::trees::{Child, Ensemble, Mode, Precision, Split, Transform, Tree};

/// Reads a model from the text of a model file, and its feature names.
pub(super) fn read(text: &str) -> Result<(Ensemble, Vec<String>), String> {
    let mut lines = text.lines().map(str::trim);
    match lines.next() {
        Some("tree") => {}
        _ => return Err("not a LightGBM text model (its first line is not 'tree')".to_owned()),
    }
    let mut header: HashMap<&str, &str> = HashMap::new();
    let mut flags: Vec<&str> = Vec::new();
    let mut blocks: Vec<HashMap<&str, &str>> = Vec::new();
    let mut ended = false;
    for line in lines {
        if line == "end of trees" {
            ended = true;
            break;
        }
        if line.is_empty() {
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        if key == "Tree" {
            blocks.push(HashMap::new());
        } else if let Some(block) = blocks.last_mut() {
            block.insert(key, value);
        } else if value.is_empty() && !line.contains('=') {
            flags.push(key);
        } else {
            header.insert(key, value);
        }
    }
    let get = |key: &str| {
        header
            .get(key)
            .copied()
            .ok_or_else(|| format!("not a LightGBM model: no {key}"))
    };
    let int = |key: &str| -> Result<usize, String> {
        get(key)?
            .parse::<usize>()
            .map_err(|_| format!("{key} is not a count"))
    };
    if !ended {
        return Err("the model ends before 'end of trees' (truncated?)".to_owned());
    }
    let features = int("max_feature_idx")?
        .checked_add(1)
        .ok_or("max_feature_idx is not a count")?;
    let classes = int("num_class")?;
    if classes > super::trees::MAX_TARGETS {
        return Err(format!(
            "{classes} classes, over the limit of {}",
            super::trees::MAX_TARGETS
        ));
    }
    let per_iteration = int("num_tree_per_iteration")?.max(1);
    let objective = header.get("objective").copied().unwrap_or("regression");
    let mut words = objective.split_whitespace();
    let name = words.next().unwrap_or("regression");
    let options: HashMap<&str, &str> = words.filter_map(|w| w.split_once(':')).collect();
    if objective.split_whitespace().any(|w| w == "sqrt") {
        return Err(
            "a regression objective with sqrt (the label transform) is not converted".into(),
        );
    }
    let scale = match options.get("sigmoid") {
        Some(s) => s
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| format!("objective {objective}: sigmoid is not a positive number"))?,
        None => 1.0,
    };
    let transform = match name {
        "binary" | "multiclassova" | "multiova" | "ova" => Transform::Sigmoid { scale },
        "cross_entropy" | "xentropy" => Transform::Sigmoid { scale: 1.0 },
        "multiclass" | "softmax" => Transform::Softmax,
        "poisson" | "gamma" | "tweedie" => Transform::Exp,
        "regression" | "regression_l2" | "l2" | "mean_squared_error" | "mse" | "regression_l1"
        | "l1" | "huber" | "fair" | "quantile" | "mape" | "lambdarank" | "rank_xendcg"
        | "custom" | "none" => Transform::Identity,
        other => {
            return Err(format!(
                "the objective '{other}' is not converted (binary, multiclass, multiclassova, regression and its variants, poisson, gamma, tweedie, lambdarank, cross_entropy are)"
            ));
        }
    };
    let targets = if classes > 1 { classes } else { 1 };
    if per_iteration != targets {
        return Err(format!(
            "{per_iteration} trees per iteration for {targets} outputs"
        ));
    }
    let average = flags.contains(&"average_output");
    let iterations = (blocks.len() / per_iteration).max(1) as f64;
    let mut trees = Vec::with_capacity(blocks.len());
    let mut budget = MAX_EXPANDED_SPLITS;
    for (t, block) in blocks.iter().enumerate() {
        let mut tree = read_tree(block, t, t % per_iteration, &mut budget)?;
        if average {
            tree.scale_leaves(1.0 / iterations);
        }
        trees.push(tree);
    }
    let ensemble = Ensemble {
        source: format!("lightgbm {objective}"),
        features,
        targets,
        precision: Precision::F64,
        trees,
        base: vec![0.0; targets],
        transform,
    };
    ensemble.check()?;
    let names: Vec<String> = header
        .get("feature_names")
        .map(|n| n.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    super::xgboost::check_names(&names, ensemble.features)?;
    Ok((ensemble, names))
}

fn list<T: std::str::FromStr>(
    block: &HashMap<&str, &str>,
    key: &str,
    t: usize,
) -> Result<Vec<T>, String> {
    let Some(text) = block.get(key) else {
        return Err(format!("tree {t} has no {key}"));
    };
    text.split_whitespace()
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| format!("tree {t}: {key} holds '{v}'"))
        })
        .collect()
}

const CATEGORICAL: u8 = 1;
const DEFAULT_LEFT: u8 = 2;

fn read_tree(
    block: &HashMap<&str, &str>,
    t: usize,
    target: usize,
    budget: &mut usize,
) -> Result<Tree, String> {
    if block.get("is_linear").is_some_and(|v| *v != "0") {
        return Err(format!(
            "tree {t} is a linear tree (linear_tree=true), which is not converted"
        ));
    }
    let leaves: usize = block
        .get("num_leaves")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("tree {t} has no num_leaves"))?;
    let leaf_value: Vec<f64> = list(block, "leaf_value", t)?;
    if leaf_value.len() != leaves {
        return Err(format!(
            "tree {t}: {} leaf values for {leaves} leaves",
            leaf_value.len()
        ));
    }
    if leaves == 0 {
        return Err(format!("tree {t} has no leaves"));
    }
    if leaves == 1 {
        return Ok(Tree {
            target,
            root: Child::Leaf(leaf_value[0]),
            splits: Vec::new(),
        });
    }
    let feature: Vec<usize> = list(block, "split_feature", t)?;
    let threshold: Vec<f64> = list(block, "threshold", t)?;
    let decision: Vec<u8> = list(block, "decision_type", t)?;
    let left: Vec<i64> = list(block, "left_child", t)?;
    let right: Vec<i64> = list(block, "right_child", t)?;
    let n = leaves - 1;
    if [
        feature.len(),
        threshold.len(),
        decision.len(),
        left.len(),
        right.len(),
    ]
    .iter()
    .any(|&l| l != n)
    {
        return Err(format!("tree {t}: its node lists differ in length"));
    }
    let child = |c: i64| -> Result<Child, String> {
        if c >= 0 {
            usize::try_from(c)
                .ok()
                .filter(|&i| i < n)
                .map(Child::Split)
                .ok_or_else(|| format!("tree {t}: a child outside the tree"))
        } else {
            usize::try_from(!c)
                .ok()
                .and_then(|l| leaf_value.get(l))
                .map(|&v| Child::Leaf(v))
                .ok_or_else(|| format!("tree {t}: a leaf outside the tree"))
        }
    };
    let categorical = decision.iter().any(|k| k & CATEGORICAL != 0);
    let (boundaries, bitsets): (Vec<usize>, Vec<u32>) = if categorical {
        (
            list(block, "cat_boundaries", t)?,
            list(block, "cat_threshold", t)?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let mut splits = Vec::with_capacity(n);
    let mut zeros = Vec::new();
    for i in 0..n {
        let kind = decision[i];
        if kind & CATEGORICAL != 0 {
            // The threshold indexes the split's bitset of categories that go left; NaN and
            // negative values go right.
            let set = threshold[i];
            let words = (set >= 0.0 && set.fract() == 0.0)
                .then_some(set as usize)
                .and_then(|c| Some((*boundaries.get(c)?, *boundaries.get(c + 1)?)))
                .and_then(|(from, to)| bitsets.get(from..to))
                .ok_or_else(|| {
                    format!("tree {t} node {i}: a categorical split without its categories")
                })?;
            let categories: Vec<f64> = words
                .iter()
                .enumerate()
                .flat_map(|(w, &word)| {
                    (0..32)
                        .filter(move |b| word & (1 << b) != 0)
                        .map(move |b| (w * 32 + b) as f64)
                })
                .collect();
            splits.push(Split {
                feature: feature[i],
                threshold: 0.0,
                mode: Mode::Member,
                categories,
                missing_true: false,
                yes: child(left[i])?,
                no: child(right[i])?,
            });
            continue;
        }
        let default_left = kind & DEFAULT_LEFT != 0;
        let missing_true = match (kind >> 2) & 3 {
            // None: NaN is read as zero.
            0 => 0.0 <= threshold[i],
            2 => default_left,
            // Zero: NaN and zero take the default direction. Where the comparison would send
            // zero the other way, a test for zero goes first (see `expand_zeros`).
            1 => {
                if default_left != (0.0 <= threshold[i]) {
                    zeros.push(i);
                }
                default_left
            }
            _ => return Err(format!("tree {t} node {i}: an unknown missing type")),
        };
        splits.push(Split {
            feature: feature[i],
            threshold: threshold[i],
            mode: Mode::Leq,
            categories: Vec::new(),
            missing_true,
            yes: child(left[i])?,
            no: child(right[i])?,
        });
    }
    let tree = Tree {
        target,
        root: Child::Split(0),
        splits,
    };
    if zeros.is_empty() {
        return Ok(tree);
    }
    let mut marked = vec![false; tree.splits.len()];
    for &i in &zeros {
        marked[i] = true;
    }
    expand_zeros(&tree, &marked, budget).map_err(|e| format!("tree {t}: {e}"))
}

/// The most splits a model's trees may add once its zero-as-missing splits are expanded.
const MAX_EXPANDED_SPLITS: usize = 1 << 22;

/// `tree` with a test `x == 0` before each split in `zeros`, sending zero where the split's
/// missing values go (its `yes` branch when `missing_true`): the subtree that way is copied,
/// so the result stays a tree. Built with an explicit stack, and bounded.
fn expand_zeros(tree: &Tree, zeros: &[bool], budget: &mut usize) -> Result<Tree, String> {
    #[derive(Clone, Copy)]
    enum Slot {
        Root,
        Yes(usize),
        No(usize),
    }
    let mut out: Vec<Split> = Vec::new();
    let mut root = tree.root;
    let mut stack = vec![(tree.root, Slot::Root)];
    while let Some((child, slot)) = stack.pop() {
        let new = match child {
            Child::Leaf(v) => Child::Leaf(v),
            Child::Split(i) => {
                let split = tree
                    .splits
                    .get(i)
                    .ok_or("a child outside the tree")?
                    .clone();
                let at = out.len();
                let copied = Child::Split(at);
                if zeros.get(i).copied().unwrap_or(false) {
                    let default = if split.missing_true {
                        split.yes
                    } else {
                        split.no
                    };
                    out.push(Split {
                        feature: split.feature,
                        threshold: 0.0,
                        mode: Mode::Eq,
                        categories: Vec::new(),
                        missing_true: false,
                        yes: default,
                        no: Child::Split(at + 1),
                    });
                    stack.push((default, Slot::Yes(at)));
                    out.push(split.clone());
                    stack.push((split.yes, Slot::Yes(at + 1)));
                    stack.push((split.no, Slot::No(at + 1)));
                } else {
                    out.push(split.clone());
                    stack.push((split.yes, Slot::Yes(at)));
                    stack.push((split.no, Slot::No(at)));
                }
                if out.len() > tree.splits.len() + *budget {
                    return Err(format!(
                        "the model's trees grow by over {MAX_EXPANDED_SPLITS} splits once their zero-as-missing splits are expanded"
                    ));
                }
                copied
            }
        };
        match slot {
            Slot::Root => root = new,
            Slot::Yes(at) => out[at].yes = new,
            Slot::No(at) => out[at].no = new,
        }
    }
    *budget -= out.len().saturating_sub(tree.splits.len());
    Ok(Tree {
        target: tree.target,
        root,
        splits: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(decision_type: &str, objective: &str) -> String {
        format!(
            "tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\nmax_feature_idx=1\nobjective={objective}\nfeature_names=a b\n\n\
             Tree=0\nnum_leaves=2\nsplit_feature=1\nthreshold=0.25\ndecision_type={decision_type}\nleft_child=-1\nright_child=-2\nleaf_value=0.5 -0.5\nshrinkage=1\n\n\
             Tree=1\nnum_leaves=1\nleaf_value=0.125\n\nend of trees\n\nparameters:\n[boosting: gbdt]\nend of parameters\n"
        )
    }

    #[test]
    fn a_model_becomes_trees_with_lightgbms_comparison_and_missing_values() {
        let (ensemble, names) = read(&model("2", "binary sigmoid:2")).unwrap();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(ensemble.transform, Transform::Sigmoid { scale: 2.0 });
        let split = &ensemble.trees[0].splits[0];
        // Missing type None: NaN is read as 0, and 0 <= 0.25 goes left.
        assert_eq!(
            (split.feature, split.mode, split.missing_true),
            (1, Mode::Leq, true)
        );
        assert_eq!(ensemble.trees[1].root, Child::Leaf(0.125));
        // Missing type NaN (8), default right.
        let (nan_right, _) = read(&model("8", "regression")).unwrap();
        assert!(!nan_right.trees[0].splits[0].missing_true);
        assert_eq!(nan_right.transform, Transform::Identity);
    }

    #[test]
    fn zero_as_missing_tests_for_zero_first_where_the_comparison_disagrees() {
        // Missing type Zero (4), default right, threshold 0.25: zero would go left by the
        // comparison, so a test for zero sends it right first.
        let (ensemble, _) = read(&model("4", "regression")).unwrap();
        let tree = &ensemble.trees[0];
        assert_eq!(tree.splits.len(), 2);
        let zero = &tree.splits[0];
        assert_eq!(
            (zero.mode, zero.threshold, zero.yes),
            (Mode::Eq, 0.0, Child::Leaf(-0.5))
        );
        assert_eq!(tree.splits[1].mode, Mode::Leq);
        assert!(!tree.splits[1].missing_true);
        // Default left (6) with threshold 0.25: the comparison already sends zero left.
        let (plain, _) = read(&model("6", "regression")).unwrap();
        assert_eq!(plain.trees[0].splits.len(), 1);
        assert!(plain.trees[0].splits[0].missing_true);
    }

    #[test]
    fn a_categorical_split_keeps_its_bitset_of_categories() {
        let text = model("1", "binary sigmoid:1").replace(
            "threshold=0.25\n",
            "threshold=0\ncat_boundaries=0 2\ncat_threshold=34 1\n",
        );
        let (ensemble, _) = read(&text).unwrap();
        let split = &ensemble.trees[0].splits[0];
        assert_eq!(split.mode, Mode::Member);
        // 34 = bits 1 and 5 of the first word; 1 = bit 0 of the second (category 32).
        assert_eq!(split.categories, vec![1.0, 5.0, 32.0]);
        assert!(!split.missing_true, "NaN goes right");
    }

    #[test]
    fn what_is_not_converted_says_so() {
        for (text, says) in [
            (model("1", "binary sigmoid:1"), "cat_boundaries"),
            (model("12", "binary sigmoid:1"), "unknown missing type"),
            (model("2", "cross_entropy_lambda"), "cross_entropy_lambda"),
            (model("2", "regression sqrt"), "sqrt"),
            ("hello".to_owned(), "not a LightGBM text model"),
            (
                model("2", "binary").replace("leaf_value=0.5 -0.5", "leaf_value=0.5"),
                "leaf values",
            ),
        ] {
            let why = read(&text).unwrap_err();
            assert!(why.contains(says), "{why}");
        }
    }
}
