//! Exact interventional TreeSHAP for tree ensembles, read from the ONNX graph itself: the
//! `ai.onnx.ml` `TreeEnsembleRegressor` / `TreeEnsembleClassifier` (opsets 1-3) and the
//! opset-5 `TreeEnsemble`, whatever wrote them (skl2onnx, onnxmltools, meshserve's own
//! XGBoost and LightGBM conversions).
//!
//! The values explain the ensemble's **margin**: the aggregated leaves plus the base values,
//! and a constant `Add` that follows the ensemble node, before the post transform (LOGISTIC,
//! SOFTMAX, ...) and any node after it, as `shap.TreeExplainer`'s `model_output="raw"` does.
//! One column per target: a binary classifier that stores one margin has one.
//!
//! The value function is the interventional one over background rows, the same as
//! [`crate::kernel_shap`]'s: `v(S) = mean_b f(x_S, b_rest)` (ONNX graphs carry no node cover
//! for the path-dependent variant). For one tree and one background row `b`, a leaf is reached
//! by the hybrid of `x` and `b` exactly when the features in `A` (where the leaf's path needs
//! `x`'s side of a split that `b` does not take) come from `x` and those in `B` (the reverse)
//! from `b`; that game's Shapley values are `v (|A|-1)! |B|! / (|A|+|B|)!` for each feature of
//! `A` and `-v |A|! (|B|-1)! / (|A|+|B|)!` for each of `B`. One walk per tree and background
//! row visits the leaves the pair can reach, so an explanation costs about
//! `background rows x trees x leaves reached`, with no model call.
//!
//! Splits are decided as ONNX Runtime decides them ([`Split::goes_true`]), in the precision of
//! the ensemble's input (FLOAT inputs are rounded to `f32` first), missing values (NaN) by
//! each node's missing-value direction.

use std::collections::HashMap;

use prost::Message;

use crate::convert::onnx::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};
use crate::convert::onnx::{attribute_type, data_type};
use crate::convert::trees::{Child, Ensemble, Mode, Precision, Split, Transform, Tree};
use crate::kernel_shap::{ExplainError, Explanation};

/// A tree ensemble as its ONNX graph computes the margin.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeModel {
    /// The trees (one target each; a leaf of several targets is split into one tree per
    /// target), the base margins, the features read, the comparison precision.
    pub ensemble: Ensemble,
    /// The ONNX operator read (`TreeEnsembleClassifier`, ...).
    pub operator: String,
    /// What turns the margin into the model's output: the node's post transform
    /// (`NONE`, `LOGISTIC`, `SOFTMAX`, `SOFTMAX_ZERO`, `PROBIT`) and the operators after it.
    pub post_transform: String,
}

/// The most nodes of an ensemble read (a guard against a malformed graph).
pub const MAX_NODES: usize = 1 << 24;
/// The deepest tree explained: the walk recurses once per level, on a blocking thread's stack.
pub const MAX_DEPTH: usize = 1024;

