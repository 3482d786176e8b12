//! Tree ensembles as plain data, read from XGBoost's and LightGBM's model files, and their
//! ONNX form: one `ai.onnx.ml` opset-5 `TreeEnsemble` node (thresholds and leaves kept in
//! the framework's own precision, every split in the framework's own comparison and missing
//! direction), the base margin added after it, then the objective's transform in standard
//! operators, so the graph answers what the framework's `Booster.predict` answers.

use super::onnx::{self, Graph, data_type};

/// The framework's arithmetic: XGBoost works in `f32` throughout, LightGBM in `f64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F64,
}

impl Precision {
    pub fn onnx(self) -> i32 {
        match self {
            Precision::F32 => data_type::FLOAT,
            Precision::F64 => data_type::DOUBLE,
        }
    }
}

/// A split's comparison, as the ONNX `TreeEnsemble` `nodes_modes` codes it: the `true`
/// branch is taken when it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `x <= threshold` (LightGBM, scikit-learn).
    Leq = 0,
    /// `x < threshold` (XGBoost).
    Lt = 1,
    /// `x >= threshold` (ONNX graphs from other converters).
    Gte = 2,
    /// `x > threshold`.
    Gt = 3,
    /// `x == threshold` (LightGBM's zero-as-missing splits, expanded).
    Eq = 4,
    /// `x != threshold`.
    Neq = 5,
    /// `x` is one of the split's `categories` (LightGBM's categorical splits).
    Member = 6,
}

impl Mode {
    /// The mode an ONNX `TreeEnsemble` `nodes_modes` code names.
    pub fn from_code(code: i64) -> Option<Mode> {
        Some(match code {
            0 => Mode::Leq,
            1 => Mode::Lt,
            2 => Mode::Gte,
            3 => Mode::Gt,
            4 => Mode::Eq,
            5 => Mode::Neq,
            6 => Mode::Member,
            _ => return None,
        })
    }

