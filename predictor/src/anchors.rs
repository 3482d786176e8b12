//! Anchors (Ribeiro, Singh and Guestrin, 2018) for tabular classifiers, as Seldon Alibi's
//! `AnchorTabular` computes them: the rule of the fewest feature conditions that "anchors" a
//! prediction, so that rows which satisfy it get the same class with high probability
//! (`precision`), and the share of the data the rule applies to (`coverage`).
//!
//! Fitted state is the background rows: numerical features are cut at their percentiles
//! (Alibi's `disc_perc`, default 25/50/75), categorical ones are compared for equality. The
//! condition a feature contributes is the bin the explained row falls in (`x <= q1`,
//! `q1 < x <= q2`, `x > q3`, `x = v`). Rows under a rule are drawn from the background rows
//! it holds for, as Alibi's sampler draws training rows that match the anchor (so precision is
//! measured on the data's own distribution under the rule); only for a rule no background row
//! satisfies is each condition's feature redrawn alone from the values that satisfy it. The
//! model labels a batch of them in one call.
//!
//! The search is Alibi's beam search with KL-LUCB (Kaufmann and Kalyanakrishnan, 2013): rules
//! grow one condition at a time, the `beam_size` best of each size are picked by KL-LUCB to
//! within `tau`, and a rule is accepted once its precision is at least `threshold` with its
//! lower confidence bound above `threshold - tau` at confidence `1 - delta`; among accepted
//! rules the one of largest coverage wins. Defaults are Alibi's: threshold 0.95, delta 0.1,
//! tau 0.15, batch size 100, beam size 1.

use std::collections::HashMap;

use crate::kernel_shap::{Calls, ExplainError, ModelFn, SplitMix};

/// The search's settings (Alibi's names and defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The precision a rule must reach.
    pub threshold: f64,
    /// `1 - delta` is the confidence of the precision bounds.
    pub delta: f64,
    /// The margin within which KL-LUCB separates the best rules, and the precision's.
    pub tau: f64,
    /// Rows sampled at a time for one rule.
    pub batch_size: usize,
    /// Rules kept of each size.
    pub beam_size: usize,
    /// Rows sampled for the empty rule before the search starts.
    pub min_samples_start: usize,
    /// The most conditions in a rule (none: as many as there are features).
    pub max_anchor_size: Option<usize>,
    /// The most rows the model labels for one explanation; past it, the search ends with the
    /// best rule found (`success` says whether it met the threshold).
    pub max_model_rows: usize,
    pub seed: u64,
    /// When the explanation must have ended ([`ExplainError::TimedOut`] past it).
    pub deadline: Option<std::time::Instant>,
}

/// The default budget of model rows per explanation.
pub const DEFAULT_MAX_MODEL_ROWS: usize = 200_000;

impl Default for Options {
    fn default() -> Options {
        Options {
            threshold: 0.95,
            delta: 0.1,
            tau: 0.15,
            batch_size: 100,
            beam_size: 1,
            min_samples_start: 100,
            max_anchor_size: None,
            max_model_rows: DEFAULT_MAX_MODEL_ROWS,
            seed: 0,
            deadline: None,
        }
    }
}

/// How the background rows cut each feature into bins.
#[derive(Debug, Clone, PartialEq)]
pub struct Discretizer {
    /// Per feature: `None` for a categorical feature, else its bin edges (ascending, distinct).
    pub edges: Vec<Option<Vec<f64>>>,
}

impl Discretizer {
    /// Cuts each numerical feature of `background` (row-major, `features` wide) at
    /// `percentiles` (0 to 100, linear interpolation as numpy's `percentile`).
    pub fn fit(
        background: &[f64],
        features: usize,
        categorical: &[usize],
        percentiles: &[f64],
    ) -> Discretizer {
        let edges = (0..features)
            .map(|j| {
                if categorical.contains(&j) {
                    return None;
                }
                let mut column: Vec<f64> = background
                    .iter()
                    .skip(j)
                    .step_by(features.max(1))
                    .copied()
                    .collect();
                column.sort_by(f64::total_cmp);
                let mut cuts: Vec<f64> = percentiles
                    .iter()
                    .filter_map(|p| percentile(&column, *p))
                    .collect();
                cuts.sort_by(f64::total_cmp);
                cuts.dedup();
                Some(cuts)
            })
            .collect();
        Discretizer { edges }
    }