impl TreeModel {
    /// Reads the one tree ensemble of an ONNX model, which must read the model's input
    /// directly (or through a `Cast`).
    pub fn from_onnx(bytes: &[u8]) -> Result<TreeModel, String> {
        let model = ModelProto::decode(bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
        let graph = model.graph.ok_or("the ONNX model has no graph")?;
        let ensembles: Vec<&NodeProto> = graph
            .node
            .iter()
            .filter(|n| {
                matches!(
                    n.op_type.as_str(),
                    "TreeEnsemble" | "TreeEnsembleRegressor" | "TreeEnsembleClassifier"
                )
            })
            .collect();
        let node = match ensembles.as_slice() {
            [one] => *one,
            [] => {
                return Err(
                    "TreeSHAP explains ONNX tree ensembles (TreeEnsembleRegressor, TreeEnsembleClassifier, TreeEnsemble) and this graph has none: use kernel_shap".into(),
                );
            }
            many => {
                return Err(format!(
                    "TreeSHAP explains one tree ensemble and this graph has {}: use kernel_shap",
                    many.len()
                ));
            }
        };
        let (precision, width) = input_of(&graph, node)?;
        let attrs: HashMap<&str, &AttributeProto> = node
            .attribute
            .iter()
            .map(|a| (a.name.as_str(), a))
            .collect();
        let raw = if node.op_type == "TreeEnsemble" {
            RawEnsemble::opset5(&attrs)?
        } else {
            RawEnsemble::legacy(&attrs, node.op_type == "TreeEnsembleClassifier")?
        };
        let mut base = raw.base.clone();
        let features = width.unwrap_or_else(|| raw.max_feature() + 1);
        let mut targets = raw.targets.max(base.len()).max(1);
        if node.op_type == "TreeEnsemble" {
            // A constant added to the ensemble's output is the base margin (meshserve's own
            // conversions put the framework's base score there).
            if let Some(added) = added_constant(&graph, &node.output[..1.min(node.output.len())])? {
                targets = targets.max(added.len());
                base.resize(targets, 0.0);
                for (t, b) in base.iter_mut().enumerate() {
                    *b += added.get(t).or(added.first()).copied().unwrap_or(0.0);
                }
            }
        }
        base.resize(targets, 0.0);
        let trees = raw.trees(targets)?;
        let ensemble = Ensemble {
            source: node.op_type.clone(),
            features,
            targets,
            precision,
            trees,
            base,
            transform: Transform::Identity,
        };
        ensemble.check()?;
        for (t, tree) in ensemble.trees.iter().enumerate() {
            let depth = depth(tree);
            if depth > MAX_DEPTH {
                return Err(format!(
                    "tree {t} is {depth} levels deep; TreeSHAP explains trees of at most {MAX_DEPTH}"
                ));
            }
        }
        Ok(TreeModel {
            ensemble,
            operator: node.op_type.clone(),
            post_transform: raw.post_transform,
        })
    }

    /// The margin of every target for one row.
    pub fn margin(&self, x: &[f64]) -> Vec<f64> {
        let x = self.rounded(x);
        let mut out = self.ensemble.base.clone();
        for tree in &self.ensemble.trees {
            out[tree.target] += leaf(tree, tree.root, &x);
        }
        out
    }

    fn rounded(&self, x: &[f64]) -> Vec<f64> {
        match self.ensemble.precision {
            Precision::F32 => x.iter().map(|v| f64::from(*v as f32)).collect(),
            Precision::F64 => x.to_vec(),
        }
    }

    /// The exact interventional Shapley values of `x` against `background` (row-major rows
    /// of the ensemble's features). `out_of_time` is asked between background rows.
    pub fn explain(
        &self,
        x: &[f64],
        background: &[f64],
        out_of_time: &mut dyn FnMut() -> bool,
    ) -> Result<Explanation, ExplainError> {
        let m = self.ensemble.features;
        if x.len() != m {
            return Err(ExplainError::Input(format!(
                "the row has {} features; the tree ensemble reads {m}",
                x.len()
            )));
        }
        if background.is_empty() || !background.len().is_multiple_of(m) {
            return Err(ExplainError::Input(format!(
                "the background holds {} values: not whole rows of {m} features",
                background.len()
            )));
        }
        let k = self.ensemble.targets;
        let rows = background.len() / m;
        let x = self.rounded(x);
        let weights = Weights::new(m);
        let mut phi = vec![vec![0.0; m]; k];
        let mut expected = self.ensemble.base.clone();
        let mut walk = Walk {
            x: &x,
            z: Vec::new(),
            side: vec![Side::Free; m],
            a: Vec::with_capacity(m),
            b: Vec::with_capacity(m),
            weights: &weights,
            phi: Vec::new(),
        };
        for z in background.chunks_exact(m) {
            if out_of_time() {
                return Err(ExplainError::TimedOut);
            }
            walk.z = self.rounded(z);
            for tree in &self.ensemble.trees {
                expected[tree.target] += leaf(tree, tree.root, &walk.z) / rows as f64;
                walk.phi = std::mem::take(&mut phi[tree.target]);
                walk.visit(tree, tree.root);
                phi[tree.target] = std::mem::take(&mut walk.phi);
            }
        }
        for values in &mut phi {
            values.iter_mut().for_each(|v| *v /= rows as f64);
        }
        Ok(Explanation {
            expected_value: expected,
            shap_values: phi,
            prediction: self.margin(&x),
            exact: true,
            coalitions: 0,
            model_rows: 0,
        })
    }
}

/// How many splits the longest path of a (checked) tree passes.
fn depth(tree: &Tree) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(tree.root, 0)];
    while let Some((child, level)) = stack.pop() {
        match child {
            Child::Leaf(_) => deepest = deepest.max(level),
            Child::Split(i) => {
                if let Some(split) = tree.splits.get(i) {
                    stack.push((split.yes, level + 1));
                    stack.push((split.no, level + 1));
                }
            }
        }
    }
    deepest
}