    /// The mode a legacy `TreeEnsembleRegressor`/`Classifier` `nodes_modes` string names
    /// (`None` for `LEAF` and unknown words).
    pub fn from_word(word: &str) -> Option<Mode> {
        Some(match word {
            "BRANCH_LEQ" => Mode::Leq,
            "BRANCH_LT" => Mode::Lt,
            "BRANCH_GTE" => Mode::Gte,
            "BRANCH_GT" => Mode::Gt,
            "BRANCH_EQ" => Mode::Eq,
            "BRANCH_NEQ" => Mode::Neq,
            "BRANCH_MEMBER" => Mode::Member,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Child {
    Split(usize),
    Leaf(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub feature: usize,
    pub threshold: f64,
    pub mode: Mode,
    /// The categories of a [`Mode::Member`] split (empty for the others).
    pub categories: Vec<f64>,
    /// Where a missing value (NaN) goes: the `true` branch or not.
    pub missing_true: bool,
    pub yes: Child,
    pub no: Child,
}

impl Split {
    /// Whether `value` (already in the ensemble's precision) takes the `true` branch, as ONNX
    /// Runtime decides it: the comparison holds, or the value is missing (NaN) and missing
    /// values track the `true` branch.
    pub fn goes_true(&self, value: f64) -> bool {
        let t = self.threshold;
        let holds = match self.mode {
            Mode::Leq => value <= t,
            Mode::Lt => value < t,
            Mode::Gte => value >= t,
            Mode::Gt => value > t,
            Mode::Eq => value == t,
            Mode::Neq => value != t,
            Mode::Member => self.categories.contains(&value),
        };
        holds || (self.missing_true && value.is_nan())
    }
}

/// One tree, adding its leaf to one target (a class's margin, or the single output).
#[derive(Debug, Clone, PartialEq)]
pub struct Tree {
    pub target: usize,
    pub root: Child,
    pub splits: Vec<Split>,
}

impl Tree {
    /// Multiplies every leaf by `factor` (LightGBM's `average_output`).
    pub fn scale_leaves(&mut self, factor: f64) {
        let scale = |c: &mut Child| {
            if let Child::Leaf(v) = c {
                *v *= factor;
            }
        };
        scale(&mut self.root);
        for split in &mut self.splits {
            scale(&mut split.yes);
            scale(&mut split.no);
        }
    }

    /// Whether every split is reached from the root exactly once (a tree, not a graph with
    /// shared or cyclic nodes).
    fn is_tree(&self) -> bool {
        let mut seen = vec![false; self.splits.len()];
        let mut stack = vec![self.root];
        let mut reached = 0;
        while let Some(child) = stack.pop() {
            if let Child::Split(i) = child {
                match seen.get_mut(i) {
                    Some(s) if !*s => *s = true,
                    _ => return false,
                }
                reached += 1;
                stack.push(self.splits[i].yes);
                stack.push(self.splits[i].no);
            }
        }
        reached == self.splits.len()
    }
}

/// How the summed margins become the prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    Identity,
    /// `1 / (1 + exp(-scale * m))` per target.
    Sigmoid {
        scale: f64,
    },
    /// Softmax over the targets.
    Softmax,
    /// The index of the largest margin, as a real number (XGBoost's `multi:softmax`).
    ArgMax,
    /// `exp(m)` (Poisson, gamma, Tweedie).
    Exp,
    /// `1` where the margin is positive, else `0` (XGBoost's `binary:hinge`).
    Step,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ensemble {
    /// Where it came from, for the model's doc string ("xgboost multi:softprob").
    pub source: String,
    pub features: usize,
    pub targets: usize,
    pub precision: Precision,
    pub trees: Vec<Tree>,
    /// The margin each target starts from.
    pub base: Vec<f64>,
    pub transform: Transform,
}

/// The most outputs (classes, targets) a converted model may have.
pub const MAX_TARGETS: usize = 1 << 16;

/// The input and output names of every converted model: KServe's framework servers name
/// their one output `output-0` and take their input under any name.
pub const INPUT: &str = "input-0";
pub const OUTPUT: &str = "output-0";

impl Ensemble {
    /// Checks that every reference stays inside the ensemble.
    pub fn check(&self) -> Result<(), String> {
        if self.targets > MAX_TARGETS {
            return Err(format!(
                "{} targets, over the limit of {MAX_TARGETS}",
                self.targets
            ));
        }
        if let Some(b) = self.base.iter().find(|b| !b.is_finite()) {
            return Err(format!(
                "a base margin that is not a finite number ({b}): a base_score of 0 or 1 for a logistic objective, or not above 0 for a log link?"
            ));
        }
        if self.targets == 0 || self.base.len() != self.targets {
            return Err(format!(
                "{} targets with {} base values",
                self.targets,
                self.base.len()
            ));
        }
        for (t, tree) in self.trees.iter().enumerate() {
            if tree.target >= self.targets {
                return Err(format!(
                    "tree {t} adds to target {} of {}",
                    tree.target, self.targets
                ));
            }
            let inside = |c: &Child| match c {
                Child::Split(i) => *i < tree.splits.len(),
                Child::Leaf(v) => v.is_finite(),
            };
            if !inside(&tree.root) {
                return Err(format!("tree {t}: its root is not a node of the tree"));
            }
            for (n, split) in tree.splits.iter().enumerate() {
                if !inside(&split.yes) || !inside(&split.no) {
                    return Err(format!("tree {t} node {n}: a child outside the tree"));
                }
                if split.feature >= self.features {
                    return Err(format!(
                        "tree {t} node {n} splits on feature {} of {}",
                        split.feature, self.features
                    ));
                }
                if split.threshold.is_nan() {
                    return Err(format!("tree {t} node {n}: a threshold that is NaN"));
                }
            }
            if !tree.is_tree() {
                return Err(format!(
                    "tree {t}: nodes shared, cyclic or unreachable; not a tree"
                ));
            }
        }
        Ok(())
    }

    /// The ONNX model: input `input-0` `[batch, features]`, output `output-0` (`[batch]` for
    /// one target or an argmax, else `[batch, targets]`), in the ensemble's precision.
    pub fn to_onnx(&self) -> Result<onnx::ModelProto, String> {
        self.check()?;
        let real = self.precision.onnx();
        let precise = |v: f64| match self.precision {
            Precision::F32 => f64::from(v as f32),
            Precision::F64 => v,
        };
        // A tree that is only a leaf adds a constant: it joins the base.
        let mut base = self.base.clone();
        let mut roots = Vec::new();
        let mut featureids = Vec::new();
        let mut splits = Vec::new();
        let mut modes = Vec::new();
        let mut true_ids = Vec::new();
        let mut true_leafs = Vec::new();
        let mut false_ids = Vec::new();
        let mut false_leafs = Vec::new();
        let mut missing = Vec::new();
        let mut leaf_targets = Vec::new();
        let mut leaf_weights = Vec::new();
        // Every membership split's categories in node order, each set ended by NaN.
        let mut members: Vec<f64> = Vec::new();
        for tree in &self.trees {
            let offset = featureids.len();
            match tree.root {
                Child::Leaf(v) => {
                    base[tree.target] += v;
                    continue;
                }
                Child::Split(i) => roots.push((offset + i) as i64),
            }
            for split in &tree.splits {
                featureids.push(split.feature as i64);
                splits.push(precise(split.threshold));
                modes.push(split.mode as u8);
                if split.mode == Mode::Member {
                    members.extend(&split.categories);
                    members.push(f64::NAN);
                }
                missing.push(i64::from(split.missing_true));
                for (child, ids, leafs) in [
                    (split.yes, &mut true_ids, &mut true_leafs),
                    (split.no, &mut false_ids, &mut false_leafs),
                ] {
                    match child {
                        Child::Split(i) => {
                            ids.push((offset + i) as i64);
                            leafs.push(0);
                        }
                        Child::Leaf(v) => {
                            ids.push(leaf_weights.len() as i64);
                            leafs.push(1);
                            leaf_targets.push(tree.target as i64);
                            leaf_weights.push(v);
                        }
                    }
                }
            }
        }
        let mut graph = Graph::default();
        let mut margin = if roots.is_empty() {
            // No splits at all: the prediction is the base for every row, zeros of shape
            // [batch, targets] to add it to (whatever the input holds, NaN included).
            let shape = graph.node("", "Shape", &[INPUT], vec![]);
            let (zero_index, one_index) = (
                graph.constant(onnx::int64_tensor("", vec![0])),
                graph.constant(onnx::int64_tensor("", vec![1])),
            );
            let batch = graph.node("", "Slice", &[&shape, &zero_index, &one_index], vec![]);
            let width = graph.constant(onnx::int64_tensor("", vec![self.targets as i64]));
            let dims = graph.node("", "Concat", &[&batch, &width], vec![onnx::int("axis", 0)]);
            graph.node(
                "",
                "ConstantOfShape",
                &[&dims],
                vec![onnx::tensor_attribute(
                    "value",
                    onnx::real_tensor("", real, &[0.0]),
                )],
            )
        } else {
            let mut attributes = Vec::new();
            if !members.is_empty() {
                attributes.push(onnx::tensor_attribute(
                    "membership_values",
                    onnx::real_tensor("", real, &members),
                ));
            }
            graph.node(
                "ai.onnx.ml",
                "TreeEnsemble",
                &[INPUT],
                attributes
                    .into_iter()
                    .chain([
                        onnx::int("n_targets", self.targets as i64),
                        onnx::int("aggregate_function", 1),
                        onnx::int("post_transform", 0),
                        onnx::ints("tree_roots", roots),
                        onnx::ints("nodes_featureids", featureids),
                        onnx::tensor_attribute(
                            "nodes_splits",
                            onnx::real_tensor("", real, &splits),
                        ),
                        onnx::tensor_attribute("nodes_modes", onnx::uint8_tensor("", &modes)),
                        onnx::ints("nodes_truenodeids", true_ids),
                        onnx::ints("nodes_trueleafs", true_leafs),
                        onnx::ints("nodes_falsenodeids", false_ids),
                        onnx::ints("nodes_falseleafs", false_leafs),
                        onnx::ints("nodes_missing_value_tracks_true", missing),
                        onnx::ints("leaf_targetids", leaf_targets),
                        onnx::tensor_attribute(
                            "leaf_weights",
                            onnx::real_tensor("", real, &leaf_weights),
                        ),
                    ])
                    .collect(),
            )
        };
        if base.iter().any(|&b| b != 0.0) {
            let base = graph.constant(onnx::real_tensor("", real, &base));
            margin = graph.node("", "Add", &[&margin, &base], vec![]);
        }
        let mut out = match self.transform {
            Transform::Identity => margin,
            Transform::Sigmoid { scale } => {
                if scale != 1.0 {
                    let scale = graph.constant(onnx::real_tensor("", real, &[scale]));
                    margin = graph.node("", "Mul", &[&margin, &scale], vec![]);
                }
                graph.node("", "Sigmoid", &[&margin], vec![])
            }
            Transform::Softmax => graph.node("", "Softmax", &[&margin], vec![onnx::int("axis", 1)]),
            Transform::Exp => graph.node("", "Exp", &[&margin], vec![]),
            Transform::ArgMax => {
                let index = graph.node(
                    "",
                    "ArgMax",
                    &[&margin],
                    vec![onnx::int("axis", 1), onnx::int("keepdims", 0)],
                );
                graph.node(
                    "",
                    "Cast",
                    &[&index],
                    vec![onnx::int("to", i64::from(real))],
                )
            }
            Transform::Step => {
                let zero = graph.constant(onnx::real_tensor("", real, &[0.0]));
                let positive = graph.node("", "Greater", &[&margin, &zero], vec![]);
                graph.node(
                    "",
                    "Cast",
                    &[&positive],
                    vec![onnx::int("to", i64::from(real))],
                )
            }
        };
        let flat = self.targets == 1 || self.transform == Transform::ArgMax;
        if flat && self.transform != Transform::ArgMax {
            let shape = graph.constant(onnx::int64_tensor("", vec![-1]));
            out = graph.node("", "Reshape", &[&out, &shape], vec![]);
        }
        let dims: Vec<Option<i64>> = if flat {
            vec![None]
        } else {
            vec![None, Some(self.targets as i64)]
        };
        Ok(graph.finish(
            &out,
            onnx::value_info(INPUT, real, &[None, Some(self.features as i64)]),
            onnx::value_info(OUTPUT, real, &dims),
            &self.source,
            format!(
                "{} trees, {} features, {} targets",
                self.trees.len(),
                self.features,
                self.targets
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn the_onnx_graph_is_the_ensemble_then_the_base_then_the_transform() {
        let ensemble = Ensemble {
            source: "test".into(),
            features: 2,
            targets: 3,
            precision: Precision::F64,
            trees: vec![
                Tree {
                    target: 2,
                    root: Child::Split(0),
                    splits: vec![Split {
                        feature: 1,
                        threshold: 0.1,
                        mode: Mode::Leq,
                        categories: Vec::new(),
                        missing_true: false,
                        yes: Child::Leaf(1.0),
                        no: Child::Leaf(2.0),
                    }],
                },
                // A leaf-only tree joins the base.
                Tree {
                    target: 0,
                    root: Child::Leaf(0.5),
                    splits: Vec::new(),
                },
            ],
            base: vec![0.0; 3],
            transform: Transform::Softmax,
        };
        let model =
            onnx::ModelProto::decode(&onnx::encode(&ensemble.to_onnx().unwrap())[..]).unwrap();
        let graph = model.graph.unwrap();
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["TreeEnsemble", "Add", "Softmax"]);
        assert_eq!(graph.initializer[0].double_data, vec![0.5, 0.0, 0.0]);
        assert_eq!(graph.output[0].name, OUTPUT);
        let attribute = |name: &str| {
            graph.node[0]
                .attribute
                .iter()
                .find(|a| a.name == name)
                .unwrap()
        };
        assert_eq!(
            attribute("nodes_splits").t.as_ref().unwrap().double_data,
            vec![0.1]
        );
        assert_eq!(attribute("leaf_targetids").ints, vec![2, 2]);
        assert_eq!(attribute("nodes_falsenodeids").ints, vec![1]);
        // References outside the ensemble are refused before anything is built.
        let mut bad = ensemble.clone();
        bad.trees[0].splits[0].feature = 2;
        assert!(bad.to_onnx().unwrap_err().contains("feature 2 of 2"));
        bad = ensemble;
        bad.trees[0].splits[0].yes = Child::Split(0);
        assert!(bad.to_onnx().unwrap_err().contains("not a tree"));
    }
}