    /// The condition feature `j` of value `v` falls under: its bin, or its value.
    fn condition(&self, j: usize, v: f64) -> Option<Condition> {
        match self.edges.get(j)? {
            None => Some(Condition::Equals(v)),
            Some(edges) => {
                // numpy's searchsorted (left): the bin is the number of edges below v.
                let bin = edges.partition_point(|e| *e < v);
                let lower = bin.checked_sub(1).and_then(|b| edges.get(b)).copied();
                let upper = edges.get(bin).copied();
                // A feature with one value in the background has no bins: no condition.
                (lower.is_some() || upper.is_some()).then_some(Condition::Interval { lower, upper })
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let at = (p.clamp(0.0, 100.0) / 100.0) * last as f64;
    let (low, frac) = (at.floor() as usize, at - at.floor());
    let a = *sorted.get(low)?;
    let b = *sorted.get((low + 1).min(last))?;
    Some(a + (b - a) * frac)
}

/// One feature's condition in a rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Condition {
    /// `lower < x <= upper`, either side open.
    Interval {
        lower: Option<f64>,
        upper: Option<f64>,
    },
    /// `x = value` (a categorical feature).
    Equals(f64),
}

impl Condition {
    pub fn holds(&self, v: f64) -> bool {
        match *self {
            Condition::Interval { lower, upper } => {
                lower.is_none_or(|l| v > l) && upper.is_none_or(|u| v <= u)
            }
            Condition::Equals(value) => v == value,
        }
    }

    /// As Alibi writes it: `petal width > 1.80`, `0.30 < x2 <= 0.80`, `colour = 2`.
    pub fn describe(&self, name: &str) -> String {
        match *self {
            Condition::Interval {
                lower: Some(l),
                upper: Some(u),
            } => format!("{l:.2} < {name} <= {u:.2}"),
            Condition::Interval {
                lower: Some(l),
                upper: None,
            } => format!("{name} > {l:.2}"),
            Condition::Interval {
                lower: None,
                upper: Some(u),
            } => format!("{name} <= {u:.2}"),
            Condition::Interval {
                lower: None,
                upper: None,
            } => format!("{name} is anything"),
            Condition::Equals(v) => format!("{name} = {v}"),
        }
    }
}

/// The rule found for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Anchor {
    /// `(feature, condition)` in the order the search added them.
    pub conditions: Vec<(usize, Condition)>,
    /// The precision estimated on the rule's samples.
    pub precision: f64,
    /// The share of background rows the rule applies to.
    pub coverage: f64,
    /// Per prefix of the rule (one condition, two, ...): its precision and coverage.
    pub steps: Vec<(f64, f64)>,
    /// Whether the rule met the threshold (else it is the best one found in the budget).
    pub success: bool,
    /// The class the model predicts for the row, which the rule anchors.
    pub prediction: f64,
    /// Rows the model labelled, in all.
    pub model_rows: usize,
}

/// Precision counts of one rule.
#[derive(Debug, Clone)]
struct Arm {
    /// Features in the order they were added.
    features: Vec<usize>,
    samples: usize,
    positives: usize,
    coverage: f64,
    /// The background rows it holds for.
    covered: Vec<usize>,
}

impl Arm {
    /// The rule of no conditions: every row.
    fn empty() -> Arm {
        Arm {
            features: Vec::new(),
            samples: 0,
            positives: 0,
            coverage: 1.0,
            covered: Vec::new(),
        }
    }

    fn mean(&self) -> f64 {
        self.positives as f64 / self.samples.max(1) as f64
    }
}

/// Why sampling stopped.
enum Stop {
    Budget,
    Error(ExplainError),
}

impl From<ExplainError> for Stop {
    fn from(e: ExplainError) -> Stop {
        Stop::Error(e)
    }
}

/// The sampler and the model's labels for one row.
struct Search<'c, 'm, 'a> {
    calls: &'c mut Calls<'m, 'a>,
    background: &'a [f64],
    features: usize,
    conditions: Vec<Option<Condition>>,
    /// Per feature, the background values its condition holds for (the row's own if none).
    pools: Vec<Vec<f64>>,
    target: f64,
    rng: SplitMix,
    max_model_rows: usize,
}