/// The leaf `x` reaches from `child`.
fn leaf(tree: &Tree, mut child: Child, x: &[f64]) -> f64 {
    loop {
        match child {
            Child::Leaf(v) => return v,
            Child::Split(i) => {
                let split = &tree.splits[i];
                child = if split.goes_true(x[split.feature]) {
                    split.yes
                } else {
                    split.no
                };
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Free,
    /// The path so far needs the feature from `x` (set `A`).
    X,
    /// ... from the background row (set `B`).
    Z,
}

/// `(a-1)! b! / (a+b)!` and `a! (b-1)! / (a+b)!` from log-factorials.
struct Weights {
    ln_factorial: Vec<f64>,
}

impl Weights {
    fn new(m: usize) -> Weights {
        let mut ln_factorial = vec![0.0; m + 2];
        for n in 1..ln_factorial.len() {
            ln_factorial[n] = ln_factorial[n - 1] + (n as f64).ln();
        }
        Weights { ln_factorial }
    }

    /// The Shapley weight of a feature of a set of `own` (including it) against `other`.
    fn of(&self, own: usize, other: usize) -> f64 {
        let f = &self.ln_factorial;
        (f[own - 1] + f[other] - f[own + other]).exp()
    }
}

struct Walk<'a> {
    x: &'a [f64],
    /// The background row, rounded.
    z: Vec<f64>,
    side: Vec<Side>,
    a: Vec<usize>,
    b: Vec<usize>,
    weights: &'a Weights,
    /// The tree's target's values, summed over background rows.
    phi: Vec<f64>,
}

impl Walk<'_> {
    fn visit(&mut self, tree: &Tree, child: Child) {
        match child {
            Child::Leaf(v) => {
                let (a, b) = (self.a.len(), self.b.len());
                if a > 0 {
                    let w = v * self.weights.of(a, b);
                    for &i in &self.a {
                        self.phi[i] += w;
                    }
                }
                if b > 0 {
                    let w = v * self.weights.of(b, a);
                    for &i in &self.b {
                        self.phi[i] -= w;
                    }
                }
            }
            Child::Split(n) => {
                let split = &tree.splits[n];
                let f = split.feature;
                let (xs, zs) = (split.goes_true(self.x[f]), split.goes_true(self.z[f]));
                let next = |yes: bool| if yes { split.yes } else { split.no };
                match self.side[f] {
                    Side::X => self.visit(tree, next(xs)),
                    Side::Z => self.visit(tree, next(zs)),
                    Side::Free if xs == zs => self.visit(tree, next(xs)),
                    Side::Free => {
                        self.side[f] = Side::X;
                        self.a.push(f);
                        self.visit(tree, next(xs));
                        self.a.pop();
                        self.side[f] = Side::Z;
                        self.b.push(f);
                        self.visit(tree, next(zs));
                        self.b.pop();
                        self.side[f] = Side::Free;
                    }
                }
            }
        }
    }
}

/// The precision the ensemble compares in and the feature count the model's input declares.
fn input_of(graph: &GraphProto, node: &NodeProto) -> Result<(Precision, Option<usize>), String> {
    let name = node.input.first().ok_or("the tree ensemble has no input")?;
    let (source, cast) = match graph.node.iter().find(|n| n.output.contains(name)) {
        None => (name, None),
        Some(cast) if cast.op_type == "Cast" && cast.input.len() == 1 => {
            let to = cast.attribute.iter().find(|a| a.name == "to").map(|a| a.i);
            (&cast.input[0], to)
        }
        Some(other) => {
            return Err(format!(
                "the tree ensemble reads '{name}', computed by a {} node, not the model's input: TreeSHAP explains ensembles that read the features the client sends (use kernel_shap)",
                other.op_type
            ));
        }
    };
    let input = graph
        .input
        .iter()
        .find(|i| &i.name == source)
        .ok_or_else(|| format!("the tree ensemble reads '{source}', which is not a graph input"))?;
    let tensor = input.r#type.as_ref().and_then(|t| t.tensor_type.as_ref());
    let elem = cast.unwrap_or_else(|| tensor.map_or(0, |t| i64::from(t.elem_type)));
    let precision = match i32::try_from(elem).unwrap_or(0) {
        data_type::DOUBLE => Precision::F64,
        data_type::FLOAT => Precision::F32,
        other => {
            return Err(format!(
                "the tree ensemble compares features of ONNX type {other}; TreeSHAP reads FLOAT or DOUBLE features"
            ));
        }
    };
    let width = tensor
        .and_then(|t| t.shape.as_ref())
        .and_then(|s| s.dim.get(1))
        .and_then(|d| d.dim_value)
        .and_then(|v| usize::try_from(v).ok());
    Ok((precision, width))
}

/// The values of a constant (an initializer or a `Constant` node) added to `outputs[0]`
/// by the node that consumes it, when that is an `Add`.
fn added_constant(graph: &GraphProto, outputs: &[String]) -> Result<Option<Vec<f64>>, String> {
    let Some(out) = outputs.first() else {
        return Ok(None);
    };
    let users: Vec<&NodeProto> = graph
        .node
        .iter()
        .filter(|n| n.input.contains(out))
        .collect();
    let [add] = users.as_slice() else {
        return Ok(None);
    };
    if add.op_type != "Add" || add.input.len() != 2 {
        return Ok(None);
    }
    let other = if &add.input[0] == out {
        &add.input[1]
    } else {
        &add.input[0]
    };
    if let Some(t) = graph.initializer.iter().find(|t| &t.name == other) {
        return reals(t).map(Some);
    }
    let constant = graph
        .node
        .iter()
        .find(|n| n.op_type == "Constant" && n.output.contains(other));
    match constant.and_then(|c| c.attribute.iter().find(|a| a.name == "value")) {
        Some(AttributeProto { t: Some(t), .. }) => reals(t).map(Some),
        _ => Ok(None),
    }
}

/// A tensor's values as reals (FLOAT, DOUBLE, INT32, INT64 or UINT8, inline or raw).
fn reals(t: &TensorProto) -> Result<Vec<f64>, String> {
    if t.data_location == 1 {
        return Err(format!(
            "tensor '{}' keeps its data in an external file, which TreeSHAP does not read",
            t.name
        ));
    }
    let raw = &t.raw_data;
    let chunks = |n: usize| raw.chunks_exact(n);
    Ok(match t.data_type {
        data_type::FLOAT if !raw.is_empty() => chunks(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        data_type::FLOAT => t.float_data.iter().map(|v| f64::from(*v)).collect(),
        data_type::DOUBLE if !raw.is_empty() => chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        data_type::DOUBLE => t.double_data.clone(),
        data_type::INT64 if !raw.is_empty() => chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64)
            .collect(),
        data_type::INT64 => t.int64_data.iter().map(|v| *v as f64).collect(),
        data_type::INT32 if !raw.is_empty() => chunks(4)
            .map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        data_type::INT32 | data_type::UINT8 if raw.is_empty() => {
            t.int32_data.iter().map(|v| f64::from(*v)).collect()
        }
        data_type::UINT8 => raw.iter().map(|v| f64::from(*v)).collect(),
        other => return Err(format!("tensor '{}' has ONNX type {other}", t.name)),
    })
}

/// A node's child in the graph's own numbering.
#[derive(Debug, Clone)]
enum RawChild {
    Node(usize),
    /// `(target, weight)` pairs.
    Leaf(Vec<(usize, f64)>),
}

#[derive(Debug, Clone)]
struct RawNode {
    split: Split,
    yes: RawChild,
    no: RawChild,
}

/// The ensemble as the ONNX node states it, before it becomes one tree per target.
struct RawEnsemble {
    nodes: Vec<RawNode>,
    roots: Vec<RawChild>,
    targets: usize,
    base: Vec<f64>,
    /// Every leaf is multiplied by it (`1 / trees` for AVERAGE).
    scale: f64,
    post_transform: String,
}

fn ints<'a>(attrs: &HashMap<&str, &'a AttributeProto>, name: &str) -> &'a [i64] {
    attrs.get(name).map_or(&[], |a| a.ints.as_slice())
}