impl Search<'_, '_, '_> {
    /// Samples `n` rows under each rule of `arms` (one model call) and counts the positives.
    fn sample(&mut self, arms: &mut [&mut Arm], n: usize) -> Result<(), Stop> {
        if self.calls.rows + n * arms.len() > self.max_model_rows {
            return Err(Stop::Budget);
        }
        let rows = self.background.len() / self.features;
        let mut batch = Vec::with_capacity(n * arms.len() * self.features);
        for arm in arms.iter() {
            for _ in 0..n {
                // A background row the rule holds for: the data's own distribution under it.
                if !arm.covered.is_empty() || arm.features.is_empty() {
                    let r = match arm.covered.len() {
                        0 => self.rng.below(rows),
                        c => arm.covered[self.rng.below(c)],
                    } * self.features;
                    batch.extend_from_slice(&self.background[r..r + self.features]);
                    continue;
                }
                // No background row satisfies it: each condition's feature redrawn alone.
                let r = self.rng.below(rows) * self.features;
                let start = batch.len();
                batch.extend_from_slice(&self.background[r..r + self.features]);
                for &j in &arm.features {
                    let pool = &self.pools[j];
                    batch[start + j] = pool[self.rng.below(pool.len())];
                }
            }
        }
        let labels = self.calls.run(&batch, n * arms.len())?;
        let k = self.calls.outputs;
        for (arm, labels) in arms.iter_mut().zip(labels.chunks_exact(n * k)) {
            arm.samples += n;
            arm.positives += labels
                .chunks_exact(k)
                .filter(|l| l[0] == self.target)
                .count();
        }
        Ok(())
    }

    /// The background rows the rule of `features` holds for.
    fn covered(&self, features: &[usize]) -> Vec<usize> {
        self.background
            .chunks_exact(self.features)
            .enumerate()
            .filter(|(_, row)| {
                features
                    .iter()
                    .all(|&j| self.conditions[j].is_some_and(|c| c.holds(row[j])))
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn coverage(&self, features: &[usize]) -> f64 {
        let total = (self.background.len() / self.features).max(1);
        self.covered(features).len() as f64 / total as f64
    }
}

/// The anchor of `x`'s prediction. `model` answers one class per row (as a number); the
/// background rows (row-major, `x.len()` wide) are what rules are sampled from and what
/// coverage is measured on.
pub fn explain(
    model: &mut ModelFn<'_>,
    x: &[f64],
    background: &[f64],
    discretizer: &Discretizer,
    options: &Options,
) -> Result<Anchor, ExplainError> {
    let m = x.len();
    if m == 0 || discretizer.edges.len() != m {
        return Err(ExplainError::Input(format!(
            "a row of {} features is needed, not {m}",
            discretizer.edges.len()
        )));
    }
    if background.is_empty() || !background.len().is_multiple_of(m) {
        return Err(ExplainError::Input(format!(
            "the background holds {} values: not whole rows of {m} features",
            background.len()
        )));
    }
    if !x.iter().all(|v| v.is_finite()) {
        return Err(ExplainError::Input(
            "the row to explain must be finite numbers".into(),
        ));
    }
    let mut calls = Calls::new(model, options.deadline, usize::MAX);
    let target = calls.run(x, 1)?[0];
    let conditions: Vec<Option<Condition>> = x
        .iter()
        .enumerate()
        .map(|(j, v)| discretizer.condition(j, *v))
        .collect();
    let pools = conditions
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let pool: Vec<f64> = background
                .iter()
                .skip(j)
                .step_by(m)
                .copied()
                .filter(|v| c.is_some_and(|c| c.holds(*v)))
                .collect();
            if pool.is_empty() { vec![x[j]] } else { pool }
        })
        .collect();
    let mut search = Search {
        calls: &mut calls,
        background,
        features: m,
        conditions,
        pools,
        target,
        rng: SplitMix(options.seed ^ 0xa5c4_0125),
        max_model_rows: options.max_model_rows.max(options.min_samples_start + 1),
    };
    let mut arms: HashMap<Vec<usize>, Arm> = HashMap::new();
    let mut accepted = None;
    match beam(&mut search, &mut arms, &mut accepted, options) {
        Ok(()) | Err(Stop::Budget) => {}
        Err(Stop::Error(e)) => return Err(e),
    }
    let success = accepted.is_some();
    // Without a rule that met the threshold, the most precise one tried (Alibi's fallback).
    let key = accepted.or_else(|| {
        arms.iter()
            .filter(|(k, _)| !k.is_empty())
            .max_by(|(_, a), (_, b)| {
                (a.mean(), a.coverage)
                    .partial_cmp(&(b.mean(), b.coverage))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map(|(k, _)| k.clone())
    });
    let model_rows = search.calls.rows;
    let empty = Arm::empty();
    let arm = key
        .as_ref()
        .and_then(|k| arms.get(k))
        .or_else(|| arms.get(&Vec::new()))
        .unwrap_or(&empty);
    let steps = (1..=arm.features.len())
        .map(|i| {
            let mut prefix = arm.features[..i].to_vec();
            prefix.sort_unstable();
            let p = arms.get(&prefix).map_or(arm.mean(), Arm::mean);
            (p, search.coverage(&prefix))
        })
        .collect();
    Ok(Anchor {
        conditions: arm
            .features
            .iter()
            .filter_map(|&j| Some((j, search.conditions[j]?)))
            .collect(),
        precision: arm.mean(),
        coverage: arm.coverage,
        steps,
        success,
        prediction: target,
        model_rows,
    })
}

/// `ln(1/delta)`-style exploration rate of KL-LUCB at round `t` over `arms` rules (Alibi's
/// `compute_beta`).
fn beta(arms: usize, t: usize, delta: f64) -> f64 {
    let temp = (405.5 * arms as f64 * (t as f64).powf(1.1) / delta).ln();
    temp + temp.ln()
}

fn kl_bernoulli(p: f64, q: f64) -> f64 {
    let p = p.clamp(1e-7, 1.0 - 1e-7);
    let q = q.clamp(1e-7, 1.0 - 1e-7);
    p * (p / q).ln() + (1.0 - p) * ((1.0 - p) / (1.0 - q)).ln()
}

/// The largest `q >= p` with `KL(p, q) <= level` (bisection, as Alibi's `dup_bernoulli`).
fn upper_bound(p: f64, level: f64) -> f64 {
    let (mut low, mut high) = (p, (p + (level / 2.0).sqrt()).min(1.0));
    for _ in 0..17 {
        let q = (low + high) / 2.0;
        if kl_bernoulli(p, q) > level {
            high = q;
        } else {
            low = q;
        }
    }
    high
}

/// The smallest `q <= p` with `KL(p, q) <= level` (Alibi's `dlow_bernoulli`).
fn lower_bound(p: f64, level: f64) -> f64 {
    let (mut low, mut high) = ((p - (level / 2.0).sqrt()).max(0.0), p);
    for _ in 0..17 {
        let q = (low + high) / 2.0;
        if kl_bernoulli(p, q) > level {
            low = q;
        } else {
            high = q;
        }
    }
    low
}

/// Alibi's `anchor_beam`: grows rules one condition at a time; `accepted` ends as the
/// accepted rule of largest coverage, if any.
fn beam(
    search: &mut Search<'_, '_, '_>,
    arms: &mut HashMap<Vec<usize>, Arm>,
    accepted: &mut Option<Vec<usize>>,
    options: &Options,
) -> Result<(), Stop> {
    let mut empty = Arm::empty();
    search.sample(&mut [&mut empty], options.min_samples_start.max(1))?;
    let (mean, n) = (empty.mean(), empty.samples as f64);
    let empty_holds = mean > options.threshold
        && lower_bound(mean, (1.0 / options.delta).ln() / n) > options.threshold - options.tau;
    arms.insert(Vec::new(), empty);
    if empty_holds {
        *accepted = Some(Vec::new());
        return Ok(());
    }
    let usable: Vec<usize> = (0..search.features)
        .filter(|&j| search.conditions[j].is_some())
        .collect();
    let max_size = options
        .max_anchor_size
        .unwrap_or(usable.len())
        .min(usable.len());
    let mut previous: Vec<Vec<usize>> = vec![Vec::new()];
    let mut best_coverage = -1.0;
    for _size in 1..=max_size {
        // Every rule one condition longer than a kept one, covering more than the best so far.
        let mut candidates: Vec<Vec<usize>> = Vec::new();
        for parent in &previous {
            let order = arms
                .get(&sorted(parent))
                .map_or(parent.clone(), |a| a.features.clone());
            for &j in usable.iter().filter(|j| !parent.contains(j)) {
                let mut features = order.clone();
                features.push(j);
                if !candidates.iter().any(|c| sorted(c) == sorted(&features)) {
                    candidates.push(features);
                }
            }
        }
        let mut fresh: Vec<Arm> = candidates
            .into_iter()
            .map(|features| {
                let covered = search.covered(&features);
                Arm {
                    coverage: covered.len() as f64
                        / (search.background.len() / search.features) as f64,
                    covered,
                    features,
                    samples: 0,
                    positives: 0,
                }
            })
            .filter(|a| a.coverage > best_coverage)
            .collect();
        if fresh.is_empty() {
            break;
        }
        {
            let mut all: Vec<&mut Arm> = fresh.iter_mut().collect();
            search.sample(&mut all, options.batch_size.max(1))?;
        }
        let top = kl_lucb(search, &mut fresh, options)?;
        let chosen: Vec<Vec<usize>> = top.iter().map(|&i| fresh[i].features.clone()).collect();
        let beta = (1.0
            / (options.delta / (1.0 + (options.beam_size as f64 - 1.0) * search.features as f64)))
            .ln();
        let mut stop = false;
        for &i in &top {
            let arm = &mut fresh[i];
            loop {
                let (mean, n) = (arm.mean(), arm.samples as f64);
                let (lb, ub) = (lower_bound(mean, beta / n), upper_bound(mean, beta / n));
                let unsure = (mean >= options.threshold && lb < options.threshold - options.tau)
                    || (mean < options.threshold && ub >= options.threshold + options.tau);
                if !unsure {
                    break;
                }
                search.sample(&mut [&mut *arm], options.batch_size.max(1))?;
            }
            let (mean, n) = (arm.mean(), arm.samples as f64);
            let holds = mean >= options.threshold
                && lower_bound(mean, beta / n) > options.threshold - options.tau;
            if holds && arm.coverage > best_coverage {
                best_coverage = arm.coverage;
                *accepted = Some(sorted(&arm.features));
                stop |= best_coverage >= 1.0;
            }
        }
        for arm in fresh {
            arms.insert(sorted(&arm.features), arm);
        }
        if stop {
            break;
        }
        previous = chosen;
    }
    Ok(())
}

fn sorted(features: &[usize]) -> Vec<usize> {
    let mut key = features.to_vec();
    key.sort_unstable();
    key
}

/// KL-LUCB: samples the two rules whose bounds overlap most until the `beam_size` best are
/// separated from the rest to within `tau`; returns their indices.
fn kl_lucb(
    search: &mut Search<'_, '_, '_>,
    arms: &mut [Arm],
    options: &Options,
) -> Result<Vec<usize>, Stop> {
    let top_n = options.beam_size.clamp(1, arms.len());
    let by_mean = |arms: &[Arm]| {
        let mut order: Vec<usize> = (0..arms.len()).collect();
        order.sort_by(|&a, &b| arms[a].mean().total_cmp(&arms[b].mean()));
        order
    };
    if top_n == arms.len() {
        return Ok(by_mean(arms));
    }
    let mut t = 1;
    loop {
        let order = by_mean(arms);
        let beta = beta(arms.len(), t, options.delta);
        let (rest, best) = order.split_at(order.len() - top_n);
        let bound = |i: usize, up: bool| {
            let (mean, n) = (arms[i].mean(), arms[i].samples.max(1) as f64);
            if up {
                upper_bound(mean, beta / n)
            } else {
                lower_bound(mean, beta / n)
            }
        };
        let (Some(&challenger), Some(&weakest)) = (
            rest.iter()
                .max_by(|&&a, &&b| bound(a, true).total_cmp(&bound(b, true))),
            best.iter()
                .min_by(|&&a, &&b| bound(a, false).total_cmp(&bound(b, false))),
        ) else {
            return Ok(best.to_vec());
        };
        if bound(challenger, true) - bound(weakest, false) <= options.tau {
            return Ok(best.to_vec());
        }
        let [a, b] = arms
            .get_disjoint_mut([weakest, challenger])
            .map_err(|e| Stop::Error(ExplainError::Input(e.to_string())))?;
        search.sample(&mut [a, b], options.batch_size.max(1))?;
        t += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(n: usize, m: usize, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix(seed);
        (0..n * m).map(|_| rng.unit()).collect()
    }

    fn anchor_of(rule: fn(&[f64]) -> bool, x: &[f64], options: &Options) -> Anchor {
        let m = x.len();
        let background = uniform(500, m, 7);
        let discretizer = Discretizer::fit(&background, m, &[], &[25.0, 50.0, 75.0]);
        let mut model = |rows: &[f64], n: usize| -> Result<Vec<f64>, String> {
            Ok(rows
                .chunks_exact(rows.len() / n)
                .map(|r| f64::from(u8::from(rule(r))))
                .collect())
        };
        explain(&mut model, x, &background, &discretizer, options).unwrap()
    }

    #[test]
    fn a_one_feature_rule_is_anchored_on_that_feature() {
        let anchor = anchor_of(|r| r[0] > 0.5, &[0.9, 0.2, 0.7, 0.4], &Options::default());
        assert!(anchor.success, "{anchor:?}");
        assert_eq!(anchor.conditions.len(), 1, "{anchor:?}");
        let (feature, condition) = anchor.conditions[0];
        assert_eq!(feature, 0);
        let Condition::Interval {
            lower: Some(l),
            upper: None,
        } = condition
        else {
            panic!("{condition:?}");
        };
        assert!((l - 0.75).abs() < 0.05, "the top quartile's edge: {l}");
        assert_eq!(anchor.precision, 1.0);
        assert!((anchor.coverage - 0.25).abs() < 0.02, "{anchor:?}");
        assert_eq!(anchor.prediction, 1.0);
        assert!(anchor.model_rows >= 200);
        // The other class is anchored too: x0 <= its quartile.
        let other = anchor_of(|r| r[0] > 0.5, &[0.1, 0.2, 0.7, 0.4], &Options::default());
        assert_eq!(other.prediction, 0.0);
        assert_eq!(
            other.conditions.iter().map(|c| c.0).collect::<Vec<_>>(),
            [0]
        );
    }

    #[test]
    fn a_two_feature_rule_needs_both_and_reaches_the_threshold() {
        let rule = |r: &[f64]| r[0] + r[1] > 1.0;
        let anchor = anchor_of(rule, &[0.9, 0.95, 0.5, 0.5, 0.5], &Options::default());
        assert!(anchor.success, "{anchor:?}");
        let mut features: Vec<usize> = anchor.conditions.iter().map(|c| c.0).collect();
        features.sort_unstable();
        assert_eq!(features, [0, 1], "{anchor:?}");
        assert!(anchor.precision >= 0.95);
        assert_eq!(anchor.steps.len(), 2);
        assert!(
            anchor.steps[0].0 < 0.95,
            "one condition alone is not enough: {anchor:?}"
        );
        // Reproducible.
        assert_eq!(
            anchor,
            anchor_of(rule, &[0.9, 0.95, 0.5, 0.5, 0.5], &Options::default())
        );
    }

    #[test]
    fn budgets_and_bad_input_end_the_search_clearly() {
        // A coin-flip model: no rule reaches 0.95; the budget ends the search, unsuccessful.
        let options = Options {
            max_model_rows: 3_000,
            ..Options::default()
        };
        let anchor = anchor_of(
            |r| ((r[2] * 1e6) as u64).is_multiple_of(2),
            &[0.5, 0.5, 0.5],
            &options,
        );
        assert!(!anchor.success);
        assert!(anchor.model_rows <= 3_000);
        let background = uniform(10, 2, 1);
        let discretizer = Discretizer::fit(&background, 2, &[1], &[50.0]);
        assert_eq!(discretizer.edges[1], None);
        let mut model = |_: &[f64], n: usize| Ok(vec![0.0; n]);
        let err = explain(
            &mut model,
            &[1.0],
            &background,
            &discretizer,
            &Options::default(),
        );
        assert!(matches!(err, Err(ExplainError::Input(_))));
        let late = Options {
            deadline: Some(std::time::Instant::now()),
            ..Options::default()
        };
        let err = explain(&mut model, &[1.0, 2.0], &background, &discretizer, &late);
        assert_eq!(err, Err(ExplainError::TimedOut));
    }

    #[test]
    fn conditions_read_as_alibi_writes_them() {
        let between = Condition::Interval {
            lower: Some(0.3),
            upper: Some(0.8),
        };
        assert_eq!(between.describe("x2"), "0.30 < x2 <= 0.80");
        assert!(between.holds(0.8) && !between.holds(0.3));
        let above = Condition::Interval {
            lower: Some(1.8),
            upper: None,
        };
        assert_eq!(above.describe("petal width"), "petal width > 1.80");
        assert_eq!(Condition::Equals(2.0).describe("colour"), "colour = 2");
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 25.0), Some(1.75));
    }
}