/// A real-valued list attribute: `name` (floats) or `name_as_tensor`.
fn real_list(attrs: &HashMap<&str, &AttributeProto>, name: &str) -> Result<Vec<f64>, String> {
    if let Some(a) = attrs.get(format!("{name}_as_tensor").as_str())
        && let Some(t) = &a.t
    {
        return reals(t);
    }
    if let Some(a) = attrs.get(name) {
        if a.r#type == attribute_type::TENSOR {
            return a.t.as_ref().map_or(Ok(Vec::new()), reals);
        }
        return Ok(a.floats.iter().map(|v| f64::from(*v)).collect());
    }
    Ok(Vec::new())
}

fn word(attrs: &HashMap<&str, &AttributeProto>, name: &str, default: &str) -> String {
    attrs
        .get(name)
        .map(|a| String::from_utf8_lossy(&a.s).into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn index(v: i64, what: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{what} {v} is negative"))
}

fn same_length(lists: &[(&str, usize)]) -> Result<usize, String> {
    let n = lists.first().map_or(0, |l| l.1);
    if n > MAX_NODES {
        return Err(format!("{n} nodes, over the limit of {MAX_NODES}"));
    }
    match lists.iter().find(|l| l.1 != n) {
        Some((name, len)) => Err(format!(
            "{name} has {len} entries where {} has {n}",
            lists[0].0
        )),
        None => Ok(n),
    }
}

/// The aggregate function's leaf scale: SUM 1, AVERAGE 1/trees; MIN and MAX are not sums
/// of trees, so they have no Shapley decomposition over trees and are refused.
fn aggregate_scale(function: &str, trees: usize) -> Result<f64, String> {
    match function {
        "SUM" => Ok(1.0),
        "AVERAGE" => Ok(1.0 / trees.max(1) as f64),
        other => Err(format!(
            "aggregate_function {other}: TreeSHAP explains ensembles that add (SUM) or average (AVERAGE) their trees"
        )),
    }
}

impl RawEnsemble {
    /// `TreeEnsembleRegressor` (`target_*`) or `TreeEnsembleClassifier` (`class_*`).
    fn legacy(
        attrs: &HashMap<&str, &AttributeProto>,
        classifier: bool,
    ) -> Result<RawEnsemble, String> {
        let tree_ids = ints(attrs, "nodes_treeids");
        let node_ids = ints(attrs, "nodes_nodeids");
        let features = ints(attrs, "nodes_featureids");
        let true_ids = ints(attrs, "nodes_truenodeids");
        let false_ids = ints(attrs, "nodes_falsenodeids");
        let missing = ints(attrs, "nodes_missing_value_tracks_true");
        let modes = attrs.get("nodes_modes").map_or(&[][..], |a| &a.strings[..]);
        let values = real_list(attrs, "nodes_values")?;
        let n = same_length(&[
            ("nodes_treeids", tree_ids.len()),
            ("nodes_nodeids", node_ids.len()),
            ("nodes_featureids", features.len()),
            ("nodes_modes", modes.len()),
            ("nodes_truenodeids", true_ids.len()),
            ("nodes_falsenodeids", false_ids.len()),
        ])?;
        if values.len() != n || (!missing.is_empty() && missing.len() != n) {
            return Err(format!(
                "nodes_values or nodes_missing_value_tracks_true do not have {n} entries"
            ));
        }
        let prefix = if classifier { "class" } else { "target" };
        let w_trees = ints(attrs, &format!("{prefix}_treeids"));
        let w_nodes = ints(attrs, &format!("{prefix}_nodeids"));
        let w_ids = ints(attrs, &format!("{prefix}_ids"));
        let w_values = real_list(attrs, &format!("{prefix}_weights"))?;
        same_length(&[
            ("leaf tree ids", w_trees.len()),
            ("leaf node ids", w_nodes.len()),
            ("leaf target ids", w_ids.len()),
            ("leaf weights", w_values.len()),
        ])?;
        // Node (tree, id) -> position.
        let position: HashMap<(i64, i64), usize> =
            (0..n).map(|i| ((tree_ids[i], node_ids[i]), i)).collect();
        let mut leaves: HashMap<usize, Vec<(usize, f64)>> = HashMap::new();
        let mut targets = 0;
        for i in 0..w_trees.len() {
            let at = position.get(&(w_trees[i], w_nodes[i])).ok_or_else(|| {
                format!(
                    "a leaf weight for node {} of tree {}, which does not exist",
                    w_nodes[i], w_trees[i]
                )
            })?;
            let target = index(w_ids[i], "target id")?;
            targets = targets.max(target + 1);
            leaves.entry(*at).or_default().push((target, w_values[i]));
        }
        let child = |tree: i64, id: i64| -> Result<RawChild, String> {
            let at = *position
                .get(&(tree, id))
                .ok_or_else(|| format!("tree {tree} refers to node {id}, which does not exist"))?;
            Ok(if modes[at] == b"LEAF" {
                RawChild::Leaf(leaves.get(&at).cloned().unwrap_or_default())
            } else {
                RawChild::Node(at)
            })
        };
        let mut nodes = Vec::with_capacity(n);
        let mut referenced = vec![false; n];
        for i in 0..n {
            let word = String::from_utf8_lossy(&modes[i]);
            let mode = match Mode::from_word(&word) {
                Some(mode) => mode,
                None if word == "LEAF" => Mode::Leq,
                None => return Err(format!("node {i}: unknown split mode '{word}'")),
            };
            let (yes, no) = if word == "LEAF" {
                (RawChild::Leaf(Vec::new()), RawChild::Leaf(Vec::new()))
            } else {
                for id in [true_ids[i], false_ids[i]] {
                    if let Some(&j) = position.get(&(tree_ids[i], id)) {
                        referenced[j] = true;
                    }
                }
                (
                    child(tree_ids[i], true_ids[i])?,
                    child(tree_ids[i], false_ids[i])?,
                )
            };
            nodes.push(RawNode {
                split: Split {
                    feature: index(features[i], "feature id")?,
                    threshold: values[i],
                    mode,
                    categories: Vec::new(),
                    missing_true: missing.get(i).is_some_and(|m| *m != 0),
                    yes: Child::Leaf(0.0),
                    no: Child::Leaf(0.0),
                },
                yes,
                no,
            });
        }
        // Each tree's root is its one node no other node points at.
        let mut roots: Vec<(i64, RawChild)> = Vec::new();
        for i in (0..n).filter(|i| !referenced[*i]) {
            if roots.iter().any(|(t, _)| *t == tree_ids[i]) {
                return Err(format!("tree {} has more than one root", tree_ids[i]));
            }
            let root = if modes[i] == b"LEAF" {
                RawChild::Leaf(leaves.get(&i).cloned().unwrap_or_default())
            } else {
                RawChild::Node(i)
            };
            roots.push((tree_ids[i], root));
        }
        let base = real_list(attrs, "base_values")?;
        let scale = aggregate_scale(&word(attrs, "aggregate_function", "SUM"), roots.len())?;
        Ok(RawEnsemble {
            nodes,
            roots: roots.into_iter().map(|(_, r)| r).collect(),
            targets,
            base,
            scale,
            post_transform: word(attrs, "post_transform", "NONE"),
        })
    }

    /// Opset 5's `TreeEnsemble`.
    fn opset5(attrs: &HashMap<&str, &AttributeProto>) -> Result<RawEnsemble, String> {
        let features = ints(attrs, "nodes_featureids");
        let true_ids = ints(attrs, "nodes_truenodeids");
        let true_leafs = ints(attrs, "nodes_trueleafs");
        let false_ids = ints(attrs, "nodes_falsenodeids");
        let false_leafs = ints(attrs, "nodes_falseleafs");
        let missing = ints(attrs, "nodes_missing_value_tracks_true");
        let splits = real_list(attrs, "nodes_splits")?;
        let modes = real_list(attrs, "nodes_modes")?;
        let leaf_targets = ints(attrs, "leaf_targetids");
        let leaf_weights = real_list(attrs, "leaf_weights")?;
        let members = real_list(attrs, "membership_values")?;
        let n = same_length(&[
            ("nodes_featureids", features.len()),
            ("nodes_truenodeids", true_ids.len()),
            ("nodes_trueleafs", true_leafs.len()),
            ("nodes_falsenodeids", false_ids.len()),
            ("nodes_falseleafs", false_leafs.len()),
            ("nodes_splits", splits.len()),
            ("nodes_modes", modes.len()),
        ])?;
        if !missing.is_empty() && missing.len() != n {
            return Err(format!(
                "nodes_missing_value_tracks_true does not have {n} entries"
            ));
        }
        same_length(&[
            ("leaf_targetids", leaf_targets.len()),
            ("leaf_weights", leaf_weights.len()),
        ])?;
        let mut targets = 0;
        let leaf = |i: i64| -> Result<RawChild, String> {
            let i = index(i, "leaf")?;
            match (leaf_targets.get(i), leaf_weights.get(i)) {
                (Some(t), Some(w)) => Ok(RawChild::Leaf(vec![(index(*t, "target id")?, *w)])),
                _ => Err(format!("leaf {i} does not exist")),
            }
        };
        let child = |id: i64, is_leaf: i64| -> Result<RawChild, String> {
            if is_leaf != 0 {
                leaf(id)
            } else {
                Ok(RawChild::Node(index(id, "node")?))
            }
        };
        let mut sets = members.split(|v| v.is_nan());
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let mode = Mode::from_code(modes[i] as i64)
                .ok_or_else(|| format!("node {i}: unknown split mode {}", modes[i]))?;
            let (threshold, categories) = if mode == Mode::Member {
                let set = sets
                    .next()
                    .ok_or_else(|| format!("node {i}: no membership values left for it"))?;
                (0.0, set.to_vec())
            } else {
                (splits[i], Vec::new())
            };
            nodes.push(RawNode {
                split: Split {
                    feature: index(features[i], "feature id")?,
                    threshold,
                    mode,
                    categories,
                    missing_true: missing.get(i).is_some_and(|m| *m != 0),
                    yes: Child::Leaf(0.0),
                    no: Child::Leaf(0.0),
                },
                yes: child(true_ids[i], true_leafs[i])?,
                no: child(false_ids[i], false_leafs[i])?,
            });
        }
        for node in &nodes {
            for c in [&node.yes, &node.no] {
                if let RawChild::Leaf(l) = c {
                    targets = l.iter().fold(targets, |t, (id, _)| t.max(id + 1));
                }
            }
        }
        let roots: Vec<RawChild> = ints(attrs, "tree_roots")
            .iter()
            .map(|r| index(*r, "tree root").map(RawChild::Node))
            .collect::<Result<_, _>>()?;
        let function = match attrs.get("aggregate_function").map_or(1, |a| a.i) {
            0 => "AVERAGE",
            1 => "SUM",
            2 => "MIN",
            3 => "MAX",
            _ => "unknown",
        };
        let post = match attrs.get("post_transform").map_or(0, |a| a.i) {
            0 => "NONE",
            1 => "SOFTMAX",
            2 => "LOGISTIC",
            3 => "SOFTMAX_ZERO",
            4 => "PROBIT",
            _ => "unknown",
        };
        let n_targets = attrs.get("n_targets").map_or(0, |a| a.i);
        Ok(RawEnsemble {
            nodes,
            scale: aggregate_scale(function, roots.len())?,
            roots,
            targets: targets.max(usize::try_from(n_targets).unwrap_or(0)),
            base: Vec::new(),
            post_transform: post.to_owned(),
        })
    }

    fn max_feature(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| n.split.feature)
            .max()
            .unwrap_or(0)
    }

    /// One [`Tree`] per root and target its leaves add to.
    fn trees(&self, targets: usize) -> Result<Vec<Tree>, String> {
        let mut out = Vec::new();
        for root in &self.roots {
            // The root's nodes in visiting order, each once (a cycle or a shared node is
            // refused: the graph is not a tree).
            let mut order: Vec<usize> = Vec::new();
            let mut local: HashMap<usize, usize> = HashMap::new();
            let mut stack = vec![root];
            let mut used = vec![false; targets];
            while let Some(child) = stack.pop() {
                match child {
                    RawChild::Node(i) => {
                        let node = self
                            .nodes
                            .get(*i)
                            .ok_or_else(|| format!("node {i} does not exist"))?;
                        if local.insert(*i, order.len()).is_some() {
                            return Err(format!(
                                "node {i} is reached twice: the ensemble is not made of trees"
                            ));
                        }
                        order.push(*i);
                        stack.push(&node.yes);
                        stack.push(&node.no);
                    }
                    RawChild::Leaf(weights) => {
                        for (t, _) in weights {
                            if *t >= targets {
                                return Err(format!("a leaf adds to target {t} of {targets}"));
                            }
                            used[*t] = true;
                        }
                    }
                }
            }
            for target in (0..targets).filter(|t| used[*t]) {
                let convert = |c: &RawChild| match c {
                    RawChild::Node(i) => Child::Split(local[i]),
                    RawChild::Leaf(w) => Child::Leaf(
                        w.iter()
                            .filter(|(t, _)| *t == target)
                            .map(|(_, v)| v * self.scale)
                            .sum(),
                    ),
                };
                out.push(Tree {
                    target,
                    root: convert(root),
                    splits: order
                        .iter()
                        .map(|i| {
                            let node = &self.nodes[*i];
                            Split {
                                yes: convert(&node.yes),
                                no: convert(&node.no),
                                ..node.split.clone()
                            }
                        })
                        .collect(),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_shap::{self, Options};

    /// A small deterministic generator (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// One of a few values, so that equality and membership splits are met.
        fn value(&mut self) -> f64 {
            [0.0, 1.0, 2.0, 3.0, 0.5, -1.0][self.below(6)]
        }
    }

    const MODES: [Mode; 7] = [
        Mode::Leq,
        Mode::Lt,
        Mode::Gte,
        Mode::Gt,
        Mode::Eq,
        Mode::Neq,
        Mode::Member,
    ];

    fn random_tree(rng: &mut Rng, features: usize, target: usize, depth: usize) -> Tree {
        let mut splits = Vec::new();
        fn grow(rng: &mut Rng, splits: &mut Vec<Split>, features: usize, depth: usize) -> Child {
            if depth == 0 || rng.below(5) == 0 {
                return Child::Leaf(rng.value() * 1.5 - 0.7 + rng.below(100) as f64 / 100.0);
            }
            let at = splits.len();
            let mode = MODES[rng.below(MODES.len())];
            splits.push(Split {
                feature: rng.below(features),
                threshold: rng.value(),
                mode,
                categories: if mode == Mode::Member {
                    vec![rng.value(), rng.value()]
                } else {
                    Vec::new()
                },
                missing_true: rng.below(2) == 0,
                yes: Child::Leaf(0.0),
                no: Child::Leaf(0.0),
            });
            let yes = grow(rng, splits, features, depth - 1);
            let no = grow(rng, splits, features, depth - 1);
            splits[at].yes = yes;
            splits[at].no = no;
            Child::Split(at)
        }
        let root = grow(rng, &mut splits, features, depth);
        Tree {
            target,
            root,
            splits,
        }
    }

    fn ensemble(seed: u64, features: usize, targets: usize) -> Ensemble {
        let mut rng = Rng(seed);
        Ensemble {
            source: "test".into(),
            features,
            targets,
            precision: Precision::F64,
            trees: (0..4 * targets)
                .map(|t| random_tree(&mut rng, features, t % targets, 4))
                .collect(),
            base: (0..targets).map(|t| 0.25 * t as f64 - 0.1).collect(),
            transform: Transform::Softmax,
        }
    }

    fn read_back(ensemble: &Ensemble) -> TreeModel {
        let bytes = crate::convert::onnx::encode(&ensemble.to_onnx().unwrap());
        TreeModel::from_onnx(&bytes).unwrap()
    }

    fn rows(rng: &mut Rng, n: usize, m: usize) -> Vec<f64> {
        (0..n * m).map(|_| rng.value()).collect()
    }

    #[test]
    fn the_onnx_graph_reads_back_with_its_base_and_every_split_mode() {
        let original = ensemble(7, 4, 3);
        let model = read_back(&original);
        assert_eq!(model.operator, "TreeEnsemble");
        assert_eq!(model.ensemble.targets, 3);
        assert_eq!(model.ensemble.features, 4);
        // (A tree that is only a leaf joins the base: the margins below check it.)
        let mut rng = Rng(11);
        for _ in 0..200 {
            let mut x = rows(&mut rng, 1, 4);
            if rng.below(3) == 0 {
                x[rng.below(4)] = f64::NAN;
            }
            let mut want = original.base.clone();
            for tree in &original.trees {
                want[tree.target] += leaf(tree, tree.root, &x);
            }
            let got = model.margin(&x);
            assert!(
                got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12),
                "{x:?}: {got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn values_equal_kernel_shap_s_exact_enumeration_and_add_up() {
        let model = read_back(&ensemble(3, 5, 2));
        let mut rng = Rng(5);
        let background = rows(&mut rng, 7, 5);
        for _ in 0..5 {
            let x = rows(&mut rng, 1, 5);
            let tree = model.explain(&x, &background, &mut || false).unwrap();
            let mut margin = |rows: &[f64], n: usize| -> Result<Vec<f64>, String> {
                Ok(rows
                    .chunks_exact(rows.len() / n)
                    .flat_map(|r| model.margin(r))
                    .collect())
            };
            let exact =
                kernel_shap::explain(&mut margin, &x, &background, &Options::default()).unwrap();
            assert!(exact.exact);
            for (t, values) in tree.shap_values.iter().enumerate() {
                let sum: f64 = values.iter().sum();
                let delta = tree.prediction[t] - tree.expected_value[t];
                assert!((sum - delta).abs() < 1e-12, "additivity: {sum} vs {delta}");
                assert!((tree.expected_value[t] - exact.expected_value[t]).abs() < 1e-12);
                for (a, b) in values.iter().zip(&exact.shap_values[t]) {
                    assert!(
                        (a - b).abs() < 1e-9,
                        "target {t}: {values:?} vs {:?}",
                        exact.shap_values[t]
                    );
                }
            }
        }
    }

    #[test]
    fn averages_and_float_inputs_follow_the_graph() {
        let mut original = ensemble(9, 3, 1);
        original.precision = Precision::F32;
        // 0.1 is not a float: a FLOAT model compares x rounded to f32 with f32 thresholds.
        original.trees[0].splits[0].threshold = 0.1;
        original.trees[0].splits[0].mode = Mode::Leq;
        let model = read_back(&original);
        assert_eq!(model.ensemble.precision, Precision::F32);
        let f = model.ensemble.trees[0].splits[0].feature;
        let mut x = vec![0.0; 3];
        x[f] = 0.1;
        let at = |x: &[f64]| model.ensemble.trees[0].splits[0].goes_true(model.rounded(x)[f]);
        assert!(at(&x), "0.1 rounds to the float threshold");
        assert_eq!(aggregate_scale("AVERAGE", 4).unwrap(), 0.25);
        assert!(aggregate_scale("MAX", 4).unwrap_err().contains("SUM"));
    }

    #[test]
    fn graphs_without_one_ensemble_and_bad_rows_are_refused() {
        let not_trees = crate::convert::onnx::encode(&ModelProto::default());
        assert!(
            TreeModel::from_onnx(&not_trees)
                .unwrap_err()
                .contains("no graph")
        );
        assert!(
            TreeModel::from_onnx(b"\xff\xff")
                .unwrap_err()
                .contains("not an ONNX model")
        );
        let model = read_back(&ensemble(1, 3, 1));
        let err = model.explain(&[1.0], &[0.0; 3], &mut || false).unwrap_err();
        assert!(err.to_string().contains("reads 3"), "{err}");
        let err = model
            .explain(&[1.0; 3], &[0.0; 4], &mut || false)
            .unwrap_err();
        assert!(err.to_string().contains("whole rows"), "{err}");
        let err = model
            .explain(&[1.0; 3], &[0.0; 3], &mut || true)
            .unwrap_err();
        assert_eq!(err, ExplainError::TimedOut);
        // A chain of splits deeper than the walk may recurse.
        let mut deep = ensemble(1, 3, 1);
        let splits = (0..=MAX_DEPTH)
            .map(|n| Split {
                feature: 0,
                threshold: n as f64,
                mode: Mode::Leq,
                categories: Vec::new(),
                missing_true: false,
                yes: Child::Leaf(1.0),
                no: if n == MAX_DEPTH {
                    Child::Leaf(2.0)
                } else {
                    Child::Split(n + 1)
                },
            })
            .collect();
        deep.trees[0] = Tree {
            target: 0,
            root: Child::Split(0),
            splits,
        };
        let bytes = crate::convert::onnx::encode(&deep.to_onnx().unwrap());
        let err = TreeModel::from_onnx(&bytes).unwrap_err();
        assert!(err.contains("1025 levels deep"), "{err}");
    }
}
